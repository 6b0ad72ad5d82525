"""The ACME protocol through the ``acme`` package (certbot's library), in the reactor's thread pool.

L{AcmeIssuer} is the L{labelgw.tls.acme.Issuer} of a running gateway. Each call runs its blocking work (HTTPS to
the ACME server, the disk) through C{run_in_thread}; the challenge answers are published on the reactor thread
(C{blockingCallFromThread}) before the server is told to validate, and withdrawn afterwards whatever happened.
Nothing here runs on the reactor thread except that publishing, so a slow or dead ACME server never delays a
handshake or a request.

The account key (EC P-256) is made on first use and kept in the state directory (labelgw.tls.acme_store); the
account is registered (or found again: same key, same account) once per run. Each certificate gets a fresh
EC P-256 key.
"""

from __future__ import annotations

import datetime as _dt
import functools
import threading
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from labelgw.tls.acme import HTTP_01, TLS_ALPN_01, AcmeFailure, ChallengeBoard, alpn_challenge
from labelgw.tls.acme_store import AcmeCertificate, AcmeStore

RunInThread = Callable[..., "Deferred[Any]"]
# How long one order may take from the challenge answer to the certificate (validation and finalisation).
ORDER_DEADLINE = 90.0
NETWORK_TIMEOUT = 30
# Seconds a worker waits for the reactor thread to publish or withdraw a challenge answer.
REACTOR_WAIT = 10.0
# Seconds it waits, beyond that, for a publication that is acknowledged later (the worker processes of --workers
# taking the answer: labelgw.workers.certs, which gives up on a silent worker sooner, ACK_TIMEOUT).
ACKNOWLEDGED_WAIT = 60.0
USER_AGENT = "labelgw (acme-python)"


