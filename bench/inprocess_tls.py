#!/usr/bin/env python3
"""What a new TLS connection costs labelgw, without sockets: full TLS handshakes in one process, deterministic.

The server side is labelgw's own stack as an ``--https`` listener builds it (labelgw.tls.https): the
standard-library engine (L{labelgw.tls.stdtls.StdTLSFactory}) with the SNI selector (a local CA's default leaf, EC
P-256, as the benchmarks serve) in front of the gateway's ALPN-negotiating factory, on an in-memory TCP transport
and a MemoryReactorClock. The client is the standard library's ssl over memory BIOs (TLS 1.3 by default, no SNI, no
resumption: what ``openssl s_time -new`` does). Each connection: ClientHello, the server's flight, the client's
Finished (the server answers with its session ticket), then the client closes TCP without close_notify.

`--mode bare` runs the same client against a bare ``ssl.SSLObject`` on the same certificate's context (no SNI
callback, no tickets, no Python around it: the floor that OpenSSL alone costs both sides); `--mode labelgw` (the
default) is the real stack. The difference of the two is labelgw's own work per handshake.

    .venv/bin/python bench/inprocess_tls.py [--mode labelgw|bare] [--handshakes 2000] [--tls12]
    .venv/bin/python bench/inprocess_tls.py --profile          # Python calls per handshake (cProfile)
    .venv/bin/python bench/inprocess_tls.py --callgrind        # instructions per handshake (valgrind, N vs 2N)
    .venv/bin/python bench/inprocess_tls.py --reactor 5        # Python calls per handshake on labelgw's real
                                                               # reactor, loaded by openssl s_time -new for 5 s

`--keepalive` counts requests on one connection instead (the TLS layer and a responder; `--gateway`: the whole
gateway to a backend); `--keepalive --mode bare` is the ssl module's server object alone on the same requests, so
the difference of the two is labelgw's TLS layer per request; `--mode bio-socket` and `--mode socket` put a
socketpair under it, the server's records moved by recv/send through memory BIOs as labelgw does or by OpenSSL on the
socket itself (what a socket-mode transport would save).

`--reactor S` is the one mode with sockets on the network stack (loopback only): the same stack listens on 127.0.0.1 on labelgw's epoll
reactor under cProfile while two `openssl s_time -new` clients (other processes) connect for S seconds, so the
count includes what the reactor and Twisted's TCP transport do per connection (accept, reads, close).

Except with `--reactor`, nothing leaves the process.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, error  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8443)
_DONE = Failure(error.ConnectionDone("the client closed"))


class Wire:
    """TCP under the TLS layer, reduced to what the stack calls: bytes written are kept for the client."""

    disconnecting = False
    producer = None

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writeSequence(self, data: Any) -> None:
        self.out.append(b"".join(data))

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = True

    def getPeer(self) -> Any:
        return PEER

    def getHost(self) -> Any:
        return HOST

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def handshake(client: ssl.SSLObject, server: Any, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO, wire: "Wire") -> None:
    """Drive a MemoryBIO client's handshake against a protocol `server` writing to `wire`, until the client is done."""
    while True:
        try:
            client.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        server.dataReceived(c_out.read())
        c_in.write(wire.take())


