#!/usr/bin/env python3
"""Issue 15's benchmark: the registration API with the embedded registry and with etcd.

One run, bounded in time, loopback traffic only. For each mode it starts labelgw (`twistd -n labelgw`,
`docker: false`, `--registry-api` on loopback) and drives the API with one load generator (wrk, one thread, C
keep-alive connections, Lua scripts that spread requests over the instances):

  registrations  PUT /v1/services/s<k>/instances/i<n> in rounds of a few seconds until N instances are registered
                 (100 instances per service): rate and p99 of each round, then the whole
  rss            labelgw's resident memory (VmRSS) before and with the N instances
  heartbeats     PUT .../heartbeat spread over the N instances for D seconds, R times: rate and p99 of each, medians
  visibility     a new registration, until every gateway routes its host (polled on loopback every 1 ms): p50, max
  resync         embedded: a restart of labelgw restoring the N saved registrations (start to the log line);
                 etcd: a restart of the second gateway listing the N keys (start to "listed"), CPU of that restart

The etcd mode runs a three-member etcd cluster on loopback (Debian's etcd-server, tests/support/etcd.py) and two
gateways sharing it; its N defaults lower (every registration is an etcd lease grant and a put).

    .venv/bin/python bench/bench_registry.py                       # embedded 100000, etcd 5000
    .venv/bin/python bench/bench_registry.py --instances 20000 --modes embedded --json /tmp/reg.json

The machine it runs on is usually shared: wall-clock rates and latencies are indicative. Needs wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import free_port, parse_wrk, run_bench, session_cpu_s  # noqa: E402  (same directory)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

LOOPBACK = "127.0.0.1"
PER_SERVICE = 100

REGISTER_LUA = """
local offset, total, ttl = 0, 0, 600
init = function(args)
  offset = tonumber(args[1]); total = tonumber(args[2]); ttl = tonumber(args[3])
end
local n = 0
request = function()
  local i = (offset + n) % total
  n = n + 1
  local body = '{"address":"127.0.0.1","port":' .. (20000 + i % 1000) .. ',"ttl":' .. ttl .. ',"tags":["bench"]}'
  return wrk.format("PUT", "/v1/services/s" .. math.floor(i / %d) .. "/instances/i" .. i,
                    {["Content-Type"] = "application/json"}, body)
end
""".replace("%d", str(PER_SERVICE))

HEARTBEAT_LUA = """
local total = 0
init = function(args) total = tonumber(args[1]) end
local n = 0
request = function()
  local i = (n * 7919) % total
  n = n + 1
  return wrk.format("PUT", "/v1/services/s" .. math.floor(i / %d) .. "/instances/i" .. i .. "/heartbeat")
