"""Connections to backends: an HTTP/1.1 client protocol that relays one response at a time to an exchange, and
a pool of idle keep-alive connections per backend."""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.core.backends import Backend
from labelgw.http.fastwrite import write_now
from labelgw.http.framing import MAX_HEAD_BYTES, UNTIL_CLOSE, BodyReader, HttpError, find_head_end, response_reader
from labelgw.http.parser import (
    MAX_REMEMBERED_HEAD, ResponseFields, ResponseHead, parse_response_lines, response_fields, response_from,
)
from labelgw.http.transport import DataProtocol

if TYPE_CHECKING:
    from labelgw.http.settings import ProxySettings


class ResponseSink(TypingProtocol):
    """What an upstream connection reports to the exchange it serves."""

    def upstream_connected(self, connection: "UpstreamConnection") -> None: ...

    def upstream_connect_failed(self, reason: Failure) -> None: ...

    def response_head(self, head: ResponseHead, connection: "UpstreamConnection") -> None: ...

    def response_data(self, data: bytes) -> None:
        """Payload of the response body (de-chunked), never empty."""

    def response_done(self) -> None: ...

    def response_whole(self, head: ResponseHead, connection: "UpstreamConnection", body: bytes) -> None:
        """A final response whose whole body (not empty, framed by Content-Length) came with its head: what
        response_head, response_data and response_done say, in one call."""

    def flush(self) -> None: ...

    def upstream_failed(self, status: int, reason: str, retryable: bool = False) -> None:
        """The exchange on this connection failed; the connection is already closed and never pooled.
        `retryable`: the upstream closed the connection before sending a byte of the response, so the request may
        be sent again if its method allows; never for a malformed response or a timeout."""

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_closed(self) -> None: ...


# What the connection is reading.
_IDLE, _HEAD, _BODY, _TUNNEL, _ABORTED = range(5)
# Is there anything (or an EOF, or an error) the reactor has not read yet? One poll(2) with a zero timeout on a
# poll object kept per connection: no exception on the common answer (a peek raises BlockingIOError then).
_POLL_IN = select.POLLIN
_TCP_CLIENT = tcp.Client


