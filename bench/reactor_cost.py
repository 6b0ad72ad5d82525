#!/usr/bin/env python3
"""What the reactor and the TCP transports cost per request, with no HTTP at all: valgrind instructions per round
trip of a ping-pong over loopback TCP inside one process, on labelgw's reactor (or Twisted's stock epoll reactor).

    .venv/bin/python bench/reactor_cost.py [--connections 50] [--requests 4000] [--reactor lean|epoll]
                                           [--write direct|twisted] [--timers] [--tree DIR]

A listening port (labelgw's LeanPort) and `--connections` clients (tcp.Client) in the same process: each client
writes a 100-byte "request", the server's protocol answers it with a 100-byte "response" as it is read, and the
client sends its next request as the response arrives, until `--requests` round trips are done in all. Each round
trip is what a proxied keep-alive request costs labelgw below the HTTP layer: two read events (here the server's
and the client's socket, in a proxy the client's and the upstream's) and two writes (fastwrite.write_now, or the
transport's own write with `--write twisted`). `--timers` adds what the HTTP layer does for its deadlines on both
sides (server.py and upstream.py's lazy timers: a clock read per request, a DelayedCall per connection re-armed only
when it fires).

Run under callgrind by itself (`--callgrind`: N and 2N round trips, the difference divided by N, so start-up and
the connections' set-up cancel out; the tree is imported from `--tree`, default this one). Without `--callgrind`
it prints the CPU time per round trip (process time: indicative only). Loopback only; bounded (every run stops
after its round trips, or after 60 s).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n" + b"x" * 56 + b"\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n" + b"y" * 54 + b"\r\n\r\nhello\n"
_TOTAL = re.compile(r"Collected : (\d+)")


def run(args: argparse.Namespace) -> float:
    sys.path.insert(0, str(args.tree))
    if args.reactor == "lean":
        from labelgw.cli.reactor import install

        reactor: Any = install()
    else:
        from twisted.internet import epollreactor

        epollreactor.install()
        from twisted.internet import reactor  # type: ignore[no-redef]
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    from labelgw.cli.accept import listen_tcp
    from labelgw.http.fastwrite import write_now

    if args.write == "twisted":

        def write_now(transport: Any, data: bytes) -> None:  # noqa: F811
            transport.write(data)

    left = [args.requests]
    timers = args.timers
    clock_seconds = reactor.seconds

    class Lazy:
        """The HTTP layer's lazy deadline: a clock read per request, a DelayedCall that re-arms when it fires."""

        timer: Any = None
        at = 0.0

        def touch(self) -> None:
            now = clock_seconds()
            if self.timer is None:
                self.timer = reactor.callLater(60.0, self.fire)
                self.at = now + 60.0

        def fire(self) -> None:
            self.timer = None

    class Answer(Protocol, Lazy):
        transport: Any

        def dataReceived(self, data: bytes) -> None:
            if timers:
                self.touch()
            write_now(self.transport, RESPONSE)

    class Ask(Protocol, Lazy):
        transport: Any

        def connectionMade(self) -> None:
            write_now(self.transport, REQUEST)

        def dataReceived(self, data: bytes) -> None:
            if timers:
                self.touch()
            left[0] -= 1
            if left[0] > 0:
                write_now(self.transport, REQUEST)
            elif left[0] == 0:
                reactor.stop()

    class Asks(ClientFactory):
        protocol = Ask

    port = listen_tcp(reactor, 0, Factory.forProtocol(Answer), 50, "127.0.0.1")
    number = port.getHost().port
    for _ in range(args.connections):
        reactor.connectTCP("127.0.0.1", number, Asks())
    reactor.callLater(60, reactor.stop)
    started = time.process_time()
    reactor.run()
    if left[0] > 0:
        raise SystemExit(f"stopped after 60 s with {left[0]} of {args.requests} round trips left")
    return (time.process_time() - started) / args.requests


def callgrind(args: argparse.Namespace) -> float:
    totals = []
    for count in (args.requests, 2 * args.requests):
        with tempfile.TemporaryDirectory(prefix="reactor-cost-") as tmp:
            argv = [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, __file__,
                "--connections", str(args.connections), "--requests", str(count), "--reactor", args.reactor,
                "--write", args.write, "--tree", str(args.tree), *(["--timers"] if args.timers else []),
            ]
            # A fixed hash seed: the same dict layouts in both runs.
            env = dict(os.environ, PYTHONHASHSEED="0")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True, env=env)
            match = _TOTAL.search(done.stderr)
            if match is None:
                raise SystemExit(done.stderr[-2000:])
            totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) / args.requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--reactor", choices=("lean", "epoll"), default="lean")
    parser.add_argument("--write", choices=("direct", "twisted"), default="direct")
    parser.add_argument("--timers", action="store_true")
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args(argv)
    if args.callgrind:
        per = callgrind(args)
        print(
            f"{per:,.0f} instructions per round trip (reactor {args.reactor}, write {args.write}, "
            f"{'timers, ' if args.timers else ''}{args.connections} connections, tree {args.tree})"
        )
    else:
        print(f"{run(args) * 1e6:.2f} us CPU per round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
