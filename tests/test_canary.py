"""Canary analysis by version (labelgw.core.canary): the sliding window, the cut rule against the stable version,
what a cut does to the version split, the labels, and the admin view and resume. Injected clock values only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from labelgw.control.admin import AdminResource
from labelgw.core.backends import Backend, RoundRobin, ServicePool
from labelgw.core.canary import (
    BUCKETS,
    MIN_REQUESTS,
    SLOTS,
    CanaryAnalyzer,
    VersionWindow,
    bucket_of,
    bucket_upper,
    describe_service,
)
from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.registry import Registry
from labelgw.core.versions import VersionSplit, decide

WINDOW = 60.0


# --- the window -----------------------------------------------------------------------------------------------


def test_buckets_are_monotonic_and_bound_their_latencies() -> None:
    previous = -1
    for ms in (0.01, 0.25, 0.3, 1, 2, 5, 10, 50, 100, 1000, 10_000, 100_000):
        seconds = ms / 1000
        bucket = bucket_of(seconds)
        assert bucket >= previous
        previous = bucket
        assert 0 <= bucket < BUCKETS
        if bucket < BUCKETS - 1:
            assert seconds <= bucket_upper(bucket) * 1.000001
            # Within one bucket (a factor 2**0.25) of the true value.
            assert bucket == 0 or seconds > bucket_upper(bucket - 1) * 0.999999


def test_window_counts_requests_errors_and_p99() -> None:
    window = VersionWindow(WINDOW)
    assert (window.requests, window.error_rate, window.p99) == (0, 0.0, None)
    for i in range(100):
        window.observe(1000.0 + i * 0.1, 0.010 if i < 98 else 0.500, failed=i % 10 == 0)
    assert window.requests == 100 and window.errors == 10
    assert window.error_rate == pytest.approx(0.10)
    # 99th of 100 values: one of the two slow ones.
    assert window.p99 == pytest.approx(bucket_upper(bucket_of(0.5)))
    assert window.quantile(0.5) == pytest.approx(bucket_upper(bucket_of(0.010)))
    assert bucket_upper(bucket_of(0.010)) == pytest.approx(0.010, rel=0.2)


def test_window_slides() -> None:
    window = VersionWindow(WINDOW)
    for i in range(30):
        window.observe(1000.0 + i, 0.01, failed=True)  # 1000 .. 1029
    for i in range(30):
        window.observe(1030.0 + i, 0.02, failed=False)  # 1030 .. 1059
    assert (window.requests, window.errors) == (60, 30)
    window.advance(1075.0)  # 1000 .. 1015 have left the window
    assert window.requests == 60 - 16 and window.errors == 30 - 16
    window.advance(1089.5)  # the window is the last 60 one-second slots: 1030 .. 1089
    assert (window.requests, window.errors) == (30, 0)
    window.advance(1090.0)
    assert (window.requests, window.errors) == (29, 0)
    assert window.p99 == pytest.approx(bucket_upper(bucket_of(0.02)))
    window.advance(1200.0)  # far past: everything gone
    assert (window.requests, window.errors, window.p99) == (0, 0, None)


def test_window_memory_is_bounded_by_its_slots() -> None:
    window = VersionWindow(6.0)
    assert window.width == pytest.approx(6.0 / SLOTS)
    for i in range(20_000):
        window.observe(i * 0.001, 0.001 * (i % 50), failed=False)
    assert len(window._hists) == SLOTS and all(h is None or len(h) == BUCKETS for h in window._hists)
    # 20 s of requests, 6 s kept.
    assert window.requests == pytest.approx(6000, abs=2 * 1000 * window.width + 1)


def test_a_clock_that_steps_back_counts_in_the_newest_slot() -> None:
    window = VersionWindow(WINDOW)
    window.observe(100.0, 0.01, False)
    window.observe(99.0, 0.01, True)
    assert (window.requests, window.errors) == (2, 1)


# --- the rule -------------------------------------------------------------------------------------------------


def spec(
    name: str, version: str | None, traffic: float | None = None, error_rate: float | None = None,
    ratio: float | None = None,
) -> ContainerSpec:
    return ContainerSpec(
        container_id=name, name=name, service="api", address="127.0.0.1", port=8000, hosts=("api.localhost",),
        version=version, traffic=traffic, canary_max_error_rate=error_rate, canary_max_latency_ratio=ratio,
    )


def make_pool(*specs: ContainerSpec) -> ServicePool:
    service = ServicePool("api", RoundRobin())
    for item in specs:
        service.backends[item.container_id] = Backend(item)
    service.refresh()
    return service


class Traffic:
    """A split service (v1 stable, v2 canary at 20 %) and an analyzer, fed with synthetic requests."""

    def __init__(self, error_rate: float | None = 0.05, ratio: float | None = None, window: float = WINDOW) -> None:
        self.service = make_pool(spec("v1-a", "v1"), spec("v2-a", "v2", 20.0, error_rate, ratio))
        self.analyzer = CanaryAnalyzer(window)
        self.now = 1000.0

    def backend(self, version: str) -> Backend:
        return next(b for b in self.service.backends.values() if b.version == version)

    def send(self, version: str, count: int, failed_every: int = 0, latency: float = 0.01, step: float = 0.05) -> None:
        backend = self.backend(version)
        for i in range(count):
            # Errors spread evenly, the first one at the end of the first run of `failed_every`.
            failed = failed_every > 0 and i % failed_every == failed_every - 1
            self.analyzer.observe(self.service, backend, self.now, latency, failed)
            self.now += step

    def check(self) -> None:
        """Apply the rule now (it otherwise runs at the first request of each slot)."""
        assert self.service.canary is not None
        self.analyzer.check(self.service, self.service.canary, self.now)

    @property
    def cut(self) -> bool:
        figures = describe_service(self.service, self.now)["v2"]
        return figures.cut

    @property
    def v2_share(self) -> float:
        assert self.service.split is not None
        return self.service.split.shares["v2"]


def test_an_error_rate_over_the_limit_cuts_the_version() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 80)
    world.send("v2", 30, failed_every=2)  # 50 % errors against 0 %
    assert world.cut
    assert world.v2_share == 0.0
    assert world.service.split is not None and world.service.split.shares["v1"] == pytest.approx(100.0)
    reason = describe_service(world.service, world.now)["v2"].reason
    assert reason is not None and "error rate 50.0 %" in reason and "'v1'" in reason and "5 points" in reason


def test_an_error_rate_under_the_limit_does_not_cut() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 100, failed_every=25)  # 4 %
    world.send("v2", 100, failed_every=12)  # 9 %: 5 points worse, not more
    assert not world.cut
    assert world.v2_share == pytest.approx(20.0)


def test_the_stable_version_is_the_reference() -> None:
    # Both fail half their requests: the canary is no worse than the stable version.
    world = Traffic(error_rate=0.05)
    world.send("v1", 100, failed_every=2)
    world.send("v2", 40, failed_every=2)
    assert not world.cut
    states = describe_service(world.service, world.now)
    assert states["v1"].stable and not states["v2"].stable


def test_fewer_than_the_minimum_requests_do_not_cut() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 100)
    world.send("v2", MIN_REQUESTS - 1, failed_every=1)  # every one failed, but too few
    world.check()
    assert not world.cut
    world.send("v2", 1, failed_every=1)
    world.check()
    assert world.cut


def test_a_latency_ratio_over_the_limit_cuts_the_version() -> None:
    world = Traffic(error_rate=None, ratio=2.0)
    world.send("v1", 100, latency=0.010)
    world.send("v2", 30, latency=0.015)  # 1.5 times: kept
    assert not world.cut
    world.send("v2", 30, latency=0.050)  # p99 5 times the stable one's
    assert world.cut
    reason = describe_service(world.service, world.now)["v2"].reason
    assert reason is not None and "p99" in reason and "more than 2" in reason


def test_a_version_without_limits_is_never_cut() -> None:
    world = Traffic(error_rate=None, ratio=None)
    world.send("v1", 100)
    world.send("v2", 100, failed_every=1)
    assert not world.cut


def test_the_window_slides_old_errors_out() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v2", 15, failed_every=1)  # too few to judge
    world.now += WINDOW + 1  # they leave the window
    world.send("v1", 100)
    world.send("v2", 30)
    assert not world.cut
    assert describe_service(world.service, world.now)["v2"].errors == 0


def test_a_cut_is_kept_until_a_new_container_joins_the_version() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 80)
    world.send("v2", 30, failed_every=1)
    assert world.cut
    # Healthy requests later (pinned ones still arrive) do not lift it.
    world.now += 2 * WINDOW
    world.send("v2", 100)
    assert world.cut
    # Another replica of v1, or the same v2 container changing state: still cut.
    world.service.backends["v1-b"] = Backend(spec("v1-b", "v1"))
    world.service.refresh()
    assert world.cut
    # A new deploy of v2: a container id the version did not have.
    world.service.backends["v2-b"] = Backend(spec("v2-b", "v2", 20.0, 0.05))
    del world.service.backends["v2-a"]
    world.service.refresh()
    assert not world.cut
    assert world.v2_share == pytest.approx(20.0)
    assert describe_service(world.service, world.now)["v2"].requests == 0


def test_resume_lifts_the_cut_and_starts_the_window_afresh() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 80)
    world.send("v2", 30, failed_every=1)
    assert world.cut and world.v2_share == 0.0
    assert world.analyzer.resume(world.service, "v2")
    assert not world.cut and world.v2_share == pytest.approx(20.0)
    assert describe_service(world.service, world.now)["v2"].requests == 0
    assert not world.analyzer.resume(world.service, "v9")


def test_the_cut_is_logged_as_a_warning_with_the_figures() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        world = Traffic(error_rate=0.05)
        world.send("v1", 80)
        world.send("v2", 30, failed_every=2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "canary" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["version"] == "v2" and warnings[0]["service"] == "api"
    assert "50.0 %" in warnings[0]["reason"]


def test_a_service_without_a_split_costs_nothing() -> None:
    service = make_pool(spec("a", "v1"), spec("b", "v1"))
    analyzer = CanaryAnalyzer(WINDOW)
    analyzer.observe(service, service.backends["a"], 1.0, 0.01, True)
    assert service.canary is None


def test_the_rule_runs_once_per_slot() -> None:
    world = Traffic(error_rate=0.05, window=60.0)
    world.send("v1", 80, step=0.0)
    world.send("v2", 30, failed_every=1, step=0.0)  # all in one instant: judged at the next slot
    assert not world.cut
    world.now += 1.0
    world.send("v2", 1)
    assert world.cut


# --- what a cut does to the split ------------------------------------------------------------------------------


def test_a_cut_version_gets_no_new_clients_and_its_sticky_clients_move_while_pinned_requests_reach_it() -> None:
    world = Traffic(error_rate=0.05)
    world.send("v1", 80)
    world.send("v2", 30, failed_every=1)
    service = world.service
    picks = [decide(service).version for _ in range(100)]
    assert picks == ["v1"] * 100
    sticky = decide(service, sticky="v2")
    assert (sticky.version, sticky.assigned) == ("v1", True)  # a new cookie, and no failed request
    pinned = decide(service, pinned="v2")
    assert pinned.version == "v2" and pinned.backend is not None and pinned.pinned


def test_split_shares_with_cut_versions() -> None:
    backends = [Backend(spec("a", "v1")), Backend(spec("b", "v2", 20.0)), Backend(spec("c", "v3", 10.0))]
    split = VersionSplit(backends, frozenset({"v2"}))
    assert split.shares == pytest.approx({"v1": 90.0, "v2": 0.0, "v3": 10.0})
    assert [split.choose() for _ in range(50)].count("v2") == 0
    # Everything cut (the stable version has no ready backend): better equal shares than refusing everyone.
    everything = VersionSplit(backends[1:], frozenset({"v2", "v3"}))
    assert everything.shares == pytest.approx({"v2": 50.0, "v3": 50.0})


# --- labels ---------------------------------------------------------------------------------------------------


def inspect(**labels: str) -> dict[str, Any]:
    return {
        "Id": "c" * 64,
        "Name": "/api-v2",
        "Config": {"Labels": {"labelgw.service": "api", "labelgw.port": "8000", **labels}},
        "HostConfig": {"NetworkMode": "host"},
        "State": {"Running": True},
    }


@pytest.mark.parametrize(
    "labels, error_rate, ratio",
    [
        ({"labelgw.canary.max_error_rate": "5%"}, 0.05, None),
        ({"labelgw.canary.max_error_rate": "5"}, 0.05, None),
        ({"labelgw.canary.max_error_rate": " 0.5 % "}, 0.005, None),
        ({"labelgw.canary.max_error_rate": "0"}, 0.0, None),
        ({"labelgw.canary.max_latency_ratio": "2"}, None, 2.0),
        ({"labelgw.canary.max_latency_ratio": "1.5", "labelgw.canary.max_error_rate": "10%"}, 0.10, 1.5),
        ({}, None, None),
    ],
)
def test_canary_labels(labels: dict[str, str], error_rate: float | None, ratio: float | None) -> None:
    parsed = parse_container(inspect(**{"labelgw.version": "v2", **labels}))
    assert isinstance(parsed, ContainerSpec)
    assert parsed.canary_max_error_rate == (pytest.approx(error_rate) if error_rate is not None else None)
    assert parsed.canary_max_latency_ratio == ratio


@pytest.mark.parametrize(
    "label, value, reason_part",
    [
        ("canary.max_error_rate", "five", "not a percentage"),
        ("canary.max_error_rate", "101%", "between 0 and 100"),
        ("canary.max_error_rate", "-5%", "not a percentage"),
        ("canary.max_error_rate", "nan", "not a percentage"),
        ("canary.max_latency_ratio", "1", "above 1"),
        ("canary.max_latency_ratio", "0.5", "above 1"),
        ("canary.max_latency_ratio", "x2", "not a number"),
        ("canary.max_latency_ratio", "1e3", "not a number"),
        ("canary.max_latency_ratio", "1001", "at most 1000"),
    ],
)
def test_bad_canary_labels_reject_only_that_container(label: str, value: str, reason_part: str) -> None:
    parsed = parse_container(inspect(**{"labelgw.version": "v2", f"labelgw.{label}": value}))
    assert isinstance(parsed, Rejection)
    assert (parsed.label, parsed.value) == (f"labelgw.{label}", value)
    assert reason_part in parsed.reason


def test_canary_limits_need_a_version() -> None:
    parsed = parse_container(inspect(**{"labelgw.canary.max_error_rate": "5%"}))
    assert isinstance(parsed, Rejection)
    assert parsed.label == "labelgw.canary.max_error_rate" and "labelgw.version" in parsed.reason


# --- the admin view and resume -----------------------------------------------------------------------------------


class AdminWorld:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = Registry(policy_factory=lambda spec: RoundRobin())
        self.registry.apply("v1-a", spec("v1-a", "v1"))
        self.registry.apply("v2-a", spec("v2-a", "v2", 20.0, 0.05))
        self.analyzer = CanaryAnalyzer(WINDOW)
        self.resource = AdminResource(self.registry, self.clock.seconds, canary=self.analyzer)
        self.service = self.registry.services["api"]

    def fail_v2(self) -> None:
        for version, failed, count in (("v1", False, 80), ("v2", True, 30)):
            backend = self.service.backends[f"{version}-a"]
            for _ in range(count):
                self.clock.advance(0.05)
                self.analyzer.observe(self.service, backend, self.clock.seconds(), 0.01, failed)

    def request(
        self, method: bytes, *path: bytes, host: bytes = b"localhost", origin: bytes | None = None
    ) -> tuple[int, Any]:
        request = DummyRequest(list(path))
        request.method = method
        request.requestHeaders.setRawHeaders(b"host", [host])
        if origin is not None:
            request.requestHeaders.setRawHeaders(b"origin", [origin])
        body = self.resource.render(request)
        return request.responseCode or 200, json.loads(body)


def test_the_admin_view_shows_each_versions_window_and_cut() -> None:
    world = AdminWorld()
    status, view = world.request(b"GET", b"")
    assert status == 200
    canary = view["services"]["api"]["canary"]
    assert canary["v2"] == {
        "requests": 0, "errors": 0, "error_rate": 0.0, "p99_ms": None, "cut": False, "reason": None,
        "stable": False, "max_error_rate": 0.05, "max_latency_ratio": None,
    }
    world.fail_v2()
    status, view = world.request(b"GET", b"api", b"state")
    service = view["services"]["api"]
    assert service["canary"]["v2"]["cut"] and "error rate 100.0 %" in service["canary"]["v2"]["reason"]
    assert service["canary"]["v2"]["requests"] == 30 and service["canary"]["v2"]["error_rate"] == 1.0
    assert service["canary"]["v1"]["stable"] and service["canary"]["v1"]["p99_ms"] == pytest.approx(10.0, rel=0.2)
    assert service["versions"]["v2"]["share"] == 0.0 and service["versions"]["v1"]["share"] == 100.0


def test_resume_over_the_admin_listener() -> None:
    world = AdminWorld()
    world.fail_v2()
    status, body = world.request(b"POST", b"canary", b"api", b"v2", b"resume")
    assert status == 200
    assert body == {"service": "api", "version": "v2", "resumed": True, "cut": False, "share": 20.0}
    assert world.service.split is not None and world.service.split.shares["v2"] == pytest.approx(20.0)
    # A version that is not cut: resumed all the same (its window starts afresh).
    assert world.request(b"POST", b"canary", b"api", b"v1", b"resume")[0] == 200


@pytest.mark.parametrize(
    "path", [(b"canary", b"nope", b"v2", b"resume"), (b"canary", b"api", b"v9", b"resume"), (b"canary", b"api")]
)
def test_resume_of_an_unknown_service_or_version_is_404(path: tuple[bytes, ...]) -> None:
    world = AdminWorld()
    assert world.request(b"POST", *path)[0] == 404


def test_resume_checks_the_host_first() -> None:
    world = AdminWorld()
    world.fail_v2()
    status, _ = world.request(b"POST", b"canary", b"api", b"v2", b"resume", host=b"evil.example")
    assert status == 421
    assert world.service.split is not None and world.service.split.shares["v2"] == 0.0


# --- the exchange feeds the windows ------------------------------------------------------------------------------


class SplitWorld:
    """The exchange playbook's world (recording client side, pool and upstreams) with a split service."""

    def __init__(self) -> None:
        from test_exchange_playbook import World

        self.world = World()
        self.world.registry.apply("v1-a", spec("v1-a", "v1"))
        self.world.registry.apply("v2-a", spec("v2-a", "v2", 20.0, 0.05))
        self.world.registry.apply("v2-b", spec("v2-b", "v2", 20.0, 0.05))
        self.service = self.world.registry.services["api"]

    def run(self, version: str, status: bytes = b"200 OK", latency: float = 0.01) -> None:
        from labelgw.http.exchange import Exchange
        from labelgw.http.parser import parse_request_head
        from test_exchange_playbook import response

        head = parse_request_head(b"GET / HTTP/1.1\r\nHost: api.localhost")
        route = self.world.table.lookup("api.localhost", "/")
        assert route is not None
        backend = self.service.pick(version=version, pinned=True)
        assert backend is not None
        exchange = Exchange(self.world.side, self.world.gateway, head, route, backend)
        exchange.version, exchange.pinned = version, True
        upstream = self.world.upstream(exchange)
        self.world.pool.idle.append(upstream)
        exchange.start()
        self.world.clock.advance(latency)
        exchange.response_head(response(status, b"Content-Length: 0\r\n"), upstream)
        exchange.response_done()


