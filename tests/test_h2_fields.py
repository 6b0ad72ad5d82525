"""labelgw checks HTTP/2 request fields itself (labelgw/http/h2fields.py), with h2's validate_inbound_headers and
normalize_inbound_headers off for speed: every block h2 refused is still refused, the same way (GOAWAY with
PROTOCOL_ERROR, no backend reached), and cookie crumbs are still joined. Hardening checklist item 23 (HTTP/2)."""

from __future__ import annotations

from typing import Any

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers
from hyperframe.frame import HeadersFrame

from labelgw.http.h2 import H2Protocol, request_head
from labelgw.http.h2fields import malformed_request, malformed_trailers
from labelgw.http.parser import RequestHead
from proxyharness import ProxyHarness, ok
from test_h2 import SOLO, H2Client

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")]

# Header blocks RFC 9113 calls malformed (sections 8.2, 8.3), one rule each.
MALFORMED: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("upper-case name", GET + [(b"X-Up", b"1")]),
    ("space in name", GET + [(b"x up", b"1")]),
    ("control in name", GET + [(b"x\x01", b"1")]),
    ("DEL in name", GET + [(b"x\x7f", b"1")]),
    ("non-ASCII name", GET + [(b"x\xc3\xa9", b"1")]),
    ("colon in name", GET + [(b"x:y", b"1")]),
    ("empty name", GET + [(b"", b"1")]),
    ("NUL in value", GET + [(b"x", b"a\x00b")]),
    ("CR in value", GET + [(b"x", b"a\rb")]),
    ("LF in value", GET + [(b"x", b"a\nb")]),
    ("CRLF injection", GET + [(b"x-evil", b"a\r\nx-forwarded-for: 1.2.3.4")]),
    ("leading space in value", GET + [(b"x", b" a")]),
    ("trailing space in value", GET + [(b"x", b"a ")]),
    ("leading tab in value", GET + [(b"x", b"\ta")]),
    ("trailing tab in value", GET + [(b"x", b"a\t")]),
    ("line break in :path", GET[:3] + [(b":path", b"/a\r\nb")]),
    ("te other than trailers", GET + [(b"te", b"gzip")]),
    ("connection", GET + [(b"connection", b"close")]),
    ("keep-alive", GET + [(b"keep-alive", b"5")]),
    ("proxy-connection", GET + [(b"proxy-connection", b"x")]),
    ("transfer-encoding", GET + [(b"transfer-encoding", b"chunked")]),
    ("upgrade", GET + [(b"upgrade", b"websocket")]),
    ("duplicate :path", GET + [(b":path", b"/x")]),
    ("pseudo after regular", GET[:3] + [(b"accept", b"*/*"), (b":path", b"/")]),
    ("unknown pseudo", GET + [(b":foo", b"bar")]),
    (":status in a request", GET + [(b":status", b"200")]),
    ("no :method", GET[1:]),
    ("no :scheme", [GET[0]] + GET[2:]),
    ("no :path", GET[:3]),
    ("empty :path", GET[:3] + [(b":path", b"")]),
    (":protocol without CONNECT", GET + [(b":protocol", b"websocket")]),
    ("CONNECT with :path", [(b":method", b"CONNECT"), (b":authority", SOLO), (b":path", b"/")]),
    ("CONNECT with :scheme", [(b":method", b"CONNECT"), (b":authority", SOLO), (b":scheme", b"https")]),
    ("extended CONNECT without :path", [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":authority", SOLO)]),
    ("neither :authority nor host", [GET[0], GET[1], GET[3]]),
    (":authority and host differ", GET + [(b"host", b"other.localhost")]),
    ("two host fields", [GET[0], GET[1], GET[3], (b"host", SOLO), (b"host", SOLO)]),
]

