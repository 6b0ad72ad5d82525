"""A small test/dev HTTP backend: tells who answered and what it received.

Run it as ``python -m labelgw.tools.whoami --port 9000``. It is what the tests and the benchmarks put behind labelgw:

- ``/`` and any unknown path: plain text with the server's name, the client address, the request line and every
  request header, one per line (``Header: value``); ``/api`` says the same as JSON.
- ``/cookies``: three separate ``Set-Cookie`` headers.
- ``/upload`` (POST/PUT): counts and hashes the body as it arrives, never keeping it.
- ``/download?bytes=N[&chunked=1]``: streams N bytes with a push producer (flat memory).
- ``/status/NNN``, ``/redirect?to=URL``, ``/delay?ms=N``, ``/health``, ``/ws`` (WebSocket echo).
- ``/control?status=NNN&delay_ms=N``: from now on every other response answers NNN and/or waits N ms more;
  ``status=0`` and ``delay_ms=0`` reset.
- ``--fail-every N``: every Nth response (``/control`` aside) answers 500 (``2``: half of them).
- ``--delay-ms D --workers W``: latency injection. With W > 0 requests wait in a FIFO queue served by W workers,
  each request holding a worker for D ms × Exp(1) (seeded with ``--seed``); with W = 0 every request waits D ms.

Every response carries ``X-Whoami: <name>``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import random
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence, cast
from urllib.parse import parse_qs

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

_log = Logger()

# Body of /download: a repeating pattern, so a client can check any byte: byte i is i % 251.
DOWNLOAD_CHUNK_SIZE = 64 * 1024
_PATTERN_PERIOD = 251
_PATTERN = bytes(i % _PATTERN_PERIOD for i in range(DOWNLOAD_CHUNK_SIZE + _PATTERN_PERIOD))
MAX_DOWNLOAD_BYTES = 1 << 40
MAX_DELAY_MS = 600_000

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def default_name() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


# ---------------------------------------------------------------------------------------------------------------
# Request: the body is consumed as it arrives


class WhoamiRequest(Request):
    """A request whose body is counted and hashed as it arrives and then dropped.

    Twisted's Request would spool the body to a temporary file; whoami never needs it back, and a 1 GiB upload
    should cost neither memory nor disk.
    """

    body_bytes: int = 0
    _body_hash: Any = None
    gone: bool = False
    _on_gone: list[Callable[[], None]] | None = None

    def gotLength(self, length: int | None) -> None:
        # requestReceived still seeks and reads `content`; an empty buffer keeps it happy (Twisted makes an
        # in-memory one for a short length, and the body never goes into it: handleContentChunk hashes it).
        super().gotLength(0)

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_hash is None:
            self._body_hash = hashlib.sha256()
        self._body_hash.update(data)
        self.body_bytes += len(data)

    @property
    def body_sha256(self) -> str:
        return (self._body_hash or hashlib.sha256()).hexdigest()

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call `callback` if the client goes away before the response is finished."""
        if self.gone:
            callback()
            return
        if self._on_gone is None:
            self._on_gone = []
        self._on_gone.append(callback)

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        callbacks, self._on_gone = self._on_gone or [], None
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.failure("whoami: cleanup after a lost connection failed")
        super().connectionLost(reason)


# ---------------------------------------------------------------------------------------------------------------
# Latency injection


@dataclass(frozen=True, slots=True)
class Latency:
    """Latency injected before each response (see the module docstring)."""

    delay_ms: float = 0.0
    workers: int = 0
    seed: int = 0


class _Job:
    __slots__ = ("run", "extra_s", "cancelled")

    def __init__(self, run: Callable[[], None], extra_s: float) -> None:
        self.run = run
        self.extra_s = extra_s
        self.cancelled = False


