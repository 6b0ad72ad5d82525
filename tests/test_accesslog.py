"""The access log (labelgw.http.accesslog): every field of both formats, a line for every request (proxied,
answered by labelgw itself, HTTP/2), batching per reactor turn, the dropped-lines counter, the writer thread and
reopening; --debug-headers; the settings. Deterministic: the harness's MemoryReactorClock, memory sinks."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from twisted.logger import Logger

from labelgw.cli import config
from labelgw.cli.tap import Options
from labelgw.http.accesslog import BATCH_PIECES, FLUSH_DELAY, AccessLog, ThreadWriter, _quoted
from labelgw.http.requestid import RequestIds
from labelgw.http.settings import ProxySettings
from labelgw.tls.https import HttpsRedirect
from proxyharness import START_TIME, ProxyHarness, get, ok
from test_h2 import H2Client, StreamResult

TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class ListSink:
    """What the writer thread would take; `accept=False`: a destination that cannot keep up."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.batches: list[bytes] = []
        self.pending = 0
        self.closed = False

    def put(self, data: bytes) -> bool:
        if self.accept:
            self.batches.append(data)
        return self.accept

    def reopen(self) -> None:
        self.batches.append(b"<reopen>\n")

    def close(self, timeout: float) -> None:
        self.closed = True

    def lines(self) -> list[str]:
        return b"".join(self.batches).decode().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


def harness(format: str = "json", **settings: Any) -> tuple[ProxyHarness, ListSink]:
    h = ProxyHarness(ProxySettings(**settings) if settings else None)
    h.gateway.request_ids = RequestIds(bytes(range(16)))
    sink = ListSink()
    h.gateway.access_log = AccessLog(h.reactor, format, sink)
    return h, sink


def settle(h: ProxyHarness) -> None:
    """What is due now, then the batch's hand-over."""
    h.settle()
    h.advance(FLUSH_DELAY)


def one(h: ProxyHarness, sink: ListSink) -> dict[str, Any]:
    settle(h)
    records = sink.records()
    assert len(records) == 1, records
    return records[0]


# --- the fields ---------------------------------------------------------------------------------------------------


def test_a_proxied_request_has_every_field_in_json() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(b"POST /up?x=1 HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 4\r\n\r\nbody")
    upstream = h.upstream().accept()
    h.advance(0.0125)
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhel")
    h.advance(0.0005)
    upstream.send(b"lo!")
    assert client.response().status == 200
    record = one(h, sink)
    request_id = record.pop("request_id")
    assert re.fullmatch("[0-9a-f]{32}", request_id)
    assert record == {
        # START_TIME + 0.013 s, in UTC with milliseconds.
        "time": "1970-01-12T13:46:40.013Z",
        "client": "10.0.0.9",
        "method": "POST",
        "path": "/up?x=1",
        "protocol": "HTTP/1.1",
        "tls": False,
        "host": "solo.localhost",
        "status": 200,
        "bytes_in": 4,
        "bytes_out": 6,
        "duration_ms": 13.0,
        "upstream_ms": 12.5,
        "route": "solo.localhost/",
        "service": "solo",
        "version": None,
        "backend": "127.0.0.1:9401",
        "retries": 0,
        # No traceparent from the client: the trace labelgw starts carries the request id as its trace id.
        "trace_id": request_id,
    }
    # The same ids reached the backend.
    request = upstream.request()
    assert request.header(b"x-request-id") == request_id.encode()
    assert request.header(b"traceparent").split(b"-")[1] == request_id.encode()


def test_the_common_format_line() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(get(b"solo.localhost", b'/a"b\\c'))
    upstream = h.upstream().accept()
    h.advance(0.002)
    upstream.send(ok(b"hello"))
    client.response()
    settle(h)
    # CLF, then the service and the time to the upstream's response head in ms; client text escaped as nginx does.
    assert sink.lines() == [
        '10.0.0.9 - - [12/Jan/1970:13:46:40 +0000] "GET /a\\x22b\\x5Cc HTTP/1.1" 200 5 "solo" 2.000 '
        "00010203040506071000000000000001"
    ]


def test_the_common_format_line_of_a_plain_request_and_a_client_request_id() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(get(b"solo.localhost", b"/plain?q=1", extra=b"X-Request-Id: abc-1\r\n"))
    upstream = h.upstream().accept()
    h.advance(0.0015)
    upstream.send(ok(b"hello"))
    client.response()
    settle(h)
    assert sink.lines() == [
        '10.0.0.9 - - [12/Jan/1970:13:46:40 +0000] "GET /plain?q=1 HTTP/1.1" 200 5 "solo" 1.500 abc-1'
    ]


