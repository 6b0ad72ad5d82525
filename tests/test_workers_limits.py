"""Limits of the whole gateway under `--workers N` (labelgw.workers.limits): split by demand, parts that add up to
the label's limit, sent to each worker and applied by it. Deterministic: no process, MemoryReactorClock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from labelgw.cli.config import Settings
from labelgw.core.middleware import ConcurrencySpec, MiddlewareSpec, RateLimitSpec
from labelgw.workers import supervisor as sup
from labelgw.workers.limits import integer_parts, shares, smoothed
from labelgw.workers.protocol import FrameDecoder, encode
from labelgw.workers.worker import SupervisorLink, WorkerService
from test_workers_protocol import FakeProcessTransport, World, spec

LIMITS = MiddlewareSpec(
    ratelimit=RateLimitSpec(rate=100.0, burst=20.0, quota=100, window=1),
    concurrency=ConcurrencySpec(max_inflight=10, max_pending=4),
)


def test_shares_follow_demand_with_a_floor_and_add_up_to_one() -> None:
    assert shares([]) == []
    assert shares([0, 0]) == [0.5, 0.5]
    split = shares([90, 10])
    assert split == pytest.approx([0.1 + 0.8 * 0.9, 0.1 + 0.8 * 0.1])
    assert sum(split) == pytest.approx(1.0)
    # All the traffic on one worker: it gets all but the others' floor.
    assert shares([50, 0, 0, 0]) == pytest.approx([0.05 + 0.8, 0.05, 0.05, 0.05])


def test_integer_parts_add_up_exactly() -> None:
    assert integer_parts(10, [0.5, 0.5], 1) == [5, 5]
    assert integer_parts(10, [0.82, 0.18], 1) == [8, 2]
    assert sum(integer_parts(7, [0.34, 0.33, 0.33], 1)) == 7
    # Fewer than one each: the busiest gets it, the sum still holds.
    assert integer_parts(1, [0.9, 0.1], 1) == [1, 0]
    assert integer_parts(0, [0.5, 0.5]) == [0, 0]
    assert smoothed(None, 10) == 10 and smoothed(10, 0) == 5


def supervisor_with_workers(count: int = 2) -> tuple[sup.SupervisorService, list[sup.WorkerProcess]]:
    reactor = MemoryReactorClock()
    settings = Settings(http=("tcp:0:interface=127.0.0.1",), https=(), admin=None, docker=False, access_log="off")
    service = sup.SupervisorService(settings, reactor, count, [])
    processes: list[sup.WorkerProcess] = []

    def spawn(process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        process.makeConnection(FakeProcessTransport(worker_id))  # type: ignore[arg-type]
        processes.append(process)

    service.pool._spawn = spawn
    service.pool.start()
    for process in processes:
        World.say(process, ("ready", process.pid))
    service.registry.apply("c1", spec(middleware=LIMITS))
    return service, processes


def limits_sent(process: sup.WorkerProcess) -> list[Any]:
    return [m[2:] for m in World.sent(process) if m[0] == "limits"]


def test_the_supervisor_sends_each_worker_its_part_by_demand() -> None:
    service, (one, two) = supervisor_with_workers()
    service.rebalance_limits()
    assert limits_sent(one) == [("api", 50.0, 10.0, 5, 2)] and limits_sent(two) == [("api", 50.0, 10.0, 5, 2)]
    # Worker 1 gets all the traffic: most of each limit moves to it; the parts add up to the label's.
    World.say(one, ("report", b"", {}, {"api": 400}))
    World.say(two, ("report", b"", {}, {"api": 0}))
    service.rebalance_limits()
    (_, rate1, burst1, inflight1, pending1), = limits_sent(one)[1:]
    (_, rate2, burst2, inflight2, pending2), = limits_sent(two)[1:]
    assert (rate1, rate2) == (90.0, 10.0) and (burst1, burst2) == (18.0, 2.0)
    assert (inflight1, inflight2) == (8, 2) and (pending1, pending2) == (4, 0)  # one slot each kept first
    # Nothing changed: nothing sent.
    World.say(one, ("report", b"", {}, {"api": 400}))
    World.say(two, ("report", b"", {}, {"api": 0}))
    service.rebalance_limits()
    assert len(limits_sent(one)) == 2


def worker(share: float = 0.5) -> tuple[WorkerService, SupervisorLink, StringTransport]:
    reactor = MemoryReactorClock()
    settings = Settings(http=(), https=(), admin=None, docker=False, access_log="off")
    app = WorkerService(settings, reactor, [], share=share)
    app.startService()
    link = SupervisorLink(app, reactor, lambda why: None)
    transport = StringTransport()
    link.makeConnection(transport)
    link.dataReceived(encode(("state", 1, [("c1", spec(middleware=LIMITS))], [], [])))
    return app, link, transport


class Waiter:
    def __init__(self) -> None:
        self.events: list[str] = []

    def admitted(self) -> None:
        self.events.append("admitted")

    def timed_out(self) -> None:
        self.events.append("timed out")


def test_a_worker_applies_its_part_and_reports_its_demand() -> None:
    app, link, transport = worker()
    chain = app.registry.services["api"].middleware
    assert chain.ratelimit.rate == 50.0 and chain.concurrency.limit == 5  # type: ignore[union-attr]
    # Five in flight, one waiting: a larger part admits the waiter at once.
    limiter = chain.concurrency  # type: ignore[union-attr]
    for _ in range(5):
        assert limiter.acquire(Waiter()) == "admitted"
    waiter = Waiter()
    assert limiter.acquire(waiter) == "queued"
    link.dataReceived(encode(("limits", 2, "api", 90.0, 18.0, 9, 4)))
    assert waiter.events == ["admitted"] and limiter.active == 6 and limiter.limit == 9
    assert chain.ratelimit.rate == 90.0 and chain.ratelimit.burst == 18.0  # type: ignore[union-attr]
    assert chain.ratelimit.idle_expiry == pytest.approx(0.2)  # type: ignore[union-attr]
    # Demand: requests to the service since the last report, refusals included.
    app.registry.services["api"].backends["c1"].requests = 30
    chain.ratelimit.limited = 5  # type: ignore[union-attr]
    assert app.limit_demand() == {"api": 35}
    assert app.limit_demand() == {"api": 0}
    assert FrameDecoder().feed(transport.value())[-1][:2] == ("ack", 2)  # (then when it was applied)
