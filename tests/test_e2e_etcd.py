"""End to end with a real etcd: a three-member cluster on loopback (tests/support/etcd.py), two `twistd -n labelgw`
gateways sharing it (`--registry etcd://...`), real whoami backends. An instance registered through one gateway is
routed by both (the delay is measured and reported), heartbeats through either keep it, expiry and DELETE remove it
from both, one member killed under a request stream fails no request, a cut watch resumes without losing an
update, and without quorum the last known routes keep serving. Loopback only; bounded loops; figures reported,
not asserted."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from support import TwistdProcess, free_port, is_ci, port_accepts, wait_until
from support.etcd import EtcdCluster, etcd_available
from support.measurements import record
from support.net import LOOPBACK
from support.registry import RegistryClient, routed_to, start_whoami

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that), needs no engine


class Gateway:
    def __init__(self, base: Path, name: str, registry: str) -> None:
        self.base = base / name
        self.base.mkdir()
        self.http = free_port()
        self.api_port = free_port()
        config = self.base / "labelgw.yaml"
        config.write_text(
            "docker: false\nhttps: none\nadmin: none\ndrain_grace: 1\n"
            f"http: [\"tcp:{self.http}:interface={LOOPBACK}\"]\n"
            f"registry_api: \"tcp:{self.api_port}:interface={LOOPBACK}\"\n"
            f"registry: \"{registry}\"\nstate_dir: {self.base / 'state'}\n"
        )
        self.process = TwistdProcess(
            ["-n", "--pidfile=", "labelgw", "--config", str(config)], port=self.http, cwd=self.base / "run",
        )
        self.process.wait_until_listening()
        wait_until(lambda: port_accepts(self.api_port), 10, what=f"{name}'s registration API")
        self.process.wait_for_log("etcd registry listed", timeout=10)
        self.client = RegistryClient(self.api_port)

    def routed(self, host: str) -> str | None:
        return routed_to(self.http, host)

    def etcd_state(self) -> dict[str, object]:
        return self.client.listing()["etcd"]  # type: ignore[no-any-return]


class World:
    def __init__(self, base: Path) -> None:
        self.cluster = EtcdCluster(base / "etcd")
        # Gateway b watches through m2 first: killing m2 cuts its watch, not a's.
        self.a = Gateway(base, "a", self.cluster.endpoints([0, 1, 2]))
        self.b = Gateway(base, "b", self.cluster.endpoints([2, 0, 1]))
        self.backends: dict[str, int] = {}

    def both_route(self, host: str, name: str | None) -> bool:
        return self.a.routed(host) == name and self.b.routed(host) == name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not etcd_available():
        if is_ci():
            pytest.fail("CI=true and no etcd binary (Debian's etcd-server): the etcd tests must not be skipped")
        pytest.skip("no etcd binary (install Debian's etcd-server)")
    base = tmp_path_factory.mktemp("e2e-etcd")
    (base / "etcd").mkdir()
    backends = [start_whoami(name) for name in ("alpha", "beta")]
    world = None
    try:
        world = World(base)
        world.backends = {name: port for name, (_, port) in zip(("alpha", "beta"), backends)}
        yield world
    finally:
        if world is not None:
            world.a.process.stop()
            world.b.process.stop()
            world.cluster.stop()
        for process, _ in backends:
            process.terminate()
            process.wait(10)


def _time_until_both_route(world: World, host: str, name: str, limit: float = 10.0) -> tuple[float, float]:
    """Seconds from now until a, then b, route `host` to `name` (polled every 2 ms)."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    while len(seen) < 2:
        for label, gateway in (("a", world.a), ("b", world.b)):
            if label not in seen and gateway.routed(host) == name:
                seen[label] = time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"{host} not routed to {name} by both gateways within {limit} s: {seen}")
        time.sleep(0.002)
    return seen["a"], seen["b"]


