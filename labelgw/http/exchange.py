"""One request's trip through labelgw: pick a backend, get a connection, relay the request body, relay the
response, retry where that is safe, and account for it all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from labelgw.backends import Backend
from labelgw.http.fastwrite import write_now
from labelgw.http.headers import client_response_head, error_response, upstream_request_head
from labelgw.http.parser import LAST_CHUNK, ChunkedDecoder, RequestHead, ResponseHead, encode_chunk
from labelgw.http.upstream import UpstreamConnection
from labelgw.routes import Route

if TYPE_CHECKING:
    from labelgw.http.server import ClientConnection

# A request whose bytes reached an upstream may be sent again only when it is idempotent (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class _Pauser:
    """Lets one transport's buffer pause the other side's reading, without the cascade of stopProducing."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Exchange:
    # Defaults as class attributes: an exchange sets only what differs, on a path taken per request.
    upstream: UpstreamConnection | None = None
    finished = False
    response_started = False
    body_sent_upstream = False
    tunnel = False
    attempts = 1
    _pending: list[bytes] | None = None
    _pending_size = 0
    _client_chunked = False
    _registered_upstream_producer = False
    _registered_client_producer = False
    _ttfb = 0.0
    _gateway_error = False
    # The version this request goes to (services split by version), and the cookie line that makes it stick.
    version: str | None = None
    pinned = False
    response_extra = b""

    def __init__(self, client: "ClientConnection", head: RequestHead, route: Route, backend: Backend) -> None:
        self.client = client
        self.gateway = client.gateway
        self.head = head
        self.route = route
        self.backend = backend
        self._out: list[bytes] = []
        if head.chunked:
            self.body_done = False
            self._decoder: ChunkedDecoder | None = ChunkedDecoder()
            self._remaining = 0
        else:
            self.body_done = not head.content_length
            self._decoder = None
            self._remaining = head.content_length or 0
        self._client_close = not head.keep_alive
        self._started_at = self.gateway.clock.seconds()
        self._head_bytes = upstream_request_head(
            head, route.upstream_path(head.target), client.peer_ip, client.proto, client.local_port
        )
        self.gateway.in_flight += 1
        backend.in_flight += 1
        backend.requests += 1
        route.service.policy.on_start(backend)

    # Starting and connecting.

    def start(self) -> None:
        connection = self.gateway.pool.acquire(self.backend, self)
        if connection is not None:
            self.upstream_connected(connection)

    def upstream_connected(self, connection: UpstreamConnection) -> None:
        if self.finished:
            connection.detach()
            return
        self.upstream = connection
        connection.send(self, self._head_bytes, self.head.method == b"HEAD", body_pending=not self.body_done)
        if self._pending:
            self.body_sent_upstream = True
            connection.transport.write(b"".join(self._pending))
            self._pending = None
            self._pending_size = 0
            self.client.set_paused("pending", False)
        if not self.body_done:
            self._register_client_producer(connection)

    def upstream_connect_failed(self, reason: Failure) -> None:
        if self.finished:
            return
        # Nothing reached the backend: any method may go to another one.
        self._count_failure()
        if not self._retry(f"connect to {self.backend.address}:{self.backend.port} failed: {reason.getErrorMessage()}"):
            self._fail(502, f"could not connect to service {self.route.service.name!r} ({reason.getErrorMessage()})")

    def _retry(self, why: str, same_backend_ok: bool = False) -> bool:
        """Send the request once more: to another ready backend, or, when `same_backend_ok` (a pooled
        connection the backend had closed), over a new connection to the same one. After a stale pooled
        connection the retry always takes a new connection: other idle ones may be just as stale."""
        if self.attempts >= 2 or self.response_started or not self.gateway.retry_budget_allows():
            return False
        failed = self.backend
        backend = self.route.service.pick(exclude=failed, version=self.version, pinned=self.pinned)
        if backend is None or backend is failed:
            if not same_backend_ok:
                return False
            backend = failed
        self.gateway.log.debug("retrying: {why}", why=why)
        self._release_backend(failed=True)
        self.attempts += 1
        self.gateway.retries += 1
        self.gateway.active_retries += 1
        self.backend = backend
        backend.in_flight += 1
        backend.requests += 1
        self.route.service.policy.on_start(backend)
        self._started_at = self.gateway.clock.seconds()
        self.upstream = None
        if same_backend_ok:
            self.gateway.pool.connect(backend, self)
        else:
            self.start()
        return True

    # The request body, as the client sends it.

    def client_body(self, data: bytes) -> bytes:
        """Relay body bytes; returns what follows the body (a pipelined request) once the body is complete."""
        rest = b""
        decoder = self._decoder
        if decoder is None:
            remaining = self._remaining
            if len(data) > remaining:
                data, rest = data[:remaining], data[remaining:]
            self._remaining = remaining - len(data)
            out = [data] if data else []
            if self._remaining == 0:
                self.body_done = True
        else:
            pieces = decoder.feed(data)  # HttpError goes to the caller: 400 and close
            out = [encode_chunk(piece) for piece in pieces if piece]
            if decoder.done:
                out.append(LAST_CHUNK)
                rest = decoder.rest
                self.body_done = True
        if out:
            self._send_upstream(out)
        if self.body_done:
            self._unregister_client_producer()
            upstream = self.upstream
            if upstream is not None:
                upstream.request_complete()
        return rest

    def _send_upstream(self, pieces: list[bytes]) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            self.body_sent_upstream = True
            upstream.transport.writeSequence(pieces)
        elif upstream is None:
            if self._pending is None:
                self._pending = []
            self._pending.extend(pieces)
            self._pending_size += sum(len(piece) for piece in pieces)
            if self._pending_size > self.gateway.settings.pending_body_limit:
                self.client.set_paused("pending", True)

    # The response, as the upstream sends it.

    def response_head(self, head: ResponseHead, connection: UpstreamConnection) -> None:
        client = self.client
        status = head.status
        if status < 200 and status != 101:
            # Interim response: relay 100 Continue and friends, except to HTTP/1.0 clients.
            if self.head.version == b"HTTP/1.1":
                client.transport.write(client_response_head(head, b"", close=False))
            return
        now = self.gateway.clock.seconds()
        self._ttfb = now - self._started_at
        self.response_started = True
        if status == 101:
            if self.head.upgrade is None:
                self._abort_upstream()
                self._fail(502, "upstream switched protocols without being asked")
                return
            self.tunnel = True
            client.transport.write(client_response_head(head, b"", close=False, upgrade=True))
            client.start_tunnel(self)
            self._register_client_producer(connection)
            self._register_upstream_producer(connection)
            return
        if status >= 500:
            self.backend.errors += 1
            # A 5xx counts against the backend (outlier ejection, latency penalty), like Envoy's consecutive_5xx.
            self._gateway_error = True
        no_body = self.head.method == b"HEAD" or status == 204 or status == 304
        if no_body:
            framing = b"Content-Length: %d\r\n" % head.content_length if head.content_length is not None else b""
        elif head.content_length is not None:
            framing = b"Content-Length: %d\r\n" % head.content_length
        elif self.head.version == b"HTTP/1.1":
            # Chunked, or delimited by close upstream: chunked to the client keeps its connection alive.
            framing = b"Transfer-Encoding: chunked\r\n"
            self._client_chunked = True
        else:
            framing = b""
            self._client_close = True
        if not self.body_done:
            # The upstream answered before the whole body arrived: the rest cannot be skipped safely.
            self._client_close = True
        if self.response_extra:
            framing += self.response_extra
        # Held until the end of this upstream read: head and body then leave in one send (one TCP segment).
        self._out.append(client_response_head(head, framing, self._client_close or client.draining))

    def response_data(self, data: bytes) -> None:
        self._out.append(encode_chunk(data) if self._client_chunked else data)

    response_chunk = response_data

    def flush(self) -> None:
        """End of one upstream read: send what it produced; a response still streaming gets back-pressure."""
        out = self._out
        if out:
            write_now(self.client.transport, out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if not self.finished and not self._registered_upstream_producer and self.upstream is not None:
            self._register_upstream_producer(self.upstream)

    def response_done(self) -> None:
        if self.finished:
            return
        if self._client_chunked:
            self._out.append(LAST_CHUNK)
        if self._out:
            write_now(self.client.transport, b"".join(self._out))
            self._out.clear()
        upstream = self.upstream
        if self._registered_client_producer or self._registered_upstream_producer:
            self._unregister_producers()
        if upstream is not None:
            if not self.body_done:
                upstream.reusable = False
            upstream.detach()
        self._complete(failed=self._gateway_error)

    def upstream_failed(self, status: int, reason: str, retryable: bool = False) -> None:
        if self.finished:
            return
        upstream = self.upstream
        self._unregister_producers()
        self._count_failure()
        if not self.response_started:
            # Replayable: the upstream closed without answering (`retryable`: never a malformed response or a
            # timeout, which say the request may have been acted on), the method is idempotent and nothing but
            # the head reached the upstream (RFC 9110 9.2.2). Failures before a byte was written (connect) are
            # retried for every method, in upstream_connect_failed.
            if retryable and self.head.method in IDEMPOTENT and not self.body_sent_upstream:
                stale = upstream is not None and upstream.reused
                if self._retry(reason, same_backend_ok=stale):
                    return
            self._fail(status, f"service {self.route.service.name!r}: {reason}")
        else:
            # Part of the response already reached the client: all we can do is cut the connection, and no
            # pipelined request behind it may start.
            self._client_close = True
            self._complete(failed=True)
            self.client.abort()

    # Tunnels (WebSocket and other upgrades).

    def tunnel_data(self, data: bytes) -> None:
        self.client.transport.write(data)

    def tunnel_closed(self) -> None:
        # A pauser left registered would keep a paused client transport from ever closing.
        self._unregister_producers()
        self._complete(failed=False)
        self.client.transport.loseConnection()

    def client_tunnel_data(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            upstream.transport.write(data)

    # The client went away.

    def client_lost(self) -> None:
        if self.finished:
            return
        self._unregister_producers()
        self._abort_upstream()
        # The client gave up: how long that took says nothing about the backend.
        self._complete(failed=False, observe=False)

    # Ending.

    def _fail(self, status: int, message: str) -> None:
        extra = b"Retry-After: 1\r\n" if status == 503 else b""
        # An unread request body would be taken for the next request: close instead.
        self._client_close = self._client_close or not self.body_done
        self.client.transport.write(
            error_response(status, message, self._client_close, extra, head_only=self.head.method == b"HEAD")
        )
        self._complete(failed=True)

    def _count_failure(self) -> None:
        self.backend.errors += 1

    def _release_backend(self, failed: bool, observe: bool = True) -> None:
        backend = self.backend
        backend.in_flight -= 1
        if observe:
            # Time to the response head: a long download or a WebSocket must not look like a slow backend.
            elapsed = self._ttfb if self.response_started else self.gateway.clock.seconds() - self._started_at
            self.route.service.policy.on_finish(backend, elapsed, failed)

    def _complete(self, failed: bool, observe: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        self.gateway.in_flight -= 1
        if self.attempts > 1:
            self.gateway.active_retries -= 1
        self._release_backend(failed, observe and not self.tunnel)
        if not self.tunnel:
            self.client.exchange_done(self, close=self._client_close)

    def _abort_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()

    def _register_client_producer(self, connection: UpstreamConnection) -> None:
        if not self._registered_client_producer and connection.connected:
            connection.transport.registerProducer(_Pauser(self.client.transport), True)
            self._registered_client_producer = True

    def _register_upstream_producer(self, connection: UpstreamConnection) -> None:
        if not self._registered_upstream_producer and connection.connected:
            self.client.transport.registerProducer(_Pauser(connection.transport), True)
            self._registered_upstream_producer = True

    def _unregister_client_producer(self) -> None:
        if self._registered_client_producer:
            self._registered_client_producer = False
            upstream = self.upstream
            if upstream is not None and upstream.connected:
                upstream.transport.unregisterProducer()
            # The pauser may have left the client paused; our own reasons decide from here on.
            self.client.sync_paused()

    def _unregister_producers(self) -> None:
        self._unregister_client_producer()
        if self._registered_upstream_producer:
            self._registered_upstream_producer = False
            self.client.transport.unregisterProducer()
            upstream = self.upstream
            if upstream is not None and upstream.connected:
                upstream.transport.resumeProducing()