class WorkerQueue:
    """A FIFO queue served by `workers` workers; each job holds a worker for mean × Exp(1) + its extra delay.

    Models a backend with a fixed number of request handlers, as the balancing benchmark needs: a slow
    backend's queue grows when it is sent more than it can serve.
    """

    def __init__(self, clock: IReactorTime, workers: int, mean_s: float, rng: random.Random) -> None:
        if workers < 1:
            raise ValueError("a worker queue needs at least one worker")
        self._clock = clock
        self._workers = workers
        self._mean_s = mean_s
        self._rng = rng
        self._waiting: deque[_Job] = deque()
        self.busy = 0

    @property
    def waiting(self) -> int:
        return sum(1 for job in self._waiting if not job.cancelled)

    def submit(self, run: Callable[[], None], extra_s: float = 0.0) -> Callable[[], None]:
        """Queue `run`; returns a function that withdraws it if it has not started yet."""
        job = _Job(run, extra_s)
        self._waiting.append(job)
        self._pump()

        def withdraw() -> None:
            job.cancelled = True

        return withdraw

    def _pump(self) -> None:
        while self.busy < self._workers and self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            self.busy += 1
            service_s = self._mean_s * self._rng.expovariate(1.0) + job.extra_s
            self._clock.callLater(service_s, self._done, job)

    def _done(self, job: _Job) -> None:
        self.busy -= 1
        try:
            if not job.cancelled:
                job.run()
        except Exception:
            _log.failure("whoami: a queued request failed")
        finally:
            self._pump()


# ---------------------------------------------------------------------------------------------------------------
# WebSocket (RFC 6455): handshake and a small echo protocol


def websocket_accept(key: bytes | str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + WEBSOCKET_GUID).digest()).decode("ascii")


class WebSocketError(Exception):
    """The peer broke the protocol; `code` is the close status to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    masked: bool


def _apply_mask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    # XOR as one big integer: fast enough for the small frames an echo server sees.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; servers send unmasked frames, clients (and tests playing one) pass a 4-byte `mask`."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is None:
        return header + payload
    return header + mask + _apply_mask(payload, mask)


def parse_frame(buffer: bytes | bytearray, max_payload: int) -> tuple[Frame, int] | None:
    """The first complete frame in `buffer` and the bytes it used, or None when more bytes are needed."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0x70:
        raise WebSocketError(1002, "reserved bits set without a negotiated extension")
    opcode = first & 0x0F
    if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
        raise WebSocketError(1002, f"unknown opcode {opcode:#x}")
    fin = bool(first & 0x80)
    masked = bool(second & 0x80)
    length = second & 0x7F
    offset = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, 2)
        offset = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, 2)
        offset = 10
    if opcode in _CONTROL_OPCODES and (length > 125 or not fin):
        raise WebSocketError(1002, "control frames must be short and unfragmented")
    if length > max_payload:
        raise WebSocketError(1009, "frame too large")
    mask = b""
    if masked:
        if len(buffer) < offset + 4:
            return None
        mask = bytes(buffer[offset : offset + 4])
        offset += 4
    if len(buffer) < offset + length:
        return None
    payload = bytes(buffer[offset : offset + length])
    if masked:
        payload = _apply_mask(payload, mask)
    return Frame(fin=fin, opcode=opcode, payload=payload, masked=masked), offset + length


class WebSocketEcho(Protocol):
    """Server side of a WebSocket connection that echoes data frames, answers pings and returns closes."""

    max_payload = 1 << 20

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._closing = False

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        try:
            while not self._closing:
                parsed = parse_frame(self._buffer, self.max_payload)
                if parsed is None:
                    return
                frame, used = parsed
                del self._buffer[:used]
                self._handle(frame)
        except WebSocketError as error:
            self._close(error.code)

    def _handle(self, frame: Frame) -> None:
        if not frame.masked:
            raise WebSocketError(1002, "client frames must be masked")
        transport = self.transport
        assert transport is not None  # frames arrive on a connection
        if frame.opcode in _DATA_OPCODES:
            # Echoing each fragment as it came keeps fragmented messages intact.
            transport.write(encode_frame(frame.opcode, frame.payload, fin=frame.fin))
        elif frame.opcode == OP_PING:
            transport.write(encode_frame(OP_PONG, frame.payload))
        elif frame.opcode == OP_CLOSE:
            if len(frame.payload) == 1:
                raise WebSocketError(1002, "close payload of one byte")
            # Return the peer's status code, as RFC 6455 section 5.5.1 suggests.
            self._closing = True
            transport.write(encode_frame(OP_CLOSE, frame.payload[:2]))
            transport.loseConnection()
        # A pong needs no answer.

    def _close(self, code: int) -> None:
        self._closing = True
        transport = self.transport
        assert transport is not None
        transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code)))
        transport.loseConnection()


