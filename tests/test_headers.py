"""Header rewriting between client and upstream (labelgw.http.headers). Pure: heads in, bytes out.

Hop-by-hop fields and the fields named in Connection never cross the proxy, the X-Forwarded-* / X-Real-IP fields
are the proxy's own (even when the client names them in Connection, Traefik CVE-2024-45410), and look-alikes a
backend could read as the same header are dropped.
"""

from __future__ import annotations

import pytest

from labelgw.http.headers import HOP_BY_HOP, MANAGED, client_response_head, error_response, upstream_request_head
from labelgw.http.parser import RequestHead, ResponseHead, parse_request_head, parse_response_head

CLIENT_IP = b"127.0.0.9"


def parse_request(*lines: bytes) -> RequestHead:
    return parse_request_head(b"\r\n".join(lines))


def upstream(*lines: bytes, target: bytes | None = None, proto: bytes = b"http", port: bytes = b"8080") -> bytes:
    head = parse_request(*lines)
    return upstream_request_head(head, head.target if target is None else target, CLIENT_IP, proto, port)


def sent_upstream(*lines: bytes, **kwargs: bytes) -> RequestHead:
    """What the upstream would parse: checks the output is a well-formed head at the same time."""
    wire = upstream(*lines, **kwargs)
    assert wire.endswith(b"\r\n\r\n") and wire.count(b"\r\n\r\n") == 1
    return parse_request_head(wire[:-4])


def values(head: RequestHead | ResponseHead, name: bytes) -> list[bytes]:
    return [value for field, value in head.headers if field.lower() == name.lower()]


def names(head: RequestHead | ResponseHead) -> list[bytes]:
    return [field.lower() for field, _ in head.headers]


# ---------------------------------------------------------------------------------------------------------------
# Requests going upstream


