"""Canary analysis by version: a version that does worse than the stable one loses its share of new clients.

Per version of a split service, a sliding window (`window` seconds, 60 by default) of requests, errors (5xx and
gateway errors) and a latency histogram (time to the response head, as the balancer measures it). The window is
a ring of `SLOTS` time slots, each with its counts and a small log-scale histogram, plus running totals: an
observation and a read cost O(1) (the p99 scans `BUCKETS` counters), and memory is bounded per version.

The rule, for a version whose containers carry `<prefix>.canary.max_error_rate` and/or
`<prefix>.canary.max_latency_ratio`: once it has at least `MIN_REQUESTS` requests in its window, it is cut when
its error rate exceeds the stable version's by more than the limit (percentage points), or its p99 exceeds the
stable version's p99 times the ratio. The stable version is the one whose containers have no `traffic` label
(several: the busiest; its own limits are ignored). A cut version gets a 0 % share: pinned requests still reach
it, sticky clients move to another version (labelgw.core.versions). The cut holds until a new container joins
that version (a new deploy) or `resume` is called (the admin listener's POST /canary/<service>/<version>/resume).

Plain state for views and metrics: `ServiceCanary.describe(now)` and `VersionWindow` fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from twisted.logger import Logger

if TYPE_CHECKING:
    from labelgw.core.backends import Backend, ServicePool

__all__ = [
    "BUCKETS",
    "DEFAULT_WINDOW",
    "MIN_REQUESTS",
    "SLOTS",
    "CanaryAnalyzer",
    "CanaryState",
    "Cut",
    "ServiceCanary",
    "VersionWindow",
    "bucket_of",
    "describe_service",
    "bucket_upper",
]

DEFAULT_WINDOW = 60.0
SLOTS = 60
MIN_REQUESTS = 20
# Latency histogram: bucket i holds (upper(i-1), upper(i)], upper(i) = _BASE * _GROWTH**i; the last bucket
# takes everything above. 4 buckets per doubling (±10 % around a bucket's middle), 0.25 ms to about 65 s.
_BASE = 0.00025
_GROWTH = 2.0 ** 0.25
_LOG_GROWTH = math.log(_GROWTH)
BUCKETS = 73


def bucket_of(seconds: float) -> int:
    """The histogram bucket of one latency."""
    if seconds <= _BASE:
        return 0
    index = math.ceil(math.log(seconds / _BASE) / _LOG_GROWTH - 1e-9)
    return index if index < BUCKETS else BUCKETS - 1


def bucket_upper(index: int) -> float:
    """The upper bound of a bucket (seconds): what the p99 reports."""
    return _BASE * _GROWTH**index


class VersionWindow:
    """Requests, errors and latencies of one version over the last `window` seconds, in `SLOTS` time slots."""

    __slots__ = ("window", "width", "_head", "_counts", "_errors", "_hists", "requests", "errors", "_hist")

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        if not window > 0:
            raise ValueError("the canary window must be positive")
        self.window = window
        self.width = window / SLOTS
        # The absolute slot number (time // width) of the newest slot; older ones follow it in the ring.
        self._head: int | None = None
        self._counts = [0] * SLOTS
        self._errors = [0] * SLOTS
        self._hists: list[list[int] | None] = [None] * SLOTS
        # Running totals over the slots in the window.
        self.requests = 0
        self.errors = 0
        self._hist = [0] * BUCKETS

    def reset(self) -> None:
        self._head = None
        self._counts = [0] * SLOTS
        self._errors = [0] * SLOTS
        self._hists = [None] * SLOTS
        self.requests = 0
        self.errors = 0
        self._hist = [0] * BUCKETS

    def advance(self, now: float) -> None:
        """Drop the slots that left the window by `now`. Amortised O(1): each slot is dropped once."""
        slot = int(now // self.width)
        head = self._head
        if head is None or slot >= head + SLOTS:
            if head is not None and self.requests:
                self.reset()
            self._head = slot
            return
        if slot <= head:
            return  # the same slot, or a clock that stepped back: count it in the newest slot
        totals = self._hist
        for number in range(head + 1, slot + 1):
            index = number % SLOTS
            count = self._counts[index]
            if count:
                self.requests -= count
                self.errors -= self._errors[index]
                hist = self._hists[index]
                if hist is not None:
                    for bucket, n in enumerate(hist):
                        if n:
                            totals[bucket] -= n
                self._counts[index] = 0
                self._errors[index] = 0
                self._hists[index] = None
        self._head = slot

    def observe(self, now: float, elapsed: float, failed: bool) -> None:
        """One request that ended at `now`: `elapsed` seconds to its response head; `failed`: 5xx or gateway error."""
        self.advance(now)
        head = self._head
        index = (head if head is not None else 0) % SLOTS
        self._counts[index] += 1
        self.requests += 1
        if failed:
            self._errors[index] += 1
            self.errors += 1
        bucket = bucket_of(elapsed)
        hist = self._hists[index]
        if hist is None:
            hist = self._hists[index] = [0] * BUCKETS
        hist[bucket] += 1
        self._hist[bucket] += 1

    def add(self, now: float, requests: int, errors: int, hist: dict[int, int]) -> None:
        """Several requests at once, counted at `now` (another process's window report: labelgw.workers.canary);
        `hist`: bucket -> count (sparse, buckets in range)."""
        if requests <= 0:
            return
        self.advance(now)
        head = self._head
        index = (head if head is not None else 0) % SLOTS
        self._counts[index] += requests
        self.requests += requests
        self._errors[index] += errors
        self.errors += errors
        slot = self._hists[index]
        if slot is None:
            slot = self._hists[index] = [0] * BUCKETS
        totals = self._hist
        for bucket, count in hist.items():
            slot[bucket] += count
            totals[bucket] += count

    @property
    def error_rate(self) -> float:
        """Errors / requests in the window (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The `q` quantile of the window's latencies (a bucket's upper bound, seconds); None without requests."""
        total = self.requests
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bucket, count in enumerate(self._hist):
            seen += count
            if seen >= rank:
                return bucket_upper(bucket)
        return bucket_upper(BUCKETS - 1)

    @property
    def p99(self) -> float | None:
        return self.quantile(0.99)


@dataclass(frozen=True, slots=True)
class CanaryState:
    """One version's figures, as the admin view and the metrics show them (plain fields)."""

    version: str
    requests: int
    errors: int
    error_rate: float
    p99: float | None
    cut: bool
    reason: str | None
    max_error_rate: float | None
    max_latency_ratio: float | None
    stable: bool


@dataclass(frozen=True, slots=True)
class Cut:
    """A version taken out of the split, and why (with the figures)."""

    version: str
    reason: str


class _Version:
    __slots__ = ("window", "ids", "cut")

    def __init__(self, window: float, ids: frozenset[str]) -> None:
        self.window = VersionWindow(window)
        # The containers of the version when it was last seen: a new one is a new deploy.
        self.ids = ids
        self.cut: Cut | None = None


def _limits(backends: Iterable[Backend]) -> tuple[float | None, float | None]:
    error_rate: float | None = None
    ratio: float | None = None
    for backend in backends:
        spec = backend.spec
        if error_rate is None:
            error_rate = spec.canary_max_error_rate
        if ratio is None:
            ratio = spec.canary_max_latency_ratio
    return error_rate, ratio


def _stable(service: ServicePool) -> set[str]:
    """The versions whose containers declare no traffic share."""
    declared = {backend.version or "" for backend in service.backends.values() if backend.spec.traffic is not None}
    return {backend.version or "" for backend in service.backends.values()} - declared


class ServiceCanary:
    """The windows and cuts of one service's versions (kept on its ServicePool as `canary`)."""

    _log = Logger()

    def __init__(self, window: float = DEFAULT_WINDOW, service: str = "") -> None:
        self.window = window
        self.service = service
        self.versions: dict[str, _Version] = {}
        # Clock time of the next evaluation of the rule (once per slot).
        self.next_check = -math.inf

    def cut_versions(self) -> frozenset[str]:
        return frozenset(version for version, state in self.versions.items() if state.cut is not None)

    def sync(self, backends: Iterable[Backend]) -> list[str]:
        """Called whenever the service's backends change: a version with a container it had not seen before
        is a new deploy, and starts afresh (window emptied, cut lifted). Returns the versions reset."""
        ids: dict[str, set[str]] = {}
        for backend in backends:
            ids.setdefault(backend.version or "", set()).add(backend.key)
        reset = []
        for version, current in ids.items():
            state = self.versions.get(version)
            frozen = frozenset(current)
            if state is None:
                self.versions[version] = _Version(self.window, frozen)
                continue
            if not frozen <= state.ids:
                if state.cut is not None:
                    self._log.info(
                        "canary: version {version} of service {service} has a new container: its cut is lifted "
                        "and its window starts afresh", version=version, service=self.service,
                    )
                reset.append(version)
                state.window.reset()
                state.cut = None
            state.ids = frozen
        for version in [version for version in self.versions if version not in ids]:
            del self.versions[version]
        return reset

    def observe(self, version: str, now: float, elapsed: float, failed: bool) -> None:
        state = self.versions.get(version)
        if state is not None:
            state.window.observe(now, elapsed, failed)

    def resume(self, version: str) -> bool:
        """Lift a cut and start the version's window afresh; False when the version is unknown."""
        state = self.versions.get(version)
        if state is None:
            return False
        state.cut = None
        state.window.reset()
        return True

    def reference(self, service: ServicePool, now: float) -> str | None:
        """The stable version: the one without a traffic share (several: the busiest in the window)."""
        candidates = sorted(_stable(service) & set(self.versions))
        if not candidates:
            return None
        best = candidates[0]
        best_requests = -1
        for version in candidates:
            window = self.versions[version].window
            window.advance(now)
            if window.requests > best_requests:
                best, best_requests = version, window.requests
        return best

    def evaluate(self, service: ServicePool, now: float) -> list[Cut]:
        """Apply the rule to every version that has limits and is not cut yet; returns the new cuts."""
        reference = self.reference(service, now)
        ref_window = self.versions[reference].window if reference is not None else None
        ref_ok = ref_window is not None and ref_window.requests >= MIN_REQUESTS
        by_version: dict[str, list[Backend]] = {}
        for backend in service.backends.values():
            by_version.setdefault(backend.version or "", []).append(backend)
        cuts = []
        for version, state in self.versions.items():
            if version == reference or state.cut is not None:
                continue
            max_error_rate, max_ratio = _limits(by_version.get(version, ()))
            if max_error_rate is None and max_ratio is None:
                continue
            window = state.window
            window.advance(now)
            if window.requests < MIN_REQUESTS:
                continue
            reason = None
            if max_error_rate is not None:
                # Without a reference that has enough requests, the canary is held to a zero error rate.
                ref_rate = ref_window.error_rate if ref_window is not None and ref_ok else 0.0
                rate = window.error_rate
                if rate - ref_rate > max_error_rate:
                    reason = (
                        f"error rate {100 * rate:.1f} % ({window.errors} of {window.requests} requests in "
                        f"{self.window:g} s) against {100 * ref_rate:.1f} % for "
                        f"{_name(reference)}: more than {100 * max_error_rate:g} points worse"
                    )
            if reason is None and max_ratio is not None and ref_ok and ref_window is not None:
                p99, ref_p99 = window.p99, ref_window.p99
                if p99 is not None and ref_p99 is not None and ref_p99 > 0 and p99 / ref_p99 > max_ratio:
                    reason = (
                        f"p99 {1000 * p99:.1f} ms ({window.requests} requests in {self.window:g} s) against "
                        f"{1000 * ref_p99:.1f} ms for {_name(reference)}: {p99 / ref_p99:.2f} times, "
                        f"more than {max_ratio:g}"
                    )
            if reason is not None:
                state.cut = Cut(version, reason)
                cuts.append(state.cut)
        return cuts

    def describe(self, service: ServicePool, now: float) -> dict[str, CanaryState]:
        reference = self.reference(service, now)
        by_version: dict[str, list[Backend]] = {}
        for backend in service.backends.values():
            by_version.setdefault(backend.version or "", []).append(backend)
        described = {}
        for version, state in self.versions.items():
            window = state.window
            window.advance(now)
            max_error_rate, max_ratio = _limits(by_version.get(version, ()))
            described[version] = CanaryState(
                version=version,
                requests=window.requests,
                errors=window.errors,
                error_rate=window.error_rate,
                p99=window.p99,
                cut=state.cut is not None,
                reason=state.cut.reason if state.cut is not None else None,
                max_error_rate=max_error_rate,
                max_latency_ratio=max_ratio,
                stable=version == reference,
            )
        return described


def describe_service(service: ServicePool, now: float) -> dict[str, CanaryState]:
    """Every version's canary figures; versions with no state yet (no request seen) read as empty windows."""
    canary = service.canary
    described = canary.describe(service, now) if canary is not None else {}
    for version in sorted({backend.version or "" for backend in service.backends.values()} - described.keys()):
        max_error_rate, max_ratio = _limits(b for b in service.backends.values() if (b.version or "") == version)
        described[version] = CanaryState(version, 0, 0, 0.0, None, False, None, max_error_rate, max_ratio, False)
    return described


def _name(version: str | None) -> str:
    return f"stable version {version!r}" if version is not None else "no stable version"


class CanaryAnalyzer:
    """Feeds each finished request to its service's windows and applies the rule once per slot.

    Held by the gateway (`Gateway.canary`); the exchange calls `observe` when a request ends. Services that are
    not split by version cost one attribute read."""

    _log = Logger()

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        if not window > 0:
            raise ValueError("the canary window must be positive")
        self.window = window

    def state_of(self, service: ServicePool) -> ServiceCanary:
        canary = service.canary
        if canary is None:
            canary = service.canary = ServiceCanary(self.window, service.name)
            canary.sync(service.backends.values())
        return canary

    def observe(self, service: ServicePool, backend: Backend, now: float, elapsed: float, failed: bool) -> None:
        if service.split is None:
            return
        canary = service.canary
        if canary is None:
            canary = self.state_of(service)
        canary.observe(backend.version or "", now, elapsed, failed)
        if now >= canary.next_check:
            canary.next_check = now + self.window / SLOTS
            self.check(service, canary, now)

    def check(self, service: ServicePool, canary: ServiceCanary, now: float) -> list[Cut]:
        cuts = canary.evaluate(service, now)
        if cuts:
            for cut in cuts:
                self._log.warn(
                    "canary: version {version} of service {service} cut to 0 % of new clients: {reason}",
                    version=cut.version, service=service.name, reason=cut.reason,
                )
            # The split is rebuilt without the cut versions' shares.
            service.refresh()
        return cuts

    def resume(self, service: ServicePool, version: str) -> bool:
        """Lift a cut (admin); False when the service has no such version."""
        if not any((backend.version or "") == version for backend in service.backends.values()):
            return False
        canary = self.state_of(service)
        was_cut = version in canary.cut_versions()
        canary.resume(version)
        if was_cut:
            self._log.info(
                "canary: version {version} of service {service} resumed by the admin", version=version, service=service.name,
            )
        service.refresh()
        return True
