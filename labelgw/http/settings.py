"""Limits and timeouts of the proxy; defaults follow what trusted proxies ship (see shared notes/hardening.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxySettings:
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    # Absolute deadline for a whole request head, so a trickling client cannot hold a connection.
    head_timeout: float = 10.0
    idle_timeout: float = 75.0
    body_timeout: float = 60.0
    upstream_idle_timeout: float = 30.0
    max_idle_per_backend: int = 64
    max_in_flight: int = 1024
    # Kept in memory while no upstream connection is there yet; past it the client is paused.
    pending_body_limit: int = 256 * 1024
