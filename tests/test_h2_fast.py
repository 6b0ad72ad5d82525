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
