#!/usr/bin/env python3
"""Issue 4's benchmark: what TLS termination costs in labelgw, next to nginx with the same certificate.

One run, loopback only, bounded in time. It starts:
  backend      nginx (1 worker, `return 200 "hello\\n"`), shared by both proxies
  nginx-tls    nginx terminating TLS (1 worker, HTTP/2 by ALPN, ssl_protocols TLSv1.2 TLSv1.3, the same ECDHE/AEAD
               cipher list, groups X25519:P-256:P-384, no session cache or tickets) and proxying with upstream
               keepalive 64
  labelgw      twistd -n --pidfile= labelgw --https tcp:P:interface=127.0.0.1 --state-dir S --cert-dir C
               --config cfg.yaml (a static service `bench`, hosts [bench.localhost], docker: false)
Both serve one certificate: a leaf (EC P-256) that labelgw's local CA mints for bench.localhost and 127.0.0.1,
given to labelgw as the cert dir's default.pem and to nginx as its certificate files; the script checks that
both really serve it (with and without SNI) before measuring.

Then, per target and round (targets interleaved):
  handshakes   `openssl s_time -connect 127.0.0.1:P -new -time T` (full handshakes, no resumption, no request),
               --handshake-clients processes at once, for TLS 1.3 and TLS 1.2 (ECDHE-ECDSA-AES128-GCM-SHA256)
  keep-alive   `wrk -t1 -cC -dDs --latency -H 'Host: bench.localhost' https://127.0.0.1:P/` after a warm-up
  protocols    `h2load --h1 -cC -m1` (HTTP/1.1), `h2load -c10 -m10` (HTTP/2, several streams per connection) and
               `h2load -cC -m1` (HTTP/2, one stream at a time, as many connections as HTTP/1.1), all over TLS (ALPN checked),
               `--warm-up-time W -D D`, to https://bench.localhost/ with --connect-to 127.0.0.1:P; the server's CPU
               (user + system of its session, /proc) is read when h2load's main duration starts and ends
and prints handshakes/s, req/s, p50/p99 and errors per target, with labelgw's ratios to nginx, then req/s and CPU
µs per request over HTTP/1.1 and HTTP/2 and the ratios HTTP/2 CPU / HTTP/1.1 CPU. For reference, the same wrk load
is also sent to labelgw's plain --http port (what TLS costs labelgw itself). `--parts` picks among handshakes,
keepalive, protocols; `--targets` among nginx-tls, labelgw (the stdlib TLS engine), labelgw-openssl (`--tls-engine
openssl`: Twisted's pyOpenSSL layer, the engine before issue 12); `--base REV` adds labelgw-base, labelgw run from that
git revision of this repository (`git archive`), for a before/after in one run. With the handshakes, each target's CPU
per handshake (user + system of its session, /proc) is reported: the figure a shared machine moves least.

    .venv/bin/python bench/bench_tls.py [--duration 10] [--handshake-time 5] [--connections 50] [--rounds 1]
    .venv/bin/python bench/bench_tls.py --parts protocols --targets labelgw --rounds 3 --duration 5

Needs Debian's nginx (nginx-light), wrk, openssl and h2load (nghttp2-client). Everything it starts, it stops (also
on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# The plain-HTTP benchmark's process handling, wrk parsing and nginx configuration are shared.
from bench_proxy import (  # noqa: E402
    HOST_HEADER,
    NGINX,
    REPO,
    Managed,
    WrkResult,
    _nginx_conf,
    free_port,
    labelgw_server,
    nginx_backend,
    nginx_proxy_server,
    parse_wrk,
    run_bench,
    run_wrk,
    session_cpu_s,
    wait_ready,
    wait_until,
)

from cryptography.hazmat.primitives import serialization  # noqa: E402

from labelgw.tls.ca import LocalCA  # noqa: E402
from labelgw.tls.policy import GROUPS, TLS12_CIPHERS  # noqa: E402

# labelgw on its default TLS engine (the standard library's ssl) and on Twisted's pyOpenSSL layer (--tls-engine
# openssl, the engine before issue 12): one run gives the before/after side by side.
TARGETS = ("nginx-tls", "labelgw", "labelgw-openssl", "labelgw-base")
LABELGW_TARGETS = {"labelgw": "stdlib", "labelgw-openssl": "openssl"}
# `--base REV`: labelgw (its default engine) from a git revision of this repository, next to this tree's: a
# before/after in one run.
BASE_TARGET = "labelgw-base"
READY_TIMEOUT_S = 20.0
TLS12_BENCH_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"
# OpenSSL's names for the groups labelgw configures (nginx passes them to OpenSSL as they are).
NGINX_GROUPS = GROUPS.replace("P-256", "prime256v1").replace("P-384", "secp384r1")


# -- servers ------------------------------------------------------------------------------------------------------


def nginx_tls(prefix: Path, port: int, backend_port: int, cert: Path, key: Path) -> Managed:
    tls = f"""
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_ecdh_curve {NGINX_GROUPS};
        # No sessions: s_time -new makes full handshakes anyway (labelgw's stdlib engine issues one TLS 1.3
        # ticket per handshake, which its figure pays for).
        ssl_session_cache off;
        ssl_session_tickets off;"""
    conf = _nginx_conf(prefix, "nginx-tls", nginx_proxy_server(f"127.0.0.1:{port} ssl http2", backend_port, tls))
    return Managed(
        "nginx-tls",
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-tls-error.log")],
        prefix / "nginx-tls.log",
    )


def labelgw_tls(
    prefix: Path,
    http_port: int,
    https_port: int,
    backend_port: int,
    state: Path,
    certs: Path,
    tree: Path = REPO,
    python: str = sys.executable,
    engine: str | None = None,
) -> Managed:
    """labelgw (from the source tree `tree`) with a plain HTTP and an HTTPS listener, serving certs/default.pem;
    C{engine}: its --tls-engine (None: the default, and no option for trees that predate it)."""
    return labelgw_server(
        prefix,
        backend_port,
        [
            "--http", f"tcp:{http_port}:interface=127.0.0.1",
            "--https", f"tcp:{https_port}:interface=127.0.0.1",
            "--state-dir", str(state),
            "--cert-dir", str(certs),
            "--admin", "none",
            *(["--tls-engine", engine] if engine else []),
        ],
        tree=tree,
        python=python,
    )


def mint_bench_certificate(state: Path, certs: Path, prefix: Path) -> tuple[Path, Path, bytes]:
    """A leaf from labelgw's own CA, as labelgw's default.pem and as nginx's files; returns its DER."""
    ca = LocalCA.load_or_create(state)
    leaf = ca.issue_leaf([HOST_HEADER, "127.0.0.1"], datetime.now(UTC))
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "default.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    cert, key = prefix / "bench-cert.pem", prefix / "bench-key.pem"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    key.chmod(0o600)
    return cert, key, leaf.certificate.public_bytes(serialization.Encoding.DER)


