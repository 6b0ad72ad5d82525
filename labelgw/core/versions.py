"""Versions of one service: traffic shares by label, and which version a request gets. Pure, and free of HTTP.

A service whose ready backends carry more than one version (`labelgw.version`) is split by version. Each version's
share comes from the `traffic` of its containers (percent; the registry makes sure that the containers of one
version agree and that the shares of a service add up to at most 100 %); versions without one share what remains
equally. A new client gets a version by smooth weighted round robin (nginx's algorithm), so any window of requests
follows the shares closely, and then keeps it while that version has a ready backend; a request may also pin its
version. When a version disappears its share flows to the others.

`decide` takes plain values (the pinned version, the client's sticky version) and returns a `VersionDecision`;
how they travel (a request header, a cookie) is the HTTP layer's business: `labelgw.http.versioning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from labelgw.core.backends import Backend, ServicePool

__all__ = ["VersionDecision", "VersionSplit", "decide", "versioned"]


class VersionSplit:
    """The ready backends of one service, by version, and the share of new clients each version gets."""

    def __init__(self, ready: Sequence[Backend], cut: frozenset[str] = frozenset()) -> None:
        subsets: dict[str, list[Backend]] = {}
        declared: dict[str, float] = {}
        for backend in ready:
            version = backend.version or ""
            subsets.setdefault(version, []).append(backend)
            share = backend.spec.traffic
            if share is not None and version not in declared and version not in cut:
                declared[version] = share
        self.subsets: dict[str, tuple[Backend, ...]] = {version: tuple(group) for version, group in subsets.items()}
        # Versions cut by canary analysis (labelgw.core.canary) get no new clients: as if they had no backend.
        self.cut = cut
        undeclared = [version for version in self.subsets if version not in declared and version not in cut]
        remainder = max(0.0, 100.0 - sum(declared.values()))
        shares = dict(declared)
        for version in undeclared:
            shares[version] = remainder / len(undeclared)
        total = sum(shares.values())
        if total <= 0:
            # Every version says 0 %: better to split equally than to refuse everyone.
            shares = {version: 1.0 for version in self.subsets}
            total = float(len(shares))
        for version in cut & self.subsets.keys():
            shares.setdefault(version, 0.0)
        # Scaled to 100: declared shares under 100 % with no undeclared version to take the rest.
        self.shares: dict[str, float] = {version: 100.0 * share / total for version, share in shares.items()}
        self._order = sorted(self.subsets)
        self._current = {version: 0.0 for version in self._order}

    def choose(self) -> str:
        """The version for a client that has none: smooth weighted round robin over the shares."""
        best = ""
        best_value = -1.0
        current = self._current
        for version in self._order:
            value = current[version] + self.shares[version]
            current[version] = value
            if value > best_value:
                best, best_value = version, value
        current[best] -= 100.0
        return best


def versioned(ready: Sequence[Backend]) -> bool:
    """Does this set of backends need a split? Only when it holds more than one version."""
    first = None
    for backend in ready:
        version = backend.version or ""
        if first is None:
            first = version
        elif version != first:
            return True
    return False


@dataclass(frozen=True, slots=True)
class VersionDecision:
    """Which version (and backend of it) one request gets."""

    # None: the version has no ready backend (a pinned request then gets none from another version).
    backend: Backend | None
    version: str
    # The request named its version: it never leaves it, not even on a retry.
    pinned: bool
    # A version newly given to this client: the client should keep it from now on (the HTTP layer sets a cookie).
    assigned: bool


def decide(
    service: ServicePool, *, pinned: str | None = None, sticky: str | None = None, key: bytes | None = None
) -> VersionDecision:
    """The version for one request to a split service (`service.split` set).

    `pinned`: the version the request asks for, if any. `sticky`: the version the client kept from earlier
    requests, if any; it holds while that version has a ready backend and is not cut by canary analysis, else the
    client gets a new one.
    `key`: the request's hash key (`balancer=hash`), placed among the chosen version's backends.
    """
    split = service.split
    if split is None:
        raise ValueError(f"service {service.name!r} is not split by version")
    if pinned is not None:
        subset = split.subsets.get(pinned)
        return VersionDecision(service.pick_among(subset, key) if subset else None, pinned, True, False)
    if sticky is not None and sticky not in split.cut:
        subset = split.subsets.get(sticky)
        if subset:
            return VersionDecision(service.pick_among(subset, key), sticky, False, False)
    version = split.choose()
    service.sticky_clients[version] = service.sticky_clients.get(version, 0) + 1
    return VersionDecision(service.pick_among(split.subsets[version], key), version, False, True)
