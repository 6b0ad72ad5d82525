"""DockerWatcher against the real engine ($DOCKER_HOST), on the real reactor. Sends no traffic to containers.

A recording sink notes the wall-clock time of every call; a separate event subscription (in its own thread)
notes the engine's timeNano of the same container's events, so the delay event -> sink call is measured on one
clock (the engine runs on this host). Run with -s to see the figures.

Uses `docker_client` (docker.DockerClient), `busybox_image` and `unique_name` from tests/conftest.py.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

import docker
import pytest_twisted
from twisted.internet import defer, task, threads

from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec
from labelgw.docker.watcher import DockerWatcher
from support import docker_host_url

LABELS = {"labelgw.service": "x", "labelgw.port": "8080"}
# Generous bound for a noisy 2-core machine; the target (printed) is < 50 ms.
MAX_DELAY_MS = 1000.0


@dataclass(frozen=True)
class SinkCall:
    at_ns: int
    method: str
    container_id: str
    outcome: Any = None


class LiveSink:
    """Records each call with time.time_ns(); tests wait for a call matching a predicate."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.calls: list[SinkCall] = []
        self._waiters: list[tuple[Callable[[SinkCall], bool], int, defer.Deferred[SinkCall]]] = []

    def _record(self, method: str, container_id: str, outcome: Any = None) -> None:
        call = SinkCall(time.time_ns(), method, container_id, outcome)
        self.calls.append(call)
        index = len(self.calls) - 1
        for waiter in list(self._waiters):
            predicate, after, waiting = waiter
            if index >= after and predicate(call):
                self._waiters.remove(waiter)
                waiting.callback(call)

    def apply(self, container_id: str, outcome: Any) -> None:
        self._record("apply", container_id, outcome)

    def mark_down(self, container_id: str) -> None:
        self._record("mark_down", container_id)

    def remove(self, container_id: str) -> None:
        self._record("remove", container_id)

    def resync(self, outcomes: Any) -> None:
        self._record("resync", "", dict(outcomes))

    def wait_for(
        self, predicate: Callable[[SinkCall], bool], after: int = 0, timeout: float = 15.0
    ) -> defer.Deferred[SinkCall]:
        for call in self.calls[after:]:
            if predicate(call):
                return defer.succeed(call)
        waiting: defer.Deferred[SinkCall] = defer.Deferred()
        self._waiters.append((predicate, after, waiting))
        waiting.addTimeout(timeout, self._reactor)
        return waiting


class EventProbe:
    """The engine's own record of one container's events, read in a daemon thread."""

    def __init__(self, base_url: str, container_name: str) -> None:
        self._client = docker.APIClient(base_url=base_url, timeout=10)
        self._stream = self._client.events(
            decode=True, filters={"container": [container_name]}, since=f"{time.time() - 1:.9f}"
        )
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, name="event-probe", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except Exception:
            pass

    def find(self, action: str, after_ns: int = 0) -> dict[str, Any] | None:
        for event in list(self.events):
            if event.get("Action") == action and event.get("timeNano", 0) > after_ns:
                return event
        return None

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._client.close()


@defer.inlineCallbacks
def _event(probe: EventProbe, action: str, reactor: Any, after_ns: int = 0) -> Generator[Any, Any, dict[str, Any]]:
    """The probe's event (it may land a moment after the watcher's): poll, bounded."""
    for _ in range(200):
        found = probe.find(action, after_ns)
        if found is not None:
            return found
        yield task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"no {action} event seen by the probe")


def _ms(later_ns: int, earlier_ns: int) -> float:
    return (later_ns - earlier_ns) / 1e6


def _ready_for(container_id: str) -> Callable[[SinkCall], bool]:
    return lambda call: (
        call.method == "apply"
        and call.container_id == container_id
        and isinstance(call.outcome, ContainerSpec)
        and call.outcome.ready
    )


def _called(method: str, container_id: str) -> Callable[[SinkCall], bool]:
    return lambda call: call.method == method and call.container_id == container_id


