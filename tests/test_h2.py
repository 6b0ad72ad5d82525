"""HTTP/2 towards clients (labelgw/http/h2.py), deterministic and in memory.

The client is h2's own client-side H2Connection; the server is labelgw's H2Protocol on a FakeTransport; the
backends are the proxy harness's fake upstreams (tests/proxyharness.py). Bytes move between client and server
only when a test calls `exchange()`, so every interleaving is chosen by the test.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from labelgw.http.h2 import H2Factory, H2Protocol, H2Settings, NegotiatingFactory, negotiating_factory, request_head
from labelgw.http.headers import upstream_request_head
from labelgw.http.parser import RequestHead
from labelgw.http.server import ClientConnection
from labelgw.http.settings import ProxySettings
from labelgw.tls.policy import INTERMEDIATE, build_server_context
from proxyharness import CLIENT_PEER, LISTENER, FakeTransport, ProxyHarness, Upstream, decode_chunked, ok

SOLO = b"solo.localhost"


@dataclass
class StreamResult:
    headers: list[tuple[bytes, bytes]] | None = None
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        assert self.headers is not None, "no response headers yet"
        return int(dict(self.headers)[b":status"])

    def all(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers or [] if key == name]

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None


class H2Client:
    """An h2 client connection wired to an H2Protocol over a FakeTransport."""

    def __init__(
        self,
        h: ProxyHarness,
        settings: H2Settings | None = None,
        auto_ack: bool = True,
        validate: bool = True,
    ) -> None:
        self.h = h
        factory = H2Factory(h.gateway, b"https", settings or H2Settings())
        self.server: H2Protocol = factory.buildProtocol(CLIENT_PEER)
        self.transport = FakeTransport(h.reactor, LISTENER, CLIENT_PEER)
        self.transport.protocol = self.server
        self.server.makeConnection(self.transport)
        self.conn = H2Connection(
            H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.conn.initiate_connection()
        self.auto_ack = auto_ack
        self.streams: dict[int, StreamResult] = {}
        self.terminated: ConnectionTerminated | None = None
        self._pending_body: dict[int, tuple[bytes, bool]] = {}
        self.exchange()

    def exchange(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(1000):
            moved = False
            # The reactor turn ends: a write the server keeps for the turn's end (several streams answering) goes.
            if self.server._flush_call is not None:
                self.server.flush()
            out = self.conn.data_to_send()
            if out:
                self.server.dataReceived(out)
                moved = True
            data = self.transport.value()
            if data:
                self.transport.clear()
                self._handle(self.conn.receive_data(data))
                self._send_pending()
                moved = True
            if not moved:
                return
        raise AssertionError("client and server never went quiet")

    def raw_frames(self) -> list[Any]:
        """What the server wrote since the last exchange, as frames, without the client's state machine."""
        data = self.transport.value()
        self.transport.clear()
        frames = []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(frame)
            data = data[9 + length :]
        return frames

    def send_raw(self, data: bytes) -> None:
        self.server.dataReceived(data)
        self.exchange()

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, ResponseReceived):
                self.streams[event.stream_id].headers = list(event.headers)
            elif isinstance(event, InformationalResponseReceived):
                self.streams[event.stream_id].informational.append(list(event.headers))
            elif isinstance(event, DataReceived):
                self.streams[event.stream_id].body += event.data
                if self.auto_ack and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self.streams[event.stream_id].ended = True
            elif isinstance(event, StreamReset):
                if event.stream_id in self.streams:
                    self.streams[event.stream_id].reset = event.error_code
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event
            elif isinstance(event, TrailersReceived):
                raise AssertionError("labelgw sends no trailers")

    def _send_pending(self) -> None:
        for stream_id, (data, end) in list(self._pending_body.items()):
            self._pending_body.pop(stream_id)
            self._send_body(stream_id, data, end)

    def _send_body(self, stream_id: int, data: bytes, end: bool) -> None:
        try:
            window = self.conn.local_flow_control_window(stream_id)
        except Exception:
            return  # the stream is gone (reset)
        size = min(window, len(data))
        sent = 0
        while sent < size:
            piece = min(size - sent, self.conn.max_outbound_frame_size)
            self.conn.send_data(stream_id, data[sent : sent + piece])
            sent += piece
        rest = data[sent:]
        if rest:
            self._pending_body[stream_id] = (rest, end)
        elif end:
            self.conn.end_stream(stream_id)

    def request(
        self,
        path: bytes = b"/",
        authority: bytes = SOLO,
        method: bytes = b"GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        end: bool = True,
        exchange: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", path)]
        fields += headers or []
        self.streams[stream_id] = StreamResult()
        self.conn.send_headers(stream_id, fields, end_stream=body is None and end)
        if body is not None:
            self._send_body(stream_id, body, end)
        if exchange:
            self.exchange()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._send_body(stream_id, data, end)
        self.exchange()

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL, exchange: bool = True) -> None:
        self.conn.reset_stream(stream_id, code)
        if exchange:
            self.exchange()

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.fixture
def make_harness() -> Iterator[Callable[..., ProxyHarness]]:
    made: list[ProxyHarness] = []

    def make(**settings: Any) -> ProxyHarness:
        harness = ProxyHarness(ProxySettings(**settings) if settings else None)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.assert_accounting()


