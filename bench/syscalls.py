#!/usr/bin/env python3
"""System calls per proxied request: `strace -c -f` attached to a real target (bench_proxy.py's) under wrk.

    .venv/bin/python bench/syscalls.py [--targets labelgw-bare,nginx-proxy] [--duration 3] [--connections 10]

Per target: an nginx backend and the target; a 1 s wrk warm-up, then strace attached to every process of the
target (`-f`, each pid given) for one wrk run, detached, and its `-c` table divided by the requests wrk counted.
strace slows the target several times, so the rate means nothing; the calls per request are what a request makes
(epoll_wait per request moves with the batch size, so with the rate). Loopback only; needs strace, nginx-light, wrk.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_proxy as bp  # noqa: E402

BUILD = {
    "labelgw": bp.labelgw,
    "labelgw-bare": bp.labelgw_bare,
    "labelgw-nometrics": bp.labelgw_nometrics,
    "nginx-proxy": bp.nginx_proxy,
}
# strace -c's rows: "% time  seconds  usecs/call  calls  [errors]  syscall".
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$", re.MULTILINE)


def _pids(session_pid: int) -> list[str]:
    done = subprocess.run(["ps", "-o", "pid=", "-s", str(session_pid)], capture_output=True, text=True, check=False)
    return done.stdout.split()


def count(target: str, duration: int, connections: int) -> tuple[int, dict[str, tuple[int, int]]]:
    with tempfile.TemporaryDirectory(prefix="syscalls-") as tmp:
        prefix = Path(tmp)
        backend_port, port = bp.free_port(), bp.free_port()
        backend = bp.nginx_backend(prefix, backend_port)
        server = BUILD[target](prefix, port, backend_port)
        backend.start()
        server.start()
        try:
            why = bp.wait_ready(server, port)
            if why is not None:
                raise SystemExit(f"{target}: not ready: {why}\n{server.log_tail()}")
            bp.run_wrk(port, 1, connections, 1)
            assert server.process is not None
            argv = ["strace", "-c", "-f", "-qq"]
            for pid in _pids(server.process.pid):
                argv += ["-p", pid]
            tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            result = bp.run_wrk(port, duration, connections, 1)
            tracer.send_signal(signal.SIGINT)
            _, table = tracer.communicate(timeout=60)
        finally:
            server.stop()
            backend.stop()
    calls = {m.group(3): (int(m.group(1)), int(m.group(2) or 0)) for m in _ROW.finditer(table)}
    calls.pop("total", None)
    return result.requests, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="labelgw-bare,nginx-proxy")
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10)
    args = parser.parse_args(argv)
    for target in [t for t in args.targets.split(",") if t]:
        if target not in BUILD:
            parser.error(f"unknown target {target} (choose among {', '.join(BUILD)})")
        requests, calls = count(target, args.duration, args.connections)
        total = sum(n for n, _ in calls.values())
        print(f"{target}: {requests} requests, {total / max(requests, 1):.2f} system calls per request")
        for name, (n, errors) in sorted(calls.items(), key=lambda item: -item[1][0]):
            extra = f" ({errors / max(requests, 1):.2f} failed)" if errors else ""
            print(f"  {name:<16} {n / max(requests, 1):8.3f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
