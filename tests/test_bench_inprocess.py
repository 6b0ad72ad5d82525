"""bench/inprocess.py runs and reports both loops (a handful of requests: its figures are not checked here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "inprocess.py"


def test_inprocess_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_inprocess", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--requests", "50", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "GET, no body: 50 requests" in out and "POST, 5-byte body: 50 requests" in out
