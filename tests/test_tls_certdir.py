"""labelgw.tls.certdir: the --cert-dir poller, driven by task.Clock with the thread work run inline."""

from __future__ import annotations

import os
from datetime import timedelta
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from test_tls_support import (
    InlineThreads,
    UserIssuer,
    cert_pem,
    clock_now,
    key_pem,
    real_time_clock,
    replace_file,
)
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from labelgw.tls.certdir import SCAN_INTERVAL, CertDirectory, CertIndex, UserCertificate, certificate_names

ISSUER = UserIssuer.create()


class Harness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.clock: Clock = real_time_clock()
        self.threads = InlineThreads()
        self.events: list[dict[str, Any]] = []
        self.certs = CertDirectory(directory, clock=self.clock, run_in_thread=self.threads)
        self.certs._log = Logger(observer=self.events.append)  # type: ignore[misc]

    def write(self, name: str, names: list[str], **kwargs: Any) -> None:
        cert, key = ISSUER.issue(names, **kwargs)
        replace_file(self.directory / name, cert_pem(cert) + key_pem(key) + ISSUER.pem)

    def poll(self) -> None:
        self.clock.advance(SCAN_INTERVAL)

    def lookup(self, name: str) -> UserCertificate | None:
        return self.certs.index.lookup(name)

    def messages(self) -> list[str]:
        out = [formatEvent(e) for e in self.events]
        self.events.clear()
        return out


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    directory = tmp_path / "certs"
    directory.mkdir()
    harness = Harness(directory)
    harness.certs.startService()
    yield harness
    harness.certs.stopService()


def test_added_file_is_served_after_one_poll(h: Harness) -> None:
    assert h.lookup("api.example.test") is None
    h.write("api.example.test.pem", ["api.example.test", "www.example.test"])
    assert h.lookup("api.example.test") is None  # not before the next poll
    h.poll()
    found = h.lookup("api.example.test")
    assert found is not None and found.names == ("api.example.test", "www.example.test")
    assert h.lookup("www.example.test") is found
    assert found.source == "api.example.test.pem"
    assert h.messages() == [
        f"cert dir: loaded api.example.test.pem for api.example.test, www.example.test, valid until "
        f"{found.not_after:%Y-%m-%d %H:%M} UTC"
    ]


def test_names_come_from_the_certificate_not_the_file_name(h: Harness) -> None:
    h.write("whatever.pem", ["api.example.test", "127.0.0.1"])
    h.poll()
    assert h.lookup("api.example.test") is not None
    assert h.lookup("127.0.0.1") is not None
    assert h.lookup("whatever") is None


def test_replaced_file_is_served_and_unchanged_files_are_not_reread(h: Harness) -> None:
    h.write("api.pem", ["api.example.test"])
    h.poll()
    first = h.lookup("api.example.test")
    h.poll()
    assert h.lookup("api.example.test") is first
    h.write("api.pem", ["api.example.test"])
    h.poll()
    second = h.lookup("api.example.test")
    assert second is not None and first is not None and second.fingerprint != first.fingerprint


def test_in_place_same_size_rewrite_within_one_mtime_tick_is_seen(h: Harness) -> None:
    def padded_certificate() -> bytes:
        cert, key = ISSUER.issue(["api.example.test"])
        return (cert_pem(cert) + key_pem(key)).ljust(2048, b"\n")

    path = h.directory / "api.pem"
    path.write_bytes(padded_certificate())
    h.poll()
    first = h.lookup("api.example.test")
    before = os.stat(path)
    # Same inode, same size, same mtime (as when both writes land in one file system clock tick).
    path.write_bytes(padded_certificate())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    h.poll()
    second = h.lookup("api.example.test")
    assert first is not None and second is not None and second.fingerprint != first.fingerprint


def test_touch_without_change_does_not_reload_or_log(h: Harness) -> None:
    h.write("api.pem", ["api.example.test"])
    h.poll()
    first = h.lookup("api.example.test")
    h.messages()
    os.utime(h.directory / "api.pem")
    h.poll()
    assert h.lookup("api.example.test") is first
    assert h.messages() == []


