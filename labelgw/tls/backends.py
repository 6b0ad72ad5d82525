"""TLS to backends labelled ``<prefix>.scheme=https``, on the standard library's ssl (L{labelgw.tls.stdtls}).

By default the connection is encrypted and the certificate not verified: containers on one host mostly serve
self-signed certificates, and labelgw reaches them by IP address. With ``<prefix>.tls.verify=true`` the chain is
verified against the system's CA store, or the PEM bundle of ``<prefix>.tls.ca``, and the certificate must name
``<prefix>.tls.server_name`` (default: the route's first host), which is also the SNI sent. A certificate that does
not verify fails the handshake: one warning with OpenSSL's reason, and the request gets a 502.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet.error import ConnectError
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.core.model import ContainerSpec
from labelgw.tls.stdtls import StdTLSClientFactory


class BackendTLS:
    """Client contexts for backends, one per (verify, CA bundle), built on first use. Reactor thread only."""

    _log = Logger()

    def __init__(self) -> None:
        self._contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}

    def context(self, verify: bool, cafile: str | None) -> ssl.SSLContext:
        key = (verify, cafile)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if verify:
                # The bundle is read once (a small file) and the context kept; a bad file fails each connection
                # with its reason, logged below.
                if cafile is not None:
                    ctx.load_verify_locations(cafile=cafile)
                else:
                    ctx.load_default_certs()
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._contexts[key] = ctx
        return ctx

    def connect(self, reactor: Any, spec: ContainerSpec, address: str, port: int, factory: ClientFactory,
                timeout: float) -> None:
        """Dial C{address}:C{port} over TCP with TLS on top; C{factory} hears of the connection as without TLS."""
        name = spec.tls_server_name or (spec.hosts[0] if spec.hosts else None)
        if name is not None and name.startswith("*."):
            name = None
        problem: str | None = None
        try:
            ctx = self.context(spec.tls_verify, spec.tls_ca)
        except (OSError, ssl.SSLError) as error:
            problem = f"cannot read the CA bundle {spec.tls_ca} ({error})"
        if problem is None and spec.tls_verify and name is None:
            problem = "no name to verify its certificate against (set tls.server_name)"
        if problem is not None:
            self._log.warn("TLS to backend {host}:{port} not attempted: {reason}", host=address, port=port,
                           reason=problem)
            reactor.callLater(0, factory.clientConnectionFailed, None, Failure(ConnectError(string=problem)))
            return
        tls = StdTLSClientFactory(ctx, name, factory, reactor, handshake_timeout=timeout)
        reactor.connectTCP(address, port, tls, timeout=timeout)
