"""The registry as a Service of labelgw: its backend (embedded or etcd) and the API listener (`--registry-api`)."""

from __future__ import annotations

import gc
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from labelgw.cli.listeners import ListenerService
from labelgw.core.registry import Registry
from labelgw.registration.api import ApiFactory, RegistrationApi
from labelgw.registration.embedded import EmbeddedRegistry, RegistryBackend
from labelgw.registration.settings import RegistrySettings
from labelgw.registration.source import RegisteredSource

__all__ = ["RegistrationService", "STATE_FILE"]

STATE_FILE = "registrations.json"


class ApiListener(ListenerService):
    started_message = "labelgw registration API on {url}"


class RegistrationService(Service):
    """Starts the backend (restoring or watching registrations) when labelgw starts; `listener` is the API's, a
    child of labelgw's MultiService like the other listeners so that it stops accepting first."""

    _log = Logger()

    def __init__(
        self, settings: RegistrySettings, reactor: Any, registry: Registry, state_dir: str, *,
        prefix: str = "labelgw", pinned_env: str | None = None,
    ) -> None:
        self.source = RegisteredSource(registry)
        self.backend: RegistryBackend
        if settings.etcd is not None:
            from labelgw.registration.etcd import EtcdRegistry

            self.backend = EtcdRegistry(
                self.source, reactor, settings.etcd, prefix=prefix, pinned_env=pinned_env
            )
        else:
            self.backend = EmbeddedRegistry(
                self.source, reactor, os.path.join(state_dir, STATE_FILE), prefix=prefix, pinned_env=pinned_env
            )
        self.api = RegistrationApi(self.backend, settings.token, prefix=prefix, pinned_env=pinned_env)
        self.listener: ApiListener | None = None
        if settings.api is not None:
            self.listener = ApiListener(reactor, settings.api, ApiFactory(self.api, reactor), "http")

    def summary(self) -> dict[str, Any]:
        """For the admin view: which registry, how many instances, where the API listens, etcd's state."""
        view: dict[str, Any] = {
            "registry": self.backend.name,
            "instances": len(self.source.applied),
            "api": self.listener.url if self.listener is not None and self.listener.port is not None else None,
        }
        etcd = getattr(self.backend, "available", None)
        if etcd is not None:
            backend: Any = self.backend
            view["etcd"] = {"available": backend.available, "watching": backend.watching, "resyncs": backend.resyncs}
        return view

    def startService(self) -> None:
        Service.startService(self)
        self.backend.start()
        if isinstance(self.backend, EmbeddedRegistry) and self.backend.registrations:
            # The restored registrations (and what labelgw loaded) live long: out of the collector's full passes,
            # which would otherwise walk all of them each time the heap grows by a quarter (0.1-1 s at 100 000).
            # Collected first, so that no garbage is frozen; a frozen object still goes when its count drops.
            gc.collect()
            gc.freeze()

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        stopped = self.backend.stop()
        stopped.addErrback(lambda failure: self._log.failure("while stopping the registry", failure))
        return stopped if stopped is not None else succeed(None)
