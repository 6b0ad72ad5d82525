"""labelgw.tls.stdtls: the TLS engine on the standard library's ssl, without sockets.

The server is L{StdTLSFactory} on an in-memory transport and a MemoryReactorClock; the client the standard
library's ssl over memory BIOs (test_tls_deadlines.Client). Deadlines are tested there on both engines; here what
is this engine's own: back-pressure, early writes, close_notify, the certificate choice through the selector,
ticket keys, groups, and the TLS-ALPN-01 hook.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from labelgw.tls.ca import LocalCA
from labelgw.tls.material import CertificateMaterial
from labelgw.tls.policy import INTERMEDIATE
from labelgw.tls.sni import SNIContextSelector
from labelgw.tls.stdtls import (
    ACME_TLS_ALPN,
    TICKET_KEY_LIFETIME,
    StdTLSFactory,
    _ctx_control,
    build_stdlib_context,
    check_policy,
    client_hello_alpn,
    set_groups,
)
from test_tls_deadlines import HEAD_TIMEOUT, Client, OneCertificate
from test_tls_support import UserIssuer


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    return clock


class Recorder(Protocol):
    """Keeps what it receives; pauses the transport on "pause"; answers "echo:<x>" with x."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(b"early ")  # before the handshake completed

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if data == b"pause":
            self.transport.pauseProducing()
        if data.startswith(b"echo:"):
            self.transport.write(data[5:])


def factory(clock: MemoryReactorClock, wrapped: Any, chooser: Any = None, **kwargs: Any) -> StdTLSFactory:
    return StdTLSFactory(chooser or OneCertificate(), wrapped, clock=clock, handshake_timeout=HEAD_TIMEOUT, **kwargs)


