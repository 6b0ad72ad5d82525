"""End to end: canary analysis by version (labelgw.core.canary) with real containers and the real gateway.

A v2 at 20 % that answers 500 to half its requests is cut to 0 % within the window (`canary_window: 3` in the
config file); failures stop at the cut and v1 takes the traffic; sticky v2 clients move to v1 without a failed
request, pinned requests still reach v2, and the admin listener lifts the cut. A healthy v2 is not cut."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support.browser import Browser
from support.measurements import record
from support.net import free_port
from test_e2e_dashboard import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.docker

WINDOW = 3.0


def start_gateway(labelgw: Any, tmp_path: Path) -> Any:
    config = tmp_path / "canary.yml"
    config.write_text(f"canary_window: {WINDOW}\n")
    return labelgw("--config", str(config))


def start_version(containers: Any, service: str, version: str, labels: dict[str, str], *args: str) -> None:
    port = free_port()
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), "labelgw.version": version}
    all_labels.update({f"labelgw.{key}": value for key, value in labels.items()})
    command = ["-m", "labelgw.tools.whoami", "--port", str(port), "--name", version, *args]
    container = containers.python(command, labels=all_labels)
    containers.wait_serving(container, port)


def admin_state(gw: Any) -> dict[str, Any]:
    with urllib.request.urlopen(gw.admin_url + "/api/state", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def wait_for_versions(gw: Any, service: str, versions: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = admin_state(gw)["services"].get(service)
        if entry is not None and {v for v, e in entry["versions"].items() if e["ready"]} == versions:
            return
        time.sleep(0.05)
    raise AssertionError(f"versions {versions} of {service} not ready\n{gw.log_text()[-3000:]}")


def get(connection: http.client.HTTPConnection, host: str, **headers: str) -> tuple[int, str, str]:
    connection.request("GET", "/", headers={"Host": host, **headers})
    response = connection.getresponse()
    response.read()
    return response.status, response.getheader("X-Whoami") or "", response.getheader("Set-Cookie") or ""


def post(url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_failing_canary_is_cut_and_v1_takes_the_traffic(labelgw: Any, containers: Any, unique_name: Any, tmp_path: Path) -> None:
    gw = start_gateway(labelgw, tmp_path)
    service = unique_name("cut").replace("-", "")
    host = f"{service}.localhost"
    start_version(containers, service, "v1", {})
    start_version(containers, service, "v2", {"traffic": "20", "canary.max_error_rate": "5%"}, "--fail-every", "2")
    wait_for_versions(gw, service, {"v1", "v2"})

    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    answers: list[tuple[float, int, str]] = []
    started = time.monotonic()
    cut_seen_at = None
    # New clients (no cookie), a few hundred a second, until the admin view says v2 is cut (bounded in time).
    while time.monotonic() - started < 4 * WINDOW:
        for _ in range(20):
            status, version, _ = get(connection, host)
            answers.append((time.monotonic(), status, version))
        canary = admin_state(gw)["services"][service]["canary"]["v2"]
        if canary["cut"]:
            cut_seen_at = time.monotonic()
            break
    assert cut_seen_at is not None, f"v2 was not cut: {canary}\n{gw.log_text()[-3000:]}"
    time_to_cut = cut_seen_at - started
    before = [a for a in answers if a[0] <= cut_seen_at]
    failures = [a for a in before if a[1] != 200]
    to_v2 = [a for a in before if a[2] == "v2"]
    # Every failure came from v2, before the cut; v2 failed about half of its requests, no more.
    assert all(version == "v2" for _, _, version in failures)
    assert len(failures) <= len(to_v2)
    assert canary["requests"] >= 20 and canary["error_rate"] >= 0.3
    assert "error rate" in canary["reason"] and "v1" in canary["reason"]
    assert time_to_cut < 2 * WINDOW

    # After the cut: every new client gets v1, and nobody fails.
    after = [get(connection, host) for _ in range(200)]
    assert Counter((status, version) for status, version, _ in after) == {(200, "v1"): 200}
    view = admin_state(gw)["services"][service]
    assert (view["versions"]["v2"]["share"], view["versions"]["v1"]["share"]) == (0.0, 100.0)
    # A client that kept v2 moves to v1 on its next request, without a failure, and gets a new cookie.
    status, version, cookie = get(connection, host, Cookie=f"labelgw_version_{service}=v2")
    assert (status, version) == (200, "v1") and f"labelgw_version_{service}=v1;" in cookie
    # A request pinned to v2 still reaches it.
    assert get(connection, host, **{"X-Labelgw-Version": "v2"})[1] == "v2"
    # The log says why, with the figures.
    log = gw.log_text()
    assert "canary: version v2 of service " + service in log and "error rate" in log
    record(
        "canary cut of a v2 failing half its requests (window 3 s, limit 5 %): time to cut, client failures, "
        "requests before the cut",
        f"{time_to_cut:.2f} s, {len(failures)}, {len(before)}",
    )

    # The admin listener lifts the cut; unknown services and versions are 404.
    status, body = post(f"{gw.admin_url}/canary/{service}/v2/resume")
    assert status == 200 and body["cut"] is False and body["share"] == pytest.approx(20.0)
    assert post(f"{gw.admin_url}/canary/{service}/v9/resume")[0] == 404
    assert post(f"{gw.admin_url}/canary/nosuchservice/v2/resume")[0] == 404
    assert admin_state(gw)["services"][service]["canary"]["v2"]["cut"] is False
    connection.close()


def test_a_healthy_canary_is_not_cut(labelgw: Any, containers: Any, unique_name: Any, tmp_path: Path) -> None:
    gw = start_gateway(labelgw, tmp_path)
    service = unique_name("healthy").replace("-", "")
    host = f"{service}.localhost"
    start_version(containers, service, "v1", {})
    start_version(containers, service, "v2", {"traffic": "20", "canary.max_error_rate": "5%"})
    wait_for_versions(gw, service, {"v1", "v2"})

    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    counts: Counter[tuple[int, str]] = Counter()
    started = time.monotonic()
    # Two windows' worth of traffic.
    while time.monotonic() - started < 2 * WINDOW:
        for _ in range(20):
            status, version, _ = get(connection, host)
            counts[(status, version)] += 1
    connection.close()
    canary = admin_state(gw)["services"][service]["canary"]
    assert not canary["v2"]["cut"] and canary["v2"]["reason"] is None
    assert canary["v2"]["requests"] >= 20 and canary["v1"]["stable"]
    assert {status for status, _ in counts} == {200}
    total = sum(counts.values())
    share = counts[(200, "v2")] / total
    assert abs(share - 0.20) < 0.03, counts
    record("healthy canary v2 (window 3 s): requests, v2 share, cut", f"{total}, {100 * share:.1f} %, no")


def test_the_dashboard_shows_the_cut_and_its_reason(
    labelgw: Any, containers: Any, unique_name: Any, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    gw = start_gateway(labelgw, tmp_path)
    service = unique_name("dashcut").replace("-", "")
    host = f"{service}.localhost"
    start_version(containers, service, "v1", {})
    start_version(containers, service, "v2", {"traffic": "20", "canary.max_error_rate": "5%"}, "--fail-every", "2")
    wait_for_versions(gw, service, {"v1", "v2"})
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    started = time.monotonic()
    while not admin_state(gw)["services"][service]["canary"]["v2"]["cut"]:
        assert time.monotonic() - started < 4 * WINDOW, "v2 was not cut"
        for _ in range(20):
            get(connection, host)
    connection.close()
    browser.navigate(gw.admin_url + "/dashboard")
    row = json.dumps(f'[data-service="{service}"] tr[data-version="v2"]')
    cell = browser.wait_for(
        f"(document.querySelector({row}) || {{dataset: {{}}}}).dataset.cut === 'true' && "
        f"document.querySelector({row} + ' [data-field=canary]').innerText", 5,
    )
    assert cell.startswith("cut") and "error rate" in cell and "v1" in cell
    browser.screenshot(tmp_path / "dashboard-cut.png")
