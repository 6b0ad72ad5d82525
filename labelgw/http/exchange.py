"""One request's trip through labelgw: pick a backend, get a connection, relay the request body, relay the
response, retry where that is safe, and account for it all.

The exchange talks to its client through L{ClientSide} (an HTTP/1.1 connection or an HTTP/2 stream) and to its
upstream through the L{labelgw.http.upstream.ResponseSink} calls it implements; it writes to no client transport
itself. Its state is one L{ExchangeState}, changed only through the moves of L{EXCHANGE_MOVES}.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure

from labelgw.core.backends import Backend
from labelgw.http.logsafe import printable
from labelgw.http.headers import upstream_request_head
from labelgw.http.accesslog import debug_fields
from labelgw.http.framing import LAST_CHUNK, encode_chunk, response_has_body
from labelgw.http.parser import RequestHead, ResponseHead
from labelgw.http.sides import ClientSide, WholeClientSide
from labelgw.http.states import EXCHANGE_MOVES, ExchangeState, check_move, sources
from labelgw.http.upstream import UpstreamConnection
from labelgw.core.routes import Route

# A request whose bytes reached an upstream may be sent again only when it is idempotent (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_CONNECTING = ExchangeState.CONNECTING
_WAITING = ExchangeState.WAITING
_RESPONDING = ExchangeState.RESPONDING
_TUNNEL = ExchangeState.TUNNEL
_DONE = ExchangeState.DONE
# The per-request moves, checked inline against the table (see _move).
_TO_WAITING = sources(EXCHANGE_MOVES, _WAITING)
_TO_RESPONDING = sources(EXCHANGE_MOVES, _RESPONDING)
_TO_DONE = sources(EXCHANGE_MOVES, _DONE)


class _BodyPauser:
    """Registered on the upstream's transport while the request body streams: its full buffer pauses the
    client side's reading. stopProducing (the upstream connection lost) does not cascade to the client."""

    __slots__ = ("_side",)

    def __init__(self, side: ClientSide) -> None:
        self._side = side

    def pauseProducing(self) -> None:
        self._side.pause_request_body(True)

    def resumeProducing(self) -> None:
        self._side.pause_request_body(False)

    def stopProducing(self) -> None:
        pass


