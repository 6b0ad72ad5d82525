#!/usr/bin/env python3
"""A/B of labelgw's data path: the same loads through labelgw run from two source trees, in interleaved rounds.

    .venv/bin/python bench/ab.py A B [--rounds 8] [--duration 3] [--warmup 1] [--loads http1,h2] [--json out.json]

A and B are each a directory holding a checkout (`labelgw/` and `twisted/plugins/labelgw_plugin.py`), or a git
revision of this repository (`main`, `HEAD~3`, a commit), exported with `git archive` into the run's temporary
directory. Both labelgws run at once, from their own tree (PYTHONPATH=<tree>, working directory <tree>) with the
same Python (`--python-a/--python-b` to change it), each with a plain HTTP and an HTTPS listener in front of one
shared nginx backend; each logs the file it imported labelgw from, and the run stops if that is not its tree.

Per round and load, A then B back to back (B then A at every other step: A B, B A for the next load, B A, A B in
the next round, so a drift of the machine's load falls on both alike). The loads:
  http1   bench_proxy.py's load: `wrk -t1 -c50 -dDs -H 'Host: bench.localhost'` to the plain HTTP port after a
          W-second wrk warm-up; the CPU is read around the measured wrk
  h2      `h2load -t1 -c10 -m10 --warm-up-time W -D D` over TLS (ALPN must choose h2); the CPU is read when
          h2load's main duration starts and ends
  h1tls   `h2load --h1 -t1 -c50 -m1` over TLS, the same way (not in the default loads: add it for HTTP/2 / HTTP/1.1)
  h2m1    `h2load -t1 -c50 -m1` over TLS: HTTP/2 one stream at a time, on as many connections as h1tls (not in the
          default loads)
CPU is user + system time of labelgw's process (its session, from /proc) per completed request. The report gives,
per load and tree, the median req/s and CPU µs/request, then B/A of the medians, and the B/A ratio within each
round (A and B measured a few seconds apart): their median and range, and in how many rounds B used less CPU.
With A = B the ratios show the noise floor.

Needs nginx (nginx-light), wrk and h2load (nghttp2-client). Loopback only; everything started is stopped at the end,
also on Ctrl-C or SIGTERM. With the defaults a run takes about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_proxy import (  # noqa: E402
    NGINX,
    REPO,
    Managed,
    free_port,
    imported_from,
    linekind_build,
    nginx_backend,
    run_bench,
    run_wrk,
    session_cpu_s,
    wait_ready,
)
from bench_tls import h2load_argv, https_ready, labelgw_tls, mint_bench_certificate, run_h2load  # noqa: E402

LOADS = ("http1", "h2", "h1tls", "h2m1")
DEFAULT_LOADS = ("http1", "h2")
LABELS = ("A", "B")
# Issue 8's bound: labelgw's CPU per request within 5 % of before.
CPU_BOUND = 1.05
# The per-round ratios' interval for their median, and the rounds it takes: with 4 the range covers 87.5 %.
CONFIDENCE = 0.90
MIN_ROUNDS = 5


# -- statistics (pure) ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One measured load on one tree in one round."""

    load: str
    tree: str  # "A" or "B"
    round: int
    requests_per_s: float
    cpu_us_per_request: float
    requests: int
    errors: int


@dataclass(frozen=True)
class Comparison:
    """B against A for one load."""

    load: str
    rounds: int  # rounds with both A and B measured
    a_requests_per_s: float  # medians over the rounds
    b_requests_per_s: float
    a_cpu_us: float
    b_cpu_us: float
    rate_ratio: float  # B/A of the medians
    cpu_ratio: float
    paired_cpu_ratios: tuple[float, ...]  # B/A within each round, in round order
    errors: int

    @property
    def paired_cpu_median(self) -> float:
        return statistics.median(self.paired_cpu_ratios) if self.paired_cpu_ratios else float("nan")

    @property
    def paired_cpu_interval(self) -> tuple[float, float]:
        return median_interval(self.paired_cpu_ratios)

    @property
    def b_lower_in(self) -> int:
        """Rounds in which B spent less CPU per request than A."""
        return sum(1 for ratio in self.paired_cpu_ratios if ratio < 1.0)


