"""The exchange alone, through its two interfaces: scripts of events in, calls out (mitmproxy's playbook tests are
the model). No reactor, no transport, no connection class: a recording client side (labelgw.http.sides.ClientSide)
and a recording upstream connection and pool stand on either side; time is a task.Clock.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from labelgw.http.accesslog import NO_KIND
from labelgw.http.exchange import Exchange
from labelgw.http.parser import RequestHead, ResponseHead, parse_request_head, parse_response_head
from labelgw.http.server import Gateway
from labelgw.http.settings import ProxySettings
from labelgw.http.states import ExchangeState, StateError
from labelgw.core.registry import Registry
from proxyharness import DEFAULT_SPECS

Call = tuple[Any, ...]


class Log:
    """Every call out of the exchange, in order, as (who.what, arguments...)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


class RecordingSide:
    """A ClientSide that only records."""

    peer_ip = b"10.0.0.9"
    proto = b"http"
    local_port = b"8080"
    log_kind = NO_KIND
    log_kind_keeper = None
    is_http2 = False

    def __init__(self, log: Log) -> None:
        self.log = log

    def _record(self, *call: Any) -> None:
        self.log.calls.append(call)

    def interim_head(self, head: ResponseHead) -> None:
        self._record("client.interim", head.status)

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        self._record("client.head", head.status, body, close, extra)

    def response_data(self, data: bytes) -> None:
        self._record("client.data", data)

    def flush(self) -> None:
        self._record("client.flush")

    def response_end(self) -> None:
        self._record("client.end")

    def error_response(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        self._record("client.error", status, close, extra)

    def abort(self, reason: str) -> None:
        self._record("client.abort")

    def set_response_producer(self, producer: Any) -> None:
        self._record("client.producer", None if producer is None else "upstream")

    def pause_request_body(self, paused: bool) -> None:
        self._record("client.pause_body", paused)

    def start_tunnel(self, head: ResponseHead, exchange: Exchange) -> None:
        self._record("client.tunnel", head.status)

    def tunnel_data(self, data: bytes) -> None:
        self._record("client.tunnel_data", data)

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        self._record("client.done", close)


class RecordingTransport:
    def __init__(self, log: Log) -> None:
        self.log = log

    def write(self, data: bytes) -> None:
        self.log.calls.append(("upstream.write", data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.log.calls.append(("upstream.register_body_pauser",))
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.log.calls.append(("upstream.unregister_body_pauser",))

    def pauseProducing(self) -> None:
        self.log.calls.append(("upstream.pause",))

    def resumeProducing(self) -> None:
        self.log.calls.append(("upstream.resume",))


class RecordingUpstream:
    """An UpstreamConnection as the exchange uses it."""

    connected = True
    reusable = True

    def __init__(self, log: Log, backend: Any, reused: bool = False) -> None:
        self.log = log
        self.backend = backend
        self.reused = reused
        self.transport = RecordingTransport(log)

    def send(
        self, sink: Any, head: bytes, head_only: bool, body_pending: bool = False, now: float | None = None
    ) -> None:
        self.log.calls.append(("upstream.send", head.split(b"\r\n", 1)[0], head_only, body_pending))

    def request_complete(self) -> None:
        self.log.calls.append(("upstream.request_complete",))

    def detach(self) -> None:
        self.log.calls.append(("upstream.detach", self.reusable))

    def abort(self) -> None:
        self.log.calls.append(("upstream.abort",))


class RecordingPool:
    """The pool: an idle connection when the test put one there, else a connection attempt to report on."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.idle: list[RecordingUpstream] = []

    def acquire(self, backend: Any, sink: Any) -> RecordingUpstream | None:
        if self.idle:
            return self.idle.pop()
        self.connect(backend, sink)
        return None

    def connect(self, backend: Any, sink: Any) -> None:
        self.log.calls.append(("pool.connect", backend.spec.name))


class World:
    def __init__(self, **settings: Any) -> None:
        self.log = Log()
        self.clock = Clock()
        registry = Registry()
        for container in DEFAULT_SPECS:
            registry.apply(container.container_id, container)
        self.registry = registry
        self.table = registry.table
        self.gateway = Gateway(self.clock, registry.table, ProxySettings(**settings))
        self.pool = RecordingPool(self.log)
        self.gateway.pool = self.pool  # type: ignore[assignment]
        self.side = RecordingSide(self.log)

    def exchange(self, raw_head: bytes, host: str = "solo.localhost") -> Exchange:
        head = parse_request_head(raw_head.removesuffix(b"\r\n"))
        route = self.table.lookup(host, "/")
        assert route is not None
        backend = route.service.pick()
        return Exchange(self.side, self.gateway, head, route, backend)

    def upstream(self, exchange: Exchange, reused: bool = False) -> RecordingUpstream:
        return RecordingUpstream(self.log, exchange.backend, reused)

    def play(self, *script: tuple[Callable[[], Any], list[Call]]) -> None:
        """Each step: an event into the exchange, and exactly the calls it must make, in order."""
        for number, (event, expected) in enumerate(script):
            event()
            assert self.log.take() == expected, f"step {number}"

    def assert_released(self) -> None:
        assert self.gateway.in_flight == 0 and self.gateway.active_retries == 0
        for route in self.registry.routes():
            assert route.service.in_flight == 0
            for backend in route.service.backends.values():
                assert backend.in_flight == 0


def request(method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return b"%s /p HTTP/1.1\r\nHost: solo.localhost\r\n%s" % (method, extra)


def response(status: bytes = b"200 OK", extra: bytes = b"Content-Length: 5\r\n") -> ResponseHead:
    return parse_response_head((b"HTTP/1.1 " + status + b"\r\n" + extra).removesuffix(b"\r\n"))


@pytest.fixture
def world() -> World:
    return World()


def test_a_get_relayed_whole(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.play(
        (exchange.start, [("pool.connect", "solo-1")]),
        (lambda: exchange.upstream_connected(upstream), [("upstream.send", b"GET /p HTTP/1.1", False, False)]),
        (lambda: exchange.response_head(response(), upstream), [("client.head", 200, True, False, b"")]),
        (lambda: exchange.response_data(b"hello"), [("client.data", b"hello")]),
        (exchange.response_done, [("client.end",), ("upstream.detach", True), ("client.done", False)]),
    )
    assert exchange.state is ExchangeState.DONE
    world.assert_released()


def test_a_response_over_several_reads_gets_back_pressure(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    world.play(
        (exchange.start, [("upstream.send", b"GET /p HTTP/1.1", False, False)]),
        (lambda: exchange.response_head(response(extra=b"Transfer-Encoding: chunked\r\n"), upstream), [
            ("client.head", 200, True, False, b""),
        ]),
        (lambda: exchange.response_chunk(b"abc"), [("client.data", b"abc")]),
        # Still streaming at the end of the read: the client side may now pause the upstream.
        (exchange.flush, [("client.flush",), ("client.producer", "upstream")]),
        (exchange.flush, [("client.flush",)]),
        (exchange.response_done, [
            ("client.end",), ("client.producer", None), ("upstream.resume",), ("upstream.detach", True),
            ("client.done", False),
        ]),
    )


def test_a_body_that_arrives_before_the_upstream_connection_is_held_then_sent(world: World) -> None:
    exchange = world.exchange(request(b"POST", b"Content-Length: 6\r\n"), "solo.localhost")
    upstream = world.upstream(exchange)
    world.play(
        (exchange.start, [("pool.connect", "solo-1")]),
        (lambda: exchange.request_data(b"abc"), []),
        (lambda: exchange.upstream_connected(upstream), [
            ("upstream.send", b"POST /p HTTP/1.1", False, True), ("upstream.write", b"abc"), ("client.pause_body", False),
            ("upstream.register_body_pauser",),
        ]),
        (lambda: exchange.request_data(b"def"), [("upstream.write", b"def")]),
        (exchange.request_end, [
            ("upstream.unregister_body_pauser",), ("client.pause_body", False), ("upstream.request_complete",),
        ]),
    )
    assert exchange.body_sent_upstream


def test_held_body_past_the_limit_pauses_the_client(world: World) -> None:
    world = World(pending_body_limit=4)
    exchange = world.exchange(request(b"POST", b"Content-Length: 10\r\n"))
    world.play(
        (exchange.start, [("pool.connect", "solo-1")]),
        (lambda: exchange.request_data(b"abc"), []),
        (lambda: exchange.request_data(b"de"), [("client.pause_body", True)]),
    )
    exchange.client_lost()
    world.assert_released()


def test_a_chunked_request_body_goes_upstream_chunked(world: World) -> None:
    exchange = world.exchange(request(b"POST", b"Transfer-Encoding: chunked\r\n"))
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    world.play(
        (exchange.start, [("upstream.send", b"POST /p HTTP/1.1", False, True), ("upstream.register_body_pauser",)]),
        (lambda: exchange.request_data(b"hello"), [("upstream.write", b"5\r\nhello\r\n")]),
        (exchange.request_end, [
            ("upstream.write", b"0\r\n\r\n"), ("upstream.unregister_body_pauser",), ("client.pause_body", False),
            ("upstream.request_complete",),
        ]),
    )


def test_a_failed_connection_goes_to_another_backend(world: World) -> None:
    exchange = world.exchange(b"GET / HTTP/1.1\r\nHost: api.localhost\r\n", "api.localhost")
    first = exchange.backend.spec.name
    other = {"api-1": "api-2", "api-2": "api-1"}[first]
    world.play(
        (exchange.start, [("pool.connect", first)]),
        (lambda: exchange.upstream_connect_failed(Failure(ConnectionRefusedError())), [("pool.connect", other)]),
    )
    assert exchange.attempts == 2 and exchange.state is ExchangeState.CONNECTING
    world.play(
        (lambda: exchange.upstream_connect_failed(Failure(ConnectionRefusedError())), [
            ("client.error", 502, False, b""), ("client.done", False),
        ]),
    )
    world.assert_released()


def test_a_stale_pooled_connection_is_retried_once_on_a_new_connection(world: World) -> None:
    exchange = world.exchange(request())
    stale = world.upstream(exchange, reused=True)
    world.pool.idle.append(stale)
    world.play(
        (exchange.start, [("upstream.send", b"GET /p HTTP/1.1", False, False)]),
        (lambda: exchange.upstream_failed(502, "upstream closed the connection", retryable=True), [("pool.connect", "solo-1")]),
    )
    assert exchange.state is ExchangeState.CONNECTING
    exchange.client_lost()
    world.assert_released()


def test_a_post_whose_body_reached_the_upstream_is_not_retried(world: World) -> None:
    exchange = world.exchange(request(b"POST", b"Content-Length: 3\r\n"))
    upstream = world.upstream(exchange, reused=True)
    world.pool.idle.append(upstream)
    exchange.start()
    exchange.request_data(b"abc")
    exchange.request_end()
    world.log.take()
    world.play(
        (lambda: exchange.upstream_failed(502, "upstream closed the connection", retryable=True), [
            ("client.error", 502, False, b""), ("client.done", False),
        ]),
    )


def test_an_upstream_failing_mid_response_cuts_the_client(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    exchange.response_head(response(extra=b"Content-Length: 100\r\n"), upstream)
    exchange.response_data(b"part")
    world.log.take()
    world.play(
        (lambda: exchange.upstream_failed(502, "upstream closed the connection mid-response"), [
            ("client.done", True), ("client.abort",),
        ]),
    )
    world.assert_released()


def test_a_response_before_the_whole_body_closes_the_client_connection(world: World) -> None:
    exchange = world.exchange(request(b"POST", b"Content-Length: 100\r\n"))
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    world.play(
        (lambda: exchange.response_head(response(b"413 Content Too Large", b"Content-Length: 0\r\n"), upstream), [
            ("client.head", 413, True, True, b""),
        ]),
        (exchange.response_done, [
            ("client.end",), ("upstream.unregister_body_pauser",), ("client.pause_body", False),
            ("upstream.detach", False), ("client.done", True),
        ]),
    )


@pytest.mark.parametrize(("method", "status"), [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")])
def test_responses_without_a_body(world: World, method: bytes, status: bytes) -> None:
    exchange = world.exchange(request(method))
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    world.play(
        (exchange.start, [("upstream.send", method + b" /p HTTP/1.1", method == b"HEAD", False)]),
        (lambda: exchange.response_head(response(status), upstream), [("client.head", int(status[:3]), False, False, b"")]),
    )


def test_interim_responses_go_to_the_client_side(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    world.play((lambda: exchange.response_head(response(b"103 Early Hints", b""), upstream), [("client.interim", 103)]))
    assert exchange.state is ExchangeState.WAITING


def test_an_unasked_protocol_switch_is_a_502(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    switching = response(b"101 Switching Protocols", b"Connection: upgrade\r\nUpgrade: websocket\r\n")
    world.play(
        (lambda: exchange.response_head(switching, upstream), [
            ("upstream.abort",), ("client.error", 502, False, b""), ("client.done", False),
        ]),
    )


def test_a_tunnel_relays_both_ways_and_closes(world: World) -> None:
    exchange = world.exchange(request(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    switching = response(b"101 Switching Protocols", b"Connection: upgrade\r\nUpgrade: websocket\r\n")
    world.play(
        (lambda: exchange.response_head(switching, upstream), [
            ("client.tunnel", 101), ("upstream.register_body_pauser",), ("client.producer", "upstream"),
        ]),
        (lambda: exchange.tunnel_data(b"\x81\x00"), [("client.tunnel_data", b"\x81\x00")]),
        (lambda: exchange.client_tunnel_data(b"\x81\x01"), [("upstream.write", b"\x81\x01")]),
        (exchange.tunnel_closed, [
            ("upstream.unregister_body_pauser",), ("client.pause_body", False), ("client.producer", None),
            ("upstream.resume",), ("client.done", True),
        ]),
    )
    world.assert_released()


def test_a_5xx_counts_against_the_backend(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    exchange.response_head(response(b"503 Service Unavailable", b"Content-Length: 0\r\n"), upstream)
    exchange.response_done()
    assert exchange.backend.errors == 1


def test_the_client_going_away_aborts_the_upstream(world: World) -> None:
    exchange = world.exchange(request())
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    world.play((exchange.client_lost, [("upstream.abort",), ("client.done", False)]))
    # Whatever the upstream reports afterwards changes nothing.
    world.play((lambda: exchange.upstream_failed(502, "late"), []), (exchange.response_done, []))
    world.assert_released()


def test_a_version_cookie_is_passed_as_extra_lines(world: World) -> None:
    exchange = world.exchange(request())
    exchange.response_extra = b"Set-Cookie: v=2\r\n"
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    exchange.start()
    world.log.take()
    world.play((lambda: exchange.response_head(response(), upstream), [("client.head", 200, True, False, b"Set-Cookie: v=2\r\n")]))


def test_a_move_the_table_does_not_allow_is_an_error(world: World) -> None:
    exchange = world.exchange(request())
    exchange.client_lost()
    with pytest.raises(StateError):
        exchange._move(ExchangeState.RESPONDING)


def test_request_heads_are_request_heads() -> None:
    # The exchange takes any parsed head: HTTP/2 builds one without HTTP/1.1 text.
    head = RequestHead()
    head.method, head.target, head.host = b"GET", b"/p", b"solo.localhost"
    world = World()
    route = world.table.lookup("solo.localhost", "/")
    assert route is not None
    exchange = Exchange(world.side, world.gateway, head, route, route.service.pick())  # type: ignore[arg-type]
    upstream = world.upstream(exchange)
    world.pool.idle.append(upstream)
    world.play((exchange.start, [("upstream.send", b"GET /p HTTP/1.1", False, False)]))
    exchange.client_lost()
