"""labelgw assembled: listeners, the proxy's shared state, the registry and the Docker watcher, as Services
under one MultiService. Stopping stops accepting, lets in-flight requests finish, then stops the watcher."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from labelgw.config import Settings
from labelgw.http.server import Gateway, ProxyFactory
from labelgw.listeners import ListenerService
from labelgw.registry import Registry


class LabelgwService(MultiService):
    _log = Logger()

    def __init__(self, settings: Settings, reactor: Any) -> None:
        MultiService.__init__(self)
        self.settings = settings
        self.reactor = reactor
        self.registry = Registry(on_backend_retired=lambda backend: self.gateway.pool.retire(backend))
        self.gateway = Gateway(reactor, self.registry.table, settings.proxy)
        self.listeners: list[ListenerService] = []
        factory = ProxyFactory(self.gateway, b"http")
        for description in settings.http:
            listener = ListenerService(reactor, description, factory, "http")
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self.watcher = None
        if settings.docker:
            self.watcher = _make_watcher(settings, reactor, self.registry)
            self.watcher.setServiceParent(self)

    def startService(self) -> None:
        for static in self.settings.static_services:
            for spec in static.specs():
                self.registry.apply(spec.container_id, spec)
        MultiService.startService(self)

    def stopService(self) -> Deferred[Any]:
        # Stop accepting first, then drain in-flight requests, then stop watching Docker.
        self.running = False
        stopped = DeferredList([listener.stopService() for listener in self.listeners], consumeErrors=True)

        def drain(_: Any) -> Deferred[None]:
            self._log.info("draining {count} connections", count=len(self.gateway.connections))
            return self.gateway.drain(self.settings.drain_grace)

        def stop_watcher(_: Any) -> Any:
            if self.watcher is not None and self.watcher.running:
                return self.watcher.stopService()
            return None

        stopped.addCallback(drain)
        stopped.addCallback(stop_watcher)
        stopped.addErrback(lambda failure: self._log.failure("while stopping", failure))
        return stopped


def _make_watcher(settings: Settings, reactor: Any, registry: Registry) -> Any:
    from labelgw.watcher import DockerWatcher

    return DockerWatcher(
        reactor=reactor,
        sink=registry,
        docker_host=settings.docker_host,
        prefix=settings.label_prefix,
        pinned_env=settings.env,
        resync_interval=settings.resync_interval,
    )
