"""End to end: the --config file edited under a running `twistd -n labelgw` (static services, `docker: false`, real
labelgw.tools.whoami backends on loopback ports), SIGHUP, listeners added and removed, and a second SIGTERM while
draining. Loopback only."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from support import TwistdProcess, free_port, http_get, port_accepts, wait_for_port, wait_until
from support.net import LOOPBACK

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that), needs no engine


def start_whoami(name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(port), "--name", name, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return process, port


def config_text(http: list[int], services: dict[str, int]) -> str:
    listen = ", ".join(f'"tcp:{port}:interface={LOOPBACK}"' for port in http)
    lines = [f"docker: false\nhttps: none\nadmin: none\ndrain_grace: 10\nhttp: [{listen}]\nservices:\n"]
    for name, port in services.items():
        lines.append(f"  {name}:\n    hosts: [{name}.localhost]\n    backends: [\"{LOOPBACK}:{port}\"]\n")
    return "".join(lines)


def whoami(port: int, service: str, timeout: float = 5.0) -> str | None:
    """The backend that answered a request for <service>.localhost, or None (not routed)."""
    response = http_get(f"http://{LOOPBACK}:{port}/", host=f"{service}.localhost", timeout=timeout)
    return response.header("X-Whoami") if response.status == 200 else None


class World:
    def __init__(self, base: Path, backends: dict[str, int]) -> None:
        self.base = base
        self.backends = backends
        self.config = base / "labelgw.yaml"
        self.http = [free_port()]
        self.services = {"alpha": backends["alpha"]}
        self.write()
        self.gateway = TwistdProcess(
            ["-n", "--pidfile=", "labelgw", "--config", str(self.config)], port=self.http[0], cwd=base / "gateway",
        )
        self.gateway.wait_until_listening()

    def write(self) -> None:
        # Written beside and renamed over, as editors do: the gateway never reads half a file.
        partial = self.config.with_suffix(".tmp")
        partial.write_text(config_text(self.http, self.services))
        partial.replace(self.config)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-reload")
    processes = []
    try:
        ports = {}
        for name in ("alpha", "beta", "gamma"):
            process, ports[name] = start_whoami(name)
            processes.append(process)
        world = World(base, ports)
        yield world
        world.gateway.stop()
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def test_an_edited_config_file_routes_a_new_static_service_within_two_seconds(world: World) -> None:
    port = world.http[0]
    assert whoami(port, "alpha") == "alpha"
    assert whoami(port, "beta") is None
    world.services["beta"] = world.backends["beta"]
    written = time.monotonic()
    world.write()
    wait_until(lambda: whoami(port, "beta") == "beta", timeout=2.0, interval=0.02, what="beta routed")
    print(f"beta routed {time.monotonic() - written:.2f} s after the edit")
    assert whoami(port, "alpha") == "alpha"


def test_a_broken_edit_keeps_the_old_routes_and_the_log_names_the_setting(world: World) -> None:
    port = world.http[0]
    mark = world.gateway.log_mark()
    world.config.write_text(config_text(world.http, world.services).replace('"127.0.0.1:', '"127.0.0.1:x'))
    world.gateway.wait_for_log("last good configuration keeps serving", timeout=3, since=mark)
    line = [l for l in world.gateway.log_text()[mark:].splitlines() if "last good configuration" in l][0]
    assert "services.alpha.backends" in line
    assert whoami(port, "alpha") == "alpha" and whoami(port, "beta") == "beta"
    world.write()  # repaired
    world.gateway.wait_for_log("applied", timeout=3, since=mark)


def test_sighup_re_reads_the_file_at_once(world: World) -> None:
    port = world.http[0]
    mark = world.gateway.log_mark()
    world.services["gamma"] = world.backends["gamma"]
    world.write()
    sent = time.monotonic()
    world.gateway.process.send_signal(signal.SIGHUP)
    wait_until(lambda: whoami(port, "gamma") == "gamma", timeout=2.0, interval=0.02, what="gamma routed")
    print(f"gamma routed {time.monotonic() - sent:.2f} s after SIGHUP")
    world.gateway.wait_for_log("SIGHUP, re-reading", timeout=2, since=mark)
    assert world.gateway.returncode is None
    del world.services["gamma"]
    world.write()
    wait_until(lambda: whoami(port, "gamma") is None, timeout=3.0, interval=0.05, what="gamma removed")


def test_an_added_http_endpoint_answers_and_a_removed_one_stops_while_the_other_serves(world: World) -> None:
    first = world.http[0]
    second = free_port()
    world.http = [first, second]
    world.write()
    wait_until(lambda: port_accepts(second), timeout=3.0, what="the added endpoint")
    assert whoami(second, "alpha") == "alpha" and whoami(first, "beta") == "beta"
    # A keep-alive connection on the endpoint about to close keeps being served.
    world.http = [second]
    world.write()
    wait_until(lambda: not port_accepts(first), timeout=3.0, what="the removed endpoint to close")
    assert whoami(second, "alpha") == "alpha" and whoami(second, "beta") == "beta"
    world.http = [first, second]
    world.write()
    wait_until(lambda: port_accepts(first), timeout=3.0, what="the endpoint bound again")
    assert whoami(first, "alpha") == "alpha"


def test_restart_only_settings_are_one_log_line(world: World) -> None:
    mark = world.gateway.log_mark()
    world.config.write_text(config_text(world.http, world.services) + "label_prefix: other\nstate_dir: elsewhere\n")
    world.gateway.wait_for_log("needs a restart: label_prefix, state_dir", timeout=3, since=mark)
    assert whoami(world.http[0], "alpha") == "alpha"
    world.write()


def test_sighup_without_a_config_file_is_logged_and_ignored(tmp_path: Path) -> None:
    port = free_port()
    gateway = TwistdProcess(
        ["-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface={LOOPBACK}", "--https", "none", "--admin",
         "none", "--docker-host", f"tcp://{LOOPBACK}:{free_port()}"],
        port=port, cwd=tmp_path / "gateway",
    )
    try:
        gateway.wait_until_listening()
        # An answer means the reactor runs, so its startup (and the signal hooks after it) is done.
        assert http_get(f"http://{LOOPBACK}:{port}/", host="nothing.localhost").status == 404
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_log("SIGHUP: no --config file to re-read", timeout=5)
        assert gateway.returncode is None and port_accepts(port)
    finally:
        gateway.stop()


def test_a_second_sigterm_while_draining_is_a_log_line_not_a_traceback(tmp_path: Path) -> None:
    slow, slow_port = start_whoami("slow", "--delay-ms", "2500")
    gateway = None
    try:
        port = free_port()
        config = tmp_path / "labelgw.yaml"
        config.write_text(config_text([port], {"slow": slow_port}))
        gateway = TwistdProcess(["-n", "--pidfile=", "labelgw", "--config", str(config)], port=port, cwd=tmp_path / "gw")
        gateway.wait_until_listening()
        assert whoami(port, "nothing") is None  # the reactor runs: the signal hooks are installed
        answers: list[str | None] = []
        request = threading.Thread(target=lambda: answers.append(whoami(port, "slow", timeout=10)))
        request.start()
        time.sleep(0.5)  # the request is in flight
        gateway.process.send_signal(signal.SIGTERM)
        gateway.wait_for_log("draining", timeout=5)
        gateway.process.send_signal(signal.SIGTERM)
        gateway.wait_for_log("SIGTERM again: labelgw is already stopping", timeout=5)
        gateway.process.wait(15)
        request.join(15)
        assert answers == ["slow"]  # the request in flight finished
        log = gateway.log_text()
        assert "Traceback" not in log and "ReactorNotRunning" not in log, log
    finally:
        if gateway is not None:
            gateway.stop()
        slow.terminate()
        slow.wait(10)
