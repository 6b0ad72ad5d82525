"""A deterministic stand-in world for the proxy data path: no sockets, no sleeps.

`ProxyHarness` builds a Gateway on a MemoryReactorClock, fills a Registry with ContainerSpecs, and hands out
`Client`s (the browser side) and `Upstream`s (one per connectTCP the gateway made, accepted or refused on demand).
Both sides use `FakeTransport`, a StringTransport that keeps the few TCP behaviours the proxy depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from labelgw.core.backends import Backend
from labelgw.http.server import ClientConnection, Gateway, ProxyFactory
from labelgw.http.settings import ProxySettings
from labelgw.http.upstream import UpstreamConnection
from labelgw.core.model import ContainerSpec
from labelgw.core.registry import Registry

# A real clock is never at 0; starting there would hide nothing but could trip "0.0 means unset" sentinels.
START_TIME = 1_000_000.0

CLIENT_PEER = IPv4Address("TCP", "10.0.0.9", 5555)
LISTENER = IPv4Address("TCP", "127.0.0.1", 8080)


class FakeTransport(StringTransport):
    """A StringTransport that behaves like a TCP transport where the proxy can tell the difference:

    - connectionLost arrives on a later reactor turn (clock.advance(0)) after loseConnection/abortConnection;
    - abortConnection drops whatever is written afterwards; nothing is written after connectionLost;
    - setTcpNoDelay exists; unregisterProducer is allowed with none registered (as on TCP);
    - a full buffer keeps a closing connection open until the peer reads it (twisted.internet.abstract.
      FileDescriptor.doWrite), and so does a registered streaming producer paused because the buffer is full.
    """

    def __init__(self, clock: MemoryReactorClock, host: Any, peer: Any) -> None:
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self.clock = clock
        self.protocol: Any = None
        self.no_delay = False
        self.aborted = False
        self.lost = False
        self.buffer_full = False
        self._lost_scheduled = False

    # ITransport, as TCP does it.

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def write(self, data: bytes) -> None:
        if self.aborted or self.lost:
            return
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.lost or self.disconnecting:
            return
        self.disconnecting = True
        self._maybe_finish_close()

    def abortConnection(self) -> None:
        if self.lost or self.aborted:
            return
        self.aborted = True
        self.disconnected = True
        self.disconnecting = True
        self._schedule_lost(error.ConnectionAborted())

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.lost:
            producer.stopProducing()
            return
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None
        self._maybe_finish_close()

    # Test controls.

    def fill_buffer(self) -> None:
        """The peer stopped reading: pause the registered producer, as TCP does past its buffer size."""
        self.buffer_full = True
        if self.producer is not None:
            self.producer.pauseProducing()

    def drain_buffer(self) -> None:
        """The peer read everything: resume the registered producer (a close stays pending while it is
        registered, like FileDescriptor.doWrite)."""
        self.buffer_full = False
        if self.producer is not None:
            self.producer.resumeProducing()
        if self.disconnecting and self.producer is None:
            self._maybe_finish_close()

    def connection_lost(self, reason: BaseException | None = None) -> None:
        """The connection is gone (the peer closed it, or our own close completed)."""
        if self.lost:
            return
        self.lost = True
        self.connected = False
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(reason if reason is not None else error.ConnectionDone()))

    def _maybe_finish_close(self) -> None:
        # As TCP: a close waits until the peer has read what is buffered.
        if self.disconnecting and not self.buffer_full:
            self._schedule_lost(error.ConnectionDone())

    def _schedule_lost(self, reason: BaseException) -> None:
        if self._lost_scheduled or self.lost:
            return
        self._lost_scheduled = True
        self.clock.callLater(0, self.connection_lost, reason)


class _Peer:
    transport: FakeTransport

    def received(self) -> bytes:
        """Everything the proxy wrote to this peer so far."""
        return self.transport.value()

    def take(self) -> bytes:
        """What the proxy wrote since the last take."""
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closing(self) -> bool:
        """The proxy asked to close (loseConnection or abortConnection)."""
        return bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def lost(self) -> bool:
        return self.transport.lost

    @property
    def paused(self) -> bool:
        """The proxy stopped reading from this peer."""
        return self.transport.producerState == "paused"

    def close(self) -> None:
        """The peer closes the connection."""
        self.transport.connection_lost(error.ConnectionDone())

    def reset(self) -> None:
        self.transport.connection_lost(error.ConnectionLost())


class Client(_Peer):
    def __init__(self, protocol: ClientConnection, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Bytes from the client to the proxy."""
        self.protocol.dataReceived(data)

    def responses(self, head_only: Sequence[bool] = ()) -> list["Response"]:
        responses, _ = parse_responses(self.received(), head_only)
        return responses

    def response(self, head_only: bool = False) -> "Response":
        responses = self.responses([head_only])
        assert len(responses) == 1, f"expected one response, got {self.received()!r}"
        return responses[0]


