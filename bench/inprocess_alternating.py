#!/usr/bin/env python3
"""The plain path when heads never repeat: two GETs and two responses alternating on one keep-alive connection, so
every request head and every response head is parsed (the repeated-head path of labelgw.http.server and
labelgw.http.upstream never applies). The same gateway as `bench/inprocess.py --observability default --without
log,metrics` (wrt with outlier ejection, no access log, no metrics).

    .venv/bin/python bench/inprocess_alternating.py [--requests 20000]       # CPU seconds, best of 5 runs
    .venv/bin/python bench/inprocess_alternating.py --callgrind [--requests 3000]
        # instructions per request (valgrind's callgrind, N against 2N requests, as bench/callgrind.py counts)

What the repeated-head check costs heads that never repeat, next to `bench/callgrind.py --observability default
--without log,metrics` (the same head every time). Nothing leaves the process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import inprocess  # noqa: E402
from tests.proxyharness import get, ok  # noqa: E402

REQUESTS = (get(b"api.localhost", path=b"/a"), get(b"api.localhost", path=b"/b"))
RESPONSES = (ok(b"hello"), ok(b"hellx", extra=b"X-A: 1\r\n"))


def setup() -> tuple[Any, Callable[[int], None]]:
    harness, _ = inprocess.setup(inprocess.GET, "default", ("log", "metrics"))
    client, upstream = harness.clients[0], harness.upstreams[0]
    to_proxy, from_backend = client.protocol.dataReceived, upstream.protocol.dataReceived
    client_transport, upstream_transport = client.transport, upstream.transport

    def loop(n: int) -> None:
        for index in range(n):
            to_proxy(REQUESTS[index & 1])
            from_backend(RESPONSES[index & 1])
            client_transport.clear()
            upstream_transport.clear()

    return harness, loop


def run(requests: int) -> float:
    harness, loop = setup()
    loop(100)
    started = time.process_time()
    loop(requests)
    elapsed = time.process_time() - started
    assert harness.connect_count() == 1 and harness.gateway.in_flight == 0
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="instructions per request under valgrind")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--only-run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only_run is not None:
        # One run of N requests after the warm-up: what the callgrind mode counts.
        run(args.only_run)
        return 0
    if args.callgrind:
        from callgrind import callgrind_total

        n = args.requests or 3000
        command = [args.python, str(Path(__file__).resolve()), "--only-run"]
        small = callgrind_total([*command, str(n)])
        large = callgrind_total([*command, str(2 * n)])
        print(f"alternating heads (default without log,metrics): {(large - small) / n:,.0f} instructions per request "
              f"(callgrind, {n} vs {2 * n} requests: {small:,} / {large:,})")
        return 0
    n = args.requests or 20000
    best = min(run(n) for _ in range(args.runs))
    print(f"alternating heads: {n} requests, {best / n * 1e6:.2f} us CPU per request (best of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
