"""The hash ring of `balancer=hash`: consistent hashing with weighted points. Pure: no I/O, no clock, no HTTP.

Each member (a backend, named by a stable identity) owns `points_for(weight)` points on a 64-bit ring, at
blake2b(identity #i) for i = 0, 1, ...: a member's points depend on its identity and weight alone, never on
the other members, so adding or removing one member moves only the keys that land on its points (Karger et
al. 1997). A key goes to the owner of the first point at or after the key's own hash, clockwise.

The load bound (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018) is
applied by the policy that walks the ring (`labelgw.core.balancer.ConsistentHash`): `successors` gives the
members in ring order from a key's position, each once, and `capacity` is the bound.

blake2b rather than Python's `hash()`: that one is salted per process, and a key must reach the same backend
after a restart of the gateway.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from hashlib import blake2b
from typing import Iterator, Sequence

__all__ = [
    "LOAD_FACTOR",
    "MAX_POINTS",
    "POINTS_PER_WEIGHT",
    "Ring",
    "capacity",
    "key_hash",
    "points_for",
]

# Points per unit of weight. The share of the ring a member owns has a relative spread of about
# 1/sqrt(points) (the arcs are Dirichlet-distributed): 256 points keep it near 6 %, so that adding a backend
# to n moves close to 1/(n+1) of the keys. Building them costs about 0.1 ms per backend, once.
POINTS_PER_WEIGHT = 256
# A member never gets more points than this (weights up to 256 stay proportional; above, they are capped).
MAX_POINTS = 65536
# Mirrokni et al.'s 1 + epsilon: no member takes more than 1.25 x its weighted share of the requests in flight.
LOAD_FACTOR = 1.25

_MASK = (1 << 64) - 1


def key_hash(key: bytes) -> tuple[int, float]:
    """A key's position on the ring (64 bits) and an independent uniform draw in [0, 1) (for slow start)."""
    digest = blake2b(key, digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big") / 18446744073709551616.0


def points_for(weight: float) -> int:
    """How many points a member of this weight owns: proportional, at least one, at most MAX_POINTS."""
    return max(1, min(MAX_POINTS, round(POINTS_PER_WEIGHT * weight)))


def capacity(load_factor: float, in_flight_total: int, weight: float, total_weight: float) -> int:
    """The most requests in flight a member may hold after taking one more: c x its share of the m + 1
    requests, rounded down, but never less than that share rounded up.

    Mirrokni et al. round c x share up; rounding down keeps the bound exact (no member ever over 1.25 x its
    share once the share is 4 requests or more), and the floor of one fair share keeps the guarantee that some
    member has room: the capacities add up to at least m + 1."""
    share = (in_flight_total + 1) * weight / total_weight
    # The small margins keep float noise from moving an exact product across an integer (1.25 x 4 / 5).
    return max(math.ceil(share - 1e-9), math.floor(load_factor * share + 1e-9))


# Identity -> its point hashes, computed once per identity and extended when its weight grows.
_POINT_CACHE: dict[str, list[int]] = {}
_POINT_CACHE_LIMIT = 4096


def _points(identity: str, count: int) -> list[int]:
    cached = _POINT_CACHE.get(identity)
    if cached is None or len(cached) < count:
        start = 0 if cached is None else len(cached)
        extra = [
            int.from_bytes(blake2b(f"{identity}#{index}".encode(), digest_size=8).digest(), "big")
            for index in range(start, count)
        ]
        cached = extra if cached is None else cached + extra
        if len(_POINT_CACHE) >= _POINT_CACHE_LIMIT:
            _POINT_CACHE.clear()
        _POINT_CACHE[identity] = cached
    return cached[:count]


class Ring:
    """The sorted points of one set of members; `owners[i]` is the index (in `members`) of point i's owner."""

    __slots__ = ("members", "weights", "total_weight", "points", "owners")

    def __init__(self, members: Sequence[tuple[str, float]]) -> None:
        """`members`: (identity, weight) pairs; identities must differ."""
        self.members = tuple(identity for identity, _ in members)
        self.weights = tuple(weight for _, weight in members)
        self.total_weight = sum(self.weights)
        placed: list[tuple[int, int]] = []
        for index, (identity, weight) in enumerate(members):
            placed.extend((point, index) for point in _points(identity, points_for(weight)))
        # Ties (two members hashing a point to the same 64-bit value) are broken by member order: deterministic.
        placed.sort()
        self.points = [point for point, _ in placed]
        self.owners = [index for _, index in placed]

    def __len__(self) -> int:
        return len(self.points)

    def first(self, position: int) -> int:
        """The index of the first point at or after `position`, clockwise (wrapping to 0)."""
        index = bisect_left(self.points, position & _MASK)
        return 0 if index == len(self.points) else index

    def owner(self, position: int) -> int:
        """The member a key at `position` belongs to when every member may take it."""
        return self.owners[self.first(position)]

    def successors(self, position: int) -> Iterator[int]:
        """Member indices in ring order from `position`, each once: where a key goes when the ones before are
        full (or out)."""
        points = len(self.points)
        if not points:
            return
        owners = self.owners
        start = self.first(position)
        seen: set[int] = set()
        wanted = len(self.members)
        for step in range(points):
            index = start + step
            owner = owners[index - points if index >= points else index]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == wanted:
                    return
