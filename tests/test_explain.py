"""labelgw.control.explain (what would happen to a request, without doing it) and the admin listener's /explain, /healthz
and /dashboard paths. Deterministic: fake clocks, seeded random sources, twisted.web's test requests."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from labelgw.control.admin import CONTENT_SECURITY_POLICY, AdminListener, AdminResource, static_files
from labelgw.core.backends import Backend
from labelgw.core.balancer import service_policy_factory
from labelgw.control.explain import ExplainError, Explainer, parse_url
from labelgw.core.labels import parse_hash_key
from labelgw.core.model import ContainerSpec
from labelgw.core.registry import Registry
from labelgw.http.versioning import choose_version
from support.specs import typed_options


def spec(container_id: str, service: str = "api", port: int = 8000, **options: str) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=f"{service}-{container_id}", service=service, address="127.0.0.1",
        port=port, hosts=(options.pop("host", f"{service}.localhost"),), version=options.pop("version", None),
        path_prefix=options.pop("path", "/"), strip_prefix=options.pop("strip", "") == "true",
        running=options.pop("running", "true") == "true", **typed_options(options),
    )


def world(*specs: ContainerSpec, policy: str = "wrt", seed: int = 7) -> tuple[Registry, Clock]:
    clock = Clock()
    clock.advance(500.0)
    registry = Registry(
        policy_factory=service_policy_factory(policy, clock.seconds, rng_factory=lambda: random.Random(seed))
    )
    for item in specs:
        registry.apply(item.container_id, item)
    return registry, clock


def serve(registry: Registry, clock: Clock, service: str, elapsed: dict[str, float]) -> Backend:
    """One real request through the policy: picked, counted, finished after its backend's latency."""
    pool = registry.services[service]
    backend = pool.pick()
    assert backend is not None
    pool.policy.on_start(backend)
    backend.requests += 1
    clock.advance(0.01)
    pool.policy.on_finish(backend, elapsed[backend.key], False)
    return backend


THREE = (spec("a", port=8001), spec("b", port=8002), spec("c", port=8003, weight="2"))
LATENCY = {"a": 0.010, "b": 0.050, "c": 0.020}


# -- the URL --------------------------------------------------------------------------------------------------


def test_urls_are_read_as_a_client_would_send_them() -> None:
    line = parse_url("http://API.localhost:8080/x/y?q=1")
    assert (line.scheme, line.host, line.target) == ("http", "api.localhost", b"/x/y?q=1")
    assert parse_url("api.localhost").target == b"/"
    assert parse_url("https://user@api.localhost.").host == "api.localhost"
    for bad in ("", "ftp://api.localhost/", "http:///x", "http://api.localhost/é"):
        with pytest.raises(ExplainError):
            parse_url(bad)


# -- routes ---------------------------------------------------------------------------------------------------


def test_unknown_host_and_unknown_path_are_404_as_the_proxy_says() -> None:
    registry, _ = world(spec("a", path="/api"))
    explainer = Explainer(registry.table)
    view = explainer.explain("http://nowhere.localhost/")
    assert (view["status"], view["route"], view["choice"]) == (404, None, None)
    assert view["answer"] == "404: no route for host 'nowhere.localhost'"
    view = explainer.explain("http://api.localhost/other")
    assert view["status"] == 404 and "no path prefix" in view["answer"]


def test_a_refused_path_is_400_before_any_backend() -> None:
    registry, _ = world(spec("a"))
    view = Explainer(registry.table).explain("http://api.localhost/../etc")
    assert view["status"] == 400 and view["route"] is None and view["backends"] == []


def test_the_route_the_normal_form_and_the_target_sent_upstream() -> None:
    registry, _ = world(spec("a", path="/api", strip="true"), spec("w", service="web", host="api.localhost"))
    view = Explainer(registry.table).explain("http://api.localhost/x/../api/./users?id=1")
    assert view["path"] == "/api/users"
    assert view["route"] == {
        "host": "api.localhost", "match": "exact", "path": "/api", "service": "api", "strip_prefix": True,
        "scheme": "http", "upstream_target": "/users?id=1",
    }
    assert view["status"] is None
    assert view["answer"] == "forwarded to api-a (127.0.0.1:8000) as /users?id=1"
    assert Explainer(registry.table).explain("http://api.localhost/apix")["route"]["service"] == "web"


