"""The client side of an exchange: what an L{labelgw.http.exchange.Exchange} asks of the connection (HTTP/1.1)
or stream (HTTP/2) its request came from. The counterpart of L{labelgw.http.upstream.ResponseSink}.

The exchange decides what happens (relay, retry, fail, tunnel); the client side decides how it looks on the
wire: HTTP/1.1 writes a response head with the framing it chooses (Content-Length, chunked, or delimited by the
close) and the body in it; HTTP/2 sends HEADERS and DATA frames within the flow-control windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from labelgw.http.parser import ResponseHead
from labelgw.http.transport import Producer

if TYPE_CHECKING:
    from labelgw.http.exchange import Exchange


class ClientSide(Protocol):
    # X-Forwarded-For / -Proto / -Port as the upstream request states them.
    peer_ip: bytes
    proto: bytes
    local_port: bytes
    # The access log's line kind for this side (labelgw.http.linekind.LineKind; accesslog.NO_KIND to start with),
    # and who keeps it for the connection's next request when this side is made per request (an HTTP/2 stream's
    # connection, a wrapper's inner side), or None.
    log_kind: Any
    log_kind_keeper: Any
    # An HTTP/2 stream, or a side that wraps one (the access log's protocol: HTTP/2; else the request's version).
    # Stated by the side, never probed for: a middleware's wrapper copies it from the side it wraps.
    is_http2: bool

    # The response.

    def interim_head(self, head: ResponseHead) -> None:
        """A 1xx response other than 101 (100 Continue, 103 Early Hints): relayed where the client can take it."""

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        """The final response head. `body`: a body follows (its length is head.content_length when known);
        `close`: the client connection must close after this response; `extra`: field lines labelgw adds, each
        ending in CRLF (a version cookie), or b""."""

    def response_data(self, data: bytes) -> None:
        """Body bytes, in order; may be held until L{flush}."""

    def flush(self) -> None:
        """The end of one upstream read: send what is held."""

    def response_end(self) -> None:
        """The response is complete."""

    def error_response(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        """A response of labelgw's own (502, 503, 504, ...) instead of the upstream's, which has not started."""

    def abort(self, reason: str) -> None:
        """The response cannot be completed (it has started): cut it so that the client cannot take it as whole."""

    # Back-pressure.

    def set_response_producer(self, producer: Producer | None) -> None:
        """What to pause (pauseProducing / resumeProducing) while the client does not take the response: the
        upstream's transport, or None when the response no longer streams."""

    def pause_request_body(self, paused: bool) -> None:
        """Stop (or restart) taking the request body from the client: nowhere to send it yet, or the upstream's
        buffer is full."""

    # Tunnels (Upgrade).

    def start_tunnel(self, head: ResponseHead, exchange: "Exchange") -> None:
        """The upstream switched protocols (101): relay the head, then bytes both ways (client bytes go to
        exchange.client_tunnel_data)."""

    def tunnel_data(self, data: bytes) -> None:
        """Bytes of the upgraded protocol from the upstream."""

    # The end.

    def exchange_done(self, exchange: "Exchange", close: bool) -> None:
        """The exchange released its counters; `close`: the client connection must not serve another request."""


class RequestSide(ClientSide, Protocol):
    """A client side as the dispatcher sees it: it may also answer a request that gets no exchange."""

    def refuse(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        """Answer the current request with labelgw's own response (308, 404, 503) and go on (or close)."""


class WholeClientSide(ClientSide, Protocol):
    """A client side that also takes a whole small response in one call (HTTP/1.1: labelgw.http.server)."""

    def response_whole(self, head: ResponseHead, close: bool, extra: bytes, body: bytes) -> None:
        """A final response whose whole body (framed by its length) came with its head: response_head (a body
        follows), response_data and response_end in one call."""
