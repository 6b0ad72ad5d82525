#!/usr/bin/env python3
"""Per-request cost against the number of routes, deterministically: Python function calls per proxied GET (a
profile hook counts them: the same count means the same work), and CPU time per request as a second, noisier,
figure. In process, through the test harness (tests/proxyharness.py): a memory reactor, one keep-alive client
connection and one pooled upstream connection, no sockets, no traffic at all.

The routed service is api.localhost; the other routes are containers of their own services and hosts
(s1.localhost ... sN.localhost), as bench_many.py starts them on a real engine.

    .venv/bin/python bench/bench_routes.py [--routes 1,100,500] [--requests 2000]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.proxyharness import DEFAULT_SPECS, ProxyHarness, get, ok, spec  # noqa: E402

GET = get(b"api.localhost")
RESPONSE = ok()


def harness_with(routes: int) -> tuple[ProxyHarness, Any, Any]:
    """`routes` routes in all: api.localhost's, then one per extra service and host."""
    extra = [spec(f"s{index}", f"s{index}", 20000 + index, (f"s{index}.localhost",)) for index in range(1, routes)]
    harness = ProxyHarness(specs=[DEFAULT_SPECS[0], *extra])
    client = harness.connect()
    client.send(GET)
    upstream = harness.upstream().accept()
    upstream.send(RESPONSE)
    client.transport.clear()
    upstream.transport.clear()
    return harness, client, upstream


def one_request(client: Any, upstream: Any) -> None:
    client.protocol.dataReceived(GET)
    upstream.protocol.dataReceived(RESPONSE)
    client.transport.clear()
    upstream.transport.clear()


def calls_per_request(routes: int, requests: int) -> float:
    _, client, upstream = harness_with(routes)
    for _ in range(50):
        one_request(client, upstream)  # warm: caches, pools
    count = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    # No garbage collection inside the count: one would run the finalizers of whatever earlier code left (in a
    # test session, earlier tests' objects), Python calls that are not this request's.
    gc.collect()
    gc.disable()
    sys.setprofile(hook)
    try:
        for _ in range(requests):
            one_request(client, upstream)
    finally:
        sys.setprofile(None)
        gc.enable()
    return count / requests


def cpu_us_per_request(routes: int, requests: int, runs: int) -> float:
    harness, client, upstream = harness_with(routes)
    best = float("inf")
    for _ in range(runs):
        started = time.process_time()
        for _ in range(requests):
            one_request(client, upstream)
        best = min(best, time.process_time() - started)
    assert harness.connect_count() == 1 and harness.gateway.in_flight == 0
    return best / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default="1,100,500", help="comma-separated route counts (default 1,100,500)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.routes.split(",") if part.strip()]
    if not counts or min(counts) < 1 or args.requests < 10:
        parser.error("--routes: positive counts; --requests >= 10")
    print(f"{'routes':>7} {'calls/request':>14} {'CPU us/request (best of runs)':>30}")
    for routes in counts:
        calls = calls_per_request(routes, args.requests)
        cpu = cpu_us_per_request(routes, args.requests * 5, args.runs)
        print(f"{routes:>7} {calls:>14.1f} {cpu:>30.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
