"""Response compression (`<prefix>.compress=true`): gzip, streamed, as a transform of the response on its way to
the client side.

`CompressingSide` wraps an exchange's client side (HTTP/1.1 connection or HTTP/2 stream) and changes only the
response: the head loses Content-Length (the side then frames the body as chunked, or as DATA frames), gains
`Content-Encoding: gzip` and `Vary: Accept-Encoding`, and a strong ETag becomes weak (the bytes differ, the
meaning does not); each upstream read is compressed with one `zlib.compressobj` per response and sync-flushed at
the end of that read, so a slow stream still reaches the client as it comes and nothing holds the whole body.
Every other call goes straight to the wrapped side. Only exchanges of a service with compression get the
wrapper (`labelgw.middleware.chain.Ticket.bind`): other routes do not pay for it.

Not compressed: HEAD, 204, 304, 206 (a range of the identity body), 101 (a tunnel never reaches response_head),
a response the backend encoded already (Content-Encoding), `Cache-Control: no-transform`, a type not listed, a
body known to be shorter than min_size, a client that does not accept gzip (Accept-Encoding, RFC 9110 12.5.3).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from labelgw.core.middleware import CompressSpec
from labelgw.http.parser import RequestHead, ResponseHead

if TYPE_CHECKING:
    from labelgw.http.exchange import Exchange
    from labelgw.http.sides import ClientSide

__all__ = ["CompressingSide", "accepts_gzip", "type_matches"]

# Fast and still about 4x on text; level 9 costs twice the CPU for a few percent.
LEVEL = 5
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_NO_BODY = frozenset({204, 304, 206})


def accepts_gzip(value: bytes | None) -> bool:
    """Whether an Accept-Encoding value allows gzip: listed (or x-gzip) with q > 0, or `*` with q > 0 and gzip
    not listed. No field at all means "anything" (RFC 9110 12.5.3), but a client that sends none is usually a
    tool that would not decode it: labelgw compresses only when asked."""
    if not value:
        return False
    star: bool | None = None
    for item in value.split(b","):
        coding, _, params = item.partition(b";")
        coding = coding.strip().lower()
        if coding not in (b"gzip", b"x-gzip", b"*"):
            continue
        q = 1.0
        for param in params.split(b";"):
            name, _, number = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    q = float(number.strip())
                except ValueError:
                    q = 0.0
        if coding == b"*":
            star = q > 0
        else:
            return q > 0
    return bool(star)


def type_matches(content_type: bytes | None, types: tuple[str, ...]) -> bool:
    """Whether a Content-Type (parameters ignored) is one of `types` ("text/*" matches every text type)."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
    if media == "text/event-stream":
        return False  # server-sent events: each event must leave as it is written, which gzip buffering breaks
    for pattern in types:
        if pattern == media or pattern.endswith("/*") and media.startswith(pattern[:-1]):
            return True
    return False


def _vary_with(value: bytes | None) -> bytes | None:
    """The Vary value after adding Accept-Encoding, or None when it has it already (or is `*`)."""
    if not value:
        return b"Accept-Encoding"
    names = [name.strip().lower() for name in value.split(b",")]
    if b"accept-encoding" in names or b"*" in names:
        return None
    return value + b", Accept-Encoding"


class CompressingSide:
    """A client side whose responses are gzip-compressed when they qualify (see the module's doc)."""

    def __init__(self, inner: "ClientSide", spec: CompressSpec, request: RequestHead) -> None:
        self._inner = inner
        self._spec = spec
        self._accepts = accepts_gzip(request.field(b"accept-encoding"))
        self._compressor: Any = None
        self.peer_ip = inner.peer_ip
        # The inner side's line kind, kept by whoever keeps the inner side's (labelgw.http.accesslog).
        self.log_kind = inner.log_kind
        self.log_kind_keeper = inner.log_kind_keeper or inner
        self.is_http2 = inner.is_http2
        self.proto = inner.proto
        self.local_port = inner.local_port
        # Everything but the response head, body and end goes straight through (bound once, no per-call lookup).
        self.interim_head = inner.interim_head
        self.error_response = inner.error_response
        self.abort = inner.abort
        self.set_response_producer = inner.set_response_producer
        self.pause_request_body = inner.pause_request_body
        self.start_tunnel = inner.start_tunnel
        self.tunnel_data = inner.tunnel_data
        self.exchange_done = inner.exchange_done
        self.response_data = inner.response_data
        self.flush = inner.flush
        self.response_end = inner.response_end

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        if body and head.status not in _NO_BODY and self._eligible(head):
            self._start(head)
        self._inner.response_head(head, body, close, extra)

    def _eligible(self, head: ResponseHead) -> bool:
        """Compress this response? Adds Vary when the answer depends on the client's Accept-Encoding."""
        spec = self._spec
        if head.field(b"content-encoding") is not None or head.field(b"content-range") is not None:
            return False
        if not type_matches(head.field(b"content-type"), spec.types):
            return False
        cache_control = head.field(b"cache-control")
        if cache_control is not None and b"no-transform" in cache_control.lower():
            return False
        length = head.content_length
        if length is not None and length < spec.min_size:
            return False
        if not self._accepts:
            vary = _vary_with(head.field(b"vary"))
            if vary is not None:
                head.headers = [(n, v) for n, v in head.headers if n.lower() != b"vary"] + [(b"Vary", vary)]
            return False
        return True

    def _start(self, head: ResponseHead) -> None:
        fields: list[tuple[bytes, bytes]] = []
        vary = _vary_with(head.field(b"vary"))
        for name, value in head.headers:
            lower = name.lower()
            if lower == b"content-length" or lower == b"vary" and vary is not None:
                continue
            if lower == b"etag" and not value.startswith(b"W/"):
                value = b"W/" + value
            fields.append((name, value))
        fields.append((b"Content-Encoding", b"gzip"))
        if vary is not None:
            fields.append((b"Vary", vary))
        head.headers = fields
        head.content_length = None
        self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, _GZIP_WBITS)
        self.response_data = self._compress_data
        self.flush = self._compress_flush
        self.response_end = self._compress_end

    def _compress_data(self, data: bytes) -> None:
        out = self._compressor.compress(data)
        if out:
            self._inner.response_data(out)

    def _compress_flush(self) -> None:
        # The end of one upstream read: what it carried reaches the client now (a few bytes of overhead).
        out = self._compressor.flush(zlib.Z_SYNC_FLUSH)
        if out:
            self._inner.response_data(out)
        self._inner.flush()

    def _compress_end(self) -> None:
        compressor, self._compressor = self._compressor, None
        if compressor is not None:
            self._inner.response_data(compressor.flush(zlib.Z_FINISH))
        self._inner.response_end()


def wrap(exchange: "Exchange", spec: CompressSpec) -> None:
    """Give an exchange (not started yet) the compressing side, unless its request cannot get a compressed body."""
    if exchange.head.method != b"HEAD":
        exchange.client = CompressingSide(exchange.client, spec, exchange.head)
