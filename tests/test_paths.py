"""Request paths against path-prefix routes (labelgw.core.paths): the matching form labelgw routes on, the
forwarded form it sends upstream, the paths it refuses, and (through the deterministic proxy harness) what a backend
receives. The hypothesis properties pin the rule: nothing a backend could resolve leaves the matched prefix."""

from __future__ import annotations

import re
from typing import Any, Iterator
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from labelgw.core.backends import RoundRobin, ServicePool
from labelgw.http.parser import parse_request_head
from labelgw.core.paths import PathRefused, decode_unreserved, match_prefix, route_target, strip_segments
from labelgw.core.routes import Route, RouteTable
from proxyharness import ProxyHarness, get, ok

# The forms of issue 14 item 4: (request target, matching form, forwarded target).
ACCEPTED = [
    # Already normal: both forms are the path as received.
    (b"/", "/", b"/"),
    (b"/public/a.css", "/public/a.css", b"/public/a.css"),
    (b"/public/.well-known/x", "/public/.well-known/x", b"/public/.well-known/x"),
    (b"/public/..x/.y/x..", "/public/..x/.y/x..", b"/public/..x/.y/x.."),
    (b"*", "*", b"*"),
    # "..": resolved, whole segments only.
    (b"/public/../admin", "/admin", b"/admin"),
    (b"/public/x/../y", "/public/y", b"/public/y"),
    (b"/public/x/..", "/public/", b"/public/"),
    (b"/public/..", "/", b"/"),
    # ".": dropped; a last one leaves the trailing slash.
    (b"/./public/./x", "/public/x", b"/public/x"),
    (b"/public/.", "/public/", b"/public/"),
    (b"/.", "/", b"/"),
    # Encoded dots are dot segments too: every case and mix.
    (b"/public/%2e%2e/admin", "/admin", b"/admin"),
    (b"/public/%2E%2E/admin", "/admin", b"/admin"),
    (b"/public/%2E%2e/admin", "/admin", b"/admin"),
    (b"/public/.%2e/admin", "/admin", b"/admin"),
    (b"/public/%2e./admin", "/admin", b"/admin"),
    (b"/public/%2e/x", "/public/x", b"/public/x"),
    # Other escapes: unreserved ones match decoded, the rest in upper case; forwarded as received.
    (b"/%70ublic/x", "/public/x", b"/%70ublic/x"),
    (b"/%7euser/a%2fb", "/~user/a/b", b"/%7euser/a%2fb"),
    (b"/a%20b/%c3%a9", "/a%20b/%C3%A9", b"/a%20b/%c3%a9"),
    (b"/public/%2e%2e%2e", "/public/...", b"/public/%2e%2e%2e"),
    (b"/x/%zz/%4", "/x/%zz/%4", b"/x/%zz/%4"),
    # An encoded slash separates segments for matching and stays encoded upstream.
    (b"/public%2Fx", "/public/x", b"/public%2Fx"),
    (b"/api/v4/projects/group%2Fproject", "/api/v4/projects/group/project", b"/api/v4/projects/group%2Fproject"),
    # Runs of "/" merged (as nginx does), in both forms; before dot segments are resolved.
    (b"//public//x", "/public/x", b"/public/x"),
    (b"/public/x//", "/public/x/", b"/public/x/"),
    (b"/public//../admin", "/admin", b"/admin"),
    (b"/public/x%2F%2Fy", "/public/x/y", b"/public/x%2F%2Fy"),
    # The query is never looked at nor touched.
    (b"/public/../admin?next=/../x&y=%2e%2e", "/admin", b"/admin?next=/../x&y=%2e%2e"),
    (b"/public?a/../b", "/public", b"/public?a/../b"),
    (b"/x/./y?", "/x/y", b"/x/y?"),
    # A backslash without dot segments is data.
    (b"/public\\x", "/public\\x", b"/public\\x"),
]


