"""HTTP/2 towards clients (RFC 9113), on the same exchange as HTTP/1.1.

Each stream's request becomes a parsed L{RequestHead} (no HTTP/1.1 text in between) that goes to the shared
dispatcher (L{labelgw.http.dispatch}); the stream is then the client side of its exchange
(L{labelgw.http.sides.ClientSide}): it gives the exchange the request body as DATA frames arrive, and sends the
response as HEADERS and DATA frames within the flow-control windows. Routing, retries, timeouts, limits and
accounting are those of HTTP/1.1.

Streams never wait for each other: each has its own exchange and upstream connection, its own flow-control window,
and its own back-pressure (the upstream is paused while the stream's window is exhausted, the client's TCP buffer
is full, or the connection's streams together hold too many response bytes; the client's request body is not
acknowledged while the upstream is paused).

Defences against HTTP/2's own attacks: at most 100 concurrent streams; header blocks (HEADERS + CONTINUATION) over
64 KiB and HPACK bombs end the connection with GOAWAY(ENHANCE_YOUR_CALM); so do stream resets past a budget in a
sliding window, whether the client sent them (rapid reset, CVE-2023-44487) or h2 sent them for the client's
protocol errors (MadeYouReset, CVE-2025-8671); a stream opened and reset in the same read never reaches a backend.
A stream whose response bytes cannot be sent for the send timeout is reset and its upstream cancelled.

Wiring: L{negotiating_factory} for TLS listeners (HTTP/2 when ALPN chose ``h2``, HTTP/1.1 otherwise; it also tells
the TLS layer to offer both, see L{labelgw.tls.policy.listener_protocols}); L{H2Factory} for a listener that
speaks only HTTP/2 (cleartext with prior knowledge, tests).
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.connection import _decode_headers as _h2_decode_headers
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream as _H2LibStream
from h2.stream import StreamClosedBy, StreamInputs
from h2.stream import StreamState as _LibStreamState
from hyperframe.frame import GoAwayFrame
from twisted.internet import error
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from labelgw.http.accesslog import NO_KIND
from labelgw.http.dispatch import dispatch
from labelgw.http.exchange import Exchange
from labelgw.http.framing import response_has_body
from labelgw.http.h2fields import malformed_request, malformed_trailers
from labelgw.http.headers import HOP_BY_HOP, MANAGED
from labelgw.http.hpack import CachingDecoder
from labelgw.http.hpack import Encoder as HpackEncoder
from labelgw.http.hpack import encode_fields
from labelgw.http.logsafe import printable
from labelgw.http.parser import MAX_HEADERS, RequestFields, RequestHead, ResponseHead, request_fields, request_from
from labelgw.http.server import ClientConnection, Gateway
from labelgw.http.states import H2_MOVES, STREAM_MOVES, H2State, StreamState, check_move
from labelgw.http.transport import DataProtocol, Producer


@dataclass(frozen=True, slots=True)
class H2Settings:
    """Limits of one HTTP/2 connection."""

    max_concurrent_streams: int = 100
    # Decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE) and the encoded HEADERS + CONTINUATION block both.
    max_header_list_size: int = 64 * 1024
    # Per stream, for request bodies: what a client may send before labelgw acknowledges it.
    initial_window_size: int = 65535
    # Response bytes kept per stream (waiting for the client's window) before the upstream is paused.
    stream_buffer: int = 64 * 1024
    # Rapid reset and MadeYouReset: stream resets allowed per sliding window, by the client (of unanswered streams)
    # or by labelgw for the client's protocol errors on a stream.
    reset_budget: int = 100
    reset_window: float = 10.0
    # Response bytes kept for all streams of one connection together; past it every upstream is paused.
    connection_buffer: int = 1024 * 1024


DEFAULT_H2_SETTINGS = H2Settings()

_WAITING = StreamState.WAITING
_SENDING = StreamState.SENDING
_ENDING = StreamState.ENDING
_DONE = StreamState.DONE
_OPEN = H2State.OPEN
_DRAINING = H2State.DRAINING
_CLOSED = H2State.CLOSED

_TEXT_PLAIN = (b"content-type", b"text/plain; charset=utf-8")
# Encoded final response heads by (status, the parser's cut block, content length, fields labelgw adds), shared by
# every connection (the encoder's blocks depend on the fields only).
_HEAD_BLOCKS: dict[tuple[int, bytes, int | None, bytes], bytes] = {}
_HEAD_BLOCKS_KEPT = 64
_NO_FIELDS: list[tuple[bytes, bytes]] = []
# A field line of a parsed head's block: name, value without the whitespace around it (ResponseHead.headers' split).
_FORWARD_FIELD = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")


# Response frames are built here, not by h2 (its send_headers and send_data build frame objects, check and
# serialize them: most of the cost of a small response). h2 still keeps the state: the stream's state machine is
# moved as h2's own send methods move it (so h2 answers the client's later frames on that stream as before), the
# flow-control windows are debited the same way, and the bytes go into the buffer its data_to_send empties, in
# order with h2's own frames. These are h2 internals (H2Connection._data_to_send, .state_machine, H2Stream's
# state_machine and outbound_flow_control_window): tests/test_internals.py checks them.
_FRAME_HEAD = struct.Struct(">BHBBL")  # a 24-bit length (its high byte, its low 16 bits), type, flags, stream id
_DATA_FRAME = 0x0
_HEADERS_FRAME = 0x1
_CONTINUATION_FRAME = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
_SEND_HEADERS = StreamInputs.SEND_HEADERS
_SEND_INFORMATIONAL = StreamInputs.SEND_INFORMATIONAL_HEADERS
_SEND_DATA = StreamInputs.SEND_DATA
_SEND_END_STREAM = StreamInputs.SEND_END_STREAM
_CONNECTION_CLOSED = ConnectionState.CLOSED
_SERVER_OPEN = ConnectionState.SERVER_OPEN
_IDLE = ConnectionState.IDLE
_LIB_OPEN = _LibStreamState.OPEN
_LIB_HALF_CLOSED_REMOTE = _LibStreamState.HALF_CLOSED_REMOTE
_LIB_CLOSED = _LibStreamState.CLOSED
_CLOSED_BY_SEND_END = StreamClosedBy.SEND_END_STREAM


def send_headers_frames(
    conn: H2Connection, stream: _H2LibStream, fields: list[tuple[bytes, bytes]], end: bool, block: bytes | None = None,
) -> None:
    """HEADERS (and CONTINUATION past the peer's frame size) of a response head, as h2's send_headers would send
    them; raises h2's StreamClosedError or ProtocolError where it would. `block`: the final head's fields already
    encoded (hpack.encode_fields; `fields` is then not read)."""
    if conn.state_machine.state is _CONNECTION_CLOSED:
        raise ProtocolError("the connection is closed")
    machine = stream.state_machine
    # The first field is :status: 1xx is an interim head (it cannot end the stream).
    if block is None and fields[0][1][:1] == b"1":
        machine.process_input(_SEND_INFORMATIONAL)
    elif machine.state is _LIB_HALF_CLOSED_REMOTE and not machine.headers_sent and machine.client is False:
        # The common case (the whole request is in), moved as h2's transition table and response_sent move it.
        machine.headers_sent = True
    else:
        machine.process_input(_SEND_HEADERS)
    if block is None:
        block = conn.encoder.encode(fields)
    else:
        block = conn.encoder.prefix() + block  # type: ignore[attr-defined]
    if end:
        _send_end_stream(machine)
    out = conn._data_to_send
    stream_id = stream.stream_id
    flags = _END_STREAM if end else 0
    size = len(block)
    limit = conn.max_outbound_frame_size
    pack = _FRAME_HEAD.pack
    if size <= limit:
        out += pack(size >> 16, size & 0xFFFF, _HEADERS_FRAME, flags | _END_HEADERS, stream_id)
        out += block
        return
    kind = _HEADERS_FRAME
    for at in range(0, size, limit):
        piece = block[at : at + limit]
        if at + limit >= size:
            flags |= _END_HEADERS
        out += pack(len(piece) >> 16, len(piece) & 0xFFFF, kind, flags, stream_id)
        out += piece
        kind, flags = _CONTINUATION_FRAME, 0


def send_data_frame(conn: H2Connection, stream: _H2LibStream, data: bytes | memoryview, end: bool) -> None:
    """One DATA frame within the windows (the caller checked them and the frame size), as h2's send_data would."""
    if conn.state_machine.state is _CONNECTION_CLOSED:
        raise ProtocolError("the connection is closed")
    machine = stream.state_machine
    # SEND_DATA leaves a half-closed (remote) stream as it is (h2's transition table); other states go through h2.
    if machine.state is not _LIB_HALF_CLOSED_REMOTE:
        machine.process_input(_SEND_DATA)
    if end:
        _send_end_stream(machine)
    size = len(data)
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    out = conn._data_to_send
    out += _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, _DATA_FRAME, _END_STREAM if end else 0, stream.stream_id)
    out += data


