# -*- test-case-name: tests.test_workers_protocol -*-
"""The supervising process of `twistd labelgw --workers N`.

It runs the parts of labelgw there must be one of: the Docker watcher (the engine sees one event subscription), the
registry fed by it, the active health checks, the admin listener and the local CA. It binds the HTTP and HTTPS
listening sockets but never accepts on them: each worker process inherits them (one socket, one accept queue, shared
by every process that holds it, so a worker that starts, dies or is replaced loses no queued connection) and serves
them with a registry of its own, kept up to date by the changes the supervisor pushes as they happen.

L{WorkerPool} is the bookkeeping (spawning, the channel, restarts, reloads, push latency), with the process
plumbing injected so that tests drive it with a clock and fake processes; L{SupervisorService} wires it to the
rest of labelgw."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger

from labelgw.cli.app import LabelgwService
from labelgw.cli.config import Settings
from labelgw.cli.listeners import ListenerService
from labelgw.core.backends import Backend, ServicePool
from labelgw.core.registry import STATIC_PREFIX
from labelgw.workers.protocol import FrameDecoder, Message, ProtocolError, encode

# Seconds a new worker has to say it is ready before it is killed (and started again).
START_TIMEOUT = 30.0
# Beyond the drain grace, seconds a stopping worker has to exit before it is killed.
STOP_MARGIN = 5.0
# A worker that dies within this many seconds of its start is restarted after a growing delay (0.25 s, doubled at
# each death in a row, at most RESTART_MAX_DELAY), so that a worker that cannot start does not spin.
RESTART_QUICK = 10.0
RESTART_MAX_DELAY = 10.0
# Acknowledgements awaited at most (a worker that stops acknowledging does not grow the supervisor).
MAX_PENDING = 10_000
# The first descriptor number of the inherited listening sockets in a worker.
FIRST_LISTENER_FD = 10
# Upper bounds of the push latency histogram, seconds.
PUSH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
# The latest push latencies kept for GET /workers (percentiles in the benchmark).
PUSH_RECENT = 1000


def describe_exit(reason: Any) -> str:
    """What a process's end says, in words: 'exited with code 1', 'killed by signal 9 (SIGKILL)'."""
    value = getattr(reason, "value", reason)
    number = getattr(value, "signal", None)
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "?"
        return f"killed by signal {number} ({name})"
    code = getattr(value, "exitCode", None)
    if code is None:
        status = getattr(value, "status", None)
        return f"ended (status {status})"
    return f"exited with code {code}"


