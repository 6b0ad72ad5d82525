#!/usr/bin/env python3
"""The floor of this design: how close to nginx can any Python proxy on the Twisted reactor get (issue 12's targets).

Issue 12 asks labelgw for plain HTTP/1.1 at x0.45 of nginx's req/s (bench_proxy.py's load), keep-alive HTTPS at
x0.45 of nginx's (bench_tls.py's) and new TLS handshakes at x0.8 of nginx's. This benchmark measures, in one run
against the same nginx backend and with the same loads, a proxy that does the least any HTTP/1.1 reverse proxy
must do (bench/floor_proxy.py: find the head's end, Content-Length, forward bytes unchanged over one kept-alive
upstream connection per client; no validation, routing, headers, logging, deadlines or back-pressure), on the
reactor labelgw runs on, in one CPython process. Whatever ratio to nginx that floor reaches is the most any Python
proxy on this design can reach; labelgw's ratio to the floor is the share of it labelgw keeps.

Targets (all loopback, each its own process; the backend is bench_proxy.py's nginx, `return 200 "hello\\n"`):
  nginx-proxy      bench_proxy.py's nginx reverse proxy (1 worker, upstream keepalive)           plain HTTP
  floor-proxy      floor_proxy.py on labelgw's reactor (LeanEPollReactor) with direct writes      plain HTTP
  floor-asyncio    floor_proxy.py --loop asyncio (standard asyncio: the loop, not the reactor)   plain HTTP
  labelgw          bench_proxy.py's labelgw target (default settings, --https none)               plain HTTP
  nginx-tls        bench_tls.py's nginx terminating TLS                                            HTTPS
  floor-proxy-tls  floor_proxy.py --tls: the client side through ssl.SSLObject + MemoryBIO          HTTPS
  labelgw-tls      bench_tls.py's labelgw target (its default TLS engine)                         HTTPS
  only when named in --targets: floor-proxy-epoll (Twisted's stock epoll reactor, plain HTTP),
  floor-asyncio-tls (asyncio's own TLS, HTTPS)
Loads, per round (targets interleaved, the order reversed every other round), as bench_proxy.py and bench_tls.py:
  plain        wrk -t1 -cC -dDs --latency -H 'Host: bench.localhost' http://127.0.0.1:P/ after a W s warm-up
  keepalive    the same over https:// (TLS targets)
  handshakes   openssl s_time -new -time T, 2 processes at once, TLS 1.3 then TLS 1.2 (ECDHE-ECDSA-AES128-GCM-SHA256)
It prints the median req/s (handshakes/s) of the rounds, the CPU the target's processes spent per request
(handshake) (user + system of its session, /proc), each target's ratio to nginx, labelgw's to the floor, and what
the floor says of each of issue 12's targets. The load average is printed at the start and the end of every round.

    .venv/bin/python bench/bench_floor.py [--duration 4] [--rounds 3] [--targets ...] [--parts plain,keepalive,handshakes]

A default run takes about 3 minutes. Needs Debian's nginx (nginx-light), wrk and openssl. Everything it starts, it
stops (also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# The servers, loads and measurements are bench_proxy.py's and bench_tls.py's.
from bench_proxy import (  # noqa: E402
    NGINX,
    Managed,
    WrkResult,
    free_port,
    labelgw,
    nginx_backend,
    nginx_proxy,
    run_bench,
    run_wrk,
    session_cpu_s,
    wait_ready,
)
from bench_tls import https_ready, labelgw_tls, mint_bench_certificate, nginx_tls, run_s_time, run_wrk_https  # noqa: E402

FLOOR_SCRIPT = HERE / "floor_proxy.py"
PLAIN_TARGETS = ("nginx-proxy", "floor-proxy", "floor-asyncio", "labelgw", "floor-proxy-epoll")
TLS_TARGETS = ("nginx-tls", "floor-proxy-tls", "labelgw-tls", "floor-asyncio-tls")
TARGETS = PLAIN_TARGETS + TLS_TARGETS
DEFAULT_TARGETS = ("nginx-proxy", "floor-proxy", "floor-asyncio", "labelgw", "nginx-tls", "floor-proxy-tls", "labelgw-tls")
FLOOR_OPTIONS = {
    "floor-proxy": [],
    "floor-proxy-epoll": ["--reactor", "epoll"],
    "floor-asyncio": ["--loop", "asyncio"],
    "floor-proxy-tls": ["--tls"],
    "floor-asyncio-tls": ["--loop", "asyncio", "--tls"],
}
PARTS = ("plain", "keepalive", "handshakes")
# Each load: (the targets it applies to, its unit, the nginx target its ratio is taken to).
LOADS = {
    "plain": (PLAIN_TARGETS, "req/s", "nginx-proxy"),
    "keepalive": (TLS_TARGETS, "req/s", "nginx-tls"),
    "tls13": (TLS_TARGETS, "hs/s", "nginx-tls"),
    "tls12": (TLS_TARGETS, "hs/s", "nginx-tls"),
}
LOAD_TITLES = {
    "plain": "plain HTTP/1.1, keep-alive",
    "keepalive": "HTTPS, keep-alive",
    "tls13": "new TLS 1.3 handshakes",
    "tls12": "new TLS 1.2 handshakes",
}
# labelgw's target and its floor, per load.
LABELGW_FLOOR = {"plain": ("labelgw", "floor-proxy"), "keepalive": ("labelgw-tls", "floor-proxy-tls"),
                 "tls13": ("labelgw-tls", "floor-proxy-tls"), "tls12": ("labelgw-tls", "floor-proxy-tls")}
# Issue 12's targets: labelgw's ratio to nginx, per load.
ISSUE_12 = {"plain": 0.45, "keepalive": 0.45, "tls13": 0.8}


@dataclass(frozen=True)
class Figure:
    """One measurement: the rate, the target's CPU per request (handshake), the errors."""

    rate: float
    cpu_us: float
    errors: int