@pytest.mark.parametrize(("target", "matching", "forwarded"), ACCEPTED)
def test_matching_and_forwarded_forms(target: bytes, matching: str, forwarded: bytes) -> None:
    assert route_target(target) == (matching, forwarded)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/..", "climbs above the root"),
        (b"/../x", "climbs above the root"),
        (b"/public/../../x", "climbs above the root"),
        (b"/%2e%2e/x", "climbs above the root"),
        (b"/./../x", "climbs above the root"),
        # Hidden by an encoded slash or a backslash: whether they separate is the backend's choice.
        (b"/public%2F..%2Fadmin", "encoded slash or a backslash"),
        (b"/public%2f%2e%2e%2fadmin", "encoded slash or a backslash"),
        (b"/public/..%2Fadmin", "encoded slash or a backslash"),
        (b"/public/a%2Fb/../c", "encoded slash or a backslash"),
        (b"/public\\..\\admin", "encoded slash or a backslash"),
        (b"/public/..\\admin", "encoded slash or a backslash"),
        (b"/public%5C..%5Cadmin", "encoded slash or a backslash"),
        (b"/public/./x%2Fy", "encoded slash or a backslash"),
        # Tomcat resolves "..;" as "..".
        (b"/public/..;/admin", "dot segment with parameters"),
        (b"/public/.;x/admin", "dot segment with parameters"),
        (b"/public/%2e%2e;a=b/admin", "dot segment with parameters"),
    ],
)
def test_refused(target: bytes, reason: str) -> None:
    with pytest.raises(PathRefused) as caught:
        route_target(target)
    assert caught.value.status == 400
    assert reason in caught.value.reason


def test_a_normal_path_costs_no_copy() -> None:
    target = b"/api/v1/users/42?page=2"
    path, forwarded = route_target(target)
    assert path == "/api/v1/users/42" and forwarded is target


def test_decode_unreserved() -> None:
    assert decode_unreserved("%41%7a%2d%2E%5f%7E%2f%3a%c3") == "Az-._~%2F%3A%C3"
    assert decode_unreserved("/plain") == "/plain"


@pytest.mark.parametrize(
    ("prefix", "matching"),
    [
        ("/", "/"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/%7Euser", "/~user"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/group%2Fproject", "/group/project"),
        # Labels refuse these; a config file may hold them.
        ("/a/../b", "/b"),
        ("//a//b/", "/a/b"),
        ("/..", "/"),
    ],
)
def test_match_prefix(prefix: str, matching: str) -> None:
    assert match_prefix(prefix) == matching


@pytest.mark.parametrize(
    ("target", "prefix", "upstream"),
    [
        (b"/api", "/api", b"/"),
        (b"/api/", "/api", b"/"),
        (b"/api?q=1", "/api", b"/?q=1"),
        (b"/api/x/y?q=/api", "/api", b"/x/y?q=/api"),
        (b"/%61pi/x", "/api", b"/x"),
        (b"/api%2Fx/y?q", "/api", b"/x/y?q"),
        (b"/api%2f", "/api", b"/"),
        (b"/api%2F%2Fx", "/api", b"/x"),
        (b"/a%2Fb/c/", "/a/b", b"/c/"),
        (b"/a/b%2F%2F", "/a/b", b"/"),
        (b"/caf%c3%a9/x", "/caf%C3%A9", b"/x"),
    ],
)
def test_strip_segments(target: bytes, prefix: str, upstream: bytes) -> None:
    assert strip_segments(target, prefix) == upstream


# The properties. Paths are drawn from the pieces that matter: separators in every spelling, dots in every
# spelling, parameters, escapes that decode to letters, and plain letters.

PIECES = [
    "/", "/", "/", "a", "b", "x", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%2f", "%2F", "%5c", "%5C", "\\",
    ";", ";p", "%61", "%62", "%25", "%", "2e", "%2", "~",
]
PREFIXES = ("/", "/a", "/a/b", "/b", "/x/a")

paths = st.lists(st.sampled_from(PIECES), max_size=14).map(lambda pieces: "/" + "".join(pieces))
queries = st.sampled_from(["", "?", "?q=/../a", "?%2e%2e/..;"])


