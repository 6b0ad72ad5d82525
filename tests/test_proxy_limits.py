"""Clients that stop reading, and the fairness of the in-flight bound (issue 14, item 6), over HTTP/1.1."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from labelgw.http.logsafe import printable
from labelgw.http.settings import ProxySettings
from proxyharness import ProxyHarness, get, ok

SOLO = b"solo.localhost"


@pytest.fixture
def make_harness() -> Iterator[Callable[..., ProxyHarness]]:
    made: list[ProxyHarness] = []

    def make(**settings: Any) -> ProxyHarness:
        harness = ProxyHarness(ProxySettings(**settings) if settings else None)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.assert_accounting()


@pytest.fixture
def h(make_harness: Callable[..., ProxyHarness]) -> ProxyHarness:
    return make_harness()


# The send timeout.


def test_client_that_stops_reading_a_response_is_aborted_after_the_send_timeout(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    client.transport.fill_buffer()
    assert upstream.paused
    h.advance(h.settings.send_timeout - 1)
    assert not client.aborted and h.gateway.in_flight == 1
    h.advance(2)
    assert client.aborted
    assert upstream.aborted
    h.settle()
    assert h.gateway.connections == set()


def test_progress_restarts_the_send_timeout(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    for _ in range(3):
        client.transport.fill_buffer()
        h.advance(h.settings.send_timeout * 0.75)
        client.transport.drain_buffer()
    assert not client.aborted
    upstream.send(b"def")
    assert client.response().body == b"abcdef"


def test_closing_connection_whose_client_reads_nothing_is_aborted(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, extra=b"Connection: close\r\n"))
    upstream = h.upstream().accept()
    client.transport.fill_buffer()
    upstream.send(ok(b"done"))
    h.settle()
    # The close waits for the client to read what is buffered, but not for ever.
    assert client.closing and not client.lost
    h.advance(h.settings.send_timeout + 1)
    assert client.aborted
    h.settle()
    assert client.lost


def test_pipelined_requests_wait_while_the_client_reads_nothing(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, b"/1") + get(SOLO, b"/2") + get(SOLO, b"/3"))
    upstream = h.upstream().accept()
    assert upstream.request().target == b"/1"
    upstream.take()
    client.transport.fill_buffer()
    upstream.send(ok(b"one"))
    # The first response waits in the client's buffer: no further response is made to wait with it.
    assert upstream.take() == b""
    assert client.paused
    client.transport.drain_buffer()
    assert upstream.request().target == b"/2"
    upstream.take()
    upstream.send(ok(b"two"))
    assert upstream.request().target == b"/3"
    upstream.send(ok(b"three"))
    assert [r.body for r in client.responses()] == [b"one", b"two", b"three"]


# The in-flight bound, per service.


def test_one_service_cannot_take_the_capacity_of_the_others(make_harness: Callable[..., ProxyHarness]) -> None:
    h = make_harness(max_in_flight=4)
    slow = []
    for _ in range(2):
        client = h.connect()
        client.send(get(SOLO))
        slow.append((client, h.upstream().accept()))
    third = h.connect()
    third.send(get(SOLO))
    response = third.response()
    assert response.status == 503 and response.header(b"retry-after") == b"1"
    # Another service still has its share.
    other = h.connect()
    other.send(get(b"api.localhost"))
    upstream = h.upstream().accept()
    upstream.send(ok(b"api"))
    assert other.response().body == b"api"
    for client, upstream in slow:
        upstream.send(ok())
        assert client.response().status == 200


def test_per_service_bound_is_configurable(make_harness: Callable[..., ProxyHarness]) -> None:
    assert ProxySettings(max_in_flight=1000).service_in_flight_limit == 500
    assert ProxySettings(max_in_flight=1).service_in_flight_limit == 1
    h = make_harness(max_in_flight=10, max_in_flight_per_service=1)
    first = h.connect()
    first.send(get(SOLO))
    upstream = h.upstream().accept()
    second = h.connect()
    second.send(get(SOLO))
    assert second.response().status == 503
    upstream.send(ok())
    assert first.response().status == 200


# Log lines.


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\r\nforged: line", "a\\x0d\\x0aforged: line"),
        (b"esc\x1b[31m\x00\x7f", "esc\\x1b[31m\\x00\\x7f"),
        ("caf\u00e9 \u0085", "caf\u00e9 \\x85"),
        (b"\xff", "\\xff"),
    ],
)
def test_printable_escapes_control_characters(raw: str | bytes, shown: str) -> None:
    assert printable(raw) == shown


def test_a_connection_refuses_a_move_its_table_does_not_allow(h: ProxyHarness) -> None:
    from labelgw.http.states import ConnectionState, StateError

    client = h.connect()
    client.close()
    h.settle()
    assert client.protocol.state is ConnectionState.CLOSED
    with pytest.raises(StateError):
        client.protocol._move(ConnectionState.IDLE)
