"""bench/reactor_cost.py runs its ping-pong to the end on both reactors and both write paths (a subprocess each: it
installs a reactor). Loopback, bounded (a few hundred round trips; the script stops itself after 60 s)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support.benchscripts import BENCH_DIR


@pytest.mark.parametrize(
    "options", [[], ["--reactor", "epoll", "--write", "twisted"], ["--timers", "--connections", "1"]]
)
def test_the_ping_pong_completes(options: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "reactor_cost.py"), "--requests", "300", "--connections", "5", *options],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert re.fullmatch(r"[\d.]+ us CPU per round trip\n", done.stdout), done.stdout + done.stderr
