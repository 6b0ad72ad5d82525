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
