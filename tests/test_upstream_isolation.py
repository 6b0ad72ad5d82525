"""Cross-client isolation on pooled upstream connections (issue 14, items 1-3): a backend's malformed or
over-long answer must never reach another client, and must never make labelgw send a request twice.

Each attack is played on the deterministic harness (tests/proxyharness.py): the test is both the client and the
misbehaving backend. tests/test_upstream_e2e.py plays the same attacks against the real twistd.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import pytest

from labelgw.http.framing import MAX_HEAD_BYTES
from labelgw.http.settings import ProxySettings
from labelgw.http.upstream import UpstreamConnection
from proxyharness import Client, ProxyHarness, Upstream, get, ok

SOLO = b"solo.localhost"
# What a hostile or broken backend appends after a response: a whole second response, meant for the next client.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nstolen!"


@pytest.fixture
def h() -> Iterator[ProxyHarness]:
    harness = ProxyHarness()
    yield harness
    harness.assert_accounting()


def serve(h: ProxyHarness, client: Client, request: bytes, response: bytes) -> Upstream:
    client.send(request)
    upstream = h.upstream().accept()
    upstream.send(response)
    return upstream


def pooled(h: ProxyHarness, client: Client) -> Upstream:
    upstream = serve(h, client, get(SOLO, b"/warmup"), ok(b"warm"))
    assert upstream.pooled_in(h.backend("solo-1"))
    client.take()
    upstream.take()
    return upstream


def assert_clean_502(h: ProxyHarness, client: Client, upstream: Upstream) -> None:
    """The client got a whole 502 (not a reset) and keeps its connection; the upstream one is closed, unpooled;
    the next request takes a new connection and gets that connection's answer, nothing else."""
    response = client.response()
    assert response.status == 502
    assert b"'solo'" in response.body
    assert not client.aborted and not client.closing
    assert upstream.aborted
    h.settle()
    assert not upstream.pooled_in(h.backend("solo-1"))
    client.take()
    other = h.connect()
    other.send(get(SOLO, b"/next"))
    fresh = h.upstream().accept()
    fresh.send(ok(b"yours"))
    assert other.response().body == b"yours"


# Item 1: malformed upstream heads and framing are a 502 at once, and the connection is closed.


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
    ],
    ids=["CL-then-TE", "TE-then-CL"],
)
def test_content_length_with_chunked_is_502_and_its_tail_reaches_nobody(h: ProxyHarness, fields: bytes) -> None:
    client = h.connect()
    # Read as chunked, the body ends at "0"; a Content-Length reader would see "0\r\n\r\n" as 5 body bytes. Either
    # way what follows was served to the next client of the pooled connection.
    attack = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n0\r\n\r\n" + SMUGGLED
    upstream = serve(h, client, get(SOLO), attack)
    assert_clean_502(h, client, upstream)


def test_content_length_with_chunked_on_a_reused_connection(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled(h, client)
    client.send(get(SOLO, b"/again"))
    assert h.new_connects() == []
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    upstream.send(SMUGGLED)
    assert_clean_502(h, client, upstream)
    # Not retried either (item 3): the backend may have acted on it.
    assert h.gateway.retries == 0


@pytest.mark.parametrize(
    "body",
    [b"ZZ\r\nhello\r\n0\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX\r\n"],
    ids=["size-Z", "size-0x5", "bare-LF", "data-too-long"],
)
def test_bad_chunked_body_in_the_first_read_is_a_clean_502(h: ProxyHarness, body: bytes) -> None:
    # It used to be a reset with 0 bytes: the head was already handed to the exchange when the body failed.
    client = h.connect()
    upstream = serve(h, client, get(SOLO), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert_clean_502(h, client, upstream)


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n", b"HTTP/1.1 200 OK\nContent-Length: 0\n\r\n"],
    ids=["all-LF", "LF-blank-line", "CRLF-then-LF", "LF-then-CRLF"],
)
def test_bare_lf_head_end_is_502_at_once(h: ProxyHarness, head: bytes) -> None:
    # Used to wait for a CRLFCRLF that never came: a 504 after the response timeout (60 s).
    client = h.connect()
    upstream = serve(h, client, get(SOLO), head)
    assert_clean_502(h, client, upstream)


def test_head_over_the_cap_is_502_even_when_its_end_comes_in_a_later_read(h: ProxyHarness) -> None:
    # The cap was checked only while no end was seen: a 60 KiB read, then 10 KiB and the end, passed (~128 KiB).
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (60 * 1024))
    assert client.received() == b""
    upstream.send(b"a" * (10 * 1024) + b"\r\nContent-Length: 0\r\n\r\n")
    assert_clean_502(h, client, upstream)


