"""labelgw.cli.accept: the lean accept step of labelgw's TCP listeners. The Twisted code it writes out is pinned (a
new Twisted release that changes it fails loudly), its transports are the ones Twisted builds, and real loopback
connections on labelgw's reactor are accepted, read, written, closed and reset as on Twisted's own port."""

from __future__ import annotations

import errno
import select
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.internet import abstract, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

sys.path.insert(0, str(Path(__file__).parent))
from test_internals import fingerprint  # noqa: E402
from test_reactor_read import Recorder  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux only")


def test_the_twisted_steps_it_writes_out_are_the_ones_it_was_written_from() -> None:
    # LeanPort.doRead and LeanPort._transport do what these do. A change: compare labelgw/cli/accept.py with the new
    # code, then update the fingerprints.
    assert fingerprint(tcp.Port.doRead) == "f83e1375d35d43bf", "tcp.Port.doRead changed"
    assert fingerprint(tcp.Server.__init__) == "1db4dd50b3ec6a02", "tcp.Server.__init__ changed"
    assert fingerprint(tcp.Connection.__init__) == "4df0f1edc702946f", "tcp.Connection.__init__ changed"
    assert fingerprint(abstract.FileDescriptor.__init__) == "aa5a15c0c73aee75", "FileDescriptor.__init__ changed"
    assert fingerprint(tcp.Server.getHost) == "db4a19df1c61ed29", "tcp.Server.getHost changed"
    assert fingerprint(tcp._SocketCloser._closeSocket) == "950d183805824065", "_SocketCloser._closeSocket changed"


class Ports:
    """A lean reactor with a LeanPort and Twisted's tcp.Port, driven by hand; blocking client sockets."""

    def __init__(self, interface: str = "127.0.0.1") -> None:
        from labelgw.cli.accept import listen_tcp
        from labelgw.cli.reactor import LeanEPollReactor

        self.reactor = LeanEPollReactor()
        self.lean: list[Recorder] = []
        self.stock: list[Recorder] = []
        self.lean_port = listen_tcp(self.reactor, 0, Factory.forProtocol(lambda: Recorder(self.lean)), 50, interface)
        self.stock_port = self.reactor.listenTCP(
            0, Factory.forProtocol(lambda: Recorder(self.stock)), interface=interface
        )
        self.clients: list[socket.socket] = []

    def connect(self, port: Any) -> socket.socket:
        host = port.getHost()
        family = socket.AF_INET6 if isinstance(host, IPv6Address) else socket.AF_INET
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect((host.host, host.port))
        self.clients.append(client)
        return client

    def until(self, done: Callable[[], bool]) -> None:
        for _ in range(300):
            if done():
                return
            self.reactor.iterate(0.01)
        raise AssertionError("not reached")

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for side in self.lean + self.stock:
            if not side.lost:
                side.transport.abortConnection()
        self.lean_port.stopListening()
        self.stock_port.stopListening()
        for _ in range(5):
            self.reactor.iterate(0)
        self.reactor._poller.close()
        self.reactor.waker.connectionLost(None)


@pytest.fixture
def ports() -> Iterator[Ports]:
    made = Ports()
    yield made
    made.close()


