"""The whole-response path of HTTP/1.1 (labelgw.http.exchange.WholeExchange, ClientConnection.response_whole): a
small response whose body came with its head leaves in one write, with what the three-step path would send, and
every other case still takes the three steps."""

from __future__ import annotations

from typing import Any

import pytest

from labelgw.http import server
from labelgw.http.exchange import Exchange, WholeExchange
from proxyharness import ProxyHarness, get, ok

SOLO = b"solo.localhost"


@pytest.fixture
def h() -> ProxyHarness:
    return ProxyHarness()


def _spy_writes(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    writes: list[bytes] = []
    real = server.write_now

    def spy(transport: Any, data: bytes) -> None:
        if transport is client.transport:
            writes.append(data)
        real(transport, data)

    monkeypatch.setattr(server, "write_now", spy)
    return writes


@pytest.mark.parametrize("repeat", [1, 3])
def test_a_small_response_leaves_in_one_write(h: ProxyHarness, monkeypatch: pytest.MonkeyPatch, repeat: int) -> None:
    client = h.connect()
    writes = _spy_writes(client, monkeypatch)
    upstream = None
    for _ in range(repeat):
        client.send(get(SOLO))
        assert isinstance(client.protocol.exchange, WholeExchange)
        upstream = upstream or h.upstream().accept()
        upstream.send(ok(b"hello", extra=b"X-Backend: a\r\nConnection: keep-alive\r\n"))
    assert len(writes) == repeat
    assert writes[0] == (
        b"HTTP/1.1 200 OK\r\nX-Backend: a\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert len(set(writes)) == 1
    assert [response.body for response in client.responses()] == [b"hello"] * repeat
    h.assert_accounting()


def test_a_whole_response_to_a_closing_request_says_close(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, extra=b"Connection: close\r\n"))
    h.upstream().accept().send(ok(b"bye"))
    assert client.received() == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye"
    h.settle()
    assert client.closing
    h.assert_accounting()


def test_a_whole_5xx_counts_against_the_backend(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO))
    h.upstream().accept().send(ok(b"oops", status=b"503 Service Unavailable"))
    response = client.response()
    assert (response.status, response.body) == (503, b"oops")
    assert h.backend("solo-1").errors == 1
    h.assert_accounting()


def test_debug_headers_go_into_a_whole_response(h: ProxyHarness) -> None:
    h.gateway.debug_headers = True
    client = h.connect()
    client.send(get(SOLO))
    h.upstream().accept().send(ok())
    response = client.response()
    assert response.body == b"hello"
    assert response.header(b"x-labelgw-service") == b"solo"
    h.assert_accounting()


def test_a_pipelined_request_behind_a_whole_response_is_served(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(get(SOLO, path=b"/a") + get(SOLO, path=b"/b"))
    upstream = h.upstream().accept()
    upstream.send(ok(b"one"))
    upstream.send(ok(b"two"))
    assert [response.body for response in client.responses()] == [b"one", b"two"]
    h.assert_accounting()


def test_a_compressing_client_side_takes_the_three_steps() -> None:
    """A response transform (here compression; plugins alike) wraps the connection as the exchange's client side:
    that exchange is a plain Exchange, and the wrapper gets the response in the three steps it implements."""
    import gzip

    from test_mw_chain import harness
    from test_mw_response_paths import with_spec

    h = harness(with_spec(compress="true"))
    client = h.connect()
    client.send(get(b"api.localhost", extra=b"Accept-Encoding: gzip\r\n"))
    assert type(client.protocol.exchange) is Exchange
    body = b"hello world " * 1000
    h.new_connects()[0].accept().send(ok(body, extra=b"Content-Type: text/html\r\n"))
    response = client.response()
    assert response.header(b"Content-Encoding") == b"gzip" and gzip.decompress(response.body) == body
    h.assert_accounting()
