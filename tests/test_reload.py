"""The --config file re-read while running (labelgw.cli.reload): the stat watcher on an injected clock, the
applier against a real LabelgwService on a MemoryReactorClock, and the signal hooks."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent

from labelgw.cli import config
from labelgw.cli.reload import ConfigReloader, ConfigWatcher, SignalHooks


def write(path: Path, text: str) -> None:
    path.write_text(text)


def test_the_watcher_sees_a_change_within_a_poll_and_a_settle_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "labelgw.yaml"
    write(path, "env: a\n")
    clock = Clock()
    seen: list[int] = []
    watcher = ConfigWatcher(str(path), clock, lambda: seen.append(1))

    def poll() -> None:
        clock.advance(1)
        clock.advance(0.25)

    watcher.startService()
    poll()
    assert seen == []
    write(path, "env: bb\n")
    clock.advance(1)
    assert seen == []  # seen, not read yet
    clock.advance(0.25)
    assert seen == [1]
    for _ in range(5):
        poll()
    assert seen == [1]
    # Same size, new mtime (an editor rewriting the file).
    info = os.stat(path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    poll()
    assert seen == [1, 1]
    # Replaced by rename (new inode), same content and times.
    other = tmp_path / "new.yaml"
    write(other, "env: bb\n")
    os.utime(other, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    os.replace(other, path)
    poll()
    assert seen == [1, 1, 1]
    watcher.stopService()
    write(path, "env: ccc\n")
    for _ in range(5):
        poll()
    assert seen == [1, 1, 1]
    assert not clock.getDelayedCalls()


def test_a_file_still_being_written_is_read_once_it_settles(tmp_path: Path) -> None:
    path = tmp_path / "labelgw.yaml"
    write(path, "env: a\n")
    clock = Clock()
    seen: list[int] = []
    watcher = ConfigWatcher(str(path), clock, lambda: seen.append(1))
    watcher.startService()
    write(path, "")  # truncated...
    clock.advance(1)
    write(path, "env: half")  # ...written in pieces
    clock.advance(0.25)
    assert seen == []
    write(path, "env: half-and-more\n")
    clock.advance(0.25)
    assert seen == []
    clock.advance(0.25)
    assert seen == [1]


def test_a_missing_file_is_a_change_and_so_is_its_return(tmp_path: Path) -> None:
    path = tmp_path / "labelgw.yaml"
    write(path, "env: a\n")
    clock = Clock()
    seen: list[int] = []
    watcher = ConfigWatcher(str(path), clock, lambda: seen.append(1))
    watcher.startService()
    path.unlink()
    clock.advance(1)
    clock.advance(0.25)
    write(path, "env: a\n")
    clock.advance(1)
    clock.advance(0.25)
    assert seen == [1, 1]


BASE = """\
docker: false
http: ["tcp:8080:interface=127.0.0.1"]
https: none
admin: none
services:
  keep:
    hosts: [keep.localhost]
    backends: ["127.0.0.1:9001"]
  edit:
    hosts: [edit.localhost]
    backends: ["127.0.0.1:9002", "127.0.0.1:9003"]
  drop:
    hosts: [drop.localhost]
    backends: ["127.0.0.1:9004"]