# ---------------------------------------------------------------------------------------------------------------
# Resources


@implementer(IPushProducer)
class _PatternProducer:
    """Writes `total` pattern bytes in 64 KiB chunks while the transport wants them."""

    def __init__(self, request: WhoamiRequest, total: int) -> None:
        self._request = request
        self._remaining = total
        self._offset = 0
        self._paused = False
        self._stopped = False
        self._writing = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.when_gone(self.stopProducing)
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True

    def _pump(self) -> None:
        # A write can call pauseProducing (and, on some transports, resumeProducing) from inside: no re-entry.
        if self._writing:
            return
        self._writing = True
        try:
            while self._remaining > 0 and not self._paused and not self._stopped:
                size = min(DOWNLOAD_CHUNK_SIZE, self._remaining)
                start = self._offset % _PATTERN_PERIOD
                self._request.write(_PATTERN[start : start + size])
                self._offset += size
                self._remaining -= size
        finally:
            self._writing = False
        if self._remaining == 0 and not self._stopped:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()


def download_pattern(offset: int, size: int) -> bytes:
    """The bytes /download sends at [offset, offset + size): what a client checks a download against."""
    return bytes((offset + i) % _PATTERN_PERIOD for i in range(size))


class _ControlState:
    """Runtime switches set through /control."""

    def __init__(self) -> None:
        self.status = 0
        self.delay_ms = 0.0
        # --fail-every N: every Nth response answers 500 (0: never).
        self.fail_every = 0
        self.answered = 0


class _BadRequest(Exception):
    pass


def _query(request: Request) -> dict[str, list[str]]:
    raw = request.uri.split(b"?", 1)
    if len(raw) < 2:
        return {}
    return parse_qs(raw[1].decode("latin-1"), keep_blank_values=True)


def _int_arg(query: dict[str, list[str]], name: str, default: int | None, low: int, high: int) -> int:
    values = query.get(name)
    if not values:
        if default is None:
            raise _BadRequest(f"missing {name}")
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be between {low} and {high}")
    return value


