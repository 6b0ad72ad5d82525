"""Lease bookkeeping on an injected clock: grant, renew, revoke, and a callback the moment a lease expires.

One timer for all leases, and a heap with one entry per lease. A renewal only moves the lease's expiry (O(1), the
common case: heartbeats); when an entry reaches the top of the heap and its lease was renewed meanwhile, it goes
back in at the new expiry (the way Twisted's reactor treats a delayed call pushed later). Pure but for the clock.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["LeaseBook"]


class _Lease:
    __slots__ = ("ttl", "expires", "serial")

    def __init__(self, ttl: float, expires: float, serial: int) -> None:
        self.ttl = ttl
        self.expires = expires
        self.serial = serial


class LeaseBook:
    """Leases by key. `on_expire(key)` is called (on the clock's thread) when a lease runs out; it is gone by then."""

    def __init__(self, clock: IReactorTime, on_expire: Callable[[str], None]) -> None:
        self._clock = clock
        self._on_expire = on_expire
        self._leases: dict[str, _Lease] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._serials = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, key: object) -> bool:
        return key in self._leases

    def grant(self, key: str, ttl: float, expires: float | None = None) -> float:
        """A new lease for `key` (replacing any), ending `ttl` seconds from now or at `expires`; its expiry."""
        at = self._clock.seconds() + ttl if expires is None else expires
        serial = next(self._serials)
        self._leases[key] = _Lease(ttl, at, serial)
        heapq.heappush(self._heap, (at, serial, key))
        self._arm()
        return at

    def renew(self, key: str) -> float | None:
        """Push `key`'s lease to a full TTL from now; its new expiry, or None when there is no such lease."""
        lease = self._leases.get(key)
        if lease is None:
            return None
        lease.expires = self._clock.seconds() + lease.ttl
        return lease.expires

    def revoke(self, key: str) -> bool:
        """End `key`'s lease without calling on_expire; False when there was none."""
        # Its heap entry stays until it surfaces, and is dropped then (its serial matches no lease).
        return self._leases.pop(key, None) is not None

    def expires(self, key: str) -> float | None:
        lease = self._leases.get(key)
        return None if lease is None else lease.expires

    def ttl(self, key: str) -> float | None:
        lease = self._leases.get(key)
        return None if lease is None else lease.ttl

    def snapshot(self) -> "dict[str, _Lease]":
        """The leases as they are now (a shallow copy, cheap: a save reads their expiries from another thread)."""
        return dict(self._leases)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = float("inf")

    def _arm(self) -> None:
        if not self._heap:
            return
        at = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            if at >= self._timer_at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._clock.seconds()
        expired: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            _, serial, key = heapq.heappop(self._heap)
            lease = self._leases.get(key)
            if lease is None or lease.serial != serial:
                continue  # revoked or granted again: a stale entry
            if lease.expires > now:
                heapq.heappush(self._heap, (lease.expires, serial, key))  # renewed meanwhile
                continue
            del self._leases[key]
            expired.append(key)
        self._arm()
        for key in expired:
            self._on_expire(key)
