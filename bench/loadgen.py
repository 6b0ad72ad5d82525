#!/usr/bin/env python3
"""Open-loop HTTP/1.1 load generator for the balancing benchmark (issue 3); runs as its own process.

    python bench/loadgen.py --port 18080 --host-header bench.localhost --rate 205 --duration 30 --warmup 10 \\
        --seed 1 [--timeout 5] [--slow b4] [--json out.json]

- Arrivals follow a seeded Poisson schedule (rate R for warm-up + duration seconds); every request is sent at its
  intended time whatever happened to the earlier ones, so a slow server cannot slow the generator down and hide
  its own tail (coordinated omission).
- Requests go out on a pool of keep-alive connections: the most recently idle one, else a new connection (up to
  --max-connections, 2000 by default; beyond that a request waits, and the wait shows up as lateness).
- Latency is counted from the INTENDED send time to the last byte of the response. A request without a complete
  answer `--timeout` seconds after its intended time is a failure ("timeout") and its connection is aborted;
  refused or reset connections and non-2xx/3xx answers are failures too. Percentiles are taken over every
  measured request, failures included at the latency they failed with (5 s for a timeout): leaving them out
  would hide exactly the tail this benchmark is about.
- The backend that answered is read from the `X-Whoami` response header.
- The generator measures itself: lateness = actual send time - intended send time (timer lag plus, for a new
  connection, the connect), and its CPU use. A run whose lateness p99 is more than a few ms is not trustworthy.

Requests whose intended time falls in the warm-up are sent but not counted. The pure parts (schedule, response
parser, summary) are unit-tested in tests/test_loadgen.py; the network part needs only asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 2000
BACKEND_HEADER = b"x-whoami"
# Limits of what the parser accepts: the benchmark's answers are a few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

# Outcome.error values
TIMEOUT = "timeout"
CONNECT = "connect"
CLOSED = "closed"
PROTOCOL = "protocol"


# ---------------------------------------------------------------------------------------------------------------
# Schedule


def poisson_schedule(rate: float, duration: float, seed: int) -> list[float]:
    """Intended send times (seconds from the start, increasing, in [0, duration)) of a Poisson process at `rate`."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed)
    times: list[float] = []
    now = rng.expovariate(rate)
    while now < duration:
        times.append(now)
        now += rng.expovariate(rate)
    return times


# ---------------------------------------------------------------------------------------------------------------
# HTTP/1.1 response parser (pure: bytes in, responses out)