# Blocks h2 accepted: labelgw must go on accepting them (whatever request_head then decides).
WELL_FORMED: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("plain GET", GET),
    ("host instead of :authority", [GET[0], GET[1], GET[3], (b"host", SOLO)]),
    ("host equal to :authority", GET + [(b"host", SOLO)]),
    ("te: trailers", GET + [(b"te", b"trailers")]),
    ("te: Trailers", GET + [(b"te", b"Trailers")]),
    ("empty value", GET + [(b"x", b"")]),
    ("inner space and tab", GET + [(b"x", b"a \tb")]),
    ("non-ASCII value", GET + [(b"x", b"\xc3\xa9")]),
    ("token characters in name", GET + [(b"x-!#$%&'*+.^_`|~09", b"1")]),
    ("quote in name (h2 allows; labelgw's request_head refuses with 400)", GET + [(b'x"y', b"1")]),
    ("ordinary CONNECT", [(b":method", b"CONNECT"), (b":authority", SOLO)]),
    ("extended CONNECT", [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", SOLO)]),
    ("cookie crumbs", GET + [(b"cookie", b"a=1"), (b"cookie", b"b=2")]),
]

REQUEST = HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False)
TRAILER = HeaderValidationFlags(is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False)


def h2_refuses(headers: list[tuple[bytes, bytes]], flags: HeaderValidationFlags) -> bool:
    try:
        list(validate_headers(headers, flags))
    except ProtocolError:
        return True
    return False


@pytest.mark.parametrize(("case", "headers"), MALFORMED, ids=[case for case, _ in MALFORMED])
def test_labelgw_refuses_what_h2_refused(case: str, headers: list[tuple[bytes, bytes]]) -> None:
    assert h2_refuses(headers, REQUEST), f"h2 accepts {case}: not a parity case"
    assert malformed_request(headers) is not None


@pytest.mark.parametrize(("case", "headers"), WELL_FORMED, ids=[case for case, _ in WELL_FORMED])
def test_labelgw_accepts_what_h2_accepted(case: str, headers: list[tuple[bytes, bytes]]) -> None:
    assert not h2_refuses(headers, REQUEST)
    assert malformed_request(headers) is None


TRAILERS_MALFORMED = [
    [(b":path", b"/")],
    [(b"X-Up", b"1")],
    [(b"x", b"a\r\nb")],
    [(b"x", b" a")],
    [(b"connection", b"close")],
    [(b"te", b"gzip")],
    [(b"", b"1")],
]


@pytest.mark.parametrize("trailers", TRAILERS_MALFORMED)
def test_malformed_trailers_are_refused_as_h2_refused_them(trailers: list[tuple[bytes, bytes]]) -> None:
    assert h2_refuses(trailers, TRAILER)
    assert malformed_trailers(trailers) is not None


def test_well_formed_trailers_pass() -> None:
    trailers = [(b"x-checksum", b"abc"), (b"grpc-status", b"0")]
    assert not h2_refuses(trailers, TRAILER)
    assert malformed_trailers(trailers) is None


def test_h2_no_longer_validates_request_fields(h: ProxyHarness) -> None:
    """The configuration this file is about: h2 leaves request fields to labelgw (outbound: labelgw builds them)."""
    client = H2Client(h)
    config = client.server.conn.config
    assert not config.validate_inbound_headers and not config.normalize_inbound_headers
    assert isinstance(client.server, H2Protocol)


