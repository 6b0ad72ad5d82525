"""``python -m labelgw reload``: signal a running labelgw to reload (SIGHUP), found through its pidfile.

Under a supervisor (``--workers N``) that re-reads the config file and replaces the worker processes with new ones
(new code, new settings) without a failed request; a single-process labelgw re-reads its config file."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labelgw reload",
        description="Send SIGHUP to a running labelgw: it re-reads its config file and, with --workers, starts new "
        "worker processes that take over from the old ones.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pidfile", default="twistd.pid", help="twistd's pidfile [default: twistd.pid]")
    group.add_argument("--pid", type=int, help="the process id of labelgw (its supervisor with --workers)")
    args = parser.parse_args(argv)
    pid = args.pid
    if pid is None:
        try:
            with open(args.pidfile, encoding="ascii") as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError) as error:
            print(f"python -m labelgw reload: cannot read the pid from {args.pidfile}: {error}", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"python -m labelgw reload: no process {pid} (a stale pidfile?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"python -m labelgw reload: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    print(f"labelgw (pid {pid}) asked to reload")
    return 0
