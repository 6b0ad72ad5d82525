# -*- test-case-name: tests.test_workers_limits -*-
"""Rate and concurrency limits that hold for the gateway as a whole under `--workers N`: split and rebalanced.

Each worker starts with 1/N of a service's limits (labelgw.workers.worker.scale_outcome). Every REPORT_INTERVAL the
supervisor divides each limit again, in proportion to the requests each worker saw for the service (smoothed over
the last reports), keeping for every worker a floor of FLOOR of an equal part so that traffic arriving at an idle
worker is not refused outright. The parts always add up to the configured limit (integer limits by largest
remainder), so the gateway never lets through more than the label says, and a client whose requests all land on
one worker (one keep-alive connection) gets nearly the whole limit after one interval instead of 1/N of it. Pure:
numbers in, numbers out."""

from __future__ import annotations

from typing import Sequence

# Every worker keeps at least this fraction of an equal part.
FLOOR = 0.2
# Weight of the newest report in a worker's smoothed demand.
SMOOTHING = 0.5


def shares(demands: Sequence[float], floor: float = FLOOR) -> list[float]:
    """Each worker's fraction (they add up to 1): FLOOR / N each, the rest in proportion to demand."""
    count = len(demands)
    if count == 0:
        return []
    total = sum(max(0.0, demand) for demand in demands)
    if total <= 0:
        return [1.0 / count] * count
    return [floor / count + (1.0 - floor) * max(0.0, demand) / total for demand in demands]


def integer_parts(total: int, fractions: Sequence[float], minimum: int = 0) -> list[int]:
    """`total` split by `fractions` into integers that add up to it exactly (largest remainder), each at least
    `minimum` when the total allows it for all."""
    count = len(fractions)
    if count == 0:
        return []
    reserved = minimum if total >= minimum * count else 0
    left = total - reserved * count
    raw = [fraction * left for fraction in fractions]
    parts = [int(value) for value in raw]
    remainder = left - sum(parts)
    for index in sorted(range(count), key=lambda i: (raw[i] - parts[i], -i), reverse=True)[:max(0, remainder)]:
        parts[index] += 1
    return [reserved + part for part in parts]


def smoothed(previous: float | None, latest: float) -> float:
    return latest if previous is None else (1.0 - SMOOTHING) * previous + SMOOTHING * latest