def _send_block(client: H2Client, headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> None:
    block = client.conn.encoder.encode(headers)
    flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
    client.send_raw(HeadersFrame(1, data=block, flags=flags).serialize())


@pytest.mark.parametrize(("case", "headers"), MALFORMED, ids=[case for case, _ in MALFORMED])
def test_malformed_request_ends_the_connection_before_any_backend(
    h: ProxyHarness, case: str, headers: list[tuple[bytes, bytes]]
) -> None:
    client = H2Client(h, validate=False)
    _send_block(client, headers)
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR, case
    assert client.closing and h.connect_count() == 0
    h.settle()


def test_malformed_request_after_a_good_one_in_the_same_read_starts_neither(h: ProxyHarness) -> None:
    client = H2Client(h, validate=False)
    encoder = client.conn.encoder
    good = HeadersFrame(1, data=encoder.encode(GET), flags=["END_HEADERS", "END_STREAM"]).serialize()
    bad = HeadersFrame(3, data=encoder.encode(GET + [(b"x", b"a\nb")]), flags=["END_HEADERS", "END_STREAM"]).serialize()
    client.server.dataReceived(good + bad)
    assert client.server.closed and h.connect_count() == 0
    h.settle()


def test_malformed_trailers_end_the_connection(h: ProxyHarness) -> None:
    client = H2Client(h, validate=False)
    stream = client.request(b"/upload", method=b"POST", body=b"abc", end=False)
    upstream = h.upstream().accept()
    client.conn.send_headers(stream, [(b":path", b"/")], end_stream=True)
    client.exchange()
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert upstream.aborted
    h.settle()


def test_well_formed_trailers_end_the_request_body(h: ProxyHarness) -> None:
    client = H2Client(h)
    stream = client.request(b"/upload", method=b"POST", headers=[(b"content-length", b"3")], body=b"abc", end=False)
    upstream = h.upstream().accept()
    client.conn.send_headers(stream, [(b"x-checksum", b"abc")], end_stream=True)
    client.exchange()
    assert upstream.request().rest == b"abc" and client.terminated is None
    upstream.send(ok(b"done"))
    client.exchange()
    assert client.streams[stream].body == b"done"


def test_cookie_crumbs_reach_the_upstream_as_one_field(h: ProxyHarness) -> None:
    client = H2Client(h)
    stream = client.request(headers=[(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2"), (b"cookie", b"c=3")])
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.all(b"cookie") == [b"a=1; b=2; c=3"]
    upstream.send(ok())
    client.exchange()
    assert client.streams[stream].status == 200


def test_request_head_joins_cookie_crumbs_in_place() -> None:
    head = request_head(GET + [(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")], False)
    assert isinstance(head, RequestHead)
    assert head.headers == [(b"host", SOLO), (b"cookie", b"a=1; b=2"), (b"accept", b"*/*")]


@pytest.fixture
def h() -> Any:
    harness = ProxyHarness()
    yield harness
    harness.assert_accounting()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [(b"accept", b"*/*"), (b"user-agent", b"h2load")],
        [(b"x-forwarded-for", b"1.2.3.4")],
        [(b"x_real.ip", b"1.2.3.4"), (b"accept", b"*/*")],
        [(b"proxy-authorization", b"Basic eA==")],
        [(b"trailer", b"x-checksum")],
        [(b"http2-settings", b"AAMAAABkAAQAAP__")],
        [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-forwarded-proto", b"http")],
        [(b"x-forwarded-foo", b"kept")],
    ],
)
def test_request_block_forwarded_whole_is_what_field_by_field_filtering_gives(extra: list[tuple[bytes, bytes]]) -> None:
    from labelgw.http.headers import upstream_request_head

    head = request_head(GET + extra, False)
    assert isinstance(head, RequestHead)
    fast = upstream_request_head(head, b"/", b"10.0.0.9", b"https", b"443")
    head.forward = None
    assert fast == upstream_request_head(head, b"/", b"10.0.0.9", b"https", b"443")


def test_request_without_authority_is_filtered_field_by_field() -> None:
    head = request_head([GET[0], GET[1], GET[3], (b"host", b"")], False)
    assert isinstance(head, RequestHead) and head.forward is None


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A:  spaced \t\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nEmpty:\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: x-private, close\r\nX-Private: 1\r\nX-Public: 2\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-Value: a:b:c\r\nServer: backend\r\n\r\n",
    ],
)
def test_response_fields_from_the_cut_block_are_those_of_field_by_field_filtering(response: bytes) -> None:
    from labelgw.http.h2 import H2Stream
    from labelgw.http.parser import parse_response_head

    head = parse_response_head(response[:-4])
    fast: list[tuple[bytes, bytes]] = []
    H2Stream._add_fields(None, fast, head)  # type: ignore[arg-type]
    head.forward = None
    slow: list[tuple[bytes, bytes]] = []
    H2Stream._add_fields(None, slow, head)  # type: ignore[arg-type]
    assert fast == slow
