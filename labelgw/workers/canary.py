# -*- test-case-name: tests.test_workers_canary -*-
"""Canary analysis by version (labelgw.core.canary) for the whole gateway under `--workers N`.

The workers serve the traffic, the supervisor decides: each worker counts, per (service, version), the requests
that ended since its last report, their errors and their latency histogram (labelgw.core.canary's buckets, sent
sparse) and sends that delta every CANARY_INTERVAL (``("windows", deltas)``, only when something ended). The
supervisor adds each delta to its own window of that version (at the time it reads it: at most CANARY_INTERVAL
late, a small part of a window of tens of seconds), so that its windows hold the gateway's traffic, and applies the
same rule (`CanaryAnalyzer.check`). A cut, or a resume on the supervisor's admin listener, is pushed to every worker
(``("canary", seq, service, version, reason)``, reason None for a resume) and applied there as the supervisor made
it; a worker never cuts on its own part of the traffic. A worker that starts gets the cuts in force after its
state. A new deploy of the version (a container it had not seen) lifts the cut in the supervisor and in every
worker alike, since both apply the same registry changes in the same order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labelgw.core.canary import BUCKETS, CanaryAnalyzer, Cut

if TYPE_CHECKING:
    from labelgw.core.backends import Backend, ServicePool

# Seconds between two window reports of a worker.
CANARY_INTERVAL = 0.5
# What the supervisor takes from one report at most (a worker parses hostile traffic: its reports are bounded).
MAX_ENTRIES = 10_000

# (service, version) -> (requests, errors, {bucket: count})
Deltas = dict[tuple[str, str], tuple[int, int, dict[int, int]]]


class WorkerCanary(CanaryAnalyzer):
    """A worker's analyzer: counts what ends for the supervisor, and applies the cuts the supervisor decides."""

    def __init__(self, window: float) -> None:
        CanaryAnalyzer.__init__(self, window)
        self._deltas: dict[tuple[str, str], list[Any]] = {}

    def observe(self, service: ServicePool, backend: Backend, now: float, elapsed: float, failed: bool) -> None:
        if service.split is None:
            return
        from labelgw.core.canary import bucket_of

        key = (service.name, backend.version or "")
        delta = self._deltas.get(key)
        if delta is None:
            delta = self._deltas[key] = [0, 0, {}]
        delta[0] += 1
        if failed:
            delta[1] += 1
        bucket = bucket_of(elapsed)
        hist = delta[2]
        hist[bucket] = hist.get(bucket, 0) + 1

    def take(self) -> Deltas:
        """What ended since the last call (plain values, for the supervisor)."""
        deltas, self._deltas = self._deltas, {}
        return {key: (requests, errors, hist) for key, (requests, errors, hist) in deltas.items()}

    def apply(self, service: ServicePool, version: str, reason: str | None) -> bool:
        """The supervisor cut `version` (`reason`) or lifted its cut (None); False when this worker does not know
        the version."""
        if not any((backend.version or "") == version for backend in service.backends.values()):
            return False
        canary = self.state_of(service)
        state = canary.versions.get(version)
        if state is None:
            return False
        if reason is None:
            canary.resume(version)
        else:
            state.cut = Cut(version, reason)
        service.refresh()
        return True

    def resume(self, service: ServicePool, version: str) -> bool:
        return self.apply(service, version, None)


class GatewayCanary(CanaryAnalyzer):
    """The supervisor's analyzer: its windows are fed by the workers' deltas (it serves nothing itself), and each
    cut or resume is told to `on_change(service, version, reason)` (the push to every worker)."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        CanaryAnalyzer.__init__(self, window)
        self.clock = clock
        self.on_change: Callable[[str, str, str | None], None] = lambda service, version, reason: None

    def add(self, registry: Any, deltas: Any) -> list[Cut]:
        """Add one worker's report to the windows and apply the rule to the services it touched; returns the new
        cuts. Entries that are not well formed are skipped."""
        if not isinstance(deltas, dict):
            return []
        now = self.clock()
        touched: dict[str, ServicePool] = {}
        for entry, (key, value) in enumerate(deltas.items()):
            if entry >= MAX_ENTRIES:
                break
            parsed = _parse(key, value)
            if parsed is None:
                continue
            name, version, requests, errors, hist = parsed
            pool = registry.services.get(name)
            if pool is None or pool.split is None:
                continue
            state = self.state_of(pool).versions.get(version)
            if state is None:
                continue
            state.window.add(now, requests, errors, hist)
            touched[name] = pool
        cuts: list[Cut] = []
        for pool in touched.values():
            canary = self.state_of(pool)
            cuts += self.check(pool, canary, now)
        return cuts

    def check(self, service: ServicePool, canary: Any, now: float) -> list[Cut]:
        cuts = CanaryAnalyzer.check(self, service, canary, now)
        for cut in cuts:
            self.on_change(service.name, cut.version, cut.reason)
        return cuts

    def resume(self, service: ServicePool, version: str) -> bool:
        if not CanaryAnalyzer.resume(self, service, version):
            return False
        self.on_change(service.name, version, None)
        return True

    def cuts(self, registry: Any) -> Iterator[tuple[str, str, str]]:
        """(service, version, reason) of every cut in force: what a worker that starts is told."""
        for name, pool in registry.services.items():
            canary = pool.canary
            if canary is None:
                continue
            for version, state in canary.versions.items():
                if state.cut is not None:
                    yield name, version, state.cut.reason


def _parse(key: Any, value: Any) -> tuple[str, str, int, int, dict[int, int]] | None:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(part, str) for part in key)):
        return None
    if not (isinstance(value, tuple) and len(value) == 3):
        return None
    requests, errors, hist = value
    if not (isinstance(requests, int) and isinstance(errors, int) and isinstance(hist, dict)):
        return None
    if requests <= 0 or not 0 <= errors <= requests:
        return None
    clean: dict[int, int] = {}
    for bucket, count in hist.items():
        if isinstance(bucket, int) and isinstance(count, int) and 0 <= bucket < BUCKETS and count > 0:
            clean[bucket] = count
    if sum(clean.values()) != requests:
        return None  # a histogram that does not count every request would skew the p99
    return key[0], key[1], requests, errors, clean


def canary_families(registry: Any, now: float) -> Iterator[Metric]:
    """The canary figures of every split service, as the supervisor's windows hold them (the gateway's)."""
    from labelgw.core.canary import describe_service

    cut = GaugeMetricFamily("labelgw_canary_cut", "1 while canary analysis keeps the version out of the split",
                            labels=["service", "version"])
    requests = GaugeMetricFamily("labelgw_canary_window_requests", "Requests in the version's canary window",
                                 labels=["service", "version"])
    errors = GaugeMetricFamily("labelgw_canary_window_errors", "Errors (5xx, gateway errors) in the version's "
                               "canary window", labels=["service", "version"])
    p99 = GaugeMetricFamily("labelgw_canary_window_p99_seconds", "p99 time to the response head in the version's "
                            "canary window", labels=["service", "version"])
    for name, pool in sorted(registry.services.items()):
        if pool.split is None and pool.canary is None:
            continue
        for version, figures in sorted(describe_service(pool, now).items()):
            labels = [name, version]
            cut.add_metric(labels, 1.0 if figures.cut else 0.0)
            requests.add_metric(labels, figures.requests)
            errors.add_metric(labels, figures.errors)
            if figures.p99 is not None:
                p99.add_metric(labels, figures.p99)
    yield from (cut, requests, errors, p99)


class CanaryCollector(Collector):
    """The canary families for the supervisor's /metrics."""

    def __init__(self, registry: Any, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        return canary_families(self._registry, self._clock())
