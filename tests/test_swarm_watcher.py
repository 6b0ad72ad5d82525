"""labelgw.docker.swarm_watcher, deterministic: a fake engine answering with JSON captured from the test engine,
a task.Clock reactor whose callFromThread runs at once, and pool jobs run synchronously."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import docker.errors
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from labelgw.cli import config
from labelgw.cli.tap import Options
from labelgw.docker.swarm_watcher import SWARM_EVENT_FILTERS, SwarmWatcher

DATA = Path(__file__).parent / "data" / "swarm"
NODES = json.loads((DATA / "nodes.json").read_text())


def load(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads((DATA / f"{name}.json").read_text())
    return data["service"], data["tasks"]


class Reactor(Clock):
    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


class Threads:
    """Pool jobs run at once; the event reader thread is never started (tests feed events themselves)."""

    def __init__(self) -> None:
        self.spawned: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return maybeDeferred(lambda: None)

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return maybeDeferred(function, *args, **kwargs)

    def spawn(self, function: Callable[[], Any], name: str) -> Deferred[Any]:
        self.spawned.append(name)
        return Deferred()


class Engine:
    """The SDK calls the watcher makes, answered from a service + tasks snapshot."""

    def __init__(self) -> None:
        self.listed_services: list[dict[str, Any]] = []
        self.listed_tasks: list[dict[str, Any]] = []
        self.problem: Exception | None = None
        self.calls: list[str] = []

    def show(self, *names: str) -> None:
        self.listed_services, self.listed_tasks = [], []
        for name in names:
            service, tasks = load(name)
            self.listed_services.append(service)
            self.listed_tasks.extend(tasks)

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.problem is not None:
            raise self.problem

    def services(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        self._check("services")
        assert filters == {"label": "labelgw.service"}
        return copy.deepcopy(self.listed_services)

    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._check("tasks")
        wanted = (filters or {}).get("service")
        wanted = [wanted] if isinstance(wanted, str) else wanted
        return [copy.deepcopy(t) for t in self.listed_tasks if wanted is None or t["ServiceID"] in wanted]

    def inspect_service(self, service_id: str) -> dict[str, Any]:
        self._check("inspect_service")
        for service in self.listed_services:
            if service["ID"] == service_id:
                return copy.deepcopy(service)
        raise docker.errors.NotFound("no such service")

    def nodes(self) -> list[dict[str, Any]]:
        self._check("nodes")
        return copy.deepcopy(NODES)

    def close(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}
        self.calls: list[str] = []

    def apply(self, key: str, outcome: Any) -> None:
        self.calls.append(f"apply {key[:5]} {'ready' if outcome.ready else 'down'}")
        self.routes[key] = outcome

    def mark_down(self, key: str) -> None:
        self.calls.append(f"mark_down {key[:5]}")
        self.routes[key] = dataclasses.replace(self.routes[key], running=False)

    def remove(self, key: str) -> None:
        self.calls.append(f"remove {key[:5]}")
        self.routes.pop(key, None)

    def resync(self, outcomes: Any) -> None:
        raise AssertionError("never")


def make(engine: Engine) -> tuple[SwarmWatcher, Sink, Reactor, Threads]:
    reactor, sink, threads = Reactor(), Sink(), Threads()
    watcher = SwarmWatcher(reactor, sink, lambda: engine, threads_factory=lambda: threads)
    return watcher, sink, reactor, threads


def captured_logs() -> tuple[list[dict[str, Any]], Callable[[], None]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def texts(events: list[dict[str, Any]], level: LogLevel) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events if event.get("log_level") == level]


def test_the_first_poll_routes_the_labelled_services_and_every_poll_after_lists_again() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, threads = make(engine)
    watcher.startService()
    assert threads.spawned == ["labelgw-swarm-events-1"]
    assert [call.split()[0] for call in sink.calls] == ["apply"] and watcher.resyncs == 1
    engine.show("host_update_04")
    reactor.advance(1.0)
    assert sum(1 for spec in sink.routes.values() if spec.ready) == 2
    engine.show()
    reactor.advance(1.0)
    assert sink.routes == {}
    watcher.stopService()


def test_a_node_outside_the_swarm_is_a_warning_once_and_a_retry_every_poll() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, _ = make(engine)
    events, stop = captured_logs()
    try:
        watcher.startService()
        routed = dict(sink.routes)
        response = type("Response", (), {"status_code": 503, "reason": "Service Unavailable"})()
        engine.problem = docker.errors.APIError(
            "503 Server Error", response=response,  # type: ignore[arg-type]
            explanation="This node is not a swarm manager. Use \"docker swarm init\" or \"docker swarm join\"",
        )
        polls = len(engine.calls)
        reactor.advance(1.0)
        reactor.advance(1.0)
        reactor.advance(1.0)
        assert len(engine.calls) == polls + 3  # one failing call per poll, never a crash
        assert sink.routes == routed  # the last routes are kept
        warnings = [text for text in texts(events, LogLevel.warn) if "swarm" in text]
        assert len(warnings) == 1
        assert "not a swarm manager" in warnings[0] and "retrying every 1.0s" in warnings[0]
        assert watcher.swarm_problem is not None
        engine.problem = RuntimeError("context canceled")
        reactor.advance(1.0)
        assert len([text for text in texts(events, LogLevel.warn) if "swarm" in text]) == 1
        assert any("still unavailable" in text and "context canceled" in text for text in texts(events, LogLevel.info))
        engine.problem = None
        engine.show()
        reactor.advance(1.0)
        assert watcher.swarm_problem is None and sink.routes == {}
        assert any("listed again" in text for text in texts(events, LogLevel.info))
    finally:
        stop()
        watcher.stopService()


def test_an_unreachable_engine_is_retried_too() -> None:
    engine = Engine()
    engine.problem = ConnectionRefusedError(111, "Connection refused")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    reactor.advance(3.0)
    assert watcher.swarm_problem == "Connection refused" and sink.routes == {}
    watcher.stopService()


def service_event(service_id: str, action: str = "update") -> dict[str, Any]:
    return {"Type": "service", "Action": action, "Actor": {"ID": service_id, "Attributes": {"name": "web"}}}


def test_a_service_event_lists_that_service_at_once_and_again_while_it_settles() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    watcher._on_subscribed(watcher._cycle, iter(()))
    service_id = engine.listed_services[0]["ID"]
    engine.show("host_update_02")  # the new task is being assigned
    engine.calls.clear()
    watcher._on_event(watcher._cycle, service_event(service_id))
    assert engine.calls == ["inspect_service", "tasks"]  # no poll needed; the node is known
    assert any("down" in call for call in sink.calls)  # the new task, known but not in rotation yet
    reactor.advance(0.1)
    assert engine.calls.count("inspect_service") == 2  # settling: looked at again after 0.1 s
    engine.show("host_update_04")  # both run
    reactor.advance(0.1)
    assert sum(1 for spec in sink.routes.values() if spec.ready) == 2
    calls = engine.calls.count("inspect_service")
    reactor.advance(0.5)
    assert engine.calls.count("inspect_service") == calls  # settled: back to the poll alone
    assert watcher.events_received == 1
    watcher.stopService()


def test_settling_stops_after_settle_for_seconds() -> None:
    engine = Engine()
    engine.show("host_update_02")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    watcher._on_event(watcher._cycle, service_event(engine.listed_services[0]["ID"]))
    for _ in range(120):
        reactor.advance(0.1)
    before = engine.calls.count("inspect_service")
    reactor.advance(0.1)
    reactor.advance(0.1)
    assert engine.calls.count("inspect_service") == before
    watcher.stopService()


def test_a_removed_service_is_removed_at_its_event() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    service_id = engine.listed_services[0]["ID"]
    engine.show()
    watcher._on_event(watcher._cycle, service_event(service_id, "remove"))
    assert sink.routes == {} and sink.calls[-1].startswith("remove")
    watcher.stopService()


def test_a_task_container_kill_takes_it_out_of_rotation_and_lists_its_service() -> None:
    engine = Engine()
    engine.show("host_update_04")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    old = next(t for t in engine.listed_tasks if t["Spec"]["ContainerSpec"]["Command"][3].endswith("18091") and "Args" not in t["Spec"]["ContainerSpec"])
    engine.calls.clear()
    sink.calls.clear()
    watcher._on_event(watcher._cycle, {
        "Type": "container", "Action": "kill",
        "Actor": {"ID": "c" * 64, "Attributes": {
            "com.docker.swarm.task.id": old["ID"], "com.docker.swarm.service.id": old["ServiceID"], "signal": "15",
        }},
    })
    assert sink.calls[0] == f"mark_down {old['ID'][:5]}"
    assert engine.calls[:2] == ["inspect_service", "tasks"]
    assert not sink.routes[old["ID"]].ready
    watcher.stopService()


def test_a_node_event_lists_everything() -> None:
    engine = Engine()
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    engine.calls.clear()
    watcher._on_event(watcher._cycle, {"Type": "node", "Action": "update", "Actor": {"ID": NODES[0]["ID"]}})
    assert engine.calls == ["services", "nodes"]
    watcher.stopService()


def test_events_of_an_old_stream_are_ignored_and_the_filters_name_the_kinds() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    engine.calls.clear()
    watcher._on_event(watcher._cycle - 1, service_event(engine.listed_services[0]["ID"]))
    assert engine.calls == [] and watcher.events_received == 0
    assert SWARM_EVENT_FILTERS == {"type": ["service", "node", "container"]}
    watcher.stopService()


def test_a_reader_that_ends_reconnects_with_backoff() -> None:
    engine = Engine()
    watcher, sink, reactor, threads = make(engine)
    watcher.startService()
    watcher._on_subscribed(watcher._cycle, iter(()))
    assert watcher.connected
    watcher._reader_ended(None, watcher._cycle)
    assert not watcher.connected and watcher.reconnects == 1
    reactor.advance(0.1)
    assert threads.spawned == ["labelgw-swarm-events-1", "labelgw-swarm-events-2"]
    watcher.stopService()


def test_stopping_ends_polls_and_settling() -> None:
    engine = Engine()
    engine.show("host_update_02")
    watcher, sink, reactor, _ = make(engine)
    watcher.startService()
    watcher._on_event(watcher._cycle, service_event(engine.listed_services[0]["ID"]))
    done = watcher.stopService()
    fired: list[object] = []
    done.addBoth(fired.append)
    calls = len(engine.calls)
    reactor.advance(5.0)
    assert len(engine.calls) == calls and fired == [None]
    assert reactor.getDelayedCalls() == []


def test_the_options_turn_swarm_mode_on_with_its_poll_interval() -> None:
    options = Options()
    options.parseOptions(["--swarm", "--swarm-poll", "0.5"])
    assert options.settings.swarm is True and options.settings.swarm_poll == 0.5
    options = Options()
    options.parseOptions([])
    assert options.settings.swarm is False and options.settings.swarm_poll == 1.0
    settings = config.build({}, {"swarm": True, "swarm_poll": 2})
    assert settings.swarm and settings.swarm_poll == 2.0


def test_the_app_makes_a_swarm_watcher_in_swarm_mode() -> None:
    from labelgw.cli.app import _make_watcher
    from labelgw.docker.watcher import DockerWatcher

    reactor = Reactor()
    swarm = _make_watcher(config.build({"swarm": True, "swarm_poll": "0.25"}), reactor, Sink())  # type: ignore[arg-type]
    assert isinstance(swarm, SwarmWatcher) and swarm.poll_interval == 0.25
    assert isinstance(_make_watcher(config.build({}), reactor, Sink()), DockerWatcher)  # type: ignore[arg-type]


def test_a_bug_while_applying_a_listing_is_logged_and_the_next_poll_runs() -> None:
    engine = Engine()
    engine.show("host_steady")
    watcher, sink, reactor, _ = make(engine)
    broken = {"on": True}
    real = watcher.tracker

    class Buggy:
        def apply_full(self, *args: Any, **kwargs: Any) -> Any:
            if broken["on"]:
                raise RuntimeError("tracker bug")
            return real.apply_full(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    watcher.tracker = Buggy()  # type: ignore[assignment]
    events, stop = captured_logs()
    try:
        watcher.startService()
        assert any("applying a swarm listing failed" in text for text in texts(events, LogLevel.critical))
        broken["on"] = False
        reactor.advance(1.0)
        assert sink.routes
    finally:
        stop()
        watcher.stopService()
