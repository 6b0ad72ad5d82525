"""What the data path needs of the things it talks to, as structural types: the transport under a connection,
a producer it pauses, and a client connection as the Gateway keeps it.

Twisted types `Protocol.transport` as `ITransport | None`: None before makeConnection, and an interface that has
no producer methods, no abortConnection and no TCP options, though every transport labelgw runs on (TCP, TLS over
TCP, the tests' StringTransport) has them. The data path's protocols derive from `DataProtocol`, which declares
their transport as a `DataTransport` instead: what they call on it, and nothing else, and never None while they
can be called (a connection's methods run after makeConnection set it).
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol as TwistedProtocol


class Producer(Protocol):
    """A streaming producer, as the data path pauses and resumes it (an upstream's transport, for one)."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class DataTransport(Producer, Protocol):
    """A connected stream transport (ITransport, ITCPTransport's abortConnection, IConsumer, IPushProducer).

    `setTcpNoDelay` is not here: a TLS transport may lack it, so callers look it up with hasattr."""

    disconnecting: bool

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class GatewayConnection(Protocol):
    """A client connection as the Gateway keeps it (HTTP/1.1 and HTTP/2 alike): drained on shutdown, aborted when
    the drain's grace runs out."""

    def drain(self) -> None: ...

    def abort(self, reason: str = "") -> None: ...


class DataProtocol(TwistedProtocol):
    """A Twisted protocol of the data path, whose transport is a `DataTransport`."""

    # The one narrowing of Twisted's declaration (an interface, or None), for every protocol of the data path: a
    # structural type cannot be a subtype of a zope interface, so mypy needs to be told once.
    transport: DataTransport  # type: ignore[assignment]