class Exchange:
    # Slots: every attribute is read on the per-request path, and an attribute of a slotted object is read in one
    # step (a class-level default that an instance did not set was a dictionary miss and a type lookup each time).
    __slots__ = (
        "client", "gateway", "head", "route", "backend", "body_done", "_client_close", "_started_at", "created_at",
        "_head_bytes", "state", "upstream", "body_sent_upstream", "attempts", "_pending", "_pending_size",
        "_body_paused_by_upstream", "_upstream_paused_by_client", "_ttfb", "version", "pinned",
        "response_extra", "hash_key", "fallback_reason", "held", "on_backend", "on_done", "body_limit", "response_rules", "status",
        "bytes_in", "bytes_out", "fail_cause", "client_gone", "error_message",
    )
    state: ExchangeState
    upstream: UpstreamConnection | None
    body_sent_upstream: bool
    attempts: int
    _pending: list[bytes] | None
    _pending_size: int
    # The upstream's buffer governs the client's request body; the client's buffer governs the upstream.
    _body_paused_by_upstream: bool
    _upstream_paused_by_client: bool
    _ttfb: float
    # The version this request goes to (services split by version), and the cookie line that makes it stick.
    version: str | None
    pinned: bool
    response_extra: bytes
    # The request's key for balancer=hash (labelgw.http.hashkey), kept for a retry; None for other policies.
    hash_key: bytes | None
    # Middlewares (labelgw.middleware): why the request went to a fallback service ("breaker open", "no ready
    # backend", "concurrency limit") or None; `held` while it waits in a concurrency queue (start does nothing
    # until `admitted`); `on_done(exchange, failed, observed)` once when the exchange completes.
    fallback_reason: str | None
    held: bool
    # False while held: a request waiting in a queue does not count on a backend (its load would steer the
    # balancer away from a backend it may never use); the backend is picked again when it is admitted.
    on_backend: bool
    on_done: Any
    # Request-side middlewares (labelgw.middleware.access): the request body's limit in bytes (a chunked body that
    # grows over it is cut), and the response header rules (HeaderRules); None: none.
    body_limit: int | None
    response_rules: Any
    # Metrics (labelgw.control.metrics) and the access log (labelgw.http.accesslog): the final status (0: none
    # yet), body bytes each way, why labelgw answered 502 itself (a failed connect or anything else; 504 is always
    # a timeout), whether the client went away first, and the message of labelgw's own answer.
    status: int
    bytes_in: int
    bytes_out: int
    fail_cause: str
    client_gone: bool
    error_message: str | None

    # `gateway`: the labelgw.http.server.Gateway (clock, pool, settings, counters), not imported: the exchange
    # depends on its two interfaces only.
    def __init__(self, client: ClientSide, gateway: Any, head: RequestHead, route: Route, backend: Backend) -> None:
        self.client = client
        self.gateway = gateway
        self.head = head
        self.route = route
        self.backend = backend
        self.state = _CONNECTING
        self.upstream = None
        self.body_sent_upstream = False
        self.attempts = 1
        # _pending_size is set with _pending (a list: request body bytes that wait for an upstream connection).
        self._pending = None
        self._body_paused_by_upstream = self._upstream_paused_by_client = False
        self._ttfb = 0.0
        self.version = None
        self.pinned = False
        self.response_extra = b""
        self.hash_key = None
        self.fallback_reason = None
        self.held = False
        self.on_backend = True
        self.on_done = None
        self.body_limit = None
        self.response_rules = None
        self.status = self.bytes_in = self.bytes_out = 0
        self.fail_cause = "upstream_error"
        self.client_gone = False
        self.error_message = None
        # The request side: its body (payload only, framing removed by the client side) is still arriving.
        self.body_done = not (head.chunked or head.content_length)
        self._client_close = not head.keep_alive
        self._started_at = self.created_at = gateway.clock.seconds()
        # The prefix removed when the route strips it (Route.upstream_path); most routes forward the target as is.
        target = route.upstream_path(head.target) if route.strip_prefix else head.target
        self._head_bytes = upstream_request_head(
            head, target, head.client_ip or client.peer_ip, client.proto, client.local_port
        )
        gateway.in_flight += 1
        service = route.service
        service.in_flight += 1
        backend.in_flight += 1
        backend.requests += 1
        service.policy.on_start(backend)

    def _move(self, new: ExchangeState) -> None:
        self.state = check_move(EXCHANGE_MOVES, self.state, new)

    @property
    def finished(self) -> bool:
        return self.state is _DONE

    @property
    def response_started(self) -> bool:
        state = self.state
        return state is _RESPONDING or state is _TUNNEL

    @property
    def tunnel(self) -> bool:
        return self.state is _TUNNEL

    # Starting and connecting.

    def start(self) -> None:
        if self.held:
            return
        backend = self.backend
        idle = backend.idle
        if idle:
            # UpstreamPool.acquire's common case written out (a call less per request): the most recently pooled
            # connection, open, reusable and with nothing unread; any other case goes through acquire.
            connection = idle[-1]
            if connection.connected and connection.reusable and not connection.has_unread():
                idle.pop()
                connection.reused = True
                if self.body_done and self._pending is None and self.state is _CONNECTING:
                    # _send_on's common case written out too: a request whose body (if any) is not waiting here,
                    # nor still to come, goes out as its head alone.
                    self.upstream = connection
                    self.state = _WAITING
                    connection.send(self, self._head_bytes, self.head.method == b"HEAD", False, self._started_at)
                else:
                    self._send_on(connection, self._started_at)
                return
        pooled = self.gateway.pool.acquire(backend, self)
        if pooled is not None:
            self._send_on(pooled, self._started_at)

    def hold(self) -> None:
        """A middleware keeps the request waiting (a concurrency queue, a password check): it leaves its
        backend's count until `admitted`, which picks the backend then."""
        self.held = True
        if self.on_backend and self.state is _CONNECTING:
            self.on_backend = False
            backend = self.backend
            backend.in_flight -= 1
            backend.requests -= 1

    def admitted(self) -> None:
        """Out of a middleware's queue: the request starts now (the wait is not the backend's latency)."""
        self.held = False
        if self.state is _DONE:
            return
        if not self.on_backend:
            # The backends' loads and health have moved while it waited: pick among them as of now.
            service = self.route.service
            backend = service.pick(version=self.version, pinned=self.pinned, key=self.hash_key)
            if backend is None:
                self.reject(503, f"service {service.name!r} has no ready backend", b"Retry-After: 1\r\n")
                return
            self.backend = backend
            self.on_backend = True
            backend.in_flight += 1
            backend.requests += 1
            service.policy.on_start(backend)
        self._started_at = self.gateway.clock.seconds()
        self.start()

    def reject(self, status: int, message: str, extra: bytes = b"") -> None:
        """labelgw's own answer before anything reached a backend (a middleware said no): no backend failed."""
        self.held = False
        if self.state is _DONE:
            return
        self._client_close = self._client_close or not self.body_done
        self.client.error_response(status, message, self._client_close, extra)
        self._complete(failed=False, observe=False)

    def upstream_connected(self, connection: UpstreamConnection) -> None:
        self._send_on(connection, None)

    def _send_on(self, connection: UpstreamConnection, now: float | None) -> None:
        """Send the request on `connection`; `now`: the clock's time if the caller has just read it."""
        if self.state is _DONE:
            connection.detach()
            return
        self.upstream = connection
        if self.state not in _TO_WAITING:
            self._move(_WAITING)  # refused: raises StateError
        self.state = _WAITING
        connection.send(self, self._head_bytes, self.head.method == b"HEAD", not self.body_done, now)
        if self._pending:
            self.body_sent_upstream = True
            connection.transport.write(b"".join(self._pending))
            self._pending = None
            self._pending_size = 0
            self.client.pause_request_body(False)
        if not self.body_done:
            self._register_body_pauser(connection)

    def upstream_connect_failed(self, reason: Failure) -> None:
        if self.state is _DONE:
            return
        # Nothing reached the backend: any method may go to another one.
        self._count_failure()
        self.fail_cause = "connect_failed"
        metrics = self.gateway.metrics
        if metrics is not None:
            metrics.connect_failed(self.backend.key)
        if not self._retry(f"connect to {self.backend.address}:{self.backend.port} failed: {reason.getErrorMessage()}"):
            self._fail(502, f"could not connect to service {self.route.service.name!r} ({reason.getErrorMessage()})")

    def _retry(self, why: str, same_backend_ok: bool = False) -> bool:
        """Send the request once more: to another ready backend, or, when `same_backend_ok` (a pooled
        connection the backend had closed), over a new connection to the same one. After a stale pooled
        connection the retry always takes a new connection: other idle ones may be just as stale."""
        if self.attempts >= 2 or self.response_started or not self.gateway.retry_budget_allows():
            return False
        failed = self.backend
        backend = self.route.service.pick(exclude=failed, version=self.version, pinned=self.pinned, key=self.hash_key)
        if backend is None or backend is failed:
            if not same_backend_ok:
                return False
            backend = failed
        self.gateway.log.debug("retrying: {why}", why=printable(why))
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
        self._move(_CONNECTING)
        if same_backend_ok:
            self.gateway.pool.connect(backend, self)
        else:
            self.start()
        return True

    # The request body, as the client side takes it from the client (payload only, framing removed).

    def request_data(self, data: bytes) -> None:
        """One piece of the request body, sent upstream in the request's framing."""
        self.bytes_in += len(data)
        limit = self.body_limit
        if limit is not None and self.bytes_in > limit:
            self._body_over_limit(limit)
            return
        self._send_upstream(encode_chunk(data) if self.head.chunked else data)

    def _body_over_limit(self, limit: int) -> None:
        """A body without a Content-Length grew over the service's max_body: 413 if no response started, else
        the response is cut; the upstream (which got part of the body) is aborted either way."""
        if self.state is _DONE:
            return
        self._unregister_producers()
        self._abort_upstream()
        self._client_close = True
        if not self.response_started:
            self.status = 413
            self.client.error_response(413, f"request body over the limit of service {self.route.service.name!r} ({limit} bytes)", True)
            self._complete(failed=False, observe=False)
        else:
            self._complete(failed=False, observe=False)
            self.client.abort("request body over the limit")

    def request_end(self) -> None:
        """The request body is complete."""
        if self.head.chunked:
            self._send_upstream(LAST_CHUNK)
        self.body_done = True
        self._unregister_body_pauser()
        upstream = self.upstream
        if upstream is not None:
            upstream.request_complete()

    def _send_upstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            self.body_sent_upstream = True
            upstream.transport.write(data)
        elif upstream is None:
            if self._pending is None:
                self._pending = []
                self._pending_size = 0
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > self.gateway.settings.pending_body_limit:
                self.client.pause_request_body(True)

    # The response, as the upstream sends it.

    def response_head(self, head: ResponseHead, connection: UpstreamConnection) -> None:
        status = head.status
        if status < 200 and status != 101:
            # Interim response: relay 100 Continue and friends, where the client side can.
            self.client.interim_head(head)
            return
        self._ttfb = self.gateway.clock.seconds() - self._started_at
        self.status = status
        if status == 101:
            if self.head.upgrade is None:
                self._abort_upstream()
                self._fail(502, "upstream switched protocols without being asked")
                return
            self._move(_TUNNEL)
            self.client.start_tunnel(head, self)
            self._register_body_pauser(connection)
            self._register_upstream_producer(connection)
            return
        body = response_has_body(status, self.head.method == b"HEAD")
        extra = self._final_response(head, status)
        # Held by the client side until flush: head and body then leave together (one TCP segment).
        self.client.response_head(head, body, self._client_close, extra)

    def _final_response(self, head: ResponseHead, status: int) -> bytes:
        """The steps of a final response (response_head and response_whole): the state, a 5xx counted against the
        backend, the close decision, and the fields added to the head (debug fields, the route's response rules)."""
        if self.state not in _TO_RESPONDING:
            self._move(_RESPONDING)
        self.state = _RESPONDING
        if status >= 500:
            # A 5xx counts against the backend (outlier ejection, latency penalty, as the exchange's end says:
            # status >= 500), like Envoy's consecutive_5xx.
            self.backend.errors += 1
        if not self.body_done:
            # The upstream answered before the whole body arrived: the rest cannot be skipped safely.
            self._client_close = True
        if self.gateway.debug_headers:
            self.response_extra += debug_fields(self)
        extra = self.response_extra
        rules = self.response_rules
        if rules is not None:
            # HeaderRules.apply_response's common case written out: a pre-cut head with none of the fields to
            # remove gets only the rules' lines; anything else goes through apply_response.
            if head.forward is not None:
                lowered = head.block.lower()
                for needle in rules.response_needles:
                    if lowered.partition(needle)[1]:  # not `in`: see _named_in
                        return extra + rules.apply_response(head)
                return extra + rules.response_lines
            return extra + rules.apply_response(head)
        return extra

    def response_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.client.response_data(data)

    def response_whole(self, head: ResponseHead, connection: UpstreamConnection, body: bytes) -> None:
        """A final response whose whole body came with its head (labelgw.http.upstream.ResponseSink): what
        response_head, response_data and response_done do, in one step. Never a 1xx or a 101, always a body (a
        Content-Length, not HEAD, not 204 or 304): response_head's other cases cannot happen here."""
        gateway = self.gateway
        self._ttfb = gateway.clock.seconds() - self._started_at
        status = self.status = head.status
        extra = self._final_response(head, status)
        client = self.client
        client.response_head(head, True, self._client_close, extra)
        if self.state is _RESPONDING:
            self.bytes_out += len(body)
            client.response_data(body)
            # response_done, written out (a call less per request).
            client.response_end()
            upstream = self.upstream
            if self._body_paused_by_upstream or self._upstream_paused_by_client:
                self._unregister_producers()
            if upstream is not None:
                if not self.body_done:
                    upstream.reusable = False
                upstream.detach()
            self._complete(self.status >= 500)

    response_chunk = response_data

    def flush(self) -> None:
        """End of one upstream read: send what it produced; a response still streaming gets back-pressure."""
        self.client.flush()
        if self.state is not _DONE and not self._upstream_paused_by_client and self.upstream is not None:
            self._register_upstream_producer(self.upstream)

    def response_done(self) -> None:
        if self.state is _DONE:
            return
        self.client.response_end()
        upstream = self.upstream
        if self._body_paused_by_upstream or self._upstream_paused_by_client:
            self._unregister_producers()
        if upstream is not None:
            if not self.body_done:
                upstream.reusable = False
            upstream.detach()
        self._complete(self.status >= 500)

    def upstream_failed(self, status: int, reason: str, retryable: bool = False) -> None:
        if self.finished:
            return
        upstream = self.upstream
        self._unregister_producers()
        self._count_failure()
        self.fail_cause = "upstream_error"
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
            self.client.abort(reason)

    # Tunnels (WebSocket and other upgrades).

    def tunnel_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.client.tunnel_data(data)

    def tunnel_closed(self) -> None:
        # A producer left registered would keep a paused client transport from ever closing.
        self._unregister_producers()
        self._client_close = True
        self._complete(failed=False)

    def client_tunnel_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            upstream.transport.write(data)

    # The client went away.

    def client_lost(self) -> None:
        if self.state is _DONE:
            return
        self._unregister_producers()
        self._abort_upstream()
        self.client_gone = True
        # The client gave up: how long that took says nothing about the backend.
        self._complete(failed=False, observe=False)

    # Ending.

    def _fail(self, status: int, message: str) -> None:
        extra = b"Retry-After: 1\r\n" if status == 503 else b""
        self.status = status
        self.error_message = message
        # An unread request body would be taken for the next request: close instead.
        self._client_close = self._client_close or not self.body_done
        self.status = status
        metrics = self.gateway.metrics
        if metrics is not None and status >= 502:
            metrics.gateway_error(status, "timeout" if status == 504 else self.fail_cause)
        self.client.error_response(status, message, self._client_close, extra)
        self._complete(failed=True)

    def _count_failure(self) -> None:
        self.backend.errors += 1

    def _release_backend(self, failed: bool, observe: bool = True) -> None:
        backend = self.backend
        backend.in_flight -= 1
        if observe:
            # Time to the response head: a long download or a WebSocket must not look like a slow backend.
            state = self.state
            started = state is _RESPONDING or state is _TUNNEL
            elapsed = self._ttfb if started else self.gateway.clock.seconds() - self._started_at
            self.route.service.policy.on_finish(backend, elapsed, failed)
            # Canary analysis: the failed attempt counts against its version.
            self.gateway.canary.observe(self.route.service, backend, self.gateway.clock.seconds(), elapsed, failed)

    def _complete(self, failed: bool, observe: bool = True, now: float | None = None) -> None:
        """`now`: the clock's time, when the caller has just read it."""
        state = self.state
        if state is _DONE:
            return
        gateway = self.gateway
        gateway.in_flight -= 1
        service = self.route.service
        service.in_flight -= 1
        if self.attempts > 1:
            gateway.active_retries -= 1
        # _release_backend, inlined: this runs once per request.
        backend = self.backend
        if self.on_backend:
            backend.in_flight -= 1
        else:
            observe = False  # it never reached a backend
        if now is None:
            now = gateway.clock.seconds()
        if observe and state is not _TUNNEL:
            # Time to the response head: a long download or a WebSocket must not look like a slow backend.
            started = state is _RESPONDING
            elapsed = self._ttfb if started else now - self._started_at
            service.policy.on_finish(backend, elapsed, failed)
            # Canary analysis by version (labelgw.core.canary); one attribute read for services without a split.
            if service.split is not None:
                gateway.canary.observe(service, backend, now, elapsed, failed)
        if state not in _TO_DONE:
            self._move(_DONE)
        self.state = _DONE
        done = self.on_done
        if done is not None:
            self.on_done = None
            done(self, failed, observe)
        access_log = gateway.access_log
        if access_log is not None:
            # One call for the line and the metrics' counters (labelgw.http.accesslog.AccessLog.exchange).
            access_log.exchange(self, state, now, gateway.metrics)
        elif gateway.metrics is not None:
            gateway.metrics.exchange_done(self, now)
        self.client.exchange_done(self, self._client_close)

    def _abort_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()

    def _register_body_pauser(self, connection: UpstreamConnection) -> None:
        if not self._body_paused_by_upstream and connection.connected:
            connection.transport.registerProducer(_BodyPauser(self.client), True)
            self._body_paused_by_upstream = True

    def _register_upstream_producer(self, connection: UpstreamConnection) -> None:
        if not self._upstream_paused_by_client and connection.connected:
            # The client side calls only pauseProducing and resumeProducing on it.
            self.client.set_response_producer(connection.transport)
            self._upstream_paused_by_client = True

    def _unregister_body_pauser(self) -> None:
        if self._body_paused_by_upstream:
            self._body_paused_by_upstream = False
            upstream = self.upstream
            if upstream is not None and upstream.connected:
                upstream.transport.unregisterProducer()
            # The pauser may have left the client paused.
            self.client.pause_request_body(False)

    def _unregister_producers(self) -> None:
        self._unregister_body_pauser()
        if self._upstream_paused_by_client:
            self._upstream_paused_by_client = False
            self.client.set_response_producer(None)
            upstream = self.upstream
            if upstream is not None and upstream.connected:
                upstream.transport.resumeProducing()