def test_removed_file_stops_being_served(h: Harness) -> None:
    h.write("api.pem", ["api.example.test"])
    h.poll()
    h.messages()
    (h.directory / "api.pem").unlink()
    h.poll()
    assert h.lookup("api.example.test") is None
    assert h.messages() == ["cert dir: api.pem removed, no longer serving api.example.test"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"garbage", "no PEM certificate found"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "api.pem: unreadable CERTIFICATE block"),
        ("cert-only", "no private key found"),
        ("wrong-key", "the private key does not match any certificate in it"),
        ("two-keys", "more than one private key"),
        ("encrypted", "api.pem: the private key is encrypted"),
        ("expired", "certificate expired on "),
    ],
)
def test_bad_replacement_is_one_log_line_and_the_previous_keeps_serving(
    h: Harness, content: bytes | str, reason: str
) -> None:
    h.write("api.pem", ["api.example.test"])
    h.poll()
    good = h.lookup("api.example.test")
    h.messages()
    cert, key = ISSUER.issue(["api.example.test"])
    other_key = ISSUER.issue(["x.test"])[1]
    data = {
        "cert-only": cert_pem(cert),
        "wrong-key": cert_pem(cert) + key_pem(other_key),
        "two-keys": cert_pem(cert) + key_pem(key) + key_pem(other_key),
        "encrypted": cert_pem(cert)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        "expired": None,
    }.get(content, content) if isinstance(content, str) else content
    if content == "expired":
        expired, expired_key = ISSUER.issue(["api.example.test"], not_after=clock_now(h.clock) - timedelta(days=1))
        data = cert_pem(expired) + key_pem(expired_key)
    assert isinstance(data, bytes)
    replace_file(h.directory / "api.pem", data)
    for _ in range(3):
        h.poll()
    assert h.lookup("api.example.test") is good
    messages = h.messages()
    assert len(messages) == 1, messages
    assert messages[0].startswith("cert dir: cannot use api.pem: ")
    assert reason in messages[0]
    assert messages[0].endswith("; still serving its previous version")
    # Fixed: served again.
    h.write("api.pem", ["api.example.test"])
    h.poll()
    fixed = h.lookup("api.example.test")
    assert fixed is not None and fixed is not good


def test_bad_new_file_is_not_served(h: Harness) -> None:
    (h.directory / "new.pem").write_bytes(b"nonsense")
    h.poll()
    assert h.certs.index.count() == 0
    assert h.messages() == ["cert dir: cannot use new.pem: no PEM certificate found; not served"]


def test_crt_and_key_pair_and_mkcert_naming(h: Harness) -> None:
    cert, key = ISSUER.issue(["pair.example.test"])
    (h.directory / "pair.crt").write_bytes(cert_pem(cert) + ISSUER.pem)
    (h.directory / "pair.key").write_bytes(key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL))
    cert2, key2 = ISSUER.issue(["mk.example.test", "*.mk.example.test"])
    (h.directory / "mk.example.test+1.pem").write_bytes(cert_pem(cert2))
    (h.directory / "mk.example.test+1-key.pem").write_bytes(key_pem(key2))
    h.poll()
    pair = h.lookup("pair.example.test")
    assert pair is not None and pair.source == "pair.crt+pair.key"
    mk = h.lookup("a.mk.example.test")
    assert mk is not None and mk.source == "mk.example.test+1-key.pem+mk.example.test+1.pem"


def test_rsa_and_chain_in_any_order(h: Harness) -> None:
    cert, key = ISSUER.issue(["rsa.example.test"], rsa_key=True)
    (h.directory / "rsa.pem").write_bytes(key_pem(key) + ISSUER.pem + cert_pem(cert))
    h.poll()
    assert h.lookup("rsa.example.test") is not None


def test_key_alone_is_reported(h: Harness) -> None:
    _, key = ISSUER.issue(["x.example.test"])
    (h.directory / "lonely.key").write_bytes(key_pem(key))
    h.poll()
    [message] = h.messages()
    assert "cannot use lonely.key: a key without a certificate" in message


def test_hidden_and_unrelated_files_are_ignored(h: Harness) -> None:
    (h.directory / ".api.pem.swp").write_bytes(b"junk")
    (h.directory / "README.txt").write_bytes(b"junk")
    (h.directory / "sub.pem").mkdir()
    h.poll()
    assert h.messages() == []