def test_the_clf_time_follows_the_clock_second_by_second() -> None:
    h, sink = harness("common")
    client = h.connect()
    for _ in range(2):
        client.send(get(b"nope.localhost"))
        h.advance(1.0)
    assert [line.split("[")[1].split("]")[0] for line in sink.lines()] == [
        "12/Jan/1970:13:46:40 +0000", "12/Jan/1970:13:46:41 +0000",
    ]


def test_client_ids_and_trace_are_logged_and_kept() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"solo.localhost", extra=b"X-Request-Id: client-id-1\r\ntraceparent: " + TRACE + b"\r\n"))
    upstream = h.upstream().accept()
    upstream.send(ok())
    record = one(h, sink)
    assert (record["request_id"], record["trace_id"]) == ("client-id-1", "0af7651916cd43dd8448eb211c80319c")
    request = upstream.request()
    assert request.all(b"x-request-id") == [b"client-id-1"]
    assert request.all(b"traceparent") == [TRACE]


def test_a_retry_is_counted_and_the_backend_is_the_one_that_answered() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"api.localhost"))
    first = h.upstream()
    first.refuse()
    second = h.upstream().accept()
    second.send(ok())
    assert client.response().status == 200
    record = one(h, sink)
    assert record["retries"] == 1
    assert record["backend"] == f"127.0.0.1:{second.port}" != f"127.0.0.1:{first.port}"


def test_a_streamed_response_counts_every_body_byte() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"solo.localhost"))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    upstream.send(b"3\r\nabc\r\n0\r\n\r\n")
    assert client.response().status == 200
    assert one(h, sink)["bytes_out"] == 8


# --- answers of labelgw's own -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (get(b"nope.localhost"), 404, "no route for host 'nope.localhost'"),
        (get(b"down.localhost"), 503, "service 'down' has no ready backend"),
        (get(b"solo.localhost", b"/../x"), 400, None),
    ],
)
def test_answers_without_an_exchange_are_logged(request_bytes: bytes, status: int, message: str | None) -> None:
    h, sink = harness()
    client = h.connect()
    client.send(request_bytes)
    response = client.response()
    assert response.status == status
    record = one(h, sink)
    assert record["status"] == status
    assert record["bytes_out"] == len(response.body)
    assert (record["service"], record["backend"], record["upstream_ms"]) == (None, None, None)
    assert re.fullmatch("[0-9a-f]{32}", record["request_id"])


def test_a_redirect_to_https_is_logged() -> None:
    h, sink = harness("common")
    h.gateway.https_redirect = HttpsRedirect(True, lambda: 8443)
    client = h.connect()
    client.send(get(b"solo.localhost", b"/x"))
    assert client.response().status == 308
    settle(h)
    assert sink.lines() == [
        '10.0.0.9 - - [12/Jan/1970:13:46:40 +0000] "GET /x HTTP/1.1" 308 19 "-" - 00010203040506071000000000000001'
    ]


def test_a_failed_connection_is_a_502_line_with_the_backend_tried() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"solo.localhost"))
    h.upstream().refuse()
    response = client.response()
    assert response.status == 502
    record = one(h, sink)
    assert (record["status"], record["service"], record["backend"]) == (502, "solo", "127.0.0.1:9401")
    assert record["bytes_out"] == len(response.body)
    assert record["upstream_ms"] is None


def test_a_response_timeout_is_a_504_line() -> None:
    h, sink = harness(response_timeout=3.0)
    client = h.connect()
    client.send(get(b"solo.localhost"))
    h.upstream().accept()
    h.advance(3.5)
    assert client.response().status == 504
    record = one(h, sink)
    assert record["status"] == 504
    assert 3000.0 <= record["duration_ms"] <= 3500.0


def test_a_client_that_went_away_is_a_499_line() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"solo.localhost"))
    h.upstream().accept()
    h.advance(0.25)
    client.close()
    record = one(h, sink)
    assert (record["status"], record["duration_ms"]) == (499, 250.0)


def test_pipelined_requests_are_logged_in_order() -> None:
    h, sink = harness()
    client = h.connect()
    client.send(get(b"solo.localhost", b"/1") + get(b"solo.localhost", b"/2"))
    upstream = h.upstream().accept()
    upstream.send(ok())
    upstream.send(ok())
    settle(h)
    assert [r["path"] for r in sink.records()] == ["/1", "/2"]


# --- HTTP/2 ---------------------------------------------------------------------------------------------------------


def test_http2_streams_are_logged_as_http2_over_tls() -> None:
    h, sink = harness()
    client = H2Client(h)
    client.request(b"/h2")
    upstream = h.upstream().accept()
    upstream.send(ok(b"hi"))
    client.exchange()
    client.request(b"/", authority=b"nope.localhost")
    # Refused before dispatch (no request head): method and status only.
    stream_id = client.conn.get_next_available_stream_id()
    client.streams[stream_id] = StreamResult()
    client.conn.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"solo.localhost:443")])
    client.exchange()
    settle(h)
    records = sink.records()
    assert [(r["protocol"], r["tls"], r["status"], r["method"], r["path"]) for r in records] == [
        ("HTTP/2", True, 200, "GET", "/h2"),
        ("HTTP/2", True, 404, "GET", "/"),
        ("HTTP/2", True, 405, "CONNECT", None),
    ]
    assert records[0]["bytes_out"] == 2


