"""The access log: one line per request, formatted on the reactor, written by a thread.

Formats (--access-log): `common` is the Common Log Format plus the service the request was routed to, the time
to the upstream's response head in milliseconds and the request id; `json` is one JSON object per line; `off` logs
nothing.

Lines are collected on the reactor and handed over in batches, FLUSH_DELAY after the first line of a batch (or at
once when BATCH_LINES have gathered), to L{ThreadWriter}, whose thread does the blocking writes: a regular file, a
pipe or a terminal behind standard output all look the same to it, and a destination that stalls (a pipe nobody
reads) stalls only that thread. What waits for it is bounded: past the bound a batch is dropped, counted in
L{AccessLog.access_log_dropped} (lines) and said once in the log. `reopen` (SIGUSR1, logrotate's convention) is
queued in line with the batches, so every line before it goes to the old file and every line after to the new one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from bisect import bisect_left
from queue import SimpleQueue
from typing import Any, Callable

from twisted.logger import Logger

from labelgw.control.metrics import BUCKETS, STATUS_CLASS
from labelgw.http.states import ExchangeState

_RESPONDING = ExchangeState.RESPONDING
_TUNNEL = ExchangeState.TUNNEL

FORMATS = ("common", "json", "off")
# The status of a request whose client went away before its response was complete (nginx's 499).
CLIENT_CLOSED = 499
# Bytes waiting for the writer thread before batches are dropped (a few batches of JSON lines).
MAX_PENDING = 16 * 1024 * 1024
# A batch is handed to the writer thread this long after its first line, or at once when it has BATCH_LINES lines.
# Every hand-over wakes the thread, which takes the GIL twice (woken by the queue, back from write()). At 512
# lines / 50 ms that was 30+ times a second under load; now ~4 (bench/threads.py: 0.66 wake-ups per 1000 requests
# against 5.9, the thread's CPU 0.14 against 0.22 us per request; bench/callgrind_real.py: ~1 100 fewer
# instructions per request, with the batch's bytes() copy gone). A line waits at most FLUSH_DELAY (nginx's
# `flush=` is seconds).
FLUSH_DELAY = 0.25
BATCH_LINES = 4096

# `"` and `\\` as ints, for `in` on bytes (see AccessLog._exchange_common).
_QUOTE = 0x22
_BACKSLASH = 0x5C
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# What a quoted CLF field may hold as it is; anything else (quote, backslash, controls, non-ASCII) is escaped.
_PLAIN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_PLAIN_TEXT = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


def _quoted(value: bytes) -> str:
    """Client text for inside a CLF quoted field: printable ASCII as it is, the rest as \\xNN (nginx's escaping)."""
    if _PLAIN.fullmatch(value) is not None:
        return value.decode("ascii")
    return "".join(chr(byte) if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C) else f"\\x{byte:02X}" for byte in value)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _jtext(value: str) -> str:
    return f'"{value}"' if _PLAIN_TEXT.fullmatch(value) is not None else json.dumps(value)


def _jstr(value: bytes | None) -> str:
    """A JSON string of client bytes (read as Latin-1, so every byte is kept), or null."""
    if value is None:
        return "null"
    if _PLAIN.fullmatch(value) is not None:
        return '"' + value.decode("ascii") + '"'
    return json.dumps(value.decode("latin-1"))


