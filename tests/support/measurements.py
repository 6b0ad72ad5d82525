"""Figures end-to-end tests measure, printed in pytest's summary (figures are reported, not asserted)."""

from __future__ import annotations

MEASUREMENTS: list[tuple[str, str]] = []


def record(what: str, value: str) -> None:
    MEASUREMENTS.append((what, value))
