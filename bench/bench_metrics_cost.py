"""What the /metrics counters cost the data path, without sockets or a load generator.

Runs N keep-alive requests through the deterministic proxy harness (tests/proxyharness.py: the real
ClientConnection, dispatcher, exchange and upstream connection on memory transports) with the gateway's counters on
and off, in interleaved rounds, and prints the CPU time per request (time.process_time) of each and their medians.
bench_proxy.py's `--targets labelgw,labelgw-nometrics` measures the same end to end, with more noise.

    .venv/bin/python bench/bench_metrics_cost.py [--requests 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from labelgw.control.metrics import RequestMetrics  # noqa: E402
from proxyharness import ProxyHarness, get, ok  # noqa: E402


def per_request_us(requests: int, metrics: bool) -> float:
    harness = ProxyHarness()
    harness.gateway.metrics = RequestMetrics() if metrics else None
    client = harness.connect()
    request, response = get(b"solo.localhost"), ok(b"hello\n")
    client.send(request)
    upstream = harness.upstream().accept()
    upstream.send(response)
    harness.settle()
    assert client.response().status == 200
    client.transport.clear()
    upstream.transport.clear()
    started = time.process_time()
    for _ in range(requests):  # over the one pooled upstream connection
        client.send(request)
        upstream.send(response)
        client.transport.clear()
        upstream.transport.clear()
    return (time.process_time() - started) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    figures: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for metrics in (True, False):
            figures[metrics].append(per_request_us(args.requests, metrics))
    for metrics in (True, False):
        runs = " ".join(f"{figure:.2f}" for figure in figures[metrics])
        print(f"metrics {'on ' if metrics else 'off'}: median {statistics.median(figures[metrics]):.2f} us/request  ({runs})")
    on, off = statistics.median(figures[True]), statistics.median(figures[False])
    print(f"counters: {on - off:+.2f} us/request (x{on / off:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
