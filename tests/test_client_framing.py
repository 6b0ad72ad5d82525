"""The HTTP/1.1 client side reads request heads and bodies through labelgw.http.framing (issue 8): the framing
decision and the head-end search are written once, and the common request without a body makes no reader."""

from __future__ import annotations

import pytest

from labelgw.http import framing
from labelgw.http.framing import MAX_HEAD_BYTES, BodyReader, ChunkedReader, ContentLengthReader
from labelgw.http.parser import RequestHead
from tests.proxyharness import ProxyHarness, decode_chunked, get, ok

SOLO = b"solo.localhost"


@pytest.fixture
def h() -> ProxyHarness:
    return ProxyHarness()


def test_a_get_without_a_body_makes_no_reader(h: ProxyHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    from labelgw.http import server

    decided: list[object] = []

    def spy(head: RequestHead, error_status: int = 400) -> BodyReader | None:
        reader = framing.request_reader(head, error_status)
        decided.append(reader)
        return reader

    monkeypatch.setattr(server, "request_reader", spy)
    client = h.connect()
    client.send(get(SOLO))
    assert decided == [None] and client.protocol._reader is None
    upstream = h.upstream().accept()
    upstream.send(ok())
    assert client.response().body == b"hello"
    h.assert_accounting()


def test_a_content_length_body_is_read_by_the_framing_reader(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 10\r\n\r\nhello")
    reader = client.protocol._reader
    assert isinstance(reader, ContentLengthReader) and reader.remaining == 5
    upstream = h.upstream().accept()
    # The rest of the body, and a pipelined request after it: the reader hands back what follows.
    client.send(b"world" + get(SOLO))
    assert client.protocol._reader is None
    assert upstream.request().rest == b"helloworld"
    upstream.send(ok(b"one"))
    upstream.send(ok(b"two"))
    assert [r.body for r in client.responses()] == [b"one", b"two"]
    h.assert_accounting()


def test_a_chunked_body_is_read_by_the_framing_reader(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    assert isinstance(client.protocol._reader, ChunkedReader)
    upstream = h.upstream().accept()
    client.send(b"lo\r\n0\r\n\r\n")
    assert client.protocol._reader is None
    body, rest, complete = decode_chunked(upstream.received().split(b"\r\n\r\n", 1)[1])
    assert (body, rest, complete) == (b"hello", b"", True)
    upstream.send(ok())
    assert client.response().status == 200
    h.assert_accounting()


def test_a_bad_chunk_is_refused_with_the_readers_status(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.upstream().accept()
    client.send(b"zz\r\n")
    assert client.response().status == 400
    h.assert_accounting()


def test_the_head_end_search_is_framings(h: ProxyHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    from labelgw.http import server

    calls: list[int] = []

    def spy(buffer: bytes, cap: int = MAX_HEAD_BYTES) -> int:
        calls.append(len(buffer))
        return framing.find_head_end(buffer, cap)

    monkeypatch.setattr(server, "find_head_end", spy)
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo")
    client.send(b".localhost\r\n\r\n")
    assert calls == [26, 40]
    h.upstream().accept().send(ok())
    assert client.response().status == 200
    h.assert_accounting()


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_labelgws_own_answer_has_a_body_except_to_head(h: ProxyHarness, method: bytes) -> None:
    client = h.connect()
    client.send(get(b"nowhere.localhost", method=method))
    response = client.response(head_only=method == b"HEAD")
    assert response.status == 404
    assert int(response.header(b"content-length") or b"0") > 0
    assert (response.body != b"") is (method == b"GET")
