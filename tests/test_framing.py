"""Message framing (labelgw.http.framing): where a head ends, how long a body is, and the body readers.

Pure: no reactor, no sockets. The chunked reader's syntax cases live in tests/test_parser.py (it is re-exported
there as ChunkedDecoder); its agreement with h11 in tests/test_properties.py.
"""

from __future__ import annotations

import pytest

from labelgw.http.framing import (
    CHUNKED,
    CHUNKED_BODY,
    CLOSE_DELIMITED,
    LAST_CHUNK,
    LENGTH,
    MAX_HEAD_BYTES,
    NO_BODY,
    NONE,
    UNTIL_CLOSE,
    ChunkedReader,
    ContentLengthReader,
    Framing,
    HttpError,
    UntilCloseReader,
    body_reader,
    encode_chunk,
    find_head_end,
    request_framing,
    response_framing,
)
from labelgw.http import parser
from labelgw.http.parser import parse_request_head, parse_response_head

# find_head_end


@pytest.mark.parametrize(
    ("buffer", "end"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 23),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\r\n\r\n", 23),
        (b"\r\n\r\n", 0),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r", -1),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", -1),
        (b"GET / HTTP/1.1\r\nHost: a\r", -1),
        (b"", -1),
        # A bare LF inside a line that does not end the head is the parser's to refuse: no waiting involved.
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 22),
    ],
)
def test_find_head_end(buffer: bytes, end: int) -> None:
    assert find_head_end(buffer) == end


@pytest.mark.parametrize(
    "buffer",
    [b"GET / HTTP/1.1\nHost: a\n\n", b"GET / HTTP/1.1\r\nHost: a\n\n", b"GET / HTTP/1.1\r\nHost: a\r\n\n",
     b"GET / HTTP/1.1\nHost: a\n\r\n", b"\n\n", b"\n\r\n", b"GET / HTTP/1.1\r\n\nrest"],
)
def test_bare_lf_head_end_raises_at_once(buffer: bytes) -> None:
    with pytest.raises(HttpError) as info:
        find_head_end(buffer)
    assert info.value.status == 400
    assert "bare LF" in info.value.reason


def test_cap_counts_the_blank_line() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 100
    exact = head + b"\r\n\r\n"
    assert find_head_end(exact, cap=len(exact)) == len(head)
    with pytest.raises(HttpError) as info:
        find_head_end(exact, cap=len(exact) - 1)
    assert info.value.status == 431


def test_cap_without_an_end_yet() -> None:
    assert find_head_end(b"a" * 100, cap=100) == -1
    with pytest.raises(HttpError) as info:
        find_head_end(b"a" * 101, cap=100)
    assert info.value.status == 431


def test_cap_with_the_end_after_it_in_the_buffer() -> None:
    # The end is there, but past the cap: a head the cap refuses, whatever the buffer size.
    with pytest.raises(HttpError):
        find_head_end(b"a" * 200 + b"\r\n\r\n", cap=100)
    # Body bytes after a small head do not count.
    assert find_head_end(b"a\r\n\r\n" + b"b" * 200, cap=100) == 1


def test_default_cap_is_64_kib() -> None:
    assert MAX_HEAD_BYTES == 64 * 1024
    assert find_head_end(b"a" * (MAX_HEAD_BYTES - 4) + b"\r\n\r\n") == MAX_HEAD_BYTES - 4
    with pytest.raises(HttpError):
        find_head_end(b"a" * (MAX_HEAD_BYTES - 3) + b"\r\n\r\n")


# Framing decisions


def request(fields: bytes = b"", line: bytes = b"POST / HTTP/1.1") -> parser.RequestHead:
    return parse_request_head(line + b"\r\nHost: a" + fields)


def response(fields: bytes = b"", status: bytes = b"200") -> parser.ResponseHead:
    return parse_response_head(b"HTTP/1.1 " + status + b" X" + fields)


@pytest.mark.parametrize(
    ("fields", "framing"),
    [
        (b"", NO_BODY),
        (b"\r\nContent-Length: 0", NO_BODY),
        (b"\r\nContent-Length: 7", Framing(LENGTH, 7)),
        (b"\r\nTransfer-Encoding: chunked", CHUNKED_BODY),
    ],
)
def test_request_framing(fields: bytes, framing: Framing) -> None:
    assert request_framing(request(fields)) == framing


def test_a_request_is_never_close_delimited() -> None:
    assert request_framing(request(line=b"GET / HTTP/1.0")) == NO_BODY


@pytest.mark.parametrize(
    ("status", "fields", "head_only", "framing"),
    [
        (b"200", b"\r\nContent-Length: 5", False, Framing(LENGTH, 5)),
        (b"200", b"\r\nContent-Length: 0", False, NO_BODY),
        (b"200", b"\r\nTransfer-Encoding: chunked", False, CHUNKED_BODY),
        (b"200", b"", False, CLOSE_DELIMITED),
        (b"500", b"", False, CLOSE_DELIMITED),
        (b"205", b"\r\nContent-Length: 3", False, Framing(LENGTH, 3)),
        # Whatever the fields say: no body.
        (b"200", b"\r\nContent-Length: 5", True, NO_BODY),
        (b"200", b"\r\nTransfer-Encoding: chunked", True, NO_BODY),
        (b"200", b"", True, NO_BODY),
        (b"204", b"\r\nContent-Length: 5", False, NO_BODY),
        (b"204", b"", False, NO_BODY),
        (b"304", b"\r\nContent-Length: 5", False, NO_BODY),
        (b"304", b"\r\nTransfer-Encoding: chunked", False, NO_BODY),
        (b"304", b"", False, NO_BODY),
        (b"100", b"", False, NO_BODY),
        (b"101", b"", False, NO_BODY),
        (b"103", b"\r\nContent-Length: 5", False, NO_BODY),
        (b"199", b"", False, NO_BODY),
    ],
)
def test_response_framing(status: bytes, fields: bytes, head_only: bool, framing: Framing) -> None:
    assert response_framing(response(fields, status), head_only) == framing


