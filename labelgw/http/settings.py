"""Limits and timeouts of the proxy; defaults follow what trusted proxies ship (nginx, Envoy, HAProxy)."""

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
    # Requests in flight to one service; None means half of max_in_flight, so that one slow or attacked service
    # cannot take the whole capacity from the others.
    max_in_flight_per_service: int | None = None
    # No progress writing to a client for this long: abort the connection (nginx send_timeout). Covers HTTP/2
    # streams whose flow-control window stays closed too.
    send_timeout: float = 60.0
    # Kept in memory while no upstream connection is there yet; past it the client is paused.
    pending_body_limit: int = 256 * 1024

    @property
    def service_in_flight_limit(self) -> int:
        share = self.max_in_flight_per_service
        return share if share is not None else max(1, self.max_in_flight // 2)