class PushHistogram:
    """Bucket counts of the push latency (not cumulative), their sum and count."""

    def __init__(self, bounds: tuple[float, ...] = PUSH_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        from bisect import bisect_left

        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


class WorkerProcess(ProcessProtocol):
    """One worker process and the supervisor's end of its channel."""

    _log = Logger()

    def __init__(self, pool: "WorkerPool", worker_id: int, generation: int) -> None:
        self.pool = pool
        self.id = worker_id
        self.generation = generation
        self.pid: int | None = None
        # starting -> ready -> stopping -> ended
        self.state = "starting"
        self.started = pool.clock.seconds()
        self.decoder = FrameDecoder(plain=True)
        self.exit: str | None = None
        self.report: Message | None = None
        # Per limited service: the smoothed requests per report, and the limits last sent (labelgw.workers.limits).
        self.demand: dict[str, float] = {}
        self.limits_sent: dict[str, tuple[Any, ...]] = {}
        self._start_timer: Any = None
        self._kill_timer: Any = None
        self.ended: Deferred[None] = Deferred()

    @property
    def alive(self) -> bool:
        return self.state != "ended"

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        self.pool.started(self)

    def send(self, message: Message) -> None:
        if self.transport is not None and self.alive:
            self.write(encode(message))

    def write(self, data: bytes) -> None:
        """Write to the worker's pipe now, not at the reactor's next turn: Twisted buffers a write until the
        reactor polls the pipe writable, and whatever else that turn runs (an admin request, a /metrics render,
        other events) would delay the change by as much (issue 11's push latency tail)."""
        transport = self.transport
        transport.writeToChild(0, data)  # type: ignore[union-attr]
        pipe = getattr(transport, "pipes", {}).get(0)
        if pipe is not None:
            # A write error stays in the writer, which the reactor reports at its next turn as usual.
            pipe.doWrite()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 3:
            return
        try:
            messages = self.decoder.feed(data)
        except (ProtocolError, Exception) as error:
            self._log.error("worker {worker}: bad message: {error}; killing it", worker=self.id, error=repr(error))
            self.kill()
            return
        for message in messages:
            try:
                self.pool.received(self, message)
            except Exception:
                self._log.failure("worker {worker}: handling {kind}", worker=self.id, kind=message[0])

    def childConnectionLost(self, childFD: int) -> None:
        pass

    def kill(self, number: int = signal.SIGKILL) -> None:
        if self.transport is None or not self.alive:
            return
        try:
            self.transport.signalProcess(number)
        except (ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Any) -> None:
        if self.state == "ended":
            return
        self.state = "ended"
        self.exit = describe_exit(reason)
        for timer in (self._start_timer, self._kill_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.pool.ended(self)
        self.ended.callback(None)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "pid": self.pid, "generation": self.generation, "state": self.state,
            "started": self.started, "exit": self.exit,
        }


class _Pending:
    __slots__ = ("sent", "stamp", "waiting", "applied", "read")

    def __init__(self, sent: float, stamp: float, waiting: set[WorkerProcess]) -> None:
        self.sent = sent
        # The change's time on the host-wide monotonic clock the workers stamp their application with.
        self.stamp = stamp
        self.waiting = waiting
        # The latest application so far (stamp clock), None while no worker said when; the latest read from the
        # pipe (the rest is the worker's handling).
        self.applied: float | None = None
        self.read: float | None = None


class WorkerPool:
    """N workers of the current generation, the next generation while a reload starts it, and the retiring ones.

    C{spawn(process, worker_id, generation)} starts the process for a L{WorkerProcess} (the real one:
    C{reactor.spawnProcess}); C{snapshot()} returns the state a new worker starts from (specs, health, ejections);
    C{handlers} get the workers' reports and ejections."""

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        count: int,
        spawn: Callable[[WorkerProcess, int, int], None],
        snapshot: Callable[[], tuple[list[Any], list[Any], list[Any]]],
        drain_grace: Callable[[], float],
        on_report: Callable[[WorkerProcess, Message], None] = lambda worker, message: None,
        on_ejected: Callable[[WorkerProcess, str, str, float], None] = lambda worker, service, key, seconds: None,
        stamp: Callable[[], float] | None = None,
        on_windows: Callable[[WorkerProcess, Any], None] = lambda worker, deltas: None,
        after_state: Callable[[], list[Message]] = lambda: [],
    ) -> None:
        self.clock = clock
        # The clock a worker's acknowledgement is stamped with (time.monotonic: CLOCK_MONOTONIC is one clock for
        # every process of the host); None: latency measured when the acknowledgement is read.
        self._stamp = stamp
        self.count = count
        self._spawn = spawn
        self._snapshot = snapshot
        self._drain_grace = drain_grace
        self.on_report = on_report
        self.on_ejected = on_ejected
        # A worker's canary window report (labelgw.workers.canary); the changes a new worker gets after its state
        # (without their seq: numbered here).
        self.on_windows = on_windows
        self._after_state = after_state
        self.running = False
        self.generation = 0
        self.workers: dict[int, WorkerProcess] = {}
        self.candidates: dict[int, WorkerProcess] = {}
        self.retiring: set[WorkerProcess] = set()
        self.restarts = 0
        self.reloads = 0
        self._respawns: dict[int, Any] = {}
        self._quick_deaths: dict[int, int] = {}
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._reload_done: list[Deferred[bool]] = []
        self._reload_again: str | None = None
        self._again_done: list[Deferred[bool]] = []
        # Push latency: from a change in the supervisor to its acknowledgement by the last worker that got it.
        self.push_latency = PushHistogram()
        self.push_recent: deque[float] = deque(maxlen=PUSH_RECENT)
        # Of those, the part until the last worker read the change from its pipe (the rest: applying it).
        self.push_read_recent: deque[float] = deque(maxlen=PUSH_RECENT)
        self.write_recent: deque[float] = deque(maxlen=PUSH_RECENT)
        self.push_last: float | None = None
        # What exited workers counted (labelgw.workers.aggregate.carry): /metrics counters never go back.
        self.carried: dict[Any, float] = {}
        self.push_max = 0.0
        # Other parts of the supervisor (labelgw.workers.certs, ACME): told of each new worker before its state is
        # sent, of each acknowledgement, and given the worker messages of their kinds.
        self.on_started: list[Callable[[WorkerProcess], None]] = []
        self.on_ack: list[Callable[[WorkerProcess, int], None]] = []
        self.handlers: dict[str, Callable[[WorkerProcess, Message], None]] = {}

    # Life cycle.

    def start(self) -> None:
        self.running = True
        self.generation = 1
        for worker_id in range(1, self.count + 1):
            self.workers[worker_id] = self._start(worker_id, self.generation)

    def _start(self, worker_id: int, generation: int) -> WorkerProcess:
        process = WorkerProcess(self, worker_id, generation)
        process._start_timer = self.clock.callLater(START_TIMEOUT, self._start_timed_out, process)
        self._spawn(process, worker_id, generation)
        return process

    def _start_timed_out(self, process: WorkerProcess) -> None:
        process._start_timer = None
        if process.state == "starting":
            self._log.error(
                "worker {worker} (pid {pid}) not ready after {timeout:g} s: killing it",
                worker=process.id, pid=process.pid, timeout=START_TIMEOUT,
            )
            process.kill()

    def processes(self) -> list[WorkerProcess]:
        return [p for p in (*self.workers.values(), *self.candidates.values(), *self.retiring) if p.alive]

    def started(self, process: WorkerProcess) -> None:
        """The process runs: send it the state it starts from."""
        self._log.info(
            "worker {worker} started (pid {pid}, generation {generation})",
            worker=process.id, pid=process.pid, generation=process.generation,
        )
        for hook in self.on_started:
            hook(process)
        specs, health, ejections = self._snapshot()
        seq = self._next_seq()
        process.send(("state", seq, specs, health, ejections))
        for kind, *fields in self._after_state():
            process.send((kind, self._next_seq(), *fields))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def broadcast(self, kind: str, *fields: Any, exclude: WorkerProcess | None = None) -> int:
        """Send a change to every live worker (the retiring ones too: they still serve what they accepted)."""
        seq = self._next_seq()
        # The change's time, before any write (a write may wake a worker that takes this process's core).
        stamp = self._stamp() if self._stamp is not None else 0.0
        message = (kind, seq, *fields)
        data: bytes | None = None
        waiting: set[WorkerProcess] = set()
        for process in self.processes():
            if process is exclude or process.transport is None:
                continue
            if data is None:
                data = encode(message)
            process.write(data)
            # A worker still starting reads it once its interpreter is up: its start-up time is not push latency.
            if process.state != "starting":
                waiting.add(process)
        if waiting:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[seq] = _Pending(self.clock.seconds(), stamp, waiting)
            if self._stamp is not None:
                self.write_recent.append(self._stamp() - stamp)
        return seq

    def received(self, process: WorkerProcess, message: Message) -> None:
        kind = message[0]
        if kind == "ack":
            self._acked(process, message[1], *message[2:4])
            for observer in self.on_ack:
                observer(process, message[1])
        elif kind == "report":
            process.report = message
            self.on_report(process, message)
        elif kind == "ready":
            self._ready(process)
        elif kind == "ejected":
            _, service, key, seconds = message
            self.on_ejected(process, service, key, seconds)
        elif kind == "windows":
            self.on_windows(process, message[1])
        elif kind in self.handlers:
            self.handlers[kind](process, message)
        else:
            self._log.warn("worker {worker}: unknown message {kind}", worker=process.id, kind=kind)

    def _acked(self, process: WorkerProcess, seq: int, applied: Any = None, read: Any = None) -> None:
        """A worker applied change `seq` (at `applied` on the stamp clock, having read it at `read`, when it said)."""
        pending = self._pending.get(seq)
        if pending is None:
            return
        pending.waiting.discard(process)
        if self._stamp is not None and isinstance(applied, float):
            pending.applied = applied if pending.applied is None else max(pending.applied, applied)
            if isinstance(read, float):
                pending.read = read if pending.read is None else max(pending.read, read)
        elif self._stamp is not None:
            pending.applied = math.inf  # a worker that does not stamp: measured when its ack is read
        if not pending.waiting:
            del self._pending[seq]
            if pending.applied is not None and pending.applied != math.inf:
                # When the change took effect in the last worker, not when the supervisor got round to reading
                # the acknowledgement (its reactor may be busy with an admin request meanwhile).
                self._observe(max(0.0, pending.applied - pending.stamp))
                if pending.read is not None:
                    self.push_read_recent.append(max(0.0, pending.read - pending.stamp))
            else:
                self._observe(self.clock.seconds() - pending.sent)

    def _observe(self, latency: float) -> None:
        self.push_latency.observe(latency)
        self.push_recent.append(latency)
        self.push_last = latency
        self.push_max = max(self.push_max, latency)

    def _ready(self, process: WorkerProcess) -> None:
        if process.state != "starting":
            return
        process.state = "ready"
        timer, process._start_timer = process._start_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._log.info(
            "worker {worker} ready (pid {pid}, generation {generation})",
            worker=process.id, pid=process.pid, generation=process.generation,
        )
        if self.workers.get(process.id) is process and self.clock.seconds() - process.started > RESTART_QUICK:
            self._quick_deaths.pop(process.id, None)
        if self.candidates and all(p.state == "ready" for p in self.candidates.values()):
            self._take_over()

    def _take_over(self) -> None:
        old, self.workers, self.candidates = self.workers, self.candidates, {}
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        generation = self.generation
        self._log.info(
            "reload: generation {generation} serving ({count} workers); the previous workers stop accepting and"
            " finish their requests", generation=generation, count=len(self.workers),
        )
        for process in old.values():
            self.retire(process)
        self._reload_finished(True)

    def retire(self, process: WorkerProcess) -> None:
        """Ask a worker to stop accepting, finish what it has, and exit (killed if it outlives the drain)."""
        if not process.alive or process in self.retiring:
            return
        process.state = "stopping"
        self.retiring.add(process)
        process.send(("stop",))
        process._kill_timer = self.clock.callLater(self._drain_grace() + STOP_MARGIN, self._outlived, process)

    def _outlived(self, process: WorkerProcess) -> None:
        process._kill_timer = None
        if process.alive:
            self._log.warn("worker {worker} (pid {pid}) still running after the drain grace: killing it",
                           worker=process.id, pid=process.pid)
            process.kill()

    def ended(self, process: WorkerProcess) -> None:
        if process.report is not None:
            from labelgw.workers.aggregate import carry

            try:
                carry(self.carried, process.report[1])
            except Exception:  # a report that does not parse: its counts are lost, the rest goes on
                self._log.failure("worker {worker}: reading its last report", worker=process.id)
        for seq in [seq for seq, pending in self._pending.items() if process in pending.waiting]:
            pending = self._pending[seq]
            pending.waiting.discard(process)
            if not pending.waiting:
                del self._pending[seq]
        if process in self.retiring:
            self.retiring.discard(process)
            self._log.info(
                "worker {worker} (pid {pid}, generation {generation}) stopped: {why}",
                worker=process.id, pid=process.pid, generation=process.generation, why=process.exit,
            )
            return
        if self.candidates.get(process.id) is process:
            self._log.error(
                "reload failed: new worker {worker} (pid {pid}) {why} before it was ready; generation {old} keeps "
                "serving", worker=process.id, pid=process.pid, why=process.exit, old=self._serving_generation(),
            )
            candidates, self.candidates = self.candidates, {}
            for other in candidates.values():
                self.retire(other)
            self._reload_finished(False)
            return
        if self.workers.get(process.id) is not process:
            return
        if not self.running:
            self._log.info("worker {worker} (pid {pid}) {why}", worker=process.id, pid=process.pid, why=process.exit)
            return
        quick = self.clock.seconds() - process.started < RESTART_QUICK
        deaths = self._quick_deaths[process.id] = (self._quick_deaths.get(process.id, 0) + 1) if quick else 0
        delay = min(RESTART_MAX_DELAY, 0.25 * 2 ** (deaths - 2)) if deaths > 1 else 0.0
        self.restarts += 1
        self._log.warn(
            "worker {worker} (pid {pid}, generation {generation}) died: {why}; restarting it{after}",
            worker=process.id, pid=process.pid, generation=process.generation, why=process.exit,
            after=f" in {delay:g} s" if delay else "",
        )
        self._respawns[process.id] = self.clock.callLater(delay, self._respawn, process.id, process.generation)

    def _respawn(self, worker_id: int, generation: int) -> None:
        self._respawns.pop(worker_id, None)
        current = self.workers.get(worker_id)
        if not self.running or (current is not None and current.alive) or generation != current_generation(current):
            return
        self.workers[worker_id] = self._start(worker_id, generation)

    def _serving_generation(self) -> int:
        generations = [p.generation for p in self.workers.values()]
        return max(generations) if generations else self.generation

    # Reload.

    def reload(self, why: str) -> Deferred[bool]:
        """Start a new generation of workers; once every one of them is ready, they take over and the old ones
        drain. Fires True when the new generation serves, False when it could not start (the old one stays)."""
        done: Deferred[bool] = Deferred()
        if not self.running:
            done.callback(False)
            return done
        if self.candidates:
            # One more once this one is over: the code or the settings may have changed again meanwhile.
            self._reload_again = why
            self._again_done.append(done)
            return done
        self._reload_done.append(done)
        self.generation += 1
        self.reloads += 1
        self._log.info("reload ({why}): starting generation {generation} ({count} workers)",
                       why=why, generation=self.generation, count=self.count)
        for worker_id in range(1, self.count + 1):
            self.candidates[worker_id] = self._start(worker_id, self.generation)
        return done

    def _reload_finished(self, ok: bool) -> None:
        waiting, self._reload_done = self._reload_done, []
        for done in waiting:
            done.callback(ok)
        again, self._reload_again = self._reload_again, None
        queued, self._again_done = self._again_done, []
        if again is None:
            return
        following = self.reload(again) if self.running else succeed(False)
        for done in queued:
            following.addCallback(_relay, done)

    def stop(self) -> Deferred[Any]:
        """Every worker stops accepting, finishes its requests and exits; fires when all have."""
        self.running = False
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        processes = self.processes()
        for process in processes:
            self.retire(process)
        self._reload_again = None
        if self._reload_done or self._again_done:
            self.candidates = {}
            self._reload_finished(False)
            for done in self._again_done:
                done.callback(False)
            self._again_done = []
        return DeferredList([process.ended for process in processes], consumeErrors=True)

    # Views.

    def describe(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "generation": self._serving_generation(),
            "restarts": self.restarts,
            "reloads": self.reloads,
            "workers": [p.describe() for p in sorted(self.workers.values(), key=lambda p: p.id)],
            "starting": [p.describe() for p in self.candidates.values()],
            "stopping": [p.describe() for p in self.retiring],
            "push_latency_seconds": {
                "last": self.push_last, "max": self.push_max, "count": self.push_latency.count,
                "mean": (self.push_latency.total / self.push_latency.count) if self.push_latency.count else None,
                # The latest latencies, oldest first (at most PUSH_RECENT): for percentiles.
                "recent": list(self.push_recent),
                "recent_read": list(self.push_read_recent),
                "recent_write": list(self.write_recent),
            },
        }


