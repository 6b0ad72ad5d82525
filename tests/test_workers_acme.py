"""ACME under --workers (labelgw.workers.certs): the supervisor's manager, its certificates and challenge answers
pushed to the workers (the new messages), the acknowledgement a validation waits for, a worker serving what it is
sent on both TLS engines, and on-demand names asked of the supervisor. Deterministic: task.Clock, fake processes,
in-memory handshakes; no process is started. Against Pebble with real workers: tests/test_e2e_acme_workers.py."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from labelgw.cli.config import AcmeSettings, Settings
from labelgw.core.model import ContainerSpec
from labelgw.tls.acme import AcmeManager, alpn_challenge
from labelgw.tls.acme_openssl import AcmeServed
from labelgw.workers import supervisor as sup
from labelgw.workers.certs import ACK_TIMEOUT, AcmeRelay, WorkerAcme
from labelgw.workers.protocol import FrameDecoder, encode
from labelgw.workers.worker import SupervisorLink, WorkerService
from test_acme import FakeIssuer, make_certificate
from test_tls_deadlines import Client
from test_tls_support import handshake
from test_workers_protocol import FakeProcessTransport

NAME = "api.example.com"


def now() -> datetime:
    return datetime.now(UTC)


class _InlinePool:
    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ThreadedMemoryReactor(MemoryReactorClock):
    """What the HTTPS service's disk work needs (it runs in the reactor's thread pool): here, inline."""

    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


# --- the messages ----------------------------------------------------------------------------------------------


def test_acme_messages_cross_the_channel_and_on_demand_is_plain() -> None:
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    challenge = alpn_challenge(NAME, "tok.thumb", now())
    messages = [
        ("acme-state", 1, [(NAME, certificate.chain_pem, certificate.key_pem)],
         [(NAME, challenge.cert_pem, challenge.key_pem)], {"tok": "tok.thumb"}),
        ("acme-cert", 2, NAME, certificate.chain_pem, certificate.key_pem),
        ("acme-alpn", 3, NAME, None, None),
        ("acme-http01", 4, "tok", None),
    ]
    assert FrameDecoder().feed(b"".join(encode(m) for m in messages)) == messages
    # Worker to supervisor: a string only, which the supervisor's plain decoder reads.
    assert FrameDecoder(plain=True).feed(encode(("acme-on-demand", "a.apps.example.com"))) == [
        ("acme-on-demand", "a.apps.example.com")
    ]


def test_workers_and_acme_together_are_accepted() -> None:
    from labelgw.cli.tap import Options

    options = Options()
    options.parseOptions(["--workers", "2", "--acme-email", "ops@example.com", "--admin", "none"])
    assert options.workers == 2 and options.settings.acme is not None


def test_the_supervisor_runs_the_manager_and_relays_it(tmp_path: Path) -> None:
    reactor = ThreadedMemoryReactor()
    settings = Settings(
        http=("tcp:0:interface=127.0.0.1",), https=("tcp:0:interface=127.0.0.1",), admin=None, docker=False,
        access_log="off", state_dir=str(tmp_path / "state"),
        acme=AcmeSettings(email="ops@example.com", directory="https://127.0.0.1:1/dir"),
    )
    service = sup.SupervisorService(settings, reactor, 2, ["--workers", "2"])
    assert isinstance(service.https.acme, AcmeManager)
    assert isinstance(service.acme_relay, AcmeRelay) and service.https.acme.relay is service.acme_relay
    assert service.pool.handlers["acme-on-demand"] is not None


# --- the supervisor's side: a real pool and manager, fake processes -----------------------------------------------


class Supervised:
    """A WorkerPool of fake processes, an AcmeManager with a fake issuer, the relay between them."""

    def __init__(self, count: int = 2, wildcard: str | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(now().timestamp())
        self.spawned: list[sup.WorkerProcess] = []
        self.pool = sup.WorkerPool(self.clock, count, self.spawn, lambda: ([], [], []), lambda: 10.0)
        self.issuer = FakeIssuer()
        self.hosts: list[tuple[str, str | None]] = [(NAME, None)]
        if wildcard is not None:
            self.hosts.append((wildcard, None))
        self.manager = AcmeManager(
            clock=self.clock, issuer=self.issuer, hosts=lambda: self.hosts, challenge_types=("http-01",),
            wildcard_for=lambda name: wildcard if wildcard and name.endswith(wildcard[1:]) else None,
            max_on_demand=2, rng=lambda: 0.5,
        )
        self.relay = AcmeRelay(self.pool, self.manager, self.clock)
        self.relay.install()

    def spawn(self, process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        process.makeConnection(FakeProcessTransport(1000 + len(self.spawned)))  # type: ignore[arg-type]
        self.spawned.append(process)

    @staticmethod
    def sent(process: sup.WorkerProcess) -> list[Any]:
        return process.transport.messages()  # type: ignore[union-attr]

    @staticmethod
    def say(process: sup.WorkerProcess, *messages: Any) -> None:
        process.childDataReceived(3, b"".join(encode(m) for m in messages))

    def ack_last(self, process: sup.WorkerProcess) -> None:
        self.say(process, ("ack", self.sent(process)[-1][1]))


def test_a_new_worker_gets_the_certificates_and_challenges_before_its_state() -> None:
    world = Supervised(1)
    world.manager.startService()
    world.clock.advance(0)
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    world.issuer.orders[-1][2].callback(certificate)
    world.manager.publish_http01("tok", "tok.thumb")
    challenge = alpn_challenge("other.example.com", "t2.thumb", now())
    world.manager.publish_alpn(challenge)
    world.pool.start()
    (one,) = world.spawned
    kinds = [m[0] for m in world.sent(one)]
    assert kinds == ["acme-state", "state"]
    state = world.sent(one)[0]
    assert state[2] == [(NAME, certificate.chain_pem, certificate.key_pem)]
    assert state[3] == [("other.example.com", challenge.cert_pem, challenge.key_pem)]
    assert state[4] == {"tok": "tok.thumb"}
    world.manager.stopService()


def test_an_issued_or_renewed_certificate_is_pushed_to_every_worker_once() -> None:
    world = Supervised(2)
    world.pool.start()
    world.manager.startService()
    world.clock.advance(0)
    one, two = world.spawned
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    world.issuer.orders[-1][2].callback(certificate)
    for process in (one, two):
        pushed = [m for m in world.sent(process) if m[0] == "acme-cert"]
        assert pushed == [("acme-cert", pushed[0][1], NAME, certificate.chain_pem, certificate.key_pem)]
    # A challenge coming and going is not a certificate change.
    world.manager.publish_alpn(alpn_challenge(NAME, "t.thumb", now()))
    world.manager.withdraw_alpn(NAME)
    assert [m[0] for m in world.sent(one)].count("acme-cert") == 1
    assert [m[0] for m in world.sent(one)][-2:] == ["acme-alpn", "acme-alpn"]
    assert world.sent(one)[-1][2:] == (NAME, None, None)
    world.manager.stopService()


def test_a_validation_waits_for_every_worker_to_acknowledge_the_challenge() -> None:
    world = Supervised(2)
    world.pool.start()
    one, two = world.spawned
    world.say(one, ("ready", one.pid))
    # Worker 2 is still starting: it is waited for too (it may accept before it reads a later message).
    published = world.manager.publish_http01("tok", "tok.thumb")
    assert published is not None
    fired: list[Any] = []
    published.addCallback(fired.append)
    assert world.sent(one)[-1][0] == "acme-http01" and world.sent(two)[-1][2:] == ("tok", "tok.thumb")
    world.ack_last(one)
    assert fired == [] and world.relay.pending == 1
    assert world.manager.describe()["workers"]["awaiting_acknowledgement"] == [
        {"challenge": "the HTTP-01 answer tok", "workers": [2]}
    ]
    world.ack_last(two)
    assert fired == [None] and world.relay.pending == 0
    # TLS-ALPN-01 likewise; a worker that dies meanwhile is not waited for.
    published = world.manager.publish_alpn(alpn_challenge(NAME, "t.thumb", now()))
    assert published is not None
    published.addCallback(fired.append)
    world.ack_last(one)
    assert len(fired) == 1
    two.processEnded(Failure(ProcessTerminated(None, 9)))
    assert fired == [None, None]
    # Withdrawals are pushed, not waited for.
    assert world.manager.withdraw_http01("tok") is None
    assert world.sent(one)[-1][2:] == ("tok", None)


def test_a_silent_worker_is_named_and_the_validation_goes_on(caplog: Any) -> None:
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        seen.append(formatEvent(event))

    world = Supervised(2)
    world.pool.start()
    one, _ = world.spawned
    published = world.manager.publish_http01("tok", "tok.thumb")
    assert published is not None
    fired: list[Any] = []
    published.addCallback(fired.append)
    world.ack_last(one)
    globalLogPublisher.addObserver(observe)
    try:
        world.clock.advance(ACK_TIMEOUT)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert fired == [None]
    assert any("workers 2 did not acknowledge the HTTP-01 answer tok" in line for line in seen), seen


def test_without_workers_a_publication_is_in_place_at_once() -> None:
    world = Supervised(2)
    published = world.manager.publish_http01("tok", "tok.thumb")
    assert published is not None and published.called


def test_on_demand_names_from_a_worker_go_to_the_managers_bound() -> None:
    world = Supervised(1, wildcard="*.apps.example.com")
    world.pool.start()
    (one,) = world.spawned
    world.manager.startService()
    world.clock.advance(0)
    world.issuer.orders[-1][2].callback(make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90)))
    for name in ("a.apps.example.com", "b.apps.example.com", "c.apps.example.com", "x.elsewhere.org"):
        world.say(one, ("acme-on-demand", name))
    # Malformed: ignored (a worker parses hostile traffic).
    world.say(one, ("acme-on-demand", 42), ("acme-on-demand", "x" * 300), ("acme-on-demand",))
    assert one.alive
    for _ in range(4):
        world.clock.advance(2.0)
        if world.issuer.orders and not world.issuer.orders[-1][2].called:
            name = world.issuer.orders[-1][0]
            world.issuer.orders[-1][2].callback(make_certificate(name, now() - timedelta(hours=1), timedelta(days=90)))
    ordered = sorted(order[0] for order in world.issuer.orders)
    assert ordered == ["a.apps.example.com", NAME, "b.apps.example.com"]  # at most 2 per wildcard
    assert world.relay.on_demand_asked == 4
    world.manager.stopService()


# --- the worker's side ----------------------------------------------------------------------------------------


def worker(tmp_path: Path, engine: str = "stdlib") -> tuple[WorkerService, SupervisorLink, StringTransport]:
    reactor = ThreadedMemoryReactor()
    reactor.advance(now().timestamp())
    settings = Settings(
        http=(), https=("tcp:0",), admin=None, docker=False, access_log="off", state_dir=str(tmp_path / "state"),
        acme=AcmeSettings(email="ops@example.com", directory="https://127.0.0.1:1/dir"), tls_engine=engine,
    )
    app = WorkerService(settings, reactor, [])
    app.startService()
    link = SupervisorLink(app, reactor, lambda why: None)
    transport = StringTransport()
    link.makeConnection(transport)
    return app, link, transport


def replies(transport: StringTransport) -> list[Any]:
    return FrameDecoder().feed(transport.value())


def routes(*hosts: str) -> list[Any]:
    return [(f"c{i}", ContainerSpec(f"c{i}", f"api-{i}", f"api{i}", "10.0.0.1", 80, (host,)))
            for i, host in enumerate(hosts)]


def stdlib_handshake(app: WorkerService, name: str, alpn: list[str]) -> Client:
    client = Client(app.https.tls_factory, app.reactor)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    client.tls = context.wrap_bio(client.incoming, client.outgoing, server_hostname=name)
    client.handshake()
    return client


def test_a_worker_runs_no_acme_manager_and_serves_what_it_is_sent(tmp_path: Path) -> None:
    app, link, transport = worker(tmp_path)
    assert isinstance(app.acme, WorkerAcme) and app.https.acme is None  # no manager, no orders here
    assert app.gateway.acme is app.acme  # type: ignore[attr-defined]
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    link.dataReceived(
        encode(("acme-state", 1, [(NAME, certificate.chain_pem, certificate.key_pem)], [], {"tok": "tok.thumb"}))
        + encode(("state", 2, routes(NAME), [], []))
    )
    assert [m[0] for m in replies(transport)] == ["ack", "ack", "ready"]
    chosen = app.https.selector.choose(NAME)  # type: ignore[union-attr]
    assert isinstance(chosen, AcmeServed) and chosen.material is not None
    assert chosen.material.certificate == certificate.certificate and chosen.material.chain == certificate.chain[1:]
    assert app.acme.http01_answer(b"tok") == b"tok.thumb"
    # The stdlib engine (the default) serves it with its chain.
    client = stdlib_handshake(app, NAME, ["http/1.1"])
    assert client.tls.getpeercert(binary_form=True) == certificate.certificate.public_bytes(serialization.Encoding.DER)
    # A withdrawn token is no longer answered; a renewal replaces the certificate.
    transport.clear()
    renewed = make_certificate(NAME, now() - timedelta(minutes=1), timedelta(days=90))
    link.dataReceived(encode(("acme-http01", 3, "tok", None)) + encode(("acme-cert", 4, NAME, renewed.chain_pem,
                                                                           renewed.key_pem)))
    assert [reply[:2] for reply in replies(transport)] == [("ack", 3), ("ack", 4)]
    assert app.acme.http01_answer(b"tok") is None
    client = stdlib_handshake(app, NAME, ["http/1.1"])
    assert client.tls.getpeercert(binary_form=True) == renewed.certificate.public_bytes(serialization.Encoding.DER)


def test_an_expired_pushed_certificate_is_not_served(tmp_path: Path) -> None:
    app, link, _ = worker(tmp_path)
    certificate = make_certificate(NAME, now() - timedelta(hours=2), timedelta(hours=1))
    link.dataReceived(encode(("acme-cert", 1, NAME, certificate.chain_pem, certificate.key_pem)))
    assert app.acme is not None and app.acme.certificate_for(NAME) is None


@pytest.mark.parametrize("engine", ["stdlib", "openssl"])
def test_a_worker_answers_tls_alpn_01_on_both_engines(tmp_path: Path, engine: str) -> None:
    app, link, _ = worker(tmp_path, engine)
    challenge = alpn_challenge(NAME, "tok.thumb", now())
    link.dataReceived(encode(("state", 1, routes(NAME), [], [])))
    link.dataReceived(encode(("acme-alpn", 2, NAME, challenge.cert_pem, challenge.key_pem)))
    challenge_der = challenge.certificate.public_bytes(serialization.Encoding.DER)
    if engine == "stdlib":
        validator = stdlib_handshake(app, NAME, ["acme-tls/1"])
        assert validator.tls.selected_alpn_protocol() == "acme-tls/1"
        assert validator.tls.getpeercert(binary_form=True) == challenge_der
    else:
        result = handshake(app.https.selector, NAME, alpn=["acme-tls/1"])
        assert result.ok, result.error
        assert result.client_alpn == "acme-tls/1"
        assert result.certificate == challenge.certificate
    # Issued and the challenge withdrawn: the certificate for everyone, acme-tls/1 never selected.
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    link.dataReceived(encode(("acme-cert", 3, NAME, certificate.chain_pem, certificate.key_pem))
                      + encode(("acme-alpn", 4, NAME, None, None)))
    if engine == "stdlib":
        browser = stdlib_handshake(app, NAME, ["h2", "http/1.1"])
        assert browser.tls.getpeercert(binary_form=True) == certificate.certificate.public_bytes(
            serialization.Encoding.DER)
    else:
        issuer_pem = certificate.chain[1].public_bytes(serialization.Encoding.PEM)
        verified = handshake(app.https.selector, NAME, cadata=issuer_pem)
        assert verified.ok, verified.error
        assert verified.certificate == certificate.certificate


def test_a_worker_asks_the_supervisor_once_for_a_name_under_a_public_wildcard_route(tmp_path: Path) -> None:
    app, link, transport = worker(tmp_path)
    link.dataReceived(encode(("state", 1, routes("*.apps.example.com", "local.localhost"), [], [])))
    transport.clear()
    for name in ("a.apps.example.com", "a.apps.example.com", "b.c.apps.example.com", "elsewhere.org",
                 "local.localhost"):
        app.https.selector.choose(name)  # type: ignore[union-attr]
    asked = [m for m in replies(transport) if m[0] == "acme-on-demand"]
    assert asked == [("acme-on-demand", "a.apps.example.com")]
    # Its certificate arrives: served, no more asking.
    certificate = make_certificate("a.apps.example.com", now() - timedelta(hours=1), timedelta(days=90))
    link.dataReceived(encode(("acme-cert", 2, "a.apps.example.com", certificate.chain_pem, certificate.key_pem)))
    chosen = app.https.selector.choose("a.apps.example.com")  # type: ignore[union-attr]
    assert isinstance(chosen, AcmeServed)


# --- both sides joined: a challenge published in the supervisor is in place in the workers when it fires ------


class PipeTransport(FakeProcessTransport):
    """A fake process whose fd 0 is a real worker's link (and whose fd 3 the link writes to)."""

    def __init__(self, pid: int, link: SupervisorLink) -> None:
        FakeProcessTransport.__init__(self, pid)
        self.link = link

    def writeToChild(self, fd: int, data: bytes) -> None:
        FakeProcessTransport.writeToChild(self, fd, data)
        self.link.dataReceived(data)


