#!/usr/bin/env python3
"""The least an HTTP/1.1 reverse proxy in Python can do, for bench/bench_floor.py: the floor of this design.

Per client connection: find the end of each request head (b"\\r\\n\\r\\n"), forward the bytes unchanged over one
upstream connection of its own (opened at the first request, kept alive), read each response head, take its
Content-Length and forward head and body back as they arrive. Nothing else: no validation, no routing, no header
added or removed, no logging, no deadlines, no back-pressure. Requests have no body (GET load only); a response
without Content-Length is taken as a bodiless one. It is not a product: it only tells how fast any Python proxy
on the same event loop can be, since labelgw must do all of that work and this code does none of it.

    floor_proxy.py --listen PORT --backend PORT [--loop twisted|asyncio] [--reactor lean|epoll] [--tls PEM]

--loop twisted (the default) runs on labelgw's reactor (labelgw.cli.reactor's LeanEPollReactor, what labelgw runs
on; --reactor epoll: Twisted's stock epoll reactor) and writes with labelgw's direct socket send when nothing is
queued (labelgw.http.fastwrite.write_now). --tls PEM (certificate and key in one file) puts the client side on
TLS with the standard library's ssl: on Twisted the C object of an ssl.SSLObject over two ssl.MemoryBIOs, driven by
the protocol; on asyncio the loop's own TLS (SSLObject and MemoryBIOs too). TLS 1.2 and 1.3 with labelgw's cipher
list, ALPN http/1.1, no session tickets and no session cache (as bench_tls.py's nginx-tls). --listen 0 picks a
free port; the port listened on is printed as `floor-proxy: listening on PORT`. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

HEAD_END = b"\r\n\r\n"
LENGTH_NAME = b"\r\ncontent-length:"


def content_length(head: bytes) -> int:
    """The Content-Length of a response head (without its final CRLF CRLF); 0 when absent."""
    start = head.find(b"\r\nContent-Length:")
    if start < 0:
        start = head.lower().find(LENGTH_NAME)
        if start < 0:
            return 0
    start += len(LENGTH_NAME)
    end = head.find(b"\r\n", start)
    return int(head[start:] if end < 0 else head[start:end])


class ResponseFrames:
    """Where the responses of one upstream connection end: each head up to CRLF CRLF, then Content-Length bytes."""

    __slots__ = ("head", "remaining", "completed")

    def __init__(self) -> None:
        self.head = b""  # an incomplete response head
        self.remaining = 0  # body bytes of the current response still to come
        self.completed = 0  # responses seen whole

    def feed(self, data: bytes) -> None:
        while data:
            if self.remaining:
                if len(data) <= self.remaining:
                    self.remaining -= len(data)
                    if not self.remaining:
                        self.completed += 1
                    return
                data = data[self.remaining:]
                self.remaining = 0
                self.completed += 1
            head = self.head + data if self.head else data
            end = head.find(HEAD_END)
            if end < 0:
                self.head = head
                return
            self.head = b""
            body_start = end + 4
            self.remaining = content_length(head[:end])
            if not self.remaining:
                self.completed += 1
            data = head[body_start:]


def tls_context(pem: str) -> ssl.SSLContext:
    # The bench's policy, the same as labelgw's and nginx-tls's: TLS 1.2 and 1.3, ECDHE with AEAD ciphers.
    from labelgw.tls.policy import TLS12_CIPHERS

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(pem)
    context.set_alpn_protocols(["http/1.1"])
    # Like nginx-tls: no session tickets (TLS 1.3 and 1.2) and no session cache (the ssl module has no call for
    # the cache: labelgw's ctypes one, on the same libssl).
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    from labelgw.tls.stdtls import session_cache_off

    session_cache_off(context)
    return context


# -- Twisted ----------------------------------------------------------------------------------------------------------


def run_twisted(listen: int, backend: int, pem: str | None, reactor_name: str) -> None:
    if reactor_name == "lean":
        from labelgw.cli.reactor import install

        reactor: Any = install()
    else:
        from twisted.internet import epollreactor

        epollreactor.install()
        from twisted.internet import reactor  # type: ignore[no-redef]
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from labelgw.http.fastwrite import write_now

    class Upstream(Protocol):
        """The client connection's own connection to the backend: responses go back as they arrive."""

        transport: Any

        def __init__(self, client: Client) -> None:
            self.client = client
            self.frames = ResponseFrames()

        def connectionMade(self) -> None:
            self.client.upstream_ready(self)

        def dataReceived(self, data: bytes) -> None:
            self.frames.feed(data)
            self.client.send(data)

        def connectionLost(self, reason: object = None) -> None:
            self.client.transport.loseConnection()

    class UpstreamFactory(ClientFactory):
        def __init__(self, client: Client) -> None:
            self.client = client

        def buildProtocol(self, addr: object) -> Upstream:
            return Upstream(self.client)

        def clientConnectionFailed(self, connector: object, reason: object) -> None:
            self.client.transport.loseConnection()

    class Client(Protocol):
        transport: Any

        def connectionMade(self) -> None:
            self.partial = b""  # the start of an incomplete request head
            self.upstream: Upstream | None = None
            self.queued: list[bytes] | None = None  # heads that came before the upstream connection was up

        def received(self, data: bytes) -> None:
            if self.partial:
                data = self.partial + data
            end = data.rfind(HEAD_END)
            if end < 0:
                self.partial = data
                return
            cut = end + 4
            self.partial = data[cut:]
            heads = data[:cut] if cut < len(data) else data
            upstream = self.upstream
            if upstream is not None:
                write_now(upstream.transport, heads)
            elif self.queued is not None:
                self.queued.append(heads)
            else:
                self.queued = [heads]
                reactor.connectTCP("127.0.0.1", backend, UpstreamFactory(self))

        # Plain TCP: the bytes read are the request bytes (one Python call less per read event).
        dataReceived = received

        def upstream_ready(self, upstream: Upstream) -> None:
            self.upstream = upstream
            queued, self.queued = self.queued or [], None
            write_now(upstream.transport, b"".join(queued))

        def send(self, data: bytes) -> None:
            write_now(self.transport, data)

        def connectionLost(self, reason: object = None) -> None:
            if self.upstream is not None:
                self.upstream.transport.loseConnection()

    class TLSClient(Client):
        """The client side through an ssl.SSLObject: records in and out through two MemoryBIOs."""

        def connectionMade(self) -> None:
            super().connectionMade()
            self.incoming = ssl.MemoryBIO()
            self.outgoing = ssl.MemoryBIO()
            assert context is not None
            # The C object an SSLObject wraps (as labelgw's engine holds it): SSLObject's methods are Python calls
            # around the same C methods, one more call per record.
            self.tls = context._wrap_bio(  # type: ignore[attr-defined]
                self.incoming, self.outgoing, server_side=True, server_hostname=None, owner=None, session=None
            )
            self.shaken = False

        def flush(self) -> None:
            if self.outgoing.pending:
                write_now(self.transport, self.outgoing.read())

        def dataReceived(self, data: bytes) -> None:
            self.incoming.write(data)
            tls = self.tls
            if not self.shaken:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    self.flush()
                    return
                except ssl.SSLError:
                    self.flush()
                    self.transport.abortConnection()
                    return
                self.shaken = True
                # Nothing came after the client's last handshake message.
                if not self.incoming.pending and not tls.pending():
                    self.flush()
                    return
            chunks = []
            try:
                while True:
                    chunk = tls.read(262144)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    # Nothing left in either buffer: another read would only raise SSLWantReadError (an
                    # exception per event costs more than the two checks).
                    if not self.incoming.pending and not tls.pending():
                        break
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                self.flush()
                self.transport.loseConnection()
                return
            self.flush()
            if chunks:
                self.received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

        def send(self, data: bytes) -> None:
            self.tls.write(data)
            write_now(self.transport, self.outgoing.read())

    context = tls_context(pem) if pem else None
    factory = Factory.forProtocol(TLSClient if pem else Client)
    port = reactor.listenTCP(listen, factory, backlog=1024, interface="127.0.0.1")
    print(f"floor-proxy: listening on {port.getHost().port}", flush=True)
    reactor.run()


