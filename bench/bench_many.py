#!/usr/bin/env python3
"""Issue 11's benchmark: labelgw with many labelled containers on one engine.

One run, bounded in time, loopback traffic only. It starts a private Docker engine (dockerd in a temp dir, vfs,
no iptables, no bridge, as scripts/test does), the test image labelgw-test-busybox (tests/support/images.py),
three whoami backends on loopback ports behind a static service `web` (hosts [web.localhost]), and labelgw with the
Docker watcher on that engine (`docker: true`, `--docker-host`, admin view on loopback). Then:

  routes      labelgw CPU us/request (wrk -t1 -cC to web.localhost) with 1 route, then after each batch of
              containers (s0..s99, then s100..sN-1): per-request cost must not grow with the routes
  containers  N containers (busybox `sleep`, --network host, labels labelgw.service=sI, labelgw.port=20000+I),
              created and started by a thread pool of docker SDK calls; from the engine's own `start` event of the
              last one to a request for its host (sI.localhost) answered not-404; labelgw's CPU and RSS per
              container (from /proc, before and after)
  churn       p50/p99 of a bounded loop of requests to web.localhost (one keep-alive connection) with the N
              containers present, then again while 100 of them are killed and started again in a loop
  resync      a second labelgw (`resync_interval` of a few seconds) on the same N containers: the wall time its
              log gives for each periodic full resync, and its CPU over that window (sampled from /proc)

    .venv/bin/python bench/bench_many.py [--containers 500] [--json out.json]
    .venv/bin/python bench/bench_many.py --containers 100          # a quick run

Needs root (dockerd), docker.io, busybox-static and wrk. Everything it starts (containers, engine, labelgw,
backends) it removes or stops at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import (  # noqa: E402  (same directory)
    TWISTD_LOGGING_ORIGIN, Managed, WrkResult, free_port, parse_wrk, run_bench, session_cpu_s,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

IMAGE = "labelgw-test-busybox"
WEB_HOST = "web.localhost"
# Marker outside the labelgw. prefix (labelgw refuses unknown labels under its own) to find this run's containers.
OWNER_LABEL = "labelgw-bench.owner"
BASE_PORT = 20000  # labelgw.port of container I is BASE_PORT + I: nothing listens there (the containers sleep)
CHURN_CONTAINERS = 100
FIRST_BATCH = 100
MAIN_RESYNC_INTERVAL_S = 3600
IDLE_S = 2.0  # seconds of no traffic before each CPU/request run  # no periodic resync in the main labelgw: it would land in the other measurements


# -- pure parts ------------------------------------------------------------------------------------------------------


def batches(containers: int, first: int = FIRST_BATCH) -> list[range]:
    """The container indexes started together: the first `first`, then the rest (one batch when not more)."""
    if containers <= first:
        return [range(containers)] if containers > 0 else []
    return [range(first), range(first, containers)]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in (0, 1]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(min(rank, len(ordered))) - 1]


def container_labels(index: int, run_id: str) -> dict[str, str]:
    return {"labelgw.service": f"s{index}", "labelgw.port": str(BASE_PORT + index), OWNER_LABEL: run_id}


def labelgw_config(backend_ports: Sequence[int], resync_interval_s: float) -> str:
    backends = ", ".join(f'"127.0.0.1:{port}"' for port in backend_ports)
    return f"""docker: true
resync_interval: {resync_interval_s:g}
services:
  web:
    hosts: [{WEB_HOST}]
    path: /
    backends: [{backends}]
"""


_RESYNC_LINE = re.compile(
    r"^(?P<stamp>\S+) \[[^\]]*\] docker resync \((?P<reason>[^)]*)\): (?P<containers>\d+) containers, "
    r"(?P<routed>\d+) routed, .* in (?P<elapsed>[0-9.]+) ms",
    re.MULTILINE,
)


@dataclass(frozen=True)
class ResyncLine:
    logged_at: float  # epoch seconds of the log line (twistd stamps whole seconds)
    reason: str
    containers: int
    routed: int
    elapsed_ms: float


def parse_resyncs(log_text: str) -> list[ResyncLine]:
    """labelgw's `docker resync (REASON): N containers, R routed, ... in X ms` lines, in order."""
    found = []
    for match in _RESYNC_LINE.finditer(log_text):
        stamp = match.group("stamp")
        try:
            logged_at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except ValueError:
            logged_at = float("nan")
        found.append(
            ResyncLine(logged_at, match.group("reason"), int(match.group("containers")), int(match.group("routed")),
                       float(match.group("elapsed")))
        )
    return found


