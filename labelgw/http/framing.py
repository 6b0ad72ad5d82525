# -*- test-case-name: tests.test_framing -*-
"""HTTP/1.1 message framing, written once: where a head ends, how long the body after it is, and how to read and
write that body. Pure: bytes in, values and errors out; no sockets, no reactor.

Every reader of a message in labelgw asks this module (the client side for request heads and bodies, the upstream
side for response heads and bodies, the exchange and with it HTTP/2 for whether a response has a body), so that a
rule such as "a 304 has no body" is decided in one place:

1. `find_head_end(buffer, cap)`: where the blank line ending a head is, -1 while it is incomplete; a head over
   `cap` bytes, or one ended by a bare LF, raises `HttpError` at once instead of waiting for bytes that never
   come.
2. `request_reader(head)` / `response_reader(head, head_only)`: the one decision of a message's framing, from its
   parsed head, as the reader of its body, or None when it has none (the common GET: no object is made). Every
   "no body" case (HEAD, 1xx, 204, 304) is in `response_has_body`, which labelgw's own answers and HTTP/2 ask
   too, and nowhere else. A reader's `kind` says the framing (LENGTH, with `length`; CHUNKED; UNTIL_CLOSE),
   which is what a writer needs to frame the same body on another connection.
3. Each reader has `feed(data) -> list[bytes]` (the body's payload in that data, never an empty piece), `done`
   (the body ended), `rest` (bytes after the end, in the data that ended it: a pipelined message, or garbage),
   and `read_eof()` (the peer closed: fine for a body delimited by the close, an `HttpError` for one cut short).
4. `encode_chunk(data)` and `LAST_CHUNK`: the chunked writer.

The decision returns the reader itself, not a description to build one from: it runs once per message on the
proxy's hottest path, where every object made counts.

Errors carry the status to answer with: 400 (or 431 for size) by default, for a client's message; readers of an
upstream's message are made with `error_status=502`, and callers on the upstream side map every error to 502.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from labelgw.http.parser import RequestHead, ResponseHead

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 4096
# Hex digits of a chunk size that carry a value (leading zeros do not count): 15 keep it below 2**60.
MAX_CHUNK_SIZE_DIGITS = 15
# Digits of a chunk size line including leading zeros, as h11 allows: a bound on padding, not on the value.
MAX_CHUNK_SIZE_WIDTH = 20


class HttpError(Exception):
    """A message labelgw refuses: the status to answer with and a reason a person can read."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# Where a head ends.


def find_head_end(buffer: bytes, cap: int = MAX_HEAD_BYTES) -> int:
    """The index of the CRLFCRLF that ends the head at the start of `buffer` (the head is `buffer[:end]`, what
    follows starts at `end + 4`), or -1 when more bytes are needed.

    Raises HttpError(431) when the head, complete or not, is longer than `cap` bytes (the blank line included),
    and HttpError(400) when a blank line ended by a bare LF ends it: such a head would never see a CRLFCRLF, and a
    peer that reads bare LF as a line end sees a head labelgw would not. Bare LF elsewhere in a head is the
    parser's to refuse."""
    end = buffer.find(b"\r\n\r\n")
    if end == -1:
        if b"\n\n" in buffer or b"\n\r\n" in buffer:
            raise HttpError(400, "bare LF ends the message head")
        # The whole buffer is head so far: past the cap it can never become a head within it.
        if len(buffer) > cap:
            raise HttpError(431, "message head too large")
        return -1
    if end + 4 > cap:
        raise HttpError(431, "message head too large")
    return end


# ---------------------------------------------------------------------------------------------------------------
# Framing kinds: a reader's `kind`.

LENGTH = "length"
CHUNKED = "chunked"
UNTIL_CLOSE = "until-close"


# ---------------------------------------------------------------------------------------------------------------
# Reading a body.


class BodyReader(Protocol):
    """What every reader offers (see the module docstring)."""

    kind: str
    done: bool
    rest: bytes

    def feed(self, data: bytes) -> list[bytes]: ...

    def read_eof(self) -> None: ...


class ContentLengthReader:
    """A body of a known length."""

    __slots__ = ("length", "remaining", "done", "rest", "_status")
    kind = LENGTH

    def __init__(self, length: int, error_status: int = 400) -> None:
        self.length = self.remaining = length
        self.done = length == 0
        self.rest = b""
        self._status = error_status

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            return []
        remaining = self.remaining
        size = len(data)
        if size < remaining:
            self.remaining = remaining - size
            return [data] if size else []
        self.remaining = 0
        self.done = True
        if size > remaining:
            self.rest = data[remaining:]
            data = data[:remaining]
        return [data] if remaining else []

    def read_eof(self) -> None:
        if not self.done:
            raise HttpError(self._status, f"connection closed {self.remaining} bytes before the end of the body")


