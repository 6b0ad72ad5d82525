"""The cheap paths of labelgw.http.h2 (issue 12): repeated request blocks, own response framing, own HPACK."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from labelgw.http.h2 import _KNOWN_HEADS
from tests.proxyharness import ProxyHarness, ok
from test_h2 import SOLO, H2Client, answer, client, h, make_harness  # noqa: F401 (fixtures)


def test_a_repeated_request_block_is_parsed_once_and_each_request_gets_its_own_head(h: ProxyHarness, client: H2Client) -> None:
    first = client.request(b"/same", headers=[(b"user-agent", b"u/1")])
    upstream = answer(h, ok(b"one"))
    client.exchange()
    h.settle()
    second = client.request(b"/same", headers=[(b"user-agent", b"u/1")])
    request = upstream.request()
    assert (request.method, request.target, request.header(b"user-agent")) == (b"GET", b"/same", b"u/1")
    upstream.send(ok(b"two"))
    client.exchange()
    assert [client.streams[s].body for s in (first, second)] == [b"one", b"two"]
    assert len(client.server._known_heads) == 1


def test_the_known_heads_are_bounded(h: ProxyHarness, client: H2Client) -> None:
    upstream = None
    for index in range(_KNOWN_HEADS + 3):
        stream = client.request(b"/n%d" % index)
        if upstream is None:
            upstream = answer(h, ok(b"x"))
            upstream.take()
        else:
            assert upstream.take().startswith(b"GET /n%d HTTP/1.1\r\n" % index)
            upstream.send(ok(b"x"))
        client.exchange()
        h.settle()
        assert client.streams[stream].body == b"x"
        assert len(client.server._known_heads) <= _KNOWN_HEADS


def test_a_malformed_block_after_good_ones_still_ends_the_connection(h: ProxyHarness) -> None:
    client = H2Client(h, validate=False)
    client.request(b"/ok")
    answer(h, ok(b"x"))
    client.exchange()
    client.request(b"/ok", headers=[(b"Upper", b"1")])
    assert client.terminated is not None and client.terminated.error_code == ErrorCodes.PROTOCOL_ERROR


def test_a_response_head_past_the_clients_frame_size_goes_out_in_continuation_frames(h: ProxyHarness, client: H2Client) -> None:
    stream = client.request()
    big = b"v" * 20000
    answer(h, b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nContent-Length: 2\r\n\r\nok")
    client.exchange()
    result = client.streams[stream]
    assert result.status == 200 and result.header(b"x-big") == big and result.body == b"ok"


def test_a_smaller_header_table_from_the_client_is_honoured(h: ProxyHarness, client: H2Client) -> None:
    client.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    client.exchange()
    stream = client.request()
    answer(h, ok(b"x"))
    client.exchange()
    # The client's decoder took the size update that came first in the block (else it ends the connection).
    assert client.streams[stream].status == 200 and client.terminated is None
    assert client.conn.decoder.header_table_size == 0


def test_response_heads_are_encoded_once_and_each_response_gets_its_own(h: ProxyHarness, client: H2Client) -> None:
    from labelgw.http import h2 as h2_module

    h2_module._HEAD_BLOCKS.clear()
    upstream = None
    bodies = []
    for value in (b"a", b"a", b"b", b"a"):
        stream = client.request(b"/same")
        if upstream is None:
            upstream = answer(h, b"HTTP/1.1 200 OK\r\nX-V: " + value + b"\r\nContent-Length: 2\r\n\r\nok")
        else:
            upstream.take()
            upstream.send(b"HTTP/1.1 200 OK\r\nX-V: " + value + b"\r\nContent-Length: 2\r\n\r\nok")
        client.exchange()
        h.settle()
        result = client.streams[stream]
        bodies.append((result.status, result.header(b"x-v"), result.header(b"content-length"), result.body))
    assert bodies == [(200, b"a", b"2", b"ok"), (200, b"a", b"2", b"ok"), (200, b"b", b"2", b"ok"), (200, b"a", b"2", b"ok")]
    # Two distinct heads, two blocks.
    assert len(h2_module._HEAD_BLOCKS) == 2


def test_a_kept_response_head_still_carries_a_size_update_owed_to_the_client(h: ProxyHarness, client: H2Client) -> None:
    first = client.request()
    upstream = answer(h, ok(b"x"))
    client.exchange()
    h.settle()
    client.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    client.exchange()
    second = client.request()
    upstream.take()
    upstream.send(ok(b"x"))
    client.exchange()
    assert [client.streams[s].status for s in (first, second)] == [200, 200] and client.terminated is None
    assert client.conn.decoder.header_table_size == 0


def test_a_known_block_is_decoded_again_once_the_table_changed(h: ProxyHarness) -> None:
    """A request block met before starts its stream without decoding (CachingDecoder.known), but only while the
    decoder's table is unchanged: the same indexed-only bytes name other fields once the table moved."""
    from hpack import Encoder
    from hyperframe.frame import GoAwayFrame, HeadersFrame

    from test_h2_frames import REQUEST

    client = H2Client(h)
    encoder = Encoder()
    first = REQUEST + [(b"x-a", b"1")]  # :authority and x-a enter the table (indices 63 and 62)
    blocks = [encoder.encode(first) for _ in range(3)]
    # The first adds x-a to the table; the next two are indexed only (the same bytes).
    assert blocks[1] == blocks[2] != blocks[0]
    upstream = None
    for index, stream_id in enumerate((1, 3, 5)):
        client.server.dataReceived(HeadersFrame(stream_id, blocks[index], flags=["END_HEADERS", "END_STREAM"]).serialize())
        if upstream is None:
            upstream = h.upstream().accept()
        assert upstream.request().header(b"x-a") == b"1"
        upstream.take()
        upstream.send(ok(b"x"))
        client.raw_frames()
    assert client.server.conn.decoder.known, "the repeated block is known"
    # A new field enters the table at index 62: the old indexed-only bytes now name it instead of x-a.
    client.server.dataReceived(HeadersFrame(7, encoder.encode(REQUEST + [(b"x-b", b"2")]), flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert not client.server.conn.decoder.known
    assert upstream.request().header(b"x-b") == b"2"
    upstream.take()
    upstream.send(ok(b"x"))
    client.raw_frames()
    # Decoded afresh, the old bytes put x-a (now index 63, where :authority was) before :path: a malformed block,
    # the connection ends. (Taken from a stale cache, they would have gone upstream as the first requests did.)
    client.server.dataReceived(HeadersFrame(9, blocks[2], flags=["END_HEADERS", "END_STREAM"]).serialize())
    goaways = [frame for frame in client.raw_frames() if isinstance(frame, GoAwayFrame)]
    assert [frame.error_code for frame in goaways] == [ErrorCodes.PROTOCOL_ERROR]
    assert upstream.take() == b""
    h.settle()


def test_the_h2_internals_kept_streams_use_are_there() -> None:
    """H2Protocol.materialize and the record of closed streams use h2's internals (h2 4.x; tests/test_internals.py
    pins the version): its record of closed streams is an OrderedDict bounded by _size_limit, oldest out first."""
    from collections import OrderedDict

    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.stream import H2Stream, StreamClosedBy

    conn = H2Connection(H2Configuration(client_side=False))
    record = conn._closed_streams
    assert isinstance(record, OrderedDict) and record._size_limit == conn.MAX_CLOSED_STREAMS  # type: ignore[attr-defined]
    small = type(record)(size_limit=2)
    for stream_id in (1, 3, 5):
        small[stream_id] = StreamClosedBy.SEND_END_STREAM
    assert list(small) == [3, 5]
    stream = H2Stream(1, config=conn.config, inbound_window_size=10, outbound_window_size=20)
    machine = stream.state_machine
    for name in ("state", "client", "headers_received", "headers_sent", "stream_closed_by"):
        assert hasattr(machine, name)
    assert stream._expected_content_length is None and stream.max_outbound_frame_size is None
    assert conn.remote_settings.initial_window_size == 65535 and conn.max_outbound_frame_size == 16384