@pytest.fixture
def h(make_harness: Callable[..., ProxyHarness]) -> ProxyHarness:
    return make_harness()


@pytest.fixture
def client(h: ProxyHarness) -> H2Client:
    return H2Client(h)


def answer(h: ProxyHarness, response: bytes) -> Upstream:
    upstream = h.upstream().accept()
    upstream.send(response)
    return upstream


# Requests and responses.


def test_get_is_routed_and_answered_with_status_and_headers(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request(
        b"/hello?x=1",
        headers=[(b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-forwarded-for", b"6.6.6.6")],
    )
    upstream = h.upstream().accept()
    request = upstream.request()
    assert (request.method, request.target, request.version) == (b"GET", b"/hello?x=1", b"HTTP/1.1")
    assert request.header(b"host") == SOLO
    assert request.all(b"cookie") == [b"a=1; b=2"]
    assert request.header(b"accept") == b"*/*"
    assert request.header(b"x-forwarded-proto") == b"https"
    # The client's own X-Forwarded-For is replaced, as on HTTP/1.1.
    assert request.all(b"x-forwarded-for") == [CLIENT_PEER.host.encode()]
    assert b"connection" not in request.names() and b"transfer-encoding" not in request.names()

    upstream.send(ok(b"hello", extra=b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\nX-Test: Yes\r\nConnection: keep-alive\r\n"))
    client.exchange()
    result = client.streams[stream]
    assert result.status == 200
    assert result.all(b"set-cookie") == [b"a=1; Path=/", b"b=2"]
    assert result.header(b"x-test") == b"Yes"
    assert result.header(b"content-length") == b"5"
    assert result.header(b"connection") is None
    assert (result.body, result.ended, result.reset) == (b"hello", True, None)
    h.settle()
    # The upstream connection went back to the pool and the per-stream connection is gone.
    assert upstream.pooled_in(h.backend("solo-1"))
    assert client.server.streams == {}
    assert h.gateway.connections == {client.server}


def test_many_requests_on_one_connection_reuse_one_upstream_connection(h: ProxyHarness, client: H2Client) -> None:
    first = client.request(b"/1")
    upstream = answer(h, ok(b"one"))
    client.exchange()
    h.settle()
    second = client.request(b"/2")
    assert h.new_connects() == []
    assert upstream.take().endswith(b"\r\n\r\n")
    upstream.send(ok(b"two"))
    client.exchange()
    assert [client.streams[s].body for s in (first, second)] == [b"one", b"two"]


def test_chunked_upstream_response_is_decoded_into_data_frames(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    client.exchange()
    result = client.streams[stream]
    assert (result.status, result.body, result.ended) == (200, b"hello", False)
    assert result.header(b"transfer-encoding") is None
    upstream.send(b"6\r\n world\r\n0\r\n\r\n")
    client.exchange()
    assert (result.body, result.ended) == (b"hello world", True)


def test_head_and_no_content_responses_end_with_the_headers(h: ProxyHarness, client: H2Client) -> None:
    head = client.request(method=b"HEAD")
    upstream = answer(h, b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")
    client.exchange()
    assert client.streams[head].ended and client.streams[head].header(b"content-length") == b"42"
    h.settle()
    empty = client.request(b"/empty")
    assert h.new_connects() == []
    upstream.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.exchange()
    assert client.streams[empty].status == 204 and client.streams[empty].ended


def test_interim_responses_are_sent_as_informational_headers(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    answer(h, b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + ok(b"x"))
    client.exchange()
    result = client.streams[stream]
    assert result.informational == [[(b":status", b"103"), (b"link", b"</style.css>; rel=preload")]]
    assert (result.status, result.body) == (200, b"x")


def test_post_body_without_length_is_streamed_chunked_upstream(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request(b"/upload", method=b"POST", body=b"part one,", end=False)
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.method == b"POST" and request.header(b"transfer-encoding") == b"chunked"
    assert request.header(b"content-length") is None
    assert decode_chunked(request.rest) == (b"part one,", b"", False)
    client.send(stream, b" part two", end=True)
    assert decode_chunked(upstream.request().rest) == (b"part one, part two", b"", True)
    upstream.send(ok(b"stored", status=b"201 Created"))
    client.exchange()
    assert (client.streams[stream].status, client.streams[stream].body) == (201, b"stored")


def test_post_body_with_content_length_is_relayed_as_is(h: ProxyHarness, client: H2Client) -> None:
    body = b"x" * 1000
    stream = client.request(b"/upload", method=b"POST", headers=[(b"content-length", b"1000")], body=body)
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.header(b"content-length") == b"1000" and request.header(b"transfer-encoding") is None
    assert request.rest == body
    upstream.send(ok(b"ok"))
    client.exchange()
    assert client.streams[stream].body == b"ok"


def test_post_without_body_gets_content_length_zero(h: ProxyHarness, client: H2Client) -> None:
    client.request(b"/ping", method=b"POST")
    upstream = h.upstream().accept()
    assert upstream.request().header(b"content-length") == b"0"
    upstream.send(ok())
    client.exchange()


def test_gateway_errors_reach_the_client(h: ProxyHarness, client: H2Client) -> None:
    unknown = client.request(authority=b"nowhere.localhost")
    down = client.request(authority=b"down.localhost")
    assert client.streams[unknown].status == 404
    assert b"no route for host 'nowhere.localhost'" in client.streams[unknown].body
    assert client.streams[down].status == 503 and client.streams[down].header(b"retry-after") == b"1"
    assert client.streams[down].ended
    assert h.connect_count() == 0


def test_upstream_refusing_is_a_502(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    h.upstream().refuse()
    client.exchange()
    assert client.streams[stream].status == 502


def test_too_many_header_fields_are_a_431(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request(headers=[(b"x-h%d" % i, b"v") for i in range(120)])
    assert client.streams[stream].status == 431
    assert h.connect_count() == 0


def test_connect_is_refused(h: ProxyHarness, client: H2Client) -> None:
    stream_id = client.conn.get_next_available_stream_id()
    client.streams[stream_id] = StreamResult()
    client.conn.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"solo.localhost:443")])
    client.exchange()
    assert client.streams[stream_id].status == 405
    assert h.connect_count() == 0


def test_upstream_failing_mid_response_resets_the_stream(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    client.exchange()
    upstream.close()
    h.settle()
    client.exchange()
    result = client.streams[stream]
    assert result.body == b"0123456789" and result.reset == ErrorCodes.INTERNAL_ERROR and not result.ended


# Streams are independent.


def test_a_slow_stream_does_not_block_a_fast_one(h: ProxyHarness, client: H2Client) -> None:
    slow = client.request(b"/slow")
    slow_upstream = h.upstream().accept()
    fast = client.request(b"/fast", authority=b"api.localhost")
    fast_upstream = h.upstream().accept()
    fast_upstream.send(ok(b"fast"))
    client.exchange()
    assert client.streams[fast].ended and client.streams[fast].body == b"fast"
    assert client.streams[slow].headers is None
    slow_upstream.send(ok(b"slow"))
    client.exchange()
    assert client.streams[slow].body == b"slow"


def test_concurrent_uploads_interleave(h: ProxyHarness, client: H2Client) -> None:
    first = client.request(b"/a", method=b"POST", body=b"A1", end=False)
    first_upstream = h.upstream().accept()
    second = client.request(b"/b", method=b"POST", body=b"B1", end=False)
    second_upstream = h.upstream().accept()
    client.send(second, b"B2", end=True)
    client.send(first, b"A2", end=True)
    assert decode_chunked(first_upstream.request().rest)[0::2] == (b"A1A2", True)
    assert decode_chunked(second_upstream.request().rest)[0::2] == (b"B1B2", True)
    second_upstream.send(ok(b"b"))
    first_upstream.send(ok(b"a"))
    client.exchange()
    assert (client.streams[first].body, client.streams[second].body) == (b"a", b"b")


# Flow control and back-pressure.


def test_large_response_respects_flow_control_and_pauses_the_upstream(h: ProxyHarness) -> None:
    client = H2Client(h, auto_ack=False)
    stream = client.request(b"/big")
    upstream = h.upstream().accept()
    size = 300_000
    body = bytes(i % 251 for i in range(size))
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    for _ in range(3):
        upstream.send(body[sent : sent + 50_000])
        sent += 50_000
    client.exchange()
    result = client.streams[stream]
    # The client's stream window (65535) is all it got; the rest waits and the upstream is paused.
    assert len(result.body) == 65535
    assert upstream.paused
    for _ in range(100):
        if result.ended:
            break
        received = len(result.body)
        client.conn.acknowledge_received_data(received - getattr(client, "_acked", 0), stream)
        client._acked = received  # type: ignore[attr-defined]
        client.exchange()
        if not upstream.paused and sent < size:
            upstream.send(body[sent : sent + 50_000])
            sent += 50_000
            client.exchange()
    assert result.ended and result.body == body
    assert not upstream.paused


def test_full_client_tcp_buffer_pauses_upstreams_and_reading(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    client.exchange()
    client.transport.fill_buffer()
    assert upstream.paused
    assert client.transport.producerState == "paused"
    client.transport.drain_buffer()
    assert not upstream.paused and client.transport.producerState == "producing"
    upstream.send(b"56789")
    client.exchange()
    assert client.streams[stream].body == b"0123456789"


def test_request_body_is_not_acknowledged_while_the_upstream_is_full(h: ProxyHarness, client: H2Client) -> None:
    size = 200_000
    body = b"u" * size
    stream = client.request(b"/upload", method=b"POST", headers=[(b"content-length", b"%d" % size)], end=False)
    upstream = h.upstream().accept()
    upstream.transport.fill_buffer()
    client.send(stream, body, end=True)
    # One stream window reached labelgw, none of it acknowledged: the client must wait.
    assert client.conn.local_flow_control_window(stream) == 0
    assert len(upstream.request().rest) <= 65535
    upstream.transport.drain_buffer()
    client.exchange()
    assert upstream.request().rest == body
    upstream.send(ok())
    client.exchange()
    assert client.streams[stream].status == 200


# Client resets and attacks.


def test_client_reset_aborts_the_upstream_request(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    upstream = h.upstream().accept()
    client.reset(stream)
    assert upstream.aborted
    h.settle()
    assert client.server.streams == {}
    assert not client.closing


def test_stream_opened_and_reset_in_one_read_never_reaches_a_backend(h: ProxyHarness, client: H2Client) -> None:
    for _ in range(10):
        stream = client.request(exchange=False)
        client.reset(stream, exchange=False)
    client.exchange()
    assert h.connect_count() == 0
    assert not client.closing


def test_rapid_reset_gets_goaway_enhance_your_calm(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(reset_budget=20, reset_window=10.0))
    for _ in range(20):
        stream = client.request()
        client.reset(stream)
    assert client.terminated is None
    stream = client.request()
    client.reset(stream)
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closing
    h.settle()
    for upstream in h.new_connects():
        upstream.refuse()


def test_resets_spread_over_time_are_allowed(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(reset_budget=5, reset_window=10.0))
    for _ in range(30):
        stream = client.request()
        client.reset(stream)
        h.advance(3)
        for upstream in h.new_connects():
            upstream.refuse()
    assert client.terminated is None


def test_oversized_header_block_gets_goaway(h: ProxyHarness, client: H2Client) -> None:
    client.request(headers=[(b"x-big", b"v" * 70_000)])
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closing and h.connect_count() == 0


def test_continuation_flood_is_cut_before_the_block_ends(h: ProxyHarness, client: H2Client) -> None:
    block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")])
    headers = HeadersFrame(1, data=block)  # no END_HEADERS: CONTINUATION frames must follow
    flood = b"".join(ContinuationFrame(1, data=b"\x40\x01a\x01b" * 1000).serialize() for _ in range(20))
    client.send_raw(headers.serialize() + flood)
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closing and h.connect_count() == 0


def test_hpack_bomb_gets_goaway(h: ProxyHarness, client: H2Client) -> None:
    # One 4000-byte field in the dynamic table, then referenced by index: about 4 KB on the wire, 80 KB decoded.
    encoder = Encoder()
    block = encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")]
        + [(b"x-bomb", b"b" * 4000)] * 20
    )
    assert len(block) < 5000
    client.send_raw(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closing and h.connect_count() == 0


@pytest.mark.parametrize(
    ("path", "authority"), [(b"http://api.localhost/", SOLO), (b"*", SOLO), (b"/", b"user@solo.localhost")]
)
def test_malformed_targets_are_a_400(h: ProxyHarness, client: H2Client, path: bytes, authority: bytes) -> None:
    stream = client.request(path, authority=authority)
    assert client.streams[stream].status == 400
    assert h.connect_count() == 0


def test_expect_100_continue_is_relayed(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request(
        b"/upload", method=b"PUT", headers=[(b"content-length", b"4"), (b"expect", b"100-continue")], end=False
    )
    upstream = h.upstream().accept()
    assert upstream.request().header(b"expect") == b"100-continue"
    upstream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.exchange()
    assert client.streams[stream].informational == [[(b":status", b"100")]]
    client.send(stream, b"data", end=True)
    assert upstream.request().rest == b"data"
    upstream.send(ok(b"done"))
    client.exchange()
    assert client.streams[stream].body == b"done"


def test_line_break_in_a_header_value_is_refused_before_any_backend(h: ProxyHarness) -> None:
    client = H2Client(h, validate=False)
    client.request(headers=[(b"x-evil", b"a\r\nx-forwarded-for: 1.2.3.4")])
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.connect_count() == 0


@pytest.mark.parametrize(
    "value", [b"a\r\nx-injected: 1", b"a\nb", b"a\rb"],
)
def test_request_head_refuses_line_breaks_itself(value: bytes) -> None:
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/"), (b"x", value)]
    assert isinstance(request_head(fields, False), tuple)


def test_request_head_shape() -> None:
    fields = [
        (b":method", b"POST"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/p"),
        (b"host", SOLO), (b"te", b"trailers"), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*"),
    ]
    head = request_head(fields, True)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.host, head.chunked, head.content_length) == (b"POST", b"/p", SOLO, True, None)
    assert head.headers == [(b"host", SOLO), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*")]
    # Upstream, as an HTTP/1.1 request: the body chunked, te and the pseudo-headers gone.
    assert upstream_request_head(head, b"/p", b"10.0.0.9", b"https", b"443") == (
        b"POST /p HTTP/1.1\r\nhost: solo.localhost\r\ncookie: a=1; b=2\r\naccept: */*\r\n"
        b"Transfer-Encoding: chunked\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: solo.localhost\r\nX-Forwarded-Port: 443\r\nX-Real-IP: 10.0.0.9\r\n\r\n"
    )


def test_streams_beyond_the_concurrency_limit_end_the_connection(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(max_concurrent_streams=3))
    for _ in range(3):
        client.request()
    assert len(h.new_connects()) == 3
    # h2 would refuse a fourth itself (the client honours SETTINGS_MAX_CONCURRENT_STREAMS); a raw one ends it.
    block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")])
    client.send_raw(HeadersFrame(101, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.connect_count() == 3
    h.settle()


# Closing.


def test_drain_sends_goaway_and_closes_once_streams_finish(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    upstream = h.upstream().accept()
    done = h.gateway.drain(5.0)
    # h2's client stops reading at a GOAWAY (real clients finish the streams it names): read the frames raw.
    goaway = [frame for frame in client.raw_frames() if isinstance(frame, GoAwayFrame)]
    assert [(frame.error_code, frame.last_stream_id) for frame in goaway] == [(0, stream)]
    assert not client.closing
    # A stream the client opened before it saw the GOAWAY is refused: safe to retry elsewhere.
    late = stream + 2
    block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")])
    client.server.dataReceived(HeadersFrame(late, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    frames = client.raw_frames()
    assert [(frame.stream_id, frame.error_code) for frame in frames if isinstance(frame, RstStreamFrame)] == [
        (late, ErrorCodes.REFUSED_STREAM)
    ]
    assert h.connect_count() == 1
    # The stream in flight is still answered, then the connection closes.
    upstream.send(ok(b"last"))
    frames = client.raw_frames()
    headers = [frame for frame in frames if isinstance(frame, HeadersFrame)]
    data = [frame for frame in frames if isinstance(frame, DataFrame)]
    assert dict(client.conn.decoder.decode(headers[0].data, raw=True))[b":status"] == b"200"
    assert b"".join(frame.data for frame in data) == b"last" and "END_STREAM" in data[-1].flags
    h.settle()
    assert client.closing and client.transport.lost
    assert done.called


def test_drain_grace_aborts_what_is_left(h: ProxyHarness, client: H2Client) -> None:
    client.request()
    upstream = h.upstream().accept()
    done = h.gateway.drain(5.0)
    h.advance(5.0)
    h.settle()
    assert upstream.aborted and client.transport.lost
    assert done.called


def test_idle_connection_is_closed_with_goaway(h: ProxyHarness, client: H2Client) -> None:
    client.request()
    answer(h, ok())
    client.exchange()
    h.settle()
    h.advance(h.settings.idle_timeout - 1)
    assert not client.closing
    h.advance(2)
    client.exchange()
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.NO_ERROR
    assert client.closing


def test_connection_without_requests_is_closed_after_the_head_timeout(h: ProxyHarness) -> None:
    client = H2Client(h)
    h.advance(h.settings.head_timeout + 0.1)
    assert client.closing


def test_connection_loss_aborts_every_upstream(h: ProxyHarness, client: H2Client) -> None:
    client.request(b"/a")
    client.request(b"/b")
    upstreams = [upstream.accept() for upstream in h.new_connects()]
    client.transport.connection_lost()
    assert all(upstream.aborted for upstream in upstreams)
    assert h.gateway.connections == set()


# ALPN.


class _TLSLikeTransport(FakeTransport):
    negotiatedProtocol: bytes | None = None


def _negotiated(h: ProxyHarness, protocol: bytes | None) -> tuple[Any, _TLSLikeTransport]:
    factory = negotiating_factory(h.gateway, b"https")
    switch = factory.buildProtocol(CLIENT_PEER)
    transport = _TLSLikeTransport(h.reactor, LISTENER, CLIENT_PEER)
    transport.protocol = switch
    switch.makeConnection(transport)
    transport.negotiatedProtocol = protocol
    return switch, transport


def test_negotiating_factory_offers_h2_and_http11(h: ProxyHarness) -> None:
    factory = negotiating_factory(h.gateway)
    assert isinstance(factory, NegotiatingFactory)
    assert factory.acceptableProtocols() == [b"h2", b"http/1.1"]


def test_alpn_h2_gets_http2(h: ProxyHarness) -> None:
    switch, transport = _negotiated(h, b"h2")
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")], end_stream=True)
    switch.dataReceived(conn.data_to_send())
    answer(h, ok(b"via h2"))
    events = conn.receive_data(transport.value())
    assert [e.data for e in events if isinstance(e, DataReceived)] == [b"via h2"]
    h.settle()
    assert [type(c).__name__ for c in h.gateway.connections] == ["H2Protocol"]
    transport.connection_lost()
    assert h.gateway.connections == set()


@pytest.mark.parametrize("negotiated", [b"http/1.1", None])
def test_alpn_http11_or_none_gets_http11(h: ProxyHarness, negotiated: bytes | None) -> None:
    switch, transport = _negotiated(h, negotiated)
    switch.dataReceived(b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n\r\n")
    answer(h, ok(b"via h1"))
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and transport.value().endswith(b"via h1")
    assert [type(c) for c in h.gateway.connections] == [ClientConnection]
    transport.connection_lost()
    assert h.gateway.connections == set()


def test_alpn_switch_keeps_the_http11_head_timeout(h: ProxyHarness) -> None:
    _, transport = _negotiated(h, None)
    h.advance(h.settings.head_timeout + 0.1)
    assert transport.disconnecting


def test_alpn_switch_leaves_a_closing_connection_to_http11(h: ProxyHarness) -> None:
    switch, transport = _negotiated(h, b"h2")
    h.advance(h.settings.head_timeout + 0.1)
    assert transport.disconnecting
    switch.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert transport.value() == b""
    transport.connection_lost()
    assert h.gateway.connections == set()


def test_per_stream_peer_is_the_real_client(h: ProxyHarness, client: H2Client) -> None:
    client.request()
    upstream = h.upstream().accept()
    assert upstream.request().header(b"x-real-ip") == b"10.0.0.9"
    assert upstream.request().header(b"x-forwarded-port") == b"%d" % LISTENER.port
    upstream.send(ok())
    client.exchange()


def _self_signed(name: str) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


@implementer(IOpenSSLServerConnectionCreator)
class _OneContext:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.to_send = b""

    def connectionMade(self) -> None:
        self.transport.write(self.to_send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest.mark.parametrize(("offered", "expected"), [([b"h2", b"http/1.1"], b"h2"), ([b"http/1.1"], b"http/1.1")])
def test_real_tls_handshake_negotiates_h2_with_the_labelgw_policy(
    h: ProxyHarness, offered: list[bytes], expected: bytes
) -> None:
    """A TLS handshake in memory: labelgw's server context (whose own default ALPN is http/1.1) offers h2
    because the listener's factory says it speaks it; the switch then picks the protocol ALPN chose."""
    certificate, key = _self_signed("solo.localhost")
    server_factory = TLSMemoryBIOFactory(
        _OneContext(build_server_context(INTERMEDIATE, certificate, key)), False, negotiating_factory(h.gateway),
        clock=h.reactor,
    )
    trust = ssl.Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))
    recorder = _Recorder()
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    if expected == b"h2":
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")], end_stream=True)
        recorder.to_send = conn.data_to_send()
    else:
        recorder.to_send = b"GET / HTTP/1.1\r\nHost: solo.localhost\r\n\r\n"
    client_factory = TLSMemoryBIOFactory(
        ssl.optionsForClientTLS("solo.localhost", trustRoot=trust, acceptableProtocols=offered), True,
        Factory.forProtocol(lambda: recorder), clock=h.reactor,
    )
    client_tls, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(LISTENER), lambda: client_factory.buildProtocol(CLIENT_PEER)
    )
    for _ in range(5):
        h.reactor.advance(0)
        pump.flush()
    assert client_tls.negotiatedProtocol == expected
    answer(h, ok(b"over tls"))
    for _ in range(5):
        h.reactor.advance(0)
        pump.flush()
    if expected == b"h2":
        events = conn.receive_data(recorder.received)
        assert [e.data for e in events if isinstance(e, DataReceived)] == [b"over tls"]
    else:
        assert recorder.received.startswith(b"HTTP/1.1 200 OK") and recorder.received.endswith(b"over tls")
    client_tls.transport.loseConnection()
    for _ in range(5):
        h.reactor.advance(0)
        pump.flush()


# Clients that stop reading (issue 14, item 6).


def test_stream_whose_window_stays_closed_is_reset_after_the_send_timeout(h: ProxyHarness) -> None:
    client = H2Client(h, auto_ack=False)
    stream = client.request(b"/big")
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000)
    client.exchange()
    assert len(client.streams[stream].body) == 65535
    h.advance(h.settings.send_timeout - 1)
    client.exchange()
    assert client.streams[stream].reset is None and not upstream.aborted
    h.advance(2)
    client.exchange()
    assert client.streams[stream].reset == ErrorCodes.CANCEL
    assert upstream.aborted
    h.settle()
    assert client.server.streams == {} and not client.closing


def test_stream_send_timeout_counts_from_the_last_progress(h: ProxyHarness) -> None:
    client = H2Client(h, auto_ack=False)
    stream = client.request(b"/big")
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
    client.exchange()
    h.advance(h.settings.send_timeout * 0.75)
    client.conn.acknowledge_received_data(20_000, stream)
    client.exchange()
    h.advance(h.settings.send_timeout * 0.75)
    client.exchange()
    assert client.streams[stream].reset is None
    client.conn.acknowledge_received_data(80_000, stream)
    client.exchange()
    assert client.streams[stream].ended and len(client.streams[stream].body) == 100_000


def test_connection_whose_client_reads_nothing_is_aborted_after_the_send_timeout(h: ProxyHarness, client: H2Client) -> None:
    client.request()
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    client.exchange()
    client.transport.fill_buffer()
    h.advance(h.settings.send_timeout - 1)
    assert not client.transport.aborted
    h.advance(2)
    assert client.transport.aborted
    h.settle()
    assert upstream.aborted
    assert h.gateway.connections == set()


def test_response_bytes_of_one_connection_are_bounded_together(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(connection_buffer=100_000), auto_ack=False)
    streams = [client.request(b"/%d" % i) for i in range(3)]
    upstreams = [upstream.accept() for upstream in h.new_connects()]
    assert len(upstreams) == len(streams)
    for upstream in upstreams[:2]:
        upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 60_000)
    client.exchange()
    # The client's connection window (65535) took the first bytes; what waits is under each stream's own buffer
    # and under the connection's bound: nothing is paused yet.
    assert not any(upstream.paused for upstream in upstreams)
    upstreams[2].send(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 60_000)
    client.exchange()
    # Together past the connection's bound: every upstream is paused.
    assert all(upstream.paused for upstream in upstreams)
    assert client.server.queued <= 3 * 60_000
    for upstream in upstreams:
        upstream.close()
    h.settle()


# MadeYouReset (CVE-2025-8671) and log lines (issue 14, items 7 and 10).


def _data_after_end_stream(client: H2Client, stream: int) -> None:
    client.send_raw(DataFrame(stream, data=b"late", flags=["END_STREAM"]).serialize())


def test_resets_labelgw_sends_for_client_protocol_errors_count_against_the_budget(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(reset_budget=5, reset_window=10.0))
    upstreams = []
    for _ in range(5):
        stream = client.request()
        upstream = h.upstream().accept()
        upstreams.append(upstream)
        _data_after_end_stream(client, stream)
        # labelgw reset the stream (h2 did, for the DATA after END_STREAM) and cancelled its upstream request.
        assert client.streams[stream].reset == ErrorCodes.STREAM_CLOSED
        assert upstream.aborted
    assert client.terminated is None
    stream = client.request()
    h.upstream().accept()
    _data_after_end_stream(client, stream)
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.closing
    h.settle()


def test_window_update_overflow_on_a_stream_is_counted_and_cancels_the_upstream(h: ProxyHarness) -> None:
    client = H2Client(h, H2Settings(reset_budget=1, reset_window=10.0))
    for attempt in range(2):
        stream = client.request()
        upstream = h.upstream().accept()
        client.send_raw(WindowUpdateFrame(stream, window_increment=2**31 - 1).serialize())
        assert upstream.aborted
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    h.settle()


def test_client_controlled_text_in_log_lines_is_escaped(h: ProxyHarness) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = H2Client(h, validate=False)
        client.request(headers=[(b"x-evil", b"a\r\n\x1b[31mforged")])
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(event) for event in events if "HTTP/2" in (event.get("log_format") or "")]
    assert lines
    for line in lines:
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), line


def test_stalled_request_body_gets_a_408_and_the_upstream_is_cancelled(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request(b"/upload", method=b"POST", headers=[(b"content-length", b"10")], body=b"abc", end=False)
    upstream = h.upstream().accept()
    h.advance(h.settings.body_timeout - 1)
    client.exchange()
    assert client.streams[stream].headers is None and not upstream.aborted
    h.advance(2)
    client.exchange()
    assert client.streams[stream].status == 408
    assert upstream.aborted
    h.settle()
    assert client.server.streams == {} and not client.closing


@pytest.mark.parametrize(
    ("field", "status"),
    [
        ((b"bad name", b"x"), 400),
        ((b"x-ctl", b"a\x01b"), 400),
        ((b"content-length", b"+5"), 400),
        ((b"content-length", b"0x10"), 400),
    ],
)
def test_request_head_applies_the_http11_field_rules(field: tuple[bytes, bytes], status: int) -> None:
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/"), field]
    assert request_head(fields, True) == (status, request_head(fields, True)[1])  # type: ignore[index]


def test_request_head_refuses_two_content_lengths_and_bad_paths() -> None:
    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO)]
    assert request_head(base + [(b":path", b"/"), (b"content-length", b"1"), (b"content-length", b"1")], True)[0] == 400  # type: ignore[index]
    assert request_head(base + [(b":path", b"/a b")], False)[0] == 400  # type: ignore[index]
    assert request_head(base + [(b":path", b"/a\x7fb")], False)[0] == 400  # type: ignore[index]


def test_response_headers_and_body_leave_in_one_write(h: ProxyHarness, client: H2Client) -> None:
    client.request()
    upstream = h.upstream().accept()
    writes: list[bytes] = []
    write = client.transport.write
    client.transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
    upstream.send(ok(b"hello"))
    frames = [Frame.parse_frame_header(memoryview(data[:9]))[0] for data in writes]
    assert len(writes) == 1 and isinstance(frames[0], HeadersFrame)
    client.exchange()


def test_streams_answered_in_one_reactor_turn_leave_in_one_write(h: ProxyHarness, client: H2Client) -> None:
    streams = [client.request(exchange=False), client.request(exchange=False), client.request()]
    upstreams = [upstream.accept() for upstream in h.new_connects()]
    assert len(upstreams) == 3
    writes: list[bytes] = []
    write = client.transport.write
    client.transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
    for upstream, body in zip(upstreams, (b"a", b"b", b"c")):
        upstream.send(ok(body))
    # Others were in flight when the first answered: the write waits for the end of the reactor turn.
    assert writes == []
    h.reactor.advance(0)
    assert len(writes) == 1
    client.exchange()
    assert [client.streams[s].body for s in streams] == [b"a", b"b", b"c"]
    # A stream alone on its connection is written at once.
    writes.clear()
    for upstream in upstreams:
        upstream.transport.clear()
    alone = client.request()
    pooled = next(upstream for upstream in upstreams if upstream.transport.value())
    pooled.send(ok(b"d"))
    assert len(writes) == 1
    client.exchange()
    assert client.streams[alone].body == b"d"
