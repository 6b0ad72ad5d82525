"""Active health checks (labelgw.control.health): an injected clock and an injected HTTP call; no sockets, no sleeps.

One test at the end runs the real treq call against a twisted.web server on loopback (real reactor)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from labelgw.core.backends import Backend, RoundRobin, ServicePool
from labelgw.control.health import HealthChecker, treq_getter
from labelgw.core.model import ContainerSpec
from labelgw.core.registry import Registry
from support.specs import typed_options


def spec(container_id: str, port: int = 8000, **options: str) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=f"api-{container_id}", service="api", address="127.0.0.1", port=port,
        hosts=("api.localhost",), **typed_options(options),
    )


def checked(container_id: str, port: int = 8000, path: str = "/healthz", **options: str) -> ContainerSpec:
    return spec(container_id, port, **{"health.path": path, **options})


class FakeHttp:
    """Stands in for treq: every call waits until the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, Deferred[int]]] = []

    def __call__(self, url: str, timeout: float) -> Deferred[int]:
        answer: Deferred[int] = Deferred()
        self.calls.append((url, timeout, answer))
        return answer

    @property
    def pending(self) -> list[tuple[str, float, Deferred[int]]]:
        return [call for call in self.calls if not call[2].called]

    def answer(self, status: int = 200) -> None:
        [(_, _, answer)] = self.pending
        answer.callback(status)

    def refuse(self) -> None:
        [(_, _, answer)] = self.pending
        answer.errback(ConnectionRefusedError("connection refused"))


class ReadyPolicy(RoundRobin):
    def __init__(self) -> None:
        super().__init__()
        self.readied: list[str] = []

    def on_ready(self, backend: Backend) -> None:
        self.readied.append(backend.key)


class Harness:
    def __init__(self, start: bool = True) -> None:
        self.clock = Clock()
        self.http = FakeHttp()
        self.policy = ReadyPolicy()
        self.checker = HealthChecker(self.clock, self._changed, self.http)
        self.registry = Registry(policy_factory=lambda first: self.policy, listeners=[self.checker])
        if start:
            self.checker.startService()

    def _changed(self, pool: ServicePool, backend: Backend) -> None:
        self.registry.backend_state_changed(pool, backend)

    def add(self, item: ContainerSpec) -> Backend:
        self.registry.apply(item.container_id, item)
        return self.backend(item.container_id)

    def backend(self, key: str) -> Backend:
        return self.registry.services["api"].backends[key]

    def ready_keys(self) -> list[str]:
        return [backend.key for backend in self.registry.services["api"].ready]

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)

    def healthy_backend(self, key: str = "a", **options: str) -> Backend:
        backend = self.add(checked(key, **options))
        self.tick()
        self.http.answer(200)
        assert backend.ready
        return backend


def test_a_backend_with_a_health_path_gets_traffic_only_after_its_first_success() -> None:
    h = Harness()
    b = h.add(checked("a"))
    assert (b.ready, b.health_state) == (False, "unknown")
    assert h.http.calls == []  # not from inside the registry update: on the next reactor turn
    h.tick()
    [(url, timeout, _)] = h.http.calls
    assert (url, timeout) == ("http://127.0.0.1:8000/healthz", 2.0)
    h.http.answer(204)
    assert (b.ready, b.health_state) == (True, "healthy")
    assert h.ready_keys() == ["a"]
    assert h.policy.readied == ["a"]


def test_a_backend_without_a_health_path_is_never_checked() -> None:
    h = Harness()
    b = h.add(spec("a"))
    h.tick(60)
    assert (b.ready, b.health_state) == (True, None)
    assert h.http.calls == []


def test_checks_repeat_every_interval_after_the_previous_answer() -> None:
    h = Harness()
    h.healthy_backend()
    h.tick(4.9)
    assert len(h.http.calls) == 1
    h.tick(0.1)
    assert len(h.http.calls) == 2
    h.tick(1.9)  # unanswered: no second check in parallel
    assert len(h.http.calls) == 2
    h.tick(0.1)  # the timeout: a failure, and the next check 5 s later
    h.tick(4.9)
    assert len(h.http.calls) == 2
    h.tick(0.1)
    assert len(h.http.calls) == 3