def test_supervisor_and_workers_joined(tmp_path: Path) -> None:
    world = Supervised(0)
    apps: list[WorkerService] = []
    process_of: dict[int, sup.WorkerProcess] = {}

    def spawn(process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        app, link, transport = worker(tmp_path / str(worker_id))
        apps.append(app)
        process_of[worker_id] = process

        class Back(StringTransport):
            def write(self, data: bytes) -> None:
                process.childDataReceived(3, data)

        link.transport = Back()
        process.makeConnection(PipeTransport(worker_id, link))  # type: ignore[arg-type]

    world.pool.count = 2
    world.pool._spawn = spawn
    world.manager.startService()
    world.clock.advance(0)
    certificate = make_certificate(NAME, now() - timedelta(hours=1), timedelta(days=90))
    world.issuer.orders[-1][2].callback(certificate)
    world.pool.start()
    assert [p.state for p in world.pool.workers.values()] == ["ready", "ready"]
    published = world.manager.publish_http01("tok", "tok.thumb")
    assert published is not None and published.called  # both acknowledged (synchronously, here)
    for app in apps:
        assert app.acme is not None
        assert app.acme.http01_answer(b"tok") == b"tok.thumb"
        assert app.acme.certificate_for(NAME) is not None
        assert app.acme.certificate_for(NAME).certificate == certificate.certificate  # type: ignore[union-attr]
    world.manager.stopService()


# --- the issuer waits for the acknowledgement ------------------------------------------------------------------


class _InlineReactor:
    """callFromThread runs the call at once, then what the test queued (the workers' acknowledgement)."""

    def __init__(self) -> None:
        self.after: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)
        for then in self.after:
            then()


