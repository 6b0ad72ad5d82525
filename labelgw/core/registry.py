"""Container specs in, services, backends and routes out. Pure and incremental: a change touches only its own
container's service and hosts. Called on the reactor thread only.

A service's selection policy is built from its first container's spec (its `balancer` label, else the global
default); replicas that ask for another balancer later are logged and otherwise ignored: one service, one policy.

Some label errors involve several containers; the registry finds them and skips only the container that
arrived last, with a Rejection like the label parser's (logged, listed in the admin view):
- two services claiming one host and path: the first keeps it;
- containers of one version with different `traffic` shares;
- `traffic` shares of one service's versions adding up to more than 100 %.
A container skipped for such a conflict is admitted by the next resync after the conflict is gone.

Components that keep per-backend state of their own (the active health checker, outlier ejection) register as
`BackendListener`s, and report a change of a backend's health or ejection through `backend_state_changed`,
which re-derives `backend.ready` the same way a Docker state change does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Protocol

from twisted.logger import Logger

from labelgw.core.backends import Backend, Policy, RoundRobin, ServicePool
from labelgw.core.model import ContainerSpec, Outcome, Rejection
from labelgw.core.routes import Route, RouteTable, wildcard_of

PolicyFactory = Callable[[ContainerSpec], Policy]

# Static backends from the config file carry ids with this prefix; a Docker resync never removes them.
STATIC_PREFIX = "static:"
# Instances registered through the registration API (labelgw.registration): not Docker's either.
REGISTERED_PREFIX = "registered:"
_NOT_DOCKER = (STATIC_PREFIX, REGISTERED_PREFIX)


class BackendListener(Protocol):
    """Told about services and backends as they come and go (on the reactor thread, after the change)."""

    def service_added(self, pool: ServicePool) -> None: ...

    def backend_added(self, pool: ServicePool, backend: Backend) -> None: ...

    def backend_updated(self, pool: ServicePool, backend: Backend) -> None:
        """Same backend (same address and port), new spec: e.g. the container stopped, restarted or turned
        unhealthy in Docker."""
        ...

    def backend_removed(self, pool: ServicePool, backend: Backend) -> None: ...


def _default_policy(spec: ContainerSpec) -> Policy:
    return RoundRobin()


def _readiness(backend: Backend) -> str:
    if backend.ready:
        return "ready"
    if backend.spec.ready and backend.health_state == "unknown":
        return "not ready until its first health check passes"
    return "not ready"


def _routing_key(spec: ContainerSpec) -> tuple[object, ...]:
    return (spec.service, spec.hosts, spec.path_prefix, spec.strip_prefix, spec.scheme)


def _kind(spec: ContainerSpec) -> str:
    """How the log names a backend: static ones from the config file and registered instances are not containers."""
    if spec.container_id.startswith(REGISTERED_PREFIX):
        return "registered instance"
    return "static backend" if spec.container_id.startswith(STATIC_PREFIX) else "container"


def _percent(share: float | None) -> str:
    return "none" if share is None else f"{share:g} %"


class _Claim:
    """Who serves one (host, path prefix): one service, through the containers that declared it."""

    __slots__ = ("route", "members")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.members: set[str] = set()


class Registry:
    _log = Logger()

    def __init__(
        self,
        policy_factory: PolicyFactory = _default_policy,
        on_backend_retired: Callable[[Backend], None] | None = None,
        listeners: Iterable[BackendListener] = (),
        label_prefix: str | None = None,
    ) -> None:
        # Conflicts name the label as the user wrote it (`labelgw.host`); None: the bare suffix (`host`).
        self._label = (lambda suffix: suffix) if label_prefix is None else (lambda suffix: f"{label_prefix}.{suffix}")
        self.table = RouteTable()
        self.containers: dict[str, ContainerSpec] = {}
        self.rejections: dict[str, Rejection] = {}
        self.services: dict[str, ServicePool] = {}
        self._policy_factory = policy_factory
        self._claims: dict[tuple[str, str], _Claim] = {}
        self._host_routes: dict[str, dict[str, Route]] = {}
        # Told when a backend leaves rotation for good, so its idle upstream connections can be closed.
        self._on_backend_retired = on_backend_retired or (lambda backend: None)
        self._listeners: list[BackendListener] = list(listeners)

    def add_listener(self, listener: BackendListener) -> None:
        self._listeners.append(listener)

    # The RouteSink interface the Docker watcher drives.

    def apply(self, container_id: str, outcome: Outcome) -> None:
        if outcome is None:
            self.remove(container_id)
        elif isinstance(outcome, Rejection):
            self._reject(outcome)
        else:
            self._upsert(outcome)

    def mark_down(self, container_id: str) -> None:
        spec = self.containers.get(container_id)
        if spec is None or not spec.ready:
            return
        self._upsert(dataclasses.replace(spec, running=False))

    def remove(self, container_id: str) -> None:
        self.rejections.pop(container_id, None)
        spec = self.containers.pop(container_id, None)
        if spec is not None:
            self._detach(spec)
            self._log.info(
                "{kind} {name} removed from service {service}", kind=_kind(spec), name=spec.name, service=spec.service
            )

    def resync(self, outcomes: Mapping[str, Outcome]) -> None:
        known = set(self.containers) | set(self.rejections)
        for container_id in known - set(outcomes):
            if not container_id.startswith(_NOT_DOCKER):
                self.remove(container_id)
        for container_id, outcome in outcomes.items():
            self.apply(container_id, outcome)

    # Health and ejection changes, from the components that own them.

    def backend_state_changed(self, pool: ServicePool, backend: Backend) -> None:
        """A backend's health state or ejection changed: re-derive its readiness and act on the change."""
        if pool.backends.get(backend.key) is not backend:
            return  # removed (or replaced) meanwhile: nothing to do
        self._readiness_changed(pool, backend, was_ready=backend.ready)

    # Lookups for the proxy and for status views.

    def routes(self) -> list[Route]:
        """Every route, sorted by host and path (for status views)."""
        return sorted((claim.route for claim in self._claims.values()), key=lambda route: (route.host, route.path_prefix))

    def ready_count(self, service: str) -> int:
        pool = self.services.get(service)
        return len(pool.ready) if pool else 0

    def rejected_for(self, host: str) -> Rejection | None:
        """A skipped container that asked for `host` (or for the wildcard covering it), if any: what its 404 should
        mention."""
        wildcard = wildcard_of(host)
        for rejection in self.rejections.values():
            if host in rejection.hosts or (wildcard is not None and wildcard in rejection.hosts):
                return rejection
        return None

    # Internals.

    def _reject(self, rejection: Rejection) -> None:
        if self.rejections.get(rejection.container_id) == rejection:
            return
        spec = self.containers.pop(rejection.container_id, None)
        if spec is not None:
            self._detach(spec)
        self.rejections[rejection.container_id] = rejection
        self._log.warn("skipping {what}", what=rejection.describe(), container=rejection.name, label=rejection.label)

    def _conflict(self, spec: ContainerSpec) -> Rejection | None:
        for host in spec.hosts:
            claim = self._claims.get((host, spec.path_prefix))
            if claim is not None and claim.route.service.name != spec.service:
                return Rejection(
                    spec.container_id,
                    spec.name,
                    self._label("host" if spec.path_prefix == "/" else "path"),
                    host if spec.path_prefix == "/" else spec.path_prefix,
                    f"http://{host}{spec.path_prefix} is already routed to service {claim.route.service.name!r}",
                    spec.hosts,
                )
        pool = self.services.get(spec.service)
        return self._share_conflict(spec, pool) if pool is not None else None

    def _share_conflict(self, spec: ContainerSpec, pool: ServicePool) -> Rejection | None:
        """The `traffic` rules between the containers of one service (the label parser sees one at a time)."""
        version = spec.version or ""
        declared: dict[str, float] = {}
        for backend in pool.backends.values():
            if backend.key == spec.container_id:
                continue
            other = backend.spec
            other_version = other.version or ""
            if other_version == version and other.traffic != spec.traffic:
                return Rejection(
                    spec.container_id, spec.name, self._label("traffic"), _percent(spec.traffic),
                    f"container {other.name} of the same version {version or '(none)'!r} of service "
                    f"{spec.service!r} has traffic {_percent(other.traffic)}; the containers of one version must "
                    "declare the same share",
                    spec.hosts,
                )
            if other.traffic is not None:
                declared.setdefault(other_version, other.traffic)
        if spec.traffic is None or version in declared:
            return None
        declared[version] = spec.traffic
        total = sum(declared.values())
        if total > 100.0:
            listed = ", ".join(f"{name or '(none)'} {share:g} %" for name, share in sorted(declared.items()))
            return Rejection(
                spec.container_id, spec.name, self._label("traffic"), _percent(spec.traffic),
                f"the traffic shares of service {spec.service!r} would add up to {total:g} % ({listed}); "
                "at most 100 %",
                spec.hosts,
            )
        return None

    def _upsert(self, spec: ContainerSpec) -> None:
        old = self.containers.get(spec.container_id)
        if old == spec:
            return
        if old is not None and _routing_key(old) == _routing_key(spec):
            if (old.version, old.traffic) != (spec.version, spec.traffic):
                conflict = self._share_conflict(spec, self.services[spec.service])
                if conflict is not None:
                    self._reject(conflict)  # detaches the old spec
                    return
            self.containers[spec.container_id] = spec
            self._update_backend(spec)
            return
        if old is not None:
            self._detach(old)
            del self.containers[spec.container_id]
        conflict = self._conflict(spec)
        if conflict is not None:
            self._reject(conflict)
            return
        self.rejections.pop(spec.container_id, None)
        self.containers[spec.container_id] = spec
        self._attach(spec)

    def _update_backend(self, spec: ContainerSpec) -> None:
        pool = self.services[spec.service]
        backend = pool.backends[spec.container_id]
        if (backend.address, backend.port) != (spec.address, spec.port):
            old = backend
            self._on_backend_retired(old)
            backend = pool.backends[spec.container_id] = Backend(spec)
            pool.refresh()
            for listener in self._listeners:
                listener.backend_removed(pool, old)
            for listener in self._listeners:
                listener.backend_added(pool, backend)
            if old.ready != backend.ready:
                self._log_readiness(pool, backend)
            return
        was_ready = backend.ready
        backend.spec = spec
        backend.version = spec.version
        backend.weight = spec.weight
        self._readiness_changed(pool, backend, was_ready)
        for listener in self._listeners:
            listener.backend_updated(pool, backend)

    def _readiness_changed(self, pool: ServicePool, backend: Backend, was_ready: bool) -> None:
        pool.recompute(backend)  # calls the policy's on_ready when the backend re-enters rotation
        if was_ready and not backend.ready:
            self._on_backend_retired(backend)
        if was_ready != backend.ready:
            self._log_readiness(pool, backend)

    def _log_readiness(self, pool: ServicePool, backend: Backend) -> None:
        reasons = []
        if not backend.spec.ready:
            reasons.append(f"{_kind(backend.spec)} not ready")
        if backend.health_state not in (None, "healthy"):
            reasons.append(f"health check {backend.health_state}")
        if backend.ejected_until is not None:
            reasons.append("ejected")
        # Unhealthy (Docker's health check or ours) is worth a warning; a container stopping or starting is not.
        unhealthy = not backend.ready and (
            backend.spec.health == "unhealthy" or backend.health_state not in (None, "healthy", "unknown")
        )
        emit = self._log.warn if unhealthy else self._log.info
        emit(
            "backend {name} of service {service} {state}{why} ({ready} ready)",
            name=backend.spec.name, service=pool.name, state="in rotation" if backend.ready else "out of rotation",
            why=f": {', '.join(reasons)}" if reasons else "", ready=len(pool.ready),
        )

    def _attach(self, spec: ContainerSpec) -> None:
        pool = self.services.get(spec.service)
        if pool is None:
            pool = self.services[spec.service] = ServicePool(spec.service, self._policy_factory(spec))
            for listener in self._listeners:
                listener.service_added(pool)
        else:
            wanted = spec.balancer
            chosen = pool.policy.name
            if wanted is not None and wanted != chosen:
                self._log.warn(
                    "container {name} asks for balancer {wanted} but service {service} uses {chosen} "
                    "(its first container's choice)",
                    name=spec.name, wanted=wanted, service=spec.service, chosen=chosen,
                )
            if spec.hash_key is not None and pool.key_source is not None and spec.hash_key != pool.key_source:
                self._log.warn(
                    "container {name} asks for hash key {wanted} but service {service} uses {chosen} "
                    "(its first container's choice)",
                    name=spec.name, wanted=str(spec.hash_key), service=spec.service, chosen=str(pool.key_source),
                )
        backend = pool.backends[spec.container_id] = Backend(spec)
        pool.refresh()
        for listener in self._listeners:
            listener.backend_added(pool, backend)
        for host in spec.hosts:
            key = (host, spec.path_prefix)
            claim = self._claims.get(key)
            if claim is None:
                route = Route(host, spec.path_prefix, pool, spec.strip_prefix, spec.scheme, spec.tls)
                claim = self._claims[key] = _Claim(route)
                self._host_routes.setdefault(host, {})[spec.path_prefix] = route
                self.table.replace_host(host, self._host_routes[host])
                self._log.info("route http://{host}{path} -> service {service}", host=host, path=spec.path_prefix, service=spec.service)
            claim.members.add(spec.container_id)
        self._log.info(
            "{kind} {name} joined service {service} at {address}:{port} ({state}; {ready} ready)",
            kind=_kind(spec), name=spec.name, service=spec.service, address=spec.address, port=spec.port,
            state=_readiness(backend), ready=len(pool.ready),
        )

    def _detach(self, spec: ContainerSpec) -> None:
        pool = self.services.get(spec.service)
        if pool is not None:
            backend = pool.backends.pop(spec.container_id, None)
            pool.refresh()
            if backend is not None:
                self._on_backend_retired(backend)
                for listener in self._listeners:
                    listener.backend_removed(pool, backend)
            if not pool.backends:
                del self.services[spec.service]
        for host in spec.hosts:
            key = (host, spec.path_prefix)
            claim = self._claims.get(key)
            if claim is None:
                continue
            claim.members.discard(spec.container_id)
            if not claim.members:
                del self._claims[key]
                routes = self._host_routes[host]
                del routes[spec.path_prefix]
                if not routes:
                    del self._host_routes[host]
                self.table.replace_host(host, routes)
                self._log.info("route http://{host}{path} removed", host=host, path=spec.path_prefix)
