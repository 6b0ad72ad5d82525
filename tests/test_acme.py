"""ACME without a network: which names, when to order and renew, backoff after failures (task.Clock and a fake
issuer), the state directory, the HTTP-01 answer through the real HTTP/1.1 server, the TLS-ALPN-01 switch in real
in-memory handshakes, and the options. The protocol against a real ACME server: tests/test_e2e_acme.py."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from labelgw.cli import config
from labelgw.cli.tap import Options
from labelgw.core.model import ContainerSpec
from labelgw.tls.acme import (
    ACME_IDENTIFIER_OID,
    HTTP_01,
    TLS_ALPN_01,
    AcmeFailure,
    AcmeManager,
    alpn_challenge,
    renewal_time,
    retry_delay,
    wants_acme,
)
from labelgw.tls.acme_client import _retry_after_seconds
from labelgw.tls.acme_openssl import AcmeContexts
from labelgw.tls.acme_store import AcmeCertificate, AcmeStore, directory_slug
from labelgw.tls.policy import INTERMEDIATE
from labelgw.tls.sni import SNIContextSelector
from proxyharness import ProxyHarness
from test_tls_support import InlineThreads, handshake

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = 86400.0


def make_certificate(name: str, not_before: datetime, lifetime: timedelta, issuer_cn: str = "Test ACME CA") -> AcmeCertificate:
    """A chain of leaf (for C{name}) and its issuer, as an ACME server would return it."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)])
    issuer = (
        x509.CertificateBuilder().subject_name(issuer_name).issuer_name(issuer_name)
        .public_key(issuer_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before - timedelta(days=1)).not_valid_after(not_before + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_before + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    chain_pem = leaf.public_bytes(serialization.Encoding.PEM) + issuer.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return AcmeCertificate.from_pem(name, chain_pem, key_pem)


class FakeIssuer:
    """Records orders; each is answered by the test (succeed / fail) when it chooses."""

    def __init__(self, stored: list[AcmeCertificate] | None = None) -> None:
        self.orders: list[tuple[str, str, Deferred[AcmeCertificate]]] = []
        self.stored = stored or []
        self.hint: datetime | None = None

    def issue(self, name: str, challenge: str, board: Any) -> Deferred[AcmeCertificate]:
        d: Deferred[AcmeCertificate] = Deferred()
        self.orders.append((name, challenge, d))
        return d

    def renewal_hint(self, certificate: AcmeCertificate) -> Deferred[datetime | None]:
        return succeed(self.hint)

    def load_stored(self) -> Deferred[list[AcmeCertificate]]:
        return succeed(list(self.stored))


class World:
    def __init__(self, *, stored: list[AcmeCertificate] | None = None, types: tuple[str, ...] = (HTTP_01, TLS_ALPN_01),
                 own: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.issuer = FakeIssuer(stored)
        self.hosts: list[tuple[str, str | None]] = []
        self.manager = AcmeManager(
            clock=self.clock, issuer=self.issuer, hosts=lambda: self.hosts, challenge_types=types,
            has_own_certificate=lambda name: name in own, retry_base=300.0, retry_max=12 * 3600.0,
            rng=lambda: 0.5,  # no jitter: exact delays
        )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def start(self) -> None:
        self.manager.startService()
        self.clock.advance(0)  # a new name is due at once

    def advance(self, seconds: float) -> None:
        # task.Clock runs every call due within the step in time order, the 2-second scans included.
        self.clock.advance(seconds)

    def issue_now(self, lifetime: timedelta = timedelta(days=90)) -> AcmeCertificate:
        name, _, d = self.issuer.orders[-1]
        certificate = make_certificate(name, self.now(), lifetime)
        d.callback(certificate)
        return certificate


# --- which names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("api.example.com", True),
        ("www.shop.example.org", True),
        ("api.localhost", False),
        ("localhost", False),
        ("web.test", False),
        ("db.internal", False),
        ("nas.home.arpa", False),
        ("printer.lan", False),
        ("api", False),  # a bare name
        ("127.0.0.1", False),
        ("93.184.216.34", False),  # a public IP: ACME for IPs is not offered
        ("::1", False),
        ("*.example.com", False),  # wildcards need DNS-01: a user certificate in --cert-dir
        ("API.example.com", False),  # not normalised: never reaches here from the route table
    ],
)
def test_wants_acme(name: str, public: bool) -> None:
    assert wants_acme(name) is public


# --- when ----------------------------------------------------------------------------------------------------


def test_renewal_30_days_before_expiry_of_a_90_day_certificate() -> None:
    assert renewal_time(START, START + timedelta(days=90)) == START + timedelta(days=60)


def test_short_lived_certificates_renew_with_a_third_of_their_lifetime_left() -> None:
    assert renewal_time(START, START + timedelta(days=6)) == START + timedelta(days=4)
    assert renewal_time(START, START + timedelta(seconds=300)) == START + timedelta(seconds=200)


def test_retry_delay_doubles_up_to_the_maximum() -> None:
    assert [retry_delay(n, 300.0, 3600.0) for n in range(1, 7)] == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]


