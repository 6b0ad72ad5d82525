"""The route table (labelgw.core.routes): host normalisation, longest path prefix on segment boundaries, prefix
stripping, and whole-host replacement."""

from __future__ import annotations

from typing import Iterator, Mapping

import pytest

from labelgw.core.backends import RoundRobin, ServicePool
from labelgw.core.paths import PathRefused, route_target
from labelgw.core.routes import HostRoutes, Route, RouteTable, normalize_host


def pool(name: str) -> ServicePool:
    return ServicePool(name, RoundRobin())


def route(host: str, prefix: str, service: str | None = None, strip: bool = False) -> Route:
    return Route(host, prefix, pool(service or f"{host}{prefix}"), strip_prefix=strip)


def table_with(host: str, *prefixes: str) -> RouteTable:
    table = RouteTable()
    table.replace_host(host, {prefix: route(host, prefix) for prefix in prefixes})
    return table


def served_prefix(table: RouteTable, host: str, path: str) -> str | None:
    found = table.lookup(host, path)
    return None if found is None else found.path_prefix


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("api.localhost", "api.localhost"),
        ("API.LocalHost", "api.localhost"),
        ("api.localhost:8080", "api.localhost"),
        ("API.localhost:80", "api.localhost"),
        ("api.localhost.", "api.localhost"),
        ("api.localhost.:8080", "api.localhost"),
        ("api.localhost:", "api.localhost"),
        (" api.localhost ", "api.localhost"),
        ("127.0.0.1:18080", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("[fe80::1%25eth0]:80", "[fe80::1%25eth0]"),
        ("localhost", "localhost"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, normal: str) -> None:
    assert normalize_host(raw) == normal


# Longest prefix on segment boundaries.

PREFIXES = ("/", "/api", "/api/v2", "/static")


@pytest.mark.parametrize(
    ("path", "prefix"),
    [
        ("/", "/"),
        ("/index.html", "/"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/api/x", "/api"),
        ("/api/v1/users", "/api"),
        ("/api/v2", "/api/v2"),
        ("/api/v2/", "/api/v2"),
        ("/api/v2/users/7", "/api/v2"),
        ("/api/v22", "/api"),
        ("/api/v2x/y", "/api"),
        ("/apix", "/"),
        ("/apix/v2", "/"),
        ("/ap", "/"),
        ("/API", "/"),  # paths are case-sensitive
        ("/static/a.css", "/static"),
        ("/staticky", "/"),
        ("//api", "/"),
    ],
)
def test_longest_prefix_on_segment_boundaries(path: str, prefix: str) -> None:
    assert served_prefix(table_with("a", *PREFIXES), "a", path) == prefix


@pytest.mark.parametrize(("path", "prefix"), [("/api", "/api"), ("/api/x", "/api"), ("/apix", None), ("/", None), ("/other", None)])
def test_no_root_route(path: str, prefix: str | None) -> None:
    assert served_prefix(table_with("a", "/api"), "a", path) == prefix


def test_prefixes_of_the_same_length() -> None:
    table = table_with("a", "/aaa", "/bbb", "/ccc")
    assert [served_prefix(table, "a", p) for p in ("/aaa/1", "/bbb", "/ccc/", "/ddd")] == ["/aaa", "/bbb", "/ccc", None]


def test_unknown_host() -> None:
    table = table_with("api.localhost", "/")
    assert table.lookup("web.localhost", "/") is None
    assert table.knows_host("api.localhost")
    assert not table.knows_host("web.localhost")
    # The table compares normalised hosts: normalising is the caller's job.
    assert table.lookup("API.localhost", "/") is None
    assert table.lookup(normalize_host("API.localhost:8080"), "/") is not None


def test_lookup_returns_the_route_with_its_service() -> None:
    table = RouteTable()
    api = route("a", "/api", service="api")
    table.replace_host("a", {"/api": api})
    found = table.lookup("a", "/api/x")
    assert found is api
    assert found.service.name == "api"
    assert repr(found) == "<Route a/api -> api>"


@pytest.mark.parametrize(
    ("prefix", "strip", "target", "upstream"),
    [
        ("/api", True, b"/api", b"/"),
        ("/api", True, b"/api/", b"/"),
        ("/api", True, b"/api/users", b"/users"),
        ("/api", True, b"/api/users/7?x=1", b"/users/7?x=1"),
        ("/api", True, b"/api?x=1", b"/?x=1"),
        ("/api", True, b"/api?next=/api/x", b"/?next=/api/x"),
        ("/api", True, b"/api/?x=1", b"/?x=1"),
        ("/api", True, b"/api//x", b"//x"),
        ("/api/v2", True, b"/api/v2/a", b"/a"),
        ("/api", False, b"/api/users?x=1", b"/api/users?x=1"),
        ("/", True, b"/users?x=1", b"/users?x=1"),
        ("/", False, b"/", b"/"),
    ],
)
def test_upstream_path(prefix: str, strip: bool, target: bytes, upstream: bytes) -> None:
    assert route("a", prefix, strip=strip).upstream_path(target) == upstream


@pytest.mark.parametrize(
    ("prefix", "strip", "target", "upstream"),
    [
        # Targets as labelgw.core.paths forwards them: escapes as received, the prefix cut by segments.
        ("/api", True, b"/%61pi/users?x=1", b"/users?x=1"),
        ("/api", True, b"/api%2Fusers", b"/users"),
        ("/~user", True, b"/%7Euser/x", b"/x"),
        ("/%7Euser", True, b"/~user/x", b"/x"),
        ("/group%2Fproject", True, b"/group/project/x", b"/x"),
        ("/api", False, b"/%61pi%2Fusers", b"/%61pi%2Fusers"),
    ],
)
def test_upstream_path_of_encoded_targets(prefix: str, strip: bool, target: bytes, upstream: bytes) -> None:
    assert route("a", prefix, strip=strip).upstream_path(target) == upstream


# Prefixes and paths compared in matching form (labelgw.core.paths).


@pytest.mark.parametrize(
    ("prefix", "path", "matched"),
    [
        ("/%7Euser", "/~user/x", True),
        ("/~user", "/~user", True),
        ("/caf%c3%a9", "/caf%C3%A9/menu", True),
        ("/group%2Fproject", "/group/project/x", True),
        ("/api/", "/api/x", True),
        ("/%7Euser", "/%7Euser", False),  # request paths arrive in matching form: %7E is already "~"
    ],
)
def test_prefixes_are_matched_in_matching_form(prefix: str, path: str, matched: bool) -> None:
    assert (served_prefix(table_with("a", prefix), "a", path) == prefix) is matched


def test_two_prefixes_with_one_matching_form_first_keeps_it() -> None:
    first, second = route("a", "/~user", service="first"), route("a", "/%7Euser", service="second")
    host_routes = HostRoutes([first, second])
    assert host_routes.match("/~user/x") is first
    assert host_routes.routes() == [first, second]


TABLE_PREFIXES = {"/": False, "/public": False, "/api": True, "/admin": False}


@pytest.mark.parametrize(
    ("target", "prefix", "upstream"),
    [
        (b"/public/../admin", "/admin", b"/admin"),
        (b"/public/%2e%2e/admin/x?q=1", "/admin", b"/admin/x?q=1"),
        (b"/api/../admin", "/admin", b"/admin"),
        (b"/api/./v1/../users?q=/../x", "/api", b"/users?q=/../x"),
        (b"/api/%2E%2e/api/x", "/api", b"/x"),
        (b"/public/.%2e/api/x", "/api", b"/x"),
        (b"//api//x", "/api", b"/x"),
        (b"/api//x", "/api", b"/x"),  # merged before the cut: never a "//x" a backend could read as a host
        (b"/api%2Fx", "/api", b"/x"),
        (b"/public%2Fx", "/public", b"/public%2Fx"),
        (b"/x/../public", "/public", b"/public"),
        (b"*", "/", b"*"),
    ],
)
def test_routed_on_the_matching_form_and_forwarded_without_dots(target: bytes, prefix: str, upstream: bytes) -> None:
    table = RouteTable()
    table.replace_host("a", {p: route("a", p, strip=strip) for p, strip in TABLE_PREFIXES.items()})
    path, forwarded = route_target(target)
    found = table.lookup("a", path)
    assert found is not None and found.path_prefix == prefix
    assert found.upstream_path(forwarded) == upstream


@pytest.mark.parametrize("target", [b"/../admin", b"/api/../../admin", b"/public%2F..%2Fadmin", b"/api/..;/admin"])
def test_paths_that_leave_every_prefix_ambiguously_are_refused(target: bytes) -> None:
    with pytest.raises(PathRefused):
        route_target(target)


# Whole-host replacement.


def test_replace_host_replaces_every_prefix() -> None:
    table = table_with("a", "/", "/api", "/old")
    new_root = route("a", "/", service="new")
    table.replace_host("a", {"/": new_root, "/new": route("a", "/new")})
    assert table.lookup("a", "/old/x") is new_root
    assert table.lookup("a", "/api") is new_root
    assert served_prefix(table, "a", "/new/x") == "/new"


def test_replace_host_leaves_other_hosts_alone() -> None:
    table = RouteTable()
    b_route = route("b", "/")
    table.replace_host("a", {"/": route("a", "/")})
    table.replace_host("b", {"/": b_route})
    table.replace_host("a", {"/x": route("a", "/x")})
    table.replace_host("a", {})
    assert not table.knows_host("a")
    assert table.lookup("b", "/anything") is b_route


def test_empty_replacement_removes_the_host() -> None:
    table = table_with("a", "/")
    table.replace_host("a", {})
    assert table.lookup("a", "/") is None
    assert not table.knows_host("a")
    table.replace_host("never-there", {})  # no error
    assert table.all_routes() == []


def test_table_does_not_share_the_callers_mapping() -> None:
    # The registry keeps mutating its own per-host dict; the table must have taken a snapshot.
    table = RouteTable()
    routes = {"/": route("a", "/")}
    table.replace_host("a", routes)
    routes["/api"] = route("a", "/api")
    del routes["/"]
    assert served_prefix(table, "a", "/api") == "/"


class _SpyingRoutes(Mapping[str, Route]):
    """A mapping that looks the host up while the new HostRoutes is being built from it."""

    def __init__(self, table: RouteTable, routes: dict[str, Route], probes: list[str]) -> None:
        self._table = table
        self._routes = routes
        self._probes = probes
        self.seen: list[list[str | None]] = []

    def _probe(self) -> None:
        self.seen.append([served_prefix(self._table, "a", path) for path in self._probes])

    def __getitem__(self, key: str) -> Route:
        return self._routes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def values(self) -> Iterator[Route]:  # type: ignore[override]
        for value in self._routes.values():
            self._probe()
            yield value
        self._probe()


def test_replace_host_is_atomic() -> None:
    table = table_with("a", "/", "/api", "/old")
    probes = ["/", "/api/x", "/old", "/new/x", "/api/v2/x"]
    before = [served_prefix(table, "a", path) for path in probes]
    new = {"/new": route("a", "/new"), "/api/v2": route("a", "/api/v2"), "/": route("a", "/")}
    spy = _SpyingRoutes(table, new, probes)
    table.replace_host("a", spy)
    after = [served_prefix(table, "a", path) for path in probes]
    assert before == ["/", "/api", "/old", "/", "/api"]
    assert after == ["/", "/", "/", "/new", "/api/v2"]
    # While the new routes were being read, every lookup still saw the complete old table.
    assert spy.seen and all(seen == before for seen in spy.seen)


def test_host_routes_are_immutable_snapshots() -> None:
    routes = [route("a", "/"), route("a", "/x")]
    host_routes = HostRoutes(routes)
    routes.append(route("a", "/y"))
    assert sorted(r.path_prefix for r in host_routes.routes()) == ["/", "/x"]
    assert host_routes.match("/y").path_prefix == "/"  # type: ignore[union-attr]


def test_all_routes_sorted_by_host() -> None:
    table = RouteTable()
    table.replace_host("b", {"/": route("b", "/")})
    table.replace_host("a", {"/": route("a", "/"), "/x": route("a", "/x")})
    assert [(r.host, r.path_prefix) for r in table.all_routes()] == [("a", "/"), ("a", "/x"), ("b", "/")]
