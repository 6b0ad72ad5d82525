#!/usr/bin/env python3
"""The data path's own cost, without sockets: keep-alive requests through the test harness (tests/proxyharness.py),
one client connection and one pooled upstream connection on a memory reactor, timed in CPU seconds of this process
(time.process_time), so other load on the machine moves the figures less than wall-clock time would.

Two loops: a GET without a body (the hot path: no body reader is made), and a POST with a 5-byte Content-Length
body. Each prints the best of `--runs` runs of `--requests` requests. Compare two trees by running it from each:

    cd <tree> && python bench/inprocess.py --requests 20000

`--observability default` builds the gateway as a default labelgw does (the wrt balancer with outlier ejection,
metrics counters and the access log in the common format, its lines handed to a sink that drops them); `bare` (the
default of this script) is the test harness's gateway as it is (round robin, no metrics, no access log).
`--middleware` gives the routed service the middlewares of bench_proxy.py's `labelgw-mw` target (a rate limit far
above the load, a request and a response header rule, an allowlist that admits the client): what the chain costs
next to the same run without it (issue 10). `--profile` counts Python function calls per request (cProfile) and lists the most called functions: a figure that
does not depend on the machine's load. `bench/callgrind.py` counts instructions per request the same way.

Nothing leaves the process: no network traffic at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# The tree this script sits in, ahead of any installed labelgw: comparing two trees is what it is for.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.proxyharness import DEFAULT_SPECS, ProxyHarness, get, ok  # noqa: E402

GET = get(b"api.localhost")
POST = get(b"api.localhost", method=b"POST", extra=b"Content-Length: 5\r\n") + b"hello"
RESPONSE = ok()
REQUESTS = {"get": ("GET, no body", GET), "post": ("POST, 5-byte body", POST)}


class NullSink:
    """An access-log destination that takes every batch and writes nothing."""

    pending = 0

    def put(self, data: bytes) -> bool:
        return True

    def reopen(self) -> None:
        pass

    def close(self, timeout: float = 2.0) -> None:
        pass

    def start(self) -> None:
        pass


# bench_proxy.py's MIDDLEWARE_KEYS, with the harness's client network (10.0.0.9) in the allowlist.
MIDDLEWARE_LABELS = {
    "ratelimit": "1000000/s",
    "ratelimit.burst": "1000000",
    "headers.request.set.X-Env": "bench",
    "headers.response.remove": "X-Powered-By",
    "allow": "10.0.0.0/8",
}


def _specs(middleware: bool) -> tuple[Any, ...]:
    """The routed container (api-1), with the middleware labels when asked."""
    if not middleware:
        return DEFAULT_SPECS[:1]
    from dataclasses import replace

    from labelgw.core.middleware import parse_middleware

    first = DEFAULT_SPECS[0]
    return (replace(first, middleware=parse_middleware(MIDDLEWARE_LABELS, first.service)),)


def _with_chains(harness: ProxyHarness, specs: tuple[Any, ...]) -> None:
    """The bare harness, with the middleware manager that builds a service's chain (labelgw.cli.app adds it)."""
    from labelgw.core.registry import Registry
    from labelgw.middleware.chain import MiddlewareManager

    registry = Registry()
    registry.add_listener(MiddlewareManager(harness.reactor, registry.services))
    for container in specs:
        registry.apply(container.container_id, container)
    harness.registry = registry
    harness.gateway.table = registry.table


def _as_default(harness: ProxyHarness, specs: tuple[Any, ...] = DEFAULT_SPECS[:1]) -> None:
    """The gateway as a default labelgw builds it (labelgw.cli.app): the registry's wrt policy with outlier
    ejection and the middleware manager, metrics counters, and the access log in the common format."""
    from labelgw.control.metrics import RequestMetrics
    from labelgw.control.outlier import OutlierDetector
    from labelgw.core.balancer import service_policy_factory
    from labelgw.core.registry import Registry
    from labelgw.http.accesslog import AccessLog
    from labelgw.middleware.chain import MiddlewareManager

    reactor = harness.reactor
    registry = Registry(
        policy_factory=service_policy_factory("wrt", reactor.seconds),
        listeners=(OutlierDetector(reactor, lambda pool, backend: registry.backend_state_changed(pool, backend)),),
    )
    registry.add_listener(MiddlewareManager(reactor, registry.services))
    for container in specs:
        registry.apply(container.container_id, container)
    harness.registry = registry
    harness.gateway.table = registry.table
    harness.gateway.metrics = RequestMetrics()
    harness.gateway.access_log = AccessLog(reactor, "common", NullSink())