def client_context(tls12: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    return context


def labelgw_stack(state: Path) -> tuple[Any, Any]:
    """The listener factory of labelgw's stack (certificate choice, TLS engine, gateway) and its clock."""
    from tests.proxyharness import DEFAULT_SPECS, ProxyHarness

    from labelgw.http.h2 import negotiating_factory
    from labelgw.tls.ca import LocalCA
    from labelgw.tls.sni import SNIContextSelector
    from labelgw.tls.stdtls import factory_for_engine

    harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
    reactor = harness.reactor
    selector = SNIContextSelector(
        clock=reactor,
        run_in_thread=lambda f, *a, **k: defer.succeed(None),
        is_routed=harness.gateway.table.knows_host,
        local_ca=LocalCA.load_or_create(state),
    )
    factory = factory_for_engine(
        "stdlib", selector, negotiating_factory(harness.gateway, b"https"), clock=reactor,
        handshake_timeout=harness.gateway.settings.head_timeout, **as_https_builds_it(),
    )
    return factory, reactor


def as_https_builds_it() -> dict[str, Any]:
    """The options labelgw.tls.https gives the engine, where this tree has them (the script also runs from older
    trees, for A/B counts)."""
    import inspect

    from labelgw.tls.stdtls import factory_for_engine

    known = inspect.signature(factory_for_engine).parameters
    return {"protocol_keeps_deadline": True} if "protocol_keeps_deadline" in known else {}


def make_loop(mode: str, tls12: bool, state: Path, sni: str | None = None) -> tuple[Callable[[int], None], Callable[[], str]]:
    client_ctx = client_context(tls12)
    if mode == "bare":
        from labelgw.tls.ca import LocalCA
        from labelgw.tls.material import CertificateMaterial
        from labelgw.tls.policy import INTERMEDIATE
        from labelgw.tls.stdtls import build_stdlib_context

        leaf = LocalCA.load_or_create(state).issue_leaf(("localhost",), datetime.now(UTC))
        server_ctx = build_stdlib_context(
            INTERMEDIATE, (b"h2", b"http/1.1"), CertificateMaterial(leaf.certificate, leaf.private_key)
        )
        server_ctx.options |= ssl.OP_NO_TICKET

        def bare(n: int) -> None:
            for _ in range(n):
                c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
                client = client_ctx.wrap_bio(c_in, c_out)
                server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
                while True:
                    try:
                        client.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        pass
                    s_in.write(c_out.read())
                    try:
                        server.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    c_in.write(s_out.read())
                s_in.write(c_out.read())
                server.do_handshake()

        return bare, lambda: "bare ssl.SSLObject, no tickets"

    factory, reactor = labelgw_stack(state)

    def stack(n: int) -> None:
        for _ in range(n):
            c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = client_ctx.wrap_bio(c_in, c_out, server_hostname=sni)
            server = factory.buildProtocol(PEER)
            wire = Wire()
            server.makeConnection(wire)
            handshake(client, server, c_in, c_out, wire)
            server.dataReceived(c_out.read())
            # s_time closes TCP without a close_notify.
            server.connectionLost(_DONE)
            reactor.advance(0)

    def check() -> str:
        return f"labelgw stack: {factory.handshakes} handshakes completed, {factory.handshake_failures} failed"

    return stack, check


READ_SIZE = 256 * 1024
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nhello\n"


def keepalive_loop(state: Path, tls12: bool) -> tuple[Callable[[int], None], Callable[[], str]]:
    """Requests on one connection through the TLS layer alone: the protocol behind answers each request at once
    (bench_tls_engines.py's responder), so what is measured per request is the TLS layer's record work both ways
    and the client's."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock

    from labelgw.tls.ca import LocalCA
    from labelgw.tls.material import CertificateMaterial
    from labelgw.tls.policy import INTERMEDIATE
    from labelgw.tls.stdtls import StdTLSFactory

    class Responder(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(RESPONSE)

    class One:
        policy = INTERMEDIATE

        def __init__(self) -> None:
            leaf = LocalCA.load_or_create(state).issue_leaf(("localhost",), datetime.now(UTC))
            self.material = CertificateMaterial(leaf.certificate, leaf.private_key)

        def choose(self, name: str | None) -> "One":
            return self

    factory = StdTLSFactory(One(), Factory.forProtocol(Responder), Clock(), 10.0)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(tls12).wrap_bio(c_in, c_out)
    server = factory.buildProtocol(PEER)
    wire = Wire()
    server.makeConnection(wire)
    handshake(client, server, c_in, c_out, wire)
    server.dataReceived(c_out.read())

    def loop(n: int) -> None:
        for _ in range(n):
            client.write(REQUEST)
            server.dataReceived(c_out.read())
            c_in.write(wire.take())
            client.read(4096)

    return loop, lambda: "keep-alive: one connection, the TLS layer and a responder"


def raw_keepalive_loop(state: Path, tls12: bool, mode: str) -> tuple[Callable[[int], None], Callable[[], str]]:
    """The same requests and responses on one connection without labelgw's TLS layer: the server is the ssl
    module's own C object answering each record, so what is left is OpenSSL both sides and the loop itself.

    `bare`: over memory BIOs, no sockets (keepalive_loop minus this is the TLS layer's Python per request).
    `bio-socket` and `socket`: over a socketpair (AF_UNIX, nothing leaves the process), the server's records
    through memory BIOs with recv and send as labelgw moves them (`bio-socket`), or read and written by OpenSSL on
    the socket itself (`socket`: SSLContext.wrap_socket's C object; a record is two reads there, its header and the
    rest, unless read-ahead is on, and with read-ahead only SSL_has_pending, which the ssl module does not offer,
    tells that nothing is left without one more read). The difference of the two is what a socket-mode transport
    would save per request in user space (callgrind does not count the kernel)."""
    import socket

    from labelgw.tls.ca import LocalCA
    from labelgw.tls.material import CertificateMaterial
    from labelgw.tls.policy import INTERMEDIATE
    from labelgw.tls.stdtls import build_stdlib_context

    leaf = LocalCA.load_or_create(state).issue_leaf(("localhost",), datetime.now(UTC))
    server_ctx = build_stdlib_context(
        INTERMEDIATE, (b"h2", b"http/1.1"), CertificateMaterial(leaf.certificate, leaf.private_key)
    )
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(tls12).wrap_bio(c_in, c_out)
    near, far = socket.socketpair()
    near.setblocking(False)
    far.setblocking(False)
    if mode == "socket":
        server = server_ctx._wrap_socket(far, server_side=True, server_hostname=None, owner=None, session=None)  # type: ignore[attr-defined]
    else:
        server = server_ctx._wrap_bio(s_in, s_out, server_side=True, server_hostname=None, owner=None, session=None)  # type: ignore[attr-defined]

    def to_server(data: bytes) -> None:
        if mode == "bare":
            s_in.write(data)
        elif data:
            near.sendall(data)
            if mode == "bio-socket":
                s_in.write(far.recv(65536))

    def to_client() -> None:
        if mode == "bare":
            c_in.write(s_out.read())
            return
        if mode == "bio-socket":
            far.send(s_out.read())
        try:
            c_in.write(near.recv(65536))
        except BlockingIOError:
            pass

    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        to_server(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        to_client()
    to_server(c_out.read())
    server.do_handshake()

    def loop(n: int) -> None:
        for _ in range(n):
            client.write(REQUEST)
            to_server(c_out.read())
            server.read(READ_SIZE)
            server.write(RESPONSE)
            to_client()
            client.read(4096)

    return loop, lambda: f"keep-alive, {mode}: the ssl module's server object alone (no labelgw TLS layer)"


@contextlib.contextmanager
def state_dir(args: argparse.Namespace) -> Iterator[str]:
    """The local CA's directory: `--state DIR` (made once, then reused: runs compared under valgrind then do not
    differ by a CA key generation), else a temporary one."""
    if args.state:
        Path(args.state).mkdir(parents=True, exist_ok=True)
        yield args.state
        return
    with tempfile.TemporaryDirectory() as state:
        yield state


def gateway_keepalive_loop(state: Path, tls12: bool) -> tuple[Callable[[int], None], Callable[[], str]]:
    """Requests on one HTTPS connection through the whole gateway: the HTTPS listener's stack (SNI selector, the
    stdlib engine, the ALPN factory, the HTTP/1.1 side, the exchange) to a pooled upstream connection on the proxy
    harness's memory reactor, the backend answering each request as nginx does in bench_proxy.py."""
    from tests.proxyharness import DEFAULT_SPECS, ProxyHarness, get, ok

    from labelgw.http.h2 import negotiating_factory
    from labelgw.tls.ca import LocalCA
    from labelgw.tls.sni import SNIContextSelector
    from labelgw.tls.stdtls import factory_for_engine

    harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
    reactor = harness.reactor
    selector = SNIContextSelector(
        clock=reactor, run_in_thread=lambda f, *a, **k: defer.succeed(None),
        is_routed=harness.gateway.table.knows_host, local_ca=LocalCA.load_or_create(state),
    )
    factory = factory_for_engine(
        "stdlib", selector, negotiating_factory(harness.gateway, b"https"), clock=reactor,
        handshake_timeout=harness.gateway.settings.head_timeout, **as_https_builds_it(),
    )
    request, response = get(b"api.localhost"), ok()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(tls12).wrap_bio(c_in, c_out, server_hostname="api.localhost")
    server = factory.buildProtocol(PEER)
    wire = Wire()
    server.makeConnection(wire)
    handshake(client, server, c_in, c_out, wire)
    client.write(request)
    server.dataReceived(c_out.read())
    upstream = harness.upstream().accept()
    upstream.send(response)
    c_in.write(wire.take())
    assert client.read(65536).startswith(b"HTTP/1.1 200")
    to_backend, from_backend = upstream.transport, upstream.protocol.dataReceived

    def loop(n: int) -> None:
        for _ in range(n):
            client.write(request)
            server.dataReceived(c_out.read())
            from_backend(response)
            to_backend.clear()
            c_in.write(wire.take())
            client.read(65536)

    def check() -> str:
        assert harness.connect_count() == 1 and harness.gateway.in_flight == 0
        return "keep-alive through the gateway: one HTTPS connection, one pooled upstream connection"

    return loop, check


