"""What a repeated request adds to the access log and the metrics, in the one module labelgw compiles.

A keep-alive connection most often repeats its request. Its line in the common format is then the last one's but
for the body size, the upstream time and the request id, and it counts in the same metrics row. The connection
keeps a L{LineKind}: that line's constant text and the counters it adds to. L{repeat} tests that a finished
exchange is still of its kind (by identity: the repeated head's very objects, the route, the version; the second
of the time in the text), then appends the line's pieces and adds the counters. L{labelgw.http.accesslog} calls
it once per request with the exchange's values, and makes the kinds.

setup.py compiles this module with mypyc (from the mypy project) when a C compiler is at hand: `repeat` then runs
as C, with the floats unboxed and the kind's and the slot's fields read as struct members. That takes what the
access log and the metrics cost each request from ~7 600 to ~4 600 instructions (bench/callgrind.py). Without a
compiler the module runs as it is, as Python: the same code, so the two cannot disagree. Plain typed Python
only: no interpreted class may subclass these, no attribute outside the ones set in `__init__`.
"""

from __future__ import annotations

from typing import Final

# Upper bounds (seconds) of the duration histograms: 1 ms to 60 s, then +Inf. L{bucket} spells them out.
BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# The methods that get a label value of their own; any other token (clients choose them freely) is `other`.
METHODS: Final[dict[bytes, str]] = {
    m: m.decode("ascii")
    for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"TRACE")
}

# Microseconds -> the common format's upstream time (milliseconds with three decimals) and the space after it; at
# most MS_TEXTS kept, about 1.3 MB (the times of a few backends repeat: a few thousand texts answer nearly every
# request; a wider spread empties the table now and then and formats those lines).
MS_TEXT: Final[dict[int, bytes]] = {}
MS_TEXTS: Final = 16384


def ms_text(micros: int) -> bytes:
    """The common format's upstream time, `micros` microseconds as milliseconds (`%.3f` of a whole number of
    microseconds), with the space that follows it."""
    if micros < 0:
        # A clock set back while the request was in flight (reactor.seconds() is the wall clock).
        return b"-%d.%03d " % divmod(-micros, 1000)
    text = b"%d.%03d " % divmod(micros, 1000)
    if len(MS_TEXT) >= MS_TEXTS:
        MS_TEXT.clear()
    MS_TEXT[micros] = text
    return text


def bucket(elapsed: float) -> int:
    """The histogram bucket of a duration: bisect_left(BUCKETS, elapsed), as comparisons of unboxed floats."""
    if elapsed <= 0.001:
        return 0
    if elapsed <= 0.0025:
        return 1
    if elapsed <= 0.005:
        return 2
    if elapsed <= 0.01:
        return 3
    if elapsed <= 0.025:
        return 4
    if elapsed <= 0.05:
        return 5
    if elapsed <= 0.1:
        return 6
    if elapsed <= 0.25:
        return 7
    if elapsed <= 0.5:
        return 8
    if elapsed <= 1.0:
        return 9
    if elapsed <= 2.5:
        return 10
    if elapsed <= 5.0:
        return 11
    if elapsed <= 10.0:
        return 12
    if elapsed <= 30.0:
        return 13
    if elapsed <= 60.0:
        return 14
    return 15


class Slot:
    """The counters of one (service, version) pair, as the exchanges update them: plain ints, no label work
    (L{labelgw.control.metrics.RequestMetrics} makes them and reads them at scrape time)."""

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        # Method -> requests by status // 100 (0: no response; labelled at scrape time). Bounded: a method not in
        # METHODS counts in the `other` row (key b""). `get`: GET's row, the one nearly every request counts in.
        self.rows: dict[bytes, list[int]] = {}
        self.get: list[int] = self.row(b"GET")
        # The duration histogram's bucket counts (not cumulative) and sum.
        self.counts: list[int] = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.bytes_in = 0
        self.bytes_out = 0

    def row(self, method: bytes) -> list[int]:
        row = self.rows.get(method)
        if row is None:
            if method and method not in METHODS:
                return self.row(b"")
            row = [0] * 10
            self.rows[method] = row
        return row


class LineKind:
    """What the common format's line of a connection's last request kept for the next one like it: the line's
    constant text (the client, the second, the request line, the status, the service) as a bytes format that
    takes the body size; what it was made for (the request's target, method and version, the status, the route,
    the service version: held by identity); and the metrics' counters such a request adds to (a L{Slot} and its
    row, or None without metrics: the gateway's metrics are made once for its life, so a kind is not tested
    against them)."""

    def __init__(
        self, start: float, end: float, target: object, method: object, http_version: object, status: int,
        route: object, version: object, line: bytes, slot: Slot | None, row: list[int] | None, status_class: int,
    ) -> None:
        # The second of the time in `line`, as a float range (`start <= now < end`).
        self.start = start
        self.end = end
        self.target = target
        self.method = method
        self.http_version = http_version
        self.status = status
        self.route = route
        self.version = version
        self.line = line
        # `line` with a body size in it, and that size (-1: none yet): most answers of a connection have one size.
        self.bytes_out = -1
        self.sized_line = b""
        self.slot = slot
        self.row = row
        self.status_class = status_class


def repeat(
    kind: LineKind, pieces: list[bytes], now: float, target: object, method: object, http_version: object,
    status: int, route: object, version: object, bytes_in: int, bytes_out: int, created: float, started: float,
    ttfb: float, request_id: bytes | None,
) -> int:
    """An exchange that ended in a relayed response (the caller tests that: responding, client there, no error)
    with these values: when `kind` holds for it, its line's pieces appended to `pieces` and its counters added;
    the length of `pieces` then, else 0 (nothing done: the caller makes a kind, or takes the general path).

    `created`: when the exchange began; `started` and `ttfb`: when its upstream request began and how long the
    response head took from there; `now`: its end, in the clock's seconds. The line's pieces are the text up to
    the body size, the upstream time's text, the request id (`-` without one) and the line's end: bytes kept
    anyway, joined when the batch is handed over."""
    if (
        not kind.start <= now < kind.end or target is not kind.target or method is not kind.method
        or http_version is not kind.http_version or status != kind.status or route is not kind.route
        or version is not kind.version
    ):
        return 0
    slot = kind.slot
    row = kind.row
    if slot is not None and row is not None:
        # RequestMetrics.exchange_done for a request of this kind (tests/test_accesslog_fast.py holds the two to
        # the same counts).
        row[kind.status_class] += 1
        if bytes_in:
            slot.bytes_in += bytes_in
        slot.bytes_out += bytes_out
        elapsed = now - created
        slot.total += elapsed
        # The first bounds written out: no call for the fast answers when this runs as Python.
        if elapsed <= 0.001:
            slot.counts[0] += 1
        elif elapsed <= 0.0025:
            slot.counts[1] += 1
        elif elapsed <= 0.005:
            slot.counts[2] += 1
        else:
            slot.counts[bucket(elapsed)] += 1
    if bytes_out != kind.bytes_out:
        kind.bytes_out = bytes_out
        kind.sized_line = kind.line % bytes_out
    micros = int((started + ttfb - created) * 1000000.0 + 0.5)
    text = MS_TEXT.get(micros)
    if text is None:
        text = ms_text(micros)
    pieces += (kind.sized_line, text, request_id if request_id else b"-", b"\n")
    return len(pieces)