def _json_body(request: Request, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode("utf-8") + b"\n"


def _text_body(request: Request, text: str | bytes) -> bytes:
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _finish_without_body(request: Request) -> int:
    # Returning b"" would make Twisted add Content-Length, which 204 and 304 responses must not carry.
    request.write(b"")
    request.finish()
    return NOT_DONE_YET


def _header_tokens(request: Request, name: bytes) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in request.requestHeaders.getRawHeaders(name, []):
        tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


class WhoamiResource(Resource):
    """Every path: applies /control and the injected latency, then dispatches on the path."""

    isLeaf = True

    def __init__(self, name: str, clock: IReactorTime, latency: Latency) -> None:
        super().__init__()
        self._name = name
        self._name_bytes = name.encode("utf-8")
        self._clock = clock
        self._fixed_delay_s = latency.delay_ms / 1000 if latency.workers == 0 else 0.0
        self._queue = (
            WorkerQueue(clock, latency.workers, latency.delay_ms / 1000, random.Random(latency.seed))
            if latency.workers > 0
            else None
        )
        self.control = _ControlState()

    def render(self, request: WhoamiRequest) -> bytes | int:
        request.setHeader(b"x-whoami", self._name_bytes)
        if request.path == b"/control":
            return self._safely(request, self._control)
        extra_s = self.control.delay_ms / 1000
        if self._queue is not None:
            withdraw = self._queue.submit(lambda: self._answer_later(request), extra_s)
            request.when_gone(withdraw)
            return NOT_DONE_YET
        delay_s = self._fixed_delay_s + extra_s
        if delay_s > 0:
            self._call_later(request, delay_s, lambda: self._answer_later(request))
            return NOT_DONE_YET
        return self._answer(request)

    def _call_later(self, request: WhoamiRequest, delay_s: float, run: Callable[[], None]) -> None:
        call = self._clock.callLater(delay_s, run)
        request.when_gone(lambda: _cancel(call))

    def _answer_later(self, request: WhoamiRequest) -> None:
        if request.gone:
            return
        try:
            body = self._answer(request)
        except Exception:
            # Nobody up the stack would answer this request: say 500 rather than leave the client hanging.
            _log.failure("whoami: answering {uri} failed", uri=request.uri)
            if request.startedWriting or request.gone:
                return
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            body = _text_body(request, "internal error\n")
        if body is NOT_DONE_YET or request.gone:
            return
        assert isinstance(body, bytes)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _answer(self, request: WhoamiRequest) -> bytes | int:
        if self.control.fail_every:
            self.control.answered += 1
            if self.control.answered % self.control.fail_every == 0:
                request.setResponseCode(500)
                return _text_body(request, "500 forced by --fail-every\n")
        if self.control.status:
            request.setResponseCode(self.control.status)
            if self.control.status in http.NO_BODY_CODES:
                return _finish_without_body(request)
            return _text_body(request, f"{self.control.status} forced by /control\n")
        return self._safely(request, self._dispatch)

    def _safely(self, request: WhoamiRequest, handler: Callable[[WhoamiRequest], bytes | int]) -> bytes | int:
        try:
            return handler(request)
        except _BadRequest as error:
            request.setResponseCode(http.BAD_REQUEST)
            return _text_body(request, f"{error}\n")

    def _dispatch(self, request: WhoamiRequest) -> bytes | int:
        path = request.path
        if path == b"/api":
            return self._api(request)
        if path == b"/cookies":
            for key, value in ((b"a", b"1"), (b"b", b"2"), (b"c", b"3")):
                request.addCookie(key, value)
            return _text_body(request, "cookies a, b, c set\n")
        if path == b"/upload":
            return self._upload(request)
        if path == b"/download":
            return self._download(request)
        if path.startswith(b"/status/"):
            return self._status(request, path[len(b"/status/") :])
        if path == b"/redirect":
            return self._redirect(request)
        if path == b"/delay":
            return self._delay(request)
        if path == b"/health":
            return _text_body(request, "ok\n")
        if path == b"/ws":
            return self._websocket(request)
        return self._echo(request)

    # -- endpoints ------------------------------------------------------------------------------------------------

    def _echo(self, request: WhoamiRequest) -> bytes:
        peer = request.getClientAddress()
        lines = [
            b"Name: " + self._name_bytes,
            b"RemoteAddr: " + _address(peer).encode("latin-1"),
            b" ".join((request.method, request.uri, request.clientproto)),
        ]
        for header, values in request.requestHeaders.getAllRawHeaders():
            lines.extend(header + b": " + value for value in values)
        if request.body_bytes:
            lines.append(b"")
            lines.append(b"Body-Bytes: %d" % request.body_bytes)
        return _text_body(request, b"\n".join(lines) + b"\n")

    def _api(self, request: WhoamiRequest) -> bytes:
        headers: dict[str, list[str]] = {}
        for header, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(header.decode("latin-1"), []).extend(v.decode("latin-1") for v in values)
        return _json_body(
            request,
            {
                "name": self._name,
                "remote": _address(request.getClientAddress()),
                "method": request.method.decode("latin-1"),
                "uri": request.uri.decode("latin-1"),
                "path": request.path.decode("latin-1"),
                "protocol": request.clientproto.decode("latin-1"),
                "headers": headers,
                "body_bytes": request.body_bytes,
            },
        )

    def _upload(self, request: WhoamiRequest) -> bytes:
        if request.method not in (b"POST", b"PUT"):
            request.setResponseCode(http.NOT_ALLOWED)
            request.setHeader(b"allow", b"POST, PUT")
            return _text_body(request, "upload with POST or PUT\n")
        return _json_body(request, {"bytes": request.body_bytes, "sha256": request.body_sha256})

    def _download(self, request: WhoamiRequest) -> bytes | int:
        query = _query(request)
        total = _int_arg(query, "bytes", None, 0, MAX_DOWNLOAD_BYTES)
        chunked = query.get("chunked", ["0"])[0] not in ("", "0", "false", "no")
        request.setHeader(b"content-type", b"application/octet-stream")
        if not chunked:
            request.setHeader(b"content-length", b"%d" % total)
        if request.method == b"HEAD" or total == 0:
            request.write(b"")
            request.finish()
            return NOT_DONE_YET
        _PatternProducer(request, total).start()
        return NOT_DONE_YET

    def _status(self, request: WhoamiRequest, raw_code: bytes) -> bytes | int:
        try:
            code = int(raw_code)
        except ValueError:
            raise _BadRequest("status must be a number") from None
        if not 200 <= code <= 599:
            raise _BadRequest("status must be between 200 and 599")
        request.setResponseCode(code)
        if code in http.NO_BODY_CODES:
            return _finish_without_body(request)
        phrase = http.RESPONSES.get(code, b"").decode("latin-1")
        return _text_body(request, f"{code} {phrase}".rstrip() + "\n")

    def _redirect(self, request: WhoamiRequest) -> bytes:
        query = _query(request)
        target = query.get("to", ["/"])[0]
        if any(c in target for c in "\r\n\0"):
            raise _BadRequest("bad redirect target")
        code = _int_arg(query, "code", http.FOUND, 300, 308)
        request.setResponseCode(code)
        request.setHeader(b"location", target.encode("latin-1"))
        return _text_body(request, f"redirecting to {target}\n")

    def _delay(self, request: WhoamiRequest) -> int:
        ms = _int_arg(_query(request), "ms", 0, 0, MAX_DELAY_MS)
        body = _text_body(request, f"delayed {ms} ms\n")

        def answer() -> None:
            if request.gone:
                return
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        self._call_later(request, ms / 1000, answer)
        return NOT_DONE_YET

    def _control(self, request: WhoamiRequest) -> bytes:
        query = _query(request)
        if "status" in query:
            status = _int_arg(query, "status", 0, 0, 599)
            if status and status < 200:
                raise _BadRequest("status must be 0 (off) or between 200 and 599")
            self.control.status = status
        if "delay_ms" in query:
            self.control.delay_ms = _int_arg(query, "delay_ms", 0, 0, MAX_DELAY_MS)
        state: dict[str, object] = {"status": self.control.status, "delay_ms": self.control.delay_ms}
        if self._queue is not None:
            state.update(busy=self._queue.busy, waiting=self._queue.waiting)
        return _json_body(request, state)

    def _websocket(self, request: WhoamiRequest) -> bytes | int:
        if request.method != b"GET":
            request.setResponseCode(http.NOT_ALLOWED)
            request.setHeader(b"allow", b"GET")
            return _text_body(request, "websocket handshakes use GET\n")
        if b"websocket" not in _header_tokens(request, b"upgrade") or b"upgrade" not in _header_tokens(
            request, b"connection"
        ):
            raise _BadRequest("expected Upgrade: websocket and Connection: Upgrade")
        if request.requestHeaders.getRawHeaders(b"sec-websocket-version", [b""])[0].strip() != b"13":
            request.setResponseCode(426)
            request.setHeader(b"sec-websocket-version", b"13")
            return _text_body(request, "only WebSocket version 13 is supported\n")
        key = request.requestHeaders.getRawHeaders(b"sec-websocket-key", [b""])[0].strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            raise _BadRequest("Sec-WebSocket-Key must be 16 bytes in base64")
        channel = request.channel
        if not isinstance(channel, http.HTTPChannel) or channel.transport is None:
            raise _BadRequest("websocket needs an HTTP/1.1 connection")
        _take_over(
            channel,
            WebSocketEcho(),
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + websocket_accept(key).encode("ascii") + b"\r\n"
            b"X-Whoami: " + self._name_bytes + b"\r\n\r\n",
        )
        # The request is never finished: the connection now belongs to the WebSocket protocol.
        return NOT_DONE_YET


def _take_over(channel: http.HTTPChannel, protocol: Protocol, response_head: bytes) -> None:
    """Hand the connection under `channel` to `protocol`, after writing the 101 response head.

    Whatever wraps the channel (the HTTP/1.1-or-2 switch, TLS) delivers bytes by calling the channel's
    dataReceived and connectionLost, so rebinding those two on the instance redirects the connection whatever
    the transport is. Bytes the channel buffered while the request was handled are passed on.
    """
    transport = channel.transport
    assert transport is not None
    pending = b"".join(getattr(channel, "_dataBuffer", ()))
    channel._dataBuffer = []  # type: ignore[attr-defined]
    channel.setTimeout(None)
    channel.dataReceived = protocol.dataReceived  # type: ignore[method-assign]
    channel.connectionLost = protocol.connectionLost  # type: ignore[method-assign]
    transport.write(response_head)
    protocol.makeConnection(transport)
    if pending:
        protocol.dataReceived(pending)


def _cancel(call: IDelayedCall) -> None:
    if call.active():
        call.cancel()


def _address(address: object) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WhoamiSite(Site):
    """A Site whose access log is optional: off by default, so load tests measure serving, not logging."""

    access_log = False

    def log(self, request: http.Request) -> None:
        if self.access_log:
            super().log(request)


def make_site(
    name: str | None,
    clock: IReactorTime,
    delay_ms: float = 0.0,
    workers: int = 0,
    seed: int = 0,
    access_log: bool = False,
    fail_every: int = 0,
) -> WhoamiSite:
    """A whoami Site; `clock` provides every delay and the connections' idle timeouts."""
    if delay_ms < 0 or workers < 0:
        raise ValueError("delay_ms and workers must not be negative")
    resource = WhoamiResource(name or default_name(), clock, Latency(delay_ms=delay_ms, workers=workers, seed=seed))
    resource.control.fail_every = fail_every
    site = WhoamiSite(resource, requestFactory=WhoamiRequest, reactor=clock)
    site.access_log = access_log
    return site


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m labelgw.tools.whoami", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=9000, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--name", default=None, help="name in answers and X-Whoami (default $HOSTNAME)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="injected latency per request, in ms")
    parser.add_argument("--workers", type=int, default=0, help="with --delay-ms: FIFO queue with this many workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the service-time draws")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--fail-every", type=int, default=0, help="every Nth response answers 500 (2: half)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.workers < 0:
        parser.error("--delay-ms and --workers must not be negative")
    if args.fail_every < 0:
        parser.error("--fail-every must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from twisted.internet import reactor as installed
    from twisted.internet.interfaces import IReactorCore, IReactorTCP
    from twisted.internet.protocol import ServerFactory
    from twisted.logger import globalLogBeginner, textFileLogObserver

    reactor = IReactorTime(installed)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    name = args.name or default_name()
    site = make_site(
        name, reactor, delay_ms=args.delay_ms, workers=args.workers, seed=args.seed, access_log=args.access_log,
        fail_every=args.fail_every,
    )
    # A Site is a ServerFactory of HTTP channels; Twisted's ServerFactory type is invariant in its protocol type.
    factory = cast(ServerFactory, site)
    port = IReactorTCP(installed).listenTCP(args.port, factory, backlog=1024, interface=args.host)
    _log.info("whoami {name} listening on http://{address}", name=name, address=_address(port.getHost()))
    IReactorCore(installed).run()


if __name__ == "__main__":
    # Run the copy importable as labelgw.tools.whoami, so classes and log namespaces have their real names.
    from labelgw.tools.whoami import main as _main

    _main()