def test_the_https_redirect_rule_is_asked_for_plain_http() -> None:
    class Rule:
        def location(self, host: str, target: bytes, route: Any) -> bytes | None:
            return b"https://" + host.encode() + target

    registry, _ = world(spec("a"))
    explainer = Explainer(registry.table, redirect=lambda: Rule())
    view = explainer.explain("http://api.localhost/x")
    assert view["status"] == 308 and view["answer"] == "308: plain HTTP is redirected to https://api.localhost/x"
    assert explainer.explain("https://api.localhost/x")["status"] is None


# -- the balancer, dry ----------------------------------------------------------------------------------------


def test_wrt_costs_and_the_choice_are_the_next_real_pick_and_asking_changes_nothing() -> None:
    asked, asked_clock = world(*THREE)
    quiet, quiet_clock = world(*THREE)
    explainer = Explainer(asked.table)
    for _ in range(40):
        view = explainer.explain("http://api.localhost/")
        again = explainer.explain("http://api.localhost/")
        assert again["choice"] == view["choice"]  # asking twice is asking once
        chosen = serve(asked, asked_clock, "api", LATENCY)
        # What explain said is what the balancer then did, and a gateway nobody asked decides alike.
        assert view["choice"]["id"] == chosen.key
        assert serve(quiet, quiet_clock, "api", LATENCY).key == chosen.key
    assert [b.requests for b in asked.services["api"].backends.values()] == [
        b.requests for b in quiet.services["api"].backends.values()
    ]
    view = explainer.explain("http://api.localhost/")
    assert view["service"] == {"name": "api", "balancer": "wrt"}
    assert view["cost"].startswith("cost = latency estimate")
    rows = {row["id"]: row for row in view["backends"]}
    assert set(rows) == {"a", "b", "c"} and all(row["candidate"] for row in rows.values())
    for row in rows.values():
        assert row["cost"] == pytest.approx(row["latency_ms"] * (row["in_flight"] + 1) / row["weight"], abs=1e-3)
    assert rows["c"]["weight"] == 2.0
    assert [row["id"] for row in view["backends"] if row["chosen"]] == [view["choice"]["id"]]
    # The choice is the cheapest, or within the 20 % that count as a tie.
    assert rows[view["choice"]["id"]]["cost"] <= min(row["cost"] for row in rows.values()) / 0.8 + 1e-6


def test_a_first_pick_leaves_backends_without_an_estimate_as_it_found_them() -> None:
    registry, _ = world(*THREE)
    pool = registry.services["api"]
    view = Explainer(registry.table).explain("http://api.localhost/")
    assert all(b.stats is None for b in pool.backends.values())
    # The estimates the pick compared (every backend starts at the default 30 ms).
    assert [row["latency_ms"] for row in view["backends"]] == [30.0, 30.0, 30.0]
    assert view["choice"]["id"] == pool.pick().key  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_rotating_policies_name_the_next_in_turn_and_keep_their_turn(policy: str) -> None:
    registry, _ = world(*THREE, policy=policy)
    pool = registry.services["api"]
    explainer = Explainer(registry.table)
    for _ in range(7):
        expected = explainer.explain("http://api.localhost/")["choice"]["id"]
        assert explainer.explain("http://api.localhost/")["choice"]["id"] == expected
        assert pool.pick().key == expected  # type: ignore[union-attr]


def test_a_policy_with_slots_keeps_its_turn_too() -> None:
    class Turns:
        __slots__ = ("name", "turn", "rng")

        def __init__(self) -> None:
            self.name = "turns"
            self.turn = 0
            self.rng = random.Random(3)

        def pick(self, ready: Any) -> Backend | None:
            self.turn += 1
            return ready[(self.turn + self.rng.randrange(2)) % len(ready)] if ready else None

    registry, _ = world(*THREE)
    pool = registry.services["api"]
    pool.policy = Turns()  # type: ignore[assignment]
    explainer = Explainer(registry.table)
    for _ in range(6):
        expected = explainer.explain("http://api.localhost/")["choice"]["id"]
        assert explainer.explain("http://api.localhost/")["choice"]["id"] == expected
        assert pool.pick().key == expected  # type: ignore[union-attr]
    assert explainer.explain("http://api.localhost/")["cost"] == "policy turns"


