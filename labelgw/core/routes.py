"""The route table: host -> longest matching path prefix -> route. Pure; rebuilt per host, never globally.

Hosts are exact names or one-label wildcards (`*.apps.localhost`, labelgw.core.labels). A request's host is
looked up exactly first; only when that misses, its parent name (the host without its first label) is looked up
among the wildcards, so `a.apps.localhost` matches `*.apps.localhost` while `apps.localhost` and
`a.b.apps.localhost` do not, and an exact host always wins over a wildcard covering it (whatever their paths).
"""

from __future__ import annotations

from typing import Iterable, Mapping

from labelgw.core.backends import ServicePool
from labelgw.core.paths import match_prefix, strip_segments
from labelgw.core.model import normalize_host

__all__ = ["HostRoutes", "Route", "RouteTable", "is_wildcard", "normalize_host", "wildcard_of"]


def is_wildcard(host: str) -> bool:
    """Is this route host a one-label wildcard (`*.apps.localhost`)?"""
    return host.startswith("*.")


def wildcard_of(host: str) -> str | None:
    """The wildcard route host that would cover a request's `host` one label deep ("a.b.c" -> "*.b.c"), or None
    (no parent, or the host holds a '*' itself: a literal wildcard is never a request's name)."""
    first, dot, parent = host.partition(".")
    if not dot or not first or not parent or "*" in host:
        return None
    return "*." + parent


class Route:
    """Where requests for one (host, path prefix) go. The service pool is shared and changes in place."""

    __slots__ = ("host", "path_prefix", "match_prefix", "service", "strip_prefix", "scheme", "tls")

    def __init__(
        self, host: str, path_prefix: str, service: ServicePool, strip_prefix: bool = False, scheme: str = "http",
        tls: str | None = None,
    ) -> None:
        self.host = host
        self.path_prefix = path_prefix
        # The prefix as request paths are matched: escapes normalised like theirs (labelgw.core.paths).
        self.match_prefix = match_prefix(path_prefix)
        self.service = service
        self.strip_prefix = strip_prefix
        self.scheme = scheme
        # The <prefix>.tls label: "redirect" answers plain HTTP with a 308 to HTTPS, "off" never does.
        self.tls = tls

    def upstream_path(self, target: bytes) -> bytes:
        """The request target to send upstream: the prefix removed when the route strips it. C{target} is the
        forwarded form of labelgw.core.paths.route_target, whose matching form routed here."""
        if not self.strip_prefix or self.match_prefix == "/":
            return target
        return strip_segments(target, self.match_prefix)

    def __repr__(self) -> str:
        return f"<Route {self.host}{self.path_prefix} -> {self.service.name}>"


class HostRoutes:
    """The routes of one host, immutable once built. Matching costs one dict lookup per distinct prefix length."""

    __slots__ = ("_all", "_by_prefix", "_lengths", "_root")

    def __init__(self, routes: Iterable[Route]) -> None:
        self._all = list(routes)
        # Keyed by matching form; of two prefixes with one matching form (/%7Ea, /~a) the first keeps it.
        self._by_prefix: dict[str, Route] = {}
        for route in self._all:
            self._by_prefix.setdefault(route.match_prefix, route)
        self._root = self._by_prefix.get("/")
        self._lengths = sorted({len(prefix) for prefix in self._by_prefix if prefix != "/"}, reverse=True)

    def match(self, path: str) -> Route | None:
        """The route of a path in matching form (labelgw.core.paths.route_target)."""
        for length in self._lengths:
            # A prefix matches whole segments only: "/api" matches "/api" and "/api/x", never "/apix".
            if len(path) >= length and (len(path) == length or path[length] == "/"):
                route = self._by_prefix.get(path[:length])
                if route is not None:
                    return route
        return self._root

    def routes(self) -> list[Route]:
        return list(self._all)


class RouteTable:
    """Host name -> HostRoutes. Each host's entry is replaced whole, so a lookup never sees half an update.

    Wildcard hosts are kept apart, keyed by their parent name, so that an exact lookup never finds one (a request
    for the literal host `*.apps.localhost` is not routed) and a miss costs one more dict lookup.
    """

    def __init__(self) -> None:
        self._hosts: dict[str, HostRoutes] = {}
        # "*.apps.localhost" is kept under "apps.localhost".
        self._wildcards: dict[str, HostRoutes] = {}

    def _routes_for(self, host: str) -> HostRoutes | None:
        routes = self._hosts.get(host)
        if routes is None and self._wildcards:
            first, dot, parent = host.partition(".")
            if dot and first and "*" not in first:
                routes = self._wildcards.get(parent)
        return routes

    def lookup(self, host: str, path: str) -> Route | None:
        # Inlined _routes_for: the exact hit (nearly every request) costs what it cost before wildcards.
        routes = self._hosts.get(host)
        if routes is None:
            if not self._wildcards:
                return None
            first, dot, parent = host.partition(".")
            if not dot or not first or "*" in first:
                return None
            routes = self._wildcards.get(parent)
            if routes is None:
                return None
        return routes.match(path)

    def knows_host(self, host: str) -> bool:
        """Is `host` routed, exactly or by a wildcard (the local CA mints for it)?"""
        return self._routes_for(host) is not None

    def knows_exact_host(self, host: str) -> bool:
        """Is `host` itself a route host (an exact name, or a wildcard written as `*.<name>`)?"""
        if is_wildcard(host):
            return host[2:] in self._wildcards
        return host in self._hosts

    def matched_host(self, host: str) -> str | None:
        """The route host that serves requests for `host`: itself, the wildcard covering it, or None."""
        if host in self._hosts:
            return host
        if self._routes_for(host) is not None:
            return "*." + host.partition(".")[2]
        return None

    def replace_host(self, host: str, routes: Mapping[str, Route]) -> None:
        table, key = (self._wildcards, host[2:]) if is_wildcard(host) else (self._hosts, host)
        if routes:
            table[key] = HostRoutes(routes.values())
        else:
            table.pop(key, None)

    def all_routes(self) -> list[Route]:
        hosts = {**self._hosts, **{"*." + parent: routes for parent, routes in self._wildcards.items()}}
        return [route for host in sorted(hosts) for route in hosts[host].routes()]