def served_certificate(port: int, server_name: str | None, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    if server_name is None:
        context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            return der or b""


def https_ready(server: Managed, port: int, cafile: Path, expected_der: bytes) -> str | None:
    """None once GET / over verified TLS answers 200 and the bench certificate is served with and without SNI."""

    def serves_the_bench_certificate() -> str | None:
        context = ssl.create_default_context(cafile=str(cafile))
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
            with context.wrap_socket(raw, server_hostname=HOST_HEADER) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST_HEADER}\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := tls.recv(4096):
                    answer += chunk
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else b"?"
        same = [served_certificate(port, name, cafile) == expected_der for name in (HOST_HEADER, None)]
        if status == b"200" and all(same):
            return None
        return f"status {status.decode()}, bench certificate served (SNI, no SNI): {same}"

    return wait_until(server, serves_the_bench_certificate, READY_TIMEOUT_S)


# -- load ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeResult:
    per_s: float
    connections: int
    wall_s: float
    # The server's CPU (user + system of its session) per handshake: the figure a shared machine moves least.
    cpu_us_per_handshake: float = float("nan")


def run_s_time(port: int, seconds: int, clients: int, tls12: bool, cpu_session: int | None = None) -> HandshakeResult:
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds)]
    if tls12:
        argv += ["-tls1_2", "-cipher", TLS12_BENCH_CIPHER]
    cpu_before = session_cpu_s(cpu_session) if cpu_session is not None else 0.0
    started = time.monotonic()
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        for _ in range(clients)
    ]
    total = 0
    for process in processes:
        try:
            output, _ = process.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        match = re.search(r"^(\d+) connections in [0-9.]+s;", output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"openssl s_time: unexpected output:\n{output}")
        total += int(match.group(1))
    wall = time.monotonic() - started
    cpu = (session_cpu_s(cpu_session) - cpu_before) / total * 1e6 if cpu_session is not None and total else float("nan")
    return HandshakeResult(total / wall, total, wall, cpu)


