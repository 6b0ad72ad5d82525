"""The proxy data path (labelgw/http: server, exchange, upstream, fastwrite), end to end and deterministic.

Everything runs on a MemoryReactorClock with in-memory transports (tests/proxyharness.py): the test plays both
the client and the backends, and moves time with clock.advance. No sockets, no sleeps.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from labelgw.http.fastwrite import write_now
from labelgw.http.settings import ProxySettings
from proxyharness import (
    Client,
    ProxyHarness,
    Upstream,
    decode_chunked,
    get,
    ok,
    parse_request,
    parse_responses,
)

API_PORTS = {9001, 9002}
SOLO = b"solo.localhost"


@pytest.fixture
def make_harness(request: pytest.FixtureRequest) -> Iterator[Callable[..., ProxyHarness]]:
    """`make_harness(head_timeout=3)` -> a harness with those settings. At teardown, every harness must be back
    to zero requests in flight (gateway and backends) and no retries outstanding. xfail tests assert what they
    need themselves: a broken path may leave counters behind."""
    made: list[ProxyHarness] = []

    def make(**settings: Any) -> ProxyHarness:
        harness = ProxyHarness(ProxySettings(**settings) if settings else None)
        made.append(harness)
        return harness

    yield make
    if request.node.get_closest_marker("xfail") is None:
        for harness in made:
            harness.assert_accounting()


@pytest.fixture
def h(make_harness: Callable[..., ProxyHarness]) -> ProxyHarness:
    return make_harness()


def post(host: bytes = SOLO, path: bytes = b"/items", body: bytes = b"", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (path, host, size, body)


def chunked_post(host: bytes = SOLO, path: bytes = b"/stream") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (path, host)


def serve(h: ProxyHarness, client: Client, request: bytes, response: bytes) -> Upstream:
    """One whole exchange on a new upstream connection; returns that connection (pooled when reusable)."""
    client.send(request)
    upstream = h.upstream().accept()
    upstream.send(response)
    return upstream


def pooled_solo_connection(h: ProxyHarness, client: Client) -> Upstream:
    """A keep-alive upstream connection to solo-1, idle in its pool; both transports' output cleared."""
    upstream = serve(h, client, get(SOLO, b"/warmup"), ok(b"warm"))
    assert upstream.pooled_in(h.backend("solo-1"))
    client.take()
    upstream.take()
    return upstream


# Routing and the request head sent upstream.


@pytest.mark.parametrize("host", [b"api.localhost", b"API.LocalHost", b"api.localhost:8080", b"Api.Localhost:80", b"api.localhost."])
def test_get_routed_by_host_case_insensitive_with_port(h: ProxyHarness, host: bytes) -> None:
    client = h.connect()
    client.send(b"GET /users?page=2 HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n" % host)

    upstream = h.upstream()
    assert upstream.host == "127.0.0.1" and upstream.port in API_PORTS
    assert upstream.timeout == h.settings.connect_timeout
    upstream.accept()
    assert upstream.transport.no_delay
    request = upstream.request()
    assert (request.method, request.target, request.version) == (b"GET", b"/users?page=2", b"HTTP/1.1")
    # Host goes through untouched (case and port included).
    assert request.all(b"host") == [host]
    assert request.header(b"accept") == b"*/*"
    assert request.rest == b""

    upstream.send(ok(b"users"))
    response = client.response()
    assert (response.status, response.body) == (200, b"users")
    assert response.header(b"connection") is None
    assert not client.closing


@pytest.mark.parametrize(
    "path, port, upstream_target",
    [
        (b"/users?x=1", "api", b"/users?x=1"),
        (b"/v2", 9201, b"/"),
        (b"/v2/", 9201, b"/"),
        (b"/v2?x=1", 9201, b"/?x=1"),
        (b"/v2/users?x=1", 9201, b"/users?x=1"),
        (b"/v2x", "api", b"/v2x"),
        (b"/v2/admin", 9301, b"/v2/admin"),
        (b"/v2/admin/users", 9301, b"/v2/admin/users"),
        (b"/v2/administrators", 9201, b"/administrators"),
    ],
)
def test_longest_prefix_and_strip_prefix(h: ProxyHarness, path: bytes, port: Any, upstream_target: bytes) -> None:
    client = h.connect()
    client.send(get(b"api.localhost", path))
    upstream = h.upstream()
    assert upstream.port in (API_PORTS if port == "api" else {port})
    upstream.accept()
    assert upstream.request().target == upstream_target
    upstream.send(ok())
    assert client.response().status == 200


@pytest.mark.parametrize(
    "target, host_field, upstream_target",
    [
        (b"http://api.localhost/v2/users", b"Host: solo.localhost\r\n", b"/users"),
        (b"http://API.localhost:8080/v2/users?q=1", b"", b"/users?q=1"),
        (b"http://api.localhost?q=1", b"Host: api.localhost\r\n", b"/?q=1"),
    ],
)
def test_absolute_form_target_routes_by_its_authority(
    h: ProxyHarness, target: bytes, host_field: bytes, upstream_target: bytes
) -> None:
    client = h.connect()
    client.send(b"GET %s HTTP/1.1\r\n%s\r\n" % (target, host_field))
    upstream = h.upstream()
    authority = target.split(b"/")[2].split(b"?")[0]
    assert upstream.port in ({9201} if b"/v2" in target else API_PORTS)
    upstream.accept()
    request = upstream.request()
    assert request.target == upstream_target
    assert request.all(b"host") == [authority]
    upstream.send(ok())
    assert client.response().status == 200


def test_forwarded_headers_set_and_client_values_replaced(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(
        b"GET / HTTP/1.1\r\nHost: Solo.Localhost:8080\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
        b"X-Forwarded-Port: 443\r\nX-Real-IP: 6.6.6.6\r\nx-forwarded-for: 8.8.8.8\r\n"
        b"X_Forwarded_For: 7.7.7.7\r\nX.Real.IP: 5.5.5.5\r\nUser-Agent: test\r\n\r\n"
    )
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.all(b"x-forwarded-for") == [b"10.0.0.9"]
    assert request.all(b"x-real-ip") == [b"10.0.0.9"]
    assert request.all(b"x-forwarded-proto") == [b"http"]
    assert request.all(b"x-forwarded-host") == [b"Solo.Localhost:8080"]
    assert request.all(b"x-forwarded-port") == [b"8080"]
    assert b"x_forwarded_for" not in request.names() and b"x.real.ip" not in request.names()
    assert request.header(b"user-agent") == b"test"
    upstream.send(ok())
    assert client.response().status == 200


def test_hop_by_hop_headers_removed(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n"
        b"Connection: keep-alive, X-Session-Hop, X-Forwarded-For, X-Forwarded-Host\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\nX-Session-Hop: 1\r\nX-Kept: yes\r\n\r\n"
    )
    upstream = h.upstream().accept()
    request = upstream.request()
    names = request.names()
    for gone in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                 b"proxy-authorization", b"x-session-hop"):
        assert gone not in names, gone
    assert request.header(b"x-kept") == b"yes"
    # Named in Connection by the client, but set by the proxy itself: still there (Traefik CVE-2024-45410).
    assert request.all(b"x-forwarded-for") == [b"10.0.0.9"]
    assert request.all(b"x-forwarded-host") == [b"solo.localhost"]
    upstream.send(ok())
    assert client.response().status == 200


def test_hop_by_hop_removed_without_connection_tokens(h: ProxyHarness) -> None:
    # No field named in Connection: the head takes the parser's fast path (fields cut in one pass).
    client = h.connect()
    client.send(
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nte: trailers\r\nTRAILER: X-T\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic eDp5\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"Content-Length: 0\r\nX-Kept: yes\r\n\r\n"
    )
    upstream = h.upstream().accept()
    request = upstream.request()
    names = request.names()
    for gone in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
                 b"proxy-authorization", b"http2-settings"):
        assert gone not in names, gone
    assert request.all(b"x-forwarded-for") == [b"10.0.0.9"]
    assert request.all(b"content-length") == [b"0"]
    assert request.header(b"x-kept") == b"yes"
    upstream.send(ok())
    assert client.response().status == 200


@pytest.mark.parametrize("slow_path", [False, True], ids=["fast-path", "connection-tokens"])
def test_fields_that_only_look_special_are_forwarded(h: ProxyHarness, slow_path: bool) -> None:
    lookalikes = [
        (b"Upgrade-Insecure-Requests", b"1"), (b"Hosts", b"x"), (b"X-Forwarded-Prefix", b"/api"),
        (b"Content-Length-Range", b"0-9"), (b"TE-Extra", b"1"), (b"Connectionless", b"yes"),
        (b"X-Forwarded-Server", b"edge"), (b"Keep-Alive-Hint", b"no"),
    ]
    fields = b"".join(name + b": " + value + b"\r\n" for name, value in lookalikes)
    connection = b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\n" if slow_path else b""
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n" + connection + fields + b"\r\n")
    upstream = h.upstream().accept()
    request = upstream.request()
    for name, value in lookalikes:
        assert request.all(name) == [value], name
    assert b"x-drop" not in request.names()
    upstream.send(ok(extra=fields))
    response = client.response()
    for name, value in lookalikes:
        assert response.all(name) == [value], name


@pytest.mark.parametrize(
    "fields",
    [
        b"Connection: X-Private\r\nKeep-Alive: timeout=5\r\nX-Private: 1\r\nProxy-Authenticate: Basic\r\n",
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\nUpgrade: h2c\r\n",
    ],
    ids=["connection-tokens", "fast-path"],
)
def test_response_hop_by_hop_headers_removed(h: ProxyHarness, fields: bytes) -> None:
    client = h.connect()
    serve(h, client, get(SOLO), ok(extra=fields + b"X-Public: 2\r\n"))
    response = client.response()
    names = [name.lower() for name, _ in response.headers]
    for gone in (b"connection", b"keep-alive", b"x-private", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert gone not in names, gone
    assert response.header(b"x-public") == b"2"
    assert response.body == b"hello"


# Answers labelgw gives itself.


def test_unknown_host_404_names_the_host(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(b"Nope.Localhost:8080"))
    response = client.response()
    assert response.status == 404
    assert b"nope.localhost" in response.body
    assert h.connect_count() == 0
    assert not client.closing

    # The connection stays usable.
    client.take()
    upstream = serve(h, client, get(SOLO), ok(b"fine"))
    assert client.response().body == b"fine"
    assert upstream.pooled_in(h.backend("solo-1"))


def test_route_without_ready_backend_503_retry_after(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(b"down.localhost"))
    response = client.response()
    assert response.status == 503
    assert response.header(b"retry-after") == b"1"
    assert b"'down'" in response.body
    assert h.connect_count() == 0


def test_over_max_in_flight_fast_503(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(max_in_flight=1)
    first = h.connect()
    first.send(get(SOLO))
    upstream = h.upstream().accept()

    second = h.connect()
    second.send(get(SOLO))
    response = second.response()
    assert response.status == 503
    assert response.header(b"retry-after") == b"1"
    assert h.new_connects() == []

    upstream.send(ok())
    assert first.response().status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n Folded: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: solo.localhost\nX-Bare-LF: 1\r\n\r\n",
        b"GET /\r\nHost: solo.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nHost: api.localhost\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: +3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: solo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nX-Nul: a\x00b\r\n\r\n",
    ],
)
def test_malformed_request_400_and_close(h: ProxyHarness, raw: bytes) -> None:
    client = h.connect()
    client.send(raw)
    response = client.response()
    assert response.status == 400
    assert response.header(b"connection") == b"close"
    assert client.closing
    assert h.connect_count() == 0
    h.settle()
    assert client.lost



def test_bare_lf_only_head_400_at_once(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.1\nHost: solo.localhost\n\n")
    assert client.received()[:12] == b"HTTP/1.1 400"
    assert client.closing


def test_pipelined_garbage_after_good_request_gets_400_after_the_response(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO) + b"NOT HTTP AT ALL\r\n\r\n")
    upstream = h.upstream().accept()
    upstream.send(ok(b"first"))
    responses = client.responses()
    assert [r.status for r in responses] == [200, 400]
    assert responses[0].body == b"first"
    assert client.closing