def test_interval_and_timeout_come_from_the_labels() -> None:
    h = Harness()
    h.healthy_backend(**{"health.interval": "500ms", "health.timeout": "1s"})
    h.tick(0.5)
    [_, (url, timeout, _)] = h.http.calls
    assert timeout == 1.0


def test_three_failures_make_it_unhealthy_two_successes_healthy_again() -> None:
    h = Harness()
    b = h.healthy_backend()
    for status in (500, 404):
        h.tick(5)
        h.http.answer(status)
        assert b.ready
    h.tick(5)
    h.http.refuse()
    assert (b.ready, b.health_state) == (False, "unhealthy")
    assert h.ready_keys() == []
    h.tick(5)
    h.http.answer(200)
    assert (b.ready, b.health_state) == (False, "unhealthy")
    h.tick(5)
    h.http.answer(302)  # 3xx counts as a success (redirects are not followed)
    assert (b.ready, b.health_state) == (True, "healthy")
    assert h.policy.readied == ["a", "a"]  # first success, then back from unhealthy


def test_a_success_between_failures_resets_the_count() -> None:
    h = Harness()
    b = h.healthy_backend()
    for status in (500, 500, 200, 500, 500):
        h.tick(5)
        h.http.answer(status)
    assert b.ready


def test_no_answer_within_the_timeout_is_a_failure() -> None:
    h = Harness()
    b = h.healthy_backend()
    for _ in range(3):
        h.tick(5)
        [(_, _, answer)] = h.http.pending
        h.tick(1.9)
        assert not answer.called
        h.tick(0.1)
        assert answer.called  # cancelled by the timeout
    assert (b.ready, b.health_state) == (False, "unhealthy")
    assert h.checker.describe(b)["last"] == "no answer within 2 s"  # type: ignore[index]


def test_failing_from_the_start_says_unhealthy_and_then_needs_two_successes() -> None:
    h = Harness()
    b = h.add(checked("a"))
    h.tick()
    for _ in range(2):
        h.http.answer(503)
        h.tick(5)
    assert b.health_state == "unknown"
    h.http.answer(503)
    assert (b.ready, b.health_state) == (False, "unhealthy")
    h.tick(5)
    h.http.answer(200)
    assert not b.ready
    h.tick(5)
    h.http.answer(200)
    assert b.ready


def test_a_call_that_raises_counts_as_a_failure() -> None:
    def broken(url: str, timeout: float) -> Deferred[int]:
        raise RuntimeError("no sockets left")

    h = Harness()
    h.checker._http_get = broken  # type: ignore[assignment]
    b = h.add(checked("a"))
    for _ in range(3):
        h.tick(5)
    assert b.health_state == "unhealthy"
    assert h.checker.describe(b)["last"] == "no sockets left"  # type: ignore[index]


def test_removing_the_container_cancels_its_check_and_timer() -> None:
    h = Harness()
    h.add(checked("a"))
    h.tick()
    [(_, _, answer)] = h.http.pending
    h.registry.remove("a")
    assert answer.called
    assert h.clock.getDelayedCalls() == []
    h.tick(60)
    assert len(h.http.calls) == 1


def test_no_checks_while_the_container_is_down_and_first_success_after_restart() -> None:
    h = Harness()
    b = h.healthy_backend()
    h.registry.apply("a", dataclasses.replace(b.spec, running=False))
    assert (b.ready, b.health_state) == (False, "unknown")
    assert h.clock.getDelayedCalls() == []
    h.tick(60)
    assert len(h.http.calls) == 1
    h.registry.apply("a", dataclasses.replace(b.spec, running=True, started_at="again"))
    assert not b.ready
    h.tick()
    assert len(h.http.calls) == 2
    h.http.answer(200)
    assert b.ready


