# -*- test-case-name: tests.test_reload -*-
"""Configuration that changes while running: the `--config` file watched and re-applied, and the signals.

L{ConfigWatcher} polls the file's stat (mtime, size, inode) every second on an injected clock (no inotify), and
L{ConfigReloader} re-reads it on a change or on `SIGHUP`: the whole file is validated again by the same code as at
start (L{labelgw.cli.tap.settings_from_options}, which ends in L{labelgw.cli.config.build}); a bad file is one log
line naming the setting and the last good configuration keeps serving. A good one is applied as a difference:

- static services added, removed or changed go through the registry (a service that did not change is not touched:
  its backend objects, counters and routes stay; a changed one keeps the backends whose address it still lists);
- proxy timeouts and limits: a new ProxySettings for new requests (one in flight keeps its response timeout);
- `balancer`, `balancer_decay` for the services that follow the default (none of their backends names a balancer:
  a new policy, or for `wrt` that stays `wrt` the new decay on the same policy), `ejection_base` for the next
  ejection;
- `http`/`https` endpoints added are bound, removed ones closed, the others untouched;
- everything else (`docker_host`, `label_prefix`, `state_dir`, `admin`, ...) is logged as "needs a restart".

L{SignalHooks}: `SIGHUP` re-reads the file (or is logged as ignored without `--config`), and a second
`SIGTERM`/`SIGINT` while stopping is a log line instead of Twisted's ReactorNotRunning traceback.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from labelgw.cli.config import ConfigError, Settings, StaticService
from labelgw.core.balancer import service_policy_factory
from labelgw.core.model import ContainerSpec
from labelgw.core.registry import STATIC_PREFIX

POLL_INTERVAL = 1.0
# A change is read once the file has kept its new signature this long: an editor truncating and rewriting it in
# place is not caught half way (a change is still applied within POLL_INTERVAL + SETTLE + the read).
SETTLE = 0.25
# Settings read once at start; a change to them is reported and waits for a restart.
RESTART_ONLY = (
    "docker_host", "label_prefix", "env", "docker", "resync_interval", "state_dir", "cert_dir", "tls_strict",
    "redirect_https", "tls_close_grace", "admin", "admin_hosts", "version_header", "canary_window", "metrics", "acme",
    "swarm", "swarm_poll",  # the route source (services instead of containers) is chosen at start
    "registration",
    "tls_engine",
)
Signature = tuple[int, int, int] | None
RunInThread = Callable[..., "Deferred[Any]"]


def file_signature(path: str, stat: Callable[[str], os.stat_result] = os.stat) -> Signature:
    """What tells one version of the file from the next: (mtime in ns, size, inode); None when it cannot be read."""
    try:
        info = stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class ConfigWatcher(Service):
    """Calls C{changed} when the file's signature differs from the one last seen; polled on C{clock}."""

    def __init__(
        self,
        path: str,
        clock: Any,
        changed: Callable[[], Any],
        interval: float = POLL_INTERVAL,
        stat: Callable[[str], os.stat_result] = os.stat,
        settle: float = SETTLE,
    ) -> None:
        self.path = path
        self.clock = clock
        self.changed = changed
        self.interval = interval
        self.settle = settle
        self._stat = stat
        # Taken now (right after the file was read at start), so that an edit before the first poll is seen.
        self.seen = file_signature(path, stat)
        self._call: Any = None

    def startService(self) -> None:
        Service.startService(self)
        self._call = self.clock.callLater(self.interval, self._poll)

    def stopService(self) -> None:  # type: ignore[override]
        Service.stopService(self)
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _poll(self) -> None:
        self._call = None
        if not self.running:
            return
        signature = file_signature(self.path, self._stat)
        if signature != self.seen:
            self._call = self.clock.callLater(self.settle, self._settled, signature)
            return
        self._call = self.clock.callLater(self.interval, self._poll)

    def _settled(self, signature: Signature) -> None:
        self._call = None
        if not self.running:
            return
        now = file_signature(self.path, self._stat)
        if now != signature:  # still being written
            self._call = self.clock.callLater(self.settle, self._settled, now)
            return
        self.seen = signature
        self.changed()
        self._call = self.clock.callLater(self.interval, self._poll)


def _specs_by_id(services: tuple[StaticService, ...]) -> dict[str, dict[str, ContainerSpec]]:
    return {service.name: {spec.container_id: spec for spec in service.specs()} for service in services}


