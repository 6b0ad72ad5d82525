"""A DNS server for tests that answers every A query with 127.0.0.1 (twisted.names), on a loopback port.

Run as a process: ``python tests/support/dnsstub.py PORT``; it serves UDP and TCP on 127.0.0.1:PORT until killed.
Pebble's validation authority asks it where a name lives (``pebble -dnsserver 127.0.0.1:PORT``), so every
validation connects to labelgw on loopback. AAAA and other types get an empty answer (NOERROR): IPv4 only.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer
from twisted.names import dns, server


class LoopbackResolver:
    """Every name is 127.0.0.1."""

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred[Any]:
        if query.type == dns.A:
            answer = dns.RRHeader(name=query.name.name, type=dns.A, ttl=5, payload=dns.Record_A("127.0.0.1", ttl=5))
            return defer.succeed(([answer], [], []))
        return defer.succeed(([], [], []))


def main(port: int) -> None:
    from twisted.internet import reactor

    factory = server.DNSServerFactory(clients=[LoopbackResolver()])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"dnsstub on 127.0.0.1:{port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]))