# --- batching and the dropped-lines counter -----------------------------------------------------------------------


def test_lines_are_handed_over_in_one_batch_after_a_short_delay() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(get(b"nope.localhost") * 2)
    h.reactor.advance(FLUSH_DELAY / 2)
    client.send(get(b"nope.localhost"))
    # Three answers (404s keep the connection alive), one hand-over FLUSH_DELAY after the first.
    assert sink.batches == []
    h.reactor.advance(FLUSH_DELAY / 2)
    assert len(sink.batches) == 1 and len(sink.lines()) == 3


def test_a_big_turn_is_handed_over_without_waiting_for_its_end() -> None:
    h, sink = harness("common")
    client = h.connect()
    # labelgw's own answers (404): one piece each.
    client.send(get(b"nope.localhost") * (BATCH_PIECES + 88))
    assert len(sink.lines()) == BATCH_PIECES
    h.reactor.advance(FLUSH_DELAY)
    assert len(sink.lines()) == BATCH_PIECES + 88


def test_lines_the_destination_cannot_take_are_counted_and_said_once() -> None:
    h, sink = harness("common")
    events: list[dict[str, Any]] = []
    log = h.gateway.access_log
    log.log = Logger(observer=events.append)
    sink.accept = False
    client = h.connect()
    client.send(get(b"nope.localhost") * 2)
    h.reactor.advance(FLUSH_DELAY)
    client.send(get(b"nope.localhost") * 3)
    h.reactor.advance(FLUSH_DELAY)
    assert log.access_log_dropped == 5
    assert len(events) == 1 and "dropping" in events[0]["log_format"]
    # It keeps up again: the next episode is said again.
    sink.accept = True
    client.send(get(b"nope.localhost"))
    h.reactor.advance(FLUSH_DELAY)
    assert len(sink.lines()) == 1 and log.access_log_dropped == 5
    sink.accept = False
    client.send(get(b"nope.localhost"))
    h.reactor.advance(FLUSH_DELAY)
    assert len(events) == 2 and log.access_log_dropped == 6


def test_reopen_flushes_first() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(get(b"nope.localhost"))
    h.gateway.access_log.reopen()
    client.send(get(b"nope.localhost"))
    h.reactor.advance(FLUSH_DELAY)
    assert [line[:8] for line in sink.lines()] == ["10.0.0.9", "<reopen>", "10.0.0.9"]


def test_no_access_log_no_lines_and_no_timer() -> None:
    h = ProxyHarness()
    client = h.connect()
    client.send(get(b"nope.localhost"))
    assert client.response().status == 404
    assert h.gateway.access_log is None


@pytest.mark.parametrize(
    ("raw", "quoted"),
    [(b"/plain?a=1&b", "/plain?a=1&b"), (b'/"q"', "/\\x22q\\x22"), (b"/\xc3\xa9", "/\\xC3\\xA9"), (b"/\\", "/\\x5C")],
)
def test_client_text_is_escaped_in_common_lines(raw: bytes, quoted: str) -> None:
    assert _quoted(raw) == quoted


# --- the writer thread ----------------------------------------------------------------------------------------------


def test_the_writer_appends_and_reopens_without_losing_a_line(tmp_path: Any) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"before\n")
    writer = ThreadWriter(str(path))
    writer.start()
    assert writer.put(b"one\n")
    os.rename(path, tmp_path / "access.log.1")
    # Queued in line: "one" goes to the old file, whatever the thread is doing.
    writer.reopen()
    assert writer.put(b"two\n")
    writer.close()
    assert (tmp_path / "access.log.1").read_bytes() == b"before\none\n"
    assert path.read_bytes() == b"two\n"
    assert writer.pending == 0


def test_the_writer_refuses_past_its_bound_when_the_destination_stalls() -> None:
    read_end, write_end = os.pipe()
    try:
        writer = ThreadWriter(None, limit=256 * 1024, fd=write_end)
        writer.start()
        # More than a pipe holds (64 KiB): the thread blocks in write with this batch still counted as pending.
        assert writer.put(b"x" * 200 * 1024)
        assert not writer.put(b"y" * 100 * 1024)
        assert writer.put(b"z" * 1024)
        received = b""
        while len(received) < 201 * 1024:
            received += os.read(read_end, 65536)
        writer.close()
        assert received == b"x" * 200 * 1024 + b"z" * 1024
    finally:
        os.close(read_end)
        os.close(write_end)


