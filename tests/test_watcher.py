"""labelgw.docker.watcher, deterministic: the tracker state machine directly, then the DockerWatcher plumbing with a
fake engine, a task.Clock reactor whose callFromThread runs at once, and a thread stand-in that runs pool jobs
synchronously (or queues them when a test needs to interleave)."""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

import docker.errors
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.core.model import ContainerSpec, Rejection
from labelgw.docker.watcher import (
    EVENT_FILTERS,
    GONE,
    Backoff,
    ContainerTracker,
    DockerWatcher,
    Observation,
    detect_own_container,
    observe,
    own_container_candidates,
    signal_number,
    timestamp_ns,
)

PREFIX = "labelgw"
LABELS = {"labelgw.service": "web", "labelgw.port": "8080"}
S1 = "2024-05-01T10:00:00.000000001Z"  # first run
S1_NS = timestamp_ns(S1) or 0
KILL_NS = S1_NS + 5_000_000_000  # a kill 5 s into the first run
S2 = "2024-05-01T10:00:10Z"  # a run that started after the kill
A = "a" * 64
B = "b" * 64
C = "c" * 64
D = "d" * 64


# Canned engine data.


def inspect_of(
    container_id: str,
    *,
    labels: Mapping[str, str] | None = None,
    running: bool = True,
    started: str = S1,
    paused: bool = False,
    health: str | None = None,
    stop_signal: str | None = None,
    name: str = "web-1",
) -> dict[str, Any]:
    state: dict[str, Any] = {"Running": running, "Paused": paused, "StartedAt": started}
    if health is not None:
        state["Health"] = {"Status": health}
    config: dict[str, Any] = {"Labels": dict(LABELS if labels is None else labels)}
    if stop_signal is not None:
        config["StopSignal"] = stop_signal
    return {"Id": container_id, "Name": "/" + name, "State": state, "Config": config}


def fake_parse(
    inspect: Mapping[str, Any], *, prefix: str, pinned_env: str | None, own_networks: frozenset[str]
) -> ContainerSpec | Rejection | None:
    """Just enough of labels.parse_container for the watcher: the watcher must not care how parsing works."""
    labels = inspect["Config"]["Labels"] or {}
    service = labels.get(f"{prefix}.service")
    if not service:
        return None
    name = inspect["Name"].lstrip("/")
    port = labels.get(f"{prefix}.port", "80")
    if not port.isdigit():
        return Rejection(inspect["Id"], name, f"{prefix}.port", port, "not a number")
    state = inspect["State"]
    return ContainerSpec(
        container_id=inspect["Id"],
        name=name,
        service=service,
        address="127.0.0.1",
        port=int(port),
        hosts=(f"{service}.localhost",),
        running=state["Running"],
        paused=state["Paused"],
        health=(state.get("Health") or {}).get("Status"),
        started_at=state["StartedAt"],
    )


def observation(container_id: str, **kw: Any) -> Observation:
    return observe(inspect_of(container_id, **kw), fake_parse, prefix=PREFIX, pinned_env=None, own_networks=frozenset())


def event(
    action: str,
    container_id: str,
    *,
    time_ns: int | None = None,
    labels: Mapping[str, str] | None = None,
    **attributes: str,
) -> dict[str, Any]:
    attrs = {"name": "web-1", "image": "labelgw-test-busybox", **(LABELS if labels is None else labels), **attributes}
    result: dict[str, Any] = {
        "Type": "container",
        "Action": action,
        "status": action,
        "id": container_id,
        "Actor": {"ID": container_id, "Attributes": attrs},
    }
    if time_ns is not None:
        result["timeNano"] = time_ns
    return result


def network_event(action: str, container_id: str) -> dict[str, Any]:
    return {
        "Type": "network",
        "Action": action,
        "Actor": {"ID": "n" * 64, "Attributes": {"container": container_id, "name": "lgw-a", "type": "bridge"}},
    }


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def apply(self, container_id: str, outcome: Any) -> None:
        self.calls.append(("apply", container_id, outcome))

    def mark_down(self, container_id: str) -> None:
        self.calls.append(("mark_down", container_id))

    def remove(self, container_id: str) -> None:
        self.calls.append(("remove", container_id))

    def resync(self, outcomes: Mapping[str, Any]) -> None:
        self.calls.append(("resync", dict(outcomes)))

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls

    def resyncs(self) -> list[dict[str, Any]]:
        return [call[1] for call in self.calls if call[0] == "resync"]