def setup(
    request: bytes, observability: str = "bare", without: tuple[str, ...] = (), middleware: bool = False
) -> tuple[ProxyHarness, Any]:
    """A warmed-up harness, and a function that sends `n` requests through it. `without`: parts of the default
    setup to leave out (`log`, `metrics`), to see what each costs; `middleware`: the labelgw-mw target's chain."""
    specs = _specs(middleware)
    harness = ProxyHarness(specs=specs)
    if observability == "default":
        _as_default(harness, specs)
        if "log" in without:
            harness.gateway.access_log = None
        if "metrics" in without:
            harness.gateway.metrics = None
    elif middleware:
        _with_chains(harness, specs)
    if middleware:
        assert harness.registry.services["api"].middleware is not None, "the middleware chain was not built"
    client = harness.connect()
    client.send(request)
    upstream = harness.upstream().accept()
    upstream.send(RESPONSE)
    client_transport, upstream_transport = client.transport, upstream.transport
    client_transport.clear()
    upstream_transport.clear()
    to_proxy, from_backend = client.protocol.dataReceived, upstream.protocol.dataReceived

    def loop(n: int) -> None:
        for _ in range(n):
            to_proxy(request)
            from_backend(RESPONSE)
            client_transport.clear()
            upstream_transport.clear()

    return harness, loop


def run(
    requests: int, request: bytes, observability: str = "bare", without: tuple[str, ...] = (), middleware: bool = False
) -> float:
    """CPU seconds for `requests` requests on one warmed-up keep-alive connection."""
    harness, loop = setup(request, observability, without, middleware)
    loop(100)
    started = time.process_time()
    loop(requests)
    elapsed = time.process_time() - started
    # Every request was answered on the same connections: nothing failed along the way.
    assert harness.connect_count() == 1 and harness.gateway.in_flight == 0
    return elapsed


def profile(
    requests: int, request: bytes, observability: str, top: int, without: tuple[str, ...] = (), middleware: bool = False
) -> None:
    """Python calls per request (cProfile), and the most called functions."""
    import cProfile
    import pstats

    harness, loop = setup(request, observability, without, middleware)
    loop(100)
    profiler = cProfile.Profile()
    profiler.enable()
    loop(requests)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    total = 0
    for (filename, line, name), (primitive, calls, own, cumulative, _callers) in raw.items():
        if name == "loop" or "disable" in name:
            continue
        total += calls
        rows.append((calls / requests, own / requests * 1e6, f"{Path(filename).name}:{line}({name})"))
    print(f"  {total / requests:.1f} Python calls per request (cProfile, {requests} requests)")
    for calls, own, where in sorted(rows, key=lambda row: (-row[0], -row[1]))[:top]:
        print(f"  {calls:6.2f} calls  {own:6.2f} us own  {where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--only", choices=sorted(REQUESTS), help="one of the two loops")
    parser.add_argument("--observability", choices=("bare", "default"), default="bare")
    parser.add_argument("--without", default="", help="with --observability default: leave out log, metrics (a,b)")
    parser.add_argument("--middleware", action="store_true", help="the labelgw-mw target's middlewares on the route")
    parser.add_argument("--profile", action="store_true", help="count Python calls per request instead of timing")
    parser.add_argument("--top", type=int, default=40, help="with --profile: how many functions to list")
    args = parser.parse_args(argv)
    without = tuple(part for part in args.without.split(",") if part)
    import labelgw

    print(f"labelgw from {Path(labelgw.__file__).parent} ({args.observability}{', middleware' if args.middleware else ''})")
    for key in [args.only] if args.only else sorted(REQUESTS):
        name, request = REQUESTS[key]
        if args.profile:
            print(f"{name}:")
            profile(args.requests, request, args.observability, args.top, without, args.middleware)
            continue
        best = min(run(args.requests, request, args.observability, without, args.middleware) for _ in range(args.runs))
        print(
            f"{name}: {args.requests} requests, best of {args.runs}: {best * 1000:.0f} ms CPU, "
            f"{best / args.requests * 1e6:.2f} us/request"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