def test_exchanges_feed_their_versions_window_with_5xx_and_time_to_the_head() -> None:
    split = SplitWorld()
    for _ in range(30):
        split.run("v1", latency=0.010)
    for index in range(10):
        split.run("v2", b"500 Internal Server Error" if index % 2 else b"200 OK", latency=0.020)
    figures = describe_service(split.service, split.world.clock.seconds())
    assert (figures["v1"].requests, figures["v1"].errors) == (30, 0)
    assert (figures["v2"].requests, figures["v2"].errors) == (10, 5)
    assert figures["v1"].p99 == pytest.approx(0.010, rel=0.2) and figures["v2"].p99 == pytest.approx(0.020, rel=0.2)
    for _ in range(10):
        split.run("v2", b"502 Bad Gateway", latency=0.020)
    split.world.clock.advance(1.0)
    split.run("v1")  # the first request of a new slot applies the rule
    assert describe_service(split.service, split.world.clock.seconds())["v2"].cut
    assert split.service.split is not None and split.service.split.shares["v2"] == 0.0
    split.world.assert_released()


def test_a_connect_failure_that_is_retried_counts_against_its_version() -> None:
    split = SplitWorld()
    from labelgw.http.exchange import Exchange
    from labelgw.http.parser import parse_request_head
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    head = parse_request_head(b"GET / HTTP/1.1\r\nHost: api.localhost")
    route = split.world.table.lookup("api.localhost", "/")
    assert route is not None
    exchange = Exchange(split.world.side, split.world.gateway, head, route, split.service.backends["v2-a"])
    exchange.version = "v2"
    exchange.start()
    exchange.upstream_connect_failed(Failure(ConnectionRefusedError()))
    assert exchange.backend is split.service.backends["v2-b"]  # retried within the version
    figures = describe_service(split.service, split.world.clock.seconds())["v2"]
    assert (figures.requests, figures.errors) == (1, 1)