def test_writes_before_the_handshake_go_out_after_it(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    client.handshake()
    client.send(b"echo:hi")
    assert client.received == b"early hi"
    assert client.server.factory.handshakes == 1


def test_ciphertext_is_handed_to_tcp_when_written_not_on_the_next_turn(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    client.handshake()
    client.wire.clear()
    client.tls.write(b"echo:now")
    client.server.dataReceived(client.outgoing.read())
    # No clock.advance: the reply is on the wire already.
    assert client.wire.value()


def test_pausing_stops_tcp_reads_and_delivery_until_resumed(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    client.handshake()
    client.send(b"pause")
    protocol = client.server.wrappedProtocol
    assert client.wire.producerState == "paused"
    client.send(b"later")
    assert protocol.received == [b"pause"]
    client.server.resumeProducing()
    assert protocol.received == [b"pause", b"later"]
    assert client.wire.producerState == "producing"


def test_a_producer_is_registered_on_tcp_itself(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    producer = Recorder()
    client.server.registerProducer(producer, True)
    assert client.wire.producer is producer
    client.server.unregisterProducer()
    assert client.wire.producer is None


def test_the_clients_close_notify_is_answered_and_tcp_closed(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    client.handshake()
    client.answer_close_notify()
    assert client.close_notify and client.wire.closed and not client.wire.aborted


def test_garbage_instead_of_a_client_hello_is_refused_and_closed(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Recorder)), clock)
    client.server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.wire.closed or client.wire.aborted
    assert client.server.factory.refusals == 1
    client.wire.gone()
    assert client.server.factory.handshake_failures == 1


def test_alpn_is_the_listeners_list(clock: MemoryReactorClock) -> None:
    from labelgw.http.h2 import negotiating_factory
    from labelgw.http.server import Gateway
    from labelgw.http.settings import ProxySettings
    from labelgw.core.routes import RouteTable

    gateway = Gateway(clock, RouteTable(), ProxySettings(head_timeout=HEAD_TIMEOUT))
    for offer, chosen in ((["h2", "http/1.1"], b"h2"), (["http/1.1"], b"http/1.1"), (["spdy/3"], None)):
        client = Client(factory(clock, negotiating_factory(gateway, b"https")), clock, alpn=offer)
        client.handshake()
        assert client.server.negotiatedProtocol == chosen


# --- certificates: the engine-independent choice -----------------------------------------------------------------


def selector(tmp_path: Path, clock: MemoryReactorClock, strict: bool = False) -> SNIContextSelector:
    ca = LocalCA.load_or_create(tmp_path / "state")
    return SNIContextSelector(clock=clock, run_in_thread=lambda f, *a, **k: defer.succeed(None), is_routed=lambda name: name in ("app.example.test", "app.example.com"), local_ca=ca, strict=strict)


def served_names(client: Client) -> list[str]:
    from cryptography import x509

    der = client.tls.getpeercert(binary_form=True)
    certificate = x509.load_der_x509_certificate(der)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in san.get_values_for_type(x509.DNSName)]


def sni_client(clock: MemoryReactorClock, tls_factory: StdTLSFactory, name: str | None) -> Client:
    client = Client(tls_factory, clock)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.tls = context.wrap_bio(client.incoming, client.outgoing, server_hostname=name)
    return client


def test_sni_mints_per_name_and_serves_the_default_without_one(tmp_path: Path, clock: MemoryReactorClock) -> None:
    tls_factory = factory(clock, Factory.forProtocol(Recorder), selector(tmp_path, clock))
    # Local and routed names are minted; a routed public name (the CA may not sign it), no SNI, and unknown names
    # get the default certificate.
    for name, names in (("one.localhost", ["one.localhost"]), ("app.example.test", ["app.example.test"]),
                        ("app.example.com", ["localhost"]), (None, ["localhost"]),
                        ("unknown.example.test", ["localhost"])):
        client = sni_client(clock, tls_factory, name)
        client.handshake()
        assert served_names(client) == names, name
    # One context per certificate, kept while the selector keeps the certificate.
    assert len(tls_factory.contexts._contexts) == 3


def test_tls_strict_refuses_unknown_names_with_an_alert(tmp_path: Path, clock: MemoryReactorClock) -> None:
    tls_factory = factory(clock, Factory.forProtocol(Recorder), selector(tmp_path, clock, strict=True))
    client = sni_client(clock, tls_factory, "unknown.example.test")
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        client.handshake()
    allowed = sni_client(clock, tls_factory, "ok.localhost")
    allowed.handshake()
    assert served_names(allowed) == ["ok.localhost"]


def test_the_ticket_key_context_is_replaced_after_its_lifetime(clock: MemoryReactorClock) -> None:
    contexts = factory(clock, Factory.forProtocol(Recorder)).contexts
    first = contexts._dispatch_context()
    clock.advance(TICKET_KEY_LIFETIME - 1)
    assert contexts._dispatch_context() is first
    clock.advance(1)
    assert contexts._dispatch_context() is not first


def test_the_policy_is_servable_by_the_standard_library() -> None:
    assert check_policy(INTERMEDIATE) is None
    context = build_stdlib_context(INTERMEDIATE, (b"h2",))
    assert set_groups(context, "X25519:P-256:P-384")
    assert not set_groups(context, "no-such-group")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not context.options & ssl.OP_NO_TICKET
    suites = {c["name"] for c in context.get_ciphers()}
    assert suites == {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
                      *INTERMEDIATE.tls12_ciphers.split(":")}


# --- TLS-ALPN-01 --------------------------------------------------------------------------------------------------


def hello(alpn: list[str] | None, name: str = "gw.test") -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_alpn_offer_is_read_from_the_client_hello() -> None:
    data = hello(["acme-tls/1"])
    assert client_hello_alpn(data) == (b"acme-tls/1",)
    assert client_hello_alpn(hello(["h2", "http/1.1"])) == (b"h2", b"http/1.1")
    assert client_hello_alpn(hello(None)) == ()
    assert client_hello_alpn(data[:40]) is None
    assert client_hello_alpn(b"GET / HTTP/1.1\r\n") == ()


def test_an_acme_tls_alpn_01_validation_gets_the_challenge_certificate(clock: MemoryReactorClock) -> None:
    issuer = UserIssuer.create("acme test")
    challenge_cert, challenge_key = issuer.issue(["gw.test"])
    challenge = CertificateMaterial(challenge_cert, challenge_key)
    tls_factory = factory(clock, Factory.forProtocol(Recorder),
                          challenges=lambda name: challenge if name == "gw.test" else None)
    validator = Client(tls_factory, clock, alpn=["acme-tls/1"])
    validator.handshake()
    assert validator.tls.selected_alpn_protocol() == ACME_TLS_ALPN.decode()
    assert validator.tls.getpeercert(binary_form=True) == challenge_cert.public_bytes(serialization.Encoding.DER)
    # Everyone else gets the usual certificate.
    browser = Client(tls_factory, clock, alpn=["h2", "http/1.1"])
    browser.handshake()
    assert browser.tls.getpeercert(binary_form=True) != validator.tls.getpeercert(binary_form=True)


def test_acme_tls_1_without_a_pending_challenge_is_refused(clock: MemoryReactorClock) -> None:
    tls_factory = factory(clock, Factory.forProtocol(Recorder), challenges=lambda name: None)
    validator = Client(tls_factory, clock, alpn=["acme-tls/1"])
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        validator.handshake()


def test_http2_writes_of_one_turn_go_out_as_one_record(clock: MemoryReactorClock) -> None:
    from labelgw.tls.policy import TLSPolicy

    tls_factory = factory(clock, Factory.forProtocol(Protocol), policy=TLSPolicy(alpn_protocols=(b"h2",)))
    client = Client(tls_factory, clock, alpn=["h2"])
    client.handshake()
    assert client.server.negotiatedProtocol == b"h2"
    client.wire.clear()
    client.server.write(b"frame one, ")
    client.server.write(b"frame two")
    assert client.wire.value() == b""
    clock.advance(0)
    record = client.wire.value()
    client.wire.clear()
    client.incoming.write(record)
    assert client.tls.read(1000) == b"frame one, frame two"
    # Closing sends what is held first, then close_notify.
    client.server.write(b"last")
    client.server.loseConnection()
    client.pump()
    assert client.received.endswith(b"last") and client.close_notify


# --- ACME on this engine: the selector's ACME source and the TLS-ALPN-01 hook, as labelgw.tls.https wires them ------


def test_acme_certificates_and_tls_alpn_01_on_the_stdlib_engine(tmp_path: Path, clock: MemoryReactorClock) -> None:
    from datetime import UTC, datetime, timedelta

    from labelgw.tls.acme import alpn_challenge
    from labelgw.tls.acme_openssl import AcmeContexts
    from test_acme import Source, make_certificate

    source = Source()
    now = datetime.now(UTC)
    source.challenge = alpn_challenge("api.example.com", "tok.thumb", now)
    acme = AcmeContexts(source, INTERMEDIATE)
    ca = LocalCA.load_or_create(tmp_path / "state")
    chooser = SNIContextSelector(clock=clock, run_in_thread=lambda f, *a, **k: defer.succeed(None),
                                 is_routed=lambda name: True, local_ca=ca, acme=acme)
    tls_factory = factory(clock, Factory.forProtocol(Recorder), chooser, challenges=acme.challenge_material)
    challenge_der = source.challenge.certificate.public_bytes(serialization.Encoding.DER)

    def connect(alpn: list[str]) -> Client:
        client = Client(tls_factory, clock)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(alpn)
        client.tls = context.wrap_bio(client.incoming, client.outgoing, server_hostname="api.example.com")
        client.handshake()
        return client

    # A first order: the validation server gets the challenge, a browser what it got before ACME (the default
    # certificate: the local CA does not sign public names).
    validator = connect(["acme-tls/1"])
    assert validator.tls.selected_alpn_protocol() == "acme-tls/1"
    assert validator.tls.getpeercert(binary_form=True) == challenge_der
    assert "localhost" in served_names(connect(["h2", "http/1.1"]))
    # Issued: the ACME certificate for everyone; a renewal's challenge still goes to the validation server only.
    source.certificate = make_certificate("api.example.com", now - timedelta(hours=1), timedelta(days=90))
    acme_der = source.certificate.certificate.public_bytes(serialization.Encoding.DER)
    assert connect(["h2", "http/1.1"]).tls.getpeercert(binary_form=True) == acme_der
    assert connect(["acme-tls/1"]).tls.getpeercert(binary_form=True) == challenge_der
    source.challenge = None
    assert connect(["http/1.1"]).tls.getpeercert(binary_form=True) == acme_der
    assert acme.challenge_material("api.example.com") is None


# --- what a new connection costs: the ticket rides on the first write, no session cache ---------------------------


class Quiet(Protocol):
    """Writes only when asked ("echo:<x>")."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"echo:"):
            self.transport.write(data[5:])


def test_a_tls13_session_ticket_waits_for_the_first_write_and_goes_out_with_it(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Quiet)), clock)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.do_handshake()
    client.server.dataReceived(client.outgoing.read())
    client.incoming.write(client.wire.value())
    client.wire.clear()
    client.tls.do_handshake()  # the client's Finished
    client.server.dataReceived(client.outgoing.read())
    clock.advance(0)
    # Handshake done, nothing written back: a client that closes now (openssl s_time) costs the server no send.
    assert client.server.factory.handshakes == 1 and client.wire.value() == b""
    writes: list[bytes] = []
    write = client.wire.write
    client.wire.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
    client.tls.write(b"echo:hello")
    client.server.dataReceived(client.outgoing.read())
    # The ticket and the answer: one write to TCP, when it is made.
    assert len(writes) == 1
    client.incoming.write(client.wire.value())
    assert client.tls.read(100) == b"hello"
    assert client.tls.session is not None and client.tls.session.has_ticket


def test_a_held_ticket_goes_out_before_close_notify(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Quiet)), clock)
    client.handshake()
    assert client.wire.value() == b""
    client.server.loseConnection()
    client.pump()
    assert client.close_notify
    assert client.tls.session is not None and client.tls.session.has_ticket


def test_tls12_finishes_its_handshake_at_once_and_resumes_by_ticket_without_a_session_cache(
    clock: MemoryReactorClock,
) -> None:
    tls_factory = factory(clock, Factory.forProtocol(Quiet))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    first = Client(tls_factory, clock)
    first.tls = context.wrap_bio(first.incoming, first.outgoing, server_hostname="gw.test")
    first.handshake()
    session = first.tls.session
    assert session is not None and session.has_ticket
    second = Client(tls_factory, clock)
    second.tls = context.wrap_bio(second.incoming, second.outgoing, server_hostname="gw.test", session=session)
    second.handshake()
    assert second.tls.session_reused
    # OpenSSL's server-side cache is off (SSL_CTRL_GET_SESS_CACHE_MODE): resumption is the ticket's doing.
    assert _ctx_control(tls_factory.contexts._dispatch_context(), 45, 0, None) == 0


def test_the_sni_callback_is_handed_the_connection_and_switches_its_context(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Quiet)), clock)
    client.handshake()
    contexts = client.server.factory.contexts
    assert client.server._tls.context is not contexts._dispatch_context()
    assert client.server._tls.context in contexts._contexts.values()


def test_the_gateways_listener_has_one_deadline_per_connection_which_cuts_an_unfinished_handshake(
    tmp_path: Path,
) -> None:
    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService

    settings = config.build(
        {"https": ["tcp:0:interface=127.0.0.1"], "state_dir": str(tmp_path / "state")},
        {"docker": False, "head_timeout": 4},
    )
    reactor = MemoryReactorClock()
    reactor.advance(1_000_000)
    service = LabelgwService(settings, reactor)
    # The minted default leaf is written to disk in a thread: not here.
    service.https.selector._run_in_thread = lambda f, *a, **k: defer.succeed(None)  # type: ignore[union-attr]
    tls_factory = service.https.listeners[0].factory
    assert isinstance(tls_factory, StdTLSFactory) and not tls_factory.handshake_timer
    client = Client(tls_factory, reactor)
    # One timer: the HTTP/1.1 side's head deadline, armed at the connect.
    assert len(reactor.getDelayedCalls()) == 1
    client.send_hello()
    reactor.advance(3.9)
    assert not client.wire.aborted
    reactor.advance(0.1)
    assert client.wire.aborted
    client.wire.gone()
    assert tls_factory.handshake_failures == 1
    # A connection whose handshake is done and which sends nothing is closed at the same deadline: close_notify,
    # then TCP after the grace.
    done = Client(tls_factory, reactor)
    done.handshake()
    reactor.advance(4)
    done.pump()
    assert done.close_notify and not done.wire.closed
    reactor.advance(settings.tls_close_grace)
    assert done.wire.closed


def test_a_request_sent_along_with_the_clients_finished_is_answered(clock: MemoryReactorClock) -> None:
    client = Client(factory(clock, Factory.forProtocol(Quiet)), clock)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.do_handshake()
    client.server.dataReceived(client.outgoing.read())
    client.incoming.write(client.wire.value())
    client.wire.clear()
    client.tls.do_handshake()
    client.tls.write(b"echo:together")
    # The Finished and the request in one segment.
    client.server.dataReceived(client.outgoing.read())
    client.incoming.write(client.wire.value())
    assert client.tls.read(100) == b"together"
