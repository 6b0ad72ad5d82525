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

The CA carries a critical X.509 NameConstraints extension: it can vouch only for local names
(L{PERMITTED_DNS}) and loopback, private and link-local addresses (L{PERMITTED_NETWORKS}). Installing it is
then no risk to public sites: a leaf for ``example.com`` signed with a leaked CA key fails verification in
OpenSSL, browsers (Chrome, Firefox, Safari enforce constraints of trust anchors) and curl. Each DNS subtree is
listed twice: ``test`` (RFC 5280: the name and every name under it) and ``.test`` (the leading-dot form some
verifiers need for "under it"; OpenSSL reads it as names under it only). A single-label name such as ``api``
can never be permitted (a DNS subtree always names a suffix), so the CA mints no leaf for it, nor for a public
name: L{LocalCA.permits} says which names it will sign, and L{LocalCA.issue_leaf} refuses the others with
L{NameNotPermitted}. Such names need a certificate of their own (``--cert-dir``), or a local name
(``api.localhost``).

A CA created before the constraints existed is kept (it is trusted already, and replacing it silently would
break every browser that trusts it); it still mints for any name, and the log says how to replace it:
``python -m labelgw ca --renew`` (L{LocalCA.renew}).

Everything here that touches the disk is blocking: call it from a thread. L{LocalCA.issue_leaf} is CPU only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

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

# The DNS zones the CA may vouch for. Reserved for local use: localhost and test (RFC 6761), home.arpa
# (RFC 8375), local (mDNS, RFC 6762), internal (ICANN, 2024: never delegated). lan is not reserved, but home
# routers hand it out everywhere and it is not a delegated TLD. Not listed: example and invalid (never used
# for real services), and corp, home, mail (blocked by ICANN, but nothing stops a collision's holder either).
LOCAL_DNS_ZONES: tuple[str, ...] = ("localhost", "test", "internal", "home.arpa", "local", "lan")
# Both spellings of each zone (see the module docstring).
PERMITTED_DNS: tuple[str, ...] = tuple(form for zone in LOCAL_DNS_ZONES for form in (zone, "." + zone))
# Loopback, RFC 1918 private, unique local (RFC 4193) and link-local addresses.
PERMITTED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)
RENEW_COMMAND = "python -m labelgw ca --renew"

_log = Logger(namespace="labelgw.tls.ca")


class CAError(Exception):
    """The state directory holds a CA that cannot be used (unreadable, or key and certificate differ)."""


class NameNotPermitted(ValueError):
    """The CA's name constraints forbid this name: no verifier would accept a leaf for it."""


def local_name_constraints() -> x509.NameConstraints:
    """The NameConstraints of every CA labelgw creates."""
    permitted: list[x509.GeneralName] = [x509.DNSName(name) for name in PERMITTED_DNS]
    permitted += [x509.IPAddress(network) for network in PERMITTED_NETWORKS]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None)