# The tracker, directly.


class Harness:
    """A tracker whose inspect requests queue up until the test answers them."""

    def __init__(self) -> None:
        self.sink = RecordingSink()
        self.requests: collections.deque[tuple[str, int]] = collections.deque()
        self.own_changes = 0
        self.tracker = ContainerTracker(
            self.sink, lambda cid, gen: self.requests.append((cid, gen)), prefix=PREFIX,
            on_own_networks_changed=self._own_changed,
        )

    def _own_changed(self) -> None:
        self.own_changes += 1

    def answer(self, result: Observation | object) -> tuple[str, int]:
        container_id, generation = self.requests.popleft()
        self.tracker.inspected(container_id, generation, result)  # type: ignore[arg-type]
        return container_id, generation

    def routed(self, container_id: str, **kw: Any) -> ContainerSpec:
        """Bring a container into the sink as running and ready (start event + inspect)."""
        self.tracker.handle_event(event("start", container_id))
        self.answer(observation(container_id, **kw))
        calls = self.sink.take()
        assert calls[-1][0] == "apply"
        return calls[-1][2]


def test_start_event_inspects_then_applies_a_ready_spec() -> None:
    h = Harness()
    h.tracker.handle_event(event("start", A))
    assert list(h.requests) == [(A, 1)]
    assert h.sink.calls == []
    h.answer(observation(A))
    [(method, cid, spec)] = h.sink.take()
    assert (method, cid) == ("apply", A)
    assert isinstance(spec, ContainerSpec) and spec.ready and spec.port == 8080


@pytest.mark.parametrize("sent", ["15", "9", "2", "3", None])
def test_kill_with_a_terminating_signal_marks_down_without_inspecting(sent: str | None) -> None:
    h = Harness()
    h.routed(A)
    kill = event("kill", A, time_ns=KILL_NS, signal=sent) if sent else event("kill", A, time_ns=KILL_NS)
    h.tracker.handle_event(kill)
    assert h.sink.take() == [("mark_down", A)]
    assert not h.requests


@pytest.mark.parametrize("sent", ["1", "10", "28"])
def test_kill_with_another_signal_leaves_the_container_in_rotation(sent: str) -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS, signal=sent))
    assert h.sink.take() == []
    assert not h.requests


def test_kill_with_the_containers_own_stop_signal_marks_down() -> None:
    h = Harness()
    h.routed(A, stop_signal="SIGWINCH")  # httpd's STOPSIGNAL: what `docker stop` sends it
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS, signal="28"))
    assert h.sink.take() == [("mark_down", A)]


@pytest.mark.parametrize("action", ["stop", "die", "pause"])
def test_down_actions_mark_down_once(action: str) -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event(action, A, time_ns=KILL_NS))
    h.tracker.handle_event(event(action, A, time_ns=KILL_NS + 1))
    assert h.sink.take() == [("mark_down", A)]


@pytest.mark.parametrize(
    "incoming",
    [
        event("rename", A, oldName="/web-old"),
        event("update", A),
        event("health_status: healthy", A),
        event("unpause", A),
        event("restart", A),
        event("oom", A),
        event("create", A),
        network_event("connect", A),
        network_event("disconnect", A),
    ],
    ids=lambda e: e["Action"],
)
def test_changes_are_reinspected(incoming: dict[str, Any]) -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(incoming)
    assert [cid for cid, _ in h.requests] == [A]
    h.answer(observation(A, name="web-renamed"))
    [(method, cid, spec)] = h.sink.take()
    assert (method, cid, spec.name) == ("apply", A, "web-renamed")


def test_an_unchanged_inspect_is_not_reapplied() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("update", A))
    h.answer(observation(A))
    assert h.sink.take() == []


def test_health_status_unhealthy_makes_the_spec_not_ready() -> None:
    h = Harness()
    h.routed(A, health="healthy")
    h.tracker.handle_event(event("health_status: unhealthy", A))
    h.answer(observation(A, health="unhealthy"))
    [(_, _, spec)] = h.sink.take()
    assert not spec.ready