def test_head_without_end_over_limit_431(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nX-Big: " + b"a" * (70 * 1024))
    assert client.response().status == 431
    assert client.closing
    assert h.connect_count() == 0


def test_head_over_limit_in_small_pieces_431(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n")
    for _ in range(80):
        if client.closing:
            break
        client.send(b"X-Filler: " + b"b" * 1000 + b"\r\n")
    assert client.response().status == 431
    assert client.closing


def test_complete_head_over_limit_431(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
    assert client.response().status == 431
    assert client.closing
    assert h.connect_count() == 0


def test_too_many_header_fields_431(h: ProxyHarness) -> None:
    client = h.connect()
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(101))
    client.send(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n" + fields + b"\r\n")
    assert client.response().status == 431
    assert client.closing



def test_gateway_error_answer_to_head_has_no_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(b"nope.localhost", method=b"HEAD"))
    data = client.received()
    assert data.startswith(b"HTTP/1.1 404 ")
    # A HEAD response ends with its head; a body would be read as the next response on this connection.
    assert data.endswith(b"\r\n\r\n")


# Relaying responses.


def test_content_length_body_in_many_pieces(h: ProxyHarness) -> None:
    body = bytes(range(256)) * 8
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 2048\r\n\r\n"
    for i in range(0, len(head), 11):
        upstream.send(head[i : i + 11])
    for i in range(0, len(body), 7):
        upstream.send(body[i : i + 7])

    response = client.response()
    assert response.status == 200 and not response.chunked
    assert response.header(b"content-length") == b"2048"
    assert response.header(b"content-type") == b"application/octet-stream"
    assert response.body == body
    assert upstream.pooled_in(h.backend("solo-1"))
    assert not client.closing


def test_chunked_upstream_stays_chunked_for_http11_client(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    upstream.send(b"6;ext=1\r\n world\r\n")
    assert not client.response().complete
    upstream.send(b"0\r\nX-Trailer: t\r\n\r\n")

    response = client.response()
    assert response.chunked and response.complete
    assert response.all(b"transfer-encoding") == [b"chunked"]
    assert response.header(b"content-length") is None
    assert response.body == b"hello world"
    assert upstream.pooled_in(h.backend("solo-1"))
    assert not client.closing


def test_chunked_response_and_request_byte_by_byte(h: ProxyHarness) -> None:
    client = h.connect()
    request_body = b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n"
    client.send(chunked_post())
    upstream = h.upstream().accept()
    upstream.take()
    for i in range(len(request_body)):
        client.send(request_body[i : i + 1])
    assert decode_chunked(upstream.take()) == (b"abc0123456789abcdef", b"", True)

    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;a=b\r\n!\r\n0\r\n\r\n"
    for i in range(len(response)):
        upstream.send(response[i : i + 1])
    relayed = client.response()
    assert relayed.complete and relayed.body == b"hello!"
    assert upstream.pooled_in(h.backend("solo-1"))


def test_chunked_upstream_dechunked_and_closed_for_http10_client(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.0\r\nHost: solo.localhost\r\n\r\n")
    upstream = h.upstream().accept()
    assert upstream.request().version == b"HTTP/1.1"
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    data = client.received()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"hello world"
    assert client.closing
    # The upstream framing was complete: that connection is still good.
    assert upstream.pooled_in(h.backend("solo-1"))


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"],
    ids=["http11-close", "http10"],
)
def test_close_delimited_upstream_chunked_to_http11_client(h: ProxyHarness, head: bytes) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(head + b"part1")
    upstream.send(b"part2")
    assert not client.response().complete
    upstream.close()

    response = client.response()
    assert response.chunked and response.complete
    assert response.body == b"part1part2"
    assert not client.closing
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_close_delimited_upstream_to_http10_client(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.0\r\nHost: solo.localhost\r\n\r\n")
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    upstream.close()
    head, _, body = client.received().partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == b"all of it"
    assert client.closing


@pytest.mark.parametrize(
    "method, head",
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\nETag: \"x\"\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nETag: \"x\"\r\n\r\n"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: \"x\"\r\n\r\n"),
    ],
    ids=["head-length", "head-chunked", "204", "304"],
)
def test_responses_without_body(h: ProxyHarness, method: bytes, head: bytes) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO, method=method), head)
    data = client.take()
    assert data.endswith(b"\r\n\r\n")
    assert data.count(b"\r\n\r\n") == 1
    assert b"transfer-encoding" not in data.lower()
    if b"Content-Length: 42" in head:
        assert b"Content-Length: 42\r\n" in data
    assert upstream.pooled_in(h.backend("solo-1"))

    # Nothing left over on either connection: the next request and response line up.
    upstream.take()
    client.send(get(SOLO, b"/next"))
    assert h.new_connects() == []
    assert upstream.request().target == b"/next"
    upstream.send(ok(b"next"))
    assert client.response().body == b"next"


