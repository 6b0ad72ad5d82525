"""Canary analysis under `--workers N` (labelgw.workers.canary): each worker's per-version deltas merged into the
supervisor's windows, the rule applied there on the whole gateway's traffic, cuts and resumes pushed to every
worker and applied there; the pool's plumbing (windows reports in, cuts to a new worker after its state); the
metrics. Injected clock, fake processes, StringTransport; no process is started."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.registry import CollectorRegistry
from twisted.internet.task import Clock

from labelgw.core.backends import Backend, RoundRobin, ServicePool
from labelgw.core.canary import MIN_REQUESTS, VersionWindow, bucket_of, describe_service
from labelgw.core.model import ContainerSpec
from labelgw.workers.canary import CanaryCollector, GatewayCanary, WorkerCanary, _parse
from labelgw.workers.protocol import FrameDecoder, encode
from test_workers_protocol import World, replies, worker_app

WINDOW = 10.0


def spec(name: str, version: str, traffic: float | None = None, error_rate: float | None = None) -> ContainerSpec:
    return ContainerSpec(
        container_id=name, name=name, service="api", address="127.0.0.1", port=8000, hosts=("api.localhost",),
        version=version, traffic=traffic, canary_max_error_rate=error_rate,
    )


def make_pool() -> ServicePool:
    service = ServicePool("api", RoundRobin())
    for item in (spec("v1-a", "v1"), spec("v2-a", "v2", 20.0, 0.05)):
        service.backends[item.container_id] = Backend(item)
    service.refresh()
    return service


class Registry:
    """What the analyzers read of a registry: its services."""

    def __init__(self) -> None:
        self.services = {"api": make_pool()}

    @property
    def pool(self) -> ServicePool:
        return self.services["api"]


class Gateway:
    """A supervisor's analyzer and N workers' analyzers, each with its own copy of the service (as each process
    has), on one injected clock."""

    def __init__(self, workers: int = 2) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.supervisor = Registry()
        self.analyzer = GatewayCanary(WINDOW, self.clock.seconds)
        self.changes: list[tuple[str, str, str | None]] = []
        self.analyzer.on_change = lambda *change: self.changes.append(change)
        self.workers = [(Registry(), WorkerCanary(WINDOW)) for _ in range(workers)]

    def serve(self, worker: int, version: str, count: int, failed_every: int = 0, latency: float = 0.01) -> None:
        registry, analyzer = self.workers[worker]
        backend = next(b for b in registry.pool.backends.values() if b.version == version)
        for i in range(count):
            failed = failed_every > 0 and i % failed_every == failed_every - 1
            analyzer.observe(registry.pool, backend, self.clock.seconds(), latency, failed)

    def report(self, worker: int) -> list[Any]:
        """The worker's report, through the channel's codec (plain values), added in the supervisor."""
        deltas = self.workers[worker][1].take()
        (message,) = FrameDecoder(plain=True).feed(encode(("windows", deltas)))
        return self.analyzer.add(self.supervisor, message[1])

    def push(self) -> None:
        """The supervisor's changes applied by every worker, as SupervisorLink does."""
        for service, version, reason in self.changes:
            for registry, analyzer in self.workers:
                analyzer.apply(registry.services[service], version, reason)
        self.changes.clear()


def test_a_worker_counts_and_never_cuts_on_its_own_part_of_the_traffic() -> None:
    world = Gateway(1)
    world.serve(0, "v1", 40)
    world.serve(0, "v2", 40, failed_every=2)
    registry, analyzer = world.workers[0]
    # All failing, well over the minimum: a lone single-process analyzer would have cut; a worker does not.
    assert registry.pool.split is not None and registry.pool.split.shares["v2"] == pytest.approx(20.0)
    deltas = analyzer.take()
    assert deltas[("api", "v2")][:2] == (40, 20) and deltas[("api", "v1")][:2] == (40, 0)
    assert deltas[("api", "v2")][2] == {bucket_of(0.01): 40}
    assert analyzer.take() == {}  # a delta is sent once


def test_the_supervisor_cuts_on_the_sum_of_the_workers_windows() -> None:
    world = Gateway(2)
    half = MIN_REQUESTS // 2 + 2  # each worker alone has fewer than the minimum
    for worker in (0, 1):
        world.serve(worker, "v1", 30)
        world.serve(worker, "v2", half, failed_every=2)
    assert world.report(0) == []
    figures = describe_service(world.supervisor.pool, world.clock.seconds())["v2"]
    assert figures.requests == half and not figures.cut
    world.clock.advance(0.5)
    (cut,) = world.report(1)
    assert cut.version == "v2" and "error rate 50.0 %" in cut.reason and f"{2 * half} requests" in cut.reason
    figures = describe_service(world.supervisor.pool, world.clock.seconds())["v2"]
    assert figures.cut and figures.requests == 2 * half and figures.errors == half
    assert world.supervisor.pool.split.shares["v2"] == 0.0  # type: ignore[union-attr]
    # Told once, to every worker; each applies it: v2 gets no new clients anywhere.
    assert world.changes == [("api", "v2", cut.reason)]
    world.push()
    for registry, _ in world.workers:
        assert registry.pool.split.shares == {"v1": 100.0, "v2": 0.0}  # type: ignore[union-attr]
        assert describe_service(registry.pool, world.clock.seconds())["v2"].reason == cut.reason
    # More failures later: no second cut, no second push.
    world.serve(0, "v2", 10, failed_every=1)
    assert world.report(0) == [] and world.changes == []


