"""Load a script of bench/ (a directory of scripts, not a package) as a module, for tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent.parent.parent / "bench"


def load_bench_script(name: str) -> ModuleType:
    """`load_bench_script("loadgen")` imports bench/loadgen.py as the module `bench_loadgen`."""
    module_name = f"bench_{name}" if not name.startswith("bench_") else name
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
