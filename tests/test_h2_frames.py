"""labelgw's own reading of request HEADERS frames (labelgw.http.h2, H2Protocol._receive_requests; issue 12).

A HEADERS frame that opens a stream with a whole request head is read by labelgw, not by h2's frame buffer. These
tests hold it to what h2 itself does with the same bytes: the same h2 stream state afterwards, the same GOAWAY for
the same client error, and h2 reading everything else (padding, priority, CONTINUATION, DATA, bad stream ids).
"""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import ProtocolError
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from tests.proxyharness import ProxyHarness, ok
from test_h2 import SOLO, H2Client, answer, client, h, make_harness  # noqa: F401 (fixtures)

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", SOLO), (b":path", b"/")]


def _frame_types(data: Any) -> list[int]:
    data = bytes(data)
    kinds = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        kinds.append(frame.type)
        data = data[9 + length :]
    return kinds


def _spy(client: H2Client) -> list[list[int]]:
    """The frame types of every read h2 itself was given from now on."""
    seen: list[list[int]] = []
    conn = client.server.conn
    receive = conn.receive_data

    def spy(data: Any) -> Any:
        seen.append(_frame_types(data))
        return receive(data)

    conn.receive_data = spy  # type: ignore[method-assign]
    return seen


def _reference() -> H2Connection:
    """h2 reading on its own, configured as labelgw's connection is."""
    conn = H2Connection(H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False, normalize_inbound_headers=False,
        validate_outbound_headers=False, normalize_outbound_headers=False,
    ))
    conn.initiate_connection()
    conn.data_to_send()
    conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return conn


def _stream_shape(conn: H2Connection, stream_id: int) -> tuple[Any, ...]:
    stream = conn.streams[stream_id]
    machine = stream.state_machine
    return (
        machine.state, machine.client, machine.headers_received, machine.trailers_received, machine.headers_sent,
        machine.stream_closed_by, stream._expected_content_length, stream._actual_content_length,
        stream.inbound_flow_control_window, stream.outbound_flow_control_window, stream.max_outbound_frame_size,
        conn.highest_inbound_stream_id, conn.state_machine.state, conn.open_inbound_streams,
    )


def _served(client: H2Client, stream_id: int) -> bytes:
    """The response body the server wrote on `stream_id` since the last look (raw frames: the client's h2 did not
    open that stream)."""
    if client.server._flush_call is not None:
        # The reactor turn ends (several streams answered in it: one write at its end).
        client.server.flush()
    return b"".join(frame.data for frame in client.raw_frames() if isinstance(frame, DataFrame) and frame.stream_id == stream_id)


def test_request_headers_frames_are_read_without_h2_and_answered(h: ProxyHarness, client: H2Client) -> None:
    seen = _spy(client)
    upstream = None
    for index in range(3):
        stream = client.request(b"/a%d" % index)
        if upstream is None:
            upstream = answer(h, ok(b"x"))
            upstream.take()
        else:
            assert upstream.take().startswith(b"GET /a%d HTTP/1.1\r\n" % index)
            upstream.send(ok(b"x"))
        client.exchange()
        assert client.streams[stream].body == b"x"
    # h2 read no HEADERS frame (the client's other frames, WINDOW_UPDATE, still go to it).
    assert all(HeadersFrame.type not in kinds for kinds in seen)


def _answer_all(h: ProxyHarness) -> None:
    for upstream in h.new_connects():
        upstream.accept().send(ok(b"x"))
    h.settle()


@pytest.mark.parametrize("end_stream", [True, False])
@pytest.mark.parametrize("extra", [[], [(b"content-length", b"5")]])
def test_h2_stream_state_is_what_h2_would_have_made(h: ProxyHarness, client: H2Client, end_stream: bool, extra: list[Any]) -> None:
    flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
    method = [(b":method", b"POST")] if extra else [(b":method", b"GET")]
    fields = method + REQUEST[1:] + extra
    reference = _reference()
    encoder = Encoder()
    # Stream 1 opens an idle connection, stream 3 an open one (with the first block's fields indexed).
    for stream_id in (1, 3):
        frame = HeadersFrame(stream_id, encoder.encode(fields), flags=flags).serialize()
        reference.receive_data(frame)
        client.server.dataReceived(frame)
        assert _stream_shape(client.server.conn, stream_id) == _stream_shape(reference, stream_id)
    if not end_stream:
        client.server.dataReceived(b"".join(DataFrame(s, b"hello"[: 5 if extra else 0], flags=["END_STREAM"]).serialize() for s in (1, 3)))
    _answer_all(h)
    client.raw_frames()


