"""Issue 13: the local CA signs local names only (X.509 name constraints), checked by OpenSSL itself.

Every handshake here runs in memory (stdlib ssl over MemoryBIOs, or Twisted's TLSMemoryBIOProtocol): no
socket, no network.
"""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from test_tls_support import InlineThreads, handshake, real_time_clock
from twisted.logger import Logger, formatEvent

import labelgw.tls.ca as ca_module
from labelgw.tls.ca import (
    LEAF_DIR,
    PERMITTED_DNS,
    LocalCA,
    NameNotPermitted,
    constraints_permit,
    local_name_constraints,
)
from labelgw.tls.sni import SNIContextSelector

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.load_or_create(tmp_path / "state", now=NOW, hostname="devbox")


def hand_minted_leaf(ca: LocalCA, names: list[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf signed with the CA key directly, bypassing issue_leaf's refusal: what a thief with the key does."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "thief")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca._private_key, hashes.SHA256())
    )
    return certificate, key


def openssl_store_verify(ca: LocalCA, leaf: x509.Certificate) -> str | None:
    """OpenSSL's chain verification (pyOpenSSL's X509StoreContext): None if it verifies, else the error."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca.certificate))
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf)).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return None


def stdlib_handshake(
    tmp_path: Path, ca: LocalCA, leaf: x509.Certificate, key: ec.EllipticCurvePrivateKey, server_name: str
) -> Exception | None:
    """A stdlib ssl client trusting only the CA (with host name check) against a server with the leaf, in memory."""
    chain = tmp_path / "server.pem"
    chain.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.cert_pem.decode("ascii"))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if done[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as e:
                if side == "client":
                    return e
                # The server sees the client's alert after the client failed: reported above.
                done[side] = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done["client"]:
            return None
    raise AssertionError("handshake did not finish")


# --- the extension ---------------------------------------------------------------------------------------------


def test_ca_carries_critical_name_constraints_for_local_names(ca: LocalCA) -> None:
    parsed = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    extension = parsed.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    constraints = extension.value
    assert constraints.excluded_subtrees is None
    permitted = constraints.permitted_subtrees or []
    dns = [g.value for g in permitted if isinstance(g, x509.DNSName)]
    ips = {str(g.value) for g in permitted if isinstance(g, x509.IPAddress)}
    assert dns == list(PERMITTED_DNS)
    for zone in ("localhost", "test", "internal", "home.arpa", "local", "lan"):
        assert zone in dns and "." + zone in dns
    assert ips == {
        "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "169.254.0.0/16",
        "fe80::/10",
    }
    assert len(permitted) == len(dns) + len(ips)
    assert ca.constrained and constraints == local_name_constraints()


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("localhost", True),
        ("api.localhost", True),
        ("a.b.localhost", True),
        ("api.example.test", True),
        ("nas.home.arpa", True),
        ("printer.local", True),
        ("router.lan", True),
        ("db.internal", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("172.31.255.255", True),
        ("192.168.1.10", True),
        ("169.254.1.1", True),
        ("fd12:3456::1", True),
        ("fe80::1", True),
        ("api", False),  # single label: no DNS subtree can permit it
        ("example.com", False),
        ("localhost.com", False),
        ("notlocalhost", False),
        ("test.example.com", False),
        ("home.arpa.evil.com", False),
        ("8.8.8.8", False),
        ("172.32.0.1", False),
        ("2001:db8::1", False),
    ],
)
def test_permits_follows_the_subtrees(ca: LocalCA, name: str, allowed: bool) -> None:
    assert ca.permits(name) is allowed


def test_leading_dot_subtree_means_below_only() -> None:
    below_only = x509.NameConstraints(permitted_subtrees=[x509.DNSName(".test")], excluded_subtrees=None)
    assert constraints_permit(below_only, "a.test") and not constraints_permit(below_only, "test")
    assert constraints_permit(None, "example.com")
    excluded = x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=[x509.DNSName("bad.test")])
    assert not constraints_permit(excluded, "x.bad.test") and constraints_permit(excluded, "good.test")


# --- OpenSSL agrees --------------------------------------------------------------------------------------------


def test_openssl_accepts_local_leaves_and_rejects_a_hand_minted_public_one(ca: LocalCA, tmp_path: Path) -> None:
    for names in (["api.localhost"], ["localhost", "127.0.0.1", "::1"], ["nas.home.arpa"], ["192.168.1.10"]):
        leaf = ca.issue_leaf(names, NOW)
        assert openssl_store_verify(ca, leaf.certificate) is None, names
    # An IP-only leaf has no CN: OpenSSL would check a CN like "10.0.0.1" against the DNS subtrees.
    ip_only = ca.issue_leaf(["10.0.0.1"], NOW)
    assert not ip_only.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert openssl_store_verify(ca, ip_only.certificate) is None

    for names in (["example.com"], ["api.localhost", "example.com"], ["8.8.8.8"], ["api"]):
        forged, _ = hand_minted_leaf(ca, names)
        error = openssl_store_verify(ca, forged)
        assert error is not None and "permitted subtree violation" in error, (names, error)

    # The same through a stdlib ssl handshake (what Python clients, curl and most tools do).
    leaf = ca.issue_leaf(["api.localhost"], NOW)
    assert stdlib_handshake(tmp_path, ca, leaf.certificate, leaf.private_key, "api.localhost") is None
    forged, forged_key = hand_minted_leaf(ca, ["example.com"])
    error = stdlib_handshake(tmp_path, ca, forged, forged_key, "example.com")
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert "permitted subtree violation" in str(error)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_verify_command(ca: LocalCA, tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(ca.issue_leaf(["api.localhost"], NOW).cert_pem)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(hand_minted_leaf(ca, ["example.com"])[0].public_bytes(serialization.Encoding.PEM))

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        argv = ["openssl", "verify", "-CAfile", str(ca.cert_path), str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    accepted = verify(good)
    assert accepted.returncode == 0 and "OK" in accepted.stdout, accepted.stderr
    refused = verify(bad)
    assert refused.returncode != 0
    assert "permitted subtree violation" in refused.stdout + refused.stderr


# --- minting refuses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["example.com"], ["api"], ["api.localhost", "www.example.com"], ["8.8.8.8"]])
def test_issue_leaf_refuses_names_the_constraints_forbid(ca: LocalCA, names: list[str]) -> None:
    with pytest.raises(NameNotPermitted):
        ca.issue_leaf(names, NOW)
    with pytest.raises(ValueError):  # NameNotPermitted is a ValueError: existing callers still catch it
        ca.issue_leaf(names, NOW)


def test_bare_name_error_says_to_use_name_localhost(ca: LocalCA) -> None:
    with pytest.raises(NameNotPermitted, match=r"single-label.*api\.localhost"):
        ca.issue_leaf(["api"], NOW)


class Selector:
    def __init__(self, ca: LocalCA, routed: set[str], strict: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.ca = ca
        self.selector = SNIContextSelector(
            clock=real_time_clock(),
            run_in_thread=InlineThreads(),
            is_routed=lambda name: name in routed,
            local_ca=ca,
            strict=strict,
        )
        self.selector._log = Logger(observer=self.events.append)  # type: ignore[misc]

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def test_routed_public_and_bare_names_get_the_default_certificate_and_one_log_line(ca: LocalCA) -> None:
    s = Selector(ca, {"api.example.com", "api", "shop.localhost"})
    for name in ("api.example.com", "api.example.com", "api"):
        result = handshake(s.selector, name)
        assert result.ok and result.names == {"localhost", "127.0.0.1", "::1"}
    # A browser trusting the CA refuses it (wrong name), instead of a leaf it would refuse for a constraint.
    assert not handshake(s.selector, "api.example.com", cadata=ca.cert_pem).ok
    assert handshake(s.selector, "shop.localhost", cadata=ca.cert_pem).ok
    lines = s.lines()
    public = [line for line in lines if "api.example.com" in line]
    assert len(public) == 1
    assert "name constraints forbid it" in public[0] and "serving the default certificate" in public[0]
    assert "--cert-dir" in public[0] and "--acme-email" in public[0]
    bare = [line for line in lines if "no minted certificate for api:" in line]
    assert len(bare) == 1 and "api.localhost" in bare[0]
    assert s.selector.minted == 2  # the default leaf and shop.localhost; nothing for the forbidden names
    assert sorted(p.name for p in ca.leaf_dir.iterdir()) == ["@default.pem", "shop.localhost.pem"]


def test_strict_refuses_a_forbidden_name(ca: LocalCA) -> None:
    s = Selector(ca, {"api.example.com"}, strict=True)
    assert not handshake(s.selector, "api.example.com").ok
    assert any("refusing the handshake" in line for line in s.lines())


# --- a CA from before the constraints ---------------------------------------------------------------------------


def write_unconstrained_ca(state_dir: Path) -> x509.Certificate:
    """The CA profile labelgw wrote before issue 13: no NameConstraints."""
    state_dir.mkdir(parents=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labelgw local CA old 000000")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    (state_dir / "ca-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (state_dir / "ca-key.pem").chmod(0o600)
    (state_dir / "ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def test_unconstrained_ca_is_kept_and_the_log_says_how_to_renew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(ca_module, "_log", Logger(observer=events.append))
    state = tmp_path / "state"
    old = write_unconstrained_ca(state)
    ca = LocalCA.load_or_create(state)
    assert ca.certificate == old and not ca.constrained
    assert ca.permits("example.com")
    ca.issue_leaf(["api.example.com"], NOW)  # still mints what it minted before
    (line,) = [formatEvent(e) for e in events]
    assert "no name constraints" in line and "python -m labelgw ca --renew" in line and str(state) in line


def test_renew_moves_the_old_ca_aside_and_removes_cached_leaves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = write_unconstrained_ca(state)
    old_ca = LocalCA.load_or_create(state)
    old_ca.store_leaf(old_ca.issue_leaf(["api.example.com"], NOW))
    assert (state / LEAF_DIR / "api.example.com.pem").exists()

    new, moved = LocalCA.renew(state, now=datetime(2026, 11, 30, 8, 15, 0, tzinfo=UTC))
    assert [p.name for p in moved] == ["ca-replaced-20261130T081500Z.pem", "ca-key-replaced-20261130T081500Z.pem"]
    assert x509.load_pem_x509_certificate(moved[0].read_bytes()) == old
    assert stat.S_IMODE(moved[1].stat().st_mode) == 0o600
    assert not (state / LEAF_DIR).exists()
    assert new.constrained and new.certificate != old
    assert LocalCA.load_or_create(state).certificate == new.certificate
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600

    # A second renew in the same second does not overwrite the first one's files.
    _, again = LocalCA.renew(state, now=datetime(2026, 11, 30, 8, 15, 0, tzinfo=UTC))
    assert [p.name for p in again] == [
        "ca-replaced-20261130T081500Z-2.pem",
        "ca-key-replaced-20261130T081500Z-2.pem",
    ]
    assert moved[0].exists()


def test_renew_without_a_ca_just_creates_one(tmp_path: Path) -> None:
    new, moved = LocalCA.renew(tmp_path / "fresh")
    assert moved == [] and new.constrained and LocalCA.exists_in(tmp_path / "fresh")
