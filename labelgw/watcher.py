"""Watch the Docker engine and keep the route sink in step with the containers.

Two layers:

- `ContainerTracker`: the event-handling state machine. Pure (no threads, no reactor, no I/O): events and
  inspect results go in, sink calls and inspect requests come out. Everything that decides *what* the sink
  hears lives here and is tested directly.
- `DockerWatcher`: a `Service` that does the plumbing. The blocking docker SDK runs in threads only: the event
  stream in a dedicated reader thread (it blocks forever and must never wait on anything else: the engine drops
  events of slow readers), list/inspect in a small `ThreadPool`. Results come back to the reactor thread, which
  is the only thread that touches the tracker and the sink.

Cycle of one connection: subscribe to events first, then list + inspect every labelled container, then hand the
whole truth to `sink.resync`. Events that arrive while the listing runs are applied as they come and merged into
the resync by container id and per-container generation, so nothing is lost and nothing stale wins. Any end of
the stream (docker-py turns a dropped connection into a clean end of iteration) starts a new cycle after a capped
exponential backoff; meanwhile the sink keeps serving the last good routes.
"""

from __future__ import annotations

import calendar
import dataclasses
import os
import re
import signal
import threading
import time
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

from labelgw.model import ContainerSpec, Rejection

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
]

Outcome = ContainerSpec | Rejection | None

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# Network events carry the container in Actor.Attributes.container: a connect/disconnect changes its address.
EVENT_FILTERS: Mapping[str, list[str]] = {"type": ["container", "network"]}

# Signals after which a container is going away (TERM, KILL, INT, QUIT); its own StopSignal counts too.
# Anything else (HUP to reload, USR1, WINCH for a log reopen ...) leaves it in rotation.
TERMINATING_SIGNALS = frozenset({2, 3, 9, 15})

# Container actions that change what we would route: look at the container again.
_REFRESH_ACTIONS = frozenset(
    {"create", "start", "restart", "unpause", "health_status", "rename", "update", "oom"}
)
# Out of rotation at once, without waiting for an inspect: kill/stop arrive before die, the earliest moment
# to stop sending new requests. (oom is not here: an OOM kill of a child process leaves the container up;
# if the main process died, die follows.)
_DOWN_ACTIONS = frozenset({"kill", "stop", "die", "pause"})
# Down actions that end the current run: a later observation of that same run keeps it down.
_STOPPING_ACTIONS = frozenset({"kill", "stop", "die"})
_NETWORK_ACTIONS = frozenset({"connect", "disconnect"})

# The events endpoint flushes its headers before it subscribes: asking for a short replay (`since`) closes
# that window. Replayed events are harmless: handling is idempotent by container id.
_REPLAY_SECONDS = 1.0

# When an event has no time, treat every run seen so far as the one being stopped.
_UNKNOWN_EVENT_TIME = 2**63


class RouteSink(Protocol):
    """What the watcher drives (the registry). Called only on the reactor thread."""

    def apply(self, container_id: str, outcome: Outcome) -> None:
        """Upsert one container; None = not routed (forget it)."""

    def mark_down(self, container_id: str) -> None:
        """Out of rotation now (kill/stop/die/pause); the route stays (503)."""

    def remove(self, container_id: str) -> None:
        """The container is gone."""

    def resync(self, outcomes: Mapping[str, Outcome]) -> None:
        """The full truth: ids absent are removed."""


class ParseFunction(Protocol):
    def __call__(
        self,
        inspect: Mapping[str, Any],
        *,
        prefix: str,
        pinned_env: str | None,
        own_networks: frozenset[str],
    ) -> Outcome: ...


class _Gone:
    """Inspect answered 404: the container no longer exists."""

    def __repr__(self) -> str:
        return "GONE"


GONE = _Gone()


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING = _Missing()


