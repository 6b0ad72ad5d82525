"""labelgw.tls.deadlines: every TLS connection has a handshake deadline and a bounded close.

Real TLS without sockets: the server is the listener's TLS factory on an in-memory transport and a
MemoryReactorClock, the client the standard library's ssl over memory BIOs. End to end: tests/test_e2e_tls_deadlines.py.
"""

from __future__ import annotations

import ssl
from typing import Any, Iterator

import pytest
from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from labelgw.http.h2 import negotiating_factory
from labelgw.http.server import Gateway
from labelgw.http.settings import ProxySettings
from labelgw.core.routes import RouteTable
from labelgw.tls.deadlines import DEFAULT_CLOSE_GRACE, FLUSH_TIMEOUT, TLSServerFactory
from labelgw.tls.material import CertificateMaterial
from labelgw.tls.policy import INTERMEDIATE, build_server_context
from labelgw.tls.stdtls import StdTLSFactory
from test_tls_support import UserIssuer

HEAD_TIMEOUT = 10.0
ISSUER = UserIssuer.create()
CERT, KEY = ISSUER.issue(["gw.test"])


@implementer(IOpenSSLServerConnectionCreator)
class OneCertificate:
    """The listener's certificate choice, reduced to one certificate (the SNI selector is tested elsewhere), for
    either engine: pyOpenSSL's connection creator, or the standard library's chooser."""

    policy = INTERMEDIATE

    def __init__(self) -> None:
        self.context = build_server_context(INTERMEDIATE, CERT, KEY)
        self.material = CertificateMaterial(CERT, KEY)

    def choose(self, server_name: str | None) -> "OneCertificate":
        return self

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        return connection


class Wire(StringTransport):
    """The TCP connection under the TLS layer: records how it was closed; the test says when it is gone."""

    def __init__(self) -> None:
        super().__init__(IPv4Address("TCP", "127.0.0.1", 8443), IPv4Address("TCP", "10.0.0.9", 5555))
        self.closed = False
        self.aborted = False
        self.closed_with_producer = False
        self.protocol: Any = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseConnection(self) -> None:
        self.closed = True
        # Twisted's TCP close waits while a producer is registered and paused (FileDescriptor.doWrite).
        self.closed_with_producer = self.producer is not None
        super().loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def gone(self) -> None:
        """The kernel has closed it: what Twisted's TCP transport reports after a close or an abort."""
        self.protocol.connectionLost(Failure(error.ConnectionDone() if not self.aborted else error.ConnectionAborted()))


