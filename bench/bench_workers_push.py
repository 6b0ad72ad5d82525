#!/usr/bin/env python3
"""How fast a change reaches every worker of `twistd labelgw --workers N` (issue 11: within 10 ms of the event).

Loopback only, no Docker: a static service with two whoami backends and an active health check every 0.1 s; one
backend is flipped between healthy and failing (its /control) --flips times. Each flip is a health change in the
supervisor, pushed to every worker and acknowledged: the gateway's own `labelgw_worker_push_seconds` histogram
(from the change in the supervisor to the acknowledgement of the last worker) and `GET /workers` (mean, max) are
printed at the end. Optionally --requests keeps a request stream going meanwhile (each worker busy serving).

    .venv/bin/python bench/bench_workers_push.py [--workers 2] [--flips 40] [--requests]
"""

from __future__ import annotations

import argparse
import http.client
import json
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
            start_count = push_figures(admin)[0]["count"]
            for flip in range(args.flips):
                status = 503 if flip % 2 == 0 else 0
                get(ports[1], f"/control?status={status}")
                deadline = time.monotonic() + 10
                while push_figures(admin)[0]["count"] <= start_count + flip and time.monotonic() < deadline:
                    time.sleep(0.05)
            get(ports[1], "/control?status=0")
            latency, buckets = push_figures(admin)
            print(f"--workers {args.workers}, {args.flips} health flips"
                  + (f", {sent[0]} requests meanwhile" if args.requests else "") + ":")
            print(f"push latency (change in the supervisor -> last worker's ack): mean "
                  f"{latency['mean'] * 1000:.2f} ms, max {latency['max'] * 1000:.2f} ms over {latency['count']} changes")
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