class Upstream(_Peer):
    """One connectTCP call of the gateway: accept it, refuse it, then play the backend."""

    def __init__(self, reactor: MemoryReactorClock, call: tuple[Any, ...], connector: Any) -> None:
        self.reactor = reactor
        self.host, self.port, self.factory, self.timeout, self.bind_address = call
        self.connector = connector
        self.protocol: UpstreamConnection | None = None

    def accept(self) -> "Upstream":
        address = IPv4Address("TCP", self.host, self.port)
        protocol = self.factory.buildProtocol(address)
        transport = FakeTransport(self.reactor, IPv4Address("TCP", "127.0.0.1", 40000), address)
        transport.protocol = protocol
        self.protocol = protocol
        self.transport = transport
        protocol.makeConnection(transport)
        return self

    def refuse(self, reason: BaseException | None = None) -> None:
        self.factory.clientConnectionFailed(
            self.connector, Failure(reason if reason is not None else error.ConnectionRefusedError())
        )

    def time_out(self) -> None:
        """What the reactor's connector does when `timeout` passes without a connection."""
        self.factory.clientConnectionFailed(self.connector, Failure(error.TimeoutError()))

    def send(self, data: bytes) -> None:
        """Bytes from the backend to the proxy."""
        assert self.protocol is not None, "accept() the connection first"
        self.protocol.dataReceived(data)

    def request(self) -> "Request":
        request, _ = parse_request(self.received())
        return request

    def pooled_in(self, backend: Backend) -> bool:
        return any(connection is self.protocol for connection in backend.idle)


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    rest: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    def names(self) -> list[bytes]:
        return [key.lower() for key, _ in self.headers]


def _split_head(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return None
    lines = data[:end].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return lines[0], headers, data[end + 4 :]


def parse_request(data: bytes) -> tuple[Request, bytes]:
    """One request head as the proxy wrote it upstream; the bytes after it are returned (and kept in rest)."""
    split = _split_head(data)
    assert split is not None, f"no complete request head in {data!r}"
    line, headers, rest = split
    method, target, version = line.split(b" ")
    return Request(method, target, version, headers, rest), rest


def decode_chunked(data: bytes) -> tuple[bytes, bytes, bool]:
    """A plain chunked decoder for assertions: (payload, rest after the body, complete)."""
    payload: list[bytes] = []
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol == -1:
            return b"".join(payload), b"", False
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = data.find(b"\r\n", pos)
            while end != -1 and end != pos:  # trailer fields
                pos = end + 2
                end = data.find(b"\r\n", pos)
            if end == -1:
                return b"".join(payload), b"", False
            return b"".join(payload), data[end + 2 :], True
        if len(data) < pos + size + 2:
            return b"".join(payload), b"", False
        payload.append(data[pos : pos + size])
        assert data[pos + size : pos + size + 2] == b"\r\n", "chunk not followed by CRLF"
        pos += size + 2


def parse_responses(data: bytes, head_only: Sequence[bool] = ()) -> tuple[list[Response], bytes]:
    """Split what a client received into responses. `head_only[i]` says the i-th final response answers a
    HEAD request. Interim 1xx responses are listed too; after a 101 the rest is tunnel data, returned apart."""
    responses: list[Response] = []
    finals = 0
    while data:
        split = _split_head(data)
        if split is None:
            break
        line, headers, rest = split
        status = int(line[9:12])
        response = Response(status, line[13:], headers, b"")
        responses.append(response)
        if 100 <= status < 200:
            data = rest
            if status == 101:
                break
            continue
        no_body = (finals < len(head_only) and head_only[finals]) or status in (204, 304)
        finals += 1
        if no_body:
            data = rest
        elif any(v.lower() == b"chunked" for v in response.all(b"transfer-encoding")):
            response.chunked = True
            response.body, data, response.complete = decode_chunked(rest)
        elif response.header(b"content-length") is not None:
            length = int(response.header(b"content-length") or b"0")
            response.body, data = rest[:length], rest[length:]
            response.complete = len(response.body) == length
        else:
            # Delimited by the close: complete only once the connection is closed (the caller knows).
            response.body, data = rest, b""
    return responses, data


def spec(
    container_id: str,
    service: str,
    port: int,
    hosts: tuple[str, ...],
    path: str = "/",
    strip_prefix: bool = False,
    running: bool = True,
) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id, name=container_id, service=service, address="127.0.0.1", port=port,
        hosts=hosts, path_prefix=path, strip_prefix=strip_prefix, running=running,
    )


