"""Active health checks: `GET http://address:port<health.path>` on every backend whose container has the label.

Per backend, from its spec's `health_check` (the labels `health.path`, `health.interval`, default 5 s, and
`health.timeout`, default 2 s, as `labelgw.core.labels` read them).
A 2xx or 3xx answer within the timeout is a success (redirects are not followed); anything else is a failure.

States (`Backend.health_state`): "unknown" until the first success (no traffic before it), then "healthy";
3 consecutive failures make it "unhealthy" (from "unknown" too, so that the view says so), and 2 consecutive
successes make it healthy again. A check starts as soon as the container is ready in Docker, and the next one
`interval` seconds after the previous one finished, so checks of one backend never overlap. While the
container is stopped or paused there are no checks, and its state goes back to "unknown": after a restart the
first success is enough.

The checker is a `labelgw.core.registry.BackendListener`; state changes go back through the registry (`changed`),
which re-derives `backend.ready`. Checks run on the reactor with treq (control-plane traffic, one new
connection each); the reactor, and so the clock, is injected, and so is the HTTP call for tests.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.core.backends import HEALTH_HEALTHY, HEALTH_UNHEALTHY, HEALTH_UNKNOWN, Backend, ServicePool
from labelgw.core.model import DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT, HealthCheck

__all__ = ["DEFAULT_INTERVAL", "DEFAULT_TIMEOUT", "HealthChecker", "HttpGet", "treq_getter"]

DEFAULT_INTERVAL = DEFAULT_HEALTH_INTERVAL
DEFAULT_TIMEOUT = DEFAULT_HEALTH_TIMEOUT
UNHEALTHY_AFTER = 3
HEALTHY_AFTER = 2

# (url, timeout in seconds) -> Deferred firing with the response's status code.
HttpGet = Callable[[str, float], "Deferred[int]"]
Changed = Callable[[ServicePool, Backend], None]


def treq_getter(reactor: Any) -> HttpGet:
    """The real HTTP call: treq on `reactor`, no connection reuse, no redirects followed, body read and dropped."""
    pool = _quiet_pool(reactor)

    def get(url: str, timeout: float) -> Deferred[int]:
        import treq

        def status(response: Any) -> Deferred[int]:
            # Read the body to its end so the connection closes cleanly; its content does not matter.
            return treq.collect(response, lambda data: None).addCallback(lambda _: response.code)

        # The checker bounds the whole call (body included) with its own timeout and cancels it.
        requested: Deferred[Any] = treq.get(url, reactor=reactor, pool=pool, allow_redirects=False)
        return requested.addCallback(status)

    return get


def _quiet_pool(reactor: Any) -> Any:
    """A non-persistent connection pool whose connections do not log "Starting factory" and "Stopping factory":
    two lines per check, every few seconds, for every checked backend."""
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        from twisted.web.client import _HTTP11ClientFactory
    except ImportError:  # a private name; without it the checks only log more
        return pool

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False

    pool._factory = QuietFactory
    return pool


class _Probe:
    """The checks of one backend."""

    __slots__ = (
        "pool", "backend", "url", "path", "interval", "timeout", "successes", "failures", "last", "call", "pending",
        "deadline",
    )

    def __init__(self, pool: ServicePool, backend: Backend, check: HealthCheck) -> None:
        self.pool = pool
        self.backend = backend
        self.path = check.path
        address = backend.address if ":" not in backend.address else f"[{backend.address}]"
        self.url = f"{backend.spec.scheme}://{address}:{backend.port}{check.path}"
        self.interval = check.interval
        self.timeout = check.timeout
        self.successes = 0
        self.failures = 0
        self.last: str | None = None
        self.call: Any = None  # the IDelayedCall of the next check
        self.pending: Deferred[Any] | None = None
        self.deadline = 0.0

    @property
    def active(self) -> bool:
        return self.call is not None or self.pending is not None


class HealthChecker(Service):
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        changed: Changed,
        http_get: HttpGet | None = None,
        *,
        unhealthy_after: int = UNHEALTHY_AFTER,
        healthy_after: int = HEALTHY_AFTER,
    ) -> None:
        self._reactor = reactor
        self._changed = changed
        self._http_get = http_get or treq_getter(reactor)
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self._probes: dict[Backend, _Probe] = {}

    # -- BackendListener ------------------------------------------------------------------------------

    def service_added(self, pool: ServicePool) -> None:
        pass

    def backend_added(self, pool: ServicePool, backend: Backend) -> None:
        check = backend.spec.health_check
        if check is None:
            return
        probe = self._probes[backend] = _Probe(pool, backend, check)
        self._sync(probe)

    def backend_updated(self, pool: ServicePool, backend: Backend) -> None:
        probe = self._probes.get(backend)
        check = backend.spec.health_check
        if probe is not None and (
            check is None or (check.path, check.interval, check.timeout) != (probe.path, probe.interval, probe.timeout)
        ):
            # The check itself changed (a static service's `health:` edited while running): start it afresh.
            self.backend_removed(pool, backend)
            probe = None
            if check is None and backend.health_state is not None:
                backend.health_state = None
                self._changed(pool, backend)
        if probe is None:
            if check is not None:
                if backend.health_state is None:
                    backend.health_state = HEALTH_UNKNOWN
                    self._changed(pool, backend)
                self.backend_added(pool, backend)
            return
        self._sync(probe)

    def backend_removed(self, pool: ServicePool, backend: Backend) -> None:
        probe = self._probes.pop(backend, None)
        if probe is not None:
            self._halt(probe)

    # -- the service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        for probe in list(self._probes.values()):
            self._sync(probe)

    def stopService(self) -> Any:
        Service.stopService(self)
        for probe in list(self._probes.values()):
            self._halt(probe)
        return None

    def describe(self, backend: Backend) -> dict[str, Any] | None:
        """The backend's check settings and last outcome, for the admin view; None when it has no check."""
        probe = self._probes.get(backend)
        if probe is None:
            return None
        return {
            "path": probe.path,
            "interval": probe.interval,
            "timeout": probe.timeout,
            "last": probe.last,
            "consecutive_successes": probe.successes,
            "consecutive_failures": probe.failures,
        }

    # -- internals ------------------------------------------------------------------------------------

    def _sync(self, probe: _Probe) -> None:
        """Check while the service runs and the container is ready in Docker; otherwise stop checking."""
        wanted = self.running and probe.backend.spec.ready
        if wanted and not probe.active:
            # Not from inside the caller (a registry update): on the next reactor turn.
            probe.call = self._reactor.callLater(0, self._check, probe)
        elif not wanted and probe.active:
            self._halt(probe)
            if probe.backend.spec.ready is False and probe.backend.health_state != HEALTH_UNKNOWN:
                # Stopped or paused: after a restart the first success is enough again.
                self._set_state(probe, HEALTH_UNKNOWN, "container not ready")

    def _halt(self, probe: _Probe) -> None:
        call, probe.call = probe.call, None
        if call is not None and call.active():
            call.cancel()
        pending, probe.pending = probe.pending, None
        probe.successes = probe.failures = 0
        if pending is not None:
            pending.cancel()  # its callbacks see that it is no longer pending and do nothing

    def _check(self, probe: _Probe) -> None:
        probe.call = None
        probe.deadline = self._reactor.seconds() + probe.timeout
        try:
            answer = self._http_get(probe.url, probe.timeout)
        except Exception:
            answer = fail()
        # The whole check, body included, within the timeout.
        answer.addTimeout(probe.timeout, self._reactor)
        probe.pending = answer
        answer.addCallbacks(self._answered, self._failed, callbackArgs=(probe, answer), errbackArgs=(probe, answer))
        answer.addErrback(
            lambda failure: self._log.failure("health check of {url}: internal error", failure, url=probe.url)
        )

    def _answered(self, status: int, probe: _Probe, answer: Deferred[Any]) -> None:
        if probe.pending is not answer:
            return
        self._record(probe, 200 <= status < 400, f"HTTP {status}")

    def _failed(self, failure: Failure, probe: _Probe, answer: Deferred[Any]) -> None:
        if probe.pending is not answer:
            return  # cancelled because the backend went away or the service stopped
        # A cancelled request may come back wrapped (treq: ResponseNeverReceived([CancelledError])).
        if failure.check(TimeoutError, CancelledError) or self._reactor.seconds() >= probe.deadline:
            why = f"no answer within {probe.timeout:g} s"
        else:
            why = failure.getErrorMessage() or getattr(failure.type, "__name__", "error")
        self._record(probe, False, why)

    def _record(self, probe: _Probe, ok: bool, why: str) -> None:
        probe.pending = None
        probe.last = why
        # The next check first: whatever happens below, checking goes on.
        if self.running and self._probes.get(probe.backend) is probe and probe.backend.spec.ready:
            probe.call = self._reactor.callLater(probe.interval, self._check, probe)
        state = probe.backend.health_state
        if ok:
            probe.successes += 1
            probe.failures = 0
            if state == HEALTH_UNKNOWN or (state == HEALTH_UNHEALTHY and probe.successes >= self.healthy_after):
                self._set_state(probe, HEALTH_HEALTHY, why)
        else:
            probe.failures += 1
            probe.successes = 0
            if state != HEALTH_UNHEALTHY and probe.failures >= self.unhealthy_after:
                self._set_state(probe, HEALTH_UNHEALTHY, why)
            elif probe.failures == 1 and state == HEALTH_HEALTHY:
                self._log.info("health check of {url} failed: {why}", url=probe.url, why=why)

    def _set_state(self, probe: _Probe, state: str, why: str) -> None:
        backend = probe.backend
        old, backend.health_state = backend.health_state, state
        # Turning unhealthy takes a backend out of rotation: a warning; recovering is news, not trouble.
        emit = self._log.warn if state == HEALTH_UNHEALTHY else self._log.info
        emit(
            "health check of backend {name} of service {service} ({url}): {old} -> {state} ({why})",
            name=backend.spec.name, service=probe.pool.name, url=probe.url, old=old, state=state, why=why,
        )
        self._changed(probe.pool, backend)