def test_registered_through_one_is_routed_by_both_heartbeats_keep_it_expiry_removes_it(world: World) -> None:
    alpha = world.backends["alpha"]
    response = world.a.client.register("shared", "s-1", address=LOOPBACK, port=alpha, hosts=["shared.test"], ttl=2)
    assert response.status == 201, response.body
    on_a, on_b = _time_until_both_route(world, "shared.test", "alpha")
    record("etcd: registered through gateway a, routed by a / by b after", f"{on_a * 1000:.1f} ms / {on_b * 1000:.1f} ms")
    # Heartbeats through the other gateway (they are etcd lease keep-alives) for three TTLs.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert world.b.client.heartbeat("shared", "s-1").status == 200
        assert world.both_route("shared.test", "alpha")
        time.sleep(0.5)
    listing = world.b.client.listing()["services"]["shared"]
    assert [entry["instance"] for entry in listing] == ["s-1"] and 0 < listing[0]["expires_in"] <= 2
    mark_a, mark_b = world.a.process.log_mark(), world.b.process.log_mark()
    stopped = time.monotonic()
    wait_until(lambda: world.both_route("shared.test", None), 8, what="shared.test gone from both gateways")
    record("etcd: heartbeats stopped (ttl 2 s), gone from both after", f"{time.monotonic() - stopped:.2f} s")
    for gateway, mark in ((world.a, mark_a), (world.b, mark_b)):
        gateway.process.wait_for_log("instance s-1 of service shared removed", timeout=2, since=mark)
    assert world.a.client.heartbeat("shared", "s-1").status == 404


def test_delete_through_one_removes_from_both_at_once(world: World) -> None:
    beta = world.backends["beta"]
    assert world.b.client.register("gone", "g-1", address=LOOPBACK, port=beta, hosts=["gone.test"]).status == 201
    _time_until_both_route(world, "gone.test", "beta")
    assert world.a.client.deregister("gone", "g-1").status == 200
    assert world.a.routed("gone.test") is None  # the gateway that took the DELETE: the very next request
    start = time.monotonic()
    wait_until(lambda: world.b.routed("gone.test") is None, 5, interval=0.002, what="gone.test gone from b")
    record("etcd: DELETE through a, gone from b after", f"{(time.monotonic() - start) * 1000:.1f} ms")
    assert "gone" not in world.b.client.listing()["services"]


def test_clash_is_409_across_gateways(world: World) -> None:
    alpha = world.backends["alpha"]
    assert world.a.client.register("mine", "m-1", address=LOOPBACK, port=alpha, hosts=["mine.test"]).status == 201
    _time_until_both_route(world, "mine.test", "alpha")
    response = world.b.client.register("yours", "y-1", address=LOOPBACK, port=alpha, hosts=["mine.test"])
    assert response.status == 409
    assert "'mine'" in json.loads(response.body)["error"] and "'yours'" in json.loads(response.body)["error"]
    assert world.a.client.deregister("mine", "m-1").status == 200


def _leader(world: World) -> int:
    import urllib.request

    for index in range(world.cluster.size):
        if world.cluster.processes[index] is None:
            continue
        try:
            request = urllib.request.Request(world.cluster.url(index) + "/v3/maintenance/status", data=b"{}")
            with urllib.request.urlopen(request, timeout=2) as response:
                status = json.loads(response.read())
        except OSError:
            continue
        if status.get("leader") == status.get("header", {}).get("member_id"):
            return index
    raise AssertionError("no etcd leader")