def test_the_transport_is_the_one_twisted_builds(ports: Ports) -> None:
    ports.connect(ports.lean_port)
    ports.connect(ports.stock_port)
    ports.until(lambda: bool(ports.lean and ports.stock))
    lean, stock = ports.lean[0].transport, ports.stock[0].transport
    # Exactly tcp.Server: labelgw's reactor and fastwrite take their fast paths on it.
    assert type(lean) is tcp.Server is type(stock)
    lean_state, stock_state = vars(lean), vars(stock)
    # Two additions: close() without shutdown(2), and getHost without getsockname on a port with one address.
    assert set(lean_state) == set(stock_state) | {"_shouldShutdown", "getHost"}
    assert lean_state["_shouldShutdown"] is False
    # Both hold the class-level state the fast paths read (the lean port sets it, the reactor's addReader for
    # Twisted's port), with the class's values.
    from labelgw.http.fastwrite import DEFAULTS

    for name, value in DEFAULTS.items():
        assert lean_state[name] == stock_state[name] == value == getattr(tcp.Server, name), name
    for name in ("reactor", "_tempDataLen", "_tempDataBuffer", "connected", "hostname", "sessionno"):
        assert lean_state[name] == stock_state[name], name
    assert lean_state["server"] is ports.lean_port and lean_state["protocol"] is ports.lean[0]
    assert lean.client == lean.socket.getpeername()
    assert lean.fileno() == lean.socket.fileno() and lean.socket.gettimeout() == 0.0
    assert lean.logstr == stock.logstr == "Recorder,0,127.0.0.1"
    assert lean.repstr == f"<Recorder #0 on {ports.lean_port.getHost().port}>"
    assert lean.getHost() == IPv4Address("TCP", "127.0.0.1", ports.lean_port.getHost().port)
    assert lean.getPeer() == stock.getPeer().__class__("TCP", *lean.socket.getpeername())
    assert lean.reactor.getReaders().count(lean) == 1


def test_data_both_ways_then_the_peers_close(ports: Ports) -> None:
    client = ports.connect(ports.lean_port)
    ports.until(lambda: bool(ports.lean))
    server = ports.lean[0]
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    ports.until(lambda: server.received == b"GET / HTTP/1.1\r\n\r\n")
    server.transport.write(b"x" * 300_000)
    received = b""
    while len(received) < 300_000:
        ports.reactor.iterate(0)
        try:
            received += client.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
    client.close()
    ports.until(lambda: bool(server.lost))
    assert server.lost[0].check(ConnectionDone)
    assert server.transport.reactor.getReaders().count(server.transport) == 0


def test_the_servers_close_ends_with_a_fin_and_a_reset_when_aborted(ports: Ports) -> None:
    first, second = ports.connect(ports.lean_port), ports.connect(ports.lean_port)
    ports.until(lambda: len(ports.lean) == 2)
    ports.lean[0].transport.write(b"bye")
    ports.lean[0].transport.loseConnection()
    ports.until(lambda: bool(ports.lean[0].lost))
    assert first.recv(10) == b"bye" and first.recv(10) == b""
    ports.lean[1].transport.abortConnection()
    ports.until(lambda: bool(ports.lean[1].lost))
    with pytest.raises(ConnectionResetError):
        second.recv(10)


def test_a_reset_is_a_lost_connection(ports: Ports) -> None:
    client = ports.connect(ports.lean_port)
    ports.until(lambda: bool(ports.lean))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    ports.until(lambda: bool(ports.lean[0].lost))
    assert ports.lean[0].lost[0].check(ConnectionLost) and not ports.lean[0].lost[0].check(ConnectionDone)


def test_connections_waiting_together_are_accepted_in_one_event(ports: Ports) -> None:
    for _ in range(5):
        ports.connect(ports.lean_port)
    ports.until(lambda: len(ports.lean) == 5)
    assert [p.transport.sessionno for p in ports.lean] == [0, 1, 2, 3, 4]
    assert ports.lean_port.numberAccepts >= 1


def test_a_refusing_factory_closes_the_socket(ports: Ports) -> None:
    ports.lean_port.factory = Factory.forProtocol(lambda: None)  # type: ignore[arg-type,return-value]
    ports.lean_port.factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    client = ports.connect(ports.lean_port)
    for _ in range(50):
        ports.reactor.iterate(0.01)
    assert client.recv(10) == b""


class _AcceptFailsOnce:
    """The listening socket, whose C-level accept fails once with C{code}."""

    def __init__(self, real: socket.socket, code: int) -> None:
        self.real = real
        self.code = code

    def _accept(self) -> Any:
        if self.code:
            code, self.code = self.code, 0
            raise OSError(code, "injected")
        return self.real._accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EMFILE, errno.ENOBUFS])
