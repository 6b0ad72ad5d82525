"""labelgw.cli.reactor reads plain TCP transports without their doRead: the Twisted code it writes out is pinned
here (a new Twisted release that changes it fails loudly), and real loopback connections on the lean reactor get
their data, their peer's close and a reset as the stock reactor delivers them."""

from __future__ import annotations

import select
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

sys.path.insert(0, str(Path(__file__).parent))
from support.handpair import connect_by_hand  # noqa: E402
from test_internals import fingerprint  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux only")


def test_the_tcp_read_step_is_the_one_the_lean_reactor_writes_out() -> None:
    from twisted.internet import tcp

    # LeanEPollReactor.doPoll handles a read event of exactly tcp.Server / tcp.Client as these two do. A change:
    # compare labelgw/cli/reactor.py with the new code, then update the fingerprints.
    assert fingerprint(tcp.Connection.doRead) == "7400095c2d5e647d", "tcp.Connection.doRead changed"
    assert fingerprint(tcp.Connection._dataReceived) == "14f89f05f87abd28", "tcp.Connection._dataReceived changed"
    for cls in (tcp.Server, tcp.Client):
        assert cls.doRead is tcp.Connection.doRead
        assert cls._dataReceived is tcp.Connection._dataReceived
    assert isinstance(tcp.Connection.bufferSize, int)


class Recorder(Protocol):
    def __init__(self, kept: list["Recorder"]) -> None:
        self.kept = kept
        self.received = b""
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.kept.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.append(reason)


@pytest.fixture
def pair() -> Iterator[tuple[Any, Recorder, Recorder]]:
    """A real loopback TCP connection on a lean reactor, driven by hand."""
    from labelgw.cli.reactor import LeanEPollReactor

    reactor = LeanEPollReactor()
    port, server, client = connect_by_hand(reactor, Recorder)
    yield reactor, server, client
    for side in (server, client):
        if not side.lost:
            side.transport.abortConnection()
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0)
    reactor._poller.close()
    reactor.waker.connectionLost(None)


def _until(reactor: Any, done: Any) -> None:
    for _ in range(200):
        if done():
            return
        reactor.iterate(0.01)
    raise AssertionError("not reached")


def test_data_both_ways_reaches_the_protocols(pair: tuple[Any, Recorder, Recorder]) -> None:
    reactor, server, client = pair
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    _until(reactor, lambda: server.received == b"GET / HTTP/1.1\r\n\r\n")
    server.transport.write(b"x" * 200_000)
    _until(reactor, lambda: len(client.received) == 200_000)
    assert not server.lost and not client.lost


def test_the_peers_close_is_a_clean_connection_done(pair: tuple[Any, Recorder, Recorder]) -> None:
    reactor, server, client = pair
    client.transport.write(b"last")
    client.transport.loseConnection()
    _until(reactor, lambda: bool(server.lost))
    assert server.received == b"last"
    assert server.lost[0].check(ConnectionDone)


def test_a_reset_is_a_lost_connection(pair: tuple[Any, Recorder, Recorder]) -> None:
    reactor, server, client = pair
    # SO_LINGER 0: the close sends a RST; the server's next read fails (ECONNRESET), not an EOF.
    client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.transport.abortConnection()
    _until(reactor, lambda: bool(server.lost))
    assert server.lost[0].check(ConnectionLost) and not server.lost[0].check(ConnectionDone)
