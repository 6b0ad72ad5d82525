"""End to end ACME with `--workers 2`: the real `twistd -n labelgw` and Pebble (tests/test_e2e_acme.py). The
supervisor orders (the workers never talk to Pebble), Pebble validates against the listeners the workers serve
(HTTP-01 and TLS-ALPN-01, on both TLS engines), and every worker serves the certificate, verified against Pebble's
root: each worker in turn, the other one paused with SIGSTOP so that the shared accept queue has one taker; a worker
restarted after a SIGKILL and a reloaded generation get the certificate too, and so does a renewal. On-demand names
under a wildcard route: the handshake lands on a worker, which asks the supervisor. Loopback only; bounded loops."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from support.gateway import TwistdProcess
from test_e2e_acme import (  # noqa: F401 - fixtures
    NAME,
    Setup,
    _needs_pebble,
    acme_view,
    backend,
    fingerprint,
    https_get,
    served_certificate,
    setup,
)

pytestmark = pytest.mark.docker

CONNECTIONS = 6


def admin_json(gateway: TwistdProcess, path: str) -> Any:
    assert gateway.admin_url is not None
    with urllib.request.urlopen(gateway.admin_url + path, timeout=10) as response:
        return json.loads(response.read())


def worker_pids(gateway: TwistdProcess) -> dict[int, int]:
    return {w["id"]: w["pid"] for w in admin_json(gateway, "/workers")["workers"] if w["state"] == "ready"}


def wait_workers_ready(gateway: TwistdProcess, since: int = 0) -> None:
    for index in (1, 2):
        gateway.wait_for_log(f"worker {index} ready", timeout=60, since=since)


@contextmanager
def paused(pid: int) -> Iterator[None]:
    """The worker stopped (SIGSTOP): it accepts nothing meanwhile, the other worker takes every connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def check_each_worker_serves(setup: Setup, gateway: TwistdProcess, expected: str) -> None:
    """Each worker alone (the other paused): CONNECTIONS handshakes, each chain verified against Pebble's root, each
    the certificate with fingerprint C{expected}, and a request through it."""
    root = setup.root_file()
    pids = worker_pids(gateway)
    assert sorted(pids) == [1, 2], pids
    for serving, other in ((1, 2), (2, 1)):
        with paused(pids[other]):
            for _ in range(CONNECTIONS):
                certificate = served_certificate(setup.https_port, NAME, cafile=root)
                assert fingerprint(certificate) == expected, f"worker {serving}"
            assert b"api-1" in https_get(setup.https_port, NAME, root)


@pytest.mark.parametrize(
    ("challenge", "engine"), [("http-01", "stdlib"), ("tls-alpn-01", "stdlib"), ("tls-alpn-01", "openssl")]
)
def test_workers_serve_the_certificate_the_supervisor_got_from_pebble(
    setup: Setup, challenge: str, engine: str,
) -> None:
    setup.start_pebble()
    gateway = setup.start_gateway("--workers", "2", "--acme-challenge", challenge, "--tls-engine", engine)
    wait_workers_ready(gateway)
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    gateway.wait_for_log(f"ACME: certificate for {NAME} pushed to the workers", timeout=10)
    root = setup.root_file()
    issued = served_certificate(setup.https_port, NAME, cafile=root)
    assert issued.issuer != issued.subject
    expected = fingerprint(issued)
    check_each_worker_serves(setup, gateway, expected)
    # The supervisor's view: one order, valid, by this challenge; the workers ordered nothing.
    view = acme_view(gateway)["names"][NAME]
    assert view["status"] == "valid" and view["serving"] == "acme" and view["last_challenge"] == challenge
    assert view["orders"] == 1
    log = gateway.log_text()
    assert log.count(f"ACME: ordering {NAME} with") == 1
    assert not any(line for line in log.splitlines() if " worker" in line and "ACME: ordering" in line)
    assert "did not acknowledge" not in log

    # A worker killed: its replacement starts with the certificate (from the supervisor, not from Pebble).
    pids = worker_pids(gateway)
    mark = gateway.log_mark()
    os.kill(pids[1], signal.SIGKILL)
    gateway.wait_for_log("worker 1 ready", timeout=60, since=mark)
    assert worker_pids(gateway)[1] != pids[1]
    check_each_worker_serves(setup, gateway, expected)
    # A reload (SIGHUP): a new generation of both, with the certificate.
    mark = gateway.log_mark()
    os.kill(gateway.pid, signal.SIGHUP)
    gateway.wait_for_log("reload: generation 2 serving", timeout=60, since=mark)
    check_each_worker_serves(setup, gateway, expected)
    assert gateway.log_text().count(f"ACME: ordering {NAME} with") == 1


def test_on_demand_names_asked_by_a_worker_are_ordered_by_the_supervisor(setup: Setup) -> None:
    from test_e2e_acme_wildcard import start_wildcard_gateway

    setup.start_pebble()
    gateway = start_wildcard_gateway(setup, "--workers", "2", "--acme-on-demand-max", "1")
    wait_workers_ready(gateway)
    first = served_certificate(setup.https_port, "a.apps.example.com")
    assert "labelgw" in first.issuer.rfc4514_string()  # the fallback until it is issued
    gateway.wait_for_log("ACME: certificate for a.apps.example.com issued", timeout=90)
    served_certificate(setup.https_port, "b.apps.example.com")  # past the bound of 1
    root = setup.root_file()
    certificate = served_certificate(setup.https_port, "a.apps.example.com", cafile=root)
    assert certificate.issuer != certificate.subject
    gateway.wait_for_log("acme_on_demand_max", timeout=10)
    assert "certificate for b.apps.example.com issued" not in gateway.log_text()


def test_a_renewal_reaches_every_worker(setup: Setup) -> None:
    # 60-second certificates: renewed by the supervisor with a third of their lifetime left (about every 40 s: the
    # checks after a renewal finish well before the next one).
    setup.start_pebble(validity_seconds=60)
    gateway = setup.start_gateway("--workers", "2", "--acme-challenge", "http-01")
    wait_workers_ready(gateway)
    gateway.wait_for_log(f"ACME: certificate for {NAME} issued", timeout=90)
    first = fingerprint(served_certificate(setup.https_port, NAME, cafile=setup.root_file()))
    mark = gateway.log_mark()
    gateway.wait_for_log(f"ACME: certificate for {NAME} pushed to the workers", timeout=90, since=mark)
    renewed = fingerprint(served_certificate(setup.https_port, NAME, cafile=setup.root_file()))
    assert renewed != first
    check_each_worker_serves(setup, gateway, renewed)
