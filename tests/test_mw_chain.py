"""The middleware chain in the data path, on the deterministic proxy harness: rate limit answers, concurrency
slots and the FIFO queue, the breaker opening and closing, and the fallback choices."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from twisted.internet.address import IPv4Address

from labelgw.core.middleware import BreakerSpec, ConcurrencySpec, FallbackSpec, MiddlewareSpec, RateLimitSpec
from labelgw.core.model import ContainerSpec
from labelgw.middleware.breaker import CLOSED, HALF_OPEN, OPEN
from labelgw.middleware.chain import BREAKER_OPEN, CONCURRENCY_LIMIT, NO_BACKEND, MiddlewareManager
from proxyharness import Client, ProxyHarness, Response, Upstream, get, ok, spec


def harness(*specs: ContainerSpec) -> ProxyHarness:
    h = ProxyHarness(specs=())
    h.registry.add_listener(MiddlewareManager(h.reactor, h.registry.services))
    for container in specs:
        h.registry.apply(container.container_id, container)
    return h


def with_mw(container: ContainerSpec, **parts: Any) -> ContainerSpec:
    return dataclasses.replace(container, middleware=MiddlewareSpec(**parts))


API = spec("api-1", "api", 9001, ("api.localhost",))
SPARE = spec("spare-1", "spare", 9601, ("spare.localhost",))


class Served:
    """Clients that send one request each and a backend that answers them all (pooled connections reused)."""

    def __init__(self, h: ProxyHarness) -> None:
        self.h = h
        self.upstreams: list[Upstream] = []

    def request(self, path: bytes = b"/", extra: bytes = b"", host: bytes = b"api.localhost", peer: str = "10.0.0.9",
                answer: bytes | None = None) -> Response:
        client = self.h.connect(IPv4Address("TCP", peer, 5555))
        client.send(get(host, path, extra))
        upstream = self.pending()
        if upstream is not None:
            self.pending_port = upstream.port
            upstream.take()
            upstream.send(answer if answer is not None else ok())
        self.h.settle()
        return client.response()

    def pending(self) -> Upstream | None:
        for fresh in self.h.new_connects():
            self.upstreams.append(fresh.accept())
        for upstream in self.upstreams:
            if upstream.received() and not upstream.lost:
                return upstream
        return None


def test_a_service_without_middlewares_has_no_chain() -> None:
    h = harness(API)
    assert h.registry.services["api"].middleware is None
    assert Served(h).request().status == 200


def test_rate_limit_ten_per_second_burst_ten_then_429_and_another_key_unaffected() -> None:
    rate = RateLimitSpec(rate=10, burst=10, quota=10, window=1, key="header", key_name="x-client")
    h = harness(with_mw(API, ratelimit=rate))
    served = Served(h)
    answers = [served.request(extra=b"X-Client: a\r\n") for _ in range(30)]
    assert [r.status for r in answers] == [200] * 10 + [429] * 20
    refused = answers[-1]
    assert refused.header(b"Retry-After") == b"1"
    assert refused.header(b"RateLimit-Policy") == b'"default";q=10;w=1'
    assert refused.header(b"RateLimit") == b'"default";r=0;t=1'
    assert b"rate limit" in refused.body
    assert served.request(extra=b"X-Client: b\r\n").status == 200
    h.advance(0.1)
    assert served.request(extra=b"X-Client: a\r\n").status == 200
    assert served.request(extra=b"X-Client: a\r\n").status == 429
    h.assert_accounting()
    assert h.registry.services["api"].middleware.describe()["ratelimit"]["limited"] == 21


def test_rate_limit_by_client_address() -> None:
    h = harness(with_mw(API, ratelimit=RateLimitSpec(rate=1, burst=1, quota=1, window=1)))
    served = Served(h)
    assert [served.request(peer="10.0.0.1").status for _ in range(2)] == [200, 429]
    assert served.request(peer="10.0.0.2").status == 200


def open_requests(h: ProxyHarness, count: int) -> list[Client]:
    clients = []
    for _ in range(count):
        client = h.connect()
        client.send(get())
        clients.append(client)
    return clients


def test_max_inflight_two_gives_a_fast_503_to_the_third() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(2)))
    clients = open_requests(h, 3)
    upstreams = [u.accept() for u in h.new_connects()]
    assert len(upstreams) == 2
    third = clients[2].response()
    assert (third.status, third.header(b"Retry-After")) == (503, b"1")
    assert b"max_inflight 2" in third.body
    for upstream in upstreams:
        upstream.send(ok())
    assert [c.response().status for c in clients[:2]] == [200, 200]
    for upstream in upstreams:
        upstream.take()
    [fourth] = open_requests(h, 1)  # a slot is free again: it goes to a pooled connection
    [upstream] = [u for u in upstreams if u.take()]
    upstream.send(ok())
    assert fourth.response().status == 200
    h.assert_accounting()
    assert h.registry.services["api"].middleware.concurrency.active == 0


def test_pending_requests_wait_in_order_and_start_when_a_slot_frees() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 2, 1.0)))
    first, second, third, fourth = open_requests(h, 4)
    [upstream] = [u.accept() for u in h.new_connects()]
    assert fourth.response().status == 503  # one running, two waiting: no room
    assert not second.received() and not third.received()
    h.advance(0.5)
    upstream.send(ok(b"one"))
    assert first.response().body == b"one"
    # The slot went to the second request, which reuses the pooled connection.
    assert upstream.take().count(b"GET / HTTP/1.1") == 2
    upstream.send(ok(b"two"))
    assert second.response().body == b"two"
    upstream.send(ok(b"three"))
    assert third.response().body == b"three"
    h.assert_accounting()


def test_waiting_requests_count_on_no_backend_until_admitted() -> None:
    # The pick happens at admission: a queued request must not steer the balancer away from a backend.
    second_api = dataclasses.replace(API, container_id="api-2", name="api-2", port=9002)
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 2, 5.0)), second_api)
    first, second, third = open_requests(h, 3)
    [upstream] = [u.accept() for u in h.new_connects()]
    loads = [(b.in_flight, b.requests) for b in h.backends()]
    assert sorted(loads) == [(0, 0), (1, 1)]
    assert h.registry.services["api"].in_flight == 3  # the service does count them (its in-flight bound)
    upstream.take()
    upstream.send(ok(b"one"))
    assert first.response().body == b"one"
    assert sum(b.in_flight for b in h.backends()) == 1 and sum(b.requests for b in h.backends()) == 2
    upstreams = [upstream] + [fresh.accept() for fresh in h.new_connects()]
    for body in (b"two", b"three"):
        [busy] = [u for u in upstreams if u.take()]
        busy.send(ok(body))
    assert (second.response().body, third.response().body) == (b"two", b"three")
    h.assert_accounting()


def test_a_request_admitted_after_its_first_pick_left_goes_to_a_backend_ready_now() -> None:
    second_api = dataclasses.replace(API, container_id="api-2", name="api-2", port=9002)
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 5.0)), second_api)
    first, second = open_requests(h, 2)
    [upstream] = [u.accept() for u in h.new_connects()]
    # Whichever backend the first request did not take goes away while the second waits.
    idle = [b for b in h.backends() if b.in_flight == 0]
    assert len(idle) == 1
    h.registry.remove(idle[0].key)
    upstream.send(ok(b"one"))
    assert first.response().body == b"one"
    assert upstream.take().count(b"GET / HTTP/1.1") == 2  # the second went to the one left, pooled connection
    upstream.send(ok(b"two"))
    assert second.response().body == b"two"
    h.assert_accounting()


def test_a_request_admitted_when_no_backend_is_left_gets_503() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 5.0)))
    first, second = open_requests(h, 2)
    [upstream] = [u.accept() for u in h.new_connects()]
    h.registry.apply("api-1", dataclasses.replace(API, running=False))
    upstream.send(ok(b"one"))
    first.response()
    answer = second.response()
    assert (answer.status, answer.header(b"Retry-After")) == (503, b"1")
    assert b"no ready backend" in answer.body
    assert h.backend("api-1").errors == 0


def test_a_waiting_request_times_out_with_503() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 0.5)))
    first, second = open_requests(h, 2)
    [upstream] = [u.accept() for u in h.new_connects()]
    h.advance(0.49)
    assert not second.received()
    h.advance(0.02)
    answer = second.response()
    assert (answer.status, answer.header(b"Retry-After")) == (503, b"1")
    assert b"waited too long" in answer.body
    upstream.send(ok())
    assert first.response().status == 200
    h.assert_accounting()
    limiter = h.registry.services["api"].middleware.concurrency
    assert (limiter.active, limiter.pending, limiter.timeouts) == (0, 0, 1)
    # The wait did not count against the backend.
    assert h.backend("api-1").errors == 0


def test_a_waiting_request_whose_client_leaves_gives_up_its_place() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 5.0)))
    first, second = open_requests(h, 2)
    [upstream] = [u.accept() for u in h.new_connects()]
    second.reset()
    h.settle()
    limiter = h.registry.services["api"].middleware.concurrency
    assert limiter.pending == 0
    upstream.send(ok())
    assert first.response().status == 200
    h.assert_accounting()
    assert limiter.active == 0


def test_a_waiting_request_with_a_body_sends_it_once_admitted() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 5.0)))
    [first] = open_requests(h, 1)
    second = h.connect()
    second.send(b"POST /up HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: 5\r\n\r\nhello")
    [upstream] = [u.accept() for u in h.new_connects()]
    upstream.send(ok())
    assert first.response().status == 200
    request = upstream.take().split(b"\r\n\r\n", 1)[1]
    assert request.startswith(b"POST /up HTTP/1.1") and request.endswith(b"\r\n\r\nhello")
    upstream.send(ok())
    assert second.response().status == 200
    h.assert_accounting()


BREAKER = BreakerSpec(0.5, window=10, open_for=5)


def test_breaker_opens_on_errors_fails_fast_then_closes_after_probes() -> None:
    h = harness(with_mw(API, breaker=BREAKER))
    served = Served(h)
    failing = ok(b"down", status=b"500 Internal Server Error")
    assert [served.request(answer=failing).status for _ in range(20)] == [500] * 20
    chain = h.registry.services["api"].middleware
    assert chain.breaker.state is OPEN
    connects = h.connect_count()
    fast = served.request()
    assert (fast.status, fast.header(b"Retry-After")) == (503, b"5")
    assert b"circuit breaker open" in fast.body and h.connect_count() == connects
    h.advance(5)
    assert served.request().status == 200
    assert chain.breaker.state is HALF_OPEN
    assert [served.request().status for _ in range(2)] == [200, 200]
    assert chain.breaker.state is CLOSED
    h.assert_accounting()


def test_a_failed_probe_opens_the_breaker_again() -> None:
    h = harness(with_mw(API, breaker=BREAKER))
    served = Served(h)
    failing = ok(b"down", status=b"503 Service Unavailable")
    for _ in range(20):
        served.request(answer=failing)
    h.advance(5)
    assert served.request(answer=failing).status == 503
    chain = h.registry.services["api"].middleware
    assert chain.breaker.state is OPEN and chain.breaker.opened == 2
    assert served.request().header(b"Retry-After") == b"5"


def test_gateway_errors_count_for_the_breaker() -> None:
    h = harness(with_mw(API, breaker=BREAKER))
    for _ in range(20):
        client = h.connect()
        client.send(get())
        for upstream in h.new_connects():
            upstream.refuse()
        h.settle()
        assert client.response().status == 502
    assert h.registry.services["api"].middleware.breaker.state is OPEN
    h.assert_accounting()


# --- fallback -----------------------------------------------------------------------------------------------


def test_no_ready_backend_goes_to_the_fallback_service() -> None:
    down = dataclasses.replace(API, running=False)
    h = harness(with_mw(down, fallback=FallbackSpec(service="spare")), SPARE)
    client = h.connect()
    client.send(get(path=b"/page"))
    assert client.protocol.exchange.fallback_reason == NO_BACKEND
    upstream = h.upstream().accept()
    assert upstream.port == 9601
    request = upstream.request()
    assert (request.target, request.header(b"Host")) == (b"/page", b"api.localhost")
    upstream.send(ok(b"spare"))
    assert client.response().body == b"spare"
    h.assert_accounting()


def test_fallback_service_without_ready_backend_means_503() -> None:
    down = dataclasses.replace(API, running=False)
    h = harness(with_mw(down, fallback=FallbackSpec(service="spare")), dataclasses.replace(SPARE, running=False))
    client = h.connect()
    client.send(get())
    answer = client.response()
    assert answer.status == 503 and b"'api' has no ready backend" in answer.body
    h.assert_accounting()


def test_unknown_fallback_service_means_503() -> None:
    h = harness(with_mw(dataclasses.replace(API, running=False), fallback=FallbackSpec(service="nowhere")))
    client = h.connect()
    client.send(get())
    assert client.response().status == 503


def test_static_fallback_answers_itself() -> None:
    h = harness(with_mw(dataclasses.replace(API, running=False), fallback=FallbackSpec(status=503, body="back soon")))
    client = h.connect()
    client.send(get())
    answer = client.response()
    assert (answer.status, answer.header(b"Retry-After")) == (503, b"1")
    assert b"back soon" in answer.body
    assert h.connect_count() == 0


def test_breaker_open_goes_to_the_fallback() -> None:
    h = harness(with_mw(API, breaker=BREAKER, fallback=FallbackSpec(service="spare")), SPARE)
    served = Served(h)
    for _ in range(20):
        served.request(answer=ok(b"", status=b"500 Internal Server Error"))
    client = h.connect()
    client.send(get())
    assert client.protocol.exchange.fallback_reason == BREAKER_OPEN
    upstream = h.upstream().accept()
    assert upstream.port == 9601
    upstream.send(ok(b"spare"))
    assert client.response().body == b"spare"
    # Fallback requests say nothing about the breaker's own service.
    assert h.registry.services["api"].middleware.breaker.state is OPEN
    h.assert_accounting()


def test_concurrency_rejection_goes_to_the_fallback() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1), fallback=FallbackSpec(service="spare")), SPARE)
    first, second = open_requests(h, 2)
    assert second.protocol.exchange.fallback_reason == CONCURRENCY_LIMIT
    upstreams = {u.port: u.accept() for u in h.new_connects()}
    assert set(upstreams) == {9001, 9601}
    for upstream in upstreams.values():
        upstream.send(ok())
    assert first.response().status == second.response().status == 200
    h.assert_accounting()
    assert h.registry.services["api"].middleware.concurrency.active == 0


def test_static_fallback_for_a_queue_timeout() -> None:
    h = harness(with_mw(API, concurrency=ConcurrencySpec(1, 1, 1.0), fallback=FallbackSpec(status=503, body="busy")))
    first, second = open_requests(h, 2)
    h.advance(1)
    assert second.response().status == 503 and b"busy" in second.response().body
    h.upstream().accept().send(ok())
    h.assert_accounting()


@pytest.mark.parametrize("first_has_it", [True, False])
def test_the_first_containers_middleware_wins(first_has_it: bool) -> None:
    limited = with_mw(API, concurrency=ConcurrencySpec(1))
    other = dataclasses.replace(API, container_id="api-2", name="api-2", port=9002)
    specs = (limited, other) if first_has_it else (other, dataclasses.replace(limited, container_id="api-3", name="api-3"))
    h = harness(*specs)
    chain = h.registry.services["api"].middleware
    assert (chain is not None) is first_has_it


def test_admin_view_describes_the_chain() -> None:
    h = harness(with_mw(API, ratelimit=RateLimitSpec(rate=5, burst=5, quota=5, window=1), concurrency=ConcurrencySpec(3),
                         breaker=BREAKER, fallback=FallbackSpec(service="spare")), SPARE)
    from labelgw.control.admin import state

    view = state(h.registry, h.now())["services"]["api"]["middleware"]
    assert view["ratelimit"]["burst"] == 5 and view["concurrency"]["max_inflight"] == 3
    assert view["breaker"]["state"] == "closed" and view["fallback"]["service"] == "spare"
    assert "middleware" not in state(h.registry, h.now())["services"]["spare"]


# --- HTTP/2: the same dispatcher, the same chain --------------------------------------------------------------


def test_http2_streams_meet_the_same_chain() -> None:
    from test_h2 import H2Client

    rate = RateLimitSpec(rate=1, burst=3, quota=1, window=1)
    h = harness(with_mw(API, ratelimit=rate, concurrency=ConcurrencySpec(1, 1, 1.0)))
    client = H2Client(h)
    first = client.request(authority=b"api.localhost")
    second = client.request(authority=b"api.localhost")
    third = client.request(authority=b"api.localhost")
    fourth = client.request(authority=b"api.localhost")
    assert client.streams[third].status == 503  # one running, one waiting
    assert client.streams[fourth].status == 429 and client.streams[fourth].header(b"retry-after") == b"1"
    [upstream] = [u.accept() for u in h.new_connects()]
    upstream.send(ok(b"one"))
    client.exchange()
    assert client.streams[first].body == b"one" and client.streams[second].headers is None
    assert upstream.take().count(b"GET / HTTP/1.1") == 2  # the waiting stream went next
    upstream.send(ok(b"two"))
    client.exchange()
    assert client.streams[second].body == b"two"
    h.assert_accounting()


def test_a_versioned_fallback_service_keeps_its_split_when_the_service_has_no_ready_backend() -> None:
    # qa: the no-ready-backend fallback picked among all of the fallback's backends, ignoring its version split
    # (shares, canary cuts, the sticky cookie) and its hash key.
    down = dataclasses.replace(API, running=False)
    v1 = dataclasses.replace(SPARE, version="v1")
    v2 = dataclasses.replace(spec("spare-2", "spare", 9602, ("spare.localhost",)), version="v2", traffic=0.0)
    h = harness(with_mw(down, fallback=FallbackSpec(service="spare")), v1, v2)
    served = Served(h)
    ports = []
    for _ in range(4):
        served.request()
        ports.append(served.pending_port)
    assert set(ports) == {9601}, ports
    h.assert_accounting()


def test_middleware_answers_are_counted_in_the_request_metrics() -> None:
    # qa: 429s of the rate limit, the breaker's and concurrency limit's 503s and static fallbacks were missing
    # from labelgw_requests_total (the dispatcher counts its own answers; the chain answered without a word).
    from labelgw.control.metrics import RequestMetrics

    h = harness(with_mw(API, ratelimit=RateLimitSpec(rate=1, burst=1, quota=1, window=1)),
                with_mw(SPARE, concurrency=ConcurrencySpec(1), fallback=FallbackSpec(status=503, body="busy")))
    h.gateway.metrics = metrics = RequestMetrics()
    served = Served(h)
    assert served.request().status == 200
    assert served.request().status == 429
    first = h.connect()
    first.send(get(b"spare.localhost"))
    assert served.request(host=b"spare.localhost").status == 503  # static fallback: the one slot is taken
    assert metrics.services["api"].requests.get(("", "GET", 4)) == 1, metrics.services["api"].requests
    assert metrics.services["spare"].requests.get(("", "GET", 5)) == 1, metrics.services["spare"].requests


def test_a_versioned_hash_service_with_a_canary_limit_and_a_rate_limit_works_as_one() -> None:
    # qa: the features merged together: the rate limit answers first, the version split then the key place a
    # request (a key keeps its backend within its version), and canary analysis cuts the failing version.
    from labelgw.core.balancer import service_policy_factory
    from labelgw.core.canary import describe_service
    from labelgw.core.labels import parse_hash_key

    h = harness()
    h.registry._policy_factory = service_policy_factory("wrt", h.reactor.seconds)
    common: dict[str, Any] = dict(
        middleware=MiddlewareSpec(ratelimit=RateLimitSpec(rate=1000, burst=1000, quota=1000, window=1)),
        balancer="hash", hash_key=parse_hash_key("header:X-User"),
    )
    for container_id, port, version, extra in (
        ("v1-a", 9001, "v1", {}), ("v1-b", 9002, "v1", {}),
        ("v2-a", 9003, "v2", {"traffic": 50.0, "canary_max_error_rate": 0.05}),
    ):
        container = dataclasses.replace(spec(container_id, "api", port, ("api.localhost",)), version=version, **common, **extra)
        h.registry.apply(container_id, container)
    pool = h.registry.services["api"]
    assert pool.middleware is not None and pool.key_source is not None and pool.split is not None
    served = Served(h)
    v1_port: dict[int, set[int]] = {}
    for i in range(60):
        h.advance(0.01)
        user = i % 7
        answer = ok(b"", status=b"500 Internal Server Error") if i % 2 else ok()
        response = served.request(extra=b"X-User: u%d\r\n" % user, answer=answer)
        if served.pending_port != 9003:
            v1_port.setdefault(user, set()).add(served.pending_port)
            assert response.status == 200
    assert all(len(ports) == 1 for ports in v1_port.values()), v1_port  # a key keeps its v1 backend
    h.advance(1.0)
    served.request(extra=b"X-User: z\r\n")  # the first request of a new slot applies the rule
    figures = describe_service(pool, h.now())
    assert figures["v2"].cut and not figures["v1"].cut
    assert pool.split is not None and pool.split.shares["v2"] == 0.0
    for i in range(10):
        served.request(extra=b"X-User: n%d\r\n" % i)
        assert served.pending_port in (9001, 9002)
    h.assert_accounting()
