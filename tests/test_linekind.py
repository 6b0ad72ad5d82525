"""labelgw/http/linekind.py, the one module labelgw compiles (mypyc, in setup.py): its compiled build does what its
source does as Python, for generated inputs, and the working tree's build is the one its source makes.

tests/test_accesslog_fast.py holds the access log's fast path (which calls this module) to the general formatter
and the metrics, with whichever build is imported; here the two builds are held to each other."""

from __future__ import annotations

import importlib.util
import os
from bisect import bisect_left
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelgw.http import linekind

SOURCE = Path(linekind.__file__).with_name("linekind.py")
COMPILED = not linekind.__file__.endswith(".py")


def _as_python() -> ModuleType:
    """The module's source run as Python, under a name of its own (the import system would take the build)."""
    spec = importlib.util.spec_from_file_location("linekind_as_python", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PYTHON = _as_python()
needs_build = pytest.mark.skipif(not COMPILED, reason="linekind is not compiled here (no C compiler at build time)")


def test_ci_tests_the_compiled_build() -> None:
    # The figures in the README are of the compiled build; ./scripts/test builds it in place (and installs a
    # compiler when it can).
    if os.environ.get("CI") == "true":
        assert COMPILED, f"CI=true and labelgw.http.linekind is not compiled: {linekind.__file__}"


@needs_build
def test_the_build_is_not_older_than_its_source() -> None:
    # A build left from an earlier source would be tested (and run) instead of the source: rebuild with
    # `.venv/bin/python setup.py build_ext --inplace` (./scripts/test does it every run).
    # The build is two files: the module (a shim, rewritten only when it changes) and its code (linekind__mypyc).
    built = max(path.stat().st_mtime for path in SOURCE.parent.glob("linekind*.so"))
    assert built >= SOURCE.stat().st_mtime, (
        f"the build of {SOURCE} is older than it: run `.venv/bin/python setup.py build_ext --inplace`"
    )


_BOUNDS = [*linekind.BUCKETS, *(b * 1.0000001 for b in linekind.BUCKETS), *(b * 0.9999999 for b in linekind.BUCKETS)]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from([0.0, -0.0, -1.0, 61.0, 1e9, *_BOUNDS]), st.floats(-1.0, 100.0)))
def test_the_bucket_is_bisect_left_of_the_bounds(elapsed: float) -> None:
    assert linekind.bucket(elapsed) == PYTHON.bucket(elapsed) == bisect_left(linekind.BUCKETS, elapsed)


@given(st.integers(-10**7, 10**8))
def test_the_time_text_is_the_same(micros: int) -> None:
    assert linekind.ms_text(micros) == PYTHON.ms_text(micros)


@given(st.sampled_from([b"GET", b"HEAD", b"POST", b"M-SEARCH", b"", b"get"]))
def test_rows_by_method_are_the_same(method: bytes) -> None:
    compiled, python = linekind.Slot("api", ""), PYTHON.Slot("api", "")
    assert compiled.row(method) == python.row(method)
    assert sorted(compiled.rows) == sorted(python.rows) and compiled.get is compiled.rows[b"GET"]


# One kind, then requests whose values are its own objects or others (equal bytes, not the same object; another
# status, route, version), at times inside and outside its second.
_TARGET, _METHOD, _VERSION, _ROUTE = b"/x", b"GET", b"HTTP/1.1", object()
_OTHER_ROUTE = object()
_values = st.fixed_dictionaries({
    "now": st.sampled_from([100.0, 100.5, 100.999999, 99.999999, 101.0, 250.0]),
    "target": st.sampled_from([_TARGET, bytes(bytearray(b"/x")), b"/y"]),
    "method": st.sampled_from([_METHOD, b"POST"]),
    "http_version": st.sampled_from([_VERSION, b"HTTP/1.0"]),
    "status": st.sampled_from([200, 200, 404, 599]),
    "route": st.sampled_from([_ROUTE, _ROUTE, _OTHER_ROUTE]),
    "version": st.sampled_from([None, None, "v2"]),
    "bytes_in": st.sampled_from([0, 0, 5, 2**40]),
    "bytes_out": st.sampled_from([0, 2, 2, 123456, 2**40]),
    "created": st.floats(90.0, 101.0),
    "started": st.floats(90.0, 101.0),
    "ttfb": st.floats(-1.0, 20.0),
    "request_id": st.sampled_from([None, b"", b"0af7651916cd43dd8448eb211c80319c"]),
})


def _kind(module: ModuleType, metrics: bool) -> Any:
    slot = module.Slot("api", "") if metrics else None
    return module.LineKind(
        100.0, 101.0, _TARGET, _METHOD, _VERSION, 200, _ROUTE, None, b'1.2.3.4 - - [t] "GET /x HTTP/1.1" 200 %d "api" ',
        slot, slot.get if slot is not None else None, 2,
    )


def _state(kind: Any, pieces: list[bytes]) -> tuple[Any, ...]:
    slot = kind.slot
    counters = None if slot is None else (
        slot.rows, slot.counts, slot.total, slot.bytes_in, slot.bytes_out,
    )
    return pieces, kind.bytes_out, kind.sized_line, counters


@needs_build
@settings(max_examples=300, deadline=None)
@given(st.lists(_values, min_size=1, max_size=6), st.booleans())
def test_repeat_compiled_does_what_its_source_does(requests: list[dict[str, Any]], metrics: bool) -> None:
    compiled_kind, python_kind = _kind(linekind, metrics), _kind(PYTHON, metrics)
    compiled_pieces: list[bytes] = []
    python_pieces: list[bytes] = []
    for values in requests:
        assert linekind.repeat(compiled_kind, compiled_pieces, **values) == PYTHON.repeat(
            python_kind, python_pieces, **values
        )
        assert _state(compiled_kind, compiled_pieces) == _state(python_kind, python_pieces)


@pytest.mark.parametrize("module", [linekind, PYTHON], ids=["imported", "as-python"])
@pytest.mark.parametrize("elapsed", _BOUNDS + [0.0, 61.0])
def test_repeat_counts_a_duration_in_the_bucket_bisect_left_finds(module: ModuleType, elapsed: float) -> None:
    # Durations at the bounds themselves (a bound belongs to its own bucket: `le`): `now - created` is exactly
    # `elapsed` with created 0.
    slot = module.Slot("api", "")
    kind = module.LineKind(0.0, 100.0, _TARGET, _METHOD, _VERSION, 200, _ROUTE, None, b"%d", slot, slot.get, 2)
    assert module.repeat(kind, [], elapsed, _TARGET, _METHOD, _VERSION, 200, _ROUTE, None, 0, 1, 0.0, 0.0, 0.0, None)
    assert slot.counts.index(1) == bisect_left(linekind.BUCKETS, elapsed) and sum(slot.counts) == 1
