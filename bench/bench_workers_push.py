#!/usr/bin/env python3
"""How fast a change reaches every worker of `twistd labelgw --workers N` (issue 11: within 10 ms of the event).

Loopback only, no Docker: a static service with two whoami backends and an active health check every 0.1 s; one
backend is flipped between healthy and failing (its /control) --flips times. Each flip is a health change in the
supervisor, pushed to every worker and applied: the gateway's own `labelgw_worker_push_seconds` histogram and
`GET /workers` (the latest latencies: percentiles) are printed at the end, with the load average. Optionally
--requests keeps a request stream going meanwhile (each worker busy serving).

What is measured, per change: from the moment the supervisor has the change (here: the health probe's answer that
flips the state; for Docker: the event read from the engine's stream and applied to its registry) to the moment the
*last* worker applied it, both read from CLOCK_MONOTONIC (one clock for every process of the host; the worker
stamps its acknowledgement). The health check's interval (0.1 s) between the flip of the backend and the probe
that sees it is not push latency, nor is the time the supervisor takes to read the acknowledgement. While waiting
for a flip to land, this script polls `GET /workers` only: `/metrics` merges the workers' expositions and would
load the supervisor for the benchmark's sake.

    .venv/bin/python bench/bench_workers_push.py [--workers 2] [--flips 40] [--requests]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy as bp  # noqa: E402 - servers, ports


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def push_figures(admin: int) -> tuple[dict[str, Any], list[tuple[str, float]]]:
    view = json.loads(get(admin, "/workers")[1])
    buckets = []
    for line in get(admin, "/metrics")[1].decode().splitlines():
        if line.startswith("labelgw_worker_push_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((bound, float(line.rsplit(" ", 1)[1])))
    return view["push_latency_seconds"], buckets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="2")
    parser.add_argument("--flips", type=int, default=40)
    parser.add_argument("--requests", action="store_true", help="a request stream meanwhile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="labelgw-bench-push-") as tmp:
        prefix = Path(tmp)
        backends: list[subprocess.Popen[bytes]] = []
        ports = []
        for name in ("a", "b"):
            port = bp.free_port()
            backends.append(subprocess.Popen(
                [sys.executable, "-m", "labelgw.tools.whoami", "--port", str(port), "--name", name],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            ports.append(port)
        http_port, admin = bp.free_port(), bp.free_port()
        config = prefix / "labelgw.yaml"
        config.write_text(
            "docker: false\nhttps: none\nservices:\n  bench:\n    hosts: [bench.localhost]\n"
            f'    backends: ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]\n'
            "    health: {path: /health, interval: 0.1s, timeout: 1s}\n"
        )
        server = bp.Managed(
            "labelgw",
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "labelgw", "--http", f"tcp:{http_port}:interface=127.0.0.1",
             "--admin", f"tcp:{admin}:interface=127.0.0.1", "--access-log", "off", "--config", str(config),
             "--workers", args.workers],
            prefix / "labelgw.log",
        )
        server.start()
        stop = threading.Event()
        sent = [0]
        try:
            problem = bp.wait_ready(server, http_port, timeout_s=60)
            if problem is not None:
                print(f"labelgw did not start: {problem}\n{server.log_tail()}")
                return 1
            time.sleep(3)  # every worker ready

            def stream() -> None:
                while not stop.is_set():
                    try:
                        get(http_port, "/", "bench.localhost")
                    except OSError:
                        pass
                    sent[0] += 1

            if args.requests:
                threading.Thread(target=stream, daemon=True).start()
            def count() -> int:
                return int(json.loads(get(admin, "/workers")[1])["push_latency_seconds"]["count"])

            start_count = count()
            load_before = os.getloadavg()
            for flip in range(args.flips):
                status = 503 if flip % 2 == 0 else 0
                get(ports[1], f"/control?status={status}")
                deadline = time.monotonic() + 10
                while count() <= start_count + flip and time.monotonic() < deadline:
                    time.sleep(0.05)
            get(ports[1], "/control?status=0")
            load_after = os.getloadavg()
            latency, buckets = push_figures(admin)
            recent = sorted(latency.get("recent", [])[-args.flips:])
            print(f"--workers {args.workers}, {args.flips} health flips"
                  + (f", {sent[0]} requests meanwhile" if args.requests else "") + f"; load average "
                  f"{load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} cores)")
            print(f"push latency (change in the supervisor -> applied by the last worker): mean "
                  f"{latency['mean'] * 1000:.2f} ms, max {latency['max'] * 1000:.2f} ms over {latency['count']} changes")
            if recent:
                def pct(q: float) -> float:
                    return recent[min(len(recent) - 1, int(q * len(recent)))] * 1000

                within = sum(1 for value in recent if value <= 0.010) / len(recent) * 100
                print(f"  p50 {pct(0.5):.2f} ms, p90 {pct(0.9):.2f} ms, p99 {pct(0.99):.2f} ms, max "
                      f"{recent[-1] * 1000:.2f} ms; {within:.0f} % within 10 ms")
                read = sorted(latency.get("recent_read", [])[-args.flips:])
                if read:
                    print(f"  of which until the last worker read it from its pipe: p50 "
                          f"{read[len(read) // 2] * 1000:.2f} ms, max {read[-1] * 1000:.2f} ms")
                write = sorted(latency.get("recent_write", [])[-args.flips:])
                if write:
                    print(f"  of which the supervisor's writes to every worker: p50 "
                          f"{write[len(write) // 2] * 1000:.2f} ms, max {write[-1] * 1000:.2f} ms")
            total = buckets[-1][1] if buckets else 0
            for bound, count in buckets:
                print(f"  <= {bound:>6} s: {count:.0f} ({count / total * 100 if total else 0:.0f} %)")
        finally:
            stop.set()
            server.stop()
            for backend in backends:
                backend.terminate()
                backend.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
