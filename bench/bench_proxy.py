#!/usr/bin/env python3
"""Issue 2's benchmark: what labelgw's forwarding costs, next to nginx and Twisted's own reverse proxy.

One run, loopback only, bounded in time. It starts:
  backend       nginx (1 worker, `return 200 "hello\\n"`, access_log off)
  direct        wrk straight to the backend: the ceiling
  nginx-proxy   nginx as a reverse proxy (1 worker, upstream keepalive 64, HTTP/1.1 upstream)
  twisted-rpr   twisted.web.proxy.ReverseProxyResource (HTTP/1.0, one upstream connection per request)
  labelgw       twistd -n --pidfile= labelgw --http tcp:P:interface=127.0.0.1 --config cfg.yaml
                (a static service `bench`, hosts [bench.localhost]); skipped, with the reason, if it does not start
then loads each target in turn with wrk (-t1 -cC -dDs --latency -H 'Host: bench.localhost') after a short warm-up,
and prints req/s, p50, p99, errors (socket errors + non-2xx/3xx) and the CPU time the target's processes spent per
request (user + system, from /proc) per target, with labelgw's ratios to the others. With --rounds N the targets are
interleaved N times, every other round in reverse order, and the medians are quoted.

    .venv/bin/python bench/bench_proxy.py [--duration 10] [--connections 50] [--rounds 1] [--json out.json]

Needs Debian's nginx (nginx-light) and wrk. Everything it starts, it stops (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
HOST_HEADER = "bench.localhost"
NGINX = "/usr/sbin/nginx"
TARGET_ORDER = ("direct", "nginx-proxy", "twisted-rpr", "labelgw")
DEFAULT_TARGETS = TARGET_ORDER
# Only when named in --targets: labelgw-nometrics (`metrics: false`: no per-request counters), to measure what
# metrics cost; labelgw with its access log off, or in JSON (the default target logs in the common format to its
# standard output, a file), to measure what the access log costs; labelgw-log-common is the default again, loaded
# after labelgw-log-off, so that the comparison does not depend on the order within a round.
OPT_IN_TARGETS = ("labelgw-nometrics", "labelgw-bare", "labelgw-mw", "labelgw-log-off", "labelgw-log-json", "labelgw-log-common")
RATIO_BASES = ("nginx-proxy", "twisted-rpr", "direct", "labelgw-nometrics", "labelgw-mw")
# labelgw-mw: the same service with the middlewares issue 10's cost figure names, passing every request: a rate
# limit far above the load, a request and a response header rule, an allowlist that admits loopback.
MIDDLEWARE_KEYS = """    ratelimit: 1000000/s
    ratelimit.burst: 1000000
    headers.request.set.X-Env: bench
    headers.response.remove: X-Powered-By
    allow: 127.0.0.0/8
"""
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0

# Twisted's reverse proxy, as a one-file server: argv = listen port, backend port.
TWISTED_RPR_SCRIPT = """
import sys
from twisted.internet import reactor
from twisted.web import proxy, server
listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
site = server.Site(proxy.ReverseProxyResource("127.0.0.1", backend_port, b""))
site.log = lambda request: None  # no access log, like the nginx targets
reactor.listenTCP(listen_port, site, backlog=1024, interface="127.0.0.1")
reactor.run()
"""

# twistd, after two lines saying where labelgw and the module its plugin names are imported from (read back by
# `imported_from`). The plugin file of labelgw's own tree goes first on twisted.plugins' path: Twisted's discovery
# takes the first labelgw_plugin.py along it, which would otherwise be one an installed copy left in site-packages,
# naming that copy's module.
TWISTD_LOGGING_ORIGIN = """
import importlib.util, os, sys
import labelgw
import twisted.plugins
tree = os.path.dirname(os.path.dirname(os.path.abspath(labelgw.__file__)))
plugins = os.path.join(tree, "twisted", "plugins")
if os.path.isfile(os.path.join(plugins, "labelgw_plugin.py")):
    rest = [path for path in twisted.plugins.__path__ if os.path.abspath(path) != plugins]
    twisted.plugins.__path__[:] = [plugins] + rest
print("bench: labelgw imported from " + labelgw.__file__, flush=True)
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "labelgw"]
spec = importlib.util.find_spec(makers[0].module) if makers else None
print("bench: labelgw plugin module imported from " + (spec.origin if spec else "nowhere"), flush=True)
try:
    import labelgw.http.linekind
    print("bench: labelgw.http.linekind imported from " + labelgw.http.linekind.__file__, flush=True)