class UntilCloseReader:
    """A response body delimited by the end of the connection: everything is payload."""

    __slots__ = ("done", "rest")
    kind = UNTIL_CLOSE

    def __init__(self) -> None:
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        return [data] if data and not self.done else []

    def read_eof(self) -> None:
        self.done = True


_HEX = b"0123456789abcdefABCDEF"
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Control bytes other than HTAB, refused in a trailer field value.
_CONTROL = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"


class ChunkedReader:
    """A chunked body (RFC 9112 section 7.1). Chunk extensions are read and dropped (labelgw re-encodes chunks
    without them); trailer fields are checked as fields and dropped; every line must end in CRLF."""

    __slots__ = ("_state", "_remaining", "_line", "_trailers", "done", "rest", "_status")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)
    kind = CHUNKED

    def __init__(self, error_status: int = 400) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._trailers = 0
        self.done = False
        self.rest = b""
        self._status = error_status

    def _take_line(self, data: bytes, start: int) -> tuple[bytes | None, int]:
        end = data.find(b"\n", start)
        if end == -1:
            self._line += data[start:]
            if len(self._line) > MAX_CHUNK_LINE:
                raise HttpError(self._status, "chunk size line too long")
            return None, len(data)
        line = self._line + data[start:end]
        self._line = b""
        if not line.endswith(b"\r"):
            raise HttpError(self._status, "bare LF in chunked body")
        line = line[:-1]
        # An int needle: a one-byte bytes needle makes CPython 3.11 raise and clear a TypeError first (~10x).
        if 0x0D in line or len(line) > MAX_CHUNK_LINE:
            raise HttpError(self._status, "invalid chunk line")
        return line, end + 1

    def _chunk_size(self, line: bytes) -> int:
        # chunk-size [ BWS ";" chunk-ext ]: hex digits only (no sign, no "0x", no space before them).
        digits = line.split(b";", 1)[0].rstrip(b" \t")
        if (
            not digits
            or digits.translate(None, _HEX)
            or len(digits) > MAX_CHUNK_SIZE_WIDTH
            or len(digits.lstrip(b"0")) > MAX_CHUNK_SIZE_DIGITS
        ):
            raise HttpError(self._status, f"invalid chunk size {digits[:20]!r}")
        return int(digits, 16)

    def _trailer(self, line: bytes) -> None:
        # Dropped, but still a field: a line a backend could read as something else is refused like in a head.
        self._trailers += 1
        if self._trailers > MAX_HEADERS:
            raise HttpError(self._status, f"more than {MAX_HEADERS} trailer fields")
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TCHAR) or value.translate(None, _CONTROL) != value:
            raise HttpError(self._status, "malformed trailer field")

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        pos = 0
        size = len(data)
        while pos < size and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, size - pos)
                out.append(data[pos : pos + take] if (pos or take != size) else data)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            elif state == self._SIZE:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                self._remaining = self._chunk_size(line)
                self._state = self._DATA if self._remaining else self._TRAILER
            elif state == self._DATA_END:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                if line:
                    raise HttpError(self._status, "chunk data longer than its size")
                self._state = self._SIZE
            else:
                line, pos = self._take_line(data, pos)
                if line is None:
                    break
                if not line:
                    self.done = True
                    self.rest = data[pos:]
                    return out
                self._trailer(line)
        return out

    def read_eof(self) -> None:
        if not self.done:
            raise HttpError(self._status, "connection closed before the last chunk")


# ---------------------------------------------------------------------------------------------------------------
# The framing decision (RFC 9112 section 6.3), written once per direction.


def request_reader(head: "RequestHead", error_status: int = 400) -> BodyReader | None:
    """The reader of a request's body: chunked, a Content-Length, or none (None); a request is never delimited by
    the close. The parser has already refused a request with both fields or with a bad value."""
    if head.chunked:
        return ChunkedReader(error_status)
    length = head.content_length
    if length:
        return ContentLengthReader(length, error_status)
    return None


def response_has_body(status: int, head_only: bool) -> bool:
    """Whether a response with this status may carry a body at all. `head_only`: the request was HEAD. A 1xx (101
    included: what follows it is another protocol), 204 or 304, and any answer to HEAD, have none whatever their
    fields say (their Content-Length, if any, describes the body a GET would have had)."""
    return not (head_only or status < 200 or status == 204 or status == 304)


def response_reader(head: "ResponseHead", head_only: bool, error_status: int = 502) -> BodyReader | None:
    """The reader of a response's body, or None when it has none: see `response_has_body`; then chunked; then
    Content-Length; else the body runs until the upstream closes."""
    if not response_has_body(head.status, head_only):
        return None
    if head.chunked:
        return ChunkedReader(error_status)
    length = head.content_length
    if length is None:
        return UntilCloseReader()
    return ContentLengthReader(length, error_status) if length else None


# ---------------------------------------------------------------------------------------------------------------
# Writing a chunked body.


def encode_chunk(data: bytes) -> bytes:
    """One chunk carrying `data` (never call it with empty data: that is the last chunk)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
