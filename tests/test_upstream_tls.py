"""Backends labelled labelgw.scheme=https are reached over TLS (encrypted; their certificates are not verified)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from labelgw.core.backends import Backend
from labelgw.http.settings import ProxySettings
from labelgw.http.upstream import UpstreamPool
from labelgw.core.model import ContainerSpec


class _Sink:
    def upstream_connected(self, connection: object) -> None:
        pass

    def upstream_connect_failed(self, reason: object) -> None:
        pass


def backend(scheme: str) -> Backend:
    return Backend(ContainerSpec(container_id=scheme, name=scheme, service="s", address="127.0.0.1", port=9443,
                                 hosts=("s.localhost",), scheme=scheme))


def test_https_backends_are_dialled_with_tls_and_http_ones_without() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, ProxySettings(connect_timeout=3.0))
    pool.connect(backend("https"), _Sink())
    pool.connect(backend("http"), _Sink())
    [(host, port, _, options, timeout, _)] = reactor.sslClients
    assert (host, port, timeout) == ("127.0.0.1", 9443, 3.0)
    assert options.verify is False
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("127.0.0.1", 9443)]
    pool.connect(backend("https"), _Sink())
    assert reactor.sslClients[1][3] is options  # one set of options, built once