def test_least_conn_cost_is_in_flight_per_weight() -> None:
    registry, _ = world(*THREE, policy="least_conn")
    pool = registry.services["api"]
    pool.backends["a"].in_flight = 3
    pool.backends["b"].in_flight = 1
    pool.backends["c"].in_flight = 3
    view = Explainer(registry.table).explain("http://api.localhost/")
    assert {row["id"]: row["cost"] for row in view["backends"]} == {"a": 3.0, "b": 1.0, "c": 1.5}
    assert view["choice"]["id"] == "b"
    assert Explainer(registry.table).explain("http://api.localhost/")["cost"].startswith("cost = in flight / weight")


def test_backends_out_of_rotation_are_listed_with_why_and_none_ready_is_503() -> None:
    registry, _ = world(spec("a", running="false"), spec("b", **{"health.path": "/health"}))
    view = Explainer(registry.table).explain("http://api.localhost/")
    assert view["backends"] == [] and view["choice"] is None
    assert view["status"] == 503 and view["answer"] == "503: service 'api' has no ready backend (Retry-After: 1)"
    assert {row["id"]: row["why"] for row in view["not_ready"]} == {
        "a": "container not running (or being stopped)", "b": "health check unknown",
    }


# -- versions -------------------------------------------------------------------------------------------------


VERSIONS = (spec("a1", version="v1"), spec("a2", version="v1"), spec("b1", version="v2", traffic="25"))


def test_a_new_client_gets_the_version_the_next_new_client_would_get() -> None:
    registry, _ = world(*VERSIONS)
    pool = registry.services["api"]
    explainer = Explainer(registry.table)

    class Head:
        def __init__(self, fields: dict[bytes, bytes]) -> None:
            self.fields = fields

        def field(self, name: bytes) -> bytes | None:
            return self.fields.get(name)

    for _ in range(8):
        view = explainer.explain("http://api.localhost/")
        decision = view["version"]
        assert decision["split"] and decision["shares"] == {"v1": 75.0, "v2": 25.0}
        assert decision["why"].startswith("a new client")
        backend, version, cookie, _ = choose_version(pool, Head({}), b"x-labelgw-version")  # type: ignore[arg-type]
        assert decision["decision"] == version and decision["set_cookie"] == f"labelgw_version_api={version}"
        assert view["choice"]["version"] == version
        assert backend is not None and view["choice"]["id"] == backend.key
        # Only the candidates of that version can be chosen.
        assert {row["id"] for row in view["backends"] if row["candidate"]} == (
            {"a1", "a2"} if version == "v1" else {"b1"}
        )
    # Explaining gave nobody a cookie: the eight real new clients are all there is.
    assert sum(pool.sticky_clients.values()) == 8 and pool.sticky_clients == {"v1": 6, "v2": 2}


def test_pinned_and_sticky_decisions_say_why() -> None:
    registry, _ = world(*VERSIONS)
    explainer = Explainer(registry.table, version_header="X-Canary")
    view = explainer.explain("http://api.localhost/", version="v2")
    assert (view["version"]["decision"], view["version"]["pinned"]) == ("v2", True)
    assert view["version"]["why"] == "pinned by the X-Canary header" and view["choice"]["id"] == "b1"
    view = explainer.explain("http://api.localhost/", version="v9")
    # No container of v9 at all: 404, as the proxy answers (a retry cannot help).
    assert view["status"] == 404 and "never leaves it" in view["version"]["why"]
    assert view["answer"] == "404: service 'api' has no version 'v9'"
    view = explainer.explain("http://api.localhost/", cookie="x=1; labelgw_version_api=v2")
    assert view["version"]["decision"] == "v2" and view["version"]["set_cookie"] is None
    assert view["version"]["why"] == "sticky: the client's cookie labelgw_version_api=v2"
    view = explainer.explain("http://api.localhost/", cookie="labelgw_version_api=v7")
    assert view["version"]["sticky"] == "v7" and "'v7', which has no ready backend" in view["version"]["why"]


def test_a_service_with_one_version_is_not_split() -> None:
    registry, _ = world(spec("a", version="v1"), spec("b", version="v1"))
    decision = Explainer(registry.table).explain("http://api.localhost/")["version"]
    assert (decision["split"], decision["decision"]) == (False, None)
    assert decision["why"] == "every ready backend is version 'v1': no split"


