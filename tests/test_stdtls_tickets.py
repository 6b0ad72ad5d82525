"""labelgw.tls.stdtls: a TLS 1.3 server's session ticket is made at the connection's first write, not at the end of
every handshake (OpenSSL's SSL_new_session_ticket): a client that leaves before any answer costs no ticket, one
that stays gets it ahead of the first answer (or of close_notify) and resumes with it."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

import labelgw.tls.stdtls as stdtls
from labelgw.tls.policy import TLSPolicy
from labelgw.tls.stdtls import StdTLSFactory, deferred_tickets, new_session_ticket
from test_tls_deadlines import HEAD_TIMEOUT, Client, OneCertificate


class Echo(Protocol):
    """Writes only when asked ("echo:<x>")."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"echo:"):
            self.transport.write(data[5:])


class EarlyWriter(Echo):
    def connectionMade(self) -> None:
        self.transport.write(b"early ")  # before the handshake completed


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    return clock


def make(clock: MemoryReactorClock, protocol: type[Protocol] = Echo, **kwargs: Any) -> StdTLSFactory:
    return StdTLSFactory(
        OneCertificate(), Factory.forProtocol(protocol), clock=clock, handshake_timeout=HEAD_TIMEOUT, **kwargs
    )


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    factory: StdTLSFactory, clock: MemoryReactorClock, session: Any = None, alpn: list[str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Client:
    client = Client(factory, clock, alpn=alpn)
    context = context or client_context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    client.tls = context.wrap_bio(client.incoming, client.outgoing, server_hostname="gw.test", session=session)
    client.handshake()
    return client


def test_this_python_can_defer_tickets() -> None:
    # CPython 3.11-3.13 on Linux: the SSL pointer is found and checked; elsewhere tickets are made as before.
    assert deferred_tickets()


def test_no_ticket_is_made_for_a_client_that_leaves_first(clock: MemoryReactorClock) -> None:
    factory = make(clock)
    client = connect(factory, clock)
    server = client.server
    assert factory.handshakes == 1 and server._tls.version() == "TLSv1.3"
    # Nothing in the outgoing BIO: the ticket was not made (it used to wait there for the first write).
    assert server._outgoing.pending == 0 and server._ticket_due
    assert client.wire.value() == b""
    assert factory.contexts._dispatch_context().num_tickets == 0


def test_the_first_answer_carries_the_ticket_and_the_client_resumes_with_it(clock: MemoryReactorClock) -> None:
    factory = make(clock)
    context = client_context()
    first = connect(factory, clock, context=context)
    writes: list[bytes] = []
    write = first.wire.write
    first.wire.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    first.send(b"echo:hello")
    assert first.received == b"hello" and len(writes) == 1
    session = first.tls.session
    assert session is not None and session.has_ticket
    # One ticket per connection: the second answer carries none.
    assert not first.server._ticket_due
    first.send(b"echo:again")
    assert first.received == b"helloagain" and len(writes) == 2
    second = connect(factory, clock, session=session, context=context)
    assert second.tls.session_reused
    second.send(b"echo:resumed")
    assert second.received == b"resumed"


def test_the_ticket_goes_out_ahead_of_close_notify(clock: MemoryReactorClock) -> None:
    client = connect(make(clock), clock)
    client.server.loseConnection()
    client.pump()
    assert client.close_notify
    assert client.tls.session is not None and client.tls.session.has_ticket


def test_writes_made_before_the_handshake_follow_the_ticket(clock: MemoryReactorClock) -> None:
    client = connect(make(clock, EarlyWriter), clock)
    client.pump()
    assert client.received == b"early "
    assert not client.server._ticket_due
    assert client.tls.session is not None and client.tls.session.has_ticket


def test_http2_batched_writes_carry_the_ticket(clock: MemoryReactorClock) -> None:
    client = connect(make(clock, policy=TLSPolicy(alpn_protocols=(b"h2",))), clock, alpn=["h2"])
    assert client.server.negotiatedProtocol == b"h2"
    client.send(b"echo:frames")
    assert client.received == b"frames"
    assert client.tls.session is not None and client.tls.session.has_ticket


def test_tls12_keeps_its_ticket_in_the_handshake(clock: MemoryReactorClock) -> None:
    factory = make(clock)
    context = client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    first = Client(factory, clock)
    first.tls = context.wrap_bio(first.incoming, first.outgoing, server_hostname="gw.test")
    first.handshake()
    assert not first.server._ticket_due
    session = first.tls.session
    assert session is not None and session.has_ticket
    second = Client(factory, clock)
    second.tls = context.wrap_bio(second.incoming, second.outgoing, server_hostname="gw.test", session=session)
    second.handshake()
    assert second.tls.session_reused


def test_without_the_ssl_pointer_tickets_are_made_in_the_handshake_and_held(
    clock: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdtls, "_SSL_OFFSET", 0)
    assert not deferred_tickets()
    factory = make(clock)
    assert not factory.deferred_tickets
    client = connect(factory, clock)
    # The old way: the ticket waits in the outgoing BIO for the first write.
    assert client.server._outgoing.pending > 0 and not client.server._ticket_due
    assert not new_session_ticket(client.server._tls)
    client.send(b"echo:hello")
    assert client.received == b"hello"
    assert client.tls.session is not None and client.tls.session.has_ticket
