"""Certificate material as both TLS engines use it: a leaf, its key and its chain, as objects.

The choice of material for a server name (L{labelgw.tls.sni.SNIContextSelector.choose}) is engine-independent;
each engine turns the chosen material into a context of its own kind and keeps it as long as the material lives:
pyOpenSSL's C{SSL.Context} (L{labelgw.tls.policy.build_server_context}) or the standard library's
C{ssl.SSLContext} (L{labelgw.tls.stdtls}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from labelgw.tls.policy import ServerPrivateKey


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class CertificateMaterial:
    """One certificate to serve. Compared and hashed by identity: engines cache a context per material object."""

    certificate: x509.Certificate
    private_key: ServerPrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def pem(self) -> bytes:
        """Key, leaf and chain as one unencrypted PEM (what C{ssl.SSLContext.load_cert_chain} reads)."""
        key = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        certs = (self.certificate, *self.chain)
        return key + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class Served(Protocol):
    """What a certificate source hands the selector: the material (for any engine) and pyOpenSSL's context."""

    @property
    def material(self) -> CertificateMaterial | None: ...

    @property
    def context(self) -> Any:
        """pyOpenSSL's C{SSL.Context} (only the openssl engine asks: the others never build one)."""
        ...
