"""Watch the Docker engine and keep the route sink in step with the containers.

Two layers:

- `labelgw.docker.tracker.ContainerTracker`: the event-handling state machine. Pure (no threads, no reactor, no I/O):
  events and inspect results go in, sink calls and inspect requests come out. Everything that decides *what*
  the sink hears lives there and is tested directly. Its names are importable from here too.
- `DockerWatcher` (this module): a `Service` that does the plumbing. The blocking docker SDK runs in threads only: the event
  stream in a dedicated reader thread (it blocks forever and must never wait on anything else: the engine drops
  events of slow readers), list/inspect in a small `ThreadPool`. Results come back to the reactor thread, which
  is the only thread that touches the tracker and the sink.

Cycle of one connection: subscribe to events first, then list + inspect every labelled container, then hand the
whole truth to `sink.resync`. Events that arrive while the listing runs are applied as they come and merged into
the resync by container id and per-container generation, so nothing is lost and nothing stale wins. Any end of
the stream (docker-py turns a dropped connection into a clean end of iteration) starts a new cycle after a capped
exponential backoff; meanwhile the sink keeps serving the last good routes. The cycle itself (reader thread,
reconnects, stopping) is `labelgw.docker.stream.EventStreamReader`, shared with the swarm watcher; this module
adds the listing, the resync and the inspects.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Protocol

import docker.errors
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from labelgw.docker.stream import DEFAULT_DOCKER_HOST, EventStreamReader
from labelgw.docker.stream import close_quietly as _close_quietly
from labelgw.docker.stream import failure_reason as _failure_reason
from labelgw.docker.tracker import (
    GONE,
    Backoff,
    ContainerTracker,
    InspectResult,
    Listing,
    Observation,
    Outcome,
    ParseFunction,
    RouteSink,
    has_prefix_labels,
    observe,
    own_container_candidates,
    signal_number,
    timestamp_ns,
)

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "EVENT_FILTERS",
    "GONE",
    "Backoff",
    "ContainerTracker",
    "DockerWatcher",
    "Observation",
    "OwnContainer",
    "Outcome",
    "ParseFunction",
    "PoolThreads",
    "RouteSink",
    "Threads",
    "detect_own_container",
    "observe",
    "own_container_candidates",
    "signal_number",
    "timestamp_ns",
]

# Network events carry the container in Actor.Attributes.container: a connect/disconnect changes its address.
EVENT_FILTERS: Mapping[str, list[str]] = {"type": ["container", "network"]}


@dataclass(frozen=True, slots=True)
class OwnContainer:
    """The container labelgw itself runs in, when it does."""

    container_id: str | None
    networks: frozenset[str]
    problem: str = ""




def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def detect_own_container(
    api: Any,
    *,
    read_text: Callable[[str], str] = _read_text,
    hostname: str | None = None,
) -> OwnContainer:
    """Find the container labelgw runs in and its networks. Blocking: call it in a thread.

    Never raises: no container (or any failure) means no networks, and `problem` says why when it failed.
    """
    candidates = own_container_candidates(
        read_text("/proc/self/mountinfo"),
        read_text("/proc/self/cgroup"),
        os.environ.get("HOSTNAME", "") if hostname is None else hostname,
    )
    problem = ""
    for candidate in candidates:
        try:
            info = api.inspect_container(candidate)
        except docker.errors.NotFound:
            continue  # not a container of this engine (or a hostname that only looks like an id)
        except Exception as error:
            problem = f"inspecting {candidate[:12]}: {error}"
            continue
        full_id = str(info.get("Id") or "")
        if not full_id.startswith(candidate):
            continue  # a name that happens to look like an id
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        return OwnContainer(full_id, frozenset(str(name) for name in networks))
    return OwnContainer(None, frozenset(), problem)


class Threads(Protocol):
    """Where blocking work runs. `run` uses a shared pool; `spawn` a thread of its own."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...

    def spawn(self, function: Callable[[], Any], name: str) -> Deferred[Any]: ...


class PoolThreads:
    """A private ThreadPool for list/inspect, plus dedicated daemon threads for long blocking loops."""

    def __init__(self, reactor: Any, *, max_threads: int, name: str = "labelgw-docker") -> None:
        self._reactor = reactor
        self._name = name
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)
        self._running = False

    def start(self) -> None:
        self._pool.start()
        self._running = True

    def stop(self) -> Deferred[None]:
        """Fires when every pool thread has exited (joined in a helper thread, off the reactor)."""
        if not self._running:
            return succeed(None)
        self._running = False
        return self.spawn(self._pool.stop, f"{self._name}-stop")

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self._running:
            return fail(RuntimeError("the docker thread pool is stopped"))
        return deferToThreadPool(self._reactor, self._pool, function, *args, **kwargs)

    def spawn(self, function: Callable[[], Any], name: str) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        reactor = self._reactor

        def body() -> None:
            try:
                result = function()
            except BaseException:
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, result)

        # Daemon: a reader stuck on a hung engine must not keep the process alive at exit.
        threading.Thread(target=body, name=name, daemon=True).start()
        return done


