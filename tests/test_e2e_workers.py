"""End to end: `twistd -n labelgw --workers N` (static services from a config file, `docker: false`, real
labelgw.tools.whoami backends on loopback ports): a steady request stream through two reloads (SIGHUP and
`python -m labelgw reload`) with no failed request, a worker killed with SIGKILL restarted without a refused
connection, a health change reaching every worker, /metrics and the admin view of the whole gateway.
Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import TwistdProcess, free_port, http_get, wait_for_port, wait_until
from support.net import LOOPBACK

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that), needs no engine

MIN_REQUESTS = 2000
MAX_REQUESTS = 20000
STREAM_DEADLINE = 180.0


def start_whoami(name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(port), "--name", name],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return process, port


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, int]]:
    processes = []
    ports = {}
    try:
        for name in ("a", "b"):
            process, ports[name] = start_whoami(name)
            processes.append(process)
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def write_config(path: Path, http_port: int, backends: dict[str, int], health: bool = False) -> None:
    lines = [
        "docker: false\nhttps: none\ndrain_grace: 10\n",
        f'http: ["tcp:{http_port}:interface={LOOPBACK}"]\nservices:\n',
        "  alpha:\n    hosts: [alpha.localhost]\n",
        "    backends: [" + ", ".join(f'"{LOOPBACK}:{port}"' for port in backends.values()) + "]\n",
    ]
    if health:
        lines.append("    health: {path: /health, interval: 0.2s, timeout: 1s}\n")
    path.write_text("".join(lines))


def start_gateway(base: Path, backends: dict[str, int], workers: str, health: bool = False) -> TwistdProcess:
    port = free_port()
    admin = free_port()
    config = base / "labelgw.yaml"
    base.mkdir(parents=True, exist_ok=True)
    write_config(config, port, backends, health)
    gateway = TwistdProcess(
        ["-n", "--pidfile=twistd.pid", "labelgw", "--config", str(config), "--admin",
         f"tcp:{admin}:interface={LOOPBACK}", "--access-log", "off", "--workers", workers],
        port=port, cwd=base / "gateway",
    )
    gateway.wait_until_listening()
    count = 1 if workers == "1" else int(workers)
    for index in range(1, count + 1):
        gateway.wait_for_log(f"worker {index} ready", timeout=60)
    return gateway


def admin_json(gateway: TwistdProcess, path: str) -> Any:
    response = http_get(f"{gateway.admin_url}{path}")
    assert response.status == 200, response.text
    return json.loads(response.body)


class Stream:
    """Requests one after another, each on a fresh connection, from a thread; counts answers by status."""

    def __init__(self, port: int, host: str = "alpha.localhost") -> None:
        self.port = port
        self.host = host
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.backends: dict[str, int] = {}
        self.enough = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Stream":
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + STREAM_DEADLINE
        while self.sent < MAX_REQUESTS and time.monotonic() < deadline:
            if self._stop.is_set() and self.sent >= MIN_REQUESTS:
                break
            self.sent += 1
            connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=15)
            try:
                connection.request("GET", "/", headers={"Host": self.host})
                response = connection.getresponse()
                response.read()
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
                name = response.getheader("X-Whoami") or "?"
                self.backends[name] = self.backends.get(name, 0) + 1
            except (OSError, http.client.HTTPException) as error:
                self.errors.append(f"request {self.sent}: {error!r}")
            finally:
                connection.close()
            if self.sent >= MIN_REQUESTS:
                self.enough.set()

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(STREAM_DEADLINE + 30)

    @property
    def failures(self) -> int:
        return len(self.errors) + sum(count for status, count in self.statuses.items() if status != 200)


def requests_total(gateway: TwistdProcess, service: str = "alpha") -> float:
    """labelgw_requests_total of `service` in the gateway's /metrics, over every label set."""
    text = http_get(f"{gateway.admin_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("labelgw_requests_total{") and f'service="{service}"' in line
    )


def reload_and_wait(gateway: TwistdProcess, how: str, generation: int, count: int) -> None:
    mark = gateway.log_mark()
    if how == "signal":
        os.kill(gateway.pid, signal.SIGHUP)
    else:
        subprocess.run(
            [sys.executable, "-m", "labelgw", "reload", "--pidfile", str(gateway.cwd / "twistd.pid")],
            check=True, capture_output=True,
        )
    gateway.wait_for_log(f"reload: generation {generation} serving", timeout=90, since=mark)
    for _ in range(count):
        gateway.wait_for_log("stopped: exited with code 0", timeout=60, since=mark)


@pytest.mark.parametrize("workers", ["2", "1"])
def test_two_reloads_under_a_request_stream_fail_no_request(
    workers: str, backends: dict[str, int], tmp_path: Path
) -> None:
    gateway = start_gateway(tmp_path, backends, workers)
    try:
        stream = Stream(gateway.port).start()
        wait_until(lambda: stream.sent > 200, timeout=60)
        reload_and_wait(gateway, "signal", 2, int(workers))
        reload_and_wait(gateway, "command", 3, int(workers))
        stream.enough.wait(STREAM_DEADLINE)
        stream.finish()
        log = gateway.log_text()
        assert stream.sent >= MIN_REQUESTS
        assert stream.failures == 0, (stream.statuses, stream.errors[:5])
        assert "Traceback" not in log
        # /metrics counts every request once, those of the workers that exited included (reports: every second).
        wait_until(lambda: requests_total(gateway) >= stream.sent, timeout=20)
        assert requests_total(gateway) == stream.sent
        state = admin_json(gateway, "/workers")
        assert state["generation"] == 3 and len(state["workers"]) == int(workers)
        assert all(worker["generation"] == 3 for worker in state["workers"])
        print(f"\n--workers {workers}: {stream.sent} requests through 2 reloads, statuses {stream.statuses}")
    finally:
        gateway.stop()


def test_a_killed_worker_is_restarted_and_no_connection_is_refused(backends: dict[str, int], tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, backends, "2")
    try:
        before = admin_json(gateway, "/workers")["workers"]
        victim = before[0]
        stream = Stream(gateway.port).start()
        wait_until(lambda: stream.sent > 100, timeout=60)
        mark = gateway.log_mark()
        os.kill(victim["pid"], signal.SIGKILL)
        gateway.wait_for_log("killed by signal 9 (SIGKILL); restarting it", since=mark, timeout=30)
        gateway.wait_for_log(f"worker {victim['id']} ready", since=mark, timeout=60)
        sent_at_restart = stream.sent
        wait_until(lambda: stream.sent > sent_at_restart + 200, timeout=60)
        stream.finish()
        refused = [error for error in stream.errors if "ConnectionRefused" in error]
        assert refused == []
        # Only what the killed worker had accepted can have failed (at most a request or two in flight).
        assert stream.failures <= 2, (stream.statuses, stream.errors)
        after = admin_json(gateway, "/workers")
        assert after["restarts"] == 1
        pids = {worker["pid"] for worker in after["workers"]}
        assert victim["pid"] not in pids and len(pids) == 2
    finally:
        gateway.stop()


def test_health_change_reaches_every_worker_and_metrics_are_the_gateways(
    backends: dict[str, int], tmp_path: Path
) -> None:
    gateway = start_gateway(tmp_path, backends, "2", health=True)
    try:
        wait_until(lambda: all(
            b["health"] == "healthy"
            for s in admin_json(gateway, "/api/state")["services"].values() for b in s["backends"]
        ), timeout=30)
        # Backend b fails its health checks: the supervisor checks it, every worker takes it out of rotation.
        control = f"http://{LOOPBACK}:{backends['b']}/control"
        assert http_get(control + "?status=503").status == 200
        try:
            mark = gateway.log_mark()
            gateway.wait_for_log("out of rotation", since=mark, timeout=30)
            answers: dict[str, int] = {}
            for _ in range(200):
                response = http_get(f"{gateway.base_url}/", host="alpha.localhost")
                name = response.header("X-Whoami") or str(response.status)
                answers[name] = answers.get(name, 0) + 1
            assert answers == {"a": 200}
        finally:
            http_get(control + "?status=0")
        # /metrics: the requests of both workers, summed (reports arrive every second).
        wait_until(lambda: requests_total(gateway) >= 200, timeout=15)
        workers = admin_json(gateway, "/workers")
        served = [w["requests"] for w in workers["workers"]]
        assert sum(served) >= 200
        assert workers["push_latency_seconds"]["count"] >= 1
        print(f"\nrequests per worker {served}; push latency {workers['push_latency_seconds']}")
    finally:
        gateway.stop()


def test_docker_routes_reach_every_worker(labelgw: Any, containers: Any) -> None:
    """One event subscription (the supervisor's), the route on every worker: 100 requests on fresh connections,
    spread over both workers by the kernel, all routed; after the container stops, none is."""
    from support.measurements import record

    gateway = labelgw("--workers", "2", "--access-log", "off")
    for index in (1, 2):
        gateway.wait_for_log(f"worker {index} ready", timeout=60)
    labels = {"labelgw.service": "pushed", "labelgw.port": "8000"}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", "8000", "--name", "pushed"], labels=labels)
    containers.wait_serving(container, 8000)
    wait_until(lambda: http_get(gateway.base_url, host="pushed.localhost").status == 200, timeout=30)
    statuses = [http_get(gateway.base_url, host="pushed.localhost").status for _ in range(100)]
    assert statuses == [200] * 100
    view = admin_json(gateway, "/workers")
    assert all(worker["requests"] >= 0 for worker in view["workers"]) and len(view["workers"]) == 2
    container.stop(timeout=1)
    wait_until(lambda: http_get(gateway.base_url, host="pushed.localhost").status != 200, timeout=30)
    statuses = [http_get(gateway.base_url, host="pushed.localhost").status for _ in range(100)]
    assert 200 not in statuses
    latency = admin_json(gateway, "/workers")["push_latency_seconds"]
    record("workers: change pushed to both workers (last ack), mean / max", f"{latency['mean']} / {latency['max']} s")
    # One event subscription: the workers run no Docker watcher at all.
    log = gateway.log_text()
    assert "worker1 labelgw.docker" not in log and "worker2 labelgw.docker" not in log


def test_a_config_edit_starts_workers_with_the_new_settings(backends: dict[str, int], tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, backends, "2")
    try:
        config = tmp_path / "labelgw.yaml"
        second = free_port()
        # A second HTTP listener (bound by the supervisor, passed to the new workers) and a new service.
        text = config.read_text().replace(
            f'http: ["tcp:{gateway.port}:interface={LOOPBACK}"]',
            f'http: ["tcp:{gateway.port}:interface={LOOPBACK}", "tcp:{second}:interface={LOOPBACK}"]',
        ) + f'  beta:\n    hosts: [beta.localhost]\n    backends: ["{LOOPBACK}:{backends["b"]}"]\n'
        assert str(second) in text
        mark = gateway.log_mark()
        partial = config.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(config)
        # The file watcher applies it in the supervisor, then a new generation reads it.
        gateway.wait_for_log("reload: generation 2 serving", since=mark, timeout=90)
        answers = [http_get(gateway.base_url, host="beta.localhost").header("X-Whoami") for _ in range(50)]
        assert answers == ["b"] * 50
        answers = [http_get(f"http://{LOOPBACK}:{second}/", host="beta.localhost").header("X-Whoami") for _ in range(20)]
        assert answers == ["b"] * 20
        # A file that does not parse: the log line, no new generation, the last good configuration serves.
        mark = gateway.log_mark()
        partial.write_text(text + "  gamma: [\n")
        partial.replace(config)
        gateway.wait_for_log("not applied, the last good configuration keeps serving", since=mark, timeout=30)
        assert "generation 3" not in gateway.log_text()[mark:]
        assert http_get(gateway.base_url, host="beta.localhost").status == 200
    finally:
        gateway.stop()


def test_a_rate_limit_holds_for_the_gateway_not_per_worker(backends: dict[str, int], tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    config = tmp_path / "labelgw.yaml"
    config.write_text(
        f'docker: false\nhttps: none\nhttp: ["tcp:{port}:interface={LOOPBACK}"]\nservices:\n  alpha:\n'
        f'    hosts: [alpha.localhost]\n    backends: ["{LOOPBACK}:{backends["a"]}"]\n'
        "    ratelimit: 10/s\n    ratelimit.burst: 10\n"
    )
    gateway = TwistdProcess(
        ["-n", "--pidfile=", "labelgw", "--config", str(config), "--admin", f"tcp:{admin}:interface={LOOPBACK}",
         "--access-log", "off", "--workers", "2"], port=port, cwd=tmp_path / "gateway",
    )
    try:
        gateway.wait_until_listening()
        for index in (1, 2):
            gateway.wait_for_log(f"worker {index} ready", timeout=60)
        time.sleep(1.5)  # a full bucket again after the readiness checks
        started = time.monotonic()
        statuses = [http_get(gateway.base_url, host="alpha.localhost").status for _ in range(80)]
        elapsed = time.monotonic() - started
        admitted = statuses.count(200)
        assert set(statuses) <= {200, 429}
        # The label's limit for the whole gateway (a burst of 10, then 10/s), whichever worker took each request;
        # one more for a token refilled between the clock reads.
        assert 5 <= admitted <= 10 + 10 * elapsed + 1, (admitted, elapsed)
        workers = admin_json(gateway, "/workers")
        print(f"\nrate limit 10/s burst 10, 2 workers: {admitted} of 80 admitted in {elapsed:.2f} s; "
              f"requests per worker {[w['requests'] for w in workers['workers']]}")
    finally:
        gateway.stop()