def under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def longest(path: str) -> str:
    return max((prefix for prefix in PREFIXES if under(path, prefix)), key=len)


def resolve(path: str) -> str | None:
    """RFC 3986 remove_dot_segments after merging "/" runs; None when it climbs above the root."""
    kept: list[str] = []
    segments = path.split("/")[1:]
    trailing = False
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "..":
            if not kept:
                return None
            kept.pop()
            trailing = last
        elif segment in (".", ""):
            trailing = last
        else:
            kept.append(segment)
            trailing = False
    return "/" + "/".join(kept) + ("/" if trailing and kept else "")


def nginx_view(path: str) -> str | None:
    """What nginx matches its locations against: every escape decoded once, "/" runs merged, dots resolved."""
    return resolve(unquote_to_bytes(path).decode("latin-1"))


def backend_pieces(path: bytes) -> list[list[str]]:
    """The segments of a forwarded path as backends of every kind split it: escapes decoded or not, "%2F" and
    backslashes separators or not, ";parameters" cut or not."""
    views = []
    for decode in (False, True):
        for backslash in (False, True):
            for params in (False, True):
                text = (unquote_to_bytes(path) if decode else path).decode("latin-1")
                pieces = re.split(r"[/\\]" if backslash else "/", text)
                views.append([piece.split(";")[0] if params else piece for piece in pieces])
    return views


def table() -> RouteTable:
    routes = RouteTable()
    routes.replace_host("h", {p: Route("h", p, ServicePool(p, RoundRobin()), strip_prefix=p != "/") for p in PREFIXES})
    return routes


TABLE = table()


@settings(max_examples=3000, deadline=None)
@given(paths, queries)
@example("/a/../b", "")
@example("/a%2F..%2Fb", "")
@example("/a\\..\\b", "")
@example("/a/..;/b", "")
@example("/a%2Fb/../x", "")
@example("/a/b%2F/../x", "")
def test_no_backend_can_resolve_a_forwarded_path_out_of_its_route(path: str, query: str) -> None:
    target = (path + query).encode("latin-1")
    try:
        matching, forwarded = route_target(target)
    except PathRefused as error:
        assert error.status == 400
        return
    route = TABLE.lookup("h", matching)
    assert route is not None
    # Routed to P only if the matching form is under P, and it is what nginx would match.
    assert under(matching, route.match_prefix)
    assert resolve(matching) == matching
    view = nginx_view(path)
    assert view is not None and longest(view) == route.match_prefix
    # The query is the client's.
    assert forwarded.endswith(query.encode("latin-1"))
    upstream = route.upstream_path(forwarded)
    upstream_path = upstream[: len(upstream) - len(query)] if query else upstream
    # No backend, however it splits and decodes, finds a dot segment to resolve.
    for pieces in backend_pieces(upstream_path) + backend_pieces(forwarded[: len(forwarded) - len(query)]):
        assert "." not in pieces and ".." not in pieces, (target, upstream)
    # Decoded, the stripped path is the rest of what nginx matched.
    rest = view[len(route.match_prefix) :] if route.match_prefix != "/" else view
    decoded = re.sub("/+", "/", unquote_to_bytes(upstream_path).decode("latin-1"))
    assert decoded == (rest or "/")


@settings(max_examples=1000, deadline=None)
@given(paths)
def test_the_forwarded_form_is_a_fixed_point(path: str) -> None:
    try:
        matching, forwarded = route_target(path.encode("latin-1"))
    except PathRefused:
        return
    assert route_target(forwarded) == (matching, forwarded)


# Through the proxy (deterministic harness): what the backend receives, and what the client is answered.
# api.localhost: "/" -> api (9001, 9002), "/v2" -> v2 (9201, strip_prefix), "/v2/admin" -> admin (9301).


@pytest.fixture
def h() -> Iterator[ProxyHarness]:
    harness = ProxyHarness()
    yield harness
    harness.assert_accounting()


