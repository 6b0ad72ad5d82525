"""The supervisor and its workers (labelgw.workers): framing, the worker pool's bookkeeping (start, push and its
latency, restart on death, reload, stop) and a worker applying what it is sent. Deterministic: task.Clock, fake
processes, StringTransport; no process is started."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from labelgw.cli.config import Settings
from labelgw.core.middleware import ConcurrencySpec, MiddlewareSpec, RateLimitSpec
from labelgw.core.model import ContainerSpec, HealthCheck
from labelgw.workers import supervisor as sup
from labelgw.workers.protocol import FrameDecoder, ProtocolError, encode
from labelgw.workers.worker import SupervisorLink, WorkerService, scale_outcome


def spec(container_id: str = "c1", service: str = "api", port: int = 8000, **changes: Any) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=f"{service}-{container_id}", service=service, address="127.0.0.1",
        port=port, hosts=(f"{service}.localhost",), **changes,
    )


# Framing.


def test_frames_survive_any_split() -> None:
    messages = [("op", 1, "apply", ("c1", spec())), ("ack", 7), ("stop",)]
    data = b"".join(encode(m) for m in messages)
    for size in (1, 3, 7, len(data)):
        decoder = FrameDecoder()
        got: list[Any] = []
        for start in range(0, len(data), size):
            got += decoder.feed(data[start : start + size])
        assert got == messages
        assert decoder.pending == 0


def test_oversized_frame_and_non_message_are_errors() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(max_frame=10).feed(encode(("op", 1, "x" * 100)))
    body = pickle.dumps(["not", "a", "tuple"])
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_the_supervisor_reads_only_plain_values_from_a_worker() -> None:
    plain = FrameDecoder(plain=True)
    assert plain.feed(encode(("report", b"text", {"c1": (1, 2, 3, 4, 5)}, 1.5, None))) == [
        ("report", b"text", {"c1": (1, 2, 3, 4, 5)}, 1.5, None)
    ]
    with pytest.raises(ProtocolError):
        FrameDecoder(plain=True).feed(encode(("op", 1, "apply", ("c1", spec()))))


def test_a_worker_sending_a_class_is_killed() -> None:
    world = World(1)
    world.pool.start()
    (one,) = world.spawned
    world.say(one, ("ready", one.pid, spec()))
    assert one.transport.signals == [9] and one.state == "starting"  # type: ignore[union-attr]


# Limits split over the workers.


def test_limits_split_by_worker_count() -> None:
    middleware = MiddlewareSpec(
        ratelimit=RateLimitSpec(rate=100.0, burst=20.0, quota=100, window=1),
        concurrency=ConcurrencySpec(max_inflight=9, max_pending=4),
    )
    scaled = scale_outcome(spec(middleware=middleware), 0.5)
    assert isinstance(scaled, ContainerSpec) and scaled.middleware is not None
    assert scaled.middleware.ratelimit is not None and scaled.middleware.concurrency is not None
    assert (scaled.middleware.ratelimit.rate, scaled.middleware.ratelimit.burst) == (50.0, 10.0)
    assert (scaled.middleware.concurrency.max_inflight, scaled.middleware.concurrency.max_pending) == (5, 2)
    # Never below one token of burst or one request in flight; one worker: unchanged; no limits: unchanged.
    tiny = scale_outcome(spec(middleware=dataclasses.replace(
        middleware, ratelimit=RateLimitSpec(rate=1.0, burst=1.0, quota=1, window=1),
        concurrency=ConcurrencySpec(max_inflight=1))), 0.25)
    assert tiny.middleware.ratelimit.burst == 1.0 and tiny.middleware.concurrency.max_inflight == 1  # type: ignore[union-attr]
    assert scale_outcome(spec(middleware=middleware), 1.0).middleware is middleware  # type: ignore[union-attr]
    assert scale_outcome(spec(), 0.5) == spec()
    assert scale_outcome(None, 0.5) is None


# The pool, with fake processes.


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[int] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def signalProcess(self, number: int) -> None:
        self.signals.append(number)

    def messages(self) -> list[Any]:
        return FrameDecoder().feed(b"".join(self.written))


class World:
    def __init__(self, count: int = 2) -> None:
        self.clock = Clock()
        self.spawned: list[sup.WorkerProcess] = []
        self.specs: list[Any] = [("c1", spec())]
        self.reports: list[Any] = []
        self.ejections: list[Any] = []
        self.pool = sup.WorkerPool(
            self.clock, count, self.spawn, lambda: (list(self.specs), [], []), lambda: 10.0,
            on_report=lambda worker, message: self.reports.append((worker.id, message)),
            on_ejected=lambda worker, *fields: self.ejections.append((worker.id, *fields)),
        )

    def spawn(self, process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        process.makeConnection(FakeProcessTransport(1000 + len(self.spawned)))  # type: ignore[arg-type]
        self.spawned.append(process)

    @staticmethod
    def say(process: sup.WorkerProcess, *messages: Any) -> None:
        process.childDataReceived(3, b"".join(encode(m) for m in messages))

    def ready(self, *processes: sup.WorkerProcess) -> None:
        for process in processes:
            self.say(process, ("ready", process.pid))

    @staticmethod
    def sent(process: sup.WorkerProcess) -> list[Any]:
        return process.transport.messages()  # type: ignore[union-attr]

    @staticmethod
    def die(process: sup.WorkerProcess, signal_number: int | None = 9, code: int | None = None) -> None:
        reason = ProcessDone(0) if signal_number is None and not code else ProcessTerminated(code, signal_number)
        process.processEnded(Failure(reason))


def test_each_worker_starts_from_the_state_and_gets_every_change_in_order() -> None:
    world = World(2)
    world.pool.start()
    one, two = world.spawned
    assert [m[0] for m in world.sent(one)] == ["state"] and world.sent(one)[0][2] == [("c1", spec())]
    world.ready(one, two)
    world.pool.broadcast("op", "apply", ("c2", spec("c2")))
    world.pool.broadcast("health", "api", "c2", "healthy")
    for process in (one, two):
        kinds = [(m[0], m[2] if m[0] == "op" else None) for m in world.sent(process)]
        assert kinds == [("state", None), ("op", "apply"), ("health", None)]


def test_push_latency_is_the_last_workers_acknowledgement() -> None:
    world = World(2)
    world.pool.start()
    one, two = world.spawned
    world.ready(one, two)
    seq = world.pool.broadcast("op", "remove", ("c1",))
    world.clock.advance(0.002)
    world.say(one, ("ack", seq))
    assert world.pool.push_latency.count == 0  # one worker has not applied it yet
    world.clock.advance(0.003)
    world.say(two, ("ack", seq))
    assert world.pool.push_latency.count == 1
    assert world.pool.push_last == pytest.approx(0.005)
    # A worker that dies is no longer waited for (and the change is not counted: its last ack is unknown).
    seq = world.pool.broadcast("op", "remove", ("c2",))
    world.say(one, ("ack", seq))
    world.die(two)
    assert world.pool._pending == {} and world.pool.push_latency.count == 1


def test_push_latency_ends_when_the_last_worker_applied_the_change_not_when_its_ack_is_read() -> None:
    stamps = iter([100.0, 100.0002])  # the change; the end of its writes
    world = World(2)
    world.pool._stamp = lambda: next(stamps)
    world.pool.start()
    one, two = world.spawned
    world.ready(one, two)
    seq = world.pool.broadcast("health", "api", "c1", "unhealthy")
    # Applied 1 ms and 3 ms after the change; the supervisor reads both acknowledgements 50 ms later.
    world.clock.advance(0.05)
    world.say(one, ("ack", seq, 100.001))
    world.say(two, ("ack", seq, 100.003))
    assert world.pool.push_last == pytest.approx(0.003)
    assert world.pool.describe()["push_latency_seconds"]["recent"] == [pytest.approx(0.003)]


class FlushingTransport(FakeProcessTransport):
    """A process transport whose pipe to the child buffers until flushed, as Twisted's does."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.buffered: list[bytes] = []
        outer = self

        class Pipe:
            def doWrite(self) -> None:
                outer.written += outer.buffered
                outer.buffered.clear()

        self.pipes = {0: Pipe()}

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.buffered.append(data)


