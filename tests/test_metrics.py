"""/metrics: the counters the data path keeps and the collector that reads them at scrape time.

Requests are scripted through the proxy harness (tests/proxyharness.py) and the exchange's playbook world
(tests/test_exchange_playbook.py); the exposition is parsed back with prometheus_client's own parser."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from labelgw.control.admin import AdminResource
from labelgw.control.metrics import (
    BUCKETS,
    DockerMetrics,
    GatewayCollector,
    RequestMetrics,
    metrics_registry,
    render,
)
from labelgw.core.backends import HEALTH_UNHEALTHY
from labelgw.core.balancer import WeightedResponseTime
from labelgw.core.model import Rejection
from labelgw.http.settings import ProxySettings
from proxyharness import ProxyHarness, get, ok
from test_exchange_playbook import World, request, response

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gateway: Any, registry: Any, **collector: Any) -> Samples:
    text = render(metrics_registry([GatewayCollector(gateway, registry, **collector)], process=False))[0]
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample_name, labels in samples if sample_name == name}


@pytest.fixture
def harness() -> ProxyHarness:
    harness = ProxyHarness()
    harness.gateway.metrics = RequestMetrics()
    return harness


def test_requests_counted_by_service_method_and_status_class(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(get(b"solo.localhost"))
    upstream = harness.upstream().accept()
    upstream.send(ok(b"hello"))
    harness.settle()
    for _ in range(2):  # over the pooled connection
        client.send(get(b"solo.localhost"))
        upstream.send(ok(b"hello"))
        harness.settle()
    client.send(get(b"solo.localhost", method=b"DELETE"))
    upstream.send(ok(b"", status=b"404 Not Found"))
    harness.settle()
    assert [response.status for response in client.responses()] == [200, 200, 200, 404]
    client.send(get(b"nowhere.localhost"))
    client.send(get(b"down.localhost"))
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    common = {"service": "solo", "version": ""}
    assert value(samples, "labelgw_requests_total", **common, method="GET", status_class="2xx") == 3
    assert value(samples, "labelgw_requests_total", **common, method="DELETE", status_class="4xx") == 1
    # Not routed: no service; a route without a ready backend: its service, and a gateway error with its cause.
    assert value(samples, "labelgw_requests_total", service="", version="", method="GET", status_class="4xx") == 1
    assert value(samples, "labelgw_requests_total", service="down", version="", method="GET", status_class="5xx") == 1
    assert value(samples, "labelgw_gateway_errors_total", status="503", cause="no_ready_backend") == 1
    assert value(samples, "labelgw_response_body_bytes_total", service="solo") == 15
    assert value(samples, "labelgw_backend_requests_total", service="solo", version="", backend="solo-1",
                 address="127.0.0.1:9401") == 4
    harness.assert_accounting()


def test_request_duration_histogram_and_bytes(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(b"POST /up HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 7\r\n\r\npayload")
    upstream = harness.upstream().accept()
    harness.advance(0.3)  # the backend takes 300 ms
    upstream.send(ok(b"done"))
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    labels = {"service": "solo", "version": ""}
    assert value(samples, "labelgw_request_duration_seconds_count", **labels) == 1
    assert value(samples, "labelgw_request_duration_seconds_sum", **labels) == pytest.approx(0.3)
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="0.25") == 0
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="0.5") == 1
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="+Inf") == 1
    # Buckets from 1 ms to 60 s.
    bounds = label_values(samples, "labelgw_request_duration_seconds_bucket", "le")
    assert {"0.001", "60.0", "+Inf"} <= bounds and len(bounds) == len(BUCKETS) + 1
    assert value(samples, "labelgw_request_body_bytes_total", service="solo") == 7
    assert value(samples, "labelgw_requests_total", **labels, method="POST", status_class="2xx") == 1


def test_gateway_errors_by_cause(harness: ProxyHarness) -> None:
    client = harness.connect()
    # Connect failure on a one-backend service: nowhere to retry, 502.
    client.send(get(b"solo.localhost"))
    harness.upstream().refuse()
    harness.settle()
    # No response head within the response timeout: 504.
    client = harness.connect()
    client.send(get(b"solo.localhost"))
    harness.upstream().accept()
    harness.advance(harness.settings.response_timeout + 1)
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    assert value(samples, "labelgw_gateway_errors_total", status="502", cause="connect_failed") == 1
    assert value(samples, "labelgw_gateway_errors_total", status="504", cause="timeout") == 1
    assert value(samples, "labelgw_backend_connect_errors_total", service="solo", version="", backend="solo-1",
                 address="127.0.0.1:9401") == 1
    assert value(samples, "labelgw_requests_total", service="solo", version="", method="GET", status_class="5xx") == 2


def test_in_flight_bound_counted_as_its_cause() -> None:
    harness = ProxyHarness(ProxySettings(max_in_flight=1))
    harness.gateway.metrics = RequestMetrics()
    first = harness.connect()
    first.send(get(b"solo.localhost"))
    harness.upstream()
    harness.connect().send(get(b"solo.localhost"))
    samples = scrape(harness.gateway, harness.registry)
    assert value(samples, "labelgw_gateway_errors_total", status="503", cause="in_flight_limit") == 1
    assert value(samples, "labelgw_requests_in_flight") == 1
    assert value(samples, "labelgw_service_requests_in_flight", service="solo") == 1
    assert value(samples, "labelgw_backend_in_flight", service="solo", version="", backend="solo-1",
                 address="127.0.0.1:9401") == 1
    assert value(samples, "labelgw_connections_open", protocol="http/1.1") == 2
    assert value(samples, "labelgw_connections_open", protocol="h2") == 0


def test_retry_counted_and_client_gone_is_status_none(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(get(b"api.localhost"))
    harness.upstream().refuse()  # one of api's two backends: retried on the other
    harness.upstream().accept()
    client.transport.connection_lost()  # the client leaves before the answer
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    assert value(samples, "labelgw_retries_total") == 1
    assert value(samples, "labelgw_requests_total", service="api", version="", method="GET", status_class="none") == 1
    assert value(samples, "labelgw_gateway_errors_total", status="502", cause="connect_failed") is None


def test_methods_are_a_bounded_label(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(get(b"solo.localhost", method=b"BREW"))
    harness.upstream().accept().send(ok())
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    assert label_values(samples, "labelgw_requests_total", "method") == {"other"}


def test_paths_and_client_addresses_are_never_labels(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(get(b"solo.localhost", path=b"/secret/path"))
    harness.upstream().accept().send(ok())
    harness.settle()
    text = render(metrics_registry([GatewayCollector(harness.gateway, harness.registry)], process=False))[0]
    assert b"/secret" not in text and b"10.0.0.9" not in text


def test_backend_and_service_series_removed_when_they_go(harness: ProxyHarness) -> None:
    client = harness.connect()
    client.send(get(b"solo.localhost"))
    harness.upstream().refuse()
    harness.settle()
    samples = scrape(harness.gateway, harness.registry)
    assert "api-2" in label_values(samples, "labelgw_backend_in_flight", "backend")
    assert "solo" in label_values(samples, "labelgw_requests_total", "service")
    harness.registry.remove("api-2")
    harness.registry.remove("solo-1")
    samples = scrape(harness.gateway, harness.registry)
    for name in ("labelgw_backend_in_flight", "labelgw_backend_ready", "labelgw_backend_connect_errors_total"):
        backends = label_values(samples, name, "backend")
        assert "api-2" not in backends and "solo-1" not in backends and "api-1" in backends
    for name in ("labelgw_requests_total", "labelgw_request_duration_seconds_count", "labelgw_service_requests_in_flight"):
        assert "solo" not in label_values(samples, name, "service")
    # The counters kept for them are gone too: memory stays bounded by what is routed.
    metrics = harness.gateway.metrics
    assert "solo" not in metrics.services and "solo-1" not in metrics.connect_errors


def test_backend_health_ejection_and_latency(harness: ProxyHarness) -> None:
    harness.registry.services["solo"].policy = WeightedResponseTime(harness.reactor.seconds, random.Random(1))
    client = harness.connect()
    client.send(get(b"solo.localhost"))
    upstream = harness.upstream().accept()
    harness.advance(0.05)
    upstream.send(ok())
    harness.settle()
    backend = harness.backend("api-1")
    backend.health_state = HEALTH_UNHEALTHY
    backend.ejected_until = harness.now() + 30
    backend.ejections = 2
    samples = scrape(harness.gateway, harness.registry)
    api1 = {"service": "api", "version": "", "backend": "api-1", "address": "127.0.0.1:9001"}
    assert value(samples, "labelgw_backend_health", **api1, state="unhealthy") == 1
    assert value(samples, "labelgw_backend_health", **api1, state="healthy") == 0
    assert value(samples, "labelgw_backend_ejected", **api1) == 1
    assert value(samples, "labelgw_backend_ejections_total", **api1) == 2
    solo = {"service": "solo", "version": "", "backend": "solo-1", "address": "127.0.0.1:9401"}
    assert value(samples, "labelgw_backend_latency_estimate_seconds", **solo) == pytest.approx(0.05, rel=0.01)


def test_exchange_playbook_counts(monkeypatch: Any) -> None:
    world = World()
    world.gateway.metrics = RequestMetrics()
    exchange = world.exchange(request(b"PUT", b"Content-Length: 4\r\n"))
    exchange.start()
    exchange.upstream_connected(world.upstream(exchange))  # type: ignore[arg-type]
    exchange.request_data(b"abcd")
    exchange.request_end()
    world.clock.advance(0.004)
    exchange.response_head(response(b"201 Created"), exchange.upstream)  # type: ignore[arg-type]
    exchange.response_data(b"12345")
    exchange.response_done()
    world.assert_released()
    samples = scrape(world.gateway, world.registry)
    labels = {"service": "solo", "version": ""}
    assert value(samples, "labelgw_requests_total", **labels, method="PUT", status_class="2xx") == 1
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="0.0025") == 0
    assert value(samples, "labelgw_request_duration_seconds_bucket", **labels, le="0.005") == 1
    assert value(samples, "labelgw_request_body_bytes_total", service="solo") == 4
    assert value(samples, "labelgw_response_body_bytes_total", service="solo") == 5


def test_upstream_error_cause() -> None:
    world = World()
    world.gateway.metrics = RequestMetrics()
    exchange = world.exchange(request(b"POST", b"Content-Length: 0\r\n"))
    exchange.start()
    exchange.upstream_connected(world.upstream(exchange))  # type: ignore[arg-type]
    exchange.upstream_failed(502, "upstream closed the connection", retryable=True)
    samples = scrape(world.gateway, world.registry)
    assert value(samples, "labelgw_gateway_errors_total", status="502", cause="upstream_error") == 1


def test_metrics_off_counts_nothing() -> None:
    harness = ProxyHarness()
    assert harness.gateway.metrics is None
    client = harness.connect()
    client.send(get(b"solo.localhost"))
    harness.upstream().accept().send(ok())
    harness.settle()
    assert client.response().status == 200
    samples = scrape(harness.gateway, harness.registry)
    assert "labelgw_requests_total" not in names(samples)
    assert value(samples, "labelgw_requests_in_flight") == 0


class FakeWatcher:
    connected = True
    events_received = 5
    resyncs = 2
    reconnects = 1


class FakeTLSFactory:
    handshakes = 7
    handshake_failures = 3


class FakeSelector:
    minted = 4


def test_docker_and_tls_series(harness: ProxyHarness) -> None:
    clock = Clock()
    docker = DockerMetrics(harness.registry, clock.seconds)
    docker.event_received({"Type": "container", "Action": "start", "id": "solo-1"})
    clock.advance(0.5)
    docker.event_received({"Type": "container", "Action": "die", "id": "solo-1"})  # measured from the latest
    clock.advance(0.008)
    docker.mark_down("solo-1")
    assert harness.backend("solo-1").ready is False  # the call reached the registry
    docker.event_received({"Type": "network", "Action": "connect", "Actor": {"Attributes": {"container": "api-1"}}})
    clock.advance(0.2)
    docker.resync({backend.key: backend.spec for backend in harness.backends()})
    harness.registry.apply(
        "bad", Rejection(container_id="bad", name="bad", label="labelgw.port", value="x", reason="not a port")
    )
    samples = scrape(
        harness.gateway, harness.registry, watcher=FakeWatcher, docker=docker, tls_factory=FakeTLSFactory(),
        selector=FakeSelector(),
    )
    assert value(samples, "labelgw_docker_events_total") == 5
    assert value(samples, "labelgw_docker_resyncs_total") == 2
    assert value(samples, "labelgw_docker_stream_reconnects_total") == 1
    assert value(samples, "labelgw_docker_connected") == 1
    assert value(samples, "labelgw_docker_containers_skipped") == 1
    assert value(samples, "labelgw_docker_event_apply_seconds_count") == 2
    assert value(samples, "labelgw_docker_event_apply_seconds_bucket", le="0.01") == 1
    assert value(samples, "labelgw_docker_event_apply_seconds_bucket", le="0.25") == 2
    assert value(samples, "labelgw_tls_handshakes_total") == 7
    assert value(samples, "labelgw_tls_handshake_failures_total") == 3
    assert value(samples, "labelgw_tls_certificates_minted_total") == 4


def test_docker_pending_events_are_bounded() -> None:
    clock = Clock()
    docker = DockerMetrics(object(), clock.seconds)
    for number in range(DockerMetrics.PENDING_LIMIT + 10):
        docker.event_received({"Type": "container", "id": f"c{number}"})
    assert len(docker._pending) <= DockerMetrics.PENDING_LIMIT


def test_process_collectors_included(harness: ProxyHarness) -> None:
    text = render(metrics_registry([GatewayCollector(harness.gateway, harness.registry)]))[0].decode()
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= families


def test_access_log_dropped_read_from_the_gateway(harness: ProxyHarness) -> None:
    assert value(scrape(harness.gateway, harness.registry), "labelgw_access_log_dropped_total") == 0

    class AccessLog:  # the counter labelgw.http.accesslog.AccessLog keeps
        access_log_dropped = 12

    harness.gateway.access_log = AccessLog()
    assert value(scrape(harness.gateway, harness.registry), "labelgw_access_log_dropped_total") == 12


def test_metrics_setting_in_the_config_file() -> None:
    from labelgw.cli.config import ConfigError, build

    assert build({}).metrics is True
    assert build({}, {"metrics": False}).metrics is False
    with pytest.raises(ConfigError, match="metrics: must be true or false"):
        build({}, {"metrics": "no"})


class FakeRequest:
    """Just what AdminResource.render reads and sets."""

    def __init__(self, path: bytes, host: bytes = b"localhost:8081") -> None:
        self.postpath = [path.lstrip(b"/")]
        self.args: dict[bytes, list[bytes]] = {}
        self.method = b"GET"
        self.headers: dict[bytes, bytes] = {}
        self.code = 200
        self._host = host

    def getHeader(self, name: bytes) -> bytes | None:
        return self._host if name.lower() == b"host" else None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def setResponseCode(self, code: int) -> None:
        self.code = code


def test_admin_serves_metrics_behind_the_host_check(harness: ProxyHarness) -> None:
    registry = metrics_registry([GatewayCollector(harness.gateway, harness.registry)], process=False)
    resource = AdminResource(harness.registry, harness.now, metrics=lambda: render(registry))
    request = FakeRequest(b"/metrics")
    body = resource.render(request)  # type: ignore[arg-type]
    assert request.code == 200
    assert request.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert b"labelgw_requests_in_flight 0.0" in body
    refused = FakeRequest(b"/metrics", host=b"evil.example")
    resource.render(refused)  # type: ignore[arg-type]
    assert refused.code == 421
    # Without metrics (metrics: false): not found.
    plain = AdminResource(harness.registry, harness.now)
    request = FakeRequest(b"/metrics")
    plain.render(request)  # type: ignore[arg-type]
    assert request.code == 404


def test_tls_handshakes_and_failures_counted_by_the_factory() -> None:
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock

    from test_tls_deadlines import Client, Idle, factory_for

    clock = MemoryReactorClock()
    factory = factory_for(clock, Factory.forProtocol(Idle))
    done = Client(factory, clock)
    done.handshake()
    assert (factory.handshakes, factory.handshake_failures) == (1, 0)
    cut = Client(factory, clock)  # never sends a ClientHello: cut at the head deadline
    clock.advance(60)
    cut.wire.gone()
    assert (factory.handshakes, factory.handshake_failures) == (1, 1)


def test_watcher_counts_events_resyncs_and_reconnects_and_times_events_to_the_sink() -> None:
    from test_watcher import A, World as WatcherWorld, event, inspect_of

    world = WatcherWorld()
    docker = DockerMetrics(world.sink, world.reactor.seconds)
    world.watcher._tracker._sink = docker  # the watcher's sink, as labelgw.cli.app passes it
    world.watcher.event_observer = docker.event_received
    world.engine.containers = {A: inspect_of(A)}
    world.engine.streams.append([event("kill", A, signal="15"), event("destroy", A)])
    world.watcher.startService()
    assert [call[0] for call in world.sink.take()] == ["resync", "mark_down", "remove"]
    assert (world.watcher.events_received, world.watcher.resyncs, world.watcher.reconnects) == (2, 1, 0)
    assert docker.apply_latency.counts[0] == 2  # kill -> mark_down, destroy -> remove: same reactor turn, 0 s
    world.threads.end_reader(ConnectionResetError("engine went away"))
    world.reactor.advance(0.1)
    assert (world.watcher.resyncs, world.watcher.reconnects) == (2, 1)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_service_wires_metrics_or_leaves_them_off(enabled: bool) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService
    from labelgw.control.admin import AdminListener

    settings = config.build({"https": ["none"]}, {"docker": False, "metrics": enabled})
    service = LabelgwService(settings, MemoryReactorClock())
    assert (service.gateway.metrics is not None) is enabled
    [admin] = [listener for listener in service.listeners if isinstance(listener, AdminListener)]
    request = FakeRequest(b"/metrics")
    body = admin.factory.resource.render(request)
    assert request.code == (200 if enabled else 404)
    if enabled:
        assert b"labelgw_requests_in_flight 0.0" in body and b"process_cpu_seconds_total" in body


def _ended(service: str, version: str | None, method: bytes, status: int, created_at: float = 0.0) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(
        route=SimpleNamespace(service=SimpleNamespace(name=service)), version=version, status=status,
        head=SimpleNamespace(method=method), bytes_in=3, bytes_out=5, created_at=created_at,
    )


@pytest.mark.parametrize(
    "elapsed",
    [0.0, 0.0005, *BUCKETS, *(bound * 1.0001 for bound in BUCKETS), *(bound * 0.9999 for bound in BUCKETS), 61.0, 3600.0],
)
def test_the_duration_bucket_is_bisect_left_of_the_bounds(elapsed: float) -> None:
    # exchange_done finds the first buckets by comparisons: the bucket must be the one bisect_left finds.
    from bisect import bisect_left

    metrics = RequestMetrics()
    metrics.exchange_done(_ended("solo", None, b"GET", 200), elapsed)
    [slot] = metrics.slots.values()
    assert slot.counts.index(1) == bisect_left(BUCKETS, elapsed) and sum(slot.counts) == 1
    assert slot.total == elapsed


def test_exchange_counts_by_version_method_and_status_class() -> None:
    metrics = RequestMetrics()
    for version, method, status in [
        (None, b"GET", 200), (None, b"GET", 204), (None, b"POST", 503), ("v2", b"GET", 404), (None, b"BREW", 200),
        (None, b"GET", 0), (None, b"GET", 799), (None, b"", 200),
    ]:
        metrics.exchange_done(_ended("solo", version, method, status), 0.001)
    requests, durations, bytes_in, bytes_out = metrics.by_service()["solo"]
    assert requests == {
        ("", "GET", 2): 2, ("", "POST", 5): 1, ("v2", "GET", 4): 1, ("", "other", 2): 2, ("", "GET", 0): 1,
        ("", "GET", 7): 1,
    }
    assert (bytes_in, bytes_out) == (3 * 8, 5 * 8)
    assert set(durations) == {"", "v2"}
    # A service that goes away takes its slots with it, the version-less index too.
    metrics.forget(set())
    assert metrics.slots == {} and metrics.plain == {} and metrics.by_service() == {}