class ProtocolError(Exception):
    """The server's bytes are not a response this parser accepts."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    backend: str
    keep_alive: bool
    body_bytes: int


class ResponseParser:
    """Incremental parser of the responses to GET requests on one connection.

    Bodies are delimited by Content-Length, chunked encoding, or the end of the connection (`eof()`); they are
    counted, not kept. Interim 1xx responses are skipped.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: tuple[int, str, bool] | None = None  # status, backend, keep_alive of the response in progress
        self._remaining = 0  # body bytes still expected (Content-Length, or the current chunk)
        self._mode = ""  # "length", "chunk-size", "chunk-data", "chunk-crlf", "trailer", "close"
        self._body = 0

    @property
    def idle(self) -> bool:
        """True between responses (nothing of a next response received yet)."""
        return self._head is None and not self._buffer

    def feed(self, data: bytes) -> list[Response]:
        self._buffer += data
        done: list[Response] = []
        while True:
            if self._head is None:
                if not self._parse_head():
                    break
                continue
            response = self._parse_body()
            if response is None:
                break
            done.append(response)
        return done

    def eof(self) -> Response | None:
        """The connection ended: the response read until close, if one was in progress in that mode."""
        if self._head is not None and self._mode == "close":
            status, backend, _ = self._head
            self._head = None
            return Response(status, backend, False, self._body + len(self._buffer))
        return None

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise ProtocolError("response head too large")
            return False
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        length: int | None = None
        chunked = False
        connection: set[bytes] = set()
        backend = ""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ProtocolError("bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().split(b",")[-1].strip() == b"chunked"
            elif name == b"connection":
                connection.update(token.strip().lower() for token in value.split(b","))
            elif name == BACKEND_HEADER:
                backend = value.decode("latin-1")
        if 100 <= status < 200:
            return True  # interim answer: the real one follows
        keep_alive = (b"keep-alive" in connection) if http10 else (b"close" not in connection)
        self._head = (status, backend, keep_alive)
        self._body = 0
        if status in (204, 304):
            self._mode, self._remaining = "length", 0
        elif chunked:
            self._mode = "chunk-size"
        elif length is not None:
            if length > MAX_BODY_BYTES:
                raise ProtocolError("body too large")
            self._mode, self._remaining = "length", length
        else:
            self._mode = "close"
            self._head = (status, backend, False)
        return True

    def _parse_body(self) -> Response | None:
        buffer = self._buffer
        while True:
            mode = self._mode
            if mode == "length":
                take = min(self._remaining, len(buffer))
                del buffer[:take]
                self._remaining -= take
                self._body += take
                if self._remaining:
                    return None
                return self._finish()
            if mode == "close":
                self._body += len(buffer)
                buffer.clear()
                return None
            if mode in ("chunk-size", "trailer", "chunk-crlf"):
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise ProtocolError("chunk line too long")
                    return None
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if mode == "chunk-crlf":
                    if line:
                        raise ProtocolError("chunk data longer than its size")
                    self._mode = "chunk-size"
                elif mode == "trailer":
                    if not line:
                        return self._finish()
                else:
                    size_text = line.split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
                    if size == 0:
                        self._mode = "trailer"
                    else:
                        if self._body + size > MAX_BODY_BYTES:
                            raise ProtocolError("body too large")
                        self._mode, self._remaining = "chunk-data", size
                continue
            # chunk-data
            take = min(self._remaining, len(buffer))
            del buffer[:take]
            self._remaining -= take
            self._body += take
            if self._remaining:
                return None
            self._mode = "chunk-crlf"

    def _finish(self) -> Response:
        assert self._head is not None
        status, backend, keep_alive = self._head
        self._head = None
        self._mode = ""
        return Response(status, backend, keep_alive, self._body)


# ---------------------------------------------------------------------------------------------------------------
# Per-request outcomes and their summary (pure)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request. Times are seconds from the schedule's start."""

    intended: float
    sent: float  # bytes handed to the socket; nan if never sent
    finished: float  # last byte of the answer, or when the failure was noticed
    status: int = 0  # 0 without an answer
    backend: str = ""
    error: str = ""  # "" or TIMEOUT, CONNECT, CLOSED, PROTOCOL
    new_connection: bool = False

    @property
    def latency(self) -> float:
        return self.finished - self.intended

    @property
    def lateness(self) -> float:
        return self.sent - self.intended

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 400

    @property
    def failure_kind(self) -> str:
        """"" for a success; else the error, or "http-NNN" for an answer with a failing status."""
        if self.error:
            return self.error
        return "" if self.ok else f"http-{self.status}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 < q <= 1) of values sorted ascending; nan for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    failures: int
    timeouts: int
    failure_kinds: dict[str, int]
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    throughput: float  # successful answers per second of the measured window
    answered_by: dict[str, int]  # X-Whoami -> answers (any status)
    share: dict[str, float]  # X-Whoami -> fraction of the answers that named a backend
    slow_share: float  # summed share of the backends named slow (nan if none named)
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float
    unsent: int  # requests that never reached a socket (connect failed, or timed out waiting)
    new_connections: int


def summarize(
    outcomes: Iterable[Outcome], start: float, end: float, slow_backends: Iterable[str] = ()
) -> Summary:
    """Figures over the requests whose intended send time is in [start, end)."""
    if end <= start:
        raise ValueError("the measured window is empty")
    measured = [o for o in outcomes if start <= o.intended < end]
    latencies = sorted(o.latency for o in measured)
    sent = [o.lateness for o in measured if not math.isnan(o.sent)]
    lateness = sorted(sent)
    kinds = Counter(o.failure_kind for o in measured if not o.ok)
    answered = Counter(o.backend for o in measured if o.backend)
    named = sum(answered.values())
    share = {name: count / named for name, count in sorted(answered.items())}
    slow = set(slow_backends)
    ok = sum(1 for o in measured if o.ok)
    to_ms = 1000.0
    return Summary(
        requests=len(measured),
        ok=ok,
        failures=len(measured) - ok,
        timeouts=kinds.get(TIMEOUT, 0),
        failure_kinds=dict(sorted(kinds.items())),
        p50_ms=percentile(latencies, 0.50) * to_ms,
        p99_ms=percentile(latencies, 0.99) * to_ms,
        p999_ms=percentile(latencies, 0.999) * to_ms,
        max_ms=(latencies[-1] * to_ms) if latencies else math.nan,
        throughput=ok / (end - start),
        answered_by=dict(sorted(answered.items())),
        share=share,
        slow_share=sum(share.get(name, 0.0) for name in slow) if slow else math.nan,
        lateness_p50_ms=percentile(lateness, 0.50) * to_ms,
        lateness_p99_ms=percentile(lateness, 0.99) * to_ms,
        lateness_max_ms=(lateness[-1] * to_ms) if lateness else math.nan,
        unsent=len(measured) - len(sent),
        new_connections=sum(1 for o in measured if o.new_connection),
    )


def format_summary(summary: Summary) -> str:
    shares = "  ".join(f"{name} {fraction * 100:.1f}%" for name, fraction in summary.share.items())
    kinds = ", ".join(f"{kind} {count}" for kind, count in summary.failure_kinds.items()) or "none"
    return (
        f"requests {summary.requests}  ok {summary.ok}  failures {summary.failures} ({kinds})\n"
        f"latency ms  p50 {summary.p50_ms:.1f}  p99 {summary.p99_ms:.1f}  p99.9 {summary.p999_ms:.1f}  "
        f"max {summary.max_ms:.1f}\n"
        f"throughput {summary.throughput:.1f} req/s   share: {shares or 'n/a'}\n"
        f"generator lateness ms  p50 {summary.lateness_p50_ms:.2f}  p99 {summary.lateness_p99_ms:.2f}  "
        f"max {summary.lateness_max_ms:.2f}  (unsent {summary.unsent}, new connections {summary.new_connections})"
    )


# ---------------------------------------------------------------------------------------------------------------
# The network part


@dataclass
class _Request:
    index: int
    intended: float  # loop time
    sent: float = math.nan
    new_connection: bool = False
    connection: _Connection | None = None
    timer: asyncio.TimerHandle | None = None
    done: bool = False


class _Connection(asyncio.Protocol):
    """One keep-alive client connection; carries at most one request at a time (no pipelining)."""

    def __init__(self, owner: LoadGenerator) -> None:
        self._owner = owner
        self._parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.request: _Request | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: _Request, payload: bytes, now: float) -> None:
        assert self.transport is not None and self.request is None
        self.request = request
        request.connection = self
        request.sent = now
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        try:
            responses = self._parser.feed(data)
        except ProtocolError:
            self._fail(PROTOCOL)
            return
        for response in responses:
            self._complete(response)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = None
        try:
            response = self._parser.eof()
        except ProtocolError:
            pass
        if response is not None and self.request is not None:
            self._complete(response)
        if self.request is not None:
            self._owner.failed(self.request, CLOSED)
            self.request = None
        self._owner.connection_closed(self)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _complete(self, response: Response) -> None:
        request, self.request = self.request, None
        if request is None:
            self._fail(PROTOCOL)  # an answer nobody asked for
            return
        reusable = response.keep_alive and not self.closed
        self._owner.answered(request, response)
        if reusable:
            self._owner.release(self)
        else:
            self.abort()

    def _fail(self, kind: str) -> None:
        request, self.request = self.request, None
        if request is not None:
            self._owner.failed(request, kind)
        self.abort()