def test_a_stale_inspect_is_ignored_and_the_newest_state_asked_for() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("update", A))
    h.tracker.handle_event(event("pause", A))  # arrives while the inspect for update is in flight
    assert h.sink.take() == [("mark_down", A)]
    h.answer(observation(A))  # the state before the pause: must not put A back in rotation
    assert h.sink.take() == []
    assert list(h.requests) == [(A, 3)]
    h.answer(observation(A, paused=True))
    [(method, cid, spec)] = h.sink.take()
    assert method == "apply" and spec.paused and not spec.ready


def test_a_burst_of_events_costs_one_inspect_in_flight() -> None:
    h = Harness()
    for incoming in (event("create", A), network_event("connect", A), event("start", A)):
        h.tracker.handle_event(incoming)
    assert len(h.requests) == 1
    h.answer(observation(A, running=False))  # answered for create: stale by now
    assert h.sink.take() == []
    assert len(h.requests) == 1
    h.answer(observation(A))
    assert [call[0] for call in h.sink.take()] == ["apply"]


def test_stopping_sticks_while_the_same_run_is_still_running() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS, signal="15"))
    h.tracker.handle_event(event("health_status: healthy", A))  # docker stop waits up to 10 s
    h.answer(observation(A, started=S1, running=True, health="healthy"))
    calls = h.sink.take()
    assert calls[0] == ("mark_down", A)
    [(method, _, spec)] = calls[1:]
    assert method == "apply" and spec.running is False and not spec.ready


def test_stopping_sticks_across_a_resync() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS, signal="15"))
    h.sink.take()
    listing = h.tracker.begin_listing()
    generation = h.tracker.listed_labelled(listing, A)
    h.tracker.finish_listing(listing, {A: (generation, observation(A, started=S1))})
    [outcomes] = h.sink.resyncs()
    assert outcomes[A].running is False and not outcomes[A].ready
    # ... and again at the next periodic resync, as long as that run is up.
    h.sink.take()
    listing = h.tracker.begin_listing()
    generation = h.tracker.listed_labelled(listing, A)
    h.tracker.finish_listing(listing, {A: (generation, observation(A, started=S1))})
    assert h.sink.resyncs()[0][A].running is False


def test_a_restart_with_a_new_started_at_comes_back() -> None:
    h = Harness()
    h.routed(A)
    for action in ("kill", "die", "stop"):
        h.tracker.handle_event(event(action, A, time_ns=KILL_NS, signal="15"))
    h.tracker.handle_event(event("start", A, time_ns=KILL_NS + 10))
    h.answer(observation(A, started=S2))
    calls = h.sink.take()
    assert calls[0] == ("mark_down", A)
    assert calls[-1][0] == "apply" and calls[-1][2].ready and calls[-1][2].started_at == S2


def test_a_new_run_seen_only_by_a_resync_comes_back() -> None:
    """Events lost (stream down): the listing shows a run that began after the kill."""
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS))
    listing = h.tracker.begin_listing()
    generation = h.tracker.listed_labelled(listing, A)
    h.tracker.finish_listing(listing, {A: (generation, observation(A, started=S2))})
    assert h.sink.resyncs()[-1][A].ready


def test_kill_before_the_first_inspect_still_sticks() -> None:
    """The kill came before we ever saw the run: its time, not a remembered StartedAt, decides."""
    h = Harness()
    h.tracker.handle_event(event("start", A))
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS))
    h.answer(observation(A, started=S1))  # stale (asked for start): asked again
    h.answer(observation(A, started=S1))
    [(method, _, spec)] = h.sink.take()  # no mark_down: nothing of A was in rotation yet
    assert method == "apply" and spec.running is False


def test_mark_down_is_only_sent_for_a_container_in_rotation() -> None:
    h = Harness()
    h.routed(A, health="starting")  # not ready: the sink has nothing of A in rotation
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS))
    assert h.sink.take() == []


def test_a_stopped_container_ends_the_stopping_state() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS))
    h.tracker.handle_event(event("die", A, time_ns=KILL_NS + 1))
    h.tracker.handle_event(event("update", A))
    h.answer(observation(A, running=False))
    assert h.sink.take()[-1][2].running is False
    # Started again without our seeing the start event: a run newer than the kill is routed.
    h.tracker.handle_event(event("update", A))
    h.answer(observation(A, started=S2))
    assert h.sink.take()[-1][2].ready


