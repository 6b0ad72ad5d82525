"""HTTPS for the gateway: the TLS listeners and the plain-HTTP -> HTTPS redirect, built from the settings.

Every ``--https`` endpoint (default ``tcp:8443``; ``--https none`` for none) serves the same proxy as ``--http``,
one Gateway, behind TLS terminated in this process by the standard library's ssl (L{labelgw.tls.stdtls}; with
``--tls-engine openssl`` Twisted's C{TLSMemoryBIOFactory}, L{labelgw.tls.deadlines}), with a handshake deadline and
a bounded close. Per handshake,
L{SNIContextSelector} picks the certificate: a user certificate from ``--cert-dir``; else a leaf the local CA
(``--state-dir``) mints for a routed name or a local one (``*.localhost``, loopback IPs); else the default
certificate, or with ``--tls-strict`` a handshake alert. Requests reach backends with ``X-Forwarded-Proto:
https``. ALPN offers what the protocol factory speaks: h2 and http/1.1 (L{labelgw.http.h2.negotiating_factory}).

Plain HTTP is answered with ``308 Permanent Redirect`` to ``https://<host>[:<port>]<path>?<query>`` (the port
of the first HTTPS listener, left out when it is 443) for every request with ``--redirect-https``, and for
routes labelled ``<prefix>.tls=redirect``; ``<prefix>.tls=off`` exempts a route from ``--redirect-https``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.logger import Logger

from labelgw.cli.config import Settings
from labelgw.http.h2 import negotiating_factory
from labelgw.http.server import Gateway
from labelgw.cli.listeners import ListenerService
from labelgw.core.routes import Route
from labelgw.tls.stdtls import StdTLSFactory, factory_for_engine
from labelgw.tls import (
    INTERMEDIATE,
    CAError,
    CertDirectory,
    LocalCA,
    SNIContextSelector,
    TLSServerFactory,
    default_state_dir,
    thread_runner,
)

# Hosts put in a Location header as they are: names and bracketed IPv6 literals, nothing that needs escaping.
_REDIRECTABLE_HOST = re.compile(r"(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])\Z")


class HttpsRedirect:
    """Which plain-HTTP requests get a 308 to HTTPS, and where to. Consulted by the HTTP/1.1 server per request."""

    __slots__ = ("everything", "_listener_port", "_port_suffix")

    def __init__(self, everything: bool, listener_port: Callable[[], int | None]) -> None:
        self.everything = everything
        self._listener_port = listener_port
        self._port_suffix: bytes | None = None

    def location(self, host: str, target: bytes, route: Route | None) -> bytes | None:
        """The https URL for a plain-HTTP request, or None to serve it as usual.

        C{host} is the normalised Host (lower case, no port), C{target} the origin-form target (path and query).
        """
        mode = route.tls if route is not None else None
        if mode is None:
            if not self.everything:
                return None
        else:
            mode = mode.strip()
            if mode != "redirect" and (mode == "off" or not self.everything):
                return None
        # "OPTIONS *" has no URL; a host that would need escaping is served as usual rather than echoed.
        if target[:1] != b"/" or not host or _REDIRECTABLE_HOST.match(host) is None:
            return None
        return b"https://" + host.encode("ascii") + self._port() + target

    def _port(self) -> bytes:
        if self._port_suffix is None:
            port = self._listener_port()
            if port is None:
                # Not listening yet, or on a UNIX socket behind something else: the default port.
                return b""
            self._port_suffix = b"" if port == 443 else b":%d" % port
        return self._port_suffix


class HttpsService(MultiService):
    """The HTTPS side of one gateway: local CA, certificate directory, SNI selector, listeners and redirect.

    Building it loads or creates the local CA (blocking: call it before the reactor runs, as makeService does).
    The listeners are left to the caller to parent, so that it can stop them before draining connections;
    the certificate directory (a child) is stopped with this service.
    """

    _log = Logger()

    def __init__(self, settings: Settings, reactor: Any, gateway: Gateway, acme_source: Any = None) -> None:
        MultiService.__init__(self)
        self.listeners: list[ListenerService] = []
        self.redirect: HttpsRedirect | None = None
        self.ca: LocalCA | None = None
        self.cert_dir: CertDirectory | None = None
        self.selector: SNIContextSelector | None = None
        self.tls_factory: TLSServerFactory | StdTLSFactory | None = None
        self.acme: Any = None
        if not settings.https:
            if settings.acme is not None:
                self._log.warn("--acme-email: ignored, there is no HTTPS listener (--https none)")
            return
        state_dir = Path(settings.state_dir) if settings.state_dir else default_state_dir()
        try:
            self.ca = LocalCA.load_or_create(state_dir)
        except (CAError, OSError) as error:
            raise SystemExit(f"labelgw: --state-dir {state_dir}: cannot load or create the local CA: {error}") from None
        run_in_thread = thread_runner(reactor)
        if settings.cert_dir:
            self.cert_dir = CertDirectory(Path(settings.cert_dir), clock=reactor, run_in_thread=run_in_thread)
            self.cert_dir.setServiceParent(self)
        acme_contexts = self._make_acme(settings, reactor, gateway, state_dir, run_in_thread, acme_source)
        self.selector = SNIContextSelector(
            clock=reactor,
            run_in_thread=run_in_thread,
            # Routed names get a minted leaf; the check is a dict lookup, run in the handshake.
            is_routed=gateway.table.knows_host,
            # Names under a wildcard route are minted per name but kept in memory only (labelgw.tls.sni).
            is_exact_routed=gateway.table.knows_exact_host,
            local_ca=self.ca,
            cert_dir=self.cert_dir,
            strict=settings.tls_strict,
            acme=acme_contexts,
        )
        # Deadlines for the handshake (the request head's) and for closing (close_notify, then TCP).
        # The TLS engine: the standard library's ssl (labelgw.tls.stdtls), or Twisted's pyOpenSSL layer.
        factory = factory_for_engine(
            settings.tls_engine,
            self.selector,
            negotiating_factory(gateway, b"https"),
            clock=reactor,
            handshake_timeout=settings.proxy.head_timeout,
            close_grace=settings.tls_close_grace,
            # TLS-ALPN-01 on the standard library's engine, which reads the ClientHello's ALPN offer for it (the
            # pyOpenSSL engine switches in its ALPN callback: labelgw.tls.acme_openssl).
            challenges=acme_contexts.challenge_material if acme_contexts is not None else None,
            # The gateway's HTTP/1.1 side (which every TLS connection starts as, labelgw.http.h2) arms the head
            # deadline at the connect and closes an idle connection when it passes: a handshake not done by then
            # is aborted. The stdlib engine then needs no timer of its own.
            protocol_keeps_deadline=True,
        )
        # Its handshake counters are read by /metrics.
        self.tls_factory = factory
        self.listeners = [ListenerService(reactor, description, factory, "https") for description in settings.https]
        self.redirect = HttpsRedirect(settings.redirect_https, self._first_listener_port)

    def startService(self) -> None:
        MultiService.startService(self)
        if self.ca is None or self.selector is None:
            return
        self._log.info(
            "local CA {path}; to trust it: python -m labelgw ca --install --state-dir {state_dir}",
            path=str(self.ca.cert_path),
            state_dir=str(self.ca.state_dir),
        )
        # Leaves cached on disk by an earlier run, read in a thread (the call never fails).
        self.selector.load_cached_leaves()
        if self.acme is not None:
            self._log.info(
                "ACME on: certificates for public routed names from {directory} (challenges {challenges}), kept in "
                "{state_dir}/acme; GET /acme on the admin listener shows them",
                directory=self.acme.directory_url, challenges=", ".join(self.acme.challenge_types),
                state_dir=str(self.ca.state_dir),
            )

    def _make_acme(
        self, settings: Settings, reactor: Any, gateway: Gateway, state_dir: Path, run: Any, source: Any = None
    ) -> Any:
        """ACME for public names (--acme-email): the manager (a child service), its HTTP-01 answers on the gateway
        (labelgw.http.dispatch) and its contexts for the SNI selector; None without --acme-email. With C{source}
        (a worker of --workers: labelgw.workers.certs.WorkerAcme) no manager here: the supervisor's feeds it."""
        if settings.acme is None:
            return None
        from labelgw.tls.acme_openssl import AcmeContexts

        if source is not None:
            gateway.acme = source  # type: ignore[attr-defined]
            return AcmeContexts(source, INTERMEDIATE, on_miss=source.on_demand)
        from labelgw.tls.acme import HTTP_01, TLS_ALPN_01, AcmeManager
        from labelgw.tls.acme_client import AcmeIssuer
        from labelgw.tls.acme_store import AcmeStore

        acme = settings.acme
        kinds = {"auto": (HTTP_01, TLS_ALPN_01), "http-01": (HTTP_01,), "tls-alpn-01": (TLS_ALPN_01,)}[acme.challenge]
        # HTTP-01 needs an HTTP listener; TLS-ALPN-01 has the HTTPS ones (this service exists only with them).
        challenge_types = tuple(kind for kind in kinds if kind != HTTP_01 or settings.http)
        if not challenge_types:
            raise SystemExit("labelgw: --acme-challenge http-01 needs an HTTP listener (--http)")
        store = AcmeStore(state_dir, acme.directory)
        issuer = AcmeIssuer(reactor=reactor, run_in_thread=run, store=store, email=acme.email, ca_bundle=acme.ca_bundle)
        table = gateway.table
        cert_dir = self.cert_dir

        def hosts() -> list[tuple[str, str | None]]:
            return [(route.host, route.tls) for route in table.all_routes()]

        def has_own(name: str) -> bool:
            index = cert_dir.index if cert_dir is not None else None
            return index is not None and index.lookup(name) is not None

        def wildcard_for(name: str) -> str | None:
            # Served by a wildcard route only (an exact route's name is in hosts() already).
            matched = table.matched_host(name)
            return matched if matched is not None and matched.startswith("*.") else None

        manager = self.acme = AcmeManager(
            clock=reactor, issuer=issuer, hosts=hosts, challenge_types=challenge_types, has_own_certificate=has_own,
            directory_url=acme.directory, retry_base=acme.retry_base,
            wildcard_for=wildcard_for, max_on_demand=acme.on_demand_max,
        )
        manager.setServiceParent(self)
        gateway.acme = manager  # type: ignore[attr-defined]
        # Handshakes for names under a public wildcard route ask for their own certificate (bounded per wildcard).
        return AcmeContexts(manager, INTERMEDIATE, on_miss=manager.on_demand)

    def _first_listener_port(self) -> int | None:
        port = self.listeners[0].port if self.listeners else None
        return getattr(port.getHost(), "port", None) if port is not None else None
