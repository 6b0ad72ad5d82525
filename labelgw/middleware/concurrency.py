"""Concurrency limit: at most `max_inflight` requests of a service at once; up to `max_pending` more wait in a
FIFO queue, each at most `pending_timeout` seconds; beyond that a fast refusal. The clock is injected (anything
with `seconds` and `callLater`: the reactor, or task.Clock in tests).

The limiter knows nothing of HTTP: a waiter is any object with `admitted()` (its turn came) and
`timed_out()` (it waited too long); the caller says `release()` when an admitted request is over and
`cancel(waiter)` when a waiting one goes away (its client left).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from labelgw.core.middleware import ConcurrencySpec

__all__ = ["ADMITTED", "QUEUED", "REJECTED", "ConcurrencyLimiter", "Waiter"]

ADMITTED = "admitted"
QUEUED = "queued"
REJECTED = "rejected"


class Waiter(Protocol):
    def admitted(self) -> None: ...

    def timed_out(self) -> None: ...


class ConcurrencyLimiter:
    def __init__(self, spec: ConcurrencySpec, clock: Any) -> None:
        self.spec = spec
        self.limit = spec.max_inflight
        self.max_pending = spec.max_pending
        self.timeout = spec.pending_timeout
        self._clock = clock
        self.active = 0
        # Waiter -> its timeout call; insertion order is the FIFO order.
        self._queue: OrderedDict[Waiter, Any] = OrderedDict()
        self.rejected = 0
        self.timeouts = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def acquire(self, waiter: Waiter) -> str:
        """ADMITTED (a slot is taken now), QUEUED (`waiter.admitted()` or `waiter.timed_out()` comes later) or
        REJECTED (no slot and the queue is full)."""
        if self.active < self.limit and not self._queue:
            self.active += 1
            return ADMITTED
        if len(self._queue) < self.max_pending:
            self._queue[waiter] = self._clock.callLater(self.timeout, self._expire, waiter)
            return QUEUED
        self.rejected += 1
        return REJECTED

    def release(self) -> None:
        """An admitted request is over: its slot goes to the first waiter, if any."""
        self.active -= 1
        while self._queue and self.active < self.limit:
            waiter, timer = self._queue.popitem(last=False)
            if timer.active():
                timer.cancel()
            self.active += 1
            waiter.admitted()

    def cancel(self, waiter: Waiter) -> None:
        """A waiting request went away before its turn."""
        timer = self._queue.pop(waiter, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, waiter: Waiter) -> None:
        if self._queue.pop(waiter, None) is not None:
            self.timeouts += 1
            waiter.timed_out()
