"""Helpers for the tests/test_tls_*.py modules (no tests here): certificates, threads, in-memory handshakes.

The handshake helper drives a real TLS handshake without sockets: the server side is Twisted's
TLSMemoryBIOProtocol with the connection creator under test on a StringTransport, the client side is the
standard library's ``ssl`` (the system OpenSSL, not the one bundled with pyOpenSSL) over memory BIOs.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory


def real_time_clock() -> Clock:
    """A task.Clock at the current wall time: the stdlib client checks validity against the real clock."""
    clock = Clock()
    clock.advance(time.time())
    return clock


def clock_now(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.seconds(), UTC)


class InlineThreads:
    """Stand-in for deferToThreadPool: runs the call at once, or holds it until release() when paused."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.paused = False
        self._held: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append(getattr(f, "__name__", repr(f)))
        if not self.paused:
            return defer.maybeDeferred(f, *args, **kwargs)
        d: Deferred[Any] = Deferred()
        self._held.append((d, f, args, kwargs))
        return d

    @property
    def held(self) -> int:
        return len(self._held)

    def release(self) -> None:
        held, self._held = self._held, []
        for d, f, args, kwargs in held:
            defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)


# --- certificates for user certificate directories ----------------------------------------------------------


@dataclass(frozen=True)
class UserIssuer:
    """A throw-away CA for 'user' certificates (what a company CA or mkcert would have issued)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "test user CA") -> UserIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        names: Sequence[str],
        *,
        rsa_key: bool = False,
        not_after: datetime | None = None,
        with_san: bool = True,
        common_name: str | None = None,
    ) -> tuple[x509.Certificate, Any]:
        key: Any = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(not_after or now + timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if with_san:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def replace_file(path: Path, data: bytes) -> None:
    """Write like certbot or a Kubernetes secret update: a new file renamed over the old one (new inode)."""
    temp = path.with_name(f".{path.name}.new")
    temp.write_bytes(data)
    temp.replace(path)


# --- in-memory handshakes -----------------------------------------------------------------------------------


@dataclass
class Handshake:
    ok: bool
    error: str | None
    version: str | None
    cipher: str | None
    client_alpn: str | None
    server_alpn: bytes | None
    certificate: x509.Certificate | None

    @property
    def names(self) -> set[str]:
        assert self.certificate is not None, self.error
        san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
            str(ip) for ip in san.get_values_for_type(x509.IPAddress)
        }


def handshake(
    creator: Any,
    server_hostname: str | None = None,
    *,
    cadata: bytes | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: Sequence[str] | None = None,
    curve: str | None = None,
    listener_factory: Factory | None = None,
) -> Handshake:
    """One handshake of a stdlib ssl client against C{creator} (an IOpenSSLServerConnectionCreator).

    With C{cadata} the client verifies the chain and the host name like a browser would.
    """
    clock = Clock()
    wrapped = listener_factory or Factory.forProtocol(Protocol)
    factory = TLSMemoryBIOFactory(creator, False, wrapped, clock=clock)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40443))
    transport = StringTransport()
    server.makeConnection(transport)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cadata is not None:
        context.load_verify_locations(cadata=cadata.decode("ascii"))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 / 1.1, on purpose
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    if curve is not None:
        context.set_ecdh_curve(curve)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)

    error: str | None = None
    done = False
    for _ in range(20):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            error = f"{e.reason or e}"
        sent = outgoing.read()
        if sent:
            server.dataReceived(sent)
            clock.advance(0)
        reply = transport.value()
        transport.clear()
        if reply:
            incoming.write(reply)
        if error is not None or (done and not sent and not reply):
            break
        if not sent and not reply:
            error = error or "handshake stalled"
            break
    der = client.getpeercert(binary_form=True) if done else None
    return Handshake(
        ok=done and error is None,
        error=error,
        version=client.version() if done else None,
        cipher=client.cipher()[0] if done else None,  # type: ignore[index]
        client_alpn=client.selected_alpn_protocol() if done else None,
        server_alpn=server.negotiatedProtocol if done else None,
        certificate=x509.load_der_x509_certificate(der) if der else None,
    )
