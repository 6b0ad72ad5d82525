# -*- test-case-name: tests.test_workers_protocol -*-
"""A worker process of `twistd labelgw --workers N`: `python -m labelgw.workers`, spawned by the supervisor
(labelgw.workers.supervisor), never by hand.

It parses the same labelgw options as the supervisor (so a reload starts workers with the settings of the config
file as it is then, and the code installed then), without a Docker watcher, an admin listener or active health
checks: the supervisor pushes the container outcomes, health states and ejections over fd 0 (a pipe), and the worker
keeps its own registry from them, so that serving a request never waits on the supervisor. It accepts on the
listening sockets the supervisor holds (inherited descriptors, adopted once the first state is applied) and reports
its counters over fd 3.

The rate and concurrency limits of the middleware labels are split: each worker starts with 1/N of each, and the
supervisor moves the parts towards the workers that get the service's traffic (see the README's "Worker processes
and reloads" section)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from labelgw.cli.app import LabelgwService
from labelgw.cli.config import Settings
from labelgw.core.backends import Backend, ServicePool
from labelgw.core.model import ContainerSpec, Outcome
from labelgw.workers.protocol import REPORT_INTERVAL, FrameDecoder, Message, ProtocolError, encode

if TYPE_CHECKING:
    from labelgw.workers.certs import WorkerAcme

# (scheme, endpoint description, descriptor in the worker)
ListenerFD = tuple[str, str, int]


def scale_outcome(outcome: Outcome, share: float) -> Outcome:
    """The spec as one worker of N enforces it (`share` = 1/N): the rate limit's rate and burst and the concurrency
    limit's in-flight and pending counts split evenly (at least one token of burst and one request in flight, so a
    worker never refuses everything)."""
    if share >= 1.0 or not isinstance(outcome, ContainerSpec) or outcome.middleware is None:
        return outcome
    middleware = outcome.middleware
    changes: dict[str, Any] = {}
    if middleware.ratelimit is not None:
        limit = middleware.ratelimit
        changes["ratelimit"] = dataclasses.replace(
            limit, rate=limit.rate * share, burst=max(1.0, limit.burst * share)
        )
    if middleware.concurrency is not None:
        limit_c = middleware.concurrency
        changes["concurrency"] = dataclasses.replace(
            limit_c,
            max_inflight=max(1, math.ceil(limit_c.max_inflight * share)),
            max_pending=math.ceil(limit_c.max_pending * share),
        )
    if not changes:
        return outcome
    return dataclasses.replace(outcome, middleware=dataclasses.replace(middleware, **changes))


def apply_ejection(app: Any, pool: ServicePool, backend: Backend, seconds: float) -> bool:
    """Eject `backend` for `seconds` as if this process's outlier detector had (it re-admits it when due); False
    when it is ejected already."""
    if backend.ejected_until is not None or seconds <= 0:
        return False
    detector = app.outlier
    clock = app.reactor
    backend.ejections += 1
    backend.ejected_until = clock.seconds() + seconds
    # The detector's own re-admission timer: cancelled with its others when it stops.
    detector._timers[backend] = clock.callLater(seconds, detector._readmit, pool, backend)
    app.registry.backend_state_changed(pool, backend)
    return True


# Seconds a connection accepted just before a worker stopped listening has to send its first request.
FIRST_REQUEST_GRACE = 1.0


# Seconds between two looks at the connections an old worker's drain waits on for their TLS handshake.
HANDSHAKE_POLL = 0.1


def handshake_pending(connection: Any) -> bool:
    """A client connection whose TLS handshake is still in progress (both TLS engines: labelgw.tls.stdtls and
    Twisted's, whose protocols connect what is behind them when TCP connects, before the handshake)."""
    transport = getattr(connection, "transport", None)
    for name in ("_handshake_done", "_handshakeDone"):
        done = getattr(transport, name, None)
        if done is not None:
            return not done
    return False


def waiting_for_first_request(connection: Any) -> bool:
    """An HTTP/1.1 client connection that has not sent (the whole head of) its first request yet."""
    return getattr(connection, "_requests", None) == 0 and getattr(connection, "exchange", True) is None


def find_backend(registry: Any, service: str, key: str) -> tuple[ServicePool, Backend] | None:
    pool = registry.services.get(service)
    backend = pool.backends.get(key) if pool is not None else None
    if pool is None or backend is None:
        return None
    return pool, backend


class AdoptedListener(Service):
    """A listening socket inherited from the supervisor, adopted by this process's reactor.

    Stopping it closes this process's descriptor only: the socket and its accept queue live on in the supervisor
    and the other workers, so no connection waiting in the queue is lost."""

    _log = Logger()

    def __init__(self, reactor: Any, scheme: str, description: str, fd: int, factory: Any) -> None:
        self.reactor = reactor
        self.scheme = scheme
        self.description = description
        self.fd = fd
        self.factory = factory
        self.port: Any = None

    def listen(self) -> None:
        sock = socket.socket(fileno=self.fd)
        family = sock.family
        sock.detach()
        from labelgw.cli.quietlog import PORT_LINES

        # adoptStreamPort duplicates the descriptor; ours is closed so that one copy remains per process.
        PORT_LINES.opening += 1  # Twisted's "starting on" line: ours says it with the URL
        try:
            self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        finally:
            PORT_LINES.opening -= 1
        os.close(self.fd)

    @property
    def url(self) -> str:
        address = self.port.getHost() if self.port is not None else None
        host = getattr(address, "host", None)
        if host is None:
            return f"{self.scheme}+unix://{getattr(address, 'name', '?')}"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{address.port}"  # type: ignore[union-attr]

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped: Deferred[None] = port.stopListening() or succeed(None)
        return stopped


class WorkerService(LabelgwService):
    """LabelgwService without a watcher, an admin listener or active health checks, listening on inherited
    sockets once the supervisor's state is applied."""

    _log = Logger()

    def __init__(
        self, settings: Settings, reactor: Any, listeners: Sequence[ListenerFD], share: float = 1.0,
        worker_id: int = 1,
    ) -> None:
        # The supervisor's alone: the route sources (Docker or Swarm watcher, the registration API and its
        # registry, whose changes it pushes here) and the admin listener.
        from labelgw.registration.settings import RegistrySettings

        settings = dataclasses.replace(settings, docker=False, admin=None, registration=RegistrySettings())
        # ACME certificates and challenge answers come from the supervisor, which alone orders (labelgw.workers.certs).
        self.acme: WorkerAcme | None = None
        if settings.acme is not None:
            from labelgw.workers.certs import WorkerAcme

            self.acme = self.acme_source = WorkerAcme(reactor, self._acme_wildcard_for)
        LabelgwService.__init__(self, settings, reactor, serve=False)
        self.worker_id = worker_id
        self.share = share
        # Health is checked once, by the supervisor, which pushes each change: no probes here.
        self.health.disownServiceParent()
        # Canary analysis is the supervisor's, on the whole gateway's traffic: this worker counts and follows.
        from labelgw.workers.canary import WorkerCanary

        self.canary = self.gateway.canary = WorkerCanary(settings.canary_window)
        self._install_scaling()
        self._install_drain()
        from labelgw.http.server import ProxyFactory

        factories = {"http": ProxyFactory(self.gateway, b"http"), "https": self.https.tls_factory}
        self.adopted = [
            AdoptedListener(reactor, scheme, description, fd, factories[scheme])
            for scheme, description, fd in listeners
            if factories.get(scheme) is not None
        ]
        self.accepting = False
        # Told of an ejection this worker decided (the supervisor passes it on to the others).
        self.on_ejected: Callable[[ServicePool, Backend, float], None] = lambda pool, backend, seconds: None
        # Backend key -> the end of the ejection this worker knows of (told to the supervisor, or told by it).
        self._ejections_seen: dict[str, float] = {}
        # Service -> its request count at the last report (limit_demand).
        self._demand_seen: dict[str, int] = {}
        self._reporter: Any = None
        self.metrics_page: Callable[[], bytes] | None = None
        if settings.metrics:
            from labelgw.control import metrics

            collector = metrics.GatewayCollector(
                self.gateway, self.registry, None, None, self.https.tls_factory, self.https.selector
            )
            registry = metrics.metrics_registry([collector], process=False)
            self.metrics_page = lambda: metrics.render(registry)[0]

    def _acme_wildcard_for(self, name: str) -> str | None:
        matched = self.gateway.table.matched_host(name)
        return matched if matched is not None and matched.startswith("*.") else None

    def _install_scaling(self) -> None:
        """Every outcome reaches the registry with the limits split (static services included)."""
        registry = self.registry
        apply, resync = registry.apply, registry.resync
        share = self.share

        def scaled_apply(container_id: str, outcome: Outcome) -> None:
            apply(container_id, scale_outcome(outcome, share))

        def scaled_resync(outcomes: Any) -> None:
            resync({key: scale_outcome(value, share) for key, value in outcomes.items()})

        registry.apply = scaled_apply  # type: ignore[method-assign]
        registry.resync = scaled_resync  # type: ignore[method-assign]

    def _install_drain(self) -> None:
        """The gateway's drain, except for the connections that have not sent their first request yet: a reload's old
        worker may have accepted one just before it stopped listening, its request still on the way. Such a
        connection gets FIRST_REQUEST_GRACE seconds to send it; it is answered (with Connection: close) and closed.
        One still in its TLS handshake then is left to finish it (up to the drain grace, when the gateway's drain
        aborts whatever is left) and gets FIRST_REQUEST_GRACE from there: closing it would cut the handshake."""
        gateway = self.gateway
        clock = self.reactor
        original = gateway.drain

        def drain(grace: float) -> Deferred[None]:
            fresh = {c for c in gateway.connections if waiting_for_first_request(c)}
            gateway.connections -= fresh
            try:
                done: Deferred[None] = original(grace)
            finally:
                gateway.connections |= fresh
            if not fresh:
                return done
            for connection in fresh:
                connection.draining = True  # type: ignore[attr-defined]  # its response says Connection: close

            def late(group: set[Any]) -> None:
                shaking = set()
                for connection in group:
                    if connection not in gateway.connections:
                        continue
                    if handshake_pending(connection):
                        shaking.add(connection)
                    else:
                        connection.drain()  # still nothing: closed; a request in progress: closed after it
                if shaking:
                    clock.callLater(HANDSHAKE_POLL, handshakes, shaking)

            def handshakes(group: set[Any]) -> None:
                live = {connection for connection in group if connection in gateway.connections}
                done = {connection for connection in live if not handshake_pending(connection)}
                if done:
                    clock.callLater(FIRST_REQUEST_GRACE, late, done)
                if live - done and gateway.connections:
                    clock.callLater(HANDSHAKE_POLL, handshakes, live - done)

            clock.callLater(min(FIRST_REQUEST_GRACE, grace), late, fresh)
            if not done.called:
                return done  # the gateway's waiter covers them (and aborts them at the grace)
            closed: Deferred[None] = Deferred()
            gateway._drained.append(closed)

            def give_up() -> None:
                for connection in list(gateway.connections):
                    connection.abort()

            timer = clock.callLater(grace, give_up)
            closed.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
            return closed

        gateway.drain = drain  # type: ignore[method-assign]

    def start_accepting(self) -> None:
        if self.accepting or not self.running:
            return
        self.accepting = True
        for listener in self.adopted:
            listener.listen()
            listener.startService()
            self.listeners.append(listener)  # type: ignore[arg-type]
            if listener.scheme == "https":
                self.https.listeners.append(listener)  # type: ignore[arg-type]
            self._log.info("worker {worker} accepting on {url}", worker=self.worker_id, url=listener.url)

    def _backend_state_changed(self, pool: ServicePool, backend: Backend) -> None:
        LabelgwService._backend_state_changed(self, pool, backend)
        until = backend.ejected_until
        # An ejection this worker's detector just decided (the detector sets ejected_until, then calls this).
        if until is not None and self._ejections_seen.get(backend.key) != until:
            self._ejections_seen[backend.key] = until
            self.on_ejected(pool, backend, until - self.reactor.seconds())
        elif until is None:
            self._ejections_seen.pop(backend.key, None)

    def remote_ejection(self, service: str, key: str, seconds: float) -> None:
        found = find_backend(self.registry, service, key)
        if found is None:
            return
        if apply_ejection(self, found[0], found[1], seconds):
            self._ejections_seen[key] = found[1].ejected_until  # type: ignore[assignment]

    def set_health(self, service: str, key: str, state: str | None) -> None:
        found = find_backend(self.registry, service, key)
        if found is None or found[1].spec.health_check is None:
            return
        pool, backend = found
        if backend.health_state != state:
            backend.health_state = state
            self.registry.backend_state_changed(pool, backend)

    def report(self) -> Message:
        backends = {
            backend.key: (
                backend.in_flight, backend.requests, backend.errors, backend.ejections, backend.consecutive_failures
            )
            for pool in self.registry.services.values()
            for backend in pool.backends.values()
        }
        exposition = self.metrics_page() if self.metrics_page is not None else b""
        return ("report", exposition, backends, self.limit_demand())

    def limit_demand(self) -> dict[str, int]:
        """Per limited service, the requests it saw since the last report (sent to backends, or refused by its rate
        or concurrency limit): what the supervisor divides the service's limits by."""
        demand: dict[str, int] = {}
        seen = self._demand_seen
        for pool in self.registry.services.values():
            chain = pool.middleware
            if chain is None or (chain.ratelimit is None and chain.concurrency is None):
                continue
            total = sum(backend.requests for backend in pool.backends.values())
            total += chain.ratelimit.limited if chain.ratelimit is not None else 0
            total += chain.concurrency.rejected if chain.concurrency is not None else 0
            demand[pool.name] = max(0, total - seen.get(pool.name, 0))
            seen[pool.name] = total
        return demand

    def set_limits(self, service: str, rate: float | None, burst: float | None, inflight: int | None,
                   pending: int | None) -> None:
        """This worker's part of a service's limits, as the supervisor rebalanced them."""
        pool = self.registry.services.get(service)
        chain = pool.middleware if pool is not None else None
        if chain is None:
            return
        limiter = chain.ratelimit
        if limiter is not None and rate is not None and burst is not None and rate > 0:
            limiter.rate = rate
            limiter.burst = burst
            limiter.idle_expiry = burst / rate
            if hasattr(limiter, "_sweep_at"):
                # Its next look for expired buckets was timed with the old expiry: look at the next request.
                limiter._sweep_at = 0.0
        concurrency = chain.concurrency
        if concurrency is not None and inflight is not None and pending is not None:
            raised = inflight > concurrency.limit
            concurrency.limit = inflight
            concurrency.max_pending = pending
            if raised:
                # Waiters the new slots admit now (release admits while there is room).
                concurrency.active += 1
                concurrency.release()

    def stopService(self) -> Deferred[Any]:
        self.accepting = False
        return LabelgwService.stopService(self)


class SupervisorLink(Protocol):
    """This worker's end of the channel: messages from the supervisor applied to the worker's registry, reports
    and acknowledgements sent back. Losing the supervisor (its end of the pipe closed) stops the worker."""

    _log = Logger()

    def __init__(self, app: WorkerService, clock: Any, stop: Callable[[str], Any]) -> None:
        self.app = app
        self.clock = clock
        self.stop = stop
        self.decoder = FrameDecoder()
        self.state_applied = False
        # When the bytes being handled were read from the pipe (host-wide monotonic clock).
        self._received = 0.0
        self._reporter: LoopingCall | None = None
        self._windows: LoopingCall | None = None
        # The supervisor reads canary window reports ("windows_wanted" after the state).
        self.windows_wanted = False
        app.on_ejected = self._ejected
        if app.acme is not None:
            app.acme.send = self.send  # on-demand names (labelgw.workers.certs)

    def connectionMade(self) -> None:
        reporter = self._reporter = LoopingCall(self.send_report)
        reporter.clock = self.clock
        reporter.start(REPORT_INTERVAL, now=False).addErrback(
            lambda failure: self._log.failure("reporting to the supervisor", failure)
        )
        from labelgw.workers.canary import CANARY_INTERVAL

        windows = self._windows = LoopingCall(self.send_windows)
        windows.clock = self.clock
        windows.start(CANARY_INTERVAL, now=False).addErrback(
            lambda failure: self._log.failure("reporting the canary windows to the supervisor", failure)
        )

    def send_windows(self) -> None:
        """What ended per (service, version) since the last time, for the supervisor's canary analysis (once it
        said it reads them: a supervisor of older code, which a reload keeps, would log each as unknown)."""
        deltas = self.app.canary.take()
        if deltas and self.windows_wanted:
            self.send(("windows", deltas))

    def send(self, message: Message) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def ack(self, seq: int) -> None:
        """Change `seq` applied; when, on the host-wide monotonic clock (the supervisor's push latency is measured
        to this moment, not to when it reads the acknowledgement), and when it was read from the pipe."""
        self.send(("ack", seq, time.monotonic(), self._received))

    def send_report(self) -> None:
        self.send(self.app.report())

    def dataReceived(self, data: bytes) -> None:
        self._received = time.monotonic()
        try:
            messages = self.decoder.feed(data)
        except (ProtocolError, Exception) as error:
            self._log.error("bad message from the supervisor: {error}", error=repr(error))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for message in messages:
            try:
                self.handle(message)
            except Exception:
                self._log.failure("applying {kind} from the supervisor", kind=message[0])

    def handle(self, message: Message) -> None:
        kind = message[0]
        app = self.app
        registry = app.registry
        if kind == "op":
            _, seq, name, args = message
            if name in ("apply", "mark_down", "remove", "resync"):
                getattr(registry, name)(*args)
            self.ack(seq)
        elif kind == "health":
            _, seq, service, key, state = message
            app.set_health(service, key, state)
            self.ack(seq)
        elif kind == "limits":
            _, seq, service, rate, burst, inflight, pending = message
            app.set_limits(service, rate, burst, inflight, pending)
            self.ack(seq)
        elif kind == "eject":
            _, seq, service, key, seconds = message
            app.remote_ejection(service, key, seconds)
            self.ack(seq)
        elif kind == "state":
            _, seq, specs, health, ejections = message[:5]
            for container_id, outcome in specs:
                registry.apply(container_id, outcome)
            for service, key, state in health:
                app.set_health(service, key, state)
            for service, key, seconds in ejections:
                app.remote_ejection(service, key, seconds)
            self.ack(seq)
            if not self.state_applied:
                self.state_applied = True
                app.start_accepting()
                self.send(("ready", os.getpid()))
        elif kind.startswith("acme-"):
            # Acknowledged even without ACME here (a config file changed since the supervisor started, which takes a
            # restart): the supervisor does not wait for this worker in vain.
            if app.acme is not None:
                app.acme.receive(message)
            self.ack(message[1])
        elif kind == "windows_wanted":
            self.windows_wanted = True
            self.ack(message[1])
        elif kind == "canary":
            # A cut the supervisor decided on the gateway's traffic (reason), or lifted (None).
            _, seq, service, version, reason = message
            pool = registry.services.get(service)
            if pool is not None:
                app.canary.apply(pool, version, reason)
            self.ack(seq)
        elif kind == "stop":
            self.stop("the supervisor asked")
        else:
            self._log.warn("unknown message {kind} from the supervisor", kind=kind)

    def _ejected(self, pool: ServicePool, backend: Backend, seconds: float) -> None:
        self.send(("ejected", pool.name, backend.key, seconds))

    def connectionLost(self, reason: Any = None) -> None:
        for loop in (self._reporter, self._windows):
            if loop is not None and loop.running:
                loop.stop()
        self.stop("the supervisor is gone")


# Info lines a worker leaves to the supervisor, which makes the same changes (routes, backends joining).
_QUIET = "labelgw.core.registry"


def _log_observer(worker_id: int) -> Any:
    """twistd's text format on standard output, each line's system naming the worker."""
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, textFileLogObserver

    text = textFileLogObserver(sys.stdout)
    prefix = f"worker{worker_id}"

    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level < LogLevel.warn and event.get("log_namespace", "").startswith(_QUIET):
            return  # the supervisor logs the same change once
        if "log_system" not in event:
            level = event.get("log_level")
            event["log_system"] = f"{prefix} {event.get('log_namespace', '-')}#{level.name if level else '-'}"
        text(event)

    predicates = [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    return FilteringLogObserver(observe, predicates)  # type: ignore[arg-type]


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m labelgw.workers")
    parser.add_argument("--id", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--share", type=float, default=1.0)
    parser.add_argument("--listeners", default="[]", help="JSON list of [scheme, endpoint, fd]")
    parser.add_argument("labelgw", nargs=argparse.REMAINDER, help="-- then the options of twistd labelgw")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_arguments(argv)
    labelgw_argv = list(args.labelgw)
    if labelgw_argv[:1] == ["--"]:
        labelgw_argv = labelgw_argv[1:]
    from twisted.logger import globalLogBeginner

    from labelgw.cli import quietlog, tap

    globalLogBeginner.beginLoggingTo([_log_observer(args.id)], redirectStandardIO=False)
    quietlog.install_quiet_log()
    reactor = tap.default_reactor()
    quietlog.enable()
    options = tap.Options()
    try:
        options.parseOptions(labelgw_argv)
    except Exception as error:  # a usage error: the supervisor logs the exit code, the line says why
        print(f"labelgw worker {args.id}: {error}", file=sys.stderr)
        return 2
    listeners = [tuple(item) for item in json.loads(args.listeners)]
    app = WorkerService(options.settings, reactor, listeners, args.share, args.id)  # type: ignore[arg-type]
    stopping: list[str] = []

    def stop(why: str) -> None:
        if stopping:
            return
        stopping.append(why)
        app._log.info("worker {worker} stopping: {why}", worker=args.id, why=why)
        if reactor.running:
            reactor.stop()

    from twisted.internet._posixstdio import StandardIO  # the POSIX one takes the descriptors to use

    link = SupervisorLink(app, reactor, stop)
    def ignore_terminal_signals() -> None:
        # Terminal signals go to the whole process group: the supervisor decides when workers stop (after the
        # reactor installed its own handlers, which this replaces for SIGINT; SIGTERM still stops gracefully).
        for number in (signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN)

    reactor.addSystemEventTrigger("after", "startup", ignore_terminal_signals)
    app.privilegedStartService()
    app.startService()
    StandardIO(link, stdin=0, stdout=3, reactor=reactor)
    def shut_down() -> Deferred[Any]:
        stopping = app.stopService()

        def last_report(_: Any) -> Deferred[None]:
            # The counters after the drain, so that the supervisor keeps all this worker counted; a moment for the
            # pipe to take it before the reactor stops; the canary windows' last delta too.
            link.send_windows()
            link.send_report()
            from twisted.internet.task import deferLater

            return deferLater(reactor, 0.1, lambda: None)

        stopping.addCallback(last_report)
        stopping.addErrback(lambda failure: app._log.failure("stopping worker {worker}", failure, worker=args.id))
        return stopping

    reactor.addSystemEventTrigger("before", "shutdown", shut_down)
    reactor.run(installSignalHandlers=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