@dataclass
class GeneratorStats:
    connections_opened: int = 0
    max_open: int = 0
    max_waiting: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    max_timer_lag_ms: float = 0.0


class LoadGenerator:
    """Sends GET requests at the scheduled times and records an Outcome for each."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        host_header: str,
        schedule: Sequence[float],
        path: str = "/",
        timeout: float = DEFAULT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        preconnect: int = 0,
    ) -> None:
        self._loop = loop
        self._host = host
        self._port = port
        self._payload = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: labelgw-loadgen\r\n\r\n".encode("latin-1")
        )
        self._schedule = list(schedule)
        self._timeout = timeout
        self._max_connections = max_connections
        self._preconnect = min(preconnect, max_connections)
        self._idle: list[_Connection] = []  # LIFO: the fewest connections stay busy
        self._waiting: deque[_Request] = deque()
        self._open = 0
        self._pending = 0
        self._outcomes: list[Outcome | None] = [None] * len(self._schedule)
        self._start = 0.0
        self._all_done: asyncio.Future[None] | None = None
        self.stats = GeneratorStats()

    async def run(self) -> list[Outcome]:
        loop = self._loop
        self._all_done = loop.create_future()
        for _ in range(self._preconnect):
            connection = await self._connect()
            if connection is None:
                break
            self._idle.append(connection)
        cpu0, wall0 = time.process_time(), time.monotonic()
        # A short lead so that the first request is not late because of the set-up above.
        self._start = loop.time() + 0.1
        self._pending = len(self._schedule)
        if self._schedule:
            loop.call_at(self._start + self._schedule[0], self._dispatch, 0)
        else:
            self._all_done.set_result(None)
        await self._all_done
        self.stats.cpu_s = time.process_time() - cpu0
        self.stats.wall_s = time.monotonic() - wall0
        for connection in list(self._idle):
            connection.abort()
        self._idle.clear()
        return [o for o in self._outcomes if o is not None]

    # -- scheduling --------------------------------------------------------------------------------------------

    def _dispatch(self, index: int) -> None:
        loop = self._loop
        now = loop.time()
        intended = self._start + self._schedule[index]
        self.stats.max_timer_lag_ms = max(self.stats.max_timer_lag_ms, (now - intended) * 1000.0)
        # Chain the next arrival first (absolute time: a late callback does not shift the schedule).
        if index + 1 < len(self._schedule):
            loop.call_at(self._start + self._schedule[index + 1], self._dispatch, index + 1)
        request = _Request(index, intended)
        request.timer = loop.call_at(intended + self._timeout, self._expire, request)
        self._assign(request, now)

    def _assign(self, request: _Request, now: float) -> None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.send(request, self._payload, now)
                return
        if self._open < self._max_connections:
            request.new_connection = True
            self._open += 1
            self.stats.connections_opened += 1
            self.stats.max_open = max(self.stats.max_open, self._open)
            self._loop.create_task(self._connect_and_send(request)).add_done_callback(_report_crash)
            return
        self._waiting.append(request)
        self.stats.max_waiting = max(self.stats.max_waiting, len(self._waiting))

    async def _connect(self) -> _Connection | None:
        try:
            _, protocol = await self._loop.create_connection(lambda: _Connection(self), self._host, self._port)
        except OSError:
            return None
        self._open += 1
        self.stats.connections_opened += 1
        self.stats.max_open = max(self.stats.max_open, self._open)
        return protocol

    async def _connect_and_send(self, request: _Request) -> None:
        try:
            _, connection = await self._loop.create_connection(lambda: _Connection(self), self._host, self._port)
        except OSError:
            self._open -= 1
            self.failed(request, CONNECT)
            self._serve_waiting()
            return
        if request.done:  # timed out while connecting: keep the connection for the next request
            self.release(connection)
            return
        connection.send(request, self._payload, self._loop.time())

    def _serve_waiting(self) -> None:
        while self._waiting and (self._idle or self._open < self._max_connections):
            request = self._waiting.popleft()
            if not request.done:
                self._assign(request, self._loop.time())

    # -- events from connections -------------------------------------------------------------------------------

    def release(self, connection: _Connection) -> None:
        if connection.closed:
            return
        while self._waiting:
            request = self._waiting.popleft()
            if not request.done:
                connection.send(request, self._payload, self._loop.time())
                return
        self._idle.append(connection)

    def connection_closed(self, connection: _Connection) -> None:
        self._open -= 1
        self._serve_waiting()

    def answered(self, request: _Request, response: Response) -> None:
        self._record(request, status=response.status, backend=response.backend)

    def failed(self, request: _Request, kind: str) -> None:
        self._record(request, error=kind)

    def _expire(self, request: _Request) -> None:
        if request.done:
            return
        connection = request.connection
        self._record(request, error=TIMEOUT)
        if connection is not None and connection.request is request:
            connection.request = None
            connection.abort()  # its answer may still come: the connection cannot be reused

    def _record(self, request: _Request, status: int = 0, backend: str = "", error: str = "") -> None:
        if request.done:
            return
        request.done = True
        if request.timer is not None:
            request.timer.cancel()
        finished = self._loop.time()
        self._outcomes[request.index] = Outcome(
            intended=request.intended - self._start,
            sent=request.sent - self._start,
            finished=finished - self._start,
            status=status,
            backend=backend,
            error=error,
            new_connection=request.new_connection,
        )
        self._pending -= 1
        if self._pending == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"loadgen: internal error: {task.exception()!r}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def run(args: argparse.Namespace) -> dict[str, Any]:
    total = args.warmup + args.duration
    schedule = poisson_schedule(args.rate, total, args.seed)
    loop = asyncio.new_event_loop()
    generator = LoadGenerator(
        loop,
        args.host,
        args.port,
        args.host_header,
        schedule,
        path=args.path,
        timeout=args.timeout,
        max_connections=args.max_connections,
        preconnect=args.preconnect,
    )
    # No collector pauses in the middle of the schedule; the run allocates little and ends soon.
    gc.collect()
    gc.disable()
    try:
        outcomes = loop.run_until_complete(generator.run())
    finally:
        gc.enable()
        loop.close()
    summary = summarize(outcomes, args.warmup, total, args.slow)
    report: dict[str, Any] = {
        "config": {
            "host": args.host,
            "port": args.port,
            "host_header": args.host_header,
            "path": args.path,
            "rate": args.rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "max_connections": args.max_connections,
            "scheduled": len(schedule),
        },
        "summary": asdict(summary),
        "generator": asdict(generator.stats),
    }
    if args.records:
        report["record_fields"] = ["intended", "sent", "finished", "status", "backend", "error", "new_connection"]
        report["records"] = [
            [round(o.intended, 6), round(o.sent, 6), round(o.finished, 6), o.status, o.backend, o.error,
             o.new_connection]
            for o in outcomes
        ]
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to connect to (loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-header", default="bench.localhost")
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load before the measured window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds from intended send time")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument("--preconnect", type=int, default=16, help="connections opened before the first send")
    parser.add_argument("--slow", action="append", default=[], help="backend name counted as slow (repeatable)")
    parser.add_argument("--json", default=None, help="write the report here ('-': stdout, instead of the text)")
    parser.add_argument("--records", action="store_true", help="put every request's outcome in the JSON report")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        parser.error("loopback only: --host must be 127.x.x.x or ::1")
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--rate, --duration and --timeout must be positive, --warmup not negative")
    if args.duration + args.warmup > 600 or args.rate > 20_000:
        parser.error("bounded runs only: at most 600 s and 20 000 req/s")
    if not 1 <= args.max_connections <= 20_000:
        parser.error("--max-connections must be in [1, 20000]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=None if args.records else 2)
    if args.json == "-":
        print(text)
    else:
        summary = Summary(**report["summary"])
        generator = report["generator"]
        print(format_summary(summary))
        print(
            f"generator: cpu {generator['cpu_s']:.1f} s of {generator['wall_s']:.1f} s, "
            f"{generator['connections_opened']} connections opened (max {generator['max_open']} open)"
        )
        if args.json:
            with open(args.json, "w") as out:
                out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
