"""`twistd labelgw --swarm` against a single-node swarm on loopback (tests/support/swarm.py: an engine of its own,
so the suite's engine never joins a swarm). Services use the host network on 127.0.0.1 ports."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterator

import pytest

from support import free_port, http_get, wait_until
from support.measurements import record
from support.swarm import SwarmEngine, running_tasks

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def swarm(docker_client: Any) -> Iterator[SwarmEngine]:
    """One swarm for the module (docker_client: skip like every Docker test when no engine can run)."""
    engine = SwarmEngine()
    try:
        engine.start()
    except Exception as error:
        engine.stop()
        pytest.fail(f"could not start a loopback swarm: {error}\n{engine.engine.log_tail()}")
    yield engine
    engine.stop()


@pytest.fixture
def services(swarm: SwarmEngine) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for service_id in made:
        try:
            swarm.api.remove_service(service_id)
        except Exception:
            pass  # removed by the test, or the swarm was left


def body(gateway: Any, host: str) -> tuple[int, str]:
    try:
        response = http_get(gateway.base_url + "/", host=host, timeout=5.0)
    except OSError as error:
        return 0, f"{type(error).__name__}"
    return response.status, response.body.decode(errors="replace").strip()


def answers(gateway: Any, host: str, count: int = 30) -> set[str]:
    return {text for status, text in (body(gateway, host) for _ in range(count)) if status == 200}


def test_services_are_routed_scaled_joined_and_removed(
    swarm: SwarmEngine, services: list[str], labelgw: Callable[..., Any], unique_name: Callable[[str], str]
) -> None:
    first_port, second_port, scaled_port = free_port(), free_port(), free_port()
    host = "shop.localhost"
    services.append(swarm.http_service(unique_name("shop-a"), first_port,
                                       {"labelgw.service": "shop", "labelgw.port": str(first_port)}, body="A"))
    gateway = labelgw("--swarm", docker_host=swarm.url)
    wait_until(lambda: body(gateway, host) == (200, "A"), 60, what="the first service routed")

    # A second service with the same labelgw.service: one more backend.
    second = swarm.http_service(unique_name("shop-b"), second_port,
                                {"labelgw.service": "shop", "labelgw.port": str(second_port)}, body="B")
    services.append(second)
    wait_until(lambda: answers(gateway, host) == {"A", "B"}, 60, what="both services answering")

    # Scaling from 0 to 1: 503 while there is no task, then routed. From `scale` returning to the first answer.
    scaled = swarm.http_service(unique_name("scaled"), scaled_port,
                                {"labelgw.service": "scaled", "labelgw.port": str(scaled_port)}, replicas=0)
    services.append(scaled)
    wait_until(lambda: body(gateway, "scaled.localhost")[0] == 503, 30, what="a service without tasks answering 503")
    swarm.scale(scaled, 1)
    returned = time.time()
    while body(gateway, "scaled.localhost")[0] != 200:
        assert time.time() - returned < 60, "the scaled-up task was never routed"
        time.sleep(0.005)
    routed = time.time()
    (task,) = running_tasks(swarm.tasks(scaled))
    running_at = datetime.fromisoformat(task["Status"]["Timestamp"][:26].rstrip("Z") + "+00:00").timestamp()
    record(
        "swarm: docker service scale returned -> new task routed",
        f"{(routed - returned) * 1000:.0f} ms (task running after {(running_at - returned) * 1000:.0f} ms, routed "
        f"{(routed - running_at) * 1000:.0f} ms after that; Traefik's swarm provider polls every 15 s)",
    )

    # Removing a service removes its backends; removing the last one removes the route.
    swarm.api.remove_service(services.pop(0))
    wait_until(lambda: answers(gateway, host, 10) == {"B"}, 30, what="only B left")
    swarm.api.remove_service(second)
    wait_until(lambda: body(gateway, host)[0] == 404, 30, what="the route gone")
    assert "Traceback" not in gateway.log_text()


def test_a_rolling_update_start_first_costs_no_failed_request(
    swarm: SwarmEngine, services: list[str], labelgw: Callable[..., Any], unique_name: Callable[[str], str]
) -> None:
    old_port, new_port = free_port(), free_port()
    host = "roll.localhost"
    service = swarm.http_service(unique_name("roll"), old_port,
                                 {"labelgw.service": "roll", "labelgw.port": str(old_port)}, body="v1")
    services.append(service)
    gateway = labelgw("--swarm", docker_host=swarm.url)
    wait_until(lambda: body(gateway, host) == (200, "v1"), 60, what="v1 routed")

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def stream() -> None:
        deadline = time.monotonic() + 90
        while not stop.is_set() and len(results) < 20_000 and time.monotonic() < deadline:
            results.append(body(gateway, host))
            time.sleep(0.002)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    time.sleep(0.5)
    # The new task listens on another port (host network, one node: the old one still holds the first); the old
    # task keeps the previous spec's labels, hence its port, until it leaves.
    swarm.update_http_service(service, new_port, {"labelgw.service": "roll", "labelgw.port": str(new_port)}, "v2")
    wait_until(lambda: swarm.update_state(service) == "completed", 90, interval=0.2, what="the update completed")
    wait_until(lambda: len(running_tasks(swarm.tasks(service))) == 1 and all(
        t["Status"]["State"] != "running" or t["DesiredState"] == "running" for t in swarm.tasks(service)),
        30, interval=0.2, what="the old task stopped")
    time.sleep(1.0)
    stop.set()
    reader.join(30)
    failures = [result for result in results if result[0] != 200]
    seen = {text for status, text in results if status == 200}
    record("swarm: rolling update (start-first) under a request stream",
           f"{len(results)} requests, {len(failures)} failed")
    assert seen == {"v1", "v2"}
    assert len(results) >= 200
    assert failures == [], failures[:5]
    assert results[-1] == (200, "v2")


def test_leaving_the_swarm_is_a_log_line_and_a_retry(
    swarm: SwarmEngine, services: list[str], labelgw: Callable[..., Any], unique_name: Callable[[str], str]
) -> None:
    port = free_port()
    services.append(swarm.http_service(unique_name("stay"), port, {"labelgw.service": "stay", "labelgw.port": str(port)}))
    gateway = labelgw("--swarm", docker_host=swarm.url)
    wait_until(lambda: body(gateway, "stay.localhost")[0] == 200, 60, what="routed")
    mark = gateway.log_mark()
    swarm.leave()
    try:
        line = gateway.wait_for_log("cannot list swarm services", timeout=30, since=mark)
        assert "not a swarm manager" in line and "retrying every 1" in line
        time.sleep(2.5)
        assert gateway.returncode is None  # still running
        assert gateway.log_text()[mark:].count("cannot list swarm services") == 1  # once, not every second
        assert http_get(gateway.admin_url + "/healthz", timeout=5).status == 200
    finally:
        services.clear()
        swarm.init()
    port = free_port()
    services.append(swarm.http_service(unique_name("back"), port, {"labelgw.service": "back", "labelgw.port": str(port)}))
    wait_until(lambda: body(gateway, "back.localhost")[0] == 200, 60, what="routed after joining again")
    assert "swarm services listed again" in gateway.log_text()[mark:]
    assert body(gateway, "stay.localhost")[0] == 404  # the old swarm's service is gone with it
    assert "Traceback" not in gateway.log_text()