def run_wrk_https(port: int, duration_s: int, connections: int) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-H", f"Host: {HOST_HEADER}",
            f"https://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


@dataclass(frozen=True)
class H2loadResult:
    """Figures of one `h2load` run (its main duration; the warm-up is not counted)."""

    protocol: str  # what ALPN chose: "h2" or "http/1.1" ("" if h2load did not say)
    requests_per_s: float  # h2load's: 2xx answers in the main duration / its length
    finished_s: float  # the whole run, warm-up included
    done: int  # requests with a complete answer, whatever the status
    succeeded: int  # ... with a 2xx status
    failed: int  # not succeeded: other statuses, stream errors, timeouts (h2load counts all of them here)
    timeouts: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    # CPU time (user + system) of the server's session per completed request; NaN when not measured.
    cpu_us_per_request: float = float("nan")

    @property
    def requests(self) -> int:
        return self.done

    @property
    def errors(self) -> int:
        return self.failed


_H2LOAD_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_h2load(output: str) -> H2loadResult:
    """Figures from h2load's summary (nghttp2 1.4x-1.5x output)."""
    finished = re.search(r"^finished in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+) req/s", output, re.MULTILINE)
    requests = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        output,
        re.MULTILINE,
    )
    statuses = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output, re.MULTILINE)
    if not (finished and requests and statuses):
        raise ValueError("h2load output without its summary (finished in, requests, status codes):\n" + output)
    protocol = re.search(r"^Application protocol: (\S+)", output, re.MULTILINE)
    _total, _started, done, succeeded, failed, _errored, timeouts = (int(n) for n in requests.groups())
    s2, s3, s4, s5 = (int(n) for n in statuses.groups())
    return H2loadResult(
        protocol=protocol.group(1) if protocol else "",
        requests_per_s=float(finished.group(3)),
        finished_s=float(finished.group(1)) * _H2LOAD_UNITS_S[finished.group(2)],
        done=done,
        succeeded=succeeded,
        failed=failed,
        timeouts=timeouts,
        status_2xx=s2,
        status_3xx=s3,
        status_4xx=s4,
        status_5xx=s5,
    )


def h2load_phase(line: str) -> str | None:
    """"main" when h2load's line says its measured phase started, "over" when it ended, else None. h2load flushes
    these lines as they happen, so the server's CPU can be read at both instants: warm-up and connection set-up
    stay out of the figure."""
    if line.startswith("Main benchmark duration is started"):
        return "main"
    if line.startswith("Main benchmark duration is over"):
        return "over"
    return None


def h2load_argv(port: int, duration_s: int, warmup_s: int, clients: int, streams: int, h1: bool) -> list[str]:
    """h2load over TLS to 127.0.0.1:port, with SNI and :authority (Host) bench.localhost; one thread."""
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(duration_s)]
    if warmup_s:
        argv.append(f"--warm-up-time={warmup_s}")
    if h1:
        argv.append("--h1")
    # The URI's host gives the TLS server name and :authority; --connect-to keeps the traffic on loopback.
    return argv + ["--connect-to", f"127.0.0.1:{port}", f"https://{HOST_HEADER}/"]