# api.localhost: "/" -> api (two backends), "/v2" -> v2 (strip_prefix), "/v2/admin" -> admin;
# solo.localhost -> one backend (deterministic pooling); down.localhost -> a stopped container only.
DEFAULT_SPECS = (
    spec("api-1", "api", 9001, ("api.localhost",)),
    spec("api-2", "api", 9002, ("api.localhost",)),
    spec("v2-1", "v2", 9201, ("api.localhost",), path="/v2", strip_prefix=True),
    spec("admin-1", "admin", 9301, ("api.localhost",), path="/v2/admin"),
    spec("solo-1", "solo", 9401, ("solo.localhost",)),
    spec("down-1", "down", 9501, ("down.localhost",), running=False),
)


class ProxyHarness:
    def __init__(self, settings: ProxySettings | None = None, specs: Sequence[ContainerSpec] = DEFAULT_SPECS) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START_TIME)
        self.registry = Registry()
        for container in specs:
            self.registry.apply(container.container_id, container)
        self.gateway = Gateway(self.reactor, self.registry.table, settings or ProxySettings())
        self.factory = ProxyFactory(self.gateway)
        self.clients: list[Client] = []
        self.upstreams: list[Upstream] = []
        self._claimed = 0

    @property
    def settings(self) -> ProxySettings:
        return self.gateway.settings

    def now(self) -> float:
        return self.reactor.seconds()

    def backend(self, container_id: str) -> Backend:
        for pool in self.registry.services.values():
            if container_id in pool.backends:
                return pool.backends[container_id]
        raise KeyError(container_id)

    def backends(self) -> list[Backend]:
        return [b for pool in self.registry.services.values() for b in pool.backends.values()]

    # The client side.

    def connect(self, peer: IPv4Address = CLIENT_PEER) -> Client:
        protocol = self.factory.buildProtocol(peer)
        transport = FakeTransport(self.reactor, LISTENER, peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        self.clients.append(client)
        return client

    # The upstream side.

    def new_connects(self) -> list[Upstream]:
        """connectTCP calls made since the last look."""
        calls = self.reactor.tcpClients[self._claimed :]
        connectors = self.reactor.connectors[self._claimed :]
        self._claimed = len(self.reactor.tcpClients)
        fresh = [Upstream(self.reactor, call, connector) for call, connector in zip(calls, connectors)]
        self.upstreams.extend(fresh)
        return fresh

    def upstream(self) -> Upstream:
        """Exactly one new connectTCP call."""
        fresh = self.new_connects()
        assert len(fresh) == 1, f"expected one new upstream connection attempt, got {len(fresh)}"
        return fresh[0]

    def connect_count(self) -> int:
        return len(self.reactor.tcpClients)

    # Time.

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    def settle(self) -> None:
        """Run what is due now (connectionLost after a close, like the reactor's next turn)."""
        for _ in range(10):
            self.reactor.advance(0)

    # Invariants.

    def assert_accounting(self) -> None:
        self.settle()
        gateway = self.gateway
        assert gateway.in_flight == 0, f"gateway.in_flight is {gateway.in_flight}"
        assert gateway.active_retries == 0, f"gateway.active_retries is {gateway.active_retries}"
        for route in self.registry.routes():
            assert route.service.in_flight == 0, f"service {route.service.name} in_flight is {route.service.in_flight}"
        for backend in self.backends():
            assert backend.in_flight == 0, f"{backend!r}"
            for connection in backend.idle:
                assert connection.connected and connection.sink is None, f"bad pooled connection on {backend!r}"


def get(host: bytes = b"api.localhost", path: bytes = b"/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (method, path, host, extra)


def ok(body: bytes = b"hello", extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)