class _Stream(threading.Thread):
    """A bounded request stream to both gateways: at most `count` requests, one every `pause` seconds."""

    def __init__(self, world: World, host: str, count: int = 400, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.world, self.host, self.count, self.pause = world, host, count, pause
        self.sent = 0
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        for index in range(self.count):
            if self.done.is_set():
                break
            gateway = self.world.a if index % 2 == 0 else self.world.b
            answer = gateway.routed(self.host)
            self.sent += 1
            if answer != "alpha":
                self.failures.append(f"request {index} to {'ab'[index % 2]}: {answer}")
            time.sleep(self.pause)


def test_killing_one_member_under_a_request_stream_fails_nothing(world: World) -> None:
    alpha, beta = world.backends["alpha"], world.backends["beta"]
    assert world.a.client.register("steady", "st-1", address=LOOPBACK, port=alpha, hosts=["steady.test"]).status == 201
    _time_until_both_route(world, "steady.test", "alpha")
    stream = _Stream(world, "steady.test")
    stream.start()
    time.sleep(0.5)
    victim = _leader(world)
    world.cluster.kill(victim)
    try:
        # Registrations and heartbeats still work through both gateways, and both see them.
        for gateway, instance in ((world.a, "k-a"), (world.b, "k-b")):
            response = gateway.client.register("during", instance, address=LOOPBACK, port=beta, hosts=["during.test"])
            assert response.status == 201, response.body
        assert world.b.client.heartbeat("steady", "st-1").status == 200
        wait_until(lambda: world.both_route("during.test", "beta"), 10, what="during.test routed by both")
        stream.join(30)
    finally:
        stream.done.set()
        stream.join(10)
        world.cluster.start(victim)
        world.cluster.wait_healthy()
    record("etcd: leader killed under a request stream", f"{stream.sent} requests, {len(stream.failures)} failed")
    assert stream.failures == []
    for gateway, instance in ((world.a, "k-a"), (world.b, "k-b")):
        assert gateway.client.deregister("during", instance).status == 200
    assert world.a.client.deregister("steady", "st-1").status == 200


def test_a_cut_watch_resumes_without_losing_an_update(world: World) -> None:
    alpha = world.backends["alpha"]
    endpoint = str(world.b.etcd_state()["watch_endpoint"])
    member = [world.cluster.url(i) for i in range(world.cluster.size)].index(endpoint)
    mark = world.b.process.log_mark()
    world.cluster.kill(member)
    try:
        # Written while b's watch is down (through a, whose requests fail over to the living members).
        wait_until(lambda: world.a.client.register(
            "cut", "c-1", address=LOOPBACK, port=alpha, hosts=["cut.test"]).status == 201, 10, what="register cut")
        world.b.process.wait_for_log(f"etcd watch on {endpoint} ended", timeout=10, since=mark)
        wait_until(lambda: world.b.routed("cut.test") == "alpha", 10, what="b routes cut.test after its watch resumed")
    finally:
        world.cluster.start(member)
        world.cluster.wait_healthy()
    # And after the member is back, updates keep flowing.
    assert world.a.client.deregister("cut", "c-1").status == 200
    wait_until(lambda: world.b.routed("cut.test") is None, 5, what="b drops cut.test")
    assert f"etcd watch on {endpoint} ended" in world.b.process.log_text()[mark:]


def test_without_quorum_the_last_known_routes_keep_serving(world: World) -> None:
    alpha = world.backends["alpha"]
    assert world.a.client.register("last", "l-1", address=LOOPBACK, port=alpha, hosts=["last.test"], ttl=30).status == 201
    _time_until_both_route(world, "last.test", "alpha")
    marks = (world.a.process.log_mark(), world.b.process.log_mark())
    world.cluster.kill(0)
    world.cluster.kill(1)
    try:
        for gateway, mark in zip((world.a, world.b), marks):
            gateway.process.wait_for_log("keeping the last known", timeout=20, since=mark)
        for _ in range(20):
            assert world.both_route("last.test", "alpha")
            time.sleep(0.05)
        # A registration cannot be stored: a clear 503, nothing applied.
        response = world.a.client.register("nope", "n-1", address=LOOPBACK, port=alpha, hosts=["nope.test"])
        assert response.status == 503, response.body
        assert world.a.routed("nope.test") is None
    finally:
        world.cluster.start(0)
        world.cluster.start(1)
        world.cluster.wait_healthy()
    for gateway, mark in zip((world.a, world.b), marks):
        gateway.process.wait_for_log("etcd available again", timeout=20, since=mark)
    assert world.both_route("last.test", "alpha")
    assert world.a.client.deregister("last", "l-1").status == 200
