"""End to end, balancing and health: the real `twistd -n labelgw`, real whoami containers (host network, loopback),
and the admin JSON view. Backends are switched to failing or slow through their own /control endpoint."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from typing import Any, Callable

import pytest

from support.measurements import record
from support.net import free_port, http_get

pytestmark = pytest.mark.docker


def whoami(containers: Any, service: str, name: str, port: int, **labels: str) -> Any:
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), **{f"labelgw.{k}": v for k, v in labels.items()}}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", name], labels=all_labels)
    containers.wait_serving(container, port)
    return container


def control(port: int, **settings: int) -> None:
    """Switch a whoami backend directly (not through labelgw): status=NNN / delay_ms=N, 0 resets."""
    query = "&".join(f"{key}={value}" for key, value in settings.items())
    assert http_get(f"http://127.0.0.1:{port}/control?{query}").status == 200


class Client:
    """Sequential requests to one host through the gateway over a kept-alive connection."""

    def __init__(self, gw: Any, host: str) -> None:
        self.gw = gw
        self.host = host
        self.connection: http.client.HTTPConnection | None = None

    def get(self, path: str = "/") -> tuple[int, str]:
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=5)
            try:
                self.connection.request("GET", path, headers={"Host": self.host})
                response = self.connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
                continue
            if (response.getheader("Connection") or "").lower() == "close":
                self.close()
            return response.status, response.getheader("X-Whoami") or ""
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def admin_state(gw: Any) -> dict[str, Any]:
    assert gw.admin_url is not None
    response = http_get(gw.admin_url + "/api/state")
    assert response.status == 200
    return json.loads(response.body)


def backends(gw: Any, service: str) -> dict[str, dict[str, Any]]:
    view = admin_state(gw)["services"].get(service)
    return {b["container"]: b for b in view["backends"]} if view else {}


def wait_for(what: str, condition: Callable[[], Any], timeout: float, gw: Any) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{gw.log_text()[-3000:]}")
        time.sleep(0.02)


def names(containers_by_name: dict[str, Any]) -> dict[str, str]:
    """whoami name -> container name, from the containers this test started."""
    return {name: container.name for name, container in containers_by_name.items()}


def test_a_backend_answering_500_is_ejected_then_readmitted(labelgw: Any, containers: Any, unique_name: Any, tmp_path: Any) -> None:
    config = tmp_path / "labelgw.yaml"
    config.write_text("ejection_base: 1\n")  # 1 s x ejection count instead of 30 s
    gw = labelgw("--config", str(config))
    service = unique_name("ej").replace("-", "")
    client = Client(gw, f"{service}.localhost")
    good_port, bad_port = free_port(), free_port()
    # Round robin: the failing backend gets every other request, so five failures come in a row quickly.
    started = {
        "good": whoami(containers, service, "good", good_port, balancer="round_robin"),
        "bad": whoami(containers, service, "bad", bad_port, balancer="round_robin"),
    }
    bad = names(started)["bad"]
    wait_for("both backends ready", lambda: admin_state(gw)["services"].get(service, {}).get("ready") == 2, 10, gw)
    assert admin_state(gw)["services"][service]["balancer"] == "round_robin"

    control(bad_port, status=500)
    answers: list[tuple[int, str]] = []
    for _ in range(100):
        answers.append(client.get())
        if backends(gw, service)[bad]["ejected"]:
            break
    view = backends(gw, service)[bad]
    assert view["ejected"] and not view["ready"], view
    assert view["ejections"] == 1 and 0 < view["ejected_for"] <= 1.0
    failed = [who for status, who in answers if status == 500]
    assert failed == ["bad"] * 5, answers
    # While it is out, everything goes to the good one.
    assert {client.get() for _ in range(10)} == {(200, "good")}

    control(bad_port, status=0)
    wait_for("the bad backend back in rotation", lambda: backends(gw, service)[bad]["ready"], 5, gw)
    served = Counter(client.get() for _ in range(20))
    assert served == Counter({(200, "good"): 10, (200, "bad"): 10}), served
    assert "ejected for 1 s after 5 failed requests in a row" in gw.log_text()
    assert "re-admitted after its ejection" in gw.log_text()
    record("ejection (ejection_base 1 s): 500s answered before it", str(len(failed)))
    client.close()


class Load:
    """`clients` threads sending sequential requests over kept-alive connections until stopped (or 20 s)."""

    def __init__(self, gw: Any, host: str, clients: int) -> None:
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + 20
        self._threads = [threading.Thread(target=self._run, args=(Client(gw, host),), daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, client: Client) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                status, who = client.get()
            except Exception as error:  # counted, and the test fails on it
                self.errors.append(repr(error))
                continue
            self.answers.append((time.monotonic(), status, who))
        client.close()

    def since(self, start: float, end: float = float("inf")) -> Counter[str]:
        return Counter(who for at, _, who in list(self.answers) if start <= at < end)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def share(counts: Counter[str], name: str) -> float:
    return counts[name] / max(1, sum(counts.values()))


def test_a_slow_backend_loses_its_traffic_and_gets_it_back(labelgw: Any, containers: Any, unique_name: Any, tmp_path: Any) -> None:
    config = tmp_path / "labelgw.yaml"
    # wrt's estimate decays with a 1 s time constant instead of 10 s: a recovered backend is probed again
    # within a few seconds, which keeps this test short.
    config.write_text("balancer_decay: 1\n")
    gw = labelgw("--config", str(config))
    service = unique_name("slow").replace("-", "")
    ports = {name: free_port() for name in ("fast1", "fast2", "slow")}
    for name, port in ports.items():
        whoami(containers, service, name, port)
    wait_for("three backends ready", lambda: admin_state(gw)["services"].get(service, {}).get("ready") == 3, 10, gw)
    assert admin_state(gw)["services"][service]["balancer"] == "wrt"

    load = Load(gw, f"{service}.localhost", clients=6)
    try:
        began = time.monotonic()
        wait_for("traffic to every backend", lambda: len(load.since(began)) == 3 and sum(load.since(began).values()) >= 300, 5, gw)
        warm = load.since(began)

        control(ports["slow"], delay_ms=200)
        slowed = time.monotonic()
        time.sleep(2.0)
        # What was already queued on it finishes within the first 0.3 s; after that it gets probes only.
        while_slow = load.since(slowed + 0.3, slowed + 2.0)
        latencies = {b["container"]: b["latency_ms"] for b in admin_state(gw)["services"][service]["backends"]}

        control(ports["slow"], delay_ms=0)
        recovered = time.monotonic()
        back_after = wait_for(
            "the recovered backend's share back over 15 %",
            lambda: (now := time.monotonic()) > recovered + 1
            and share(load.since(now - 1, now), "slow") >= 0.15
            and now - recovered,
            12, gw,
        )
        after = load.since(time.monotonic() - 1)
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    assert {status for _, status, _ in load.answers} == {200}
    # Under a tenth of what it would get if latency did not count (a third).
    assert share(while_slow, "slow") < 0.1, while_slow
    record(
        "slow backend share (6 clients): warm / while 200 ms slow / last second after recovery",
        f"{share(warm, 'slow'):.0%} / {share(while_slow, 'slow'):.1%} of {sum(while_slow.values())} / "
        f"{share(after, 'slow'):.0%}; back over 15 % after {back_after:.1f} s",
    )
    record("wrt latency estimates while slow (ms)", ", ".join(f"{v}" for v in sorted(latencies.values(), key=lambda x: x or 0)))


def test_a_failing_health_check_takes_a_backend_out(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("hc").replace("-", "")
    client = Client(gw, f"{service}.localhost")
    checks = {"health.interval": "200ms", "health.timeout": "1s"}
    ports = {name: free_port() for name in ("steady", "flaky", "never")}
    started = {
        "steady": whoami(containers, service, "steady", ports["steady"], **{"health.path": "/health"}, **checks),
        "flaky": whoami(containers, service, "flaky", ports["flaky"], **{"health.path": "/health"}, **checks),
        # Its health path answers 404: it never gets traffic.
        "never": whoami(containers, service, "never", ports["never"], **{"health.path": "/status/404"}, **checks),
    }
    container = names(started)
    wait_for("two healthy backends", lambda: admin_state(gw)["services"].get(service, {}).get("ready") == 2, 10, gw)
    assert set(who for _, who in (client.get() for _ in range(40))) == {"steady", "flaky"}
    # Checked until its health path answered: a container still starting refuses connections, which marks it
    # unhealthy too, before its server answers the 404 this test is about.
    never = wait_for("the never-healthy backend marked unhealthy by its 404",
                     lambda: (b := backends(gw, service)[container["never"]])["health"] == "unhealthy"
                     and (b["health_check"] or {}).get("last") == "HTTP 404" and b, 10, gw)
    assert (never["ready"], never["requests"], never["health_check"]["last"]) == (False, 0, "HTTP 404")

    # 500 on every path: the health check takes it out (no proxied request reaches it meanwhile, so no ejection).
    control(ports["flaky"], status=500)
    changed_at = time.monotonic()
    wait_for("the flaky backend out of rotation", lambda: not backends(gw, service)[container["flaky"]]["ready"], 5, gw)
    out_after = time.monotonic() - changed_at
    flaky = backends(gw, service)[container["flaky"]]
    assert (flaky["health"], flaky["ejected"], flaky["health_check"]["last"]) == ("unhealthy", False, "HTTP 500")
    assert {client.get() for _ in range(20)} == {(200, "steady")}

    control(ports["flaky"], status=0)
    changed_at = time.monotonic()
    wait_for("the flaky backend back", lambda: backends(gw, service)[container["flaky"]]["ready"], 5, gw)
    back_after = time.monotonic() - changed_at
    # Re-admitted backends ramp up (slow start: a candidate in 10 % of picks at first), so 40 requests can
    # miss it by chance; it must get traffic within a bounded number of them.
    assert any(client.get()[1] == "flaky" for _ in range(400))
    record("health check 200 ms: out after / back after (s)", f"{out_after:.2f} / {back_after:.2f}")
    client.close()


def test_admin_view_shows_a_rejected_container(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    broken = containers.run(
        labels={"labelgw.service": unique_name("bad").replace("-", ""), "labelgw.port": "8080", "labelgw.weight": "heavy"}
    )
    rejection = wait_for(
        "the rejection in the admin view",
        lambda: next((r for r in admin_state(gw)["rejections"] if r["container"] == broken.name), None), 10, gw,
    )
    assert rejection["label"] == "labelgw.weight" and rejection["value"] == "heavy"
    assert "labelgw admin on http://127.0.0.1:" in gw.log_text()
