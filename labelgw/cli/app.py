"""labelgw assembled: listeners, the proxy's shared state, the registry and the Docker watcher, as Services
under one MultiService. Stopping stops accepting, lets in-flight requests finish, then stops the watcher."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from labelgw.control.admin import AdminListener, admin_site
from labelgw.core.backends import Backend, ServicePool
from labelgw.core.balancer import service_policy_factory
from labelgw.core.canary import CanaryAnalyzer
from labelgw.cli.config import Settings
from labelgw.cli.accesslog import AccessLogService
from labelgw.control.explain import Explainer
from labelgw.cli.fdlimit import raise_open_file_limit
from labelgw.control.health import HealthChecker
from labelgw.http.server import Gateway, ProxyFactory
from labelgw.tls.https import HttpsService
from labelgw.cli.listeners import ListenerService
from labelgw.control.outlier import OutlierDetector
from labelgw.middleware.chain import MiddlewareManager
from labelgw.core.registry import Registry


class LabelgwService(MultiService):
    _log = Logger()
    # With --acme-email: None, the HTTPS service runs its own ACME manager; a worker of --workers sets the source
    # its supervisor feeds (labelgw.workers.certs.WorkerAcme) before this __init__.
    acme_source: Any = None

    def __init__(self, settings: Settings, reactor: Any, serve: bool = True) -> None:
        """C{serve=False}: no HTTP or HTTPS listener is made (the supervisor of `--workers` holds the sockets and
        its workers serve them: labelgw.workers)."""
        MultiService.__init__(self)
        self.settings = settings
        self.reactor = reactor
        # Active health checks and outlier ejection each own a part of a backend's readiness; the registry
        # re-derives `backend.ready` when they report a change.
        self.health = HealthChecker(reactor, self._backend_state_changed)
        self.outlier = OutlierDetector(reactor, self._backend_state_changed, base=settings.ejection_base)
        self.registry = Registry(
            # A service's policy: its first container's <prefix>.balancer label, else --balancer.
            policy_factory=service_policy_factory(settings.balancer, reactor.seconds, tau=settings.balancer_decay),
            on_backend_retired=lambda backend: self.gateway.pool.retire(backend),
            listeners=(self.outlier, self.health),
            label_prefix=settings.label_prefix,
        )
        # Each service's middleware chain (rate limit, breaker, concurrency limit, fallback), from its labels.
        self.registry.add_listener(MiddlewareManager(reactor, self.registry.services))
        self.health.setServiceParent(self)
        self.outlier.setServiceParent(self)
        self.gateway = Gateway(reactor, self.registry.table, settings.proxy)
        self.gateway.rejected_for = self.registry.rejected_for
        self.gateway.version_header = settings.version_header.lower().encode("ascii")
        self.gateway.canary = CanaryAnalyzer(settings.canary_window)
        if settings.trusted_proxies:
            from labelgw.middleware.access import parse_networks

            # X-Forwarded-For from these peers names the client (allowlist, X-Forwarded-For, X-Real-IP, rate limit).
            self.gateway.trusted_proxies = parse_networks(settings.trusted_proxies)
        # Per-request counters (read by /metrics) and the Docker events' timing; none of it with `metrics: false`.
        self.docker_metrics: Any = None
        if settings.metrics:
            from labelgw.control.metrics import DockerMetrics, RequestMetrics

            self.gateway.metrics = RequestMetrics()
            if settings.docker:
                self.docker_metrics = DockerMetrics(self.registry, reactor.seconds)
        self.listeners: list[ListenerService] = []
        factory = ProxyFactory(self.gateway, b"http")
        for description in settings.http if serve else ():
            listener = ListenerService(reactor, description, factory, "http")
            listener.setServiceParent(self)
            self.listeners.append(listener)
        # HTTPS: loads or creates the local CA here, blocking, before the reactor runs.
        self.https = HttpsService(settings, reactor, self.gateway, acme_source=self.acme_source)
        self.https.setServiceParent(self)
        if not serve:
            self.https.listeners = []
        for listener in self.https.listeners:
            listener.setServiceParent(self)
            self.listeners.append(listener)
        # Read by the HTTP/1.1 server for plain-HTTP requests (--redirect-https, <prefix>.tls=redirect).
        self.gateway.https_redirect = self.https.redirect
        # The admin JSON view (--admin), on its own listener; stopped with the others.
        self.admin: AdminListener | None = None
        if settings.admin is not None:
            explainer = Explainer(self.registry.table, settings.version_header, lambda: self.gateway.https_redirect)
            # /healthz: 503 from the moment stopService starts (SIGTERM) until the drain is over.
            serving = lambda: bool(self.running)  # noqa: E731
            site = admin_site(
                self.registry, reactor.seconds, self.health.describe, settings.admin_hosts, explainer, serving,
                canary=self.gateway.canary, metrics=self._metrics_page(),
                ca_certificate=lambda: self.https.ca.cert_pem if self.https.ca is not None else None,
                registrations=self._registrations_view if settings.registration.enabled else None,
                acme=lambda: self.https.acme.describe() if self.https.acme is not None else None,
            )
            admin = self.admin = AdminListener(reactor, settings.admin, site, "http")
            admin.setServiceParent(self)
            self.listeners.append(admin)
        # Registered instances (labelgw.registration): the API listener and the embedded or etcd registry.
        self.registration: Any = None
        if settings.registration.enabled:
            self.registration = _make_registration(settings, reactor, self.registry)
            self.registration.setServiceParent(self)
            if self.registration.listener is not None:
                self.registration.listener.setServiceParent(self)
                self.listeners.append(self.registration.listener)
        # The access log (--access-log, --access-log-file; SIGUSR1 reopens the file) and --debug-headers.
        self.access_log = AccessLogService(settings, reactor, self.gateway)
        self.access_log.setServiceParent(self)
        self.watcher = None
        if settings.docker:
            self.watcher = _make_watcher(settings, reactor, self.docker_metrics or self.registry)
            self.watcher.setServiceParent(self)
            if self.docker_metrics is not None:
                self.watcher.event_observer = self.docker_metrics.event_received

    def _metrics_page(self) -> Any:
        """GET /metrics (labelgw.control.metrics): a collector reading the gateway's counters, the registry, the
        Docker watcher and the TLS factory at scrape time; None with `metrics: false`."""
        if not self.settings.metrics:
            return None
        from labelgw.control import metrics

        collector = metrics.GatewayCollector(
            self.gateway, self.registry, lambda: self.watcher, self.docker_metrics,
            self.https.tls_factory, self.https.selector,
        )
        registry = metrics.metrics_registry([collector])
        return lambda: metrics.render(registry)

    def _registrations_view(self) -> Any:
        return self.registration.summary() if self.registration is not None else None

    def _backend_state_changed(self, pool: ServicePool, backend: Backend) -> None:
        self.registry.backend_state_changed(pool, backend)

    def _stop_balancing(self, _: Any = None) -> None:
        # No more health checks or ejection timers (both stop synchronously).
        for service in (self.health, self.outlier):
            if service.running:
                service.stopService()

    def startService(self) -> None:
        self._raise_file_limit()
        for static in self.settings.static_services:
            for spec in static.specs():
                self.registry.apply(spec.container_id, spec)
        MultiService.startService(self)

    def _raise_file_limit(self) -> None:
        limit = raise_open_file_limit()
        if limit.error:
            self._log.warn("could not raise the open-file limit from {before}: {error}", before=limit.before, error=limit.error)
        elif limit.after != limit.before:
            self._log.info("open-file limit raised from {before} to {after}", before=limit.before, after=limit.after)
        in_flight = self.gateway.settings.max_in_flight
        if not limit.enough_for(in_flight):
            self._log.warn(
                "open-file limit {limit} is low for {in_flight} requests in flight (two descriptors each): raise the"
                " hard limit (ulimit -Hn, docker run --ulimit nofile=N:N)", limit=limit.after, in_flight=in_flight,
            )

    def stopService(self) -> Deferred[Any]:
        # Stop accepting first, then drain in-flight requests, then stop watching Docker. The admin listener stays
        # until the drain is over: its /healthz answers 503 meanwhile.
        self.running = False
        stopped = DeferredList(
            [listener.stopService() for listener in self.listeners if listener is not self.admin], consumeErrors=True
        )

        def drain(_: Any) -> Deferred[None]:
            self._log.info("draining {count} connections", count=len(self.gateway.connections))
            return self.gateway.drain(self.settings.drain_grace)

        def stop_watcher(_: Any) -> Any:
            if self.watcher is not None and self.watcher.running:
                return self.watcher.stopService()
            return None

        stopped.addCallback(drain)
        stopped.addCallback(lambda _: self.admin.stopService() if self.admin is not None else None)
        stopped.addCallback(stop_watcher)
        stopped.addCallback(
            lambda _: self.registration.stopService() if self.registration is not None and self.registration.running else None
        )
        stopped.addCallback(lambda _: self.https.stopService() if self.https.running else None)
        stopped.addCallback(self._stop_balancing)
        stopped.addCallback(lambda _: self.access_log.stopService() if self.access_log.running else None)
        stopped.addErrback(lambda failure: self._log.failure("while stopping", failure))
        return stopped


def _make_registration(settings: Settings, reactor: Any, registry: Registry) -> Any:
    from labelgw.registration.service import RegistrationService
    from labelgw.tls.ca import default_state_dir

    state_dir = settings.state_dir or str(default_state_dir())
    return RegistrationService(
        settings.registration, reactor, registry, state_dir, prefix=settings.label_prefix, pinned_env=settings.env
    )


def _make_watcher(settings: Settings, reactor: Any, registry: Registry) -> Any:
    if settings.swarm:
        from labelgw.docker.swarm_watcher import SwarmWatcher

        return SwarmWatcher(
            reactor=reactor,
            sink=registry,
            docker_host=settings.docker_host,
            prefix=settings.label_prefix,
            pinned_env=settings.env,
            poll_interval=settings.swarm_poll,
        )
    from labelgw.docker.watcher import DockerWatcher

    return DockerWatcher(
        reactor=reactor,
        sink=registry,
        docker_host=settings.docker_host,
        prefix=settings.label_prefix,
        pinned_env=settings.env,
        resync_interval=settings.resync_interval,
    )
