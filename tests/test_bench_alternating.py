"""bench/inprocess_alternating.py runs and reports (a handful of requests: its figures are not checked here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "inprocess_alternating.py"


def test_alternating_heads_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_inprocess_alternating", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--requests", "50", "--runs", "1"]) == 0
    assert "alternating heads: 50 requests" in capsys.readouterr().out