def name_constraints_of(certificate: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class NameRules:
    """A NameConstraints extension compiled once: L{LocalCA.permits} runs in the SNI callback of handshakes.

    RFC 5280 4.2.1.10: a DNS subtree ``zone`` holds the zone and every name under it; ``.zone`` (a common
    extension, OpenSSL's reading) only the names under it. With no permitted subtree of a name's type (None
    here), that type is unconstrained.
    """

    permitted_dns: tuple[str, ...] | None
    excluded_dns: tuple[str, ...]
    permitted_networks: tuple[Network, ...] | None
    excluded_networks: tuple[Network, ...]

    @classmethod
    def of(cls, constraints: x509.NameConstraints) -> NameRules:
        def dns(subtrees: Iterable[x509.GeneralName] | None) -> tuple[str, ...]:
            return tuple(g.value.lower() for g in subtrees or () if isinstance(g, x509.DNSName))

        def networks(subtrees: Iterable[x509.GeneralName] | None) -> tuple[Network, ...]:
            found: list[Network] = []
            for general in subtrees or ():
                if isinstance(general, x509.IPAddress) and isinstance(
                    general.value, ipaddress.IPv4Network | ipaddress.IPv6Network
                ):
                    found.append(general.value)
            return tuple(found)

        permitted = constraints.permitted_subtrees
        return cls(
            dns(permitted) or None,
            dns(constraints.excluded_subtrees),
            networks(permitted) or None,
            networks(constraints.excluded_subtrees),
        )

    def permit(self, name: str) -> bool:
        """Whether a leaf naming C{name} (canonical: see L{normalize_server_name}) satisfies the constraints."""
        # Parsing an IP raises for every DNS name; canonical IP literals contain ':' or end with a digit.
        ip = ip_literal(name) if ":" in name or name[-1:].isdigit() else None
        if ip is not None:
            address = ipaddress.ip_address(ip)
            if any(address in network for network in self.excluded_networks):
                return False
            return self.permitted_networks is None or any(address in n for n in self.permitted_networks)
        if any(_dns_in_subtree(name, base) for base in self.excluded_dns):
            return False
        return self.permitted_dns is None or any(_dns_in_subtree(name, base) for base in self.permitted_dns)


def constraints_permit(constraints: x509.NameConstraints | None, name: str) -> bool:
    """Whether a leaf naming C{name} (canonical) satisfies C{constraints} (None: no constraints)."""
    return constraints is None or NameRules.of(constraints).permit(name)


def _dns_in_subtree(name: str, base: str) -> bool:
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base) and len(name) > len(base)
    return name == base or name.endswith("." + base)


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
        self.name_constraints = name_constraints_of(certificate)
        self._name_rules = NameRules.of(self.name_constraints) if self.name_constraints is not None else None

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

    @property
    def constrained(self) -> bool:
        """False for a CA created before labelgw added name constraints: it can vouch for any name."""
        return self.name_constraints is not None

    def permits(self, name: str) -> bool:
        """Whether a leaf for C{name} (canonical) would verify: the CA's name constraints allow it."""
        return self._name_rules is None or self._name_rules.permit(name)

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
                ca = cls._load(state_dir)
                if not ca.constrained:
                    _log.warn(
                        "the local CA {path} has no name constraints: it can vouch for any site, public ones "
                        "included. It keeps working; to replace it with one limited to local names: "
                        "{command} --state-dir {state_dir}, then install the new one",
                        path=str(cert_path),
                        command=RENEW_COMMAND,
                        state_dir=str(state_dir),
                    )
                return ca
            return cls._create_files(state_dir, now, hostname)

    @classmethod
    def exists_in(cls, state_dir: Path) -> bool:
        """Whether C{state_dir} holds CA files (usable or not). Creates nothing."""
        state_dir = Path(state_dir)
        return (state_dir / CA_CERT_FILE).exists() or (state_dir / CA_KEY_FILE).exists()

    @classmethod
    def renew(
        cls, state_dir: Path, *, now: datetime | None = None, hostname: str | None = None
    ) -> tuple[LocalCA, list[Path]]:
        """Replace the CA by a new one (with name constraints). Blocking.

        The old files are moved aside (``ca-replaced-<UTC time>.pem``, ``ca-key-replaced-<UTC time>.pem``, the
        key still mode 0600) rather than deleted: whoever installed the old CA may want its fingerprint to
        remove it. Cached leaves are deleted (the new CA must not serve the old CA's leaves). Returns the new
        CA and the paths the old files were moved to.
        """
        state_dir = Path(state_dir)
        now = now or datetime.now(UTC)
        _make_private_dir(state_dir)
        with _exclusive_lock(state_dir / ".lock"):
            stamp = f"{now:%Y%m%dT%H%M%SZ}"
            moved: list[Path] = []
            for current, stem in ((CA_CERT_FILE, "ca"), (CA_KEY_FILE, "ca-key")):
                source = state_dir / current
                if not source.exists():
                    continue
                target = state_dir / f"{stem}-replaced-{stamp}.pem"
                suffix = 1
                while target.exists():
                    suffix += 1
                    target = state_dir / f"{stem}-replaced-{stamp}-{suffix}.pem"
                os.replace(source, target)
                moved.append(target)
            shutil.rmtree(state_dir / LEAF_DIR, ignore_errors=True)
            return cls._create_files(state_dir, now, hostname), moved

    @classmethod
    def _create_files(cls, state_dir: Path, now: datetime | None, hostname: str | None) -> LocalCA:
        """Create and write a new CA; the caller holds the lock and has checked that no CA files exist."""
        ca = cls._create(state_dir, now or datetime.now(UTC), hostname or socket.gethostname())
        # Key first: a crash between the two writes leaves no certificate without its key.
        _write_atomically(state_dir / CA_KEY_FILE, ca._key_pem(), 0o600)
        _write_atomically(state_dir / CA_CERT_FILE, ca.cert_pem, 0o644)
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
            # Critical: a verifier that cannot enforce the constraints must refuse the CA rather than ignore them.
            .add_extension(local_name_constraints(), critical=True)
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

        @raise NameNotPermitted: the CA's name constraints forbid a name (L{permits}).
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
        forbidden = [name for name in canonical if not self.permits(name)]
        if forbidden:
            reason = forbidden_reason(forbidden[0])
            raise NameNotPermitted(f"the local CA may not sign {', '.join(forbidden)}: {reason}")
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
            # CN is capped at 64 characters; clients use the SAN anyway. Never an IP literal: OpenSSL checks the
            # CN of a leaf without DNS names against the DNS constraints, and "127.0.0.1" looks like one.
            + (
                [x509.NameAttribute(NameOID.COMMON_NAME, canonical[0])]
                if len(canonical[0]) <= 64 and ip_literal(canonical[0]) is None
                else []
            )
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


def forbidden_reason(name: str) -> str:
    """Why a constrained local CA refuses C{name}, and what to do instead (for log lines and errors)."""
    if ip_literal(name) is not None:
        return "only loopback, private and link-local addresses are allowed"
    if "." not in name:
        return (
            f"a single-label name cannot be allowed by name constraints; use {name}.localhost, or put a "
            "certificate for it in --cert-dir"
        )
    return (
        f"it is limited to local names ({', '.join(LOCAL_DNS_ZONES)} and names under them); a public name needs "
        "a certificate from an ACME server (--acme-email) or one in --cert-dir"
    )


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