def test_a_change_is_written_to_the_pipe_at_once_not_at_the_reactors_next_turn() -> None:
    world = World(1)
    world.spawn = lambda process, worker_id, generation: (  # type: ignore[method-assign]
        process.makeConnection(FlushingTransport(1000)), world.spawned.append(process))
    world.pool._spawn = world.spawn
    world.pool.start()
    (one,) = world.spawned
    world.ready(one)
    world.pool.broadcast("health", "api", "c1", "unhealthy")
    transport = one.transport
    assert transport.buffered == []  # type: ignore[union-attr]
    assert [m[0] for m in world.sent(one)] == ["state", "health"]


def test_a_worker_that_dies_is_restarted_and_the_log_says_why(caplog: Any) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        world = World(2)
        world.pool.start()
        one, two = world.spawned
        world.ready(one, two)
        world.clock.advance(60)
        world.die(one, 9)
        world.clock.advance(0)
        assert len(world.spawned) == 3 and world.spawned[2].id == 1 and world.pool.workers[1] is world.spawned[2]
        assert world.pool.restarts == 1
        text = [e.get("why") for e in events if "died" in e.get("log_format", "")]
        assert text == ["killed by signal 9 (SIGKILL)"]
        # The new one starts from the current state too.
        assert world.sent(world.spawned[2])[0][0] == "state"
        # Dying again and again right after starting: restarted after a growing delay.
        world.die(world.spawned[2], None, 3)
        world.clock.advance(0)
        world.die(world.spawned[3], None, 3)
        assert len(world.spawned) == 4
        world.clock.advance(0.25)
        assert len(world.spawned) == 5
        assert [e.get("why") for e in events if "died" in e.get("log_format", "")][1:] == ["exited with code 3"] * 2
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_worker_not_ready_in_time_is_killed() -> None:
    world = World(1)
    world.pool.start()
    (one,) = world.spawned
    world.clock.advance(sup.START_TIMEOUT)
    assert one.transport.signals == [9]  # type: ignore[union-attr]