def test_a_healthy_canary_is_not_cut() -> None:
    world = Gateway(2)
    for worker in (0, 1):
        world.serve(worker, "v1", 100, failed_every=50)
        world.serve(worker, "v2", 30, failed_every=30)
        world.report(worker)
    assert world.changes == [] and not describe_service(world.supervisor.pool, world.clock.seconds())["v2"].cut


def test_the_merged_window_slides_with_the_supervisors_clock() -> None:
    world = Gateway(2)
    world.serve(0, "v2", 15, failed_every=2)
    world.report(0)
    world.clock.advance(WINDOW + 1)  # those have left the window
    world.serve(1, "v2", 15, failed_every=2)
    world.serve(1, "v1", 30)
    assert world.report(1) == []  # 15 in the window: fewer than the minimum
    assert describe_service(world.supervisor.pool, world.clock.seconds())["v2"].requests == 15


def test_resume_on_the_supervisor_reaches_every_worker() -> None:
    world = Gateway(2)
    for worker in (0, 1):
        world.serve(worker, "v1", 30)
        world.serve(worker, "v2", 20, failed_every=2)
        world.report(worker)
    world.push()
    assert world.analyzer.resume(world.supervisor.pool, "v2")
    assert world.changes == [("api", "v2", None)]
    world.push()
    for registry in (world.supervisor, *(r for r, _ in world.workers)):
        assert registry.pool.split.shares["v2"] == pytest.approx(20.0)  # type: ignore[union-attr]
    assert not world.analyzer.resume(world.supervisor.pool, "v9") and world.changes == []


def test_a_new_worker_is_told_the_cuts_in_force() -> None:
    world = Gateway(2)
    for worker in (0, 1):
        world.serve(worker, "v1", 30)
        world.serve(worker, "v2", 20, failed_every=2)
        world.report(worker)
    assert list(world.analyzer.cuts(world.supervisor)) == [("api", "v2", world.changes[0][2])]


def test_reports_that_are_not_well_formed_are_skipped() -> None:
    world = Gateway(1)
    for bad in (None, [1, 2], {("api",): (1, 0, {0: 1})}, {("api", "v2"): (1, 2, {0: 1})},
                {("api", "v2"): (2, 0, {0: 1})}, {("api", "v2"): (1, 0, {999: 1})}, {("api", "v2"): (-1, 0, {})},
                {("nosuch", "v2"): (1, 0, {0: 1})}, {("api", "v9"): (1, 0, {0: 1})}):
        assert world.analyzer.add(world.supervisor, bad) == []
    assert describe_service(world.supervisor.pool, world.clock.seconds())["v2"].requests == 0
    assert _parse(("api", "v2"), (3, 1, {0: 2, 5: 1})) == ("api", "v2", 3, 1, {0: 2, 5: 1})


def test_window_add_is_observe_in_bulk() -> None:
    one, bulk = VersionWindow(WINDOW), VersionWindow(WINDOW)
    for latency, failed in ((0.01, False), (0.01, True), (0.5, False)):
        one.observe(1000.0, latency, failed)
    bulk.add(1000.0, 3, 1, {bucket_of(0.01): 2, bucket_of(0.5): 1})
    assert (bulk.requests, bulk.errors, bulk.p99, bulk.quantile(0.5)) == (one.requests, one.errors, one.p99,
                                                                          one.quantile(0.5))
    bulk.advance(1000.0 + WINDOW + 1)
    assert (bulk.requests, bulk.errors, bulk.p99) == (0, 0, None)


def test_the_metrics_show_each_versions_window_and_cut() -> None:
    from prometheus_client.exposition import generate_latest

    world = Gateway(1)
    world.serve(0, "v1", 30)
    world.serve(0, "v2", 30, failed_every=2)
    world.report(0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CanaryCollector(world.supervisor, world.clock.seconds))
    text = generate_latest(registry).decode()
    assert 'labelgw_canary_cut{service="api",version="v2"} 1.0' in text
    assert 'labelgw_canary_cut{service="api",version="v1"} 0.0' in text
    assert 'labelgw_canary_window_requests{service="api",version="v2"} 30.0' in text
    assert 'labelgw_canary_window_errors{service="api",version="v2"} 15.0' in text


