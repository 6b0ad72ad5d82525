"""ACME files in the state directory: the account key and the certificates, read and written in threads.

Layout, one directory per ACME server (its directory URL hashed, so staging and production never mix)::

    <state-dir>/acme/<host>-<hash>/account-key.pem       the account key (EC P-256, PKCS#8), mode 0600
    <state-dir>/acme/<host>-<hash>/account.json          the account URL the server gave, and the directory URL
    <state-dir>/acme/<host>-<hash>/certs/<name>.pem      the chain as issued (leaf first), mode 0644
    <state-dir>/acme/<host>-<hash>/certs/<name>-key.pem  its key, mode 0600

Every function here blocks (disk): call it from a thread. Keys are written atomically with their mode set before
any byte (labelgw.tls.ca's writer), so a reader never sees half a key and no key is ever world-readable.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from labelgw.tls.ca import _make_private_dir, _write_atomically
from labelgw.tls.policy import SERVER_KEY_TYPES, ServerPrivateKey, normalize_server_name

_log = Logger(namespace="labelgw.tls.acme_store")


@dataclass(frozen=True, slots=True)
class AcmeCertificate:
    """A certificate chain issued over ACME for one name, and its key: what a TLS engine serves.

    Both forms are here so that either TLS engine can use it without converting: cryptography objects (pyOpenSSL
    takes them) and PEM (the standard library's ssl loads PEM files or data).
    """

    name: str
    chain: tuple[x509.Certificate, ...]  # leaf first, then the intermediates
    private_key: ServerPrivateKey
    chain_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.chain[0].not_valid_after_utc

    @classmethod
    def from_pem(cls, name: str, chain_pem: bytes, key_pem: bytes) -> AcmeCertificate:
        """Parse and check (the key matches the leaf, the leaf names C{name}).

        @raise ValueError: anything unusable.
        """
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, SERVER_KEY_TYPES):
            raise ValueError(f"unsupported key type {type(key).__name__}")
        if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
            raise ValueError("the key does not match the certificate")
        try:
            san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = {normalize_server_name(str(n)) for n in san.get_values_for_type(x509.DNSName)}
        except x509.ExtensionNotFound:
            names = set()
        if name not in names:
            raise ValueError(f"the certificate does not name {name}")
        return cls(name, chain, key, chain_pem, key_pem)


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def directory_slug(directory_url: str) -> str:
    """A directory name for one ACME server: readable host, plus a hash of the whole URL."""
    host = urlsplit(directory_url).hostname or "acme"
    host = re.sub(r"[^a-z0-9.-]", "_", host.lower())[:60]
    return f"{host}-{hashlib.sha256(directory_url.encode('utf-8')).hexdigest()[:12]}"


class AcmeStore:
    """The ACME part of the state directory for one ACME server. Blocking: use it in a thread."""

    def __init__(self, state_dir: Path, directory_url: str) -> None:
        self.root = state_dir / "acme" / directory_slug(directory_url)
        self.directory_url = directory_url

    @property
    def cert_dir(self) -> Path:
        return self.root / "certs"

    @property
    def account_key_path(self) -> Path:
        return self.root / "account-key.pem"

    def cert_path(self, name: str) -> Path:
        return self.cert_dir / f"{_file_stem(name)}.pem"

    def key_path(self, name: str) -> Path:
        return self.cert_dir / f"{_file_stem(name)}-key.pem"

    # --- the account -------------------------------------------------------------------------------------------

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, created (0600) on first use."""
        path = self.account_key_path
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path}: not an EC key")
            return key
        _make_private_dir(self.root)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_atomically(path, pem, 0o600)
        return key

    def account_url(self) -> str | None:
        try:
            data = json.loads((self.root / "account.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        url = data.get("account") if isinstance(data, dict) else None
        return url if isinstance(url, str) else None

    def save_account_url(self, url: str) -> None:
        _make_private_dir(self.root)
        body = json.dumps({"directory": self.directory_url, "account": url}, indent=1).encode("utf-8")
        _write_atomically(self.root / "account.json", body, 0o600)

    # --- certificates ------------------------------------------------------------------------------------------

    def save(self, certificate: AcmeCertificate) -> None:
        """Key first, then the chain: a chain on disk always has its key beside it."""
        _make_private_dir(self.root)
        _make_private_dir(self.cert_dir)
        _write_atomically(self.key_path(certificate.name), certificate.key_pem, 0o600)
        _write_atomically(self.cert_path(certificate.name), certificate.chain_pem, 0o644)

    def load(self, name: str) -> AcmeCertificate | None:
        try:
            chain_pem = self.cert_path(name).read_bytes()
            key_pem = self.key_path(name).read_bytes()
        except FileNotFoundError:
            return None
        return AcmeCertificate.from_pem(name, chain_pem, key_pem)

    def load_all(self) -> tuple[list[AcmeCertificate], list[str]]:
        """Every stored certificate, and a problem line for each file that cannot be used."""
        found: list[AcmeCertificate] = []
        problems: list[str] = []
        if not self.cert_dir.is_dir():
            return found, problems
        for path in sorted(self.cert_dir.glob("*.pem")):
            if path.name.endswith("-key.pem"):
                continue
            name = normalize_server_name(path.name[: -len(".pem")])
            if name is None:
                continue
            try:
                certificate = self.load(name)
            except (OSError, ValueError) as error:
                problems.append(f"{path}: {error}")
                continue
            if certificate is not None:
                found.append(certificate)
        return found, problems


def _file_stem(name: str) -> str:
    # Names reaching here went through normalize_server_name: letters, digits, '-', '_' and dots, never '/'.
    if "/" in name or name.startswith("."):
        raise ValueError(f"not a host name: {name!r}")
    return name