def run_h2load(argv: Sequence[str], duration_s: int, warmup_s: int, cpu_session: int | None = None) -> H2loadResult:
    """Run h2load; with `cpu_session`, the CPU that session spent in h2load's main duration, per completed
    request (the whole run's, if h2load did not mark its phases)."""
    process = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(duration_s + warmup_s + 30, process.kill)
    watchdog.start()
    lines: list[str] = []
    cpu_start = cpu_end = None
    try:
        if cpu_session is not None:
            cpu_start = session_cpu_s(cpu_session)
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            phase = h2load_phase(line)
            if cpu_session is not None and phase == "main":
                cpu_start = session_cpu_s(cpu_session)
            elif cpu_session is not None and phase == "over":
                cpu_end = session_cpu_s(cpu_session)
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if cpu_session is not None and cpu_end is None:
        cpu_end = session_cpu_s(cpu_session)
    output = "".join(lines)
    if code != 0:
        raise RuntimeError(f"h2load failed ({code}): {output.strip()[-2000:]}")
    result = parse_h2load(output)
    if cpu_start is not None and cpu_end is not None and result.done:
        result = replace(result, cpu_us_per_request=(cpu_end - cpu_start) / result.done * 1e6)
    return result


# -- report ------------------------------------------------------------------------------------------------------

PARTS = ("handshakes", "keepalive", "protocols")

# Summary figure: (the round's measurement, its attribute). A round holds only the parts that were run.
METRICS = {
    "handshakes_tls13_per_s": ("tls13", "per_s"),
    "handshakes_tls12_per_s": ("tls12", "per_s"),
    "handshake_tls13_cpu_us": ("tls13", "cpu_us_per_handshake"),
    "handshake_tls12_cpu_us": ("tls12", "cpu_us_per_handshake"),
    "keepalive_req_per_s": ("wrk", "requests_per_s"),
    "p50_ms": ("wrk", "p50_ms"),
    "p99_ms": ("wrk", "p99_ms"),
    "h1_req_per_s": ("h1", "requests_per_s"),
    "h1_cpu_us_per_request": ("h1", "cpu_us_per_request"),
    "h2_req_per_s": ("h2", "requests_per_s"),
    "h2_cpu_us_per_request": ("h2", "cpu_us_per_request"),
    "h2m1_req_per_s": ("h2m1", "requests_per_s"),
    "h2m1_cpu_us_per_request": ("h2m1", "cpu_us_per_request"),
}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rounds: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, float]]:
    """Per target, the median over rounds of every figure measured, and the errors summed."""
    summary: dict[str, dict[str, float]] = {}
    for target, results in rounds.items():
        if not results:
            continue
        figures: dict[str, float] = {}
        for key, (part, attribute) in METRICS.items():
            values = [getattr(r[part], attribute) for r in results if part in r]
            if values:
                figures[key] = _median(values)
        for part in ("wrk", "h1", "h2", "h2m1"):
            if any(part in r for r in results):
                prefix = "" if part == "wrk" else f"{part}_"
                errors = sum(r[part].errors for r in results if part in r)  # type: ignore[attr-defined]
                figures[f"{prefix}errors"] = float(errors)
        for h2 in ("h2", "h2m1"):
            if "h1_cpu_us_per_request" in figures and f"{h2}_cpu_us_per_request" in figures:
                figures[f"{h2}_to_h1_cpu"] = (
                    figures[f"{h2}_cpu_us_per_request"] / figures["h1_cpu_us_per_request"]
                    if figures["h1_cpu_us_per_request"]
                    else float("nan")
                )
        summary[target] = figures
    return summary


def _get(figures: dict[str, float], key: str) -> float:
    return figures.get(key, float("nan"))


