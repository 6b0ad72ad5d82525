#!/usr/bin/env python3
"""Issue 11's Swarm figure: from `docker service scale` returning to the new task being routed by labelgw --swarm.

One run, bounded, loopback only. It starts a single-node swarm on loopback in a private engine of its own
(tests/support/swarm.py: dockerd in a temp dir, `docker swarm init --advertise-addr 127.0.0.1:PORT`, the test image),
one host-network busybox httpd service with replicas 0, and `twistd labelgw --swarm` on that engine. Then, ROUNDS
times: scale to 1 (API call), poll the service's host through labelgw every 2 ms until it answers 200, read the
engine's own time of the task turning `running`; scale to 0, poll until the host answers 503 (no task in rotation).

    .venv/bin/python bench/bench_swarm.py [--rounds 10] [--poll 1.0] [--json out.json]

Reported: per round and as median/min/max, scale returned -> task running (the engine), task running -> routed
(labelgw), scale returned -> routed (both), scale 0 returned -> out of rotation. Traefik's Swarm provider lists
services every 15 s by default (`refreshSeconds`): 7.5 s on average before a new task is seen.
Needs root (dockerd), docker.io and busybox-static.
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
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.net import free_port, http_get  # noqa: E402
from support.swarm import SwarmEngine, running_tasks  # noqa: E402


def engine_time(stamp: str) -> float:
    """Docker's RFC 3339 nanosecond stamp as epoch seconds (microseconds kept)."""
    text = stamp.rstrip("Z")
    if "." in text:
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
    return datetime.fromisoformat(text + "+00:00").timestamp()


def summarize(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f}; n={len(values)})"


def status(port: int, host: str) -> int:
    try:
        return http_get(f"http://127.0.0.1:{port}/", host=host, timeout=2.0).status
    except OSError:
        return 0


def wait_status(port: int, host: str, wanted: int, timeout: float) -> float:
    deadline = time.time() + timeout
    while True:
        if status(port, host) == wanted:
            return time.time()
        if time.time() > deadline:
            raise RuntimeError(f"{host} never answered {wanted} within {timeout}s")
        time.sleep(0.002)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="scale-ups to measure (default 10)")
    parser.add_argument("--poll", type=float, default=1.0, help="labelgw's --swarm-poll (default 1 s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds from 1 to 100")

    swarm = SwarmEngine()
    gateway: subprocess.Popen[bytes] | None = None
    folder = Path(tempfile.mkdtemp(prefix="lgw-bench-swarm-"))
    figures: dict[str, Any] = {"rounds": [], "poll_s": args.poll}
    try:
        swarm.start()
        backend_port, port, admin = free_port(), free_port(), free_port()
        service = swarm.http_service("bench-scaled", backend_port,
                                     {"labelgw.service": "scaled", "labelgw.port": str(backend_port)}, replicas=0)
        twistd = str(Path(sys.executable).with_name("twistd"))
        log = open(folder / "labelgw.log", "wb")
        env = {key: value for key, value in os.environ.items() if key != "DOCKER_HOST"}
        gateway = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "labelgw", "--swarm", "--swarm-poll", f"{args.poll:g}",
             "--http", f"tcp:{port}:interface=127.0.0.1", "--https", "none",
             "--admin", f"tcp:{admin}:interface=127.0.0.1", "--state-dir", str(folder / "state"),
             "--docker-host", swarm.url],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
        )
        host = "scaled.localhost"
        wait_status(port, host, 503, 60)
        for index in range(args.rounds):
            swarm.scale(service, 1)
            returned = time.time()
            routed = wait_status(port, host, 200, 60)
            (task,) = running_tasks(swarm.tasks(service))
            running = engine_time(task["Status"]["Timestamp"])
            swarm.scale(service, 0)
            down_returned = time.time()
            down = wait_status(port, host, 503, 60)
            entry = {
                "scale_to_running_ms": (running - returned) * 1000,
                "running_to_routed_ms": (routed - running) * 1000,
                "scale_to_routed_ms": (routed - returned) * 1000,
                "scale0_to_out_ms": (down - down_returned) * 1000,
            }
            figures["rounds"].append(entry)
            print(f"round {index + 1}: " + ", ".join(f"{key} {value:.0f}" for key, value in entry.items()), flush=True)
            # The old task must be gone before the next one binds the same port.
            deadline = time.time() + 30
            while any((t.get("Status") or {}).get("State") == "running" for t in swarm.tasks(service)):
                if time.time() > deadline:
                    raise RuntimeError("the scaled-down task did not stop")
                time.sleep(0.1)
        rounds = figures["rounds"]
        print()
        print(f"labelgw --swarm --swarm-poll {args.poll:g}, {len(rounds)} rounds of scale 0 -> 1 -> 0 "
              f"(load average {os.getloadavg()[0]:.1f})")
        for key, label in (
            ("scale_to_running_ms", "scale returned -> task running (engine)"),
            ("running_to_routed_ms", "task running -> routed (labelgw)"),
            ("scale_to_routed_ms", "scale returned -> routed"),
            ("scale0_to_out_ms", "scale 0 returned -> out of rotation (503)"),
        ):
            values = [entry[key] for entry in rounds]
            figures[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            print(f"  {label:45s} {summarize(values)}")
        print("  Traefik's Swarm provider: lists every 15 s by default (7.5 s on average before a new task is seen)")
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(20)
            except subprocess.TimeoutExpired:
                gateway.kill()
        swarm.stop()


if __name__ == "__main__":
    sys.exit(main())
