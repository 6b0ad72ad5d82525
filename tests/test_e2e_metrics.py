"""End to end: GET /metrics on the admin listener of the real `twistd -n labelgw`.

One gateway with a static service (`docker: false`) in front of a real labelgw.tools.whoami backend: requests,
an HTTPS request, then a scrape parsed with prometheus_client's parser. And one gateway following the real Docker
engine: a labelled container and one with a bad label, then the Docker side's counters. Loopback only."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import TwistdProcess, free_port, http_get, labelgw_args, wait_for_port
from support.net import LOOPBACK
from test_e2e_routing import poll

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gateway: TwistdProcess) -> Samples:
    admin = gateway.admin_url
    assert admin is not None
    response = http_get(admin + "/metrics", host="localhost")
    assert response.status == 200, response.text
    assert (response.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def static_gateway(tmp_path: Path) -> Iterator[TwistdProcess]:
    backend_port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(backend_port), "--name", "w1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    gateway = None
    try:
        wait_for_port(backend_port)
        config = tmp_path / "labelgw.yaml"
        config.write_text(
            "docker: false\nservices:\n  metered:\n    hosts: [metered.localhost]\n"
            f'    backends: ["{LOOPBACK}:{backend_port}"]\n'
        )
        port = free_port()
        gateway = TwistdProcess(labelgw_args(port, None, ["--config", str(config)]), port=port, cwd=tmp_path / "gw")
        gateway.wait_until_listening()
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        backend.terminate()
        backend.wait(10)


def test_requests_through_twistd_show_in_metrics(static_gateway: TwistdProcess) -> None:
    gw = static_gateway
    connection = http.client.HTTPConnection(LOOPBACK, gw.port, timeout=5)
    for _ in range(20):
        connection.request("GET", "/some/path", headers={"Host": "metered.localhost"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    connection.request("POST", "/upload", body=b"x" * 1000, headers={"Host": "metered.localhost"})
    connection.getresponse().read()
    connection.request("GET", "/", headers={"Host": "unknown.localhost"})
    assert connection.getresponse().status == 404
    connection.close()
    # One HTTPS request: a handshake and a certificate minted for the name.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    assert gw.https_port is not None
    with socket.create_connection((LOOPBACK, gw.https_port), timeout=5) as raw:
        # SNI names the service while the connection goes to loopback.
        with context.wrap_socket(raw, server_hostname="metered.localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: metered.localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")

    samples = scrape(gw)
    labels = {"service": "metered", "version": ""}
    assert value(samples, "labelgw_requests_total", **labels, method="GET", status_class="2xx") == 21
    assert value(samples, "labelgw_requests_total", **labels, method="POST", status_class="2xx") == 1
    assert value(samples, "labelgw_requests_total", service="", version="", method="GET", status_class="4xx") == 1
    assert value(samples, "labelgw_request_duration_seconds_count", **labels) == 22
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="+Inf") == 22
    # Loopback to a local backend: well under a second each.
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="1.0") == 22
    assert 0 < (value(samples, "labelgw_request_duration_seconds_sum", **labels) or 0) < 22
    assert value(samples, "labelgw_request_body_bytes_total", service="metered") == 1000
    assert (value(samples, "labelgw_response_body_bytes_total", service="metered") or 0) > 0
    backend = _backend_labels(samples, "metered")
    assert backend["backend"].startswith("metered[")  # a static backend's name: service[address:port]
    assert value(samples, "labelgw_backend_requests_total", **backend) == 22
    assert value(samples, "labelgw_backend_ready", **backend) == 1
    assert (value(samples, "labelgw_tls_handshakes_total") or 0) >= 1
    assert (value(samples, "labelgw_tls_certificates_minted_total") or 0) >= 1
    assert value(samples, "labelgw_requests_in_flight") == 0
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0
    # The admin listener's Host rule holds for /metrics too.
    admin = gw.admin_url
    assert admin is not None
    assert http_get(admin + "/metrics", host="evil.example").status == 421


def _backend_labels(samples: Samples, service: str) -> dict[str, str]:
    found = [dict(labels) for name, labels in samples if name == "labelgw_backend_ready" and dict(labels)["service"] == service]
    assert len(found) == 1, found
    return found[0]


def test_docker_side_counters(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("metrics").replace("-", "")
    port = free_port()
    container = containers.python(
        ["-m", "labelgw.tools.whoami", "--port", str(port), "--name", "m1"],
        labels={"labelgw.service": service, "labelgw.port": str(port)},
    )
    containers.wait_serving(container, port)
    containers.run(labels={"labelgw.service": service + "x", "labelgw.prot": "80"})
    poll(gw, f"{service}.localhost", lambda r: r.status == 200)
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(gw)
        if (value(samples, "labelgw_docker_containers_skipped") or 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (value(samples, "labelgw_docker_containers_skipped") or 0) >= 1
    assert (value(samples, "labelgw_docker_events_total") or 0) >= 2  # create and start, at least
    assert (value(samples, "labelgw_docker_resyncs_total") or 0) >= 1
    assert value(samples, "labelgw_docker_connected") == 1
    assert (value(samples, "labelgw_docker_event_apply_seconds_count") or 0) >= 1
    assert value(samples, "labelgw_docker_stream_reconnects_total") == 0
    assert value(samples, "labelgw_backend_ready", **_backend_labels(samples, service)) == 1
