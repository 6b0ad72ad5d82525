#!/usr/bin/env python3
"""Issue 3's benchmark: how labelgw balances between backends of unequal speed, next to nginx and HAProxy.

The unequal-speed scenario: five latency-injecting backends run as real labelled containers
(host network, 127.0.0.1), each `python -m labelgw.tools.whoami --delay-ms M --workers 1`: a FIFO queue with one worker,
a request holding it M ms x Exp(1); four at 10 ms and one ("b4") at 100 ms, 410 req/s of capacity in all.
The same seeded open-loop Poisson load (bench/loadgen.py, its own process) is sent through each proxy in turn:

  labelgw-wrt          twistd -n --pidfile= labelgw --http ... --admin ... --https none --docker-host ... (wrt)
  labelgw-least_conn   the same with --balancer least_conn
  labelgw-round_robin  the same with --balancer round_robin
  nginx-least_conn     nginx, 1 worker, upstream { least_conn; server x5; keepalive 64; }
  haproxy-leastconn    HAProxy, balance leastconn, http-reuse always, connect/server timeouts 5 s
  nginx-round_robin    nginx's default policy: unstable here (the slow backend gets 1/5 of the traffic)

labelgw finds the backends by their labels (labelgw.service=bench, labelgw.port=P, and labelgw.env=<run id>
with `--env <run id>`, so that neither this gateway nor another one on the same engine sees foreign containers);
nginx and HAProxy get the same five ports in a static configuration. Before each measured window the proxy
gets --warmup seconds of the same load (part of the same schedule); after it, the proxy is stopped and the
backends' queues are left to drain (their /control view says busy 0, waiting 0) before the next proxy starts.

    /tmp/venv/bin/python bench/bench_balance.py [--duration 30] [--load 0.5] [--seed 1] [--json out.json]

Needs the Docker engine of $DOCKER_HOST with the image labelgw-test-busybox, and nginx-light and haproxy for
their runs (skipped when missing). Loopback only; everything it starts it stops, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import docker
import docker.errors
from docker.models.containers import Container

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import Managed, free_port, run_bench, wait_until  # noqa: E402  (same directory)
from loadgen import Summary  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
IMAGE = "labelgw-test-busybox"
SERVICE = "bench"
HOST_HEADER = f"{SERVICE}.localhost"
NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
CLIENT_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
# Marker (outside the labelgw. prefix, which labelgw would refuse) to find this run's containers.
OWNER_LABEL = "labelgw-bench.owner"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    delay_ms: float


# S1: 4 x 10 ms + 1 x 100 ms, one worker each.
S1 = (
    BackendSpec("b0", 10.0),
    BackendSpec("b1", 10.0),
    BackendSpec("b2", 10.0),
    BackendSpec("b3", 10.0),
    BackendSpec("b4", 100.0),
)
SLOW_BACKENDS = ("b4",)


def capacity(backends: Sequence[BackendSpec]) -> float:
    """Requests per second the backends serve at most (one worker each)."""
    return sum(1000.0 / b.delay_ms for b in backends)


@dataclass(frozen=True)
class ProxyRun:
    name: str  # e.g. "labelgw-wrt"
    proxy: str  # labelgw, nginx, haproxy
    policy: str


ALL_RUNS = (
    ProxyRun("labelgw-wrt", "labelgw", "wrt"),
    ProxyRun("nginx-least_conn", "nginx", "least_conn"),
    ProxyRun("haproxy-leastconn", "haproxy", "leastconn"),
    ProxyRun("labelgw-least_conn", "labelgw", "least_conn"),
    ProxyRun("labelgw-round_robin", "labelgw", "round_robin"),
    ProxyRun("nginx-round_robin", "nginx", "round_robin"),
)
RUNS_BY_NAME = {run.name: run for run in ALL_RUNS}


# -- backends as containers ---------------------------------------------------------------------------------------


def python_runtime_mounts() -> list[tuple[str, str]]:
    """(host path, container path) pairs letting a busybox container run this venv's Python and the working tree.

    As tests/support/containers.py does: /usr, /lib(64), the venv and the real interpreter's installation,
    each read-only, skipping a path already visible through a mounted parent.
    """
    wanted = [("/usr", "/usr"), ("/lib", "/lib")]
    if os.path.exists("/lib64"):
        wanted.append(("/lib64", "/lib64"))
    venv = os.path.abspath(sys.prefix)
    wanted.append((os.path.realpath(venv), venv))
    real_python = os.path.realpath(sys.executable)
    for prefix in (os.path.dirname(os.path.dirname(real_python)), os.path.realpath(sys.base_prefix)):
        wanted.append((prefix, prefix))
    wanted.append((str(REPO), str(REPO)))
    mounts: list[tuple[str, str]] = []
    for source, target in wanted:
        if not any(target == t or target.startswith(t.rstrip("/") + "/") for _, t in mounts):
            mounts.append((source, target))
    return mounts


class Backends:
    """The five whoami containers of a run: started, checked, and force-removed by `remove()`."""

    def __init__(self, client: docker.DockerClient, run_id: str, seed: int) -> None:
        self._client = client
        self.run_id = run_id
        self._seed = seed
        self.containers: list[Container] = []
        self.ports: dict[str, int] = {}

    def start(self, specs: Sequence[BackendSpec]) -> None:
        python = os.path.join(os.path.abspath(sys.prefix), "bin", "python")
        volumes = [f"{source}:{target}:ro" for source, target in python_runtime_mounts()]
        for index, spec in enumerate(specs):
            port = free_port()
            self.ports[spec.name] = port
            container = self._client.containers.create(
                IMAGE,
                command=[
                    python, "-m", "labelgw.tools.whoami", "--port", str(port), "--name", spec.name,
                    "--delay-ms", f"{spec.delay_ms:g}", "--workers", "1", "--seed", str(self._seed * 100 + index),
                ],
                name=f"labelgw-bench-{self.run_id}-{spec.name}",
                labels={
                    "labelgw.service": SERVICE,
                    "labelgw.port": str(port),
                    "labelgw.env": self.run_id,
                    OWNER_LABEL: self.run_id,
                },
                environment={"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
                volumes=volumes,
                network_mode="host",
                working_dir="/tmp",
            )
            self.containers.append(container)  # tracked before start: a failed start is removed too
            container.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for container, spec in zip(self.containers, specs):
            while not _accepts(self.ports[spec.name]):
                container.reload()
                if container.status not in ("created", "running") or time.monotonic() > deadline:
                    logs = container.logs().decode("utf-8", "replace")[-2000:]
                    raise RuntimeError(f"backend {spec.name} is {container.status}, not serving; logs:\n{logs}")
                time.sleep(0.1)

    def queue_states(self) -> dict[str, dict[str, int]]:
        """Each backend's worker queue (busy, waiting), read from whoami's /control straight, not via a proxy."""
        states: dict[str, dict[str, int]] = {}
        for name, port in self.ports.items():
            body = _get_json(port, "/control", "127.0.0.1")
            states[name] = {"busy": int(body.get("busy", 0)), "waiting": int(body.get("waiting", 0))}
        return states

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Wait until no backend has work queued or in service; returns the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                states = self.queue_states()
                if all(s["busy"] == 0 and s["waiting"] == 0 for s in states.values()):
                    return time.monotonic() - started
            except (OSError, ValueError, http.client.HTTPException):
                states = {}
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"backends still busy after {timeout_s:.0f} s: {states}")
            time.sleep(0.2)

    def remove(self) -> None:
        for container in reversed(self.containers):
            try:
                container.remove(force=True, v=True)
            except docker.errors.APIError as error:
                print(f"warning: could not remove {container.name}: {error}", file=sys.stderr)
        self.containers.clear()


# -- small HTTP helpers (loopback only) -------------------------------------------------------------------------------


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _get(port: int, path: str, host: str, timeout: float = 2.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _get_json(port: int, path: str, host: str) -> dict[str, Any]:
    status, body = _get(port, path, host)
    if status != 200:
        raise ValueError(f"GET {path} answered {status}")
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError(f"GET {path}: not a JSON object")
    return value


# -- proxies --------------------------------------------------------------------------------------------------------


def twistd_path() -> str:
    twistd = Path(sys.executable).parent / "twistd"
    return str(twistd) if twistd.exists() else (shutil.which("twistd") or "twistd")


def labelgw_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def labelgw_options() -> str:
    """`twistd labelgw --help`, to use only the options this version has (--admin, --https, --balancer)."""
    done = subprocess.run(
        [twistd_path(), "labelgw", "--help"], capture_output=True, text=True, timeout=30, env=labelgw_env(),
        cwd=REPO, check=False,
    )
    return done.stdout + done.stderr


@dataclass
class StartedProxy:
    server: Managed
    port: int
    admin_port: int | None = None


def start_labelgw(
    prefix: Path, policy: str, docker_host: str | None, run_id: str, options: str
) -> StartedProxy:
    port = free_port()
    argv = [twistd_path(), "-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface=127.0.0.1"]
    admin_port = None
    if "--admin" in options:
        admin_port = free_port()
        argv += ["--admin", f"tcp:{admin_port}:interface=127.0.0.1"]
    if "--https" in options:
        argv += ["--https", "none"]
    if "--state-dir" in options:
        argv += ["--state-dir", str(prefix / "labelgw-state")]
    if docker_host:
        argv += ["--docker-host", docker_host]
    argv += ["--env", run_id]
    if policy != "wrt":  # wrt is the default; older versions have no --balancer at all
        argv += ["--balancer", policy]
    server = Managed(f"labelgw-{policy}", argv, prefix / f"labelgw-{policy}.log", env=labelgw_env())
    return StartedProxy(server, port, admin_port)


def labelgw_ready(proxy: StartedProxy, backends: int) -> Callable[[], str | None]:
    def check() -> str | None:
        if proxy.admin_port is not None:
            state = _get_json(proxy.admin_port, "/api/state", "127.0.0.1")
            service = state.get("services", {}).get(SERVICE)
            if not service or service.get("ready") != backends:
                return f"admin view: {SERVICE} has {service and service.get('ready')} of {backends} ready backends"
        status, _ = _get(proxy.port, "/", HOST_HEADER)
        return None if status == 200 else f"GET / answered {status}"

    return check


def _nginx(prefix: Path, name: str, port: int, ports: Sequence[int], policy: str) -> StartedProxy:
    temp = prefix / f"{name}-temp"
    temp.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    balance = "        least_conn;\n" if policy == "least_conn" else ""
    conf = prefix / f"{name}.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
master_process on;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream bench_backends {{
{balance}{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} default_server backlog=4096;
        location / {{
            proxy_pass http://bench_backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 5s;
        }}
    }}
}}
"""
    )
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / f"{name}-error.log")]
    return StartedProxy(Managed(name, argv, prefix / f"{name}.log"), port)


