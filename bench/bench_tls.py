#!/usr/bin/env python3
"""Issue 4's benchmark: what TLS termination costs in labelgw, next to nginx with the same certificate.

One run, loopback only, bounded in time. It starts:
  backend      nginx (1 worker, `return 200 "hello\\n"`), shared by both proxies
  nginx-tls    nginx terminating TLS (1 worker, ssl_protocols TLSv1.2 TLSv1.3, the same ECDHE/AEAD cipher list,
               groups X25519:P-256:P-384, no session cache or tickets) and proxying with upstream keepalive 64
  labelgw      twistd -n --pidfile= labelgw --https tcp:P:interface=127.0.0.1 --state-dir S --cert-dir C
               --config cfg.yaml (a static service `bench`, hosts [bench.localhost], docker: false)
Both serve one certificate: a leaf (EC P-256) that labelgw's local CA mints for bench.localhost and 127.0.0.1,
given to labelgw as the cert dir's default.pem and to nginx as its certificate files; the script checks that
both really serve it (with and without SNI) before measuring.

Then, per target and round (targets interleaved):
  handshakes   `openssl s_time -connect 127.0.0.1:P -new -time T` (full handshakes, no resumption, no request),
               --handshake-clients processes at once, for TLS 1.3 and TLS 1.2 (ECDHE-ECDSA-AES128-GCM-SHA256)
  keep-alive   `wrk -t1 -cC -dDs --latency -H 'Host: bench.localhost' https://127.0.0.1:P/` after a warm-up
and prints handshakes/s, req/s, p50/p99 and errors per target, with labelgw's ratios to nginx. For reference,
the same wrk load is also sent to labelgw's plain --http port (what TLS costs labelgw itself).

    .venv/bin/python bench/bench_tls.py [--duration 10] [--handshake-time 5] [--connections 50] [--rounds 1]

Needs Debian's nginx (nginx-light), wrk and openssl. Everything it starts, it stops (also on Ctrl-C or SIGTERM).
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
import time
from dataclasses import asdict, dataclass
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
    wait_ready,
    wait_until,
)

from cryptography.hazmat.primitives import serialization  # noqa: E402

from labelgw.tls.ca import LocalCA  # noqa: E402
from labelgw.tls.policy import GROUPS, TLS12_CIPHERS  # noqa: E402

TARGETS = ("nginx-tls", "labelgw")
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
        # labelgw keeps no sessions (no cache, no tickets): the same here, so every new connection is a full
        # handshake on both.
        ssl_session_cache off;
        ssl_session_tickets off;"""
    conf = _nginx_conf(prefix, "nginx-tls", nginx_proxy_server(f"127.0.0.1:{port} ssl", backend_port, tls))
    return Managed(
        "nginx-tls",
        [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "nginx-tls-error.log")],
        prefix / "nginx-tls.log",
    )


def labelgw_tls(prefix: Path, http_port: int, https_port: int, backend_port: int, state: Path, certs: Path) -> Managed:
    return labelgw_server(
        prefix,
        backend_port,
        [
            "--http", f"tcp:{http_port}:interface=127.0.0.1",
            "--https", f"tcp:{https_port}:interface=127.0.0.1",
            "--state-dir", str(state),
            "--cert-dir", str(certs),
            "--admin", "none",
        ],
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


def run_s_time(port: int, seconds: int, clients: int, tls12: bool) -> HandshakeResult:
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(seconds)]
    if tls12:
        argv += ["-tls1_2", "-cipher", TLS12_BENCH_CIPHER]
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
    return HandshakeResult(total / wall, total, wall)


def run_wrk_https(port: int, duration_s: int, connections: int) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-H", f"Host: {HOST_HEADER}",
            f"https://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- report ------------------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rounds: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for target, results in rounds.items():
        summary[target] = {
            "handshakes_tls13_per_s": _median([r["tls13"].per_s for r in results]),  # type: ignore[attr-defined]
            "handshakes_tls12_per_s": _median([r["tls12"].per_s for r in results]),  # type: ignore[attr-defined]
            "keepalive_req_per_s": _median([r["wrk"].requests_per_s for r in results]),  # type: ignore[attr-defined]
            "p50_ms": _median([r["wrk"].p50_ms for r in results]),  # type: ignore[attr-defined]
            "p99_ms": _median([r["wrk"].p99_ms for r in results]),  # type: ignore[attr-defined]
            "errors": float(sum(r["wrk"].errors for r in results)),  # type: ignore[attr-defined]
        }
    return summary