# -- the admin listener's paths -------------------------------------------------------------------------------


def get(resource: AdminResource, path: bytes, host: bytes | None = b"127.0.0.1:8081", **headers: bytes) -> tuple[int, bytes, DummyRequest]:
    raw_path, _, query = path.partition(b"?")
    request = DummyRequest(raw_path.lstrip(b"/").split(b"/"))
    request.method = b"GET"
    for pair in filter(None, query.split(b"&")):
        name, _, value = pair.partition(b"=")
        from urllib.parse import unquote_to_bytes

        request.args.setdefault(name, []).append(unquote_to_bytes(value))
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request.responseCode or 200, body, request


def test_explain_over_http_takes_the_url_the_version_and_the_version_header() -> None:
    registry, clock = world(*VERSIONS)
    resource = AdminResource(registry, clock.seconds, explainer=Explainer(registry.table, "X-Canary"))
    status, body, request = get(resource, b"/explain?url=http%3A%2F%2Fapi.localhost%2Fx&version=v2")
    view = json.loads(body)
    assert status == 200 and request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert (view["host"], view["target"], view["choice"]["id"]) == ("api.localhost", "/x", "b1")
    _, body, _ = get(resource, b"/explain?url=api.localhost", X_Canary=b"v1")
    assert json.loads(body)["version"]["why"] == "pinned by the X-Canary header"
    _, body, _ = get(resource, b"/explain?url=api.localhost&cookie=labelgw_version_api%3Dv2")
    assert json.loads(body)["version"]["decision"] == "v2"
    status, body, _ = get(resource, b"/explain")
    assert status == 400 and "give a URL" in json.loads(body)["error"]


def test_healthz_is_200_while_serving_and_503_once_stopping() -> None:
    serving = [True]
    resource = AdminResource(Registry(), lambda: 1.0, serving=lambda: serving[0])
    status, body, _ = get(resource, b"/healthz")
    assert (status, json.loads(body)) == (200, {"status": "serving"})
    serving[0] = False
    status, body, _ = get(resource, b"/healthz")
    assert (status, json.loads(body)) == (503, {"status": "draining"})
    # The Host rule holds for every path.
    for path in (b"/healthz", b"/dashboard", b"/dashboard.js", b"/explain?url=api.localhost"):
        assert get(resource, path, host=b"evil.example")[0] == 421


def test_the_dashboard_is_served_from_the_package_with_a_strict_policy() -> None:
    resource = AdminResource(Registry(), lambda: 1.0)
    files = static_files()
    for path, name, kind in (
        (b"/dashboard", "dashboard.html", b"text/html; charset=utf-8"),
        (b"/dashboard/", "dashboard.html", b"text/html; charset=utf-8"),
        (b"/dashboard.js", "dashboard.js", b"text/javascript; charset=utf-8"),
        (b"/dashboard.css", "dashboard.css", b"text/css; charset=utf-8"),
    ):
        status, body, request = get(resource, path)
        assert (status, body) == (200, files[name])
        assert request.responseHeaders.getRawHeaders(b"content-type") == [kind]
        assert request.responseHeaders.getRawHeaders(b"content-security-policy") == [CONTENT_SECURITY_POLICY]
    page = files["dashboard.html"].decode()
    # No CDN, no inline script: the page's own files only.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script>" not in page
    assert '<script src="/dashboard.js"' in page
    script = files["dashboard.js"].decode()
    assert "innerHTML" not in script and 'fetch("/api/state"' in script


def test_the_gateway_keeps_its_admin_listener_through_the_drain_and_answers_503() -> None:
    from twisted.internet.testing import StringTransport

    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService

    reactor = MemoryReactorClock()
    settings = config.build({"https": ["none"], "http": ["tcp:0:interface=127.0.0.1"]}, {"docker": False})
    service = LabelgwService(settings, reactor)
    service.privilegedStartService()
    service.startService()
    assert service.admin is not None
    site = service.admin.factory

    def healthz() -> bytes:
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return transport.value().split(b"\r\n", 1)[0]

    assert healthz() == b"HTTP/1.1 200 OK"
    # A client connection still open: the drain waits for it (up to drain_grace).
    class Held:
        drained = False

        def drain(self) -> None:
            self.drained = True

    held = Held()
    service.gateway.connections.add(held)  # type: ignore[arg-type]
    done: list[Any] = []
    stopped: Deferred[Any] = service.stopService()
    stopped.addBoth(done.append)
    assert service.admin.running and healthz() == b"HTTP/1.1 503 Service Unavailable"
    assert all(not listener.running for listener in service.listeners if listener is not service.admin)
    assert held.drained and not done
    service.gateway.connection_closed(held)  # type: ignore[arg-type]
    assert not service.admin.running
    assert len(done) == 1
    assert isinstance(service.admin, AdminListener)