def test_head_of_exactly_the_cap_passes(h: ProxyHarness) -> None:
    client = h.connect()
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Fill: "
    fill = MAX_HEAD_BYTES - len(start) - 4
    serve(h, client, get(SOLO), start + b"f" * fill + b"\r\n\r\nok")
    assert client.response().body == b"ok"


# Item 2: bytes after a complete response never reach the next request.


@pytest.mark.parametrize(
    ("method", "response"),
    [
        (b"GET", ok(b"hello")),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ],
    ids=["content-length", "HEAD", "304", "204"],
)
@pytest.mark.parametrize("late", [SMUGGLED, b"hello"], ids=["response", "body"])
def test_late_bytes_while_idle_close_the_connection_at_once(
    h: ProxyHarness, method: bytes, response: bytes, late: bytes
) -> None:
    client = h.connect()
    client.send(get(SOLO).replace(b"GET", method, 1))
    upstream = h.upstream().accept()
    upstream.send(response)
    assert upstream.pooled_in(h.backend("solo-1"))
    upstream.send(late)
    assert upstream.closing
    assert not upstream.pooled_in(h.backend("solo-1"))
    other = h.connect()
    other.send(get(SOLO, b"/next"))
    assert upstream.received().count(b"/next") == 0
    h.upstream().accept().send(ok(b"yours"))
    assert other.response().body == b"yours"


