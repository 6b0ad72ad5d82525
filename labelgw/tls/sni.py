"""Certificate choice during the handshake: what an ``--https`` listener plugs into Twisted.

For the SNI name a client sends, L{SNIContextSelector} picks, in order:
    1. a user certificate from ``--cert-dir`` (exact name, then a one-label wildcard);
    1b. an ACME certificate of a public name (``--acme-email``; labelgw.tls.acme), or its pending TLS-ALPN-01
       challenge certificate (labelgw.tls.acme_openssl);
    2. a leaf minted by the local CA, when the name is routed (exactly, or one label under a wildcard route:
       a leaf per concrete name, never a wildcard leaf) or local (localhost, ``*.localhost``, loopback IPs) and the CA's name constraints allow it (local zones only: a routed public or single-label name
       is not minted, one log line per name says why, and the handshake goes on to 3);
    3. the default certificate: ``default.pem`` from the cert dir, else a minted leaf for localhost,
       127.0.0.1 and ::1; with ``strict=True`` the handshake is refused instead (a handshake_failure alert).
A client that sends no SNI (``curl https://127.0.0.1:8443/``) gets the default certificate, or, when
strict, the refusal too.

The handshake path never touches the disk. Minting a leaf (EC P-256 key, certificate signed by the CA,
server context) takes 0.4-0.8 ms of CPU, about half of what the handshake costs anyway, so a leaf for a new
name is minted inline in the SNI callback; only the write to the disk cache happens in a thread afterwards.
Leaves are cached in memory (LRU, C{max_minted} names) and renewed when less than a day is left. Only names
routed exactly (and the default leaf) are written to disk, so random ``*.localhost`` names, or random names under
a wildcard route, cannot fill it.

Every connection starts on a certificate-less dispatch context whose servername callback (which OpenSSL
runs with or without SNI) switches it to the chosen context. Twisted's C{CertificateOptions(
contextForServerName=...)} does the same switch, but its first context forces server cipher preference and
a single ECDH curve (P-256, no X25519), and OpenSSL keeps the first context's groups after the switch; so
all contexts here come from L{build_server_context} with one policy. ALPN is per listener: the listener's
factory decides when it provides C{IProtocolNegotiationFactory}, else the policy's list (http/1.1 until the
proxy serves HTTP/2, then h2 and http/1.1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from labelgw.tls.acme_openssl import AcmeContexts
from labelgw.tls.ca import DEFAULT_LEAF_NAMES, LEAF_RENEW_BEFORE, LeafMaterial, LocalCA, forbidden_reason
from labelgw.tls.certdir import CertIndex, RunInThread, UserCertificate
from labelgw.tls.material import CertificateMaterial, Served
from labelgw.tls.policy import INTERMEDIATE, TLSPolicy, build_server_context, is_local_name, normalize_server_name

MAX_MINTED = 1000


class CertIndexSource(Protocol):
    """Anything with a current L{CertIndex}, such as L{labelgw.tls.certdir.CertDirectory}."""

    @property
    def index(self) -> CertIndex: ...

    @property
    def policy(self) -> TLSPolicy: ...


@dataclass(frozen=True, slots=True)
class _Minted:
    leaf: LeafMaterial
    context: SSL.Context
    material: CertificateMaterial
    # POSIX time until which the leaf is served (LeafMaterial.fresh_at), compared with the clock per handshake.
    fresh_until: float


def _minted(policy: TLSPolicy, leaf: LeafMaterial) -> _Minted:
    context = build_server_context(policy, leaf.certificate, leaf.private_key)
    fresh_until = (leaf.not_after - LEAF_RENEW_BEFORE).timestamp()
    return _Minted(leaf, context, CertificateMaterial(leaf.certificate, leaf.private_key), fresh_until)


@implementer(IOpenSSLServerConnectionCreator)
class SNIContextSelector:
    """Chooses the server context per handshake; pass it to C{TLSMemoryBIOFactory} or C{SSL4ServerEndpoint}.

    Use it on the reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        is_routed: Callable[[str], bool],
        local_ca: LocalCA | None = None,
        cert_dir: CertIndexSource | None = None,
        strict: bool = False,
        policy: TLSPolicy = INTERMEDIATE,
        max_minted: int = MAX_MINTED,
        acme: AcmeContexts | None = None,
        is_exact_routed: Callable[[str], bool] | None = None,
    ) -> None:
        if cert_dir is not None and cert_dir.policy != policy:
            # OpenSSL mixes settings of the first and the switched-to context: they must agree.
            raise ValueError("the cert dir's contexts were built with another TLSPolicy than the selector's")
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._is_routed = is_routed
        # Names whose minted leaf is written to disk: routed by their own name, not only by a wildcard, so that
        # random names under a wildcard route (minted and kept in memory, LRU) cannot fill the disk.
        self._is_exact_routed = is_routed if is_exact_routed is None else is_exact_routed
        self._ca = local_ca
        self._cert_dir = cert_dir
        self._strict = strict
        self._policy = policy
        self._max_minted = max_minted
        # ACME certificates of public names, and pending TLS-ALPN-01 validations (labelgw.tls.acme_openssl).
        self._acme = acme
        self._minted: OrderedDict[str, _Minted] = OrderedDict()
        # Leaves minted since start (for /metrics).
        self.minted = 0
        self._default_minted: _Minted | None = None
        self._writing: set[tuple[str, ...]] = set()
        # Names already logged as forbidden by the CA's constraints (bounded like the leaves): one line each.
        self._refused: OrderedDict[str, None] = OrderedDict()
        # No certificate at all: a handshake switched to it fails with a handshake_failure alert.
        self._reject_context = build_server_context(policy, None, None)
        # Every connection starts here; the servername callback (which OpenSSL runs with or without SNI)
        # switches it to the chosen context before any certificate is sent.
        self._dispatch_context = build_server_context(policy, None, None)
        self._dispatch_context.set_tlsext_servername_callback(self._on_server_name)

    @property
    def policy(self) -> TLSPolicy:
        return self._policy

    # --- IOpenSSLServerConnectionCreator -------------------------------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._dispatch_context, None)

    # --- start-up ---------------------------------------------------------------------------------------------

    def load_cached_leaves(self) -> Deferred[None]:
        """Fill the in-memory cache from the disk cache, in a thread; optional (minting is cheap). Never fails."""
        if self._ca is None:
            return defer.succeed(None)
        ca, policy, now = self._ca, self._policy, self._now()

        def load() -> list[_Minted]:
            return [
                _minted(policy, leaf)
                for leaf in ca.load_cached_leaves(now)
            ]

        loading: Deferred[Any] = self._run_in_thread(load)
        loading.addCallback(self._adopt_cached)
        loading.addErrback(lambda f: self._log.failure("loading cached leaf certificates", failure=f))
        return loading

    def _adopt_cached(self, cached: list[_Minted]) -> None:
        for minted in cached:
            if minted.leaf.names == DEFAULT_LEAF_NAMES:
                if self._default_minted is None:
                    self._default_minted = minted
            elif len(minted.leaf.names) == 1 and minted.leaf.names[0] not in self._minted:
                self._remember(minted.leaf.names[0], minted)
        self._log.info("loaded {count} cached leaf certificates", count=len(cached))

    # --- the handshake path (reactor thread, no I/O) ----------------------------------------------------------

    def _on_server_name(self, connection: SSL.Connection) -> None:
        try:
            context = self.context_for(connection.get_servername())
        except Exception:
            self._log.failure("choosing a certificate for SNI {name!r}", name=connection.get_servername())
            context = self._reject_context
        connection.set_context(context)

    def context_for(self, server_name: bytes | str | None) -> SSL.Context:
        """pyOpenSSL's context for a handshake naming C{server_name} (None: the client sent no SNI)."""
        chosen = self.choose(server_name)
        context = chosen.context if chosen is not None else None
        return self._reject_context if context is None else context

    def choose(self, server_name: bytes | str | None) -> Served | None:
        """The certificate for a handshake naming C{server_name}, or None to refuse it; for any TLS engine.

        The one place where certificate sources are ranked (a new source, such as ACME, adds its lookup here);
        each engine turns the choice into its own context: pyOpenSSL's C{.context}, the standard library's from
        C{.material} (labelgw.tls.stdtls).
        """
        name = normalize_server_name(server_name)
        if name is not None:
            user = self._cert_dir.index.lookup(name) if self._cert_dir is not None else None
            if user is not None:
                return user
            if self._acme is not None:
                # Only a pending TLS-ALPN-01 challenge and no certificate yet: an engine that serves the challenge
                # apart (stdlib) gives other clients what they would get without ACME, the local choice.
                acme = self._acme.served_for(name, lambda: self._local_choice(name))
                if acme is not None:
                    return acme
        return self._local_choice(name)

    def _local_choice(self, name: str | None) -> UserCertificate | _Minted | None:
        """Without a user or ACME certificate: a minted leaf, else the default (or None when strict)."""
        if name is not None and self._ca is not None and (is_local_name(name) or self._is_routed(name)):
            minted = self._minted_choice(name)
            if minted is not None:
                return minted
        if self._strict:
            return None
        return self._default_choice()

    def _log_forbidden(self, name: str) -> None:
        if name in self._refused:
            return
        self._refused[name] = None
        while len(self._refused) > self._max_minted:
            self._refused.popitem(last=False)
        self._log.warn(
            "no minted certificate for {name}: the local CA's name constraints forbid it ({reason}); "
            "{fallback}",
            name=name,
            reason=forbidden_reason(name),
            fallback="refusing the handshake (--tls-strict)" if self._strict else "serving the default certificate",
        )

    def _default_choice(self) -> UserCertificate | _Minted | None:
        default = self._cert_dir.index.default if self._cert_dir is not None else None
        if default is not None:
            return default
        # Without a CA or a default file there is no certificate to offer.
        return self._default_minted_choice()

    def _default_minted_choice(self) -> _Minted | None:
        if self._ca is None:
            return None
        default = self._default_minted
        if default is not None and self._clock.seconds() < default.fresh_until:
            return default
        now = self._now()
        if default is None or not default.leaf.fresh_at(now):
            minted = self._mint(DEFAULT_LEAF_NAMES, now)
            if minted is None:
                return None
            self._default_minted = minted
            self._persist(minted.leaf)
        return self._default_minted

    def _minted_choice(self, name: str) -> _Minted | None:
        if name in DEFAULT_LEAF_NAMES:
            return self._default_minted_choice()
        cached = self._minted.get(name)
        if cached is not None and self._clock.seconds() < cached.fresh_until:
            self._minted.move_to_end(name)
            return cached
        now = self._now()
        # Checked when minting only: a cached leaf was permitted when it was minted.
        if self._ca is not None and not self._ca.permits(name):
            self._log_forbidden(name)
            return None
        minted = self._mint((name,), now)
        if minted is None:
            return None
        self._remember(name, minted)
        if self._is_exact_routed(name):
            self._persist(minted.leaf)
        return minted

    def _mint(self, names: tuple[str, ...], now: datetime) -> _Minted | None:
        assert self._ca is not None
        try:
            leaf = self._ca.issue_leaf(names, now)
            minted = _minted(self._policy, leaf)
            self.minted += 1
            return minted
        except Exception:
            self._log.failure("minting a certificate for {names}", names=", ".join(names))
            return None

    def _remember(self, name: str, minted: _Minted) -> None:
        self._minted[name] = minted
        self._minted.move_to_end(name)
        while len(self._minted) > self._max_minted:
            self._minted.popitem(last=False)

    def _persist(self, leaf: LeafMaterial) -> None:
        if self._ca is None or leaf.names in self._writing:
            return
        self._writing.add(leaf.names)
        writing: Deferred[Any] = self._run_in_thread(self._ca.store_leaf, leaf)
        writing.addErrback(self._persist_failed, leaf.names)
        writing.addBoth(lambda _: self._writing.discard(leaf.names))

    def _persist_failed(self, failure: Failure, names: tuple[str, ...]) -> None:
        self._log.warn(
            "could not cache the certificate for {names} on disk ({error}); it is still served from memory",
            names=", ".join(names),
            error=failure.getErrorMessage(),
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)
