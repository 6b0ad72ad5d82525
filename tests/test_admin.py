"""The admin JSON view (labelgw.control.admin), rendered with twisted.web's test request; and its command-line option."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

from labelgw.cli import tap
from labelgw.control.admin import AdminListener, AdminResource, admin_site, state
from labelgw.core.backends import Backend, ServicePool
from labelgw.core.balancer import service_policy_factory
from labelgw.cli.config import DEFAULT_ADMIN
from labelgw.control.health import HealthChecker
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.control.outlier import OutlierDetector
from labelgw.core.registry import Registry
from support.specs import typed_options


def spec(container_id: str, service: str = "api", port: int = 8000, **options: str) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=f"{service}-{container_id}", service=service, address="127.0.0.1",
        port=port, hosts=(f"{service}.localhost",), version=options.pop("version", None),
        **typed_options(options),
    )


class World:
    """A registry with the real policy factory, health checker and outlier detector, on a fake clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.checks: list[Deferred[int]] = []
        self.health = HealthChecker(self.clock, self._changed, self._http)
        self.outlier = OutlierDetector(self.clock, self._changed)
        self.registry = Registry(
            policy_factory=service_policy_factory("wrt", self.clock.seconds, rng_factory=lambda: random.Random(1)),
            listeners=[self.outlier, self.health],
        )
        self.health.startService()

    def _http(self, url: str, timeout: float) -> Deferred[int]:
        answer: Deferred[int] = Deferred()
        self.checks.append(answer)
        return answer

    def _changed(self, pool: ServicePool, backend: Backend) -> None:
        self.registry.backend_state_changed(pool, backend)

    def apply(self, *items: ContainerSpec | Rejection) -> None:
        for item in items:
            self.registry.apply(item.container_id, item)

    def backend(self, service: str, key: str) -> Backend:
        return self.registry.services[service].backends[key]


def render(resource: AdminResource, *segments: bytes, method: bytes = b"GET") -> tuple[int, dict[str, Any], DummyRequest]:
    request = DummyRequest(list(segments) or [b""])
    request.method = method
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, json.loads(body) if body else {}, request


@pytest.fixture
def world() -> World:
    w = World()
    w.apply(
        spec("v1a", port=8001, version="v1", weight="2"),
        spec("v1b", port=8002, version="v1"),
        spec("v2a", port=8003, version="v2", traffic="10", **{"health.path": "/healthz"}),
        spec("w1", service="web", port=9001, balancer="least_conn"),
        Rejection("bad1", "broken", "labelgw.port", "http", "not a port number"),
    )
    w.clock.advance(0)
    w.checks[0].callback(200)  # v2a's first check passes
    api = w.registry.services["api"]
    for _ in range(6):
        chosen = api.pick()
        assert chosen is not None
        api.policy.on_start(chosen)
        chosen.in_flight += 1
        chosen.requests += 1
    api.policy.on_finish(w.backend("api", "v1a"), 0.012, False)
    w.backend("api", "v1a").in_flight -= 1
    for _ in range(5):
        w.backend("api", "v1b").errors += 1
        api.policy.on_finish(w.backend("api", "v1b"), 0.001, True)
    return w


def test_state_lists_services_versions_backends_routes_and_rejections(world: World) -> None:
    status, view, request = render(AdminResource(world.registry, world.clock.seconds, world.health.describe), b"api", b"state")
    assert status == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert view["time"] == 1000.0
    assert sorted(view["services"]) == ["api", "web"]
    api = view["services"]["api"]
    assert (api["balancer"], api["ready"], api["total"], api["ejected"]) == ("wrt", 2, 3, 1)
    assert api["versions"] == {
        "v1": {"backends": ["api-v1a", "api-v1b"], "ready": 1, "traffic": None, "share": 90.0, "sticky_clients": 0},
        "v2": {"backends": ["api-v2a"], "ready": 1, "traffic": 10.0, "share": 10.0, "sticky_clients": 0},
    }
    assert view["services"]["web"]["balancer"] == "least_conn"
    backends = {b["container"]: b for b in api["backends"]}
    v1a, v1b, v2a = backends["api-v1a"], backends["api-v1b"], backends["api-v2a"]
    assert v1a["id"] == "v1a"
    assert v1a["address"] == "127.0.0.1:8001"
    assert (v1a["version"], v1a["weight"], v1a["ready"], v1a["health"], v1a["ejected"]) == ("v1", 2.0, True, None, False)
    # Still the starting guess: a lower sample pulls the estimate down only as time passes (Peak EWMA).
    assert v1a["latency_ms"] == 30.0
    assert v1a["slow_start"] == 1.0
    assert v1a["samples"] == 1
    assert v1a["in_flight"] >= 0 and v1a["requests"] >= 1
    # Ejected after 5 consecutive failures: until when, for how long still, how often.
    assert (v1b["ready"], v1b["container_ready"], v1b["ejected"]) == (False, True, True)
    assert (v1b["ejected_until"], v1b["ejected_for"], v1b["ejections"], v1b["errors"]) == (1030.0, 30.0, 1, 5)
    assert v2a["health"] == "healthy"
    assert v2a["health_check"]["path"] == "/healthz"
    assert v2a["health_check"]["last"] == "HTTP 200"
    assert view["routes"] == [
        {"host": "api.localhost", "path": "/", "service": "api", "strip_prefix": False, "scheme": "http",
         "wildcard": False},
        {"host": "web.localhost", "path": "/", "service": "web", "strip_prefix": False, "scheme": "http",
         "wildcard": False},
    ]
    [rejection] = view["rejections"]
    assert rejection["container"] == "broken"
    assert (rejection["label"], rejection["value"], rejection["reason"]) == ("labelgw.port", "http", "not a port number")
    assert "not a port number" in rejection["message"]