def test_destroy_removes_and_a_late_inspect_is_dropped() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("rename", A))
    h.tracker.handle_event(event("destroy", A))
    assert h.sink.take() == [("remove", A)]
    h.answer(observation(A))
    assert h.sink.take() == []
    assert A not in h.tracker.tracked()


def test_inspect_404_means_gone() -> None:
    h = Harness()
    h.routed(A)
    h.tracker.handle_event(event("rename", A))
    h.answer(GONE)
    assert h.sink.take() == [("remove", A)]
    assert A not in h.tracker.tracked()


def test_unlabelled_containers_cost_nothing() -> None:
    h = Harness()
    h.tracker.handle_event(event("create", B, labels={"com.example": "x"}))
    h.tracker.handle_event(network_event("connect", B))
    h.tracker.handle_event(event("start", B, labels={}))
    h.tracker.handle_event(event("kill", B, labels={}, signal="15"))
    h.tracker.handle_event(event("destroy", B, labels={}))
    assert not h.requests and h.sink.calls == []


def test_exec_and_other_noise_is_ignored() -> None:
    h = Harness()
    h.routed(A)
    for action in ("exec_create: sh -c true", "exec_start: sh -c true", "exec_die", "attach", "top", "resize"):
        h.tracker.handle_event(event(action, A))
    h.tracker.handle_event({"Type": "image", "Action": "pull", "Actor": {"ID": "busybox"}})
    h.tracker.handle_event({"Type": "network", "Action": "create", "Actor": {"ID": "n", "Attributes": {}}})
    assert not h.requests and h.sink.calls == []


def test_a_rejection_is_applied_like_a_spec() -> None:
    h = Harness()
    h.tracker.handle_event(event("start", A, labels={"labelgw.service": "web", "labelgw.port": "http"}))
    h.answer(observation(A, labels={"labelgw.service": "web", "labelgw.port": "http"}))
    [(method, _, outcome)] = h.sink.take()
    assert method == "apply" and isinstance(outcome, Rejection)


def test_own_container_network_change_asks_for_a_resync() -> None:
    h = Harness()
    h.tracker.own_container_id = D
    h.tracker.handle_event(network_event("connect", D))
    assert h.own_changes == 1 and not h.requests


def test_resync_merges_what_events_did_during_the_listing() -> None:
    h = Harness()
    h.routed(A)
    h.routed(D)  # gone while we were not looking: absent from the listing
    listing = h.tracker.begin_listing()
    gens = {cid: h.tracker.listed_labelled(listing, cid) for cid in (A, C)}
    h.tracker.listed_unlabelled(listing, "e" * 64)
    # Meanwhile: A is killed, B is created and started (too late for the list), C is destroyed.
    h.tracker.handle_event(event("kill", A, time_ns=KILL_NS, signal="15"))
    h.tracker.handle_event(event("start", B))
    h.answer(observation(B))
    h.tracker.handle_event(event("destroy", C))
    assert h.sink.take() == [("mark_down", A), ("apply", B, fake_parse(inspect_of(B), prefix=PREFIX, pinned_env=None, own_networks=frozenset())), ("remove", C)]
    # The listing's inspects were all made before those events.
    summary = h.tracker.finish_listing(
        listing, {A: (gens[A], observation(A)), C: (gens[C], observation(C))}
    )
    [outcomes] = h.sink.resyncs()
    assert set(outcomes) == {A, B}  # D removed, C destroyed, B kept
    assert outcomes[A].running is False  # the stale listing may not undo the kill
    assert outcomes[B].ready
    assert list(h.requests) == [(A, h.tracker._tracks[A].generation)]  # A looked at again
    assert summary is not None and summary.containers == 3 and summary.reinspected == 1


def test_resync_leaves_out_a_container_removed_between_list_and_inspect() -> None:
    h = Harness()
    listing = h.tracker.begin_listing()
    generation = h.tracker.listed_labelled(listing, A)
    h.tracker.finish_listing(listing, {A: (generation, GONE)})
    assert h.sink.resyncs() == [{}]
    assert A not in h.tracker.tracked()


