"""The client side over HTTP/1.1: one strict connection, its timers, pipelining and tunnels, as the client side of
each exchange (labelgw.http.sides.ClientSide); and the Gateway, the state every connection shares (route table,
upstream pool, counters)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.http.accesslog import NO_KIND
from labelgw.http.dispatch import dispatch
from labelgw.http.exchange import Exchange, WholeExchange
from labelgw.http.fastwrite import write_now
from labelgw.http.headers import client_response_head, error_response
from labelgw.http.framing import (
    LAST_CHUNK, BodyReader, HttpError, encode_chunk, find_head_end, request_reader,
)
from labelgw.http.parser import (
    MAX_REMEMBERED_HEAD, RequestFields, RequestHead, ResponseHead, parse_request_lines, request_fields, request_from,
)
from labelgw.http.settings import ProxySettings
from labelgw.http.states import CONNECTION_MOVES, ConnectionState, check_move, sources
from labelgw.http.transport import DataProtocol, GatewayConnection, Producer
from labelgw.http.upstream import UpstreamPool
from labelgw.http.versioning import DEFAULT_VERSION_HEADER
from labelgw.core.canary import CanaryAnalyzer
from labelgw.http.requestid import RequestIds
from labelgw.core.routes import RouteTable

_IDLE = ConnectionState.IDLE
_HEAD = ConnectionState.HEAD
_BODY = ConnectionState.BODY
_RESPONSE = ConnectionState.RESPONSE
_TUNNEL = ConnectionState.TUNNEL
_CLOSING = ConnectionState.CLOSING
_CLOSED = ConnectionState.CLOSED
# The per-request moves, checked inline against the table (see _move).
_TO_RESPONSE = sources(CONNECTION_MOVES, _RESPONSE)
_TO_IDLE = sources(CONNECTION_MOVES, _IDLE)


class Gateway:
    """Shared by every client connection of every listener."""

    log = Logger()

    def __init__(self, reactor: Any, table: RouteTable, settings: ProxySettings | None = None) -> None:
        self.clock = reactor
        self.table = table
        self.settings = settings or ProxySettings()
        self.pool = UpstreamPool(reactor, self.settings)
        self.service_limit = self.settings.service_in_flight_limit
        # HTTP/1.1 and HTTP/2 connections (labelgw.http.h2.H2Protocol) alike.
        self.connections: set[GatewayConnection] = set()
        self.in_flight = 0
        self.retries = 0
        self.active_retries = 0
        self.draining = False
        self._drained: list[Deferred[None]] = []
        # Lower-case name of the request field that pins a request to one version.
        self.version_header = DEFAULT_VERSION_HEADER
        # Set when plain HTTP is to be answered with a 308 to HTTPS (labelgw.tls.https.HttpsRedirect).
        self.https_redirect: Any = None
        # Canary analysis by version (labelgw.core.canary): fed by every exchange that ends.
        self.canary = CanaryAnalyzer()
        # Per-request counters read by /metrics (labelgw.control.metrics.RequestMetrics); None: metrics off.
        self.metrics: Any = None
        # Host -> the skipped container that asked for it, if any (Registry.rejected_for): named in the 404.
        self.rejected_for: Callable[[str], Any] | None = None
        # The access log (labelgw.http.accesslog.AccessLog; None: --access-log off), request ids and trace context
        # (labelgw.http.requestid), and --debug-headers (which service, version and backend answered).
        self.access_log: Any = None
        self.request_ids = RequestIds()
        self.debug_headers = False
        # --trusted-proxies (labelgw.middleware.access.parse_networks); None: the peer is the client.
        self.trusted_proxies: Any = None

    def retry_budget_allows(self) -> bool:
        # Envoy's retry budget: retries in flight at most max(3, 20 % of the requests in flight).
        return self.active_retries < max(3, self.in_flight // 5)

    def drain(self, grace: float) -> Deferred[None]:
        """Stop keeping connections alive; fires when every connection has closed or after `grace` seconds."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
        done: Deferred[None] = Deferred()
        if not self.connections:
            done.callback(None)
            return done
        self._drained.append(done)

        def give_up() -> None:
            for connection in list(self.connections):
                connection.abort()

        timer = self.clock.callLater(grace, give_up)
        done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return done

    def connection_closed(self, connection: GatewayConnection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for done in waiting:
                done.callback(None)


# Content-Length lines by value, made once (at most 4096 kept): the same few lengths answer most requests.
_LENGTH_LINES: dict[int, bytes] = {}


class ClientConnection(DataProtocol):
    """One HTTP/1.1 client connection: requests parsed and dispatched one at a time (pipelined ones wait), each
    served by an exchange to which this connection is the client side (L{labelgw.http.sides.ClientSide})."""

    is_http2 = False

    state = _IDLE
    # Inside refuse(), which logs the request itself (the access log).
    _refusing = False

    def __init__(self, gateway: Gateway, proto: bytes = b"http") -> None:
        self.gateway = gateway
        self.proto = proto
        self.peer_ip = b""
        # The access log's last line kind (labelgw.http.linekind.LineKind): the next request of a keep-alive
        # connection is most often the same. It is kept here (no other keeper).
        self.log_kind = NO_KIND
        self.log_kind_keeper: Any = None
        self.local_port = b""
        self.exchange: Exchange | None = None
        self.draining = False
        self._buffer = b""
        self._processing = False
        self._requests = 0
        self._head_started = 0.0
        self._idle_since = 0.0
        self._body_seen = 0.0
        self._pause_reasons: set[str] = set()
        # The one timer (None: none pending; never left inactive) and when it fires, kept here so that re-arming
        # it costs no method calls on the DelayedCall.
        self._timer: Any = None
        self._timer_at = 0.0
        # The client's transport is full: since when (0.0: it is not), and what to pause meanwhile (the upstream
        # of a streaming response).
        self._send_blocked_since = 0.0
        self._response_producer: Producer | None = None
        # The request in progress: its head, and the reader of its body (labelgw.http.framing; None: no body, or
        # it is read).
        self._request: RequestHead | None = None
        self._reader: BodyReader | None = None
        # The response in progress: held until the end of one upstream read, chunk-encoded or not, and whether
        # its framing (delimited by the close) ends the connection.
        self._out: list[bytes] = []
        self._chunked = False
        self._close_after = False
        # The last request head this connection parsed, as bytes (blank line included) and as parsed (b"": none
        # yet, never matched).
        self._last_head = b""
        self._last_fields: RequestFields | None = None

    def _move(self, new: ConnectionState) -> None:
        self.state = check_move(CONNECTION_MOVES, self.state, new)

    @property
    def paused(self) -> bool:
        return bool(self._pause_reasons)

    @property
    def tunnel(self) -> bool:
        return self.state is _TUNNEL

    # Lifecycle.

    def connectionMade(self) -> None:
        transport = self.transport
        self.peer_ip = getattr(transport.getPeer(), "host", "").encode("ascii", "replace")
        self.local_port = b"%d" % getattr(transport.getHost(), "port", 0)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        gateway = self.gateway
        gateway.connections.add(self)
        self._idle_since = now = gateway.clock.seconds()
        self._timer = gateway.clock.callLater(gateway.settings.head_timeout, self._check_timers)
        self._timer_at = now + gateway.settings.head_timeout
        # Registered for the connection's life: a client that stops reading is noticed whatever is in progress.
        transport.registerProducer(self, True)
        if gateway.draining:
            self.drain()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._move(_CLOSED)
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._response_producer = None
        # Also when the TLS listener hands a connection that never was HTTP/1.1 over to HTTP/2.
        self.transport.unregisterProducer()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_lost()
        self.gateway.connection_closed(self)

    def drain(self) -> None:
        """Finish the request in progress, then close; an idle connection closes now."""
        self.draining = True
        if self.exchange is None and self.state < _CLOSING:
            self._close()

    def abort(self, reason: str = "") -> None:
        if self.state < _CLOSING:
            self._move(_CLOSING)
        self.transport.abortConnection()

    def close(self) -> None:
        """Close once what was written is sent (the send timeout still applies meanwhile)."""
        self._close()

    def _close(self) -> None:
        if self.state >= _CLOSING:
            return
        self._move(_CLOSING)
        # A registered producer would keep a full transport from ever closing (FileDescriptor.loseConnection).
        self._response_producer = None
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # Reading.

    def _data_in_exchange(self, state: ConnectionState, data: bytes) -> None:
        """Bytes while an exchange is in progress (or the connection closes): body, pipelined, or tunnelled."""
        if state is _RESPONSE:
            # Pipelined bytes while a response is pending: keep them and stop reading until it is done.
            self._buffer += data
            self.set_paused("pipeline", True)
        elif state is _BODY:
            self._body_seen = self.gateway.clock.seconds()
            exchange = self.exchange
            reader = self._reader
            if exchange is None or reader is None:
                return
            try:
                data = self._read_body(exchange, reader, data)
            except HttpError as error:
                self._refuse_body(exchange, error)
                return
            if data:
                self._buffer += data
                self.set_paused("pipeline", True)
        elif state is _TUNNEL:
            exchange = self.exchange
            if exchange is not None:
                exchange.client_tunnel_data(data)

    def _read_body(self, exchange: Exchange, reader: BodyReader, data: bytes) -> bytes:
        """Relay request body bytes; returns what follows the body (a pipelined request) once it is complete."""
        for piece in reader.feed(data):  # HttpError goes to the caller: 400 and close
            exchange.request_data(piece)
        if reader.done:
            self._body_end(exchange)
            return reader.rest
        return b""

    def _body_end(self, exchange: Exchange) -> None:
        self._reader = None
        if self.state is _BODY:
            self._move(_RESPONSE)
        exchange.request_end()

    def _process(self) -> None:
        """Parse and dispatch what the buffer holds: dataReceived with no new bytes."""
        self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state >= _BODY:
            self._data_in_exchange(state, data)
            return
        # IDLE or HEAD: (more of) a request head. The heads in the buffer are parsed and dispatched one at a time
        # here (pipelined ones wait for the exchange before them): _process's loop, a call less per request.
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        self._processing = True
        try:
            while self.exchange is None and self._buffer and self.state < _CLOSING:
                if self._send_blocked_since:
                    # Responses already wait for a client that does not read: buffer no more of them.
                    self.set_paused("pipeline", True)
                    return
                buffer = self._buffer
                try:
                    last = self._last_head
                    # (`==` first: a read that holds just the head, the common case, is compared without the
                    # argument parsing of a startswith call.)
                    if buffer == last or last and buffer.startswith(last):
                        # The same head as the last request's, its blank line included (keep-alive clients repeat
                        # themselves): it ends where that one did (its first CRLFCRLF, within the size cap), and it
                        # parses as that one did.
                        end = len(last) - 4
                        fields = self._last_fields
                        if fields is not None:
                            head = request_from(fields)
                        else:
                            # Seen twice in a row: its parse is kept from now on (dispatch and middlewares change
                            # the head itself, never the fields).
                            head = parse_request_lines(last[:-2])
                            self._last_fields = request_fields(head)
                    else:
                        first = buffer[0]
                        if first == 13 or first == 10:
                            # RFC 9112 section 2.2: empty lines before a request line are ignored (a kept head
                            # never starts with one).
                            buffer = self._buffer = buffer.lstrip(b"\r\n")
                            if not buffer:
                                return
                        # Refuses at once a head over the size cap, or one ended by a bare LF (labelgw.http.framing).
                        end = find_head_end(buffer)
                        if end == -1:
                            if self.state is _IDLE:
                                # A head that does not arrive whole gets an absolute deadline (slow clients).
                                self._move(_HEAD)
                                self._head_started = self.gateway.clock.seconds()
                                self._rearm(self.gateway.settings.head_timeout)
                            return
                        # The head with its last line's CRLF.
                        head = parse_request_lines(buffer[: end + 2])
                        if end < MAX_REMEMBERED_HEAD:
                            # Only the bytes (the buffer itself when it holds just this head): a head that never
                            # comes again costs no more than this store.
                            self._last_head, self._last_fields = buffer[: end + 4], None
                except HttpError as error:
                    self.send_error(error.status, error.reason, close=True)
                    return
                self._buffer = buffer[end + 4 :]
                self._requests += 1
                # _dispatch's common case (no body) written out: a call less per request.
                self._request = head
                # Route lookup, redirect, 404/503, version choice: labelgw.http.dispatch, shared with HTTP/2.
                exchange = dispatch(self.gateway, head, self, WholeExchange)
                if exchange is None:
                    continue
                # The framing decision (labelgw.http.framing): None, with no object made, for the common request
                # without a body.
                self.exchange = exchange
                reader = self._reader = request_reader(head)
                if reader is not None:
                    self._body_start(exchange, reader)
                    continue
                if self.state not in _TO_RESPONSE:
                    self._move(_RESPONSE)  # refused: raises StateError
                self.state = _RESPONSE
                exchange.start()
            if self.exchange is not None and self._buffer:
                self.set_paused("pipeline", True)
        finally:
            self._processing = False

    def _body_start(self, exchange: Exchange, reader: BodyReader) -> None:
        """Start a dispatched request that has a body (_process starts the others itself)."""
        self._move(_BODY)
        exchange.start()
        if self.state is _BODY and self.exchange is exchange:
            self._body_seen = self.gateway.clock.seconds()
            self._rearm_within(self.gateway.settings.body_timeout)
            if self._buffer:
                data, self._buffer = self._buffer, b""
                try:
                    self._buffer = self._read_body(exchange, reader, data)
                except HttpError as error:
                    self._refuse_body(exchange, error)

    def _refuse_body(self, exchange: Exchange, error: HttpError) -> None:
        started = exchange.response_started
        self.exchange = None
        if not started:
            # For the access log: labelgw's answer, not a client that went away.
            exchange.status, exchange.error_message = error.status, error.reason
        exchange.client_lost()
        if not started:
            self.transport.write(error_response(error.status, error.reason, close=True))
        self._close()

    # Answers of labelgw's own.

    def send_error(self, status: int, message: str, close: bool, extra: bytes = b"", head_only: bool = False) -> None:
        access_log = self.gateway.access_log
        if access_log is not None and not self._refusing:
            # A request refused before it was parsed (400, 431, 408 for the head): logged without its head.
            access_log.refused(self, None, status, message)
        close = close or self.draining
        self.transport.write(error_response(status, message, close, extra, head_only))
        if close:
            self._close()
        else:
            if self.state is _HEAD:
                self._move(_IDLE)
            self._idle_since = now = self.gateway.clock.seconds()
            self._rearm_within(self.gateway.settings.idle_timeout, now)

    def refuse(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        request = self._request
        access_log = self.gateway.access_log
        if access_log is not None:
            access_log.refused(self, request, status, message)
        self._refusing = True
        self.send_error(status, message, close, extra, head_only=request is not None and request.method == b"HEAD")
        self._refusing = False

    # The client side of the exchange (labelgw.http.sides.ClientSide): the response.

    def interim_head(self, head: ResponseHead) -> None:
        # HTTP/1.0 clients do not get interim responses.
        if self._request is not None and self._request.version == b"HTTP/1.1":
            self.transport.write(client_response_head(head, b"", close=False))

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        length = head.content_length
        if length is not None:
            framing = _LENGTH_LINES.get(length)
            if framing is None:
                framing = b"Content-Length: %d\r\n" % length
                if len(_LENGTH_LINES) < 4096:
                    _LENGTH_LINES[length] = framing
        elif not body:
            framing = b""
        elif self._request is not None and self._request.version == b"HTTP/1.1":
            # Chunked, or delimited by close upstream: chunked to the client keeps its connection alive.
            framing = b"Transfer-Encoding: chunked\r\n"
            self._chunked = True
        else:
            framing = b""
            close = self._close_after = True
        if extra:
            framing += extra
        # Held until flush (the end of this upstream read): head and body then leave in one send.
        self._out.append(client_response_head(head, framing, close or self.draining))

    def response_whole(self, head: ResponseHead, close: bool, extra: bytes, body: bytes) -> None:
        """A final response whose whole body came with its head (WholeExchange.response_whole), framed by its
        length: what response_head, response_data and response_end do, head and body joined in one send."""
        if self._out:
            # Something is held already (not on the common path): the three steps keep the order.
            self.response_head(head, True, close, extra)
            self._out.append(body)
            self.response_end()
            return
        length = len(body)
        framing = _LENGTH_LINES.get(length)
        if framing is None:
            framing = b"Content-Length: %d\r\n" % length
            if len(_LENGTH_LINES) < 4096:
                _LENGTH_LINES[length] = framing
        if extra:
            framing += extra
        forward = head.forward
        if forward is None:
            write_now(self.transport, client_response_head(head, framing, close or self.draining, False, body))
            return
        # client_response_head's common case (a head the parser cut) written out: a call less per request.
        reason = head.status_line[9:]
        write_now(self.transport, b"".join((
            b"HTTP/1.1 ", reason, b"\r\n" if len(reason) > 3 else b" \r\n", forward, framing,
            b"Connection: close\r\n\r\n" if close or self.draining else b"\r\n", body,
        )))

    def response_data(self, data: bytes) -> None:
        self._out.append(encode_chunk(data) if self._chunked else data)

    def flush(self) -> None:
        out = self._out
        if out:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def response_end(self) -> None:
        out = self._out
        if self._chunked:
            self._chunked = False
            out.append(LAST_CHUNK)
        if out:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def error_response(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        request = self._request
        head_only = request is not None and request.method == b"HEAD"
        self.transport.write(error_response(status, message, close, extra, head_only=head_only))

    # The client side: back-pressure both ways.

    def set_response_producer(self, producer: Producer | None) -> None:
        """What to pause while the client does not read: the upstream of the response in progress (or None)."""
        self._response_producer = producer
        if producer is not None and self._send_blocked_since:
            producer.pauseProducing()

    def pause_request_body(self, paused: bool) -> None:
        self.set_paused("body", paused)

    # The client side: tunnels.

    def start_tunnel(self, head: ResponseHead, exchange: Exchange) -> None:
        self.transport.write(client_response_head(head, b"", close=False, upgrade=True))
        self._move(_TUNNEL)
        self._pause_reasons.clear()
        self.sync_paused()
        if self._buffer:
            data, self._buffer = self._buffer, b""
            exchange.client_tunnel_data(data)

    def tunnel_data(self, data: bytes) -> None:
        self.transport.write(data)

    # The client side: the end.

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        if exchange is not self.exchange:
            return
        self.exchange = None
        # A tunnel's end always comes with close (Exchange.tunnel_closed).
        if close or self.draining or self._close_after:
            self._close()
            return
        if self.state not in _TO_IDLE:
            self._move(_IDLE)
        self.state = _IDLE
        gateway = self.gateway
        self._idle_since = now = gateway.clock.seconds()
        # The lazy timer may wait for a later deadline (the head timeout, armed at the connection's start): an
        # idle timeout shorter than that would not be kept (250 idle TLS clients held 10 s instead of 3 s).
        deadline = now + gateway.settings.idle_timeout
        if self._timer is None or self._timer_at > deadline:
            self._rearm_within(gateway.settings.idle_timeout, now)
        reasons = self._pause_reasons
        if reasons:
            reasons.discard("pipeline")
            reasons.discard("body")
            self.sync_paused()
        if self._buffer and not self._processing:
            self._process()

    # IPushProducer, for the client's transport: its buffer is full (pause) or drained (resume).

    def pauseProducing(self) -> None:
        if self._send_blocked_since or self.state is _CLOSED:
            return
        self._send_blocked_since = self.gateway.clock.seconds()
        producer = self._response_producer
        if producer is not None:
            producer.pauseProducing()
        # Armed even while closing: a close waits for the client to read what is buffered.
        delay = self.gateway.settings.send_timeout
        timer = self._timer
        if timer is None:
            self._timer = self.gateway.clock.callLater(delay, self._check_timers)
            self._timer_at = self._send_blocked_since + delay
        elif self._timer_at > self._send_blocked_since + delay:
            timer.reset(delay)
            self._timer_at = self._send_blocked_since + delay

    def resumeProducing(self) -> None:
        if not self._send_blocked_since:
            return
        self._send_blocked_since = 0.0
        producer = self._response_producer
        if producer is not None:
            producer.resumeProducing()
        if self.exchange is None and self._buffer and not self._processing and self.state < _CLOSING:
            # Pipelined requests waited for the client to read the responses before them.
            self._pause_reasons.discard("pipeline")
            self.sync_paused()
            self._process()

    def stopProducing(self) -> None:
        pass

    # Pausing the client's reading.

    def set_paused(self, reason: str, paused: bool) -> None:
        reasons = self._pause_reasons
        before = bool(reasons)
        if paused:
            reasons.add(reason)
        else:
            reasons.discard(reason)
        if before != bool(reasons):
            self.sync_paused()

    def sync_paused(self) -> None:
        if self.state >= _CLOSING:
            return
        if self._pause_reasons:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # Timers: one per connection, checked lazily; the common request does no timer work at all.

    def _rearm_within(self, delay: float, now: float | None = None) -> None:
        """Make sure the timer fires within `delay` (it re-arms itself lazily after that)."""
        if now is None:
            now = self.gateway.clock.seconds()
        timer = self._timer
        if timer is not None:
            if self._timer_at > now + delay:
                timer.reset(delay)
                self._timer_at = now + delay
        elif self.state < _CLOSING:
            self._arm(delay, now)

    def _rearm(self, delay: float) -> None:
        timer = self._timer
        if timer is not None:
            timer.reset(delay)
            self._timer_at = self.gateway.clock.seconds() + delay
        elif self.state < _CLOSING:
            self._arm(delay, self.gateway.clock.seconds())

    def _arm(self, delay: float, now: float) -> None:
        self._timer = self.gateway.clock.callLater(delay, self._check_timers)
        self._timer_at = now + delay

    def _check_timers(self) -> None:
        self._timer = None
        state = self.state
        if state is _CLOSED:
            return
        settings = self.gateway.settings
        now = self.gateway.clock.seconds()
        blocked = self._send_blocked_since
        if blocked and now >= blocked + settings.send_timeout:
            # nginx's send_timeout: the client read nothing for that long.
            exchange, self.exchange = self.exchange, None
            if exchange is not None:
                exchange.client_lost()
            self.abort("send timeout")
            return
        if state is _CLOSING:
            # Closing, waiting for a blocked client to read: only the send timeout matters now.
            if blocked:
                self._arm(max(blocked + settings.send_timeout - now, 0.001), now)
            return
        exchange = self.exchange
        if state is _TUNNEL:
            deadline = now + settings.idle_timeout
        elif state is _BODY:
            deadline = self._body_seen + settings.body_timeout
            if now >= deadline:
                started = exchange is not None and exchange.response_started
                self.exchange = None
                if exchange is not None:
                    if not started:
                        exchange.status, exchange.error_message = 408, "request body timed out"
                    exchange.client_lost()
                if not started:
                    self.transport.write(error_response(408, "request body timed out", close=True))
                self._close()
                return
        elif exchange is not None:
            deadline = now + settings.idle_timeout
        elif state is _HEAD:
            deadline = self._head_started + settings.head_timeout
            if now >= deadline:
                self.send_error(408, "request head timed out", close=True)
                return
        else:
            limit = settings.idle_timeout if self._requests else settings.head_timeout
            deadline = self._idle_since + limit
            if now >= deadline:
                self._close()
                return
        if blocked and blocked + settings.send_timeout < deadline:
            deadline = blocked + settings.send_timeout
        self._arm(max(deadline - now, 0.001), now)


class ProxyFactory(Factory):
    noisy = False

    def __init__(self, gateway: Gateway, proto: bytes = b"http") -> None:
        self.gateway = gateway
        self.proto = proto

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self.gateway, self.proto)