def _send_end_stream(machine: Any) -> None:
    """END_STREAM sent: a half-closed (remote) stream closes, as h2's send_end_stream transition does it."""
    if machine.state is _LIB_HALF_CLOSED_REMOTE:
        machine.state = _LIB_CLOSED
        machine.stream_closed_by = _CLOSED_BY_SEND_END
    else:
        machine.process_input(_SEND_END_STREAM)


def send_window(conn: H2Connection, stream: _H2LibStream) -> int:
    """What may be sent on `stream` now (h2's local_flow_control_window, without its look-up)."""
    return min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)


class _ClosedStream:
    """Stands for a stream h2 no longer keeps: it refuses what h2 would refuse on a closed stream."""

    # Never one of h2's states: the senders' shortcuts do not apply, process_input refuses.
    state = None

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.state_machine = self

    @property
    def outbound_flow_control_window(self) -> int:
        # As h2's local_flow_control_window for a stream it forgot: the stream is reset at once, not left waiting.
        raise StreamClosedError(self.stream_id)

    def process_input(self, _input: StreamInputs) -> None:
        raise StreamClosedError(self.stream_id)


class H2Stream:
    """One HTTP/2 stream: a request for the dispatcher, then the client side of its exchange.

    Request direction: DATA goes to the exchange as it arrives; while paused (the upstream's buffer is full, or no
    upstream connection yet) DATA is kept and not acknowledged, so the client's window closes.
    Response direction: HEADERS at once, DATA queued and sent within the windows at the end of each upstream read;
    the upstream (the response producer) is paused while too much waits.
    """

    # Slots: no per-stream dict to make and free, and attribute reads the interpreter specialises.
    __slots__ = (
        "owner", "stream_id", "_lib", "method", "peer_ip", "proto", "local_port", "_inbound", "_unacked", "_queue",
        "_queued", "state", "exchange", "started", "remote_ended", "gone", "_paused", "_producer", "_producer_paused",
        "stalled_since", "_progressed", "body_seen", "head", "lib_state", "lib_headers_sent", "lib_window",
        "lib_expected", "log_kind", "log_kind_keeper",
    )
    state: StreamState
    exchange: Exchange | None
    is_http2 = True
    # Dispatched (or answered locally): DATA from now on goes to the exchange or is dropped.
    started: bool
    # The client sent END_STREAM (the exchange hears of it once it has the whole body: body_done).
    remote_ended: bool
    # Out of the connection's table: nothing more happens on this stream.
    gone: bool
    # Since when response bytes wait and none could be sent (0.0: none wait); the stream's send timeout.
    stalled_since: float
    # The request, once dispatched (the access log reads it).
    head: RequestHead | None
    # h2's stream while labelgw keeps it as plain fields (_lib None: not made yet, H2Protocol._lazy): a request that
    # came whole (HEADERS with END_STREAM) is half-closed (remote) until the response's END_STREAM closes it; whether
    # the response head went out (h2's headers_sent), the send window, h2's expected content length.
    lib_state: Any
    lib_headers_sent: bool | None
    lib_window: int
    lib_expected: int | None

    def __init__(self, owner: "H2Protocol", stream_id: int, method: bytes, lib: Any, window: int = 0,
                 expected: int | None = None, ended: bool = False) -> None:
        self.owner = owner
        self.stream_id = stream_id
        # h2's own stream (created by the HEADERS that opened this one): the state the frames sent here move.
        # One h2 already closed and forgot (opened and reset in the same read) refuses every frame. None: not made
        # yet (_h2 makes it from the lib_* fields).
        self._lib: Any = lib
        self.method = method
        self.peer_ip = owner.peer_ip
        self.proto = owner.proto
        self.local_port = owner.local_port
        # The connection's last line kind, kept on the connection (a stream serves one request).
        self.log_kind = owner.log_kind
        self.log_kind_keeper = owner
        self._inbound: list[bytes] = []
        self._unacked = 0
        self._queue: deque[bytes | memoryview] = deque()
        self._queued = 0
        self.state = _WAITING
        self.exchange = None
        self.started = False
        self.remote_ended = ended
        self.gone = False
        self._paused = False
        self._producer: Producer | None = None
        self._producer_paused = False
        self.stalled_since = 0.0
        self._progressed = False
        self.body_seen = 0.0
        self.head = None
        self.lib_state = _LIB_HALF_CLOSED_REMOTE
        self.lib_headers_sent = None
        self.lib_window = window
        self.lib_expected = expected

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} {self.state.name} queued={self._queued}>"

    def _h2(self) -> Any:
        """h2's stream, made now if labelgw kept it as plain fields."""
        lib = self._lib
        if lib is None:
            self.owner.materialize()
            lib = self._lib
            if lib is None:
                # Closed, and h2 has moved it to its record of closed streams: it refuses what h2 would refuse.
                lib = self._lib = _ClosedStream(self.stream_id)
        return lib

    def _move(self, new: StreamState) -> None:
        self.state = check_move(STREAM_MOVES, self.state, new)

    # Starting.

    def start(self, head: RequestHead) -> None:
        """Dispatch the request; the body received so far follows."""
        self.started = True
        self.head = head
        exchange = dispatch(self.owner.gateway, head, self)
        if exchange is None:
            self._drop_inbound()
            return
        self.exchange = exchange
        exchange.start()
        if self.exchange is exchange and not exchange.body_done:
            # A body follows: the body timeout runs from now (a request that came whole has none to wait for).
            owner = self.owner
            self.body_seen = owner.clock.seconds()
            owner.watch(self.body_seen + owner.gateway.settings.body_timeout)
            if not self._paused:
                self._release_inbound()

    # Request direction, from H2Protocol.

    def data_received(self, data: bytes, flow_length: int) -> None:
        self._unacked += flow_length
        exchange = self.exchange
        if exchange is None or exchange.body_done:
            if not self.started:
                # Not dispatched yet (the read is not over).
                if data:
                    self._inbound.append(data)
            else:
                # Answered, or gone: the bytes are dropped, the window given back.
                self._ack()
            return
        self.body_seen = self.owner.clock.seconds()
        if self._paused:
            if data:
                self._inbound.append(data)
            return
        if data:
            exchange.request_data(data)
        self._ack()

    def request_ended(self) -> None:
        self.remote_ended = True
        if self.exchange is not None and not self._paused and not self._inbound:
            self._feed_end()

    def _feed_end(self) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.body_done:
            exchange.request_end()

    def _release_inbound(self) -> None:
        exchange = self.exchange
        if self._inbound:
            data = b"".join(self._inbound)
            self._inbound.clear()
            if exchange is not None and not exchange.body_done:
                exchange.request_data(data)
        self._ack()
        if self.remote_ended and not self._paused:
            self._feed_end()

    def _drop_inbound(self) -> None:
        self._inbound.clear()
        self._ack()

    def _ack(self) -> None:
        unacked = self._unacked
        if unacked:
            self._unacked = 0
            owner = self.owner
            if owner.state is not _CLOSED:
                # Also for a closed stream: the connection's window gets the bytes back.
                try:
                    owner.materialize()
                    owner.conn.acknowledge_received_data(unacked, self.stream_id)
                except (StreamClosedError, ProtocolError):
                    return
                owner.flush_soon()

    # The client side of the exchange: the request body's back-pressure.

    def pause_request_body(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        if not paused and self.exchange is not None:
            self._release_inbound()

    # The client side: the response.

    def interim_head(self, head: ResponseHead) -> None:
        if self.state is not _WAITING:
            return
        # Interim response (100 Continue, 103 Early Hints): informational HEADERS.
        fields = [(b":status", b"%d" % head.status)]
        self._add_fields(fields, head)
        if self._send_headers(fields, False):
            self.owner.flush_soon()

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        if self.state is not _WAITING:
            return
        forward = head.forward
        if forward is not None and len(forward) <= _KNOWN_BLOCK and head.status >= 200:
            # A final head the parser cut: its fields follow from these four, and so does its block (static table
            # only). Backends repeat their heads (a Date field changes once a second): encoded once.
            length = head.content_length
            key = (head.status, forward, length, extra)
            block = _HEAD_BLOCKS.get(key)
            if block is None:
                fields = [(b":status", b"%d" % head.status)]
                self._add_fields(fields, head)
                if length is not None:
                    fields.append((b"content-length", b"%d" % length))
                if extra:
                    _add_lines(fields, extra)
                block = encode_fields(fields)
                if len(_HEAD_BLOCKS) >= _HEAD_BLOCKS_KEPT:
                    _HEAD_BLOCKS.clear()
                _HEAD_BLOCKS[key] = block
            if not body or length == 0:
                if self._send_headers(_NO_FIELDS, True, block):
                    self._sent_all()
                return
            owner = self.owner
            conn = owner.conn
            lib = self._lib
            if lib is None:
                state, sent = self.lib_state, self.lib_headers_sent
            else:
                machine = lib.state_machine
                state, sent = machine.state, machine.headers_sent
            if (state is _LIB_HALF_CLOSED_REMOTE and not sent and owner.state is not _CLOSED and not self.gone
                    and conn.state_machine.state is not _CONNECTION_CLOSED):
                # send_headers_frames' common case written out: the whole request is in (half-closed remote), a
                # final head, one frame. HEADERS leave with the first DATA, at the flush that ends this read.
                size = len(block)
                # (Room for a size update owed to the client: one byte, labelgw.http.hpack.Encoder.prefix.)
                if size < conn.max_outbound_frame_size:
                    if lib is None:
                        self.lib_headers_sent = True
                    else:
                        machine.headers_sent = True
                    encoder = conn.encoder
                    if encoder._size_update:  # type: ignore[attr-defined]
                        block = encoder.prefix() + block  # type: ignore[attr-defined]
                        size = len(block)
                    conn._data_to_send += _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, _HEADERS_FRAME, _END_HEADERS, self.stream_id) + block
                    # WAITING -> SENDING (states.STREAM_MOVES).
                    self.state = _SENDING
                    return
            if self._send_headers(_NO_FIELDS, False, block):
                self._move(_SENDING)
            return
        fields = [(b":status", b"%d" % head.status)]
        self._add_fields(fields, head)
        length = head.content_length
        if length is not None:
            fields.append((b"content-length", b"%d" % length))
        if extra:
            _add_lines(fields, extra)
        if not body or length == 0:
            if self._send_headers(fields, True):
                self._sent_all()
            return
        # HEADERS leave with the first DATA, at the flush that ends this upstream read.
        if self._send_headers(fields, False):
            self._move(_SENDING)

    def response_data(self, data: bytes) -> None:
        if data and self.state is _SENDING:
            self._queue.append(data)
            size = len(data)
            self._queued += size
            owner = self.owner
            # queued_more, its common case written out (the connection's bound not reached).
            queued = owner.queued = owner.queued + size
            if queued > owner.settings.connection_buffer and not owner.buffer_full:
                owner.queued_more(0)

    def flush(self) -> None:
        self._pump()

    def response_end(self) -> None:
        if self.state is not _SENDING:
            return
        queue = self._queue
        lib = self._lib
        owner = self.owner
        if lib is None:
            state, window = self.lib_state, self.lib_window
        else:
            machine = lib.state_machine
            state = machine.state
        if len(queue) == 1 and self.remote_ended and state is _LIB_HALF_CLOSED_REMOTE and owner.state is not _CLOSED:
            # The common case (a small response whose body came whole, the request complete): one DATA frame
            # with END_STREAM if the windows and the frame size allow, what _pump and _sent_all would do.
            chunk = queue[0]
            size = len(chunk)
            conn = owner.conn
            if lib is not None:
                window = lib.outbound_flow_control_window
            if (size <= conn.max_outbound_frame_size and size <= conn.outbound_flow_control_window and size <= window
                    and conn.state_machine.state is not _CONNECTION_CLOSED):
                queue.clear()
                self._queued = 0
                queued = owner.queued = owner.queued - size
                if owner.buffer_full and queued <= owner.settings.connection_buffer // 2:
                    owner.queued_less(0)
                # send_data_frame and _send_end_stream for a half-closed (remote) stream, written out.
                if lib is None:
                    self.lib_state = _LIB_CLOSED
                    self.lib_window = window - size
                    # Closed: h2 would hold it until the next stream opens (H2Protocol.materialize, _forget_closed).
                    del owner._lazy[self.stream_id]
                    owner._closed_lately.append(self)
                else:
                    machine.state = _LIB_CLOSED
                    machine.stream_closed_by = _CLOSED_BY_SEND_END
                    lib.outbound_flow_control_window -= size
                conn.outbound_flow_control_window -= size
                out = conn._data_to_send
                out += _FRAME_HEAD.pack(size >> 16, size & 0xFFFF, _DATA_FRAME, _END_STREAM, self.stream_id)
                out += chunk
                # SENDING -> DONE (states.STREAM_MOVES); the client ended its side (half-closed remote), so no
                # reset for an unread body.
                self.state = _DONE
                self.stalled_since = 0.0
                if self.exchange is None:
                    self._maybe_gone()
                if self._producer is not None:
                    self.sync_producer()
                if owner._receiving or owner._flush_call is not None or len(owner.streams) > 1:
                    owner.flush_soon()
                else:
                    # flush_soon's last case (one stream, outside a read): the write now (data_to_send, written out).
                    data = bytes(out)
                    del out[:]
                    owner.transport.write(data)
                return
        self._move(_ENDING)
        self._pump()

    def error_response(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        if self.state is not _WAITING:
            return
        body = f"labelgw: {message}\n".encode("utf-8", "replace")
        fields = [(b":status", b"%d" % status), _TEXT_PLAIN, (b"content-length", b"%d" % len(body))]
        if extra:
            _add_lines(fields, extra)
        if not response_has_body(status, self.method == b"HEAD"):
            if self._send_headers(fields, True):
                self._sent_all()
            return
        if self._send_headers(fields, False):
            self._move(_SENDING)
            self.response_data(body)
            self.response_end()

    def refuse(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        """Answered without an exchange (404, 503, a request HTTP/2 cannot relay)."""
        self.started = True
        access_log = self.owner.gateway.access_log
        if access_log is not None:
            access_log.refused(self, self.head, status, message)
        self.error_response(status, message, close, extra)
        self._drop_inbound()

    def abort(self, reason: str) -> None:
        self._reset(ErrorCodes.INTERNAL_ERROR)

    def set_response_producer(self, producer: Producer | None) -> None:
        self._producer = producer
        self._producer_paused = False
        if producer is not None:
            self.sync_producer()

    def sync_producer(self) -> None:
        """Pause the upstream while the client's TCP buffer is full or too much waits for the windows."""
        producer = self._producer
        if producer is None:
            return
        owner = self.owner
        limit = owner.settings.stream_buffer
        if self._producer_paused:
            limit //= 2
        pause = owner.tcp_blocked or owner.buffer_full or self._queued > limit
        if pause != self._producer_paused:
            self._producer_paused = pause
            if pause:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    # The client side: tunnels cannot happen (an HTTP/2 request never asks for an Upgrade).

    def start_tunnel(self, head: ResponseHead, exchange: Exchange) -> None:
        self.owner.log.error("HTTP/2 stream {stream}: protocol switch over HTTP/2", stream=self.stream_id)
        self._reset(ErrorCodes.INTERNAL_ERROR)

    def tunnel_data(self, data: bytes) -> None:
        pass

    # The client side: the end.

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        if exchange is not self.exchange:
            return
        self.exchange = None
        self._producer = None
        if self.state is _WAITING:
            # Nothing was answered (the client went away, or its body was refused): nothing more to send.
            self._reset(ErrorCodes.REFUSED_STREAM)
            return
        if self.state is _DONE and not self.gone:
            # _maybe_gone, written out.
            self.gone = True
            owner = self.owner
            streams = owner.streams
            if len(streams) == 1 and owner.state is _OPEN and streams.get(self.stream_id) is self:
                # stream_gone's common case written out: the connection goes idle (the idle timeout's timer).
                del streams[self.stream_id]
                now = owner._idle_since = owner.clock.seconds()
                deadline = now + owner.gateway.settings.idle_timeout
                if owner._timer is None or owner._timer_at > deadline:
                    owner.watch(deadline)
            else:
                owner.stream_gone(self)

    # Sending.

    def _add_fields(self, fields: list[tuple[bytes, bytes]], head: ResponseHead) -> None:
        forward = head.forward
        if forward is not None:
            # The parser already cut framing, hop-by-hop and Connection-named fields: one C-speed pass.
            fields += [(name.lower(), value) for name, value in _FORWARD_FIELD.findall(forward)]
            return
        named = head.connection_tokens
        for name, value in head.headers:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower == b"content-length" or lower in named:
                continue
            fields.append((lower, value))

    def _send_headers(self, fields: list[tuple[bytes, bytes]], end: bool, block: bytes | None = None) -> bool:
        owner = self.owner
        if owner.state is _CLOSED or self.gone:
            return False
        try:
            send_headers_frames(owner.conn, self._h2(), fields, end, block)
        except (StreamClosedError, ProtocolError):
            # h2 closed the stream itself (for example after a stream error): it cannot be answered any more.
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return False
        if end:
            owner.flush_soon()
        return True

    def _pump(self) -> None:
        """Send what the windows allow; END_STREAM after the last byte of a complete response."""
        owner = self.owner
        state = self.state
        if owner.state is _CLOSED or (state is not _SENDING and state is not _ENDING):
            return
        try:
            while self._send_frame():
                pass
            if self.state is _ENDING and not self._queue:
                send_data_frame(owner.conn, self._h2(), b"", True)
                self._sent_all()
        except (StreamClosedError, ProtocolError):
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        if self._queue and self.state is not _DONE:
            # Bytes wait for the window: the send timeout runs from the last progress.
            if self._progressed or not self.stalled_since:
                self.stalled_since = owner.clock.seconds()
                owner.watch(self.stalled_since + owner.gateway.settings.send_timeout)
        else:
            self.stalled_since = 0.0
        self._progressed = False
        self.sync_producer()
        owner.flush_soon()

    def _send_frame(self) -> bool:
        """One DATA frame if the windows allow; True when another one may follow now."""
        queue = self._queue
        if not queue:
            return False
        owner = self.owner
        conn = owner.conn
        lib = self._h2()
        window = send_window(conn, lib)
        if window <= 0:
            return False
        limit = min(window, conn.max_outbound_frame_size)
        chunk = queue[0]
        size = len(chunk)
        self._progressed = True
        if size <= limit:
            queue.popleft()
            self._queued -= size
            owner.queued_less(size)
            last = self.state is _ENDING and not queue
            send_data_frame(conn, lib, chunk, last)
            if last:
                self._sent_all()
                return False
            return True
        view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
        queue[0] = view[limit:]
        self._queued -= limit
        owner.queued_less(limit)
        send_data_frame(conn, lib, view[:limit], False)
        return True

    def pump_one(self) -> bool:
        """Round-robin step for the connection: one frame, True when this stream could send more."""
        if (self.state is not _SENDING and self.state is not _ENDING) or not self._queue:
            return False
        try:
            return self._send_frame()
        except (StreamClosedError, ProtocolError):
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return False

    def pump(self) -> None:
        """The window opened (or round-robin sending is over): send, end the stream if complete, resume the
        upstream if there is room."""
        self._pump()

    @property
    def waiting(self) -> bool:
        """Response bytes wait for the flow-control window."""
        return bool(self._queue) and self.state is not _DONE

    def _sent_all(self) -> None:
        """END_STREAM is out: the response is complete."""
        self._move(_DONE)
        self.stalled_since = 0.0
        owner = self.owner
        if not self.remote_ended and owner.state is not _CLOSED:
            # The client is still sending a body nobody will read: tell it to stop (RFC 9113 section 8.1).
            try:
                owner.materialize()
                owner.conn.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
            except (StreamClosedError, ProtocolError):
                pass
            self._drop_inbound()
            owner.flush_soon()
        self._maybe_gone()

    # Ending.

    def _drop_queue(self) -> None:
        self.stalled_since = 0.0
        self._queue.clear()
        if self._queued:
            self.owner.queued_less(self._queued)
            self._queued = 0

    def _reset(self, code: ErrorCodes) -> None:
        """RST_STREAM (if the stream is still ours to end); the exchange, if any, is told the client is gone."""
        owner = self.owner
        if self.state is not _DONE:
            self._move(_DONE)
            self._drop_queue()
            if owner.state is not _CLOSED and not self.gone:
                try:
                    owner.materialize()
                    owner.conn.reset_stream(self.stream_id, code)
                except (StreamClosedError, ProtocolError):
                    pass
        self._drop_inbound()
        owner.flush_soon()
        self._end_exchange()
        self._maybe_gone()

    def send_timed_out(self) -> None:
        """Nothing could be sent for the send timeout (a window the client never opens): reset, upstream cancelled."""
        self._reset(ErrorCodes.CANCEL)

    def body_timed_out(self) -> None:
        """The request body stalled for the body timeout: 408 if nothing was answered yet, else a reset."""
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        started = exchange.response_started
        if not started and self.state is _WAITING:
            # For the access log: labelgw's answer, not a client that went away.
            exchange.status, exchange.error_message = 408, "request body timed out"
        exchange.client_lost()
        if started or self.state is not _WAITING:
            self._reset(ErrorCodes.CANCEL)
        else:
            self.error_response(408, "request body timed out", True)
            self._maybe_gone()

    def reset_by_client(self) -> None:
        """RST_STREAM from the client, or from h2 for the client's error on this stream: the stream is over."""
        if self.state is not _DONE:
            self._move(_DONE)
        self._drop_queue()
        self._drop_inbound()
        self._end_exchange()
        self._maybe_gone()

    def abandon(self) -> None:
        """The whole connection is going away: no more frames for this stream."""
        self._unacked = 0
        self.reset_by_client()

    def _end_exchange(self) -> None:
        exchange, self.exchange = self.exchange, None
        self._producer = None
        if exchange is not None:
            exchange.client_lost()

    def _maybe_gone(self) -> None:
        if self.state is _DONE and self.exchange is None and not self.gone:
            self.gone = True
            self._producer = None
            self.owner.stream_gone(self)


def _add_lines(fields: list[tuple[bytes, bytes]], lines: bytes) -> None:
    """Field lines labelgw adds ("Name: value\\r\\n" each), as HTTP/2 fields."""
    for line in lines.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name.strip().lower(), value.strip()))


