"""End to end HTTPS: real handshakes against the real `twistd -n labelgw`, backends in real containers.

Every gateway listens for HTTPS on a free loopback port with its local CA in its own state directory
(tests/support/gateway.py labelgw_args). Clients are Python's ssl module, curl and Debian's trust store.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from support.websocket import assert_echo
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import free_port, http_get, is_ci
from support.gateway import twistd_environment
from support.measurements import record
from support.net import Response
from test_tls_support import UserIssuer, cert_pem, key_pem, replace_file

pytestmark = pytest.mark.docker

LOOPBACK = "127.0.0.1"


# --- clients ------------------------------------------------------------------------------------------------


def client_context(
    cafile: Path | None = None,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Verifying (chain and host name) with C{cafile}; otherwise accepts any certificate, to look at it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is not None:
        context.load_verify_locations(cafile=str(cafile))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@dataclass(frozen=True)
class Handshake:
    certificate: x509.Certificate
    version: str
    cipher: str
    alpn: str | None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def names(self) -> list[str]:
        san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n) for n in san.get_values_for_type(x509.DNSName)]

    @property
    def issuer(self) -> str:
        return self.certificate.issuer.rfc4514_string()


def handshake(port: int, server_name: str | None, context: ssl.SSLContext | None = None) -> Handshake:
    """One TLS handshake to the gateway; C{server_name} None sends no SNI. ssl.SSLError when refused."""
    context = context or client_context()
    with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            cipher = tls.cipher()
            return Handshake(x509.load_der_x509_certificate(der), tls.version() or "", cipher[0] if cipher else "",
                             tls.selected_alpn_protocol())


def https_get(
    port: int, server_name: str, path: str = "/", context: ssl.SSLContext | None = None, timeout: float = 5.0
) -> Response:
    """GET over TLS to 127.0.0.1:port with SNI and Host C{server_name} (no DNS for *.localhost needed)."""
    context = context or client_context()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            response.begin()
            body = response.read()
            return Response(response.status, response.reason, response.getheaders(), body, "HTTP/1.1")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0, log: Callable[[], str] = str) -> Any:
    """Poll C{check} until it returns something truthy; exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except (OSError, AssertionError) as error:
            last = error
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{log()[-3000:]}")


def whoami(containers: Any, service: str, port: int, **labels: str) -> Any:
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), **{f"labelgw.{k}": v for k, v in labels.items()}}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", service], labels=all_labels)
    containers.wait_serving(container, port)
    return container


def routed_over_https(gw: Any, host: str) -> Response:
    return wait_for(
        f"https://{host} to be routed",
        lambda: (r := https_get(gw.https_port, host)).status == 200 and r,
        log=gw.log_text,
    )


def service_name(unique_name: Any, tag: str) -> str:
    return unique_name(tag).replace("-", "")


def write_user_cert(path: Path, issuer: UserIssuer, names: list[str]) -> x509.Certificate:
    certificate, key = issuer.issue(names)
    replace_file(path, cert_pem(certificate) + key_pem(key))
    return certificate


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


# --- certificates ------------------------------------------------------------------------------------------


