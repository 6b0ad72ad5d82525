"""A real loopback TCP connection on a reactor of the test's own, driven by hand (reactor.iterate), for tests of
what labelgw relies on in Twisted's TCP transports."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.protocol import ClientFactory, Factory, Protocol

P = TypeVar("P", bound=Protocol)


def connect_by_hand(reactor: Any, make: Callable[[list[P]], P]) -> tuple[Any, P, P]:
    """(the listening port, the server side, the client side) of one connection; `make(kept)` builds a protocol
    that appends itself to `kept` once connected."""
    servers: list[P] = []
    clients: list[P] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: make(servers)), interface="127.0.0.1")
    reactor.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: make(clients)))
    for _ in range(200):
        if servers and clients:
            break
        reactor.iterate(0.01)
    assert servers and clients, "no loopback connection within 200 reactor turns"
    return port, servers[0], clients[0]