def print_report(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> dict[str, float]:
    rounds = f" (medians of {args.rounds} rounds)" if args.rounds > 1 else ""
    ratios: dict[str, float] = {}
    if "handshakes" in args.parts or "keepalive" in args.parts:
        print(f"\nTLS termination, loopback, {args.handshake_clients} s_time clients x {args.handshake_time} s, "
              f"wrk -t1 -c{args.connections} -d{args.duration}s{rounds}")
        header = (f"{'target':<16} {'TLS1.3 hs/s':>12} {'us/hs':>6} {'TLS1.2 hs/s':>12} {'us/hs':>6} "
                  f"{'keep-alive req/s':>17} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        print(header)
        print("-" * len(header))
        for target in TARGETS:
            if target not in summary:
                continue
            s = summary[target]
            print(f"{target:<16} {_get(s, 'handshakes_tls13_per_s'):>12.0f} {_get(s, 'handshake_tls13_cpu_us'):>6.0f} "
                  f"{_get(s, 'handshakes_tls12_per_s'):>12.0f} {_get(s, 'handshake_tls12_cpu_us'):>6.0f} "
                  f"{_get(s, 'keepalive_req_per_s'):>17.0f} {_get(s, 'p50_ms'):>8.2f} {_get(s, 'p99_ms'):>8.2f} "
                  f"{_get(s, 'errors'):>7.0f}")
    for ours_name in (*LABELGW_TARGETS, BASE_TARGET):
        if ours_name not in summary or "nginx-tls" not in summary:
            continue
        ours, theirs = summary[ours_name], summary["nginx-tls"]
        these: dict[str, float] = {}
        for key in ("handshakes_tls13_per_s", "handshakes_tls12_per_s", "handshake_tls13_cpu_us",
                    "handshake_tls12_cpu_us", "keepalive_req_per_s", "p50_ms", "p99_ms",
                    "h1_req_per_s", "h2_req_per_s", "h1_cpu_us_per_request", "h2_cpu_us_per_request"):
            if key in ours and key in theirs:
                these[key] = ours[key] / theirs[key] if theirs[key] else float("nan")
        # The default engine's ratios keep their names; the other's are prefixed with its target.
        ratios |= these if ours_name == "labelgw" else {f"{ours_name}:{k}": v for k, v in these.items()}
        if "keepalive_req_per_s" in these or "handshakes_tls13_per_s" in these:
            print(f"\n{ours_name} / nginx-tls: "
                  f"TLS 1.3 handshakes {_get(these, 'handshakes_tls13_per_s'):.2f}x, "
                  f"TLS 1.2 handshakes {_get(these, 'handshakes_tls12_per_s'):.2f}x, "
                  f"server CPU per handshake {_get(these, 'handshake_tls13_cpu_us'):.2f}x (1.3) "
                  f"{_get(these, 'handshake_tls12_cpu_us'):.2f}x (1.2), "
                  f"keep-alive req/s {_get(these, 'keepalive_req_per_s'):.2f}x, "
                  f"p50 {_get(these, 'p50_ms'):.2f}x, p99 {_get(these, 'p99_ms'):.2f}x  (req/s, hs/s: higher is better)")
    if "protocols" in args.parts:
        print(f"\nHTTP/1.1 and HTTP/2 over TLS, h2load -t1: HTTP/1.1 --h1 -c{args.connections} -m1, "
              f"HTTP/2 -c{args.h2_clients} -m{args.h2_streams} and -c{args.connections} -m1; {args.warmup} s warm-up + "
              f"{args.duration} s{rounds}; cpu = the server's user + system time per request")
        header = (f"{'target':<16} {'h1 req/s':>9} {'h1 cpu':>7} {'h2 req/s':>9} {'h2 cpu':>7} {'h2m1 req/s':>11} "
                  f"{'h2m1 cpu':>9} {'errors':>7} {'h2/h1 cpu':>10} {'h2m1/h1 cpu':>12}")
        print(header + "   (cpu: us/request)")
        print("-" * len(header))
        for target in TARGETS:
            if target not in summary:
                continue
            s = summary[target]
            errors = _get(s, 'h1_errors') + _get(s, 'h2_errors') + s.get('h2m1_errors', 0.0)
            print(f"{target:<16} {_get(s, 'h1_req_per_s'):>9.0f} {_get(s, 'h1_cpu_us_per_request'):>7.1f} "
                  f"{_get(s, 'h2_req_per_s'):>9.0f} {_get(s, 'h2_cpu_us_per_request'):>7.1f} "
                  f"{_get(s, 'h2m1_req_per_s'):>11.0f} {_get(s, 'h2m1_cpu_us_per_request'):>9.1f} "
                  f"{errors:>7.0f} {_get(s, 'h2_to_h1_cpu'):>9.2f}x {_get(s, 'h2m1_to_h1_cpu'):>11.2f}x")
    return ratios


# -- main -------------------------------------------------------------------------------------------------------


def run_protocols(port: int, session: int, args: argparse.Namespace) -> dict[str, H2loadResult]:
    """HTTP/1.1 then HTTP/2 over TLS with h2load, the CPU of `session` per request; checks ALPN chose each."""
    found: dict[str, H2loadResult] = {}
    loads = (
        ("h1", True, args.connections, 1),
        ("h2", False, args.h2_clients, args.h2_streams),
        # One stream at a time on as many connections as HTTP/1.1: what HTTP/2 costs without multiplexing.
        ("h2m1", False, args.connections, 1),
    )
    for part, h1, clients, streams in loads:
        argv = h2load_argv(port, args.duration, args.warmup, clients, streams, h1)
        result = run_h2load(argv, args.duration, args.warmup, cpu_session=session)
        wanted = "http/1.1" if h1 else "h2"
        if result.protocol != wanted:
            raise RuntimeError(f"{' '.join(argv)}: ALPN chose {result.protocol or 'nothing'}, not {wanted}")
        found[part] = result
    return found


def bench(args: argparse.Namespace) -> dict[str, object]:
    if "protocols" in args.parts and not shutil.which("h2load"):
        raise SystemExit("missing h2load: apt-get install nghttp2-client")
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-bench-tls-"))
    prefix.chmod(0o755)  # nginx workers run as nobody
    state, certs = prefix / "state", prefix / "certs"
    cert, key, der = mint_bench_certificate(state, certs, prefix)
    cafile = state / "ca.pem"
    backend_port, nginx_port = free_port(), free_port()
    backend = nginx_backend(prefix, backend_port)
    servers = {"nginx-tls": (nginx_tls(prefix, nginx_port, backend_port, cert, key), nginx_port)}
    plain_ports: dict[str, int] = {}
    for target, engine in LABELGW_TARGETS.items():
        lg_http, lg_https = free_port(), free_port()
        run_dir = prefix / target
        run_dir.mkdir()
        plain_ports[target] = lg_http
        servers[target] = (labelgw_tls(run_dir, lg_http, lg_https, backend_port, state, certs, engine=engine), lg_https)
    if args.base:
        tree = prefix / "base-tree"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base], capture_output=True, check=True)
        subprocess.run(["tar", "x", "-C", str(tree)], input=archive.stdout, check=True)
        run_dir = prefix / BASE_TARGET
        run_dir.mkdir()
        lg_http, lg_https = free_port(), free_port()
        plain_ports[BASE_TARGET] = lg_http
        servers[BASE_TARGET] = (labelgw_tls(run_dir, lg_http, lg_https, backend_port, state, certs, tree=tree), lg_https)
        if BASE_TARGET not in args.targets:
            args.targets.append(BASE_TARGET)
    servers = {name: servers[name] for name in args.targets}
    started: list[Managed] = []
    results: dict[str, list[dict[str, object]]] = {target: [] for target in servers}
    plain: list[WrkResult] = []
    try:
        backend.start()
        started.append(backend)
        problem = wait_ready(backend, backend_port)
        if problem:
            raise SystemExit(f"backend: {problem}\n{backend.log_tail()}")
        for name, (server, port) in servers.items():
            server.start()
            started.append(server)
            problem = https_ready(server, port, cafile, der)
            if problem:
                raise SystemExit(f"{name}: {problem}\n{server.log_tail()}")
        print(f"the targets serve the same certificate (bench.localhost, 127.0.0.1) from {cafile}")
        for round_index in range(args.rounds):
            order = tuple(servers) if round_index % 2 == 0 else tuple(reversed(tuple(servers)))
            for name in order:
                server, port = servers[name]
                measured: dict[str, object] = {}
                line = f"round {round_index + 1} {name:<16}"
                if "handshakes" in args.parts:
                    assert server.process is not None
                    session = server.process.pid
                    tls13 = run_s_time(port, args.handshake_time, args.handshake_clients, False, session)
                    tls12 = run_s_time(port, args.handshake_time, args.handshake_clients, True, session)
                    measured |= {"tls13": tls13, "tls12": tls12}
                    line += (f" TLS1.3 {tls13.per_s:7.0f} hs/s {tls13.cpu_us_per_handshake:5.0f} us/hs  "
                             f"TLS1.2 {tls12.per_s:7.0f} hs/s {tls12.cpu_us_per_handshake:5.0f} us/hs ")
                if "keepalive" in args.parts:
                    if args.warmup:
                        run_wrk_https(port, args.warmup, args.connections)
                    wrk = run_wrk_https(port, args.duration, args.connections)
                    measured["wrk"] = wrk
                    if name == "labelgw":
                        plain.append(run_wrk(plain_ports[name], args.duration, args.connections, 1))
                    line += (f" keep-alive {wrk.requests_per_s:8.0f} req/s  p50 {wrk.p50_ms:.2f} ms  "
                             f"p99 {wrk.p99_ms:.2f} ms  errors {wrk.errors} ")
                if "protocols" in args.parts:
                    assert server.process is not None
                    protocols = run_protocols(port, server.process.pid, args)
                    measured |= protocols
                    h1, h2, h2m1 = protocols["h1"], protocols["h2"], protocols["h2m1"]
                    line += (f" h1 {h1.requests_per_s:7.0f} req/s {h1.cpu_us_per_request:5.1f} us/req  "
                             f"h2 {h2.requests_per_s:7.0f} req/s {h2.cpu_us_per_request:5.1f} us/req  "
                             f"h2 -m1 {h2m1.requests_per_s:7.0f} req/s {h2m1.cpu_us_per_request:5.1f} us/req  "
                             f"errors {h1.errors + h2.errors + h2m1.errors}")
                results[name].append(measured)
                print(line.rstrip(), flush=True)
    finally:
        for server in reversed(started):
            server.stop()
        if not args.keep_logs:
            shutil.rmtree(prefix, ignore_errors=True)
        else:
            print(f"logs and configurations kept in {prefix}")
    summary = summarize(results)
    ratios = print_report(summary, args)
    if plain and "keepalive_req_per_s" in summary.get("labelgw", {}):
        plain_rate = _median([r.requests_per_s for r in plain])
        tls_rate = summary["labelgw"]["keepalive_req_per_s"]
        print(f"labelgw plain HTTP (same load, reference): {plain_rate:.0f} req/s; "
              f"over TLS it keeps {tls_rate / plain_rate:.2f}x of that")
        summary["labelgw-plain-http"] = {"keepalive_req_per_s": plain_rate}
    return {
        "summary": summary,
        "ratios": ratios,
        "rounds": {t: [{k: asdict(v) for k, v in r.items()} for r in rs] for t, rs in results.items()},  # type: ignore[call-overload]
        "settings": vars(args),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds of keep-alive load per target and round")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of keep-alive warm-up (0: none)")
    parser.add_argument("--handshake-time", type=int, default=5, help="seconds of s_time per TLS version")
    parser.add_argument("--handshake-clients", type=int, default=2, help="s_time processes at once")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections; h2load --h1 connections")
    parser.add_argument("--h2-clients", type=int, default=10, help="h2load HTTP/2 connections (-c)")
    parser.add_argument("--h2-streams", type=int, default=10, help="h2load concurrent streams per connection (-m)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list among " + ", ".join(PARTS))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list among " + ", ".join(TARGETS))
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")
    parser.add_argument("--base", metavar="REV", help="also run labelgw from this git revision (target labelgw-base)")
    args = parser.parse_args(argv)
    for name in ("duration", "handshake_time", "handshake_clients", "connections", "h2_clients", "h2_streams",
                 "rounds"):
        if not 0 < getattr(args, name) <= 600:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 600")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be between 0 and 60")
    for option, known in (("parts", PARTS), ("targets", TARGETS)):
        chosen = [item.strip() for item in getattr(args, option).split(",") if item.strip()]
        unknown = set(chosen) - set(known)
        if unknown or not chosen:
            parser.error(f"--{option}: choose among {', '.join(known)}")
        setattr(args, option, [item for item in known if item in chosen])
    if BASE_TARGET in args.targets and not args.base:
        parser.error(f"--targets {BASE_TARGET} needs --base REV")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