class H2Protocol(DataProtocol):
    """One HTTP/2 client connection (server side): frames in, one H2Stream per request, frames out."""

    log = Logger()
    state = _OPEN

    def __init__(self, gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> None:
        self.gateway = gateway
        self.proto = proto
        self.settings = settings
        self.clock = gateway.clock
        # The access log's last line kind on this connection (labelgw.http.linekind.LineKind), which each new
        # stream starts with: the next request is most often the same.
        self.log_kind = NO_KIND
        self.conn: H2Connection = H2Connection(
            H2Configuration(
                client_side=False, header_encoding=None,
                # Request fields are checked by labelgw itself (labelgw.http.h2fields: the same rules, one pass,
                # GOAWAY(PROTOCOL_ERROR) as h2 would send), cookie crumbs joined in request_head.
                validate_inbound_headers=False, normalize_inbound_headers=False,
                # Response fields come out of the strict HTTP/1.1 parser and are lower-cased, without
                # connection-specific fields (H2Stream._add_fields): h2 checking them again costs more than the rest.
                validate_outbound_headers=False, normalize_outbound_headers=False,
            )
        )
        self.streams: dict[int, H2Stream] = {}
        self.peer: Any = None
        self.host: Any = None
        self.peer_ip = b""
        self.local_port = b""
        self.tcp_blocked = False
        # Since when the client's TCP buffer is full (0.0: it is not).
        self._blocked_since = 0.0
        # Response bytes queued for all streams together, and whether that is past the connection's bound.
        self.queued = 0
        self.buffer_full = False
        self.requests = 0
        self._receiving = False
        # GOAWAY sent for a drain: streams above this id are refused.
        self._goaway_last: int | None = None
        self._resets: deque[float] = deque()
        # Request blocks already checked and parsed (their fields and whether a body follows): the head to copy.
        self._known_heads: dict[tuple[Any, bool], RequestFields] = {}
        self._max_streams = settings.max_concurrent_streams
        self._inbound_window = settings.initial_window_size
        # The client's initial stream window (h2's remote setting), read again after each read h2 takes.
        self._outbound_window = 65535
        # Streams whose h2 stream labelgw keeps as plain fields until h2 needs it (materialize), open ones by id,
        # and those closed since the last stream opened (h2 would still hold them, closed).
        self._lazy: dict[int, H2Stream] = {}
        self._closed_lately: list[H2Stream] = []
        self._idle_since = 0.0
        self._timer: Any = None
        # When the timer runs (its getTime(), kept as it is set).
        self._timer_at = 0.0
        # The write of this reactor turn, once streams answer together (flush_soon).
        self._flush_call: Any = None

    def _move(self, new: H2State) -> None:
        self.state = check_move(H2_MOVES, self.state, new)

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    # Lifecycle.

    def connectionMade(self) -> None:
        transport = self.transport
        self.peer = transport.getPeer()
        self.host = transport.getHost()
        self.peer_ip = getattr(self.peer, "host", "").encode("ascii", "replace")
        self.local_port = b"%d" % getattr(self.host, "port", 0)
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        settings = self.settings
        conn = self.conn
        conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            },
        )
        # labelgw never changes its settings after this (no update_settings): the values h2 reads for each new
        # stream, read once.
        self._max_streams = conn.local_settings.max_concurrent_streams
        self._inbound_window = conn.local_settings.initial_window_size
        self._outbound_window = conn.remote_settings.initial_window_size
        # labelgw's HPACK (labelgw.http.hpack): static-table response heads, cached indexed-only request blocks.
        # (h2's encoder and decoder attributes are not its documented API: tests/test_internals.py checks them.)
        conn.encoder = HpackEncoder()  # type: ignore[assignment]
        conn.decoder = CachingDecoder(settings.max_header_list_size)
        conn.initiate_connection()
        # The connection window covers every stream's window: a paused stream holding its window back never
        # stalls the others (nginx does the same).
        extra = settings.max_concurrent_streams * settings.initial_window_size - 65535
        if extra > 0:
            conn.increment_flow_control_window(min(extra, 2**31 - 1 - 65535))
        transport.registerProducer(self, True)
        gateway = self.gateway
        gateway.connections.add(self)
        self._idle_since = self.clock.seconds()
        self._timer = self.clock.callLater(gateway.settings.head_timeout, self._check_timers)
        self._timer_at = self._timer.getTime()
        self.flush()
        if gateway.draining:
            self.drain()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._move(_CLOSED)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        flush, self._flush_call = self._flush_call, None
        if flush is not None and flush.active():
            flush.cancel()
        for stream in list(self.streams.values()):
            stream.abandon()
        self.gateway.connection_closed(self)

    def drain(self) -> None:
        """Graceful close: GOAWAY naming the last stream that will be served; close when those are done."""
        if self.state is not _OPEN:
            return
        self._move(_DRAINING)
        last = self.conn.highest_inbound_stream_id
        self._goaway_last = last
        self.flush()
        # Written by hand: h2's close_connection would forbid answering the streams still in flight.
        self.transport.write(GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
        self._close_if_drained()

    def abort(self, reason: str = "") -> None:
        self._move(_CLOSED)
        self.transport.abortConnection()

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self.state is _CLOSED:
            return
        self._receiving = True
        try:
            conn = self.conn
            starting: list[tuple[H2Stream, RequestHead]] = []
            buffered = conn.incoming_buffer
            events: list[Any] | None
            try:
                state = conn.state_machine.state
                if buffered._data or buffered._preamble_len or buffered._headers_buffer or (state is not _SERVER_OPEN and state is not _IDLE):
                    events = self._h2_reads(data)
                else:
                    # Nothing half-read: the requests at the front of the read are taken without h2's frame objects and
                    # events, the rest (if any) goes to h2.
                    at = self._receive_requests(data, starting)
                    if at < 0:
                        return
                    events = self._h2_reads(memoryview(data)[at:]) if at < len(data) else None
            except ProtocolError as problem:
                # h2 queued a GOAWAY with the right code (ENHANCE_YOUR_CALM for an HPACK bomb).
                self.log.info("HTTP/2 connection from {peer}: {problem}", peer=_describe(self.peer), problem=printable(str(problem)))
                self._shut(None)
                return
            if events is None:
                # h2 took nothing of this read. The streams start after the whole read (below, the same).
                for opened, head in starting:
                    if not opened.gone and opened.state is _WAITING and self.state is not _CLOSED:
                        opened.start(head)
                return
            if self._header_block_size() > self.settings.max_header_list_size:
                self._enhance_your_calm("header block (HEADERS + CONTINUATION) too large")
                return
            streams = self.streams
            for event in events:
                if isinstance(event, DataReceived):
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.data_received(event.data or b"", event.flow_controlled_length or 0)
                    elif event.flow_controlled_length:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, RequestReceived):
                    if not self._request(event.stream_id, event.headers, event.stream_ended is None, starting):
                        return
                elif isinstance(event, StreamEnded):
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.request_ended()
                elif isinstance(event, WindowUpdated):
                    if event.stream_id:
                        stream = streams.get(event.stream_id)
                        if stream is not None:
                            stream.pump()
                    else:
                        self._pump_all()
                elif isinstance(event, StreamReset):
                    self._stream_reset(event)
                    if self.state is _CLOSED:
                        return
                elif isinstance(event, RemoteSettingsChanged):
                    if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                        self._pump_all()
                elif isinstance(event, ConnectionTerminated):
                    # The client's GOAWAY: h2 will not send anything more on this connection.
                    self._shut(None)
                    return
                elif isinstance(event, TrailersReceived):
                    # Dropped (an HTTP/1.1 upstream gets none), but checked as h2 would have.
                    why = malformed_trailers(event.headers)
                    if why is not None:
                        self._malformed(why)
                        return
            # Streams start after the whole read: one opened and reset in the same read never reaches a backend.
            for opened, head in starting:
                if not opened.gone and opened.state is _WAITING and self.state is not _CLOSED:
                    opened.start(head)
        finally:
            self._receiving = False
            if self._flush_call is not None or self.conn._data_to_send:
                self.flush()

    def _h2_reads(self, data: Any) -> list[Any]:
        """h2 reads `data`, holding every stream as it would have made them."""
        if self._lazy or self._closed_lately:
            self.materialize()
        conn = self.conn
        try:
            return conn.receive_data(data)
        finally:
            self._outbound_window = conn.remote_settings.initial_window_size

    def materialize(self) -> None:
        """Make h2's streams for those labelgw kept as plain fields, as h2 would hold them now: before h2 reads
        frames, resets or acknowledges anything, or sends on them other than as labelgw's own framing does."""
        conn = self.conn
        closed = self._closed_lately
        if closed:
            # Closed since the last stream opened: h2 keeps such a stream, closed, until a stream opens.
            for stream in closed:
                conn.streams[stream.stream_id] = stream._lib = self._lib_stream(stream)
            closed.clear()
        lazy = self._lazy
        if lazy:
            for stream in lazy.values():
                conn.streams[stream.stream_id] = stream._lib = self._lib_stream(stream)
            lazy.clear()

    def _lib_stream(self, stream: H2Stream) -> Any:
        """h2's stream as h2 would have made and moved it: opened by a whole request (RECV_HEADERS with
        END_STREAM), then the response's HEADERS and END_STREAM as labelgw sent them (send_headers_frames,
        send_data_frame)."""
        conn = self.conn
        lib = _H2LibStream(
            stream.stream_id, config=conn.config, inbound_window_size=self._inbound_window,
            outbound_window_size=stream.lib_window,
        )
        # (Settings h2 reads for it change only in a read h2 takes, after this.)
        lib.max_outbound_frame_size = conn.max_outbound_frame_size
        machine = lib.state_machine
        machine.client = False
        machine.headers_received = True
        machine.headers_sent = stream.lib_headers_sent
        machine.state = stream.lib_state
        if stream.lib_state is _LIB_CLOSED:
            machine.stream_closed_by = _CLOSED_BY_SEND_END
        lib._expected_content_length = stream.lib_expected
        return lib

    def _forget_closed(self) -> None:
        """A stream opens: h2 would now move the closed streams it holds to its record of closed streams (its
        _open_streams), bounded as h2 bounds it (a SizeLimitDict, written to without its Python methods)."""
        record = self.conn._closed_streams
        limit = record._size_limit  # type: ignore[attr-defined]
        for stream in self._closed_lately:
            _ordered_set(record, stream.stream_id, _CLOSED_BY_SEND_END)
            if len(record) > limit:
                record.popitem(last=False)  # type: ignore[call-arg]
        self._closed_lately.clear()

    def _malformed(self, problem: str) -> None:
        """A malformed header block (RFC 9113 section 8.1.1): the connection ends, as h2's own check ended it."""
        self.log.info("HTTP/2 connection from {peer}: {problem}", peer=_describe(self.peer), problem=printable(problem))
        self._shut(ErrorCodes.PROTOCOL_ERROR)

    def _receive_requests(self, data: bytes, starting: list[tuple[H2Stream, RequestHead]]) -> int:
        """HEADERS frames that open a stream with a whole request head, read here rather than by h2, from the start
        of `data`: where the first other frame (or an incomplete one) starts, or -1 when the connection was shut.

        What h2 does for such a frame is done here in the same order, on h2's own objects: the frame size limit,
        the stream id (odd, above every earlier one), the concurrent streams limit, the HPACK decoding (its errors
        end the connection as h2 ends it), h2's stream created and moved to open or half-closed (remote) as its
        state machine moves it on RECV_HEADERS and RECV_END_STREAM, its expected content length read. Anything
        else (padding, priority, CONTINUATION, a stream id h2 must refuse, the limit reached) stops here and h2
        reads it, so its checks and errors are the ones that apply."""
        conn = self.conn
        if type(data) is not bytes:
            # The decoder keeps blocks by value (transports give bytes; anything else is copied once).
            data = bytes(data)
        size = len(data)
        at = 0
        unpack = _FRAME_HEAD.unpack_from
        limit = conn.max_inbound_frame_size
        streams = self.streams
        decoder: CachingDecoder = conn.decoder  # type: ignore[assignment]
        # Request blocks met before, with the decoder's table unchanged since: their fields, checks and parsed head
        # (CachingDecoder.known is emptied whenever the table may have changed).
        known_blocks = decoder.known
        while size - at >= 9:
            high, low, kind, flags, stream_id = unpack(data, at)
            length = (high << 16) | low
            end = at + 9 + length
            # END_HEADERS, maybe END_STREAM, nothing else.
            if kind != _HEADERS_FRAME or flags & ~0x5 or not flags & _END_HEADERS or end > size or length > limit:
                break
            stream_id &= 0x7FFFFFFF
            if not stream_id & 1 or stream_id <= conn.highest_inbound_stream_id:
                break
            block = data[at + 9 : end]
            ended = flags & _END_STREAM
            known_key = (block, ended, decoder.max_header_list_size)
            known = known_blocks.get(known_key)
            lazy = self._lazy
            if known is not None and ended and self._goaway_last is None:
                # A whole request (END_STREAM) whose block was met before: checked and parsed then, and h2's stream
                # kept as plain fields (materialize makes it if h2 ever needs it). h2's checks before it opens a
                # stream: the concurrency limit counts h2's open streams (it forgets its closed ones while counting)
                # and these.
                if (conn._open_streams(1) if conn.streams else 0) + len(lazy) + 1 > self._max_streams:
                    break
                closed = self._closed_lately
                if closed:
                    if len(closed) == 1:
                        # _forget_closed's common case written out (the last request's stream).
                        record = conn._closed_streams
                        _ordered_set(record, closed[0].stream_id, _CLOSED_BY_SEND_END)
                        if len(record) > record._size_limit:  # type: ignore[attr-defined]
                            record.popitem(last=False)  # type: ignore[call-arg]
                        closed.clear()
                    else:
                        self._forget_closed()
                # RECV_HEADERS: an idle connection (its first request) becomes open, an open one stays so.
                conn.state_machine.state = _SERVER_OPEN
                conn.highest_inbound_stream_id = stream_id
                at = end
                self.requests += 1
                template = known[0]
                new = H2Stream(self, stream_id, known[2], None, self._outbound_window, known[1], True)
                lazy[stream_id] = new
                streams[stream_id] = new
                starting.append((new, request_from(template)))
                continue
            # (h2's count of open streams also forgets the closed ones, as h2 does before opening a stream.)
            if conn._open_streams(1) + len(lazy) + 1 > self._max_streams:
                break
            if self._closed_lately:
                self._forget_closed()
            headers: Any = None
            try:
                if known is None:
                    headers = _h2_decode_headers(decoder, block)
                # RECV_HEADERS: an idle connection (its first request) becomes open, an open one stays so.
                conn.state_machine.state = _SERVER_OPEN
                # h2's _begin_new_stream, without the checks made above and its debug logging.
                lib = _H2LibStream(
                    stream_id, config=conn.config, inbound_window_size=self._inbound_window,
                    outbound_window_size=conn.remote_settings.initial_window_size,
                )
                lib.max_outbound_frame_size = conn.max_outbound_frame_size
                conn.streams[stream_id] = lib
                conn.highest_inbound_stream_id = stream_id
                machine = lib.state_machine
                machine.client = False
                machine.headers_received = True
                machine.state = _LIB_HALF_CLOSED_REMOTE if ended else _LIB_OPEN
                if known is None:
                    lib._initialize_content_length(headers)
                else:
                    lib._expected_content_length = known[1]
            except ProtocolError as problem:
                conn._terminate_connection(problem.error_code)
                raise
            at = end
            if known is not None and self._goaway_last is None:
                # A block met before (a body follows): checked and parsed then (_request's work, without its
                # look-ups).
                self.requests += 1
                new = H2Stream(self, stream_id, known[2], lib)
                streams[stream_id] = new
                starting.append((new, request_from(known[0])))
                continue
            if not self._request(stream_id, headers, not ended, starting) or self.state is _CLOSED:
                return -1
            if ended:
                stream = streams.get(stream_id)
                if stream is not None:
                    stream.request_ended()
            if known is None and decoder.cached(block):
                # Keep what this block made (its parsed head, h2's expected length) while the decoder keeps its fields.
                template = self._known_heads.get((tuple(headers), not ended))
                if template is not None:
                    if len(known_blocks) >= _KNOWN_HEADS:
                        known_blocks.clear()
                    # (The head's fields, h2's expected content length, the method.)
                    known_blocks[known_key] = (template, lib._expected_content_length, request_from(template).method)
        return at

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], has_body: bool,
                 starting: list[tuple[H2Stream, RequestHead]]) -> bool:
        """A request's header block: its stream made (to start after the read) or answered; False when the block
        is malformed and the connection was shut."""
        # The same block again (h2load, a browser's repeated requests): checked and parsed once.
        known = (tuple(headers), has_body)
        template = self._known_heads.get(known)
        if template is None:
            why = malformed_request(headers)
            if why is not None:
                self._malformed(why)
                return False
        if self._goaway_last is not None and stream_id > self._goaway_last:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return True
        self.requests += 1
        if template is not None:
            head: RequestHead | tuple[int, str] = request_from(template)
        else:
            head = request_head(headers, has_body)
            if isinstance(head, RequestHead) and len(head.block) <= _KNOWN_BLOCK:
                known_heads = self._known_heads
                if len(known_heads) >= _KNOWN_HEADS:
                    known_heads.clear()
                known_heads[known] = request_fields(head)
        if isinstance(head, tuple):
            # A request h2 accepted that labelgw does not relay.
            method = next((value for name, value in headers if name == b":method"), b"")
            stream = H2Stream(self, stream_id, method, self.conn.streams.get(stream_id) or _ClosedStream(stream_id))
            self.streams[stream_id] = stream
            stream.remote_ended = not has_body
            status, message = head
            stream.refuse(status, message, True)
            return True
        stream = H2Stream(self, stream_id, head.method, self.conn.streams.get(stream_id) or _ClosedStream(stream_id))
        self.streams[stream_id] = stream
        starting.append((stream, head))
        return True

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        # Counted against one budget: the client's resets of streams not yet answered (rapid reset,
        # CVE-2023-44487), and the resets h2 sends for the client's protocol errors on a stream, such as DATA after
        # END_STREAM or a window overflow (MadeYouReset, CVE-2025-8671). Either way a backend may be serving it.
        if not event.remote_reset or (stream is not None and stream.state is not _DONE):
            now = self.clock.seconds()
            resets = self._resets
            resets.append(now)
            horizon = now - self.settings.reset_window
            while resets and resets[0] < horizon:
                resets.popleft()
            if len(resets) > self.settings.reset_budget:
                if stream is not None:
                    stream.reset_by_client()
                self._enhance_your_calm(f"more than {self.settings.reset_budget} stream resets in {self.settings.reset_window:g} s")
                return
        if stream is not None:
            # The stream's upstream request is cancelled with it.
            stream.reset_by_client()

    def _header_block_size(self) -> int:
        # A header block still waiting for its END_HEADERS: h2 alone would buffer up to 64 CONTINUATION frames.
        frames = getattr(self.conn.incoming_buffer, "_headers_buffer", None)
        if not frames:
            return 0
        return sum(len(frame.data) for frame in frames)

    # Writing.

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        # (h2's buffer read first: data_to_send copies and replaces it even when empty.)
        if self.conn._data_to_send:
            self.transport.write(self.conn.data_to_send())

    def flush_soon(self) -> None:
        """Send what h2 holds. Inside dataReceived: at its end. While other streams are in flight, their upstreams'
        reads may come in this same reactor turn: one write (one TLS record, one send) at the turn's end carries
        them all. Else now."""
        if self._receiving or self.state is _CLOSED or self._flush_call is not None:
            return
        if len(self.streams) > 1:
            self._flush_call = self.clock.callLater(0, self._flush_turn)
        else:
            self.flush()

    def _flush_turn(self) -> None:
        self._flush_call = None
        if self.state is not _CLOSED:
            self.flush()

    def _pump_all(self) -> None:
        """The connection window opened: streams waiting for it take one frame each, in turn."""
        waiting = [stream for stream in self.streams.values() if stream.waiting]
        while waiting:
            waiting = [stream for stream in waiting if stream.pump_one()]
        for stream in list(self.streams.values()):
            if stream.state is not _DONE:
                stream.pump()

    # IPushProducer, for the client's transport: its buffer is full, so pause every upstream and stop reading.

    def pauseProducing(self) -> None:
        if self.tcp_blocked:
            return
        self.tcp_blocked = True
        now = self._blocked_since = self.clock.seconds()
        self.watch(now + self.gateway.settings.send_timeout)
        self.transport.pauseProducing()
        for stream in list(self.streams.values()):
            stream.sync_producer()

    def resumeProducing(self) -> None:
        if not self.tcp_blocked:
            return
        self.tcp_blocked = False
        self._blocked_since = 0.0
        if self.state is not _CLOSED:
            self.transport.resumeProducing()
        for stream in list(self.streams.values()):
            stream.sync_producer()

    def stopProducing(self) -> None:
        pass

    # The bound on response bytes queued by all streams together.

    def queued_more(self, size: int) -> None:
        queued = self.queued = self.queued + size
        if not self.buffer_full and queued > self.settings.connection_buffer:
            self.buffer_full = True
            for stream in list(self.streams.values()):
                stream.sync_producer()

    def queued_less(self, size: int) -> None:
        queued = self.queued = self.queued - size
        if self.buffer_full and queued <= self.settings.connection_buffer // 2:
            self.buffer_full = False
            for stream in list(self.streams.values()):
                stream.sync_producer()

    # Streams and closing.

    def stream_gone(self, stream: H2Stream) -> None:
        streams = self.streams
        if streams.get(stream.stream_id) is stream:
            del streams[stream.stream_id]
        if not streams:
            now = self._idle_since = self.clock.seconds()
            # The timer may wait for a later deadline (the head timeout, armed at the connection's start).
            state = self.state
            if state is _OPEN:
                self.watch(now + self.gateway.settings.idle_timeout)
            elif state is _DRAINING:
                self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.state is _DRAINING and not self.streams:
            self._move(_CLOSED)
            self.flush()
            # A registered producer holds TLS's close_notify back and, paused, TCP's close too.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _enhance_your_calm(self, reason: str) -> None:
        self.log.warn("HTTP/2 connection from {peer}: {reason}; GOAWAY", peer=_describe(self.peer), reason=reason)
        self._shut(ErrorCodes.ENHANCE_YOUR_CALM)

    def _shut(self, code: ErrorCodes | None) -> None:
        """Close the connection now; GOAWAY with `code` unless h2 already queued one."""
        if self.state is _CLOSED:
            return
        if code is not None:
            try:
                self.conn.close_connection(error_code=code)
            except ProtocolError:
                pass
        self.flush()
        self._move(_CLOSED)
        for stream in list(self.streams.values()):
            stream.abandon()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # Timers: one per connection; streams ask for it to look at them in time (watch).

    def watch(self, deadline: float) -> None:
        """Make sure the timer runs by `deadline` (a stream's send or body timeout, a blocked client)."""
        timer = self._timer
        if timer is not None and self._timer_at <= deadline:
            # It runs by then (the timer is only cancelled with the connection, and _check_timers forgets it first).
            return
        now = self.clock.seconds()
        if timer is None or not timer.active():
            if self.state is not _CLOSED:
                timer = self._timer = self.clock.callLater(max(deadline - now, 0.001), self._check_timers)
                self._timer_at = timer.getTime()
        elif timer.getTime() > deadline:
            timer.reset(max(deadline - now, 0.001))
            self._timer_at = timer.getTime()

    def _check_timers(self) -> None:
        self._timer = None
        if self.state is _CLOSED:
            return
        settings = self.gateway.settings
        now = self.clock.seconds()
        blocked = self._blocked_since
        if blocked and now >= blocked + settings.send_timeout:
            # The client read nothing for that long (nginx send_timeout): every stream goes with the connection.
            self.log.info("HTTP/2 connection from {peer}: send timeout", peer=_describe(self.peer))
            self._move(_CLOSED)
            for stream in list(self.streams.values()):
                stream.abandon()
            self.transport.abortConnection()
            return
        if self.streams:
            deadline = now + settings.idle_timeout
            if blocked:
                deadline = min(deadline, blocked + settings.send_timeout)
            for stream in list(self.streams.values()):
                stalled = stream.stalled_since
                if stalled:
                    if now >= stalled + settings.send_timeout:
                        stream.send_timed_out()
                        continue
                    deadline = min(deadline, stalled + settings.send_timeout)
                exchange = stream.exchange
                if exchange is not None and not exchange.body_done:
                    body_deadline = stream.body_seen + settings.body_timeout
                    if now >= body_deadline:
                        stream.body_timed_out()
                    else:
                        deadline = min(deadline, body_deadline)
            self.flush_soon()
        else:
            deadline = self._idle_since + (settings.idle_timeout if self.requests else settings.head_timeout)
            if now >= deadline:
                self._shut(ErrorCodes.NO_ERROR)
                return
            if blocked:
                deadline = min(deadline, blocked + settings.send_timeout)
        self._timer = self.clock.callLater(max(deadline - now, 0.001), self._check_timers)
        self._timer_at = self._timer.getTime()