# -- asyncio ----------------------------------------------------------------------------------------------------------


def run_asyncio(listen: int, backend: int, pem: str | None) -> None:
    class Upstream(asyncio.Protocol):
        def __init__(self, client: AsyncClient) -> None:
            self.client = client
            self.frames = ResponseFrames()

        def data_received(self, data: bytes) -> None:
            self.frames.feed(data)
            self.client.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.client.transport.close()

    class AsyncClient(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.partial = b""
            self.upstream: Any = None  # the upstream transport
            self.queued: list[bytes] | None = None

        def data_received(self, data: bytes) -> None:
            if self.partial:
                data = self.partial + data
            end = data.rfind(HEAD_END)
            if end < 0:
                self.partial = data
                return
            cut = end + 4
            self.partial = data[cut:]
            heads = data[:cut] if cut < len(data) else data
            if self.upstream is not None:
                self.upstream.write(heads)
            elif self.queued is not None:
                self.queued.append(heads)
            else:
                self.queued = [heads]
                asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            try:
                transport, _ = await asyncio.get_running_loop().create_connection(
                    lambda: Upstream(self), "127.0.0.1", backend
                )
            except OSError:
                self.transport.close()
                return
            self.upstream = transport
            queued, self.queued = self.queued or [], None
            transport.write(b"".join(queued))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.upstream is not None:
                self.upstream.close()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            AsyncClient, "127.0.0.1", listen, backlog=1024, ssl=tls_context(pem) if pem else None
        )
        print(f"floor-proxy: listening on {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--backend", type=int, required=True, help="the backend's port on 127.0.0.1")
    parser.add_argument("--loop", choices=("twisted", "asyncio"), default="twisted")
    parser.add_argument("--reactor", choices=("lean", "epoll"), default="lean", help="with --loop twisted")
    parser.add_argument("--tls", metavar="PEM", help="client side on TLS: certificate and key in this file")
    args = parser.parse_args(argv)
    # labelgw's reactor and write helper come from the tree this script belongs to.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.loop == "twisted":
        run_twisted(args.listen, args.backend, args.tls, args.reactor)
    else:
        run_asyncio(args.listen, args.backend, args.tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
