"""Keep the route sink in step with the Swarm services of a manager (`--swarm`).

The decisions live in `labelgw.docker.swarm` (pure); this module does the plumbing, like
`labelgw.docker.watcher.DockerWatcher` does for containers:

- a full listing (labelled services, their tasks, the nodes) every `poll_interval` (1 s): the engine sends no task
  events, so task state can only be listed;
- the event stream (services, nodes, and the containers of this node's tasks) in a reader thread of its own: a
  service created, updated or removed is listed again at once, and so is a service one of whose local task
  containers starts, turns healthy or is stopped; a task container's kill takes it out of rotation before its
  process gets the signal's effect; while a service has tasks starting or stopping it is listed again every
  `settle_interval` (0.1 s) for up to `settle_for` seconds after the event;
- every blocking SDK call in a thread (a small private pool); results are applied on the reactor thread only.

A manager that leaves the swarm (or an engine that never was one) is a log line and a retry at the next poll; the
routes last listed are kept meanwhile, as they are while the engine is unreachable.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

import docker.errors
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.docker.stream import EventStreamReader, close_quietly, failure_reason
from labelgw.docker.swarm import SwarmTracker
from labelgw.docker.tracker import ParseFunction, RouteSink
from labelgw.docker.watcher import PoolThreads, Threads, _unreachable_reason

__all__ = ["SWARM_EVENT_FILTERS", "SwarmWatcher"]

# Service and node events come from the managers; container events name this node's task containers in their
# attributes (com.docker.swarm.task.id).
SWARM_EVENT_FILTERS: Mapping[str, list[str]] = {"type": ["service", "node", "container"]}
_SERVICE_ACTIONS = frozenset({"create", "update", "remove"})

_Listing = tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], list[Mapping[str, Any]]]
_ServiceListing = tuple[Mapping[str, Any] | None, list[Mapping[str, Any]], list[Mapping[str, Any]] | None]


def _swarm_problem(failure: Failure) -> str:
    """Why the services could not be listed, short: the engine's own message for a node outside the swarm."""
    value = failure.value
    if isinstance(value, docker.errors.APIError):
        explanation = str(getattr(value, "explanation", "") or "").strip()
        status = getattr(value, "status_code", None)
        if explanation:
            return f"{status} {explanation}" if status else explanation
    if isinstance(value, docker.errors.APIError) or not isinstance(value, Exception):
        return failure_reason(failure)
    return _unreachable_reason(failure)


