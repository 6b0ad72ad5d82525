"""End to end: the admin dashboard in a real headless Chromium, against the real twistd and real containers.

The page must show a labelled container's service and backend, the container skipped for a bad label, and a
container stopped within 3 s. Screenshots are kept in the test's directory (the path is printed).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import is_ci
from support.browser import Browser, find_chromium
from support.measurements import record
from support.net import free_port
from test_e2e_routing import poll

pytestmark = pytest.mark.docker


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        reason = "no chromium (Debian's chromium package; ./scripts/test installs it as root)"
        if is_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    browser = Browser.start(executable, tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.close()


def backend_state(service: str, container: str) -> str:
    """A JavaScript expression: the dashboard's state for one backend row ("" while it has none)."""
    selector = json.dumps(f'[data-service="{service}"] [data-backend="{container}"]')
    return f"((document.querySelector({selector}) || {{dataset: {{}}}}).dataset.state || '')"


def test_the_dashboard_shows_services_backends_skipped_containers_and_follows_a_stop(
    labelgw: Any, containers: Any, unique_name: Any, browser: Browser, tmp_path: Path
) -> None:
    gw = labelgw()
    service = unique_name("dash").replace("-", "")
    host = f"{service}.localhost"
    replicas = []
    for index in (1, 2):
        port = free_port()
        container = containers.python(
            ["-m", "labelgw.tools.whoami", "--port", str(port), "--name", f"r{index}"],
            labels={"labelgw.service": service, "labelgw.port": str(port), "labelgw.path": "/app"},
        )
        containers.wait_serving(container, port)
        replicas.append(container)
    # A second service in two versions: its traffic shares and sticky clients.
    canary = service + "v"
    for version, extra in (("v1", {}), ("v2", {"labelgw.traffic": "20"})):
        port = free_port()
        labels = {"labelgw.service": canary, "labelgw.port": str(port), "labelgw.version": version, **extra}
        container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", version], labels=labels)
        containers.wait_serving(container, port)
    skipped = containers.run(labels={"labelgw.service": service + "x", "labelgw.prot": "80"})
    poll(gw, host, lambda r: r.status == 200, path="/app")
    seen: set[str] = set()
    poll(gw, f"{canary}.localhost", lambda r: r.status == 200 and (seen.add(r.header("X-Whoami") or "") or seen == {"v1", "v2"}))
    # Some traffic, so that requests per second show (bounded: 200 requests on loopback).
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    for _ in range(200):
        connection.request("GET", "/app/x", headers={"Host": host})
        connection.getresponse().read()
    for _ in range(50):  # 50 new clients (no cookie): 40 get v1, 10 get v2
        connection.request("GET", "/", headers={"Host": f"{canary}.localhost"})
        connection.getresponse().read()

    browser.navigate(gw.admin_url + "/dashboard")
    first, second = (c.name for c in replicas)
    browser.wait_for(f"{backend_state(service, first)} === 'ready' && {backend_state(service, second)} === 'ready'", 10)
    text = browser.evaluate("document.body.innerText")
    assert f"http://{host}/app" in text
    assert skipped.name in text and "labelgw.prot" in text
    assert browser.evaluate("document.getElementById('status').dataset.state") == "live"
    versions = browser.wait_for(
        f"[...document.querySelectorAll('[data-service=\"{canary}\"] tr[data-version]')].map(r => r.innerText)", 5
    )
    with urllib.request.urlopen(gw.admin_url + "/api/state", timeout=5) as response:
        sticky = {v: e["sticky_clients"] for v, e in json.loads(response.read())["services"][canary]["versions"].items()}
    assert sticky["v1"] >= 40 and sticky["v2"] >= 10
    assert [row.split("\t")[:3] for row in versions] == [
        ["v1", "80.0 %", str(sticky["v1"])], ["v2", "20.0 %", str(sticky["v2"])],
    ], versions
    # Traffic during the page's life: a rate is computed between two updates.
    stop_traffic = threading.Event()

    def traffic() -> None:
        for _ in range(2000):  # bounded in count too; stopped at the end of the test in any case
            if stop_traffic.is_set():
                return
            try:
                connection.request("GET", "/app/x", headers={"Host": host})
                connection.getresponse().read()
            except OSError:
                return
            time.sleep(0.01)

    loader = threading.Thread(target=traffic, daemon=True)
    loader.start()
    try:
        browser.wait_for(
            "[...document.querySelectorAll('td[data-field=rps]')].some(td => /^[1-9]/.test(td.textContent))", 5
        )
        shot = browser.screenshot(tmp_path / "dashboard.png")
        print(f"dashboard screenshot: {shot}")

        # A replica stopped: the page says so within 3 s of the stop being asked.
        started = time.monotonic()
        stopper = threading.Thread(target=replicas[0].stop, kwargs={"timeout": 5}, daemon=True)
        stopper.start()
        browser.wait_for(f"{backend_state(service, first)} !== 'ready'", 3, interval=0.02)
        elapsed = time.monotonic() - started
    finally:
        stop_traffic.set()
        loader.join(5)
    record("dashboard: docker stop -> backend shown not ready (s)", f"{elapsed:.2f}")
    assert elapsed < 3
    assert browser.evaluate(backend_state(service, second)) == "ready"
    stopper.join(10)
    # The explain form: the stopped replica is out, the other one is chosen.
    url = json.dumps(f"http://{host}/app/users")
    browser.evaluate(
        f"document.getElementById('explain-url').value = {url}; "
        "document.getElementById('explain-form').requestSubmit(); true"
    )
    answer = browser.wait_for("document.getElementById('explain-result').textContent", 5)
    explained = json.loads(answer)
    assert explained["choice"]["container"] == second and explained["route"]["path"] == "/app"
    assert [row["container"] for row in explained["not_ready"]] == [first]
    assert browser.evaluate("document.getElementById('explain-answer').textContent").startswith(f"forwarded to {second}")
    shot = browser.screenshot(tmp_path / "dashboard-stopped.png")
    print(f"dashboard screenshot after the stop: {shot}")
    connection.close()