@pytest.mark.parametrize("together", [False, True], ids=["apart", "one-packet"])
def test_100_continue_relayed_then_final_response(h: ProxyHarness, together: bool) -> None:
    client = h.connect()
    client.send(b"POST /upload HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    upstream = h.upstream().accept()
    assert upstream.request().header(b"expect") == b"100-continue"
    upstream.take()
    final = ok(b"done", status=b"201 Created")
    if together:
        client.send(b"hello")
        upstream.send(b"HTTP/1.1 100 Continue\r\n\r\n" + final)
    else:
        upstream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        assert upstream.take() == b"hello"
        upstream.send(final)

    responses = client.responses()
    assert [r.status for r in responses] == ([100, 201] if together else [201])
    assert responses[-1].body == b"done"
    assert upstream.pooled_in(h.backend("solo-1"))


def test_early_hints_relayed_before_final_response(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    upstream.send(b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n" + ok(b"page"))
    responses = client.responses()
    assert [r.status for r in responses] == [103, 103, 200]
    assert [r.header(b"link") for r in responses[:2]] == [b"</a.css>; rel=preload", b"</b.js>; rel=preload"]
    assert responses[2].body == b"page"


def test_interim_responses_not_sent_to_http10_client(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET / HTTP/1.0\r\nHost: solo.localhost\r\n\r\n")
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    assert client.received() == b""
    upstream.send(ok(b"x"))
    assert [r.status for r in client.responses()] == [200]


def test_several_set_cookie_fields_kept(h: ProxyHarness) -> None:
    client = h.connect()
    serve(h, client, get(SOLO), ok(extra=b"Set-Cookie: a=1\r\nSet-Cookie: b=2; Path=/; HttpOnly\r\nSet-Cookie: c=3\r\n"))
    assert client.response().all(b"set-cookie") == [b"a=1", b"b=2; Path=/; HttpOnly", b"c=3"]


@pytest.mark.parametrize("status", [b"301 Moved Permanently", b"302 Found", b"307 Temporary Redirect", b"308 Permanent Redirect"])
def test_redirects_passed_through_unchanged(h: ProxyHarness, status: bytes) -> None:
    client = h.connect()
    serve(h, client, get(SOLO), ok(b"moved", extra=b"Location: https://elsewhere.example/login?next=%2F\r\n", status=status))
    response = client.response()
    assert response.status == int(status[:3])
    assert response.reason == status[4:]
    assert response.header(b"location") == b"https://elsewhere.example/login?next=%2F"
    assert response.body == b"moved"
    assert h.new_connects() == []


def test_upstream_5xx_relayed(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO), ok(b"oops", status=b"500 Internal Server Error"))
    response = client.response()
    assert (response.status, response.body) == (500, b"oops")
    assert upstream.pooled_in(h.backend("solo-1"))


# Keep-alive and the upstream pool.


def test_upstream_connection_reused(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled_solo_connection(h, client)
    assert upstream.pooled_in(h.backend("solo-1"))

    client.send(get(SOLO, b"/second"))
    assert h.new_connects() == []
    assert upstream.request().target == b"/second"
    assert not upstream.pooled_in(h.backend("solo-1"))
    upstream.send(ok(b"again"))
    assert client.response().body == b"again"
    assert upstream.pooled_in(h.backend("solo-1"))

    # Another client gets the same connection too.
    other = h.connect(peer=IPv4Address("TCP", "10.0.0.10", 6000))
    upstream.take()
    other.send(get(SOLO, b"/third"))
    assert h.new_connects() == []
    request = upstream.request()
    assert request.target == b"/third"
    assert request.all(b"x-forwarded-for") == [b"10.0.0.10"]
    upstream.send(ok(b"3"))
    assert other.response().body == b"3"


@pytest.mark.parametrize(
    "response",
    [ok(extra=b"Connection: close\r\n"), b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", ok() + b"trailing junk"],
    ids=["connection-close", "http10", "bytes-after-body"],
)
def test_upstream_connection_not_reused(h: ProxyHarness, response: bytes) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO), response)
    assert client.response().body == b"hello"
    # The client's connection is not affected by the upstream's.
    assert not client.closing
    assert client.response().header(b"connection") is None
    assert upstream.closing
    assert not upstream.pooled_in(h.backend("solo-1"))

    client.take()
    client.send(get(SOLO, b"/second"))
    second = h.upstream().accept()
    second.send(ok(b"new"))
    assert client.response().body == b"new"



def test_idle_upstream_connection_closed_after_upstream_idle_timeout(h: ProxyHarness) -> None:
    upstream = pooled_solo_connection(h, h.connect())
    h.advance(h.settings.upstream_idle_timeout - 1)
    assert not upstream.closing
    h.advance(1)
    assert upstream.closing
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_idle_upstream_connection_closed_eventually(h: ProxyHarness) -> None:
    # The part of the idle timeout that holds today: the connection does not stay pooled forever.
    upstream = pooled_solo_connection(h, h.connect())
    h.advance(max(h.settings.upstream_idle_timeout, h.settings.response_timeout))
    h.settle()
    assert upstream.lost
    assert h.backend("solo-1").idle == []


def test_pooled_connection_closed_by_backend_leaves_the_pool(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled_solo_connection(h, client)
    upstream.close()
    assert h.backend("solo-1").idle == []
    client.send(get(SOLO))
    fresh = h.upstream().accept()
    fresh.send(ok(b"fresh"))
    assert client.response().body == b"fresh"


def test_unsolicited_bytes_on_idle_connection_close_it(h: ProxyHarness) -> None:
    upstream = pooled_solo_connection(h, h.connect())
    upstream.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert upstream.closing
    h.settle()
    assert h.backend("solo-1").idle == []


def test_max_idle_per_backend(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(max_idle_per_backend=1)
    clients = [h.connect(), h.connect()]
    for client in clients:
        client.send(get(SOLO))
    upstreams = [u.accept() for u in h.new_connects()]
    for upstream in upstreams:
        upstream.send(ok())
    assert len(h.backend("solo-1").idle) == 1
    assert [u.closing for u in upstreams] == [False, True]



def test_connection_closed_for_unsolicited_bytes_is_not_handed_out(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled_solo_connection(h, client)
    # Some servers announce their idle timeout with a 408 before closing; the proxy closes its side.
    upstream.send(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
    assert upstream.closing
    # Same reactor turn, before connectionLost: a request must not be written on that connection.
    client.send(post(body=b"charge-card"))
    assert upstream.received() == b""
    fresh = h.upstream().accept()
    assert fresh.request().rest == b"charge-card"
    fresh.send(ok(b"charged"))
    assert client.response().body == b"charged"



def test_connection_closed_by_idle_timer_is_not_handed_out(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled_solo_connection(h, client)
    assert upstream.protocol is not None
    closes_at = upstream.protocol._timer.getTime()
    # Runs right after the idle timer, in the same reactor turn as its loseConnection.
    h.reactor.callLater(closes_at - h.now(), client.send, post(body=b"charge-card"))
    h.advance(closes_at - h.now())
    assert upstream.closing
    assert upstream.received() == b""
    fresh = h.upstream().accept()
    fresh.send(ok(b"charged"))
    assert client.response().body == b"charged"


def test_client_connection_close_honoured(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO, extra=b"Connection: close\r\n"), ok())
    assert b"connection" not in upstream.request().names()
    response = client.response()
    assert response.header(b"connection") == b"close"
    assert client.closing
    # The upstream connection is ours, not the client's: it is kept.
    assert upstream.pooled_in(h.backend("solo-1"))


# Pipelining.


def test_pipelined_requests_answered_in_order(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, b"/first") + get(SOLO, b"/second", method=b"HEAD") + get(SOLO, b"/third"))
    upstream = h.upstream().accept()
    first = upstream.request()
    assert first.target == b"/first"
    # The later requests wait for the first response; the client is not read meanwhile.
    assert first.rest == b""
    assert client.paused
    upstream.take()

    upstream.send(ok(b"one"))
    assert h.new_connects() == []
    assert upstream.request().target == b"/second"
    assert upstream.request().method == b"HEAD"
    upstream.take()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert upstream.request().target == b"/third"
    upstream.send(ok(b"three"))

    responses = client.responses([False, True, False])
    assert [(r.status, r.body) for r in responses] == [(200, b"one"), (200, b""), (200, b"three")]
    assert not client.paused
    assert not client.closing


def test_pipelined_unknown_host_between_good_requests(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, b"/a") + get(b"nope.localhost") + get(SOLO, b"/c"))
    upstream = h.upstream().accept()
    upstream.take()
    upstream.send(ok(b"a"))
    assert upstream.request().target == b"/c"
    upstream.send(ok(b"c"))
    assert [(r.status, r.body[:1]) for r in client.responses()] == [(200, b"a"), (404, b"l"), (200, b"c")]


def test_pipelined_requests_to_different_services(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, b"/slow") + get(b"api.localhost", b"/v2/fast"))
    slow = h.upstream().accept()
    # The fast one waits for the slow one: responses go out in request order.
    assert h.new_connects() == []
    slow.send(ok(b"slow"))
    fast = h.upstream()
    assert fast.port == 9201
    fast.accept()
    fast.send(ok(b"fast"))
    assert [r.body for r in client.responses()] == [b"slow", b"fast"]


# Request bodies.


def test_content_length_body_relayed_and_next_request_read(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"hello", length=11))
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.method == b"POST"
    assert request.all(b"content-length") == [b"11"]
    assert request.rest == b"hello"

    client.send(b" world" + get(SOLO, b"/after"))
    assert upstream.request().rest == b"hello world"
    upstream.take()
    upstream.send(ok(b"created", status=b"201 Created"))
    assert upstream.request().target == b"/after"
    upstream.send(ok(b"after"))
    assert [(r.status, r.body) for r in client.responses()] == [(201, b"created"), (200, b"after")]


def test_chunked_body_reencoded_and_next_request_read(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(chunked_post())
    upstream = h.upstream().accept()
    head = upstream.request()
    assert head.all(b"transfer-encoding") == [b"chunked"]
    assert head.header(b"content-length") is None
    upstream.take()

    client.send(b"5;name=value\r\nhel")
    client.send(b"lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n" + get(SOLO, b"/after"))
    body = upstream.take()
    payload, rest, complete = decode_chunked(body)
    assert (payload, rest, complete) == (b"hello world", b"", True)
    assert b"name=value" not in body and b"X-Trailer" not in body

    upstream.send(ok(b"streamed"))
    assert upstream.request().target == b"/after"
    upstream.send(ok(b"after"))
    assert [r.body for r in client.responses()] == [b"streamed", b"after"]


def test_body_before_upstream_connected_is_buffered_then_flushed(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"01234", length=10))
    client.send(b"56789")
    upstream = h.upstream()
    upstream.accept()
    request = upstream.request()
    assert request.rest == b"0123456789"
    upstream.send(ok())
    assert client.response().status == 200


def test_pending_body_over_limit_pauses_client_until_connected(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(pending_body_limit=16)
    client = h.connect()
    client.send(post(body=b"x" * 10, length=100))
    assert not client.paused
    client.send(b"y" * 10)
    assert client.paused
    upstream = h.upstream().accept()
    assert not client.paused
    assert upstream.request().rest == b"x" * 10 + b"y" * 10
    client.send(b"z" * 80)
    assert upstream.request().rest == b"x" * 10 + b"y" * 10 + b"z" * 80
    upstream.send(ok())
    assert client.response().status == 200


@pytest.mark.parametrize("bad", [b"Z\r\nhello\r\n", b"0x5\r\nhello\r\n", b"5\nhello\r\n", b"5\r\nhelloXX\r\n", b"5\r\r\nhello\r\n"])
@pytest.mark.parametrize("when", ["after-connect", "with-head"])
def test_bad_chunk_400_and_close(h: ProxyHarness, bad: bytes, when: str) -> None:
    client = h.connect()
    if when == "with-head":
        client.send(chunked_post() + bad)
        upstream = h.upstream().accept()
        assert upstream.received() == b""
    else:
        client.send(chunked_post())
        upstream = h.upstream().accept()
        client.send(bad)
        assert upstream.aborted
    response = client.response()
    assert response.status == 400
    assert response.header(b"connection") == b"close"
    assert client.closing
    h.settle()
    if when == "after-connect":
        assert not upstream.pooled_in(h.backend("solo-1"))


# Back-pressure.


def test_request_body_backpressure_pauses_the_client(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"a" * 10, length=1000))
    upstream = h.upstream().accept()
    assert upstream.transport.producer is not None

    upstream.transport.fill_buffer()
    assert client.paused
    upstream.transport.drain_buffer()
    assert not client.paused

    upstream.transport.fill_buffer()
    assert client.paused
    client.send(b"b" * 990)
    # The body is complete: the upstream's buffer no longer governs the client.
    assert upstream.transport.producer is None
    upstream.transport.drain_buffer()
    assert not client.paused
    upstream.send(ok())
    assert client.response().status == 200


def test_response_backpressure_pauses_the_upstream(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    assert client.transport.producer is not None

    client.transport.fill_buffer()
    assert upstream.paused
    client.transport.drain_buffer()
    assert not upstream.paused

    client.transport.fill_buffer()
    assert upstream.paused
    upstream.send(b"67890")
    assert client.response().body == b"1234567890"
    # Done: the client's buffer no longer governs the upstream, and the pooled connection is readable again.
    assert client.protocol._response_producer is None
    assert not upstream.paused
    assert upstream.pooled_in(h.backend("solo-1"))


def test_chunked_response_backpressure(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    client.transport.fill_buffer()
    assert upstream.paused
    client.transport.drain_buffer()
    assert not upstream.paused
    upstream.send(b"0\r\n\r\n")
    assert client.response().body == b"abc"


# Failures: connecting.


def test_connect_refused_retried_on_another_backend(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(b"api.localhost"))
    first = h.upstream()
    first.refuse()
    second = h.upstream()
    assert {first.port, second.port} == API_PORTS
    second.accept()
    assert second.request().target == b"/"
    second.send(ok(b"second try"))
    assert client.response().body == b"second try"
    assert h.gateway.retries == 1
    failed = h.backend("api-1" if first.port == 9001 else "api-2")
    assert failed.errors == 1


@pytest.mark.parametrize("fail", ["refuse", "time_out"])
def test_connect_failure_everywhere_502_names_service(h: ProxyHarness, fail: str) -> None:
    client = h.connect()
    client.send(get(b"api.localhost"))
    first = h.upstream()
    assert first.timeout == h.settings.connect_timeout
    # The connector owns the connect timeout: nothing happens before it reports.
    h.advance(h.settings.connect_timeout - 0.1)
    assert client.received() == b""
    getattr(first, fail)()
    second = h.upstream()
    assert second.port != first.port
    assert second.timeout == h.settings.connect_timeout
    getattr(second, fail)()

    response = client.response()
    assert response.status == 502
    assert b"'api'" in response.body
    assert h.new_connects() == []
    assert not client.closing


@pytest.mark.parametrize("fail", ["refuse", "time_out"])
def test_connect_failure_single_backend_502_without_retry(h: ProxyHarness, fail: str) -> None:
    client = h.connect()
    client.send(get(SOLO))
    getattr(h.upstream(), fail)()
    response = client.response()
    assert response.status == 502
    assert b"'solo'" in response.body
    assert h.new_connects() == []


def test_connect_refused_with_request_body_retried_with_the_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(b"api.localhost", body=b"payload"))
    h.upstream().refuse()
    second = h.upstream().accept()
    assert second.request().rest == b"payload"
    second.send(ok())
    assert client.response().status == 200


# Failures: the upstream connection breaks.


def test_stale_pooled_connection_get_retried_once_on_fresh_connection(h: ProxyHarness) -> None:
    client = h.connect()
    pooled = pooled_solo_connection(h, client)
    client.send(get(SOLO, b"/again"))
    assert h.new_connects() == []
    assert pooled.request().target == b"/again"
    pooled.close()  # the backend had closed it while it sat in the pool

    fresh = h.upstream()
    assert fresh.port == 9401
    fresh.accept()
    assert fresh.request().target == b"/again"
    fresh.send(ok(b"fresh"))
    assert client.response().body == b"fresh"
    assert h.gateway.retries == 1



def test_stale_pooled_get_retry_uses_a_fresh_connection_with_two_backends(h: ProxyHarness) -> None:
    warm = [h.connect(), h.connect()]
    for client in warm:
        client.send(get(b"api.localhost"))
    pooled = h.new_connects()
    assert {u.port for u in pooled} == API_PORTS
    for upstream in pooled:
        upstream.accept().send(ok())
        upstream.take()

    client = h.connect()
    client.send(get(b"api.localhost", b"/again"))
    assert h.new_connects() == []
    stale = next(u for u in pooled if u.received())
    other = next(u for u in pooled if u is not stale)
    stale.close()

    fresh = h.new_connects()
    assert len(fresh) == 1
    assert other.received() == b""
    fresh[0].accept().send(ok(b"fresh"))
    assert client.response().body == b"fresh"


def test_stale_pooled_get_then_fresh_failure_502_no_third_attempt(h: ProxyHarness) -> None:
    client = h.connect()
    pooled = pooled_solo_connection(h, client)
    client.send(get(SOLO, b"/again"))
    pooled.close()
    fresh = h.upstream().accept()
    fresh.close()
    response = client.response()
    assert response.status == 502
    assert b"'solo'" in response.body
    assert h.new_connects() == []


def test_stale_pooled_connection_post_with_body_502_not_retried(h: ProxyHarness) -> None:
    client = h.connect()
    pooled = pooled_solo_connection(h, client)
    client.send(post(body=b"charge-card"))
    assert pooled.request().rest == b"charge-card"
    pooled.close()
    response = client.response()
    assert response.status == 502
    assert h.new_connects() == []
    assert h.gateway.retries == 0


def test_post_reached_fresh_upstream_then_reset_502_not_retried(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(b"api.localhost", body=b"charge-card"))
    upstream = h.upstream().accept()
    assert upstream.request().rest == b"charge-card"
    upstream.reset()
    assert client.response().status == 502
    assert h.new_connects() == []


def test_get_on_fresh_connection_closed_before_response_tried_on_other_backend(h: ProxyHarness) -> None:
    # nginx's default (proxy_next_upstream error): an idempotent request may go to the next backend.
    client = h.connect()
    client.send(get(b"api.localhost"))
    first = h.upstream().accept()
    first.close()
    second = h.upstream()
    assert second.port != first.port
    second.accept()
    second.send(ok(b"other"))
    assert client.response().body == b"other"


def test_response_timeout_504_and_upstream_aborted(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    h.advance(h.settings.response_timeout - 0.5)
    assert client.received() == b""
    h.advance(0.5)
    response = client.response()
    assert response.status == 504
    assert b"'solo'" in response.body
    assert upstream.aborted
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))
    assert h.new_connects() == []
    assert not client.closing


def test_response_timeout_on_reused_connection_counts_from_the_request(h: ProxyHarness) -> None:
    client = h.connect()
    pooled = pooled_solo_connection(h, client)
    h.advance(20)
    client.send(get(SOLO, b"/late"))
    assert h.new_connects() == []
    h.advance(h.settings.response_timeout - 1)
    assert client.received() == b""
    pooled.send(ok(b"in time"))
    assert client.response().body == b"in time"
    client.take()

    client.send(get(SOLO, b"/never"))
    h.advance(h.settings.response_timeout - 0.5)
    assert client.received() == b""
    h.advance(0.5)
    assert client.response().status == 504
    assert pooled.aborted



def test_response_timeout_starts_after_the_request_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"a", length=4))
    upstream = h.upstream().accept()
    for piece in (b"b", b"c", b"d"):
        h.advance(h.settings.body_timeout / 2)  # a slow client, but within body_timeout every time
        assert client.received() == b""
        client.send(piece)
    assert upstream.request().rest == b"abcd"
    h.advance(h.settings.response_timeout - 0.5)
    assert client.received() == b""
    h.advance(0.5)
    assert client.response().status == 504


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\r\n\r\n",
    ],
)
def test_malformed_upstream_response_502_connection_not_reused(h: ProxyHarness, garbage: bytes) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO), garbage)
    response = client.response()
    assert response.status == 502
    assert b"'solo'" in response.body
    assert upstream.aborted
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))
    assert not client.closing

    client.take()
    client.send(get(SOLO))
    fresh = h.upstream().accept()
    fresh.send(ok(b"good"))
    assert client.response().body == b"good"


