#!/usr/bin/env python3
"""The data path's own cost, without sockets: keep-alive requests through the test harness (tests/proxyharness.py),
one client connection and one pooled upstream connection on a memory reactor, timed in CPU seconds of this process
(time.process_time), so other load on the machine moves the figures less than wall-clock time would.

Two loops: a GET without a body (the hot path: no body reader is made), and a POST with a 5-byte Content-Length
body. Each prints the best of `--runs` runs of `--requests` requests. Compare two trees by running it from each:

    cd <tree> && python bench/inprocess.py --requests 20000

Nothing leaves the process: no network traffic at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The tree this script sits in, ahead of any installed labelgw: comparing two trees is what it is for.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.proxyharness import DEFAULT_SPECS, ProxyHarness, get, ok  # noqa: E402

GET = get(b"api.localhost")
POST = get(b"api.localhost", method=b"POST", extra=b"Content-Length: 5\r\n") + b"hello"
RESPONSE = ok()


def run(requests: int, request: bytes) -> float:
    """CPU seconds for `requests` requests on one warmed-up keep-alive connection."""
    harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
    client = harness.connect()
    client.send(request)
    upstream = harness.upstream().accept()
    upstream.send(RESPONSE)
    client_transport, upstream_transport = client.transport, upstream.transport
    client_transport.clear()
    upstream_transport.clear()
    to_proxy, from_backend = client.protocol.dataReceived, upstream.protocol.dataReceived
    started = time.process_time()
    for _ in range(requests):
        to_proxy(request)
        from_backend(RESPONSE)
        client_transport.clear()
        upstream_transport.clear()
    elapsed = time.process_time() - started
    # Every request was answered on the same connections: nothing failed along the way.
    assert harness.connect_count() == 1 and harness.gateway.in_flight == 0
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    import labelgw

    print(f"labelgw from {Path(labelgw.__file__).parent}")
    for name, request in (("GET, no body", GET), ("POST, 5-byte body", POST)):
        best = min(run(args.requests, request) for _ in range(args.runs))
        print(
            f"{name}: {args.requests} requests, best of {args.runs}: {best * 1000:.0f} ms CPU, "
            f"{best / args.requests * 1e6:.2f} us/request"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
