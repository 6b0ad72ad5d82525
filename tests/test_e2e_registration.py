"""End to end: the registration API of a real `twistd -n labelgw` (embedded registry, `docker: false`) routing
real labelgw.tools.whoami backends on loopback: register, heartbeats, expiry, DELETE, bad input, a token, and a
restart of labelgw that keeps a live registration. Loopback only; bounded waits, no timed assertions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from support import TwistdProcess, free_port, wait_until
from support.net import LOOPBACK
from support.registry import RegistryClient, routed_to, start_whoami

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that), needs no engine

TOKEN = "e2e-registry-token"


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.http = free_port()
        self.api_port = free_port()
        (base / "token").write_text(TOKEN + "\n")
        (base / "labelgw.yaml").write_text(
            "docker: false\nhttps: none\nadmin: none\ndrain_grace: 1\n"
            f"http: [\"tcp:{self.http}:interface={LOOPBACK}\"]\n"
            f"registry_api: \"tcp:{self.api_port}:interface={LOOPBACK}\"\n"
            f"registry_token_file: {base / 'token'}\n"
            f"state_dir: {base / 'state'}\n"
        )
        self.client = RegistryClient(self.api_port, TOKEN)
        self.gateway = self.start()

    def start(self) -> TwistdProcess:
        gateway = TwistdProcess(
            ["-n", "--pidfile=", "labelgw", "--config", str(self.base / "labelgw.yaml")], port=self.http,
            cwd=self.base / "gateway",
        )
        gateway.wait_until_listening()
        wait_until(lambda: _accepts(self.api_port), 10, what="the registration API")
        return gateway

    def routed(self, host: str) -> str | None:
        return routed_to(self.http, host)


def _accepts(port: int) -> bool:
    from support import port_accepts

    return port_accepts(port)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-registration")
    backends = [start_whoami(name) for name in ("alpha", "beta")]
    world = World(base)
    world.backends = {name: port for name, (_, port) in zip(("alpha", "beta"), backends)}  # type: ignore[attr-defined]
    try:
        yield world
    finally:
        world.gateway.stop()
        for process, _ in backends:
            process.terminate()
            process.wait(10)


def test_registered_instance_is_routed_heartbeats_keep_it_and_expiry_removes_it(world: World) -> None:
    port = world.backends["alpha"]  # type: ignore[attr-defined]
    response = world.client.register("hb", "hb-1", address=LOOPBACK, port=port, hosts=["hb.test"], ttl=2,
                                      tags=["e2e"], version="v1")
    assert response.status == 201, response.body
    wait_until(lambda: world.routed("hb.test") == "alpha", 5, what="hb.test routed to alpha")
    # Heartbeats every 0.5 s for three TTLs: never out of rotation.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert world.client.heartbeat("hb", "hb-1").status == 200
        assert world.routed("hb.test") == "alpha"
        time.sleep(0.5)
    [entry] = world.client.listing()["services"]["hb"]
    assert entry["instance"] == "hb-1" and entry["tags"] == ["e2e"] and 0 < entry["expires_in"] <= 2
    # No more heartbeats: gone after the TTL, and the log says which and why.
    mark = world.gateway.log_mark()
    wait_until(lambda: world.routed("hb.test") is None, 5, what="hb.test no longer routed")
    world.gateway.wait_for_log("instance hb-1 of service hb removed: lease expired", timeout=2, since=mark)
    assert world.client.heartbeat("hb", "hb-1").status == 404
    assert "hb" not in world.client.listing()["services"]


def test_delete_removes_at_once_and_same_id_replaces(world: World) -> None:
    alpha, beta = world.backends["alpha"], world.backends["beta"]  # type: ignore[attr-defined]
    assert world.client.register("del", "d-1", address=LOOPBACK, port=alpha, hosts=["del.test"]).status == 201
    wait_until(lambda: world.routed("del.test") == "alpha", 5, what="del.test routed")
    # The same instance id again, another port: replaced, not duplicated.
    assert world.client.register("del", "d-1", address=LOOPBACK, port=beta, hosts=["del.test"]).status == 200
    wait_until(lambda: world.routed("del.test") == "beta", 5, what="del.test routed to beta")
    assert len(world.client.listing()["services"]["del"]) == 1
    assert world.client.deregister("del", "d-1").status == 200
    assert world.routed("del.test") is None  # the very next request
    assert world.client.deregister("del", "d-1").status == 404


def test_clash_is_409_naming_both_services(world: World) -> None:
    alpha = world.backends["alpha"]  # type: ignore[attr-defined]
    assert world.client.register("owner", "o-1", address=LOOPBACK, port=alpha, hosts=["own.test"]).status == 201
    response = world.client.register("thief", "t-1", address=LOOPBACK, port=alpha, hosts=["own.test"])
    assert response.status == 409
    message = json.loads(response.body)["error"]
    assert "'owner'" in message and "'thief'" in message
    assert "thief" not in world.client.listing()["services"]
    assert world.client.deregister("owner", "o-1").status == 200


def test_bad_input_is_a_clear_4xx_and_stores_nothing(world: World) -> None:
    alpha = world.backends["alpha"]  # type: ignore[attr-defined]
    assert world.client.register("keep", "k-1", address=LOOPBACK, port=alpha, hosts=["keep.test"]).status == 201
    def registered() -> dict[str, list[tuple[str, int]]]:
        services = world.client.listing()["services"]
        return {name: [(e["instance"], e["port"]) for e in entries] for name, entries in services.items()}

    before = registered()
    path = "/v1/services/bad/instances/b-1"
    cases = [
        (world.client.call("PUT", path, raw=b'{"address": "127.0.0.1", "port": '), 400, None),
        (world.client.call("PUT", path, {"address": LOOPBACK, "port": alpha, "colour": "red"}), 400, "colour"),
        (world.client.call("PUT", path, {"address": LOOPBACK, "port": "80"}), 400, "port"),
        (world.client.call("PUT", path, {"address": LOOPBACK, "port": alpha, "weight": -1}), 400, "weight"),
        (world.client.call("PUT", path, raw=b'{"x": "' + b"a" * 70_000 + b'"}'), 413, None),
        (world.client.call("PUT", path, {"address": LOOPBACK, "port": alpha}, token=""), 401, "authorization"),
        (world.client.call("PUT", path, {"address": LOOPBACK, "port": alpha}, token="wrong"), 401, "authorization"),
        (world.client.call("GET", "/v1/services", token="wrong"), 401, "authorization"),
    ]
    for response, status, field in cases:
        assert response.status == status, response.body
        reply = json.loads(response.body)
        assert reply["error"]
        if field is not None:
            assert reply["field"] == field
    assert registered() == before
    assert world.routed("keep.test") == "alpha"
    assert world.client.deregister("keep", "k-1").status == 200


def test_a_restart_keeps_a_live_registration(world: World) -> None:
    beta = world.backends["beta"]  # type: ignore[attr-defined]
    assert world.client.register("live", "l-1", address=LOOPBACK, port=beta, hosts=["live.test"], ttl=120).status == 201
    assert world.client.register("dead", "x-1", address=LOOPBACK, port=beta, hosts=["dead.test"], ttl=1).status == 201
    wait_until(lambda: world.routed("live.test") == "beta", 5, what="live.test routed")
    time.sleep(1.5)  # dead's lease runs out
    world.gateway.stop()
    assert (world.base / "state" / "registrations.json").exists()
    world.gateway = world.start()
    wait_until(lambda: world.routed("live.test") == "beta", 5, what="live.test routed after the restart")
    assert world.routed("dead.test") is None
    services = world.client.listing()["services"]
    assert [entry["instance"] for entry in services["live"]] == ["l-1"] and "dead" not in services
    assert world.client.heartbeat("live", "l-1").status == 200
    assert world.client.deregister("live", "l-1").status == 200


def _register_command(world: World, *args: str) -> "subprocess.Popen[bytes]":
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "labelgw", "register", "--api", f"http://{LOOPBACK}:{world.api_port}",
         "--token-file", str(world.base / "token"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_register_command_as_a_sidecar(world: World) -> None:
    import signal

    alpha = world.backends["alpha"]  # type: ignore[attr-defined]
    client = _register_command(
        world, "--service", "side", "--id", "s-1", "--port", str(alpha), "--host", "side.test", "--ttl", "1.5",
    )
    try:
        wait_until(lambda: world.routed("side.test") == "alpha", 10, what="side.test routed")
        time.sleep(3.5)  # more than two TTLs: heartbeats keep it
        assert world.routed("side.test") == "alpha"
        client.send_signal(signal.SIGTERM)
        assert client.wait(10) == 0
        assert world.routed("side.test") is None  # deregistered at once, not after the TTL
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    output = client.stdout.read().decode() if client.stdout else ""
    assert "registered side/s-1" in output and "deregistered side/s-1" in output


def test_register_command_as_a_wrapper(world: World) -> None:
    import signal
    import sys

    port = free_port()
    client = _register_command(
        world, "--service", "wrap", "--id", "w-1", "--port", str(port), "--host", "wrap.test", "--",
        sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(port), "--name", "wrapped",
    )
    try:
        wait_until(lambda: world.routed("wrap.test") == "wrapped", 20, what="wrap.test routed to the wrapped command")
        client.send_signal(signal.SIGINT)
        client.wait(20)
        assert world.routed("wrap.test") is None
        from support import port_accepts

        assert not port_accepts(port)  # the wrapped command was stopped too
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