@pytest_twisted.inlineCallbacks
def test_watcher_follows_a_container_on_the_real_engine(
    docker_client: docker.DockerClient, busybox_image: str, unique_name: Callable[[str], str]
) -> Generator[Any, Any, None]:
    from twisted.internet import reactor

    base_url = docker_host_url()
    sink = LiveSink(reactor)
    watcher = DockerWatcher(
        reactor, sink, docker_host=base_url, parse=parse_container, own_networks=frozenset(), stop_timeout=5.0
    )
    name = unique_name("watcher")
    probe = yield threads.deferToThread(EventProbe, base_url, name)  # subscribing blocks: not on the reactor
    container: Any = None
    figures: dict[str, list[float]] = {}

    def note(what: str, delay_ms: float) -> None:
        figures.setdefault(what, []).append(delay_ms)

    watcher.startService()
    try:
        yield sink.wait_for(lambda call: call.method == "resync", timeout=20)
        yield task.deferLater(reactor, 0, lambda: None)  # the waiter fired inside sink.resync: let it return
        assert watcher.connected and watcher.last_resync is not None

        container = yield threads.deferToThread(
            docker_client.containers.run,
            busybox_image,
            ["sleep", "3600"],
            name=name,
            detach=True,
            network_mode="host",
            labels=LABELS,
        )
        applied = yield sink.wait_for(_ready_for(container.id))
        started = yield _event(probe, "start", reactor)
        note("start -> apply(ready)", _ms(applied.at_ns, started["timeNano"]))
        assert applied.outcome.service == "x" and applied.outcome.port == 8080

        # More samples, quickly: pause takes it out of rotation (no inspect), unpause puts it back (inspect).
        for _ in range(5):
            mark = len(sink.calls)
            yield threads.deferToThread(container.pause)
            down = yield sink.wait_for(_called("mark_down", container.id), after=mark)
            paused = yield _event(probe, "pause", reactor, after_ns=applied.at_ns)
            note("pause -> mark_down", _ms(down.at_ns, paused["timeNano"]))
            mark = len(sink.calls)
            yield threads.deferToThread(container.unpause)
            applied = yield sink.wait_for(_ready_for(container.id), after=mark)
            unpaused = yield _event(probe, "unpause", reactor, after_ns=down.at_ns)
            note("unpause -> apply(ready)", _ms(applied.at_ns, unpaused["timeNano"]))

        # docker stop -t 1: SIGTERM (ignored by sleep as pid 1), SIGKILL a second later, then die.
        mark = len(sink.calls)
        yield threads.deferToThread(container.stop, timeout=1)
        down = yield sink.wait_for(_called("mark_down", container.id), after=mark)
        killed = yield _event(probe, "kill", reactor, after_ns=applied.at_ns)
        died = yield _event(probe, "die", reactor, after_ns=applied.at_ns)
        note("kill -> mark_down", _ms(down.at_ns, killed["timeNano"]))
        assert down.at_ns < died["timeNano"], "mark_down must come before die"
        assert not any(_ready_for(container.id)(call) for call in sink.calls[mark:]), "back in rotation while stopping"

        mark = len(sink.calls)
        yield threads.deferToThread(container.remove)
        removed = yield sink.wait_for(_called("remove", container.id), after=mark)
        destroyed = yield _event(probe, "destroy", reactor, after_ns=down.at_ns)
        note("destroy -> remove", _ms(removed.at_ns, destroyed["timeNano"]))
        container = None
    finally:
        stopping_started = time.monotonic()
        yield watcher.stopService()
        stop_ms = (time.monotonic() - stopping_started) * 1000
        probe.close()
        if container is not None:
            yield threads.deferToThread(container.remove, force=True)

    print("\nevent -> sink delay (ms, engine timeNano to sink call; target < 50):")
    for what, values in figures.items():
        print(
            f"  {what:26s} n={len(values)} median={statistics.median(values):6.2f} max={max(values):6.2f}"
        )
    print(f"  stopService took {stop_ms:.1f} ms")
    for what, values in figures.items():
        assert max(values) < MAX_DELAY_MS, (what, values)
    assert not watcher.connected
