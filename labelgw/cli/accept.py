"""A TCP listening port that accepts with fewer Python steps per connection than Twisted's C{tcp.Port}.

Twisted's accept step costs about 40 Python calls per connection before the protocol sees it: a log-buffering
context and two C{Logger} objects per readable event, a generator around C{socket.accept} (which converts the
family and type to enums and checks the default timeout), the address object, and C{tcp.Server.__init__} with its
three base initialisers, its log prefix lookup and two formatted strings. For a short connection (a TLS handshake,
then close) that is a quarter of labelgw's Python work.

L{LeanPort} is C{tcp.Port} with its C{doRead} written out for the common case:

- C{_accept} on the listening socket (the C function C{socket.accept} wraps: a descriptor and an address), the
  client socket made from the descriptor with the family given (no lookups);
- the transport is a plain C{tcp.Server} (exactly that type, so that labelgw's fast read and write paths,
  L{labelgw.cli.reactor} and L{labelgw.http.fastwrite}, treat it as they treat Twisted's), with the instance state
  C{tcp.Server.__init__} gives it (tests/test_accept.py compares the two); the log prefix of a protocol class is
  looked up once;
- on a port that listens on one address (not a wildcard), a connection's C{getHost} is that address, without a
  C{getsockname} call and a new address object per call;
- the socket is closed without the C{shutdown(2)} Twisted makes before C{close} (its own comment calls it
  unnecessary: the descriptor is close-on-exec, so this process holds the only copy; C{close} sends the FIN).

Anything unusual goes to Twisted's own step: an accept error other than "no more connections" (descriptor
exhaustion with its reserved-descriptor recovery, ENOBUFS, ECONNABORTED, EPERM) runs C{tcp.Port.doRead}, which
handles and logs it as it always does. The number of accepts per readable event adapts as Twisted's does.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet import address, tcp
from twisted.python import log

from labelgw.http.fastwrite import DEFAULTS

_new_server = object.__new__
_Server = tcp.Server
_SOCK_STREAM = socket.SOCK_STREAM
_getnameinfo = socket.getnameinfo
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
_IPv6Address = address.IPv6Address


class LeanPort(tcp.Port):
    """C{tcp.Port} with a leaner accept step (module docstring); everything else is Twisted's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tcp.Port.__init__(self, *args, **kwargs)
        # Log prefix per protocol class (what tcp.Server.__init__ computes per connection).
        self._prefixes: dict[type, str] = {}
        # The local address of every accepted connection, when the port listens on one address (not a wildcard).
        self._host: Any = None

    def startListening(self) -> None:
        tcp.Port.startListening(self)
        host = self.getHost()
        try:
            fixed = ipaddress.ip_address(host.host)
        except ValueError:
            return
        if not fixed.is_unspecified and not (fixed.version == 6 and fixed.is_link_local):
            self._host = host

    def _connection_host(self) -> Any:
        # A connection's getHost when the port listens on one address: that address (no getsockname).
        return self._host

    def doRead(self) -> None:
        try:
            accept = self.socket._accept  # type: ignore[union-attr]
            factory: Any = self.factory
            reactor = self.reactor
            family = self.addressFamily
            make_address = self._addressType
            wanted = self.numberAccepts
            accepted = 0
            while accepted < wanted:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    # Descriptor exhaustion and the rarer refusals: Twisted's step handles and logs them.
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.socket(family, _SOCK_STREAM, 0, fd)
                if len(addr) == 4:
                    # IPv6: the scope id in the host, as Twisted's step does.
                    host = _getnameinfo(addr, _NUMERIC)
                    addr = (host[0], *addr[1:])
                protocol = factory.buildProtocol(make_address("TCP", *addr))
                if protocol is None:
                    skt.close()
                    continue
                session = self.sessionno
                self.sessionno = session + 1
                protocol.makeConnection(self._transport(skt, protocol, addr, session, reactor))
            # Scaled as Twisted does: more next time when this turn took all it was allowed.
            if accepted == wanted:
                self.numberAccepts = wanted + 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()

    def _transport(self, skt: socket.socket, protocol: Any, addr: Any, session: int, reactor: Any) -> tcp.Server:
        """What C{tcp.Server(skt, protocol, addr, self, session, reactor)} makes, reading for events."""
        skt.setblocking(False)
        kind = type(protocol)
        prefix = self._prefixes.get(kind)
        if prefix is None:
            prefix = self._prefixes[kind] = self._server_prefix(protocol)
        host = addr[0]
        transport: tcp.Server = _new_server(_Server)
        transport.__dict__.update(
            reactor=reactor,
            _tempDataBuffer=[],
            _tempDataLen=0,
            socket=skt,
            fileno=skt.fileno,
            protocol=protocol,
            server=self,
            client=addr,
            sessionno=session,
            hostname=host,
            logstr=f"{prefix},{session},{host}",
            repstr=f"<{kind.__name__} #{session} on {self._realPortNumber}>",
            connected=1,
            # close() alone ends the connection: the descriptor is this process's only copy (module docstring).
            _shouldShutdown=False,
            # The class-level state the fast read and write paths read, held by the instance (fastwrite.DEFAULTS).
            **DEFAULTS,
        )
        if len(addr) != 2:
            transport._addressType = _IPv6Address
        if self._host is not None:
            transport.getHost = self._connection_host  # type: ignore[method-assign]
        reactor.addReader(transport)
        return transport

    @staticmethod
    def _server_prefix(protocol: Any) -> str:
        # tcp.Server's own lookup (ILoggingContext's logPrefix, else the class name).
        return str(_Server._getLogPrefix(None, protocol))  # type: ignore[arg-type]


def listen_tcp(reactor: Any, port: int, factory: Any, backlog: int, interface: str) -> LeanPort:
    """C{reactor.listenTCP(port, factory, backlog, interface)} with a L{LeanPort}."""
    listening = LeanPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening
