"""Passive outlier ejection (labelgw.control.outlier), driven through the registry with an injected clock."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

import pytest
from twisted.internet.task import Clock

from labelgw.core import balancer
from labelgw.core.backends import Backend, RoundRobin, ServicePool
from labelgw.core.model import ContainerSpec
from labelgw.control.outlier import EjectingPolicy, OutlierDetector
from labelgw.core.registry import Registry


def spec(container_id: str, service: str = "api", port: int = 8000, **changes: Any) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=f"{service}-{container_id}", service=service, address="127.0.0.1",
        port=port, hosts=(f"{service}.localhost",), **changes,
    )


class RecordingPolicy(RoundRobin):
    """Round robin that records what the detector passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[tuple[str, bool]] = []
        self.readied: list[str] = []

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        self.finished.append((backend.key, failed))

    def on_ready(self, backend: Backend) -> None:
        self.readied.append(backend.key)


class Harness:
    def __init__(self, count: int = 2, base: float = 30.0, make_policy: Callable[[Clock], Any] | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.inner = make_policy(self.clock) if make_policy is not None else RecordingPolicy()
        self.retired: list[str] = []
        self.detector = OutlierDetector(self.clock, self._changed, base=base)
        self.registry = Registry(
            policy_factory=lambda first: self.inner,
            on_backend_retired=lambda backend: self.retired.append(backend.key),
            listeners=[self.detector],
        )
        for index in range(count):
            self.registry.apply(f"c{index}", spec(f"c{index}", port=8000 + index))

    def _changed(self, pool: ServicePool, backend: Backend) -> None:
        self.registry.backend_state_changed(pool, backend)

    @property
    def pool(self) -> ServicePool:
        return self.registry.services["api"]

    def backend(self, key: str) -> Backend:
        return self.pool.backends[key]

    def finish(self, key: str, failed: bool = True, times: int = 1) -> None:
        for _ in range(times):
            self.pool.policy.on_finish(self.backend(key), 0.01, failed)

    def ready_keys(self) -> list[str]:
        return [backend.key for backend in self.pool.ready]


def test_the_service_policy_is_wrapped_and_passes_everything_through() -> None:
    h = Harness()
    assert isinstance(h.pool.policy, EjectingPolicy)
    assert h.pool.policy.inner is h.inner
    assert h.pool.policy.name == "round_robin"
    # pick and on_start are the inner policy's own bound methods: no extra call per request.
    assert h.pool.policy.pick == h.inner.pick
    assert h.pool.policy.on_start == h.inner.on_start
    h.finish("c0", failed=False)
    h.finish("c1", failed=True)
    assert h.inner.finished == [("c0", False), ("c1", True)]


def test_five_consecutive_failures_eject_for_30_seconds() -> None:
    h = Harness()
    h.finish("c0", times=4)
    assert h.ready_keys() == ["c0", "c1"]
    assert h.backend("c0").consecutive_failures == 4
    h.finish("c0")
    b = h.backend("c0")
    assert h.ready_keys() == ["c1"]
    assert not b.ready
    assert (b.ejected_until, b.ejections) == (1030.0, 1)
    assert h.retired == ["c0"]  # its idle upstream connections are closed
    assert h.pool.pick() is h.backend("c1")


def test_a_success_resets_the_count() -> None:
    h = Harness()
    h.finish("c0", times=4)
    h.finish("c0", failed=False)
    h.finish("c0", times=4)
    assert h.backend("c0").ready
    assert h.backend("c0").consecutive_failures == 4


def _wrt(clock: Clock) -> Any:
    return balancer.make_policy("wrt", clock.seconds, random.Random(3))


def test_wrt_reports_failures_itself_with_one_call_per_request() -> None:
    h = Harness(make_policy=_wrt)
    # The wrapper's on_finish is the wrt policy's own: it resets the run on success and tells the detector of
    # each failure through its hook.
    assert h.pool.policy.on_finish == h.inner.on_finish
    h.finish("c0", times=4)
    assert h.backend("c0").consecutive_failures == 4
    h.finish("c0", failed=False)
    assert h.backend("c0").consecutive_failures == 0
    h.finish("c0", times=4)
    assert h.ready_keys() == ["c0", "c1"]
    h.finish("c0")
    assert h.ready_keys() == ["c1"]
    assert h.backend("c0").ejections == 1
    # The estimate took the failures in, as without the detector.
    assert h.backend("c0").stats.failures == 9


def test_a_wrt_policy_shared_by_two_services_keeps_the_wrapper() -> None:
    clock = Clock()
    shared = _wrt(clock)
    changed: list[tuple[str, str]] = []
    detector = OutlierDetector(clock, lambda pool, backend: changed.append((pool.name, backend.key)))
    registry = Registry(policy_factory=lambda first: shared, listeners=[detector])
    registry.apply("a0", spec("a0", service="api"))
    registry.apply("a1", spec("a1", service="api", port=8001))
    registry.apply("w0", spec("w0", service="web", port=8002))
    registry.apply("w1", spec("w1", service="web", port=8003))
    api, web = registry.services["api"], registry.services["web"]
    # The first service's wrapper took the hook; the second calls through its own wrapper.
    assert api.policy.on_finish == shared.on_finish
    assert web.policy.on_finish != shared.on_finish
    for _ in range(5):
        web.policy.on_finish(web.backends["w0"], 0.01, True)
    assert changed == [("web", "w0")]
    for _ in range(5):
        api.policy.on_finish(api.backends["a0"], 0.01, True)
    assert changed == [("web", "w0"), ("api", "a0")]


def test_readmitted_when_the_time_is_up_through_on_ready() -> None:
    h = Harness()
    h.finish("c0", times=5)
    h.clock.advance(29.9)
    assert h.ready_keys() == ["c1"]
    assert h.inner.readied == []
    h.clock.advance(0.1)
    b = h.backend("c0")
    assert h.ready_keys() == ["c0", "c1"]
    assert (b.ejected_until, b.consecutive_failures, b.ejections) == (None, 0, 1)
    assert h.inner.readied == ["c0"]
    # What is left is the ejection count's decay (one base later), and then nothing.
    assert [call.func for call in h.clock.getDelayedCalls()] == [h.detector._decay]
    h.clock.advance(30.0)
    assert h.backend("c0").ejections == 0
    assert h.clock.getDelayedCalls() == []


def test_the_ejection_count_decays_by_one_per_base_without_an_ejection() -> None:
    h = Harness()
    for _ in range(3):  # ejected for 30, 60, 90 s, back at once each time: the count climbs
        h.finish("c0", times=5)
        h.clock.advance(h.backend("c0").ejected_until - h.clock.seconds())  # type: ignore[operator]
    b = h.backend("c0")
    assert b.ejections == 3
    h.clock.advance(29.5)
    assert b.ejections == 3
    h.clock.advance(0.5)
    assert b.ejections == 2
    h.clock.advance(30.0)
    assert b.ejections == 1
    # Ejected again now: 60 s (count 2), not 120 s; while it is out the count does not decay.
    h.finish("c0", times=5)
    assert (b.ejections, b.ejected_until) == (2, h.clock.seconds() + 60.0)
    h.clock.advance(59.0)
    assert b.ejections == 2
    h.clock.advance(1.0)
    assert b.ready
    # Back: two bases in rotation take it to zero, and no timer is left behind.
    h.clock.advance(60.0)
    assert b.ejections == 0
    assert h.clock.getDelayedCalls() == []
    h.finish("c0", times=5)
    assert b.ejected_until == h.clock.seconds() + 30.0


def test_a_removed_backend_leaves_no_decay_timer() -> None:
    h = Harness()
    h.finish("c0", times=5)
    h.clock.advance(30.0)
    assert len(h.clock.getDelayedCalls()) == 1
    h.registry.remove("c0")
    assert h.clock.getDelayedCalls() == []


def test_ejection_time_grows_with_the_count_and_is_capped_at_300_seconds() -> None:
    h = Harness()
    durations = []
    for _ in range(12):
        h.finish("c0", times=5)
        until = h.backend("c0").ejected_until
        assert until is not None
        durations.append(until - h.clock.seconds())
        h.clock.advance(until - h.clock.seconds())
        assert h.backend("c0").ready
    assert durations == [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0, 300.0, 300.0]
    assert h.backend("c0").ejections == 12


def test_the_base_is_configurable_for_tests_and_keeps_the_cap() -> None:
    h = Harness(base=1.0)
    h.finish("c0", times=5)
    assert h.backend("c0").ejected_until == 1001.0
    with pytest.raises(ValueError):
        OutlierDetector(Clock(), lambda pool, backend: None, base=400.0)


@pytest.mark.parametrize(("count", "ejectable"), [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (10, 5)])
def test_never_more_than_half_of_a_service_is_ejected(count: int, ejectable: int) -> None:
    h = Harness(count=count)
    for index in range(count):
        h.finish(f"c{index}", times=5)
    assert h.pool.ejected_count() == ejectable
    assert len(h.pool.ready) == count - ejectable
    # Further failures of the ones kept do not eject them either, and nothing breaks.
    for index in range(count):
        h.finish(f"c{index}", times=5)
    assert h.pool.ejected_count() == ejectable


def test_once_one_is_back_another_may_go() -> None:
    h = Harness(count=2)
    h.finish("c0", times=5)
    h.finish("c1", times=5)
    assert [b.key for b in h.pool.backends.values() if b.ejected_until is not None] == ["c0"]
    h.clock.advance(30.0)
    h.finish("c1")  # c1 is still failing: the next failure ejects it now that c0 is back
    assert h.ready_keys() == ["c0"]


def test_the_last_ready_backend_is_never_ejected() -> None:
    h = Harness(count=2)
    h.registry.apply("c1", spec("c1", port=8001, running=False))
    h.finish("c0", times=10)
    assert h.ready_keys() == ["c0"]
    assert h.backend("c0").ejected_until is None


def test_failures_of_requests_still_in_flight_when_ejected_do_not_extend_it() -> None:
    h = Harness()
    h.finish("c0", times=5)
    h.finish("c0", times=7)
    b = h.backend("c0")
    assert (b.ejected_until, b.ejections, b.consecutive_failures) == (1030.0, 1, 5)


def test_a_removed_backend_leaves_no_timer() -> None:
    h = Harness()
    h.finish("c0", times=5)
    assert len(h.clock.getDelayedCalls()) == 1
    h.registry.remove("c0")
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(60)
    assert h.ready_keys() == ["c1"]


def test_a_container_back_with_a_new_address_starts_clean() -> None:
    h = Harness()
    h.finish("c0", times=5)
    h.registry.apply("c0", spec("c0", port=9000))
    b = h.backend("c0")
    assert (b.ready, b.ejected_until, b.ejections) == (True, None, 0)
    assert h.clock.getDelayedCalls() == []


def test_docker_and_ejection_both_count() -> None:
    h = Harness(count=3)
    h.finish("c0", times=5)
    # The container restarts while ejected: it stays out until the ejection is over.
    h.registry.apply("c0", spec("c0", port=8000, running=False))
    h.registry.apply("c0", spec("c0", port=8000, started_at="later"))
    assert "c0" not in h.ready_keys()
    h.clock.advance(30.0)
    assert "c0" in h.ready_keys()


def test_stop_cancels_the_timers() -> None:
    h = Harness()
    h.detector.startService()
    h.finish("c0", times=5)
    h.detector.stopService()
    assert h.clock.getDelayedCalls() == []


def test_readmitted_wrt_backend_slow_starts() -> None:
    h = Harness(count=2, make_policy=lambda clock: balancer.make_policy("wrt", clock.seconds, random.Random(3)))
    pool = h.pool
    assert isinstance(pool.policy, EjectingPolicy)
    for _ in range(10):
        chosen = pool.pick()
        assert chosen is not None
        pool.policy.on_start(chosen)
        pool.policy.on_finish(chosen, 0.010, False)
    h.finish("c0", times=5)
    assert h.ready_keys() == ["c1"]
    h.clock.advance(30.0)
    assert h.ready_keys() == ["c0", "c1"]
    pool.pick()  # the policy adopts the re-admitted backend on first sight
    view = balancer.describe(h.backend("c0"))
    assert view["slow_start"] == pytest.approx(0.1)
    assert view["samples"] == 0


def picks(pool: ServicePool, count: int) -> Sequence[str]:
    return [pool.pick().key for _ in range(count)]  # type: ignore[union-attr]


def test_traffic_resumes_to_a_readmitted_round_robin_backend() -> None:
    h = Harness(count=2)
    h.finish("c0", times=5)
    assert set(picks(h.pool, 4)) == {"c1"}
    h.clock.advance(30.0)
    assert set(picks(h.pool, 4)) == {"c0", "c1"}


def test_spec_update_keeps_ejection_state() -> None:
    h = Harness()
    h.finish("c0", times=5)
    h.registry.apply("c0", dataclasses.replace(h.backend("c0").spec, started_at="again"))
    assert h.backend("c0").ejected_until == 1030.0
    assert not h.backend("c0").ready