def _relay(result: bool, done: Deferred[bool]) -> bool:
    done.callback(result)
    return result


def current_generation(process: WorkerProcess | None) -> int | None:
    return process.generation if process is not None else None


class _NoConnections(Factory):
    """The factory of a held socket: the supervisor never accepts on it."""

    protocol = Protocol
    noisy = False


class HeldSocket(ListenerService):
    """A listening socket the supervisor binds (before dropping privileges, with the same endpoint strings and
    backlog as a single-process labelgw) and holds open for its workers, without ever accepting on it."""

    started_message = "labelgw listening on {url} (served by the workers)"

    def __init__(self, reactor: Any, description: str, scheme: str) -> None:
        ListenerService.__init__(self, reactor, description, _NoConnections(), scheme)

    def privilegedStartService(self) -> None:
        ListenerService.privilegedStartService(self)
        self.port.stopReading()

    def fileno(self) -> int:
        return int(self.port.fileno())


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The labelgw options given to the supervisor, less `--workers`: what each worker parses."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


class SupervisorService(LabelgwService):
    """LabelgwService that serves nothing itself: it holds the listening sockets and runs N workers."""

    _log = Logger()

    def __init__(self, settings: Settings, reactor: Any, workers: int, argv: Sequence[str]) -> None:
        LabelgwService.__init__(self, settings, reactor, serve=False)
        self.argv = worker_argv(argv)
        self.held: list[HeldSocket] = []
        self.hold("http", settings.http)
        if self.https.tls_factory is not None:
            self.hold("https", settings.https)
        self.pool = WorkerPool(
            reactor, workers, self._spawn, self.snapshot, lambda: self.settings.drain_grace,
            on_report=self._report, on_ejected=self._ejected, stamp=time.monotonic,
            on_windows=self._windows, after_state=self._canary_state,
        )
        self._tee_registry()
        self.acme_relay: Any = None
        if self.https.acme is not None:
            from labelgw.workers.certs import AcmeRelay

            # The ACME manager runs here only: its certificates and challenge answers go to every worker.
            self.acme_relay = AcmeRelay(self.pool, self.https.acme, reactor)
            self.acme_relay.install()
        # Canary analysis on the whole gateway's traffic: the workers' windows merged here, cuts and resumes pushed
        # to every worker (labelgw.workers.canary).
        from labelgw.workers.canary import GatewayCanary

        canary = self.canary = self.gateway.canary = GatewayCanary(settings.canary_window, reactor.seconds)
        def push(service: str, version: str, reason: str | None) -> None:
            self.pool.broadcast("canary", service, version, reason)

        canary.on_change = push
        if self.admin is not None:
            # GET /workers on the admin listener: the workers, their restarts and the push latency.
            self.admin.factory.resource.workers = self.describe_workers
            # POST /canary/<service>/<version>/resume: this analyzer, which tells every worker.
            self.admin.factory.resource._canary = canary

    def _metrics_page(self) -> Any:
        """/metrics of the whole gateway: the supervisor's series and the workers' merged (labelgw.workers.aggregate)."""
        if not self.settings.metrics:
            return None
        from labelgw.control import metrics
        from labelgw.workers.aggregate import WorkersCollector

        own = metrics.GatewayCollector(
            self.gateway, self.registry, lambda: self.watcher, self.docker_metrics,
            self.https.tls_factory, self.https.selector,
        )
        from labelgw.workers.canary import CanaryCollector

        registry = metrics.metrics_registry([
            WorkersCollector(own, lambda: getattr(self, "pool", None)), CanaryCollector(self.registry, self.reactor.seconds),
        ])
        return lambda: metrics.render(registry)

    def describe_workers(self) -> dict[str, Any]:
        view = self.pool.describe()
        for entry in (*view["workers"], *view["starting"], *view["stopping"]):
            process = next((p for p in self.pool.processes() if p.pid == entry["pid"]), None)
            report = process.report if process is not None else None
            # Requests this worker sent to backends (its last report, at most a second old).
            entry["requests"] = sum(values[1] for values in report[2].values()) if report is not None else 0
        return view

    # Sockets.

    def hold(self, scheme: str, descriptions: Iterable[str], changes: list[str] | None = None) -> None:
        """Hold exactly these sockets of `scheme`: new ones bound (when already running), others closed."""
        wanted = list(descriptions)
        for socket_ in [h for h in self.held if h.scheme == scheme and h.description not in wanted]:
            self.held.remove(socket_)
            stopping = socket_.stopService()
            stopping.addErrback(lambda failure: self._log.failure("closing a listening socket", failure))
            if changes is not None:
                changes.append(f"{scheme} {socket_.description} closed")
        have = {h.description for h in self.held if h.scheme == scheme}
        for description in wanted:
            if description in have:
                continue
            socket_ = HeldSocket(self.reactor, description, scheme)
            if self.running:
                try:
                    socket_.privilegedStartService()
                except SystemExit as error:
                    self._log.error("{scheme} {error}", scheme=scheme, error=str(error))
                    continue
                socket_.startService()
            self.held.append(socket_)
            if changes is not None:
                changes.append(f"{scheme} {description} bound")

    def listener_fds(self) -> list[tuple[str, str, int, int]]:
        """(scheme, description, descriptor in the worker, descriptor here) of every socket held."""
        return [
            (held.scheme, held.description, FIRST_LISTENER_FD + index, held.fileno())
            for index, held in enumerate(h for h in self.held if h.port is not None)
        ]

    # Workers.

    def _spawn(self, process: WorkerProcess, worker_id: int, generation: int) -> None:
        fds = self.listener_fds()
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: "r"}
        for _, _, child, parent in fds:
            child_fds[child] = parent
        args = [
            sys.executable, "-m", "labelgw.workers", "--id", str(worker_id), "--generation", str(generation),
            "--share", repr(1.0 / self.pool.count),
            "--listeners", json.dumps([[scheme, description, child] for scheme, description, child, _ in fds]),
            "--", *self.argv,
        ]
        self.reactor.spawnProcess(process, sys.executable, args, env=dict(os.environ), path=os.getcwd(),
                                  childFDs=child_fds)

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        registry = self.registry
        now = self.reactor.seconds()
        # Static services come from the config file, which the worker reads itself.
        specs: list[Any] = [(cid, spec) for cid, spec in registry.containers.items() if not cid.startswith(STATIC_PREFIX)]
        specs += [(cid, rejection) for cid, rejection in registry.rejections.items()]
        health = []
        ejections = []
        for pool in registry.services.values():
            for backend in pool.backends.values():
                if backend.health_state is not None:
                    health.append((pool.name, backend.key, backend.health_state))
                if backend.ejected_until is not None and backend.ejected_until > now:
                    ejections.append((pool.name, backend.key, backend.ejected_until - now))
        return specs, health, ejections

    def _tee_registry(self) -> None:
        """Each change the watcher (or a config reload) makes to the registry goes to every worker, as made."""
        registry = self.registry
        pool = self.pool
        for name in ("apply", "mark_down", "remove", "resync"):
            original = getattr(registry, name)

            def tee(*args: Any, _original: Any = original, _name: str = name) -> None:
                _original(*args)
                pool.broadcast("op", _name, args)

            setattr(registry, name, tee)

    def _backend_state_changed(self, pool: ServicePool, backend: Backend) -> None:
        # Health is checked here only: each change goes to the workers (an ejection comes from them), before this
        # process's own bookkeeping and log line, which serve nothing.
        if backend.spec.health_check is not None and pool.backends.get(backend.key) is backend:
            self.pool.broadcast("health", pool.name, backend.key, backend.health_state)
        LabelgwService._backend_state_changed(self, pool, backend)

    def _windows(self, worker: WorkerProcess, deltas: Any) -> None:
        self.canary.add(self.registry, deltas)

    def _canary_state(self) -> list[Message]:
        """After a new worker's state: that this supervisor reads canary windows, and the cuts in force."""
        cuts = [("canary", service, version, reason) for service, version, reason in self.canary.cuts(self.registry)]
        return [("windows_wanted",), *cuts]

    def _ejected(self, worker: WorkerProcess, service: str, key: str, seconds: float) -> None:
        from labelgw.workers.worker import apply_ejection, find_backend

        found = find_backend(self.registry, service, key)
        if found is None:
            return
        pool, backend = found
        self._log.info("worker {worker} ejected backend {name} of service {service} for {seconds:g} s: every worker "
                       "follows", worker=worker.id, name=backend.spec.name, service=service, seconds=seconds)
        # The supervisor's copy (admin view, /metrics) and every other worker.
        apply_ejection(self, pool, backend, seconds)
        self.pool.broadcast("eject", service, key, seconds, exclude=worker)

    def _report(self, worker: WorkerProcess, message: Message) -> None:
        """Per-backend counters of the whole gateway: the sum of the workers' last reports, written into the
        supervisor's own backends (which serve nothing), so that the admin view shows the gateway's."""
        from labelgw.workers.limits import smoothed

        if len(message) > 3:
            for service, seen in message[3].items():
                worker.demand[service] = smoothed(worker.demand.get(service), seen)
        totals: dict[str, list[int]] = {}
        for process in self.pool.processes():
            report = process.report
            if report is None:
                continue
            for key, values in report[2].items():
                total = totals.get(key)
                if total is None:
                    totals[key] = list(values)
                else:
                    for index, value in enumerate(values):
                        total[index] = max(total[index], value) if index >= 3 else total[index] + value
        for pool in self.registry.services.values():
            for backend in pool.backends.values():
                values = totals.get(backend.key)
                if values is not None:
                    backend.in_flight, backend.requests, backend.errors = values[0], values[1], values[2]
                    backend.consecutive_failures = values[4]

    def rebalance_limits(self) -> None:
        """Divide each limited service's rate and concurrency limits between the serving workers by their demand
        (labelgw.workers.limits); a worker is sent its part when it changed."""
        from labelgw.workers.limits import integer_parts, shares

        workers = sorted((p for p in self.pool.workers.values() if p.state == "ready"), key=lambda p: p.id)
        if not workers:
            return
        for name, service in self.registry.services.items():
            chain = service.middleware
            if chain is None or (chain.spec.ratelimit is None and chain.spec.concurrency is None):
                continue
            fractions = shares([p.demand.get(name, 0.0) for p in workers])
            limit, concurrency = chain.spec.ratelimit, chain.spec.concurrency
            inflight = integer_parts(concurrency.max_inflight, fractions, 1) if concurrency is not None else None
            pending = integer_parts(concurrency.max_pending, fractions) if concurrency is not None else None
            for index, process in enumerate(workers):
                part = (
                    round(limit.rate * fractions[index], 6) if limit is not None else None,
                    round(max(1.0, limit.burst * fractions[index]), 6) if limit is not None else None,
                    inflight[index] if inflight is not None else None,
                    pending[index] if pending is not None else None,
                )
                if process.limits_sent.get(name) != part:
                    process.limits_sent[name] = part
                    process.send(("limits", self.pool._next_seq(), name, *part))

    # Service.

    def privilegedStartService(self) -> None:
        LabelgwService.privilegedStartService(self)
        for held in self.held:
            held.privilegedStartService()

    def startService(self) -> None:
        LabelgwService.startService(self)
        for held in self.held:
            held.startService()
        self._log.info("labelgw supervising {count} worker processes", count=self.pool.count)
        self.pool.start()
        from twisted.internet.task import LoopingCall

        from labelgw.workers.protocol import REPORT_INTERVAL

        self._rebalancer = LoopingCall(self.rebalance_limits)
        self._rebalancer.clock = self.reactor
        self._rebalancer.start(REPORT_INTERVAL, now=False).addErrback(
            lambda failure: self._log.failure("rebalancing the limits", failure)
        )
        if self.settings.access_log_file is not None:
            # Each worker writes the access log file and reopens it on SIGUSR1 (logrotate signals the pidfile's
            # process: this one).
            self.reactor.addSystemEventTrigger("after", "startup", self._forward_sigusr1)

    def _forward_sigusr1(self) -> None:
        try:
            previous = signal.getsignal(signal.SIGUSR1)
        except ValueError:
            return

        def handler(number: int, frame: Any) -> None:
            self.reactor.callFromThread(self._signal_workers, signal.SIGUSR1)
            if callable(previous):
                previous(number, frame)

        try:
            signal.signal(signal.SIGUSR1, handler)
        except ValueError:  # not the main thread
            pass

    def _signal_workers(self, number: int) -> None:
        for process in self.pool.processes():
            process.kill(number)

    def reload_workers(self, why: str) -> Deferred[bool]:
        return self.pool.reload(why)

    def stopService(self) -> Deferred[Any]:
        self.running = False
        rebalancer = getattr(self, "_rebalancer", None)
        if rebalancer is not None and rebalancer.running:
            rebalancer.stop()
        stopping = self.pool.stop()
        # The listening sockets closed now, not once the workers have drained: the workers stop accepting at once,
        # and a socket still held here would keep taking connections into a queue nobody accepts, reset when it
        # finally closes; closed, a new connection is refused at once (a load balancer or client tries elsewhere).
        # A socket a service manager holds too (systemd socket activation) stays open for the next supervisor.
        held, self.held = self.held, []
        closed = DeferredList([h.stopService() for h in held], consumeErrors=True)
        stopping.addCallback(lambda _: closed)
        stopping.addCallback(lambda _: LabelgwService.stopService(self))
        stopping.addErrback(lambda failure: self._log.failure("while stopping the workers", failure))
        return stopping