def test_explain_follows_the_fallback_and_the_open_breaker() -> None:
    # qa: a service with no ready backend and a fallback was explained as 503 while the proxy served the fallback.
    import dataclasses

    from labelgw.core.middleware import parse_middleware
    from labelgw.middleware.chain import MiddlewareManager

    clock = Clock()
    registry = Registry(policy_factory=service_policy_factory("round_robin", clock.seconds))
    registry.add_listener(MiddlewareManager(clock, registry.services))
    shop = dataclasses.replace(
        spec("s", service="shop", running="false"),
        middleware=parse_middleware({"fallback": "api", "breaker.error_rate": "50%"}, "shop"),
    )
    for item in (spec("a", port=8001), shop):
        registry.apply(item.container_id, item)
    explainer = Explainer(registry.table)
    view = explainer.explain("http://shop.localhost/x")
    assert view["status"] is None, view["answer"]
    assert view["fallback"] == {"service": "api", "why": "the service has no ready backend"}
    assert view["choice"]["container"] == "api-a" and "fallback service 'api'" in view["answer"]
    assert view["middleware"]["fallback"]["service"] == "api"
    # A static fallback answers with its status; an open breaker with a ready backend diverts too.
    static = dataclasses.replace(
        spec("t", service="shop2", port=8003),
        middleware=parse_middleware({"fallback.status": "503", "fallback.body": "later", "breaker.error_rate": "50%"}, "shop2"),
    )
    registry.apply("t", static)
    assert explainer.explain("http://shop2.localhost/")["status"] is None
    chain = registry.services["shop2"].middleware
    for _ in range(40):
        chain.breaker.record(clock.seconds(), True)
    assert chain.breaker.state == "open"
    view = explainer.explain("http://shop2.localhost/")
    assert view["status"] == 503 and "later" in view["answer"], view["answer"]


def test_the_dashboard_shows_every_field_the_admin_view_gives_a_services_middlewares() -> None:
    # qa: the dashboard showed no middleware at all, though the admin view describes each one's state.
    from labelgw.core.middleware import parse_middleware
    from labelgw.middleware.chain import Chain

    labels = {"ratelimit": "10/s", "max_inflight": "2", "breaker.error_rate": "50%", "fallback": "spare"}
    registry, clock = world(spec("a"))
    chain = Chain(parse_middleware(labels, "api"), registry.services["api"], clock, registry.services)  # type: ignore[arg-type]
    script = static_files()["dashboard.js"].decode()
    assert "service.middleware" in script
    for part, fields in chain.describe().items():
        assert f"mw.{part}" in script, part
        for field in fields:
            assert f"mw.{part}.{field}" in script, (part, field)


def test_a_hash_service_keyed_by_path_or_cookie_is_explained_with_the_requests_key() -> None:
    # qa: explain always showed a random position for `hash`, though the URL holds a `path` key (and
    # &cookie= a `cookie:NAME` one): the pick shown was not where the request would go.
    for hash_key, url, cookie, key in (
        ("path", "http://api.localhost/users/{n}", None, "/users/{n}"),
        ("cookie:sid", "http://api.localhost/", "sid={n}", "{n}"),
    ):
        specs = [dataclasses.replace(item, balancer="hash", hash_key=parse_hash_key(hash_key)) for item in THREE]
        registry, _ = world(*specs)
        pool = registry.services["api"]
        explainer = Explainer(registry.table)
        for n in range(12):
            view = explainer.explain(url.format(n=n), cookie=cookie.format(n=n) if cookie else None)
            assert "this request's key" in view["cost"]
            expected = pool.pick(key=key.format(n=n).encode())
            assert expected is not None and view["choice"]["id"] == expected.key, (hash_key, n)
