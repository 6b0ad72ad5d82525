"""The Docker watcher's state machine: events and inspect results in, route sink calls and inspect requests out.

Pure: no threads, no reactor, no Docker client, no I/O. `labelgw.docker.watcher.DockerWatcher` does the plumbing (the
SDK calls in threads, the event stream, reconnects) and feeds this module on the reactor thread; everything that
decides *what* the sink hears lives here and is tested directly.

Per container the tracker keeps a generation (bumped by every event) so that an inspect issued before the latest
event is recognised as stale, what it last delivered, and whether the container is being stopped; a resync merges
the engine's full listing with what events did meanwhile.
"""

from __future__ import annotations

import calendar
import dataclasses
import re
import signal
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from twisted.logger import Logger

from labelgw.core.model import ContainerSpec, Outcome, Rejection

__all__ = [
    "GONE",
    "TERMINATING_SIGNALS",
    "Backoff",
    "ContainerTracker",
    "InspectResult",
    "Listing",
    "Observation",
    "Outcome",
    "ParseFunction",
    "ResyncSummary",
    "RouteSink",
    "event_time_ns",
    "has_prefix_labels",
    "observe",
    "own_container_candidates",
    "signal_number",
    "timestamp_ns",
]


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
class ResyncSummary:
    """What one resync found, for its log line."""

    containers: int
    routed: int
    rejected: int
    reinspected: int
    # Did it give the sink anything it did not have (a container new, changed or gone)? Periodic resyncs that
    # changed nothing are logged at debug level.
    changed: bool = True



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
                    self._to_sink("mark_down", lambda: self._sink.mark_down(container_id))  # else the sink has nothing in rotation
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
            self._to_sink("remove", lambda: self._sink.remove(container_id))

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
            self._to_sink("remove", lambda: self._sink.remove(container_id))
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
        self._to_sink("apply", lambda: self._sink.apply(container_id, outcome))

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
        changed = False
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
            elif track.fresh and not isinstance(track.delivered, _Missing):  # fresh: delivered since the events
                outcome = track.delivered
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
            if track.delivered != outcome:
                changed = True
            track.delivered = outcome
            if outcome is not None:
                outcomes[container_id] = outcome
        for container_id, track in list(self._tracks.items()):
            if container_id not in outcomes and not track.inflight and container_id not in listing.touched:
                if track.delivered is not None and not isinstance(track.delivered, _Missing):
                    changed = True
                del self._tracks[container_id]  # gone, or listed but not routed
        self._unlabelled = (self._unlabelled & listing.touched) | listing.unlabelled
        self._to_sink("resync", lambda: self._sink.resync(outcomes))
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
            changed=changed or bool(reinspect),
        )

    def _to_sink(self, method: str, call: Callable[[], None]) -> None:
        """Make one sink call (`method` names it in the log)."""
        try:
            call()
        except Exception:
            # A bug in the registry must not stop the watcher: the next change or resync tries again.
            self._log.failure("route sink {method} failed", method=method)

    # For tests.

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