def run(args: argparse.Namespace) -> None:
    with state_dir(args) as state:
        if args.keepalive and args.gateway:
            loop, check = gateway_keepalive_loop(Path(state), args.tls12)
        elif args.keepalive and args.mode != "labelgw":
            loop, check = raw_keepalive_loop(Path(state), args.tls12, args.mode)
        elif args.keepalive:
            loop, check = keepalive_loop(Path(state), args.tls12)
        else:
            loop, check = make_loop(args.mode, args.tls12, Path(state), args.sni)
        loop(50)
        if args.profile:
            profile(loop, args.handshakes, args.top)
        else:
            started = time.process_time()
            loop(args.handshakes)
            elapsed = time.process_time() - started
            what = "requests" if args.keepalive else "handshakes"
            print(f"{'keep-alive' if args.keepalive else args.mode} ({'TLS 1.2' if args.tls12 else 'TLS 1.3'}): "
                  f"{args.handshakes} {what}, {elapsed / args.handshakes * 1e6:.1f} us CPU each (both sides, this "
                  f"process)")
        print(check())


def profile(loop: Callable[[int], None], handshakes: int, top: int) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    loop(handshakes)
    profiler.disable()
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    total = 0
    for (filename, line, name), (_primitive, calls, own, _cumulative, _callers) in raw.items():
        if name in ("stack", "bare", "loop") or "disable" in name:
            continue
        total += calls
        rows.append((calls / handshakes, own / handshakes * 1e6, f"{Path(filename).name}:{line}({name})"))
    print(f"  {total / handshakes:.1f} Python calls per handshake (cProfile, {handshakes} handshakes)")
    for calls, own, where in sorted(rows, key=lambda row: (-row[0], -row[1]))[:top]:
        print(f"  {calls:6.2f} calls  {own:8.2f} us own  {where}")


