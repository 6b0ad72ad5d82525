"""The ACME source (labelgw.tls.acme.AcmeSource) as pyOpenSSL contexts, for labelgw.tls.sni.

One server context per ACME certificate, built once per certificate (a renewal builds the next one), from
L{build_server_context} with the listener's policy like every other context.

TLS-ALPN-01 and the order of OpenSSL's callbacks: the servername callback (where the certificate is chosen)
runs before ALPN is selected, so it cannot tell the validation server's handshake (ALPN offer ``acme-tls/1``)
from a browser's. While a TLS-ALPN-01 validation of a name is pending (a few seconds per order), handshakes for
that name go to a challenge context: it holds the challenge certificate, and its ALPN callback picks
``acme-tls/1`` when offered. Any other client in that window is switched back in the ALPN callback: it gets the
name's current ACME certificate (a renewal: the certificate is replaced in place, same key type, which works in
TLS 1.2 and 1.3 because OpenSSL sends the certificate after ALPN), or, for a name with no ACME certificate yet,
the challenge certificate, which it would not have trusted anyway (the fallback certificate does not name a
public host either). No other name and no other time is affected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from labelgw.tls.acme import ACME_TLS_ALPN, AcmeSource, AlpnChallenge
from labelgw.tls.acme_store import AcmeCertificate
from labelgw.tls.material import CertificateMaterial, Served
from labelgw.tls.policy import TLSPolicy, build_server_context, listener_protocols


class AcmeServed:
    """What the SNI selector hands a TLS engine for an ACME name (labelgw.tls.material.Served): pyOpenSSL's
    context (the challenge switch included) or the standard library's material, each made only when asked."""

    __slots__ = ("_contexts", "_name", "_material", "_fallback")

    def __init__(
        self, contexts: "AcmeContexts", name: str, material: CertificateMaterial | None,
        fallback: Callable[[], Served | None],
    ) -> None:
        self._contexts = contexts
        self._name = name
        self._material = material
        self._fallback = fallback

    @property
    def context(self) -> SSL.Context | None:
        # None only if the certificate and the challenge both went since served_for, in the same handshake.
        return self._contexts.context_for(self._name)

    @property
    def material(self) -> CertificateMaterial | None:
        if self._material is not None:
            return self._material
        # No certificate yet, only a pending challenge, which the stdlib engine serves apart (challenge_material).
        chosen = self._fallback()
        return chosen.material if chosen is not None else None


class AcmeContexts:
    """Server contexts of the ACME certificates and pending TLS-ALPN-01 challenges. Reactor thread only."""

    def __init__(
        self, source: AcmeSource, policy: TLSPolicy, on_miss: Callable[[str], None] | None = None
    ) -> None:
        self._source = source
        self._policy = policy
        # Told of every name a handshake asks for that has no ACME certificate yet: the manager's on-demand names
        # under a wildcard route (labelgw.tls.acme.AcmeManager.on_demand).
        self._on_miss = on_miss
        self._contexts: dict[str, tuple[AcmeCertificate, SSL.Context]] = {}
        self._challenges: dict[str, tuple[AlpnChallenge, AcmeCertificate | None, SSL.Context]] = {}
        # The engine-independent forms, one per certificate or challenge object (engines cache contexts by them).
        self._materials: dict[str, tuple[AcmeCertificate, CertificateMaterial]] = {}
        self._challenge_materials: dict[str, tuple[AlpnChallenge, CertificateMaterial]] = {}

    def served_for(self, name: str, fallback: Callable[[], Served | None]) -> AcmeServed | None:
        """For the SNI selector: C{name}'s ACME certificate or pending challenge; None: neither."""
        certificate = self._source.certificate_for(name)
        if certificate is None:
            self._materials.pop(name, None)
            if self._source.alpn_challenge_for(name) is None:
                if self._on_miss is not None:
                    self._on_miss(name)
                return None
            return AcmeServed(self, name, None, fallback)
        cached = self._materials.get(name)
        if cached is None or cached[0] is not certificate:
            material = CertificateMaterial(certificate.chain[0], certificate.private_key, certificate.chain[1:])
            cached = self._materials[name] = (certificate, material)
        return AcmeServed(self, name, cached[1], fallback)

    def challenge_material(self, name: str) -> CertificateMaterial | None:
        """The stdlib engine's TLS-ALPN-01 hook (labelgw.tls.stdtls.ChallengeSource), for a client offering
        C{acme-tls/1}: the challenge certificate while a validation of C{name} is pending."""
        challenge = self._source.alpn_challenge_for(name)
        if challenge is None:
            self._challenge_materials.pop(name, None)
            return None
        cached = self._challenge_materials.get(name)
        if cached is None or cached[0] is not challenge:
            cached = self._challenge_materials[name] = (
                challenge, CertificateMaterial(challenge.certificate, challenge.private_key)
            )
        return cached[1]

    def context_for(self, name: str) -> SSL.Context | None:
        """The context of C{name}'s ACME certificate, or of its pending TLS-ALPN-01 challenge; None: neither."""
        certificate = self._source.certificate_for(name)
        challenge = self._source.alpn_challenge_for(name)
        if challenge is not None:
            return self._challenge_context(name, challenge, certificate)
        self._challenges.pop(name, None)
        if certificate is None:
            self._contexts.pop(name, None)
            return None
        cached = self._contexts.get(name)
        if cached is not None and cached[0] is certificate:
            return cached[1]
        context = build_server_context(
            self._policy, certificate.certificate, certificate.private_key, certificate.chain[1:]
        )
        self._contexts[name] = (certificate, context)
        return context

    def _challenge_context(
        self, name: str, challenge: AlpnChallenge, current: AcmeCertificate | None
    ) -> SSL.Context:
        cached = self._challenges.get(name)
        if cached is not None and cached[0] is challenge and cached[1] is current:
            return cached[2]
        # The current chain's intermediates ride along: a client switched back in the ALPN callback needs them, and
        # the validation server reads only the first certificate.
        chain = current.chain[1:] if current is not None else ()
        context = build_server_context(self._policy, challenge.certificate, challenge.private_key, chain)
        default = self._policy.alpn_protocols

        def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
            if ACME_TLS_ALPN in offered:
                return ACME_TLS_ALPN
            if current is not None:
                # Not the validation server: it gets the certificate it would get without the pending challenge.
                connection.use_certificate(current.certificate)
                connection.use_privatekey(current.private_key)
            for protocol in listener_protocols(connection) or default:
                if protocol in offered:
                    return protocol
            return SSL.NO_OVERLAPPING_PROTOCOLS

        context.set_alpn_select_callback(select)
        self._challenges[name] = (challenge, current, context)
        return context