class AccessLog:
    """Formats and batches access-log lines. `sink.put(data: bytearray) -> bool` takes a batch (False: dropped);
    the sink owns it from then on."""

    log = Logger()

    def __init__(self, clock: Any, format: str, sink: Any) -> None:
        if format not in ("common", "json"):
            raise ValueError(f"access log format {format!r}: use common or json")
        self.clock = clock
        self.format = format
        self.sink = sink
        # Lines the destination could not take in time (its bounded buffer was full); read by the metrics.
        self.access_log_dropped = 0
        # The lines gathered since the last hand-over, appended to one buffer: a line formatted and freed at once
        # reuses the same (cache-hot) memory each request, where a list of up to 512 live line objects touched
        # fresh memory per line (x0.945 CPU per request through sockets: bench/ab.py, lower in 5 of 5 rounds).
        self._lines = bytearray()
        self._count = 0
        # Service name -> client side class -> request version -> status -> the common format's line format from
        # the target on, for the fast path (bounded: services, a few classes and versions, statuses 100-999).
        self._formats: dict[str, dict[type, dict[bytes, dict[int, bytes]]]] = {}
        self._flush_call: Any = None
        self._dropping = False
        self._second = -1
        # The current second as a float range: `start <= now < end` is two float comparisons, int(now) a call.
        self._second_start = self._second_end = -1.0
        self._clf_time = ""
        self._clf_bytes = b""
        # Client address -> method -> the line's start up to the target (cleared every second: it holds the time).
        self._before: dict[bytes, dict[bytes, bytes]] = {}
        self._iso_time = ""
        self._format_line = self._common if format == "common" else self._json
        if format == "common":
            # The path every proxied request takes, in one function.
            self.exchange = self._exchange_common  # type: ignore[method-assign]

    # What the data path calls.

    def exchange(self, exchange: Any, state: Any, now: float | None = None, metrics: Any = None) -> None:
        """An exchange ended: its line, and with `metrics` (labelgw.control.metrics.RequestMetrics) its counters
        too (one call from Exchange._complete for both)."""
        if metrics is not None:
            metrics.exchange_done(exchange, now if now is not None else self.clock.seconds())
        self._exchange_any(exchange, state, now)

    def _exchange_any(self, exchange: Any, state: Any, now: float | None = None) -> None:
        """An exchange ended (labelgw.http.exchange.Exchange._complete); `state`: its state before DONE; `now`: the
        clock's time, when the caller has just read it."""
        head = exchange.head
        if now is None:
            now = self.clock.seconds()
        created = exchange.created_at
        upstream = None
        if state is _RESPONDING or state is _TUNNEL:
            upstream = exchange._started_at + exchange._ttfb - created
        # Gone with no answer of labelgw's own (the client sides set one for a refused or stalled body: 400, 408).
        # A tunnel (WebSocket) the client closes ended normally: logged as its 101, as nginx does.
        gone = exchange.client_gone and exchange.error_message is None and state is not _TUNNEL
        status = CLIENT_CLOSED if gone else exchange.status
        bytes_out = exchange.bytes_out
        if exchange.error_message is not None and head.method != b"HEAD":
            bytes_out = len(f"labelgw: {exchange.error_message}\n".encode("utf-8", "replace"))
        self._add(
            now, exchange.client, head, status, exchange.bytes_in, bytes_out, now - created, upstream,
            exchange.route, exchange.version, exchange.backend if exchange.on_backend else None, exchange.attempts - 1,
        )

    def _exchange_common(self, exchange: Any, state: Any, now: float | None = None, metrics: Any = None) -> None:
        """exchange() in the common format: a relayed response is one bytes %-format (no str round trip), and the
        metrics' update inlined. Written for the fewest interpreter operations (each costs ~50 instructions;
        bench/obs_parts.py counts them): every constant run of the line comes from a cache, each found with
        subscripts (no method calls)."""
        if now is None:
            now = self.clock.seconds()
        if not self._second_start <= now < self._second_end:
            self._set_second(int(now))
        head = exchange.head
        target = head.target
        if (
            exchange.error_message is not None or (state is not _RESPONDING and state is not _TUNNEL)
            # Byte values as needles (_QUOTE, _BACKSLASH: a memchr): `bytes in bytes` first tries the needle as an
            # int and raises and clears a TypeError (about 1 700 instructions each on CPython 3.11), and find()
            # parses its arguments (about 1 000).
            or not target.isascii() or _QUOTE in target or _BACKSLASH in target
        ):
            # labelgw's own answer (502, 504), no response head yet, or a target to escape: the general path.
            if metrics is not None:
                metrics.exchange_done(exchange, now)
            self._exchange_any(exchange, state, now)
            return
        name = exchange.route.service.name
        status = exchange.status
        method = head.method
        bytes_out = exchange.bytes_out
        created = exchange.created_at
        if metrics is not None:
            # RequestMetrics.exchange_done, inlined (a call and the exchange's loads saved per request; the
            # property test in tests/test_accesslog_fast.py holds the two to the same counts).
            try:
                slot = metrics.plain[name] if exchange.version is None else metrics.slots[(name, exchange.version)]
            except KeyError:
                slot = metrics._slot(name, exchange.version)
            try:
                (slot.get if method == b"GET" else slot.row(method))[STATUS_CLASS[status]] += 1
            except IndexError:
                (slot.get if method == b"GET" else slot.row(method))[9] += 1
            if exchange.bytes_in:
                slot.bytes_in += exchange.bytes_in
            if bytes_out:
                slot.bytes_out += bytes_out
            if status != 101:  # a tunnel's lifetime is not a request duration
                elapsed = now - created
                slot.total += elapsed
                if elapsed <= 0.001:
                    slot.counts[0] += 1
                elif elapsed <= 0.0025:
                    slot.counts[1] += 1
                elif elapsed <= 0.005:
                    slot.counts[2] += 1
                elif elapsed <= 0.01:
                    slot.counts[3] += 1
                else:
                    slot.counts[bisect_left(BUCKETS, elapsed)] += 1
        client = exchange.client
        if exchange.client_gone and state is _RESPONDING:
            status = CLIENT_CLOSED
        # The constant runs of the line cached as bytes (each %s field costs the formatter ~200 instructions): the
        # client address, the second and the method before the target (per second); the protocol, the status and
        # the service's name inside the format itself, by service, client side class (HTTP/2 or not: no attribute
        # test per line), version and status.
        try:
            before = self._before[client.peer_ip][method]
        except KeyError:
            before = self._cache_before(client.peer_ip, method)
        try:
            line = self._formats[name][type(client)][head.version][status]
        except KeyError:
            line = self._cache_format(name, client, head.version, status)
        self._lines += line % (
            before, target, bytes_out, (exchange._started_at + exchange._ttfb - created) * 1000.0,
            head.request_id or b"-",
        )
        # A timer is armed exactly while lines wait (flush() resets both): the first line arms it.
        self._count = count = self._count + 1
        if count >= BATCH_LINES:
            self.flush()
        elif count == 1:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self.flush)

    def _cache_before(self, peer: bytes, method: bytes) -> bytes:
        by_method = self._before.get(peer)
        if by_method is None:
            by_method = self._before[peer] = {}
        before = by_method[method] = b'%s - - [%s] "%s ' % (peer or b"-", self._clf_bytes, method)
        return before

    def _cache_format(self, name: str, client: Any, version: bytes, status: int) -> bytes:
        """The line's format for a service, client side class (HTTP/2 or not), request version and status: the
        constant runs between the target and the body bytes and around the service's name written into it (its
        `%` doubled: a service name is the operator's text)."""
        by_class = self._formats.setdefault(name, {})
        by_status = by_class.setdefault(type(client), {}).setdefault(version, {})
        protocol = b"HTTP/2" if self._side_is_http2(client) else version
        service = name.encode("utf-8", "replace").replace(b"%", b"%%")
        line = by_status[status] = b'%%s%%s %s" %d %%d "%s" %%.3f %%s\n' % (
            protocol.replace(b"%", b"%%"), status, service,
        )
        return line

    def _side_is_http2(self, client: Any) -> bool:
        return hasattr(client, "stream_id")

    def refused(self, side: Any, head: Any, status: int, message: str) -> None:
        """labelgw answered the request itself, without an exchange (308, 400, 404, 503; HTTP/2 refusals)."""
        method = head.method if head is not None else getattr(side, "method", b"")
        size = 0 if method == b"HEAD" else len(f"labelgw: {message}\n".encode("utf-8", "replace"))
        self._add(self.clock.seconds(), side, head, status, 0, size, 0.0, None, None, None, None, 0)

    # Formatting: about 1 us a line in the common format; the JSON one costs about twice that.

    def _add(
        self, now: float, side: Any, head: Any, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: float | None, route: Any, version: str | None, backend: Any, retries: int,
    ) -> None:
        if not self._second_start <= now < self._second_end:
            self._set_second(int(now))
        self._lines += self._format_line(
            now, side, head, status, bytes_in, bytes_out, duration, upstream, route, version, backend, retries,
        ).encode("utf-8", "replace")
        self._count = count = self._count + 1
        if count >= BATCH_LINES:
            self.flush()
        elif count == 1:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self.flush)

    def _set_second(self, second: int) -> None:
        self._second = second
        self._second_start, self._second_end = float(second), float(second + 1)
        t = time.gmtime(second)
        self._clf_time = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        self._clf_bytes = self._clf_time.encode("ascii")
        self._before = {}
        self._iso_time = f"{t.tm_year}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"

    def _common(
        self, now: float, side: Any, head: Any, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: float | None, route: Any, version: str | None, backend: Any, retries: int,
    ) -> str:
        if head is not None:
            # The method is a token (no quote, no backslash); the target is visible ASCII on HTTP/1.1.
            target = head.target
            if target.isascii() and _QUOTE not in target and _BACKSLASH not in target:
                path = target.decode("ascii")
            else:
                path = _quoted(target)
            request = f"{head.method.decode('ascii')} {path} {_protocol(side, head)}"
        else:
            request = f"{_quoted(getattr(side, 'method', b'-'))} - {_protocol(side, head)}"
        service = route.service.name if route is not None else "-"
        ms = "-" if upstream is None else f"{upstream * 1000.0:.3f}"
        peer = side.peer_ip.decode("ascii", "replace") or "-"
        # The request id: labelgw.http.requestid's safe characters only.
        request_id = head.request_id.decode("ascii") if head is not None and head.request_id else "-"
        return f'{peer} - - [{self._clf_time}] "{request}" {status} {bytes_out} "{service}" {ms} {request_id}\n'

    def _json(
        self, now: float, side: Any, head: Any, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: float | None, route: Any, version: str | None, backend: Any, retries: int,
    ) -> str:
        # Truncated like the seconds, with a guard against the float's representation (.013 stored as .01299...).
        millis = min(int((now - int(now)) * 1000.0 + 1e-6), 999)
        # Ids (labelgw.http.requestid's safe characters), addresses, service names and route hosts (label
        # rules) need no escaping; client text does.
        if head is not None:
            method, path, host = f'"{head.method.decode("ascii")}"', _jstr(head.target), _jstr(head.host)
            request_id = f'"{head.request_id.decode("ascii")}"' if head.request_id else "null"
            trace_id = f'"{head.trace_id.decode("ascii")}"' if head.trace_id else "null"
        else:
            method, path, host = _jstr(getattr(side, "method", b"")), "null", "null"
            request_id = trace_id = "null"
        if route is not None:
            route_text = _jtext(f"{route.host}{route.path_prefix}")
            service = _jtext(route.service.name)
        else:
            route_text = service = "null"
        return (
            f'{{"time":"{self._iso_time}.{millis:03d}Z","client":"{side.peer_ip.decode("ascii", "replace")}",'
            f'"method":{method},'
            f'"path":{path},"protocol":"{_protocol(side, head)}","tls":{"true" if side.proto == b"https" else "false"},'
            f'"host":{host},"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
            f'"duration_ms":{_ms(duration)},"upstream_ms":{"null" if upstream is None else _ms(upstream)},'
            f'"route":{route_text},"service":{service},"version":{"null" if version is None else json.dumps(version)},'
            f'"backend":{"null" if backend is None else f"{chr(34)}{backend.address}:{backend.port}{chr(34)}"},'
            f'"retries":{retries},"request_id":{request_id},"trace_id":{trace_id}}}\n'
        )

    # Writing.

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        lines, count = self._lines, self._count
        if not count:
            return
        self._lines = bytearray()
        self._count = 0
        # The buffer itself (no copy): nothing appends to it after this.
        if self.sink.put(lines):
            if self._dropping and self.sink.pending == 0:
                self._dropping = False
        else:
            self.access_log_dropped += count
            if not self._dropping:
                self._dropping = True
                self.log.warn(
                    "access log: the destination does not keep up; dropping lines (counted in access_log_dropped,"
                    " {dropped} so far)", dropped=self.access_log_dropped,
                )

    def reopen(self) -> None:
        """Reopen the log file (SIGUSR1): lines logged before go to the old file, later ones to the new one."""
        self.flush()
        self.sink.reopen()

    def close(self, timeout: float = 2.0) -> None:
        self.flush()
        self.sink.close(timeout)