_ordered_set = OrderedDict.__setitem__


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '')}" if host is not None else str(address)


# What labelgw accepts of an HTTP/2 request beyond h2's own checks (RFC 9113 section 8.2: lower-case names, no
# CR/LF/NUL, no connection-specific fields, valid pseudo-headers, Host equal to :authority): the rules the strict
# HTTP/1.1 parser applies to the same fields, since the request goes upstream as HTTP/1.1.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Origin form without spaces or control characters: it becomes the upstream request line.
_PATH = re.compile(rb"/[\x21-\x7e\x80-\xff]*")
_X_PREFIXES = (b"x-", b"x_", b"x.")


def request_head(headers: list[tuple[bytes, bytes]], has_body: bool) -> RequestHead | tuple[int, str]:
    """The parsed request of an HTTP/2 HEADERS block, or (status, why) when labelgw does not relay it.

    A body without content-length goes upstream chunked. Field lines are kept as a block (Host first), so that
    the rules of labelgw.http.headers (hop-by-hop, managed X-Forwarded-* fields) and the version pinning of
    labelgw.core.versions read them as they read an HTTP/1.1 request's."""
    method = path = authority = b""
    lines: list[bytes] = []
    content_length: int | None = None
    # RFC 9113 section 8.2.3: cookie crumbs are joined with "; " into one field for HTTP/1.1 (where the first was).
    cookies: list[bytes] | None = None
    cookie_at = 0
    # A field labelgw does not forward (hop-by-hop, managed X-Forwarded-*): the block is then filtered field by field.
    cut = False
    # X-Request-Id and traceparent fields, counted as the HTTP/1.1 parser counts them (RequestHead.id_fields).
    id_fields = 0
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                return 405, "CONNECT with :protocol (RFC 8441) is not supported"
            continue
        if name == b"host":
            if not authority:
                authority = value
            continue
        if name == b"te":
            # Only "trailers" gets past h2, and it means nothing to an HTTP/1.1 upstream.
            continue
        # Defence in depth: one line per field, whatever a future h2 lets through.
        if _FIELD_NAME.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
            return 400, "invalid header field"
        if name == b"content-length":
            if content_length is not None:
                return 400, "more than one Content-Length header"
            if not value.isdigit() or len(value) > 18:
                return 400, "invalid Content-Length"
            content_length = int(value)
            continue
        if name == b"cookie":
            if cookies is not None:
                cookies.append(value)
                continue
            cookies = [value]
            cookie_at = len(lines)
        elif name in HOP_BY_HOP or (name[:2] in _X_PREFIXES and name.replace(b"_", b"-").replace(b".", b"-") in MANAGED):
            cut = True
        if name == b"x-request-id" or name == b"traceparent":
            id_fields += 1
        lines.append(name + b": " + value + b"\r\n")
    if cookies is not None and len(cookies) > 1:
        lines[cookie_at] = b"cookie: " + b"; ".join(cookies) + b"\r\n"
    if len(lines) >= MAX_HEADERS:
        return 431, "too many header fields"
    if method == b"CONNECT":
        return 405, "CONNECT is not supported over HTTP/2"
    if _METHOD.fullmatch(method) is None:
        return 400, "invalid method"
    # RFC 9113 section 8.3.1: origin form (or "*"), and no userinfo. An absolute :path would re-route the request
    # by its own authority.
    if _PATH.fullmatch(path) is None and not (path == b"*" and method == b"OPTIONS"):
        return 400, "invalid :path"
    # Int needles ("@", " ", "/"): a one-byte bytes needle makes CPython 3.11 raise and clear a TypeError first.
    if 0x40 in authority:
        return 400, "userinfo in :authority"
    if _FIELD_VALUE.fullmatch(authority) is None or 0x20 in authority or 0x2F in authority:
        return 400, "invalid :authority"
    head = RequestHead()
    head.method = method
    head.target = path
    head.host = authority
    head.block = (b"host: " + authority + b"\r\n" if authority else b"") + b"".join(lines)
    head.id_fields = id_fields
    if authority and not cut:
        # Nothing to take out: the block goes upstream as it is (labelgw.http.headers.upstream_request_head's fast
        # path, as for an HTTP/1.1 head the parser cut).
        head.forward = head.block
    if has_body and content_length is None:
        head.chunked = True
    elif content_length is not None:
        head.content_length = content_length
    return head


