"""TLS for labelgw listeners: local CA, user certificate directory, Mozilla intermediate policy, SNI.

Wiring an ``--https`` listener (see L{labelgw.tls.sni} for the certificate choice)::

    run = thread_runner(reactor)
    ca = LocalCA.load_or_create(state_dir)              # blocking, at start-up
    certs = CertDirectory(cert_dir, clock=reactor, run_in_thread=run)   # a Service: setServiceParent(top)
    selector = SNIContextSelector(clock=reactor, run_in_thread=run, is_routed=..., local_ca=ca, cert_dir=certs)
    endpoint.listen(StdTLSFactory(selector, http_factory, clock=reactor, handshake_timeout=10.0))

L{StdTLSFactory} is the standard library's engine (L{labelgw.tls.stdtls}, the default); L{TLSServerFactory} takes
the same arguments and runs Twisted's pyOpenSSL layer (``--tls-engine openssl``).
"""

from labelgw.tls.ca import CAError, LeafMaterial, LocalCA, default_state_dir
from labelgw.tls.certdir import CertDirectory, CertIndex, UserCertificate, thread_runner
from labelgw.tls.deadlines import TLSServerFactory
from labelgw.tls.policy import INTERMEDIATE, TLSPolicy, build_server_context
from labelgw.tls.sni import SNIContextSelector
from labelgw.tls.stdtls import StdTLSFactory

__all__ = [
    "INTERMEDIATE",
    "CAError",
    "CertDirectory",
    "CertIndex",
    "LeafMaterial",
    "LocalCA",
    "SNIContextSelector",
    "StdTLSFactory",
    "TLSPolicy",
    "TLSServerFactory",
    "UserCertificate",
    "build_server_context",
    "default_state_dir",
    "thread_runner",
]
