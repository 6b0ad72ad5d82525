"""Lease bookkeeping on an injected clock: grant, renew, revoke, and a callback the moment a lease expires.

One timer for all leases, and a heap with one entry per lease. A lease is three numbers in three dicts, not an
object: 100 000 leases add no object for the cyclic garbage collector to walk, and a renewal allocates none. A renewal only moves the lease's expiry (O(1), the
common case: heartbeats); when an entry reaches the top of the heap and its lease was renewed meanwhile, it goes
back in at the new expiry (the way Twisted's reactor treats a delayed call pushed later). Pure but for the clock.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["LeaseBook"]


class LeaseBook:
    """Leases by key. `on_expire(key)` is called (on the clock's thread) when a lease runs out; it is gone by then."""

    def __init__(self, clock: IReactorTime, on_expire: Callable[[str], None]) -> None:
        self._clock = clock
        self._on_expire = on_expire
        self._expires: dict[str, float] = {}
        self._ttls: dict[str, float] = {}
        self._serials_of: dict[str, int] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._serials = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, key: object) -> bool:
        return key in self._expires

    def grant(self, key: str, ttl: float, expires: float | None = None) -> float:
        """A new lease for `key` (replacing any), ending `ttl` seconds from now or at `expires`; its expiry."""
        at = self._clock.seconds() + ttl if expires is None else expires
        serial = next(self._serials)
        self._expires[key] = at
        self._ttls[key] = ttl
        self._serials_of[key] = serial
        heapq.heappush(self._heap, (at, serial, key))
        self._arm()
        return at

    def renew(self, key: str) -> float | None:
        """Push `key`'s lease to a full TTL from now; its new expiry, or None when there is no such lease."""
        ttl = self._ttls.get(key)
        if ttl is None:
            return None
        expires = self._expires[key] = self._clock.seconds() + ttl
        return expires

    def revoke(self, key: str) -> bool:
        """End `key`'s lease without calling on_expire; False when there was none."""
        # Its heap entry stays until it surfaces, and is dropped then (its serial matches no lease).
        self._ttls.pop(key, None)
        self._serials_of.pop(key, None)
        return self._expires.pop(key, None) is not None

    def expires(self, key: str) -> float | None:
        return self._expires.get(key)

    def ttl(self, key: str) -> float | None:
        return self._ttls.get(key)

    def snapshot(self) -> dict[str, float]:
        """Each lease's expiry as it is now (a copy: one object, however many leases)."""
        return dict(self._expires)

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
            if self._serials_of.get(key) != serial:
                continue  # revoked or granted again: a stale entry
            expires = self._expires[key]
            if expires > now:
                heapq.heappush(self._heap, (expires, serial, key))  # renewed meanwhile
                continue
            self.revoke(key)
            expired.append(key)
        self._arm()
        for key in expired:
            self._on_expire(key)
