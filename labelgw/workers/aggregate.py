# -*- test-case-name: tests.test_workers_aggregate -*-
"""/metrics of the whole gateway under a supervisor: the workers' expositions (each worker sends its own every
REPORT_INTERVAL, labelgw.workers.protocol) merged with the supervisor's.

Each family is read from where it is true:
- the supervisor's only: what it owns (Docker side, active health, readiness, the process collectors of the
  supervisor itself);
- summed over the workers: counters, histograms and in-flight gauges of the traffic they serve;
- the largest of the workers: `labelgw_backend_ejected` (1 while any worker ejects it: they follow each other);
- the mean of the workers: the balancer's latency estimate.
A family none of the workers reported yet comes from the supervisor (zero or absent)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SUPERVISOR_ONLY_PREFIXES = ("labelgw_docker_", "process_", "python_")
SUPERVISOR_ONLY = frozenset({"labelgw_backend_ready", "labelgw_backend_health"})
LARGEST = frozenset({"labelgw_backend_ejected"})
MEAN = frozenset({"labelgw_backend_latency_estimate_seconds"})


def _supervisor_only(name: str) -> bool:
    return name in SUPERVISOR_ONLY or name.startswith(SUPERVISOR_ONLY_PREFIXES)


# Families whose samples only grow: what a worker counted stays counted after it exits (a reload replaces every
# worker; the gateway's counters must not fall back to zero).
COUNTING = frozenset({"counter", "histogram", "summary"})
CarriedKey = tuple[str, str, str, str, tuple[tuple[str, str], ...]]


def carry(carried: dict[CarriedKey, float], exposition: bytes) -> None:
    """Add the counting samples of an exited worker's last exposition to `carried`."""
    if not exposition:
        return
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        if family.type not in COUNTING or _supervisor_only(family.name):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (family.name, family.type, family.documentation, sample.name, tuple(sorted(sample.labels.items())))
            carried[key] = carried.get(key, 0.0) + sample.value


def merge(expositions: Iterable[bytes], carried: dict[CarriedKey, float] | None = None) -> dict[str, Metric]:
    """The families of several expositions, each sample combined over them by its family's rule, plus what exited
    workers counted (`carried`)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for (name, kind, documentation, sample_name, labels), value in (carried or {}).items():
        if name not in merged:
            merged[name] = Metric(name, documentation, kind)
            values[name] = {}
        values[name].setdefault((sample_name, labels), []).append(value)
    for text in expositions:
        if not text:
            continue
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if _supervisor_only(family.name):
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples.setdefault(key, []).append(sample.value)
    for name, family in merged.items():
        for (sample_name, labels), found in values[name].items():
            if name in LARGEST:
                value = max(found)
            elif name in MEAN:
                value = sum(found) / len(found)
            else:
                value = sum(found)
            family.add_sample(sample_name, dict(labels), value)
    return merged


class WorkersCollector(Collector):
    """The supervisor's own collector, with the traffic families replaced by the workers' merged ones, and the
    workers' own series (how many, restarts, reloads, push latency)."""

    def __init__(self, own: Collector, pool: Callable[[], Any]) -> None:
        self._own = own
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool()
        reports = [p.report[1] for p in pool.processes() if p.report is not None] if pool is not None else []
        merged = merge(reports, getattr(pool, "carried", None))
        for family in self._own.collect():
            if family.name not in merged:
                yield family
        yield from merged.values()
        if pool is None:
            return
        yield GaugeMetricFamily("labelgw_workers", "Worker processes serving (the current generation)",
                                value=sum(1 for p in pool.workers.values() if p.state == "ready"))
        yield CounterMetricFamily("labelgw_worker_restarts", "Workers restarted after they died", value=pool.restarts)
        yield CounterMetricFamily("labelgw_worker_reloads", "Reloads (new generations of workers started)",
                                  value=pool.reloads)
        latency = pool.push_latency
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(latency.bounds, latency.counts):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", running + latency.counts[-1]))
        yield HistogramMetricFamily(
            "labelgw_worker_push_seconds",
            "From a change in the supervisor (route, backend, health, ejection) to its application by every worker",
            buckets=buckets, sum_value=latency.total,
        )