def test_wildcard_covers_exactly_one_label_and_exact_wins(h: Harness) -> None:
    h.write("wild.pem", ["*.example.test"])
    h.write("api.pem", ["api.example.test"])
    h.poll()
    wild, exact = h.lookup("www.example.test"), h.lookup("api.example.test")
    assert wild is not None and wild.source == "wild.pem"
    assert exact is not None and exact.source == "api.pem"
    assert h.lookup("example.test") is None
    assert h.lookup("a.b.example.test") is None
    assert h.lookup("www.other.test") is None


def test_partial_wildcards_are_not_names() -> None:
    cert, _ = ISSUER.issue(["f*.example.test", "*.*.example.test", "*.ok.test", "plain.test"])
    assert certificate_names(cert) == ("*.ok.test", "plain.test")


def test_cn_is_used_only_without_san() -> None:
    cert, _ = ISSUER.issue(["cn-only.example.test"], with_san=False)
    assert certificate_names(cert) == ("cn-only.example.test",)
    cert, _ = ISSUER.issue(["san.example.test"], common_name="cn.example.test")
    assert certificate_names(cert) == ("san.example.test",)


def test_default_certificate(h: Harness) -> None:
    h.write("default.pem", ["fallback.example.test"])
    h.poll()
    default = h.certs.index.default
    assert default is not None and default.is_default
    assert h.lookup("fallback.example.test") is default
    assert h.lookup("unknown.example.test") is None


def test_two_files_for_one_name_the_later_expiry_wins(h: Harness) -> None:
    now = clock_now(h.clock)
    h.write("a-old.pem", ["api.example.test"], not_after=now + timedelta(days=10))
    h.write("b-new.pem", ["api.example.test"], not_after=now + timedelta(days=20))
    h.poll()
    winner = h.lookup("api.example.test")
    assert winner is not None and winner.source == "b-new.pem"
    assert any("api.example.test: served from b-new.pem (expires last), not from a-old.pem" in m for m in h.messages())


def test_certificate_expiring_while_loaded_is_dropped(h: Harness) -> None:
    h.write("short.pem", ["short.example.test"], not_after=clock_now(h.clock) + timedelta(hours=1))
    h.poll()
    assert h.lookup("short.example.test") is not None
    h.messages()
    h.clock.advance(3600)
    assert h.lookup("short.example.test") is None
    [message] = h.messages()
    assert message.startswith("cert dir: short.pem expired on ")


def test_directory_missing_then_created(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "later")
    harness.certs.startService()
    harness.poll()
    [message] = harness.messages()
    assert "cert dir " in message and "No such file or directory" in message
    harness.directory.mkdir()
    harness.write("api.pem", ["api.example.test"])
    harness.poll()
    assert harness.lookup("api.example.test") is not None
    harness.certs.stopService()


def test_directory_vanishing_keeps_the_loaded_certificates(h: Harness) -> None:
    h.write("api.pem", ["api.example.test"])
    h.poll()
    (h.directory / "api.pem").rename(h.directory.parent / "api.pem")
    h.directory.rmdir()
    h.poll()
    h.poll()
    assert h.lookup("api.example.test") is not None
    assert sum("still serving the 1 certificates loaded before" in m for m in h.messages()) == 1


def test_scans_run_in_the_thread_and_polls_wait_for_a_slow_scan(h: Harness) -> None:
    assert h.threads.calls == ["scan_directory"]  # startService scanned at once
    h.threads.paused = True
    h.write("api.pem", ["api.example.test"])
    h.poll()
    assert h.threads.held == 1
    h.poll()
    h.poll()
    assert h.threads.held == 1  # LoopingCall waits for the scan in flight
    assert h.lookup("api.example.test") is None  # nothing swapped in before the thread is done
    h.threads.release()
    assert h.lookup("api.example.test") is not None


def test_stop_waits_for_the_scan_in_flight(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    harness.threads.paused = True
    harness.certs.startService()
    stopped = harness.certs.stopService()
    assert not stopped.called
    harness.threads.release()
    assert stopped.called
    harness.clock.advance(10 * SCAN_INTERVAL)
    assert harness.threads.held == 0


def test_empty_index() -> None:
    index, conflicts = CertIndex.build([])
    assert index.lookup("a.test") is None and index.default is None and conflicts == [] and index.count() == 0
