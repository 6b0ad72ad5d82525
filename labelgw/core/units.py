"""Durations and percentages as labels and config keys write them ("5s", "500ms", "1m"; "5%", "12.5"). Pure.

Shared by the label parser and the middleware labels (labelgw.core.middleware cannot import labelgw.core.labels:
labels imports it)."""

from __future__ import annotations

import re

MAX_DURATION = 3600.0

_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in "5", "5s", "1.5s", "500ms", "1m" or "1h"; positive and at most one hour, else ValueError."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError('not a duration (examples: "5", "5s", "500ms", "1m")')
    seconds = float(match["number"]) * _DURATION_UNITS[match["unit"]]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    if seconds > MAX_DURATION:
        raise ValueError("duration must be at most 1 hour")
    return seconds


_PERCENT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*%?")


def parse_percent(text: str) -> float:
    """The number of percent in "5%", "5" or "12.5 %" (no sign, no exponent); the caller checks its own range."""
    match = _PERCENT.fullmatch(text.strip())
    if match is None:
        raise ValueError('not a percentage (a number from 0 to 100, "%" optional, e.g. 5%)')
    return float(match["number"])
