"""End to end: the middlewares set by container labels, on the real `twistd -n labelgw` and real containers."""

from __future__ import annotations

import http.client
import threading
import time
from typing import Any

import pytest

from support.measurements import record
from support.net import free_port, http_get
from test_e2e_routing import poll, whoami

pytestmark = pytest.mark.docker


def keep_alive(gw: Any) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)


def ask(connection: http.client.HTTPConnection, host: str, path: str = "/", **headers: str) -> tuple[int, dict[str, str], bytes]:
    connection.request("GET", path, headers={"Host": host, **headers})
    response = connection.getresponse()
    body = response.read()
    return response.status, {key.lower(): value for key, value in response.getheaders()}, body


def test_rate_limit_ten_per_second_per_client_header(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("rl").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "rl", free_port(), **{"ratelimit": "10/s", "ratelimit.burst": "10", "ratelimit.key": "header:X-Client"})
    poll(gw, host, lambda r: r.status == 200, timeout=20)  # keyed by the client address: another bucket

    connection = keep_alive(gw)
    started = time.monotonic()
    answers = [ask(connection, host, **{"X-Client": "alice"}) for _ in range(30)]
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in answers]
    record("rate limit 10/s burst 10: 30 requests from one client (statuses, seconds)",
           f"{statuses.count(200)} x 200, {statuses.count(429)} x 429 in {elapsed:.3f} s")
    # Tokens come back at 10/s while the loop runs: a slow machine may see one more 200 per 0.1 s it took.
    refilled = int(elapsed * 10)
    assert statuses[:10] == [200] * 10
    assert statuses.count(429) >= 20 - refilled and set(statuses) <= {200, 429}
    status, headers, body = next(answer for answer in answers if answer[0] == 429)
    assert headers["retry-after"] == "1"
    assert headers["ratelimit-policy"] == '"default";q=10;w=1'
    assert headers["ratelimit"].startswith('"default";r=0;t=')
    assert b"rate limit" in body
    # Another client (another X-Client) is not affected.
    other = keep_alive(gw)
    assert [ask(other, host, **{"X-Client": "bob"})[0] for _ in range(10)] == [200] * 10
    connection.close()
    other.close()


def test_max_inflight_two_gives_the_third_slow_request_a_fast_503(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("mi").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "mi", free_port(), max_inflight="2")
    poll(gw, host, lambda r: r.status == 200, timeout=20)

    results: list[int] = []

    def slow() -> None:
        results.append(http_get(gw.base_url + "/delay?ms=2000", host=host, timeout=10).status)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both in flight
    started = time.monotonic()
    third = http_get(gw.base_url + "/delay?ms=2000", host=host, timeout=10)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(10)
    record("max_inflight=2: the third slow request's 503 took", f"{took * 1000:.1f} ms")
    assert third.status == 503 and third.header("Retry-After") == "1"
    assert took < 1.0
    assert results == [200, 200]


def test_a_service_whose_containers_are_stopped_answers_from_its_fallback(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("main").replace("-", "")
    spare = unique_name("spare").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, spare, "spare", free_port())
    main = whoami(containers, service, "main", free_port(), fallback=spare)
    poll(gw, host, lambda r: r.status == 200 and r.header("X-Whoami") == "main", timeout=20)
    main.stop(timeout=5)
    answer = poll(gw, host, lambda r: r.status == 200 and r.header("X-Whoami") == "spare", timeout=20)
    assert f"Host: {host}" in answer.text
    for _ in range(5):
        reply = http_get(gw.base_url + "/", host=host)
        assert (reply.status, reply.header("X-Whoami")) == (200, "spare")


def test_breaker_opens_on_500s_and_closes_after_recovery(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("br").replace("-", "")
    host = f"{service}.localhost"
    port = free_port()
    whoami(containers, service, "br", port, **{"breaker.error_rate": "50%", "breaker.open": "2s"})
    poll(gw, host, lambda r: r.status == 200, timeout=20)
    # Switched on the backend itself: through labelgw, /control would meet the open breaker too.
    assert http_get(f"http://127.0.0.1:{port}/control?status=500").status == 200

    connection = keep_alive(gw)
    statuses: list[int] = []
    while len(statuses) < 40:
        started = time.monotonic()
        status, headers, body = ask(connection, host)
        took = time.monotonic() - started
        if status != 500:
            break
        statuses.append(status)
    # At least 20 requests in the window (the poll's successes count too), half of them failed: open.
    assert 19 <= len(statuses) <= 20, statuses
    assert status == 503 and b"circuit breaker open" in body
    assert headers["retry-after"] in ("1", "2")
    record("breaker open: a refused request took", f"{took * 1000:.1f} ms")

    assert http_get(f"http://127.0.0.1:{port}/control?status=0").status == 200
    time.sleep(2.1)
    after = [ask(connection, host)[0] for _ in range(20)]
    assert after == [200] * 20
    connection.close()