def test_sni_picks_user_minted_or_default_certificate_and_chains_verify(
    labelgw: Any, containers: Any, unique_name: Any, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    issuer = UserIssuer.create("e2e user CA")
    user = write_user_cert(certs / "user.pem", issuer, ["user.example.test", "*.wild.example.test"])
    service = service_name(unique_name, "tls")
    gw = labelgw("--cert-dir", str(certs))
    assert gw.state_dir is not None
    ca_file = gw.state_dir / "ca.pem"
    port = gw.https_port
    whoami(containers, service, free_port(), host=f"{service}.localhost,{service}.example.test")

    # A routed name under .localhost: minted, the chain verifies against the local CA with host name checks,
    # and the request reaches the backend as HTTPS.
    response = routed_over_https(gw, f"{service}.localhost")
    verified = client_context(ca_file)
    response = https_get(port, f"{service}.localhost", context=verified)
    assert response.status == 200
    assert "X-Forwarded-Proto: https" in response.text, response.text
    minted = handshake(port, f"{service}.localhost", verified)
    assert minted.names == [f"{service}.localhost"] and "labelgw local CA" in minted.issuer

    # A routed name outside .localhost is minted too (only because it is routed).
    assert handshake(port, f"{service}.example.test", verified).names == [f"{service}.example.test"]

    # User certificates from --cert-dir: exact name, and a one-label wildcard.
    wait_for("the cert dir to be loaded", lambda: handshake(port, "user.example.test").fingerprint == fingerprint(user),
             log=gw.log_text)
    assert handshake(port, "a.wild.example.test").fingerprint == fingerprint(user)
    with_user_ca = client_context()
    with_user_ca.load_verify_locations(cadata=issuer.pem.decode())
    with_user_ca.check_hostname, with_user_ca.verify_mode = True, ssl.CERT_REQUIRED
    https_get(port, "user.example.test", context=with_user_ca)  # verifies, whatever the status (404)

    # Unknown names, deeper names than the wildcard and clients without SNI: the default certificate, which
    # without default.pem is a minted leaf for localhost and the loopback IPs.
    default = handshake(port, "nobody.example.test")
    assert default.names == ["localhost"] and "labelgw local CA" in default.issuer
    assert handshake(port, "b.a.wild.example.test").fingerprint == default.fingerprint
    assert handshake(port, None).fingerprint == default.fingerprint
    handshake(port, "localhost", client_context(ca_file))

    # A default.pem dropped into the directory becomes the default for new handshakes.
    chosen_default = write_user_cert(certs / "default.pem", issuer, ["default.example.test"])
    wait_for("default.pem to be served", lambda: handshake(port, "nobody.example.test").fingerprint == fingerprint(chosen_default),
             log=gw.log_text)
    assert handshake(port, None).fingerprint == fingerprint(chosen_default)
    # Names with a minted or user certificate keep theirs.
    assert handshake(port, f"{service}.localhost").names == [f"{service}.localhost"]

    # The CA key is on disk, private, and never in the log.
    key_path = gw.state_dir / "ca-key.pem"
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    key_lines = key_path.read_text().splitlines()[1:-1]
    log = gw.log_text()
    assert "PRIVATE KEY" not in log and not any(line in log for line in key_lines)
    assert f"local CA {ca_file}" in log


def test_rotated_certificate_file_is_served_to_new_handshakes(labelgw: Any, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    issuer = UserIssuer.create()
    first = write_user_cert(certs / "rot.pem", issuer, ["rot.example.test"])
    gw = labelgw("--cert-dir", str(certs), docker_host=None)
    port = gw.https_port
    wait_for("the first certificate", lambda: handshake(port, "rot.example.test").fingerprint == fingerprint(first),
             log=gw.log_text)

    # Replaced the way certbot or a Kubernetes secret update does it: a new file renamed over the old one.
    second = write_user_cert(certs / "rot.pem", issuer, ["rot.example.test"])
    started = time.monotonic()
    wait_for("the rotated certificate", lambda: handshake(port, "rot.example.test").fingerprint == fingerprint(second),
             timeout=10, log=gw.log_text)
    took = time.monotonic() - started
    record("TLS: rotated cert file served to new handshakes after", f"{took:.2f} s (cert dir polled every 2 s)")
    assert took < 8

    # Rewritten in place this time (same inode), with a key and certificate in separate files.
    third, key = issuer.issue(["rot.example.test"])
    (certs / "rot.pem").write_bytes(cert_pem(third))
    (certs / "rot.key").write_bytes(key_pem(key))
    wait_for("the certificate rewritten in place", lambda: handshake(port, "rot.example.test").fingerprint == fingerprint(third),
             timeout=10, log=gw.log_text)

    # A broken file: one log line naming it, and the previous certificate keeps serving.
    mark = gw.log_mark()
    (certs / "rot.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    gw.wait_for_log("cannot use rot.key+rot.pem", timeout=10, since=mark)
    assert "still serving its previous version" in gw.log_text()[mark:]
    assert handshake(port, "rot.example.test").fingerprint == fingerprint(third)

    # Removed: the name falls back to the default certificate.
    (certs / "rot.pem").unlink()
    (certs / "rot.key").unlink()
    wait_for("the removal", lambda: handshake(port, "rot.example.test").names == ["localhost"], timeout=10,
             log=gw.log_text)


def test_tls_strict_refuses_unknown_names(labelgw: Any) -> None:
    gw = labelgw("--tls-strict", docker_host=None)
    port = gw.https_port
    for name in ("nobody.example.test", None):
        with pytest.raises(ssl.SSLError, match="ALERT"):
            handshake(port, name)
    # Local names still get a minted certificate.
    assert handshake(port, "anything.localhost").names == ["anything.localhost"]


# --- policy ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_policy_mozilla_intermediate(labelgw: Any) -> None:
    gw = labelgw(docker_host=None)
    port = gw.https_port
    name = "policy.localhost"
    # Old protocol versions: the client offers them (security level 0 lets it), the server says no with an
    # alert, which proves the refusal is the server's.
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        old = client_context(minimum=version, maximum=version, ciphers="DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            handshake(port, name, old)
    tls12 = ssl.TLSVersion.TLSv1_2
    refused = {
        "RSA key exchange": "AES128-GCM-SHA256:AES256-GCM-SHA384",
        "DHE key exchange": "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-CHACHA20-POLY1305",
        "CBC": "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA",
    }
    for what, ciphers in refused.items():
        with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):
            handshake(port, name, client_context(maximum=tls12, ciphers=f"{ciphers}:@SECLEVEL=0"))
            pytest.fail(f"{what} accepted")
    for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        done = handshake(port, name, client_context(maximum=tls12, ciphers=cipher))
        assert (done.version, done.cipher) == ("TLSv1.2", cipher)
    assert handshake(port, name).version == "TLSv1.3"
    # ALPN: h2 for a client that offers it, http/1.1 for one that offers only that.
    assert handshake(port, name, client_context(alpn=["h2", "http/1.1"])).alpn == "h2"
    assert handshake(port, name, client_context(alpn=["http/1.1"])).alpn == "http/1.1"


# --- proxying over TLS -----------------------------------------------------------------------------------


def test_wss_echo_through_tls(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = service_name(unique_name, "wss")
    host = f"{service}.localhost"
    whoami(containers, service, free_port())
    routed_over_https(gw, host)
    context = client_context(gw.state_dir / "ca.pem", alpn=["http/1.1"])
    with socket.create_connection((LOOPBACK, gw.https_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            assert_echo(sock, host, [b"hello over TLS", b"x" * 100])


def test_redirect_to_https_by_label_and_globally(labelgw: Any, containers: Any, unique_name: Any) -> None:
    secure, open_ = service_name(unique_name, "sec"), service_name(unique_name, "open")
    by_label = labelgw()
    everything = labelgw("--redirect-https")
    whoami(containers, secure, free_port(), tls="redirect")
    whoami(containers, open_, free_port(), tls="off")
    for gw in (by_label, everything):
        routed_over_https(gw, f"{secure}.localhost")
        routed_over_https(gw, f"{open_}.localhost")

    # The labelled route: plain HTTP gets a 308 to the same path and query on the HTTPS port; HTTPS is served.
    answer = http_get(by_label.base_url + "/some/path?q=1&r=%20", host=f"{secure}.localhost:{by_label.port}")
    assert answer.status == 308
    assert answer.header("Location") == f"https://{secure}.localhost:{by_label.https_port}/some/path?q=1&r=%20"
    assert https_get(by_label.https_port, f"{secure}.localhost", "/some/path?q=1").status == 200
    # Without the label (and without --redirect-https): served over plain HTTP.
    assert http_get(by_label.base_url, host=f"{open_}.localhost").status == 200
    assert http_get(by_label.base_url, host="unknown.localhost").status == 404

    # --redirect-https: every plain request, routed or not, except routes labelled tls=off.
    answer = http_get(everything.base_url + "/x", host=f"{secure}.localhost")
    assert (answer.status, answer.header("Location")) == (308, f"https://{secure}.localhost:{everything.https_port}/x")
    answer = http_get(everything.base_url + "/y?z", host="unknown.localhost")
    assert (answer.status, answer.header("Location")) == (308, f"https://unknown.localhost:{everything.https_port}/y?z")
    assert http_get(everything.base_url, host=f"{open_}.localhost").status == 200


# --- the CA install command -------------------------------------------------------------------------------


def _can_change_trust_store() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to change the system trust store"
    for tool in ("update-ca-certificates", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not Path("/usr/local/share/ca-certificates").is_dir():
        return "no /usr/local/share/ca-certificates"
    return None


def _ca_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "labelgw", "ca", *args],
        capture_output=True, text=True, env=twistd_environment(), timeout=120, check=False,
    )


def _curl(url: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
    # No -k, no --cacert: only the system trust store.
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{port}:{LOOPBACK}", url],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_ca_install_makes_curl_trust_the_gateway_without_k(labelgw: Any, containers: Any, unique_name: Any) -> None:
    problem = _can_change_trust_store()
    if problem is not None:
        if is_ci():
            pytest.fail(f"CI=true but {problem}")
        pytest.skip(problem)
    gw = labelgw()
    service = service_name(unique_name, "curl")
    host = f"{service}.localhost"
    whoami(containers, service, free_port())
    routed_over_https(gw, host)
    url = f"https://{host}:{gw.https_port}/"
    state_dir = str(gw.state_dir)

    before = _curl(url, host, gw.https_port)
    assert before.returncode == 60, before  # SSL certificate problem: unable to get local issuer certificate
    try:
        installed = _ca_command("--install", "--state-dir", state_dir)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        trusted = _curl(url, host, gw.https_port)
        assert trusted.returncode == 0, trusted.stderr
        assert f"X-Whoami: {service}" in trusted.stdout or service in trusted.stdout
    finally:
        removed = _ca_command("--uninstall", "--state-dir", state_dir)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not Path("/usr/local/share/ca-certificates/labelgw-local-ca.crt").exists()
    assert _curl(url, host, gw.https_port).returncode == 60