def test_unrequested_101_is_502(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO), b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert client.response().status == 502
    assert upstream.aborted


def test_upstream_dies_mid_body_client_aborted(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    upstream.reset()
    assert client.aborted
    h.settle()
    assert client.lost
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_bad_chunk_from_upstream_mid_body_client_aborted(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    # Mid-body: the head and a chunk went out with the first read; a bad chunk in the first read is a 502
    # (tests/test_upstream_isolation.py).
    upstream.send(b"ZZ\r\n")
    assert client.aborted
    assert upstream.aborted



def test_upstream_dies_mid_body_pipelined_request_not_sent(h: ProxyHarness) -> None:
    # Two idle connections to solo-1, so the pipelined request would find one.
    first, second = h.connect(), h.connect()
    first.send(get(SOLO))
    second.send(get(SOLO))
    one, two = h.new_connects()
    one.accept().send(ok())
    two.accept().send(ok())
    assert len(h.backend("solo-1").idle) == 2
    one.take()
    two.take()

    client = h.connect()
    client.send(get(SOLO, b"/big") + post(body=b"not-idempotent"))
    used = one if one.received() else two
    spare = two if used is one else one
    used.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    used.reset()
    assert client.aborted
    h.settle()
    # The client is gone: its second request must reach no backend.
    assert spare.received() == b""
    assert h.new_connects() == []
    assert h.gateway.in_flight == 0


# The client goes away.


def test_client_gone_while_waiting_for_response(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    client.close()
    assert upstream.aborted
    assert h.gateway.in_flight == 0
    assert h.backend("solo-1").in_flight == 0
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))
    assert h.gateway.connections == set()


def test_client_gone_mid_response_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    client.reset()
    assert upstream.aborted
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_client_gone_mid_request_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"half", length=8))
    upstream = h.upstream().accept()
    client.close()
    assert upstream.aborted
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_client_gone_before_upstream_connects(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"payload"))
    upstream = h.upstream()
    client.close()
    assert h.gateway.in_flight == 0
    upstream.accept()
    # Nothing of the abandoned request goes out; an unused fresh connection may be pooled.
    assert upstream.received() == b""


