#!/usr/bin/env python3
"""HTTP/2's own cost in the data path, without sockets or TLS: next to bench/inprocess.py (HTTP/1.1).

One HTTP/2 client connection (labelgw's H2Protocol on the test harness's FakeTransport, tests/proxyharness.py) and
pooled upstream connections on a memory reactor; requests as h2load sends them (GET, HPACK with the dynamic table,
END_STREAM on HEADERS, a 1 GiB client window), `--streams` of them in one read (h2load -m), each stream's upstream
answering in its own read. The client's bytes are built before the clock starts (hpack + hyperframe), so what is
timed is labelgw's (and the h2 library's) work and the harness's byte moving only. The HTTP/1.1 loop of
bench/inprocess.py runs next to it on the same harness, for the ratio.

Figures: CPU seconds of this process (time.process_time), best of `--runs`; `--profile` prints a cProfile of one
run instead (by own time, with the share of the h2/hpack/hyperframe libraries against labelgw's).

    cd <tree> && .venv/bin/python bench/inprocess_h2.py --requests 20000 --streams 1,10

Nothing leaves the process: no network traffic at all.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hpack import Encoder  # noqa: E402
from hyperframe.frame import HeadersFrame, SettingsFrame, WindowUpdateFrame  # noqa: E402

from labelgw.http.h2 import H2Factory, H2Protocol  # noqa: E402
from tests.proxyharness import CLIENT_PEER, DEFAULT_SPECS, LISTENER, FakeTransport, ProxyHarness, Upstream, get, ok  # noqa: E402

_FRAME_HEAD = struct.Struct(">BHBBL")  # a 24-bit length (its high byte, its low 16 bits), type, flags, stream id
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# h2load's defaults: -w 30 / -W 30 (stream and connection windows of 2^30 - 1), no push.
WINDOW = 2**30 - 1
HEADERS = [
    (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"api.localhost"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
RESPONSE = ok()


def client_opening() -> bytes:
    settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: WINDOW, SettingsFrame.ENABLE_PUSH: 0})
    return (
        PREFACE + settings.serialize() + WindowUpdateFrame(0, window_increment=WINDOW - 65535).serialize()
        # The ACK of the server's SETTINGS (h2load sends it once it read them).
        + SettingsFrame(0, flags=["ACK"]).serialize()
    )


def client_batches(count: int, streams: int, encoder: Encoder, first_id: int) -> list[bytes]:
    """`count` batches of `streams` GET requests each, one batch per read.

    Once the encoder's blocks repeat (every field indexed: the table no longer changes), the block is reused and
    only the frame header is packed: building the client's bytes must not weigh in callgrind's per-request count
    (hpack and hyperframe cost about 100 k instructions per request, more than labelgw's own work)."""
    batches = []
    stream_id = first_id
    previous = None
    flags = 0x4 | 0x1  # END_HEADERS, END_STREAM
    for _ in range(count):
        frames = []
        for _ in range(streams):
            if previous is None or previous[0] != previous[1]:
                block = encoder.encode(HEADERS)
                frame = HeadersFrame(stream_id, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
                previous = (block, previous[0] if previous else None)
            else:
                block = previous[0]
                frame = _FRAME_HEAD.pack(len(block) >> 16, len(block) & 0xFFFF, 0x1, flags, stream_id) + block
            frames.append(frame)
            stream_id += 2
        batches.append(b"".join(frames))
    return batches


class H2Run:
    """One HTTP/2 connection through the harness, warmed up (`streams` pooled upstream connections)."""

    def __init__(self, streams: int, batches: int, prepare: int = 0) -> None:
        self.harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
        factory = H2Factory(self.harness.gateway, b"https")
        self.server: H2Protocol = factory.buildProtocol(CLIENT_PEER)
        self.transport = FakeTransport(self.harness.reactor, LISTENER, CLIENT_PEER)
        self.transport.protocol = self.server
        self.server.makeConnection(self.transport)
        encoder = Encoder()
        warm = client_batches(1, streams, encoder, 1)
        # (`prepare`: build that many, run `batches` of them; callgrind_h2.sh's two runs then build the same.)
        self.batches = client_batches(max(batches, prepare), streams, encoder, 1 + 2 * streams)[:batches]
        self.server.dataReceived(client_opening() + warm[0])
        self.upstreams: list[Upstream] = [upstream.accept() for upstream in self.harness.new_connects()]
        assert len(self.upstreams) == streams, "one upstream connection per concurrent stream"
        for upstream in self.upstreams:
            upstream.send(RESPONSE)
        self.transport.clear()
        for upstream in self.upstreams:
            upstream.transport.clear()

    def run(self) -> float:
        to_proxy = self.server.dataReceived
        client_transport = self.transport
        advance = self.harness.reactor.advance
        pairs = [(upstream.transport, upstream.protocol.dataReceived) for upstream in self.upstreams]  # type: ignore[union-attr]
        started = time.process_time()
        for batch in self.batches:
            to_proxy(batch)
            for transport, from_backend in pairs:
                transport.clear()
                from_backend(RESPONSE)
            # The reactor turn ends (the upstreams' reads came in one turn).
            advance(0)
            client_transport.clear()
        elapsed = time.process_time() - started
        harness = self.harness
        # Every request was answered over the warm connections: nothing failed along the way.
        assert harness.connect_count() == len(self.upstreams) and harness.gateway.in_flight == 0, "a request failed"
        assert not self.server.streams and not self.server.closed
        return elapsed


class H1Run:
    """bench/inprocess.py's GET loop: one HTTP/1.1 keep-alive connection, one pooled upstream connection."""

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
        self.request = get(b"api.localhost")
        client = self.client = self.harness.connect()
        client.send(self.request)
        self.upstream = self.harness.upstream().accept()
        self.upstream.send(RESPONSE)
        client.transport.clear()
        self.upstream.transport.clear()

    def run(self) -> float:
        to_proxy, from_backend = self.client.protocol.dataReceived, self.upstream.protocol.dataReceived  # type: ignore[union-attr]
        client_transport, upstream_transport = self.client.transport, self.upstream.transport
        request = self.request
        started = time.process_time()
        for _ in range(self.requests):
            to_proxy(request)
            from_backend(RESPONSE)
            client_transport.clear()
            upstream_transport.clear()
        elapsed = time.process_time() - started
        assert self.harness.connect_count() == 1 and self.harness.gateway.in_flight == 0
        return elapsed


def make(kind: str, requests: int, prepare: int = 0) -> Callable[[], float]:
    if kind == "h1":
        return H1Run(requests).run
    streams = int(kind.removeprefix("h2-m"))
    return H2Run(streams, max(requests // streams, 1), max(prepare // streams, 1)).run


def profile(kind: str, requests: int, top: int) -> None:
    import cProfile
    import pstats

    run = make(kind, requests)
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    shares: dict[str, float] = {}
    total = 0.0
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += own
        for part in ("/h2/", "/hpack/", "/hyperframe/", "/labelgw/", "/twisted/", "/tests/"):
            if part in filename:
                shares[part.strip("/")] = shares.get(part.strip("/"), 0.0) + own
                break
        else:
            shares["other"] = shares.get("other", 0.0) + own
    print(f"{kind}: own time by package ({requests} requests, profiled):")
    for name, own in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {name:<11} {own / total * 100:5.1f} %  {own / requests * 1e6:7.2f} us/request (profiled)")
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", default="1,10", help="comma list: concurrent streams per read (h2load -m)")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each kind instead of timing")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--prepare", type=int, default=0, help="with --once: build the client's bytes for this many "
                        "requests, run `--requests` of them (so that two runs differ in the requests only)")
    parser.add_argument("--once", metavar="KIND", help="run `--requests` of one kind once, untimed (for callgrind: "
                        "h1, h2-m1, h2-m10, ...)")
    args = parser.parse_args(argv)
    if args.once:
        make(args.once, args.requests, args.prepare)()
        return 0
    import labelgw

    print(f"labelgw from {Path(labelgw.__file__).parent}")
    kinds = ["h1"] + [f"h2-m{int(m)}" for m in args.streams.split(",")]
    if args.profile:
        for kind in kinds:
            profile(kind, args.requests, args.top)
        return 0
    figures: dict[str, float] = {}
    for kind in kinds:
        best = min(make(kind, args.requests)() for _ in range(args.runs))
        figures[kind] = best / args.requests * 1e6
        ratio = f"  {figures[kind] / figures['h1']:.2f}x HTTP/1.1" if kind != "h1" else ""
        print(f"{kind:<7} {args.requests} requests, best of {args.runs}: {best * 1000:.0f} ms CPU, "
              f"{figures[kind]:.2f} us/request{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