def test_an_abandoned_listing_is_not_delivered() -> None:
    h = Harness()
    old = h.tracker.begin_listing()
    h.tracker.begin_listing()
    assert h.tracker.finish_listing(old, {}) is None
    assert h.sink.calls == []


def test_a_failing_sink_does_not_break_the_tracker() -> None:
    class Broken(RecordingSink):
        def apply(self, container_id: str, outcome: Any) -> None:
            raise RuntimeError("registry bug")

    logged: list[dict[str, Any]] = []
    h = Harness()
    h.tracker.__dict__["_log"] = Logger(observer=logged.append)  # type: ignore[arg-type]
    h.tracker._sink = Broken()
    h.tracker.handle_event(event("start", A))
    h.answer(observation(A))
    assert any(entry.get("method") == "apply" and "log_failure" in entry for entry in logged)


# Small pure helpers.


def test_timestamps() -> None:
    assert timestamp_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert timestamp_ns("1970-01-01T01:00:00+01:00") == 0
    assert (timestamp_ns("2024-05-01T10:00:00.123456789Z") or 0) % 1_000_000_000 == 123456789
    assert timestamp_ns("0001-01-01T00:00:00Z") is not None  # never started
    assert timestamp_ns("yesterday") is None and timestamp_ns(None) is None


