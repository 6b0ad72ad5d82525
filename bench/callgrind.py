#!/usr/bin/env python3
"""Instructions per request of the in-process data path (bench/inprocess.py), counted by valgrind's callgrind:
a figure that does not move with the machine's load, for A/B comparisons on a shared machine.

    .venv/bin/python bench/callgrind.py [--only get|post] [--observability bare|default] [--requests 2000]
        [--middleware]

Runs inprocess.py under `valgrind --tool=callgrind` twice, with N and 2N requests (same warm-up, same start-up),
and divides the difference of the two instruction totals by N: start-up and imports cancel out. PYTHONHASHSEED is
fixed so that both runs hash alike. Needs valgrind (Debian's `valgrind` package). Nothing leaves the process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def callgrind_total(command: list[str]) -> int:
    """The instruction total of `command` (a Python command line) run under valgrind's callgrind, with
    PYTHONHASHSEED fixed so that repeated runs hash alike. The one runner of bench/'s in-process counters."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", *command]
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"), check=False)
        match = _COLLECTED.search(done.stderr)
        if done.returncode != 0 or match is None:
            raise SystemExit(f"callgrind run failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-2000:]}")
        return int(match.group(1))


def instructions(
    requests: int, only: str, observability: str, python: str, without: str = "", middleware: bool = False
) -> int:
    return callgrind_total([
        python, str(HERE / "inprocess.py"), "--only", only, "--runs", "1", "--requests", str(requests),
        "--observability", observability, "--without", without, *(["--middleware"] if middleware else []),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", choices=("get", "post"), default="get")
    parser.add_argument("--observability", choices=("bare", "default"), default="bare")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--without", default="", help="passed to inprocess.py: log, metrics")
    parser.add_argument("--middleware", action="store_true", help="passed to inprocess.py: the labelgw-mw chain")
    args = parser.parse_args(argv)
    n = args.requests
    small = instructions(n, args.only, args.observability, args.python, args.without, args.middleware)
    large = instructions(2 * n, args.only, args.observability, args.python, args.without, args.middleware)
    per_request = (large - small) / n
    what = args.observability + (" without " + args.without if args.without else "") + (", middleware" if args.middleware else "")
    print(f"{args.only} ({what}): {per_request:,.0f} instructions per request "
          f"(callgrind, {n} vs {2 * n} requests: {small:,} / {large:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
