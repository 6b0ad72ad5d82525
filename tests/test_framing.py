"""Message framing (labelgw.http.framing): where a head ends, how long a body is, and the body readers.

Pure: no reactor, no sockets. The chunked reader's syntax cases live in tests/test_parser.py (it is re-exported
there as ChunkedDecoder); its agreement with h11 in tests/test_properties.py.
"""

from __future__ import annotations

import pytest

from labelgw.http.framing import (
    CHUNKED,
    LAST_CHUNK,
    LENGTH,
    MAX_HEAD_BYTES,
    UNTIL_CLOSE,
    BodyReader,
    ChunkedReader,
    ContentLengthReader,
    HttpError,
    UntilCloseReader,
    encode_chunk,
    find_head_end,
    request_reader,
    response_has_body,
    response_reader,
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


def framing(reader: BodyReader | None) -> tuple[str, int] | None:
    """A reader as (kind, length): None for no body."""
    if reader is None:
        return None
    return (reader.kind, reader.length if isinstance(reader, ContentLengthReader) else 0)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (b"", None),
        (b"\r\nContent-Length: 0", None),
        (b"\r\nContent-Length: 7", (LENGTH, 7)),
        (b"\r\nTransfer-Encoding: chunked", (CHUNKED, 0)),
    ],
)
def test_request_reader(fields: bytes, expected: tuple[str, int] | None) -> None:
    assert framing(request_reader(request(fields))) == expected


def test_a_request_is_never_close_delimited() -> None:
    assert request_reader(request(line=b"GET / HTTP/1.0")) is None


@pytest.mark.parametrize(
    ("status", "fields", "head_only", "expected"),
    [
        (b"200", b"\r\nContent-Length: 5", False, (LENGTH, 5)),
        (b"200", b"\r\nContent-Length: 0", False, None),
        (b"200", b"\r\nTransfer-Encoding: chunked", False, (CHUNKED, 0)),
        (b"200", b"", False, (UNTIL_CLOSE, 0)),
        (b"500", b"", False, (UNTIL_CLOSE, 0)),
        (b"205", b"\r\nContent-Length: 3", False, (LENGTH, 3)),
        # Whatever the fields say: no body.
        (b"200", b"\r\nContent-Length: 5", True, None),
        (b"200", b"\r\nTransfer-Encoding: chunked", True, None),
        (b"200", b"", True, None),
        (b"204", b"\r\nContent-Length: 5", False, None),
        (b"204", b"", False, None),
        (b"304", b"\r\nContent-Length: 5", False, None),
        (b"304", b"\r\nTransfer-Encoding: chunked", False, None),
        (b"304", b"", False, None),
        (b"100", b"", False, None),
        (b"101", b"", False, None),
        (b"103", b"\r\nContent-Length: 5", False, None),
        (b"199", b"", False, None),
    ],
)
def test_response_reader(status: bytes, fields: bytes, head_only: bool, expected: tuple[str, int] | None) -> None:
    assert framing(response_reader(response(fields, status), head_only)) == expected


@pytest.mark.parametrize(
    ("status", "head_only", "expected"),
    [
        (200, False, True),
        (205, False, True),
        (404, False, True),
        (502, False, True),
        (200, True, False),
        (404, True, False),
        (100, False, False),
        (101, False, False),
        (103, False, False),
        (204, False, False),
        (304, False, False),
    ],
)
def test_response_has_body(status: int, head_only: bool, expected: bool) -> None:
    # The one "no body" rule: the response reader, the exchange (HTTP/1.1 and HTTP/2) and labelgw's own answers ask it.
    assert response_has_body(status, head_only) is expected


def test_response_reader_agrees_with_response_has_body() -> None:
    for status in (100, 101, 103, 200, 204, 205, 304, 404, 500):
        for head_only in (False, True):
            reader = response_reader(response(b"\r\nContent-Length: 5", b"%d" % status), head_only)
            assert (reader is not None) is response_has_body(status, head_only)


def test_kinds_are_distinct() -> None:
    assert len({LENGTH, CHUNKED, UNTIL_CLOSE}) == 3
    assert ContentLengthReader.kind == LENGTH and ChunkedReader.kind == CHUNKED
    assert UntilCloseReader.kind == UNTIL_CLOSE


@pytest.mark.parametrize("status", [400, 502])
def test_reader_error_status(status: int) -> None:
    for reader in (ContentLengthReader(3, status), ChunkedReader(status)):
        with pytest.raises(HttpError) as info:
            reader.read_eof()
        assert info.value.status == status
    with pytest.raises(HttpError) as chunk_error:
        ChunkedReader(status).feed(b"Z\r\n")
    assert chunk_error.value.status == status


def test_default_error_status_by_direction() -> None:
    chunked = b"\r\nTransfer-Encoding: chunked"
    for reader, status in (
        (request_reader(request(chunked)), 400),
        (response_reader(response(chunked), False), 502),
        (request_reader(request(b"\r\nContent-Length: 3")), 400),
        (response_reader(response(b"\r\nContent-Length: 3"), False), 502),
    ):
        assert reader is not None
        with pytest.raises(HttpError) as info:
            reader.read_eof()
        assert info.value.status == status
    given = response_reader(response(b"\r\nContent-Length: 3"), False, 400)
    assert given is not None
    with pytest.raises(HttpError) as info:
        given.read_eof()
    assert info.value.status == 400


def test_content_length_reader_in_pieces() -> None:
    reader = ContentLengthReader(10)
    assert reader.feed(b"") == []
    assert reader.feed(b"abc") == [b"abc"]
    assert not reader.done and reader.remaining == 7
    assert reader.feed(b"defghij") == [b"defghij"]
    assert reader.done and reader.rest == b"" and reader.remaining == 0
    assert reader.feed(b"more") == []
    assert reader.rest == b"" and reader.done
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


def test_limits() -> None:
    # The limits themselves (a head's size and field count, a chunk line's length and digits): tests elsewhere
    # derive their cases from these.
    from labelgw.http import framing

    assert framing.MAX_HEAD_BYTES == 65536
    assert framing.MAX_HEADERS == 100
    assert framing.MAX_CHUNK_LINE == 4096
    assert framing.MAX_CHUNK_SIZE_DIGITS == 15
    assert framing.MAX_CHUNK_SIZE_WIDTH == 20


def test_content_length_reader_default_error_status_is_400() -> None:
    reader = ContentLengthReader(3)
    with pytest.raises(HttpError) as info:
        reader.read_eof()
    assert info.value.status == 400


@pytest.mark.parametrize("byte", [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
def test_control_bytes_in_a_trailer_value_are_refused(byte: int) -> None:
    with pytest.raises(HttpError):
        ChunkedReader().feed(b"0\r\nX-T: a" + bytes([byte]) + b"b\r\n\r\n")


@pytest.mark.parametrize("value", [b"a\tb", b"a b", b"\x80\xff", b"~!", b""])
def test_trailer_values_that_are_allowed(value: bytes) -> None:
    reader = ChunkedReader()
    reader.feed(b"0\r\nX-T: " + value + b"\r\n\r\n")
    assert reader.done
