"""HTTP/2 towards clients (RFC 9113), in front of the unchanged HTTP/1.1 proxy.

Every stream is served by its own L{ClientConnection} attached to a L{StreamTransport}. The stream's request
becomes an HTTP/1.1 request head (plus its body, chunk-encoded when it has no content-length) fed to that
connection; the HTTP/1.1 response the connection writes is turned back into HEADERS and DATA frames. So routing,
the strict parser, retries, timeouts, limits and accounting of the HTTP/1.1 data path apply to HTTP/2 as they
are, and the HTTP/1.1 hot path gains no code at all.

The request head always says ``Connection: close``: the per-stream connection then closes itself after its one
response, which is what ends the stream. Streams never wait for each other: each has its own exchange and upstream
connection, its own flow-control window, and its own back-pressure (the upstream is paused while the stream's
window is exhausted or the client's TCP buffer is full; the client's request body is not acknowledged while the
upstream is paused).

Defences (hardening checklist item 23): at most 100 concurrent streams; header blocks (HEADERS + CONTINUATION) over
64 KiB and HPACK bombs end the connection with GOAWAY(ENHANCE_YOUR_CALM); so do client resets of unanswered
streams past a budget in a sliding window (rapid reset, CVE-2023-44487), and a stream opened and reset in the same
read never reaches a backend. Memory per connection is bounded by the windows: at most one stream window of
unacknowledged request body and about twice the stream buffer of response body per stream.

Wiring: L{negotiating_factory} for TLS listeners (HTTP/2 when ALPN chose ``h2``, HTTP/1.1 otherwise; it also tells
the TLS layer to offer both, see L{labelgw.tls.policy.listener_protocols}); L{H2Factory} for a listener that
speaks only HTTP/2 (cleartext with prior knowledge, tests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet import error
from twisted.internet.interfaces import IConsumer, IProtocolNegotiationFactory, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from labelgw.http.headers import HOP_BY_HOP, error_response
from labelgw.http.logsafe import printable
from labelgw.http.parser import LAST_CHUNK, MAX_HEAD_BYTES, ChunkedDecoder, HttpError, encode_chunk, parse_response_head
from labelgw.http.server import ClientConnection, Gateway


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

# What the response conversion is reading of the HTTP/1.1 response the per-stream connection writes.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(5)

_NO_BODY_STATUSES = frozenset({204, 304})


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """One HTTP/2 stream, as the transport of one L{ClientConnection}.

    Request direction: the request head, then the body from DATA frames, go to C{protocol.dataReceived}; while
    paused (C{pauseProducing}) DATA is kept and not acknowledged, so the client's window closes.
    Response direction: C{write} takes the HTTP/1.1 response the protocol writes and sends it as HEADERS and DATA
    frames within the flow-control windows; the registered producer (the upstream) is paused while too much waits.
    """

    connected = True
    disconnecting = False

    def __init__(self, owner: "H2Protocol", stream_id: int, method: bytes, head: bytes, chunked: bool) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.method = method
        self.protocol: ClientConnection | None = None
        self.started = False
        # The request: its HTTP/1.1 head until started, DATA held while paused, flow-controlled bytes not acked.
        self._head = head
        self._chunked_request = chunked
        self._paused = False
        self._inbound: list[bytes] = []
        self._unacked = 0
        self.remote_ended = False
        self._end_fed = False
        # The response.
        self._state = _HEAD
        self._head_buffer = b""
        self._remaining = 0
        self._decoder: ChunkedDecoder | None = None
        self._queue: deque[bytes | memoryview] = deque()
        self._queued = 0
        self._ending = False
        self.local_done = False
        self._wrote = False
        self._producer: Any = None
        self._producer_paused = False
        self._lost = False
        self._lost_scheduled = False
        # Since when response bytes wait and none could be sent (0.0: none wait); the stream's send timeout.
        self.stalled_since = 0.0
        self._progressed = False

    def __repr__(self) -> str:
        return f"<StreamTransport {self.stream_id} state={self._state} queued={self._queued}>"

    # Starting.

    def start(self) -> None:
        """Attach a new ClientConnection and feed it the request head and any body received so far."""
        self.started = True
        owner = self.owner
        client = ClientConnection(owner.gateway, owner.proto)
        self.protocol = client
        client.makeConnection(self)
        if self._lost:
            return
        head, self._head = self._head, b""
        client.dataReceived(head)
        if not self._paused and (self._inbound or self.remote_ended):
            self._release_inbound()

    def respond_locally(self, status: int, message: str) -> None:
        """Answer without a ClientConnection (requests HTTP/2 cannot relay)."""
        self.started = True
        self.write(error_response(status, message, close=True, head_only=self.method == b"HEAD"))
        self.loseConnection()

    # Request direction, from H2Protocol.

    def data_received(self, data: bytes, flow_length: int) -> None:
        self._unacked += flow_length
        if not self.started or self._paused:
            if data:
                self._inbound.append(data)
            return
        self._deliver(data)

    def request_ended(self) -> None:
        self.remote_ended = True
        if self.started and not self._paused and not self._inbound:
            self._deliver(b"")

    def _deliver(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol is None or self._lost:
            # Answered locally, or gone: the bytes are dropped, the window given back.
            self._inbound.clear()
            self._ack()
            return
        end = self.remote_ended and not self._end_fed
        if end:
            self._end_fed = True
        if self._chunked_request:
            out = encode_chunk(data) if data else b""
            if end:
                out += LAST_CHUNK
        else:
            out = data
        if out:
            protocol.dataReceived(out)
        if not self._paused:
            self._ack()

    def _release_inbound(self) -> None:
        data = b"".join(self._inbound)
        self._inbound.clear()
        self._deliver(data)

    def _ack(self) -> None:
        unacked = self._unacked
        if unacked:
            self._unacked = 0
            owner = self.owner
            if not owner.closed:
                owner.conn.acknowledge_received_data(unacked, self.stream_id)
                owner.flush_soon()

    # IPushProducer: the ClientConnection (or the exchange's pauser) stops and starts the request body.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if not self.started:
            return
        if self._inbound or (self.remote_ended and not self._end_fed):
            self._release_inbound()
        else:
            self._ack()

    def stopProducing(self) -> None:
        self.abortConnection()

    # ITransport: the HTTP/1.1 response, as the ClientConnection and its exchange write it.

    def write(self, data: bytes) -> None:
        if self.local_done or not data:
            return
        self._wrote = True
        if self._state == _LENGTH:
            # The common case, a body piece of a Content-Length response: no parsing.
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self._queue_data(data)
                self._pump()
                return
        try:
            self._consume(data)
        except (HttpError, ProtocolError) as problem:
            self.owner.log.error(
                "HTTP/2 stream {stream}: cannot relay the response: {problem}", stream=self.stream_id, problem=printable(str(problem))
            )
            self._reset(ErrorCodes.INTERNAL_ERROR, error.ConnectionLost())
            return
        self._pump()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self.local_done:
            self._schedule_lost(error.ConnectionDone())
        elif self._state == _DONE or self._state == _UNTIL_CLOSE:
            # A complete response (or one delimited by the close): END_STREAM once the queue is out.
            self._state = _DONE
            self._ending = True
            self._pump()
        else:
            # Nothing sent: the client may safely retry elsewhere (REFUSED_STREAM); a cut response is an error.
            self._reset(ErrorCodes.INTERNAL_ERROR if self._wrote else ErrorCodes.REFUSED_STREAM, error.ConnectionDone())

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._reset(ErrorCodes.INTERNAL_ERROR, error.ConnectionAborted())

    def getPeer(self) -> Any:
        return self.owner.peer

    def getHost(self) -> Any:
        return self.owner.host

    # IConsumer: the exchange registers the upstream's pauser here.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._producer_paused = False
        self.sync_producer()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    def sync_producer(self) -> None:
        """Pause the upstream while the client's TCP buffer is full or too much waits for this stream's window."""
        producer = self._producer
        if producer is None:
            return
        limit = self.owner.settings.stream_buffer
        if self._producer_paused:
            limit //= 2
        owner = self.owner
        pause = owner.tcp_blocked or owner.buffer_full or self._queued > limit
        if pause != self._producer_paused:
            self._producer_paused = pause
            if pause:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    # Response conversion.

    def _consume(self, data: bytes) -> None:
        while data:
            state = self._state
            if state == _HEAD:
                buffer = self._head_buffer + data if self._head_buffer else data
                end = buffer.find(b"\r\n\r\n")
                if end == -1:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise HttpError(502, "response head too large")
                    self._head_buffer = buffer
                    return
                self._head_buffer = b""
                data = buffer[end + 4 :]
                self._start_response(buffer[:end])
            elif state == _LENGTH:
                remaining = self._remaining
                if len(data) >= remaining:
                    data = data[:remaining]
                    self._state = _DONE
                    self._ending = True
                self._remaining = remaining - len(data)
                self._queue_data(data)
                return
            elif state == _CHUNKED:
                decoder = self._decoder
                for piece in decoder.feed(data):  # type: ignore[union-attr]
                    self._queue_data(piece)
                if decoder.done:  # type: ignore[union-attr]
                    self._state = _DONE
                    self._ending = True
                return
            elif state == _UNTIL_CLOSE:
                self._queue_data(data)
                return
            else:
                # After the end of the response: nothing more belongs to this stream.
                return

    def _start_response(self, raw_head: bytes) -> None:
        head = parse_response_head(raw_head)
        status = head.status
        headers = [(b":status", b"%d" % status)]
        for name, value in head.headers:
            lower = name.lower()
            if lower not in HOP_BY_HOP:
                headers.append((lower, value))
        conn = self.owner.conn
        if status < 200:
            if status == 101:
                raise HttpError(502, "protocol switch over HTTP/2")
            # Interim response (100 Continue, 103 Early Hints): informational HEADERS.
            conn.send_headers(self.stream_id, headers)
            return
        if self.method == b"HEAD" or status in _NO_BODY_STATUSES or head.content_length == 0:
            self._state = _DONE
            self._finish_headers_only(headers)
            return
        if head.chunked:
            self._state = _CHUNKED
            self._decoder = ChunkedDecoder(error_status=502)
        elif head.content_length is not None:
            self._state = _LENGTH
            self._remaining = head.content_length
        else:
            self._state = _UNTIL_CLOSE
        conn.send_headers(self.stream_id, headers)

    def _finish_headers_only(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.owner.conn.send_headers(self.stream_id, headers, end_stream=True)
        self._ending = True
        self._sent_all()

    def _queue_data(self, data: bytes) -> None:
        if data:
            self._queue.append(data)
            self._queued += len(data)
            self.owner.queued_more(len(data))

    def _drop_queue(self) -> None:
        self.stalled_since = 0.0
        self._queue.clear()
        if self._queued:
            self.owner.queued_less(self._queued)
            self._queued = 0

    def _pump(self) -> None:
        """Send what the windows allow; END_STREAM after the last byte of a complete response."""
        owner = self.owner
        if owner.closed:
            return
        if not self.local_done:
            try:
                while self._send_frame():
                    pass
                if self._ending and not self._queue and not self.local_done:
                    owner.conn.end_stream(self.stream_id)
                    self._sent_all()
            except (StreamClosedError, ProtocolError):
                # h2 closed the stream itself (for example after a stream error): it cannot be answered any more.
                self._reset(ErrorCodes.INTERNAL_ERROR, error.ConnectionLost())
                return
            if self._queue and not self.local_done:
                # Bytes wait for the window: the send timeout runs from the last progress.
                if self._progressed or not self.stalled_since:
                    self.stalled_since = owner.clock.seconds()
                    owner.watch_stall(self.stalled_since)
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
        conn = self.owner.conn
        window = conn.local_flow_control_window(self.stream_id)
        if window <= 0:
            return False
        limit = min(window, conn.max_outbound_frame_size)
        chunk = queue[0]
        size = len(chunk)
        if size <= limit:
            queue.popleft()
            self._queued -= size
            self.owner.queued_less(size)
            last = self._ending and not queue
            conn.send_data(self.stream_id, chunk, end_stream=last)
            self._progressed = True
            if last:
                self._sent_all()
                return False
            return True
        view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
        queue[0] = view[limit:]
        self._queued -= limit
        self.owner.queued_less(limit)
        conn.send_data(self.stream_id, view[:limit])
        self._progressed = True
        return True

    def pump_one(self) -> bool:
        """Round-robin step for the connection: one frame, True when this stream could send more."""
        if self.local_done or not self._queue:
            return False
        try:
            more = self._send_frame()
        except (StreamClosedError, ProtocolError):
            self._reset(ErrorCodes.INTERNAL_ERROR, error.ConnectionLost())
            return False
        return more

    def pump(self) -> None:
        """The window opened (or round-robin sending is over): send, end the stream if complete, resume the
        upstream if there is room."""
        self._pump()

    @property
    def waiting(self) -> bool:
        """Response bytes wait for the flow-control window."""
        return bool(self._queue) and not self.local_done

    @property
    def gone(self) -> bool:
        return self._lost

    def _sent_all(self) -> None:
        """END_STREAM is out: the response is complete."""
        self.local_done = True
        owner = self.owner
        if not self.remote_ended and not owner.closed:
            # The client is still sending a body nobody will read: tell it to stop (RFC 9113 section 8.1).
            try:
                owner.conn.reset_stream(self.stream_id, ErrorCodes.NO_ERROR)
            except (StreamClosedError, ProtocolError):
                pass
            self._inbound.clear()
            self._ack()
        if self.disconnecting or self.protocol is None:
            self._schedule_lost(error.ConnectionDone())

    # Ending.

    def _reset(self, code: ErrorCodes, reason: BaseException) -> None:
        """RST_STREAM (if the stream is still ours to end), then connectionLost on a later turn."""
        owner = self.owner
        if not self.local_done:
            self.local_done = True
            self._drop_queue()
            if not owner.closed:
                try:
                    owner.conn.reset_stream(self.stream_id, code)
                except (StreamClosedError, ProtocolError):
                    pass
        self._inbound.clear()
        self._ack()
        owner.flush_soon()
        self._schedule_lost(reason)

    def send_timed_out(self) -> None:
        """Nothing could be sent for the send timeout (a window the client never opens): reset, upstream cancelled."""
        self.stalled_since = 0.0
        self._reset(ErrorCodes.CANCEL, error.ConnectionLost("HTTP/2 stream send timeout"))

    def abandon(self) -> None:
        """The whole connection is going away: no more frames for this stream."""
        self.local_done = True
        self._drop_queue()
        self._inbound.clear()
        self._unacked = 0
        self._schedule_lost(error.ConnectionLost("HTTP/2 connection closed"))

    def reset_by_client(self) -> None:
        self.local_done = True
        self._drop_queue()
        self._inbound.clear()
        self._ack()
        self.connection_lost(error.ConnectionLost("stream reset by the client"))

    def _schedule_lost(self, reason: BaseException) -> None:
        if self._lost_scheduled or self._lost:
            return
        self._lost_scheduled = True
        # A later reactor turn, as for TCP: the protocol may still be inside the call that closed it.
        self.owner.clock.callLater(0, self.connection_lost, reason)

    def connection_lost(self, reason: BaseException) -> None:
        if self._lost:
            return
        self._lost = True
        self._producer = None
        self.owner.stream_gone(self)
        protocol = self.protocol
        if protocol is not None:
            protocol.connectionLost(Failure(reason))


class H2Protocol(Protocol):
    """One HTTP/2 client connection (server side): frames in, per-stream ClientConnections, frames out."""

    log = Logger()
    # A TCP or TLS transport (ITransport, IConsumer, IPushProducer): typed loosely, as in server.py.
    transport: Any

    def __init__(self, gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> None:
        self.gateway = gateway
        self.proto = proto
        self.settings = settings
        self.clock = gateway.clock
        self.conn: H2Connection = H2Connection(
            H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=True,
                # Response fields come out of the strict HTTP/1.1 parser, lower-cased and without connection-specific
                # fields (StreamTransport._start_response): h2 checking them again costs more than the rest.
                validate_outbound_headers=False, normalize_outbound_headers=False,
            )
        )
        self.streams: dict[int, StreamTransport] = {}
        self.peer: Any = None
        self.host: Any = None
        self.closed = False
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
        self._idle_since = 0.0
        self._timer: Any = None

    # Lifecycle.

    def connectionMade(self) -> None:
        transport = self.transport
        self.peer = transport.getPeer()
        self.host = transport.getHost()
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
        conn.decoder.max_header_list_size = settings.max_header_list_size
        conn.initiate_connection()
        # The connection window covers every stream's window: a paused stream holding its window back never
        # stalls the others (nginx does the same).
        extra = settings.max_concurrent_streams * settings.initial_window_size - 65535
        if extra > 0:
            conn.increment_flow_control_window(min(extra, 2**31 - 1 - 65535))
        transport.registerProducer(self, True)
        gateway = self.gateway
        gateway.connections.add(self)  # type: ignore[arg-type]
        self._idle_since = self.clock.seconds()
        self._timer = self.clock.callLater(gateway.settings.head_timeout, self._check_timers)
        self.flush()
        if gateway.draining:
            self.drain()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for stream in list(self.streams.values()):
            stream.connection_lost(error.ConnectionLost("HTTP/2 connection lost"))
        self.gateway.connection_closed(self)  # type: ignore[arg-type]

    def drain(self) -> None:
        """Graceful close: GOAWAY naming the last stream that will be served; close when those are done."""
        if self.closed or self._goaway_last is not None:
            return
        last = self.conn.highest_inbound_stream_id
        self._goaway_last = last
        self.flush()
        # Written by hand: h2's close_connection would forbid answering the streams still in flight.
        self.transport.write(GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
        self._close_if_drained()

    def abort(self) -> None:
        self.closed = True
        self.transport.abortConnection()

    # Reading.

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self._receiving = True
        try:
            self._receive(data)
        finally:
            self._receiving = False
            self.flush()

    def _receive(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as problem:
            # h2 queued a GOAWAY with the right code (ENHANCE_YOUR_CALM for an HPACK bomb).
            self.log.info("HTTP/2 connection from {peer}: {problem}", peer=_describe(self.peer), problem=printable(str(problem)))
            self._shut(None)
            return
        if self._header_block_size() > self.settings.max_header_list_size:
            self._enhance_your_calm("header block (HEADERS + CONTINUATION) too large")
            return
        starting: list[StreamTransport] = []
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.data_received(event.data or b"", event.flow_controlled_length or 0)
                elif event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, RequestReceived):
                stream = self._request(event)
                if stream is not None:
                    starting.append(stream)
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
                if self.closed:
                    return
            elif isinstance(event, RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._pump_all()
            elif isinstance(event, ConnectionTerminated):
                # The client's GOAWAY: h2 will not send anything more on this connection.
                self._shut(None)
                return
        # Streams start after the whole read: one opened and reset in the same read never reaches a backend.
        for stream in starting:
            if not stream.gone and not stream.local_done:
                stream.start()

    def _request(self, event: RequestReceived) -> StreamTransport | None:
        stream_id = event.stream_id
        if self._goaway_last is not None and stream_id > self._goaway_last:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return None
        self.requests += 1
        has_body = event.stream_ended is None
        built = _request_head(event.headers, has_body)
        if isinstance(built, str):
            # A request h2 accepted that HTTP/1.1 cannot carry.
            method = next((value for name, value in event.headers if name == b":method"), b"")
            stream = StreamTransport(self, stream_id, method, b"", False)
            self.streams[stream_id] = stream
            stream.remote_ended = not has_body
            stream.respond_locally(405 if built.startswith("CONNECT") else 400, built)
            return None
        method, head, chunked = built
        stream = StreamTransport(self, stream_id, method, head, chunked)
        self.streams[stream_id] = stream
        return stream

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        # Counted against one budget: the client's resets of streams not yet answered (rapid reset,
        # CVE-2023-44487), and the resets h2 sends for the client's protocol errors on a stream, such as DATA after
        # END_STREAM or a window overflow (MadeYouReset, CVE-2025-8671). Either way a backend may be serving it.
        if not event.remote_reset or (stream is not None and not stream.local_done):
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
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Flush now, unless inside dataReceived (which flushes once at its end)."""
        if not self._receiving and not self.closed:
            self.flush()

    def _pump_all(self) -> None:
        """The connection window opened: streams waiting for it take one frame each, in turn."""
        waiting = [stream for stream in self.streams.values() if stream.waiting]
        while waiting:
            waiting = [stream for stream in waiting if stream.pump_one()]
        for stream in list(self.streams.values()):
            if not stream.local_done:
                stream.pump()

    # IPushProducer, for the client's transport: its buffer is full, so pause every upstream and stop reading.

    def pauseProducing(self) -> None:
        if self.tcp_blocked:
            return
        self.tcp_blocked = True
        now = self._blocked_since = self.clock.seconds()
        timer = self._timer
        delay = self.gateway.settings.send_timeout
        if timer is not None and timer.active() and timer.getTime() > now + delay:
            timer.reset(delay)
        self.transport.pauseProducing()
        for stream in list(self.streams.values()):
            stream.sync_producer()

    def resumeProducing(self) -> None:
        if not self.tcp_blocked:
            return
        self.tcp_blocked = False
        self._blocked_since = 0.0
        if not self.closed:
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

    def stream_gone(self, stream: StreamTransport) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if not self.streams:
            self._idle_since = self.clock.seconds()
            self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self._goaway_last is not None and not self.streams and not self.closed:
            self.closed = True
            self.flush()
            self.transport.loseConnection()

    def _enhance_your_calm(self, reason: str) -> None:
        self.log.warn("HTTP/2 connection from {peer}: {reason}; GOAWAY", peer=_describe(self.peer), reason=reason)
        self._shut(ErrorCodes.ENHANCE_YOUR_CALM)

    def _shut(self, code: ErrorCodes | None) -> None:
        """Close the connection now; GOAWAY with `code` unless h2 already queued one."""
        if self.closed:
            return
        if code is not None:
            try:
                self.conn.close_connection(error_code=code)
            except ProtocolError:
                pass
        self.flush()
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abandon()
        self.transport.loseConnection()

    def watch_stall(self, since: float) -> None:
        """A stream began to wait for its window: make sure the timer looks at it after the send timeout."""
        deadline = since + self.gateway.settings.send_timeout
        timer = self._timer
        if timer is None or not timer.active():
            if not self.closed:
                self._timer = self.clock.callLater(max(deadline - self.clock.seconds(), 0.001), self._check_timers)
        elif timer.getTime() > deadline:
            timer.reset(max(deadline - self.clock.seconds(), 0.001))

    def _check_timers(self) -> None:
        self._timer = None
        if self.closed:
            return
        settings = self.gateway.settings
        now = self.clock.seconds()
        blocked = self._blocked_since
        if blocked and now >= blocked + settings.send_timeout:
            # The client read nothing for that long (nginx send_timeout): every stream goes with the connection.
            self.log.info("HTTP/2 connection from {peer}: send timeout", peer=_describe(self.peer))
            self.closed = True
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
                    else:
                        deadline = min(deadline, stalled + settings.send_timeout)
            self.flush_soon()
        else:
            deadline = self._idle_since + (settings.idle_timeout if self.requests else settings.head_timeout)
            if now >= deadline:
                self._shut(ErrorCodes.NO_ERROR)
                return
            if blocked:
                deadline = min(deadline, blocked + settings.send_timeout)
        self._timer = self.clock.callLater(max(deadline - now, 0.001), self._check_timers)


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '')}" if host is not None else str(address)


