"""Prometheus metrics: ``GET /metrics`` on the admin listener.

Two halves, so that the data path pays almost nothing:

- L{RequestMetrics}, on the Gateway (``gateway.metrics``; None when ``metrics: false``): plain ints and small dicts
  updated once per request by the exchange and the dispatcher. A histogram is a list of bucket counts found with
  ``bisect``. No locks (the reactor thread is the only writer), no label lookups, no prometheus_client objects.
- L{GatewayCollector}: a custom collector that reads those counters and the live objects (registry, backends,
  connections, the Docker watcher, the TLS factory) at scrape time and builds the metric families there. A
  service or backend that went away is simply not in the registry any more, so its series are gone; the
  counters kept for it here are dropped at the same scrape.

Label sets are bounded: services, versions and backends come from the registry; methods are folded into a
fixed set (L{METHODS}, else ``other``); statuses into their class. Paths and client addresses are never labels.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from labelgw.core import balancer
# The counters the data path adds to, the histogram bounds and the method labels: in the module labelgw compiles
# (the access log adds a repeated request's counters there).
from labelgw.http.linekind import BUCKETS, METHODS, Slot, bucket

__all__ = [
    "BUCKETS", "DockerMetrics", "GatewayCollector", "METHODS", "RequestMetrics", "Histogram", "metrics_registry",
    "render",
]

# Status -> its class (status // 100) for the counters' rows, by subscript: cheaper than the division and a bound
# test per request (a status past 999, never made by labelgw's parsers, raises IndexError: class 9).
STATUS_CLASS: list[int] = [status // 100 for status in range(1000)]
# Status 0: the client went away before any response started.
_STATUS_CLASSES = {0: "none", 1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

# Causes of labelgw's own 502/503/504 answers.
CONNECT_FAILED = "connect_failed"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"
NO_READY_BACKEND = "no_ready_backend"
IN_FLIGHT_LIMIT = "in_flight_limit"
SERVICE_IN_FLIGHT_LIMIT = "service_in_flight_limit"


class Histogram:
    """Bucket counts (not cumulative: one increment per observation), their sum and count."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def family_samples(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as prometheus_client wants them, and the sum."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(BUCKETS, self.counts):
            running += count
            buckets.append((_le(bound), running))
        running += self.counts[-1]
        buckets.append(("+Inf", running))
        return buckets, self.total


def _le(bound: float) -> str:
    return repr(bound)


