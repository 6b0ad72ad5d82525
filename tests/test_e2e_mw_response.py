"""End to end: compression, regex redirect and rewrite, and a plugin middleware (from the test tree, on the real
twistd's PYTHONPATH), set by container labels on whoami containers behind the real `twistd -n labelgw`."""

from __future__ import annotations

import gzip
import http.client
import os
from pathlib import Path
from typing import Any

import pytest

from support.net import free_port
from test_e2e_routing import poll, whoami

pytestmark = pytest.mark.docker

PLUGINS = Path(__file__).resolve().parent / "plugins"


def ask(gw: Any, host: str, path: str = "/", method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        connection.request(method, path, headers={"Host": host, **headers})
        response = connection.getresponse()
        body = response.read()
        return response.status, {key.lower(): value for key, value in response.getheaders()}, body
    finally:
        connection.close()


def test_compression_redirect_and_rewrite(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("cz").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "cz", free_port(), **{
        "compress": "true", "compress.min_size": "0",
        "redirect.regex": "^/old/(.*)", "redirect.replacement": "/new/$1", "redirect.permanent": "true",
        "rewrite.regex": "^/app/(.*)", "rewrite.replacement": "/inner/$1",
    })
    poll(gw, host, lambda r: r.status == 200, timeout=20)

    status, headers, body = ask(gw, host, "/hello", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked" and headers["vary"] == "Accept-Encoding"
    assert b"GET /hello HTTP/1.1" in gzip.decompress(body)
    status, headers, body = ask(gw, host, "/hello")
    assert status == 200 and "content-encoding" not in headers and b"GET /hello" in body
    status, headers, body = ask(gw, host, "/hello", method="HEAD", **{"Accept-Encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers and body == b""

    status, headers, _ = ask(gw, host, "/old/a?b=1")
    assert status == 308 and headers["location"] == "/new/a?b=1"
    status, _, body = ask(gw, host, "/app/x?y=2")
    assert status == 200 and b"GET /inner/x?y=2 HTTP/1.1" in body


def test_a_plugin_from_the_test_tree_routes_end_to_end(labelgw: Any, containers: Any, unique_name: Any) -> None:
    path = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p)
    gw = labelgw(env={"PYTHONPATH": path})
    service = unique_name("pl").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "pl", free_port(), **{
        "middlewares": "stamp", "plugin.stamp.header": "X-Stamp", "plugin.stamp.value": "e2e",
        "plugin.stamp.deny": "/secret",
    })
    poll(gw, host, lambda r: r.status == 200, timeout=20)
    status, headers, body = ask(gw, host, "/open")
    assert status == 200 and headers["x-stamp"] == "e2e"
    assert b"X-Stamp: e2e" in body  # whoami echoes the forwarded request's fields
    status, _, body = ask(gw, host, "/secret/x")
    assert status == 403 and b"stamp" in body

    # A container naming a plugin that does not exist is refused with the reason, the others keep working.
    bad = unique_name("pb").replace("-", "")
    whoami_port = free_port()
    containers.python(["-m", "labelgw.tools.whoami", "--port", str(whoami_port)], labels={
        "labelgw.service": bad, "labelgw.port": str(whoami_port), "labelgw.middlewares": "nosuch"})
    gw.wait_for_log("no middleware plugin named 'nosuch'", timeout=20)
    assert ask(gw, host, "/open")[0] == 200