# Known request heads kept per connection (h2load and browsers repeat a handful), each of a small block only.
_KNOWN_HEADS = 8
_KNOWN_BLOCK = 2048


class H2Factory(Factory):
    """A listener that speaks only HTTP/2: cleartext with prior knowledge (``h2c``), tests, benchmarks."""

    noisy = False

    def __init__(self, gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> None:
        self.gateway = gateway
        self.proto = proto
        self.settings = settings

    def buildProtocol(self, addr: Any) -> H2Protocol:
        return H2Protocol(self.gateway, self.proto, self.settings)


class _ALPNSwitch(DataProtocol):
    """Starts as HTTP/1.1 (so the head timeout runs from the connection's start); on the first bytes, after the
    handshake, hands over to HTTP/2 when ALPN chose h2. Either way the chosen protocol's methods are then bound
    on this object, so later bytes reach it without an extra call."""

    def __init__(self, factory: "NegotiatingFactory") -> None:
        self._factory = factory
        self._http1: ClientConnection | None = None

    def connectionMade(self) -> None:
        factory = self._factory
        self._http1 = ClientConnection(factory.gateway, factory.proto)
        self._http1.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        http1 = self._http1
        if http1 is None:
            return
        self._http1 = None
        chosen: DataProtocol = http1
        # A connection the HTTP/1.1 side already closes (a timeout, a drain) stays with it.
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2" and not self.transport.disconnecting:
            # Retire the HTTP/1.1 side before it saw a byte: its timer and its place in the gateway go.
            http1.connectionLost(Failure(error.ConnectionDone("handed over to HTTP/2")))
            factory = self._factory
            chosen = H2Protocol(factory.gateway, factory.proto, factory.settings)
            chosen.makeConnection(self.transport)
        self.dataReceived = chosen.dataReceived  # type: ignore[method-assign]
        self.connectionLost = chosen.connectionLost  # type: ignore[method-assign]
        chosen.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        http1, self._http1 = self._http1, None
        if http1 is not None:
            http1.connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class NegotiatingFactory(Factory):
    """HTTP/2 or HTTP/1.1 per connection, as ALPN decided; tells the TLS layer it speaks both."""

    noisy = False

    def __init__(self, gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> None:
        self.gateway = gateway
        self.proto = proto
        self.settings = settings

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Protocol:
        return _ALPNSwitch(self)


def negotiating_factory(gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> NegotiatingFactory:
    """The protocol factory for a TLS listener: HTTP/2 when the handshake negotiated h2, else HTTP/1.1."""
    return NegotiatingFactory(gateway, proto, settings)