def test_an_accept_error_goes_to_twisteds_own_step(ports: Ports, code: int) -> None:
    port = ports.lean_port
    port.socket = _AcceptFailsOnce(port.socket, code)  # type: ignore[assignment]
    ports.connect(port)
    ports.until(lambda: bool(ports.lean))
    assert type(ports.lean[0].transport) is tcp.Server


def test_a_wildcard_port_asks_the_socket_for_the_local_address() -> None:
    made = Ports(interface="0.0.0.0")
    try:
        host = made.lean_port.getHost()
        client = socket.create_connection(("127.0.0.1", host.port), timeout=5)
        made.clients.append(client)
        made.until(lambda: bool(made.lean))
        transport = made.lean[0].transport
        assert "getHost" not in vars(transport)
        assert transport.getHost() == IPv4Address("TCP", "127.0.0.1", host.port)
    finally:
        made.close()


def test_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        made = Ports(interface="::1")
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"no IPv6 loopback: {error}")
    try:
        made.connect(made.lean_port)
        made.connect(made.stock_port)
        made.until(lambda: bool(made.lean and made.stock))
        lean, stock = made.lean[0].transport, made.stock[0].transport
        assert lean.client == stock.client[:1] + lean.client[1:2] + stock.client[2:]
        assert lean.getPeer().host == "::1" and isinstance(lean.getPeer(), IPv6Address)
        assert lean.getHost() == IPv6Address("TCP", "::1", made.lean_port.getHost().port)
        assert lean.logstr == "Recorder,0,::1"
    finally:
        made.close()


def test_listeners_use_it_on_a_real_reactor_only() -> None:
    from labelgw.cli.accept import LeanPort
    from labelgw.cli.listeners import ListenerService
    from labelgw.cli.reactor import LeanEPollReactor

    memory = MemoryReactorClock()
    listener = ListenerService(memory, "tcp:0:interface=127.0.0.1", Factory(), "http")
    listener.privilegedStartService()
    assert memory.tcpServers and not isinstance(listener.port, LeanPort)

    reactor = LeanEPollReactor()
    try:
        for description in ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1"):
            if description.startswith("tcp6") and not socket.has_ipv6:
                continue
            listener = ListenerService(reactor, description, Factory(), "http")
            try:
                listener.privilegedStartService()
            except SystemExit:
                continue  # no IPv6 loopback here
            assert isinstance(listener.port, LeanPort)
            assert listener.port.backlog == 1024
            listener.stopService()
    finally:
        for _ in range(3):
            reactor.iterate(0)
        reactor._poller.close()
        reactor.waker.connectionLost(None)


def test_start_up_is_frozen_out_of_the_collector_once_the_reactor_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from labelgw.cli import listeners
    from labelgw.cli.reactor import LeanEPollReactor

    monkeypatch.setattr(listeners, "_FREEZE_SCHEDULED", False)
    # A test's memory reactor never runs: nothing is scheduled on it, and the process-wide flag is left for a
    # real one.
    listeners.freeze_after_start(MemoryReactorClock())
    assert not listeners._FREEZE_SCHEDULED
    reactor = LeanEPollReactor()
    try:
        listeners.freeze_after_start(reactor)
        listeners.freeze_after_start(reactor)  # once per process
        scheduled = [entry for entry in reactor._eventTriggers["startup"].after if entry[0] is listeners._freeze]
        assert len(scheduled) == 1
        done: list[str] = []
        monkeypatch.setattr(gc, "collect", lambda *a: done.append("collect") or 0)
        monkeypatch.setattr(gc, "freeze", lambda: done.append("freeze"))
        scheduled[0][0]()
        # Collected first: no garbage is frozen.
        assert done == ["collect", "freeze"]
    finally:
        reactor._poller.close()
        reactor.waker.connectionLost(None)
