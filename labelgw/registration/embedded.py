"""The embedded registry (the default): registrations in the gateway's memory, leases on its clock, the state
directory keeping them across a restart (`labelgw.registration.persist`)."""

from __future__ import annotations

import gc
from typing import Any, Callable, Iterable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from labelgw.core.model import Rejection
from labelgw.registration.leases import LeaseBook
from labelgw.registration.model import Registration, RegistrationError, parse_registration
from labelgw.registration.persist import Record, StateFile, read_records
from labelgw.registration.source import RegisteredSource

__all__ = ["EmbeddedRegistry", "RegistryBackend", "conflict_error", "describe"]


class RegistryBackend(Protocol):
    """What the registration API asks of a registry (embedded or etcd). A value, or a Deferred of it (etcd);
    both raise or fail with RegistrationError for answers the client must see (409, 503)."""

    name: str

    def start(self) -> None: ...

    def stop(self) -> "Deferred[None]": ...

    def register(self, registration: Registration) -> "tuple[float, bool] | Deferred[tuple[float, bool]]":
        """(lease expiry, True if it replaced a registration of the same instance id)."""
        ...

    def heartbeat(self, service: str, instance: str) -> "float | None | Deferred[float | None]":
        """The renewed lease's expiry; None when there is no such registration."""
        ...

    def deregister(self, service: str, instance: str) -> "bool | Deferred[bool]": ...

    def listing(self) -> "dict[str, Any] | Deferred[dict[str, Any]]": ...


def conflict_error(registration: Registration, rejection: Rejection) -> RegistrationError:
    """409 for a registration the registry refused because of another service's claim; names both services."""
    label = rejection.label.rsplit(".", 1)[-1]
    field_name = {"host": "hosts", "path": "path", "traffic": "traffic"}.get(label, label)
    return RegistrationError(
        409, field_name,
        f"service {registration.service!r} instance {registration.instance!r}: {rejection.reason}",
    )


def describe(registration: Registration, expires: float | None, now: float) -> dict[str, Any]:
    spec = registration.spec
    return {
        "instance": registration.instance,
        "address": spec.address,
        "port": spec.port,
        "version": spec.version,
        "env": spec.env,
        "hosts": list(spec.hosts),
        "path": spec.path_prefix,
        "weight": spec.weight,
        "traffic": spec.traffic,
        "tags": list(registration.tags),
        "ttl": registration.ttl,
        "expires_at": expires,
        "expires_in": None if expires is None else round(max(0.0, expires - now), 3),
    }


class EmbeddedRegistry:
    name = "embedded"
    _log = Logger()

    def __init__(
        self,
        source: RegisteredSource,
        reactor: Any,
        state_path: str | None = None,
        *,
        prefix: str = "labelgw",
        pinned_env: str | None = None,
        state_factory: Callable[..., StateFile] = StateFile,
    ) -> None:
        self._source = source
        self._reactor = reactor
        self._prefix = prefix
        self._pinned_env = pinned_env
        self.registrations: dict[str, Registration] = {}
        self.leases = LeaseBook(reactor, self._expired)
        self.state = None if state_path is None else state_factory(state_path, reactor, self._snapshot)

    # The RegistryBackend interface.

    def start(self) -> None:
        if self.state is not None:
            self._restore(self.state.path)

    def stop(self) -> "Deferred[None]":
        self.leases.stop()
        return self.state.flush() if self.state is not None else succeed(None)

    def register(self, registration: Registration) -> tuple[float, bool]:
        rejection = self._source.admit(registration)
        if rejection is not None:
            raise conflict_error(registration, rejection)
        replaced = self.registrations.get(registration.key) is not None
        self.registrations[registration.key] = registration
        expires = self.leases.grant(registration.key, registration.ttl)
        self._changed(urgent=True)
        return expires, replaced

    def heartbeat(self, service: str, instance: str) -> float | None:
        expires = self.leases.renew(f"{service}/{instance}")
        if expires is not None:
            self._changed(urgent=False)
        return expires

    def deregister(self, service: str, instance: str) -> bool:
        key = f"{service}/{instance}"
        registration = self.registrations.pop(key, None)
        if registration is None:
            return False
        self.leases.revoke(key)
        self._source.withdraw(service, instance, "deregistered")
        self._changed(urgent=True)
        return True

    def listing(self) -> dict[str, Any]:
        now = self._reactor.seconds()
        services: dict[str, list[dict[str, Any]]] = {}
        for key, registration in sorted(self.registrations.items()):
            entry = describe(registration, self.leases.expires(key), now)
            services.setdefault(registration.service, []).append(entry)
        return {"registry": self.name, "time": now, "services": services}

    # Internals.

    def _expired(self, key: str) -> None:
        registration = self.registrations.pop(key, None)
        if registration is None:
            return
        self._source.withdraw(
            registration.service, registration.instance,
            f"lease expired (no heartbeat for {registration.ttl:g} s)",
        )
        self._changed(urgent=True)

    def _changed(self, urgent: bool) -> None:
        if self.state is not None:
            self.state.changed(urgent)

    def _snapshot(self) -> Iterable[Record]:
        """The registrations as a list of references (one object, cheap); each lease's expiry is read when its
        record is formatted, slice by slice (a heartbeat newer than the save's start: either is a valid expiry; a
        registration removed meanwhile is left out). No copy of the leases: at 100 000 it cost the reactor more
        than a slice."""
        registrations = list(self.registrations.values())  # references only: no tuple per entry to promote
        expiry = self.leases.expires
        return (
            (registration.record, expires)
            for registration in registrations
            if (expires := expiry(registration.key)) is not None
        )

    def _restore(self, path: str) -> None:
        """Registrations of the last run whose leases have time left (blocking read, once, at start)."""
        # No collection while the file is read and its registrations pile up (they all live: a full pass every
        # time the heap grew by a quarter found nothing and cost 0.2-1 s each at 100 000); the service collects once
        # after.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            try:
                records = read_records(path)
            except (OSError, ValueError) as error:
                self._log.error("registrations not restored from {path}: {error}", path=path, error=error)
                return
            kept, dropped = self._apply_saved(records)
        finally:
            if was_enabled:
                gc.enable()
        if records:
            self._log.info(
                "registrations restored from {path}: {kept} with time left, {dropped} expired or invalid",
                path=path, kept=kept, dropped=dropped,
            )

    def _apply_saved(self, records: list[dict[str, Any]]) -> tuple[int, int]:
        now = self._reactor.seconds()
        kept = dropped = 0
        for record in records:
            try:
                expires = float(record["expires"])
                registration = parse_registration(
                    str(record["service"]), str(record["instance"]), record["body"],
                    prefix=self._prefix, pinned_env=self._pinned_env,
                )
            except (KeyError, TypeError, ValueError, RegistrationError) as error:
                self._log.warn("a saved registration is not restored: {error}", error=error)
                dropped += 1
                continue
            if expires <= now:
                dropped += 1
                continue
            self._source.apply(registration)
            self.registrations[registration.key] = registration
            self.leases.grant(registration.key, registration.ttl, expires)
            kept += 1
        return kept, dropped