def test_framing_values() -> None:
    assert NO_BODY == Framing(NONE, 0)
    assert CHUNKED_BODY.kind == CHUNKED and CLOSE_DELIMITED.kind == UNTIL_CLOSE
    assert len({NONE, LENGTH, CHUNKED, UNTIL_CLOSE}) == 4


# Readers


def test_body_reader_kinds() -> None:
    assert body_reader(NO_BODY) is None
    assert isinstance(body_reader(Framing(LENGTH, 3)), ContentLengthReader)
    assert isinstance(body_reader(CHUNKED_BODY), ChunkedReader)
    assert isinstance(body_reader(CLOSE_DELIMITED), UntilCloseReader)


@pytest.mark.parametrize("status", [400, 502])
def test_body_reader_error_status(status: int) -> None:
    for framing in (Framing(LENGTH, 3), CHUNKED_BODY):
        reader = body_reader(framing, status)
        assert reader is not None
        with pytest.raises(HttpError) as info:
            reader.read_eof()
        assert info.value.status == status
    with pytest.raises(HttpError) as chunk_error:
        body_reader(CHUNKED_BODY, status).feed(b"Z\r\n")  # type: ignore[union-attr]
    assert chunk_error.value.status == status


def test_content_length_reader_in_pieces() -> None:
    reader = ContentLengthReader(10)
    assert reader.feed(b"") == []
    assert reader.feed(b"abc") == [b"abc"]
    assert not reader.done and reader.remaining == 7
    assert reader.feed(b"defghij") == [b"defghij"]
    assert reader.done and reader.rest == b"" and reader.remaining == 0
    assert reader.feed(b"more") == []
    reader.read_eof()


def test_content_length_reader_whole_body_is_the_same_bytes() -> None:
    data = b"hello"
    [piece] = ContentLengthReader(5).feed(data)
    assert piece is data  # no copy on the hot path


def test_content_length_reader_rest() -> None:
    reader = ContentLengthReader(3)
    assert reader.feed(b"abcNEXT") == [b"abc"]
    assert reader.done and reader.rest == b"NEXT"


def test_content_length_reader_ends_exactly_at_the_last_byte() -> None:
    reader = ContentLengthReader(2)
    assert reader.feed(b"a") == [b"a"]
    assert not reader.done
    assert reader.feed(b"b") == [b"b"]
    assert reader.done and reader.rest == b""


def test_content_length_reader_of_zero_is_done_at_once() -> None:
    reader = ContentLengthReader(0)
    assert reader.done
    assert reader.feed(b"x") == []
    reader.read_eof()


def test_content_length_reader_eof_before_the_end() -> None:
    reader = ContentLengthReader(5, 502)
    reader.feed(b"abc")
    with pytest.raises(HttpError) as info:
        reader.read_eof()
    assert info.value.status == 502
    assert "2 bytes" in info.value.reason


def test_until_close_reader() -> None:
    reader = UntilCloseReader()
    assert reader.feed(b"") == []
    assert reader.feed(b"abc") == [b"abc"]
    assert not reader.done
    reader.read_eof()
    assert reader.done and reader.rest == b""
    assert reader.feed(b"late") == []


def test_chunked_reader_eof() -> None:
    reader = ChunkedReader(502)
    reader.feed(b"3\r\nabc\r\n")
    with pytest.raises(HttpError) as info:
        reader.read_eof()
    assert info.value.status == 502
    reader.feed(b"0\r\n\r\n")
    reader.read_eof()


def test_chunked_reader_default_status_is_400() -> None:
    with pytest.raises(HttpError) as info:
        ChunkedReader().feed(b"Z\r\n")
    assert info.value.status == 400


def test_chunk_line_exactly_at_the_limit_is_accepted() -> None:
    line = b"3;" + b"e" * (parser.MAX_CHUNK_LINE - 2)
    reader = ChunkedReader()
    assert reader.feed(line + b"\r\nabc\r\n0\r\n\r\n") == [b"abc"]
    assert reader.done
    reader = ChunkedReader()
    for byte in [line[i : i + 1] for i in range(len(line))]:
        reader.feed(byte)
    assert reader.feed(b"\r\nabc\r\n0\r\n\r\n") == [b"abc"]


# Writer


def test_encode_chunk_and_last_chunk() -> None:
    assert encode_chunk(b"abc") == b"3\r\nabc\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_parser_reexports_framing_names() -> None:
    # dp's client side and h2.py import these from parser.py.
    from labelgw.http import framing

    assert parser.ChunkedDecoder is framing.ChunkedReader
    assert parser.HttpError is framing.HttpError
    assert parser.MAX_HEAD_BYTES is framing.MAX_HEAD_BYTES
    assert parser.encode_chunk is framing.encode_chunk and parser.LAST_CHUNK is framing.LAST_CHUNK
