"""The local certificate authority behind zero-config HTTPS.

On first use it creates a root CA in the state directory; the user installs that CA once (``python -m labelgw
ca --install``) and every leaf labelgw mints afterwards is trusted by the browser.

Files under the state directory (created mode 0700):
    ca.pem             the CA certificate (public; this is what gets installed)
    ca-key.pem         the CA private key, PKCS#8, mode 0600, written atomically, never logged
    leaves/<name>.pem  cached leaves: certificate then key, mode 0600

Leaves live 7 days and are replaced when less than a day is left. Browsers cap leaf lifetimes (398 days for
public CAs, 825 days on Apple platforms for any CA); a week stays clear of every cap, limits what a stolen
leaf key is worth, and costs nothing because minting takes about a millisecond.

The CA has no name constraints: routes may use any host name (``api.mycompany.dev``), and a constrained CA
could not mint for them. The price is that the CA key is as sensitive as any installed root: it never leaves
the state directory and ``ca --uninstall`` removes the trust.

Everything here that touches the disk is blocking: call it from a thread. L{LocalCA.issue_leaf} is CPU only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labelgw.tls.policy import ip_literal, normalize_server_name

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
LEAF_DIR = "leaves"
# Cache file of the default leaf (localhost plus the loopback IPs): '@' cannot occur in a host name.
DEFAULT_LEAF_FILE = "@default.pem"
DEFAULT_LEAF_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_LIFETIME = timedelta(days=3650)
LEAF_LIFETIME = timedelta(days=7)
LEAF_RENEW_BEFORE = timedelta(days=1)
# Clocks of VMs and containers drift; a certificate valid "from now" fails on a host a minute behind.
BACKDATE = timedelta(hours=1)


class CAError(Exception):
    """The state directory holds a CA that cannot be used (unreadable, or key and certificate differ)."""


@dataclass(frozen=True, slots=True)
class LeafMaterial:
    """One leaf certificate and its key, as objects (for OpenSSL) and as a cache file's PEM."""

    names: tuple[str, ...]
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def fresh_at(self, now: datetime) -> bool:
        """Still worth serving: more than L{LEAF_RENEW_BEFORE} left."""
        return self.not_after - now > LEAF_RENEW_BEFORE


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    """$XDG_DATA_HOME/labelgw, or ~/.local/share/labelgw."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "labelgw"


class LocalCA:
    """A root CA whose key lives in the state directory. Create it with L{load_or_create}."""

    def __init__(self, state_dir: Path, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey):
        self.state_dir = state_dir
        self.certificate = certificate
        self._private_key = private_key
        self._ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def __repr__(self) -> str:
        # Never the key.
        return f"<LocalCA {self.subject_cn!r} in {str(self.state_dir)!r}>"

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.state_dir / CA_KEY_FILE

    @property
    def leaf_dir(self) -> Path:
        return self.state_dir / LEAF_DIR

    @property
    def subject_cn(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    # --- creation and loading (blocking) -----------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, state_dir: Path, *, now: datetime | None = None, hostname: str | None = None
    ) -> LocalCA:
        """Load the CA from C{state_dir}, creating directory and CA on first use. Blocking.

        @raise CAError: the files exist but are unusable. They are never overwritten: the user may have
            installed that CA, and a silently new one would break every browser that trusts the old one.
        """
        state_dir = Path(state_dir)
        _make_private_dir(state_dir)
        with _exclusive_lock(state_dir / ".lock"):
            cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
            if cert_path.exists() or key_path.exists():
                return cls._load(state_dir)
            ca = cls._create(state_dir, now or datetime.now(UTC), hostname or socket.gethostname())
            # Key first: a crash between the two writes leaves no certificate without its key.
            _write_atomically(key_path, ca._key_pem(), 0o600)
            _write_atomically(cert_path, ca.cert_pem, 0o644)
            return ca

    @classmethod
    def _load(cls, state_dir: Path) -> LocalCA:
        cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise CAError(f"cannot load the local CA from {state_dir}: {e}") from e
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: not an EC private key")
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise CAError(f"{key_path} does not belong to {cert_path}")
        return cls(state_dir, certificate, private_key)

    @classmethod
    def _create(cls, state_dir: Path, now: datetime, hostname: str) -> LocalCA:
        key = ec.generate_private_key(ec.SECP256R1())
        # The random part tells apart the CAs of two installs on the same host in a trust store listing.
        common_name = f"labelgw local CA {hostname} {secrets.token_hex(3)}"[:64]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labelgw local development CA"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(state_dir, certificate, key)

    def _key_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # --- leaves ------------------------------------------------------------------------------------------

    def issue_leaf(self, names: Sequence[str], now: datetime) -> LeafMaterial:
        """A new leaf for C{names} (DNS names or IP literals; the first one is the subject). CPU only.

        @raise ValueError: a name is not a valid host name or IP literal.
        """
        canonical: list[str] = []
        for raw in names:
            name = normalize_server_name(raw)
            if name is None:
                raise ValueError(f"not a host name or IP address: {raw!r}")
            if name not in canonical:
                canonical.append(name)
        if not canonical:
            raise ValueError("a leaf needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        alt_names: list[x509.GeneralName] = []
        for name in canonical:
            ip = ip_literal(name)
            if ip is not None:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            else:
                alt_names.append(x509.DNSName(name))
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labelgw local development certificate")]
            # CN is capped at 64 characters; clients use the SAN anyway.
            + ([x509.NameAttribute(NameOID.COMMON_NAME, canonical[0])] if len(canonical[0]) <= 64 else [])
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + LEAF_LIFETIME, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False
            )
            .sign(self._private_key, hashes.SHA256())
        )
        return LeafMaterial(tuple(canonical), certificate, key)

    def leaf_path(self, names: Sequence[str]) -> Path:
        """Cache file for a leaf; names must already be canonical (see L{normalize_server_name})."""
        if tuple(names) == DEFAULT_LEAF_NAMES:
            return self.leaf_dir / DEFAULT_LEAF_FILE
        if len(names) != 1 or normalize_server_name(names[0]) != names[0]:
            raise ValueError(f"no cache file for names {names!r}")
        # IPv6 colons are legal in file names on every platform labelgw runs on except Windows.
        return self.leaf_dir / f"{names[0].replace(':', '_')}.pem"

    def mint_leaf(self, name: str, now: datetime | None = None) -> tuple[bytes, bytes]:
        """(cert_pem, key_pem) for one name, from the disk cache when it has more than a day left. Blocking."""
        leaf = self.cached_or_new_leaf((name,), now or datetime.now(UTC))
        return leaf.cert_pem, leaf.key_pem

    def cached_or_new_leaf(self, names: Sequence[str], now: datetime) -> LeafMaterial:
        """The cached leaf for C{names} if still fresh, else a new one, written to the cache. Blocking."""
        canonical = tuple(normalize_server_name(n) or n for n in names)
        path = self.leaf_path(canonical)
        cached = self.load_leaf_file(path, now)
        if cached is not None and cached.names == canonical:
            return cached
        leaf = self.issue_leaf(canonical, now)
        self.store_leaf(leaf)
        return leaf

    def store_leaf(self, leaf: LeafMaterial) -> Path:
        """Write a leaf to the disk cache (atomically, mode 0600). Blocking."""
        path = self.leaf_path(leaf.names)
        _make_private_dir(self.leaf_dir)
        _write_atomically(path, leaf.cert_pem + leaf.key_pem, 0o600)
        return path

    def load_leaf_file(self, path: Path, now: datetime) -> LeafMaterial | None:
        """A cached leaf if it is readable, issued by this CA, matches its key and is fresh; else None."""
        try:
            data = path.read_bytes()
            certificate = x509.load_pem_x509_certificate(data)
            private_key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError):
            return None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            return None
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            return None
        try:
            # Leaves of a previous CA (the user deleted ca.pem) must not come back.
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return None
        names = _san_names(certificate)
        leaf = LeafMaterial(names, certificate, private_key)
        if not names or not leaf.fresh_at(now):
            return None
        return leaf

    def load_cached_leaves(self, now: datetime) -> list[LeafMaterial]:
        """Every fresh leaf in the cache (to warm the in-memory cache at start); stale files are deleted."""
        leaves: list[LeafMaterial] = []
        try:
            paths = sorted(self.leaf_dir.glob("*.pem"))
        except OSError:
            return leaves
        for path in paths:
            leaf = self.load_leaf_file(path, now)
            if leaf is None:
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                leaves.append(leaf)
        return leaves


def _san_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(n for n in (normalize_server_name(n) for n in names) if n is not None)


def _public_der(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _make_private_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; the key directory must not be group-readable whatever it is.
        os.chmod(path, 0o700)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the whole new one, never a partial key; the mode is set before any byte."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Two gateways starting at once must not each write half of a CA (key of one, certificate of the other)."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # Windows: no concurrent-start protection.
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