def floor_server(prefix: Path, name: str, port: int, backend_port: int, pem: Path) -> Managed:
    options = list(FLOOR_OPTIONS[name])
    if "--tls" in options:
        options.append(str(pem))  # --tls comes last: its argument
    argv = [sys.executable, str(FLOOR_SCRIPT), "--listen", str(port), "--backend", str(backend_port), *options]
    return Managed(name, argv, prefix / f"{name}.log")


def measure_wrk(server: Managed, run: Callable[[], WrkResult]) -> Figure:
    assert server.process is not None
    before = session_cpu_s(server.process.pid)
    result = run()
    used = session_cpu_s(server.process.pid) - before
    return Figure(result.requests_per_s, used / result.requests * 1e6 if result.requests else float("nan"),
                  result.errors)


def loadavg() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: dict[str, dict[str, list[Figure]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per load and target: the median rate and CPU over the rounds, the errors summed."""
    return {
        load: {
            target: {
                "rate": _median([f.rate for f in figures]),
                "cpu_us": _median([f.cpu_us for f in figures]),
                "errors": float(sum(f.errors for f in figures)),
                "rounds": float(len(figures)),
            }
            for target, figures in by_target.items()
            if figures
        }
        for load, by_target in results.items()
    }


def ratio(summary: dict[str, dict[str, dict[str, float]]], load: str, ours: str, theirs: str, key: str = "rate") -> float:
    figures = summary.get(load, {})
    if ours not in figures or theirs not in figures or not figures[theirs][key]:
        return float("nan")
    return figures[ours][key] / figures[theirs][key]


def verdicts(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """What the floor says of each of issue 12's targets."""
    lines = []
    for load, wanted in ISSUE_12.items():
        ours, floor = LABELGW_FLOOR[load]
        nginx = LOADS[load][2]
        floor_ratio = ratio(summary, load, floor, nginx)
        if floor_ratio != floor_ratio:  # NaN: not measured
            continue
        labelgw_ratio = ratio(summary, load, ours, nginx)
        by_cpu = ratio(summary, load, nginx, floor, "cpu_us")
        line = (f"{LOAD_TITLES[load]}: issue 12 wants labelgw >= x{wanted:.2f} of nginx; the floor reaches "
                f"x{floor_ratio:.2f} (x{by_cpu:.2f} by CPU per request)")
        if floor_ratio < wanted:
            line += " -> out of reach of any Python proxy on this design (the floor itself falls short)"
        else:
            need = wanted / floor_ratio
            line += f" -> reachable only by keeping >= {need:.0%} of the floor's rate"
            if labelgw_ratio == labelgw_ratio:
                line += f" (labelgw keeps {labelgw_ratio / floor_ratio:.0%} today: x{labelgw_ratio:.2f} of nginx)"
        lines.append(line)
    return lines


def print_report(summary: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    label = f"medians of {args.rounds} rounds" if args.rounds > 1 else "1 round"
    print(f"\n({label}; wrk -t1 -c{args.connections} -d{args.duration}s after {args.warmup}s; "
          f"s_time -new -time {args.handshake_time} x2)")
    header = (f"{'load':<28} {'target':<18} {'rate':>10} {'unit':<5} {'cpu us':>7} {'errors':>7} {'/nginx':>7} "
              f"{'/floor':>7} {'cpu:nginx/this':>15}")
    print(header)
    print("-" * len(header))
    for load, (targets, unit, nginx) in LOADS.items():
        figures = summary.get(load, {})
        for target in targets:
            if target not in figures:
                continue
            f = figures[target]
            to_nginx = ratio(summary, load, target, nginx)
            ours, floor = LABELGW_FLOOR[load]
            to_floor = f"x{ratio(summary, load, target, floor):.2f}" if target == ours else ""
            # nginx's CPU per request over this target's: the rate ratio on a core of its own (the figure a
            # shared machine moves least).
            by_cpu = ratio(summary, load, nginx, target, "cpu_us")
            print(f"{LOAD_TITLES[load]:<28} {target:<18} {f['rate']:>10.0f} {unit:<5} {f['cpu_us']:>7.1f} "
                  f"{int(f['errors']):>7} {'x%.2f' % to_nginx if target != nginx else '':>7} {to_floor:>7} "
                  f"{'x%.2f' % by_cpu if target != nginx else '':>15}")
    print()
    for line in verdicts(summary):
        print(line)


def bench(args: argparse.Namespace) -> dict[str, object]:
    tools = [NGINX, "wrk"] + (["openssl"] if "handshakes" in args.parts else [])
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install nginx-light wrk openssl")
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-bench-floor-"))
    prefix.chmod(0o755)  # nginx workers run as nobody
    state, certs = prefix / "state", prefix / "certs"
    cert, key, der = mint_bench_certificate(state, certs, prefix)
    cafile, pem = state / "ca.pem", certs / "default.pem"
    backend_port = free_port()
    backend = nginx_backend(prefix, backend_port)

    def build(name: str, port: int) -> Managed:
        if name in FLOOR_OPTIONS:
            return floor_server(prefix, name, port, backend_port, pem)
        if name == "nginx-proxy":
            return nginx_proxy(prefix, port, backend_port)
        if name == "nginx-tls":
            return nginx_tls(prefix, port, backend_port, cert, key)
        folder = prefix / name
        folder.mkdir()
        if name == "labelgw":
            return labelgw(folder, port, backend_port)
        server = labelgw_tls(folder, free_port(), port, backend_port, state, certs)
        server.name = name
        return server

    started: list[Managed] = []
    servers: dict[str, tuple[Managed, int]] = {}
    skipped: dict[str, str] = {}
    results: dict[str, dict[str, list[Figure]]] = {}
    loads_of_round: list[str] = []
    if "plain" in args.parts:
        loads_of_round.append("plain")
    if "keepalive" in args.parts:
        loads_of_round.append("keepalive")
    if "handshakes" in args.parts:
        loads_of_round += ["tls13", "tls12"]
    load_averages: list[dict[str, str]] = []
    began = time.monotonic()
    try:
        backend.start()
        started.append(backend)
        problem = wait_ready(backend, backend_port)
        if problem:
            raise SystemExit(f"backend nginx {problem}:\n{backend.log_tail()}")
        for name in args.targets:
            port = free_port()
            server = build(name, port)
            server.start()
            started.append(server)
            problem = wait_ready(server, port) if name in PLAIN_TARGETS else https_ready(server, port, cafile, der)
            if problem:
                skipped[name] = problem
                print(f"skipping {name}: {problem}\n  log: " + server.log_tail(5).replace("\n", "\n  "))
                server.stop()
                continue
            servers[name] = (server, port)
        print(f"targets: {', '.join(servers)}; loads: {', '.join(loads_of_round)}; {args.rounds} round(s); "
              f"load average {loadavg()}")
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            start_load = loadavg()
            for load in loads_of_round:
                for name in order:
                    if name not in LOADS[load][0]:
                        continue
                    server, port = servers[name]
                    if server.exited() is not None:
                        raise RuntimeError(f"{name} exited during the run:\n{server.log_tail()}")
                    assert server.process is not None
                    if load in ("plain", "keepalive"):
                        wrk = (lambda p, d: run_wrk(p, d, args.connections, 1)) if load == "plain" else (
                            lambda p, d: run_wrk_https(p, d, args.connections))
                        if args.warmup:
                            wrk(port, args.warmup)
                        figure = measure_wrk(server, lambda: wrk(port, args.duration))
                    else:
                        shake = run_s_time(port, args.handshake_time, args.handshake_clients, load == "tls12",
                                           server.process.pid)
                        figure = Figure(shake.per_s, shake.cpu_us_per_handshake, 0)
                    results.setdefault(load, {}).setdefault(name, []).append(figure)
                    print(f"  round {round_index + 1} {load:<9} {name:<18} {figure.rate:>9.0f} {LOADS[load][1]}  "
                          f"cpu {figure.cpu_us:6.1f} us  errors {figure.errors}")
            load_averages.append({"start": start_load, "end": loadavg()})
            print(f"  round {round_index + 1}: load average {start_load} at its start, {loadavg()} at its end")
    finally:
        for server in reversed(started):
            server.stop()
        if args.keep_logs:
            print(f"logs and configurations kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)
    summary = summarize(results)
    print_report(summary, args)
    print(f"\nwall time {time.monotonic() - began:.0f} s; load average at the end {loadavg()}")
    return {
        "command": [sys.executable, *sys.argv],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "skipped": skipped,
        "load_averages": load_averages,
        "verdicts": verdicts(summary),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    # wrk and s_time take whole seconds only.
    parser.add_argument("--duration", type=int, default=4, help="seconds of measured wrk load per target and round")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured wrk load before each (0: none)")
    parser.add_argument("--handshake-time", type=int, default=2, help="seconds of s_time per TLS version")
    parser.add_argument("--handshake-clients", type=int, default=2, help="s_time processes at once")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (-c)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are quoted")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list among " + ", ".join(PARTS))
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help="comma list among " + ", ".join(TARGETS) + " (default: " + ", ".join(DEFAULT_TARGETS) + ")")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with configurations and logs")
    args = parser.parse_args(argv)
    for option, known in (("parts", PARTS), ("targets", TARGETS)):
        chosen = [item.strip() for item in getattr(args, option).split(",") if item.strip()]
        unknown = set(chosen) - set(known)
        if unknown or not chosen:
            parser.error(f"--{option}: choose among {', '.join(known)}")
        setattr(args, option, [item for item in known if item in chosen])
    for name in ("duration", "handshake_time", "handshake_clients", "connections", "rounds"):
        if not 0 < getattr(args, name) <= 300:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 300")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be between 0 and 60")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