def test_request_line_and_end_to_end_fields() -> None:
    sent = sent_upstream(
        b"GET /a?b=c HTTP/1.1", b"Host: api.localhost", b"Accept: */*", b"Cookie: a=1", b"Cookie: b=2",
        b"User-Agent: test",
    )
    assert (sent.method, sent.target, sent.version) == (b"GET", b"/a?b=c", b"HTTP/1.1")
    assert sent.headers[:5] == [
        (b"Host", b"api.localhost"), (b"Accept", b"*/*"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"),
        (b"User-Agent", b"test"),
    ]
    # A persistent connection upstream: no Connection field at all.
    assert values(sent, b"connection") == []
    assert sent.keep_alive


def test_target_argument_is_used() -> None:
    # The route decides the upstream target (strip_prefix): the client's target is not reused.
    wire = upstream(b"GET /api/users?x=1 HTTP/1.1", b"Host: a", target=b"/users?x=1")
    assert wire.startswith(b"GET /users?x=1 HTTP/1.1\r\n")


def test_http10_request_goes_upstream_as_http11() -> None:
    sent = sent_upstream(b"GET / HTTP/1.0", b"Host: a", b"Connection: keep-alive")
    assert sent.version == b"HTTP/1.1"
    assert values(sent, b"connection") == []


@pytest.mark.parametrize(
    "field",
    [
        b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive", b"TE: trailers",
        b"Trailer: X-Checksum", b"Upgrade: websocket", b"Proxy-Authorization: Basic eDp5",
        b"Proxy-Authenticate: Basic", b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA", b"KEEP-ALIVE: 1", b"te: gzip",
    ],
)
def test_hop_by_hop_fields_are_not_forwarded(field: bytes) -> None:
    sent = sent_upstream(b"GET / HTTP/1.1", b"Host: a", field, b"X-Kept: 1")
    name = field.split(b":")[0]
    assert values(sent, name) == []
    assert values(sent, b"X-Kept") == [b"1"]


def test_hop_by_hop_set_is_complete() -> None:
    assert {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"} <= HOP_BY_HOP


def test_fields_named_in_connection_are_removed() -> None:
    sent = sent_upstream(
        b"GET / HTTP/1.1", b"Host: a", b"Connection: X-Secret, foo", b"Connection: Bar", b"X-Secret: s", b"Foo: f",
        b"bar: b", b"X-Kept: k",
    )
    assert names(sent)[:2] == [b"host", b"x-kept"]
    for name in (b"x-secret", b"foo", b"bar"):
        assert name not in names(sent)


def test_proxy_sets_its_own_forwarded_fields() -> None:
    sent = sent_upstream(b"GET / HTTP/1.1", b"Host: API.localhost:8080", proto=b"https", port=b"8443")
    assert values(sent, b"X-Forwarded-For") == [CLIENT_IP]
    assert values(sent, b"X-Real-IP") == [CLIENT_IP]
    assert values(sent, b"X-Forwarded-Proto") == [b"https"]
    assert values(sent, b"X-Forwarded-Host") == [b"API.localhost:8080"]
    assert values(sent, b"X-Forwarded-Port") == [b"8443"]


@pytest.mark.parametrize(
    "field",
    [
        b"X-Forwarded-For: 6.6.6.6", b"x-forwarded-for: 6.6.6.6", b"X-Real-IP: 6.6.6.6", b"X-Forwarded-Proto: https",
        b"X-Forwarded-Host: evil.example", b"X-Forwarded-Port: 1",
        # Look-alikes: CGI-style servers map "_" and "." to "-" and would read these as the managed fields.
        b"X_Forwarded_For: 6.6.6.6", b"X.Forwarded.For: 6.6.6.6", b"X-Forwarded_For: 6.6.6.6", b"x_real_ip: 6.6.6.6",
        b"X_Real.IP: 6.6.6.6", b"X.Forwarded-Host: evil.example", b"X_FORWARDED_PROTO: https",
    ],
)
@pytest.mark.parametrize("connection", [(), (b"Connection: X-Drop",)], ids=["cut-by-pattern", "field-by-field"])
def test_client_managed_fields_and_look_alikes_are_dropped(field: bytes, connection: tuple[bytes, ...]) -> None:
    # With a field named in Connection the parser cannot cut the block by pattern: headers.py filters each field.
    sent = sent_upstream(b"GET / HTTP/1.1", b"Host: a", *connection, field)
    client_name, client_value = field.split(b": ")
    assert client_name not in [name for name, _ in sent.headers if name.lower() not in MANAGED]
    assert client_value not in [value for _, value in sent.headers]
    for managed in MANAGED:
        assert len(values(sent, managed)) == 1


@pytest.mark.parametrize(
    "field", [b"X-Forwarded-Prefix: /api", b"X-Forwarded-Server: s", b"Forwarded-For: x", b"XForwardedFor: x", b"X-Real: x",
              b"Y-Forwarded-For: x", b"X--Forwarded-For: x", b"Xa-Forwarded-For: x"]
)
@pytest.mark.parametrize("connection", [(), (b"Connection: X-Drop",)], ids=["cut-by-pattern", "field-by-field"])
def test_other_x_fields_pass(field: bytes, connection: tuple[bytes, ...]) -> None:
    name, value = field.split(b": ")
    assert values(sent_upstream(b"GET / HTTP/1.1", b"Host: a", *connection, field), name) == [value]


def test_connection_naming_managed_fields_cve_2024_45410() -> None:
    # Traefik CVE-2024-45410: naming X-Forwarded-* in Connection made the proxy drop the headers it set itself.
    sent = sent_upstream(
        b"GET / HTTP/1.1", b"Host: api.localhost",
        b"Connection: close, X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto, X-Forwarded-Port, X-Real-IP",
        b"X-Forwarded-For: 6.6.6.6",
    )
    assert values(sent, b"X-Forwarded-For") == [CLIENT_IP]
    assert values(sent, b"X-Forwarded-Host") == [b"api.localhost"]
    assert values(sent, b"X-Forwarded-Proto") == [b"http"]
    assert values(sent, b"X-Forwarded-Port") == [b"8080"]
    assert values(sent, b"X-Real-IP") == [CLIENT_IP]
    # The client's "close" concerns its own connection; the upstream connection stays persistent.
    assert values(sent, b"Connection") == []


@pytest.mark.parametrize("connection", [b"Connection: Content-Length", b"Connection: close, content-length, host"])
def test_framing_named_in_connection_is_still_sent(connection: bytes) -> None:
    sent = sent_upstream(b"POST / HTTP/1.1", b"Host: a", connection, b"Content-Length: 5")
    assert values(sent, b"Content-Length") == [b"5"]
    assert sent.content_length == 5
    assert values(sent, b"Host") == [b"a"]


@pytest.mark.parametrize(
    ("lines", "content_length", "chunked"),
    [
        ([b"GET / HTTP/1.1", b"Host: a"], None, False),
        ([b"GET / HTTP/1.1", b"Host: a", b"Content-Length: 3"], b"3", False),
        ([b"POST / HTTP/1.1", b"Host: a"], b"0", False),
        ([b"PUT / HTTP/1.1", b"Host: a"], b"0", False),
        ([b"PATCH / HTTP/1.1", b"Host: a"], b"0", False),
        ([b"DELETE / HTTP/1.1", b"Host: a"], None, False),
        ([b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 0007"], b"7", False),
        ([b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: Chunked"], None, True),
        ([b"POST / HTTP/1.0", b"Host: a", b"Content-Length: 2"], b"2", False),
    ],
)
def test_framing(lines: list[bytes], content_length: bytes | None, chunked: bool) -> None:
    sent = sent_upstream(*lines)
    assert values(sent, b"Content-Length") == ([] if content_length is None else [content_length])
    assert values(sent, b"Transfer-Encoding") == ([b"chunked"] if chunked else [])


def test_absolute_form_authority_overrides_host() -> None:
    sent = sent_upstream(b"GET http://api.localhost/x HTTP/1.1", b"Accept: */*", b"Host: other.localhost")
    assert sent.target == b"/x"
    assert values(sent, b"Host") == [b"api.localhost"]
    # The Host field stays where the client put it.
    assert names(sent)[:2] == [b"accept", b"host"]
    assert values(sent, b"X-Forwarded-Host") == [b"api.localhost"]


def test_absolute_form_without_host_gets_one() -> None:
    sent = sent_upstream(b"GET http://api.localhost:81/ HTTP/1.1")
    assert values(sent, b"Host") == [b"api.localhost:81"]


def test_http10_without_host() -> None:
    wire = upstream(b"GET / HTTP/1.0")
    assert b"\r\nHost:" not in wire
    assert b"\r\nX-Forwarded-Host: \r\n" in wire


def test_upgrade_request() -> None:
    sent = sent_upstream(
        b"GET /ws HTTP/1.1", b"Host: a", b"Connection: keep-alive, Upgrade", b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13",
    )
    assert values(sent, b"Connection") == [b"Upgrade"]
    assert values(sent, b"Upgrade") == [b"websocket"]
    assert sent.upgrade == b"websocket"
    assert values(sent, b"Sec-WebSocket-Key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]


def test_upgrade_not_named_in_connection_is_dropped() -> None:
    sent = sent_upstream(b"GET /ws HTTP/1.1", b"Host: a", b"Upgrade: websocket")
    assert values(sent, b"Upgrade") == []
    assert values(sent, b"Connection") == []


# ---------------------------------------------------------------------------------------------------------------
# Responses going to the client


def parse_response(*lines: bytes) -> ResponseHead:
    return parse_response_head(b"\r\n".join(lines))


def to_client(response: ResponseHead, framing: bytes = b"Content-Length: 2\r\n", close: bool = False, upgrade: bool = False) -> ResponseHead:
    wire = client_response_head(response, framing, close, upgrade)
    assert wire.endswith(b"\r\n\r\n") and wire.count(b"\r\n\r\n") == 1
    return parse_response_head(wire[:-4])


@pytest.mark.parametrize(
    ("status_line", "expected"),
    [
        (b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"),
        (b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK"),
        (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 404 Not Found"),
        (b"HTTP/1.1 204", b"HTTP/1.1 204 "),
        (b"HTTP/1.1 204 ", b"HTTP/1.1 204 "),
        (b"HTTP/1.1 299 X", b"HTTP/1.1 299 X"),
    ],
)
def test_status_line(status_line: bytes, expected: bytes) -> None:
    wire = client_response_head(parse_response(status_line), b"", close=False)
    assert wire.split(b"\r\n")[0] == expected


def test_response_fields_are_filtered() -> None:
    response = parse_response(
        b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Connection: keep-alive, X-Internal", b"Keep-Alive: timeout=5",
        b"X-Internal: secret", b"Transfer-Encoding: chunked", b"Trailer: X-Sum",
        b"Proxy-Authenticate: Basic", b"Upgrade: h2c", b"Set-Cookie: a=1", b"Set-Cookie: b=2", b"Vary: Accept",
    )
    sent = to_client(response)
    assert sent.headers == [
        (b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Vary", b"Accept"),
        (b"Content-Length", b"2"),
    ]
    assert sent.keep_alive
    # The upstream's Content-Length is cut too (both with chunked is refused by the parser: a 502).
    sent = to_client(parse_response(b"HTTP/1.1 200 OK", b"Content-Length: 99", b"Vary: Accept"))
    assert sent.headers == [(b"Vary", b"Accept"), (b"Content-Length", b"2")]


def test_duplicate_set_cookie_kept_in_order() -> None:
    cookies = [b"Set-Cookie: a=1; Path=/", b"Set-Cookie: b=2; HttpOnly", b"set-cookie: c=3, d=4"]
    sent = to_client(parse_response(b"HTTP/1.1 200 OK", *cookies))
    assert values(sent, b"Set-Cookie") == [b"a=1; Path=/", b"b=2; HttpOnly", b"c=3, d=4"]


@pytest.mark.parametrize(
    ("framing", "close", "expected_length", "chunked"),
    [
        (b"Content-Length: 5\r\n", False, 5, False),
        (b"Transfer-Encoding: chunked\r\n", False, None, True),
        (b"", True, None, False),
    ],
)
def test_framing_and_close(framing: bytes, close: bool, expected_length: int | None, chunked: bool) -> None:
    response = parse_response(b"HTTP/1.1 200 OK", b"Content-Length: 999", b"Connection: close")
    sent = to_client(response, framing=framing, close=close)
    assert sent.content_length == expected_length
    assert sent.chunked is chunked
    assert sent.keep_alive is not close
    assert values(sent, b"Connection") == ([b"close"] if close else [])


def test_upstream_close_does_not_close_the_client() -> None:
    # Connection management is per hop: the exchange decides `close`, the upstream's wish is not copied.
    sent = to_client(parse_response(b"HTTP/1.0 200 OK"), close=False)
    assert sent.keep_alive


@pytest.mark.parametrize(
    "connection", [b"Connection: Upgrade", b"Connection: Upgrade, X-Private"], ids=["cut-by-pattern", "field-by-field"]
)
def test_switching_protocols_head(connection: bytes) -> None:
    # A token naming a field (X-Private) makes headers.py filter the response field by field.
    response = parse_response(
        b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", connection,
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"Keep-Alive: x", b"X-Private: p", b"TE: trailers",
    )
    wire = client_response_head(response, b"", close=True, upgrade=True)
    assert wire.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    sent = parse_response_head(wire[:-4])
    assert values(sent, b"Upgrade") == [b"websocket"]
    # Exactly one Connection field, even though the upstream's was dropped and ours is added; never "close".
    assert values(sent, b"Connection") == [b"Upgrade"]
    assert values(sent, b"Sec-WebSocket-Accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    assert values(sent, b"Keep-Alive") == []
    assert values(sent, b"Content-Length") == []
    assert values(sent, b"TE") == []
    assert values(sent, b"X-Private") == ([] if b"X-Private" in connection else [b"p"])


def test_interim_response_head() -> None:
    wire = client_response_head(parse_response(b"HTTP/1.1 103 Early Hints", b"Link: </a.css>; rel=preload"), b"", close=False)
    assert wire == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


# ---------------------------------------------------------------------------------------------------------------
# Responses labelgw makes itself


def split_response(wire: bytes) -> tuple[ResponseHead, bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    return parse_response_head(head), body


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (308, b"Permanent Redirect"), (400, b"Bad Request"), (404, b"Not Found"), (408, b"Request Timeout"), (413, b"Content Too Large"),
        (431, b"Request Header Fields Too Large"), (501, b"Not Implemented"), (502, b"Bad Gateway"),
        (503, b"Service Unavailable"), (504, b"Gateway Timeout"), (505, b"HTTP Version Not Supported"),
        (418, b"Error"),
    ],
)
def test_error_response_status(status: int, reason: bytes) -> None:
    head, body = split_response(error_response(status, "something went wrong", close=False))
    assert head.status_line == b"HTTP/1.1 %d %s" % (status, reason)
    assert body == b"labelgw: something went wrong\n"
    assert head.content_length == len(body)
    assert values(head, b"Content-Type") == [b"text/plain; charset=utf-8"]
    assert head.keep_alive


def test_error_response_close_and_extra() -> None:
    wire = error_response(503, "service 'api' has no ready backend", close=True, extra=b"Retry-After: 1\r\n")
    head, body = split_response(wire)
    assert values(head, b"Retry-After") == [b"1"]
    assert values(head, b"Connection") == [b"close"]
    assert not head.keep_alive
    assert body == b"labelgw: service 'api' has no ready backend\n"


def test_error_response_length_counts_bytes() -> None:
    head, body = split_response(error_response(404, "no route for host 'caf\u00e9.localhost'", close=False))
    assert body == "labelgw: no route for host 'caf\u00e9.localhost'\n".encode()
    assert head.content_length == len(body)