def _protocol(side: Any, head: Any) -> str:
    if hasattr(side, "stream_id"):
        return "HTTP/2"
    return head.version.decode("ascii") if head is not None else "HTTP/1.1"


class ThreadWriter:
    """Blocking writes to a file (appending; reopened on request) or to standard output, in a thread of its own.

    `put` never blocks and takes no lock the thread could hold (a queue.SimpleQueue, whose put is lock-free for the
    producer): a Condition shared with the thread made the reactor wait for the GIL hand-off, milliseconds on a
    busy machine. It refuses a batch (False) when more than `limit` bytes already wait."""

    def __init__(
        self, path: str | None, limit: int = MAX_PENDING, report: Callable[[str], None] | None = None,
        fd: int | None = None,
    ) -> None:
        self.path = path
        self.limit = limit
        # Bytes queued (written by the reactor thread only) and bytes written (by the writer thread only): each
        # counter has one writer, so no lock is needed to read what waits.
        self.queued = 0
        self.written = 0
        self._report = report or (lambda message: None)
        # Opened here, before the reactor runs: a path that cannot be written stops labelgw at start.
        self._fd = self._open() if path is not None else os.dup(1 if fd is None else fd)
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self.queued - self.written

    def start(self) -> None:
        """Start the thread (at service start: twistd forks after making the service, and threads do not fork)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="labelgw-access-log", daemon=True)
            self._thread.start()

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def put(self, data: bytes | bytearray) -> bool:
        size = len(data)
        if self.queued - self.written + size > self.limit:
            return False
        self.queued += size
        self._queue.put(data)
        return True

    def reopen(self) -> None:
        if self.path is not None:
            self._queue.put(_REOPEN)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most `timeout` seconds for a stuck destination), then close."""
        self._queue.put(_STOP)
        self.start()
        assert self._thread is not None
        self._thread.join(timeout)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                break
            if item is _REOPEN:
                self._reopen()
                continue
            self._write(item)
            self.written += len(item)
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError as error:
                self._report(f"access log: write failed: {error.strerror}; {len(view)} bytes lost")
                return
            view = view[written:]

    def _reopen(self) -> None:
        try:
            fd = self._open()
        except OSError as error:
            self._report(f"access log: cannot reopen {self.path}: {error.strerror}; still writing to the old file")
            return
        old, self._fd = self._fd, fd
        os.close(old)


# Markers in the writer's queue, in line with the batches.
_REOPEN = object()
_STOP = object()


def debug_fields(exchange: Any) -> bytes:
    """--debug-headers: response fields naming the service, version and backend that answered, and the request id."""
    backend = exchange.backend
    version = exchange.version
    return (
        b"X-Labelgw-Service: %s\r\nX-Labelgw-Backend: %s:%d\r\n%sX-Request-Id: %s\r\n" % (
            exchange.route.service.name.encode("ascii", "replace"), backend.address.encode("ascii", "replace"),
            backend.port, b"X-Labelgw-Version: %s\r\n" % version.encode("ascii", "replace") if version else b"",
            exchange.head.request_id,
        )
    )
