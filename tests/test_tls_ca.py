"""labelgw.tls.ca: the local CA on disk, and the leaves it mints (verified the way a TLS client would)."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from labelgw.tls.ca import (
    CA_LIFETIME,
    DEFAULT_LEAF_NAMES,
    LEAF_LIFETIME,
    CAError,
    LocalCA,
    default_state_dir,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def ca(state_dir: Path) -> LocalCA:
    return LocalCA.load_or_create(state_dir, now=NOW, hostname="devbox")


def verify(ca: LocalCA, leaf: x509.Certificate, name: str, at: datetime = NOW) -> None:
    """RFC 5280 / CA/B path validation as a browser does it: chain, validity, EKU, SAN."""
    subject: x509.verification.Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(at).build_server_verifier(subject)
    verifier.verify(leaf, [])


def test_creates_the_ca_with_private_files(ca: LocalCA, state_dir: Path) -> None:
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.cert_path.stat().st_mode) == 0o644
    assert ca.cert_path == state_dir / "ca.pem"
    # Nothing half-written is left behind by the atomic writes.
    assert sorted(p.name for p in state_dir.iterdir() if not p.name.startswith(".lock")) == ["ca-key.pem", "ca.pem"]


def test_ca_certificate_profile(ca: LocalCA) -> None:
    cert = ca.certificate
    assert ca.subject_cn.startswith("labelgw local CA devbox ")
    assert len(ca.subject_cn.rsplit(" ", 1)[1]) == 6
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= CA_LIFETIME
    # Issue 13 reversed the old "no name constraints" rule: see tests/test_tls_ca_constraints.py.
    assert cert.extensions.get_extension_for_class(x509.NameConstraints).critical


def test_second_load_reuses_the_ca(ca: LocalCA, state_dir: Path) -> None:
    again = LocalCA.load_or_create(state_dir, now=NOW + timedelta(days=1))
    assert again.certificate == ca.certificate
    leaf = again.issue_leaf(["api.localhost"], NOW)
    verify(ca, leaf.certificate, "api.localhost")


def test_key_never_appears_in_repr(ca: LocalCA) -> None:
    key_text = ca.key_path.read_text()
    assert "PRIVATE" not in repr(ca) and key_text.splitlines()[1] not in repr(ca)


def test_mismatched_files_are_an_error_not_a_new_ca(ca: LocalCA, state_dir: Path, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other", now=NOW)
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(CAError, match="does not belong"):
        LocalCA.load_or_create(state_dir)
    assert ca.cert_path.read_bytes() == ca.cert_pem


def test_half_present_ca_is_an_error(state_dir: Path) -> None:
    state_dir.mkdir(mode=0o700)
    (state_dir / "ca.pem").write_text("not a certificate")
    with pytest.raises(CAError, match="cannot load"):
        LocalCA.load_or_create(state_dir)


def test_leaf_for_a_dns_name(ca: LocalCA) -> None:
    leaf = ca.issue_leaf(["API.Localhost."], NOW)
    cert = leaf.certificate
    assert leaf.names == ("api.localhost",)
    verify(ca, cert, "api.localhost")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.localhost"]
    assert san.get_values_for_type(x509.IPAddress) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.private_key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - NOW == LEAF_LIFETIME
    assert cert.not_valid_before_utc < NOW


def test_leaf_for_ip_addresses_uses_ip_sans(ca: LocalCA) -> None:
    leaf = ca.issue_leaf(DEFAULT_LEAF_NAMES, NOW)
    san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    for name in DEFAULT_LEAF_NAMES:
        verify(ca, leaf.certificate, name)


def test_leaf_does_not_verify_for_other_names_or_after_expiry(ca: LocalCA) -> None:
    leaf = ca.issue_leaf(["api.localhost"], NOW)
    with pytest.raises(VerificationError):
        verify(ca, leaf.certificate, "web.localhost")
    with pytest.raises(VerificationError):
        verify(ca, leaf.certificate, "api.localhost", at=NOW + LEAF_LIFETIME + timedelta(minutes=1))


def test_long_names_get_no_common_name(ca: LocalCA) -> None:
    name = ("a" * 60) + ".localhost"
    leaf = ca.issue_leaf([name], NOW)
    assert not leaf.certificate.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    verify(ca, leaf.certificate, name)


@pytest.mark.parametrize("bad", ["", "a b.localhost", "../etc/passwd", "x" * 64 + ".test", "api..localhost"])
def test_refuses_names_that_are_not_host_names(ca: LocalCA, bad: str) -> None:
    with pytest.raises(ValueError):
        ca.issue_leaf([bad], NOW)


def test_mint_leaf_uses_the_disk_cache_while_more_than_a_day_is_left(ca: LocalCA) -> None:
    cert_pem, key_pem = ca.mint_leaf("api.localhost", now=NOW)
    cached = ca.leaf_dir / "api.localhost.pem"
    assert cached.read_bytes() == cert_pem + key_pem
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.leaf_dir.stat().st_mode) == 0o700
    assert ca.mint_leaf("api.localhost", now=NOW + timedelta(days=5, hours=23)) == (cert_pem, key_pem)
    renewed = ca.mint_leaf("api.localhost", now=NOW + timedelta(days=6, hours=1))
    assert renewed[0] != cert_pem
    assert cached.read_bytes() == renewed[0] + renewed[1]


def test_leaves_of_another_ca_are_not_reused(ca: LocalCA, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other", now=NOW)
    foreign = other.issue_leaf(["api.localhost"], NOW)
    ca.store_leaf(foreign)
    assert ca.load_leaf_file(ca.leaf_dir / "api.localhost.pem", NOW) is None
    cert_pem, _ = ca.mint_leaf("api.localhost", now=NOW)
    verify(ca, x509.load_pem_x509_certificate(cert_pem), "api.localhost")


def test_load_cached_leaves_keeps_fresh_ones_and_deletes_stale(ca: LocalCA) -> None:
    ca.store_leaf(ca.issue_leaf(["old.localhost"], NOW - timedelta(days=6, hours=12)))
    ca.store_leaf(ca.issue_leaf(["new.localhost"], NOW))
    ca.store_leaf(ca.issue_leaf(DEFAULT_LEAF_NAMES, NOW))
    (ca.leaf_dir / "junk.localhost.pem").write_text("garbage")
    leaves = ca.load_cached_leaves(NOW)
    assert sorted(leaf.names for leaf in leaves) == [DEFAULT_LEAF_NAMES, ("new.localhost",)]
    assert sorted(p.name for p in ca.leaf_dir.iterdir()) == ["@default.pem", "new.localhost.pem"]


def test_default_state_dir_follows_xdg() -> None:
    assert default_state_dir({"XDG_DATA_HOME": "/data/me"}) == Path("/data/me/labelgw")
    assert default_state_dir({}) == Path.home() / ".local" / "share" / "labelgw"
    # The XDG spec says relative values are invalid and must be ignored.
    assert default_state_dir({"XDG_DATA_HOME": "rel"}) == Path.home() / ".local" / "share" / "labelgw"