def _request_head(headers: list[tuple[bytes, bytes]], has_body: bool) -> tuple[bytes, bytes, bool] | str:
    """The HTTP/1.1 request head for an HTTP/2 request: (method, head, chunked body) or why it cannot be made.

    h2 has already refused malformed blocks (RFC 9113 section 8.2: upper-case names, CR/LF/NUL, connection-specific
    fields, bad pseudo-headers, Host differing from :authority) and joined split cookie fields; the HTTP/1.1
    parser behind applies every other rule (tokens, managed X-Forwarded-* fields, header count, size).
    """
    method = path = authority = b""
    lines: list[bytes] = []
    has_length = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                return "CONNECT with :protocol (RFC 8441) is not supported"
            continue
        if name == b"host":
            if authority:
                continue
            authority = value
            continue
        if name == b"te":
            # Only "trailers" gets past h2, and it means nothing to an HTTP/1.1 upstream.
            continue
        if name == b"content-length":
            has_length = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if method == b"CONNECT":
        return "CONNECT is not supported over HTTP/2"
    # RFC 9113 section 8.3.1: origin form (or "*"), and no userinfo. An absolute :path would re-route the request
    # by its own authority in the HTTP/1.1 parser.
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        return "invalid :path"
    if b"@" in authority:
        return "userinfo in :authority"
    chunked = has_body and not has_length
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%sconnection: close\r\n\r\n" % (method, path, authority, b"".join(lines))
    # Defence in depth: one line per field, whatever a future h2 lets through.
    if head.count(b"\n") != len(lines) + 4 or head.count(b"\r") != len(lines) + 4:
        return "line break in a header field"
    return method, head, chunked


class H2Factory(Factory):
    """A listener that speaks only HTTP/2: cleartext with prior knowledge (``h2c``), tests, benchmarks."""

    noisy = False

    def __init__(self, gateway: Gateway, proto: bytes = b"https", settings: H2Settings = DEFAULT_H2_SETTINGS) -> None:
        self.gateway = gateway
        self.proto = proto
        self.settings = settings

    def buildProtocol(self, addr: Any) -> H2Protocol:
        return H2Protocol(self.gateway, self.proto, self.settings)


class _ALPNSwitch(Protocol):
    """Starts as HTTP/1.1 (so the head timeout runs from the connection's start); on the first bytes, after the
    handshake, hands over to HTTP/2 when ALPN chose h2. Either way the chosen protocol's methods are then bound
    on this object, so later bytes reach it without an extra call."""

    transport: Any

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
        chosen: Protocol = http1
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

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
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