def test_the_first_request_of_a_connection_is_read_by_labelgw_too(h: ProxyHarness) -> None:
    client = H2Client(h)
    seen = _spy(client)
    stream = client.request()
    answer(h, ok(b"first"))
    client.exchange()
    assert client.streams[stream].body == b"first"
    assert all(HeadersFrame.type not in kinds for kinds in seen)


def test_what_follows_the_requests_in_one_read_goes_to_h2(h: ProxyHarness, client: H2Client) -> None:
    seen = _spy(client)
    block = Encoder().encode([(b":method", b"POST")] + REQUEST[1:] + [(b"content-length", b"5")])
    raw = HeadersFrame(1, block, flags=["END_HEADERS"]).serialize() + DataFrame(1, b"hello", flags=["END_STREAM"]).serialize()
    client.server.dataReceived(raw)
    upstream = h.upstream().accept()
    assert upstream.take().endswith(b"\r\n\r\nhello")
    upstream.send(ok(b"got it"))
    assert _served(client, 1) == b"got it"
    assert seen[0] == [DataFrame.type]


def test_a_frame_split_over_reads_is_read_whole(h: ProxyHarness, client: H2Client) -> None:
    raw = HeadersFrame(1, Encoder().encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
    client.server.dataReceived(raw[:4])
    client.server.dataReceived(raw[4:12])
    client.server.dataReceived(raw[12:])
    upstream = answer(h, ok(b"x"))
    assert upstream.request().target == b"/"
    assert _served(client, 1) == b"x"


def _client_error_code(raw: bytes, h: ProxyHarness) -> Any:
    client = H2Client(h)
    client.send_raw(raw)
    return client.terminated.error_code if client.terminated is not None else None


def _h2_error_code(raw: bytes) -> Any:
    reference = _reference()
    try:
        reference.receive_data(raw)
    except ProtocolError:
        pass
    out = reference.data_to_send()
    kinds = _frame_types(out)
    if 0x7 not in kinds:
        return None
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    events = client.receive_data(out)
    return next(event.error_code for event in events if isinstance(event, ConnectionTerminated))


def _headers(stream_id: int, fields: list[Any] = REQUEST, flags: tuple[str, ...] = ("END_HEADERS", "END_STREAM"), **extra: Any) -> bytes:
    return HeadersFrame(stream_id, Encoder().encode(fields), flags=list(flags), **extra).serialize()


CLIENT_ERRORS = {
    "even stream id": _headers(2),
    "stream id going down": _headers(5) + _headers(3),
    "bad hpack index": HeadersFrame(1, b"\xff\xff\xff\x0f", flags=["END_HEADERS", "END_STREAM"]).serialize(),
    "content-length not digits": _headers(1, REQUEST + [(b"content-length", b"x5")]),
    "frame over the size limit": HeadersFrame(
        1, Encoder().encode(REQUEST + [(b"x-a", b"v" * 17000)], huffman=False), flags=["END_HEADERS", "END_STREAM"]
    ).serialize(),
    "continuation of nothing": _headers(1, flags=("END_STREAM",)) + ContinuationFrame(3, b"", flags=["END_HEADERS"]).serialize(),
}


@pytest.mark.parametrize("case", sorted(CLIENT_ERRORS))
def test_a_client_error_ends_the_connection_as_h2_ends_it(h: ProxyHarness, case: str) -> None:
    raw = CLIENT_ERRORS[case]
    expected = _h2_error_code(raw)
    assert expected is not None, "h2 itself refuses it"
    assert _client_error_code(raw, h) == expected
    # Streams start after the whole read: none of the read's requests reached a backend.
    assert h.connect_count() == 0
    h.settle()


@pytest.mark.parametrize("shape", ["padded", "priority", "continuation"])
def test_frames_labelgw_leaves_to_h2_are_still_served(h: ProxyHarness, client: H2Client, shape: str) -> None:
    seen = _spy(client)
    block = Encoder().encode(REQUEST)
    if shape == "padded":
        raw = HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM", "PADDED"], pad_length=7).serialize()
    elif shape == "priority":
        raw = HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=0, stream_weight=15).serialize()
    else:
        raw = HeadersFrame(1, block[:3], flags=["END_STREAM"]).serialize() + ContinuationFrame(1, block[3:], flags=["END_HEADERS"]).serialize()
    client.server.dataReceived(raw)
    answer(h, ok(b"served"))
    assert _served(client, 1) == b"served"
    assert HeadersFrame.type in seen[0]


def test_the_concurrency_limit_is_h2s_check(h: ProxyHarness) -> None:
    from labelgw.http.h2 import H2Settings

    client = H2Client(h, H2Settings(max_concurrent_streams=2))
    seen = _spy(client)
    client.send_raw(_headers(1) + _headers(3) + _headers(5))
    # The third went to h2, which refused it as before (tests/test_h2.py's limit test: GOAWAY PROTOCOL_ERROR).
    assert seen and HeadersFrame.type in seen[0]
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.connect_count() == 0


