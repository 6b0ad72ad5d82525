# -*- test-case-name: tests.test_workers_acme -*-
"""ACME under `--workers`: the supervisor orders, the workers serve (labelgw.tls.acme).

The supervisor runs the one L{labelgw.tls.acme.AcmeManager} (orders, renewals, retries, the store under
``<state-dir>/acme``, ``GET /acme``); workers never talk to the ACME server. L{AcmeRelay} (supervisor) pushes what
the TLS engines and the HTTP-01 answer need to every worker; L{WorkerAcme} (worker) is the
L{labelgw.tls.acme.AcmeSource} the worker's engines read, through the same selection as a single process
(C{SNIContextSelector.choose}, C{AcmeServed}, C{AcmeContexts.challenge_material}).

Messages (labelgw.workers.protocol), PEM and strings only. Supervisor to worker, each acknowledged with
``("ack", seq)``:
- ``("acme-state", seq, certificates, alpn, http01)``: everything at a worker's start, sent before its
  ``state`` (so before it accepts): ``[(name, chain_pem, key_pem)]``, ``[(name, cert_pem, key_pem)]`` of the
  pending TLS-ALPN-01 challenges, ``{token: key_authorization}`` of the pending HTTP-01 ones;
- ``("acme-cert", seq, name, chain_pem, key_pem)``: a certificate issued or renewed (None, None: gone);
- ``("acme-alpn", seq, name, cert_pem, key_pem)``: a TLS-ALPN-01 challenge published (None, None: withdrawn);
- ``("acme-http01", seq, token, key_authorization)``: an HTTP-01 answer published (None: withdrawn).
Worker to supervisor:
- ``("acme-on-demand", name)``: a handshake named C{name}, one label under a public wildcard route, which has no
  certificate: the supervisor's manager decides (and bounds) as it does for a single process.

A validation starts only once every live worker (starting ones included: they may accept before they read a later
message) acknowledged the challenge: the publication returns a Deferred that the issuer waits for
(labelgw.tls.acme_client). A worker that dies is not waited for (its replacement gets the answer in its
``acme-state``); one that does not answer within L{ACK_TIMEOUT} is named in the log and the validation goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from labelgw.tls.acme import AcmeManager, AlpnChallenge, wants_acme
from labelgw.tls.acme_store import AcmeCertificate
from labelgw.workers.protocol import Message, encode

# Seconds the supervisor waits for every worker to acknowledge a challenge before the validation goes on anyway.
ACK_TIMEOUT = 20.0
# Longest DNS name a worker may ask about (RFC 1035).
MAX_NAME = 253
# Names a worker remembers having asked for (a flood of random SNI names sends each at most once until then).
MAX_ASKED = 10_000


def _alpn_pems(challenge: AlpnChallenge) -> tuple[str, bytes, bytes]:
    return challenge.name, challenge.cert_pem, challenge.key_pem


class _Wait:
    __slots__ = ("waiting", "done", "timer", "what")

    def __init__(self, waiting: set[Any], done: Deferred[None], timer: IDelayedCall, what: str) -> None:
        self.waiting = waiting
        self.done = done
        self.timer = timer
        self.what = what


class AcmeRelay:
    """The supervisor's side: the manager's certificates and challenge answers pushed to every worker of the pool
    (labelgw.workers.supervisor.WorkerPool), and the workers' on-demand names passed to the manager."""

    _log = Logger()

    def __init__(self, pool: Any, manager: AcmeManager, clock: Any, ack_timeout: float = ACK_TIMEOUT) -> None:
        self.pool = pool
        self.manager = manager
        self.clock = clock
        self.ack_timeout = ack_timeout
        # The certificate object last pushed per name (a renewal is a new object).
        self._pushed: dict[str, AcmeCertificate] = {}
        self._waits: dict[int, _Wait] = {}
        self._hooked: set[Any] = set()
        self.on_demand_asked = 0

    def install(self) -> None:
        self.manager.relay = self
        self.manager.watch(self._changed)
        self.pool.on_started.append(self.send_state)
        self.pool.on_ack.append(self._acked)
        self.pool.handlers["acme-on-demand"] = self._on_demand

    # Supervisor -> workers.

    def send_state(self, process: Any) -> None:
        """Everything a new worker serves (before its state message: it accepts only after that)."""
        certificates = self.manager.held_certificates()
        for certificate in certificates:
            self._pushed[certificate.name] = certificate
        http01, alpn = self.manager.pending_challenges()
        process.send((
            "acme-state", self.pool._next_seq(),
            [(c.name, c.chain_pem, c.key_pem) for c in certificates],
            [_alpn_pems(challenge) for challenge in alpn],
            http01,
        ))

    def _changed(self, name: str) -> None:
        certificate = self.manager.held_certificate(name)
        if certificate is None or self._pushed.get(name) is certificate:
            return  # a challenge came or went (alpn() pushes those), or nothing new
        self._pushed[name] = certificate
        self.pool.broadcast("acme-cert", name, certificate.chain_pem, certificate.key_pem)
        self._log.info("ACME: certificate for {name} pushed to the workers", name=name)

    def http01(self, token: str, key_authorization: str | None) -> Deferred[None] | None:
        if key_authorization is None:
            self.pool.broadcast("acme-http01", token, None)
            return None
        return self._send_and_wait(("acme-http01", token, key_authorization), f"the HTTP-01 answer {token}")

    def alpn(self, name: str, challenge: AlpnChallenge | None) -> Deferred[None] | None:
        if challenge is None:
            self.pool.broadcast("acme-alpn", name, None, None)
            return None
        return self._send_and_wait(("acme-alpn", *_alpn_pems(challenge)), f"the TLS-ALPN-01 certificate of {name}")

    # Acknowledgements.

    def _send_and_wait(self, message: Message, what: str) -> Deferred[None]:
        """Send C{message} to every live worker; fires once each acknowledged it (or ended). The wait is in place
        before the first byte goes out, so no acknowledgement can come before it."""
        waiting = {p for p in self.pool.processes() if p.transport is not None}
        if not waiting:
            return succeed(None)
        seq = self.pool._next_seq()
        for process in waiting - self._hooked:
            self._hooked.add(process)
            process.ended.addBoth(self._ended, process)
        done: Deferred[None] = Deferred()
        timer = self.clock.callLater(self.ack_timeout, self._timed_out, seq)
        self._waits[seq] = _Wait(set(waiting), done, timer, what)
        data = encode((message[0], seq, *message[1:]))
        for process in waiting:
            if process.alive and process.transport is not None:
                process.transport.writeToChild(0, data)
        return done

    def _acked(self, process: Any, seq: int) -> None:
        wait = self._waits.get(seq)
        if wait is not None:
            wait.waiting.discard(process)
            self._settle(seq, wait)

    def _ended(self, result: Any, process: Any) -> Any:
        self._hooked.discard(process)
        for seq, wait in list(self._waits.items()):
            wait.waiting.discard(process)
            self._settle(seq, wait)
        return result

    def _settle(self, seq: int, wait: _Wait) -> None:
        if wait.waiting:
            return
        del self._waits[seq]
        if wait.timer.active():
            wait.timer.cancel()
        wait.done.callback(None)

    def _timed_out(self, seq: int) -> None:
        wait = self._waits.pop(seq, None)
        if wait is None:
            return
        self._log.warn(
            "ACME: workers {workers} did not acknowledge {what} within {timeout:g} s; validating anyway",
            workers=", ".join(str(p.id) for p in sorted(wait.waiting, key=lambda p: p.id)), what=wait.what,
            timeout=self.ack_timeout,
        )
        wait.done.callback(None)

    @property
    def pending(self) -> int:
        """Challenges some worker has not acknowledged yet."""
        return len(self._waits)

    def describe(self) -> dict[str, Any]:
        """GET /acme's "workers": the certificates pushed, the challenges awaiting acknowledgements (by whom)."""
        return {
            "certificates_pushed": sorted(self._pushed),
            "awaiting_acknowledgement": [
                {"challenge": wait.what, "workers": sorted(p.id for p in wait.waiting)} for wait in self._waits.values()
            ],
            "on_demand_asked": self.on_demand_asked,
        }

    # Workers -> supervisor.

    def _on_demand(self, process: Any, message: Message) -> None:
        name = message[1] if len(message) == 2 else None
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            self._log.warn("worker {worker}: ignoring a malformed acme-on-demand message", worker=process.id)
            return
        self.on_demand_asked += 1
        # The manager checks the name again (public, one label under a wildcard route here) and bounds it.
        self.manager.on_demand(name)