def _keep_ids(old: dict[str, ContainerSpec], new: list[ContainerSpec], name: str) -> dict[str, ContainerSpec]:
    """The new specs of a changed service, each under the id of the old backend with its address, so that the
    registry updates that backend in place (its counters and idle connections stay) instead of replacing it."""
    by_address = {(spec.address, spec.port): container_id for container_id, spec in old.items()}
    taken: set[str] = set()
    placed: dict[str, ContainerSpec] = {}
    fresh: list[ContainerSpec] = []
    for spec in new:
        container_id = by_address.get((spec.address, spec.port))
        if container_id is not None and container_id not in taken:
            taken.add(container_id)
            placed[container_id] = dataclasses.replace(spec, container_id=container_id)
        else:
            fresh.append(spec)
    index = 0
    for spec in fresh:
        while f"{STATIC_PREFIX}{name}:{index}" in taken or f"{STATIC_PREFIX}{name}:{index}" in old:
            index += 1
        container_id = f"{STATIC_PREFIX}{name}:{index}"
        taken.add(container_id)
        placed[container_id] = dataclasses.replace(spec, container_id=container_id)
    return placed


class ConfigReloader(Service):
    """Re-reads the config file and applies the difference to a running L{labelgw.cli.app.LabelgwService}.

    C{read} re-reads and validates the whole file (blocking: it runs through C{run_in_thread}) and returns the new
    Settings or raises ConfigError; C{watcher}, when given, is started and stopped with this service."""

    _log = Logger()

    def __init__(
        self,
        app: Any,
        path: str,
        read: Callable[[], Settings],
        clock: Any,
        run_in_thread: RunInThread | None = None,
        interval: float = POLL_INTERVAL,
        stat: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        self.app = app
        self.path = path
        self._read = read
        self._run_in_thread = run_in_thread or (lambda f, *a: _call_now(f, *a))
        self.watcher = ConfigWatcher(path, clock, lambda: self.reload("file changed"), interval, stat)
        self.current: Settings = app.settings
        # The static backends as applied, by service, then container id.
        self._static = _specs_by_id(self.current.static_services)
        self._busy = False
        self._again: str | None = None
        self.reloads = 0
        # Factories of the listeners made at start, for endpoints added later.
        self._factories: dict[str, Any] = {}
        for listener in app.listeners:
            if listener is not getattr(app, "admin", None):
                self._factories.setdefault(listener.scheme, listener.factory)

    def startService(self) -> None:
        Service.startService(self)
        self.watcher.startService()

    def stopService(self) -> None:  # type: ignore[override]
        Service.stopService(self)
        if self.watcher.running:
            self.watcher.stopService()

    def reload(self, why: str) -> Deferred[None]:
        """Re-read the file and apply it; one reload at a time (a trigger meanwhile runs one more afterwards)."""
        if not self.running or not self.app.running:
            self._log.info("config file {path}: {why}, not re-read while stopping", path=self.path, why=why)
            return succeed(None)
        if self._busy:
            self._again = why
            return succeed(None)
        self._busy = True
        self._log.info("config file {path}: {why}, re-reading", path=self.path, why=why)
        reading: Deferred[Settings] = self._run_in_thread(self._read_whole)
        reading.addCallbacks(self.apply, self._refused)
        reading.addErrback(lambda failure: self._log.failure("applying config file {path}", failure, path=self.path))
        return reading.addBoth(self._done)

    def _read_whole(self) -> Settings:
        # An empty file would be read as "every default, no services": far more likely a write caught half way.
        try:
            empty = os.path.getsize(self.path) == 0
        except OSError:
            empty = False  # the read says why
        if empty:
            raise ConfigError(f"--config {self.path}: the file is empty")
        return self._read()

    def _done(self, _: Any) -> None:
        self._busy = False
        again, self._again = self._again, None
        if again is not None:
            self.reload(again)

    def _refused(self, failure: Any) -> None:
        if failure.check(ConfigError, SystemExit):
            self._log.error(
                "config file {path} not applied, the last good configuration keeps serving: {error}",
                path=self.path, error=str(failure.value),
            )
            return None
        return failure  # type: ignore[no-any-return]

    # Applying.

    def apply(self, new: Settings) -> None:
        old = self.current
        restart = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        kept = {name: getattr(old, name) for name in restart}
        if new.https != old.https and "https" not in self._factories:
            # No HTTPS at start: no CA nor TLS factory to listen with.
            restart.append("https")
            kept["https"] = old.https
        if restart:
            self._log.warn(
                "config file {path}: needs a restart: {settings}", path=self.path, settings=", ".join(restart)
            )
        new = dataclasses.replace(new, **kept)
        changes: list[str] = []
        self._apply_balancing(old, new, changes)
        self._apply_services(new, changes)
        if new.proxy != old.proxy:
            self._apply_proxy(new)
            changes.append("proxy timeouts and limits")
        self._apply_listeners("http", old.http, new.http, changes)
        self._apply_listeners("https", old.https, new.https, changes)
        # What really listens: an endpoint that could not be bound is tried again at the next reload.
        new = dataclasses.replace(new, http=self._bound("http"), https=self._bound("https"))
        if new.drain_grace != old.drain_grace:
            changes.append("drain_grace")
        self.current = new
        self.app.settings = new
        self.reloads += 1
        self._log.info(
            "config file {path} applied: {changes}", path=self.path, changes="; ".join(changes) or "no live change",
        )

    def _apply_balancing(self, old: Settings, new: Settings, changes: list[str]) -> None:
        app = self.app
        if (new.balancer, new.balancer_decay) != (old.balancer, old.balancer_decay):
            factory = service_policy_factory(new.balancer, app.reactor.seconds, tau=new.balancer_decay)
            # The registry's factory for services created from now on (it has no public setter).
            app.registry._policy_factory = factory
            pools = list(app.registry.services.values())
            switched = [pool.name for pool in pools if _rebalance(pool, factory, new, app.outlier)]
            changes.append(
                f"balancer {new.balancer} (decay {new.balancer_decay:g} s)"
                + (f", now used by {', '.join(sorted(switched))}" if switched else "")
            )
        if new.ejection_base != old.ejection_base:
            app.outlier.base = new.ejection_base
            changes.append(f"ejection_base {new.ejection_base:g} s")

    def _apply_services(self, new: Settings, changes: list[str]) -> None:
        registry = self.app.registry
        wanted = {service.name: service for service in new.static_services}
        removed = [name for name in self._static if name not in wanted]
        # Removals first: a route a removed service held may be claimed by an added one.
        for name in removed:
            for container_id in self._static.pop(name):
                registry.remove(container_id)
            changes.append(f"service {name} removed")
        for name, service in wanted.items():
            old = self._static.get(name)
            specs = service.specs()
            if old is not None and self._same(old, specs):
                continue  # untouched: its backends, counters and routes stay as they are
            placed = _keep_ids(old or {}, specs, name)
            for container_id in set(old or {}) - set(placed):
                registry.remove(container_id)
            for container_id, spec in placed.items():
                registry.apply(container_id, spec)
            if old is not None and specs and _policy_key(next(iter(old.values()))) != _policy_key(specs[0]):
                # The registry keeps a service's policy (its first container's choice): a changed `balancer` or
                # `hash_key` of a static service is put in place here.
                pool = registry.services.get(name)
                if pool is not None:
                    _replace_policy(pool, registry._policy_factory(specs[0]), self.app.outlier)
            self._static[name] = placed
            changes.append(f"service {name} {'changed' if old is not None else 'added'}")

    @staticmethod
    def _same(old: dict[str, ContainerSpec], specs: list[ContainerSpec]) -> bool:
        strip = lambda spec: dataclasses.replace(spec, container_id="")  # noqa: E731
        return sorted(map(repr, map(strip, old.values()))) == sorted(map(repr, map(strip, specs)))

    def _apply_proxy(self, new: Settings) -> None:
        gateway = self.app.gateway
        # Read per request (and per connection timer): requests already sent keep their response timeout.
        gateway.settings = new.proxy
        gateway.pool.settings = new.proxy
        gateway.service_limit = new.proxy.service_in_flight_limit

    def _bound(self, scheme: str) -> tuple[str, ...]:
        admin = getattr(self.app, "admin", None)
        return tuple(l.description for l in self.app.listeners if l.scheme == scheme and l is not admin)

    def _close_failed(self, failure: Any, endpoint: str) -> None:
        self._log.failure("closing {endpoint}", failure, endpoint=endpoint)

    def _apply_listeners(self, scheme: str, old: tuple[str, ...], new: tuple[str, ...], changes: list[str]) -> None:
        from labelgw.cli.listeners import ListenerService

        app = self.app
        gone = [d for d in old if d not in new]
        added = [d for d in new if d not in old]
        closing = [l for l in app.listeners if l.scheme == scheme and l.description in gone and l is not app.admin]
        for listener in closing:
            app.listeners.remove(listener)
            https = getattr(app, "https", None)
            if https is not None and listener in https.listeners:
                https.listeners.remove(listener)
                if https.redirect is not None:
                    https.redirect._port_suffix = None  # the first HTTPS listener may have changed
            stopping = listener.disownServiceParent() if listener.parent is not None else listener.stopService()
            if isinstance(stopping, Deferred):
                stopping.addErrback(self._close_failed, listener.description)
            self._log.info(
                "labelgw no longer listening on {scheme} {endpoint}", scheme=scheme, endpoint=listener.description
            )
            changes.append(f"{scheme} {listener.description} closed")
        factory = self._factories.get(scheme)
        for description in added:
            if factory is None:
                from labelgw.http.server import ProxyFactory

                factory = self._factories[scheme] = ProxyFactory(app.gateway, b"http")
            try:
                listener = ListenerService(app.reactor, description, factory, scheme)
                listener.privilegedStartService()
            except SystemExit as error:
                self._log.error("config file {path}: {scheme} {error}", path=self.path, scheme=scheme, error=str(error))
                continue
            # Not a MultiService child (adding one would listen a second time); the app stops its `listeners`.
            listener.startService()
            app.listeners.append(listener)
            https = getattr(app, "https", None)
            if scheme == "https" and https is not None:
                https.listeners.append(listener)
            changes.append(f"{scheme} {description} bound")


def _rebalance(pool: Any, factory: Callable[[ContainerSpec], Any], new: Settings, detector: Any) -> bool:
    """Give a running service that follows the default balancer (no backend names one) the new default; True when
    its policy was replaced. A `wrt` service that stays `wrt` keeps what it learnt and takes the new decay."""
    from labelgw.control.outlier import EjectingPolicy
    from labelgw.core.balancer import WeightedResponseTime

    backends = list(pool.backends.values())
    if not backends or any(backend.spec.balancer is not None for backend in backends):
        return False
    wrapped = isinstance(pool.policy, EjectingPolicy)
    inner = pool.policy.inner if wrapped else pool.policy
    if inner.name == new.balancer:
        if isinstance(inner, WeightedResponseTime):
            inner.tau = new.balancer_decay
        return False
    policy = factory(backends[0].spec)
    # Stats belong to the policy that made them; the new one starts every backend afresh (and warm: wrt with no
    # known peer does not slow-start). Requests in flight report their end to the new policy, which adopts them.
    for backend in backends:
        backend.stats = None
    pool.policy = EjectingPolicy(policy, pool, detector) if wrapped else policy
    return True


def _policy_key(spec: ContainerSpec) -> tuple[Any, Any]:
    return spec.balancer, spec.hash_key


def _replace_policy(pool: Any, policy: Any, detector: Any) -> None:
    """Give `pool` a new policy: every backend starts afresh under it (as in `_rebalance`)."""
    from labelgw.control.outlier import EjectingPolicy
    from labelgw.core.backends import KeyedPolicy

    for backend in pool.backends.values():
        backend.stats = None
    wrapped = isinstance(pool.policy, EjectingPolicy)
    pool.policy = EjectingPolicy(policy, pool, detector) if wrapped else policy
    pool.key_source = policy.key_source if isinstance(policy, KeyedPolicy) else None


def _call_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args)