class AcmeIssuer:
    """Orders certificates from one ACME server; see the module docstring."""

    _log = Logger()

    def __init__(
        self,
        *,
        reactor: Any,
        run_in_thread: RunInThread,
        store: AcmeStore,
        email: str | None,
        ca_bundle: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._run = run_in_thread
        self._store = store
        self._email = email
        self._ca_bundle = ca_bundle
        self._client: Any = None
        self._lock = threading.Lock()

    # --- Issuer ----------------------------------------------------------------------------------------------

    def issue(self, name: str, challenge: str, board: ChallengeBoard) -> Deferred[AcmeCertificate]:
        return self._run(self._issue, name, challenge, board)

    def renewal_hint(self, certificate: AcmeCertificate) -> Deferred[_dt.datetime | None]:
        hint: Deferred[_dt.datetime | None] = self._run(self._renewal_hint, certificate)
        # No hint is the normal case (a server without ARI, or one that is down): the usual schedule applies.
        hint.addErrback(lambda f: self._log.debug("ACME renewal information: {error}", error=f.getErrorMessage()))
        hint.addErrback(lambda _: None)
        return hint

    def load_stored(self) -> Deferred[list[AcmeCertificate]]:
        def load() -> list[AcmeCertificate]:
            found, problems = self._store.load_all()
            for problem in problems:
                self._log.warn("ACME: ignoring a stored certificate: {problem}", problem=problem)
            return found

        return self._run(load)

    # --- in a thread -----------------------------------------------------------------------------------------

    def _connect(self) -> Any:
        """The acme client with a registered account (blocking; once per run)."""
        with self._lock:
            if self._client is not None:
                return self._client
            import josepy as jose  # noqa: PLC0415 - only when ACME is used
            from acme import client, errors, messages  # noqa: PLC0415

            key = jose.JWKEC(key=self._store.account_key())
            net = client.ClientNetwork(
                key, alg=jose.ES256, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT,
                # A path: requests verifies the server against that bundle (--acme-ca-bundle) instead of certifi's.
                verify_ssl=self._ca_bundle or True,  # type: ignore[arg-type]
            )
            retry_after: dict[str, float] = {}
            net.session.hooks["response"].append(_remember_retry_after(retry_after))
            directory = client.ClientV2.get_directory(self._store.directory_url, net)
            acme_client = client.ClientV2(directory, net)
            registration = messages.NewRegistration.from_data(
                email=self._email or None, terms_of_service_agreed=True
            )
            try:
                account = acme_client.new_account(registration)
            except errors.ConflictError as existing:
                # This key has an account already: use it.
                account = acme_client.query_registration(messages.RegistrationResource(uri=existing.location))
            net.account = account
            self._store.save_account_url(account.uri)
            self._retry_after = retry_after
            self._client = acme_client
            return acme_client

    def _issue(self, name: str, challenge: str, board: ChallengeBoard) -> AcmeCertificate:
        try:
            return self._issue_or_raise(name, challenge, board)
        except AcmeFailure:
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes a reason and a retry
            if _account_gone(error):
                # The server forgot the account (a test server restarted, an account deactivated): register
                # again at the next attempt.
                self._client = None
            raise AcmeFailure(_describe(error), self._take_retry_after()) from error

    def _issue_or_raise(self, name: str, challenge: str, board: ChallengeBoard) -> AcmeCertificate:
        acme_client = self._connect()
        self._take_retry_after()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        order = acme_client.new_order(_csr(name, key))
        account_key = acme_client.net.key
        published: list[Callable[[], None]] = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status.name == "valid":
                    continue  # validated recently for this account: nothing to answer
                body = _find_challenge(authorization, challenge)
                if challenge == HTTP_01:
                    response, validation = body.chall.response_and_validation(account_key)
                    token = body.chall.encode("token")
                    self._on_reactor(board.publish_http01, token, validation)
                    published.append(functools.partial(board.withdraw_http01, token))
                else:
                    token = body.chall.jobj["token"]
                    key_authorization = f"{token}.{_thumbprint(account_key)}"
                    material = alpn_challenge(name, key_authorization, _dt.datetime.now(_dt.UTC))
                    self._on_reactor(board.publish_alpn, material)
                    published.append(functools.partial(board.withdraw_alpn, name))
                    response = _tls_alpn_response()
                acme_client.answer_challenge(body, response)
            deadline = _dt.datetime.now() + _dt.timedelta(seconds=ORDER_DEADLINE)
            order = acme_client.poll_and_finalize(order, deadline)
        finally:
            for withdraw in published:
                self._on_reactor(withdraw)
        certificate = AcmeCertificate.from_pem(name, order.fullchain_pem.encode("ascii"), key_pem)
        self._store.save(certificate)
        return certificate

    def _renewal_hint(self, certificate: AcmeCertificate) -> _dt.datetime | None:
        acme_client = self._connect()
        if "renewalInfo" not in acme_client.directory:
            return None
        when, _ = acme_client.renewal_time(certificate.chain[0].public_bytes(serialization.Encoding.PEM))
        if when is not None and when.tzinfo is None:
            when = when.astimezone(_dt.UTC)
        return when  # type: ignore[no-any-return]

    def _on_reactor(self, f: Callable[..., Any], *args: Any) -> None:
        """Run C{f} on the reactor thread and wait for it, a bounded time: a reactor that stopped meanwhile must not
        leave this worker thread (and the thread pool's shutdown) waiting for ever."""
        done = threading.Event()
        acknowledged = threading.Event()
        errors: list[BaseException] = []

        def call() -> None:
            try:
                result = f(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the worker thread
                errors.append(error)
                result = None
            finally:
                done.set()
            if isinstance(result, Deferred):
                # In place once acknowledged (every worker process has it): the validation may start then.
                result.addErrback(lambda failure: errors.append(failure.value))
                result.addBoth(lambda _: acknowledged.set())
            else:
                acknowledged.set()

        self._reactor.callFromThread(call)
        if not done.wait(REACTOR_WAIT) or not acknowledged.wait(ACKNOWLEDGED_WAIT):
            raise AcmeFailure("the gateway is stopping")
        if errors:
            raise errors[0]

    def _take_retry_after(self) -> float | None:
        seen = getattr(self, "_retry_after", None)
        return seen.pop("seconds", None) if seen is not None else None


def _challenge_response_class() -> type:
    from acme import challenges  # noqa: PLC0415

    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        """The (empty) answer to a tls-alpn-01 challenge; the acme package has no class for it any more."""

        typ = TLS_ALPN_01

    return TLSALPN01Response


def _tls_alpn_response() -> Any:
    """Built lazily: the acme package is imported only when ACME is used."""
    global _RESPONSE_CLASS
    if _RESPONSE_CLASS is None:
        _RESPONSE_CLASS = _challenge_response_class()
    return _RESPONSE_CLASS(key_authorization="")


_RESPONSE_CLASS: type | None = None


def _find_challenge(authorization: Any, kind: str) -> Any:
    offered = []
    for body in authorization.body.challenges:
        typ = body.to_partial_json().get("type")
        offered.append(typ)
        if typ == kind:
            return body
    raise AcmeFailure(
        f"the server offers no {kind} challenge for {authorization.body.identifier.value} (offered: "
        f"{', '.join(str(t) for t in offered)})"
    )


def _thumbprint(account_key: Any) -> str:
    import josepy as jose  # noqa: PLC0415

    return jose.b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode("ascii")


def _csr(name: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def _remember_retry_after(seen: dict[str, float]) -> Callable[..., Any]:
    """A requests hook: the Retry-After (seconds or HTTP date) of the last error response, for the backoff."""

    def hook(response: Any, *args: Any, **kwargs: Any) -> Any:
        value = response.headers.get("Retry-After") if response.status_code >= 400 else None
        if value:
            seconds = _retry_after_seconds(value)
            if seconds is not None:
                seen["seconds"] = seconds
        return response

    return hook


def _retry_after_seconds(value: str, now: _dt.datetime | None = None) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime  # noqa: PLC0415

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return max(0.0, (when - (now or _dt.datetime.now(_dt.UTC))).total_seconds())


def _describe(error: BaseException) -> str:
    """One line for the log and the admin view: the ACME problem's type and detail, or the error's text."""
    from acme import errors, messages  # noqa: PLC0415

    if isinstance(error, errors.ValidationError):
        details = []
        for authorization in error.failed_authzrs:
            for body in authorization.body.challenges:
                if body.error is not None:
                    details.append(f"{body.to_partial_json().get('type')}: {_problem(body.error)}")
        return "validation failed: " + ("; ".join(details) or "no detail")
    if isinstance(error, messages.Error):
        return _problem(error)
    if isinstance(error, errors.TimeoutError):
        return "the order did not complete in time"
    text = str(error).splitlines()[0] if str(error) else ""
    # requests' connection errors nest the reason several levels deep; the innermost text says it best.
    cause = error.__context__ or error.__cause__
    while cause is not None and (cause.__context__ or cause.__cause__) is not None:
        cause = cause.__context__ or cause.__cause__
    if cause is not None and str(cause):
        text = str(cause).splitlines()[0]
    return f"{type(error).__name__}: {text}"[:300]


def _account_gone(error: BaseException) -> bool:
    from acme import messages  # noqa: PLC0415

    return isinstance(error, messages.Error) and error.code in ("accountDoesNotExist", "unauthorized")


def _problem(problem: Any) -> str:
    code = getattr(problem, "code", None) or getattr(problem, "typ", "error")
    detail = getattr(problem, "detail", None) or ""
    return f"{code}: {detail}" if detail else str(code)
