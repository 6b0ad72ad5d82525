"""End to end, balancer=hash: the real `twistd -n labelgw`, three real whoami containers (host network, loopback),
`hash.key=header:X-User`. The same user always reaches the same backend; different users spread over all three."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from support.measurements import record
from support.net import free_port, http_get

pytestmark = pytest.mark.docker


def whoami(containers: Any, service: str, name: str, port: int, **labels: str) -> Any:
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), **{f"labelgw.{k}": v for k, v in labels.items()}}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", name], labels=all_labels)
    containers.wait_serving(container, port)
    return container


def admin_state(gw: Any) -> dict[str, Any]:
    assert gw.admin_url is not None
    response = http_get(gw.admin_url + "/api/state")
    assert response.status == 200
    return json.loads(response.body)


def wait_ready(gw: Any, service: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while admin_state(gw)["services"].get(service, {}).get("ready") != count:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{count} backends of {service} not ready\n{gw.log_text()[-3000:]}")
        time.sleep(0.05)


def get(connection: http.client.HTTPConnection, host: str, user: str | None) -> tuple[int, str]:
    headers = {"Host": host}
    if user is not None:
        headers["X-User"] = user
    connection.request("GET", "/", headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status, response.getheader("X-Whoami") or ""


def test_hash_on_a_header_keeps_each_user_on_one_backend(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("hash").replace("-", "")
    host = f"{service}.localhost"
    labels = {"balancer": "hash", "hash.key": "header:X-User"}
    for name in ("one", "two", "three"):
        whoami(containers, service, name, free_port(), **labels)
    wait_ready(gw, service, 3)
    view = admin_state(gw)["services"][service]
    assert view["balancer"] == "hash"

    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    served: dict[str, Counter[str]] = defaultdict(Counter)
    users = [f"user-{number}" for number in range(30)]
    try:
        for _ in range(5):  # five rounds over 30 users, interleaved
            for user in users:
                status, who = get(connection, host, user)
                assert status == 200
                served[user][who] += 1
        # Requests without the header are still served (placed at random under the load bound).
        assert {get(connection, host, None)[0] for _ in range(10)} == {200}
    finally:
        connection.close()
    # Each user: one backend, all five times.
    assert all(len(counts) == 1 and sum(counts.values()) == 5 for counts in served.values()), dict(served)
    homes = Counter(next(iter(counts)) for counts in served.values())
    assert set(homes) == {"one", "two", "three"}, homes
    record("hash on header:X-User: 30 users over 3 backends (users per backend)",
           ", ".join(f"{name} {homes[name]}" for name in ("one", "two", "three")))
