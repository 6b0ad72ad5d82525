"""TLS server policy (Mozilla "intermediate") and the server-name rules shared by the TLS modules.

Every server context labelgw creates comes from L{build_server_context} with one L{TLSPolicy}. That matters:
after the SNI callback switches a connection to another context, OpenSSL takes some settings from the first
context (groups) and others from the new one (ciphers, ALPN), so all contexts must agree.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolNegotiationFactory

from labelgw.core.model import normalize_name

# Mozilla Server Side TLS "intermediate" (guidelines 5.7), minus the DHE suites: ECDHE key exchange with an
# AEAD cipher only, so no RSA key exchange and no CBC. Order is irrelevant with the client choosing.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
GROUPS = "X25519:P-256:P-384"
# ALPN for a listener whose protocol factory does not say what it speaks (IProtocolNegotiationFactory). The
# gateway's HTTPS factory does (labelgw.http.h2.negotiating_factory: h2 and http/1.1) and that list wins.
ALPN_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """What every labelgw server context allows. The default is Mozilla intermediate."""

    tls12_ciphers: str = TLS12_CIPHERS
    tls13_ciphersuites: str = TLS13_CIPHERSUITES
    groups: str = GROUPS
    # Server preference order, used when the listener's factory does not say (IProtocolNegotiationFactory,
    # as twisted.web's Site does). A client offering none of them still connects, without ALPN.
    alpn_protocols: tuple[bytes, ...] = ALPN_PROTOCOLS


INTERMEDIATE = TLSPolicy()

# The key types OpenSSL can serve a certificate with.
ServerPrivateKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
SERVER_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


def build_server_context(
    policy: TLSPolicy,
    certificate: x509.Certificate | None,
    private_key: ServerPrivateKey | None,
    chain: Sequence[x509.Certificate] = (),
) -> SSL.Context:
    """A server context for one certificate, or with no certificate (a dispatch or reject context).

    CPU only, no I/O: safe to call on the reactor thread.

    @raise SSL.Error: OpenSSL refused the key or certificate (for example a key that does not match, or an RSA
        key below OpenSSL's security level).
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # No OP_CIPHER_SERVER_PREFERENCE: every offered suite is strong, so the client may pick (ChaCha20 on
    # devices without AES hardware), as Mozilla intermediate says. No tickets and no session cache:
    # tickets encrypted under a key that never rotates would defeat forward secrecy.
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_cipher_list(policy.tls12_ciphers.encode("ascii"))
    ctx.set_tls13_ciphersuites(policy.tls13_ciphersuites.encode("ascii"))
    _set_groups(ctx, policy.groups)
    _set_alpn(ctx, policy.alpn_protocols)
    if certificate is not None and private_key is not None:
        ctx.use_certificate(certificate)
        ctx.use_privatekey(private_key)
        for extra in chain:
            ctx.add_extra_chain_cert(extra)
        ctx.check_privatekey()
    return ctx


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    # pyOpenSSL only exposes set_tmp_ecdh (one curve, which would drop X25519); the groups list needs the
    # binding underneath. Without it OpenSSL's defaults apply, which are all strong groups too.
    from OpenSSL._util import lib  # noqa: PLC0415 - private binding, kept in one place

    set_list = getattr(lib, "SSL_CTX_set1_groups_list", None) or getattr(lib, "SSL_CTX_set1_curves_list", None)
    if set_list is None:
        return
    if set_list(ctx._context, groups.encode("ascii")) != 1:  # noqa: SLF001
        raise ValueError(f"OpenSSL refused the TLS groups {groups!r}")


def _set_alpn(ctx: SSL.Context, default: tuple[bytes, ...]) -> None:
    def select(connection: SSL.Connection, client_protocols: list[bytes]) -> Any:
        for protocol in listener_protocols(connection) or default:
            if protocol in client_protocols:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    ctx.set_alpn_select_callback(select)


def listener_protocols(connection: SSL.Connection) -> tuple[bytes, ...] | None:
    """The ALPN protocols the listener's own factory speaks, when it says (IProtocolNegotiationFactory).

    One certificate context serves every listener, so what a listener speaks is asked per connection: the
    application data is Twisted's TLSMemoryBIOProtocol, whose factory wraps the listener's.
    """
    tls_protocol = connection.get_app_data()
    wrapped = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
    negotiation = IProtocolNegotiationFactory(wrapped, None)
    return tuple(negotiation.acceptableProtocols()) if negotiation is not None else None


# --- server names ------------------------------------------------------------------------------------------

# A DNS label as clients really send them: letters, digits, hyphen, and underscore (Docker service names); a name
# is labels joined by dots, matched in one pass (no label holds a dot, so the match never backtracks across one).
_LABEL_PATTERN = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL_PATTERN}\.)*{_LABEL_PATTERN}\Z")


def normalize_server_name(raw: bytes | str | None) -> str | None:
    """An SNI value or certificate name in canonical form: lower-case, no trailing dot, IPs compressed.

    Returns None for anything that is not a plausible host name or IP literal, so callers never build file
    names or cache keys from hostile input.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = normalize_name(raw)
    ip = ip_literal(name)
    if ip is not None:
        return ip
    if not name or len(name) > 253:
        return None
    return name if _NAME.match(name) else None


def ip_literal(name: str) -> str | None:
    """The compressed form of an IP literal (brackets allowed for IPv6), or None for a DNS name."""
    # Every handshake with SNI asks: a DNS name is told apart without parsing (an IPv4 literal ends in a digit, an
    # IPv6 one has a colon), since a failed parse costs an exception.
    if ":" not in name and not name[-1:].isdigit():
        return None
    try:
        return ipaddress.ip_address(name.strip("[]")).compressed
    except ValueError:
        return None


def wildcard_parent(name: str) -> str | None:
    """The domain a one-label wildcard must name to cover C{name}: "a.example.test" -> "example.test".

    "*.example.test" covers exactly one label, so neither "example.test" nor "a.b.example.test" match.
    """
    if ip_literal(name) is not None:
        return None
    first, dot, parent = name.partition(".")
    if not dot or not first or not parent:
        return None
    return parent


def is_local_name(name: str) -> bool:
    """localhost, anything under .localhost (RFC 6761: always loopback), and loopback IPs."""
    ip = ip_literal(name)
    if ip is not None:
        return ipaddress.ip_address(ip).is_loopback
    return name == "localhost" or name.endswith(".localhost")