def test_the_h2_internals_the_reader_uses_are_there() -> None:
    """H2Protocol._receive_requests reads h2's frame buffer state and makes h2's streams itself: the names it uses
    (h2 4.x; tests/test_internals.py pins the version) exist and mean what it assumes."""
    from h2.connection import _decode_headers
    from h2.stream import H2Stream

    conn = _reference()
    buffered = conn.incoming_buffer
    assert buffered._preamble_len == 0 and not buffered._data and buffered._headers_buffer == []
    conn.receive_data(_headers(1)[:5])
    assert bytes(buffered._data) == _headers(1)[:5]
    assert conn._open_streams(1) == 0 and conn.highest_inbound_stream_id == 0
    assert callable(_decode_headers) and callable(conn._terminate_connection)
    stream = H2Stream(1, config=conn.config, inbound_window_size=10, outbound_window_size=20)
    assert (stream.inbound_flow_control_window, stream.outbound_flow_control_window) == (10, 20)
    assert callable(stream._initialize_content_length)


def test_a_read_given_as_a_bytearray_or_memoryview_is_read_alike(h: ProxyHarness, client: H2Client) -> None:
    encoder = Encoder()
    client.server.dataReceived(bytearray(HeadersFrame(1, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()))
    upstream = answer(h, ok(b"one"))
    assert _served(client, 1) == b"one"
    client.server.dataReceived(memoryview(HeadersFrame(3, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()))
    upstream.take()
    upstream.send(ok(b"two"))
    assert _served(client, 3) == b"two"


# Whole requests (HEADERS with END_STREAM) whose block was met before: h2's stream is kept as plain fields on
# labelgw's stream (H2Protocol._lazy) until h2 needs it, then made as h2 would hold it (H2Protocol.materialize).

_BODY = b"x"


def _lazy_setup(h: ProxyHarness, client: H2Client) -> tuple[H2Connection, Encoder, list[Any]]:
    """Streams 1, 3 and 5 with one block (h2's encoder: the second and third are indexed only), sent alike to
    labelgw and to h2 reading on its own; stream 5 is the first one labelgw keeps as fields. Their upstreams
    accepted, not answered."""
    reference = _reference()
    encoder = Encoder()
    for stream_id in (1, 3, 5):
        frame = HeadersFrame(stream_id, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
        reference.receive_data(frame)
        client.server.dataReceived(frame)
    assert list(client.server._lazy) == [5] and 5 not in client.server.conn.streams
    upstreams = [upstream.accept() for upstream in h.new_connects()]
    assert len(upstreams) == 3
    return reference, encoder, upstreams


def _finish(h: ProxyHarness, upstreams: list[Any]) -> None:
    """Answer whatever request an upstream still holds (stream 7 went to a pooled connection)."""
    for upstream in upstreams:
        if upstream.take() and upstream.transport.connected:
            upstream.send(ok(_BODY))
    _answer_all(h)


def _answer_like_labelgw(reference: H2Connection, stream_id: int) -> None:
    reference.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(_BODY))])
    reference.send_data(stream_id, _BODY, end_stream=True)


def _outcome(data: Any) -> list[tuple[int, int, int]]:
    """The RST_STREAM and GOAWAY frames in `data`: (type, stream id, error code)."""
    data = bytes(data)
    found = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        if frame.type == 0x3:
            found.append((frame.type, frame.stream_id, int(frame.error_code)))
        elif frame.type == 0x7:
            found.append((frame.type, frame.last_stream_id, int(frame.error_code)))
        data = data[9 + length :]
    return found


def test_a_stream_kept_as_fields_is_made_as_h2_would_hold_it(h: ProxyHarness, client: H2Client) -> None:
    reference, _, upstreams = _lazy_setup(h, client)
    server = client.server
    # Half-closed (remote), before the response.
    server.materialize()
    for stream_id in (1, 3, 5):
        assert _stream_shape(server.conn, stream_id) == _stream_shape(reference, stream_id)
    # Made by h2's rules from now on: answered as any stream.
    for upstream in upstreams:
        upstream.take()
        upstream.send(ok(_BODY))
    assert _served(client, 5) == _BODY