def _coverage(n: int, k: int) -> float:
    """How often the k-th smallest and k-th largest of n draws enclose the median: 1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2**n


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free interval for the median of what `values` were drawn from: the k-th smallest and k-th
    largest value, k as large as keeps the coverage at `confidence` or more (k = 1, the range, below that: with
    5 rounds the range covers 94 %). NaN, NaN without values."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    n, k = len(ordered), 1
    while k + 1 <= (n + 1) // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k]


def verdict(comparison: Comparison, bound: float = CPU_BOUND) -> str:
    """Where B's CPU per request stands against A's and against the bound, as far as the rounds' noise allows."""
    low, high = comparison.paired_cpu_interval
    if math.isnan(low) or math.isnan(high):
        return f"{comparison.load}: no pair of A and B measured"
    if _coverage(comparison.rounds, 1) < CONFIDENCE:
        return (
            f"{comparison.load}: CPU/request B/A x{comparison.paired_cpu_median:.3f} [{low:.3f}-{high:.3f}]: "
            f"too few rounds to tell ({comparison.rounds}; {MIN_ROUNDS} or more for a {CONFIDENCE:.0%} interval)"
        )
    if high <= bound:
        against_bound = f"within x{bound:.2f}"
    elif low > bound:
        against_bound = f"OVER x{bound:.2f}"
    else:
        against_bound = f"not resolved against x{bound:.2f} (more rounds, or a quieter machine)"
    if high < 1.0:
        change = "B measurably lower"
    elif low > 1.0:
        change = "B measurably higher"
    else:
        change = "no difference beyond the noise"
    return (
        f"{comparison.load}: CPU/request B/A x{comparison.paired_cpu_median:.3f} "
        f"[{low:.3f}-{high:.3f}]: {against_bound}; {change}; B lower in {comparison.b_lower_in} of "
        f"{comparison.rounds} rounds"
    )


def _ratio(b: float, a: float) -> float:
    return b / a if a else float("nan")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def compare(samples: Sequence[Sample], load: str) -> Comparison:
    """Medians of each tree's samples of `load`, their B/A ratios, and the B/A ratio of every round that has both."""
    mine = [s for s in samples if s.load == load]
    by_tree = {label: [s for s in mine if s.tree == label] for label in LABELS}
    a_rate = _median([s.requests_per_s for s in by_tree["A"]])
    b_rate = _median([s.requests_per_s for s in by_tree["B"]])
    a_cpu = _median([s.cpu_us_per_request for s in by_tree["A"]])
    b_cpu = _median([s.cpu_us_per_request for s in by_tree["B"]])
    a_by_round = {s.round: s for s in by_tree["A"]}
    paired = tuple(
        _ratio(s.cpu_us_per_request, a_by_round[s.round].cpu_us_per_request)
        for s in sorted(by_tree["B"], key=lambda s: s.round)
        if s.round in a_by_round
    )
    return Comparison(
        load=load,
        rounds=len(paired),
        a_requests_per_s=a_rate,
        b_requests_per_s=b_rate,
        a_cpu_us=a_cpu,
        b_cpu_us=b_cpu,
        rate_ratio=_ratio(b_rate, a_rate),
        cpu_ratio=_ratio(b_cpu, a_cpu),
        paired_cpu_ratios=paired,
        errors=sum(s.errors for s in mine),
    )


def round_order(step: int) -> tuple[str, str]:
    """A, B at even steps and B, A at odd ones (step: the round plus the load's index), so a drift of the machine's
    load, or the warmer caches of whoever goes second, falls on both alike."""
    return LABELS if step % 2 == 0 else (LABELS[1], LABELS[0])


def h2_to_h1(samples: Sequence[Sample], tree: str, load: str = "h2") -> float:
    """HTTP/2 CPU per request over HTTP/1.1's, both over TLS, for one tree (medians); NaN without both loads."""
    h2 = [s.cpu_us_per_request for s in samples if s.tree == tree and s.load == load]
    h1 = [s.cpu_us_per_request for s in samples if s.tree == tree and s.load == "h1tls"]
    return _ratio(_median(h2), _median(h1)) if h2 and h1 else float("nan")


