"""The client side: one strict HTTP/1.1 connection, its timers, pipelining and tunnels; and the Gateway, the
state every connection shares (route table, upstream pool, counters)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.http.exchange import Exchange
from labelgw.http.headers import error_response
from labelgw.http.parser import MAX_HEAD_BYTES, HttpError, RequestHead, parse_request_head
from labelgw.http.settings import ProxySettings
from labelgw.http.upstream import UpstreamPool
from labelgw.versions import DEFAULT_VERSION_HEADER, choose_version
from labelgw.routes import RouteTable, normalize_host


# Raw Host header -> normalised host name: the same few values arrive on every request.
_HOSTS: dict[bytes, str] = {}


class Gateway:
    """Shared by every client connection of every listener."""

    log = Logger()

    def __init__(self, reactor: Any, table: RouteTable, settings: ProxySettings | None = None) -> None:
        self.clock = reactor
        self.table = table
        self.settings = settings or ProxySettings()
        self.pool = UpstreamPool(reactor, self.settings)
        self.service_limit = self.settings.service_in_flight_limit
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.retries = 0
        self.active_retries = 0
        self.draining = False
        self._drained: list[Deferred[None]] = []
        # Lower-case name of the request field that pins a request to one version.
        self.version_header = DEFAULT_VERSION_HEADER
        # Set when plain HTTP is to be answered with a 308 to HTTPS (labelgw.https.HttpsRedirect).
        self.https_redirect: Any = None

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

    def connection_closed(self, connection: "ClientConnection") -> None:
        self.connections.discard(connection)
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for done in waiting:
                done.callback(None)


class ClientConnection(Protocol):
    def __init__(self, gateway: Gateway, proto: bytes = b"http") -> None:
        self.gateway = gateway
        self.proto = proto
        self.peer_ip = b""
        self.local_port = b""
        self.exchange: Exchange | None = None
        self.tunnel = False
        self.draining = False
        self._closing = False
        self._buffer = b""
        self._processing = False
        self._requests = 0
        self._head_started = 0.0
        self._idle_since = 0.0
        self._body_seen = 0.0
        self._pause_reasons: set[str] = set()
        self._timer: Any = None
        # The client's transport is full: since when (0.0: it is not), and what to pause meanwhile (the upstream
        # of a streaming response).
        self._send_blocked_since = 0.0
        self._response_producer: Any = None
        self._lost = False

    @property
    def paused(self) -> bool:
        return bool(self._pause_reasons)

    # Lifecycle.

    def connectionMade(self) -> None:
        transport = self.transport
        self.peer_ip = getattr(transport.getPeer(), "host", "").encode("ascii", "replace")
        self.local_port = b"%d" % getattr(transport.getHost(), "port", 0)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        gateway = self.gateway
        gateway.connections.add(self)
        self._idle_since = gateway.clock.seconds()
        self._timer = gateway.clock.callLater(gateway.settings.head_timeout, self._check_timers)
        # Registered for the connection's life: a client that stops reading is noticed whatever is in progress.
        transport.registerProducer(self, True)
        if gateway.draining:
            self.drain()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        self._lost = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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
        if self.exchange is None and not self.tunnel:
            self._close()

    def abort(self) -> None:
        self._closing = True
        self.transport.abortConnection()

    def close(self) -> None:
        """Close once what was written is sent (the send timeout still applies meanwhile)."""
        self._close()

    def _close(self) -> None:
        self._closing = True
        # A registered producer would keep a full transport from ever closing (FileDescriptor.loseConnection).
        self._response_producer = None
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        exchange = self.exchange
        if exchange is not None:
            if self.tunnel:
                exchange.client_tunnel_data(data)
                return
            if not exchange.body_done:
                self._body_seen = self.gateway.clock.seconds()
                try:
                    data = exchange.client_body(data)
                except HttpError as error:
                    self._refuse_body(exchange, error)
                    return
                if not data:
                    return
            # Pipelined bytes while a response is pending: keep them and stop reading until it is done.
            self._buffer += data
            self.set_paused("pipeline", True)
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while self.exchange is None and self._buffer and not self._closing:
                if self._send_blocked_since:
                    # Responses already wait for a client that does not read: buffer no more of them.
                    self.set_paused("pipeline", True)
                    return
                buffer = self._buffer
                if buffer[:1] in (b"\r", b"\n"):
                    # RFC 9112 section 2.2: empty lines before a request line are ignored.
                    buffer = self._buffer = buffer.lstrip(b"\r\n")
                    if not buffer:
                        return
                end = buffer.find(b"\r\n\r\n")
                if end == -1:
                    if b"\n\n" in buffer or b"\n\r\n" in buffer:
                        # A head ended with bare LF: refuse now rather than wait for a CRLFCRLF that never comes.
                        self.send_error(400, "bare LF in request head", close=True)
                    elif len(buffer) > MAX_HEAD_BYTES:
                        self.send_error(431, "request head too large", close=True)
                    elif not self._head_started:
                        # A head that does not arrive whole gets an absolute deadline (slow clients).
                        self._head_started = self.gateway.clock.seconds()
                        self._rearm(self.gateway.settings.head_timeout)
                    return
                self._head_started = 0.0
                if end + 4 > MAX_HEAD_BYTES:
                    self.send_error(431, "request head too large", close=True)
                    return
                try:
                    head = parse_request_head(buffer[:end])
                except HttpError as error:
                    self.send_error(error.status, error.reason, close=True)
                    return
                self._buffer = buffer[end + 4 :]
                self._requests += 1
                self._dispatch(head)
                exchange = self.exchange
                if exchange is not None and not exchange.finished and not exchange.body_done:
                    self._body_seen = self.gateway.clock.seconds()
                    self._rearm_within(self.gateway.settings.body_timeout)
                    if self._buffer:
                        data, self._buffer = self._buffer, b""
                        try:
                            self._buffer = exchange.client_body(data)
                        except HttpError as error:
                            self._refuse_body(exchange, error)
                            return
            if self.exchange is not None and self._buffer:
                self.set_paused("pipeline", True)
        finally:
            self._processing = False

    def _dispatch(self, head: RequestHead) -> None:
        gateway = self.gateway
        raw_host = head.host
        host = _HOSTS.get(raw_host) if raw_host else ""
        if host is None:
            host = normalize_host(raw_host.decode("latin-1"))  # type: ignore[union-attr]
            if len(_HOSTS) >= 4096:
                _HOSTS.clear()
            _HOSTS[raw_host] = host  # type: ignore[index]
        target = head.target
        query = target.find(b"?")
        path = (target if query == -1 else target[:query]).decode("latin-1")
        route = gateway.table.lookup(host, path)
        # Plain HTTP answered with a 308 to HTTPS (--redirect-https, <prefix>.tls=redirect): labelgw.https.
        redirect = gateway.https_redirect
        if redirect is not None and self.proto == b"http":
            location = redirect.location(host, target, route)
            if location is not None:
                self.send_error(308, "use HTTPS", close=head.has_body or not head.keep_alive, head_only=head.method == b"HEAD", extra=b"Location: %s\r\n" % location)
                return
        if route is None:
            if gateway.table.knows_host(host):
                message = f"no route for http://{host}{path}"
            else:
                message = f"no route for host {host!r}" if host else "no Host header"
            self.send_error(404, message, close=head.has_body or not head.keep_alive, head_only=head.method == b"HEAD")
            return
        service = route.service
        if gateway.in_flight >= gateway.settings.max_in_flight or service.in_flight >= gateway.service_limit:
            self.send_error(503, "too many requests in flight", close=head.has_body or not head.keep_alive, head_only=head.method == b"HEAD", extra=b"Retry-After: 1\r\n")
            return
        version = None
        cookie = b""
        pinned = False
        if service.split is None:
            backend = service.pick()
        else:
            backend, version, cookie, pinned = choose_version(service, head, gateway.version_header)
        if backend is None:
            what = f" of version {version!r}" if version is not None else ""
            self.send_error(
                503, f"service {service.name!r} has no ready backend{what}",
                close=head.has_body or not head.keep_alive, head_only=head.method == b"HEAD", extra=b"Retry-After: 1\r\n",
            )
            return
        exchange = self.exchange = Exchange(self, head, route, backend)
        if version is not None:
            exchange.version = version
            exchange.pinned = pinned
            exchange.response_extra = cookie
        exchange.start()

    def _refuse_body(self, exchange: Exchange, error: HttpError) -> None:
        exchange.client_lost()
        if not exchange.response_started:
            self.transport.write(error_response(error.status, error.reason, close=True))
        self._close()

    # Writing and pausing.

    def send_error(self, status: int, message: str, close: bool, extra: bytes = b"", head_only: bool = False) -> None:
        close = close or self.draining
        self.transport.write(error_response(status, message, close, extra, head_only))
        if close:
            self._close()
        else:
            self._idle_since = self.gateway.clock.seconds()

    # IPushProducer, for the client's transport: its buffer is full (pause) or drained (resume).

    def pauseProducing(self) -> None:
        if self._send_blocked_since or self._lost:
            return
        self._send_blocked_since = self.gateway.clock.seconds()
        producer = self._response_producer
        if producer is not None:
            producer.pauseProducing()
        # Armed even while closing: a close waits for the client to read what is buffered.
        delay = self.gateway.settings.send_timeout
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.gateway.clock.callLater(delay, self._check_timers)
        elif timer.getTime() > self._send_blocked_since + delay:
            timer.reset(delay)

    def resumeProducing(self) -> None:
        if not self._send_blocked_since:
            return
        self._send_blocked_since = 0.0
        producer = self._response_producer
        if producer is not None:
            producer.resumeProducing()
        if self.exchange is None and self._buffer and not self._processing and not self._closing:
            # Pipelined requests waited for the client to read the responses before them.
            self._pause_reasons.discard("pipeline")
            self.sync_paused()
            self._process()

    def stopProducing(self) -> None:
        pass

    def set_response_producer(self, producer: Any) -> None:
        """What to pause while the client does not read: the upstream of the response in progress (or None)."""
        self._response_producer = producer
        if producer is not None and self._send_blocked_since:
            producer.pauseProducing()

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
        if self._closing:
            return
        if self._pause_reasons:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # Called by the exchange.

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        if exchange is not self.exchange:
            return
        self.exchange = None
        if close or self.draining:
            self._close()
            return
        self._idle_since = self.gateway.clock.seconds()
        if self._pause_reasons:
            self._pause_reasons.discard("pipeline")
            self._pause_reasons.discard("pending")
            self.sync_paused()
        if self._buffer and not self._processing:
            self._process()

    def start_tunnel(self, exchange: Exchange) -> None:
        self.tunnel = True
        self._pause_reasons.clear()
        self.sync_paused()
        if self._buffer:
            data, self._buffer = self._buffer, b""
            exchange.client_tunnel_data(data)

    # Timers: one per connection, checked lazily; the common request does no timer work at all.

    def _rearm_within(self, delay: float) -> None:
        """Make sure the timer fires within `delay` (it re-arms itself lazily after that)."""
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() > self.gateway.clock.seconds() + delay:
                timer.reset(delay)
        elif not self._closing:
            self._timer = self.gateway.clock.callLater(delay, self._check_timers)

    def _rearm(self, delay: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(delay)
        elif not self._closing:
            self._timer = self.gateway.clock.callLater(delay, self._check_timers)

    def _check_timers(self) -> None:
        self._timer = None
        if self._lost:
            return
        settings = self.gateway.settings
        now = self.gateway.clock.seconds()
        blocked = self._send_blocked_since
        if blocked and now >= blocked + settings.send_timeout:
            # nginx's send_timeout: the client read nothing for that long.
            exchange = self.exchange
            if exchange is not None:
                exchange.client_lost()
            self.abort()
            return
        if self._closing:
            # Closing, waiting for a blocked client to read: only the send timeout matters now.
            if blocked:
                self._timer = self.gateway.clock.callLater(max(blocked + settings.send_timeout - now, 0.001), self._check_timers)
            return
        exchange = self.exchange
        if self.tunnel:
            deadline = now + settings.idle_timeout
        elif exchange is not None:
            if not exchange.body_done:
                deadline = self._body_seen + settings.body_timeout
                if now >= deadline:
                    started = exchange.response_started
                    exchange.client_lost()
                    if not started:
                        self.transport.write(error_response(408, "request body timed out", close=True))
                    self._close()
                    return
            else:
                deadline = now + settings.idle_timeout
        elif self._head_started:
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
        self._timer = self.gateway.clock.callLater(max(deadline - now, 0.001), self._check_timers)


class ProxyFactory(Factory):
    noisy = False

    def __init__(self, gateway: Gateway, proto: bytes = b"http") -> None:
        self.gateway = gateway
        self.proto = proto

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self.gateway, self.proto)