# The channel: windows reports to the supervisor, cuts to the workers.


def test_the_pool_passes_windows_reports_on_and_tells_a_new_worker_the_cuts_after_its_state() -> None:
    got: list[Any] = []
    world = World(1)
    world.pool.on_windows = lambda worker, deltas: got.append((worker.id, deltas))
    world.pool._after_state = lambda: [("canary", "api", "v2", "error rate")]
    world.pool.start()
    (one,) = world.spawned
    assert [m[0] for m in world.sent(one)] == ["state", "canary"]
    assert world.sent(one)[1][2:] == ("api", "v2", "error rate")
    world.ready(one)
    world.say(one, ("windows", {("api", "v2"): (1, 0, {3: 1})}))
    assert got == [(1, {("api", "v2"): (1, 0, {3: 1})})]


def test_a_worker_applies_the_supervisors_cut_and_resume_and_reports_its_windows() -> None:
    app, link, transport, _ = worker_app()
    link.dataReceived(encode(("state", 1, [(s.container_id, s) for s in (spec("v1-a", "v1"),
                                                                           spec("v2-a", "v2", 20.0, 0.05))], [], [])))
    pool = app.registry.services["api"]
    assert pool.split is not None and pool.split.shares["v2"] == pytest.approx(20.0)
    transport.clear()
    link.dataReceived(encode(("canary", 2, "api", "v2", "error rate 50 %")))
    assert pool.split.shares["v2"] == 0.0
    link.dataReceived(encode(("canary", 3, "api", "v2", None)))
    assert pool.split.shares["v2"] == pytest.approx(20.0)
    link.dataReceived(encode(("canary", 4, "nosuch", "v2", "x")))  # unknown: acknowledged, nothing else
    assert [reply[:2] for reply in replies(transport)] == [("ack", 2), ("ack", 3), ("ack", 4)]
    # The exchanges feed the worker's analyzer; the link sends what ended every CANARY_INTERVAL.
    backend = pool.backends["v2-a"]
    # Not before the supervisor said it reads them (a supervisor of older code, kept by a reload, would not).
    app.gateway.canary.observe(pool, backend, 1000.0, 0.01, True)
    link.send_windows()
    link.dataReceived(encode(("windows_wanted", 5)))
    transport.clear()
    app.gateway.canary.observe(pool, backend, 1000.0, 0.01, True)
    link.send_windows()
    link.send_windows()  # nothing new: nothing sent
    assert replies(transport) == [("windows", {("api", "v2"): (1, 1, {bucket_of(0.01): 1})})]


def test_the_supervisor_merges_the_workers_windows_and_pushes_its_cut_to_every_worker() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from labelgw.cli.config import Settings
    from labelgw.workers import supervisor as sup
    from test_workers_protocol import FakeProcessTransport

    reactor = MemoryReactorClock()
    reactor.advance(1000.0)
    settings = Settings(http=("tcp:0:interface=127.0.0.1",), https=(), admin="tcp:0:interface=127.0.0.1",
                        docker=False, access_log="off")
    service = sup.SupervisorService(settings, reactor, 2, ["--workers", "2"])
    # The admin listener's resume goes through the analyzer that tells the workers.
    assert service.admin is not None and service.admin.factory.resource._canary is service.canary
    processes: list[sup.WorkerProcess] = []

    def spawn(process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        process.makeConnection(FakeProcessTransport(worker_id))  # type: ignore[arg-type]
        processes.append(process)

    service.pool._spawn = spawn
    service.pool.start()
    for item in (spec("v1-a", "v1"), spec("v2-a", "v2", 20.0, 0.05)):
        service.registry.apply(item.container_id, item)
    for process in processes:
        World.ready(process)
    hist = {bucket_of(0.01): 12}
    for process in processes:
        World.say(process, ("windows", {("api", "v1"): (12, 0, hist), ("api", "v2"): (12, 6, hist)}))
    for process in processes:
        pushed = [m for m in World.sent(process) if m[0] == "canary"]
        assert len(pushed) == 1 and pushed[0][2:4] == ("api", "v2") and "error rate 50.0 %" in pushed[0][4]
    assert service.registry.services["api"].split.shares["v2"] == 0.0  # type: ignore[union-attr]
    # A worker started now (a restart) is told the cut right after its state.
    service.pool._start(3, 1)
    assert [m[0] for m in World.sent(processes[-1])] == ["state", "windows_wanted", "canary"]
    # Resume from the admin listener: pushed to every worker of the pool.
    assert service.canary.resume(service.registry.services["api"], "v2")
    for process in processes[:2]:
        assert World.sent(process)[-1][0] == "canary" and World.sent(process)[-1][2:] == ("api", "v2", None)