class _ServiceStats:
    """One service's counters of requests labelgw answered itself (refused in the dispatcher), keyed by label
    values; the exchanges' counters are in L{Slot}s, merged in at scrape time."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        # (version or "", method label, status // 100) -> requests.
        self.requests: dict[tuple[str, str, int], int] = {}


class RequestMetrics:
    """The data path's counters, updated on the reactor thread. `clock`: seconds, as the Gateway's clock."""

    def __init__(self) -> None:
        self.services: dict[str, _ServiceStats] = {}
        # (service name, exchange version) -> its slot; `plain`: the same slots of the exchanges without a
        # version (services not split by version: nearly all), by service name, found without making a key.
        self.slots: dict[tuple[str, str | None], Slot] = {}
        self.plain: dict[str, Slot] = {}
        # Requests answered without a service (400 for a refused path, 404, 308 to HTTPS): (method, class) -> n.
        self.unrouted: dict[tuple[str, int], int] = {}
        # labelgw's own 502/503/504 answers: (status, cause) -> n.
        self.gateway_errors: dict[tuple[int, str], int] = {}
        # Failed connection attempts per backend key (container id); pruned to live backends at scrape time.
        self.connect_errors: dict[str, int] = {}

    def _service(self, name: str) -> _ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = _ServiceStats()
        return stats

    def slot(self, name: str, version: str | None) -> Slot:
        """The counters of (service, version), made on first use."""
        slot = self.slots.get((name, version))
        return slot if slot is not None else self._slot(name, version)

    def _slot(self, name: str, version: str | None) -> Slot:
        slot = self.slots[(name, version)] = Slot(name, version or "")
        if version is None:
            self.plain[name] = slot
        return slot

    def forget(self, live: Any) -> None:
        """Drop the counters of services not in `live` (a container of names): their series go with them."""
        for name in [name for name in self.services if name not in live]:
            del self.services[name]
        for key in [key for key in self.slots if key[0] not in live]:
            del self.slots[key]
            self.plain.pop(key[0], None)

    def exchange_done(self, exchange: Any, now: float) -> None:
        """One exchange ended (called once per request, from Exchange._complete). Kept to the fewest interpreter
        operations (bench/README.md, issue 9's cost; each costs ~50 instructions): the slot found by subscript (no
        key tuple for an exchange without a version), a list slot per status class, the duration's bucket by
        comparisons for fast answers, a body size added only when there is one."""
        try:
            if exchange.version is None:
                slot = self.plain[exchange.route.service.name]
            else:
                slot = self.slots[(exchange.route.service.name, exchange.version)]
        except KeyError:
            slot = self._slot(exchange.route.service.name, exchange.version)
        status = exchange.status
        method = exchange.head.method
        try:
            (slot.get if method == b"GET" else slot.row(method))[STATUS_CLASS[status]] += 1
        except IndexError:
            (slot.get if method == b"GET" else slot.row(method))[9] += 1
        if exchange.bytes_in:
            slot.bytes_in += exchange.bytes_in
        if exchange.bytes_out:
            slot.bytes_out += exchange.bytes_out
        if status == 101:
            return  # a tunnel's lifetime (a WebSocket's hours) is not a request duration
        elapsed = now - exchange.created_at
        slot.total += elapsed
        # What bisect_left(BUCKETS, elapsed) finds, as comparisons (compiled with the rest of linekind).
        slot.counts[bucket(elapsed)] += 1

    def by_service(self) -> dict[str, tuple[dict[tuple[str, str, int], int], dict[str, Histogram], int, int]]:
        """Per service: requests by (version, method label, status class), duration histograms by version, body
        bytes in and out: the slots and the refused counters merged, as the scrape shows them."""
        merged: dict[str, tuple[dict[tuple[str, str, int], int], dict[str, Histogram], int, int]] = {}
        for name, stats in self.services.items():
            merged[name] = (dict(stats.requests), {}, 0, 0)
        for slot in self.slots.values():
            requests, durations, bytes_in, bytes_out = merged.get(slot.service) or ({}, {}, 0, 0)
            version = slot.version
            for method, row in slot.rows.items():
                label = METHODS.get(method, "other")
                for status_class, count in enumerate(row):
                    if count:
                        key = (version, label, status_class)
                        requests[key] = requests.get(key, 0) + count
            if any(slot.counts):
                histogram = durations.get(version)
                if histogram is None:
                    histogram = durations[version] = Histogram()
                histogram.counts = [a + b for a, b in zip(histogram.counts, slot.counts)]
                histogram.total += slot.total
            merged[slot.service] = (requests, durations, bytes_in + slot.bytes_in, bytes_out + slot.bytes_out)
        return merged

    def gateway_error(self, status: int, cause: str) -> None:
        key = (status, cause)
        self.gateway_errors[key] = self.gateway_errors.get(key, 0) + 1

    def refused(self, service: str | None, version: str | None, method: bytes, status: int, cause: str | None = None) -> None:
        """A request labelgw answered itself in the dispatcher (no exchange): 400, 404, 308, 503."""
        label = METHODS.get(method, "other")
        if service is None:
            key = (label, status // 100)
            self.unrouted[key] = self.unrouted.get(key, 0) + 1
        else:
            requests = self._service(service).requests
            rkey = (version or "", label, status // 100)
            requests[rkey] = requests.get(rkey, 0) + 1
        if cause is not None:
            self.gateway_error(status, cause)

    def connect_failed(self, backend_key: str) -> None:
        self.connect_errors[backend_key] = self.connect_errors.get(backend_key, 0) + 1


class DockerMetrics:
    """The Docker side's timing: from an event's arrival to the route change it caused being applied.

    Used as the watcher's sink (it forwards every call to the registry) and told of each event by the watcher's
    `event_observer` hook. The wait is measured from the container's latest event: an event the tracker drops
    (nothing changed) leaves no stale start behind. Events for containers that never reach the sink (unlabelled
    ones) are forgotten when more than L{PENDING_LIMIT} wait."""

    PENDING_LIMIT = 4096

    def __init__(self, sink: Any, clock: Callable[[], float]) -> None:
        self._sink = sink
        self._clock = clock
        self._pending: dict[str, float] = {}
        self.apply_latency = Histogram()

    def event_received(self, event: Mapping[str, Any]) -> None:
        container_id = _event_container(event)
        if not container_id:
            return
        if len(self._pending) >= self.PENDING_LIMIT and container_id not in self._pending:
            self._pending.clear()
        self._pending[container_id] = self._clock()

    def _applied(self, container_id: str) -> None:
        started = self._pending.pop(container_id, None)
        if started is not None:
            self.apply_latency.observe(max(0.0, self._clock() - started))

    # The RouteSink interface (labelgw.docker.tracker.RouteSink), forwarded.

    def apply(self, container_id: str, outcome: Any) -> None:
        self._sink.apply(container_id, outcome)
        self._applied(container_id)

    def mark_down(self, container_id: str) -> None:
        self._sink.mark_down(container_id)
        self._applied(container_id)

    def remove(self, container_id: str) -> None:
        self._sink.remove(container_id)
        self._applied(container_id)

    def resync(self, outcomes: Mapping[str, Any]) -> None:
        self._sink.resync(outcomes)
        for container_id in list(self._pending):
            if container_id in outcomes:
                self._applied(container_id)

    def __getattr__(self, name: str) -> Any:
        # Anything else a sink offers (the registry's views) reads through.
        return getattr(self._sink, name)


def _event_container(event: Mapping[str, Any]) -> str | None:
    actor = event.get("Actor") or {}
    if event.get("Type") == "network":
        attributes = actor.get("Attributes") or {}
        found = attributes.get("container")
    else:
        found = event.get("id") or actor.get("ID")
    return found if isinstance(found, str) else None


class GatewayCollector(Collector):
    """Reads the running gateway at scrape time. Every argument but the gateway and registry is optional (a
    gateway without HTTPS or without Docker has none of those series); `watcher` returns the Docker watcher (or
    None), since it is made after the admin listener."""

    def __init__(
        self,
        gateway: Any,
        registry: Any,
        watcher: Callable[[], Any] | None = None,
        docker: DockerMetrics | None = None,
        tls_factory: Any = None,
        selector: Any = None,
    ) -> None:
        self._gateway = gateway
        self._registry = registry
        self._watcher = watcher
        self._docker = docker
        self._tls_factory = tls_factory
        self._selector = selector

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._backends()
        yield from self._docker_side()
        yield from self._connections()

    def _requests(self) -> Iterator[Metric]:
        gateway = self._gateway
        metrics: RequestMetrics | None = gateway.metrics
        services = self._registry.services
        requests = CounterMetricFamily(
            "labelgw_requests", "Requests by service, version, method and status class (status_class none: the "
            "client went away before a response started; service empty: not routed)",
            labels=["service", "version", "method", "status_class"],
        )
        durations = HistogramMetricFamily(
            "labelgw_request_duration_seconds", "Time from the request head to the end of the exchange, of "
            "requests forwarded to a backend (tunnels excepted)", labels=["service", "version"],
        )
        bytes_in = CounterMetricFamily(
            "labelgw_request_body_bytes", "Request body bytes forwarded to backends", labels=["service"],
        )
        bytes_out = CounterMetricFamily(
            "labelgw_response_body_bytes", "Response body bytes (and tunnelled bytes) relayed to clients",
            labels=["service"],
        )
        errors = CounterMetricFamily(
            "labelgw_gateway_errors", "labelgw's own 502/503/504 answers by cause", labels=["status", "cause"],
        )
        if metrics is not None:
            # Counters of services that are gone are dropped: their series disappear with them.
            metrics.forget(services)
            for name, (counts, histograms, sent, received) in sorted(metrics.by_service().items()):
                for (version, method, status), count in sorted(counts.items()):
                    requests.add_metric([name, version, method, _STATUS_CLASSES.get(status, "other")], count)
                for version, histogram in sorted(histograms.items()):
                    buckets, total = histogram.family_samples()
                    durations.add_metric([name, version], buckets, total)
                bytes_in.add_metric([name], sent)
                bytes_out.add_metric([name], received)
            for (method, status), count in sorted(metrics.unrouted.items()):
                requests.add_metric(["", "", method, _STATUS_CLASSES.get(status, "other")], count)
            for (status, cause), count in sorted(metrics.gateway_errors.items()):
                errors.add_metric([str(status), cause], count)
        yield requests
        yield durations
        yield bytes_in
        yield bytes_out
        yield errors
        yield GaugeMetricFamily("labelgw_requests_in_flight", "Requests in flight", value=gateway.in_flight)
        per_service = GaugeMetricFamily(
            "labelgw_service_requests_in_flight", "Requests in flight per service", labels=["service"],
        )
        for name, pool in sorted(services.items()):
            per_service.add_metric([name], pool.in_flight)
        yield per_service
        yield CounterMetricFamily("labelgw_retries", "Requests sent a second time", value=gateway.retries)
        # The access log's dropped lines (labelgw.http.accesslog.AccessLog); 0 with --access-log off.
        access_log = gateway.access_log
        yield CounterMetricFamily(
            "labelgw_access_log_dropped", "Access log lines dropped because the writer fell behind",
            value=access_log.access_log_dropped if access_log is not None else 0,
        )

    def _backends(self) -> Iterator[Metric]:
        labels = ["service", "version", "backend", "address"]
        in_flight = GaugeMetricFamily("labelgw_backend_in_flight", "Requests in flight per backend", labels=labels)
        latency = GaugeMetricFamily(
            "labelgw_backend_latency_estimate_seconds", "The wrt balancer's latency estimate (decayed to now)",
            labels=labels,
        )
        ready = GaugeMetricFamily("labelgw_backend_ready", "1 when the backend gets traffic", labels=labels)
        ejected = GaugeMetricFamily("labelgw_backend_ejected", "1 while ejected by outlier detection", labels=labels)
        health = GaugeMetricFamily(
            "labelgw_backend_health", "Active health check state (1 for the current one; none: no check)",
            labels=[*labels, "state"],
        )
        ejections = CounterMetricFamily("labelgw_backend_ejections", "Outlier ejections", labels=labels)
        connect_errors = CounterMetricFamily(
            "labelgw_backend_connect_errors", "Failed connection attempts", labels=labels,
        )
        requests = CounterMetricFamily("labelgw_backend_requests", "Requests sent to the backend", labels=labels)
        failures = CounterMetricFamily(
            "labelgw_backend_failures", "Requests that failed at the backend (connect, reset, timeout, 5xx)",
            labels=labels,
        )
        metrics: RequestMetrics | None = self._gateway.metrics
        errors = metrics.connect_errors if metrics is not None else {}
        live: set[str] = set()
        for name, pool in sorted(self._registry.services.items()):
            for backend in sorted(pool.backends.values(), key=lambda b: b.key):
                live.add(backend.key)
                values = [name, backend.version or "", backend.spec.name, f"{backend.address}:{backend.port}"]
                in_flight.add_metric(values, backend.in_flight)
                estimate = balancer.describe(backend).get("latency_ms")
                if estimate is not None:
                    latency.add_metric(values, estimate / 1000.0)
                ready.add_metric(values, 1 if backend.ready else 0)
                ejected.add_metric(values, 1 if backend.ejected_until is not None else 0)
                current = backend.health_state or "none"
                for state in ("none", "unknown", "healthy", "unhealthy"):
                    health.add_metric([*values, state], 1 if state == current else 0)
                ejections.add_metric(values, backend.ejections)
                connect_errors.add_metric(values, errors.get(backend.key, 0))
                requests.add_metric(values, backend.requests)
                failures.add_metric(values, backend.errors)
        for key in [key for key in errors if key not in live]:
            del errors[key]
        yield from (in_flight, latency, ready, ejected, health, ejections, connect_errors, requests, failures)

    def _docker_side(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "labelgw_docker_containers_skipped", "Containers skipped for a bad label (now)",
            value=len(self._registry.rejections),
        )
        watcher = self._watcher() if self._watcher is not None else None
        if watcher is None:
            return
        yield GaugeMetricFamily(
            "labelgw_docker_connected", "1 while the Docker event stream is up", value=1 if watcher.connected else 0,
        )
        yield CounterMetricFamily("labelgw_docker_events", "Docker events received", value=watcher.events_received)
        yield CounterMetricFamily("labelgw_docker_resyncs", "Full resyncs completed", value=watcher.resyncs)
        yield CounterMetricFamily(
            "labelgw_docker_stream_reconnects", "Reconnects of the event stream (after it ended or failed)",
            value=watcher.reconnects,
        )
        if self._docker is not None:
            family = HistogramMetricFamily(
                "labelgw_docker_event_apply_seconds",
                "Time from a Docker event's arrival to its route change being applied",
            )
            buckets, total = self._docker.apply_latency.family_samples()
            family.add_metric([], buckets, total)
            yield family

    def _connections(self) -> Iterator[Metric]:
        from labelgw.http.h2 import H2Protocol

        counts = {"http/1.1": 0, "h2": 0}
        for connection in list(self._gateway.connections):
            counts["h2" if isinstance(connection, H2Protocol) else "http/1.1"] += 1
        family = GaugeMetricFamily("labelgw_connections_open", "Client connections open", labels=["protocol"])
        for protocol, count in counts.items():
            family.add_metric([protocol], count)
        yield family
        factory = self._tls_factory
        if factory is not None:
            yield CounterMetricFamily(
                "labelgw_tls_handshakes", "TLS handshakes completed", value=getattr(factory, "handshakes", 0),
            )
            yield CounterMetricFamily(
                "labelgw_tls_handshake_failures", "TLS connections closed before their handshake completed",
                value=getattr(factory, "handshake_failures", 0),
            )
        if self._selector is not None:
            yield CounterMetricFamily(
                "labelgw_tls_certificates_minted", "Leaf certificates minted by the local CA",
                value=getattr(self._selector, "minted", 0),
            )


def metrics_registry(collectors: Iterable[Collector], process: bool = True) -> CollectorRegistry:
    """A registry of its own (never the library's global one) with `collectors` and, with `process`, the
    library's process, platform and garbage-collector collectors."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """The exposition and its content type: the text format 0.0.4, which every Prometheus version reads (our
    metric and label names are all plain ASCII, so nothing in it needs the newer formats' escaping)."""
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4.encode("ascii")
