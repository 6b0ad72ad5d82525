"""The common format's fast path (AccessLog._exchange_common: pre-formatted client/time prefixes, statuses and
services) writes exactly the line of the general formatter (AccessLog._exchange_any, str formatting) for any
relayed exchange: generated exchanges, both paths, byte for byte."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from labelgw.http.accesslog import AccessLog
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


class H2Side(H1Side):
    stream_id = 1


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
        general._exchange_any(exchange, state, now)
    fast.flush()
    general.flush()
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
        without.exchange(exchange, state, now)
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