def print_report(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> dict[str, float]:
    rounds = f" (medians of {args.rounds} rounds)" if args.rounds > 1 else ""
    print(f"\nTLS termination, loopback, {args.handshake_clients} s_time clients x {args.handshake_time} s, "
          f"wrk -t1 -c{args.connections} -d{args.duration}s{rounds}")
    header = f"{'target':<10} {'TLS1.3 hs/s':>12} {'TLS1.2 hs/s':>12} {'keep-alive req/s':>17} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    print(header)
    print("-" * len(header))
    for target in TARGETS:
        if target not in summary:
            continue
        s = summary[target]
        print(f"{target:<10} {s['handshakes_tls13_per_s']:>12.0f} {s['handshakes_tls12_per_s']:>12.0f} "
              f"{s['keepalive_req_per_s']:>17.0f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['errors']:>7.0f}")
    ratios: dict[str, float] = {}
    if "labelgw" in summary and "nginx-tls" in summary:
        ours, theirs = summary["labelgw"], summary["nginx-tls"]
        for key in ("handshakes_tls13_per_s", "handshakes_tls12_per_s", "keepalive_req_per_s", "p50_ms", "p99_ms"):
            ratios[key] = ours[key] / theirs[key] if theirs[key] else float("nan")
        print("\nlabelgw / nginx-tls: "
              f"TLS 1.3 handshakes {ratios['handshakes_tls13_per_s']:.2f}x, "
              f"TLS 1.2 handshakes {ratios['handshakes_tls12_per_s']:.2f}x, "
              f"keep-alive req/s {ratios['keepalive_req_per_s']:.2f}x, "
              f"p50 {ratios['p50_ms']:.2f}x, p99 {ratios['p99_ms']:.2f}x  (req/s, hs/s: higher is better)")
    return ratios


# -- main -------------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, object]:
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-bench-tls-"))
    state, certs = prefix / "state", prefix / "certs"
    cert, key, der = mint_bench_certificate(state, certs, prefix)
    cafile = state / "ca.pem"
    backend_port, nginx_port, lg_http, lg_https = free_port(), free_port(), free_port(), free_port()
    backend = nginx_backend(prefix, backend_port)
    servers = {
        "nginx-tls": (nginx_tls(prefix, nginx_port, backend_port, cert, key), nginx_port),
        "labelgw": (labelgw_tls(prefix, lg_http, lg_https, backend_port, state, certs), lg_https),
    }
    started: list[Managed] = []
    results: dict[str, list[dict[str, object]]] = {target: [] for target in TARGETS}
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
        print(f"both targets serve the same certificate (bench.localhost, 127.0.0.1) from {cafile}")
        for round_index in range(args.rounds):
            order = TARGETS if round_index % 2 == 0 else tuple(reversed(TARGETS))
            for name in order:
                port = servers[name][1]
                if args.warmup:
                    run_wrk_https(port, args.warmup, args.connections)
                tls13 = run_s_time(port, args.handshake_time, args.handshake_clients, tls12=False)
                tls12 = run_s_time(port, args.handshake_time, args.handshake_clients, tls12=True)
                wrk = run_wrk_https(port, args.duration, args.connections)
                results[name].append({"tls13": tls13, "tls12": tls12, "wrk": wrk})
                if name == "labelgw":
                    plain.append(run_wrk(lg_http, args.duration, args.connections, 1))
                print(f"round {round_index + 1} {name:<10} TLS1.3 {tls13.per_s:7.0f} hs/s  TLS1.2 {tls12.per_s:7.0f} hs/s  "
                      f"keep-alive {wrk.requests_per_s:8.0f} req/s  p50 {wrk.p50_ms:.2f} ms  p99 {wrk.p99_ms:.2f} ms  "
                      f"errors {wrk.errors}", flush=True)
    finally:
        for server in reversed(started):
            server.stop()
        if not args.keep_logs:
            shutil.rmtree(prefix, ignore_errors=True)
        else:
            print(f"logs and configurations kept in {prefix}")
    summary = summarize(results)
    ratios = print_report(summary, args)
    if plain:
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
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    for name in ("duration", "handshake_time", "handshake_clients", "connections", "rounds"):
        if not 0 < getattr(args, name) <= 600:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 600")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be between 0 and 60")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
