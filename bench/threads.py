#!/usr/bin/env python3
"""Where a real labelgw's CPU goes under load, per thread: user and system time, voluntary and involuntary
context switches, minor page faults, and the garbage collector's collections, per request.

    .venv/bin/python bench/threads.py [--targets labelgw,labelgw-bare] [--duration 4] [--rounds 3] [--tree DIR]

Each round loads every target (bench_proxy.py's: an nginx backend, `twistd labelgw` with its access log to a
file) with `wrk -t1 -c50` for `--duration` seconds after a 2 s warm-up, and reads `/proc/PID/task/TID/{stat,status,
schedstat}` before and after. The gc counts come from the process itself: a SIGUSR2 handler (installed ahead of
twistd's entry point) writes `gc.get_stats()` to a file. Loopback only; needs nginx-light and wrk.

The split says what a ratio of throughputs cannot: whether a cost is the reactor's Python (user time), system
calls (system time: on a loaded machine it grows per request as the rate falls, since each epoll_wait returns
fewer events), a thread waking (voluntary switches) or the machine taking the core away (involuntary).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ("labelgw", "labelgw-bare", "labelgw-log-off", "labelgw-nometrics")
_GC_DUMP = """
import gc, os, signal
def _labelgw_bench_gc(signum, frame):
    with open(os.environ["LABELGW_BENCH_GC"], "w") as out:
        out.write(repr([s["collections"] for s in gc.get_stats()]))
signal.signal(signal.SIGUSR2, _labelgw_bench_gc)
"""
_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[str, tuple[str, int, int, int, int, int, int]]:
    """tid -> (name, voluntary, involuntary, run ns, user ticks, system ticks, minor faults)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            status = Path(f"{base}/status").read_text()
            stat = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
            run_ns = int(Path(f"{base}/schedstat").read_text().split()[0])
        except OSError:
            continue
        name = re.search(r"Name:\s*(.*)", status)
        voluntary = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.MULTILINE)
        involuntary = re.search(r"^nonvoluntary_ctxt_switches:\s*(\d+)", status, re.MULTILINE)
        assert name and voluntary and involuntary
        out[tid] = (
            name.group(1), int(voluntary.group(1)), int(involuntary.group(1)), run_ns, int(stat[11]), int(stat[12]),
            int(stat[7]),
        )
    return out


def _gc(pid: int, path: Path) -> list[int] | None:
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    for _ in range(100):
        time.sleep(0.05)
        if path.exists() and path.read_text():
            value: list[int] = ast.literal_eval(path.read_text())
            return value
    return None


def measure(bp: Any, tree: Path, prefix: Path, target: str, backend_port: int, duration: int) -> list[str]:
    port = bp.free_port()
    folder = prefix / f"{target}-{time.monotonic_ns()}"
    folder.mkdir()
    server = {
        "labelgw": lambda: bp.labelgw(folder, port, backend_port),
        "labelgw-bare": lambda: bp.labelgw_bare(folder, port, backend_port),
        "labelgw-log-off": lambda: bp.labelgw(folder, port, backend_port, "off"),
        "labelgw-nometrics": lambda: bp.labelgw_nometrics(folder, port, backend_port),
    }[target]()
    code = server.argv.index("-c") + 1
    server.argv[code] = _GC_DUMP + server.argv[code]
    gc_file = folder / "gc.txt"
    server.env["LABELGW_BENCH_GC"] = str(gc_file)
    server.cwd = tree
    server.start()
    url = f"http://127.0.0.1:{port}/"
    wrk = ["wrk", "-t1", "-c50", "-H", "Host: bench.localhost"]
    try:
        why = bp.wait_ready(server, port)
        if why is not None:
            return [f"{target}: not ready: {why}"]
        subprocess.run([*wrk, "-d2s", url], capture_output=True, check=False)
        pid = server.process.pid
        gc_before, before = _gc(pid, gc_file), _threads(pid)
        done = subprocess.run([*wrk, f"-d{duration}s", url], capture_output=True, text=True, check=False)
        after, gc_after = _threads(pid), _gc(pid, gc_file)
    finally:
        server.stop()
    match = re.search(r"(\d+) requests in", done.stdout)
    if match is None:
        return [f"{target}: wrk said {done.stdout.strip()} {done.stderr.strip()}"]
    requests = int(match.group(1))
    collections = (
        [round(1000 * (b - a) / requests, 2) for a, b in zip(gc_before, gc_after)]
        if gc_before is not None and gc_after is not None else "?"
    )
    lines = [f"{target}: {requests / duration:,.0f} req/s; gc collections per 1000 requests (gen 0, 1, 2): {collections}"]
    for tid, (name, vol, invol, run_ns, user, system, faults) in after.items():
        if tid not in before:
            continue
        _, vol0, invol0, run0, user0, system0, faults0 = before[tid]
        lines.append(
            f"  thread {name:12s} cpu {(run_ns - run0) / requests / 1000:6.2f} us/req (user {(user - user0) * _TICK_US / requests:6.2f},"
            f" sys {(system - system0) * _TICK_US / requests:6.2f}); per 1000 requests: {1000 * (vol - vol0) / requests:7.2f}"
            f" voluntary, {1000 * (invol - invol0) / requests:7.2f} involuntary switches, {1000 * (faults - faults0) / requests:5.2f}"
            " minor faults"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="labelgw,labelgw-bare")
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(TARGETS):
        parser.error(f"targets among {', '.join(TARGETS)}")
    sys.path[:0] = [str(args.tree / "bench"), str(args.tree)]
    import bench_proxy as bp

    with tempfile.TemporaryDirectory(prefix="labelgw-threads-") as tmp:
        prefix = Path(tmp)
        backend_port = bp.free_port()
        backend = bp.nginx_backend(prefix, backend_port)
        backend.start()
        try:
            for round_ in range(1, args.rounds + 1):
                print(f"round {round_} (load average {os.getloadavg()[0]:.2f})")
                for target in targets:
                    for line in measure(bp, args.tree, prefix, target, backend_port, args.duration):
                        print("  " + line, flush=True)
        finally:
            backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