def report_lines(comparisons: Sequence[Comparison], samples: Sequence[Sample]) -> list[str]:
    lines = [
        f"{'load':<6} {'A req/s':>9} {'B req/s':>9} {'B/A':>6}   {'A cpu us/req':>12} {'B cpu us/req':>12} {'B/A':>6}"
        f"   {'B/A cpu per round: median [interval]':<37} {'B lower':>8} {'errors':>6}"
    ]
    for c in comparisons:
        low, high = c.paired_cpu_interval
        spread = f"x{c.paired_cpu_median:.3f} [{low:.3f}-{high:.3f}]" if c.paired_cpu_ratios else "n/a"
        lines.append(
            f"{c.load:<6} {c.a_requests_per_s:>9.0f} {c.b_requests_per_s:>9.0f} x{c.rate_ratio:<5.3f}   "
            f"{c.a_cpu_us:>12.1f} {c.b_cpu_us:>12.1f} x{c.cpu_ratio:<5.3f}   {spread:<37} "
            f"{f'{c.b_lower_in}/{c.rounds}':>8} {c.errors:>6}"
        )
    lines.append(
        f"(req/s and cpu: medians over the rounds and their B/A; per round: B/A of the pair measured together, "
        f"the median of the rounds and an interval holding the true median with >= {CONFIDENCE:.0%} confidence)"
    )
    for tree in LABELS:
        ratio = h2_to_h1(samples, tree)
        if not math.isnan(ratio):  # both TLS loads were run
            lines.append(f"{tree}: HTTP/2 CPU / HTTP/1.1 CPU over TLS x{ratio:.2f}")
        ratio = h2_to_h1(samples, tree, "h2m1")
        if not math.isnan(ratio):
            lines.append(f"{tree}: HTTP/2 -m1 CPU / HTTP/1.1 CPU over TLS x{ratio:.2f}")
    lines.extend(verdict(c) for c in comparisons)
    return lines


# -- trees ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    label: str
    spec: str  # as given on the command line
    path: Path
    description: str  # the commit, and whether the checkout has changes


def _git(args: Sequence[str], cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _check_tree(path: Path, spec: str) -> None:
    for needed in ("labelgw/__init__.py", "twisted/plugins/labelgw_plugin.py"):
        if not (path / needed).is_file():
            raise SystemExit(f"{spec}: no {needed} in {path}: not a labelgw source tree")


def resolve_tree(label: str, spec: str, workdir: Path) -> Tree:
    """A directory as it is, or a git revision of this repository exported into `workdir`."""
    given = Path(spec)
    if given.is_dir():
        path = given.resolve()
        _check_tree(path, spec)
        try:
            description = _git(["describe", "--always", "--dirty", "--abbrev=12"], path)
        except (RuntimeError, OSError):
            description = "not a git checkout"
        return Tree(label, spec, path, description)
    try:
        commit = _git(["rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}"], REPO)
    except RuntimeError:
        raise SystemExit(f"{spec}: neither a directory nor a git revision of {REPO}") from None
    path = workdir / f"tree-{label}"
    path.mkdir()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, timeout=120, check=True)
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive.stdout, capture_output=True, timeout=120, check=True)
    _check_tree(path, spec)
    if (path / "setup.py").is_file():
        # An exported tree holds no build: compile what setup.py compiles, in place, as ./scripts/test does for the
        # working tree (a tree without a compiler stays pure Python; the run prints which it got).
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, capture_output=True,
                       timeout=600, check=False)
    return Tree(label, spec, path, f"{commit[:12]} (git archive)")


# -- run --------------------------------------------------------------------------------------------------------------


@dataclass
class Running:
    tree: Tree
    server: Managed
    http_port: int
    https_port: int


