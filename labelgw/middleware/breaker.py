"""Circuit breaker of a service: closed, open, half-open. Pure: time comes in as numbers.

Closed: every request goes; outcomes are counted in a sliding window of `window` seconds (ten slots, each a
tenth of it), and when at least `min_requests` of them ended and the failed share (5xx answers, gateway
errors: what the exchange reports as failed) reaches `error_rate`, the breaker opens. Open: for `open_for`
seconds every request is refused at once (or goes to the fallback). Then half-open: `probes` requests go
through; all of them succeeding closes it (with an empty window), any failure opens it again.

The breaker is per service and sits above outlier ejection, which keeps ejecting single backends meanwhile.
"""

from __future__ import annotations

import math

from labelgw.core.middleware import BreakerSpec

__all__ = ["CLOSED", "DENY", "HALF_OPEN", "OPEN", "PASS", "PROBE", "CircuitBreaker"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

# What `admit` says about one request.
PASS = 1
PROBE = 2
DENY = 0

_SLOTS = 10


class CircuitBreaker:
    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self.state = CLOSED
        self.open_until = 0.0
        self.opened = 0
        self._width = spec.window / _SLOTS
        # Per slot: its epoch (int(now / width)), requests, failures.
        self._epochs = [-1] * _SLOTS
        self._totals = [0] * _SLOTS
        self._failures = [0] * _SLOTS
        self._probes_started = 0
        self._probe_successes = 0

    def admit(self, now: float) -> int:
        """PASS, PROBE (a half-open trial: report it with probe=True) or DENY."""
        state = self.state
        if state is CLOSED:
            return PASS
        if state is OPEN:
            if now < self.open_until:
                return DENY
            self.state = HALF_OPEN
            self._probes_started = 0
            self._probe_successes = 0
        if self._probes_started < self.spec.probes:
            self._probes_started += 1
            return PROBE
        return DENY

    def retry_after(self, now: float) -> int:
        """Whole seconds until the breaker lets requests through again (at least 1)."""
        return max(1, math.ceil(self.open_until - now))

    def record(self, now: float, failed: bool, probe: bool = False) -> None:
        """The outcome of a request that `admit` let through."""
        if probe:
            if self.state is not HALF_OPEN:
                return
            if failed:
                self._open(now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.spec.probes:
                self.state = CLOSED
                self._clear()
            return
        if self.state is not CLOSED:
            return  # admitted before the breaker opened: already judged
        epoch = int(now / self._width)
        slot = epoch % _SLOTS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._totals[slot] = 0
            self._failures[slot] = 0
        self._totals[slot] += 1
        if failed:
            self._failures[slot] += 1
            total, failures = self.counts(now)
            if total >= self.spec.min_requests and failures >= self.spec.error_rate * total:
                self._open(now)

    def abandon(self, probe: bool) -> None:
        """A request that `admit` let through ended without saying anything about the service (its client left)."""
        if probe and self.state is HALF_OPEN and self._probes_started > 0:
            self._probes_started -= 1

    def counts(self, now: float) -> tuple[int, int]:
        """Requests and failures in the window that ends now."""
        oldest = int(now / self._width) - _SLOTS + 1
        total = failures = 0
        for index in range(_SLOTS):
            if self._epochs[index] >= oldest:
                total += self._totals[index]
                failures += self._failures[index]
        return total, failures

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.open_until = now + self.spec.open_for
        self.opened += 1
        self._clear()

    def _clear(self) -> None:
        self._epochs = [-1] * _SLOTS
        self._totals = [0] * _SLOTS
        self._failures = [0] * _SLOTS