def test_retry_delay_jitter_is_ten_percent_either_way() -> None:
    assert retry_delay(1, 300.0, jitter=0.0) == pytest.approx(270.0)
    assert retry_delay(1, 300.0, jitter=0.999999) == pytest.approx(330.0, rel=1e-4)


def test_retry_delay_never_before_the_servers_retry_after() -> None:
    assert retry_delay(1, 300.0, retry_after=7200.0) == 7200.0
    assert retry_delay(5, 300.0, maximum=3600.0, retry_after=60.0) == 3600.0
    # A Retry-After of years is capped at a week.
    assert retry_delay(1, 300.0, retry_after=1e9) == 7 * 86400.0


def test_retry_after_header_in_seconds_or_as_a_date() -> None:
    assert _retry_after_seconds("120") == 120.0
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert _retry_after_seconds("Mon, 30 Nov 2026 13:00:00 GMT", now) == 3600.0
    assert _retry_after_seconds("soon") is None


# --- the manager ---------------------------------------------------------------------------------------------


def test_a_public_routed_name_is_ordered_at_once_and_served_once_issued() -> None:
    world = World()
    world.hosts = [("api.example.com", None), ("web.localhost", None), ("plain", None)]
    world.start()
    assert [(n, c) for n, c, _ in world.issuer.orders] == [("api.example.com", HTTP_01)]
    assert world.manager.certificate_for("api.example.com") is None
    assert world.manager.describe()["names"]["api.example.com"]["status"] == "ordering"
    certificate = world.issue_now()
    assert world.manager.certificate_for("api.example.com") is certificate
    view = world.manager.describe()["names"]["api.example.com"]
    assert view["status"] == "valid" and view["serving"] == "acme"
    assert view["renew_at"] == (world.now() + timedelta(days=60)).isoformat()


def test_opt_out_and_own_certificates_are_not_ordered() -> None:
    world = World(own={"own.example.com"})
    world.hosts = [("local.example.com", "local"), ("own.example.com", None), ("redirected.example.com", "redirect")]
    world.start()
    assert [n for n, _, _ in world.issuer.orders] == ["redirected.example.com"]


def test_a_failure_is_retried_after_the_backoff_only_and_the_challenge_types_alternate() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issuer.orders[-1][2].errback(AcmeFailure("connection refused"))
    view = world.manager.describe()["names"]["api.example.com"]
    assert view["status"] == "failed"
    assert view["last_error"] == "connection refused"
    assert view["serving"] == "default"
    assert "retry in 300 s" in view["reason"]
    world.advance(299)
    assert len(world.issuer.orders) == 1  # no retry storm: scans do not order again
    world.advance(2)
    assert [(n, c) for n, c, _ in world.issuer.orders][1] == ("api.example.com", TLS_ALPN_01)
    world.issuer.orders[-1][2].errback(AcmeFailure("still down"))
    world.advance(599)
    assert len(world.issuer.orders) == 2
    world.advance(2)
    assert len(world.issuer.orders) == 3
    assert world.issuer.orders[-1][1] == HTTP_01
    world.issue_now()
    assert world.manager.describe()["names"]["api.example.com"]["failures"] == 0


def test_the_servers_retry_after_is_respected() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issuer.orders[-1][2].errback(AcmeFailure("rateLimited: too many certificates", retry_after=3 * 3600))
    world.advance(3 * 3600 - 2)
    assert len(world.issuer.orders) == 1
    world.advance(3)
    assert len(world.issuer.orders) == 2


def test_any_error_from_the_issuer_counts_as_a_failure() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issuer.orders[-1][2].errback(ValueError("boom"))
    assert world.manager.describe()["names"]["api.example.com"]["last_error"] == "ValueError: boom"


def test_one_order_at_a_time() -> None:
    world = World()
    world.hosts = [("a.example.com", None), ("b.example.com", None), ("c.example.com", None)]
    world.start()
    assert [n for n, _, _ in world.issuer.orders] == ["a.example.com"]
    world.advance(10)
    assert len(world.issuer.orders) == 1
    world.issue_now()
    assert [n for n, _, _ in world.issuer.orders] == ["a.example.com", "b.example.com"]
    world.issue_now()
    world.issue_now()
    assert [n for n, _, _ in world.issuer.orders] == ["a.example.com", "b.example.com", "c.example.com"]
    assert all(world.manager.certificate_for(n) is not None for n in ("a.example.com", "b.example.com", "c.example.com"))