@dataclass(frozen=True, slots=True)
class Observation:
    """One inspect of one container, reduced to what the watcher needs."""

    container_id: str
    outcome: Outcome
    running: bool
    # State.StartedAt in engine nanoseconds since the epoch; None when unreadable.
    started_at_ns: int | None
    # Config.StopSignal as a number (None: the default, TERM).
    stop_signal: int | None = None


InspectResult = Observation | _Gone


@dataclass(frozen=True, slots=True)
class OwnContainer:
    """The container labelgw itself runs in, when it does."""

    container_id: str | None
    networks: frozenset[str]
    problem: str = ""


@dataclass(frozen=True, slots=True)
class ResyncSummary:
    containers: int
    routed: int
    rejected: int
    reinspected: int


def observe(
    inspect: Mapping[str, Any],
    parse: ParseFunction,
    *,
    prefix: str,
    pinned_env: str | None,
    own_networks: frozenset[str],
) -> Observation:
    """Parse one inspect result. Pure; runs in a pool thread next to the inspect."""
    container_id = str(inspect.get("Id") or "")
    state = inspect.get("State") or {}
    config = inspect.get("Config") or {}
    try:
        outcome = parse(inspect, prefix=prefix, pinned_env=pinned_env, own_networks=own_networks)
    except Exception as problem:  # a parser bug must cost one container, not the whole resync
        outcome = Rejection(
            container_id=container_id,
            name=str(inspect.get("Name") or "").removeprefix("/"),
            label=f"{prefix}.*",
            value="",
            reason=f"labelgw could not read this container's labels: {problem!r}",
        )
    return Observation(
        container_id=container_id,
        outcome=outcome,
        running=bool(state.get("Running")),
        started_at_ns=timestamp_ns(state.get("StartedAt")),
        stop_signal=signal_number(config.get("StopSignal")),
    )


_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$"
)


def timestamp_ns(text: object) -> int | None:
    """Docker's RFC 3339 timestamps ("2024-05-01T10:20:30.123456789Z") as integer nanoseconds."""
    match = _RFC3339.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction = (match.group(7) or "").ljust(9, "0")
    zone = match.group(8)
    offset = 0
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) - offset
    return seconds * 1_000_000_000 + int(fraction)


def signal_number(text: object) -> int | None:
    """"15", "SIGTERM", "TERM" -> 15; None when empty or unknown."""
    if text is None:
        return None
    name = str(text).strip().upper()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


def event_time_ns(event: Mapping[str, Any]) -> int | None:
    nanos = event.get("timeNano")
    if isinstance(nanos, int):
        return nanos
    seconds = event.get("time")
    if isinstance(seconds, (int, float)):
        return int(seconds * 1_000_000_000)
    return None


def has_prefix_labels(labels: Mapping[str, Any] | None, prefix: str) -> bool:
    if not labels:
        return False
    dotted = prefix + "."
    return any(isinstance(key, str) and key.startswith(dotted) for key in labels)


def _forced_down(outcome: Outcome) -> Outcome:
    if isinstance(outcome, ContainerSpec) and outcome.running:
        return dataclasses.replace(outcome, running=False)
    return outcome


@dataclass(slots=True)
class _Track:
    """What the tracker remembers about one container."""

    # Bumped by every event for this container: an inspect issued before the latest event is stale.
    generation: int = 0
    # What the sink was last given (after overrides); _MISSING: nothing yet.
    delivered: Outcome | _Missing = _MISSING
    # `delivered` comes from an observation made after the latest event.
    fresh: bool = False
    # A down event (kill/stop/die/pause) came and no fresh observation has been delivered since.
    marked_down: bool = False
    # Engine time of the kill/stop/die that ends the current run: a run that started before it is going away.
    stopping_since_ns: int | None = None
    # An event-path inspect is on its way (at most one; a newer event re-issues when it lands).
    inflight: bool = False
    # Destroyed while an inspect was in flight: dropped when it lands.
    destroyed: bool = False
    stop_signal: int | None = None


class Listing:
    """One resync in progress: which containers it saw, and which ones events touched meanwhile."""

    __slots__ = ("touched", "unlabelled", "seen")

    def __init__(self) -> None:
        self.touched: set[str] = set()
        self.unlabelled: set[str] = set()
        self.seen: set[str] = set()