class Client:
    """A TLS client over memory BIOs, connected to one server connection of C{factory}."""

    def __init__(self, factory: Any, clock: MemoryReactorClock, alpn: list[str] | None = None) -> None:
        self.clock = clock
        self.server = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 5555))
        self.wire = Wire()
        self.wire.protocol = self.server
        self.server.makeConnection(self.wire)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="gw.test")
        self.received = b""
        self.close_notify = False
        self.handshaken = False

    def pump(self) -> None:
        """Deliver what each side has written to the other until both are quiet."""
        while True:
            sent = self.outgoing.read()
            if sent:
                self.server.dataReceived(sent)
            self.clock.advance(0)  # the TLS layer flushes small writes on the next reactor turn
            reply = self.wire.value()
            self.wire.clear()
            if reply:
                self.incoming.write(reply)
                self._read()
            if not sent and not reply:
                return

    def _read(self) -> None:
        if not self.handshaken:
            return
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.close_notify = True
                return
            if not data:
                # What SSLObject.read returns for the peer's close_notify.
                self.close_notify = True
                return
            self.received += data

    def send_hello(self) -> None:
        """The ClientHello, and nothing after it."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.server.dataReceived(self.outgoing.read())
        self.clock.advance(0)

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.pump()
                continue
            self.handshaken = True
            self.pump()
            return
        raise AssertionError("handshake did not complete")

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.pump()

    def answer_close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass
        self.pump()


class Idle(Protocol):
    """A protocol behind TLS that never closes anything itself."""


class Closer(Protocol):
    """Closes the connection on its first bytes, optionally with a streaming producer registered (as HTTP/2 does)."""

    def __init__(self, with_producer: bool = False) -> None:
        self.with_producer = with_producer

    def connectionMade(self) -> None:
        if self.with_producer:
            self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# The engine of the test running (the tls_engine fixture: every test here runs on both); Twisted's layer for
# the callers elsewhere (tests/test_internals.py checks its private names through factory_for).
ENGINE = ["openssl"]


@pytest.fixture(autouse=True)
def _engine(tls_engine: str) -> Iterator[None]:
    ENGINE[0] = tls_engine
    yield
    ENGINE[0] = "openssl"


def factory_for(clock: MemoryReactorClock, wrapped: Any, **kwargs: Any) -> Any:
    if ENGINE[0] == "stdlib":
        return StdTLSFactory(OneCertificate(), wrapped, clock=clock, handshake_timeout=HEAD_TIMEOUT, **kwargs)
    return TLSServerFactory(OneCertificate(), wrapped, clock=clock, handshake_timeout=HEAD_TIMEOUT, **kwargs)


def closes_at(clock: MemoryReactorClock, wire: Wire, seconds: float, how: str) -> None:
    """Nothing happens until C{seconds} from now; then the TCP connection is closed or aborted."""
    clock.advance(seconds - 0.01)
    assert not getattr(wire, how) and not wire.aborted
    clock.advance(0.01)
    assert getattr(wire, how), f"not {how} after {seconds} s"


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    return clock


# --- the handshake deadline --------------------------------------------------------------------------------


def test_a_client_that_never_sends_a_client_hello_is_cut_off_at_the_head_deadline(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Idle)), clock)
    closes_at(clock, client.wire, HEAD_TIMEOUT, "aborted")
    client.wire.gone()
    assert not clock.getDelayedCalls()


def test_a_handshake_that_stops_half_way_is_cut_off_at_the_head_deadline(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Idle)), clock)
    client.send_hello()
    assert client.wire.value()  # the server's half of the handshake went out
    closes_at(clock, client.wire, HEAD_TIMEOUT, "aborted")
    client.wire.gone()
    assert not clock.getDelayedCalls()


def test_a_completed_handshake_leaves_the_deadlines_to_the_protocol_behind(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Idle)), clock)
    client.handshake()
    clock.advance(HEAD_TIMEOUT * 10)
    assert not client.wire.closed and not client.wire.aborted
    assert not clock.getDelayedCalls()


# --- the close grace ---------------------------------------------------------------------------------------


def test_after_close_notify_tcp_is_closed_within_the_grace_when_the_client_stays_silent(
    clock: MemoryReactorClock,
) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Closer)), clock)
    client.handshake()
    client.send(b"hello")
    assert client.received == b"bye" and client.close_notify
    # Twisted alone would wait for the client's close_notify for ever.
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    assert not client.wire.aborted
    client.wire.gone()
    assert not clock.getDelayedCalls()


def test_a_client_that_answers_close_notify_is_closed_at_once(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Closer)), clock)
    client.handshake()
    client.send(b"hello")
    client.answer_close_notify()
    assert client.wire.closed
    client.wire.gone()
    assert not clock.getDelayedCalls()


def test_the_grace_is_configurable(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Closer), close_grace=0.5), clock)
    client.handshake()
    client.send(b"hello")
    closes_at(clock, client.wire, 0.5, "closed")


def test_a_client_that_does_not_read_what_is_left_is_aborted_after_the_flush_timeout(clock: MemoryReactorClock) -> None:
    client = Client(factory_for(clock, Factory.forProtocol(Closer)), clock)
    client.handshake()
    client.send(b"hello")
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    # TCP's close waits for its buffer to drain; this client never reads it.
    closes_at(clock, client.wire, FLUSH_TIMEOUT, "aborted")
    client.wire.gone()
    assert not clock.getDelayedCalls()


def test_a_registered_producer_does_not_keep_the_connection_open(clock: MemoryReactorClock) -> None:
    # Twisted holds close_notify back while a producer is registered; HTTP/2 keeps one for the connection's life.
    client = Client(factory_for(clock, Factory.forProtocol(lambda: Closer(with_producer=True))), clock)
    client.handshake()
    client.send(b"hello")
    assert client.received == b"bye"
    assert client.wire.producer is not None
    client.wire.producer.pauseProducing()  # TCP's buffer was full once
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    assert not client.wire.closed_with_producer


def test_a_protocol_that_closes_during_the_handshake_aborts_it(clock: MemoryReactorClock) -> None:
    class Impatient(Protocol):
        def connectionMade(self) -> None:
            self.transport.loseConnection()

    client = Client(factory_for(clock, Factory.forProtocol(Impatient)), clock)
    assert client.wire.aborted
    client.wire.gone()
    assert not clock.getDelayedCalls()


# --- with the gateway behind it: HTTP/1.1 or HTTP/2 as ALPN chose -----------------------------------------


@pytest.fixture
def gateway(clock: MemoryReactorClock) -> Gateway:
    return Gateway(clock, RouteTable(), ProxySettings(head_timeout=HEAD_TIMEOUT, idle_timeout=75.0))


def gateway_client(clock: MemoryReactorClock, gateway: Gateway, alpn: list[str] | None = None) -> Client:
    return Client(factory_for(clock, negotiating_factory(gateway, b"https")), clock, alpn)


def test_connection_close_request_then_silence_is_closed_within_the_grace(
    clock: MemoryReactorClock, gateway: Gateway
) -> None:
    client = gateway_client(clock, gateway, ["http/1.1"])
    client.handshake()
    client.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 404 ") and client.close_notify
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


@pytest.mark.parametrize("alpn", [["h2"], ["http/1.1"], None])
def test_handshake_then_silence_is_closed_by_the_head_deadline_then_the_grace(
    clock: MemoryReactorClock, gateway: Gateway, alpn: list[str] | None
) -> None:
    # The ALPN switch waits for the first bytes to pick HTTP/2 or HTTP/1.1: the head deadline runs meanwhile.
    client = gateway_client(clock, gateway, alpn)
    client.handshake()
    assert client.tls.selected_alpn_protocol() == (alpn[0] if alpn else None)
    clock.advance(HEAD_TIMEOUT)
    client.pump()
    assert client.close_notify
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


def test_no_client_hello_with_the_gateway_behind_is_cut_off_at_the_head_deadline(
    clock: MemoryReactorClock, gateway: Gateway
) -> None:
    client = gateway_client(clock, gateway)
    closes_at(clock, client.wire, HEAD_TIMEOUT, "aborted")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


def test_an_idle_http2_connection_is_closed_by_the_idle_deadline_then_the_grace(
    clock: MemoryReactorClock, gateway: Gateway
) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = gateway_client(clock, gateway, ["h2"])
    client.handshake()
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    h2.initiate_connection()
    client.send(h2.data_to_send())
    stream = h2.get_next_available_stream_id()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"nowhere.test"), (b":path", b"/")]
    h2.send_headers(stream, headers, end_stream=True)
    client.send(h2.data_to_send())
    h2.receive_data(client.received)
    assert stream not in h2.streams or h2.streams[stream].closed  # answered (404)
    clock.advance(75.0)
    client.pump()
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


@pytest.mark.parametrize("alpn", [["http/1.1"], None])
def test_a_kept_alive_connection_is_closed_by_an_idle_timeout_shorter_than_the_head_timeout(
    clock: MemoryReactorClock, alpn: list[str] | None
) -> None:
    # bench/attack.py case 5: idle_timeout 3 s, head_timeout 10 s. The connection's one timer, armed for the head
    # deadline, was not pulled in after the answer: close_notify came 10 s after the connection's start, not 3 s
    # after the answer.
    gateway = Gateway(clock, RouteTable(), ProxySettings(head_timeout=HEAD_TIMEOUT, idle_timeout=3.0))
    client = gateway_client(clock, gateway, alpn)
    client.handshake()
    clock.advance(1.0)
    client.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 404 ") and not client.close_notify
    clock.advance(3.0 - 0.01)
    client.pump()
    assert not client.close_notify
    clock.advance(0.01)
    client.pump()
    assert client.close_notify
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


def test_an_http2_connection_is_closed_by_an_idle_timeout_shorter_than_the_head_timeout(
    clock: MemoryReactorClock,
) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    gateway = Gateway(clock, RouteTable(), ProxySettings(head_timeout=HEAD_TIMEOUT, idle_timeout=3.0))
    client = gateway_client(clock, gateway, ["h2"])
    client.handshake()
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    h2.initiate_connection()
    client.send(h2.data_to_send())
    stream = h2.get_next_available_stream_id()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"nowhere.test"), (b":path", b"/")]
    h2.send_headers(stream, headers, end_stream=True)
    client.send(h2.data_to_send())
    clock.advance(3.0)
    client.pump()
    assert client.close_notify  # the GOAWAY, then close_notify
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert gateway.connections == set() and not clock.getDelayedCalls()


def test_a_drained_http2_connection_sends_close_notify_then_closes_within_the_grace(
    clock: MemoryReactorClock, gateway: Gateway
) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = gateway_client(clock, gateway, ["h2"])
    client.handshake()
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    h2.initiate_connection()
    client.send(h2.data_to_send())
    drained = gateway.drain(30.0)
    client.pump()
    # GOAWAY and close_notify: HTTP/2's producer no longer holds the TLS close back.
    assert client.close_notify
    closes_at(clock, client.wire, DEFAULT_CLOSE_GRACE, "closed")
    client.wire.gone()
    assert drained.called and gateway.connections == set() and not clock.getDelayedCalls()


# --- settings and wiring -----------------------------------------------------------------------------------


def test_the_https_listeners_get_the_deadlines_from_the_settings(tmp_path: Any) -> None:
    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService

    settings = config.build(
        {"https": ["tcp:0:interface=127.0.0.1"], "state_dir": str(tmp_path / "state")},
        {"docker": False, "head_timeout": 4, "tls_close_grace": 0.5},
    )
    service = LabelgwService(settings, MemoryReactorClock())
    factory = service.https.listeners[0].factory
    assert isinstance(factory, StdTLSFactory)
    assert (factory.handshake_timeout, factory.close_grace, factory.flush_timeout) == (4.0, 0.5, FLUSH_TIMEOUT)
    assert factory.clock is service.reactor


def test_tls_close_grace_setting() -> None:
    from labelgw.cli import config
    assert config.build({}).tls_close_grace == DEFAULT_CLOSE_GRACE == 2.0
    assert config.build({}, {"tls_close_grace": 1}).tls_close_grace == 1.0
    for bad in (0, "soon", True, 100000):
        with pytest.raises(config.ConfigError, match="tls_close_grace"):
            config.build({}, {"tls_close_grace": bad})
