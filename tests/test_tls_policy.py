"""labelgw.tls.policy: Mozilla intermediate, checked with real in-memory handshakes, and the name rules.

The client is the standard library's ssl (system OpenSSL); the server is Twisted's TLS protocol with a
selector serving an ECDSA leaf (minted) or an RSA certificate (a user certificate), so the cipher tests
cover both ECDHE-ECDSA and ECDHE-RSA suites.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer
from test_tls_support import InlineThreads, UserIssuer, cert_pem, handshake, key_pem, real_time_clock

from labelgw.tls.ca import LocalCA
from labelgw.tls.certdir import CertDirectory
from labelgw.tls.policy import (
    INTERMEDIATE,
    TLSPolicy,
    build_server_context,
    is_local_name,
    normalize_server_name,
    wildcard_parent,
)
from labelgw.tls.sni import SNIContextSelector

TLS12 = ssl.TLSVersion.TLSv1_2


@pytest.fixture(scope="module")
def selector(tmp_path_factory: pytest.TempPathFactory) -> SNIContextSelector:
    """ecdsa.localhost: minted EC P-256 leaf; rsa.example.test: an RSA 2048 user certificate."""
    root = tmp_path_factory.mktemp("policy")
    clock, threads = real_time_clock(), InlineThreads()
    cert, key = UserIssuer.create().issue(["rsa.example.test"], rsa_key=True)
    (root / "certs").mkdir()
    (root / "certs" / "rsa.pem").write_bytes(cert_pem(cert) + key_pem(key))
    certs = CertDirectory(root / "certs", clock=clock, run_in_thread=threads)
    certs.scan_now()
    assert certs.index.lookup("rsa.example.test") is not None
    return SNIContextSelector(
        clock=clock,
        run_in_thread=threads,
        is_routed=lambda name: False,
        local_ca=LocalCA.load_or_create(root / "state"),
        cert_dir=certs,
    )


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
@pytest.mark.parametrize("host", ["ecdsa.localhost", "rsa.example.test"])
def test_tls_1_0_and_1_1_are_refused(selector: SNIContextSelector, version: ssl.TLSVersion, host: str) -> None:
    # SECLEVEL=0 lets the (modern) client library even try.
    result = handshake(selector, host, minimum=version, maximum=version, ciphers="ALL:@SECLEVEL=0")
    assert not result.ok
    assert result.error is not None and "PROTOCOL_VERSION" in result.error


@pytest.mark.parametrize(
    ("host", "ciphers"),
    [
        # CBC with ECDHE
        ("ecdsa.localhost", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA"),
        ("rsa.example.test", "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA"),
        # RSA key exchange, even with GCM
        ("rsa.example.test", "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA"),
        # finite-field DHE
        ("rsa.example.test", "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-CHACHA20-POLY1305"),
    ],
)
def test_non_ecdhe_or_cbc_suites_are_refused(selector: SNIContextSelector, host: str, ciphers: str) -> None:
    result = handshake(selector, host, maximum=TLS12, ciphers=ciphers)
    assert not result.ok
    assert result.error is not None and "HANDSHAKE_FAILURE" in result.error


@pytest.mark.parametrize(
    ("host", "cipher"),
    [
        ("ecdsa.localhost", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("ecdsa.localhost", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        ("ecdsa.localhost", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        ("rsa.example.test", "ECDHE-RSA-AES128-GCM-SHA256"),
        ("rsa.example.test", "ECDHE-RSA-AES256-GCM-SHA384"),
        ("rsa.example.test", "ECDHE-RSA-CHACHA20-POLY1305"),
    ],
)
def test_tls12_ecdhe_aead_suites_are_accepted(selector: SNIContextSelector, host: str, cipher: str) -> None:
    result = handshake(selector, host, maximum=TLS12, ciphers=cipher)
    assert result.ok, result.error
    assert (result.version, result.cipher) == ("TLSv1.2", cipher)


def test_client_cipher_order_is_respected(selector: SNIContextSelector) -> None:
    # Mozilla intermediate: server preference off, so a client without AES hardware gets ChaCha20.
    client_order = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
    result = handshake(selector, "ecdsa.localhost", maximum=TLS12, ciphers=client_order)
    assert result.cipher == "ECDHE-ECDSA-CHACHA20-POLY1305"


def test_tls13_is_accepted(selector: SNIContextSelector) -> None:
    result = handshake(selector, "ecdsa.localhost")
    assert result.ok and result.version == "TLSv1.3"
    assert result.cipher in {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.mark.parametrize("curve", ["X25519", "prime256v1", "secp384r1"])
@pytest.mark.parametrize("maximum", [TLS12, ssl.TLSVersion.TLSv1_3])
def test_groups_x25519_p256_p384_are_accepted(
    selector: SNIContextSelector, curve: str, maximum: ssl.TLSVersion
) -> None:
    # The RSA certificate: in TLS 1.2 the client's group list also limits ECDSA certificate curves, so a
    # client offering only X25519 could not take the P-256 leaf whatever the key exchange.
    assert handshake(selector, "rsa.example.test", curve=curve, maximum=maximum).ok


@pytest.mark.parametrize("curve", ["secp521r1", "X448"])
@pytest.mark.parametrize("maximum", [TLS12, ssl.TLSVersion.TLSv1_3])
def test_other_groups_are_refused(
    selector: SNIContextSelector, curve: str, maximum: ssl.TLSVersion
) -> None:
    assert not handshake(selector, "rsa.example.test", curve=curve, maximum=maximum).ok


def test_alpn_default_is_http11_for_a_factory_that_names_no_protocols(selector: SNIContextSelector) -> None:
    # The policy's own ALPN list, used when the protocol factory does not say what it speaks: http/1.1 only.
    # (The gateway's HTTPS factory does say so, h2 and http/1.1: tests/test_e2e_tls.py, tests/test_h2.py.)
    result = handshake(selector, "ecdsa.localhost", alpn=["h2", "http/1.1"])
    assert (result.client_alpn, result.server_alpn) == ("http/1.1", b"http/1.1")
    assert not handshake(selector, "ecdsa.localhost", alpn=["h2"]).server_alpn


def test_alpn_http11_only_client(selector: SNIContextSelector) -> None:
    result = handshake(selector, "rsa.example.test", alpn=["http/1.1"])
    assert (result.client_alpn, result.server_alpn) == ("http/1.1", b"http/1.1")


@pytest.mark.parametrize("offered", [None, ["spdy/3", "acme-tls/1"]])
def test_no_alpn_overlap_still_connects_without_a_protocol(
    selector: SNIContextSelector, offered: list[str] | None
) -> None:
    result = handshake(selector, "ecdsa.localhost", alpn=offered)
    assert result.ok
    assert result.client_alpn is None and result.server_alpn is None


@implementer(IProtocolNegotiationFactory)
class Http11Listener(Factory):
    protocol = Protocol

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def test_the_listener_factory_decides_alpn_when_it_says(selector: SNIContextSelector) -> None:
    # Same certificate contexts, a listener that cannot speak h2 (as twisted.web's Site without h2).
    result = handshake(selector, "ecdsa.localhost", alpn=["h2", "http/1.1"], listener_factory=Http11Listener())
    assert result.server_alpn == b"http/1.1"
    assert not handshake(selector, "ecdsa.localhost", alpn=["h2"], listener_factory=Http11Listener()).server_alpn


def test_context_options() -> None:
    ctx = build_server_context(INTERMEDIATE, None, None)
    conn = SSL.Connection(ctx, None)
    assert set(conn.get_cipher_list()) == {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        *INTERMEDIATE.tls12_ciphers.split(":"),
    }


def test_selector_and_cert_dir_must_share_the_policy(tmp_path: Path) -> None:
    clock, threads = real_time_clock(), InlineThreads()
    certs = CertDirectory(tmp_path, clock=clock, run_in_thread=threads, policy=TLSPolicy(alpn_protocols=(b"h2",)))
    with pytest.raises(ValueError, match="another TLSPolicy"):
        SNIContextSelector(clock=clock, run_in_thread=threads, is_routed=lambda name: False, cert_dir=certs)


def test_alpn_list_is_configurable(tmp_path: Path) -> None:
    clock, threads = real_time_clock(), InlineThreads()
    with_h2 = SNIContextSelector(
        clock=clock,
        run_in_thread=threads,
        is_routed=lambda name: False,
        local_ca=LocalCA.load_or_create(tmp_path),
        policy=TLSPolicy(alpn_protocols=(b"h2", b"http/1.1")),
    )
    # The server's preference wins (h2 first), whatever order the client lists them in.
    result = handshake(with_h2, "api.localhost", alpn=["http/1.1", "h2"])
    assert (result.client_alpn, result.server_alpn) == ("h2", b"h2")


# --- names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"API.Example.TEST", "api.example.test"),
        ("api.localhost.", "api.localhost"),
        ("my_service.localhost", "my_service.localhost"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        (None, None),
        (b"", None),
        ("-bad.test", None),
        ("bad-.test", None),
        ("a..b", None),
        ("a b", None),
        ("a/b.test", None),
        ("*.example.test", None),
        (b"\xff.test", None),
        ("bücher.test", None),
        ("a" * 64 + ".test", None),
        (".".join(["a" * 60] * 5), None),
    ],
)
def test_normalize_server_name(raw: bytes | str | None, expected: str | None) -> None:
    assert normalize_server_name(raw) == expected


@pytest.mark.parametrize(
    ("name", "parent"),
    [
        ("a.example.test", "example.test"),
        ("a.b.example.test", "b.example.test"),
        ("example", None),
        ("127.0.0.1", None),
        ("::1", None),
    ],
)
def test_wildcard_parent_is_one_label_up(name: str, parent: str | None) -> None:
    assert wildcard_parent(name) == parent


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("localhost", True),
        ("api.localhost", True),
        ("a.b.localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("notlocalhost", False),
        ("localhost.example.test", False),
        ("api.test", False),
        ("10.0.0.1", False),
    ],
)
def test_is_local_name(name: str, local: bool) -> None:
    assert is_local_name(name) is local