# `--count N`: a client process making N new TLS connections one after the other (handshake, then close without
# close_notify, as s_time does); the server stops once it has seen them all close.
COUNT_CLIENT = r"""
import socket, ssl, sys
port, count, tls12 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
if tls12:
    context.maximum_version = ssl.TLSVersion.TLSv1_2
for _ in range(count):
    raw = socket.create_connection(("127.0.0.1", port))
    tls = context.wrap_socket(raw)
    tls.close()
"""


def real_reactor(args: argparse.Namespace) -> None:
    import cProfile
    import pstats

    from labelgw.cli.reactor import install

    reactor = install()
    with state_dir(args) as state:
        from labelgw.http.h2 import negotiating_factory
        from labelgw.http.server import Gateway
        from labelgw.http.settings import ProxySettings
        from labelgw.core.registry import Registry
        from labelgw.tls.ca import LocalCA
        from labelgw.tls.sni import SNIContextSelector
        from labelgw.tls.stdtls import factory_for_engine

        gateway = Gateway(reactor, Registry().table, ProxySettings())
        selector = SNIContextSelector(clock=reactor, run_in_thread=lambda f, *a, **k: defer.succeed(None),
                                      is_routed=lambda name: False, local_ca=LocalCA.load_or_create(Path(state)))
        factory = factory_for_engine("stdlib", selector, negotiating_factory(gateway, b"https"), clock=reactor,
                                     handshake_timeout=gateway.settings.head_timeout, **as_https_builds_it())
        port = listen(reactor, 0, factory, 1024, "127.0.0.1", args.port)
        argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port.getHost().port}", "-new", "-time", str(args.reactor)]
        if args.tls12:
            argv += ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]
        processes = 2
        if args.count:
            argv = [sys.executable, "-c", COUNT_CLIENT, str(port.getHost().port), str(args.count),
                    "1" if args.tls12 else "0"]
            processes = 1
        profiler = cProfile.Profile()
        clients: list[Any] = []

        def start() -> None:
            clients.extend(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                           for _ in range(processes))
            if not args.no_profile:
                profiler.enable()
            reactor.callLater(0.2, poll)

        def poll() -> None:
            settled = not args.count or factory.handshakes + factory.handshake_failures >= args.count
            if all(client.poll() is not None for client in clients) and settled and not gateway.connections:
                if not args.no_profile:
                    profiler.disable()
                reactor.stop()
            else:
                reactor.callLater(0.2, poll)

        if args.freeze:
            import gc

            gc.collect()
            gc.freeze()
        collections = GCRecorder()
        reactor.callWhenRunning(start)
        cpu = time.process_time()
        reactor.run()
        cpu = time.process_time() - cpu
        collections.stop()
        print(f"garbage collector: {collections}")
    count = factory.handshakes
    if args.no_profile:
        print(f"real reactor, {count} handshakes ({'TLS 1.2' if args.tls12 else 'TLS 1.3'}), "
              f"{factory.handshake_failures} failed, {cpu / max(count, 1) * 1e6:.0f} us CPU each")
        return
    if args.stats:
        profiler.dump_stats(args.stats)
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(calls for (_f, _l, name), (_p, calls, *_rest) in raw.items() if "disable" not in name)
    print(f"real reactor, {count} handshakes ({'TLS 1.2' if args.tls12 else 'TLS 1.3'}), {factory.handshake_failures} "
          f"failed: {total / max(count, 1):.1f} Python calls per handshake (cProfile), {cpu / max(count, 1) * 1e6:.0f} "
          f"us CPU each under the profiler")
    rows = [(calls / max(count, 1), f"{Path(filename).name}:{line}({name})")
            for (filename, line, name), (_p, calls, *_rest) in raw.items()]
    for calls, where in sorted(rows, reverse=True)[: args.top]:
        print(f"  {calls:6.2f} calls  {where}")


