#!/usr/bin/env python3
"""Instructions per request of the in-process data path (bench/inprocess.py), counted by valgrind's callgrind:
a figure that does not move with the machine's load, for A/B comparisons on a shared machine.

    .venv/bin/python bench/callgrind.py [--only get|post] [--observability bare|default] [--requests 2000]
        [--middleware] [--simulate]

Runs inprocess.py under `valgrind --tool=callgrind` twice, with N and 2N requests (same warm-up, same start-up),
and divides the difference of the two instruction totals by N: start-up and imports cancel out. PYTHONHASHSEED is
fixed so that both runs hash alike. Needs valgrind (Debian's `valgrind` package). Nothing leaves the process.

`--simulate` also counts, per request, what valgrind's cache and branch models see: first-level instruction and
data cache misses (I1mr, D1mr, D1mw) and mispredicted conditional and indirect branches (Bcm, Bim). Instructions
alone underrate interpreted code that runs once per request: the interpreter's dispatch jumps of a bytecode run
that does not repeat within a request are mostly mispredicted (~15 cycles each), and code used by nothing else
misses the instruction cache. `cycles~` weighs them (10 per first-level miss, 15 per mispredicted branch): a
model, not a measurement, for A/B comparisons that timing on this shared machine cannot resolve.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
_COLLECTED = re.compile(r"Collected\s*:\s*([\d ]+)")
_EVENTS = re.compile(r"Events\s*:\s*([\w ]+)")
SIMULATE = ["--cache-sim=yes", "--branch-sim=yes"]


def callgrind_total(command: list[str]) -> int:
    """The instruction total of `command` (a Python command line) run under valgrind's callgrind, with
    PYTHONHASHSEED fixed so that repeated runs hash alike. The one runner of bench/'s in-process counters."""
    return callgrind_events(command)["Ir"]


def callgrind_events(command: list[str], simulate: bool = False) -> dict[str, int]:
    """callgrind's event totals of `command` by name (Ir: instructions; with `simulate`, the cache and branch
    models' events too)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", *(SIMULATE if simulate else []), *command]
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), check=False)
        match = _COLLECTED.search(done.stderr)
        names = _EVENTS.search(done.stderr)
        if done.returncode != 0 or match is None or names is None:
            raise SystemExit(f"callgrind run failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-2000:]}")
        return dict(zip(names.group(1).split(), map(int, match.group(1).split())))


def instructions(
    requests: int, only: str, observability: str, python: str, without: str = "", middleware: bool = False
) -> int:
    return events(requests, only, observability, python, without, middleware)["Ir"]


def events(
    requests: int, only: str, observability: str, python: str, without: str = "", middleware: bool = False,
    simulate: bool = False,
) -> dict[str, int]:
    return callgrind_events([
        python, str(HERE / "inprocess.py"), "--only", only, "--runs", "1", "--requests", str(requests),
        "--observability", observability, "--without", without, *(["--middleware"] if middleware else []),
    ], simulate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", choices=("get", "post"), default="get")
    parser.add_argument("--observability", choices=("bare", "default"), default="bare")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--without", default="", help="passed to inprocess.py: log, metrics")
    parser.add_argument("--middleware", action="store_true", help="passed to inprocess.py: the labelgw-mw chain")
    parser.add_argument("--simulate", action="store_true", help="cache and branch simulation (see above)")
    args = parser.parse_args(argv)
    n = args.requests
    run = (args.only, args.observability, args.python, args.without, args.middleware, args.simulate)
    # The two runs are independent processes: side by side.
    with ThreadPoolExecutor(2) as pool:
        small_run, large_run = pool.submit(events, n, *run), pool.submit(events, 2 * n, *run)
        small_events, large_events = small_run.result(), large_run.result()
    small, large = small_events["Ir"], large_events["Ir"]
    per_request = (large - small) / n
    what = args.observability + (" without " + args.without if args.without else "") + (", middleware" if args.middleware else "")
    print(f"{args.only} ({what}): {per_request:,.0f} instructions per request "
          f"(callgrind, {n} vs {2 * n} requests: {small:,} / {large:,})")
    if args.simulate:
        each = {name: (large_events[name] - small_events[name]) / n for name in small_events}
        misses = each["I1mr"] + each["D1mr"] + each["D1mw"]
        mispredicted = each["Bcm"] + each["Bim"]
        print("  per request: " + "  ".join(f"{name} {each[name]:,.0f}" for name in ("I1mr", "D1mr", "D1mw", "Bcm", "Bim"))
              + f"  cycles~ {each['Ir'] + 10 * misses + 15 * mispredicted:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