except ImportError:  # a tree from before it (bench/ab.py)
    print("bench: labelgw.http.linekind imported from nowhere", flush=True)
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
sys.exit(run())
"""
_ORIGIN_LINE = re.compile(r"^bench: labelgw imported from (.+)$", re.MULTILINE)
_PLUGIN_LINE = re.compile(r"^bench: labelgw plugin module imported from (.+)$", re.MULTILINE)
_LINEKIND_LINE = re.compile(r"^bench: labelgw.http.linekind imported from (.+)$", re.MULTILINE)


def linekind_build(log_text: str) -> str:
    """From the log of a labelgw started by `labelgw_server`: whether the module setup.py compiles was compiled
    (`compiled`, `pure Python`, or `unknown`), with its file."""
    match = _LINEKIND_LINE.search(log_text)
    if match is None:
        return "unknown"
    origin = match.group(1).strip()
    if origin == "nowhere":
        return "absent (a tree from before it)"
    return ("pure Python" if origin.endswith(".py") else "compiled") + f" ({origin})"


def imported_from(log_text: str) -> tuple[Path | None, Path | None]:
    """From the log of a labelgw started by `labelgw_server`: the file it imported the labelgw package from, and the
    file of the module its twistd plugin names (labelgw's tap); None for what the log does not say."""
    found = [pattern.search(log_text) for pattern in (_ORIGIN_LINE, _PLUGIN_LINE)]
    package, plugin = (Path(match.group(1).strip()) if match else None for match in found)
    return package, plugin


# -- wrk output -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int
    socket_errors: int
    timeouts: int
    # CPU time (user + system) the target's processes spent per request during the run; NaN when not measured.
    cpu_us_per_request: float = float("nan")

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + self.socket_errors


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Figures from `wrk --latency` output."""

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, output, re.MULTILINE)

    rate = find(r"^Requests/sec:\s+([0-9.]+)")
    p50 = find(r"^\s+50%\s+(\S+)")
    p99 = find(r"^\s+99%\s+(\S+)")
    total = find(r"^\s+(\d+) requests in ")
    if not (rate and p50 and p99 and total):
        raise ValueError("wrk output without Requests/sec or a latency distribution:\n" + output)
    socket_errors = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non_2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    counts = [int(n) for n in socket_errors.groups()] if socket_errors else [0, 0, 0, 0]
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        p50_ms=_duration_ms(p50.group(1)),
        p99_ms=_duration_ms(p99.group(1)),
        requests=int(total.group(1)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(counts),
        timeouts=counts[3],
    )


# -- processes ------------------------------------------------------------------------------------------------------


class Managed:
    """A server started in its own session, so a Ctrl-C reaches this script only and its stop is ours to do."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the session we created (nginx workers, a stuck twistd) is killed by its group id.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"warning: {self.name} (pid {process.pid}) did not stop", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# The threads' run time in ns; /proc/PID/stat rounds the same sum to clock ticks (10 ms: about 1 % of a 5 s
# measurement of a server using 30 % of a core).
_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def _threads_cpu_s(pid: str) -> float:
    """CPU seconds of a process's live threads, from their /proc/PID/task/TID/schedstat."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0  # it exited meanwhile
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as schedstat:
                total += int(schedstat.read().split()[0])
        except OSError:
            continue  # the thread exited meanwhile
    return total / 1e9


def session_cpu_s(session_id: int) -> float:
    """CPU seconds (user + system) of every live process in a session (a server and its workers), from /proc: the
    threads' schedstat where the kernel has it, else utime + stime of /proc/PID/stat."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # After the command name in parentheses: state, ppid, pgrp, session, ..., utime (12th), stime (13th).
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        if int(fields[3]) == session_id:
            total += _threads_cpu_s(entry) if _SCHEDSTAT else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def wait_until(server: Managed, check: Callable[[], str | None], timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """Poll `check` (None: ready, else why not) until ready; returns why not on a timeout or an exit."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        code = server.exited()
        if code is not None:
            return f"exited with status {code}"
        try:
            problem = check()
        except (OSError, ValueError, http.client.HTTPException) as error:  # ssl.SSLError is an OSError
            problem = str(error) or type(error).__name__
        if problem is None:
            return None
        last = problem
        time.sleep(0.2)
    return f"not ready after {timeout_s:.0f} s ({last})"


def wait_ready(server: Managed, port: int, timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """None once `GET /` with Host: bench.localhost answers 2xx; otherwise why not."""

    def answers_2xx() -> str | None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/", headers={"Host": HOST_HEADER})
            response = connection.getresponse()
            response.read()
            return None if 200 <= response.status < 300 else f"answered {response.status}"
        finally:
            connection.close()

    return wait_until(server, answers_2xx, timeout_s)


# -- configurations -------------------------------------------------------------------------------------------------


def _nginx_conf(prefix: Path, name: str, http_block: str) -> Path:
    temp = prefix / f"{name}-temp"
    temp.mkdir(parents=True, exist_ok=True)
    conf = prefix / f"{name}.conf"
    conf.write_text(
        f"""
worker_processes 1;
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
    # No periodic reconnects of the load generator's or the proxies' keep-alive connections.
    keepalive_requests 1000000;
    keepalive_timeout 65s;
{http_block}
}}
"""
    )
    return conf


def nginx_backend(prefix: Path, port: int) -> Managed:
    conf = _nginx_conf(
        prefix,
        "backend",
        f"""
    server {{
        listen 127.0.0.1:{port} default_server backlog=4096;
        location / {{ default_type text/plain; return 200 "hello\\n"; }}
    }}""",
    )
    return Managed("backend", [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "backend-error.log")],
                   prefix / "backend.log")


def nginx_proxy_server(listen: str, backend_port: int, extra: str = "") -> str:
    """nginx as the peer proxy: upstream keepalive, and the X-Forwarded-* labelgw adds too, so both do the same
    work per request. `extra` goes into the server block (TLS settings)."""
    return f"""
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
    }}
    server {{
        listen {listen} default_server backlog=4096;{extra}
        location / {{
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}"""


def nginx_proxy(prefix: Path, port: int, backend_port: int) -> Managed:
    conf = _nginx_conf(prefix, "nginx-proxy", nginx_proxy_server(f"127.0.0.1:{port}", backend_port))
    return Managed(
        "nginx-proxy",
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-proxy-error.log")],
        prefix / "nginx-proxy.log",
    )


def twisted_rpr(prefix: Path, port: int, backend_port: int) -> Managed:
    return Managed(
        "twisted-rpr",
        [sys.executable, "-c", TWISTED_RPR_SCRIPT, str(port), str(backend_port)],
        prefix / "twisted-rpr.log",
    )


def labelgw_server(
    prefix: Path, backend_port: int, listeners: Sequence[str], tree: Path = REPO, python: str = sys.executable,
    name: str = "labelgw",
) -> Managed:
    """`twistd -n labelgw` with `listeners` (its listener and state options) and a config file holding one static
    service `bench` (hosts [bench.localhost], the backend) and no Docker watcher: only the data path is measured.

    labelgw and its plugin come from the source tree `tree` (default: this repository), run by `python`; the
    process logs the file it imported labelgw from (see `imported_from`), so a copy installed in the environment
    cannot stand in for the tree unnoticed."""
    config = prefix / "labelgw.yaml"
    config.write_text(
        f"""docker: false
services:
  bench:
    hosts: [{HOST_HEADER}]
    path: /
    backends: ["127.0.0.1:{backend_port}"]
"""
    )
    env = dict(os.environ)
    # The plugin (twisted/plugins/labelgw_plugin.py) and the package are found from the tree, ahead of any copy the
    # environment has installed (PYTHONPATH comes before site-packages).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return Managed(
        "labelgw",
        # -P: the working directory is not put on sys.path (it is the tree anyway, but say so).
        [python, "-P", "-c", TWISTD_LOGGING_ORIGIN, "-n", "--pidfile=", "labelgw", *listeners, "--config", str(config)],
        prefix / f"{name}.log",
        env=env,
        cwd=tree,
    )


def labelgw(prefix: Path, port: int, backend_port: int, access_log: str | None = None) -> Managed:
    # No HTTPS listener (and no CA written to the home directory), no admin listener.
    log = ["--access-log", access_log] if access_log else []
    return labelgw_server(
        prefix, backend_port, ["--http", f"tcp:{port}:interface=127.0.0.1", "--https", "none", "--admin", "none", *log],
        name=f"labelgw-log-{access_log}" if access_log else "labelgw",
    )


def labelgw_nometrics(prefix: Path, port: int, backend_port: int) -> Managed:
    """The `labelgw` target with `metrics: false` in its config file: the data path keeps no per-request counters."""
    folder = prefix / "labelgw-nometrics"
    folder.mkdir(exist_ok=True)
    server = labelgw(folder, port, backend_port)
    server.name = "labelgw-nometrics"
    config = folder / "labelgw.yaml"
    config.write_text("metrics: false\n" + config.read_text())
    return server


def labelgw_bare(prefix: Path, port: int, backend_port: int) -> Managed:
    """labelgw with `metrics: false` and `--access-log off`: what the default observability (the access log in the
    common format and the metrics counters) costs, against the default `labelgw` target."""
    folder = prefix / "labelgw-bare"
    folder.mkdir(exist_ok=True)
    server = labelgw(folder, port, backend_port, "off")
    server.name = "labelgw-bare"
    config = folder / "labelgw.yaml"
    config.write_text("metrics: false\n" + config.read_text())
    return server


def labelgw_mw(prefix: Path, port: int, backend_port: int) -> Managed:
    """The `labelgw` target with MIDDLEWARE_KEYS on its service."""
    folder = prefix / "labelgw-mw"
    folder.mkdir(exist_ok=True)
    server = labelgw(folder, port, backend_port)
    server.name = "labelgw-mw"
    config = folder / "labelgw.yaml"
    config.write_text(config.read_text() + MIDDLEWARE_KEYS)
    return server


# -- load -----------------------------------------------------------------------------------------------------------


def run_wrk(port: int, duration_s: int, connections: int, threads: int) -> WrkResult:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-H",
        f"Host: {HOST_HEADER}",
        f"http://127.0.0.1:{port}/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def median_result(results: Sequence[WrkResult]) -> dict[str, float]:
    return {
        "requests_per_s": statistics.median(r.requests_per_s for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "errors": sum(r.errors for r in results),
        "requests": sum(r.requests for r in results),
        "cpu_us_per_request": statistics.median(r.cpu_us_per_request for r in results),
    }


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    if "labelgw" not in medians:
        return {}
    ours = medians["labelgw"]
    found: dict[str, dict[str, float]] = {}
    for base in RATIO_BASES:
        other = medians.get(base)
        if other is None:
            continue
        found[base] = {
            key: ours[key] / other[key] if other[key] else float("nan")
            for key in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request")
        }
    return found


def print_table(medians: dict[str, dict[str, float]], skipped: dict[str, str], rounds: int) -> None:
    label = "median of %d rounds" % rounds if rounds > 1 else "1 round"
    print(f"\n{'target':<13} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>8} {'cpu us/req':>11}   ({label})")
    for name in (*TARGET_ORDER, *OPT_IN_TARGETS):
        if name in medians:
            m = medians[name]
            print(
                f"{name:<13} {m['requests_per_s']:>10.0f} {m['p50_ms']:>9.2f} {m['p99_ms']:>9.2f} "
                f"{int(m['errors']):>8} {m['cpu_us_per_request']:>11.1f}"
            )
        elif name in skipped:
            print(f"{name:<13} skipped: {skipped[name]}")
    found = ratios(medians)
    print()
    for name in OPT_IN_TARGETS:
        if name in medians and "labelgw" in medians:
            # What the access log costs: the default (common, to a file) against this variant.
            print(f"labelgw/{name:<18} req/s x{medians['labelgw']['requests_per_s'] / medians[name]['requests_per_s']:.3f}")
    if "labelgw-log-common" in medians and "labelgw-log-off" in medians:
        ratio = medians["labelgw-log-common"]["requests_per_s"] / medians["labelgw-log-off"]["requests_per_s"]
        print(f"labelgw-log-common/labelgw-log-off req/s x{ratio:.3f}")
    if not found:
        print("ratios labelgw/other: n/a (labelgw " + ("skipped)" if "labelgw" in skipped else "not run)"))
        return
    for base, r in found.items():
        print(
            f"labelgw/{base:<12} req/s x{r['requests_per_s']:.3f}   p50 x{r['p50_ms']:.2f}   p99 x{r['p99_ms']:.2f}"
            f"   cpu/req x{r['cpu_us_per_request']:.2f}"
        )


def _versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as error:
            return str(error)
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else ""

    import twisted

    return {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "nginx": first_line([NGINX, "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "cpus": str(os.cpu_count()),
    }


@dataclass
class Target:
    name: str
    port: int
    server: Managed | None  # None: the backend itself


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def bench(args: argparse.Namespace) -> dict[str, object]:
    wanted = [name for name in (*TARGET_ORDER, *OPT_IN_TARGETS) if name in args.targets]
    missing = [tool for tool in (NGINX, "wrk") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install nginx-light wrk")
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-bench-"))
    prefix.chmod(0o755)  # nginx workers run as nobody
    backend_port = free_port()
    backend = nginx_backend(prefix, backend_port)
    builders = {"nginx-proxy": nginx_proxy, "twisted-rpr": twisted_rpr, "labelgw": labelgw}
    builders["labelgw-nometrics"] = labelgw_nometrics
    builders["labelgw-bare"] = labelgw_bare
    for log_format in ("off", "json", "common"):
        builders[f"labelgw-log-{log_format}"] = (
            lambda prefix, port, backend_port, log_format=log_format: labelgw(prefix, port, backend_port, log_format)
        )
    builders["labelgw-mw"] = labelgw_mw
    started: list[Managed] = []
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    results: dict[str, list[WrkResult]] = {}
    try:
        backend.start()
        started.append(backend)
        problem = wait_ready(backend, backend_port)
        if problem:
            raise SystemExit(f"backend nginx {problem}:\n{backend.log_tail()}")
        for name in wanted:
            if name == "direct":
                targets.append(Target(name, backend_port, None))
                continue
            port = free_port()
            server = builders[name](prefix, port, backend_port)
            server.start()
            started.append(server)
            problem = wait_ready(server, port)
            if problem:
                tail = server.log_tail(5)
                skipped[name] = problem
                print(f"skipping {name}: {problem}" + ("\n  log: " + tail.replace("\n", "\n  ") if tail else ""))
                server.stop()
                continue
            targets.append(Target(name, port, server))
            if name.startswith("labelgw"):
                print(f"{name}: labelgw.http.linekind {linekind_build(server.log_path.read_text(errors='replace'))}")
        per_target_s = args.warmup + args.duration
        print(
            f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
            f"-H 'Host: {HOST_HEADER}'; warm-up {args.warmup:g}s; {args.rounds} round(s); "
            f"about {len(targets) * args.rounds * per_target_s:.0f} s; load average {os.getloadavg()[0]:.2f}"
        )
        for round_index in range(args.rounds):
            # Every other round in reverse order (as bench/ab.py does): a target always loaded first, or always
            # right after a given other, would carry that position's share of the machine's drift in every round.
            for target in targets if round_index % 2 == 0 else targets[::-1]:
                if target.server is not None and target.server.exited() is not None:
                    raise RuntimeError(f"{target.name} exited during the run:\n{target.server.log_tail()}")
                if args.warmup > 0:
                    run_wrk(target.port, args.warmup, args.connections, args.threads)
                # The backend's own CPU counts for "direct" only: there it is the server under test.
                session = (target.server or backend).process.pid  # type: ignore[union-attr]
                cpu_before = session_cpu_s(session)
                result = run_wrk(target.port, args.duration, args.connections, args.threads)
                cpu_used = session_cpu_s(session) - cpu_before
                if result.requests:
                    result = replace(result, cpu_us_per_request=cpu_used / result.requests * 1e6)
                results.setdefault(target.name, []).append(result)
                print(
                    f"  round {round_index + 1} {target.name:<12} {result.requests_per_s:>10.0f} req/s  "
                    f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  errors {result.errors}  "
                    f"cpu {result.cpu_us_per_request:.1f} us/req"
                )
    finally:
        for server in reversed(started):
            server.stop()
        if args.keep_logs:
            print(f"logs and configurations kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)
    medians = {name: median_result(runs) for name, runs in results.items()}
    print_table(medians, skipped, args.rounds)
    return {
        "command": [sys.executable, *sys.argv],
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "threads": args.threads,
        "rounds": args.rounds,
        "versions": _versions(),
        "targets": {
            name: {"median": medians[name], "rounds": [asdict(r) | {"errors": r.errors} for r in results[name]]}
            for name in medians
        },
        "skipped": skipped,
        "ratios_labelgw_to": ratios(medians),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # wrk takes whole seconds only.
    parser.add_argument("--duration", type=int, default=10, help="seconds of measured load per target and round")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each run (0: none)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are quoted")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma list among " + ", ".join(TARGET_ORDER) + " (default: " + ", ".join(DEFAULT_TARGETS) + ")",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configurations and logs")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGET_ORDER) - set(OPT_IN_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.duration <= 0 or args.duration > 300 or args.rounds < 1 or args.rounds > 20 or args.warmup < 0:
        parser.error("--duration must be in (0, 300], --rounds in [1, 20], --warmup >= 0")
    if args.connections < args.threads or args.threads < 1:
        parser.error("--connections must be at least --threads, which must be at least 1")
    return args


def run_bench(bench: Callable[[argparse.Namespace], dict[str, object]], args: argparse.Namespace) -> int:
    """What every bench script's main does: run, stop everything on Ctrl-C or SIGTERM, write --json."""
    # Progress lines appear as they happen, also when the output goes to a file.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    try:
        report = bench(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
