# -*- test-case-name: tests.test_tls_deadlines -*-
"""TLS for a listener, with the two deadlines Twisted's TLS layer leaves out.

Twisted's C{TLSMemoryBIOProtocol} has no timer of its own:

- A client that connects and never finishes (or never starts) its handshake is only closed if the protocol
  behind it closes it. L{TLSServerFactory} gives every handshake a deadline of its own (the request head
  deadline), so whatever protocol ALPN later picks, no connection waits for a handshake forever.
- When the protocol behind it closes the connection (a head or idle timeout, ``Connection: close``, GOAWAY),
  Twisted sends close_notify and then keeps the TCP connection open until the client answers with its own
  close_notify, which many clients never do: 1 009 such connections once held every file descriptor. Here the
  TCP connection is closed L{DEFAULT_CLOSE_GRACE} seconds after that, whatever the client does (nginx closes at
  once; the grace lets a client that does answer finish cleanly). A client that does not even read what was
  left to send is cut off L{FLUSH_TIMEOUT} seconds later.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IConsumer, IDelayedCall, IProtocolFactory, IReactorTime, ITCPTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

# Seconds between labelgw's close_notify and its closing of the TCP connection.
DEFAULT_CLOSE_GRACE = 2.0
# Seconds a closing connection may take to send what is left (nginx's send_timeout is 60 s between writes).
FLUSH_TIMEOUT = 60.0


class TLSServerProtocol(BufferingTLSTransport):
    """Twisted's TLS server protocol plus a handshake deadline and a bounded close."""

    factory: "TLSServerFactory"
    _timer: IDelayedCall | None = None
    _closing = False

    def makeConnection(self, transport: Any) -> None:
        BufferingTLSTransport.makeConnection(self, transport)
        # The protocol behind may already have closed (a gateway that is draining).
        if self.connected and self._timer is None and not self._closing:
            self._timer = self.factory.clock.callLater(self.factory.handshake_timeout, self._handshake_overdue)

    def _checkHandshakeStatus(self) -> None:
        done = self._handshakeDone
        BufferingTLSTransport._checkHandshakeStatus(self)  # type: ignore[misc]
        if self._handshakeDone and not done:
            self.factory.handshakes += 1

    def _handshake_overdue(self) -> None:
        self._timer = None
        # _handshakeDone is TLSMemoryBIOProtocol's own flag (tests/test_internals.py checks it).
        if not self._handshakeDone and self.connected:
            self.abortConnection()

    def loseConnection(self) -> None:
        BufferingTLSTransport.loseConnection(self)
        if self._closing or not self.connected:
            return
        # close_notify is out (or waits behind a registered producer): from now on the grace counts.
        self._closing = True
        self._cancel_timer()
        self._timer = self.factory.clock.callLater(self.factory.close_grace, self._grace_over)

    def _grace_over(self) -> None:
        # The client has not answered close_notify: close TCP after what is left to send (an orderly close).
        self._timer = self.factory.clock.callLater(self.factory.flush_timeout, self._flush_overdue)
        tcp = self._tcp()
        # A producer still registered (the protocol behind never unregistered it) would hold TCP's close for good
        # if it was paused when the buffer drained (FileDescriptor.doWrite resumes it instead of closing).
        if getattr(tcp, "producer", None) is not None:
            cast(IConsumer, tcp).unregisterProducer()
        tcp.loseConnection()

    def _flush_overdue(self) -> None:
        self._timer = None
        self._tcp().abortConnection()

    def _tcp(self) -> ITCPTransport:
        # The TCP connection under TLS: set from connectionMade on, which is before any timer is armed.
        return cast(ITCPTransport, self.transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_timer()
        if not self._handshakeDone:
            self.factory.handshake_failures += 1
        BufferingTLSTransport.connectionLost(self, reason)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class TLSServerFactory(TLSMemoryBIOFactory):
    """C{TLSMemoryBIOFactory(creator, False, wrapped)} whose connections keep the two deadlines above."""

    protocol = TLSServerProtocol

    def __init__(
        self,
        creator: Any,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        handshake_timeout: float,
        close_grace: float = DEFAULT_CLOSE_GRACE,
        flush_timeout: float = FLUSH_TIMEOUT,
    ) -> None:
        TLSMemoryBIOFactory.__init__(self, creator, False, wrapped, clock)
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.close_grace = close_grace
        self.flush_timeout = flush_timeout
        # For /metrics: handshakes completed, and connections closed before theirs completed.
        self.handshakes = 0
        self.handshake_failures = 0