def test_client_gone_before_connect_fails(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(b"api.localhost"))
    upstream = h.upstream()
    client.close()
    upstream.refuse()
    assert h.new_connects() == []


# Client-side timeouts.


def test_trickled_head_408_at_head_timeout_from_first_byte(h: ProxyHarness) -> None:
    client = h.connect()
    h.advance(3)
    head = b"GET / HTTP/1.1\r\nHost: solo.localhost\r\nX-Slow: "
    client.send(head[:1])
    timeout = h.settings.head_timeout
    for i in range(int(timeout) - 1):
        h.advance(1)
        client.send(head[i + 1 : i + 2])
        assert client.received() == b""
    h.advance(0.5)
    client.send(b"s")
    assert client.received() == b""
    h.advance(0.5)  # head_timeout after the first byte
    response = client.response()
    assert response.status == 408
    assert client.closing
    assert h.connect_count() == 0


def test_trickled_head_on_kept_alive_connection_408(h: ProxyHarness) -> None:
    client = h.connect()
    pooled_solo_connection(h, client)
    h.advance(5)
    client.send(b"GET /")
    for _ in range(int(h.settings.head_timeout) - 1):
        h.advance(1)
        client.send(b"x")
    h.advance(1)
    assert client.response().status == 408
    assert client.closing