def listen(reactor: Any, port: int, factory: Any, backlog: int, interface: str, kind: str) -> Any:
    """A listening port as labelgw's listeners make it (`lean`: labelgw.cli.accept, where this tree has it), or
    Twisted's own (`twisted`)."""
    if kind == "lean":
        try:
            from labelgw.cli.accept import listen_tcp
        except ImportError:
            pass
        else:
            return listen_tcp(reactor, port, factory, backlog, interface)
    return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)


class GCRecorder:
    """Collections by generation and the CPU time they took, from gc.callbacks."""

    def __init__(self) -> None:
        import gc

        self.counts = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            generation = info["generation"]
            self.counts[generation] += 1
            self.seconds[generation] += time.process_time() - self._started

    def stop(self) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def __str__(self) -> str:
        return ", ".join(f"gen{g} {self.counts[g]} in {self.seconds[g] * 1e3:.1f} ms" for g in range(3))


def instructions(args: argparse.Namespace, handshakes: int) -> int:
    from callgrind import callgrind_total

    return callgrind_total([
        sys.executable, __file__, "--mode", args.mode, "--handshakes", str(handshakes),
        *(["--state", args.state] if args.state else []), *(["--tls12"] if args.tls12 else []),
        *(["--sni", args.sni] if args.sni else []), *(["--keepalive"] if args.keepalive else []),
        *(["--gateway"] if args.gateway else []),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("labelgw", "bare", "bio-socket", "socket"), default="labelgw",
                        help="bare: OpenSSL alone, no labelgw layer; with --keepalive also bio-socket and socket "
                             "(the server's records over a socketpair, moved by recv/send or by OpenSSL itself)")
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--tls12", action="store_true", help="TLS 1.2 (ECDHE-ECDSA-AES128-GCM-SHA256) instead of 1.3")
    parser.add_argument("--sni", help="the server name the client sends (default: none, as s_time; "
                        "api.localhost is the routed name: a leaf minted by the local CA)")
    parser.add_argument("--keepalive", action="store_true",
                        help="requests on one connection instead of handshakes (--handshakes is then their number)")
    parser.add_argument("--gateway", action="store_true",
                        help="with --keepalive: the requests go through the whole gateway to a backend (in memory)")
    parser.add_argument("--profile", action="store_true", help="Python calls per handshake (cProfile)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--callgrind", action="store_true",
                        help="instructions per handshake: valgrind runs of N and 2N handshakes, the difference / N")
    parser.add_argument("--no-profile", action="store_true",
                        help="with --reactor: no cProfile (to run it under valgrind or perf instead)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="with --reactor: one client process making N connections one after the other instead "
                             "of s_time (a fixed amount of work: run it under valgrind with N and 2N)")
    parser.add_argument("--state", metavar="DIR", help="the local CA's directory, made once and reused (default: a "
                        "temporary one per run; give one when comparing instruction counts)")
    parser.add_argument("--stats", metavar="FILE", help="with --reactor: save the cProfile statistics (pstats)")
    parser.add_argument("--freeze", action="store_true",
                        help="with --reactor: gc.collect() and gc.freeze() before the load, as labelgw does once started")
    parser.add_argument("--port", choices=("lean", "twisted"), default="lean",
                        help="with --reactor: the listening port labelgw makes (labelgw.cli.accept.LeanPort where the "
                             "tree has it) or Twisted's tcp.Port")
    parser.add_argument("--reactor", type=int, metavar="S",
                        help="profile labelgw's real reactor under two openssl s_time -new clients for S seconds")
    args = parser.parse_args(argv)
    if args.reactor:
        real_reactor(args)
        return 0
    if args.callgrind:
        n = args.handshakes
        small, large = instructions(args, n), instructions(args, 2 * n)
        what = "keep-alive request" if args.keepalive else f"{args.mode} handshake"
        print(f"{what} ({'TLS 1.2' if args.tls12 else 'TLS 1.3'}): {(large - small) / n:,.0f} instructions per "
              f"one, both sides (callgrind, {n} vs {2 * n}: {small:,} / {large:,})")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
