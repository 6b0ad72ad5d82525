"""End to end: the admin dashboard in a real headless Chromium, against the real twistd and real containers.

The page must show a labelled container's service and backend, the container skipped for a bad label, and a
container stopped within 3 s. Screenshots are kept in the test's directory (the path is printed).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
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
            ["-m", "labelgw.whoami", "--port", str(port), "--name", f"r{index}"],
            labels={"labelgw.service": service, "labelgw.port": str(port), "labelgw.path": "/app"},
        )
        containers.wait_serving(container, port)
        replicas.append(container)
    skipped = containers.run(labels={"labelgw.service": service + "x", "labelgw.prot": "80"})
    poll(gw, host, lambda r: r.status == 200, path="/app")
    # Some traffic, so that requests per second show (bounded: 200 requests on loopback).
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    for _ in range(200):
        connection.request("GET", "/app/x", headers={"Host": host})
        connection.getresponse().read()

    browser.navigate(gw.admin_url + "/dashboard")
    first, second = (c.name for c in replicas)
    browser.wait_for(f"{backend_state(service, first)} === 'ready' && {backend_state(service, second)} === 'ready'", 10)
    text = browser.evaluate("document.body.innerText")
    assert f"http://{host}/app" in text
    assert skipped.name in text and "labelgw.prot" in text
    assert browser.evaluate("document.getElementById('status').dataset.state") == "live"
    # Traffic during the page's life: a rate is computed between two updates.
    stop_traffic = threading.Event()

    def traffic() -> None:
        while not stop_traffic.is_set():
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
    shot = browser.screenshot(tmp_path / "dashboard-stopped.png")
    print(f"dashboard screenshot after the stop: {shot}")
    connection.close()