def start_labelgw(tree: Tree, workdir: Path, backend_port: int, python: str, bare: bool = False) -> Running:
    prefix = workdir / f"labelgw-{tree.label}"
    prefix.mkdir()
    state, certs = prefix / "state", prefix / "certs"
    _cert, _key, der = mint_bench_certificate(state, certs, prefix)
    http_port, https_port = free_port(), free_port()
    server = labelgw_tls(prefix, http_port, https_port, backend_port, state, certs, tree=tree.path, python=python)
    if bare:
        # No access log and no per-request counters: the data path alone, as in a tree that predates them.
        server.argv += ["--access-log", "off"]
        config = prefix / "labelgw.yaml"
        config.write_text("metrics: false\n" + config.read_text())
    server.name = f"labelgw-{tree.label}"
    server.start()
    try:
        problem = wait_ready(server, http_port, timeout_s=30) or https_ready(server, https_port, state / "ca.pem", der)
        if problem:
            raise SystemExit(f"labelgw {tree.label} ({tree.spec}): {problem}\n{server.log_tail()}")
        origin, plugin = imported_from(server.log_path.read_text(errors="replace"))
        expected = (tree.path / "labelgw" / "__init__.py").resolve()
        if origin is None or origin.resolve() != expected:
            raise SystemExit(f"labelgw {tree.label} imported labelgw from {origin}, not from its tree {expected}")
        if plugin is None or not plugin.resolve().is_relative_to(tree.path.resolve()):
            raise SystemExit(f"labelgw {tree.label}'s twistd plugin names a module in {plugin}, not in {tree.path}")
    except BaseException:  # also Ctrl-C while it starts: it is not in the caller's list yet
        server.stop()
        raise
    pid = server.process.pid  # type: ignore[union-attr]
    print(f"{tree.label}: {tree.spec} = {tree.description}; labelgw from {origin}, its tap from {plugin} (pid {pid}); "
          f"labelgw.http.linekind {linekind_build(server.log_path.read_text(errors='replace'))}")
    return Running(tree, server, http_port, https_port)


def measure(load: str, running: Running, round_index: int, args: argparse.Namespace) -> Sample:
    server = running.server
    if server.exited() is not None:
        raise RuntimeError(f"{server.name} exited during the run:\n{server.log_tail()}")
    session = server.process.pid  # type: ignore[union-attr]
    if load == "http1":
        if args.warmup:
            run_wrk(running.http_port, args.warmup, args.connections, 1)
        before = session_cpu_s(session)
        wrk = run_wrk(running.http_port, args.duration, args.connections, 1)
        used = session_cpu_s(session) - before
        cpu = used / wrk.requests * 1e6 if wrk.requests else float("nan")
        return Sample(load, running.tree.label, round_index, wrk.requests_per_s, cpu, wrk.requests, wrk.errors)
    h1 = load == "h1tls"
    clients, streams = (args.connections, 1) if h1 or load == "h2m1" else (args.h2_clients, args.h2_streams)
    argv = h2load_argv(running.https_port, args.duration, args.warmup, clients, streams, h1)
    result = run_h2load(argv, args.duration, args.warmup, cpu_session=session)
    wanted = "http/1.1" if h1 else "h2"
    if result.protocol != wanted:
        raise RuntimeError(f"{' '.join(argv)}: ALPN chose {result.protocol or 'nothing'}, not {wanted}")
    return Sample(
        load, running.tree.label, round_index, result.requests_per_s, result.cpu_us_per_request, result.done,
        result.errors,
    )


def estimate_s(args: argparse.Namespace) -> float:
    # Per load: warm-up + duration, plus about half a second for a process to start and stop.
    trees = 1 if args.concurrent else len(LABELS)
    return args.rounds * trees * len(args.loads) * (args.warmup + args.duration + 0.6) + 10