# --- --debug-headers ------------------------------------------------------------------------------------------------


def test_debug_headers_name_service_backend_and_request_id() -> None:
    h, sink = harness()
    h.gateway.debug_headers = True
    client = h.connect()
    client.send(get(b"solo.localhost", extra=b"X-Request-Id: abc\r\n"))
    h.upstream().accept().send(ok())
    response = client.response()
    assert response.header(b"x-labelgw-service") == b"solo"
    assert response.header(b"x-labelgw-backend") == b"127.0.0.1:9401"
    assert response.header(b"x-request-id") == b"abc"
    assert response.header(b"x-labelgw-version") is None


def test_debug_headers_are_off_by_default() -> None:
    h = ProxyHarness()
    client = h.connect()
    client.send(get(b"solo.localhost"))
    h.upstream().accept().send(ok())
    response = client.response()
    assert response.header(b"x-labelgw-service") is None and response.header(b"x-request-id") is None


# --- settings ---------------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = config.build({})
    assert (settings.access_log, settings.access_log_file, settings.debug_headers) == ("common", None, False)


def test_command_line(tmp_path: Any) -> None:
    options = Options()
    options.parseOptions(
        ["--access-log", "JSON", "--access-log-file", str(tmp_path / "a.log"), "--debug-headers", "--https", "none"]
    )
    settings = options.settings
    assert (settings.access_log, settings.access_log_file, settings.debug_headers) == (
        "json", str(tmp_path / "a.log"), True,
    )


def test_config_file(tmp_path: Any) -> None:
    settings = config.build({}, {"access_log": False, "access_log_file": str(tmp_path / "x.log"), "debug_headers": True})
    assert (settings.access_log, settings.access_log_file, settings.debug_headers) == ("off", str(tmp_path / "x.log"), True)
    # The command line wins.
    assert config.build({"access_log": "json"}, {"access_log": "off"}).access_log == "json"


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ({"access_log": "apache"}, "--access-log: 'apache' is not a format; use one of: common, json, off"),
        ({"access_log": 3}, "--access-log: 3 is not a format"),
        ({"access_log_file": "/nonexistent-dir/a.log"}, "its directory does not exist"),
        ({"access_log_file": "/"}, "is a directory"),
        ({"debug_headers": "yes"}, "--debug-headers: must be true or false"),
    ],
)
def test_bad_settings_name_the_setting(file: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.build({}, file)


def test_the_log_is_closed_with_a_flush() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(get(b"nope.localhost"))
    h.gateway.access_log.close()
    assert len(sink.lines()) == 1 and sink.closed
    assert START_TIME  # the harness's clock starts there (the times above)


def test_a_stalled_request_body_is_a_408_line_not_a_499() -> None:
    h, sink = harness(body_timeout=5.0)
    client = h.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nContent-Length: 10\r\n\r\nabc")
    h.upstream().accept()
    h.advance(6.0)
    assert client.response().status == 408
    record = one(h, sink)
    assert (record["status"], record["bytes_in"], record["upstream_ms"]) == (408, 3, None)


def test_a_malformed_chunked_body_is_a_400_line() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: solo.localhost\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n")
    assert client.response().status == 400
    settle(h)
    [line] = sink.lines()
    assert '"POST / HTTP/1.1" 400 ' in line and line.endswith('"solo" - 00010203040506071000000000000001')


@pytest.mark.parametrize(
    ("raw", "status"),
    [(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400), (b"GET / HTTP/1.1\nHost: a\n\n", 400)],
)
def test_a_request_refused_before_it_was_parsed_is_logged_without_a_head(raw: bytes, status: int) -> None:
    h, sink = harness()
    client = h.connect()
    client.send(raw)
    assert client.response().status == status
    record = one(h, sink)
    assert (record["status"], record["method"], record["path"], record["service"]) == (status, "", None, None)


def test_a_request_head_that_never_ends_is_a_408_line() -> None:
    h, sink = harness("common")
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: solo")
    h.advance(h.settings.head_timeout + 1)
    settle(h)
    [line] = sink.lines()
    assert '"- - HTTP/1.1" 408 ' in line


@pytest.mark.parametrize("closed_by", ["client", "upstream"])
def test_a_websocket_is_a_101_line_with_the_bytes_both_ways(closed_by: str) -> None:
    from test_proxy import SWITCHING, UPGRADE

    h, sink = harness()
    client = h.connect()
    client.send(UPGRADE)
    upstream = h.upstream().accept()
    upstream.send(SWITCHING + b"\x81\x05hello")
    client.send(b"\x81\x02hi")
    h.advance(2.0)
    if closed_by == "client":
        client.close()
    else:
        upstream.close()
    record = one(h, sink)
    assert (record["status"], record["bytes_in"], record["bytes_out"]) == (101, 4, 7)
    assert record["duration_ms"] == 2000.0