def cpu_between(samples: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """CPU seconds spent between two times, from (time, cumulative CPU seconds) samples in time order,
    interpolated linearly between the samples around each end."""

    def at(when: float) -> float:
        if not samples:
            return 0.0
        if when <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if t0 <= when <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)
        return samples[-1][1]

    return max(0.0, at(end) - at(start))


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, value: str) -> None:
        self.rows.append((what, value))
        print(f"  {what}: {value}")

    def table(self) -> str:
        width = max((len(what) for what, _ in self.rows), default=0)
        return "\n".join(f"{what:<{width}}  {value}" for what, value in self.rows)


# -- /proc -------------------------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class CpuSampler:
    """(time.time(), session CPU seconds) of a process every `period` s, in a thread."""

    def __init__(self, session: int, period: float = 0.02) -> None:
        self.session = session
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), session_cpu_s(self.session)))
            self._stop.wait(self.period)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the private engine --------------------------------------------------------------------------------------------


class Engine:
    """dockerd in a temp dir of its own (short path: unix socket paths are limited), stopped and deleted by `stop`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lgwm-", dir="/tmp"))
        self.url = f"unix://{self.root}/docker.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> Any:
        import docker

        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise SystemExit("no dockerd: apt-get install docker.io (or run ./scripts/test once as root)")
        with open(self.root / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(
                [dockerd, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "x"),
                 "--pidfile", str(self.root / "pid"), "-H", self.url, "--storage-driver", "vfs",
                 "--iptables=false", "--bridge=none"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client = docker.DockerClient(base_url=self.url, timeout=60, max_pool_size=32)
                client.ping()
                return client
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the private dockerd did not start:\n{self.log_tail()}")
                time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        # A containerd that outlived dockerd: only the one whose files live in our dir, by its pid.
        marker = str(self.root) + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("containerd") and marker in cmdline:
                try:
                    os.kill(int(entry), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        mounts = []
        with open("/proc/self/mounts") as table:
            for line in table:
                point = line.split()[1]
                if point.startswith(marker):
                    mounts.append(point)
        for point in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)


# -- HTTP (loopback only) --------------------------------------------------------------------------------------------


def get_status(port: int, host: str, timeout: float = 2.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/", headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def admin_routes(admin_port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    try:
        connection.request("GET", "/api/state", headers={"Host": "localhost"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return len(json.loads(body).get("routes", []))


def wait_for(check: Callable[[], bool], timeout_s: float, period_s: float = 0.005) -> float | None:
    """time.time() when `check` first held, or None after timeout_s. Errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return time.time()
        except (OSError, ValueError, http.client.HTTPException):
            pass
        time.sleep(period_s)
    return None


def latency_loop(port: int, requests: int, max_s: float) -> tuple[list[float], int]:
    """Sequential GET / to web.localhost on one keep-alive connection: per-request seconds, and the non-200s."""
    latencies: list[float] = []
    bad = 0
    deadline = time.monotonic() + max_s
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        while len(latencies) < requests and time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                connection.request("GET", "/", headers={"Host": WEB_HOST})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                status = 0
            latencies.append(time.perf_counter() - began)
            bad += status != 200
    finally:
        connection.close()
    return latencies, bad


# -- the run ---------------------------------------------------------------------------------------------------------