@pytest.mark.parametrize(
    ("method", "response"),
    [(b"GET", ok(b"hello")), (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
     (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n")],
    ids=["content-length", "HEAD", "304"],
)
def test_late_bytes_with_the_response_are_never_pooled(h: ProxyHarness, method: bytes, response: bytes) -> None:
    client = h.connect()
    client.send(get(SOLO).replace(b"GET", method, 1))
    upstream = h.upstream().accept()
    upstream.send(response + SMUGGLED)
    assert client.response(head_only=method == b"HEAD").status in (200, 304)
    assert upstream.closing
    assert not upstream.pooled_in(h.backend("solo-1"))


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, backend = socket.socketpair()
    yield ours, backend
    ours.close()
    backend.close()


def with_socket(upstream: Upstream, handle: Any) -> None:
    upstream.transport.getHandle = lambda: handle  # type: ignore[attr-defined]


@pytest.mark.parametrize("unread", ["bytes", "eof"])
def test_unread_bytes_or_eof_on_a_pooled_connection_discard_it_before_the_request(
    h: ProxyHarness, socket_pair: tuple[socket.socket, socket.socket], unread: str
) -> None:
    # The late bytes reached the kernel but the reactor has not read them yet (the next request is handled first
    # in the same reactor turn): a peek at hand-out time finds them.
    ours, backend = socket_pair
    client = h.connect()
    upstream = pooled(h, client)
    with_socket(upstream, ours)
    if unread == "bytes":
        backend.sendall(SMUGGLED)
    else:
        backend.shutdown(socket.SHUT_WR)
    client.send(get(SOLO, b"/next"))
    assert upstream.received() == b""
    assert upstream.closing
    assert not upstream.pooled_in(h.backend("solo-1"))
    fresh = h.upstream().accept()
    assert fresh.request().target == b"/next"
    fresh.send(ok(b"yours"))
    assert client.response().body == b"yours"
    # Nothing was sent on the discarded connection, so nothing was retried.
    assert h.gateway.retries == 0


def test_a_quiet_pooled_connection_is_reused(h: ProxyHarness, socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = socket_pair
    client = h.connect()
    upstream = pooled(h, client)
    with_socket(upstream, ours)
    client.send(get(SOLO, b"/next"))
    assert h.new_connects() == []
    assert upstream.request().target == b"/next"
    upstream.send(ok(b"again"))
    assert client.response().body == b"again"


def test_has_unread(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, backend = socket_pair
    connection = UpstreamConnection.__new__(UpstreamConnection)

    class Transport:
        handle: Any = ours

        def getHandle(self) -> Any:
            return self.handle

    connection.transport = Transport()
    assert connection.has_unread() is False
    backend.sendall(b"x")
    assert connection.has_unread() is True
    # A peek: the byte is still there for the reactor.
    assert ours.recv(1) == b"x"
    assert connection.has_unread() is False
    backend.close()
    assert connection.has_unread() is True
    # Not a socket (a TLS connection's handle): not peeked.
    connection.transport.handle = object()
    assert connection.has_unread() is False
    # A closed socket: an error is as good as unread bytes (never reuse).
    closed = socket.socket()
    closed.close()
    connection.transport.handle = closed
    assert connection.has_unread() is True
    connection.transport = object()
    assert connection.has_unread() is False


def test_has_unread_of_a_plain_tcp_connection_polls_its_socket(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    # A TCP client transport's socket is read without getHandle: the same answers.
    from twisted.internet import tcp

    ours, backend = socket_pair
    connection = UpstreamConnection.__new__(UpstreamConnection)
    transport = tcp.Client.__new__(tcp.Client)
    transport.socket = ours
    connection.transport = transport
    assert connection.has_unread() is False
    backend.sendall(b"x")
    assert connection.has_unread() is True
    assert ours.recv(1) == b"x"
    assert connection.has_unread() is False
    backend.close()
    assert connection.has_unread() is True
    # Closed on our side (tcp.Connection.connectionLost closes it): an error, never a clean idle connection.
    ours.close()
    assert connection.has_unread() is True


# Item 3: only a failure before any response byte may be retried, and only as its method allows.


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["CL-and-TE", "bad-field", "bare-LF", "bad-chunk", "garbage"],
)
@pytest.mark.parametrize("method", [b"DELETE", b"GET", b"PUT"])
def test_malformed_response_on_a_reused_connection_is_never_retried(
    h: ProxyHarness, answer: bytes, method: bytes
) -> None:
    client = h.connect()
    upstream = pooled(h, client)
    client.send(get(SOLO, b"/item/1").replace(b"GET", method, 1))
    assert upstream.request().method == method
    upstream.send(answer)
    assert client.response().status == 502
    h.settle()
    # The backend received it once: no second connection, no retry.
    assert h.new_connects() == []
    assert h.gateway.retries == 0


def test_close_mid_head_on_a_reused_connection_is_not_retried(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled(h, client)
    client.send(get(SOLO, b"/item/1").replace(b"GET", b"DELETE", 1))
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-")
    upstream.close()
    assert client.response().status == 502
    assert h.new_connects() == []
    assert h.gateway.retries == 0


def test_close_before_any_response_byte_on_a_reused_connection_is_retried_for_delete(h: ProxyHarness) -> None:
    # The stale pooled connection (the backend closed it as the request went out): idempotent, nothing answered.
    client = h.connect()
    upstream = pooled(h, client)
    client.send(get(SOLO, b"/item/1").replace(b"GET", b"DELETE", 1))
    upstream.close()
    fresh = h.upstream().accept()
    assert fresh.request().method == b"DELETE"
    fresh.send(ok(b"deleted"))
    assert client.response().body == b"deleted"
    assert h.gateway.retries == 1


def test_response_timeout_is_not_retried(h: ProxyHarness) -> None:
    client = h.connect()
    upstream = pooled(h, client)
    client.send(get(SOLO, b"/slow"))
    h.advance(h.settings.response_timeout)
    assert client.response().status == 504
    h.settle()
    assert h.new_connects() == []
    assert upstream.aborted


def test_pool_parks_a_connection_with_its_idle_deadline() -> None:
    settings = ProxySettings(upstream_idle_timeout=5, response_timeout=60)
    harness = ProxyHarness(settings)
    client = harness.connect()
    client.send(get(SOLO))
    upstream = harness.upstream().accept()
    upstream.send(ok())
    assert upstream.pooled_in(harness.backend("solo-1"))
    harness.advance(4.9)
    assert not upstream.closing
    harness.advance(0.1)
    assert upstream.closing
    harness.settle()
    harness.assert_accounting()
