"""The route table: host -> longest matching path prefix -> route. Pure; rebuilt per host, never globally."""

from __future__ import annotations

from typing import Iterable, Mapping

from labelgw.core.backends import ServicePool
from labelgw.core.paths import match_prefix, strip_segments
from labelgw.core.model import normalize_host

__all__ = ["HostRoutes", "Route", "RouteTable", "normalize_host"]


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
    """Host name -> HostRoutes. Each host's entry is replaced whole, so a lookup never sees half an update."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostRoutes] = {}

    def lookup(self, host: str, path: str) -> Route | None:
        routes = self._hosts.get(host)
        if routes is None:
            return None
        return routes.match(path)

    def knows_host(self, host: str) -> bool:
        return host in self._hosts

    def replace_host(self, host: str, routes: Mapping[str, Route]) -> None:
        if routes:
            self._hosts[host] = HostRoutes(routes.values())
        else:
            self._hosts.pop(host, None)

    def all_routes(self) -> list[Route]:
        return [route for host in sorted(self._hosts) for route in self._hosts[host].routes()]
