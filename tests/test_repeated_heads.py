"""A keep-alive connection parses a head equal to its last one by copying the last one's parse (the client side's
request heads, the upstream side's response heads): what the exchange and middlewares change on the head they got
never reaches the next request's, and a head that differs by one byte is parsed afresh. A head is kept as bytes when
first parsed, and its parse only when it comes a second time in a row (a head that never repeats costs one store)."""

from __future__ import annotations

from labelgw.http import server as server_module, upstream as upstream_module
from tests.proxyharness import DEFAULT_SPECS, ProxyHarness, get, ok


def _without_ids(head: bytes) -> bytes:
    # Each request gets its own id and trace (labelgw.http.requestid): the rest is the same each time.
    return b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.lower().startswith((b"x-request-id:", b"traceparent:"))
    )


def test_repeated_requests_and_responses_relay_alike_and_are_parsed_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    parsed = {"request": 0, "response": 0}
    request_parser, response_parser = server_module.parse_request_lines, upstream_module.parse_response_lines

    def count_request(data: bytes):  # type: ignore[no-untyped-def]
        parsed["request"] += 1
        return request_parser(data)

    def count_response(data: bytes):  # type: ignore[no-untyped-def]
        parsed["response"] += 1
        return response_parser(data)

    monkeypatch.setattr(server_module, "parse_request_lines", count_request)
    monkeypatch.setattr(upstream_module, "parse_response_lines", count_response)
    harness = ProxyHarness(specs=DEFAULT_SPECS[:1])
    client = harness.connect()
    request = get(b"api.localhost", b"/a/../b")
    client.send(request)
    upstream = harness.upstream().accept()
    first = _without_ids(upstream.transport.value())
    assert first.startswith(b"GET /b HTTP/1.1\r\n")
    upstream.transport.clear()
    upstream.send(ok(b"hello", extra=b"X-One: 1\r\n"))
    answer = client.transport.value()
    for _ in range(3):
        client.transport.clear()
        client.send(request)
        # The same head upstream each time (the target normalised on the copy, not on the template).
        assert _without_ids(upstream.transport.value()) == first
        upstream.transport.clear()
        upstream.send(ok(b"hello", extra=b"X-One: 1\r\n"))
        assert client.transport.value() == answer
    # Parsed when first seen, and when seen again (its parse kept from then on).
    assert parsed == {"request": 2, "response": 2}
    # One byte more: parsed afresh, and answered as such.
    client.transport.clear()
    client.send(get(b"api.localhost", b"/a/../bb"))
    assert b"GET /bb HTTP/1.1\r\n" in upstream.transport.value()
    upstream.transport.clear()
    upstream.send(ok(b"hellos", extra=b"X-One: 1\r\n"))
    assert client.transport.value().endswith(b"Content-Length: 6\r\n\r\nhellos")
    assert parsed == {"request": 3, "response": 3}
    assert harness.connect_count() == 1