class SignalHooks:
    """`SIGHUP` re-reads the config file; a second `SIGTERM`/`SIGINT` while stopping is one log line.

    Installed after the reactor started (so after it installed its own handlers, which twistd chooses with
    --reactor), through C{signal.signal}; each handler only schedules work on the reactor with callFromThread."""

    _log = Logger()

    def __init__(self, reactor: Any, reloader: ConfigReloader | None) -> None:
        self.reactor = reactor
        self.reloader = reloader
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        try:
            if hasattr(signal, "SIGHUP"):  # POSIX only
                signal.signal(signal.SIGHUP, self._hangup)
            for number in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(number)
                if callable(previous):  # the reactor's own: keep it for the first signal
                    self._previous[number] = previous
                    signal.signal(number, self._stop_signal)
        except ValueError:  # not the main thread: leave signals as they are
            return
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def _shutting_down(self) -> None:
        self.stopping = True

    def _hangup(self, number: int, frame: Any) -> None:
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        if self.reloader is None:
            self._log.info("SIGHUP: no --config file to re-read")
        elif self.stopping:
            self._log.info("SIGHUP: labelgw is stopping, not re-reading the config file")
        else:
            self.reloader.reload("SIGHUP")

    def _stop_signal(self, number: int, frame: Any) -> None:
        if self.stopping:
            name = signal.Signals(number).name
            self.reactor.callFromThread(self._log.info, "{signal} again: labelgw is already stopping", signal=name)
            return
        self.stopping = True
        self._previous[number](number, frame)


def install(app: Any, reactor: Any, path: str | None, read: Callable[[], Settings]) -> ConfigReloader | None:
    """Watch C{path} (when given) for C{app}, and hook the signals once the reactor runs."""
    reloader = None
    if path:
        from labelgw.tls.certdir import thread_runner

        reloader = ConfigReloader(app, path, read, reactor, thread_runner(reactor))
        reloader.setServiceParent(app)
    hooks = SignalHooks(reactor, reloader)
    reactor.addSystemEventTrigger("after", "startup", hooks.install)
    return reloader
