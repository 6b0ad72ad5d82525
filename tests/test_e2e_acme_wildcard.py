"""End to end ACME on a wildcard route: the real `twistd -n labelgw` with a static service on
``*.apps.example.com`` and Pebble; a handshake naming a concrete name under it gets that name its own
certificate (HTTP-01), at most --acme-on-demand-max names per wildcard. Loopback only (tests/test_e2e_acme.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support import LOOPBACK
from support.gateway import TwistdProcess, labelgw_args
from test_e2e_acme import Setup, _needs_pebble, backend, https_get, served_certificate, setup, wait_for  # noqa: F401

pytestmark = pytest.mark.docker

WILDCARD = "*.apps.example.com"


def start_wildcard_gateway(setup: Setup, *extra: str) -> TwistdProcess:
    cwd = setup.tmp_path / "gateway"
    cwd.mkdir(exist_ok=True)
    (cwd / "labelgw.yml").write_text(
        "docker: false\n"
        "services:\n"
        "  apps:\n"
        f"    hosts: ['{WILDCARD}']\n"
        f"    backends: [\"{LOOPBACK}:{setup.backend}\"]\n"
    )
    assert setup.pebble is not None
    args = labelgw_args(setup.http_port, None, [
        "--config", "labelgw.yml",
        "--https", f"tcp:{setup.https_port}:interface={LOOPBACK}",
        "--acme-email", "ops@example.com",
        "--acme-directory", setup.pebble.directory_url,
        "--acme-ca-bundle", str(setup.pebble.ca_bundle),
        "--acme-challenge", "http-01",
        *extra,
    ])
    gateway = TwistdProcess(args, port=setup.http_port, cwd=cwd)
    setup.gateways.append(gateway)
    gateway.wait_until_listening()
    return gateway


def issuer_of(port: int, name: str) -> Any:
    return served_certificate(port, name).issuer


def test_names_under_a_wildcard_route_get_their_own_certificate_on_demand_bounded(setup: Setup) -> None:
    setup.start_pebble()
    gateway = start_wildcard_gateway(setup, "--acme-on-demand-max", "2")
    # Before any handshake nothing is ordered: the wildcard itself needs DNS-01.
    first = served_certificate(setup.https_port, "a.apps.example.com")
    assert "labelgw" in first.issuer.rfc4514_string()
    served_certificate(setup.https_port, "b.apps.example.com")
    served_certificate(setup.https_port, "c.apps.example.com")  # past the bound: never ordered
    served_certificate(setup.https_port, "x.a.apps.example.com")  # not one label under the wildcard
    gateway.wait_for_log("ACME: certificate for a.apps.example.com issued", timeout=90)
    gateway.wait_for_log("ACME: certificate for b.apps.example.com issued", timeout=90)
    assert "acme_on_demand_max" in gateway.log_text()
    root = setup.root_file()
    # Verified against Pebble's root with the host name: the certificate names a.apps.example.com itself.
    certificate = served_certificate(setup.https_port, "a.apps.example.com", cafile=root)
    assert certificate.issuer != certificate.subject
    assert b"api-1" in https_get(setup.https_port, "b.apps.example.com", root)
    log = gateway.log_text()
    assert "certificate for c.apps.example.com issued" not in log
    assert "ACME: x.a.apps.example.com asked for" not in log and "ACME: c.apps.example.com asked for" not in log
