"""Request ids and W3C trace context: every request gets an X-Request-Id and a traceparent on its way upstream.

A sane X-Request-Id from the client (1 to 128 characters of a small safe set, sent once) is kept; anything else is
removed and replaced by a generated one. A valid `traceparent` (W3C Trace Context level 1) passes through
unchanged; without one (or with one that is not valid, which also drops its `tracestate`) labelgw starts a trace.
Generated ids are a per-process random prefix and a counter, in hex: unique without a system call per request
(os.urandom(16).hex() costs about 3x more, measured in tests/test_requestid.py's timing note). The counter starts at
2**60, so that it always has 16 hex digits and `%x` (the bytes formatter's fast path; `%016x` takes its slow one,
about 800 instructions more each) pads nothing.
"""

from __future__ import annotations

import os
import re

from labelgw.http.parser import RequestHead

REQUEST_ID = b"x-request-id"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

# Letters, digits and a few separators used by UUIDs, ULIDs, base64 and Heroku-style ids; no spaces or quotes, so
# the id goes into a log line as it is.
_SANE_ID = re.compile(rb"[A-Za-z0-9._~:+=/@-]{1,128}")
# Both fields in one pass over the raw field block (its lines end in CRLF).
_FIELDS = re.compile(rb"^(x-request-id|traceparent):[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE | re.MULTILINE)
# version "-" trace-id "-" parent-id "-" flags; a later version may append "-..." fields (W3C Trace Context 3.2).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
# The counter's first value: 16 hex digits from the start, up to 2**64 - 1.
_FIRST = 1 << 60
# The parent ids' mask keeps the counter's top hex digit: they have 16 digits too, and are never all zeros.
_MASK = (1 << 60) - 1
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16


def sane_request_id(value: bytes) -> bool:
    return _SANE_ID.fullmatch(value) is not None


def valid_traceparent(value: bytes) -> bytes | None:
    """The trace id of a valid traceparent value, else None."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    if version == b"00" and rest is not None:
        return None
    return trace_id


class RequestIds:
    """Assigns ids to request heads. `seed`: 16 random bytes (tests pass fixed ones)."""

    def __init__(self, seed: bytes | None = None) -> None:
        seed = seed if seed is not None else os.urandom(16)
        self._prefix = prefix = seed[:8].hex().encode("ascii")
        self._parent_mask = int.from_bytes(seed[8:16], "big") & _MASK
        self._counter = _FIRST
        # Both fields of a request that has neither, with the prefix in place: one %-format of three ints.
        self._both = b"X-Request-Id: " + prefix + b"%x\r\ntraceparent: 00-" + prefix + b"%x-%x-01\r\n"

    def next_id(self) -> bytes:
        """32 hex digits: the process's random prefix and a counter (a valid W3C trace id: never all zeros)."""
        self._counter = count = self._counter + 1
        return self._prefix + b"%x" % count

    def _parent_id(self) -> bytes:
        # labelgw's own span: distinct per request within the process, never all zeros.
        return b"%x" % (self._parent_mask ^ self._counter)

    def assign(self, head: RequestHead) -> None:
        """Set head.request_id, head.trace_id and head.trace_fields (the field lines labelgw adds upstream)."""
        request_id = trace_id = None
        ids = traces = 0
        block = head.block
        # Nearly every request has neither field: the HTTP/1.1 parser counted them (id_fields); for other heads two
        # substring searches of the lower-cased block decide that. partition (one argument, no parsing) rather than
        # `in`: CPython 3.11's bytes `in` first tries the needle as an int, raising and clearing a TypeError (about
        # 1 700 instructions each).
        seen = head.id_fields
        if seen < 0:
            lower = block.lower()
            seen = bool(lower.partition(b"x-request-id")[1] or lower.partition(b"traceparent")[1])
        if not seen:
            # One id for both, formatted in one operation.
            self._counter = count = self._counter + 1
            fields = self._both % (count, count, self._parent_mask ^ count)
            head.request_id = head.trace_id = fields[14:46]
            head.trace_fields = fields
            return
        if block:
            for name, value in _FIELDS.findall(block):
                if len(name) == 12:  # x-request-id
                    ids += 1
                    request_id = value
                else:
                    traces += 1
                    trace_id = valid_traceparent(value)
        fields = b""
        drop: set[bytes] = set()
        if ids != 1 or request_id is None or _SANE_ID.fullmatch(request_id) is None:
            if ids:
                drop.add(REQUEST_ID)
            request_id = self.next_id()
            fields = b"X-Request-Id: " + request_id + b"\r\n"
        if traces != 1 or trace_id is None:
            if traces:
                # An invalid traceparent: its tracestate belongs to nobody now (W3C Trace Context 3.3).
                drop.add(TRACEPARENT)
                drop.add(TRACESTATE)
            trace_id = request_id if fields and len(request_id) == 32 else self.next_id()
            fields += b"traceparent: 00-" + trace_id + b"-" + self._parent_id() + b"-01\r\n"
        if drop:
            # Rare: the field-by-field path of labelgw.http.headers, without the refused fields.
            head.headers = [(name, value) for name, value in head.headers if name.lower() not in drop]
        head.request_id = request_id
        head.trace_id = trace_id
        head.trace_fields = fields
