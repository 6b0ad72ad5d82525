"""Header rewriting between client and upstream. Pure: heads in, bytes out."""

from __future__ import annotations

from labelgw.http.framing import response_has_body
from labelgw.http.parser import RequestHead, ResponseHead

# Meaningful for one connection only (RFC 9110 section 7.6.1), plus the proxy credentials meant for us.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"proxy-authenticate", b"proxy-authorization", b"http2-settings",
    }
)
# Set by labelgw only: a client's values are dropped, as are look-alikes a backend might read as the same header.
MANAGED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"})
# Framing is written by labelgw itself; a Connection header naming these must not remove them.
_FRAMING = frozenset({b"content-length", b"host"})


def _is_managed(lower: bytes) -> bool:
    return lower[:2] in (b"x-", b"x_", b"x.") and lower.replace(b"_", b"-").replace(b".", b"-") in MANAGED


def _filter_request_fields(head: RequestHead, parts: list[bytes]) -> None:
    """Field by field, for the rare heads the parser could not cut: fields named in Connection, absolute form."""
    named = head.connection_tokens - _FRAMING
    host_seen = False
    for name, value in head.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower == b"content-length" or _is_managed(lower):
            continue
        if lower == b"host":
            host_seen = True
            # An absolute-form target's authority overrides the Host header (the parser stored it in head.host).
            value = head.host or value
        parts.append(name + b": " + value + b"\r\n")
    if not host_seen and head.host is not None:
        parts.append(b"Host: " + head.host + b"\r\n")


def upstream_request_head(
    head: RequestHead, target: bytes, client_ip: bytes, proto: bytes, port: bytes
) -> bytes:
    """The request head labelgw sends upstream, always HTTP/1.1 on a persistent connection."""
    forward = head.forward
    forwarded_host = head.host or b""
    if forward is not None and head.upgrade is None and not head.chunked and head.content_length is None and (
        head.method not in _SENT_WITH_LENGTH
    ):
        # Nearly every request (no body, no Upgrade, fields pre-cut by the parser): one join, no list to grow.
        return b"".join((
            head.method, b" ", target, b" HTTP/1.1\r\n", forward, head.trace_fields, b"X-Forwarded-For: ", client_ip,
            b"\r\nX-Forwarded-Proto: ", proto, b"\r\nX-Forwarded-Host: ", forwarded_host, b"\r\nX-Forwarded-Port: ",
            port, b"\r\nX-Real-IP: ", client_ip, b"\r\n\r\n",
        ))
    parts = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    if forward is not None:
        # The parser already cut what is not forwarded: the common case costs no per-field work.
        parts.append(forward)
    else:
        _filter_request_fields(head, parts)
    if head.upgrade is not None:
        parts.append(b"Connection: Upgrade\r\nUpgrade: " + head.upgrade + b"\r\n")
    if head.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    elif head.method in _SENT_WITH_LENGTH:
        parts.append(b"Content-Length: 0\r\n")
    if head.trace_fields:
        # X-Request-Id and traceparent, when the client's were missing or refused (labelgw.http.requestid).
        parts.append(head.trace_fields)
    parts.append(
        b"X-Forwarded-For: " + client_ip + b"\r\nX-Forwarded-Proto: " + proto + b"\r\nX-Forwarded-Host: "
        + forwarded_host + b"\r\nX-Forwarded-Port: " + port + b"\r\nX-Real-IP: " + client_ip + b"\r\n\r\n"
    )
    return b"".join(parts)


# Methods that always get a Content-Length upstream (0 when the client sent none).
_SENT_WITH_LENGTH = frozenset({b"POST", b"PUT", b"PATCH"})


def client_response_head(
    response: ResponseHead, framing: bytes, close: bool, upgrade: bool = False, body: bytes = b""
) -> bytes:
    """The response head labelgw sends the client. `framing` is the Content-Length or Transfer-Encoding line
    labelgw chose; hop-by-hop fields and those the upstream named in Connection are removed. `body`: bytes that
    follow the head in the same send (a whole response's body), joined to it here."""
    reason = response.status_line[9:]
    forward = response.forward
    if forward is not None and not upgrade:
        # Nearly every response: one join.
        return b"".join((
            b"HTTP/1.1 ", reason, b"\r\n" if len(reason) > 3 else b" \r\n", forward, framing,
            b"Connection: close\r\n\r\n" if close else b"\r\n", body,
        ))
    parts = [b"HTTP/1.1 " + (reason if len(reason) > 3 else reason + b" ") + b"\r\n"]
    if forward is not None:
        parts.append(forward)
        if upgrade and response.upgrade is not None:
            parts.append(b"Upgrade: " + response.upgrade + b"\r\n")
    else:
        named = response.connection_tokens
        for name, value in response.headers:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower == b"content-length" or lower in named:
                if upgrade and lower == b"upgrade":
                    parts.append(name + b": " + value + b"\r\n")
                continue
            parts.append(name + b": " + value + b"\r\n")
    parts.append(framing)
    if upgrade:
        parts.append(b"Connection: Upgrade\r\n\r\n")
    elif close:
        parts.append(b"Connection: close\r\n\r\n")
    else:
        parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def error_response(status: int, message: str, close: bool, extra: bytes = b"", head_only: bool = False) -> bytes:
    """A response generated by labelgw itself (404, 502, ...), plain text naming the problem; no body for HEAD."""
    body = f"labelgw: {message}\n".encode("utf-8", "replace")
    reason = _REASONS.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s%s\r\n%s"
        % (
            status, reason, len(body), extra, b"Connection: close\r\n" if close else b"",
            body if response_has_body(status, head_only) else b"",
        )
    )


_REASONS = {
    308: b"Permanent Redirect", 400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Content Too Large", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