end
""".replace("%d", str(PER_SERVICE))


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(share * len(ordered))) - 1))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Gateway:
    def __init__(self, base: Path, name: str, registry: str | None) -> None:
        self.base = base / name
        self.base.mkdir(exist_ok=True)
        self.name = name
        self.http = free_port()
        self.api = free_port()
        self.config = self.base / "labelgw.yaml"
        lines = [
            "docker: false", "https: none", "admin: none", "access_log: off", "drain_grace: 1",
            f'http: ["tcp:{self.http}:interface={LOOPBACK}"]', f'registry_api: "tcp:{self.api}:interface={LOOPBACK}"',
            f"state_dir: {self.base / 'state'}",
        ]
        if registry:
            lines.append(f'registry: "{registry}"')
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.base / "twistd.log"

    def start(self, wait_for: str | None = None, timeout: float = 300) -> float:
        """Start; seconds until `wait_for` is logged (else until the API accepts)."""
        started = time.monotonic()
        mark = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [os.path.join(sys.prefix, "bin", "twistd"), "-n", "--pidfile=", "labelgw", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=self.base,
            )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            text = self.log.read_text(errors="replace")[mark:]
            if wait_for is not None and wait_for in text:
                return time.monotonic() - started
            if wait_for is None and _accepts(self.api) and _accepts(self.http):
                return time.monotonic() - started
            time.sleep(0.01)
        raise SystemExit(f"{self.name}: not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def routes(self, host: str) -> bool:
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http}/", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except urllib.error.HTTPError as error:
            return error.code not in (404, 421)
        except OSError:
            return False

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.api}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def wrk(base: Path, script: str, port: int, seconds: float, connections: int, args: Sequence[object]) -> dict[str, Any]:
    path = base / "script.lua"
    path.write_text(script)
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--latency", "-s", str(path),
        f"http://{LOOPBACK}:{port}/", "--", *map(str, args),
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    result = parse_wrk(output)
    return {
        "rate": round(result.requests_per_s), "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
        "requests": result.requests, "errors": result.errors,
    }


def register_all(base: Path, gateway: Gateway, total: int, args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    done = 0
    while done < total and len(rounds) < args.max_rounds:
        figures = wrk(base, REGISTER_LUA, gateway.api, args.round_seconds, args.connections, (done, total, 600))
        rounds.append(figures)
        done += figures["requests"]
        print(f"  registrations round {len(rounds)}: {figures['rate']}/s, p99 {figures['p99_ms']:.1f} ms, "
              f"{min(done, total)}/{total} registered, {figures['errors']} errors")
    requests = sum(r["requests"] for r in rounds)
    seconds = sum(r["requests"] / r["rate"] for r in rounds if r["rate"])
    return {
        "instances": min(done, total), "rounds": rounds, "rate": round(requests / seconds) if seconds else 0,
        "p99_ms_worst_round": max(r["p99_ms"] for r in rounds), "errors": sum(r["errors"] for r in rounds),
    }


def heartbeats(base: Path, gateway: Gateway, total: int, args: argparse.Namespace) -> dict[str, Any]:
    """`--heartbeat-rounds` runs of `--seconds` each: every round's figures and their medians (a shared machine)."""
    assert gateway.process is not None
    rounds = []
    for _ in range(args.heartbeat_rounds):
        cpu = session_cpu_s(gateway.process.pid)
        figures = wrk(base, HEARTBEAT_LUA, gateway.api, args.seconds, args.connections, (total,))
        # labelgw's CPU per heartbeat (its threads' run time): what one core could do, whatever else shares the
        # machine (wall-clock rate and p99 include the wait for a core).
        spent = session_cpu_s(gateway.process.pid) - cpu
        figures["cpu_us_per_heartbeat"] = round(spent * 1e6 / figures["requests"], 1) if figures["requests"] else None
        rounds.append(figures)
    report = {
        "rate": round(statistics.median(r["rate"] for r in rounds)),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in rounds), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds), 2),
        "cpu_us_per_heartbeat": statistics.median(r["cpu_us_per_heartbeat"] or 0 for r in rounds),
        "errors": sum(r["errors"] for r in rounds), "rounds": rounds,
    }
    print(f"  heartbeats: median {report['rate']}/s, p99 {report['p99_ms']:.1f} ms, labelgw CPU "
          f"{report['cpu_us_per_heartbeat']} us each (rounds: "
          + ", ".join(f"{r['rate']}/s p99 {r['p99_ms']:.1f} ms {r['cpu_us_per_heartbeat']} us" for r in rounds)
          + f"), {report['errors']} errors")
    return report


def visibility(gateways: list[Gateway], via: Gateway, tries: int) -> dict[str, Any]:
    delays = []
    for attempt in range(tries):
        host = f"probe{attempt}-{int(time.time() * 1000) % 100000}.test"
        start = time.monotonic()
        status = via.call("PUT", f"/v1/services/probe{attempt}/instances/p", {
            "address": LOOPBACK, "port": 20000, "hosts": [host], "ttl": 600})
        assert status in (200, 201), status
        pending = list(gateways)
        while pending and time.monotonic() - start < 10:
            pending = [gateway for gateway in pending if not gateway.routes(host)]
            if pending:
                time.sleep(0.001)
        delays.append((time.monotonic() - start) * 1000)
        via.call("DELETE", f"/v1/services/probe{attempt}/instances/p")
    return {"p50_ms": round(statistics.median(delays), 1), "max_ms": round(max(delays), 1), "tries": tries}


