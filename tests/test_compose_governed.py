"""compose-examples/governed: rate limit, canary and fallback (plus compression, redirect, rewrite) together, run
with docker-compose and routed through the real labelgw."""

from __future__ import annotations

import gzip
import http.client
import os
import time
from typing import Callable

import docker
import pytest

from support import TwistdProcess, free_port, http_get, wait_for_port
from test_compose_examples import EXAMPLES, run_compose

pytestmark = pytest.mark.docker

GOVERNED = EXAMPLES / "governed" / "docker-compose.yml"
SERVICES = {
    "shop-v1": "LABELGW_EXAMPLE_SHOP_V1_PORT",
    "shop-v2": "LABELGW_EXAMPLE_SHOP_V2_PORT",
    "shop-static": "LABELGW_EXAMPLE_SHOP_STATIC_PORT",
}
HOST = "shop.localhost"


def ask(gw: TwistdProcess, path: str = "/", **headers: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": HOST, **headers})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_governed_stack(
    docker_client: docker.DockerClient, busybox_image: str, unique_name: Callable[..., str],
    labelgw: Callable[..., TwistdProcess],
) -> None:
    assert GOVERNED.exists()
    name = unique_name("governed")
    ports = {service: free_port() for service in SERVICES}
    env = dict(os.environ, LABELGW_EXAMPLE_IMAGE=busybox_image)
    for service, variable in SERVICES.items():
        env[variable] = str(ports[service])
    base = ["-p", name, "-f", str(GOVERNED)]
    try:
        run_compose([*base, "up", "-d"], env=env)
        for port in ports.values():
            wait_for_port(port, timeout=20)
        gw = labelgw()
        deadline = time.monotonic() + 20
        while http_get(gw.base_url + "/", host=HOST).status != 200:
            assert time.monotonic() < deadline, gw.log_text()[-3000:]
            time.sleep(0.1)

        # Canary: new clients (one X-Client each, no cookie) see both versions, v1 for most.
        bodies = [ask(gw, **{"X-Client": f"c{i}"})[2] for i in range(60)]
        assert set(bodies) <= {b"shop v1\n", b"shop v2\n"}
        assert bodies.count(b"shop v2\n") >= 1 and bodies.count(b"shop v1\n") > bodies.count(b"shop v2\n")

        # Rate limit: one client's 20 tokens, then 429 (tokens come back at 20/s while the loop runs).
        started = time.monotonic()
        statuses = [ask(gw, **{"X-Client": "greedy"})[0] for _ in range(40)]
        refilled = int((time.monotonic() - started) * 20)
        assert statuses[:20] == [200] * 20 and statuses.count(429) >= 20 - refilled

        # Compression, redirect, rewrite.
        status, headers, body = ask(gw, **{"X-Client": "z", "Accept-Encoding": "gzip"})
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert gzip.decompress(body) in (b"shop v1\n", b"shop v2\n")
        status, headers, _ = ask(gw, "/old/index.html", **{"X-Client": "r"})
        assert status == 308 and headers["location"] == "/new/index.html"
        assert ask(gw, "/new/index.html", **{"X-Client": "r"})[2] in (b"shop v1\n", b"shop v2\n")

        # Fallback: both versions stopped, shop-static answers.
        run_compose([*base, "stop", "-t", "1", "shop-v1", "shop-v2"], env=env)
        deadline = time.monotonic() + 20
        while ask(gw, **{"X-Client": "late"})[2] != b"shop, static edition\n":
            assert time.monotonic() < deadline, gw.log_text()[-3000:]
            time.sleep(0.2)
    finally:
        run_compose([*base, "down", "-v", "--remove-orphans", "-t", "1"], env=env)