def test_signals() -> None:
    assert signal_number("15") == 15
    assert signal_number("SIGTERM") == 15
    assert signal_number("quit") == 3
    assert signal_number("") is None and signal_number(None) is None and signal_number("SIGNOPE") is None


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.1, 5.0)
    delays = [round(backoff.next_delay(), 3) for _ in range(8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_a_parser_crash_becomes_a_rejection() -> None:
    def broken(inspect: Mapping[str, Any], **kw: Any) -> None:
        raise KeyError("Config")

    result = observe(inspect_of(A), broken, prefix=PREFIX, pinned_env=None, own_networks=frozenset())
    assert isinstance(result.outcome, Rejection) and "KeyError" in result.outcome.reason


def test_own_container_candidates() -> None:
    mountinfo = (
        "1 2 0:1 / / rw - overlay overlay rw\n"
        f"3 1 8:1 /var/lib/docker/containers/{A}/resolv.conf /etc/resolv.conf rw - ext4 /dev/sda1 rw\n"
        f"4 1 8:1 /var/lib/docker/containers/{A}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n"
    )
    cgroup = f"0::/system.slice/docker-{B}.scope\n"
    assert own_container_candidates(mountinfo, cgroup, C[:12]) == [A, B, C[:12]]
    assert own_container_candidates("", "0::/\n", "my-laptop") == []


class OwnApi:
    def __init__(self, known: Mapping[str, Mapping[str, Any]]) -> None:
        self.known = known

    def inspect_container(self, candidate: str) -> Mapping[str, Any]:
        for container_id, info in self.known.items():
            if container_id.startswith(candidate):
                return info
        raise docker.errors.NotFound("no such container")


def test_detect_own_container_by_hostname() -> None:
    info = {"Id": A, "NetworkSettings": {"Networks": {"lgw-a": {}, "lgw-b": {}}}}
    found = detect_own_container(OwnApi({A: info}), read_text=lambda path: "", hostname=A[:12])
    assert found.container_id == A and found.networks == frozenset({"lgw-a", "lgw-b"})


def test_detect_own_container_outside_docker_finds_nothing() -> None:
    found = detect_own_container(OwnApi({}), read_text=lambda path: "", hostname=C[:12])
    assert found.container_id is None and found.networks == frozenset() and not found.problem


# The DockerWatcher plumbing.


class Hold(BaseException):
    """Raised by a FakeStream that has run out of events: the fake reader 'blocks' (stays open)."""


class FakeStream:
    def __init__(self, items: list[Any], engine: "FakeEngine", hold: bool) -> None:
        self._items = collections.deque(items)
        self._engine = engine
        self._hold = hold
        self.closed = False

    def __iter__(self) -> "FakeStream":
        return self

    def __next__(self) -> Any:
        self._engine.calls.append("next")
        if self._items:
            item = self._items.popleft()
            if isinstance(item, BaseException):
                raise item
            return item
        if self._hold:
            raise Hold()
        raise StopIteration

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    """Shared by every client the factory makes. `streams`: one list of events per events() call."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.streams: collections.deque[list[Any]] = collections.deque()
        self.opened: list[FakeStream] = []
        self.unreachable = 0
        self.events_kwargs: list[dict[str, Any]] = []
        self.fail_listing = False
        self.hold = False

    def factory(self) -> "FakeClient":
        if self.unreachable:
            self.unreachable -= 1
            raise docker.errors.DockerException("Error while fetching server API version: connection refused")
        return FakeClient(self)


class FakeClient:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.closed = False

    def events(self, **kwargs: Any) -> FakeStream:
        self.engine.calls.append("events")
        self.engine.events_kwargs.append(kwargs)
        items = self.engine.streams.popleft() if self.engine.streams else []
        stream = FakeStream(items, self.engine, self.engine.hold)
        self.engine.opened.append(stream)
        return stream

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        assert all
        self.engine.calls.append("containers")
        if self.engine.fail_listing:
            raise docker.errors.APIError("500 Server Error: engine busy")
        return [
            {"Id": cid, "Labels": info["Config"]["Labels"], "State": "running"}
            for cid, info in self.engine.containers.items()
        ]

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.engine.calls.append(f"inspect {container_id[:1]}")
        try:
            return self.engine.containers[container_id]
        except KeyError:
            raise docker.errors.NotFound(f"No such container: {container_id}") from None

    def close(self) -> None:
        self.closed = True


class FakeReactor(Clock):
    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


class FakeThreads:
    """Pool jobs run at once (or queue with manual_pool); the reader runs at spawn until its stream ends
    (the returned Deferred fires) or holds (the Deferred stays pending until end_reader)."""

    def __init__(self, manual_pool: bool = False) -> None:
        self.manual_pool = manual_pool
        self.jobs: collections.deque[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]] = (
            collections.deque()
        )
        self.reader: Deferred[Any] | None = None
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.manual_pool:
            waiting: Deferred[Any] = Deferred()
            self.jobs.append((function, args, kwargs, waiting))
            return waiting
        try:
            return succeed(function(*args, **kwargs))
        except Exception:
            return fail()

    def run_jobs(self) -> None:
        while self.jobs:
            function, args, kwargs, waiting = self.jobs.popleft()
            try:
                result = function(*args, **kwargs)
            except Exception:
                waiting.errback(Failure())
            else:
                waiting.callback(result)

    def spawn(self, function: Callable[[], Any], name: str) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.reader = done
        try:
            result = function()
        except Hold:
            return done
        except Exception:
            done.errback(Failure())
        else:
            done.callback(result)
        return done

    def end_reader(self, result: Any = None) -> None:
        assert self.reader is not None and not self.reader.called
        if isinstance(result, BaseException):
            self.reader.errback(Failure(result))
        else:
            self.reader.callback(result)


class World:
    def __init__(self, manual_pool: bool = False, hold: bool = True, **kw: Any) -> None:
        self.reactor = FakeReactor()
        self.engine = FakeEngine()
        self.engine.hold = hold
        self.sink = RecordingSink()
        self.threads = FakeThreads(manual_pool=manual_pool)
        self.logged: list[dict[str, Any]] = []
        self.watcher = DockerWatcher(
            self.reactor,
            self.sink,
            self.engine.factory,
            docker_host="unix:///fake/docker.sock",
            parse=fake_parse,
            own_networks=frozenset(),
            threads_factory=lambda: self.threads,
            **kw,
        )
        self.watcher.__dict__["_log"] = Logger(observer=self.logged.append)  # type: ignore[arg-type]

    def push(self, incoming: Mapping[str, Any]) -> None:
        """An event read by the (held-open) reader thread."""
        self.reactor.callFromThread(self.watcher._on_event, self.watcher._cycle, incoming)

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(entry) for entry in self.logged]

    def reconnect_delay(self) -> float:
        call = self.watcher._reconnect_call
        assert call is not None and call.active()
        return round(call.getTime() - self.reactor.seconds(), 6)


def test_subscribes_before_listing_then_resyncs() -> None:
    world = World()
    world.engine.containers = {A: inspect_of(A), B: inspect_of(B, labels={"other": "x"})}
    world.watcher.startService()
    assert world.engine.calls[:3] == ["events", "containers", "inspect a"]
    assert "inspect b" not in world.engine.calls  # unlabelled: the list says so, no inspect
    [outcomes] = world.sink.resyncs()
    assert set(outcomes) == {A} and outcomes[A].ready
    assert world.watcher.connected and world.watcher.last_resync == 0.0
    [kwargs] = world.engine.events_kwargs
    assert kwargs["decode"] is True and kwargs["filters"] == dict(EVENT_FILTERS)
    assert set(kwargs["filters"]["type"]) == {"container", "network"}
    assert isinstance(kwargs["since"], str)  # a short replay closes the engine's subscribe window


def test_events_reach_the_sink_through_the_reader() -> None:
    world = World()
    world.engine.containers = {A: inspect_of(A)}
    world.engine.streams.append([event("kill", A, time_ns=KILL_NS, signal="15"), event("destroy", A)])
    world.watcher.startService()
    calls = world.sink.take()
    assert [call[0] for call in calls] == ["resync", "mark_down", "remove"]


def test_reader_hands_each_event_over_before_reading_the_next() -> None:
    engine = FakeEngine()
    engine.streams.append([event("start", A), event("die", A)])
    handed: list[str] = []

    class RecordingReactor:
        def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
            handed.append(function.__name__)
            engine.calls.append(f"handed {function.__name__}")

    watcher = DockerWatcher(RecordingReactor(), RecordingSink(), engine.factory, parse=fake_parse)
    watcher._read_events(1)
    assert engine.calls == [
        "events",
        "handed _on_subscribed",
        "next",
        "handed _on_event",
        "next",
        "handed _on_event",
        "next",
    ]


def test_an_event_inspect_answered_404_removes() -> None:
    world = World()
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    world.sink.take()
    del world.engine.containers[A]
    world.push(event("rename", A))
    assert world.sink.take() == [("remove", A)]


def test_rename_is_reinspected_through_the_pool() -> None:
    world = World()
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    world.sink.take()
    world.engine.containers[A] = inspect_of(A, name="web-renamed")
    world.push(event("rename", A, oldName="/web-1"))
    [(method, cid, spec)] = world.sink.take()
    assert (method, cid, spec.name) == ("apply", A, "web-renamed")


def test_unreachable_engine_retries_with_capped_backoff_then_resets() -> None:
    world = World()
    world.engine.unreachable = 8
    world.watcher.startService()
    delays = []
    for _ in range(8):
        delays.append(world.reconnect_delay())
        world.reactor.advance(delays[-1])
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert (
        "docker engine unreachable at unix:///fake/docker.sock: DockerException: Error while fetching "
        "server API version: connection refused; retrying in 0.1s"
    ) in world.messages()
    # The ninth attempt connects: resync, and the backoff starts over.
    assert world.watcher.connected and len(world.sink.resyncs()) == 1
    world.threads.end_reader()  # the stream ends (a daemon restart looks like this)
    assert not world.watcher.connected
    assert world.reconnect_delay() == 0.1
    assert "docker event stream from unix:///fake/docker.sock ended; reconnecting in 0.1s" in world.messages()


def test_stream_end_reconnects_and_resyncs_without_touching_the_sink_meanwhile() -> None:
    world = World()
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    world.sink.take()
    world.threads.end_reader(ConnectionResetError("engine went away"))
    assert world.sink.calls == []  # the last good routes stay
    assert "engine went away" in world.messages()[-1]
    # While it was away, A was replaced by B.
    world.engine.containers = {B: inspect_of(B)}
    world.reactor.advance(0.1)
    [outcomes] = world.sink.resyncs()
    assert set(outcomes) == {B}
    assert world.engine.calls.count("events") == 2


def test_a_failed_resync_reconnects_with_backoff() -> None:
    world = World()
    world.engine.fail_listing = True
    world.watcher.startService()
    assert world.sink.calls == []
    assert world.engine.opened[-1].closed  # stream closed from the reactor side ...
    world.threads.end_reader()  # ... which ends the reader
    assert world.reconnect_delay() == 0.1
    world.reactor.advance(0.1)
    world.threads.end_reader()
    assert world.reconnect_delay() == 0.2  # no successful resync yet: still backing off
    world.engine.fail_listing = False
    world.reactor.advance(0.2)
    assert len(world.sink.resyncs()) == 1


def test_a_stream_that_fails_at_once_keeps_backing_off() -> None:
    """E.g. a socket proxy that forbids /events: the listing works, the stream fails right away."""
    world = World(manual_pool=True, hold=False)
    forbidden = docker.errors.APIError("403 Client Error: Forbidden")
    world.engine.streams.extend([[forbidden], [forbidden], [forbidden]])
    world.watcher.startService()
    delays = []
    for _ in range(3):
        world.threads.run_jobs()  # the listing finishes after the stream failed: not a success
        delays.append(world.reconnect_delay())
        world.reactor.advance(delays[-1])
    assert delays == [0.1, 0.2, 0.4]
    assert world.sink.resyncs() == []
    assert "docker event stream from unix:///fake/docker.sock failed: APIError: 403 Client Error: Forbidden; reconnecting in 0.1s" in world.messages()


def test_periodic_resync_is_a_safety_net() -> None:
    world = World(resync_interval=60.0)
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    world.engine.containers[B] = inspect_of(B)  # an event we never got
    world.reactor.advance(59)
    assert len(world.sink.resyncs()) == 1
    world.reactor.advance(1)
    assert set(world.sink.resyncs()[-1]) == {A, B}
    assert world.watcher.last_resync == 60.0


def test_events_during_the_listing_are_merged() -> None:
    world = World(manual_pool=True)
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()  # subscribed; the listing job waits in the pool
    assert world.engine.calls == ["events", "next"]
    world.engine.containers[B] = inspect_of(B)
    world.push(event("start", B))  # after the list was asked for, before it ran
    world.push(event("kill", A, time_ns=KILL_NS, signal="15"))
    world.threads.run_jobs()
    [outcomes] = world.sink.resyncs()
    assert set(outcomes) == {A, B}
    assert outcomes[A].running is False and outcomes[B].ready


def test_a_listing_from_a_dropped_connection_is_discarded() -> None:
    world = World(manual_pool=True)
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    world.threads.end_reader()  # the stream ends while the listing waits
    world.threads.run_jobs()
    assert world.sink.resyncs() == []
    world.reactor.advance(0.1)
    world.threads.run_jobs()
    assert len(world.sink.resyncs()) == 1


def test_stop_closes_the_stream_and_waits_for_the_reader_and_the_pool() -> None:
    world = World()
    world.watcher.startService()
    stopped = world.watcher.stopService()
    assert world.engine.opened[-1].closed
    assert not stopped.called  # the reader thread is still inside next()
    world.threads.end_reader()
    assert stopped.called and world.threads.stopped
    assert world.watcher._reconnect_call is None  # no reconnect after a stop
    assert world.reactor.getDelayedCalls() == []


def test_stop_does_not_wait_forever_for_a_stuck_reader() -> None:
    world = World(stop_timeout=5.0)
    world.watcher.startService()
    world.engine.opened[-1].close = lambda: None  # type: ignore[method-assign]  # a stream that will not end
    stopped = world.watcher.stopService()
    world.reactor.advance(4.9)
    assert not stopped.called
    world.reactor.advance(0.1)
    assert stopped.called and world.threads.stopped
    assert any("did not finish within 5.0s" in message for message in world.messages())


def test_stop_while_retrying_cancels_the_retry() -> None:
    world = World()
    world.engine.unreachable = 1
    world.watcher.startService()
    assert world.watcher._reconnect_call is not None
    stopped = world.watcher.stopService()
    assert stopped.called and world.reactor.getDelayedCalls() == []


def test_the_default_parser_is_labels_parse_container() -> None:
    from labelgw.core.labels import parse_container

    watcher = DockerWatcher(FakeReactor(), RecordingSink(), FakeEngine().factory)
    assert watcher._parse_function() is parse_container


def test_the_tracker_is_pure() -> None:
    # The state machine needs no Docker SDK and no reactor: it runs (and is tested) without them.
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, labelgw.docker.tracker; print(sorted({'docker', 'twisted.internet.reactor'} & set(sys.modules)))"
    root = Path(__file__).resolve().parent.parent  # the working tree's labelgw, first on the path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"