def _challenge_from_pems(name: str, cert_pem: bytes, key_pem: bytes) -> AlpnChallenge:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"a TLS-ALPN-01 key of type {type(key).__name__}")
    return AlpnChallenge(name, x509.load_pem_x509_certificate(cert_pem), key, cert_pem, key_pem)


class WorkerAcme:
    """The worker's side: the L{labelgw.tls.acme.AcmeSource} of its TLS engines and the HTTP-01 answers of its
    HTTP listeners (C{gateway.acme}), as the supervisor pushes them. Reactor thread only; every lookup is a dict's.

    C{wildcard_for(name)}: the public wildcard route host that serves C{name} (the worker's own route table), else
    None; C{send}: a message to the supervisor (set by the worker's link)."""

    _log = Logger()

    def __init__(self, clock: Any, wildcard_for: Callable[[str], str | None] = lambda name: None) -> None:
        self._clock = clock
        self._wildcard_for = wildcard_for
        self.send: Callable[[Message], None] = lambda message: None
        self._certificates: dict[str, tuple[AcmeCertificate, float]] = {}
        self._alpn: dict[str, AlpnChallenge] = {}
        self._http01: dict[str, bytes] = {}
        self._watchers: list[Callable[[str], None]] = []
        self._asked: set[str] = set()

    # AcmeSource.

    def certificate_for(self, name: str) -> AcmeCertificate | None:
        held = self._certificates.get(name)
        if held is None or held[1] <= self._clock.seconds():
            return None  # expired: the fallback is no worse (as in the supervisor's manager)
        return held[0]

    def alpn_challenge_for(self, name: str) -> AlpnChallenge | None:
        return self._alpn.get(name)

    def watch(self, changed: Callable[[str], None]) -> None:
        self._watchers.append(changed)

    def http01_answer(self, token: bytes) -> bytes | None:
        try:
            return self._http01.get(token.decode("ascii"))
        except UnicodeDecodeError:
            return None

    def on_demand(self, name: str) -> None:
        """A handshake for C{name} found no certificate: ask the supervisor when a public wildcard route serves it
        (once per name; the supervisor bounds the names per wildcard)."""
        if name in self._asked or not wants_acme(name) or self._wildcard_for(name) is None:
            return
        if len(self._asked) >= MAX_ASKED:
            self._asked.clear()
        self._asked.add(name)
        self.send(("acme-on-demand", name))

    # From the supervisor.

    def receive(self, message: Message) -> None:
        kind = message[0]
        if kind == "acme-state":
            _, _, certificates, alpn, http01 = message
            for name, chain_pem, key_pem in certificates:
                self._set_certificate(name, chain_pem, key_pem)
            for name, cert_pem, key_pem in alpn:
                self._set_alpn(name, cert_pem, key_pem)
            self._http01.update({token: value.encode("ascii") for token, value in http01.items()})
        elif kind == "acme-cert":
            _, _, name, chain_pem, key_pem = message
            self._set_certificate(name, chain_pem, key_pem)
        elif kind == "acme-alpn":
            _, _, name, cert_pem, key_pem = message
            self._set_alpn(name, cert_pem, key_pem)
        elif kind == "acme-http01":
            _, _, token, value = message
            if value is None:
                self._http01.pop(token, None)
            else:
                self._http01[token] = value.encode("ascii")
        else:
            self._log.warn("unknown ACME message {kind} from the supervisor", kind=kind)

    def _set_certificate(self, name: str, chain_pem: bytes | None, key_pem: bytes | None) -> None:
        if chain_pem is None or key_pem is None:
            self._certificates.pop(name, None)
        else:
            certificate = AcmeCertificate.from_pem(name, chain_pem, key_pem)
            self._certificates[name] = (certificate, certificate.not_after.timestamp())
            self._asked.discard(name)
        self._changed(name)

    def _set_alpn(self, name: str, cert_pem: bytes | None, key_pem: bytes | None) -> None:
        if cert_pem is None or key_pem is None:
            self._alpn.pop(name, None)
        else:
            self._alpn[name] = _challenge_from_pems(name, cert_pem, key_pem)
        self._changed(name)

    def _changed(self, name: str) -> None:
        for changed in self._watchers:
            try:
                changed(name)
            except Exception:
                self._log.failure("a watcher of ACME name {name}", name=name)

    def describe(self) -> dict[str, Any]:
        return {
            "certificates": sorted(self._certificates),
            "alpn_challenges": sorted(self._alpn),
            "http01_tokens": len(self._http01),
        }
