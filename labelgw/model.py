"""Frozen value objects shared by the pure modules (labels, routes, registry) and the services."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """What one container (or one static backend from the config file) asks labelgw to route."""

    container_id: str
    name: str
    service: str
    address: str
    port: int
    hosts: tuple[str, ...]
    path_prefix: str = "/"
    strip_prefix: bool = False
    scheme: str = "http"
    version: str | None = None
    env: str | None = None
    running: bool = True
    paused: bool = False
    # Docker healthcheck state: None when the container has no healthcheck.
    health: str | None = None
    # State.StartedAt: tells a container that restarted from one that is still being stopped.
    started_at: str = ""
    # Every label under the prefix, with the prefix removed ("balancer", "weight", ...), for later policies.
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ready(self) -> bool:
        """May this container receive new requests?"""
        return self.running and not self.paused and self.health in (None, "healthy")

    def option(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class Rejection:
    """A container that asked to be routed but cannot be: names the label, its value and the reason."""

    container_id: str
    name: str
    label: str
    value: str
    reason: str

    def describe(self) -> str:
        return f"container {self.name} ({self.container_id[:12]}): label {self.label}={self.value!r}: {self.reason}"