@pytest.mark.parametrize(
    ("target", "ports", "upstream_target"),
    [
        (b"/v2/../admin", {9001, 9002}, b"/admin"),
        (b"/v2/./x", {9201}, b"/x"),
        (b"/v2/%2e%2e/v2/admin/x", {9301}, b"/v2/admin/x"),
        (b"/v2/%2E%2e/v2/admin", {9301}, b"/v2/admin"),
        (b"/v2/.%2e/x", {9001, 9002}, b"/x"),
        (b"/v2/admin/../users?q=/../x", {9201}, b"/users?q=/../x"),
        (b"/v2%2Fadmin/x", {9301}, b"/v2%2Fadmin/x"),
        (b"/v2%2Fx", {9201}, b"/x"),
        (b"//v2//admin", {9301}, b"/v2/admin"),
        (b"/%76%32/x", {9201}, b"/x"),
        (b"http://api.localhost/v2/../v2/admin?a", {9301}, b"/v2/admin?a"),
    ],
)
def test_the_backend_receives_the_forwarded_form(h: Any, target: bytes, ports: set[int], upstream_target: bytes) -> None:
    client = h.connect()
    client.send(get(b"api.localhost", target))
    upstream = h.upstream()
    assert upstream.port in ports
    upstream.accept()
    assert upstream.request().target == upstream_target
    upstream.send(ok())
    assert client.response().status == 200
    assert not client.closing


@pytest.mark.parametrize(
    "target",
    [b"/../v2/admin", b"/v2/%2e%2e/%2e%2e/x", b"/v2%2F..%2Fadmin", b"/v2/..;/admin", b"/v2\\..\\admin",
     b"http://api.localhost/v2/../../admin"],
)
def test_refused_paths_are_answered_400_before_any_backend(h: Any, target: bytes) -> None:
    client = h.connect()
    client.send(get(b"api.localhost", target))
    response = client.response()
    assert response.status == 400
    assert h.connect_count() == 0
    # A request without a body leaves the connection usable.
    assert not client.closing
    client.take()
    client.send(get(b"api.localhost", b"/v2/x"))
    upstream = h.upstream().accept()
    assert upstream.request().target == b"/x"
    upstream.send(ok())
    assert client.response().status == 200


def test_a_refused_request_with_a_body_closes_the_connection(h: Any) -> None:
    client = h.connect()
    client.send(b"POST /../x HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: 3\r\n\r\nabc")
    assert client.response().status == 400
    h.settle()
    assert client.closing
    assert h.connect_count() == 0


def test_options_asterisk_goes_to_the_root_route_as_it_is(h: Any) -> None:
    client = h.connect()
    client.send(get(b"api.localhost", b"*", method=b"OPTIONS"))
    upstream = h.upstream()
    assert upstream.port in {9001, 9002}
    upstream.accept()
    assert upstream.request().target == b"*"
    upstream.send(ok())
    assert client.response().status == 200


def test_the_parser_hands_absolute_form_targets_over_as_paths() -> None:
    head = parse_request_head(b"GET http://api.localhost/v2/%2e%2e/x?q HTTP/1.1\r\nHost: other")
    assert head.absolute_form and head.target == b"/v2/%2e%2e/x?q"
    assert route_target(head.target) == ("/x", b"/x?q")


# HTTP/2 requests take the same way (labelgw.http.h2 hands them to the same dispatch).


@pytest.mark.parametrize(
    ("path", "status", "upstream_target"),
    [(b"/v2/%2e%2e/v2/admin?a=/../", 200, b"/v2/admin?a=/../"), (b"/v2/./x", 200, b"/x"), (b"/v2/../../x", 400, None)],
)
def test_http2_paths_are_routed_and_forwarded_alike(h: Any, path: bytes, status: int, upstream_target: bytes | None) -> None:
    from test_h2 import H2Client

    client = H2Client(h, validate=False)
    stream = client.request(path, authority=b"api.localhost")
    if upstream_target is None:
        assert client.streams[stream].status == status
        assert h.connect_count() == 0
        return
    upstream = h.upstream().accept()
    assert upstream.request().target == upstream_target
    upstream.send(ok())
    client.exchange()
    assert client.streams[stream].status == status