class UpstreamConnection(DataProtocol):
    _log = Logger()
    # has_unread's poll object, the socket it watches and that socket's descriptor.
    _poller: Any = None
    _polled: Any = None
    _polled_fd = -1
    # The plain TCP transport whose socket that is (None: none, or not a tcp.Client); also set in __init__.
    _polled_transport: Any = None

    def __init__(self, pool: "UpstreamPool", backend: Backend) -> None:
        self.pool = pool
        self.backend = backend
        self.sink: ResponseSink | None = None
        self.connected = False
        self.reused = False
        self.reusable = True
        self.head_only = False
        self.response_started = False
        self._mode = _IDLE
        self._buffer = b""
        # True once a byte of the current response arrived (a close after that is not retryable).
        self._answered = False
        self._reader: BodyReader | None = None
        self._sent_at = 0.0
        self._response_timeout = pool.settings.response_timeout
        self._idle_since = 0.0
        # The response timeout runs from the end of the request body, not from its head.
        self.body_pending = False
        # The one timer (None: none pending) and when it fires, kept here: re-arming costs no DelayedCall calls.
        self._timer: Any = None
        self._timer_at = 0.0
        # The last response head this connection parsed, as bytes (blank line included) and as parsed (b"": none
        # yet, never matched).
        self._last_head = b""
        self._last_fields: ResponseFields | None = None
        # The plain TCP transport whose socket has_unread polls (None: none, or not a tcp.Client), set in the
        # instance: read once per request.
        self._polled_transport = None

    # Lifecycle.

    def connectionMade(self) -> None:
        self.connected = True
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self._arm(self.pool.settings.response_timeout, self.pool.clock.seconds())
        sink = self.sink
        if sink is None:
            self.pool.release(self)
        else:
            sink.upstream_connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.reusable = False
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        sink, self.sink = self.sink, None
        if sink is None:
            self.pool.forget(self)
            return
        mode = self._mode
        self._mode = _IDLE
        if mode == _BODY:
            reader, self._reader = self._reader, None
            try:
                if reader is not None:
                    reader.read_eof()
            except HttpError:
                sink.upstream_failed(502, "upstream closed the connection mid-response")
            else:
                sink.response_done()
        elif mode == _TUNNEL:
            sink.tunnel_closed()
        else:
            answered = self._answered
            sink.upstream_failed(
                502, "upstream closed the connection" + (" mid-head" if answered else ""), retryable=not answered
            )

    def send(
        self, sink: ResponseSink, head: bytes, head_only: bool, body_pending: bool = False, now: float | None = None
    ) -> None:
        """Start one exchange on this connection: write the request head and wait for the response. `now`: the
        clock's time, when the caller has just read it."""
        self.sink = sink
        self.head_only = head_only
        self.body_pending = body_pending
        self.response_started = False
        self._mode = _HEAD
        self._buffer = b""
        self._answered = False
        if now is None:
            now = self.pool.clock.seconds()
        self._sent_at = now
        # Kept for this request: a configuration reloaded meanwhile applies to the next one.
        self._response_timeout = limit = self.pool.settings.response_timeout
        timer = self._timer
        if timer is not None and self._timer_at > now + limit:
            timer.reset(limit)
            self._timer_at = now + limit
        write_now(self.transport, head)

    def request_complete(self) -> None:
        """The whole request body went out: the response timeout starts now."""
        self.body_pending = False
        now = self.pool.clock.seconds()
        self._sent_at = now
        timer = self._timer
        if timer is not None and self._timer_at > now + self._response_timeout:
            timer.reset(self._response_timeout)
            self._timer_at = now + self._response_timeout

    def abort(self) -> None:
        """The exchange gave up on this connection (client gone, bad response): never reuse it."""
        self.sink = None
        self.reusable = False
        self._mode = _ABORTED
        if self.connected:
            self.transport.abortConnection()

    def detach(self, now: float | None = None) -> None:
        """The exchange is done with this connection after a complete response: pool it or close it. `now`: the
        clock's time, when the caller has just read it."""
        self.sink = None
        self._mode = _IDLE
        # UpstreamPool.release's common case written out (a call less per request): back to the idle list, the
        # time noted, the timer left as it is when it fires soon enough.
        pool = self.pool
        backend = self.backend
        settings = pool.settings
        if self.reusable and self.connected and backend.ready and len(backend.idle) < settings.max_idle_per_backend:
            backend.idle.append(self)
            if now is None:
                now = pool.clock.seconds()
            self._idle_since = now
            limit = settings.upstream_idle_timeout
            if self._timer is None or self._timer_at > now + limit:
                pool.release_timer(self, now, limit)
        else:
            pool.release(self)

    def has_unread(self) -> bool:
        """Whether the backend sent bytes, or closed, since the last response ended, and the reactor has not read
        them yet: a connection must not be handed to a new request then (those bytes would be read as its
        response). One poll(2) of the socket with a zero timeout (readable: a byte, or EOF; or an error: either way
        not a clean idle connection). A TLS connection is not polled: its socket may hold TLS records that are no
        response bytes (session tickets); bytes it reads while idle still close it."""
        transport: Any = self.transport
        handle: Any
        if transport is self._polled_transport:
            # A plain TCP transport polled before: its socket is the one polled (tcp.Client keeps one for its life),
            # found without the getHandle call.
            handle = self._polled
        else:
            # Not every transport has a handle (a memory transport has none).
            get_handle = getattr(transport, "getHandle", None)
            try:
                handle = get_handle() if get_handle is not None else None
            except AttributeError:
                return False
        if self._poller is None or handle is not self._polled or handle.fileno() != self._polled_fd:
            if not isinstance(handle, socket.socket):
                return False
            poller = select.poll()
            try:
                poller.register(handle, _POLL_IN)
            except (ValueError, OSError):
                return True  # a closed socket
            self._poller, self._polled, self._polled_fd = poller, handle, handle.fileno()
            if type(transport) is _TCP_CLIENT:
                self._polled_transport = transport
        try:
            return bool(self._poller.poll(0))
        except OSError:
            return True

    def _arm(self, delay: float, now: float) -> None:
        self._timer = self.pool.clock.callLater(delay, self._check_timers)
        self._timer_at = now + delay

    # Timers: one per connection, re-armed lazily so a request costs no timer work in the common case.

    def _check_timers(self) -> None:
        self._timer = None
        if not self.connected:
            return
        settings = self.pool.settings
        now = self.pool.clock.seconds()
        if self._mode == _HEAD and not self.body_pending:
            deadline = self._sent_at + self._response_timeout
            if now >= deadline:
                sink = self.sink
                self.abort()
                if sink is not None:
                    sink.upstream_failed(504, f"no response from upstream within {self._response_timeout:g} s")
                return
        elif self._mode == _IDLE and self.sink is None:
            deadline = self._idle_since + settings.upstream_idle_timeout
            if now >= deadline:
                self.discard()
                return
        else:
            deadline = now + settings.response_timeout
        self._arm(max(deadline - now, 0.001), now)

    # Response parsing.

    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        if mode != _HEAD:
            if mode == _BODY:
                self._read_body(data)
            else:
                self._relay(data)
            sink = self.sink
            if sink is not None:
                sink.flush()
            return
        # The response head (and what came with it), read here rather than in a method of its own: a call less per
        # response. Every way out that leaves a sink flushes it (the end of this upstream read).
        sink = self.sink
        if sink is None:
            return
        self._answered = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            try:
                last = self._last_head
                if last and buffer.startswith(last):
                    # The same head as the last response's, its blank line included (a keep-alive backend repeats
                    # itself): it ends where that one did, and it parses as that one did.
                    end = len(last) - 4
                    fields = self._last_fields
                    if fields is not None:
                        head = response_from(fields)
                    else:
                        # Seen twice in a row: its parse is kept from now on (header rules change the head itself,
                        # never the fields).
                        head = parse_response_lines(last[:-2])
                        self._last_fields = response_fields(head)
                else:
                    end = buffer.find(b"\r\n\r\n")
                    if end == -1 or end + 4 > MAX_HEAD_BYTES:
                        # Refuses a head over the size cap, or one ended by a bare LF (labelgw.http.framing).
                        end = find_head_end(buffer)
                        if end == -1:
                            self._buffer = buffer
                            sink.flush()
                            return
                    # The head with its last line's CRLF.
                    head = parse_response_lines(buffer[: end + 2])
                    if end < MAX_REMEMBERED_HEAD:
                        # Only the bytes: a head that never comes again costs no more than this store.
                        self._last_head, self._last_fields = buffer[: end + 4], None
            except HttpError as error:
                self._fail(502, error.reason)
                return
            buffer = buffer[end + 4 :]
            status = head.status
            if 100 <= status < 200 and status != 101:
                # Interim responses (100 Continue, 103 Early Hints) go to the client; the final one follows.
                sink.response_head(head, self)
                if self.sink is None:
                    return
                continue
            break
        self._buffer = b""
        self.response_started = True
        if not head.keep_alive:
            self.reusable = False
        if status == 101:
            self._mode = _TUNNEL
            self.reusable = False
            sink.response_head(head, self)
            if buffer and self.sink is not None:
                self.sink.tunnel_data(buffer)
            self._flush_sink()
            return
        head_only = self.head_only
        if (
            buffer and len(buffer) == head.content_length and not head_only and status != 204 and status != 304
        ):
            # The whole body came with the head (nearly every small response): no reader, one call to the sink.
            # (A final status, a Content-Length and no HEAD: what response_reader would frame by that length.)
            self._mode = _IDLE
            self._reader = None
            sink.response_whole(head, self, buffer)
            if self.sink is not None:
                self.sink.flush()
            return
        reader = response_reader(head, head_only)
        if reader is None:
            self._mode = _IDLE
            sink.response_head(head, self)
            if buffer:
                # A body (or anything) where none may be: the connection's framing cannot be trusted.
                self.reusable = False
            self._finish()
            self._flush_sink()
            return
        if reader.kind == UNTIL_CLOSE:
            self.reusable = False
        # Read what came with the head before the head goes anywhere: a body that is malformed from its first
        # bytes is still a clean 502 to a client that has received nothing. Small responses finish right here.
        try:
            pieces = reader.feed(buffer) if buffer else []
        except HttpError as error:
            self._fail(502, error.reason)
            return
        self._mode = _BODY
        self._reader = reader
        sink.response_head(head, self)
        if self.sink is not None:
            self._deliver(pieces, reader)
        self._flush_sink()

    def _flush_sink(self) -> None:
        sink = self.sink
        if sink is not None:
            sink.flush()

    def _relay(self, data: bytes) -> None:
        """Bytes outside a response: a tunnel's, or unasked for."""
        mode = self._mode
        if mode == _TUNNEL:
            sink = self.sink
            if sink is not None:
                sink.tunnel_data(data)
        elif mode == _IDLE:
            # Bytes from an idle upstream connection: nothing asked for them.
            self.discard()
        # _ABORTED: what a connection we gave up on still delivers is dropped.

    def _read_body(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            return
        try:
            pieces = reader.feed(data)
        except HttpError as error:
            self._fail(502, error.reason)
            return
        self._deliver(pieces, reader)

    def _deliver(self, pieces: list[bytes], reader: BodyReader) -> None:
        sink = self.sink
        if sink is not None:
            for piece in pieces:
                sink.response_data(piece)
        if reader.done:
            if reader.rest:
                # Bytes after the announced end: the upstream is broken; never reuse this connection.
                self.reusable = False
            self._finish()

    def discard(self) -> None:
        """Close an idle connection, out of the pool first so no request can take it meanwhile."""
        self.reusable = False
        self.pool.forget(self)
        self.transport.loseConnection()

    def _finish(self) -> None:
        self._mode = _IDLE
        self._reader = None
        sink = self.sink
        if sink is not None:
            sink.response_done()

    def _fail(self, status: int, reason: str) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.upstream_failed(status, reason)


class _ConnectFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: "UpstreamPool", backend: Backend, sink: ResponseSink) -> None:
        self.pool = pool
        self.backend = backend
        self.sink: ResponseSink | None = sink

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        connection = UpstreamConnection(self.pool, self.backend)
        connection.sink = self.sink
        self.sink = None
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstream_connect_failed(reason)


