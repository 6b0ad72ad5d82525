"""labelgw.tls.sni: which certificate a handshake gets, checked with real in-memory handshakes.

Where it matters the client verifies like a browser (chain to the local CA, host name), with the
standard library's ssl module.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from test_tls_support import (
    Handshake,
    InlineThreads,
    UserIssuer,
    cert_pem,
    handshake,
    key_pem,
    real_time_clock,
)
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from labelgw.tls.ca import LEAF_LIFETIME, LocalCA
from labelgw.tls.certdir import CertDirectory
from labelgw.tls.sni import SNIContextSelector

ISSUER = UserIssuer.create()
ROUTED = {"api.example.test", "shop.localhost"}


class Setup:
    def __init__(self, tmp_path: Path, *, with_ca: bool = True, strict: bool = False, **kwargs: Any) -> None:
        self.clock: Clock = real_time_clock()
        self.threads = InlineThreads()
        self.routed = set(ROUTED)
        self.ca = LocalCA.load_or_create(tmp_path / "state") if with_ca else None
        (tmp_path / "certs").mkdir(exist_ok=True)
        self.cert_dir_path = tmp_path / "certs"
        self.certs = CertDirectory(self.cert_dir_path, clock=self.clock, run_in_thread=self.threads)
        self.events: list[dict[str, Any]] = []
        self.selector = self.make_selector(strict=strict, **kwargs)

    def make_selector(self, **kwargs: Any) -> SNIContextSelector:
        selector = SNIContextSelector(
            clock=self.clock,
            run_in_thread=self.threads,
            is_routed=lambda name: name in self.routed,
            local_ca=self.ca,
            cert_dir=self.certs,
            **kwargs,
        )
        selector._log = Logger(observer=self.events.append)  # type: ignore[misc]
        return selector

    def user_cert(self, file_name: str, names: list[str]) -> None:
        cert, key = ISSUER.issue(names)
        (self.cert_dir_path / file_name).write_bytes(cert_pem(cert) + key_pem(key))
        self.certs.scan_now()

    def connect(self, name: str | None, **kwargs: Any) -> Handshake:
        return handshake(self.selector, name, **kwargs)

    def browser(self, name: str) -> Handshake:
        """A client that trusts only the local CA and checks the host name."""
        assert self.ca is not None
        return handshake(self.selector, name, cadata=self.ca.cert_pem)

    def leaf_files(self) -> list[str]:
        assert self.ca is not None
        return sorted(p.name for p in self.ca.leaf_dir.iterdir()) if self.ca.leaf_dir.exists() else []


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.mark.parametrize("name", ["api.example.test", "shop.localhost", "unrouted.localhost", "a.b.localhost"])
def test_routed_and_localhost_names_get_a_minted_leaf_that_verifies(s: Setup, name: str) -> None:
    result = s.browser(name)
    assert result.ok, result.error
    assert result.names == {name}
    assert result.certificate is not None
    assert result.certificate.issuer == s.ca.certificate.subject  # type: ignore[union-attr]


def test_unknown_name_gets_the_minted_default(s: Setup) -> None:
    result = s.connect("unknown.example.test")
    assert result.ok
    assert result.names == {"localhost", "127.0.0.1", "::1"}
    # ... which a browser would refuse for that name, but accept for localhost.
    assert not s.browser("unknown.example.test").ok
    assert s.browser("localhost").ok


def test_no_sni_gets_the_default(s: Setup) -> None:
    result = s.connect(None)
    assert result.ok and result.names == {"localhost", "127.0.0.1", "::1"}


@pytest.mark.parametrize("raw", ["bad_name!.test", "x" * 70 + ".localhost"])
def test_implausible_sni_gets_the_default(s: Setup, raw: str) -> None:
    assert s.selector.context_for(raw) is s.selector.context_for(None)


def test_user_certificate_exact_then_wildcard_beats_minting(s: Setup) -> None:
    s.user_cert("api.pem", ["api.example.test"])
    s.user_cert("wild.pem", ["*.localhost"])
    exact, wild = s.connect("api.example.test"), s.connect("web.localhost")
    assert exact.certificate is not None and exact.certificate.issuer == ISSUER.certificate.subject
    assert exact.names == {"api.example.test"}
    assert wild.names == {"*.localhost"}
    # One label only: a.b.localhost is not covered by *.localhost, so it is minted.
    deep = s.connect("a.b.localhost")
    assert deep.names == {"a.b.localhost"}
    assert s.ca is not None and deep.certificate is not None
    assert deep.certificate.issuer == s.ca.certificate.subject


def test_cert_dir_default_beats_the_minted_default(s: Setup) -> None:
    s.user_cert("default.pem", ["fallback.example.test"])
    assert s.connect("unknown.example.test").names == {"fallback.example.test"}
    assert s.connect(None).names == {"fallback.example.test"}
    # Routed and local names are still minted.
    assert s.connect("shop.localhost").names == {"shop.localhost"}


def test_rotated_user_certificate_is_served_to_new_handshakes(s: Setup) -> None:
    s.user_cert("api.pem", ["api.example.test"])
    first = s.connect("api.example.test").certificate
    s.user_cert("api.pem", ["api.example.test"])  # a new file (the helper writes new bytes)
    second = s.connect("api.example.test").certificate
    assert first is not None and second is not None and first.serial_number != second.serial_number


def test_strict_refuses_unknown_and_missing_names(tmp_path: Path) -> None:
    s = Setup(tmp_path, strict=True)
    assert s.browser("shop.localhost").ok
    for name in ("unknown.example.test", None):
        result = s.connect(name)
        assert not result.ok and result.error is not None and "HANDSHAKE_FAILURE" in result.error


def test_without_ca_only_user_certificates(tmp_path: Path) -> None:
    s = Setup(tmp_path, with_ca=False)
    assert not s.connect("shop.localhost").ok  # nothing to serve at all
    s.user_cert("default.pem", ["fallback.example.test"])
    assert s.connect("shop.localhost").names == {"fallback.example.test"}


def test_minted_leaves_are_cached_in_memory(s: Setup) -> None:
    first = s.selector.context_for(b"api.example.test")
    assert s.selector.context_for(b"API.example.test.") is first


def test_only_routed_names_and_the_default_are_written_to_disk_in_a_thread(s: Setup) -> None:
    s.connect("api.example.test")
    s.connect("shop.localhost")
    s.connect("random123.localhost")
    s.connect(None)
    assert s.threads.calls == ["store_leaf", "store_leaf", "store_leaf"]
    assert s.leaf_files() == ["@default.pem", "api.example.test.pem", "shop.localhost.pem"]


def test_handshake_path_does_no_io(s: Setup) -> None:
    # While the "thread" is held, handshakes for new names still complete: nothing waits on the disk.
    s.threads.paused = True
    assert s.browser("api.example.test").ok
    assert s.browser("new.localhost").ok
    assert s.leaf_files() == []
    s.threads.release()
    assert s.leaf_files() == ["api.example.test.pem"]


def test_one_disk_write_per_name_at_a_time(s: Setup) -> None:
    s.threads.paused = True
    s.selector.context_for("api.example.test")
    s.clock.advance(LEAF_LIFETIME.total_seconds())  # stale: minted again
    s.selector.context_for("api.example.test")
    assert s.threads.held == 1


def test_leaf_is_renewed_when_less_than_a_day_is_left(s: Setup) -> None:
    first = s.selector.context_for("shop.localhost")
    s.clock.advance(timedelta(days=5, hours=23).total_seconds())
    assert s.selector.context_for("shop.localhost") is first
    s.clock.advance(timedelta(hours=2).total_seconds())
    assert s.selector.context_for("shop.localhost") is not first
    default = s.selector.context_for(None)
    s.clock.advance(timedelta(days=6, hours=1).total_seconds())
    assert s.selector.context_for(None) is not default


def test_memory_cache_is_bounded(tmp_path: Path) -> None:
    s = Setup(tmp_path, max_minted=3)
    contexts = {name: s.selector.context_for(name) for name in ("a.localhost", "b.localhost", "c.localhost")}
    s.selector.context_for("a.localhost")  # most recently used
    s.selector.context_for("d.localhost")  # evicts b
    assert s.selector.context_for("a.localhost") is contexts["a.localhost"]
    assert s.selector.context_for("c.localhost") is contexts["c.localhost"]
    assert s.selector.context_for("b.localhost") is not contexts["b.localhost"]


def test_cached_leaves_are_reused_after_a_restart(s: Setup) -> None:
    before = s.connect("api.example.test").certificate
    default_before = s.connect(None).certificate
    restarted = s.make_selector()
    restarted.load_cached_leaves()
    assert s.threads.calls[-1] == "load"
    after = handshake(restarted, "api.example.test").certificate
    assert before is not None and after is not None and after.serial_number == before.serial_number
    default_after = handshake(restarted, None).certificate
    assert default_before is not None and default_after is not None
    assert default_after.serial_number == default_before.serial_number
    assert [formatEvent(e) for e in s.events][-1] == "loaded 2 cached leaf certificates"


def test_a_failing_disk_write_is_logged_and_the_leaf_still_served(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(leaf: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s.ca, "store_leaf", disk_full)
    assert s.browser("api.example.test").ok
    assert [formatEvent(e) for e in s.events] == [
        "could not cache the certificate for api.example.test on disk ([Errno 28] No space left on device); "
        "it is still served from memory"
    ]
    assert s.browser("api.example.test").ok


def test_an_exception_while_choosing_refuses_the_handshake(s: Setup) -> None:
    def broken(name: str) -> bool:
        raise RuntimeError("routing table exploded")

    s.selector._is_routed = broken  # type: ignore[method-assign]
    result = s.connect("api.example.test")
    assert not result.ok
    assert any("choosing a certificate for SNI" in formatEvent(e) for e in s.events)


def test_certificate_profile_as_the_client_sees_it(s: Setup) -> None:
    result = s.browser("api.example.test")
    cert = result.certificate
    assert cert is not None
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= LEAF_LIFETIME + timedelta(hours=1)
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    )