class WholeExchange(Exchange):
    """An exchange whose client side also takes a whole response in one call (HTTP/1.1's
    ClientConnection.response_whole): a small response's head, body and end leave in one step, with one clock read
    for its time to the head, the pooled connection's idle time and the end."""

    __slots__ = ()
    client: WholeClientSide

    def response_whole(self, head: ResponseHead, connection: UpstreamConnection, body: bytes) -> None:
        gateway = self.gateway
        now = gateway.clock.seconds()
        self._ttfb = now - self._started_at
        status = self.status = head.status
        if status < 500 and self.state is _WAITING and self.body_done and not gateway.debug_headers:
            # _final_response's common case: no 5xx, the request body read, nothing added to the head but the
            # version cookie (if any) and the route's response rules (their common case written out as there).
            self.state = _RESPONDING
            extra = self.response_extra
            rules = self.response_rules
            if rules is not None:
                if head.forward is not None:
                    block = head.block
                    if block is rules.clean_response_block:
                        # The very bytes object last found without a field to drop (a repeated response head
                        # shares it: labelgw.http.parser.response_from).
                        extra = extra + rules.response_lines
                    else:
                        lowered = block.lower()
                        for needle in rules.response_needles:
                            if lowered.partition(needle)[1]:  # not `in`: see _named_in
                                extra = extra + rules.apply_response(head)
                                break
                        else:
                            rules.clean_response_block = block
                            extra = extra + rules.response_lines
                else:
                    extra = extra + rules.apply_response(head)
        else:
            extra = self._final_response(head, status)
        self.bytes_out += len(body)
        self.client.response_whole(head, self._client_close, extra, body)
        if self.state is _RESPONDING:
            upstream = self.upstream
            if self._body_paused_by_upstream or self._upstream_paused_by_client:
                self._unregister_producers()
            if upstream is not None:
                if not self.body_done:
                    upstream.reusable = False
                upstream.detach(now)
            self._complete(self.status >= 500, True, now)
