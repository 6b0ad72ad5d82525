"""The access log: one line per request, formatted on the reactor, written by a thread.

Formats (--access-log): `common` is the Common Log Format plus the service the request was routed to, the time
to the upstream's response head in milliseconds and the request id; `json` is one JSON object per line; `off` logs
nothing.

Lines are collected on the reactor and handed over in batches, FLUSH_DELAY after the first line of a batch (or at
once when BATCH_PIECES have gathered), to L{ThreadWriter}, whose thread does the blocking writes: a regular file, a
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
from queue import SimpleQueue
from typing import Any, Callable

from twisted.logger import Logger

from labelgw.control.metrics import STATUS_CLASS
from labelgw.http.linekind import LineKind, ms_text, repeat
from labelgw.http.states import ExchangeState

_RESPONDING = ExchangeState.RESPONDING
_TUNNEL = ExchangeState.TUNNEL

FORMATS = ("common", "json", "off")
# The status of a request whose client went away before its response was complete (nginx's 499).
CLIENT_CLOSED = 499
# Bytes waiting for the writer thread before batches are dropped (a few batches of JSON lines).
MAX_PENDING = 16 * 1024 * 1024
# A batch is handed to the writer thread this long after its first line, or at once when it holds BATCH_PIECES (4 096
# lines of the common format, four pieces each; as many of labelgw's own answers, one piece each).
# Every hand-over wakes the thread, which takes the GIL twice (woken by the queue, back from write()). At 512
# lines / 50 ms that was 30+ times a second under load; now ~4 (bench/threads.py: 0.66 wake-ups per 1000 requests
# against 5.9, the thread's CPU 0.14 against 0.22 us per request; bench/callgrind_real.py: ~1 100 fewer
# instructions per request, with the batch's bytes() copy gone). A line waits at most FLUSH_DELAY (nginx's
# `flush=` is seconds).
FLUSH_DELAY = 0.25
BATCH_PIECES = 16384

# `"` and `\\` as ints, for `in` on bytes (see AccessLog._kind).
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


# What a client side holds before its first line: a kind no time falls in.
NO_KIND = LineKind(0.0, 0.0, b"", b"", b"", 0, None, None, b"", None, None, 0)


class AccessLog:
    """Formats and batches access-log lines. `sink.put(data: bytes) -> bool` takes a batch (False: dropped); the
    sink owns it from then on."""

    log = Logger()

    def __init__(self, clock: Any, format: str, sink: Any) -> None:
        if format not in ("common", "json"):
            raise ValueError(f"access log format {format!r}: use common or json")
        self.clock = clock
        self.format = format
        self.sink = sink
        # Lines the destination could not take in time (its bounded buffer was full); read by the metrics.
        self.access_log_dropped = 0
        # The lines gathered since the last hand-over, as pieces joined at the hand-over: a common line's pieces
        # are bytes kept anyway (the kind's text, the time's, the request id), so no memory is made per line, and
        # the join copies each byte once (a bytearray grown line by line copied each ~8 times in its reallocations).
        # Making the lines later, a batch at a time, was measured slower: the exchanges kept for it are out of the
        # caches by then (bench/callgrind.py --simulate: 146 407 model cycles per request against 132 948).
        self._pieces: list[bytes] = []
        self._flush_call: Any = None
        self._dropping = False
        self._second = -1
        # The current second as a float range: `start <= now < end` is two float comparisons, int(now) a call.
        self._second_start = self._second_end = -1.0
        self._clf_time = ""
        self._clf_bytes = b""
        self._iso_time = ""
        self._format_line = self._common if format == "common" else self._json
        if format == "common":
            # The path every proxied request takes, in one function.
            self.exchange = self._exchange_common  # type: ignore[method-assign]

    # What the data path calls.

    def exchange(self, exchange: Any, state: Any, now: float | None = None, metrics: Any = None) -> None:
        """An exchange ended (labelgw.http.exchange.Exchange._complete; `state`: its state before DONE; `now`: the
        clock's time, when the caller has just read it): its line, and with `metrics`
        (labelgw.control.metrics.RequestMetrics) its counters too (one call for both)."""
        if now is None:
            now = self.clock.seconds()
        if metrics is not None:
            metrics.exchange_done(exchange, now)
        self._append(self._line_any(exchange, state, now))

    def _exchange_common(self, exchange: Any, state: Any, now: float | None = None, metrics: Any = None) -> None:
        """exchange() in the common format. A keep-alive connection that repeats its request gets the same line
        but for the body size, the upstream time and the request id: its client side keeps a L{LineKind}, and
        L{labelgw.http.linekind.repeat} (compiled when labelgw was built with a C compiler) adds the line and
        the counters when the exchange is still of that kind. Here: the exchange's values read for it (attribute
        reads the interpreter specialises), and the kinds made."""
        if now is None:
            now = self.clock.seconds()
        if state is _RESPONDING and not exchange.client_gone and exchange.error_message is None:
            head = exchange.head
            count = repeat(
                exchange.client.log_kind, self._pieces, now, head.target, head.method, head.version, exchange.status,
                exchange.route, exchange.version, exchange.bytes_in, exchange.bytes_out, exchange.created_at,
                exchange._started_at, exchange._ttfb, head.request_id,
            )
            if count > 4:
                if count >= BATCH_PIECES:
                    self.flush()
                return
            if count:
                # The batch's first line: a timer is armed exactly while lines wait (flush() resets both).
                self._flush_call = self.clock.callLater(FLUSH_DELAY, self.flush)
                return
        kind = self._kind(exchange, state, now, metrics)
        if kind is None:
            # labelgw's own answer, a tunnel, a client gone, a target to escape: the general path.
            if metrics is not None:
                metrics.exchange_done(exchange, now)
            self._append(self._line_any(exchange, state, now))
            return
        head = exchange.head
        count = repeat(
            kind, self._pieces, now, head.target, head.method, head.version, exchange.status, exchange.route,
            exchange.version, exchange.bytes_in, exchange.bytes_out, exchange.created_at, exchange._started_at,
            exchange._ttfb, head.request_id,
        )
        if count == 4:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self.flush)
        elif count >= BATCH_PIECES:
            self.flush()

    def refused(self, side: Any, head: Any, status: int, message: str) -> None:
        """labelgw answered the request itself, without an exchange (308, 400, 404, 503; HTTP/2 refusals)."""
        method = head.method if head is not None else getattr(side, "method", b"")
        size = 0 if method == b"HEAD" else len(f"labelgw: {message}\n".encode("utf-8", "replace"))
        self._append(self._line(self.clock.seconds(), side, head, status, 0, size, 0.0, None, None, None, None, 0))

    def _append(self, line: bytes) -> None:
        pieces = self._pieces
        if not pieces:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self.flush)
        pieces.append(line)
        if len(pieces) >= BATCH_PIECES:
            self.flush()

    def _kind(self, exchange: Any, state: Any, now: float, metrics: Any) -> LineKind | None:
        """The line kind of an exchange whose line and counters are the common ones (kept by its connection, which
        may repeat the request), or None: the general path."""
        if not self._second_start <= now < self._second_end:
            self._set_second(int(now))
        head = exchange.head
        target = head.target
        status = exchange.status
        if (
            exchange.error_message is not None or state is not _RESPONDING or exchange.client_gone
            # A tunnel's lifetime (101: a WebSocket's hours) is not a request duration: never a kind's.
            or status == 101
            # Byte values as needles (_QUOTE, _BACKSLASH: a memchr): `bytes in bytes` first tries the needle as an
            # int and raises and clears a TypeError.
            or not target.isascii() or _QUOTE in target or _BACKSLASH in target
        ):
            return None
        client = exchange.client
        method = head.method
        slot = row = None
        status_class = 9
        if metrics is not None:
            slot = metrics.slot(exchange.route.service.name, exchange.version)
            row = slot.get if method == b"GET" else slot.row(method)
            if status < len(STATUS_CLASS):
                status_class = STATUS_CLASS[status]
        name = exchange.route.service.name.encode("utf-8", "replace").replace(b"%", b"%%")
        protocol = b"HTTP/2" if client.is_http2 else head.version
        # The constant runs of the line, `%` doubled where it is client or operator text.
        line = b'%s - - [%s] "%s %s %s" %d %%d "%s" ' % (
            (client.peer_ip or b"-").replace(b"%", b"%%"), self._clf_bytes, method.replace(b"%", b"%%"),
            target.replace(b"%", b"%%"), protocol.replace(b"%", b"%%"), status, name,
        )
        kind = LineKind(
            self._second_start, self._second_end,
            target, method, head.version, status, exchange.route, exchange.version, line, slot, row, status_class,
        )
        # Kept for the connection's next request, which may repeat this one: by the side itself (HTTP/1.1), or by
        # its keeper when the side is made per request (an HTTP/2 stream's connection, a middleware wrapper's
        # inner side), from which the next side starts.
        client.log_kind = kind
        keeper = client.log_kind_keeper
        if keeper is not None:
            keeper.log_kind = kind
        return kind

    def _line_any(self, exchange: Any, state: Any, now: float) -> bytes:
        """The line of an exchange that ended, in either format (the general formatter)."""
        head = exchange.head
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
        return self._line(
            now, exchange.client, head, status, exchange.bytes_in, bytes_out, now - created, upstream,
            exchange.route, exchange.version, exchange.backend if exchange.on_backend else None, exchange.attempts - 1,
        )

    # Formatting: about 1 us a line in the common format; the JSON one costs about twice that.

    def _line(
        self, now: float, side: Any, head: Any, status: int, bytes_in: int, bytes_out: int, duration: float,
        upstream: float | None, route: Any, version: str | None, backend: Any, retries: int,
    ) -> bytes:
        if not self._second_start <= now < self._second_end:
            self._set_second(int(now))
        return self._format_line(
            now, side, head, status, bytes_in, bytes_out, duration, upstream, route, version, backend, retries,
        ).encode("utf-8", "replace")

    def _set_second(self, second: int) -> None:
        self._second = second
        self._second_start, self._second_end = float(second), float(second + 1)
        t = time.gmtime(second)
        self._clf_time = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        self._clf_bytes = self._clf_time.encode("ascii")
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
        ms = "-" if upstream is None else ms_text(int(upstream * 1000000.0 + 0.5)).decode("ascii").rstrip()
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
        pieces = self._pieces
        if not pieces:
            return
        self._pieces = []
        lines = b"".join(pieces)
        if self.sink.put(lines):
            if self._dropping and self.sink.pending == 0:
                self._dropping = False
        else:
            self.access_log_dropped += lines.count(b"\n")
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
    if side.is_http2:
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
