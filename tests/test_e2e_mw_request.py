"""End to end: the request-side middlewares (header rules, basic auth, allowlist, body limit) set by container
labels, on the real `twistd -n labelgw` and real whoami containers."""

from __future__ import annotations

import base64
import time
from typing import Any

import bcrypt
import pytest

from support.measurements import record
from support.net import free_port, http_get
from test_e2e_middleware import ask, keep_alive
from test_e2e_routing import poll, whoami

pytestmark = pytest.mark.docker


def test_header_rules_seen_by_the_backend_and_the_client(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("hd").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "hd", free_port(), **{
        "headers.request.set.X-Env": "staging",
        "headers.request.remove": "X-Debug,X-Internal",
        "headers.response.set.Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "headers.response.remove": "Server",
    })
    poll(gw, host, lambda r: r.status == 200, timeout=20)
    answer = http_get(gw.base_url + "/", host=host, headers={"X-Debug": "1", "X-Internal": "yes", "X-Env": "prod", "X-Kept": "k"})
    echoed = answer.text.lower()
    assert answer.status == 200
    assert "x-env: staging" in echoed and "x-env: prod" not in echoed
    assert "x-debug" not in echoed and "x-internal" not in echoed and "x-kept: k" in echoed
    assert answer.header("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    assert answer.header("Server") is None and answer.header("X-Whoami") == "hd"


def test_basic_auth_401_then_200_and_the_field_not_forwarded(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("au").replace("-", "")
    host = f"{service}.localhost"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$")
    whoami(containers, service, "au", free_port(), **{"auth.basic": f"alice:{hashed}", "auth.realm": "staging"})
    poll(gw, host, lambda r: r.status == 401, timeout=20)
    refused = http_get(gw.base_url + "/", host=host)
    assert refused.status == 401 and refused.header("WWW-Authenticate") == 'Basic realm="staging", charset="UTF-8"'
    wrong = http_get(gw.base_url + "/", host=host, headers={"Authorization": "Basic " + base64.b64encode(b"alice:nope").decode()})
    assert wrong.status == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    connection = keep_alive(gw)
    started = time.monotonic()
    status, _, body = ask(connection, host, **good)
    first = time.monotonic() - started
    assert status == 200 and b"authorization" not in body.lower()
    started = time.monotonic()
    for _ in range(20):
        assert ask(connection, host, **good)[0] == 200
    cached = (time.monotonic() - started) / 20
    connection.close()
    record("auth.basic bcrypt cost 10: first request, then cached requests (ms each)", f"{first * 1000:.1f} ms, {cached * 1000:.2f} ms")


def test_allowlist_403_without_loopback_and_200_with_it(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    closed = unique_name("al").replace("-", "")
    opened = unique_name("ao").replace("-", "")
    whoami(containers, closed, "al", free_port(), allow="10.0.0.0/8,::1/128")
    whoami(containers, opened, "ao", free_port(), allow="10.0.0.0/8,127.0.0.1/32")
    poll(gw, f"{opened}.localhost", lambda r: r.status == 200, timeout=20)
    refused = poll(gw, f"{closed}.localhost", lambda r: r.status == 403, timeout=20)
    assert b"not allowed" in refused.body


def test_body_limit_413(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("mb").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "mb", free_port(), max_body="1KiB")
    poll(gw, host, lambda r: r.status == 200, timeout=20)
    big = http_get(gw.base_url + "/upload", host=host, method="POST", body=b"x" * 2000)
    assert big.status == 413 and b"limit" in big.body
    small = http_get(gw.base_url + "/upload", host=host, method="POST", body=b"x" * 1000)
    assert small.status == 200
