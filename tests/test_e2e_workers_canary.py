"""End to end: canary analysis by version under `twistd labelgw --workers 2` (labelgw.workers.canary).

The workers serve, the supervisor (which serves nothing) decides: a v2 at 20 % that answers 500 to half its
requests is cut on the traffic of both workers together, every worker stops sending new clients to it, the
supervisor's admin view, dashboard data and /metrics show the cut and why, and a resume on the supervisor's admin
listener reaches every worker. Requests on fresh connections, so that both workers take some (one inherited
socket, the kernel hands each connection to whichever worker accepts first). Real containers (whoami) on the
private engine; loopback only; every loop bounded in count and time."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from support.measurements import record
from test_e2e_canary import WINDOW, post, start_version, wait_for_versions

import pytest

pytestmark = pytest.mark.docker


def fresh_get(port: int, host: str, **headers: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/", headers={"Host": host, **headers})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("X-Whoami") or ""
    finally:
        connection.close()


def admin_json(gw: Any, path: str) -> Any:
    with urllib.request.urlopen(gw.admin_url + path, timeout=5) as response:
        return json.loads(response.read())


def test_a_failing_canary_is_cut_for_every_worker_and_resumed_from_the_supervisor(
    labelgw: Any, containers: Any, unique_name: Any, tmp_path: Path
) -> None:
    config = tmp_path / "canary.yml"
    # v2 fails every other request; a worker gets a part of v2's answers, which can be a run of 5 failures: the
    # outlier detector would eject v2 for 30 s before canary analysis sees 20 requests. Short ejections here.
    config.write_text(f"canary_window: {WINDOW}\nejection_base: 0.05\n")
    gw = labelgw("--config", str(config), "--workers", "2", "--access-log", "off")
    for index in (1, 2):
        gw.wait_for_log(f"worker {index} ready", timeout=60)
    service = unique_name("wcut").replace("-", "")
    host = f"{service}.localhost"
    start_version(containers, service, "v1", {})
    start_version(containers, service, "v2", {"traffic": "20", "canary.max_error_rate": "5%"}, "--fail-every", "2")
    wait_for_versions(gw, service, {"v1", "v2"})
    # Both workers route it (the supervisor pushed the containers): wait until requests answer at all.
    deadline = time.monotonic() + 20
    while fresh_get(gw.port, host)[0] == 404 and time.monotonic() < deadline:
        time.sleep(0.05)

    answers: list[tuple[float, int, str]] = []
    started = time.monotonic()
    cut_seen_at = None
    canary: dict[str, Any] = {}
    while time.monotonic() - started < 6 * WINDOW:
        for _ in range(20):
            status, version = fresh_get(gw.port, host)
            answers.append((time.monotonic(), status, version))
        canary = admin_json(gw, "/api/state")["services"][service]["canary"]["v2"]
        if canary["cut"]:
            cut_seen_at = time.monotonic()
            break
    assert cut_seen_at is not None, f"v2 was not cut: {canary}\n{gw.log_text()[-3000:]}"
    failures = [a for a in answers if a[1] != 200]
    assert all(version == "v2" for _, _, version in failures)
    # The supervisor's window holds the traffic the workers served (it serves none itself).
    assert canary["requests"] >= 20 and canary["error_rate"] >= 0.3
    assert "error rate" in canary["reason"] and "v1" in canary["reason"]
    served = [worker["requests"] for worker in admin_json(gw, "/workers")["workers"]]

    # Every worker applies the cut: new clients on fresh connections (both workers) all get v1, none fails.
    after = [fresh_get(gw.port, host) for _ in range(200)]
    assert Counter(after) == {(200, "v1"): 200}
    # A pinned request still reaches v2.
    assert fresh_get(gw.port, host, **{"X-Labelgw-Version": "v2"})[1] == "v2"
    view = admin_json(gw, "/api/state")["services"][service]
    assert (view["versions"]["v2"]["share"], view["versions"]["v1"]["share"]) == (0.0, 100.0)
    metrics = urllib.request.urlopen(gw.admin_url + "/metrics", timeout=5).read().decode()
    assert f'labelgw_canary_cut{{service="{service}",version="v2"}} 1.0' in metrics
    log = gw.log_text()
    assert f"canary: version v2 of service {service} cut" in log

    # Resume on the supervisor's admin listener: every worker gives v2 its share again.
    status, body = post(f"{gw.admin_url}/canary/{service}/v2/resume")
    assert status == 200 and body["cut"] is False
    deadline = time.monotonic() + 10
    seen: Counter[str] = Counter()
    while seen["v2"] == 0 and time.monotonic() < deadline:
        seen.update(version for _, version in (fresh_get(gw.port, host) for _ in range(20)))
    assert seen["v2"] > 0, seen
    record(
        "workers: canary cut of a v2 failing half its requests (--workers 2, window 3 s): time to cut, "
        "requests served per worker",
        f"{cut_seen_at - started:.2f} s, {served}",
    )
