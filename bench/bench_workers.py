#!/usr/bin/env python3
"""Issue 11's worker benchmark: labelgw with `--workers 2` against `--workers 1` (and the single process without
`--workers`), in one run, loopback only, bounded in time.

It starts an nginx backend (1 worker, `return 200`), then for each target in turn (interleaved over --rounds):
  single     twistd -n labelgw (no --workers: one process serves)
  workers-1  twistd -n labelgw --workers 1 (a supervisor and one worker process)
  workers-2  twistd -n labelgw --workers 2
each with one static service and no Docker watcher, no HTTPS, no admin listener, the access log off (what is
measured is the data path and how it scales, not the log writer). wrk loads it (`-t1 -cC -dDs`, optionally pinned
with `taskset -c CPU`), and the CPU time of the target's whole session (supervisor + workers, from /proc schedstat)
is divided by the requests wrk counted: CPU µs per request. Medians over the rounds are printed with the ratios of
workers-2 to workers-1.

    .venv/bin/python bench/bench_workers.py [--duration 8] [--connections 50] [--rounds 3] [--pin-wrk 1]
        [--json out.json]

Needs nginx (nginx-light) and wrk. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy as bp  # noqa: E402 - the sibling benchmark's helpers (servers, wrk, CPU from /proc)

TARGETS = ("single", "workers-1", "workers-2")


def target(prefix: Path, name: str, port: int, backend_port: int) -> bp.Managed:
    folder = prefix / name
    folder.mkdir(exist_ok=True)
    workers = [] if name == "single" else ["--workers", name.split("-")[1]]
    server = bp.labelgw_server(
        folder, backend_port,
        ["--http", f"tcp:{port}:interface=127.0.0.1", "--https", "none", "--admin", "none", "--access-log", "off",
         *workers],
        name=name,
    )
    server.name = name
    return server


def run_wrk(port: int, duration_s: int, connections: int, pin: str | None) -> bp.WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-H", f"Host: {bp.HOST_HEADER}",
            f"http://127.0.0.1:{port}/"]
    if pin is not None:
        argv = ["taskset", "-c", pin, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return bp.parse_wrk(done.stdout)


def session_switches(session_id: int, root: int) -> tuple[int, float]:
    """Context switches (voluntary + involuntary) of the session's processes, and the CPU seconds of its root (the
    supervisor, or the single process)."""
    switches = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if int(stat.read().rsplit(b")", 1)[1].split()[3]) != session_id:
                    continue
            with open(f"/proc/{entry}/status", "rb") as status:
                for line in status:
                    if line.startswith((b"voluntary_ctxt_switches", b"nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except OSError:
            continue
    return switches, bp._threads_cpu_s(str(root))


def measure(server: bp.Managed, port: int, args: argparse.Namespace) -> dict[str, float]:
    assert server.process is not None
    session = os.getsid(server.process.pid)
    # Warm-up: every worker has seen traffic (imports, caches, connection pools).
    run_wrk(port, 2, args.connections, args.pin_wrk)
    before = bp.session_cpu_s(session)
    switches_before, root_before = session_switches(session, server.process.pid)
    started = time.monotonic()
    result = run_wrk(port, args.duration, args.connections, args.pin_wrk)
    elapsed = time.monotonic() - started
    cpu = bp.session_cpu_s(session) - before
    switches_after, root_after = session_switches(session, server.process.pid)
    requests = result.requests
    return {
        "rps": result.requests_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": float(result.errors),
        "cpu_us_per_request": cpu / requests * 1e6 if requests else float("nan"),
        "cpu_cores": cpu / elapsed,
        # Each blocking epoll_wait is a context switch: fewer requests per wake-up cost more CPU per request.
        "switches_per_request": (switches_after - switches_before) / requests if requests else float("nan"),
        # The supervisor's part (0 for nothing but the reports), or the whole for the single process.
        "root_cpu_us_per_request": (root_after - root_before) / requests * 1e6 if requests else float("nan"),
    }


def bench(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in args.targets}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="labelgw-bench-workers-") as tmp:
        prefix = Path(tmp)
        backend_port = bp.free_port()
        backend = bp.nginx_backend(prefix, backend_port)
        backend.start()
        try:
            for round_index in range(args.rounds):
                for name in args.targets:
                    port = bp.free_port()
                    server = target(prefix, name, port, backend_port)
                    server.start()
                    try:
                        problem = bp.wait_ready(server, port, timeout_s=60)
                        if problem is None and name != "single":
                            # Every worker accepting, not only the first one ready.
                            time.sleep(3)
                        if problem is not None:
                            skipped[name] = problem + "\n" + server.log_tail()
                            continue
                        row = measure(server, port, args)
                        results[name].append(row)
                        print(f"round {round_index + 1} {name}: {row['rps']:.0f} req/s, "
                              f"{row['cpu_us_per_request']:.1f} CPU us/request, {row['cpu_cores']:.2f} cores, "
                              f"p99 {row['p99_ms']:.1f} ms, errors {row['errors']:.0f}, "
                              f"{row['switches_per_request']:.2f} context switches/request, supervisor "
                              f"{row['root_cpu_us_per_request']:.2f} us/request", flush=True)
                    finally:
                        server.stop()
        finally:
            backend.stop()
    medians = {
        name: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        for name, rows in results.items() if rows
    }
    print(f"\nmedians over {args.rounds} round(s), {args.duration} s each, {args.connections} connections, wrk "
          + (f"pinned to CPU {args.pin_wrk}" if args.pin_wrk is not None else "not pinned")
          + f", {os.cpu_count()} CPUs:")
    print(f"{'target':<10} {'req/s':>8} {'CPU us/req':>11} {'cores':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7} "
          f"{'switch/req':>10} {'root us/req':>11}")
    for name, row in medians.items():
        print(f"{name:<10} {row['rps']:>8.0f} {row['cpu_us_per_request']:>11.1f} {row['cpu_cores']:>6.2f} "
              f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['errors']:>7.0f} {row['switches_per_request']:>10.2f} "
              f"{row['root_cpu_us_per_request']:>11.2f}")
    ratios = {}
    if "workers-1" in medians and "workers-2" in medians:
        one, two = medians["workers-1"], medians["workers-2"]
        ratios = {
            "throughput_2_vs_1": two["rps"] / one["rps"],
            "cpu_per_request_2_vs_1": two["cpu_us_per_request"] / one["cpu_us_per_request"],
        }
        print(f"workers-2 / workers-1: throughput x{ratios['throughput_2_vs_1']:.2f}, CPU per request "
              f"x{ratios['cpu_per_request_2_vs_1']:.2f}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return {"medians": medians, "ratios": ratios, "rounds": results, "skipped": skipped,
            "pin_wrk": args.pin_wrk, "cpus": os.cpu_count()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin-wrk", default=None, help="CPU list for taskset -c (e.g. 1): wrk runs only there")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["medians"] else 1


if __name__ == "__main__":
    sys.exit(main())
