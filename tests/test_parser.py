"""Strict HTTP/1.1 head parsing and chunked decoding (labelgw.http.parser). Pure: no reactor, no sockets.

The refusal cases cover the request smuggling and header injection vectors: the header count, Content-Length with
Transfer-Encoding, odd Content-Length values, transfer codings, bare LF and CR line ends, field syntax. The head
*size* limit (431) is the server's job (it is enforced before the head is complete); the header *count* limit is the
parser's.
"""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from labelgw.http import parser as parser_module
from labelgw.http.parser import (
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    MAX_HEADERS,
    ChunkedDecoder,
    HttpError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    parse_request_head,
    parse_response_head,
)

HOST = b"Host: api.localhost"


class _NeverMatches:
    def fullmatch(self, data: bytes) -> None:
        return None


@pytest.fixture(params=["fast-path", "line-by-line"])
def both_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test twice: as is, and with the one-pattern fast path switched off, so the line-by-line path decides."""
    if request.param == "line-by-line":
        monkeypatch.setattr(parser_module, "_WELL_FORMED_REQUEST", _NeverMatches())
        monkeypatch.setattr(parser_module, "_WELL_FORMED_RESPONSE", _NeverMatches())
    return str(request.param)


def head(*lines: bytes) -> bytes:
    """A message head as the server hands it to the parser: lines joined by CRLF, final blank line removed."""
    return b"\r\n".join(lines)


def request(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> RequestHead:
    return parse_request_head(head(line, *fields))


def response(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK") -> ResponseHead:
    return parse_response_head(head(line, *fields))


def refused_request(data: bytes) -> HttpError:
    with pytest.raises(HttpError) as info:
        parse_request_head(data)
    return info.value


def refused_response(data: bytes) -> HttpError:
    with pytest.raises(HttpError) as info:
        parse_response_head(data)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Request heads that are accepted


def test_simple_get() -> None:
    parsed = request(HOST, b"Accept: */*", b"X-Case: Kept", line=b"GET /a/b?c=d HTTP/1.1")
    assert parsed.method == b"GET"
    assert parsed.target == b"/a/b?c=d"
    assert parsed.version == b"HTTP/1.1"
    # Names keep their case and order; values lose only their surrounding whitespace.
    assert parsed.headers == [(b"Host", b"api.localhost"), (b"Accept", b"*/*"), (b"X-Case", b"Kept")]
    assert parsed.host == b"api.localhost"
    assert parsed.content_length is None
    assert parsed.chunked is False
    assert parsed.has_body is False
    assert parsed.keep_alive is True
    assert parsed.upgrade is None
    assert parsed.connection_tokens == frozenset()


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"X-A: v", b"v"),
        (b"X-A:v", b"v"),
        (b"X-A: \t v \t ", b"v"),
        (b"X-A: a  b", b"a  b"),
        (b"X-A: a\tb", b"a\tb"),
        (b"X-A:", b""),
        (b"X-A:   ", b""),
        (b"X-A: caf\xc3\xa9 \xff", b"caf\xc3\xa9 \xff"),  # obs-text is allowed in values
        (b"X-A: a:b:c", b"a:b:c"),
    ],
)
def test_field_values(raw: bytes, value: bytes) -> None:
    assert request(HOST, raw).headers[1] == (b"X-A", value)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"PROPFIND", b"get", b"M-SEARCH"])
def test_methods_are_tokens(method: bytes) -> None:
    assert request(HOST, line=method + b" / HTTP/1.1").method == method


@pytest.mark.parametrize(
    ("value", "length", "has_body"),
    [(b"0", 0, False), (b"5", 5, True), (b"  5 ", 5, True), (b"007", 7, True), (b"9" * 18, int(b"9" * 18), True)],
)
def test_content_length(value: bytes, length: int, has_body: bool) -> None:
    # Whitespace around the value is optional whitespace of the field, not part of the number.
    parsed = request(HOST, b"Content-Length: " + value, line=b"POST / HTTP/1.1")
    assert parsed.content_length == length
    assert parsed.chunked is False
    assert parsed.has_body is has_body


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b" chunked\t"])
def test_chunked_request(value: bytes) -> None:
    parsed = request(HOST, b"Transfer-Encoding:" + value, line=b"POST / HTTP/1.1")
    assert parsed.chunked is True
    assert parsed.content_length is None
    assert parsed.has_body is True


def test_exactly_max_headers_is_accepted() -> None:
    fields = [HOST] + [b"X-%d: v" % n for n in range(MAX_HEADERS - 1)]
    assert len(request(*fields).headers) == MAX_HEADERS


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_options_asterisk(version: bytes) -> None:
    assert request(HOST, line=b"OPTIONS * " + version).target == b"*"


def test_http10_without_host_is_accepted() -> None:
    parsed = request(line=b"GET / HTTP/1.0")
    assert parsed.host is None
    assert parsed.version == b"HTTP/1.0"


def test_empty_host_is_accepted() -> None:
    # RFC 9112 section 3.2: a target without authority is sent with an empty Host.
    assert request(b"Host:").host == b""


@pytest.mark.parametrize(
    "host",
    [b"api.localhost", b"api.localhost:8080", b"api.localhost:", b"127.0.0.1", b"127.0.0.1:80", b"[::1]",
     b"[::1]:8443", b"[2001:db8::1]", b"[::ffff:127.0.0.1]", b"a-b_c~d.localhost", b"xn--caf-dma.localhost",
     b"a%2Eb", b"API.Localhost.", b"sub!$&'()*+,;=.localhost", b"localhost:0"],
)
def test_valid_hosts(host: bytes, both_paths: str) -> None:
    assert request(b"Host: " + host).host == host
    assert request(line=b"GET http://" + host + b"/p HTTP/1.1").host == host


@pytest.mark.parametrize("target", [b"/a%09b", b"/caf%C3%A9", b"/~user/!$&'()*+,;=:@", b"/?q=a/b?c", b"/\\"])
def test_valid_targets(target: bytes, both_paths: str) -> None:
    assert request(HOST, line=b"GET " + target + b" HTTP/1.1").target == target


def test_host_keeps_port_and_case() -> None:
    # Normalisation belongs to the route table (normalize_host), not to the parser.
    assert request(b"Host: API.Localhost:8080").host == b"API.Localhost:8080"


# Absolute-form targets: the authority wins over Host and the target becomes origin-form.


@pytest.mark.parametrize(
    ("target", "host", "path"),
    [
        (b"http://example.com/a/b?c", b"example.com", b"/a/b?c"),
        (b"http://Example.com:8080/", b"Example.com:8080", b"/"),
        (b"https://example.com", b"example.com", b"/"),
        (b"HTTP://example.com/x", b"example.com", b"/x"),
        (b"http://example.com?q=1", b"example.com", b"/?q=1"),
        (b"http://example.com:81?q=/a", b"example.com:81", b"/?q=/a"),
        (b"http://[::1]:8080/p", b"[::1]:8080", b"/p"),
        (b"http://example.com/a://b", b"example.com", b"/a://b"),
    ],
)
def test_absolute_form(target: bytes, host: bytes, path: bytes) -> None:
    parsed = request(b"Host: other.localhost", line=b"GET " + target + b" HTTP/1.1")
    assert parsed.host == host
    assert parsed.target == path


def test_absolute_form_without_host_header() -> None:
    parsed = request(line=b"GET http://example.com/x HTTP/1.1")
    assert parsed.host == b"example.com"


@pytest.mark.parametrize(
    "target",
    [b"http:///x", b"http://", b"http://user@example.com/", b"http://user:pw@example.com", b"ftp://example.com/"],
)
def test_bad_absolute_form(target: bytes) -> None:
    assert refused_request(head(b"GET " + target + b" HTTP/1.1", HOST)).status == 400


# Keep-alive and Connection.


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        (b"HTTP/1.1", [], True),
        (b"HTTP/1.1", [b"keep-alive"], True),
        (b"HTTP/1.1", [b"close"], False),
        (b"HTTP/1.1", [b"Close"], False),
        (b"HTTP/1.1", [b"foo, CLOSE"], False),
        (b"HTTP/1.1", [b"keep-alive, close"], False),
        (b"HTTP/1.1", [b"keep-alive", b"close"], False),
        (b"HTTP/1.1", [b"closed"], True),
        (b"HTTP/1.0", [], False),
        (b"HTTP/1.0", [b"keep-alive"], True),
        (b"HTTP/1.0", [b"Keep-Alive"], True),
        (b"HTTP/1.0", [b"x, keep-alive"], True),
        (b"HTTP/1.0", [b"keep-alive, close"], False),
        (b"HTTP/1.0", [b"close"], False),
        (b"HTTP/1.0", [b"keep-alives"], False),
    ],
)
def test_keep_alive(version: bytes, connection: list[bytes], keep_alive: bool) -> None:
    fields = [HOST] + [b"Connection: " + value for value in connection]
    assert request(*fields, line=b"GET / " + version).keep_alive is keep_alive


def test_connection_tokens_are_lower_case_and_trimmed() -> None:
    parsed = request(HOST, b"Connection: , Foo ,,\tBAR\t", b"Connection: baz")
    assert parsed.connection_tokens == frozenset({b"foo", b"bar", b"baz"})


# Upgrade only counts when Connection names it, and never on HTTP/1.0.


@pytest.mark.parametrize(
    ("version", "fields", "upgrade"),
    [
        (b"HTTP/1.1", [b"Connection: Upgrade", b"Upgrade: websocket"], b"websocket"),
        (b"HTTP/1.1", [b"Connection: keep-alive, upgrade", b"Upgrade: websocket"], b"websocket"),
        (b"HTTP/1.1", [b"Upgrade: websocket", b"Connection: UPGRADE"], b"websocket"),
        (b"HTTP/1.1", [b"Upgrade: websocket"], None),
        (b"HTTP/1.1", [b"Connection: keep-alive", b"Upgrade: websocket"], None),
        (b"HTTP/1.1", [b"Connection: upgrade"], None),
        (b"HTTP/1.0", [b"Connection: upgrade", b"Upgrade: websocket"], None),
    ],
)
def test_upgrade(version: bytes, fields: list[bytes], upgrade: bytes | None) -> None:
    assert request(HOST, *fields, line=b"GET /ws " + version).upgrade == upgrade


# ---------------------------------------------------------------------------------------------------------------
# Request heads that are refused

REFUSED_REQUESTS = [
    # The request line.
    ("empty head", b"", 400),
    ("no version", head(b"GET /", HOST), 400),
    ("extra part", head(b"GET / HTTP/1.1 x", HOST), 400),
    ("double space", head(b"GET  / HTTP/1.1", HOST), 400),
    ("leading space", head(b" GET / HTTP/1.1", HOST), 400),
    ("trailing space", head(b"GET / HTTP/1.1 ", HOST), 400),
    ("tab separator", head(b"GET\t/ HTTP/1.1", HOST), 400),
    ("empty method", head(b" / HTTP/1.1", HOST), 400),
    ("empty target", head(b"GET  HTTP/1.1", HOST), 400),
    ("method not a token", head(b"G(T / HTTP/1.1", HOST), 400),
    ("method with slash", head(b"GE/T / HTTP/1.1", HOST), 400),
    ("lower-case version", head(b"GET / http/1.1", HOST), 400),
    ("short version", head(b"GET / HTTP/1", HOST), 400),
    ("long version", head(b"GET / HTTP/1.10", HOST), 400),
    ("junk version", head(b"GET / HTXP/1.1", HOST), 400),
    ("HTTP/2.0", head(b"GET / HTTP/2.0", HOST), 505),
    ("HTTP/3.0", head(b"GET / HTTP/3.0", HOST), 505),
    ("HTTP/0.9", head(b"GET / HTTP/0.9", HOST), 505),
    # Targets.
    ("relative target", head(b"GET foo HTTP/1.1", HOST), 400),
    ("asterisk with GET", head(b"GET * HTTP/1.1", HOST), 400),
    ("authority form", head(b"CONNECT example.com:443 HTTP/1.1", HOST), 400),
    # Host.
    ("missing Host on 1.1", head(b"GET / HTTP/1.1", b"Accept: */*"), 400),
    ("two Host headers", head(b"GET / HTTP/1.1", HOST, b"Host: other.localhost"), 400),
    ("two Host headers, same value", head(b"GET / HTTP/1.1", HOST, HOST), 400),
    ("space in Host", head(b"GET / HTTP/1.1", b"Host: a b"), 400),
    ("slash in Host", head(b"GET / HTTP/1.1", b"Host: a/b"), 400),
    # Header count.
    ("101 header fields", head(b"GET / HTTP/1.1", HOST, *[b"X-%d: v" % n for n in range(MAX_HEADERS)]), 431),
    # Content-Length with Transfer-Encoding.
    ("CL then TE", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
    ("TE then CL", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked", b"Content-Length: 5"), 400),
    ("CL 0 with TE", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 0", b"Transfer-Encoding: chunked"), 400),
    # Duplicate, signed, hex or otherwise odd Content-Length.
    ("duplicate CL, same", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"Content-Length: 5"), 400),
    ("duplicate CL, different", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5", b"content-length: 6"), 400),
    ("CL list", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5, 5"), 400),
    ("CL plus", head(b"POST / HTTP/1.1", HOST, b"Content-Length: +5"), 400),
    ("CL minus", head(b"POST / HTTP/1.1", HOST, b"Content-Length: -5"), 400),
    ("CL hex", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 0x10"), 400),
    ("CL inner space", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 1 5"), 400),
    ("CL decimal point", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5.0"), 400),
    ("CL exponent", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 1e3"), 400),
    ("CL suffix", head(b"POST / HTTP/1.1", HOST, b"Content-Length: 5a"), 400),
    ("CL empty", head(b"POST / HTTP/1.1", HOST, b"Content-Length:"), 400),
    ("CL non-ASCII digit", head(b"POST / HTTP/1.1", HOST, b"Content-Length: \xd9\xa5"), 400),
    ("CL 19 digits", head(b"POST / HTTP/1.1", HOST, b"Content-Length: " + b"1" * 19), 400),
    # Transfer codings.
    ("TE identity", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: identity"), 400),
    ("TE chunked twice", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked, chunked"), 400),
    ("TE header twice", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
    ("TE xchunked", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: xchunked"), 400),
    ("TE chunkedx", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunkedx"), 400),
    ("TE chunked with parameter", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: chunked;q=1"), 400),
    ("TE quoted chunked", head(b"POST / HTTP/1.1", HOST, b'Transfer-Encoding: "chunked"'), 400),
    ("TE empty", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding:"), 400),
    ("TE gzip, chunked", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip, chunked"), 400),
    ("TE chunked on HTTP/1.0", head(b"POST / HTTP/1.0", HOST, b"Transfer-Encoding: chunked"), 400),
    ("TE gzip", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: gzip"), 501),
    ("TE deflate", head(b"POST / HTTP/1.1", HOST, b"Transfer-Encoding: deflate"), 501),
    # Bare LF and bare CR as line ends, in the head.
    ("bare LF after request line", b"GET / HTTP/1.1\nHost: a", 400),
    ("bare LF between fields", head(b"GET / HTTP/1.1", HOST) + b"\nX-A: b", 400),
    ("bare CR between fields", head(b"GET / HTTP/1.1", HOST) + b"\rX-A: b", 400),
    ("CR CR LF", b"GET / HTTP/1.1\r\r\nHost: a", 400),
    ("trailing bare CR", head(b"GET / HTTP/1.1", HOST) + b"\r", 400),
    # Field syntax.
    ("whitespace before the first field", head(b"GET / HTTP/1.1", b" Host: a"), 400),
    ("obs-fold with space", head(b"GET / HTTP/1.1", HOST, b"X-A: a", b" b"), 400),
    ("obs-fold with tab", head(b"GET / HTTP/1.1", HOST, b"X-A: a", b"\tb"), 400),
    ("obs-fold with colon", head(b"GET / HTTP/1.1", HOST, b"X-A: a", b" b: c"), 400),
    ("obs-fold of Host", head(b"GET / HTTP/1.1", b"Host:", b" api.localhost"), 400),
    ("space before colon", head(b"GET / HTTP/1.1", b"Host : api.localhost"), 400),
    ("tab before colon", head(b"GET / HTTP/1.1", HOST, b"Content-Length\t: 5"), 400),
    ("space in name", head(b"GET / HTTP/1.1", HOST, b"X A: b"), 400),
    ("empty name", head(b"GET / HTTP/1.1", HOST, b": b"), 400),
    ("no colon", head(b"GET / HTTP/1.1", HOST, b"X-A"), 400),
    ("empty line inside the head", head(b"GET / HTTP/1.1", HOST, b"", b"X-A: b"), 400),
    ("separator in name", head(b"GET / HTTP/1.1", HOST, b"X(A): b"), 400),
    ("slash in name", head(b"GET / HTTP/1.1", HOST, b"X/A: b"), 400),
    ("non-ASCII name", head(b"GET / HTTP/1.1", HOST, b"X-\xc3\xa9: b"), 400),
    ("NUL in value", head(b"GET / HTTP/1.1", HOST, b"X-A: a\x00b"), 400),
    ("CR in value", head(b"GET / HTTP/1.1", HOST, b"X-A: a\rb"), 400),
    ("LF in value", head(b"GET / HTTP/1.1", HOST, b"X-A: a\nb"), 400),
    ("DEL in value", head(b"GET / HTTP/1.1", HOST, b"X-A: a\x7fb"), 400),
    ("vertical tab in value", head(b"GET / HTTP/1.1", HOST, b"X-A: a\x0bb"), 400),
    ("NUL in target", head(b"GET /\x00 HTTP/1.1", HOST), 400),
    # The request line as strictly as the fields (issue 8): HTAB and obs-text are no target bytes.
    ("tab inside the target", head(b"GET /a\tb HTTP/1.1", HOST), 400),
    ("tab and a second version in the target", head(b"GET /a\tHTTP/1.0 HTTP/1.1", HOST), 400),
    ("obs-text in the target", head(b"GET /caf\xc3\xa9 HTTP/1.1", HOST), 400),
    ("byte 0x80 in the target", head(b"GET /\x80 HTTP/1.1", HOST), 400),
    ("byte 0xff in the target", head(b"GET /\xff HTTP/1.1", HOST), 400),
    ("obs-text in an absolute target", head(b"GET http://h/\xe9 HTTP/1.1", HOST), 400),
    # Host must be a host: routed by one part and forwarded whole, anything else fools the backend.
    ("userinfo in Host", head(b"GET / HTTP/1.1", b"Host: api.localhost:1@evil.example"), 400),
    ("at sign in Host", head(b"GET / HTTP/1.1", b"Host: user@api.localhost"), 400),
    ("tab in Host", head(b"GET / HTTP/1.1", b"Host: a\tb"), 400),
    ("obs-text in Host", head(b"GET / HTTP/1.1", b"Host: caf\xc3\xa9.localhost"), 400),
    ("two ports in Host", head(b"GET / HTTP/1.1", b"Host: a:1:2"), 400),
    ("port not numeric", head(b"GET / HTTP/1.1", b"Host: a:http"), 400),
    ("port too long", head(b"GET / HTTP/1.1", b"Host: a:123456"), 400),
    ("IPv6 without brackets", head(b"GET / HTTP/1.1", b"Host: ::1"), 400),
    ("IPv6 unclosed", head(b"GET / HTTP/1.1", b"Host: [::1"), 400),
    ("junk after IPv6", head(b"GET / HTTP/1.1", b"Host: [::1]x"), 400),
    ("IPv6 zone", head(b"GET / HTTP/1.1", b"Host: [fe80::1%eth0]"), 400),
    ("backslash in Host", head(b"GET / HTTP/1.1", b"Host: a\\b"), 400),
    ("bad percent escape in Host", head(b"GET / HTTP/1.1", b"Host: a%zz"), 400),
    ("query in Host", head(b"GET / HTTP/1.1", b"Host: a?b"), 400),
    ("fragment in Host", head(b"GET / HTTP/1.1", b"Host: a#b"), 400),
    ("userinfo in an absolute target", head(b"GET http://a:1@evil.example/ HTTP/1.1", HOST), 400),
    ("bad port in an absolute target", head(b"GET http://a:b/ HTTP/1.1", HOST), 400),
]


@pytest.mark.parametrize(("data", "status"), [case[1:] for case in REFUSED_REQUESTS], ids=[c[0] for c in REFUSED_REQUESTS])
def test_refused_request(data: bytes, status: int, both_paths: str) -> None:
    error = refused_request(data)
    assert error.status == status
    assert error.reason and str(error) == error.reason


@pytest.mark.parametrize("byte", sorted(set(range(0x20)) | {0x7F}))
def test_control_characters_in_names(byte: int) -> None:
    assert refused_request(head(b"GET / HTTP/1.1", HOST, b"X-%cA: b" % byte)).status == 400


@pytest.mark.parametrize("byte", sorted((set(range(0x20)) - {0x09}) | {0x7F}))
def test_control_characters_in_values(byte: int) -> None:
    # HTAB is the only control character a field value may hold.
    assert refused_request(head(b"GET / HTTP/1.1", HOST, b"X-A: a%cb" % byte)).status == 400


def test_header_count_is_431_not_400() -> None:
    fields = [HOST] + [b"X-%d: v" % n for n in range(MAX_HEADERS)]
    error = refused_request(head(b"GET / HTTP/1.1", *fields))
    assert error.status == 431
    assert str(MAX_HEADERS) in error.reason


def test_huge_value_is_left_to_the_server() -> None:
    # The server refuses heads over MAX_HEAD_BYTES with 431 before they are complete; the parser does not re-check.
    big = b"X-Big: " + b"a" * 70_000
    assert request(HOST, big).headers[1][1] == b"a" * 70_000


# ---------------------------------------------------------------------------------------------------------------
# Response heads


def test_simple_response() -> None:
    parsed = response(b"Content-Type: text/plain", b"Content-Length: 12")
    assert parsed.version == b"HTTP/1.1"
    assert parsed.status == 200
    assert parsed.status_line == b"HTTP/1.1 200 OK"
    assert parsed.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"12")]
    assert parsed.content_length == 12
    assert parsed.chunked is False
    assert parsed.keep_alive is True


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"HTTP/1.1 200 OK", 200),
        (b"HTTP/1.1 204", 204),
        (b"HTTP/1.1 204 ", 204),
        (b"HTTP/1.1 404 Not Found Here", 404),
        (b"HTTP/1.1 500 Caf\xc3\xa9", 500),
        (b"HTTP/1.0 302 Found", 302),
        (b"HTTP/1.1 599 Custom", 599),
    ],
)
def test_status_lines(line: bytes, status: int) -> None:
    parsed = response(line=line)
    assert parsed.status == status
    assert parsed.status_line == line


@pytest.mark.parametrize(
    ("line", "fields", "status"),
    [
        (b"HTTP/1.1 100 Continue", [], 100),
        (b"HTTP/1.1 102 Processing", [], 102),
        (b"HTTP/1.1 103 Early Hints", [b"Link: </style.css>; rel=preload"], 103),
        (b"HTTP/1.1 101 Switching Protocols", [b"Connection: Upgrade", b"Upgrade: websocket"], 101),
    ],
)
def test_informational_responses(line: bytes, fields: list[bytes], status: int) -> None:
    parsed = response(*fields, line=line)
    assert parsed.status == status
    assert parsed.content_length is None
    assert parsed.chunked is False
    if status == 101:
        assert parsed.connection_tokens == frozenset({b"upgrade"})


@pytest.mark.parametrize(
    "fields",
    [
        [b"Transfer-Encoding: chunked", b"Content-Length: 10"],
        [b"Content-Length: 10", b"Transfer-Encoding: chunked"],
        [b"Content-Length: 10", b"Transfer-Encoding: Chunked", b"Content-Length: 10"],
    ],
)
def test_chunked_response_with_content_length_is_502(fields: list[bytes]) -> None:
    # Issue 14 item 1: relayed as chunked, such a response left the backend's idea of its end behind, and the
    # bytes after it went to the next client of the pooled connection. Never relayed, whatever the order.
    error = refused_response(head(b"HTTP/1.1 200 OK", *fields))
    assert error.status == 502
    assert "Content-Length and Transfer-Encoding" in error.reason


def test_identical_duplicate_content_length_is_one_length() -> None:
    assert response(b"Content-Length: 7", b"content-length: 7").content_length == 7


def test_response_without_framing_reads_until_close() -> None:
    parsed = response()
    assert parsed.content_length is None
    assert parsed.chunked is False


@pytest.mark.parametrize(
    ("line", "connection", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK", [], True),
        (b"HTTP/1.1 200 OK", [b"close"], False),
        (b"HTTP/1.1 200 OK", [b"Keep-Alive, Close"], False),
        (b"HTTP/1.0 200 OK", [], False),
        (b"HTTP/1.0 200 OK", [b"keep-alive"], True),
        (b"HTTP/1.0 200 OK", [b"keep-alive", b"close"], False),
    ],
)
def test_response_keep_alive(line: bytes, connection: list[bytes], keep_alive: bool) -> None:
    parsed = response(*[b"Connection: " + value for value in connection], line=line)
    assert parsed.keep_alive is keep_alive


def test_response_connection_tokens() -> None:
    parsed = response(b"Connection: close, X-Internal", b"Connection: Foo")
    assert parsed.connection_tokens == frozenset({b"close", b"x-internal", b"foo"})


BAD_RESPONSES = [
    ("empty", b""),
    ("version only", b"HTTP/1.1"),
    ("no space after version", b"HTTP/1.1200 OK"),
    ("two spaces", b"HTTP/1.1  200 OK"),
    ("HTTP/2", b"HTTP/2 200 OK"),
    ("HTTP/2.0", b"HTTP/2.0 200 OK"),
    ("non-digit minor", b"HTTP/1.x 200 OK"),
    ("lower-case version", b"http/1.1 200 OK"),
    ("ICY", b"ICY 200 OK"),
    ("two-digit status", b"HTTP/1.1 20 OK"),
    ("two-digit status, nothing after", b"HTTP/1.1 20"),
    ("status line cut short", b"HTTP/1.1 2"),
    ("one byte glued to the status", b"HTTP/1.1 200X"),
    ("four-digit status", b"HTTP/1.1 2000 OK"),
    ("status with letters", b"HTTP/1.1 2x0 OK"),
    ("status below 100", b"HTTP/1.1 099 Odd"),
    ("status 000", b"HTTP/1.1 000 Odd"),
    ("no space before reason", b"HTTP/1.1 200OK"),
    ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0"),
    ("bare CR", b"HTTP/1.1 200 OK\rContent-Length: 0"),
    ("obs-fold", head(b"HTTP/1.1 200 OK", b"X-A: a", b" b")),
    ("space before colon", head(b"HTTP/1.1 200 OK", b"Content-Length : 5")),
    ("NUL in value", head(b"HTTP/1.1 200 OK", b"X-A: a\x00b")),
    ("control in name", head(b"HTTP/1.1 200 OK", b"X\x01A: b")),
    ("no colon", head(b"HTTP/1.1 200 OK", b"garbage")),
    ("conflicting Content-Length", head(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 6")),
    ("Content-Length list", head(b"HTTP/1.1 200 OK", b"Content-Length: 5, 5")),
    ("signed Content-Length", head(b"HTTP/1.1 200 OK", b"Content-Length: +5")),
    ("hex Content-Length", head(b"HTTP/1.1 200 OK", b"Content-Length: 0x5")),
    ("bad Content-Length even with chunked", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Content-Length: x")),
    ("TE gzip", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip")),
    ("TE gzip, chunked", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked")),
    ("TE identity", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: identity")),
    ("TE chunked twice", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")),
    ("TE xchunked", head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: xchunked")),
    ("101 header fields", head(b"HTTP/1.1 200 OK", *[b"X-%d: v" % n for n in range(MAX_HEADERS + 1)])),
]


@pytest.mark.parametrize("data", [case[1] for case in BAD_RESPONSES], ids=[case[0] for case in BAD_RESPONSES])
def test_malformed_response_is_502(data: bytes, both_paths: str) -> None:
    # Whatever is wrong with an upstream's head, the client gets 502 (never 400 or 431: the client did nothing wrong).
    assert refused_response(data).status == 502


# ---------------------------------------------------------------------------------------------------------------
# Chunked bodies


def chunked(chunks: Sequence[bytes], trailers: Sequence[bytes] = (), extension: bytes = b"") -> bytes:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(chunk), extension, chunk) for chunk in chunks if chunk)
    return body + b"0\r\n" + b"".join(trailer + b"\r\n" for trailer in trailers) + b"\r\n"


def decode(pieces: list[bytes], error_status: int = 400) -> tuple[bytes, ChunkedDecoder, int]:
    """Feed pieces until the decoder is done; returns the payload, the decoder and how many pieces it took."""
    decoder = ChunkedDecoder(error_status)
    payload = []
    for used, piece in enumerate(pieces, 1):
        out = decoder.feed(piece)
        assert all(out), "the decoder never yields empty pieces"
        payload.extend(out)
        if decoder.done:
            return b"".join(payload), decoder, used
    return b"".join(payload), decoder, len(pieces)


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(1, 8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


BODIES = [
    ("one chunk", [b"hello"], []),
    ("several chunks", [b"a", b"bc", b"def" * 100, b"\r\n0\r\n\r\n"], []),
    ("binary", [bytes(range(256))], []),
    ("empty body", [], []),
    ("trailers", [b"payload"], [b"X-Checksum: abc", b"X-Other: 1"]),
    ("large chunk", [b"x" * 70_000], []),
]


@pytest.mark.parametrize(("chunks", "trailers"), [case[1:] for case in BODIES], ids=[case[0] for case in BODIES])
def test_decode_whole(chunks: list[bytes], trailers: list[bytes]) -> None:
    payload, decoder, _ = decode([chunked(chunks, trailers)])
    assert payload == b"".join(chunks)
    assert decoder.done
    assert decoder.rest == b""


@pytest.mark.parametrize(("chunks", "trailers"), [case[1:] for case in BODIES if case[0] != "large chunk"], ids=[case[0] for case in BODIES if case[0] != "large chunk"])
def test_decode_byte_by_byte(chunks: list[bytes], trailers: list[bytes]) -> None:
    data = chunked(chunks, trailers)
    payload, decoder, used = decode(byte_by_byte(data))
    assert payload == b"".join(chunks)
    # Done exactly at the last byte of the final CRLF, not before.
    assert decoder.done and used == len(data)
    assert decoder.rest == b""


@pytest.mark.parametrize("seed", range(40))
def test_decode_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    chunks = [rng.randbytes(rng.randint(1, 300)) for _ in range(rng.randint(0, 6))]
    trailers = [b"X-T%d: %d" % (n, n) for n in range(rng.randint(0, 2))]
    extension = rng.choice([b"", b";a=1", b" ;name", b';q="x;y"'])
    after = rng.choice([b"", b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"])
    data = chunked(chunks, trailers, extension) + after
    pieces = random_splits(data, rng)
    payload, decoder, used = decode(pieces)
    assert payload == b"".join(chunks)
    assert decoder.done
    # What the decoder did not consume: the rest of the piece that ended the body, then the pieces not fed.
    assert decoder.rest + b"".join(pieces[used:]) == after


@pytest.mark.parametrize(
    ("data", "rest"),
    [
        (b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n"),
        (b"0\r\n\r\nX", b"X"),
        (b"0\r\nT: 1\r\n\r\n\r\n", b"\r\n"),
        (b"0\r\n\r\n0\r\n\r\n", b"0\r\n\r\n"),
    ],
)
def test_rest_after_the_body(data: bytes, rest: bytes) -> None:
    decoder = ChunkedDecoder()
    decoder.feed(data)
    assert decoder.done
    assert decoder.rest == rest


def test_feeding_after_done_yields_nothing() -> None:
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\n")
    assert decoder.feed(b"5\r\nhello\r\n") == []
    assert decoder.rest == b""


def test_not_done_until_the_final_crlf() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\nX-T: 1\r\n") == [b"abc"]
    assert not decoder.done
    decoder.feed(b"\r")
    assert not decoder.done
    decoder.feed(b"\n")
    assert decoder.done


@pytest.mark.parametrize(
    ("size_line", "size"),
    [(b"a", 10), (b"A", 10), (b"00a", 10), (b"a;ext", 10), (b"a;ext=val", 10), (b"a ;ext", 10), (b"a\t;e", 10),
     (b'a;e="quoted;value"', 10), (b"a ", 10)],
)
def test_chunk_size_forms(size_line: bytes, size: int) -> None:
    payload, decoder, _ = decode([size_line + b"\r\n" + b"z" * size + b"\r\n0\r\n\r\n"])
    assert payload == b"z" * size
    assert decoder.done


@pytest.mark.parametrize(
    ("size_line", "size"),
    [(b"0" * 19 + b"a", 10), (b"0" * 15 + b"a", 10), (b"0" * 5 + b"f" * 3, 4095), (b"0" * 20, 0)],
    ids=["20 digits", "16 digits", "zeros then 3 digits", "20 zeros"],
)
def test_chunk_size_leading_zeros_up_to_20_digits(size_line: bytes, size: int) -> None:
    # Issue 8: zero padding beyond 15 digits was refused; h11 allows 20 digits. The value still may not overflow.
    body = b"z" * size + b"\r\n0\r\n\r\n" if size else b"\r\n"
    payload, decoder, _ = decode([size_line + b"\r\n" + body])
    assert payload == b"z" * size
    assert decoder.done


def test_largest_chunk_size_is_15_significant_digits() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"00000fffffffffffffff\r\nabc") == [b"abc"]
    assert not decoder.done


def test_trailers_that_are_fields_are_accepted_and_dropped() -> None:
    data = b"0\r\nX-Sum: abc\r\nX-Empty:\r\nX-Text: caf\xc3\xa9 \t x\r\n" + b"X-N: 1\r\n" * 97 + b"\r\n"
    payload, decoder, _ = decode([data])
    assert payload == b"" and decoder.done


def test_line_ending_split_across_feeds() -> None:
    payload, decoder, _ = decode([b"5\r", b"\nhello\r", b"\n0\r", b"\n\r", b"\n"])
    assert payload == b"hello"
    assert decoder.done


BAD_BODIES = [
    ("size Z", b"Z\r\nhello\r\n0\r\n\r\n"),
    ("size 0x5", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size +5", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("size -5", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size with leading space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("size with inner space", b"1 0\r\n0123456789\r\n0\r\n\r\n"),
    ("empty size line", b"\r\nhello\r\n0\r\n\r\n"),
    ("extension without size", b";ext\r\nhello\r\n0\r\n\r\n"),
    ("16 hex digits", b"1" + b"0" * 15 + b"\r\n"),
    ("16 significant hex digits after zeros", b"0001" + b"0" * 15 + b"\r\n"),
    ("21 digits, all zeros but the last", b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n"),
    ("21 zeros for the last chunk", b"0" * 21 + b"\r\n\r\n"),
    ("trailer without a colon", b"0\r\nX-T\r\n\r\n"),
    ("trailer with space before the colon", b"0\r\nX-T : 1\r\n\r\n"),
    ("trailer obs-fold", b"0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ("trailer with an empty name", b"0\r\n: 1\r\n\r\n"),
    ("trailer with NUL in its value", b"0\r\nX-T: a\x00b\r\n\r\n"),
    ("trailer with DEL in its value", b"0\r\nX-T: a\x7fb\r\n\r\n"),
    ("101 trailer fields", b"0\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n"),
    ("bare LF after size", b"5\nhello\r\n0\r\n\r\n"),
    ("bare LF after data", b"5\r\nhello\n0\r\n\r\n"),
    ("bare LF after last chunk", b"5\r\nhello\r\n0\n\r\n"),
    ("bare LF ending the trailers", b"5\r\nhello\r\n0\r\n\n"),
    ("bare LF in a trailer", b"0\r\nX-T: 1\n\r\n"),
    ("CR in extension", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("CR before CRLF", b"5\r\r\nhello\r\n0\r\n\r\n"),
    ("data longer than size", b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("no CRLF after data", b"5\r\nhello0\r\n\r\n"),
    ("size line too long", b"0" * (MAX_CHUNK_LINE + 1)),
    ("size line too long with LF", b"1" + b";" * MAX_CHUNK_LINE + b"\r\nx\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [case[1] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
@pytest.mark.parametrize("split", ["whole", "byte-by-byte"])
@pytest.mark.parametrize("error_status", [400, 502])
def test_bad_chunked_body(data: bytes, split: str, error_status: int) -> None:
    pieces = [data] if split == "whole" else byte_by_byte(data)
    with pytest.raises(HttpError) as info:
        decode(pieces, error_status)
    assert info.value.status == error_status


def test_encode_chunk_round_trip() -> None:
    pieces = [b"a", b"hello world", bytes(range(256)) * 3]
    wire = b"".join(encode_chunk(piece) for piece in pieces) + LAST_CHUNK
    assert wire.startswith(b"1\r\na\r\nb\r\nhello world\r\n300\r\n")
    payload, decoder, _ = decode([wire])
    assert payload == b"".join(pieces)
    assert decoder.done and decoder.rest == b""


@pytest.mark.parametrize("seed", range(40))
def test_forwarded_block_is_every_other_field_line_in_order(seed: int) -> None:
    # Cut fields anywhere (first line, last line, side by side) must leave every other line intact and in order.
    rng = random.Random(seed)
    cut = [b"Content-Length: 0", b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"TE: trailers",
           b"X-Forwarded-For: 10.0.0.1", b"x-real-ip: 10.0.0.2", b"Proxy-Authorization: Basic eA=="]
    kept = [b"Accept: */*", b"User-Agent: t", b"Cookie: a=b", b"X-Forwarded: no", b"Hostname: h", b"Tea: green"]
    fields = [HOST] + rng.sample(cut, rng.randint(0, len(cut))) + rng.sample(kept, rng.randint(0, len(kept)))
    rng.shuffle(fields)
    parsed = request(*fields)
    assert parsed.forward == b"".join(line + b"\r\n" for line in fields if line not in cut)

    response_cut = [b"Content-Length: 5", b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"Trailer: x"]
    response_kept = [b"Server: s", b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"Content-Type: text/plain", b"Upgraded: no"]
    fields = rng.sample(response_cut, rng.randint(0, len(response_cut))) + rng.sample(response_kept, rng.randint(0, 5))
    rng.shuffle(fields)
    parsed_response = response(*fields)
    assert parsed_response.forward == b"".join(line + b"\r\n" for line in fields if line not in response_cut)


# Fields on demand: the pairs (computed once from the raw block) and one field's value by name.


def test_headers_are_computed_once_from_the_block() -> None:
    parsed = request(HOST, b"X-A:  one \t", b"x-b:two")
    assert parsed.headers == [(b"Host", b"api.localhost"), (b"X-A", b"one"), (b"x-b", b"two")]
    assert parsed.headers is parsed.headers


def test_headers_set_by_hand_are_kept_and_the_forwarded_block_dropped() -> None:
    parsed = request(HOST, b"Accept: */*")
    assert parsed.forward is not None
    parsed.headers = [(b"Host", b"other")]
    assert parsed.headers == [(b"Host", b"other")]
    assert parsed.forward is None


def test_a_head_without_fields_has_no_headers() -> None:
    assert request(line=b"GET / HTTP/1.0").headers == []
    assert parse_response_head(b"HTTP/1.1 204 No Content").headers == []


@pytest.mark.parametrize(
    ("fields", "name", "value"),
    [
        ([HOST, b"Cookie: a=1; b=2"], b"cookie", b"a=1; b=2"),
        ([HOST, b"COOKIE:\t a=1 \t"], b"cookie", b"a=1"),
        ([HOST, b"Cookie: first", b"Cookie: second"], b"cookie", b"first"),
        ([HOST, b"X-Cookie: no", b"Cookies: no"], b"cookie", None),
        ([HOST, b"X-Version: v2"], b"x-version", b"v2"),
        ([HOST, b"X-Version:"], b"x-version", b""),
        ([HOST], b"x-version", None),
        ([HOST, b"X-A: Cookie: inside"], b"cookie", None),
        ([HOST, b"x.version: v2"], b"x-version", None),
    ],
)
def test_field(fields: list[bytes], name: bytes, value: bytes | None) -> None:
    parsed = request(*fields)
    assert parsed.field(name) == value
    # Asked again (the pattern is cached): the same answer.
    assert parsed.field(name) == value


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([HOST, b"X-A: a", b" folded"], "obsolete line folding"),
        ([HOST, b"X-A: a", b"\tfolded"], "obsolete line folding"),
        ([b" Host: a"], "invalid header field name"),
        ([HOST, b"X-A"], "without a name and colon"),
        ([HOST, b": v"], "without a name and colon"),
        ([HOST, b""], "without a name and colon"),
        ([HOST, b"X A: b"], "invalid header field name b'X A'"),
        ([HOST, b"Host : a"], "invalid header field name b'Host '"),
        ([HOST, b"X-\xc3\xa9: b"], "invalid header field name"),
        ([HOST, b"X: 1", b"Y Z: 2"], "invalid header field name b'Y Z'"),
    ],
)
def test_field_errors_say_what_is_wrong(fields: list[bytes], reason: str, both_paths: str) -> None:
    for parse, line, status in ((parse_request_head, b"GET / HTTP/1.1", 400), (parse_response_head, b"HTTP/1.1 200 OK", 502)):
        with pytest.raises(HttpError) as info:
            parse(head(line, *fields))
        assert info.value.status == status
        assert reason in info.value.reason