def bench(args: argparse.Namespace) -> dict[str, object]:
    tools = [NGINX, "wrk"] + (["h2load"] if set(args.loads) - {"http1"} else [])
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install nginx-light wrk nghttp2-client")
    workdir = Path(tempfile.mkdtemp(prefix="labelgw-ab-"))
    workdir.chmod(0o755)  # nginx workers run as nobody
    started: list[Managed] = []
    samples: list[Sample] = []
    trees: list[Tree] = []
    load_before = os.getloadavg()[0]
    try:
        trees = [resolve_tree(label, spec, workdir) for label, spec in zip(LABELS, (args.tree_a, args.tree_b))]
        backend_port = free_port()
        backend = nginx_backend(workdir, backend_port)
        backend.start()
        started.append(backend)
        problem = wait_ready(backend, backend_port)
        if problem:
            raise SystemExit(f"backend nginx {problem}:\n{backend.log_tail()}")
        pythons = {"A": args.python_a, "B": args.python_b}
        running: dict[str, Running] = {}
        for tree in trees:
            running[tree.label] = start_labelgw(
                tree, workdir, backend_port, pythons[tree.label], bare=tree.label in args.bare
            )
            started.append(running[tree.label].server)
        print(
            f"loads {','.join(args.loads)}: {args.warmup} s warm-up + {args.duration} s each; {args.rounds} rounds; "
            f"about {estimate_s(args):.0f} s; load average {load_before:.2f}"
        )
        for round_index in range(args.rounds):
            for load_index, load in enumerate(args.loads):
                if args.concurrent:
                    # Both at once: the same background load falls on A and B at the same moments.
                    with ThreadPoolExecutor(len(LABELS)) as pool:
                        futures = [pool.submit(measure, load, running[label], round_index, args) for label in LABELS]
                        pair = [future.result() for future in futures]
                else:
                    # A and B back to back on each load: a pair is measured seconds apart, under the same background.
                    pair = [measure(load, running[label], round_index, args)
                            for label in round_order(round_index + load_index)]
                for sample in pair:
                    samples.append(sample)
                    print(
                        f"  round {round_index + 1} {sample.tree} {load:<6} {sample.requests_per_s:>9.0f} req/s  "
                        f"cpu {sample.cpu_us_per_request:6.1f} us/req  errors {sample.errors}"
                    )
    finally:
        for server in reversed(started):
            server.stop()
        if args.keep_logs:
            print(f"logs, configurations and exported trees kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    comparisons = [compare(samples, load) for load in args.loads]
    print(f"\nB/A, medians of {args.rounds} rounds (req/s: higher is better; cpu: lower is better); "
          f"load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    for tree in trees:
        print(f"  {tree.label} = {tree.spec}: {tree.description}")
    for line in report_lines(comparisons, samples):
        print(line)
    return {
        "command": [sys.executable, *sys.argv],
        "trees": [asdict(tree) | {"path": str(tree.path)} for tree in trees],
        "settings": {key: value for key, value in vars(args).items() if key != "json"},
        "load_average_start": load_before,
        "comparisons": [
            asdict(c)
            | {
                "paired_cpu_median": c.paired_cpu_median,
                "paired_cpu_interval": c.paired_cpu_interval,
                "b_lower_in": c.b_lower_in,
                "verdict": verdict(c),
            }
            for c in comparisons
        ],
        "h2_to_h1_cpu": {tree: h2_to_h1(samples, tree) for tree in LABELS},
        "samples": [asdict(s) for s in samples],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("tree_a", metavar="A", help="the tree before: a directory with a checkout, or a git revision")
    parser.add_argument("tree_b", metavar="B", help="the tree after, likewise")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds (default 8; 16 with --concurrent, which takes half the time)"
    )
    parser.add_argument("--duration", type=int, default=3, help="measured seconds per load, tree and round (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each (0: none)")
    parser.add_argument("--loads", default=",".join(DEFAULT_LOADS), help="comma list among " + ", ".join(LOADS))
    parser.add_argument("--connections", type=int, default=50, help="HTTP/1.1 connections (wrk, h2load --h1)")
    parser.add_argument("--h2-clients", type=int, default=10, help="HTTP/2 connections (h2load -c)")
    parser.add_argument("--h2-streams", type=int, default=10, help="HTTP/2 streams per connection (h2load -m)")
    for label in LABELS:
        parser.add_argument(
            f"--python-{label.lower()}",
            default=sys.executable,
            help=f"the Python that runs {label}'s labelgw (default: this one)",
        )
    parser.add_argument(
        "--bare",
        default="",
        help="comma list of A, B: run that tree's labelgw with --access-log off and `metrics: false` (to compare the "
        "data path alone with a tree that predates the access log and the metrics)",
    )
    parser.add_argument(
        "--concurrent", action="store_true", help="load A and B at the same time instead of one after the other"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every sample and the ratios here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory (logs, trees)")
    args = parser.parse_args(argv)
    args.bare = sorted({label.strip().upper() for label in args.bare.split(",") if label.strip()})
    if set(args.bare) - set(LABELS):
        parser.error(f"--bare: {', '.join(sorted(args.bare))}: only {', '.join(LABELS)}")
    chosen = [load.strip() for load in args.loads.split(",") if load.strip()]
    if not chosen or set(chosen) - set(LOADS):
        parser.error("--loads: choose among " + ", ".join(LOADS))
    args.loads = [load for load in LOADS if load in chosen]
    if args.rounds is None:
        args.rounds = 16 if args.concurrent else 8
    if not 1 <= args.rounds <= 50 or not 0 < args.duration <= 120 or not 0 <= args.warmup <= 30:
        parser.error("--rounds must be in [1, 50], --duration in (0, 120], --warmup in [0, 30]")
    for name in ("connections", "h2_clients", "h2_streams"):
        if not 0 < getattr(args, name) <= 1000:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 1000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(bench, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
