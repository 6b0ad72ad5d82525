"""End to end ACME: the real `twistd -n labelgw` gets certificates from a real ACME server, Pebble (Debian's
``pebble``, Let's Encrypt's test server), with both challenge types; renewal of short-lived certificates; an ACME
server that is down; a restart that reuses the stored certificate.

Pebble validates against labelgw's loopback ports (its config's httpPort and tlsPort) and resolves every name to
127.0.0.1 through a DNS stub (tests/support/dnsstub.py). Routes are static services of a config file (``docker:
false``), whose host is public (api.example.com); their backend is a whoami on loopback. Loopback only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import LOOPBACK, free_port, http_get, is_ci
from support.gateway import TwistdProcess, labelgw_args
from support.pebble import PebbleServer, pebble_binary

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for end-to-end tests)

NAME = "api.example.com"


@pytest.fixture(autouse=True)
def _needs_pebble() -> None:
    if pebble_binary() is None:
        if is_ci():
            pytest.fail("CI=true and pebble is not installed (./scripts/test installs it)", pytrace=False)
        pytest.skip("pebble is not installed (apt-get install pebble)")


@pytest.fixture
def backend() -> Iterator[int]:
    """A whoami on loopback: the route's backend."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--port", str(port), "--name", "api-1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield port
    process.terminate()
    process.wait(10)


class Setup:
    """Ports chosen first: Pebble must know labelgw's, and labelgw Pebble's."""

    def __init__(self, tmp_path: Path, backend: int) -> None:
        self.tmp_path = tmp_path
        self.backend = backend
        self.http_port = free_port()
        self.https_port = free_port()
        self.pebble: PebbleServer | None = None
        self.gateways: list[TwistdProcess] = []
        self._count = 0

    def start_pebble(self, validity_seconds: int | None = None, port: int | None = None,
                     directory: Path | None = None) -> PebbleServer:
        self.pebble = PebbleServer(
            directory or self.tmp_path / f"pebble-{self._count}", http_port=self.http_port, tls_port=self.https_port,
            validity_seconds=validity_seconds, port=port,
        )
        self._count += 1
        return self.pebble

    def start_gateway(self, *extra: str, directory: str | None = None, ca_bundle: Path | None = None,
                      retry_base: float = 300.0, docker_host: str | None = None) -> TwistdProcess:
        cwd = self.tmp_path / "gateway"
        cwd.mkdir(exist_ok=True)
        static = (
            "docker: false\n"
            "services:\n"
            "  api:\n"
            f"    hosts: [{NAME}]\n"
            f"    backends: [\"{LOOPBACK}:{self.backend}\"]\n"
        )
        (cwd / "labelgw.yml").write_text(f"acme_retry_base: {retry_base}\n" + (static if docker_host is None else ""))
        assert self.pebble is not None or directory is not None
        args = labelgw_args(self.http_port, docker_host, [
            "--config", "labelgw.yml",
            "--https", f"tcp:{self.https_port}:interface={LOOPBACK}",
            "--acme-email", "ops@example.com",
            "--acme-directory", directory or self.pebble.directory_url,  # type: ignore[union-attr]
            "--acme-ca-bundle", str(ca_bundle or self.pebble.ca_bundle),  # type: ignore[union-attr]
            *extra,
        ])
        gateway = TwistdProcess(args, port=self.http_port, cwd=cwd)
        self.gateways.append(gateway)
        gateway.wait_until_listening()
        return gateway

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        if self.pebble is not None:
            self.pebble.stop()

    def root_file(self) -> Path:
        assert self.pebble is not None
        path = self.tmp_path / f"pebble-root-{self._count}.pem"
        path.write_bytes(self.pebble.root_pem())
        return path


@pytest.fixture
def setup(tmp_path: Path, backend: int) -> Iterator[Setup]:
    s = Setup(tmp_path, backend)
    yield s
    s.close()