def test_reload_starts_a_generation_that_takes_over_then_the_old_one_drains() -> None:
    world = World(2)
    world.pool.start()
    old = list(world.spawned)
    world.ready(*old)
    done = world.pool.reload("SIGHUP")
    new = world.spawned[2:]
    assert [p.generation for p in new] == [2, 2]
    world.ready(new[0])
    assert not done.called and all(m[0] != "stop" for p in old for m in world.sent(p))
    # A change while the new generation starts reaches old and new alike.
    world.pool.broadcast("op", "apply", ("c3", spec("c3")))
    assert all(world.sent(p)[-1][0] == "op" for p in (*old, *new))
    world.ready(new[1])
    assert done.result is True
    assert all(world.sent(p)[-1] == ("stop",) for p in old)
    assert world.pool.workers == {1: new[0], 2: new[1]}
    # The old ones exit when drained: not restarted.
    for process in old:
        world.die(process, None)
    world.clock.advance(60)
    assert len(world.spawned) == 4 and world.pool.restarts == 0
    # One that outlives the drain grace is killed.
    again = world.pool.reload("SIGHUP")
    world.ready(*world.spawned[4:])
    assert again.result is True
    world.clock.advance(10.0 + sup.STOP_MARGIN)
    assert all(p.transport.signals == [9] for p in new)  # type: ignore[union-attr]


def test_reload_whose_new_worker_dies_keeps_the_old_generation() -> None:
    world = World(2)
    world.pool.start()
    old = list(world.spawned)
    world.ready(*old)
    done = world.pool.reload("SIGHUP")
    new = world.spawned[2:]
    world.ready(new[0])
    world.die(new[1], None, 2)
    assert done.result is False
    assert world.pool.workers == {1: old[0], 2: old[1]}
    assert world.sent(new[0])[-1] == ("stop",)
    assert all(world.sent(p)[-1][0] != "stop" for p in old)
    world.clock.advance(60)
    assert len(world.spawned) == 4  # nothing restarted


def test_a_reload_asked_during_a_reload_runs_after_it() -> None:
    world = World(1)
    world.pool.start()
    world.ready(world.spawned[0])
    first = world.pool.reload("one")
    second = world.pool.reload("two")
    assert len(world.spawned) == 2
    world.ready(world.spawned[1])
    assert first.result is True and not second.called
    assert len(world.spawned) == 3 and world.spawned[2].generation == 3
    world.ready(world.spawned[2])
    assert second.result is True