class UpstreamPool:
    """Hands out connections to backends: an idle keep-alive connection when one is there, else a new one."""

    _log = Logger()

    def __init__(self, reactor: Any, settings: "ProxySettings") -> None:
        self.reactor = reactor
        self.clock = reactor
        self.settings = settings
        self.open = 0
        self._tls_options: Any = None

    def acquire(self, backend: Backend, sink: ResponseSink) -> UpstreamConnection | None:
        """An idle connection to `backend`, or None after starting a new one that reports to `sink`."""
        idle = backend.idle
        while idle:
            connection = idle.pop()
            if not (connection.connected and connection.reusable):
                continue
            if connection.has_unread():
                # Late bytes after its last response (or its close) wait unread: never before a new request.
                connection.discard()
                continue
            connection.reused = True
            return connection
        self.connect(backend, sink)
        return None

    def connect(self, backend: Backend, sink: ResponseSink) -> None:
        """Open a new connection to `backend`; `sink` hears of its success or failure."""
        factory = _ConnectFactory(self, backend, sink)
        if backend.spec.scheme == "https":
            # TLS on the standard library's ssl, verified with tls.verify=true (labelgw.tls.backends).
            self._backend_tls().connect(
                self.reactor, backend.spec, backend.address, backend.port, factory, self.settings.connect_timeout
            )
        else:
            self.reactor.connectTCP(backend.address, backend.port, factory, timeout=self.settings.connect_timeout)

    def _backend_tls(self) -> Any:
        # Backends behind labelgw.scheme=https: encrypted; verified only with tls.verify=true (containers on the
        # same host mostly serve self-signed certificates, and are reached by IP address).
        if self._tls_options is None:
            from labelgw.tls.backends import BackendTLS

            self._tls_options = BackendTLS()
        return self._tls_options

    def release(self, connection: UpstreamConnection) -> None:
        backend = connection.backend
        if (
            connection.reusable
            and connection.connected
            and backend.ready
            and len(backend.idle) < self.settings.max_idle_per_backend
        ):
            backend.idle.append(connection)
            # Idle from now: its timer must fire by the end of the idle timeout (usually the pending one is
            # already due sooner and re-arms itself).
            connection._idle_since = now = self.clock.seconds()
            self.release_timer(connection, now, self.settings.upstream_idle_timeout)
        elif connection.connected:
            connection.transport.loseConnection()

    def release_timer(self, connection: UpstreamConnection, now: float, limit: float) -> None:
        """An idle connection's timer must fire by the end of the idle timeout (usually the pending one is already
        due sooner and re-arms itself)."""
        timer = connection._timer
        if timer is None:
            connection._arm(limit, now)
        elif connection._timer_at > now + limit:
            timer.reset(limit)
            connection._timer_at = now + limit

    def forget(self, connection: UpstreamConnection) -> None:
        try:
            connection.backend.idle.remove(connection)
        except ValueError:
            pass

    def retire(self, backend: Backend) -> None:
        """The backend left rotation: close its idle connections (its container is going away)."""
        idle, backend.idle = backend.idle, []
        for connection in idle:
            if connection.connected:
                connection.transport.loseConnection()