class _Superseded(Exception):
    """The connection this work belonged to is gone; a new cycle redoes it."""


def _root_os_error(error: BaseException) -> OSError | None:
    """The OSError with an errno under the wrappers (requests, urllib3, docker-py), if any."""
    seen: set[int] = set()
    queue: list[BaseException] = [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        # urllib3's MaxRetryError keeps the cause in .reason; ProtocolError and requests' errors in args.
        for inner in (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args):
            if isinstance(inner, BaseException):
                queue.append(inner)
    return None


def _unreachable_reason(failure: Failure) -> str:
    """Why the engine could not be reached, short: "Connection refused", not urllib3's whole message."""
    root = _root_os_error(failure.value)
    if root is None:
        return _failure_reason(failure)
    return root.strerror or os.strerror(root.errno or 0)


def socket_path(engine_url: str) -> str | None:
    """The file of a unix:// engine URL; None for any other kind."""
    if not engine_url.startswith("unix://"):
        return None
    path = engine_url[len("unix://"):]
    return path if path.startswith("/") else "/" + path


def permission_hint(engine_url: str, stat: Callable[[str], Any] = os.stat) -> str:
    """What to do about EACCES on the engine's socket: add the socket's group (its gid, read from the file)."""
    path = socket_path(engine_url)
    if path is None:
        return "check the permissions of the engine's endpoint"
    try:
        gid = stat(path).st_gid
    except OSError:
        return f"give labelgw's user access to {path}"
    return (
        f"add group {gid} (the group of {path}) to labelgw's user: docker run --group-add {gid}, "
        f"or group_add: [\"{gid}\"] in Compose"
    )


def _tagged(result: InspectResult, container_id: str, generation: int) -> tuple[str, tuple[int, InspectResult]]:
    return container_id, (generation, result)


class DockerWatcher(EventStreamReader, Service):
    """Keeps `sink` in step with the engine's containers. See the module docstring for the cycle.

    Status for views: `connected` (the event stream is up) and `last_resync` (reactor time of the last
    successful full resync, None before the first).

    Backoff: the first reconnect waits `initial_backoff` (0.1 s), each further failure doubles it up to
    `max_backoff` (5 s); a successful resync resets it. Retries never stop.
    """

    _log = Logger()
    _event_filters = EVENT_FILTERS
    _reader_thread_prefix = "labelgw-docker-events"
    _events_noun = "docker"
    _late_wording = "{what} did not finish within {timeout}s ({reason}); not waiting for it"
    # Events after a stop still reach the tracker (its inspects are answered "failed" once stopping).
    _drop_events_when_stopping = False

    def __init__(
        self,
        reactor: Any,
        sink: RouteSink,
        client_factory: Callable[[], docker.APIClient] | None = None,
        *,
        docker_host: str | None = None,
        parse: ParseFunction | None = None,
        prefix: str = "labelgw",
        pinned_env: str | None = None,
        own_networks: frozenset[str] | None = None,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        resync_interval: float = 60.0,
        inspect_parallelism: int = 3,
        api_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        threads_factory: Callable[[], Threads] | None = None,
    ) -> None:
        """Arguments, beyond the obvious:

        - `reactor`: callLater/seconds and callFromThread (IReactorTime + IReactorThreads).
        - `client_factory`: makes a blocking docker.APIClient; called in threads only. Default: a client for
          `docker_host`, else $DOCKER_HOST, else the local socket.
        - `parse`: inspect dict -> Outcome; default `labelgw.core.labels.parse_container`, imported lazily.
        - `own_networks`: the gateway's networks; None discovers them (the container we run in, if any).
        - `inspect_parallelism`: inspects a resync runs at once; the pool has two more threads so that
          event inspects do not queue behind a large listing.
        - `stop_timeout`: stopService waits at most this long for each of the reader thread and the pool.
        """
        super().__init__()
        self._init_event_stream(
            reactor,
            docker_host=docker_host,
            client_factory=client_factory,
            api_timeout=api_timeout,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            stop_timeout=stop_timeout,
            threads_factory=threads_factory or (lambda: PoolThreads(reactor, max_threads=inspect_parallelism + 2)),
        )
        self._sink = sink
        self._parse = parse
        self._prefix = prefix
        self._pinned_env = pinned_env
        self._fixed_own_networks = own_networks
        self._own_networks: frozenset[str] = own_networks or frozenset()
        self._resync_interval = resync_interval
        self._inspect_slots = DeferredSemaphore(inspect_parallelism)
        self._tracker = ContainerTracker(
            sink,
            self._request_inspect,
            prefix=prefix,
            on_own_networks_changed=lambda: self._start_resync("own networks changed", queue=True),
        )
        # The reason last logged for an unreachable engine (None: reached since).
        self._unreachable: str | None = None
        self._subscribed_cycle = 0
        self._api: Any = None
        self._resync_cycle: int | None = None
        self._resync_again = False
        self._resync_loop: LoopingCall | None = None

    # Service.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._parse_function()  # import on the reactor thread, once, before any pool thread needs it
        self._start_threads_and_stream()
        self._resync_loop = self._start_loop(
            self._periodic_resync, self._resync_interval, now=False, stopped="periodic docker resync stopped"
        )

    def stopService(self) -> Deferred[None]:
        """Fires once the reader thread and the pool threads are done (each waited for at most stop_timeout)."""
        super().stopService()
        self._stopping = True
        if self._resync_loop is not None and self._resync_loop.running:
            self._resync_loop.stop()
        return self._stop_stream_and_threads()

    def _parse_function(self) -> ParseFunction:
        if self._parse is None:
            from labelgw.core.labels import parse_container

            self._parse = parse_container
        return self._parse

    # Connection cycle (EventStreamReader's hooks).

    def _open_reader_clients(self) -> tuple[Any, tuple[Any, ...]]:
        """Reader thread: the stream's client, and the API client the reactor side takes over with the stream."""
        api = self._client_factory()
        try:
            stream_client = self._client_factory()  # its own client: closing the stream leaves inspects alone
        except BaseException:
            _close_quietly(api)
            raise
        return stream_client, (api,)

    def _adopt_subscription(self, cycle: int, *handed: Any) -> None:
        (self._api,) = handed
        self._subscribed_cycle = cycle
        self._unreachable = None

    def _catch_up(self) -> None:
        self._start_resync("connected")

    def _handle_event(self, event: Mapping[str, Any]) -> None:
        self._tracker.handle_event(event)

    def _stream_lost(self) -> None:
        api, self._api = self._api, None
        if api is not None:
            self._dispose(api)
        self._tracker.abandon_listing()

    def _log_reconnect(self, result: object, cycle: int, delay: float) -> None:
        was_subscribed = self._subscribed_cycle == cycle
        if isinstance(result, Failure) and not was_subscribed:
            reason = _unreachable_reason(result)
            root = _root_os_error(result.value)
            if root is not None and root.errno == errno.EACCES:
                reason = f"{reason}; {permission_hint(self.engine_url)}"
            # Once per cause: the same line every few seconds while the engine stays away says nothing new.
            emit = self._log.debug if reason == self._unreachable else self._log.warn
            self._unreachable = reason
            emit(
                "docker engine unreachable at {engine}: {reason}; retrying in {delay}s",
                engine=self.engine_url,
                reason=reason,
                delay=round(delay, 3),
            )
        elif isinstance(result, Failure):
            self._log.warn(
                "docker event stream from {engine} failed: {reason}; reconnecting in {delay}s",
                engine=self.engine_url,
                reason=_failure_reason(result),
                delay=round(delay, 3),
            )
        else:
            self._log.warn(
                "docker event stream from {engine} ended; reconnecting in {delay}s",
                engine=self.engine_url,
                delay=round(delay, 3),
            )

    def _dispose(self, api: Any) -> None:
        threads = self._threads
        if threads is None or self._stopping:
            _close_quietly(api)
            return
        threads.run(_close_quietly, api).addErrback(lambda failure: None)

    # Resync.

    def _periodic_resync(self) -> None:
        try:
            self._start_resync("periodic")
        except Exception:
            self._log.failure("periodic docker resync failed to start")

    def _start_resync(self, reason: str, *, queue: bool = False) -> None:
        if not self.connected or self._api is None or self._stopping or self._threads is None:
            return
        if self._resync_cycle == self._cycle:
            self._resync_again = self._resync_again or queue
            return
        cycle = self._cycle
        api = self._api
        threads = self._threads
        self._resync_cycle = cycle
        self._resync_again = False
        listing = self._tracker.begin_listing()
        started = self._reactor.seconds()
        listed = threads.run(self._list_in_thread, api)
        listed.addCallback(self._inspect_listed, api, listing, cycle)
        listed.addCallback(self._finish_resync, listing, cycle, started, reason)
        listed.addErrback(self._resync_failed, listing, cycle)
        listed.addBoth(self._resync_done, cycle)
        listed.addErrback(lambda failure: self._log.failure("docker resync bookkeeping failed", failure))

    def _list_in_thread(self, api: Any) -> tuple[OwnContainer | None, list[Mapping[str, Any]]]:
        own = detect_own_container(api) if self._fixed_own_networks is None else None
        return own, list(api.containers(all=True))

    def _inspect_listed(
        self,
        listed: tuple[OwnContainer | None, list[Mapping[str, Any]]],
        api: Any,
        listing: Listing,
        cycle: int,
    ) -> Deferred[list[tuple[str, tuple[int, InspectResult]]]]:
        if cycle != self._cycle or not self.connected or self._threads is None:
            raise _Superseded()
        own, summaries = listed
        if own is not None:
            self._adopt_own_container(own)
        threads = self._threads
        parse = self._parse_function()
        own_networks = self._own_networks
        pending = []
        for summary in summaries:
            container_id = str(summary.get("Id") or "")
            if not container_id:
                continue
            if not has_prefix_labels(summary.get("Labels"), self._prefix):
                self._tracker.listed_unlabelled(listing, container_id)
                continue
            generation = self._tracker.listed_labelled(listing, container_id)
            inspecting = self._inspect_slots.run(
                threads.run, self._observe_in_thread, api, container_id, parse, own_networks
            )
            pending.append(inspecting.addCallback(_tagged, container_id, generation))
        return gatherResults(pending, consumeErrors=True)

    def _adopt_own_container(self, own: OwnContainer) -> None:
        if own.problem:
            self._log.warn("could not find labelgw's own container: {problem}", problem=own.problem)
        if own.networks != self._own_networks or own.container_id != self._tracker.own_container_id:
            self._log.info(
                "labelgw runs in container {container} on networks {networks}",
                container=(own.container_id or "none")[:12],
                networks=sorted(own.networks),
            )
        self._tracker.own_container_id = own.container_id
        self._own_networks = own.networks

    def _finish_resync(
        self,
        pairs: list[tuple[str, tuple[int, InspectResult]]],
        listing: Listing,
        cycle: int,
        started: float,
        reason: str,
    ) -> None:
        if cycle != self._cycle or not self.connected:
            # The stream ended meanwhile: events may be lost after this listing; the next cycle redoes it.
            # (Delivering it would also reset the backoff for an engine whose stream fails at once.)
            raise _Superseded()
        summary = self._tracker.finish_listing(listing, dict(pairs))
        if summary is None:
            return
        now = self._reactor.seconds()
        self.last_resync = now
        self.resyncs += 1
        self._backoff.reset()
        # Every few seconds when nothing changed: only worth a line at debug level.
        emit = self._log.debug if reason == "periodic" and not summary.changed else self._log.info
        emit(
            "docker resync ({reason}): {containers} containers, {routed} routed, {rejected} rejected, "
            "{reinspected} changed meanwhile, in {elapsed_ms} ms",
            reason=reason,
            containers=summary.containers,
            routed=summary.routed,
            rejected=summary.rejected,
            reinspected=summary.reinspected,
            elapsed_ms=round((now - started) * 1000, 1),
        )

    def _resync_failed(self, failure: Failure, listing: Listing, cycle: int) -> None:
        self._tracker.abandon_listing(listing)
        if failure.check(_Superseded) or cycle != self._cycle or self._stopping:
            return
        self._log.warn(
            "docker resync failed: {reason}; reconnecting", reason=_failure_reason(failure)
        )
        # Start over with a new connection (and the backoff): the engine is in trouble.
        self._close_stream()

    def _resync_done(self, _: object, cycle: int) -> None:
        if self._resync_cycle != cycle:
            return
        self._resync_cycle = None
        if self._resync_again and cycle == self._cycle:
            self._resync_again = False
            self._start_resync("changes during the previous resync")

    # Inspects for events.

    def _observe_in_thread(
        self, api: Any, container_id: str, parse: ParseFunction, own_networks: frozenset[str]
    ) -> InspectResult:
        try:
            inspect = api.inspect_container(container_id)
        except docker.errors.NotFound:
            return GONE
        return observe(
            inspect, parse, prefix=self._prefix, pinned_env=self._pinned_env, own_networks=own_networks
        )

    def _request_inspect(self, container_id: str, generation: int) -> None:
        api, cycle, threads = self._api, self._cycle, self._threads
        if api is None or threads is None or self._stopping:
            self._tracker.inspect_failed(container_id)  # the resync of the next connection covers it
            return
        inspecting = threads.run(
            self._observe_in_thread, api, container_id, self._parse_function(), self._own_networks
        )
        inspecting.addCallbacks(
            partial(self._tracker.inspected, container_id, generation),
            self._event_inspect_failed,
            errbackArgs=(container_id, cycle),
        )
        inspecting.addErrback(lambda failure: self._log.failure("applying an inspect failed", failure))

    def _event_inspect_failed(self, failure: Failure, container_id: str, cycle: int) -> None:
        self._tracker.inspect_failed(container_id)
        if cycle != self._cycle or self._stopping:
            return
        self._log.warn(
            "inspecting container {container} failed: {reason}; reconnecting",
            container=container_id[:12],
            reason=_failure_reason(failure),
        )
        self._close_stream()
