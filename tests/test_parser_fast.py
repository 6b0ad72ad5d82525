"""The parser's shortcuts on the hot path give what the plain way gives: heads made without their __init__ set every
slot as __init__ does, the heads handed over with their last CRLF parse as the heads without it, the Host check's
memory of valid values refuses what it refused before, and the X-Request-Id / traceparent count is right."""

from __future__ import annotations

import pytest

from labelgw.http import parser as parser_module
from labelgw.http.framing import HttpError
from labelgw.http.parser import (
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_request_lines,
    parse_response_head,
    parse_response_lines,
)
from labelgw.http.requestid import RequestIds


def _slots(cls: type) -> list[str]:
    return [name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())]


def _state(head: object) -> dict[str, object]:
    return {name: getattr(head, name) for name in _slots(type(head))}


@pytest.mark.parametrize("fast", [True, False])
def test_a_parsed_request_head_sets_every_slot_as_init_does(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    if not fast:
        monkeypatch.setattr(parser_module, "_WELL_FORMED_REQUEST", parser_module.re.compile(b"(?!)"))
    parsed = parse_request_head(b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*")
    made = RequestHead()
    made.method, made.target, made.host = b"GET", b"/x", b"a"
    made.block = made.forward = b"Host: a\r\nAccept: */*\r\n"
    made.id_fields = 0
    assert _state(parsed) == _state(made)


@pytest.mark.parametrize("fast", [True, False])
def test_a_parsed_response_head_sets_every_slot_as_init_does(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    if not fast:
        monkeypatch.setattr(parser_module, "_WELL_FORMED_RESPONSE", parser_module.re.compile(b"(?!)"))
    parsed = parse_response_head(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5 ")
    made = ResponseHead()
    made.status, made.status_line, made.content_length = 200, b"HTTP/1.1 200 OK", 5
    made.block = b"Server: x\r\nContent-Length: 5 \r\n"
    made.forward = b"Server: x\r\n"
    assert _state(parsed) == _state(made)


HEADS = [
    b"GET / HTTP/1.1\r\nHost: a",
    b"POST /p HTTP/1.0\r\nHost: a:80\r\nContent-Length: 3\r\nConnection: keep-alive",
    b"GET http://b/x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4",
    b"GET / HTTP/1.1\r\nHost: a \t\r\nUpgrade: websocket \r\nConnection: Upgrade\t",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",
    b"GET / HTTP/1.1\r\nHost: a:1@evil",
    b"GET / HTTP/1.1\r\nX: y\r\n folded\r\nHost: a",
]


@pytest.mark.parametrize("head", HEADS)
def test_a_head_with_its_crlf_parses_as_without(head: bytes) -> None:
    def reading(parse: object, data: bytes) -> object:
        try:
            return _state(parse(data))  # type: ignore[operator]
        except HttpError as error:
            return (error.status, error.reason)

    assert reading(parse_request_lines, head + b"\r\n") == reading(parse_request_head, head)


def test_response_with_its_crlf_parses_as_without() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\t\r\nConnection: keep-alive"
    assert _state(parse_response_lines(head + b"\r\n")) == _state(parse_response_head(head))


def test_trailing_whitespace_is_cut_from_the_special_values() -> None:
    request = parse_request_head(b"POST / HTTP/1.1\r\nHost: a  \r\nContent-Length: 2 \t\r\nConnection: close ")
    assert (request.host, request.content_length, request.keep_alive) == (b"a", 2, False)
    response = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length:   7 \t\r\nConnection: keep-alive ")
    assert (response.content_length, response.keep_alive, response.forward) == (7, True, b"")
    # A value of whitespace only is empty.
    with pytest.raises(HttpError) as info:
        parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \t ")
    assert "unsupported Transfer-Encoding b''" in info.value.reason


def test_a_host_once_valid_is_remembered_and_an_invalid_one_never() -> None:
    parser_module._VALID_HOSTS.clear()
    for _ in range(2):
        assert parse_request_head(b"GET / HTTP/1.1\r\nHost: api.localhost:8080").host == b"api.localhost:8080"
        with pytest.raises(HttpError) as info:
            parse_request_head(b"GET / HTTP/1.1\r\nHost: api.localhost:1@evil.example")
        assert (info.value.status, info.value.reason) == (400, "invalid Host header")
    assert parser_module._VALID_HOSTS == {b"api.localhost:8080"}


def test_the_memory_of_valid_hosts_is_bounded() -> None:
    parser_module._VALID_HOSTS.clear()
    for index in range(3000):
        parse_request_head(b"GET / HTTP/1.1\r\nHost: h%d" % index)
    assert 0 < len(parser_module._VALID_HOSTS) <= 1024


@pytest.mark.parametrize(
    "fields, count",
    [
        (b"", 0),
        (b"\r\nX-Request-Id: abc", 1),
        (b"\r\nx-request-id: abc\r\nTRACEPARENT: 00-x", 2),
        (b"\r\nX-Note: x-request-id: abc", 0),
        (b"\r\nX_Request_Id: abc", 0),
        (b"\r\nTraceparent: 1\r\nTraceparent: 2", 2),
    ],
)
def test_the_id_fields_are_counted(fields: bytes, count: int) -> None:
    head = parse_request_head(b"GET / HTTP/1.1\r\nHost: a" + fields)
    assert head.id_fields == count
    # Counted, never cut: they go upstream as they came (when valid; labelgw.http.requestid decides).
    assert head.forward == head.block


@pytest.mark.parametrize(
    "fields",
    [b"", b"\r\nX-Request-Id: abc", b"\r\nX-Request-Id: a b", b"\r\ntraceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01",
     b"\r\nX-Note: mentions x-request-id", b"\r\nX-Request-Id: a\r\nX-Request-Id: b"],
)
def test_request_ids_read_the_count_as_they_read_the_block(fields: bytes) -> None:
    counted = parse_request_head(b"GET / HTTP/1.1\r\nHost: a" + fields)
    searched = parse_request_head(b"GET / HTTP/1.1\r\nHost: a" + fields)
    searched.id_fields = -1  # as a head made by HTTP/2: the block is searched
    RequestIds(b"s" * 16).assign(counted)
    RequestIds(b"s" * 16).assign(searched)
    assert (counted.request_id, counted.trace_id, counted.trace_fields, counted.headers) == (
        searched.request_id, searched.trace_id, searched.trace_fields, searched.headers
    )


# A connection keeps its last head as parsed (request_fields, response_fields) and makes a new one from that for an
# equal head (request_from, response_from).


def test_a_request_head_made_from_its_fields_sets_every_slot_as_the_parse_did() -> None:
    for raw in (b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*", b"POST /p HTTP/1.0\r\nHost: a:80\r\nContent-Length: 3",
                b"GET http://b/x HTTP/1.1\r\nHost: a\r\nConnection: x-y\r\nX-Request-Id: r",
                b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nUpgrade: ws\r\nConnection: upgrade"):
        parsed = parse_request_head(raw)
        fields = parser_module.request_fields(parsed)
        assert len(fields) == len(_slots(RequestHead))
        made = parser_module.request_from(fields)
        assert made is not parsed and _state(made) == _state(parsed)
        # What dispatch changes on the head it got does not reach the fields kept.
        made.target, made.request_id = b"/y", b"id"
        assert _state(parser_module.request_from(fields)) == _state(parsed)


def test_a_response_head_made_from_its_fields_sets_every_slot_as_the_parse_did() -> None:
    for raw in (b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5 ", b"HTTP/1.0 204 No\r\nConnection: keep-alive",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close, x-y"):
        parsed = parse_response_head(raw)
        fields = parser_module.response_fields(parsed)
        assert len(fields) == len(_slots(ResponseHead))
        made = parser_module.response_from(fields)
        assert made is not parsed and _state(made) == _state(parsed)
        parsed.headers  # the lazy pairs are the head's own, never kept
        assert parser_module.response_from(parser_module.response_fields(parsed))._headers is None