def test_renewal_when_the_certificate_nears_expiry_and_the_old_one_is_served_meanwhile() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    first = world.issue_now(lifetime=timedelta(days=6))
    world.advance(4 * DAY - 5)
    assert len(world.issuer.orders) == 1
    world.advance(6)
    assert len(world.issuer.orders) == 2
    assert world.manager.certificate_for("api.example.com") is first  # still served while renewing
    second = world.issue_now(lifetime=timedelta(days=6))
    assert world.manager.certificate_for("api.example.com") is second


def test_an_expired_certificate_is_not_served() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issue_now(lifetime=timedelta(days=6))
    world.advance(4 * DAY + 5)  # renewal starts ...
    world.issuer.orders[-1][2].errback(AcmeFailure("down"))  # ... and fails, and so on
    world.clock.advance(2 * DAY)
    assert world.manager.certificate_for("api.example.com") is None


def test_an_earlier_renewal_hint_from_the_server_wins() -> None:
    world = World()
    world.issuer.hint = START + timedelta(days=10)
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issue_now(lifetime=timedelta(days=90))
    view = world.manager.describe()["names"]["api.example.com"]
    assert view["renewal_info"] is True
    assert view["renew_at"] == (START + timedelta(days=10)).isoformat()


def test_the_renewal_information_is_asked_for_again_every_six_hours() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issue_now(lifetime=timedelta(days=90))
    assert world.manager.describe()["names"]["api.example.com"]["renewal_info"] is False
    # The CA moves the window (it will revoke): the next check, 6 h later, brings the renewal forward.
    world.issuer.hint = START + timedelta(days=1)
    world.advance(6 * 3600 + 1)
    view = world.manager.describe()["names"]["api.example.com"]
    assert view["renew_at"] == (START + timedelta(days=1)).isoformat()
    world.advance(DAY)
    assert len(world.issuer.orders) == 2


def test_stored_certificates_are_used_without_an_order() -> None:
    stored = make_certificate("api.example.com", START - timedelta(days=1), timedelta(days=90))
    world = World(stored=[stored])
    world.hosts = [("api.example.com", None)]
    world.start()
    assert world.issuer.orders == []
    assert world.manager.certificate_for("api.example.com") is stored


def test_a_stored_certificate_due_for_renewal_is_renewed_at_start() -> None:
    stored = make_certificate("api.example.com", START - timedelta(days=80), timedelta(days=90))
    world = World(stored=[stored])
    world.hosts = [("api.example.com", None)]
    world.start()
    world.clock.advance(0)
    assert len(world.issuer.orders) == 1
    assert world.manager.certificate_for("api.example.com") is stored


def test_a_name_opted_out_later_says_why() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issue_now()
    world.hosts = [("api.example.com", "local")]
    world.advance(3)
    view = world.manager.describe()["names"]["api.example.com"]
    assert view["status"] == "left_out"
    assert "tls=local" in view["reason"]


def test_a_name_no_longer_routed_is_dropped_and_ordered_again_when_it_returns() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    world.issue_now()
    world.hosts = []
    world.advance(3)
    assert world.manager.describe()["names"]["api.example.com"]["status"] == "unrouted"
    world.hosts = [("api.example.com", None)]
    world.advance(3)
    assert world.manager.describe()["names"]["api.example.com"]["status"] == "valid"
    assert len(world.issuer.orders) == 1


def test_stop_cancels_timers_and_waits_for_the_order_in_progress() -> None:
    world = World()
    world.hosts = [("api.example.com", None)]
    world.start()
    stopped = world.manager.stopService()
    assert not stopped.called
    world.issue_now()
    assert stopped.called
    assert world.clock.getDelayedCalls() == []


def test_challenge_board_http01_and_alpn() -> None:
    world = World()
    changed: list[str] = []
    world.manager.watch(changed.append)
    world.manager.publish_http01("tok", "tok.thumb")
    assert world.manager.http01_answer(b"tok") == b"tok.thumb"
    assert world.manager.http01_answer(b"other") is None
    world.manager.withdraw_http01("tok")
    assert world.manager.http01_answer(b"tok") is None
    challenge = alpn_challenge("api.example.com", "tok.thumb", START)
    world.manager.publish_alpn(challenge)
    assert world.manager.alpn_challenge_for("api.example.com") is challenge
    world.manager.withdraw_alpn("api.example.com")
    assert world.manager.alpn_challenge_for("api.example.com") is None
    assert changed == ["api.example.com", "api.example.com"]  # published, withdrawn (HTTP-01 is no TLS matter)


