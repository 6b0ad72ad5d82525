"""The engine's event stream, one connection cycle after another: shared by both Docker watchers.

`EventStreamReader` is a mixin for a `Service` that watches the engine (`DockerWatcher` for containers,
`SwarmWatcher` for `--swarm`). It owns the cycle of one connection:

- `_connect` spawns a reader thread of its own (it blocks forever on the stream and must wait on nothing else:
  the engine drops events of slow readers);
- the reader thread subscribes with the class's `_event_filters` and a short replay, hands the stream over to the
  reactor (`_on_subscribed`), then passes each event to the reactor the moment it arrives (`_on_event`);
- any end of the reader (docker-py turns a dropped connection into a clean end of iteration) is `_reader_ended`:
  a reconnect after the watcher's capped backoff, unless the service is stopping;
- `_start_threads_and_stream` (from `startService`) starts the watcher's threads and the first cycle;
  `_stop_stream_and_threads` (from `stopService`) cancels a pending reconnect, closes the stream from the reactor
  side, waits for the reader thread, then stops the pool (each wait bounded by `_stop_timeout`).

Only the reactor thread touches the state; the reader thread calls `reactor.callFromThread` and nothing else.
What differs between the watchers is in the hooks (`_open_reader_clients`, `_adopt_subscription`, `_catch_up`,
`_handle_event`, `_stream_lost`, `_log_reconnect`) and the class attributes that name things.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.docker.tracker import Backoff

if TYPE_CHECKING:
    from labelgw.docker.watcher import Threads

__all__ = ["DEFAULT_DOCKER_HOST", "REPLAY_SECONDS", "EventStreamReader", "close_quietly", "failure_reason"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# The events endpoint flushes its headers before it subscribes: asking for a short replay (`since`) closes
# that window. Replayed events are harmless: handling is idempotent.
REPLAY_SECONDS = 1.0


def close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass


def failure_reason(failure: Failure) -> str:
    value = failure.value
    sub = getattr(value, "subFailure", None)  # FirstError from gatherResults
    if isinstance(sub, Failure):
        value = sub.value
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def default_client_factory(base_url: str, timeout: float) -> Callable[[], Any]:
    def make() -> Any:
        import docker

        # version=None: negotiate with the engine (docker-py's default API version is too new for older ones).
        return docker.APIClient(base_url=base_url, version=None, timeout=timeout)

    return make


class EventStreamReader:
    """The event-stream connection cycle of a watcher; see the module docstring.

    The watcher provides `_log` and calls `_init_event_stream(...)` in its `__init__`; `_stopping` is the
    watcher's to set in startService/stopService.
    """

    # What the subscription asks for (the engine's `filters` argument).
    _event_filters: ClassVar[Mapping[str, list[str]]]
    # Reader threads are named f"{_reader_thread_prefix}-{cycle}".
    _reader_thread_prefix: ClassVar[str]
    # The word log lines use for this stream: "docker", "swarm".
    _events_noun: ClassVar[str]
    # Whether events that arrive once the service is stopping are dropped.
    _drop_events_when_stopping: ClassVar[bool] = True
    # The line for a thread that outlives `_stop_timeout` (fields: what, timeout, reason).
    _late_wording: ClassVar[str] = "{what} did not finish within {timeout}s; not waiting for it"

    _log: Logger

    def _init_event_stream(
        self,
        reactor: Any,
        *,
        docker_host: str | None,
        client_factory: Callable[[], Any] | None,
        api_timeout: float,
        initial_backoff: float,
        max_backoff: float,
        stop_timeout: float,
        threads_factory: Callable[[], Threads],
    ) -> None:
        """`client_factory` None: a client for `docker_host`, else $DOCKER_HOST, else the local socket."""
        self._reactor = reactor
        self.engine_url = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self._client_factory = client_factory or default_client_factory(self.engine_url, api_timeout)
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._stop_timeout = stop_timeout
        self._threads_factory = threads_factory
        self._threads: Threads | None = None
        self._stopping = False
        # Status for views and /metrics (labelgw.control.metrics): `connected` (the event stream is up),
        # `last_resync` (reactor time of the last full listing applied); `event_observer` hears of each event.
        self.connected = False
        self.last_resync: float | None = None
        self.events_received = 0
        self.resyncs = 0
        self.reconnects = 0
        self.event_observer: Callable[[Mapping[str, Any]], None] | None = None
        self._cycle = 0
        self._stream: Any = None
        self._reader_active = False
        self._reader_waiters: list[Deferred[None]] = []
        self._reconnect_call: Any = None

    # Hooks.

    def _open_reader_clients(self) -> tuple[Any, tuple[Any, ...]]:
        """Reader thread: the client to subscribe with, and clients handed to the reactor with the stream."""
        return self._client_factory(), ()

    def _adopt_subscription(self, cycle: int, *handed: Any) -> None:
        """Reactor: the stream of `cycle` is up (`_stream` and `connected` are set); take what came with it."""

    def _catch_up(self) -> None:
        """Reactor: after a (re)subscription, look at whatever happened while the stream was down."""
        raise NotImplementedError

    def _handle_event(self, event: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _stream_lost(self) -> None:
        """Reactor: the reader of the current cycle ended (`connected` is already False)."""

    def _log_reconnect(self, result: object, cycle: int, delay: float) -> None:
        """Reactor: say why the reader of `cycle` ended (`result`: None or a Failure) and when it reconnects."""
        raise NotImplementedError

    def _release_clients(self, threads: Threads) -> None:
        """Reactor, stopping: the reader is done and `threads` is about to stop; close what the pool used."""

    # Starting.

    def _start_threads_and_stream(self) -> None:
        self._threads = self._threads_factory()
        self._threads.start()
        self._connect()

    def _start_loop(self, function: Callable[[], object], interval: float, *, now: bool, stopped: str) -> LoopingCall:
        """`function` every `interval` seconds on the watcher's reactor; `stopped`: the line if the loop dies."""
        loop = LoopingCall(function)
        loop.clock = self._reactor
        loop.start(interval, now=now).addErrback(lambda failure: self._log.failure(stopped, failure))
        return loop

    # The cycle.

    def _connect(self) -> None:
        self._reconnect_call = None
        if self._stopping or self._threads is None:
            return
        self._cycle += 1
        cycle = self._cycle
        self._reader_active = True
        reading = self._threads.spawn(partial(self._read_events, cycle), f"{self._reader_thread_prefix}-{cycle}")
        reading.addBoth(self._reader_ended, cycle)
        reading.addErrback(
            lambda failure: self._log.failure("{noun} reader bookkeeping failed", failure, noun=self._events_noun)
        )

    def _read_events(self, cycle: int) -> None:
        """Reader thread: subscribe, hand over, then pass each event to the reactor the moment it arrives."""
        stream_client, handed = self._open_reader_clients()
        handed_over = False
        try:
            stream = stream_client.events(
                decode=True, filters=dict(self._event_filters), since=f"{time.time() - REPLAY_SECONDS:.9f}"
            )
            self._reactor.callFromThread(self._on_subscribed, cycle, stream, *handed)
            handed_over = True  # the reactor side owns them now
            for event in stream:
                self._reactor.callFromThread(self._on_event, cycle, event)
        finally:
            if not handed_over:
                for client in handed:
                    close_quietly(client)
            close_quietly(stream_client)

    def _on_subscribed(self, cycle: int, stream: Any, *handed: Any) -> None:
        if cycle != self._cycle or self._stopping:
            close_quietly(stream)
            for client in handed:
                close_quietly(client)
            return
        self._stream = stream
        self.connected = True
        self._adopt_subscription(cycle, *handed)
        self._log.info("watching {noun} events at {engine}", noun=self._events_noun, engine=self.engine_url)
        self._catch_up()

    def _on_event(self, cycle: int, event: Mapping[str, Any]) -> None:
        if cycle != self._cycle or (self._stopping and self._drop_events_when_stopping):
            return
        self.events_received += 1
        if self.event_observer is not None:
            self.event_observer(event)
        try:
            self._handle_event(event)
        except Exception:
            self._log.failure("could not handle {noun} event {event}", noun=self._events_noun, event=event)

    def _reader_ended(self, result: object, cycle: int) -> None:
        if cycle == self._cycle:
            self.connected = False
            self._stream = None
            self._stream_lost()
        self._reader_active = False
        waiters, self._reader_waiters = self._reader_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._stopping or cycle != self._cycle:
            return
        delay = self._backoff.next_delay()
        self.reconnects += 1
        self._log_reconnect(result, cycle, delay)
        self._reconnect_call = self._reactor.callLater(delay, self._connect)

    def _close_stream(self) -> None:
        """Ends the reader's blocking iteration from the reactor side (shuts the socket down)."""
        stream = self._stream
        if stream is None:
            return
        try:
            stream.close()
        except Exception:
            self._log.failure("closing the {noun} event stream failed", noun=self._events_noun)

    # Stopping.

    def _stop_stream_and_threads(self) -> Deferred[None]:
        """Fires once the reader thread and then the pool threads are done (each waited for at most
        `_stop_timeout`)."""
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        self._close_stream()
        noun = self._events_noun
        done = self._bounded(self._reader_finished(), f"the {noun} event reader thread")

        def stop_pool(_: object) -> Deferred[None]:
            threads, self._threads = self._threads, None
            if threads is None:
                return succeed(None)
            self._release_clients(threads)
            return self._bounded(threads.stop(), f"the {noun} thread pool")

        done.addCallback(stop_pool)
        done.addErrback(lambda failure: self._log.failure("while stopping the {noun} watcher", failure, noun=noun))
        return done

    def _bounded(self, waiting: Deferred[None], what: str) -> Deferred[None]:
        timeout = self._stop_timeout

        def late(failure: Failure) -> None:
            failure.trap(Exception)
            self._log.warn(self._late_wording, what=what, timeout=timeout, reason=failure_reason(failure))

        waiting.addTimeout(timeout, self._reactor)
        waiting.addErrback(late)
        return waiting

    def _reader_finished(self) -> Deferred[None]:
        if not self._reader_active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._reader_waiters.append(waiter)
        return waiter