def test_the_issuer_waits_until_a_publication_is_acknowledged(tmp_path: Path) -> None:
    from twisted.internet.defer import Deferred

    from labelgw.tls.acme import AcmeFailure
    from labelgw.tls.acme_client import AcmeIssuer
    from labelgw.tls.acme_store import AcmeStore

    reactor = _InlineReactor()
    issuer = AcmeIssuer(reactor=reactor, run_in_thread=lambda f, *a: f(*a),  # type: ignore[arg-type,return-value]
                        store=AcmeStore(tmp_path, "https://127.0.0.1:1/dir"), email=None)
    acknowledged: Deferred[None] = Deferred()
    published: list[str] = []

    def publish(token: str) -> Deferred[None]:
        published.append(token)
        return acknowledged

    reactor.after = [lambda: acknowledged.callback(None) if not acknowledged.called else None]
    issuer._on_reactor(publish, "tok")  # returns only once acknowledged (here: right after the call)
    assert published == ["tok"] and acknowledged.called
    refused: Deferred[None] = Deferred()
    reactor.after = [lambda: refused.errback(AcmeFailure("no")) if not refused.called else None]
    with pytest.raises(AcmeFailure):
        issuer._on_reactor(lambda: refused)


def test_a_worker_without_acme_still_acknowledges_acme_messages() -> None:
    from test_workers_protocol import worker_app

    app, link, transport, _ = worker_app()
    assert app.acme is None
    link.dataReceived(encode(("acme-http01", 5, "tok", "tok.thumb")))
    assert [reply[:2] for reply in replies(transport)] == [("ack", 5)]