def _haproxy(prefix: Path, name: str, port: int, ports: Sequence[int]) -> StartedProxy:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
    conf = prefix / f"{name}.cfg"
    conf.write_text(
        f"""global
    maxconn 4096
    nbthread 1

defaults
    mode http
    timeout connect 5s
    timeout server 5s
    # Client side: long enough that the load generator's idle keep-alive connections are never closed under it.
    timeout client 75s
    timeout http-keep-alive 75s
    timeout http-request 10s

frontend bench_front
    bind 127.0.0.1:{port}
    default_backend bench_backends

backend bench_backends
    balance leastconn
    http-reuse always
{servers}
"""
    )
    argv = [HAPROXY, "-db", "-f", str(conf)]
    return StartedProxy(Managed(name, argv, prefix / f"{name}.log"), port)


def start_proxy(
    run: ProxyRun, prefix: Path, ports: Sequence[int], docker_host: str | None, run_id: str, options: str
) -> StartedProxy:
    if run.proxy == "labelgw":
        return start_labelgw(prefix, run.policy, docker_host, run_id, options)
    if run.proxy == "nginx":
        return _nginx(prefix, run.name, free_port(), ports, run.policy)
    return _haproxy(prefix, run.name, free_port(), ports)


def missing_tool(run: ProxyRun, options: str) -> str | None:
    if run.proxy == "nginx" and not os.path.exists(NGINX):
        return f"{NGINX} not installed (apt-get install nginx-light)"
    if run.proxy == "haproxy" and not os.path.exists(HAPROXY):
        return f"{HAPROXY} not installed (apt-get install haproxy)"
    if run.proxy == "labelgw" and run.policy != "wrt" and "--balancer" not in options:
        return "this labelgw has no --balancer option"
    return None