def test_checks_start_with_the_service_and_stop_with_it() -> None:
    h = Harness(start=False)
    b = h.add(checked("a"))
    h.tick(60)
    assert h.http.calls == []
    h.checker.startService()
    h.tick()
    h.http.answer(200)
    assert b.ready
    h.tick(5)
    [(_, _, answer)] = h.http.pending
    h.checker.stopService()
    assert answer.called
    assert h.clock.getDelayedCalls() == []
    assert b.ready  # stopping the checker says nothing about the backend


def test_other_backends_and_services_are_not_touched() -> None:
    h = Harness()
    h.add(spec("plain", port=8001))
    h.add(checked("a"))
    assert h.ready_keys() == ["plain"]
    h.tick()
    h.http.answer(200)
    assert h.ready_keys() == ["plain", "a"]


def test_describe_for_the_admin_view() -> None:
    h = Harness()
    b = h.healthy_backend(**{"health.interval": "2s"})
    assert h.checker.describe(b) == {
        "path": "/healthz", "interval": 2.0, "timeout": 2.0, "last": "HTTP 200",
        "consecutive_successes": 1, "consecutive_failures": 0,
    }
    assert h.checker.describe(h.add(spec("plain", port=8001))) is None


def test_synchronous_answers_work_too() -> None:
    h = Harness()
    h.checker._http_get = lambda url, timeout: succeed(200)  # type: ignore[assignment]
    b = h.add(checked("a"))
    h.tick()
    assert b.ready
    assert len(h.clock.getDelayedCalls()) == 1  # the next check only, no leftover timeout


# -- the real call, on the real reactor, against a loopback server ------------------------------------------


@pytest_twisted.inlineCallbacks
def test_treq_getter_against_a_real_server() -> Any:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Backend(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            if request.path == b"/ok":
                return b"ok\n" * 1000
            if request.path == b"/moved":
                request.redirect(b"/elsewhere")
                return b""
            request.setResponseCode(404)
            return b"no\n"

    port = reactor.listenTCP(0, Site(Backend()), interface="127.0.0.1")
    try:
        get = treq_getter(reactor)
        base = f"http://127.0.0.1:{port.getHost().port}"
        assert (yield get(base + "/ok", 2.0)) == 200
        assert (yield get(base + "/moved", 2.0)) == 302  # not followed
        assert (yield get(base + "/missing", 2.0)) == 404
    finally:
        yield port.stopListening()
    with pytest.raises(ConnectionRefusedError):
        yield get(base + "/ok", 2.0)


def test_an_error_while_acting_on_a_result_is_logged_and_checks_go_on() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()

        def broken(pool: ServicePool, backend: Backend) -> None:
            raise RuntimeError("registry exploded")

        h.checker._changed = broken  # type: ignore[assignment]
        h.add(checked("a"))
        h.tick()
        h.http.answer(200)
        h.tick(5)
        assert len(h.http.calls) == 2
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [event for event in events if "log_failure" in event]
    assert failures and failures[0]["log_failure"].check(RuntimeError)
    assert "internal error" in failures[0]["log_format"]


@pytest_twisted.inlineCallbacks
def test_a_real_backend_that_never_answers_times_out() -> Any:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Hang(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            return NOT_DONE_YET

    port = reactor.listenTCP(0, Site(Hang()), interface="127.0.0.1")
    registry = Registry()
    checker = HealthChecker(reactor, registry.backend_state_changed)
    registry.add_listener(checker)
    checker.startService()
    try:
        item = checked("a", port=port.getHost().port, path="/x", **{"health.timeout": "200ms", "health.interval": "10s"})
        registry.apply("a", item)
        backend = registry.services["api"].backends["a"]
        yield deferLater(reactor, 0.5, lambda: None)
        assert checker.describe(backend)["last"] == "no answer within 0.2 s"  # type: ignore[index]
        assert checker.describe(backend)["consecutive_failures"] == 1  # type: ignore[index]
    finally:
        checker.stopService()
        yield port.stopListening()