class SwarmWatcher(EventStreamReader, Service):
    """Routes the labelled services of the swarm this engine manages. Status for views and /metrics, as
    DockerWatcher's: `connected` (the event stream is up), `last_resync` (reactor time of the last full listing),
    `events_received`, `resyncs` (full listings applied), `reconnects` (of the event stream)."""

    _log = Logger()
    _event_filters = SWARM_EVENT_FILTERS
    _reader_thread_prefix = "labelgw-swarm-events"
    _events_noun = "swarm"

    def __init__(
        self,
        reactor: Any,
        sink: RouteSink,
        client_factory: Callable[[], Any] | None = None,
        *,
        docker_host: str | None = None,
        parse: ParseFunction | None = None,
        prefix: str = "labelgw",
        pinned_env: str | None = None,
        own_networks: frozenset[str] = frozenset(),
        poll_interval: float = 1.0,
        settle_interval: float = 0.1,
        settle_for: float = 10.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        api_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        threads_factory: Callable[[], Threads] | None = None,
    ) -> None:
        super().__init__()
        self._init_event_stream(
            reactor,
            docker_host=docker_host,
            client_factory=client_factory,
            api_timeout=api_timeout,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            stop_timeout=stop_timeout,
            threads_factory=threads_factory or (lambda: PoolThreads(reactor, max_threads=4, name="labelgw-swarm")),
        )
        if parse is None:
            from labelgw.core.labels import parse_container

            parse = parse_container
        self._prefix = prefix
        self.tracker = SwarmTracker(sink, parse, prefix=prefix, pinned_env=pinned_env, own_networks=own_networks)
        self.poll_interval = poll_interval
        self._settle_interval = settle_interval
        self._settle_for = settle_for
        # The reason the last listing failed (None: the last one worked); logged once per reason.
        self.swarm_problem: str | None = None
        self._api: Any = None
        self._api_lock = threading.Lock()
        self._poll_loop: LoopingCall | None = None
        self._poll_running = False
        self._poll_again = False
        # Per service: a listing in flight, another one wanted after it, until when to keep looking while it settles.
        self._service_inflight: set[str] = set()
        self._service_again: set[str] = set()
        self._settle_until: dict[str, float] = {}
        self._settle_calls: dict[str, Any] = {}

    # Service.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._start_threads_and_stream()
        self._poll_loop = self._start_loop(self.poll, self.poll_interval, now=True, stopped="the swarm poll stopped")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._poll_loop is not None and self._poll_loop.running:
            self._poll_loop.stop()
        for call in self._settle_calls.values():
            if call.active():
                call.cancel()
        self._settle_calls.clear()
        return self._stop_stream_and_threads()

    def _release_clients(self, threads: Threads) -> None:
        api, self._api = self._api, None
        if api is not None:
            threads.run(close_quietly, api).addErrback(lambda failure: None)

    # The API client of the listings (one, shared by the pool threads; made in a thread: it may block).

    def _client(self) -> Any:
        with self._api_lock:
            if self._api is None:
                self._api = self._client_factory()
            return self._api

    # Full listings.

    def poll(self) -> None:
        """List every labelled service with its tasks and the nodes (in a thread), then apply it."""
        if self._stopping or self._threads is None:
            return
        if self._poll_running:
            self._poll_again = True
            return
        self._poll_running = True
        self._poll_again = False
        seq = self.tracker.next_seq()
        started = self._reactor.seconds()
        listing = self._threads.run(self._list_all)
        listing.addCallbacks(self._apply_full, self._listing_failed, callbackArgs=(seq, started))
        listing.addBoth(self._poll_done)
        listing.addErrback(lambda failure: self._log.failure("swarm poll bookkeeping failed", failure))

    def _list_all(self) -> _Listing:
        """Pool thread."""
        api = self._client()
        services = list(api.services(filters={"label": f"{self._prefix}.service"}))
        ids = [str(service.get("ID") or "") for service in services]
        tasks: list[Mapping[str, Any]] = []
        if ids:
            try:
                tasks = list(api.tasks(filters={"service": ids}))
            except docker.errors.NotFound:
                tasks = list(api.tasks())  # one was removed since it was listed: every task, sorted out later
        return services, tasks, list(api.nodes())

    def _apply_full(self, listing: _Listing, seq: int, started: float) -> None:
        if self._stopping:
            return
        services, tasks, nodes = listing
        self._recovered()
        summary = self.tracker.apply_full(seq, services, tasks, nodes)
        now = self._reactor.seconds()
        self.last_resync = now
        self.resyncs += 1
        emit = self._log.info if summary.changed else self._log.debug
        emit(
            "swarm listing: {services} labelled services, {routed} backends, {rejected} rejected, in {elapsed_ms} ms",
            services=summary.services,
            routed=summary.routed,
            rejected=summary.rejected,
            elapsed_ms=round((now - started) * 1000, 1),
        )

    def _listing_failed(self, failure: Failure) -> None:
        if self._stopping:
            return
        reason = _swarm_problem(failure)
        previous, self.swarm_problem = self.swarm_problem, reason
        if previous is None:
            # One warning per outage: the same line every second while the node stays out says nothing new.
            self._log.warn(
                "cannot list swarm services at {engine}: {reason}; keeping the last routes, retrying every {interval}s",
                engine=self.engine_url,
                reason=reason,
                interval=self.poll_interval,
            )
        else:
            # A node leaving a swarm answers with a few different errors on its way out.
            emit = self._log.debug if reason == previous else self._log.info
            emit("swarm services still unavailable at {engine}: {reason}", engine=self.engine_url, reason=reason)

    def _recovered(self) -> None:
        if self.swarm_problem is not None:
            self._log.info("swarm services listed again at {engine}", engine=self.engine_url)
            self.swarm_problem = None

    def _poll_done(self, result: object) -> None:
        self._poll_running = False
        if isinstance(result, Failure):
            self._log.failure("applying a swarm listing failed", result)
        if self._poll_again and not self._stopping:
            self.poll()

    # One service, now (events) and again while it settles.

    def reconcile_service(self, service_id: str, *, settle: bool = True) -> None:
        if self._stopping or self._threads is None or not service_id:
            return
        if settle:
            self._settle_until[service_id] = self._reactor.seconds() + self._settle_for
        if service_id in self._service_inflight:
            self._service_again.add(service_id)
            return
        call = self._settle_calls.pop(service_id, None)
        if call is not None and call.active():
            call.cancel()
        self._service_inflight.add(service_id)
        seq = self.tracker.next_seq()
        known_nodes = frozenset(self.tracker.nodes)
        listing = self._threads.run(self._list_service, service_id, known_nodes)
        listing.addCallbacks(
            self._apply_service, self._listing_failed, callbackArgs=(service_id, seq)
        )
        listing.addBoth(self._service_done, service_id)
        listing.addErrback(lambda failure: self._log.failure("swarm service listing bookkeeping failed", failure))

    def _list_service(self, service_id: str, known_nodes: frozenset[str]) -> _ServiceListing:
        """Pool thread."""
        api = self._client()
        try:
            service = api.inspect_service(service_id)
            tasks = list(api.tasks(filters={"service": service_id}))
        except docker.errors.NotFound:
            return None, [], None
        new_node = any(str(task.get("NodeID") or "") not in known_nodes for task in tasks if task.get("NodeID"))
        return service, tasks, list(api.nodes()) if new_node else None

    def _apply_service(self, listing: _ServiceListing, service_id: str, seq: int) -> None:
        if self._stopping:
            return
        service, tasks, nodes = listing
        if self.tracker.apply_service(seq, service_id, service, tasks, nodes):
            self._log.debug("swarm service {service} listed again", service=service_id[:12])

    def _service_done(self, result: object, service_id: str) -> None:
        self._service_inflight.discard(service_id)
        if isinstance(result, Failure):
            self._log.failure("applying the listing of swarm service {service} failed", result, service=service_id[:12])
        if self._stopping:
            return
        if service_id in self._service_again:
            self._service_again.discard(service_id)
            self.reconcile_service(service_id, settle=False)
            return
        until = self._settle_until.get(service_id)
        if until is None:
            return
        if not self.tracker.settling(service_id) or self._reactor.seconds() >= until:
            del self._settle_until[service_id]
            return
        self._settle_calls[service_id] = self._reactor.callLater(
            self._settle_interval, self._settle_again, service_id
        )

    def _settle_again(self, service_id: str) -> None:
        self._settle_calls.pop(service_id, None)
        self.reconcile_service(service_id, settle=False)

    # The event stream (EventStreamReader's hooks).

    def _adopt_subscription(self, cycle: int, *handed: Any) -> None:
        self._backoff.reset()

    def _catch_up(self) -> None:
        self.poll()  # whatever happened while the stream was down

    def _handle_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("Type")
        action = str(event.get("Action") or "")
        actor = event.get("Actor") or {}
        if kind == "service" and action in _SERVICE_ACTIONS:
            self.reconcile_service(str(actor.get("ID") or ""))
        elif kind == "node":
            self.poll()  # an address or availability changed: everything on that node
        elif kind == "container":
            service_id = self.tracker.container_event(event)
            if service_id is not None:
                self.reconcile_service(service_id)

    def _log_reconnect(self, result: object, cycle: int, delay: float) -> None:
        reason = _unreachable_reason(result) if isinstance(result, Failure) else "the stream ended"
        self._log.warn(
            "swarm event stream from {engine}: {reason}; reconnecting in {delay}s (the poll goes on)",
            engine=self.engine_url,
            reason=reason,
            delay=round(delay, 3),
        )