@pytest.mark.parametrize("then", ["nothing", "another stream"])
def test_a_stream_kept_as_fields_is_closed_as_h2_would_close_it(h: ProxyHarness, client: H2Client, then: str) -> None:
    reference, encoder, upstreams = _lazy_setup(h, client)
    server = client.server
    for upstream, stream_id in zip(upstreams, (1, 3, 5)):
        upstream.take()
        upstream.send(ok(_BODY))
        _answer_like_labelgw(reference, stream_id)
    assert _served(client, 5) == _BODY
    assert not server._lazy and [s.stream_id for s in server._closed_lately] == [5]
    if then == "another stream":
        frame = HeadersFrame(7, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
        reference.receive_data(frame)
        server.dataReceived(frame)
        assert list(server._lazy) == [7] and not server._closed_lately
        # h2 moved its closed streams to its record when stream 7 opened; labelgw did the same with stream 5.
        assert reference._closed_streams == server.conn._closed_streams
    else:
        server.materialize()
        assert _stream_shape(server.conn, 5) == _stream_shape(reference, 5)
    server.materialize()
    assert set(server.conn.streams) == set(reference.streams)
    for stream_id in reference.streams:
        assert _stream_shape(server.conn, stream_id) == _stream_shape(reference, stream_id)
    _finish(h, upstreams)


LATE_FRAMES = {
    "window update": lambda: WindowUpdateFrame(5, window_increment=100).serialize(),
    "reset": lambda: RstStreamFrame(5, error_code=8).serialize(),
    "data": lambda: DataFrame(5, b"late", flags=["END_STREAM"]).serialize(),
    "headers again": lambda: HeadersFrame(5, Encoder().encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize(),
}


@pytest.mark.parametrize("then", ["nothing", "another stream"])
@pytest.mark.parametrize("late", sorted(LATE_FRAMES))
def test_frames_on_a_closed_stream_kept_as_fields_get_h2s_answer(h: ProxyHarness, client: H2Client, late: str, then: str) -> None:
    """RFC 9113 section 5.1: what a client sends on a stream after its END_STREAM went out; h2's answer (ignore,
    RST_STREAM or GOAWAY, and which code) whether h2 still held the closed stream or had moved it to its record."""
    reference, encoder, upstreams = _lazy_setup(h, client)
    server = client.server
    for upstream, stream_id in zip(upstreams, (1, 3, 5)):
        upstream.take()
        upstream.send(ok(_BODY))
        _answer_like_labelgw(reference, stream_id)
    reference.data_to_send()
    client.raw_frames()
    raw = b""
    if then == "another stream":
        raw = HeadersFrame(7, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
    raw += LATE_FRAMES[late]()
    try:
        reference.receive_data(raw)
    except ProtocolError:
        pass
    expected = _outcome(reference.data_to_send())
    server.dataReceived(raw)
    assert _outcome(client.transport.value()) == expected
    client.transport.clear()
    _finish(h, upstreams)


def test_the_concurrency_limit_counts_the_streams_kept_as_fields(h: ProxyHarness) -> None:
    from labelgw.http.h2 import H2Settings

    client = H2Client(h, H2Settings(max_concurrent_streams=3))
    encoder = Encoder()
    frames = [HeadersFrame(s, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize() for s in (1, 3, 5, 7)]
    client.server.dataReceived(frames[0] + frames[1] + frames[2])
    assert list(client.server._lazy) == [5]
    seen = _spy(client)
    client.send_raw(frames[3])
    # Over the limit: h2 read it (with every stream made first) and refused it as before.
    assert seen and HeadersFrame.type in seen[0]
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    h.settle()


def test_a_smaller_window_from_the_client_reaches_a_stream_kept_as_fields(h: ProxyHarness, client: H2Client) -> None:
    from h2.settings import SettingCodes

    for index in range(2):
        stream = client.request(b"/w")
        if index == 0:
            upstream = answer(h, ok(b"first"))
        else:
            upstream.take()
            upstream.send(ok(b"second"))
        client.exchange()
        assert client.streams[stream].body == (b"first", b"second")[index]
    # The third is kept as fields; then the client's window shrinks to 3 bytes before the response.
    stream = client.request(b"/w")
    assert stream in client.server._lazy
    client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 3})
    client.exchange()
    upstream.take()
    upstream.send(ok(b"0123456789"))
    client.exchange()
    result = client.streams[stream]
    # Sent within the windows (3 bytes, then as the client's h2 acknowledges): whole, in order.
    assert result.body == b"0123456789" and result.ended


def test_a_client_reset_of_a_stream_kept_as_fields_cancels_its_upstream(h: ProxyHarness, client: H2Client) -> None:
    for index in range(2):
        stream = client.request(b"/r")
        if index == 0:
            upstream = answer(h, ok(b"x"))
        else:
            upstream.take()
            upstream.send(ok(b"x"))
        client.exchange()
    stream = client.request(b"/r")
    assert stream in client.server._lazy
    assert upstream.take().startswith(b"GET /r ")
    client.reset(stream)
    assert stream not in client.server.streams
    # The upstream request was cancelled with it (its connection is not reused mid-response).
    assert upstream.transport.disconnecting
    h.settle()