def test_watchers_hear_of_issued_and_loaded_certificates() -> None:
    stored = make_certificate("old.example.com", START - timedelta(days=1), timedelta(days=90))
    world = World(stored=[stored])
    changed: list[str] = []
    world.manager.watch(changed.append)
    world.hosts = [("old.example.com", None), ("api.example.com", None)]
    world.start()
    world.issue_now()
    assert changed == ["old.example.com", "api.example.com"]


def test_the_tls_alpn_challenge_certificate_carries_the_acme_identifier() -> None:
    challenge = alpn_challenge("api.example.com", "tok.thumb", START)
    extension = challenge.certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()  # type: ignore[attr-defined]
    san = challenge.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]


# --- the state directory --------------------------------------------------------------------------------------


def test_store_saves_and_loads_certificates_with_private_keys(tmp_path: Path) -> None:
    store = AcmeStore(tmp_path, "https://acme.example/dir")
    certificate = make_certificate("api.example.com", START, timedelta(days=90))
    store.save(certificate)
    assert stat.S_IMODE(os.stat(store.key_path("api.example.com")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    found, problems = AcmeStore(tmp_path, "https://acme.example/dir").load_all()
    assert problems == []
    assert [c.name for c in found] == ["api.example.com"]
    assert found[0].chain_pem == certificate.chain_pem


def test_store_reports_a_broken_certificate_file(tmp_path: Path) -> None:
    store = AcmeStore(tmp_path, "https://acme.example/dir")
    store.save(make_certificate("api.example.com", START, timedelta(days=90)))
    store.key_path("api.example.com").write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    found, problems = store.load_all()
    assert found == [] and "does not match" in problems[0]


def test_account_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    store = AcmeStore(tmp_path, "https://acme.example/dir")
    key = store.account_key()
    assert stat.S_IMODE(os.stat(store.account_key_path).st_mode) == 0o600
    assert store.account_key().private_numbers() == key.private_numbers()
    store.save_account_url("https://acme.example/acct/1")
    assert store.account_url() == "https://acme.example/acct/1"


def test_each_acme_server_has_its_own_directory() -> None:
    staging = directory_slug("https://acme-staging-v02.api.letsencrypt.org/directory")
    production = directory_slug("https://acme-v02.api.letsencrypt.org/directory")
    assert staging != production
    assert staging.startswith("acme-staging-v02.api.letsencrypt.org-")


# --- HTTP-01 through the real HTTP/1.1 server -------------------------------------------------------------------


def _harness_with_acme() -> tuple[ProxyHarness, AcmeManager]:
    spec = ContainerSpec("c1", "api-1", "api", "10.0.0.1", 80, ("api.example.com",))
    harness = ProxyHarness(specs=[spec])
    manager = World().manager
    harness.gateway.acme = manager  # type: ignore[attr-defined]
    return harness, manager


def test_http01_validation_request_is_answered_with_the_key_authorization() -> None:
    harness, manager = _harness_with_acme()
    manager.publish_http01("tok_en-1", "tok_en-1.thumb")
    client = harness.connect()
    client.send(b"GET /.well-known/acme-challenge/tok_en-1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    response = client.response()
    assert response.status == 200
    assert response.body == b"tok_en-1.thumb"
    assert response.header(b"connection") == b"close"
    assert client.closing  # as the answer says
    assert harness.new_connects() == []  # not proxied


def test_http01_is_answered_before_the_redirect_to_https() -> None:
    from labelgw.tls.https import HttpsRedirect

    harness, manager = _harness_with_acme()
    harness.gateway.https_redirect = HttpsRedirect(True, lambda: 8443)
    manager.publish_http01("tok", "tok.thumb")
    client = harness.connect()
    client.send(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert client.response().body == b"tok.thumb"
    other = harness.connect()
    other.send(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert other.response().status == 308


def test_an_unknown_token_goes_to_the_backend_like_any_request() -> None:
    harness, manager = _harness_with_acme()
    manager.publish_http01("tok", "tok.thumb")
    client = harness.connect()
    client.send(b"GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert len(harness.new_connects()) == 1


def test_http01_answers_only_get_and_head() -> None:
    harness, manager = _harness_with_acme()
    manager.publish_http01("tok", "tok.thumb")
    client = harness.connect()
    client.send(b"HEAD /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    response = client.response(head_only=True)
    assert response.status == 200 and response.body == b""
    assert response.header(b"content-length") == b"9"


# --- TLS-ALPN-01 in real handshakes (pyOpenSSL server, stdlib client, memory BIOs) ------------------------------


class Source:
    def __init__(self) -> None:
        self.certificate: AcmeCertificate | None = None
        self.challenge: Any = None

    def certificate_for(self, name: str) -> AcmeCertificate | None:
        return self.certificate if name == "api.example.com" else None

    def alpn_challenge_for(self, name: str) -> Any:
        return self.challenge if name == "api.example.com" else None


def _selector(source: Source) -> SNIContextSelector:
    clock = Clock()
    clock.advance(datetime.now(UTC).timestamp())
    return SNIContextSelector(
        clock=clock, run_in_thread=InlineThreads(), is_routed=lambda name: True,
        acme=AcmeContexts(source, INTERMEDIATE),
    )


def test_the_acme_certificate_is_served_with_its_chain() -> None:
    source = Source()
    now = datetime.now(UTC)
    source.certificate = make_certificate("api.example.com", now - timedelta(hours=1), timedelta(days=90))
    issuer_pem = source.certificate.chain[1].public_bytes(serialization.Encoding.PEM)
    result = handshake(_selector(source), "api.example.com", cadata=issuer_pem)
    assert result.ok, result.error
    assert result.certificate == source.certificate.certificate


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_pending_tls_alpn_challenge_is_served_to_acme_tls_clients_only(version: str) -> None:
    import ssl

    source = Source()
    now = datetime.now(UTC)
    source.certificate = make_certificate("api.example.com", now - timedelta(hours=1), timedelta(days=90))
    source.challenge = alpn_challenge("api.example.com", "tok.thumb", now)
    selector = _selector(source)
    tls = getattr(ssl.TLSVersion, version)
    validation = handshake(selector, "api.example.com", alpn=["acme-tls/1"], minimum=tls, maximum=tls)
    assert validation.ok, validation.error
    assert validation.client_alpn == "acme-tls/1"
    assert validation.certificate == source.challenge.certificate
    browser = handshake(selector, "api.example.com", alpn=["http/1.1"], minimum=tls, maximum=tls)
    assert browser.ok, browser.error
    assert browser.certificate == source.certificate.certificate  # a renewal does not disturb other clients
    assert browser.client_alpn == "http/1.1"
    source.challenge = None
    after = handshake(selector, "api.example.com", alpn=["acme-tls/1"], minimum=tls, maximum=tls)
    assert after.certificate == source.certificate.certificate
    assert after.client_alpn is None  # acme-tls/1 is never selected without a pending challenge


def test_without_an_acme_certificate_the_choice_is_as_before_acme() -> None:
    source = Source()
    result = handshake(_selector(source), "api.example.com")
    # No CA, no cert dir: the handshake is refused as before ACME (nothing to serve).
    assert not result.ok


# --- options ---------------------------------------------------------------------------------------------------


def _parse(*args: str) -> config.Settings:
    options = Options()
    options.parseOptions(list(args))
    return options.settings  # type: ignore[no-any-return]


def test_acme_is_off_by_default() -> None:
    assert _parse().acme is None


def test_acme_options(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    settings = _parse(
        "--acme-email", "ops@example.com", "--acme-directory", "https://acme-staging-v02.api.letsencrypt.org/directory",
        "--acme-ca-bundle", str(bundle), "--acme-challenge", "tls-alpn-01",
    )
    assert settings.acme == config.AcmeSettings(
        email="ops@example.com", directory="https://acme-staging-v02.api.letsencrypt.org/directory",
        ca_bundle=str(bundle), challenge="tls-alpn-01",
    )
    assert _parse("--acme-email", "ops@example.com").acme.directory == config.LETS_ENCRYPT_DIRECTORY  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--acme-directory", "https://x/dir"], "--acme-directory: needs --acme-email"),
        (["--acme-email", "not an address"], "is not an email address"),
        (["--acme-email", "a@b.c", "--acme-directory", "ftp://x"], "is not an http(s) URL"),
        (["--acme-email", "a@b.c", "--acme-challenge", "dns-01"], "is not one of auto, http-01, tls-alpn-01"),
        (["--acme-email", "a@b.c", "--acme-ca-bundle", "/nonexistent/ca.pem"], "is not a file"),
    ],
)
def test_bad_acme_options(args: list[str], message: str) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parse(*args)


def test_acme_settings_from_the_config_file() -> None:
    settings = config.build({}, {"acme_email": "ops@example.com", "acme_retry_base": 5})
    assert settings.acme is not None and settings.acme.retry_base == 5.0