# -- load -------------------------------------------------------------------------------------------------------------


def run_loadgen(port: int, args: argparse.Namespace, rate: float, out: Path) -> dict[str, Any]:
    argv = [
        sys.executable, str(LOADGEN), "--port", str(port), "--host-header", HOST_HEADER,
        "--rate", f"{rate:g}", "--duration", f"{args.duration:g}", "--warmup", f"{args.warmup:g}",
        "--seed", str(args.seed), "--timeout", f"{CLIENT_TIMEOUT_S:g}", "--json", str(out),
    ]
    argv += [item for name in SLOW_BACKENDS for item in ("--slow", name)]
    if args.records:
        argv.append("--records")
    limit = args.warmup + args.duration + CLIENT_TIMEOUT_S + 60
    done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


# -- report -----------------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_table(results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    print(
        f"\n{'proxy':<9} {'policy':<12} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'req/s':>7} {'failures':>9} "
        f"{'slow share':>10} {'late p99':>9}"
    )
    for run in ALL_RUNS:
        if run.name in results:
            s = results[run.name]["summary"]
            print(
                f"{run.proxy:<9} {run.policy:<12} {_fmt(s['p50_ms']):>8} {_fmt(s['p99_ms']):>8} "
                f"{_fmt(s['p999_ms']):>9} {_fmt(s['throughput']):>7} {s['failures']:>9} "
                f"{_fmt(s['slow_share'] * 100) + ' %':>10} {_fmt(s['lateness_p99_ms'], 2):>9}"
            )
        elif run.name in skipped:
            print(f"{run.proxy:<9} {run.policy:<12} skipped: {skipped[run.name]}")
    print(
        "(slow share: fraction of the answers that came from the slow backend; a request that timed out names no\n"
        " backend, so under round robin the slow backend's timed-out requests count as failures, not in its share.\n"
        " late p99: the load generator's own lateness, actual - intended send time, in ms)"
    )


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """labelgw (wrt) against the target of issue 3 on S1 at 50 %: p99 under half of the best peer's p99,
    under 2 % of the traffic to the slow backend, no failures."""
    ours = results.get("labelgw-wrt")
    peers = {name: r for name, r in results.items() if not name.startswith("labelgw")}
    if ours is None or not peers:
        return {"evaluated": False, "why": "labelgw-wrt or every peer missing"}
    best_name = min(peers, key=lambda name: peers[name]["summary"]["p99_ms"])
    best_p99 = peers[best_name]["summary"]["p99_ms"]
    s = ours["summary"]
    checks = {
        "p99_under_half_of_best_peer": s["p99_ms"] < 0.5 * best_p99,
        "slow_share_under_2_percent": s["slow_share"] < 0.02,
        "no_failures": s["failures"] == 0,
    }
    return {
        "evaluated": True,
        "labelgw_p99_ms": s["p99_ms"],
        "best_peer": best_name,
        "best_peer_p99_ms": best_p99,
        "ratio": s["p99_ms"] / best_p99 if best_p99 else math.nan,
        "slow_share": s["slow_share"],
        "failures": s["failures"],
        "checks": checks,
        "met": all(checks.values()),
    }