def test_reports_and_ejections_reach_the_handlers() -> None:
    world = World(2)
    world.pool.start()
    one, two = world.spawned
    world.say(one, ("report", b"# metrics", {"c1": (0, 5, 1, 0, 0)}), ("ejected", "api", "c1", 30.0))
    assert world.reports == [(1, ("report", b"# metrics", {"c1": (0, 5, 1, 0, 0)}))]
    assert world.ejections == [(1, "api", "c1", 30.0)]
    assert one.report is not None


def test_stop_asks_every_worker_and_fires_when_all_exited() -> None:
    world = World(2)
    world.pool.start()
    one, two = world.spawned
    world.ready(one, two)
    stopped = world.pool.stop()
    assert world.sent(one)[-1] == ("stop",) and world.sent(two)[-1] == ("stop",)
    world.die(one, None)
    assert not stopped.called
    world.die(two, None)
    assert stopped.called
    world.clock.advance(60)
    assert len(world.spawned) == 2


def test_describe_exit() -> None:
    assert sup.describe_exit(Failure(ProcessDone(0))) == "exited with code 0"
    assert sup.describe_exit(Failure(ProcessTerminated(None, 15))) == "killed by signal 15 (SIGTERM)"
    assert sup.describe_exit(Failure(ProcessTerminated(70, None))) == "exited with code 70"


def test_worker_argv_drops_workers() -> None:
    assert sup.worker_argv(["--http", "tcp:1", "--workers", "2", "--workers=3", "--config", "x"]) == [
        "--http", "tcp:1", "--config", "x",
    ]


# A worker applying what it is sent.


def worker_app(share: float = 1.0) -> tuple[WorkerService, SupervisorLink, StringTransport, list[str]]:
    reactor = MemoryReactorClock()
    settings = Settings(http=(), https=(), admin=None, docker=False, access_log="off")
    app = WorkerService(settings, reactor, [], share=share)
    app.startService()
    stops: list[str] = []
    link = SupervisorLink(app, reactor, stops.append)
    transport = StringTransport()
    link.makeConnection(transport)
    return app, link, transport, stops


def replies(transport: StringTransport) -> list[Any]:
    return FrameDecoder().feed(transport.value())


def test_worker_serves_only_once_the_state_is_applied_and_acknowledges_each_change() -> None:
    app, link, transport, _ = worker_app()
    assert not app.accepting
    checked = spec("c2", "web", health_check=HealthCheck(path="/health"))
    link.dataReceived(encode(("state", 1, [("c1", spec()), ("c2", checked)], [("web", "c2", "healthy")], [])))
    assert app.accepting
    assert app.registry.table.knows_host("api.localhost")
    web = app.registry.services["web"].backends["c2"]
    assert web.health_state == "healthy" and web.ready
    assert [m[0] for m in replies(transport)] == ["ack", "ready"]
    transport.clear()
    # In pieces, several at once.
    data = encode(("op", 2, "remove", ("c1",))) + encode(("health", 3, "web", "c2", "unhealthy"))
    link.dataReceived(data[:5])
    link.dataReceived(data[5:])
    assert not app.registry.table.knows_host("api.localhost")
    assert not web.ready
    assert [reply[:2] for reply in replies(transport)] == [("ack", 2), ("ack", 3)]
    # Each acknowledgement says when the change was applied (host-wide monotonic clock): push latency ends there.
    assert all(isinstance(reply[2], float) for reply in replies(transport))


def test_worker_applies_a_remote_ejection_and_reports_its_own() -> None:
    app, link, transport, _ = worker_app()
    link.dataReceived(encode(("state", 1, [("c1", spec()), ("c2", spec("c2", port=8001))], [], [])))
    pool = app.registry.services["api"]
    link.dataReceived(encode(("eject", 2, "api", "c1", 30.0)))
    assert pool.backends["c1"].ejected_until is not None and not pool.backends["c1"].ready
    assert [m for m in replies(transport) if m[0] == "ejected"] == []  # not echoed back
    app.reactor.advance(30.0)
    assert pool.backends["c1"].ready
    transport.clear()
    # Its own detector ejects c2: the supervisor is told.
    backend = pool.backends["c2"]
    for _ in range(app.outlier.consecutive):
        app.outlier.observe(pool, backend, True)
    assert [m[:3] for m in replies(transport) if m[0] == "ejected"] == [("ejected", "api", "c2")]