"""


class World:
    def __init__(self, tmp_path: Path, text: str = BASE) -> None:
        from labelgw.cli.app import LabelgwService

        self.path = tmp_path / "labelgw.yaml"
        write(self.path, text)
        self.reactor = MemoryReactorClock()
        self.app = LabelgwService(self.read(), self.reactor)
        self.events: list[dict[str, Any]] = []
        self.reloader = ConfigReloader(self.app, str(self.path), self.read, self.reactor)
        self.reloader._log = Logger(observer=self.events.append)  # type: ignore[misc]
        self.reloader.setServiceParent(self.app)
        if self.app.https.listeners:
            # HTTPS's own start loads cached leaves in a thread pool, which a memory reactor has not: the parts.
            for listener in self.app.listeners:
                listener.privilegedStartService()
                listener.startService()
            self.app.running = True
            self.reloader.startService()
            return
        self.app.privilegedStartService()
        self.app.startService()

    def read(self) -> config.Settings:
        return config.build({}, config.load_file(str(self.path)))

    def edit(self, text: str) -> None:
        write(self.path, text)
        self.events.clear()
        self.reactor.advance(1)  # seen...
        self.reactor.advance(0.25)  # ...and read once it kept its new size and time

    def log(self) -> str:
        return "\n".join(formatEvent(event) for event in self.events)

    def backend(self, service: str, address: str) -> Any:
        pool = self.app.registry.services[service]
        [backend] = [b for b in pool.backends.values() if f"{b.address}:{b.port}" == address]
        return backend

    def hosts(self) -> set[str]:
        return {route.host for route in self.app.registry.routes()}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.reloader.stopService()


def test_a_file_change_is_applied_through_the_registry_and_untouched_services_keep_their_backends(world: World) -> None:
    keep = world.backend("keep", "127.0.0.1:9001")
    keep.errors = 7
    kept_edit = world.backend("edit", "127.0.0.1:9003")
    kept_edit.errors = 3
    assert world.hosts() == {"keep.localhost", "edit.localhost", "drop.localhost"}
    world.edit(BASE.replace(
        '    backends: ["127.0.0.1:9002", "127.0.0.1:9003"]', '    backends: ["127.0.0.1:9003", "127.0.0.1:9005"]'
    ).replace("  drop:\n    hosts: [drop.localhost]\n    backends: [\"127.0.0.1:9004\"]\n", "  new:\n    backends: [\"127.0.0.1:9006\"]\n"))
    assert world.hosts() == {"keep.localhost", "edit.localhost", "new.localhost"}, world.log()
    # The untouched service: the same backend object, its counters as they were.
    assert world.backend("keep", "127.0.0.1:9001") is keep and keep.errors == 7
    # The changed one keeps the backend whose address it still lists; the other is replaced.
    assert world.backend("edit", "127.0.0.1:9003") is kept_edit and kept_edit.errors == 3
    assert {f"{b.address}:{b.port}" for b in world.app.registry.services["edit"].backends.values()} == {
        "127.0.0.1:9003", "127.0.0.1:9005",
    }
    assert "drop" not in world.app.registry.services
    assert "service drop removed" in world.log() and "service new added" in world.log()
    assert "service edit changed" in world.log() and "service keep" not in world.log()
    assert world.reloader.reloads == 1


def test_an_unchanged_file_rewritten_changes_nothing(world: World) -> None:
    keep = world.backend("keep", "127.0.0.1:9001")
    world.edit(BASE + "\n")
    assert world.backend("keep", "127.0.0.1:9001") is keep
    assert "no live change" in world.log()


def test_a_bad_file_keeps_the_last_good_configuration_and_names_the_setting(world: World) -> None:
    world.edit(BASE.replace('"127.0.0.1:9004"', '"127.0.0.1:99999"'))
    assert "services.drop.backends" in world.log() and "last good configuration keeps serving" in world.log()
    assert [e["log_level"].name for e in world.events if "not applied" in formatEvent(e)] == ["error"]
    assert world.hosts() == {"keep.localhost", "edit.localhost", "drop.localhost"}
    world.edit("services: [\n")
    assert "not valid YAML" in world.log()
    world.edit("")
    assert "the file is empty" in world.log() and "drop" in world.app.registry.services
    world.edit(BASE.replace("admin: none", "admin: none\nmax_in_flight: 0"))
    assert "max_in_flight" in world.log()
    assert world.reloader.reloads == 0
    # Fixed again: applied.
    world.edit(BASE.replace("  drop:\n", "  dropped:\n"))
    assert "dropped.localhost" not in world.hosts() and "drop" not in world.app.registry.services
    assert world.reloader.reloads == 1


def test_settings_that_need_a_restart_are_reported_once_and_kept(world: World) -> None:
    world.edit(BASE + "label_prefix: other\nenv: staging\nresponse_timeout: 7\n")
    needs = [formatEvent(e) for e in world.events if "needs a restart" in formatEvent(e)]
    assert len(needs) == 1 and needs[0].endswith("needs a restart: label_prefix, env"), needs
    assert world.reloader.current.label_prefix == "labelgw" and world.reloader.current.env is None
    # ...while the live ones in the same file apply.
    assert world.app.gateway.settings.response_timeout == 7
    assert world.app.gateway.pool.settings.response_timeout == 7


def test_proxy_limits_and_balancer_settings_apply_to_what_comes_next(world: World) -> None:
    before = world.app.registry.services["keep"].policy
    world.edit(BASE + "max_in_flight: 10\nbalancer: round_robin\nejection_base: 5\n")
    assert world.app.gateway.settings.max_in_flight == 10
    assert world.app.gateway.service_limit == 5
    assert world.app.outlier.base == 5
    # A running service that follows the default takes the new one (still wrapped for outlier ejection).
    after = world.app.registry.services["keep"].policy
    assert after is not before and after.name == "round_robin"
    assert type(after).__name__ == "EjectingPolicy"
    text = BASE.replace("services:\n", "max_in_flight: 10\nbalancer: round_robin\nejection_base: 5\nservices:\n")
    world.edit(text + "  later:\n    backends: ['127.0.0.1:9010']\n")
    assert world.app.registry.services["later"].policy.name == "round_robin", world.log()


def test_an_upstream_request_in_flight_keeps_its_response_timeout(world: World) -> None:
    from labelgw.http.upstream import UpstreamConnection

    backend = world.backend("keep", "127.0.0.1:9001")
    connection = UpstreamConnection(world.app.gateway.pool, backend)
    assert connection._response_timeout == 60
    world.edit(BASE + "response_timeout: 3\n")
    assert connection._response_timeout == 60
    assert UpstreamConnection(world.app.gateway.pool, backend)._response_timeout == 3


def test_http_endpoints_added_are_bound_and_removed_ones_closed(world: World) -> None:
    [first] = world.app.listeners
    world.edit(BASE.replace('http: ["tcp:8080:interface=127.0.0.1"]', 'http: ["tcp:8080:interface=127.0.0.1", "tcp:8090"]'))
    assert [l.description for l in world.app.listeners] == ["tcp:8080:interface=127.0.0.1", "tcp:8090"]
    assert [port for port, *_ in world.reactor.tcpServers] == [8080, 8090]
    assert world.app.listeners[0] is first and first.running
    second = world.app.listeners[1]
    assert second.running and second.factory is first.factory
    world.edit(BASE.replace('http: ["tcp:8080:interface=127.0.0.1"]', 'http: ["tcp:8090"]'))
    assert world.app.listeners == [second] and not first.running and second.running
    assert "http tcp:8080:interface=127.0.0.1 closed" in world.log()
    # The app's stop closes the added listener too.
    world.app.stopService()
    assert not second.running


def test_a_listener_that_cannot_bind_is_one_error_and_the_rest_applies(world: World) -> None:
    world.edit(BASE.replace('http: ["tcp:8080:interface=127.0.0.1"]', 'http: ["tcp:8080:interface=127.0.0.1", "nonsense:1"]') + "max_in_flight: 9\n")
    assert len(world.app.listeners) == 1
    assert "cannot listen on 'nonsense:1'" in world.log()
    assert world.app.gateway.settings.max_in_flight == 9
    # Not taken for listening: the next reload tries again.
    world.edit(BASE.replace('http: ["tcp:8080:interface=127.0.0.1"]', 'http: ["tcp:8080:interface=127.0.0.1", "nonsense:1"]') + "max_in_flight: 8\n")
    assert "cannot listen on 'nonsense:1'" in world.log()
    assert world.app.gateway.settings.max_in_flight == 8


def test_static_health_checks_are_validated_and_follow_edits(world: World) -> None:
    health = "    health:\n      path: /ping\n      interval: 2s\n      timeout: 500ms\n"
    text = BASE.replace('    backends: ["127.0.0.1:9001"]\n', '    backends: ["127.0.0.1:9001"]\n' + health)
    keep = world.backend("keep", "127.0.0.1:9001")
    world.edit(text)
    assert world.backend("keep", "127.0.0.1:9001") is keep
    assert world.app.health.describe(keep) is not None
    assert world.app.health.describe(keep)["path"] == "/ping"  # type: ignore[index]
    assert world.app.health.describe(keep)["interval"] == 2  # type: ignore[index]
    assert not keep.ready  # no traffic before its first success
    world.edit(text.replace("/ping", "/pong"))
    assert world.app.health.describe(keep)["path"] == "/pong"  # type: ignore[index]
    world.edit(BASE)
    assert world.app.health.describe(keep) is None and keep.ready
    world.edit(text.replace("2s", "soon"))
    assert "services.keep.health.interval: 'soon'" in world.log()
    world.edit(text.replace("/ping", "ping"))
    assert "services.keep.health.path" in world.log()


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"path": "/x", "every": 1}, "services.a.health.every: unknown setting"),
        ({"interval": "1s"}, "services.a.health.path"),
        ({"path": "/x", "timeout": "2h"}, "services.a.health.timeout: '2h' duration must be at most 1 hour"),
        ({"path": "/x", "interval": True}, "services.a.health.interval"),
        ("/x", "services.a.health: must be a mapping"),
    ],
)
def test_static_health_errors_name_the_setting(health: Any, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        config.build({}, {"services": {"a": {"backends": ["127.0.0.1:1"], "health": health}}})


def test_static_health_numbers_are_seconds() -> None:
    settings = config.build({}, {"services": {"a": {"backends": ["127.0.0.1:1"], "health": {"path": "/h", "interval": 3}}}})
    [spec] = settings.static_services[0].specs()
    assert spec.health_check is not None and (spec.health_check.interval, spec.health_check.timeout) == (3, 2)


def test_a_reload_while_stopping_is_not_applied(world: World) -> None:
    world.app.stopService()
    world.events.clear()
    world.reloader.reload("SIGHUP")
    assert "not re-read while stopping" in world.log()


class Reactor:
    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Any]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))


def test_sighup_without_config_is_logged_as_ignored() -> None:
    events: list[dict[str, Any]] = []
    hooks = SignalHooks(Reactor(), None)
    hooks._log = Logger(observer=events.append)  # type: ignore[misc]
    hooks._hangup(signal.SIGHUP, None)
    assert [formatEvent(e) for e in events] == ["SIGHUP: no --config file to re-read"]


def test_sighup_re_reads_the_file_at_once(world: World) -> None:
    hooks = SignalHooks(Reactor(), world.reloader)
    write(world.path, BASE.replace("  drop:\n", "  dropped:\n"))
    hooks._hangup(signal.SIGHUP, None)
    assert "dropped" in world.app.registry.services
    assert world.reloader.reloads == 1


def test_a_second_stop_signal_is_a_log_line() -> None:
    events: list[dict[str, Any]] = []
    reactor = Reactor()
    hooks = SignalHooks(reactor, None)
    hooks._log = Logger(observer=events.append)  # type: ignore[misc]
    calls: list[int] = []
    hooks._previous[signal.SIGTERM] = lambda number, frame: calls.append(number)
    hooks._stop_signal(signal.SIGTERM, None)
    assert calls == [signal.SIGTERM] and events == []
    hooks._stop_signal(signal.SIGTERM, None)
    hooks._stop_signal(signal.SIGINT, None)
    assert calls == [signal.SIGTERM]
    assert [formatEvent(e) for e in events] == [
        "SIGTERM again: labelgw is already stopping", "SIGINT again: labelgw is already stopping",
    ]


def test_a_wrt_service_keeps_what_it_learnt_and_takes_the_new_decay(world: World) -> None:
    from labelgw.core.model import ContainerSpec

    labelled = ContainerSpec("c1", "c1", "labelled", "127.0.0.1", 9100, ("labelled.localhost",), balancer="least_conn")
    world.app.registry.apply("c1", labelled)
    pool = world.app.registry.services["keep"]
    policy, inner = pool.policy, pool.policy.inner  # type: ignore[attr-defined]
    backend = world.backend("keep", "127.0.0.1:9001")
    inner.on_finish(backend, 0.25, False)
    stats = backend.stats
    world.edit(BASE + "balancer_decay: 3\n")
    assert pool.policy is policy and inner.tau == 3 and backend.stats is stats
    # A service whose container names its balancer keeps it.
    world.edit(BASE + "balancer_decay: 3\nbalancer: round_robin\n")
    assert world.app.registry.services["labelled"].policy.name == "least_conn"
    assert pool.policy.name == "round_robin" and backend.stats is None
    assert "now used by drop, edit, keep" in world.log(), world.log()


def test_install_watches_only_with_a_config_file_and_hooks_signals_after_startup(tmp_path: Path) -> None:
    from labelgw.cli.app import LabelgwService
    from labelgw.cli.reload import install

    path = tmp_path / "labelgw.yaml"
    write(path, BASE)
    settings = config.build({}, config.load_file(str(path)))
    reactor = MemoryReactorClock()
    app = LabelgwService(settings, reactor)
    assert install(app, reactor, None, lambda: settings) is None
    reloader = install(app, reactor, str(path), lambda: settings)
    assert reloader is not None and reloader.parent is app
    hooks = reactor.triggers["after"]["startup"]
    assert len(hooks) == 2 and all(f.__name__ == "install" for f, _, _ in hooks)


def test_https_endpoints_are_added_with_the_tls_factory_and_need_a_restart_without_https(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        world.edit(BASE.replace("https: none", f'https: ["tcp:8443"]\nstate_dir: {tmp_path / "state"}'))
        assert "needs a restart: state_dir, https" in world.log(), world.log()
        assert [l.scheme for l in world.app.listeners] == ["http"]
    finally:
        world.reloader.stopService()
    other = tmp_path / "with-https"
    other.mkdir()
    text = BASE.replace("https: none", f'https: ["tcp:8443"]\nstate_dir: {tmp_path / "state"}')
    world = World(other, text)
    try:
        [first] = world.app.https.listeners
        world.edit(text.replace('https: ["tcp:8443"]', 'https: ["tcp:8443", "tcp:8444"]'))
        added = world.app.https.listeners[1]
        assert added.scheme == "https" and added.factory is first.factory and added in world.app.listeners
        world.edit(text.replace('https: ["tcp:8443"]', 'https: ["tcp:8444"]'))
        assert world.app.https.listeners == [added] and not first.running
        # The redirect port follows the first HTTPS listener left.
        assert world.app.https.redirect._port() == b":8444"
    finally:
        world.reloader.stopService()


def test_middleware_keys_of_a_static_service_follow_edits(world: World) -> None:
    # qa: a reload that changed `ratelimit` logged "service keep changed" and kept the old chain (or none).
    keep = world.backend("keep", "127.0.0.1:9001")
    pool = world.app.registry.services["keep"]
    assert pool.middleware is None
    limited = BASE.replace('    backends: ["127.0.0.1:9001"]\n', '    backends: ["127.0.0.1:9001"]\n    ratelimit: 5/s\n')
    world.edit(limited)
    assert world.backend("keep", "127.0.0.1:9001") is keep  # the backend stays
    assert pool.middleware is not None and pool.middleware.ratelimit is not None
    assert pool.middleware.ratelimit.spec.rate == 5
    world.edit(limited.replace("5/s", "1/m"))
    assert pool.middleware is not None and pool.middleware.ratelimit is not None
    assert pool.middleware.ratelimit.spec.rate == pytest.approx(1 / 60)
    world.edit(BASE)
    assert pool.middleware is None


def test_the_balancer_of_a_static_service_follows_edits(world: World) -> None:
    pool = world.app.registry.services["edit"]
    before = pool.policy.name
    world.edit(BASE.replace('    backends: ["127.0.0.1:9002", "127.0.0.1:9003"]\n',
                            '    backends: ["127.0.0.1:9002", "127.0.0.1:9003"]\n    balancer: hash\n    hash_key: path\n'))
    assert world.app.registry.services["edit"].policy.name == "hash", (before, world.log())
    assert world.app.registry.services["edit"].key_source is not None


def test_canary_window_and_metrics_changes_are_reported_as_needing_a_restart(world: World) -> None:
    # qa: both are read once at start, but a change was neither applied nor reported ("no live change").
    world.edit(BASE + "canary_window: 30\nmetrics: false\n")
    needs = [formatEvent(e) for e in world.events if "needs a restart" in formatEvent(e)]
    assert len(needs) == 1 and needs[0].endswith("needs a restart: canary_window, metrics"), world.log()
