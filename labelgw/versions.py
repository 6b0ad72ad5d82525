"""Versions of one service: traffic shares by label, pinning by request header, stickiness by cookie. Pure.

A service whose ready backends carry more than one version (`labelgw.version`) is split by version. Each version's
share comes from the `labelgw.traffic` label of its containers (percent); versions without it share what remains
equally. A new client gets a version by smooth weighted round robin (nginx's algorithm), so any window of requests
follows the shares closely, then keeps it through a cookie while that version has a ready backend. A request
header pins a request to one version. When a version disappears its share flows to the others.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from labelgw.backends import Backend, ServicePool
    from labelgw.http.parser import RequestHead

DEFAULT_VERSION_HEADER = b"x-labelgw-version"
COOKIE_PREFIX = "labelgw_version_"


def _traffic(backend: "Backend") -> float | None:
    value = backend.spec.option("traffic")
    if value is None:
        return None
    try:
        return float(value.strip().rstrip("%"))
    except ValueError:  # labels.py refuses these; a static spec cannot have one
        return None


class VersionSplit:
    """The ready backends of one service, by version, and the share of new clients each version gets."""

    def __init__(self, ready: Sequence["Backend"]) -> None:
        subsets: dict[str, list["Backend"]] = {}
        declared: dict[str, float] = {}
        for backend in ready:
            version = backend.version or ""
            subsets.setdefault(version, []).append(backend)
            share = _traffic(backend)
            if share is not None and version not in declared:
                declared[version] = share
        self.subsets: dict[str, tuple["Backend", ...]] = {version: tuple(group) for version, group in subsets.items()}
        undeclared = [version for version in self.subsets if version not in declared]
        remainder = max(0.0, 100.0 - sum(declared.values()))
        shares = dict(declared)
        for version in undeclared:
            shares[version] = remainder / len(undeclared)
        total = sum(shares.values())
        if total <= 0:
            # Every version says 0 %: better to split equally than to refuse everyone.
            shares = {version: 1.0 for version in self.subsets}
            total = float(len(shares))
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


def versioned(ready: Sequence["Backend"]) -> bool:
    """Does this set of backends need a split? Only when it holds more than one version."""
    first = None
    for backend in ready:
        version = backend.version or ""
        if first is None:
            first = version
        elif version != first:
            return True
    return False


def cookie_name(service: str) -> str:
    return COOKIE_PREFIX + service


_COOKIE_VALUE_CACHE: dict[str, re.Pattern[bytes]] = {}


def sticky_version(cookie_header: bytes | None, service: str) -> str | None:
    """The version named by this service's cookie in a Cookie header, if any."""
    if not cookie_header:
        return None
    pattern = _COOKIE_VALUE_CACHE.get(service)
    if pattern is None:
        pattern = _COOKIE_VALUE_CACHE[service] = re.compile(
            rb"(?:^|;)\s*" + re.escape(cookie_name(service).encode()) + rb"=([^;\s]*)"
        )
    match = pattern.search(cookie_header)
    return match.group(1).decode("latin-1") if match else None


def set_cookie_line(service: str, version: str) -> bytes:
    # Session cookie: the version follows the client while it exists; JavaScript does not need it.
    return f"Set-Cookie: {cookie_name(service)}={version}; Path=/; HttpOnly; SameSite=Lax\r\n".encode("latin-1")


def choose_version(
    service: "ServicePool", head: "RequestHead", version_header: bytes
) -> tuple["Backend | None", str | None, bytes, bool]:
    """Backend, version, Set-Cookie line (or b"") and whether the request pinned its version."""
    split = service.split
    assert split is not None
    pinned = head.field(version_header)
    if pinned is not None:
        version = pinned.decode("latin-1")
        subset = split.subsets.get(version)
        return (service.policy.pick(subset) if subset else None), version, b"", True
    sticky = sticky_version(head.field(b"cookie"), service.name)
    if sticky is not None and sticky in split.subsets:
        return service.policy.pick(split.subsets[sticky]), sticky, b"", False
    version = split.choose()
    service.sticky_clients[version] = service.sticky_clients.get(version, 0) + 1
    return service.policy.pick(split.subsets[version]), version, set_cookie_line(service.name, version), False