class Reload:
    """What `SIGHUP` (and `python -m labelgw reload`) does under a supervisor: the config file re-read and applied
    (when there is one), then a new generation of workers, which read the code and settings as they are now."""

    _log = Logger()

    def __init__(self, service: SupervisorService, config: Any = None) -> None:
        self.service = service
        self.config = config

    def reload(self, why: str) -> Deferred[Any]:
        if self.config is not None:
            # The reloader's apply starts the new generation (SupervisorConfigReloader.apply).
            result: Deferred[Any] = self.config.reload(why)
            return result
        return self.service.reload_workers(why).addErrback(
            lambda failure: self._log.failure("reloading the workers", failure)
        )


def install(service: SupervisorService, reactor: Any, path: str | None, read: Callable[[], Settings]) -> Reload:
    """The config file watched (when given) and SIGHUP hooked, for a supervisor (labelgw.cli.reload.install's
    counterpart)."""
    from labelgw.cli.reload import ConfigReloader, SignalHooks

    class SupervisorConfigReloader(ConfigReloader):
        """Listeners are the supervisor's held sockets; every applied change starts a new worker generation."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            ConfigReloader.__init__(self, *args, **kwargs)
            self._factories["http"] = None
            if service.https.tls_factory is not None:
                self._factories["https"] = service.https.tls_factory

        def _apply_listeners(self, scheme: str, old: tuple[str, ...], new: tuple[str, ...], changes: list[str]) -> None:
            if old != new:
                service.hold(scheme, new, changes)

        def _bound(self, scheme: str) -> tuple[str, ...]:
            return tuple(h.description for h in service.held if h.scheme == scheme)

        def apply(self, new: Settings) -> None:
            ConfigReloader.apply(self, new)
            done = service.reload_workers("config file applied")
            done.addErrback(lambda failure: self._log.failure("reloading the workers", failure))

    config = None
    if path:
        from labelgw.tls.certdir import thread_runner

        config = SupervisorConfigReloader(service, path, read, reactor, thread_runner(reactor))
        config.setServiceParent(service)
    trigger = Reload(service, config)
    hooks = SignalHooks(reactor, trigger)  # type: ignore[arg-type]
    reactor.addSystemEventTrigger("after", "startup", hooks.install)
    return trigger