def test_idle_keep_alive_connection_closed_after_idle_timeout(h: ProxyHarness) -> None:
    client = h.connect()
    serve(h, client, get(SOLO), ok())
    client.take()
    h.advance(h.settings.idle_timeout - 1)
    assert not client.closing
    h.advance(1)
    assert client.closing
    assert client.received() == b""


def test_silent_new_connection_closed_after_head_timeout(h: ProxyHarness) -> None:
    client = h.connect()
    h.advance(h.settings.head_timeout - 0.5)
    assert not client.closing
    h.advance(0.5)
    assert client.closing
    assert client.received() == b""
    h.settle()
    assert h.gateway.connections == set()


def test_slow_body_408_after_body_timeout(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(body_timeout=20.0)
    client = h.connect()
    client.send(post(body=b"12345", length=10))
    upstream = h.upstream().accept()
    h.advance(15)
    client.send(b"6")  # bytes keep the body alive
    h.advance(19)
    assert client.received() == b""
    h.advance(1)
    response = client.response()
    assert response.status == 408
    assert client.closing
    assert upstream.aborted



def test_stalled_body_with_default_timeouts_is_408_not_504(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"12345", length=10))
    upstream = h.upstream().accept()
    h.advance(10)
    client.send(b"6")
    h.advance(h.settings.body_timeout)
    assert client.response().status == 408
    assert upstream.aborted
    assert h.backend("solo-1").errors == 0



