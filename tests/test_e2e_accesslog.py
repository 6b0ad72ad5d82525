"""The access log of the real product: `twistd -n labelgw` with a static service (`docker: false`) in front of a
whoami backend, requests over loopback, and the lines it writes in both formats; SIGUSR1 reopens the file."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import TwistdProcess, twistd_environment
from support.net import LOOPBACK, free_port, port_accepts, wait_until

# Runs the real product (no engine needed): with the end-to-end tests, out of `-m "not docker"` unit runs.
pytestmark = pytest.mark.docker

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def backend_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--port", str(port), "--name", "who-1"],
        env=twistd_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_accepts(port), 15, what="whoami listening")
        yield port
    finally:
        process.terminate()
        process.wait(10)


def start(tmp_path: Path, backend_port: int, *extra: str) -> TwistdProcess:
    config = tmp_path / "labelgw.yaml"
    config.write_text(
        "docker: false\nservices:\n"
        f"  who:\n    hosts: [who.localhost]\n    backends: ['{LOOPBACK}:{backend_port}']\n"
        f"  dead:\n    hosts: [dead.localhost]\n    backends: ['{LOOPBACK}:{free_port()}']\n"
    )
    port = free_port()
    gateway = TwistdProcess(
        ["-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface={LOOPBACK}", "--https", "none",
         "--admin", "none", "--config", str(config), *extra],
        port, tmp_path,
    )
    gateway.wait_until_listening()
    return gateway


def request(gateway: TwistdProcess, host: str, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, gateway.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def lines_of(path: Path, count: int) -> list[str]:
    """The file's lines, once it has `count` of them (lines are handed to the writer every 50 ms)."""
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count, 10, what=f"{count} lines in {path}")
    return path.read_text().splitlines()


def test_json_lines_for_proxied_and_own_answers(tmp_path: Path, backend_port: int) -> None:
    log = tmp_path / "access.log"
    gateway = start(tmp_path, backend_port, "--access-log", "json", "--access-log-file", str(log))
    try:
        status, body = request(gateway, "who.localhost", "/echo?x=1", {"traceparent": TRACE})
        assert status == 200
        # The backend saw the request id labelgw made and the client's traceparent.
        sent_id = re.search(rb"X-Request-Id: ([0-9a-f]{32})", body, re.IGNORECASE)
        assert sent_id is not None and TRACE.encode() in body
        assert request(gateway, "who.localhost", "/", {"X-Request-Id": "client-7"})[0] == 200
        assert request(gateway, "nope.localhost")[0] == 404
        assert request(gateway, "dead.localhost")[0] == 502
        records = [json.loads(line) for line in lines_of(log, 4)]
    finally:
        gateway.stop()
    first, kept, unknown, dead = records
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert {key: first[key] for key in ("client", "method", "path", "protocol", "tls", "host", "status", "service",
                                        "version", "backend", "retries", "bytes_in", "route")} == {
        "client": "127.0.0.1", "method": "GET", "path": "/echo?x=1", "protocol": "HTTP/1.1", "tls": False,
        "host": "who.localhost", "status": 200, "service": "who", "version": None,
        "backend": f"127.0.0.1:{backend_port}", "retries": 0, "bytes_in": 0, "route": "who.localhost/",
    }
    assert first["request_id"] == sent_id.group(1).decode()
    assert first["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert first["bytes_out"] == len(body)
    assert 0 < first["upstream_ms"] <= first["duration_ms"]
    assert kept["request_id"] == "client-7"
    assert (unknown["status"], unknown["service"], unknown["upstream_ms"]) == (404, None, None)
    assert (dead["status"], dead["service"], dead["upstream_ms"]) == (502, "dead", None)


def test_common_lines_go_to_standard_output_by_default(tmp_path: Path, backend_port: int) -> None:
    gateway = start(tmp_path, backend_port)
    try:
        assert request(gateway, "who.localhost", "/a")[0] == 200
        assert request(gateway, "nope.localhost", "/b")[0] == 404
        gateway.wait_for_log('"GET /b HTTP/1.1" 404')
        text = gateway.log_text()
    finally:
        gateway.stop()
    date = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
    assert re.search(date.join([r"127\.0\.0\.1 - - ", r' "GET /a HTTP/1\.1" 200 \d+ "who" \d+\.\d{3} [0-9a-f]{32}\n']), text), text
    assert re.search(date.join([r"127\.0\.0\.1 - - ", r' "GET /b HTTP/1\.1" 404 \d+ "-" - [0-9a-f]{32}\n']), text), text


def test_access_log_off_writes_no_line(tmp_path: Path, backend_port: int) -> None:
    gateway = start(tmp_path, backend_port, "--access-log", "off")
    try:
        assert request(gateway, "who.localhost", "/quiet")[0] == 200
    finally:
        gateway.stop()
    assert "/quiet" not in gateway.log_text()


def test_sigusr1_reopens_the_file_without_losing_a_line(tmp_path: Path, backend_port: int) -> None:
    log = tmp_path / "access.log"
    gateway = start(tmp_path, backend_port, "--access-log-file", str(log))
    try:
        for index in range(5):
            assert request(gateway, "who.localhost", f"/before/{index}")[0] == 200
        # logrotate: rename, then signal. Lines not yet written still go to the renamed file.
        os.rename(log, tmp_path / "access.log.1")
        mark = gateway.log_mark()
        os.kill(gateway.pid, signal.SIGUSR1)
        gateway.wait_for_log("access log: reopening", since=mark)
        for index in range(5):
            assert request(gateway, "who.localhost", f"/after/{index}")[0] == 200
        after = lines_of(log, 5)
    finally:
        gateway.stop()
    before = (tmp_path / "access.log.1").read_text().splitlines()
    assert [re.search(r'"GET (\S+) ', line).group(1) for line in before] == [f"/before/{i}" for i in range(5)]  # type: ignore[union-attr]
    assert [re.search(r'"GET (\S+) ', line).group(1) for line in after] == [f"/after/{i}" for i in range(5)]  # type: ignore[union-attr]
    assert gateway.returncode is not None


def test_debug_headers_on_the_real_product(tmp_path: Path, backend_port: int) -> None:
    gateway = start(tmp_path, backend_port, "--debug-headers", "--access-log", "off")
    try:
        connection = http.client.HTTPConnection(LOOPBACK, gateway.port, timeout=10)
        connection.request("GET", "/", headers={"Host": "who.localhost"})
        response = connection.getresponse()
        response.read()
        connection.close()
    finally:
        gateway.stop()
    assert response.getheader("X-Labelgw-Service") == "who"
    assert response.getheader("X-Labelgw-Backend") == f"127.0.0.1:{backend_port}"
    assert re.fullmatch(r"[0-9a-f]{32}", response.getheader("X-Request-Id") or "")
