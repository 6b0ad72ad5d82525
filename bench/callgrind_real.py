#!/usr/bin/env python3
"""Instructions per request of a real `twistd labelgw` (bench_proxy.py's targets) under valgrind's callgrind:
the whole process (reactor, every thread, sockets), not the in-process harness of bench/callgrind.py.

    .venv/bin/python bench/callgrind_real.py [--targets labelgw,labelgw-bare] [--requests 1000] [--tree DIR]

Per target: an nginx backend and labelgw under callgrind; a warm-up of 200 requests, the counters zeroed
(`callgrind_control -z`), then N requests from `h2load --h1 -c 50`, labelgw stopped; the same with 2N. The
difference of the two totals divided by N cancels start-up, warm-up and shut-down. Kernel time is not counted
(callgrind sees user space only). Loopback only; needs valgrind, nginx-light and h2load (nghttp2-client).
Under valgrind a request takes ~50x longer, so durations land in other histogram buckets than at full speed (a
few hundred instructions of the metrics' bucket search).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)
TARGETS = ("labelgw", "labelgw-bare", "labelgw-log-off", "labelgw-nometrics", "floor-proxy")


def _h2load(port: int, requests: int) -> str:
    done = subprocess.run(
        ["h2load", "--h1", "-n", str(requests), "-c", "50", "-H", ":authority: bench.localhost",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=900,
    )
    match = re.search(r"requests: .*", done.stdout)
    if match is None or f"{requests} succeeded" not in match.group(0):
        raise SystemExit(f"h2load: not every request succeeded: {match.group(0) if match else done.stdout}")
    return match.group(0)


def instructions(tree: Path, target: str, requests: int, keep: Path | None = None) -> int:
    """Callgrind's total for `requests` requests (after the warm-up) through the target from `tree`; the callgrind
    output is copied to `keep` (a directory) when given, for callgrind_annotate."""
    sys.path[:0] = [str(tree / "bench"), str(tree)]
    import bench_proxy as bp

    with tempfile.TemporaryDirectory(prefix="callgrind-real-") as tmp:
        prefix = Path(tmp)
        backend_port, port = bp.free_port(), bp.free_port()
        backend = bp.nginx_backend(prefix, backend_port)
        build = {
            "labelgw": lambda: bp.labelgw(prefix, port, backend_port),
            "labelgw-bare": lambda: bp.labelgw_bare(prefix, port, backend_port),
            "labelgw-log-off": lambda: bp.labelgw(prefix, port, backend_port, "off"),
            "labelgw-nometrics": lambda: bp.labelgw_nometrics(prefix, port, backend_port),
            # bench_floor.py's least proxy on labelgw's reactor: what the reactor and the sockets cost alone.
            "floor-proxy": lambda: _floor(tree, prefix, port, backend_port),
        }[target]
        out = prefix / "callgrind.out"
        server = build()
        server.argv[:0] = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        assert server.env is not None
        server.env["PYTHONHASHSEED"] = "0"
        server.cwd = tree
        backend.start()
        server.start()
        try:
            why = bp.wait_ready(server, port, 300)
            if why is not None:
                raise SystemExit(f"{target}: not ready: {why}\n{server.log_tail()}")
            _h2load(port, 200)
            assert server.process is not None
            subprocess.run(["callgrind_control", "-z", str(server.process.pid)], capture_output=True, check=False)
            _h2load(port, requests)
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(300)
        finally:
            server.stop()
            backend.stop()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep / f"callgrind.{target}.{requests}.out")
        match = _TOTAL.search(out.read_text(errors="replace"))
        if match is None:
            raise SystemExit(f"{target}: no callgrind total\n{server.log_tail()}")
        return int(match.group(1))


def _floor(tree: Path, prefix: Path, port: int, backend_port: int) -> Any:
    import bench_floor

    server = bench_floor.floor_server(prefix, "floor-proxy", port, backend_port, prefix / "unused.pem")
    server.env = dict(os.environ)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="labelgw,labelgw-bare")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="the tree to run (default: this one)")
    parser.add_argument("--keep", type=Path, help="copy each run's callgrind output into this directory")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))} (choose among {', '.join(TARGETS)})")
    n = args.requests
    jobs = [(target, count) for target in targets for count in (n, 2 * n)]
    # Each job in a process of its own (bench_proxy is imported from the tree): run them side by side.
    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: _run_one(args.tree, job[0], job[1], args.keep), jobs)))
    per = {target: (totals[(target, 2 * n)] - totals[(target, n)]) / n for target in targets}
    for target in targets:
        print(f"{target}: {per[target]:,.0f} instructions per request (callgrind, whole process, {n} vs {2 * n})")
    if "labelgw" in per and "labelgw-bare" in per:
        print(f"labelgw-bare/labelgw x{per['labelgw-bare'] / per['labelgw']:.3f} (instructions)")
    return 0


def _run_one(tree: Path, target: str, count: int, keep: Path | None) -> int:
    done = subprocess.run(
        [sys.executable, __file__, "--inner", target, str(count), str(tree), str(keep or "")], capture_output=True, text=True,
        check=False, timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(f"{target} x{count} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return int(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--inner":
        print(instructions(Path(sys.argv[4]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[5]) if sys.argv[5] else None))
        sys.exit(0)
    sys.exit(main())