def test_root_is_the_same_view_and_every_value_is_plain_json(world: World) -> None:
    resource = AdminResource(world.registry, world.clock.seconds)
    _, root, _ = render(resource, b"")
    _, api, _ = render(resource, b"api", b"state")
    assert root == api
    # Without a health checker the details are null, and the rest is unchanged.
    assert root["services"]["api"]["backends"][2]["health_check"] is None
    assert json.loads(json.dumps(state(world.registry, world.clock.seconds()))) == state(world.registry, 1000.0)


def test_unknown_paths_are_404(world: World) -> None:
    status, body, _ = render(AdminResource(world.registry, world.clock.seconds), b"api", b"other")
    assert status == 404
    assert body["error"] == "not found"


def test_head_answers_like_get(world: World) -> None:
    status, _, request = render(AdminResource(world.registry, world.clock.seconds), b"", method=b"HEAD")
    assert status == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_an_empty_gateway() -> None:
    view = state(Registry(), 5.0)
    assert view == {"time": 5.0, "services": {}, "routes": [], "rejections": []}


def test_the_ejection_countdown_moves_with_the_clock(world: World) -> None:
    world.clock.advance(12.5)
    v1b = next(b for b in state(world.registry, world.clock.seconds())["services"]["api"]["backends"] if b["id"] == "v1b")
    assert v1b["ejected_for"] == 17.5
    world.clock.advance(17.5)
    v1b = next(b for b in state(world.registry, world.clock.seconds())["services"]["api"]["backends"] if b["id"] == "v1b")
    assert (v1b["ready"], v1b["ejected"], v1b["ejected_for"], v1b["ejections"]) == (True, False, None, 1)
    assert v1b["slow_start"] is None  # re-admitted: the policy starts it afresh on its next pick


def test_the_listener_logs_its_url() -> None:
    reactor = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        listener = AdminListener(reactor, "tcp:18081:interface=127.0.0.1", admin_site(Registry(), reactor.seconds), "http")
        listener.privilegedStartService()
        listener.startService()
        listener.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    [(port, _, _, interface)] = reactor.tcpServers
    assert (port, interface) == (18081, "127.0.0.1")
    logged = [event for event in events if event.get("log_format", "").startswith("labelgw admin on")]
    assert logged and logged[0]["url"].startswith("http://") and logged[0]["url"].endswith(":18081")


# -- options ---------------------------------------------------------------------------------------------------


def parse(*args: str) -> Any:
    options = tap.Options()
    options.parseOptions(["--https", "none", *args])
    return options.settings


def test_admin_and_balancer_options() -> None:
    settings = parse()
    assert (settings.admin, settings.balancer, settings.ejection_base, settings.balancer_decay) == (
        DEFAULT_ADMIN, "wrt", 30.0, 10.0,
    )
    assert DEFAULT_ADMIN == "tcp:8081:interface=127.0.0.1"
    assert parse("--admin", "none").admin is None
    assert parse("--admin", "tcp:9999:interface=127.0.0.1").admin == "tcp:9999:interface=127.0.0.1"
    assert parse("--balancer", "least_conn").balancer == "least_conn"
    with pytest.raises(usage.UsageError, match="--balancer"):
        parse("--balancer", "fastest")
    with pytest.raises(usage.UsageError, match="--admin"):
        parse("--admin", "nonsense:1")


def test_balancing_settings_from_the_file(tmp_path: Any) -> None:
    config = tmp_path / "labelgw.yaml"
    config.write_text("balancer: round_robin\nadmin: none\nejection_base: 1\nbalancer_decay: 2.5\n")
    settings = parse("--config", str(config))
    assert (settings.balancer, settings.admin, settings.ejection_base, settings.balancer_decay) == (
        "round_robin", None, 1.0, 2.5,
    )
    # The command line wins.
    assert parse("--config", str(config), "--balancer", "wrt").balancer == "wrt"
    config.write_text("ejection_base: 600\n")
    with pytest.raises(usage.UsageError, match="ejection_base"):
        parse("--config", str(config))
    config.write_text("ejection_base: 0\n")
    with pytest.raises(usage.UsageError, match="ejection_base"):
        parse("--config", str(config))


