"""Runtime state of backends and of the services that group them. Pure: no I/O, no reactor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, cast, runtime_checkable

from labelgw.core.model import ContainerSpec, HashKey
from labelgw.core.versions import VersionSplit, versioned

if TYPE_CHECKING:
    from labelgw.core.balancer import HashStats, WrtStats
    from labelgw.core.canary import ServiceCanary


# Active health-check states of a backend whose container has a `health.path` label (None: no check).
HEALTH_UNKNOWN = "unknown"  # no check has succeeded yet: no traffic
HEALTH_HEALTHY = "healthy"
HEALTH_UNHEALTHY = "unhealthy"


class Backend:
    """One upstream address of a service; lives as long as its container keeps the same address and port.

    Mutable on purpose: the proxy counts in-flight requests here, the policy keeps its estimate in `stats`,
    and the upstream pool keeps idle connections in `idle`.

    `ready` is the one flag the proxy reads. It is derived by `recompute()` from three sources, each owned by
    one component: the container's own state (`spec.ready`, from Docker), the active health check
    (`health_state`, from labelgw.control.health) and passive outlier ejection (`ejected_until`, from labelgw.control.outlier).
    """

    __slots__ = (
        "key", "address", "port", "version", "weight", "spec", "ready", "in_flight", "stats", "idle", "requests",
        "errors", "health_state", "ejected_until", "ejections", "consecutive_failures",
    )

    def __init__(self, spec: ContainerSpec, weight: float | None = None) -> None:
        self.key = spec.container_id
        self.address = spec.address
        self.port = spec.port
        self.version = spec.version
        self.weight = spec.weight if weight is None else weight
        self.spec = spec
        # A backend with a health path gets traffic only after its first successful check.
        self.health_state: str | None = HEALTH_UNKNOWN if spec.health_check is not None else None
        # Clock time at which an ejection ends; None when not ejected.
        self.ejected_until: float | None = None
        self.ejections = 0
        # Consecutive failed requests (gateway errors), for outlier ejection.
        self.consecutive_failures = 0
        self.ready = False
        self.recompute()
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        # Owned by the selection policy that keeps per-backend state (wrt: latency estimate, slow start); None
        # means "never seen". The policy checks that the stats are its own before it trusts them.
        self.stats: WrtStats | HashStats | None = None
        # Owned by the upstream connection pool: idle keep-alive connections to this backend.
        self.idle: list[Any] = []

    def recompute(self) -> bool:
        """Derive `ready` from the container, the health check and ejection; True when it changed.

        The caller (the registry) then rebuilds its pool's ready set with `ServicePool.refresh()`."""
        ready = (
            self.spec.ready
            and (self.health_state is None or self.health_state == HEALTH_HEALTHY)
            and self.ejected_until is None
        )
        changed = ready != self.ready
        self.ready = ready
        return changed

    def __repr__(self) -> str:
        return f"<Backend {self.spec.name} {self.address}:{self.port} ready={self.ready} in_flight={self.in_flight}>"


class Policy(Protocol):
    """Chooses a backend among the ready ones. Replaceable per service; time comes from an injected clock."""

    # The balancer's name, as in `<prefix>.balancer` and the admin view.
    @property
    def name(self) -> str: ...

    def pick(self, ready: Sequence[Backend]) -> Backend | None: ...

    def on_start(self, backend: Backend) -> None: ...

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None: ...

    def on_ready(self, backend: Backend) -> None:
        """The backend (re)entered the ready set after having been out (Docker healthy again, health check
        passing again, ejection over): forget what the policy knew about it (slow start)."""
        ...


@runtime_checkable
class KeyedPolicy(Policy, Protocol):
    """A policy that places requests by a key the HTTP layer reads from each request (`hash`). The other
    policies know nothing of keys: a service whose policy is not keyed never has one read."""

    # Where the key comes from (the client address, a header, a cookie, the path).
    key_source: HashKey

    def pick_by_key(self, ready: Sequence[Backend], key: bytes) -> Backend | None: ...


class RoundRobin:
    """Each ready backend in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, ready: Sequence[Backend]) -> Backend | None:
        if not ready:
            return None
        index = self._next % len(ready)
        self._next = index + 1
        return ready[index]

    def on_start(self, backend: Backend) -> None:
        pass

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        pass

    def on_ready(self, backend: Backend) -> None:
        pass


class ServicePool:
    """All backends of one service; `ready` is rebuilt only when one of this service's backends changes."""

    # The service's middleware chain (labelgw.middleware.chain.Chain), set once when it appears; None: none.
    middleware: Any = None

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.policy = policy
        self.backends: dict[str, Backend] = {}
        self.ready: tuple[Backend, ...] = ()
        # Set when the ready backends hold more than one version (labelgw.core.versions).
        self.split: VersionSplit | None = None
        # Requests in flight to this service (kept by the proxy, bounded by ProxySettings.max_in_flight_per_service).
        self.in_flight = 0
        # New clients given each version (and its cookie) so far: the admin view's sticky clients.
        self.sticky_clients: dict[str, int] = {}
        # What the HTTP layer reads from each request for a keyed policy (`hash`); None for every other policy.
        self.key_source: HashKey | None = policy.key_source if isinstance(policy, KeyedPolicy) else None
        # Canary analysis by version (labelgw.core.canary): windows and cuts; None until a split service serves.
        self.canary: ServiceCanary | None = None

    def refresh(self) -> None:
        self.ready = tuple(b for b in self.backends.values() if b.ready)
        cut: frozenset[str] = frozenset()
        if self.canary is not None:
            # A new container in a version (a new deploy) lifts its cut; cut versions get no new clients.
            self.canary.sync(self.backends.values())
            cut = self.canary.cut_versions()
        self.split = VersionSplit(self.ready, cut) if versioned(self.ready) else None

    def recompute(self, backend: Backend) -> bool:
        """Re-derive one backend's `ready` after one of its sources changed; True when it changed.

        Rebuilds the ready set, and tells the policy when the backend re-entered rotation, so that it starts
        afresh (slow start) instead of being judged on what it did before it went out."""
        if not backend.recompute():
            return False
        self.refresh()
        if backend.ready:
            self.policy.on_ready(backend)
        return True

    def ejected_count(self) -> int:
        return sum(1 for backend in self.backends.values() if backend.ejected_until is not None)

    def pick(
        self, exclude: Backend | None = None, version: str | None = None, pinned: bool = False, key: bytes | None = None
    ) -> Backend | None:
        ready = self.ready
        split = self.split
        if version is not None and split is not None:
            # Stay within the version (a retry keeps a sticky client's version) while it has another backend;
            # a request pinned to a version never leaves it.
            subset = split.subsets.get(version, ())
            if pinned or len(subset) > (0 if exclude is None else 1):
                ready = subset
                if exclude is not None and not any(b is not exclude for b in ready):
                    return None
        if exclude is not None and len(ready) > 1:
            ready = tuple(b for b in ready if b is not exclude)
        return self.pick_among(ready, key)

    def pick_among(self, ready: Sequence[Backend], key: bytes | None = None) -> Backend | None:
        """The policy's pick among `ready`; by `key` when there is one (only a keyed policy's service gets one)."""
        if key is not None:
            return cast(KeyedPolicy, self.policy).pick_by_key(ready, key)
        return self.policy.pick(ready)
