"""The common format's fast path (AccessLog._exchange_common: a line kind kept per connection, with the line's
constant text and the metrics' counters) writes exactly the line of the general formatter (AccessLog._line_any, str
formatting) and counts as RequestMetrics.exchange_done, for any relayed exchange: generated exchanges, both paths,
byte for byte."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from labelgw.http.accesslog import NO_KIND, AccessLog
from labelgw.http.states import ExchangeState


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.pending = 0

    def put(self, data: bytes) -> bool:
        self.data += data
        return True


class H1Side:
    def __init__(self, peer: bytes) -> None:
        self.peer_ip = peer
        self.proto = b"http"
        self.log_kind = NO_KIND
        self.log_kind_keeper = None

    is_http2 = False


class H2Side(H1Side):
    stream_id = 1
    is_http2 = True


_TOKEN = st.binary(min_size=1, max_size=8).map(lambda raw: bytes(0x41 + b % 26 for b in raw))
_PEER = st.sampled_from([b"", b"127.0.0.1", b"10.0.0.9", b"::1", b"fe80::1%eth0"])
_ASCII_TARGET = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
    lambda text: ("/" + text).encode("ascii")
)
_TARGET = st.one_of(_ASCII_TARGET, st.binary(max_size=20).map(lambda raw: b"/" + raw))
_REQUEST_ID = st.one_of(st.none(), st.just(b""), st.text(alphabet="abcdef0123456789-_.", min_size=1, max_size=36)
                        .map(lambda text: text.encode("ascii")))


@st.composite
def exchanges(draw: Any) -> tuple[Any, Any, float]:
    created = draw(st.floats(min_value=1e6, max_value=2e9, allow_nan=False))
    started = created + draw(st.floats(min_value=0.0, max_value=5.0))
    ttfb = draw(st.floats(min_value=0.0, max_value=70.0))
    now = started + ttfb + draw(st.floats(min_value=0.0, max_value=3.0))
    head = SimpleNamespace(
        method=draw(_TOKEN), target=draw(_TARGET), version=draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])),
        request_id=draw(_REQUEST_ID), host=b"solo.localhost", trace_id=None,
    )
    side = (H2Side if draw(st.booleans()) else H1Side)(draw(_PEER))
    name = draw(st.one_of(st.sampled_from(["solo", "api", "web-1"]), st.text(max_size=12)))
    route = SimpleNamespace(service=SimpleNamespace(name=name), host="solo.localhost", path_prefix="/")
    backend = SimpleNamespace(address="127.0.0.1", port=8080)
    exchange = SimpleNamespace(
        head=head, client=side, created_at=created, _started_at=started, _ttfb=ttfb,
        status=draw(st.sampled_from([101, 200, 204, 301, 404, 500, 503, 599])),
        bytes_in=draw(st.integers(0, 10**9)), bytes_out=draw(st.integers(0, 10**12)),
        error_message=None, client_gone=draw(st.booleans()), route=route, version=draw(st.sampled_from([None, "v2"])),
        backend=backend, on_backend=True, attempts=draw(st.integers(1, 3)),
    )
    state = draw(st.sampled_from([ExchangeState.RESPONDING, ExchangeState.TUNNEL]))
    return exchange, state, now


@settings(max_examples=300, deadline=None)
@given(st.lists(exchanges(), min_size=1, max_size=4))
def test_the_fast_common_line_is_the_general_one(cases: list[tuple[Any, Any, float]]) -> None:
    fast_sink, general_sink = Sink(), Sink()
    fast, general = AccessLog(Clock(), "common", fast_sink), AccessLog(Clock(), "common", general_sink)
    for exchange, state, now in cases:
        fast.exchange(exchange, state, now)
        general_sink.data += general._line_any(exchange, state, now)
    fast.flush()
    assert fast_sink.data == general_sink.data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(exchanges(), st.floats(min_value=0.0, max_value=100.0),
                          st.sampled_from([b"GET", b"POST", b"HEAD", b"BREW"]),
                          st.sampled_from([0, 101, 200, 204, 404, 499, 502, 504, 1234])), min_size=1, max_size=6))
def test_the_access_logs_inlined_metrics_count_as_exchange_done(cases: list[Any]) -> None:
    """AccessLog.exchange(..., metrics) updates the counters itself (one call from Exchange._complete for both):
    the same counts, sums and buckets as RequestMetrics.exchange_done, on the fast path and the general one, and
    the same line as without metrics."""
    from labelgw.control.metrics import RequestMetrics

    inlined, called = RequestMetrics(), RequestMetrics()
    with_sink, without_sink = Sink(), Sink()
    with_metrics, without = AccessLog(Clock(), "common", with_sink), AccessLog(Clock(), "common", without_sink)
    for (exchange, state, now), elapsed, method, status in cases:
        exchange.head.method = method
        exchange.status = status
        exchange.created_at = now - elapsed
        with_metrics.exchange(exchange, state, now, inlined)
        called.exchange_done(exchange, now)
        # A side of its own for the other log: a line kind belongs to the gateway (and metrics) that made it.
        side = exchange.client
        exchange.client = type(side)(side.peer_ip)
        without.exchange(exchange, state, now)
        exchange.client = side
    with_metrics.flush()
    without.flush()
    assert with_sink.data == without_sink.data
    assert _plain(inlined) == _plain(called)


def _plain(metrics: Any) -> Any:
    """RequestMetrics.by_service() with its histograms as (counts, sum)."""
    return {
        name: (requests, {version: (h.counts, h.total) for version, h in histograms.items()}, bytes_in, bytes_out)
        for name, (requests, histograms, bytes_in, bytes_out) in metrics.by_service().items()
    }


def test_the_json_format_counts_the_metrics_too() -> None:
    from labelgw.control.metrics import RequestMetrics
    from labelgw.http.states import ExchangeState as S

    metrics = RequestMetrics()
    head = SimpleNamespace(method=b"GET", target=b"/", version=b"HTTP/1.1", request_id=b"r", host=b"h", trace_id=None)
    route = SimpleNamespace(service=SimpleNamespace(name="solo"), host="solo.localhost", path_prefix="/")
    exchange = SimpleNamespace(
        head=head, client=H1Side(b"127.0.0.1"), created_at=10.0, _started_at=10.0, _ttfb=0.001, status=200,
        bytes_in=3, bytes_out=5, error_message=None, client_gone=False, route=route, version=None,
        backend=SimpleNamespace(address="127.0.0.1", port=1), on_backend=True, attempts=1,
    )
    AccessLog(Clock(), "json", Sink()).exchange(exchange, S.RESPONDING, 10.002, metrics)
    requests, _, bytes_in, bytes_out = metrics.by_service()["solo"]
    assert requests == {("", "GET", 2): 1} and (bytes_in, bytes_out) == (3, 5)


# A keep-alive connection's requests: each step repeats the previous request (the same head objects, as the
# HTTP/1.1 side makes a repeated head) or changes one thing the kept line kind (AccessLog's LineKind) is held to.
_STEPS = st.lists(
    st.sampled_from([
        "repeat", "repeat", "repeat", "status", "version", "route", "target-copy", "target-other", "method-copy",
        "method-other", "http-version", "next-second", "same-second", "client-gone", "tunnel", "bytes", "slow",
        "error", "own-answer", "switching",
    ]),
    min_size=1, max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(_STEPS, st.sampled_from([b"127.0.0.1", b"fe80::1%eth0"]), st.sampled_from(["solo", "50%"]))
def test_a_kept_line_kind_writes_and_counts_as_the_general_path(steps: list[str], peer: bytes, name: str) -> None:
    """The kept kind's line is the general formatter's, and its counters are RequestMetrics.exchange_done's, through
    any sequence of repeated and changed requests on one connection (each log its own connection: a kind belongs to
    the gateway that made it)."""
    from labelgw.control.metrics import RequestMetrics

    fast_sink, general_sink = Sink(), Sink()
    fast, general = AccessLog(Clock(), "common", fast_sink), AccessLog(Clock(), "common", general_sink)
    inlined, called = RequestMetrics(), RequestMetrics()
    fast_side, general_side = H1Side(peer), H1Side(peer)
    route = SimpleNamespace(service=SimpleNamespace(name=name), host="solo.localhost", path_prefix="/")
    head = SimpleNamespace(method=b"GET", target=b"/a%20b", version=b"HTTP/1.1", request_id=b"r1", host=b"h",
                           trace_id=None)
    now = 1_000_000.25
    exchange = SimpleNamespace(
        head=head, client=fast_side, created_at=now - 0.002, _started_at=now - 0.002, _ttfb=0.001, status=200,
        bytes_in=0, bytes_out=5, error_message=None, client_gone=False, route=route, version=None,
        backend=SimpleNamespace(address="127.0.0.1", port=1), on_backend=True, attempts=1,
    )
    state = ExchangeState.RESPONDING
    for step in steps:
        head = exchange.head = SimpleNamespace(**vars(head))
        exchange.client_gone, exchange.error_message, state = False, None, ExchangeState.RESPONDING
        if step == "status":
            exchange.status = 404 if exchange.status == 200 else 200
        elif step == "version":
            exchange.version = "v2" if exchange.version is None else None
        elif step == "route":
            exchange.route = SimpleNamespace(service=SimpleNamespace(name=name + "x"), host="h", path_prefix="/")
        elif step == "target-copy":
            head.target = bytes(bytearray(head.target))
        elif step == "target-other":
            head.target = head.target + b"/c"
        elif step == "method-copy":
            head.method = bytes(bytearray(head.method))
        elif step == "method-other":
            head.method = b"POST" if head.method == b"GET" else b"GET"
        elif step == "http-version":
            head.version = b"HTTP/1.0" if head.version == b"HTTP/1.1" else b"HTTP/1.1"
        elif step == "next-second":
            now += 1.0
        elif step == "same-second":
            now += 0.001
        elif step == "client-gone":
            exchange.client_gone = True
        elif step == "tunnel":
            state = ExchangeState.TUNNEL
        elif step == "bytes":
            exchange.bytes_in, exchange.bytes_out = exchange.bytes_in + 7, exchange.bytes_out + 11
        elif step == "slow":
            exchange.created_at = now - 0.3
        elif step == "error":
            exchange.error_message = "upstream timed out"
        elif step == "own-answer":
            # labelgw answered with the same status before any response head (a middleware's answer, a 413).
            state = ExchangeState.WAITING
        elif step == "switching":
            exchange.status = 101
        head.request_id = b"r%d" % len(general_sink.data)
        exchange.client = fast_side
        fast.exchange(exchange, state, now, inlined)
        exchange.client = general_side
        general_sink.data += general._line_any(exchange, state, now)
        called.exchange_done(exchange, now)
    fast.flush()
    assert fast_sink.data == general_sink.data
    assert _plain(inlined) == _plain(called)


def test_an_http2_connection_keeps_the_line_kind_for_its_next_stream() -> None:
    """A stream serves one request: the kind its line made is kept by its connection, and the next stream starts
    with it (a repeated header block gives the same head objects), so a second identical request takes the kept
    kind and still writes the general formatter's line."""
    sink, general = Sink(), AccessLog(Clock(), "common", Sink())
    log = AccessLog(Clock(), "common", sink)
    connection = SimpleNamespace(log_kind=NO_KIND)
    route = SimpleNamespace(service=SimpleNamespace(name="solo"), host="solo.localhost", path_prefix="/")
    head = SimpleNamespace(method=b"GET", target=b"/x", version=b"HTTP/2", request_id=b"r1", host=b"h", trace_id=None)
    expected = b""
    kinds = []
    for stream_id in (1, 3):
        stream = H2Side(b"10.0.0.9")
        stream.stream_id = stream_id
        stream.log_kind, stream.log_kind_keeper = connection.log_kind, connection
        exchange = SimpleNamespace(
            head=SimpleNamespace(**vars(head)), client=stream, created_at=5.0, _started_at=5.0, _ttfb=0.002,
            status=200, bytes_in=0, bytes_out=12, error_message=None, client_gone=False, route=route, version=None,
            backend=SimpleNamespace(address="127.0.0.1", port=1), on_backend=True, attempts=1,
        )
        exchange.head.request_id = b"r%d" % stream_id
        log.exchange(exchange, ExchangeState.RESPONDING, 5.004)
        expected += general._line_any(exchange, ExchangeState.RESPONDING, 5.004)
        kinds.append(connection.log_kind)
    log.flush()
    assert kinds[0] is kinds[1] is not NO_KIND
    assert sink.data == expected and b'"GET /x HTTP/2" 200 12 "solo" 2.000 r3\n' in sink.data


def test_the_upstream_time_text_is_milliseconds_of_whole_microseconds() -> None:
    from labelgw.http.linekind import ms_text as _ms_text

    assert _ms_text(0) == b"0.000 " and _ms_text(7) == b"0.007 " and _ms_text(1234567) == b"1234.567 "
    # A wall clock set back while the request was in flight.
    assert _ms_text(-1500) == b"-1.500 "
