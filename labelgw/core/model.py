"""Frozen value objects shared by the pure modules (labels, routes, registry, backends, versions) and the services.

Labels are read once, by `labelgw.core.labels`, into the typed fields of `ContainerSpec`; everything after that reads
fields and never label text. Static services of the config file produce the same specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from labelgw.core.middleware import MiddlewareSpec

__all__ = [
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_HEALTH_TIMEOUT",
    "BalancerName",
    "ContainerSpec",
    "HashKey",
    "HashKeyKind",
    "HealthCheck",
    "Outcome",
    "Rejection",
    "Scheme",
    "TlsMode",
    "normalize_host",
    "normalize_name",
]

BalancerName = Literal["wrt", "round_robin", "least_conn", "hash"]
# Where `hash` reads a request's key (labelgw.http.hashkey): the client address, a header, a cookie or the path.
HashKeyKind = Literal["ip", "header", "cookie", "path"]
Scheme = Literal["http", "https"]
# "redirect": plain HTTP for the route is answered with a 308 to HTTPS; "off": exempt from --redirect-https;
# "local": no ACME certificate for the route's public host (the local CA's or the default certificate instead).
TlsMode = Literal["redirect", "off", "local"]

DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_HEALTH_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An active health check: `GET <path>` every `interval` seconds, each answer awaited `timeout` seconds."""

    path: str
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT


@dataclass(frozen=True, slots=True)
class HashKey:
    """What `balancer=hash` hashes: `ip`, `header:NAME`, `cookie:NAME` or `path` (the `hash.key` label)."""

    kind: HashKeyKind = "ip"
    # The header's name (lower case: fields are case-insensitive) or the cookie's (case matters); "" otherwise.
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


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
    scheme: Scheme = "http"
    version: str | None = None
    env: str | None = None
    running: bool = True
    paused: bool = False
    # Docker healthcheck state: None when the container has no healthcheck.
    health: str | None = None
    # State.StartedAt: tells a container that restarted from one that is still being stopped.
    started_at: str = ""
    # Relative weight of this backend among its service's (positive).
    weight: float = 1.0
    # Percent of new clients that get this container's version; None: a share of the remainder.
    traffic: float | None = None
    # The balancer this container asks for; None: the gateway's default (--balancer).
    balancer: BalancerName | None = None
    # The key `balancer=hash` reads from each request (`hash.key`); None: the client's address.
    hash_key: HashKey | None = None
    # The active health check; None: only Docker's own healthcheck counts.
    health_check: HealthCheck | None = None
    tls: TlsMode | None = None
    # Backend TLS (scheme=https): verify its certificate (tls.verify), against this CA bundle file instead of the
    # system's (tls.ca), for this name instead of the route's first host (tls.server_name).
    tls_verify: bool = False
    tls_ca: str | None = None
    tls_server_name: str | None = None
    # Canary analysis (labelgw.core.canary): cut this version when its error rate exceeds the stable version's by
    # more than this fraction (0.05 = 5 points), or its p99 exceeds the stable one's times this ratio.
    canary_max_error_rate: float | None = None
    canary_max_latency_ratio: float | None = None
    # Rate limit, concurrency limit, breaker, fallback (labelgw.core.middleware); None: no middleware at all.
    middleware: MiddlewareSpec | None = None
    # Every label under the prefix as written, prefix removed ("balancer", "weight", ...): for views and
    # messages only. Decisions read the typed fields above.
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ready(self) -> bool:
        """May this container receive new requests?"""
        return self.running and not self.paused and self.health in (None, "healthy")

    def option(self, name: str, default: str | None = None) -> str | None:
        """A label as written (for views such as the admin page); never parsed again."""
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
    # The hosts the container asked for, as far as its labels could be read (for the 404 of such a host).
    hosts: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"container {self.name} ({self.container_id[:12]}): label {self.label}={self.value!r}: {self.reason}"


# What one container comes to: routed, skipped for a bad label, or not labelgw's at all (None).
Outcome = ContainerSpec | Rejection | None


def normalize_name(raw: str) -> str:
    """A host name as labelgw compares it: trimmed, lower-case, without the trailing dot of a FQDN.

    The one normaliser of host names: labels, the config file, the route table and TLS server names use it.
    """
    name = raw.strip().lower()
    return name[:-1] if name.endswith(".") else name


def normalize_host(raw: str) -> str:
    """A Host header's value as a route host: its port removed (IPv6 literals keep their brackets), then
    `normalize_name`."""
    host = raw.strip()
    if host.startswith("["):
        end = host.find("]")
        return (host[: end + 1] if end != -1 else host).lower()
    colon = host.rfind(":")
    if colon != -1:
        host = host[:colon]
    return normalize_name(host)