# -- which Host the admin view answers (DNS rebinding) ---------------------------------------------------------


def render_for(host: bytes | None, allowed: tuple[str, ...] = (), method: bytes = b"GET") -> tuple[int, dict[str, Any]]:
    request = DummyRequest([b""])
    request.method = method
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    body = AdminResource(Registry(), lambda: 1.0, allowed_hosts=allowed).render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, json.loads(body) if body else {}


@pytest.mark.parametrize(
    "host",
    [
        b"localhost", b"LOCALHOST:8081", b"localhost.", b"admin.localhost", b"a.b.localhost:8081",
        b"127.0.0.1", b"127.0.0.1:8081", b"127.1.2.3:9000", b"[::1]", b"[::1]:8081",
    ],
)
def test_loopback_names_and_addresses_are_answered(host: bytes) -> None:
    status, view = render_for(host)
    assert status == 200 and "services" in view


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example", b"evil.example:8081", b"localhost.evil.example", b"evillocalhost", b"10.0.0.1:8081",
        b"192.168.1.5", b"[2001:db8::1]:8081", b"::1", b"0.0.0.0:8081", b"[::]", b"", b"local host",
        b"127.0.0.1:8081:1", b"127.1",
    ],
)
def test_any_other_host_gets_421_saying_why(host: bytes) -> None:
    status, view = render_for(host)
    assert status == 421
    assert view["error"] == f"the admin view does not answer for host {host.decode()!r}"
    assert "--admin-host" in view["allowed"] and "services" not in view


def test_configured_admin_hosts_are_answered_with_any_port() -> None:
    allowed = ("gw.example.com", "192.168.1.5")
    for host in (b"gw.example.com", b"GW.example.com.:8081", b"192.168.1.5:8081"):
        assert render_for(host, allowed)[0] == 200
    assert render_for(b"other.example.com", allowed)[0] == 421


def test_the_host_is_checked_before_the_method() -> None:
    from twisted.web.error import UnsupportedMethod

    assert render_for(b"evil.example", method=b"POST")[0] == 421
    with pytest.raises(UnsupportedMethod):  # twisted.web's 405
        render_for(b"localhost", method=b"POST")


def test_a_request_without_host_is_answered() -> None:
    # Browsers always send Host; an HTTP/1.0 tool that sends none is not a web page.
    assert render_for(None)[0] == 200


def test_the_site_checks_the_host_of_real_requests() -> None:
    from twisted.internet.testing import StringTransport

    site = admin_site(Registry(), lambda: 1.0, allowed_hosts=("gw.example.com",))
    for host, status in ((b"evil.example:8081", b"421"), (b"127.0.0.1:8081", b"200"), (b"gw.example.com", b"200")):
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/state HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 " + status + b" "), (host, transport.value()[:60])
        channel.connectionLost(None)


def test_admin_host_option_and_setting(tmp_path: Any) -> None:
    assert parse().admin_hosts == ()
    assert parse("--admin-host", "GW.example.com", "--admin-host", "[2001:db8::5]").admin_hosts == (
        "gw.example.com", "2001:db8::5",
    )
    config = tmp_path / "labelgw.yaml"
    config.write_text("admin_hosts: [gw.example.com, 192.168.1.5]\n")
    assert parse("--config", str(config)).admin_hosts == ("gw.example.com", "192.168.1.5")
    # The command line wins.
    assert parse("--config", str(config), "--admin-host", "other.example").admin_hosts == ("other.example",)
    config.write_text("admin_hosts: gw.example.com\n")
    assert parse("--config", str(config)).admin_hosts == ("gw.example.com",)
    for bad in ("admin_hosts: [3]\n", "admin_hosts: {a: b}\n", "admin_hosts: ['evil example']\n"):
        config.write_text(bad)
        with pytest.raises(usage.UsageError, match="--admin-host"):
            parse("--config", str(config))
    with pytest.raises(usage.UsageError, match="--admin-host 'a/b'"):
        parse("--admin-host", "a/b")


def test_the_gateway_passes_admin_hosts_to_the_admin_view(tmp_path: Any) -> None:
    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService

    settings = config.build({"https": ["none"], "admin_hosts": ["gw.example.com"]}, {"docker": False})
    service = LabelgwService(settings, MemoryReactorClock())
    [admin] = [listener for listener in service.listeners if isinstance(listener, AdminListener)]
    assert admin.factory.resource._allowed_hosts == frozenset({"gw.example.com"})