def test_explain_moves_a_sticky_client_of_a_cut_version_like_the_data_path() -> None:
    from labelgw.control.explain import Explainer

    world = AdminWorld()
    world.fail_v2()
    view = Explainer(world.registry.table).explain("http://api.localhost/", cookie="labelgw_version_api=v2")
    version = view["version"]
    assert version["decision"] == "v1" and "canary analysis cut" in version["why"]
    assert version["set_cookie"] == "labelgw_version_api=v1"


@pytest.mark.parametrize("origin", [b"http://evil.example", b"null", b"https://evil.example:8081", b"file://"])
def test_resume_from_a_page_of_another_origin_is_refused(origin: bytes) -> None:
    world = AdminWorld()
    world.fail_v2()
    status, body = world.request(b"POST", b"canary", b"api", b"v2", b"resume", origin=origin)
    assert status == 403 and "origin" in body["error"]
    assert world.service.split is not None and world.service.split.shares["v2"] == 0.0


@pytest.mark.parametrize("origin", [b"http://localhost:8081", b"http://127.0.0.1:8081", b"http://gw.localhost"])
def test_resume_from_the_dashboards_own_origin_is_taken(origin: bytes) -> None:
    world = AdminWorld()
    world.fail_v2()
    assert world.request(b"POST", b"canary", b"api", b"v2", b"resume", origin=origin)[0] == 200


def test_the_window_length_is_a_config_file_setting() -> None:
    from labelgw.cli.config import ConfigError, build

    assert build({}).canary_window == 60.0
    assert build({}, {"canary_window": 3}).canary_window == 3.0
    for bad in (0, -1, "soon", True):
        with pytest.raises(ConfigError, match="canary_window"):
            build({}, {"canary_window": bad})