class StartEvents:
    """The engine's `start` events of this run's containers (container id -> epoch seconds), read in a thread."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.times: dict[str, float] = {}
        self._stream = client.api.events(
            decode=True, filters={"type": "container", "event": "start", "label": f"{OWNER_LABEL}={run_id}"}
        )
        self._thread = threading.Thread(target=self._run, name="start-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self.times[event["id"]] = int(event["timeNano"]) / 1e9
        except Exception:
            pass  # the stream is closed at the end

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:
            pass


def labelgw_process(
    prefix: Path, name: str, port: int, admin_port: int, engine_url: str, config: str, *, debug: bool = False
) -> Managed:
    """`debug`: LABELGW_DEBUG=1, so that the log keeps the debug lines (a periodic resync that changed nothing
    is one)."""
    folder = prefix / name
    folder.mkdir(exist_ok=True)
    (folder / "labelgw.yaml").write_text(config)
    env = dict(os.environ)
    if debug:
        env["LABELGW_DEBUG"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("DOCKER_HOST", None)
    argv = [
        sys.executable, "-P", "-c", TWISTD_LOGGING_ORIGIN, "-n", "--pidfile=", "labelgw",
        "--http", f"tcp:{port}:interface=127.0.0.1", "--https", "none", "--admin", f"tcp:{admin_port}:interface=127.0.0.1",
        "--state-dir", str(folder / "state"), "--docker-host", engine_url, "--config", str(folder / "labelgw.yaml"),
    ]
    return Managed(name, argv, folder / "labelgw.log", env=env, cwd=REPO)


def run_wrk_host(port: int, seconds: int, connections: int) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {WEB_HOST}",
            f"http://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def cpu_per_request(server: Managed, port: int, args: argparse.Namespace) -> tuple[float, float, int]:
    """(labelgw CPU us/request, req/s, errors) of a wrk run to web.localhost, after a 1 s warm-up."""
    assert server.process is not None
    run_wrk_host(port, 1, args.connections)
    before = session_cpu_s(server.process.pid)
    result = run_wrk_host(port, args.wrk_seconds, args.connections)
    used = session_cpu_s(server.process.pid) - before
    return used / max(result.requests, 1) * 1e6, result.requests_per_s, result.errors


def pool_map(workers: int, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


def bench(args: argparse.Namespace) -> dict[str, object]:
    from support.images import ensure_busybox_image  # type: ignore[import-not-found]  # tests/support, on sys.path

    if not shutil.which("wrk"):
        raise SystemExit("missing wrk: apt-get install wrk")
    began = time.monotonic()
    run_id = f"m{os.getpid()}"
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-many-"))
    engine = Engine()
    started: list[Managed] = []
    containers: dict[int, Any] = {}
    report = Report()
    figures: dict[str, Any] = {"containers": args.containers, "load_average_start": os.getloadavg()[0]}
    client = None
    events = None
    print(f"load average {os.getloadavg()[0]:.2f}; engine in {engine.root}")
    try:
        client = engine.start()
        ensure_busybox_image(client)
        backend_ports = [free_port() for _ in range(3)]
        backend_env = dict(os.environ, PYTHONPATH=str(REPO))
        for index, port in enumerate(backend_ports):
            whoami = Managed(f"whoami-{index}", [sys.executable, "-m", "labelgw.tools.whoami", "--port", str(port),
                                                 "--name", f"w{index}"], prefix / f"whoami-{index}.log", env=backend_env)
            whoami.start()
            started.append(whoami)
        port, admin_port = free_port(), free_port()
        gateway = labelgw_process(prefix, "labelgw", port, admin_port, engine.url,
                                  labelgw_config(backend_ports, MAIN_RESYNC_INTERVAL_S))
        gateway.start()
        started.append(gateway)
        if wait_for(lambda: get_status(port, WEB_HOST) == 200, 30, 0.2) is None:
            raise RuntimeError(f"labelgw does not serve web.localhost:\n{gateway.log_tail()}")
        assert gateway.process is not None
        pid = gateway.process.pid
        events = StartEvents(client, run_id)

        print("routes: labelgw CPU per request")
        per_request: list[dict[str, Any]] = []

        def measure_cost(sweep: str) -> None:
            routes = admin_routes(admin_port)
            # labelgw's CPU without traffic first: background work that grew with the routes would show here.
            idle_before = session_cpu_s(pid)
            time.sleep(IDLE_S)
            idle_ms_per_s = (session_cpu_s(pid) - idle_before) / IDLE_S * 1000
            cost, rate, errors = cpu_per_request(gateway, port, args)
            per_request.append(
                {"sweep": sweep, "routes": routes, "cpu_us_per_request": cost, "requests_per_s": rate, "errors": errors,
                 "idle_cpu_ms_per_s": idle_ms_per_s}
            )
            report.add(f"CPU per request, {routes} routes ({sweep})",
                       f"{cost:.1f} us ({rate:.0f} req/s, {errors} errors; idle {idle_ms_per_s:.1f} ms CPU/s)")

        measure_cost("up")

        def create(index: int) -> Any:
            return client.containers.create(
                IMAGE, command=["sleep", "100000"], name=f"lgwm-{run_id}-s{index}", labels=container_labels(index, run_id),
                network_mode="host",
            )

        created_s = started_s = 0.0
        rss_before = rss_mib(pid)
        visible: list[dict[str, float]] = []
        for batch in batches(args.containers):
            batch_cpu, batch_rss = session_cpu_s(pid), rss_mib(pid)
            t0 = time.monotonic()
            for index, container in zip(batch, pool_map(args.workers, create, batch)):
                containers[index] = container
            t1 = time.monotonic()
            pool_map(args.workers, lambda index: containers[index].start(), batch)
            t2 = time.monotonic()
            created_s += t1 - t0
            started_s += t2 - t1
            # The last start the engine reported, and its container's host.
            deadline = time.monotonic() + 10
            while any(containers[i].id not in events.times for i in batch) and time.monotonic() < deadline:
                time.sleep(0.01)
            last = max(batch, key=lambda i: events.times.get(containers[i].id, 0.0))
            last_event = events.times.get(containers[last].id, float("nan"))
            seen = wait_for(lambda: get_status(port, f"s{last}.localhost") != 404, 60)
            total_routes = 1 + batch.stop
            all_seen = wait_for(lambda: admin_routes(admin_port) >= total_routes, 120, 0.1)
            time.sleep(0.5)  # let the tail of the events settle before reading the CPU
            cpu_used = session_cpu_s(pid) - batch_cpu
            rss_grew = rss_mib(pid) - batch_rss
            entry = {
                "containers": len(batch), "create_s": t1 - t0, "start_s": t2 - t1,
                "last_start_to_route_ms": (seen - last_event) * 1000 if seen else float("nan"),
                "last_start_to_all_routes_ms": (all_seen - last_event) * 1000 if all_seen else float("nan"),
                "cpu_ms_per_container": cpu_used / len(batch) * 1000, "rss_kib_per_container": rss_grew * 1024 / len(batch),
            }
            visible.append(entry)
            report.add(
                f"containers s{batch.start}..s{batch.stop - 1}",
                f"created in {t1 - t0:.1f} s, started in {t2 - t1:.1f} s ({len(batch) / max(t2 - t1, 1e-9):.0f}/s)",
            )
            report.add(f"  last start event -> its route answers (s{last})", f"{entry['last_start_to_route_ms']:.0f} ms")
            report.add(f"  last start event -> all {total_routes} routes in the admin view",
                       f"{entry['last_start_to_all_routes_ms']:.0f} ms")
            report.add("  labelgw CPU / RSS per container",
                       f"{entry['cpu_ms_per_container']:.2f} ms / {entry['rss_kib_per_container']:.0f} KiB")
            measure_cost("up")
        rss_after = rss_mib(pid)
        n = max(len(containers), 1)
        report.add(f"labelgw RSS before / after {len(containers)} containers",
                   f"{rss_before:.1f} / {rss_after:.1f} MiB ({(rss_after - rss_before) * 1024 / n:.0f} KiB per container)")
        figures.update(per_request=per_request, batches=visible, rss_before_mib=rss_before, rss_after_mib=rss_after,
                       create_s=created_s, start_s=started_s)

        print("churn: latency through web.localhost")
        assert engine.process is not None
        engine_pid = engine.process.pid
        spent: dict[str, tuple[float, float]] = {}  # loop -> (labelgw, engine) CPU seconds during it

        def timed_loop(name: str) -> tuple[list[float], int]:
            cpu = session_cpu_s(pid), session_cpu_s(engine_pid)
            result = latency_loop(port, args.requests, args.loop_seconds)
            spent[name] = (session_cpu_s(pid) - cpu[0], session_cpu_s(engine_pid) - cpu[1])
            return result

        quiet, quiet_bad = timed_loop("quiet")
        churners = [containers[i] for i in sorted(containers)[:CHURN_CONTAINERS]]
        stop_churn = threading.Event()
        cycles = [0]
        churn_errors: list[str] = []

        def churn(share: list[Any]) -> None:
            # kill (no 10 s grace: `sleep` as pid 1 ignores SIGTERM), then start again, each container of this
            # worker's share in turn, until told to stop or the cycles run out.
            while not stop_churn.is_set() and cycles[0] < args.churn_cycles:
                for container in share:
                    if stop_churn.is_set():
                        return
                    try:
                        container.kill()
                        container.start()
                        cycles[0] += 1
                    except Exception as error:  # the engine's answer: counted, the loop goes on
                        churn_errors.append(str(error)[:200])
                        time.sleep(0.1)

        churn_pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.workers)
        churn_started = time.monotonic()
        shares = [churners[w:: args.workers] for w in range(args.workers)]
        futures = [churn_pool.submit(churn, share) for share in shares if share]
        time.sleep(1.0)  # churn under way before the loop begins
        churned, churned_bad = timed_loop("churn")
        stop_churn.set()
        churn_pool.shutdown(wait=True)
        for future in futures:
            future.result()
        churn_s = time.monotonic() - churn_started
        for label, values, bad, name in (
            ("without churn", quiet, quiet_bad, "quiet"), ("with churn", churned, churned_bad, "churn")
        ):
            report.add(
                f"latency to web.localhost {label}",
                f"p50 {percentile(values, 0.5) * 1000:.2f} ms  p99 {percentile(values, 0.99) * 1000:.2f} ms  "
                f"({len(values)} requests, {bad} not 200; CPU during the loop: labelgw {spent[name][0]:.2f} s, "
                f"dockerd+containerd {spent[name][1]:.2f} s)",
            )
        report.add("churn", f"{cycles[0]} kill+start cycles of {len(churners)} containers in {churn_s:.1f} s"
                            f" ({len(churn_errors)} engine errors)")
        figures["latency"] = {
            "quiet": {"p50_ms": percentile(quiet, 0.5) * 1000, "p99_ms": percentile(quiet, 0.99) * 1000,
                      "requests": len(quiet), "not_200": quiet_bad, "labelgw_cpu_s": spent["quiet"][0],
                      "engine_cpu_s": spent["quiet"][1]},
            "churn": {"p50_ms": percentile(churned, 0.5) * 1000, "p99_ms": percentile(churned, 0.99) * 1000,
                      "requests": len(churned), "not_200": churned_bad, "cycles": cycles[0], "errors": churn_errors[:5],
                      "labelgw_cpu_s": spent["churn"][0], "engine_cpu_s": spent["churn"][1]},
        }

        print(f"resync: a second labelgw with resync_interval {args.resync_interval:g} s")
        port2, admin2 = free_port(), free_port()
        # Debug lines kept: a periodic resync that changed nothing (all of them here) logs at debug level.
        second = labelgw_process(prefix, "labelgw-resync", port2, admin2, engine.url,
                                 labelgw_config(backend_ports, args.resync_interval), debug=True)
        second.start()
        started.append(second)
        if wait_for(lambda: get_status(port2, WEB_HOST) == 200, 30, 0.2) is None:
            raise RuntimeError(f"the second labelgw does not serve:\n{second.log_tail()}")
        assert second.process is not None
        log_path = second.log_path
        wanted = args.resyncs
        with CpuSampler(second.process.pid) as sampler:
            deadline = time.monotonic() + args.resync_interval * (wanted + 1) + 30
            while time.monotonic() < deadline:
                periodic = [r for r in parse_resyncs(log_path.read_text(errors="replace")) if r.reason == "periodic"]
                if len(periodic) >= wanted:
                    break
                time.sleep(0.2)
            time.sleep(0.3)
        lines = parse_resyncs(log_path.read_text(errors="replace"))
        # Each periodic resync runs at a whole multiple of the interval after the looping call started; its window
        # is found from the CPU samples: the busiest stretch of its length in the interval before its log line.
        resyncs = []
        idle = [b - a for (_, a), (_, b) in zip(sampler.samples, sampler.samples[1:])]
        for line in (r for r in lines if r.reason == "periodic"):
            end = line.logged_at + 1.0  # twistd stamps whole seconds
            begin = line.logged_at - line.elapsed_ms / 1000 - args.resync_interval / 2
            window = [(t, c) for t, c in sampler.samples if begin <= t <= end]
            span = line.elapsed_ms / 1000 + 0.1
            best = 0.0
            for t, _ in window:
                best = max(best, cpu_between(sampler.samples, t, t + span))
            resyncs.append({"containers": line.containers, "routed": line.routed, "wall_ms": line.elapsed_ms,
                            "cpu_ms": best * 1000})
        connected = [r for r in lines if r.reason == "connected"]
        if connected:
            report.add("first resync at labelgw start (log)",
                       f"{connected[0].containers} containers, {connected[0].routed} routed, {connected[0].elapsed_ms:.0f} ms")
        for index, entry in enumerate(resyncs, 1):
            report.add(f"periodic resync {index}",
                       f"{entry['containers']} containers: wall {entry['wall_ms']:.0f} ms (log), CPU {entry['cpu_ms']:.0f} ms"
                       " (/proc, busiest window of that length)")
        if resyncs:
            report.add("resync median", f"wall {statistics.median(r['wall_ms'] for r in resyncs):.0f} ms, CPU "
                                        f"{statistics.median(r['cpu_ms'] for r in resyncs):.0f} ms")
        figures["resyncs"] = resyncs
        figures["idle_cpu_ms_per_sample_median"] = statistics.median(idle) * 1000 if idle else None
        second.stop()

        # The same CPU/request figures on the way down (containers removed batch by batch, last batch first): drift
        # of the machine's load over the run shows as a difference between the two sweeps at one route count.
        print("routes, on the way down: labelgw CPU per request")
        for batch in reversed(batches(args.containers)):
            pool_map(args.workers, lambda index: containers[index].remove(force=True, v=True), batch)
            for index in batch:
                del containers[index]
            if wait_for(lambda: admin_routes(admin_port) == 1 + batch.start, 120, 0.1) is None:
                raise RuntimeError("labelgw did not drop the routes of the removed containers")
            measure_cost("down")
        gateway.stop()
    finally:
        if events is not None:
            events.close()
        for server in reversed(started):
            server.stop()
        if client is not None and containers:
            t0 = time.monotonic()

            def remove(container: Any) -> None:
                try:
                    container.remove(force=True, v=True)
                except Exception as error:
                    print(f"warning: could not remove {container.name}: {error}", file=sys.stderr)

            pool_map(args.workers, remove, list(containers.values()))
            print(f"removed {len(containers)} containers in {time.monotonic() - t0:.1f} s")
        if client is not None:
            client.close()
        engine.stop()
        if args.keep_logs:
            print(f"logs kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)
    figures["total_s"] = time.monotonic() - began
    figures["load_average_end"] = os.getloadavg()[0]
    print(f"\n{report.table()}\n(run took {figures['total_s']:.0f} s; load average {figures['load_average_start']:.2f} "
          f"at the start, {figures['load_average_end']:.2f} at the end)")
    figures["table"] = report.rows
    figures["command"] = [sys.executable, *sys.argv]
    return figures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=500, help="labelled containers to start (default 500)")
    parser.add_argument("--workers", type=int, default=8, help="threads making docker SDK calls (default 8)")
    parser.add_argument("--connections", type=int, default=10, help="wrk connections for the CPU/request runs")
    parser.add_argument("--wrk-seconds", type=int, default=4, help="measured wrk seconds per route count")
    parser.add_argument("--requests", type=int, default=3000, help="requests per latency loop (default 3000)")
    parser.add_argument("--loop-seconds", type=float, default=30.0, help="at most this long per latency loop")
    parser.add_argument("--churn-cycles", type=int, default=5000, help="at most this many kill+start cycles")
    parser.add_argument("--resync-interval", type=float, default=4.0, help="of the second labelgw (default 4 s)")
    parser.add_argument("--resyncs", type=int, default=3, help="periodic resyncs to measure (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configurations and logs")
    args = parser.parse_args(argv)
    if not 1 <= args.containers <= 2000 or not 1 <= args.workers <= 64:
        parser.error("--containers must be in [1, 2000], --workers in [1, 64]")
    if args.requests < 10 or args.loop_seconds <= 0 or args.wrk_seconds < 1 or args.resyncs < 1:
        parser.error("--requests >= 10, --loop-seconds > 0, --wrk-seconds >= 1, --resyncs >= 1")
    if args.resync_interval < 1:
        parser.error("--resync-interval must be at least 1 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
