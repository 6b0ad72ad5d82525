#!/usr/bin/env python3
"""Instructions per call of each observability part in isolation: the common access-log line, the metrics
update, the request-id assignment, and the writer hand-off, counted by valgrind's callgrind (N and 2N calls, the
difference divided by N, as bench/callgrind.py does for whole requests).

    .venv/bin/python bench/obs_parts.py [--calls 2000] [--parts log,metrics,ids] [--jobs 2]

Each part replays a real exchange: one GET goes through the deterministic proxy harness (tests/proxyharness.py,
the default gateway of bench/inprocess.py), the exchange its end hands to the access log is kept, and the part is
called N times with it (the clock moves on 1 ms per call, so the per-second time text is rebuilt as in real use).
`both` is what Exchange._complete calls with both on (fifth session): the access log's one call that also updates
the metrics, at the answer's own time (the duration's first bucket, as `metrics`).
`--inner` is what runs under valgrind. Nothing leaves the process. Run it from a copy of the tree, as callgrind.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("log", "metrics", "ids", "json", "handoff", "both")


def _captured() -> tuple[Any, Any, Any, Any]:
    """(harness, the access log, the exchange of one GET, its state before DONE)."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    from inprocess import GET, setup

    harness, loop = setup(GET, "default")
    access_log = harness.gateway.access_log
    seen: list[tuple[Any, Any]] = []
    original = access_log.exchange

    def keep(exchange: Any, state: Any, now: float | None = None, metrics: Any = None) -> None:
        seen.append((exchange, state))
        original(exchange, state, now, metrics)

    access_log.exchange = keep
    loop(1)
    access_log.exchange = original
    exchange, state = seen[-1]
    return harness, access_log, exchange, state


def _work(part: str) -> Callable[[int], None]:
    harness, access_log, exchange, state = _captured()
    clock = harness.reactor
    if part in ("log", "json"):
        if part == "json":
            from inprocess import NullSink

            from labelgw.http.accesslog import AccessLog

            access_log = AccessLog(clock, "json", NullSink())
        call = access_log.exchange

        def run(n: int) -> None:
            now = clock.seconds()
            for _ in range(n):
                now += 0.001
                call(exchange, state, now)
        return run
    if part == "both":
        # What Exchange._complete calls with the access log and the metrics on: one call for both.
        call, metrics = access_log.exchange, harness.gateway.metrics
        now = exchange.created_at + 0.0005

        def run(n: int) -> None:
            for _ in range(n):
                call(exchange, state, now, metrics)
        return run
    if part == "metrics":
        done = harness.gateway.metrics.exchange_done

        # As in the harness: an answer within the millisecond (the duration's first bucket).
        now = exchange.created_at + 0.0005

        def run(n: int) -> None:
            for _ in range(n):
                done(exchange, now)
        return run
    if part == "ids":
        from labelgw.http.parser import RequestHead  # noqa: F401  (the head type the ids are assigned to)

        head = exchange.head
        assign = harness.gateway.request_ids.assign

        def run(n: int) -> None:
            for _ in range(n):
                assign(head)
        return run
    if part == "handoff":
        from labelgw.http.accesslog import BATCH_PIECES, ThreadWriter

        pieces_of_a_line = (b"x" * 70, b"0.123 ", b"r" * 32, b"\n")

        def run(n: int) -> None:
            # What the access log does per line and per batch (AccessLog: a line's pieces on one list, joined at
            # the hand-over), with a real writer thread behind it.
            writer = ThreadWriter(None, fd=os.open(os.devnull, os.O_WRONLY))
            writer.start()
            pieces: list[bytes] = []
            for _ in range(n):
                pieces += pieces_of_a_line
                if len(pieces) >= BATCH_PIECES:
                    writer.put(b"".join(pieces))
                    pieces = []
            writer.close()
        return run
    raise SystemExit(f"unknown part {part}")


def instructions(part: str, calls: int, python: str) -> int:
    from callgrind import callgrind_total

    return callgrind_total([python, __file__, "--inner", part, "--calls", str(calls)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--parts", default="log,metrics,both,ids")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time")
    parser.add_argument("--inner", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        run = _work(args.inner)
        run(100)  # warm-up (specialisation, caches)
        run(args.calls)
        return 0
    # The runs are independent processes: run them side by side.
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [
            (part, pool.submit(instructions, part, args.calls, args.python),
             pool.submit(instructions, part, 2 * args.calls, args.python))
            for part in args.parts.split(",")
        ]
        for part, small, large in runs:
            print(f"{part}: {(large.result() - small.result()) / args.calls:,.0f} instructions per call "
                  f"({args.calls} vs {2 * args.calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