def served_certificate(port: int, name: str, cafile: Path | None = None, alpn: list[str] | None = None) -> x509.Certificate:
    """The certificate labelgw serves for SNI C{name}; with C{cafile}, verified (chain and host name) or an error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is not None:
        context.load_verify_locations(cafile=str(cafile))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def https_get(port: int, name: str, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def acme_view(gateway: TwistdProcess) -> dict[str, Any]:
    assert gateway.admin_url is not None
    with urllib.request.urlopen(gateway.admin_url + "/acme", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_certificate_issued_by_pebble_and_served(setup: Setup, challenge: str) -> None:
    setup.start_pebble()
    gateway = setup.start_gateway("--acme-challenge", challenge)
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    root = setup.root_file()
    # Verified against Pebble's root only: the chain (leaf and intermediate) and the host name.
    certificate = served_certificate(setup.https_port, NAME, cafile=root)
    assert certificate.issuer != certificate.subject
    view = acme_view(gateway)["names"][NAME]
    assert view["status"] == "valid"
    assert view["serving"] == "acme"
    assert view["last_challenge"] == challenge
    # The proxy works over it, verified like a browser would.
    assert b"api-1" in https_get(setup.https_port, NAME, root)
    # Files: the account key and the certificate key are 0600.
    state = gateway.state_dir
    assert state is not None
    keys = list((state / "acme").rglob("*key.pem"))
    assert len(keys) == 2, keys
    for key in keys:
        assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_short_lived_certificates_are_renewed_before_they_expire(setup: Setup) -> None:
    # 30-second certificates: renewed with a third of their lifetime left, i.e. about every 20 s.
    setup.start_pebble(validity_seconds=30)
    gateway = setup.start_gateway("--acme-challenge", "http-01")
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    root = setup.root_file()
    first = fingerprint(served_certificate(setup.https_port, NAME, cafile=root))
    mark = gateway.log_mark()
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90, since=mark)
    second = served_certificate(setup.https_port, NAME, cafile=root)
    assert fingerprint(second) != first
    assert acme_view(gateway)["names"][NAME]["orders"] >= 2


def test_an_acme_server_that_is_down_leaves_the_default_certificate_and_is_retried_with_backoff(
    setup: Setup,
) -> None:
    pebble_dir = setup.tmp_path / "pebble-late"
    pebble_port = free_port()
    from support.pebble import prepare_tls_material

    ca_bundle = prepare_tls_material(pebble_dir)[0]
    gateway = setup.start_gateway(
        directory=f"https://{LOOPBACK}:{pebble_port}/dir", ca_bundle=ca_bundle, retry_base=3.0,
    )
    gateway.wait_for_log(f"ACME: no certificate for {NAME}", timeout=30)
    view = acme_view(gateway)["names"][NAME]
    assert view["status"] == "failed"
    assert view["serving"] == "default"
    assert "Connection refused" in view["last_error"] or "refused" in view["last_error"].lower(), view
    # Meanwhile the route is served with the default certificate (the local CA's localhost leaf).
    default = served_certificate(setup.https_port, NAME)
    assert NAME not in str(default.subject)
    assert b"api-1" in https_get_unverified(setup.https_port, NAME)
    # Retries back off (3 s, 6 s, 12 s ...): a handful of attempts, not a storm.
    time.sleep(8)
    attempts = gateway.log_text().count(f"ACME: ordering {NAME}")
    assert 2 <= attempts <= 4, attempts
    # The server comes up: a later retry gets the certificate.
    setup.start_pebble(port=pebble_port, directory=pebble_dir)
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    served_certificate(setup.https_port, NAME, cafile=setup.root_file())


def https_get_unverified(port: int, name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


def test_a_restart_reuses_the_stored_certificate_without_a_new_order(setup: Setup) -> None:
    setup.start_pebble()
    gateway = setup.start_gateway()
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    root = setup.root_file()
    before = fingerprint(served_certificate(setup.https_port, NAME, cafile=root))
    gateway.stop()
    again = setup.start_gateway()
    again.wait_for_log(f"ACME certificate for {NAME} loaded from the state directory", timeout=30)
    assert fingerprint(served_certificate(setup.https_port, NAME, cafile=root)) == before
    time.sleep(3)  # a scan or two
    assert "ACME: ordering" not in again.log_text()
    view = acme_view(again)["names"][NAME]
    assert view["status"] == "valid" and view["orders"] == 0


def test_a_labelled_container_gets_a_certificate_and_tls_local_opts_out(
    setup: Setup, containers: Any, unique_name: Any,
) -> None:
    from support import docker_host_url

    service = unique_name("acme").replace("_", "-")
    public = f"{service}.example.com"
    opted_out = f"{service}-local.example.com"
    for host, extra in ((public, {}), (opted_out, {"labelgw.tls": "local"})):
        port = free_port()
        labels = {"labelgw.service": host.split(".")[0], "labelgw.port": str(port), "labelgw.host": host, **extra}
        container = containers.python(
            ["-m", "labelgw.tools.whoami", "--port", str(port), "--name", host.split(".")[0]], labels=labels
        )
        containers.wait_serving(container, port)
    setup.start_pebble()
    gateway = setup.start_gateway("--acme-challenge", "tls-alpn-01", docker_host=docker_host_url())
    gateway.wait_for_log(f"ACME: certificate for {public} issued", timeout=90)
    root = setup.root_file()
    served_certificate(setup.https_port, public, cafile=root)
    names = acme_view(gateway)["names"]
    assert opted_out not in names
    assert f"ordering {opted_out}" not in gateway.log_text()