def bench_embedded(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    print(f"embedded registry, {args.instances} instances")
    gateway = Gateway(base, "embedded", None)
    try:
        gateway.start()
        assert gateway.process is not None
        report: dict[str, Any] = {"rss_mib_empty": round(rss_mib(gateway.process.pid), 1)}
        report["registrations"] = register_all(base, gateway, args.instances, args)
        time.sleep(1)
        report["rss_mib_with_instances"] = round(rss_mib(gateway.process.pid), 1)
        print(f"  RSS: {report['rss_mib_empty']} MiB empty, {report['rss_mib_with_instances']} MiB with "
              f"{report['registrations']['instances']} instances")
        report["heartbeats"] = heartbeats(base, gateway, args.instances, args)
        report["visibility"] = visibility([gateway], gateway, args.tries)
        print(f"  a change routed after: p50 {report['visibility']['p50_ms']} ms, max {report['visibility']['max_ms']} ms")
        gateway.stop()
        assert gateway.process is not None
        seconds = gateway.start(wait_for="registrations restored")
        cpu = session_cpu_s(gateway.process.pid)
        report["resync"] = {"restart_to_restored_s": round(seconds, 2), "cpu_s_at_restored": round(cpu, 2)}
        print(f"  restart restoring {args.instances}: {seconds:.2f} s (CPU {cpu:.2f} s, interpreter start included)")
        return report
    finally:
        gateway.stop()


def bench_etcd(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    from support.etcd import EtcdCluster, etcd_available

    if not etcd_available():
        return {"skipped": "no etcd binary (Debian's etcd-server)"}
    total = args.etcd_instances
    print(f"etcd registry (3 members), {total} instances, 2 gateways")
    (base / "etcd").mkdir()
    cluster = EtcdCluster(base / "etcd")
    a = Gateway(base, "etcd-a", cluster.endpoints([0, 1, 2]))
    b = Gateway(base, "etcd-b", cluster.endpoints([1, 2, 0]))
    try:
        a.start(wait_for="etcd registry listed")
        b.start(wait_for="etcd registry listed")
        report: dict[str, Any] = {"registrations": register_all(base, a, total, args)}
        report["heartbeats"] = heartbeats(base, a, total, args)
        assert a.process is not None and b.process is not None
        report["rss_mib"] = {"a": round(rss_mib(a.process.pid), 1), "b": round(rss_mib(b.process.pid), 1)}
        report["visibility"] = visibility([a, b], a, args.tries)
        print(f"  a change through a, routed by a and b after: p50 {report['visibility']['p50_ms']} ms, "
              f"max {report['visibility']['max_ms']} ms")
        b.stop()
        seconds = b.start(wait_for="etcd registry listed")
        text = b.log.read_text()
        listed = re.findall(r"listed (\d+) registrations", text)
        cpu = session_cpu_s(b.process.pid)
        report["resync"] = {"restart_to_listed_s": round(seconds, 2), "listed": int(listed[-1]) if listed else None,
                            "cpu_s_at_listed": round(cpu, 2)}
        print(f"  gateway b restarted, listed {report['resync']['listed']} in {seconds:.2f} s (CPU {cpu:.2f} s, "
              "interpreter start included)")
        return report
    finally:
        a.stop()
        b.stop()
        cluster.stop()


def bench(args: argparse.Namespace) -> dict[str, object]:
    report: dict[str, object] = {"load": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as folder:
        base = Path(folder)
        if "embedded" in args.modes:
            report["embedded"] = bench_embedded(base, args)
        if "etcd" in args.modes:
            report["etcd"] = bench_etcd(base, args)
    print(json.dumps(report, indent=1, default=str))
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000, help="embedded: instances to register")
    parser.add_argument("--etcd-instances", type=int, default=5_000, help="etcd: instances to register")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (one thread)")
    parser.add_argument("--round-seconds", type=float, default=5, help="seconds per registration round")
    parser.add_argument("--max-rounds", type=int, default=40, help="at most this many registration rounds")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of heartbeats")
    parser.add_argument("--heartbeat-rounds", type=int, default=3, help="heartbeat runs (medians reported)")
    parser.add_argument("--tries", type=int, default=20, help="changes timed for visibility")
    parser.add_argument("--modes", type=lambda text: text.split(","), default=["embedded", "etcd"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
