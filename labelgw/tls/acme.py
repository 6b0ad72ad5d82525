"""Public certificates over ACME (RFC 8555): which names get one, when to order and renew, the challenges.

Names: every routed host that is public (not an IP, not a single label, not under a local zone such as
``.localhost``, ``.test``, ``.internal``, ``.home.arpa``; see L{wants_acme}), unless its route says
``labelgw.tls=local`` or ``--cert-dir`` holds a certificate for it. The route table is scanned every
L{SCAN_INTERVAL} seconds; a new name is ordered at once.

Wildcard routes (``*.apps.example.com``): a wildcard certificate needs DNS-01, which labelgw does not do (put one in
``--cert-dir``: it covers every name one label under it). Without one, each concrete name gets its own certificate
on demand (L{AcmeManager.on_demand}): the first handshake naming ``a.apps.example.com`` adds it to the ACME names,
and the next scan orders it over HTTP-01 or TLS-ALPN-01 like a routed name. Only names one label under a routed
public wildcard are taken, and at most C{max_on_demand} per wildcard (L{MAX_ON_DEMAND} by default;
``acme_on_demand_max`` in the config file): anyone can send any SNI, and without a bound random names would make
labelgw order certificates without limit (and hit the ACME server's rate limits for the real names). Caddy's
on-demand TLS asks an "ask" endpoint for the same reason. Names past the bound get the fallback certificate, with
one warning per wildcard.

Until a name has its certificate, handshakes for it get what they got before (the default certificate, or a
leaf of the local CA where its constraints allow the name): the handshake never waits for ACME. The reason is
in the log (one line per attempt) and in the admin view (C{GET /acme}).

Timing: one order at a time (the ACME server sees no burst, whatever the number of routes). A certificate is
renewed when 30 days are left, or a third of its lifetime for short-lived ones (L{renewal_time}), or earlier
when the server's ACME Renewal Information (ARI) says so. A failed order is retried after L{retry_delay}:
doubling from C{retry_base} (5 minutes) up to C{retry_max} (12 hours), with jitter, and never before the
server's C{Retry-After} (rate limits): no storm after a failure, and Let's Encrypt's limit of 5 failed
validations per name and hour is not reached by the retries of one name.

Challenges, both answered in this process: HTTP-01 on the HTTP listeners (L{AcmeManager.http01_answer}, called by
labelgw.http.dispatch for ``/.well-known/acme-challenge/<token>``), TLS-ALPN-01 on the HTTPS listeners
(L{AcmeManager.alpn_challenge_for}, a certificate with the acmeIdentifier extension served to clients that offer
only ALPN ``acme-tls/1``; labelgw.tls.acme_openssl for pyOpenSSL). The first attempt uses HTTP-01 when there is
an HTTP listener, and attempts alternate between the types there are listeners for (``--acme-challenge``
picks one).

With ``--workers`` the manager runs in the supervising process only; its C{relay} (labelgw.workers.certs) passes
every answer to the worker processes, which serve the listeners, and a publication returns a Deferred that fires
once each worker acknowledged it: the issuer asks the server to validate only then. The certificates reach the
workers through L{AcmeManager.watch}.

The TLS engines reach all this through L{AcmeSource}: name in, PEM and cryptography objects out, no engine type.
The protocol itself (account, order, challenge answers, finalisation) runs in threads: labelgw.tls.acme_client.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.tls.acme_store import AcmeCertificate
from labelgw.tls.ca import LOCAL_DNS_ZONES
from labelgw.tls.policy import ip_literal, normalize_server_name

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"
CHALLENGE_TYPES = (HTTP_01, TLS_ALPN_01)
ACME_TLS_ALPN = b"acme-tls/1"
# RFC 8737: id-pe-acmeIdentifier, critical, an OCTET STRING holding SHA-256 of the key authorization.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HTTP01_PREFIX = b"/.well-known/acme-challenge/"

RENEW_BEFORE = timedelta(days=30)
SCAN_INTERVAL = 2.0
RETRY_BASE = 300.0
RETRY_MAX = 12 * 3600.0
# A Retry-After beyond this is taken for a mistake (or a server that means "never"): retry after a week then.
RETRY_AFTER_MAX = 7 * 86400.0
MAX_NAMES = 10000
# On-demand ACME names one label under one wildcard route, at most (the rest get the fallback certificate).
MAX_ON_DEMAND = 100
# How often the renewal information (ARI) of a held certificate is asked for again (its draft suggests 6 hours).
RENEWAL_INFO_INTERVAL = 6 * 3600.0


# --- which names --------------------------------------------------------------------------------------------


def wants_acme(name: str) -> bool:
    """Is C{name} public, so that only a public CA can vouch for it? (IPs, bare names, local zones: no.)"""
    if normalize_server_name(name) != name or ip_literal(name) is not None or "." not in name or "*" in name:
        return False
    return not any(name == zone or name.endswith("." + zone) for zone in LOCAL_DNS_ZONES)


# --- when ---------------------------------------------------------------------------------------------------


def renewal_time(not_before: datetime, not_after: datetime, renew_before: timedelta = RENEW_BEFORE) -> datetime:
    """When to renew: 30 days before expiry, or with a third of the lifetime left for shorter certificates."""
    lifetime = not_after - not_before
    return not_after - min(renew_before, lifetime / 3)


def retry_delay(
    failures: int,
    base: float = RETRY_BASE,
    maximum: float = RETRY_MAX,
    retry_after: float | None = None,
    jitter: float = 0.5,
) -> float:
    """Seconds before the next attempt after C{failures} failures in a row (1: the first failure).

    Doubling from C{base} up to C{maximum}, spread by +-10 % (C{jitter} in [0, 1): many gateways restarted
    together do not retry in step), and never earlier than the server's Retry-After.
    """
    delay = min(maximum, base * 2.0 ** max(0, failures - 1))
    delay *= 0.9 + 0.2 * jitter
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, RETRY_AFTER_MAX))
    return delay


# --- challenge material -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlpnChallenge:
    """The TLS-ALPN-01 certificate for one name while its validation is pending (RFC 8737), as both forms."""

    name: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    key_pem: bytes


def alpn_challenge(name: str, key_authorization: str, now: datetime) -> AlpnChallenge:
    """A self-signed certificate for C{name} with the critical acmeIdentifier extension (CPU only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    # DER: OCTET STRING (0x04), length 32, the digest.
    extension = x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labelgw ACME challenge")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(extension, critical=True)
        .sign(key, hashes.SHA256())
    )
    return AlpnChallenge(
        name,
        certificate,
        key,
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


class ChallengeBoard(Protocol):
    """Where an issuer publishes the answers to its challenges (called on the reactor thread).

    A publication may return a Deferred: the answer is not in place everywhere yet (the worker processes of
    ``--workers`` still have to acknowledge it, labelgw.workers.certs); the issuer waits for it to fire before it
    asks the server to validate."""

    def publish_http01(self, token: str, key_authorization: str) -> Deferred[None] | None: ...

    def withdraw_http01(self, token: str) -> None: ...

    def publish_alpn(self, challenge: AlpnChallenge) -> Deferred[None] | None: ...

    def withdraw_alpn(self, name: str) -> None: ...


class ChallengeRelay(Protocol):
    """Passes the manager's challenge answers on to the processes that serve the listeners (the workers of
    ``--workers``: labelgw.workers.certs.AcmeRelay). None withdraws. The Deferred fires once every serving process
    has the answer."""

    def http01(self, token: str, key_authorization: str | None) -> Deferred[None] | None: ...

    def alpn(self, name: str, challenge: AlpnChallenge | None) -> Deferred[None] | None: ...

    def describe(self) -> dict[str, Any]:
        """For the admin view (C{GET /acme}, under C{"workers"})."""


class AcmeFailure(Exception):
    """An attempt failed; C{retry_after} carries the server's Retry-After (seconds) when it sent one."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Issuer(Protocol):
    """Gets certificates from an ACME server; the real one (labelgw.tls.acme_client) works in threads."""

    def issue(self, name: str, challenge: str, board: ChallengeBoard) -> Deferred[AcmeCertificate]:
        """Order, answer the challenge, finalise, store on disk; fails with L{AcmeFailure} (or any error)."""

    def renewal_hint(self, certificate: AcmeCertificate) -> Deferred[datetime | None]:
        """The server's suggested renewal time (ARI), or None when it offers none. Never fails."""

    def load_stored(self) -> Deferred[list[AcmeCertificate]]:
        """The certificates stored by an earlier run (problems logged). Never fails."""


# --- what a TLS engine sees -----------------------------------------------------------------------------------


class AcmeSource(Protocol):
    """What a TLS engine asks during a handshake; both calls are dict lookups (reactor thread, no I/O).

    The running gateway's source is C{HttpsService.acme} (an L{AcmeManager}; None without ``--acme-email``). An
    engine asks it after the ``--cert-dir`` lookup and before the local CA, with the normalised SNI name:

        1. C{alpn_challenge_for(name)} not None: a TLS-ALPN-01 validation is pending (seconds). Serve its
           certificate with ALPN C{acme-tls/1} to a client offering C{acme-tls/1}. pyOpenSSL
           (labelgw.tls.acme_openssl) decides in its ALPN callback and gives every other client the name's
           current certificate; an engine without an ALPN-select callback (the standard library's ssl, whose
           ALPN list is fixed per context) switches the connection to a context holding the challenge certificate
           and offering only C{acme-tls/1} for as long as the challenge is pending, and other clients of that name
           get the challenge certificate during those seconds.
        2. C{certificate_for(name)} not None: serve C{chain_pem} (leaf first) with C{key_pem}, or C{chain} and
           C{private_key} as cryptography objects.
        3. otherwise: the choice as without ACME (local CA where its constraints allow, else the default).

    Material changes only on the reactor thread, and L{watch} says when, so contexts can be built ahead of the
    handshake (the standard library loads keys from files only: build them in C{watch}'s callback).
    """

    def certificate_for(self, name: str) -> AcmeCertificate | None:
        """The ACME certificate to serve for C{name} (normalised SNI), or None: fall back as without ACME."""

    def alpn_challenge_for(self, name: str) -> AlpnChallenge | None:
        """The TLS-ALPN-01 certificate while a validation of C{name} is pending, else None. Serve it only to a
        client whose ALPN offer is C{acme-tls/1}, with C{acme-tls/1} selected."""

    def watch(self, changed: Callable[[str], None]) -> None:
        """Call C{changed(name)} (reactor thread) after either answer above changed for C{name}: an engine that
        prepares its contexts ahead of the handshake rebuilds that name's there. A TLS-ALPN-01 challenge is
        published before the ACME server is asked to validate, and C{changed} runs synchronously inside that
        publication, so a context built in C{changed} is in place in time."""


# --- the manager ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Name:
    name: str
    certificate: AcmeCertificate | None = None
    # waiting (for its turn), ordering, valid, failed
    status: str = "waiting"
    reason: str = "not ordered yet"
    failures: int = 0
    # Epoch seconds of the next order (renewal or retry); None while ordering.
    due: float | None = None
    renew_at: float | None = None
    ari: bool = False
    last_challenge: str | None = None
    last_error: str | None = None
    orders: int = 0
    # The certificate's notAfter in epoch seconds: compared in every handshake for the name, so computed once.
    expires: float = 0.0
    timer: IDelayedCall | None = field(default=None, repr=False)
    hint_timer: IDelayedCall | None = field(default=None, repr=False)


class AcmeManager(Service):
    """Keeps a certificate for every public routed name: orders, renews, retries; answers the challenges.

    Use it on the reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        issuer: Issuer,
        hosts: Callable[[], Iterable[tuple[str, str | None]]],
        challenge_types: tuple[str, ...],
        has_own_certificate: Callable[[str], bool] = lambda name: False,
        directory_url: str = LETS_ENCRYPT,
        scan_interval: float = SCAN_INTERVAL,
        retry_base: float = RETRY_BASE,
        retry_max: float = RETRY_MAX,
        rng: Callable[[], float] = random.random,
        wildcard_for: Callable[[str], str | None] = lambda name: None,
        max_on_demand: int = MAX_ON_DEMAND,
    ) -> None:
        if not challenge_types:
            raise ValueError("ACME needs an HTTP listener (HTTP-01) or an HTTPS listener (TLS-ALPN-01)")
        self._clock = clock
        self._issuer = issuer
        self._hosts = hosts
        self._challenge_types = challenge_types
        self.challenge_types = challenge_types
        self._has_own = has_own_certificate
        self.directory_url = directory_url
        self._scan_interval = scan_interval
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._rng = rng
        self._names: dict[str, _Name] = {}
        self._http01: dict[str, bytes] = {}
        self._alpn: dict[str, AlpnChallenge] = {}
        self._busy: str | None = None
        self._loaded = False
        self._scanner: LoopingCall | None = None
        self._work: Deferred[Any] | None = None
        self._watchers: list[Callable[[str], None]] = []
        # The wildcard route host serving a name only by that wildcard ("a.x.com" -> "*.x.com"), else None.
        self._wildcard_for = wildcard_for
        self._max_on_demand = max_on_demand
        # Wildcard route host -> the names under it a handshake asked for, in arrival order (bounded).
        self._on_demand: dict[str, dict[str, None]] = {}
        self._on_demand_full: set[str] = set()
        # With --workers, the processes that serve the listeners get every answer through this (set by the
        # supervisor); the certificates reach them through watch() and held_certificate().
        self.relay: ChallengeRelay | None = None

    # --- AcmeSource ------------------------------------------------------------------------------------------

    def certificate_for(self, name: str) -> AcmeCertificate | None:
        entry = self._names.get(name)
        if entry is None or entry.certificate is None:
            return None
        if entry.expires <= self._clock.seconds():
            return None  # expired: the fallback is no worse, and says nothing false
        return entry.certificate

    def alpn_challenge_for(self, name: str) -> AlpnChallenge | None:
        return self._alpn.get(name)

    def held_certificate(self, name: str) -> AcmeCertificate | None:
        """The certificate held for C{name}, expired or not (L{certificate_for} leaves an expired one out)."""
        entry = self._names.get(name)
        return entry.certificate if entry is not None else None

    def held_certificates(self) -> list[AcmeCertificate]:
        return [entry.certificate for entry in self._names.values() if entry.certificate is not None]

    def pending_challenges(self) -> tuple[dict[str, str], list[AlpnChallenge]]:
        """The answers published now: HTTP-01 key authorizations by token, TLS-ALPN-01 certificates."""
        return (
            {token: value.decode("ascii") for token, value in self._http01.items()},
            list(self._alpn.values()),
        )

    def watch(self, changed: Callable[[str], None]) -> None:
        self._watchers.append(changed)

    def _changed(self, name: str) -> None:
        for changed in self._watchers:
            try:
                changed(name)
            except Exception:
                self._log.failure("a watcher of ACME name {name}", name=name)

    def http01_answer(self, token: bytes) -> bytes | None:
        """The key authorization for C{token} while its HTTP-01 validation is pending, else None."""
        try:
            return self._http01.get(token.decode("ascii"))
        except UnicodeDecodeError:
            return None

    def on_demand(self, name: str) -> None:
        """A handshake asked for C{name}, which has no certificate: if it is one label under a routed public
        wildcard, make it an ACME name (ordered by the next scan), at most C{max_on_demand} per wildcard."""
        if not wants_acme(name):
            return
        wildcard = self._wildcard_for(name)
        if wildcard is None:
            return
        names = self._on_demand.setdefault(wildcard, {})
        if name in names:
            return
        if len(names) >= self._max_on_demand:
            if wildcard not in self._on_demand_full:
                self._on_demand_full.add(wildcard)
                self._log.warn(
                    "ACME: {wildcard} has {count} on-demand names already (acme_on_demand_max); {name} and further "
                    "names under it get the fallback certificate (put a wildcard certificate in --cert-dir)",
                    wildcard=wildcard, count=len(names), name=name,
                )
            return
        names[name] = None
        self._log.info("ACME: {name} asked for under the wildcard route {wildcard}: ordering its own certificate",
                       name=name, wildcard=wildcard)

    # --- ChallengeBoard --------------------------------------------------------------------------------------

    def publish_http01(self, token: str, key_authorization: str) -> Deferred[None] | None:
        self._http01[token] = key_authorization.encode("ascii")
        return self.relay.http01(token, key_authorization) if self.relay is not None else None

    def withdraw_http01(self, token: str) -> None:
        if self._http01.pop(token, None) is not None and self.relay is not None:
            self.relay.http01(token, None)

    def publish_alpn(self, challenge: AlpnChallenge) -> Deferred[None] | None:
        self._alpn[challenge.name] = challenge
        self._changed(challenge.name)
        return self.relay.alpn(challenge.name, challenge) if self.relay is not None else None

    def withdraw_alpn(self, name: str) -> None:
        if self._alpn.pop(name, None) is not None:
            self._changed(name)
            if self.relay is not None:
                self.relay.alpn(name, None)

    # --- the service -----------------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        loading = self._issuer.load_stored()
        loading.addCallback(self._adopt_stored)
        loading.addErrback(lambda f: self._log.failure("loading stored ACME certificates", failure=f))
        loading.addBoth(lambda _: self._start_scanning())

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._scanner is not None and self._scanner.running:
            self._scanner.stop()
        for entry in self._names.values():
            self._cancel(entry)
            if entry.hint_timer is not None and entry.hint_timer.active():
                entry.hint_timer.cancel()
            entry.hint_timer = None
        work = self._work
        if work is None:
            return succeed(None)
        # An order in progress runs in a thread: stopping waits for it (its own timeouts bound it).
        done: Deferred[None] = Deferred()
        work.addBoth(lambda _: done.callback(None))
        return done

    def _adopt_stored(self, stored: list[AcmeCertificate]) -> None:
        for certificate in stored:
            entry = self._names.setdefault(certificate.name, _Name(certificate.name))
            entry.certificate = certificate
            entry.expires = certificate.not_after.timestamp()
            self._changed(certificate.name)
            self._log.info(
                "ACME certificate for {name} loaded from the state directory, valid until {not_after}",
                name=certificate.name, not_after=certificate.not_after.isoformat(),
            )
        self._loaded = True

    def _start_scanning(self) -> None:
        if not self.running:
            return
        self._scanner = LoopingCall(self.scan)
        self._scanner.clock = self._clock
        started = self._scanner.start(self._scan_interval, now=True)
        started.addErrback(lambda f: self._log.failure("scanning routes for ACME names", failure=f))

    def scan(self) -> None:
        """Compare the routed public names with what is managed: new names are scheduled, gone ones dropped."""
        wanted: set[str] = set()
        # Why a name held before is not wanted now (for the admin view).
        left_out: dict[str, str] = {}
        self._adopt_held()
        wildcards: set[str] = set()
        for host, tls in self._on_demand_hosts():
            if host.startswith("*."):
                wildcards.add(host)
                continue
            if not wants_acme(host):
                continue
            if tls == "local":
                left_out[host] = "its route is labelled tls=local"
            elif self._has_own(host):
                left_out[host] = "--cert-dir has a certificate for it"
            elif len(wanted) < MAX_NAMES:
                wanted.add(host)
        # On-demand names of wildcard routes that are gone are forgotten (a new route starts a new count).
        for wildcard in set(self._on_demand) - wildcards:
            del self._on_demand[wildcard]
            self._on_demand_full.discard(wildcard)
        for name in sorted(wanted):
            entry = self._names.get(name)
            if entry is None:
                entry = self._names[name] = _Name(name)
            if entry.due is None and entry.status != "ordering":
                self._schedule_first(entry)
        for name, entry in list(self._names.items()):
            if name not in wanted and entry.status != "ordering":
                self._cancel(entry)
                if entry.certificate is None:
                    del self._names[name]
                else:
                    entry.status, entry.due = ("left_out" if name in left_out else "unrouted"), None
                    why = left_out.get(name, "no route names it any more")
                    entry.reason = f"not managed: {why} (the certificate stays on disk)"

    def _adopt_held(self) -> None:
        """Certificates held for names that a wildcard route serves (loaded from the state directory after a
        restart, or kept while the route was gone) count as that wildcard's on-demand names again, so that they are
        renewed without waiting for a handshake (a handshake finds the certificate and asks for nothing)."""
        for name, entry in self._names.items():
            if entry.certificate is None:
                continue
            wildcard = self._wildcard_for(name)
            if wildcard is not None:
                names = self._on_demand.setdefault(wildcard, {})
                if name not in names and len(names) < self._max_on_demand:
                    names[name] = None

    def _on_demand_hosts(self) -> Iterable[tuple[str, str | None]]:
        """The routed hosts, each wildcard followed by its on-demand names (with the wildcard route's tls mode)."""
        for host, tls in self._hosts():
            yield host, tls
            for name in self._on_demand.get(host, ()):
                yield name, tls

    def _schedule_first(self, entry: _Name) -> None:
        certificate = entry.certificate
        if certificate is None:
            entry.status, entry.reason = "waiting", "no certificate yet: ordering"
            self._log.info(
                "ACME: ordering a certificate for {name} from {directory}; until it is issued, the name gets the "
                "default certificate", name=entry.name, directory=self.directory_url,
            )
            self._set_due(entry, self._clock.seconds())
            return
        self._schedule_renewal(entry, certificate)
        self._ask_hint(entry, certificate)

    def _ask_hint(self, entry: _Name, certificate: AcmeCertificate) -> None:
        entry.hint_timer = None
        if not self.running or entry.certificate is not certificate:
            return
        hint = self._issuer.renewal_hint(certificate)
        hint.addCallback(self._apply_hint, entry, certificate)
        hint.addErrback(lambda f: self._log.failure("asking for the ACME renewal information", failure=f))

    def _schedule_renewal(self, entry: _Name, certificate: AcmeCertificate, at: datetime | None = None) -> None:
        when = (at or renewal_time(certificate.not_before, certificate.not_after)).timestamp()
        entry.status = "valid"
        entry.renew_at = when
        entry.reason = f"valid until {certificate.not_after.isoformat()}"
        self._set_due(entry, max(when, self._clock.seconds()))

    def _apply_hint(self, hint: datetime | None, entry: _Name, certificate: AcmeCertificate) -> None:
        if entry.certificate is not certificate or not self.running:
            return
        # ARI can move the window (a CA about to revoke): asked again every few hours while the certificate is held.
        if entry.hint_timer is None or not entry.hint_timer.active():
            entry.hint_timer = self._clock.callLater(RENEWAL_INFO_INTERVAL, self._ask_hint, entry, certificate)
        if hint is None or entry.status != "valid":
            return
        entry.ari = True
        if entry.renew_at is None or hint.timestamp() < entry.renew_at:
            self._log.info("ACME: the server suggests renewing {name} at {at} (ARI)", name=entry.name, at=hint.isoformat())
            self._schedule_renewal(entry, certificate, hint)

    def _set_due(self, entry: _Name, when: float) -> None:
        self._cancel(entry)
        entry.due = when
        entry.timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._due, entry)

    def _cancel(self, entry: _Name) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None

    def _due(self, entry: _Name) -> None:
        entry.timer = None
        self._pump()

    def _pump(self) -> None:
        """Start the most overdue order, if none runs (one at a time)."""
        if self._busy is not None or not self.running:
            return
        now = self._clock.seconds()
        due = [e for e in self._names.values() if e.due is not None and e.due <= now]
        if not due:
            return
        entry = min(due, key=lambda e: (e.due, e.name))
        self._order(entry)

    def _order(self, entry: _Name) -> None:
        challenge = self._challenge_types[entry.failures % len(self._challenge_types)]
        self._busy = entry.name
        self._cancel(entry)
        entry.due = None
        entry.status = "ordering"
        entry.orders += 1
        entry.last_challenge = challenge
        entry.reason = f"ordering (challenge {challenge}, attempt {entry.failures + 1})"
        self._log.info("ACME: ordering {name} with {challenge} (attempt {attempt})",
                       name=entry.name, challenge=challenge, attempt=entry.failures + 1)
        work = self._work = self._issuer.issue(entry.name, challenge, self)
        work.addCallbacks(self._issued, self._failed, callbackArgs=(entry,), errbackArgs=(entry,))
        work.addErrback(lambda f: self._log.failure("ACME bookkeeping for {name}", failure=f, name=entry.name))
        work.addBoth(self._idle)

    def _idle(self, _: object) -> None:
        self._busy = None
        self._work = None
        self._pump()

    def _issued(self, certificate: AcmeCertificate, entry: _Name) -> None:
        entry.certificate = certificate
        entry.expires = certificate.not_after.timestamp()
        self._changed(entry.name)
        entry.failures = 0
        entry.last_error = None
        self._log.info(
            "ACME: certificate for {name} issued, valid until {not_after}", name=entry.name,
            not_after=certificate.not_after.isoformat(),
        )
        if self.running:
            self._schedule_renewal(entry, certificate)
            self._ask_hint(entry, certificate)

    def _failed(self, failure: Failure, entry: _Name) -> None:
        entry.failures += 1
        error = failure.value
        reason = error.reason if isinstance(error, AcmeFailure) else f"{type(error).__name__}: {error}"
        retry_after = error.retry_after if isinstance(error, AcmeFailure) else None
        delay = retry_delay(entry.failures, self._retry_base, self._retry_max, retry_after, self._rng())
        entry.last_error = reason
        entry.status = "failed"
        serving = "the ACME certificate until it expires" if entry.certificate is not None else "the default certificate"
        entry.reason = f"attempt {entry.failures} failed: {reason}; retry in {delay:.0f} s"
        self._log.warn(
            "ACME: no certificate for {name}: {reason}; serving {serving}, retry in {delay:.0f} s "
            "(attempt {attempt})", name=entry.name, reason=reason, serving=serving, delay=delay,
            attempt=entry.failures,
        )
        if self.running:
            self._set_due(entry, self._clock.seconds() + delay)

    # --- the admin view --------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = self._clock.seconds()
        names = {}
        for name in sorted(self._names):
            entry = self._names[name]
            certificate = entry.certificate
            names[name] = {
                "status": entry.status,
                "reason": entry.reason,
                "certificate": None if certificate is None else {
                    "issuer": certificate.certificate.issuer.rfc4514_string(),
                    "not_before": certificate.not_before.isoformat(),
                    "not_after": certificate.not_after.isoformat(),
                },
                "serving": "acme" if self.certificate_for(name) is not None else "default",
                "next_attempt_in": None if entry.due is None else round(max(0.0, entry.due - now), 1),
                "renew_at": None if entry.renew_at is None else datetime.fromtimestamp(entry.renew_at, UTC).isoformat(),
                "renewal_info": entry.ari,
                "failures": entry.failures,
                "last_error": entry.last_error,
                "last_challenge": entry.last_challenge,
                "orders": entry.orders,
            }
        view: dict[str, Any] = {
            "directory": self.directory_url,
            "challenges": list(self._challenge_types),
            "ordering": self._busy,
            "names": names,
        }
        if self.relay is not None:
            view["workers"] = self.relay.describe()
        return view