class ContainerTracker:
    """The event/inspect/resync state machine, keyed by container id. Call it from one thread only.

    `request_inspect(container_id, generation)` must eventually be answered with `inspected(...)` or
    `inspect_failed(...)`.
    """

    _log = Logger()

    def __init__(
        self,
        sink: RouteSink,
        request_inspect: Callable[[str, int], None],
        *,
        prefix: str = "labelgw",
        on_own_networks_changed: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._request_inspect = request_inspect
        self._prefix = prefix
        self._on_own_networks_changed = on_own_networks_changed or (lambda: None)
        self._tracks: dict[str, _Track] = {}
        # Containers known to carry no label under the prefix: their events cost nothing.
        self._unlabelled: set[str] = set()
        self._listing: Listing | None = None
        self.own_container_id: str | None = None

    # Events.

    def handle_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("Type")
        action = str(event.get("Action") or event.get("status") or "")
        # "health_status: healthy", "exec_start: sh -c ..." -> the part before the colon.
        verb = action.split(":", 1)[0].strip()
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if kind == "network":
            if verb in _NETWORK_ACTIONS:
                self._network_event(str(attributes.get("container") or ""))
            return
        if kind != "container":
            return
        container_id = str(actor.get("ID") or event.get("id") or "")
        if not container_id:
            return
        if verb == "destroy":
            self._destroyed(container_id, attributes)
            return
        if verb not in _REFRESH_ACTIONS and verb not in _DOWN_ACTIONS:
            return  # exec_*, attach, top, resize, commit ...
        if not self._relevant(container_id, attributes):
            return
        if verb in _DOWN_ACTIONS:
            if verb == "kill" and not self._terminating(container_id, attributes):
                return
            track = self._bump(container_id)
            if verb in _STOPPING_ACTIONS and track.stopping_since_ns is None:
                track.stopping_since_ns = event_time_ns(event) or _UNKNOWN_EVENT_TIME
            if not track.marked_down:
                track.marked_down = True
                delivered = track.delivered
                if isinstance(delivered, ContainerSpec) and delivered.ready:
                    self._call_sink("mark_down", container_id)  # else the sink has nothing in rotation
            return
        track = self._bump(container_id)
        if verb in ("start", "restart"):
            track.stopping_since_ns = None  # a new run
        self._want_inspect(container_id, track)

    def _network_event(self, container_id: str) -> None:
        if not container_id:
            return
        if container_id == self.own_container_id:
            # Our own networks decide which address of every container is reachable.
            self._on_own_networks_changed()
            return
        if container_id in self._unlabelled:
            return
        self._want_inspect(container_id, self._bump(container_id))

    def _relevant(self, container_id: str, attributes: Mapping[str, Any]) -> bool:
        if container_id in self._tracks:
            return True
        # Container events carry the container's labels; labels never change after create.
        if attributes and not has_prefix_labels(attributes, self._prefix):
            self._unlabelled.add(container_id)
            if self._listing is not None:
                self._listing.touched.add(container_id)
            return False
        return True

    def _terminating(self, container_id: str, attributes: Mapping[str, Any]) -> bool:
        sent = signal_number(attributes.get("signal"))
        if sent is None or sent in TERMINATING_SIGNALS:
            return True
        track = self._tracks.get(container_id)
        return track is not None and sent == track.stop_signal

    def _destroyed(self, container_id: str, attributes: Mapping[str, Any]) -> None:
        self._unlabelled.discard(container_id)
        if self._listing is not None:
            self._listing.touched.add(container_id)
        track = self._tracks.pop(container_id, None)
        if track is not None and track.inflight:
            # Keep a tombstone so the answer in flight is recognised and dropped.
            track.destroyed = True
            track.generation += 1
            self._tracks[container_id] = track
        if track is not None or has_prefix_labels(attributes, self._prefix):
            self._call_sink("remove", container_id)

    def _bump(self, container_id: str) -> _Track:
        track = self._tracks.get(container_id)
        if track is None:
            track = self._tracks[container_id] = _Track()
        track.generation += 1
        track.fresh = False
        if self._listing is not None:
            self._listing.touched.add(container_id)
        return track

    def _want_inspect(self, container_id: str, track: _Track) -> None:
        if track.inflight:
            return  # when it lands it is stale, and the newest generation is asked for then
        track.inflight = True
        self._request_inspect(container_id, track.generation)

    # Inspect answers (event path).

    def inspected(self, container_id: str, generation: int, result: InspectResult) -> None:
        track = self._tracks.get(container_id)
        if track is None:
            return  # forgotten by a resync meanwhile: that resync had newer facts
        track.inflight = False
        if track.destroyed:
            del self._tracks[container_id]
            return
        if generation != track.generation:
            # A newer event arrived while this inspect ran: its answer may predate that event. Ask again.
            self._want_inspect(container_id, track)
            return
        if isinstance(result, _Gone):
            del self._tracks[container_id]
            self._call_sink("remove", container_id)
            return
        outcome = self._settle(track, result, fresh=True)
        self._deliver(container_id, track, outcome)

    def inspect_failed(self, container_id: str) -> None:
        """The inspect could not be made; the next resync looks at this container again."""
        track = self._tracks.get(container_id)
        if track is None:
            return
        track.inflight = False
        if track.destroyed:
            del self._tracks[container_id]

    def _settle(self, track: _Track, observation: Observation, *, fresh: bool) -> Outcome:
        """The outcome to hand over, with "stopping sticks" and, for stale observations, mark_down applied.

        Only a fresh observation may end the stopping state: a stale one may predate the start of a new run.
        """
        track.stop_signal = observation.stop_signal
        outcome = observation.outcome
        since = track.stopping_since_ns
        if since is not None:
            started = observation.started_at_ns
            if not observation.running or (started is not None and started >= since):
                if fresh:
                    track.stopping_since_ns = None  # stopped, or a run that began after the stop
            else:
                # The run that was told to stop (docker stop waits up to its timeout before SIGKILL).
                outcome = _forced_down(outcome)
        if not fresh and track.marked_down:
            outcome = _forced_down(outcome)
        return outcome

    def _deliver(self, container_id: str, track: _Track, outcome: Outcome) -> None:
        previous = track.delivered
        track.delivered = outcome
        track.fresh = True
        was_down = track.marked_down
        track.marked_down = False
        if outcome is None and (previous is None or previous is _MISSING):
            return  # never routed, still not routed
        if outcome == previous and not was_down:
            return
        self._call_sink("apply", container_id, outcome)

    # Resync.

    def begin_listing(self) -> Listing:
        """Start a resync: call before asking the engine for the container list."""
        self._listing = Listing()
        return self._listing

    def listed_unlabelled(self, listing: Listing, container_id: str) -> None:
        """A listed container without labels under the prefix: nothing to inspect."""
        listing.seen.add(container_id)
        listing.unlabelled.add(container_id)

    def listed_labelled(self, listing: Listing, container_id: str) -> int:
        """A listed container to inspect: returns the generation its inspect is issued at."""
        listing.seen.add(container_id)
        track = self._tracks.get(container_id)
        if track is None:
            track = self._tracks[container_id] = _Track()
        return track.generation

    def abandon_listing(self, listing: Listing | None = None) -> None:
        if listing is None or listing is self._listing:
            self._listing = None

    def finish_listing(
        self, listing: Listing, results: Mapping[str, tuple[int, InspectResult]]
    ) -> ResyncSummary | None:
        """Merge the listing with what events did meanwhile, and give the sink the whole truth.

        None when this listing was abandoned (a newer one started).
        """
        if listing is not self._listing:
            return None
        self._listing = None
        outcomes: dict[str, Outcome] = {}
        reinspect: list[str] = []
        for container_id in set(results) | listing.touched:
            track = self._tracks.get(container_id)
            if track is None or track.destroyed:
                continue  # destroyed meanwhile, or never of interest
            entry = results.get(container_id)
            if entry is not None and entry[0] == track.generation:
                result = entry[1]
                if isinstance(result, _Gone):
                    # Removed between list and inspect; its destroy event is still on the way.
                    if track.inflight:
                        track.destroyed = True
                    else:
                        del self._tracks[container_id]
                    continue
                outcome = self._settle(track, result, fresh=True)
                track.fresh = True
                track.marked_down = False
            elif track.fresh:
                outcome = track.delivered  # type: ignore[assignment]  # fresh implies delivered
            else:
                # Events came after this container was listed: the listing may predate them. Use the best
                # we have, kept down if it was marked down, and look again.
                if not track.inflight:
                    reinspect.append(container_id)
                if not isinstance(track.delivered, _Missing):
                    outcome = _forced_down(track.delivered) if track.marked_down else track.delivered
                elif entry is not None and isinstance(entry[1], Observation):
                    outcome = self._settle(track, entry[1], fresh=False)
                else:
                    continue  # nothing known yet: the inspect on its way will apply it
            track.delivered = outcome
            if outcome is not None:
                outcomes[container_id] = outcome
        for container_id, track in list(self._tracks.items()):
            if container_id not in outcomes and not track.inflight and container_id not in listing.touched:
                del self._tracks[container_id]  # gone, or listed but not routed
        self._unlabelled = (self._unlabelled & listing.touched) | listing.unlabelled
        self._call_sink("resync", outcomes)
        for container_id in reinspect:
            track = self._tracks.get(container_id)
            if track is not None:
                self._want_inspect(container_id, track)
        rejected = sum(1 for outcome in outcomes.values() if isinstance(outcome, Rejection))
        return ResyncSummary(
            containers=len(listing.seen),
            routed=len(outcomes) - rejected,
            rejected=rejected,
            reinspected=len(reinspect),
        )

    def _call_sink(self, method: str, *args: Any) -> None:
        try:
            getattr(self._sink, method)(*args)
        except Exception:
            # A bug in the registry must not stop the watcher: the next change or resync tries again.
            self._log.failure("route sink {method} failed", method=method)

    # For status views and tests.

    def delivered(self, container_id: str) -> Outcome | None:
        track = self._tracks.get(container_id)
        if track is None or isinstance(track.delivered, _Missing):
            return None
        return track.delivered

    def tracked(self) -> frozenset[str]:
        return frozenset(self._tracks)


class Backoff:
    """Capped exponential delays: initial, 2x, 4x ... up to `maximum`, back to `initial` after reset()."""

    def __init__(self, initial: float, maximum: float, factor: float = 2.0) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


# Where the gateway's own container id shows when it runs under Docker.
_MOUNTED_CONTAINER_FILE = re.compile(r"/containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)\b")
_CGROUP_CONTAINER = re.compile(r"[/-]([0-9a-f]{64})(?:\.scope)?$")
_SHORT_ID = re.compile(r"^[0-9a-f]{12,64}$")


def own_container_candidates(
    mountinfo: str = "", cgroup: str = "", hostname: str = ""
) -> list[str]:
    """Possible ids of the container we run in, best first (none when we are not in one)."""
    found: list[str] = []
    for line in mountinfo.splitlines():
        match = _MOUNTED_CONTAINER_FILE.search(line)
        if match:
            found.append(match.group(1))
    for line in cgroup.splitlines():
        match = _CGROUP_CONTAINER.search(line.strip())
        if match:
            found.append(match.group(1))
    if _SHORT_ID.match(hostname):
        found.append(hostname)  # Docker's default hostname: the short id
    return list(dict.fromkeys(found))


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


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass


def _failure_reason(failure: Failure) -> str:
    value = failure.value
    sub = getattr(value, "subFailure", None)  # FirstError from gatherResults
    if isinstance(sub, Failure):
        value = sub.value
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def _tagged(result: InspectResult, container_id: str, generation: int) -> tuple[str, tuple[int, InspectResult]]:
    return container_id, (generation, result)


def _default_client_factory(base_url: str, timeout: float) -> Callable[[], Any]:
    def make() -> Any:
        import docker

        # version=None: negotiate with the engine (docker-py's default API version is too new for older ones).
        return docker.APIClient(base_url=base_url, version=None, timeout=timeout)

    return make


class DockerWatcher(Service):
    """Keeps `sink` in step with the engine's containers. See the module docstring for the cycle.

    Status for views: `connected` (the event stream is up) and `last_resync` (reactor time of the last
    successful full resync, None before the first).

    Backoff: the first reconnect waits `initial_backoff` (0.1 s), each further failure doubles it up to
    `max_backoff` (5 s); a successful resync resets it. Retries never stop.
    """

    _log = Logger()

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
        - `parse`: inspect dict -> Outcome; default `labelgw.labels.parse_container`, imported lazily.
        - `own_networks`: the gateway's networks; None discovers them (the container we run in, if any).
        - `inspect_parallelism`: inspects a resync runs at once; the pool has two more threads so that
          event inspects do not queue behind a large listing.
        - `stop_timeout`: stopService waits at most this long for each of the reader thread and the pool.
        """
        super().__init__()
        self._reactor = reactor
        self._sink = sink
        self.engine_url = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self._client_factory = client_factory or _default_client_factory(self.engine_url, api_timeout)
        self._parse = parse
        self._prefix = prefix
        self._pinned_env = pinned_env
        self._fixed_own_networks = own_networks
        self._own_networks: frozenset[str] = own_networks or frozenset()
        self._backoff = Backoff(initial_backoff, max_backoff)
        self._resync_interval = resync_interval
        self._inspect_slots = DeferredSemaphore(inspect_parallelism)
        self._stop_timeout = stop_timeout
        self._threads_factory: Callable[[], Threads] = threads_factory or (
            lambda: PoolThreads(reactor, max_threads=inspect_parallelism + 2)
        )
        self._tracker = ContainerTracker(
            sink,
            self._request_inspect,
            prefix=prefix,
            on_own_networks_changed=lambda: self._start_resync("own networks changed", queue=True),
        )
        self.connected = False
        self.last_resync: float | None = None
        self._threads: Threads | None = None
        self._stopping = False
        self._cycle = 0
        self._subscribed_cycle = 0
        self._api: Any = None
        self._stream: Any = None
        self._reader_active = False
        self._reader_waiters: list[Deferred[None]] = []
        self._reconnect_call: Any = None
        self._resync_cycle: int | None = None
        self._resync_again = False
        self._resync_loop: LoopingCall | None = None

    @property
    def tracker(self) -> ContainerTracker:
        return self._tracker

    # Service.

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._parse_function()  # import on the reactor thread, once, before any pool thread needs it
        self._threads = self._threads_factory()
        self._threads.start()
        self._connect()
        self._resync_loop = LoopingCall(self._periodic_resync)
        self._resync_loop.clock = self._reactor
        self._resync_loop.start(self._resync_interval, now=False).addErrback(
            lambda failure: self._log.failure("periodic docker resync stopped", failure)
        )

    def stopService(self) -> Deferred[None]:
        """Fires once the reader thread and the pool threads are done (each waited for at most stop_timeout)."""
        super().stopService()
        self._stopping = True
        if self._resync_loop is not None and self._resync_loop.running:
            self._resync_loop.stop()
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        self._close_stream()
        done = self._bounded(self._reader_finished(), "the docker event reader thread")

        def stop_pool(_: object) -> Deferred[None]:
            threads, self._threads = self._threads, None
            if threads is None:
                return succeed(None)
            return self._bounded(threads.stop(), "the docker thread pool")

        done.addCallback(stop_pool)
        done.addErrback(lambda failure: self._log.failure("while stopping the docker watcher", failure))
        return done

    def _bounded(self, waiting: Deferred[None], what: str) -> Deferred[None]:
        timeout = self._stop_timeout

        def late(failure: Failure) -> None:
            failure.trap(Exception)
            self._log.warn(
                "{what} did not finish within {timeout}s ({reason}); not waiting for it",
                what=what,
                timeout=timeout,
                reason=_failure_reason(failure),
            )

        waiting.addTimeout(timeout, self._reactor)
        waiting.addErrback(late)
        return waiting

    def _reader_finished(self) -> Deferred[None]:
        if not self._reader_active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._reader_waiters.append(waiter)
        return waiter

    def _parse_function(self) -> ParseFunction:
        if self._parse is None:
            from labelgw.labels import parse_container

            self._parse = parse_container
        return self._parse

    # Connection cycle.

    def _connect(self) -> None:
        self._reconnect_call = None
        if self._stopping or self._threads is None:
            return
        self._cycle += 1
        cycle = self._cycle
        self._reader_active = True
        reading = self._threads.spawn(partial(self._read_events, cycle), f"labelgw-docker-events-{cycle}")
        reading.addBoth(self._reader_ended, cycle)
        reading.addErrback(lambda failure: self._log.failure("docker reader bookkeeping failed", failure))

    def _read_events(self, cycle: int) -> None:
        """Reader thread: subscribe, hand over, then pass each event to the reactor the moment it arrives."""
        api = self._client_factory()
        try:
            stream_client = self._client_factory()  # its own client: closing the stream leaves inspects alone
        except BaseException:
            _close_quietly(api)
            raise
        try:
            stream = stream_client.events(
                decode=True, filters=dict(EVENT_FILTERS), since=f"{time.time() - _REPLAY_SECONDS:.9f}"
            )
            self._reactor.callFromThread(self._on_subscribed, cycle, api, stream)
            api = None  # the reactor side owns it now
            for event in stream:
                self._reactor.callFromThread(self._on_event, cycle, event)
        finally:
            if api is not None:
                _close_quietly(api)
            _close_quietly(stream_client)

    def _on_subscribed(self, cycle: int, api: Any, stream: Any) -> None:
        if cycle != self._cycle or self._stopping:
            _close_quietly(stream)
            _close_quietly(api)
            return
        self._api = api
        self._stream = stream
        self._subscribed_cycle = cycle
        self.connected = True
        self._log.info("watching docker events at {engine}", engine=self.engine_url)
        self._start_resync("connected")

    def _on_event(self, cycle: int, event: Mapping[str, Any]) -> None:
        if cycle != self._cycle:
            return
        try:
            self._tracker.handle_event(event)
        except Exception:
            self._log.failure("could not handle docker event {event}", event=event)

    def _reader_ended(self, result: object, cycle: int) -> None:
        was_subscribed = self._subscribed_cycle == cycle
        if cycle == self._cycle:
            self.connected = False
            self._stream = None
            api, self._api = self._api, None
            if api is not None:
                self._dispose(api)
            self._tracker.abandon_listing()
        self._reader_active = False
        waiters, self._reader_waiters = self._reader_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._stopping or cycle != self._cycle:
            return
        delay = self._backoff.next_delay()
        if isinstance(result, Failure) and not was_subscribed:
            self._log.warn(
                "docker engine unreachable at {engine}: {reason}; retrying in {delay}s",
                engine=self.engine_url,
                reason=_failure_reason(result),
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
        self._reconnect_call = self._reactor.callLater(delay, self._connect)

    def _close_stream(self) -> None:
        """Ends the reader's blocking iteration from the reactor side (shuts the socket down)."""
        stream = self._stream
        if stream is None:
            return
        try:
            stream.close()
        except Exception:
            self._log.failure("closing the docker event stream failed")

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

    def request_resync(self, reason: str = "requested") -> None:
        """Re-list everything soon (after the running resync, if one runs)."""
        self._start_resync(reason, queue=True)

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
        self._backoff.reset()
        self._log.info(
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