def test_slow_body_on_kept_alive_client_connection_408_after_body_timeout(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(body_timeout=20.0)
    client = h.connect()
    pooled_solo_connection(h, client)
    # Past the first head_timeout check: the connection's one timer now waits for the idle deadline.
    h.advance(h.settings.head_timeout + 1)
    client.send(post(body=b"12345", length=10))
    h.advance(19.5)
    assert client.received() == b""
    h.advance(0.5)
    assert client.response().status == 408


# WebSocket and other upgrades.

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: solo.localhost\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def open_tunnel(h: ProxyHarness, early: bytes = b"") -> tuple[Client, Upstream]:
    client = h.connect()
    client.send(UPGRADE + early)
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.all(b"connection") == [b"Upgrade"]
    assert request.all(b"upgrade") == [b"websocket"]
    assert request.header(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert request.rest == b""
    upstream.take()
    return client, upstream


def test_websocket_upgrade_then_raw_bytes_both_ways(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h)
    upstream.send(SWITCHING + b"\x81\x05hello")
    responses, rest = parse_responses(client.take())
    assert [r.status for r in responses] == [101]
    assert responses[0].header(b"upgrade") == b"websocket"
    assert responses[0].header(b"connection") == b"Upgrade"
    assert responses[0].header(b"sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert rest == b"\x81\x05hello"

    client.send(b"\x81\x85\x00\x00\x00\x00hello")
    assert upstream.take() == b"\x81\x85\x00\x00\x00\x00hello"
    # Bytes that look like HTTP are just bytes now.
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    assert upstream.take() == b"GET / HTTP/1.1\r\n\r\n"
    upstream.send(b"HTTP/1.1 200 OK\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\n\r\n"
    assert not upstream.pooled_in(h.backend("solo-1"))

    upstream.close()
    assert client.closing
    h.settle()
    assert client.lost


def test_websocket_client_close_closes_upstream(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h)
    upstream.send(SWITCHING)
    client.send(b"ping")
    client.close()
    assert upstream.closing
    h.settle()
    assert upstream.lost
    assert h.backend("solo-1").idle == []


def test_websocket_bytes_sent_before_101_forwarded_after_it(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h, early=b"\x81\x02hi")
    assert client.paused
    upstream.send(SWITCHING)
    assert upstream.take() == b"\x81\x02hi"
    assert not client.paused
    upstream.close()


def test_websocket_backpressure_both_ways(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h)
    upstream.send(SWITCHING)
    client.transport.fill_buffer()
    assert upstream.paused
    client.transport.drain_buffer()
    assert not upstream.paused
    upstream.transport.fill_buffer()
    assert client.paused
    upstream.transport.drain_buffer()
    assert not client.paused
    client.close()


def test_upgrade_refused_by_upstream_is_an_ordinary_response(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h)
    upstream.send(ok(b"no websockets here"))
    assert client.response().body == b"no websockets here"
    client.take()
    # Still HTTP on both sides.
    client.send(get(SOLO, b"/next"))
    assert upstream.request().target == b"/next"
    upstream.send(ok(b"next"))
    assert client.response().body == b"next"



def test_tunnel_upstream_gone_while_client_backpressured_still_closes_client(h: ProxyHarness) -> None:
    client, upstream = open_tunnel(h)
    upstream.send(SWITCHING)
    client.transport.fill_buffer()  # a slow reader: the transport paused the upstream
    upstream.reset()
    h.settle()
    client.transport.drain_buffer()  # the client reads what was queued
    h.settle()
    assert client.lost
    assert h.gateway.connections == set()


# Graceful drain.


def test_drain_closes_idle_connections_and_finishes_in_flight_with_close(h: ProxyHarness) -> None:
    silent = h.connect()
    kept_alive = h.connect()
    serve(h, kept_alive, get(SOLO), ok())
    busy = h.connect()
    busy.send(get(b"api.localhost"))
    upstream = h.upstream().accept()

    done = h.gateway.drain(30.0)
    fired: list[object] = []
    done.addBoth(fired.append)
    assert silent.closing and kept_alive.closing
    assert not busy.closing
    h.settle()
    assert fired == []

    late = h.connect()
    assert late.closing

    upstream.send(ok(b"last"))
    response = busy.response()
    assert response.body == b"last"
    assert response.header(b"connection") == b"close"
    assert busy.closing
    h.settle()
    assert fired == [None]
    assert h.gateway.connections == set()


def test_drain_lets_a_response_in_progress_finish_then_closes(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO) + get(SOLO, b"/pipelined"))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    done = h.gateway.drain(30.0)
    fired: list[object] = []
    done.addBoth(fired.append)
    upstream.send(b"67890")
    assert client.response().body == b"1234567890"
    assert client.closing
    upstream.take()
    h.settle()
    # The pipelined request is not started: the client sees the close and retries elsewhere.
    assert upstream.received() == b""
    assert fired == [None]


def test_drain_aborts_what_is_left_after_grace(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    tunnel_client, tunnel_upstream = open_tunnel(h)
    tunnel_upstream.send(SWITCHING)

    done = h.gateway.drain(5.0)
    fired: list[object] = []
    done.addBoth(fired.append)
    h.advance(4.9)
    assert fired == []
    assert not client.closing and not tunnel_client.closing
    h.advance(0.1)
    assert client.aborted and tunnel_client.aborted
    h.settle()
    assert fired == [None]
    assert upstream.aborted and tunnel_upstream.closing


def test_drain_without_connections_fires_at_once(h: ProxyHarness) -> None:
    fired: list[object] = []
    h.gateway.drain(5.0).addBoth(fired.append)
    assert fired == [None]


# More paths: early responses, pipelined bodies, retry budget, backends leaving rotation.


def test_early_response_before_body_complete_closes_both(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(post(body=b"12345", length=10))
    upstream = h.upstream().accept()
    upstream.send(ok(b"too big", status=b"413 Content Too Large"))
    response = client.response()
    assert response.status == 413
    # The rest of the body is still coming: it cannot be skipped safely, on either side.
    assert response.header(b"connection") == b"close"
    assert client.closing
    assert upstream.closing
    client.send(b"67890")
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))


def test_pipelined_get_then_post_with_body(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, b"/first") + post(body=b"abc", length=6))
    upstream = h.upstream().accept()
    upstream.take()
    upstream.send(ok(b"one"))
    request = upstream.request()
    assert (request.method, request.rest) == (b"POST", b"abc")
    assert not client.paused
    client.send(b"def")
    assert upstream.request().rest == b"abcdef"
    upstream.send(ok(b"two"))
    assert [r.body for r in client.responses()] == [b"one", b"two"]


@pytest.mark.parametrize("request_bytes", [post(b"down.localhost", body=b"abc"), get(b"nope.localhost", extra=b"Content-Length: 3\r\n") + b"abc"])
def test_refused_request_with_unread_body_closes(h: ProxyHarness, request_bytes: bytes) -> None:
    client = h.connect()
    client.send(request_bytes)
    response = client.response()
    assert response.status in (404, 503)
    assert response.header(b"connection") == b"close"
    assert client.closing


def test_retry_budget_caps_concurrent_retries(h: ProxyHarness) -> None:
    clients = [h.connect() for _ in range(4)]
    for client in clients:
        client.send(get(b"api.localhost"))
    first_attempts = h.new_connects()
    assert len(first_attempts) == 4
    for attempt in first_attempts:
        attempt.refuse()
    retries = h.new_connects()
    # max(3, 20 % of 4 in flight) = 3 retries at once; the fourth request fails fast.
    assert len(retries) == 3
    assert h.gateway.active_retries == 3
    assert clients[3].response().status == 502
    for client, retry in zip(clients, retries):
        retry.accept().send(ok(b"retried"))
        assert client.response().body == b"retried"
    assert h.gateway.retries == 3


def test_backend_leaving_rotation_mid_request_is_not_pooled(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    h.registry.mark_down("solo-1")
    upstream.send(ok(b"last one"))
    assert client.response().body == b"last one"
    assert upstream.closing
    client.take()
    client.send(get(SOLO))
    assert client.response().status == 503


def test_https_listener_sets_forwarded_proto(h: ProxyHarness) -> None:
    from labelgw.http.server import ProxyFactory

    h.factory = ProxyFactory(h.gateway, b"https")
    client = h.connect()
    upstream = serve(h, client, get(SOLO), ok())
    assert upstream.request().all(b"x-forwarded-proto") == [b"https"]


def test_upstream_head_too_large_502(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = serve(h, client, get(SOLO), b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024))
    assert client.response().status == 502
    assert upstream.aborted


# fastwrite.


def test_write_now_uses_write_on_a_string_transport() -> None:
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"


def test_write_now_ignores_writesomedata_on_non_tcp_transports() -> None:
    class Looks(StringTransport):
        _tempDataBuffer: list[bytes] = []
        dataBuffer = b""
        offset = 0
        _writeDisconnected = False

        def writeSomeData(self, data: bytes) -> int:
            raise AssertionError("fast path taken on a non-TCP transport")

    transport = Looks()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"


class _Recorder:
    def __init__(self) -> None:
        self.direct: list[bytes] = []
        self.queued: list[bytes] = []


def _tcp_server(recorder: _Recorder, accept: int | BaseException | None, **state: Any) -> tcp.Server:
    """A tcp.Server with no socket: only the attributes write_now reads, and recorded writes."""
    server = tcp.Server.__new__(tcp.Server)
    server._tempDataBuffer = []
    server.dataBuffer = b""
    server.offset = 0
    server.connected = True
    server.disconnecting = False
    server._writeDisconnected = False
    for name, value in state.items():
        setattr(server, name, value)

    class _Socket:
        """What the kernel takes: everything, a part, nothing, or an error (a reset connection)."""

        def send(self, data: bytes) -> int:
            recorder.direct.append(bytes(data))
            if isinstance(accept, BaseException):
                raise OSError(104, "Connection reset by peer")
            return len(data) if accept is None else accept

    server.socket = _Socket()
    server.write = recorder.queued.append  # type: ignore[method-assign]
    return server


@pytest.mark.parametrize(
    "accept, direct, queued",
    [(None, [b"abcdef"], []), (2, [b"abcdef"], [b"cdef"]), (0, [b"abcdef"], [b"abcdef"]),
     (error.ConnectionLost(), [b"abcdef"], [b"abcdef"])],
    ids=["all", "partial", "none", "lost"],
)
def test_write_now_fast_path_on_tcp(accept: Any, direct: list[bytes], queued: list[bytes]) -> None:
    recorder = _Recorder()
    write_now(_tcp_server(recorder, accept), b"abcdef")
    assert (recorder.direct, recorder.queued) == (direct, queued)


@pytest.mark.parametrize(
    "state",
    [{"_tempDataBuffer": [b"x"]}, {"dataBuffer": b"xy", "offset": 1}, {"connected": False},
     {"disconnecting": True}, {"_writeDisconnected": True}],
    ids=["temp-buffer", "data-buffer", "not-connected", "disconnecting", "write-closed"],
)
def test_write_now_queues_behind_pending_data(state: dict[str, Any]) -> None:
    recorder = _Recorder()
    write_now(_tcp_server(recorder, None, **state), b"abc")
    assert (recorder.direct, recorder.queued) == ([], [b"abc"])


def test_parse_request_helper_round_trip() -> None:
    # Guards the harness itself: the assertions above rely on it.
    request, rest = parse_request(b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\nbody")
    assert (request.method, request.target, request.header(b"x"), rest) == (b"GET", b"/x", b"1", b"body")
    responses, rest = parse_responses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [(r.status, r.body) for r in responses] == [(200, b"a"), (204, b"")]
    assert rest == b""
