"""Runtime state of backends and of the services that group them. Pure: no I/O, no reactor."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from labelgw.model import ContainerSpec


class Backend:
    """One upstream address of a service; lives as long as its container keeps the same address and port.

    Mutable on purpose: the proxy counts in-flight requests here, the policy keeps its estimate in `stats`,
    and the upstream pool keeps idle connections in `idle`.
    """

    __slots__ = ("key", "address", "port", "version", "weight", "spec", "ready", "in_flight", "stats", "idle", "requests", "errors")

    def __init__(self, spec: ContainerSpec, weight: float = 1.0) -> None:
        self.key = spec.container_id
        self.address = spec.address
        self.port = spec.port
        self.version = spec.version
        self.weight = weight
        self.spec = spec
        self.ready = spec.ready
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        # Owned by the selection policy (latency estimate, slow-start origin, ...).
        self.stats: Any = None
        # Owned by the upstream connection pool: idle keep-alive connections to this backend.
        self.idle: list[Any] = []

    def __repr__(self) -> str:
        return f"<Backend {self.spec.name} {self.address}:{self.port} ready={self.ready} in_flight={self.in_flight}>"


class Policy(Protocol):
    """Chooses a backend among the ready ones. Replaceable per service; time comes from an injected clock."""

    def pick(self, ready: Sequence[Backend]) -> Backend | None: ...

    def on_start(self, backend: Backend) -> None: ...

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None: ...


class RoundRobin:
    """Each ready backend in turn."""

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


PolicyFactory = Callable[[str], Policy]


def round_robin_factory(service: str) -> Policy:
    return RoundRobin()


class ServicePool:
    """All backends of one service; `ready` is rebuilt only when one of this service's backends changes."""

    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.policy = policy
        self.backends: dict[str, Backend] = {}
        self.ready: tuple[Backend, ...] = ()

    def refresh(self) -> None:
        self.ready = tuple(b for b in self.backends.values() if b.ready)

    def pick(self, exclude: Backend | None = None) -> Backend | None:
        ready = self.ready
        if exclude is not None and len(ready) > 1:
            ready = tuple(b for b in ready if b is not exclude)
        return self.policy.pick(ready)