def print_verdict(v: dict[str, Any]) -> None:
    if not v.get("evaluated"):
        print(f"\ntarget: not evaluated ({v.get('why')})")
        return
    c = v["checks"]
    mark = {True: "ok", False: "MISSED"}
    print(
        f"\ntarget (labelgw wrt vs best peer {v['best_peer']}):\n"
        f"  p99 {v['labelgw_p99_ms']:.1f} ms vs {v['best_peer_p99_ms']:.1f} ms = x{v['ratio']:.2f} "
        f"(want < x0.50): {mark[c['p99_under_half_of_best_peer']]}\n"
        f"  share to the slow backend {v['slow_share'] * 100:.2f} % (want < 2 %): "
        f"{mark[c['slow_share_under_2_percent']]}\n"
        f"  failures {v['failures']} (want 0): {mark[c['no_failures']]}\n"
        f"  => {'target met' if v['met'] else 'target missed'}"
    )


def _versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as error:
            return str(error)
        text = (done.stdout + done.stderr).strip()
        return text.splitlines()[0] if text else ""

    import twisted

    return {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nginx": first_line([NGINX, "-v"]),
        "haproxy": first_line([HAPROXY, "-v"]),
        "cpus": str(os.cpu_count()),
    }


# -- the run ------------------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rate = args.load * capacity(S1)
    docker_host = args.docker_host or os.environ.get("DOCKER_HOST")
    client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {IMAGE} missing: scripts/test builds it (or see tests/support/images.py)") from None
    options = labelgw_options()
    run_id = f"b{os.getpid()}"
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-bench-balance-"))
    prefix.chmod(0o755)  # nginx workers run as nobody
    backends = Backends(client, run_id, args.seed)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    print(
        f"S1 (4 x 10 ms + 1 x 100 ms, 1 worker each; capacity {capacity(S1):.0f} req/s) at {args.load * 100:g} %: "
        f"{rate:g} req/s open loop, seed {args.seed}, warm-up {args.warmup:g} s + {args.duration:g} s measured, "
        f"timeout {CLIENT_TIMEOUT_S:g} s; load average {os.getloadavg()[0]:.2f}"
    )
    try:
        backends.start(S1)
        ports = [backends.ports[b.name] for b in S1]
        print(f"backends: {', '.join(f'{b.name} ({b.delay_ms:g} ms) :{backends.ports[b.name]}' for b in S1)}")
        for run in ALL_RUNS:
            if run.name not in args.proxies:
                continue
            problem = missing_tool(run, options)
            if problem:
                skipped[run.name] = problem
                print(f"skipping {run.name}: {problem}")
                continue
            proxy = start_proxy(run, prefix, ports, docker_host, run_id, options)
            try:
                proxy.server.start()
                check = labelgw_ready(proxy, len(S1)) if run.proxy == "labelgw" else (
                    lambda: None if _get(proxy.port, "/", HOST_HEADER)[0] == 200 else "GET / did not answer 200"
                )
                problem = wait_until(proxy.server, check, READY_TIMEOUT_S)
                if problem:
                    skipped[run.name] = problem
                    print(f"skipping {run.name}: {problem}\n  log: {proxy.server.log_tail(8)}")
                    continue
                load_before = os.getloadavg()[0]
                report = run_loadgen(proxy.port, args, rate, prefix / f"{run.name}.json")
                if proxy.admin_port is not None:
                    try:
                        report["admin_after"] = _get_json(proxy.admin_port, "/api/state", "127.0.0.1")
                    except (OSError, ValueError, http.client.HTTPException) as error:
                        report["admin_after"] = {"error": str(error)}
                if proxy.server.exited() is not None:
                    raise RuntimeError(f"{run.name} exited during the run:\n{proxy.server.log_tail()}")
            finally:
                proxy.server.stop()
            report["load_average_before"] = load_before
            report["drain_s"] = backends.drain()
            results[run.name] = report
            s = Summary(**report["summary"])
            shares = " ".join(f"{name} {fraction * 100:.1f}%" for name, fraction in s.share.items())
            print(
                f"  {run.name:<20} p50 {s.p50_ms:7.1f}  p99 {s.p99_ms:7.1f}  p99.9 {s.p999_ms:7.1f} ms  "
                f"{s.throughput:6.1f} req/s  failures {s.failures}  [{shares}]  "
                f"lateness p99 {s.lateness_p99_ms:.2f} max {s.lateness_max_ms:.2f} ms  "
                f"(drained in {report['drain_s']:.1f} s)"
            )
    finally:
        backends.remove()
        client.close()
        if args.keep_logs:
            print(f"logs and configurations kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)
    print_table(results, skipped)
    outcome = verdict(results)
    print_verdict(outcome)
    return {
        "command": [sys.executable, *sys.argv],
        "scenario": {
            "name": "S1",
            "backends": [{"name": b.name, "delay_ms": b.delay_ms, "workers": 1} for b in S1],
            "capacity": capacity(S1),
            "load": args.load,
            "rate": rate,
        },
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "versions": _versions(),
        "runs": results,
        "skipped": skipped,
        "target": outcome,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per proxy (default 30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before each measured window")
    parser.add_argument("--load", type=float, default=0.5, help=f"fraction of the capacity ({capacity(S1):g} req/s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the schedule and of the backends' draws")
    parser.add_argument(
        "--proxies",
        default=",".join(run.name for run in ALL_RUNS),
        help="comma list among " + ", ".join(run.name for run in ALL_RUNS) + " (default: all)",
    )
    parser.add_argument("--docker-host", default=None, help="Docker engine URL (default: $DOCKER_HOST)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--records", action="store_true", help="with --json: every request's outcome too")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configurations and logs")
    args = parser.parse_args(argv)
    args.proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    unknown = set(args.proxies) - set(RUNS_BY_NAME)
    if unknown:
        parser.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    if not 0 < args.duration <= 300 or not 0 <= args.warmup <= 120:
        parser.error("--duration must be in (0, 300], --warmup in [0, 120]")
    if not 0 < args.load <= 1.5:
        parser.error("--load must be in (0, 1.5]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
