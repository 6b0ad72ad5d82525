"""/metrics of the whole gateway under a supervisor (labelgw.workers.aggregate): the workers' expositions merged,
each family by its rule, beside the supervisor's own series."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labelgw.workers.aggregate import WorkersCollector, merge
from labelgw.workers.supervisor import PushHistogram


def exposition(requests: float, in_flight: float, ejected: float, latency: float) -> bytes:
    registry = CollectorRegistry()

    class Worker(Collector):
        def collect(self) -> Iterator[Metric]:
            family = CounterMetricFamily("labelgw_requests", "Requests", labels=["service"])
            family.add_metric(["api"], requests)
            yield family
            yield GaugeMetricFamily("labelgw_requests_in_flight", "In flight", value=in_flight)
            yield GaugeMetricFamily("labelgw_backend_ejected", "Ejected", value=ejected)
            yield GaugeMetricFamily("labelgw_backend_latency_estimate_seconds", "Estimate", value=latency)
            yield GaugeMetricFamily("labelgw_backend_ready", "Ready (the supervisor's)", value=7)

    registry.register(Worker())
    return generate_latest(registry)


def values(families: Any) -> dict[str, float]:
    return {sample.name: sample.value for family in families for sample in family.samples}


def test_counters_and_gauges_are_summed_ejection_is_the_largest_estimate_the_mean() -> None:
    merged = merge([exposition(10, 1, 0, 0.1), exposition(5, 2, 1, 0.3), b""])
    got = values(merged.values())
    assert got["labelgw_requests_total"] == 15
    assert got["labelgw_requests_in_flight"] == 3
    assert got["labelgw_backend_ejected"] == 1
    assert abs(got["labelgw_backend_latency_estimate_seconds"] - 0.2) < 1e-9
    assert "labelgw_backend_ready" not in got  # the supervisor's own


class FakeProcess:
    def __init__(self, report: bytes) -> None:
        self.report = ("report", report, {})
        self.state = "ready"


class FakePool:
    def __init__(self, *reports: bytes) -> None:
        self._processes = [FakeProcess(r) for r in reports]
        self.workers = dict(enumerate(self._processes, 1))
        self.restarts = 2
        self.reloads = 1
        self.push_latency = PushHistogram()
        self.push_latency.observe(0.001)

    def processes(self) -> list[FakeProcess]:
        return self._processes


class Own(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("labelgw_requests_in_flight", "In flight (the supervisor serves none)", value=0)
        yield GaugeMetricFamily("labelgw_backend_ready", "Ready", value=1)
        yield CounterMetricFamily("labelgw_docker_events", "Docker events", value=4)


def test_the_page_has_each_family_once() -> None:
    registry = CollectorRegistry()
    registry.register(WorkersCollector(Own(), lambda: FakePool(exposition(10, 1, 0, 0.1), exposition(5, 2, 0, 0.1))))
    text = generate_latest(registry).decode()
    assert text.count("# TYPE labelgw_requests_in_flight gauge") == 1
    assert "labelgw_requests_in_flight 3.0" in text
    assert "labelgw_backend_ready 1.0" in text and "labelgw_docker_events_total 4.0" in text
    assert "labelgw_workers 2.0" in text and "labelgw_worker_restarts_total 2.0" in text
    assert 'labelgw_worker_push_seconds_bucket{le="0.001"} 1.0' in text
    # Before the pool exists (the page is registered while the supervisor is built): its own series only.
    alone = CollectorRegistry()
    alone.register(WorkersCollector(Own(), lambda: None))
    assert "labelgw_requests_in_flight 0.0" in generate_latest(alone).decode()


def test_what_an_exited_worker_counted_stays_counted() -> None:
    from labelgw.workers.aggregate import carry

    carried: dict[Any, float] = {}
    carry(carried, exposition(10, 1, 0, 0.1))
    carry(carried, exposition(5, 3, 0, 0.1))
    # Counters carried; gauges (in flight, ejected, estimate) are not: the exited workers hold nothing now.
    got = values(merge([exposition(2, 1, 0, 0.1)], carried).values())
    assert got["labelgw_requests_total"] == 17
    assert got["labelgw_requests_in_flight"] == 1
    # No live worker at all (between a worker's exit and its replacement's first report): the counts stay.
    assert values(merge([], carried).values()) == {"labelgw_requests_total": 15.0}


def test_the_pool_carries_the_last_report_of_a_worker_that_ended() -> None:
    from test_workers_protocol import World

    world = World(1)
    world.pool.start()
    (one,) = world.spawned
    world.say(one, ("report", exposition(7, 1, 0, 0.1), {}))
    world.die(one, 9)
    assert sum(world.pool.carried.values()) == 7