def test_worker_limits_are_its_share() -> None:
    app, link, _, _ = worker_app(share=0.5)
    limited = spec(middleware=MiddlewareSpec(ratelimit=RateLimitSpec(rate=10.0, burst=4.0, quota=10, window=1)))
    link.dataReceived(encode(("state", 1, [("c1", limited)], [], [])))
    applied = app.registry.containers["c1"]
    assert applied.middleware.ratelimit.rate == 5.0  # type: ignore[union-attr]


def test_worker_reports_its_counters_and_stops_when_asked_or_orphaned() -> None:
    app, link, transport, stops = worker_app()
    link.dataReceived(encode(("state", 1, [("c1", spec())], [], [])))
    app.registry.services["api"].backends["c1"].requests = 7
    transport.clear()
    app.reactor.advance(1.0)
    (report,) = replies(transport)
    assert report[0] == "report" and report[2] == {"c1": (0, 7, 0, 0, 0)}
    assert b"labelgw_requests" in report[1]
    link.dataReceived(encode(("stop",)))
    assert stops == ["the supervisor asked"]
    link.connectionLost(None)
    assert stops[-1] == "the supervisor is gone"


def test_supervisor_pushes_registry_changes_and_health(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    settings = Settings(http=("tcp:0:interface=127.0.0.1",), https=(), admin=None, docker=False, access_log="off")
    service = sup.SupervisorService(settings, reactor, 2, ["--workers", "2"])
    processes: list[sup.WorkerProcess] = []

    def spawn(process: sup.WorkerProcess, worker_id: int, generation: int) -> None:
        process.makeConnection(FakeProcessTransport(worker_id))  # type: ignore[arg-type]
        processes.append(process)

    service.pool._spawn = spawn
    service.pool.start()
    service.registry.apply("c1", spec(health_check=HealthCheck(path="/h")))
    pool = service.registry.services["api"]
    backend = pool.backends["c1"]
    backend.health_state = "healthy"
    service._backend_state_changed(pool, backend)
    for process in processes:
        # (after the state, "windows_wanted": labelgw.workers.canary)
        sent = [m for m in World.sent(process) if m[0] != "windows_wanted"]
        assert [m[0] for m in sent] == ["state", "op", "health"]
        assert sent[2][2:] == ("api", "c1", "healthy")
    # The state a new worker starts from: the containers (static ones excluded), health, ejections.
    specs, health, ejections = service.snapshot()
    assert [cid for cid, _ in specs] == ["c1"] and health == [("api", "c1", "healthy")] and ejections == []
    # Reports: the admin view's per-backend counters are the workers' sum.
    World.say(processes[0], ("report", b"", {"c1": (1, 10, 2, 0, 0)}))
    World.say(processes[1], ("report", b"", {"c1": (2, 5, 0, 0, 1)}))
    assert (backend.in_flight, backend.requests, backend.errors, backend.consecutive_failures) == (3, 15, 2, 1)
    # An ejection by worker 1 reaches worker 2 (not 1) and the supervisor's copy.
    World.say(processes[0], ("ejected", "api", "c1", 30.0))
    assert backend.ejected_until is not None
    assert World.sent(processes[1])[-1][0] == "eject" and World.sent(processes[0])[-1][0] == "health"


def test_workers_option() -> None:
    from twisted.python import usage

    from labelgw.cli.tap import Options, parse_workers

    assert parse_workers(None) is None
    assert parse_workers("3") == 3
    assert parse_workers("auto") >= 1  # type: ignore[operator]
    for bad in ("0", "x", "2000"):
        with pytest.raises(usage.UsageError):
            parse_workers(bad)
    options = Options()
    options.parseOptions(["--workers", "2", "--https", "none", "--admin", "none"])
    assert options.workers == 2
    assert options.argv == ["--workers", "2", "--https", "none", "--admin", "none"]
    plain = Options()
    plain.parseOptions(["--https", "none"])
    assert plain.workers is None


def test_an_old_worker_answers_a_connection_accepted_just_before_it_stopped_listening() -> None:
    from twisted.internet.address import IPv4Address

    from labelgw.http.server import ProxyFactory

    app, link, _, _ = worker_app()
    link.dataReceived(encode(("state", 1, [], [], [])))
    factory = ProxyFactory(app.gateway, b"http")

    class Transport(StringTransport):
        def unregisterProducer(self) -> None:
            self.producer = None  # a real transport allows it twice (closing, then connectionLost)

    def connect() -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = Transport()
        protocol.makeConnection(transport)
        return protocol, transport

    fresh, fresh_transport = connect()
    silent, silent_transport = connect()
    idle, idle_transport = connect()
    idle._requests = 1  # a keep-alive connection between two requests
    drained = app.gateway.drain(10.0)
    # The keep-alive one closes now (as in a single process); the fresh ones wait for their first request.
    assert idle_transport.disconnecting and not fresh_transport.disconnecting and not silent_transport.disconnecting
    fresh.dataReceived(b"GET / HTTP/1.1\r\nHost: unknown.localhost\r\n\r\n")
    assert fresh_transport.value().startswith(b"HTTP/1.1 404")
    assert b"connection: close" in fresh_transport.value().lower() and fresh_transport.disconnecting
    # One that sends nothing is closed after FIRST_REQUEST_GRACE.
    from labelgw.workers.worker import FIRST_REQUEST_GRACE

    app.reactor.advance(FIRST_REQUEST_GRACE)
    assert silent_transport.disconnecting
    for protocol in (fresh, silent, idle):
        protocol.connectionLost(Failure(ProcessDone(0)))
    assert drained.called


def test_an_old_workers_drain_lets_a_tls_handshake_in_progress_finish() -> None:
    """A connection still in its TLS handshake when FIRST_REQUEST_GRACE is over is not closed (that would cut the
    handshake): it finishes, then has FIRST_REQUEST_GRACE for its request, all within the drain grace."""
    from twisted.internet.address import IPv4Address

    from labelgw.http.server import ProxyFactory
    from labelgw.workers.worker import FIRST_REQUEST_GRACE, HANDSHAKE_POLL

    app, link, _, _ = worker_app()
    link.dataReceived(encode(("state", 1, [], [], [])))
    factory = ProxyFactory(app.gateway, b"https")

    class TLSTransport(StringTransport):
        """What the TLS layer is to the protocol behind it: its handshake state (labelgw.tls.stdtls's name)."""

        _handshake_done = False

        def unregisterProducer(self) -> None:
            self.producer = None

    def connect() -> tuple[Any, TLSTransport]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = TLSTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    slow, slow_transport = connect()  # a handshake that takes 2.5 s
    stuck, stuck_transport = connect()  # one that never finishes
    drained = app.gateway.drain(10.0)
    app.reactor.advance(FIRST_REQUEST_GRACE)
    assert not slow_transport.disconnecting and not stuck_transport.disconnecting
    for _ in range(15):
        app.reactor.advance(HANDSHAKE_POLL)
    slow_transport._handshake_done = True
    app.reactor.advance(HANDSHAKE_POLL)
    slow.dataReceived(b"GET / HTTP/1.1\r\nHost: unknown.localhost\r\n\r\n")
    assert slow_transport.value().startswith(b"HTTP/1.1 404") and b"connection: close" in slow_transport.value().lower()
    assert slow_transport.disconnecting
    slow.connectionLost(Failure(ProcessDone(0)))
    assert not drained.called and not stuck_transport.disconnecting
    # The drain grace bounds the wait: the gateway's drain aborts what is left.
    app.reactor.advance(10.0)
    assert stuck_transport.disconnecting or stuck not in app.gateway.connections
    stuck.connectionLost(Failure(ProcessDone(0)))
    assert drained.called


def test_handshake_pending_reads_either_tls_engines_state() -> None:
    from labelgw.workers.worker import handshake_pending

    class Done:
        _handshake_done = True

    class Twisteds:
        _handshakeDone = False

    class Plain:
        pass

    assert not handshake_pending(type("C", (), {"transport": Done()})())
    assert handshake_pending(type("C", (), {"transport": Twisteds()})())
    assert not handshake_pending(type("C", (), {"transport": Plain()})())
