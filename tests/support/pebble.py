"""Pebble, Let's Encrypt's test ACME server (Debian's ``pebble`` package), for end-to-end ACME tests.

L{PebbleServer} writes a config (listening on loopback only, validating against labelgw's HTTP and HTTPS
ports), makes the TLS certificate of Pebble's own API (signed by a throwaway CA: ``ca_bundle`` is what labelgw gets
as ``--acme-ca-bundle``), starts the DNS stub (tests/support/dnsstub.py: every name is 127.0.0.1) and Pebble with
``-dnsserver`` pointing at it. ``root_pem()`` fetches the root Pebble issues under, from its management API.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import ipaddress

from .net import LOOPBACK, free_port, port_accepts

PEBBLE = "pebble"


def pebble_binary() -> str | None:
    return shutil.which(PEBBLE)


def _write_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for localhost/127.0.0.1: Pebble's API certificate. Returns (ca, cert, key) paths."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labelgw test: Pebble API CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "api-ca.pem", directory / "api-cert.pem", directory / "api-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


def prepare_tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """Pebble's API certificate in C{directory}, made once: a test can give labelgw the CA bundle before Pebble
    runs (an ACME server that is down at first)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "api-ca.pem", directory / "api-cert.pem", directory / "api-key.pem"
    if all(path.exists() for path in paths):
        return paths
    return _write_tls_material(directory)


class PebbleServer:
    """Pebble plus its DNS stub, as subprocesses; ``stop()`` ends both."""

    def __init__(
        self,
        directory: Path,
        *,
        http_port: int,
        tls_port: int,
        validity_seconds: int | None = None,
        port: int | None = None,
    ) -> None:
        binary = pebble_binary()
        if binary is None:
            raise RuntimeError("pebble is not installed (apt-get install pebble; ./scripts/test installs it)")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.ca_bundle, cert, key = prepare_tls_material(directory)
        config: dict[str, object] = {
            "listenAddress": f"{LOOPBACK}:{self.port}",
            "managementListenAddress": f"{LOOPBACK}:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity_seconds is not None:
            config["certificateValidityPeriod"] = validity_seconds
        self.config_path = directory / "pebble-config.json"
        self.config_path.write_text(json.dumps({"pebble": config}, indent=1))
        self.log_path = directory / "pebble.log"
        self.dns_log_path = directory / "dnsstub.log"
        self._dns_log = open(self.dns_log_path, "wb")
        self.dns = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("dnsstub.py")), str(self.dns_port)],
            stdout=self._dns_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        # No random sleep before validating, no nonces refused at random, a fresh validation for every order.
        env.update({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        self.process = subprocess.Popen(
            [binary, "-config", str(self.config_path), "-dnsserver", f"{LOOPBACK}:{self.dns_port}"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=directory,
        )
        deadline = time.monotonic() + 20
        while not (port_accepts(self.port) and port_accepts(self.management_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pebble did not start:\n{self.log_text()}")
            time.sleep(0.05)

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dir"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _get(self, path: str) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(f"https://{LOOPBACK}:{self.management_port}{path}", context=context, timeout=10) as r:
            return r.read()  # type: ignore[no-any-return]

    def root_pem(self) -> bytes:
        """The root certificate Pebble issues under (it is made anew at every start)."""
        return self._get("/roots/0")

    def stop(self) -> None:
        for process in (self.process, self.dns):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._log.close()
        self._dns_log.close()
