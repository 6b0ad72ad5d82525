"""Passive health (outlier ejection): a backend that fails several requests in a row leaves rotation for a while.

The rule, after Envoy's outlier detection: `consecutive` (5) failed requests in a row -- connect failures,
resets, timeouts and 5xx answers, as the exchange reports them through `Policy.on_finish(failed=True)`
-- eject the backend for `base` (30 s) x its ejection count, at most `cap` (300 s). The count decays as Envoy's
ejection multiplier does: minus one for every `base` seconds the backend spends back in rotation without
being ejected again, so a backend that failed once long ago starts from 30 s again. At most half of a service's
backends are ejected at once, and never its last ready one: a service whose backends all fail keeps trying
them rather than answering 503 for minutes. When the time is up the backend is re-admitted; the policy's
`on_ready` puts it through slow start.

It hooks into the request path by wrapping each service's policy (`EjectingPolicy`), so the exchange needs no
change, and it learns about services and backends as a `labelgw.core.registry.BackendListener`. Readiness changes
go back through the registry (`changed`), which re-derives `backend.ready`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.logger import Logger

from labelgw.core.backends import Backend, KeyedPolicy, Policy, ServicePool
from labelgw.core.balancer import WeightedResponseTime

__all__ = ["EjectingPolicy", "OutlierDetector"]

Changed = Callable[[ServicePool, Backend], None]


class EjectingPolicy:
    """A service's policy with outlier ejection added: `on_finish` also reports the outcome to the detector.

    `pick` and `on_start` are the inner policy's own bound methods: nothing added to the per-request cost of
    selection. So is `on_finish` over the default `wrt` policy, which reports failures through its failure_hook."""

    def __init__(self, inner: Policy, pool: ServicePool, detector: OutlierDetector) -> None:
        self.inner = inner
        self.name = inner.name
        self.pick: Callable[[Sequence[Backend]], Backend | None] = inner.pick
        self.on_start: Callable[[Backend], None] = inner.on_start
        # A keyed policy (`hash`) keeps its key source and its pick by key, unwrapped too.
        if isinstance(inner, KeyedPolicy):
            self.key_source = inner.key_source
            self.pick_by_key: Callable[[Sequence[Backend], bytes], Backend | None] = inner.pick_by_key
        self._inner_finish = inner.on_finish
        self._pool = pool
        self._detector = detector
        self.on_finish: Callable[[Backend, float, bool], None] = self._finish
        if isinstance(inner, WeightedResponseTime) and inner.failure_hook is None:
            # The default policy reports failures itself and resets the counter on success: its own on_finish is
            # the whole of it (a call less per request). A policy object shared by services keeps the wrapper.
            inner.failure_hook = self._failed
            self.on_finish = inner.on_finish

    def _finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        self._inner_finish(backend, elapsed, failed)
        if failed:
            self._detector.observe(self._pool, backend, failed)
        else:
            # OutlierDetector.observe's answer to a success, without the call (this runs once per request).
            backend.consecutive_failures = 0

    def _failed(self, backend: Backend) -> None:
        self._detector.observe(self._pool, backend, True)

    def on_ready(self, backend: Backend) -> None:
        self.inner.on_ready(backend)


class OutlierDetector(Service):
    _log = Logger()

    def __init__(
        self,
        clock: Any,
        changed: Changed,
        *,
        consecutive: int = 5,
        base: float = 30.0,
        cap: float = 300.0,
        max_fraction: float = 0.5,
    ) -> None:
        if consecutive < 1:
            raise ValueError("consecutive must be at least 1")
        if not 0 < base <= cap:
            raise ValueError("ejection base must be positive and at most the cap")
        self._clock = clock
        self._changed = changed
        self.consecutive = consecutive
        self.base = base
        self.cap = cap
        self.max_fraction = max_fraction
        # Backend -> the IDelayedCall that re-admits it (from clock.callLater).
        self._timers: dict[Backend, Any] = {}
        # Backend -> the IDelayedCall that takes one off its ejection count (while re-admitted with a count).
        self._decays: dict[Backend, Any] = {}

    # -- BackendListener ------------------------------------------------------------------------------

    def service_added(self, pool: ServicePool) -> None:
        pool.policy = EjectingPolicy(pool.policy, pool, self)

    def backend_added(self, pool: ServicePool, backend: Backend) -> None:
        pass

    def backend_updated(self, pool: ServicePool, backend: Backend) -> None:
        pass

    def backend_removed(self, pool: ServicePool, backend: Backend) -> None:
        for timers in (self._timers, self._decays):
            timer = timers.pop(backend, None)
            if timer is not None and timer.active():
                timer.cancel()

    # -- the rule -------------------------------------------------------------------------------------

    def observe(self, pool: ServicePool, backend: Backend, failed: bool) -> None:
        """The outcome of one request to `backend` (called for every finished request: keep it cheap)."""
        if not failed:
            backend.consecutive_failures = 0
            return
        if backend.ejected_until is not None:
            return  # a request still in flight when it was ejected: already counted against it
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= self.consecutive:
            self._try_eject(pool, backend)

    def _try_eject(self, pool: ServicePool, backend: Backend) -> None:
        if pool.backends.get(backend.key) is not backend:
            return  # its container left meanwhile
        allowed = int(len(pool.backends) * self.max_fraction)
        ejected = pool.ejected_count()
        last_ready = backend.ready and len(pool.ready) <= 1
        if ejected >= allowed or last_ready:
            if backend.consecutive_failures == self.consecutive:  # say it once per run of failures
                self._log.warn(
                    "backend {name} of service {service} failed {count} requests in a row but stays in rotation "
                    "({ejected} of {total} backends ejected already, {ready} ready)",
                    name=backend.spec.name, service=pool.name, count=backend.consecutive_failures,
                    ejected=ejected, total=len(pool.backends), ready=len(pool.ready),
                )
            return
        decay = self._decays.pop(backend, None)
        if decay is not None and decay.active():
            decay.cancel()
        backend.ejections += 1
        duration = min(self.base * backend.ejections, self.cap)
        backend.ejected_until = self._clock.seconds() + duration
        self._timers[backend] = self._clock.callLater(duration, self._readmit, pool, backend)
        self._log.warn(
            "backend {name} of service {service} ejected for {duration:g} s after {count} failed requests in a row "
            "(ejection {ejections})",
            name=backend.spec.name, service=pool.name, duration=duration, count=backend.consecutive_failures,
            ejections=backend.ejections,
        )
        self._changed(pool, backend)

    def _readmit(self, pool: ServicePool, backend: Backend) -> None:
        self._timers.pop(backend, None)
        backend.ejected_until = None
        backend.consecutive_failures = 0
        self._log.info(
            "backend {name} of service {service} re-admitted after its ejection", name=backend.spec.name, service=pool.name
        )
        # The registry re-derives readiness; if the backend is back in rotation the policy's on_ready slow-starts it.
        self._changed(pool, backend)
        self._decays[backend] = self._clock.callLater(self.base, self._decay, backend, self._clock.seconds() + self.base)

    def _decay(self, backend: Backend, due: float) -> None:
        """`base` seconds back in rotation without another ejection: one ejection forgotten."""
        self._decays.pop(backend, None)
        backend.ejections = max(0, backend.ejections - 1)
        if backend.ejections:
            # Counted from when this one was due, not from when the clock got round to it.
            due += self.base
            delay = max(0.0, due - self._clock.seconds())
            self._decays[backend] = self._clock.callLater(delay, self._decay, backend, due)

    def stopService(self) -> Any:
        for timers in (self._timers, self._decays):
            for timer in timers.values():
                if timer.active():
                    timer.cancel()
            timers.clear()
        return Service.stopService(self)
