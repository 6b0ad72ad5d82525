"""labelgw.tools.whoami, driven through its real HTTP/1.1 channel over StringTransport with a MemoryReactorClock.

No sockets, no sleeps: bytes go in with dataReceived, come out of the transport, and time moves with advance().
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
from dataclasses import dataclass

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from labelgw.tools.whoami import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WhoamiRequest,
    WorkerQueue,
    default_name,
    download_pattern,
    encode_frame,
    make_site,
    parse_args,
    parse_frame,
    websocket_accept,
)

CLIENT = IPv4Address("TCP", "127.0.0.1", 40001)
SERVER = IPv4Address("TCP", "127.0.0.1", 9000)
MASK = b"\x37\xfa\x21\x3d"


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def parse_response(data: bytes) -> Response:
    """One complete HTTP/1.1 response (Content-Length, chunked, or up to the end of `data`)."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(key, value.strip()) for key, _, value in (line.partition(":") for line in lines[1:])]
    response = Response(status, headers, b"", chunked=False)
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        response.chunked = True
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        response.body = body
    elif response.header("content-length") is not None:
        length = int(response.header("content-length") or 0)
        assert len(rest) >= length, "response body incomplete"
        response.body = rest[:length]
    else:
        response.body = rest
    return response


class Connection:
    """One client connection to the site."""

    def __init__(self, site, transport: StringTransport | None = None) -> None:
        self.transport = transport or StringTransport(hostAddress=SERVER, peerAddress=CLIENT)
        self.protocol = site.buildProtocol(CLIENT)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def request(self, method: str, uri: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {uri} HTTP/1.1", "Host: whoami.localhost"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def response(self) -> Response:
        return parse_response(self.take())

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def site(clock: MemoryReactorClock):
    return make_site("w1", clock)


def get(site, uri: str, headers: dict[str, str] | None = None) -> Response:
    connection = Connection(site)
    connection.request("GET", uri, headers)
    return connection.response()


# -- echo ---------------------------------------------------------------------------------------------------------


def test_echo_names_itself_and_lists_request_line_and_headers(site) -> None:
    response = get(
        site,
        "/some/path?q=1",
        {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example"},
    )
    assert response.status == 200
    assert response.header("X-Whoami") == "w1"
    assert response.header("Content-Type").startswith("text/plain")
    lines = response.body.decode().splitlines()
    assert lines[:3] == ["Name: w1", "RemoteAddr: 127.0.0.1:40001", "GET /some/path?q=1 HTTP/1.1"]
    assert "Host: whoami.localhost" in lines
    assert "X-Forwarded-For: 203.0.113.7" in lines
    assert "X-Forwarded-Proto: https" in lines
    assert "X-Forwarded-Host: api.example" in lines


def test_echo_lists_each_value_of_a_repeated_header(site) -> None:
    connection = Connection(site)
    connection.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Twice: one\r\nX-Twice: two\r\n\r\n")
    lines = connection.response().body.decode().splitlines()
    assert lines.count("X-Twice: one") == 1 and lines.count("X-Twice: two") == 1


def test_api_answers_json(site) -> None:
    response = get(site, "/api?x=1", {"X-Forwarded-For": "203.0.113.7"})
    document = json.loads(response.body)
    assert document["name"] == "w1"
    assert document["method"] == "GET" and document["uri"] == "/api?x=1" and document["path"] == "/api"
    assert document["headers"]["X-Forwarded-For"] == ["203.0.113.7"]
    assert document["headers"]["Host"] == ["whoami.localhost"]


def test_default_name_is_hostname(monkeypatch: pytest.MonkeyPatch, clock) -> None:
    monkeypatch.setenv("HOSTNAME", "container-7")
    assert default_name() == "container-7"
    assert get(make_site(None, clock), "/").header("X-Whoami") == "container-7"


def test_keep_alive_serves_several_requests_on_one_connection(site) -> None:
    connection = Connection(site)
    connection.request("GET", "/health")
    assert connection.response().body == b"ok\n"
    connection.request("GET", "/status/201")
    assert connection.response().status == 201


# -- cookies, status, redirect ------------------------------------------------------------------------------------


def test_cookies_are_three_separate_headers(site) -> None:
    assert get(site, "/cookies").all("Set-Cookie") == ["a=1", "b=2", "c=3"]


@pytest.mark.parametrize("code", [200, 201, 404, 418, 500, 503, 599])
def test_status_answers_that_status(site, code: int) -> None:
    response = get(site, f"/status/{code}")
    assert response.status == code
    assert response.body.startswith(str(code).encode())


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_a_body_has_no_length_either(site, code: int) -> None:
    connection = Connection(site)
    connection.request("GET", f"/status/{code}")
    raw = connection.take()
    assert raw.startswith(b"HTTP/1.1 %d " % code) and raw.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in raw and b"Transfer-Encoding" not in raw


def test_forced_204_has_no_body(site) -> None:
    get(site, "/control?status=204")
    connection = Connection(site)
    connection.request("GET", "/")
    raw = connection.take()
    assert raw.startswith(b"HTTP/1.1 204 ") and raw.endswith(b"\r\n\r\n") and b"Content-Length" not in raw


@pytest.mark.parametrize("uri", ["/status/abc", "/status/99", "/status/600"])
def test_bad_status_is_400(site, uri: str) -> None:
    assert get(site, uri).status == 400


def test_redirect(site) -> None:
    response = get(site, "/redirect?to=http%3A%2F%2Fother.localhost%2Fx")
    assert response.status == 302
    assert response.header("Location") == "http://other.localhost/x"
    assert get(site, "/redirect?to=/y&code=307").status == 307


# -- upload -------------------------------------------------------------------------------------------------------


class RecordingSite:
    """Keeps the requests a site builds, to look at what they kept of the body."""

    def __init__(self, site) -> None:
        self.requests: list[WhoamiRequest] = []
        factory = site.requestFactory

        def record(*args, **kwargs):
            request = factory(*args, **kwargs)
            self.requests.append(request)
            return request

        site.requestFactory = record


def test_upload_counts_and_hashes_without_keeping_the_body(site) -> None:
    recorder = RecordingSite(site)
    body = bytes(random.Random(1).getrandbits(8) for _ in range(300 * 1024))
    connection = Connection(site)
    connection.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body))
    for start in range(0, len(body) - 7000, 7000):
        connection.send(body[start : start + 7000])
    # Nearly all of it has arrived, and none of it was kept (Twisted would have spooled it to a file).
    request = recorder.requests[0]
    assert request.body_bytes == start + 7000
    assert isinstance(request.content, io.BytesIO) and request.content.getvalue() == b""
    connection.send(body[start + 7000 :])
    response = connection.response()
    assert response.status == 200
    assert json.loads(response.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_upload_with_a_chunked_body(site) -> None:
    connection = Connection(site)
    connection.send(b"PUT /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    document = json.loads(connection.response().body)
    assert document == {"bytes": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}


def test_upload_of_nothing(site) -> None:
    connection = Connection(site)
    connection.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert json.loads(connection.response().body) == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_upload_needs_post_or_put(site) -> None:
    response = get(site, "/upload")
    assert response.status == 405 and response.header("Allow") == "POST, PUT"


# -- download -----------------------------------------------------------------------------------------------------


def test_download_with_content_length(site) -> None:
    response = get(site, "/download?bytes=200000")
    assert response.status == 200 and not response.chunked
    assert response.header("Content-Length") == "200000"
    assert response.body == download_pattern(0, 200000)


def test_download_chunked(site) -> None:
    response = get(site, "/download?bytes=150001&chunked=1")
    assert response.chunked and response.header("Content-Length") is None
    assert response.body == download_pattern(0, 150001)


def test_download_of_zero_bytes_and_head(site) -> None:
    assert get(site, "/download?bytes=0").body == b""
    connection = Connection(site)
    connection.request("HEAD", "/download?bytes=5000")
    raw = connection.take()
    assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 5000" in raw


def test_download_needs_a_byte_count(site) -> None:
    assert get(site, "/download").status == 400
    assert get(site, "/download?bytes=-1").status == 400


class SmallBufferTransport(StringTransport):
    """Asks its producer to pause once it holds more than `limit` bytes, as a TCP transport does."""

    limit = 100_000

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.io.getvalue()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()


def test_download_waits_while_the_transport_is_full(site) -> None:
    transport = SmallBufferTransport(hostAddress=SERVER, peerAddress=CLIENT)
    connection = Connection(site, transport)
    total = 1_000_000
    connection.request("GET", f"/download?bytes={total}")
    received = connection.take()
    rounds = 0
    assert b"\r\n\r\n" in received
    while len(received.partition(b"\r\n\r\n")[2]) < total:
        # Each resume lets at most the buffer limit plus one 64 KiB chunk through.
        rounds += 1
        assert rounds < 100
        transport.producer.resumeProducing()
        chunk = connection.take()
        assert 0 < len(chunk) <= SmallBufferTransport.limit + 64 * 1024
        received += chunk
    assert rounds >= 5
    assert parse_response(received).body == download_pattern(0, total)


def test_download_stops_when_the_client_leaves(site) -> None:
    transport = SmallBufferTransport(hostAddress=SERVER, peerAddress=CLIENT)
    connection = Connection(site, transport)
    connection.request("GET", "/download?bytes=1000000")
    connection.take()
    producer = transport.producer
    connection.lose()
    producer.resumeProducing()  # would write the rest and finish a lost request if it had not stopped
    assert transport.value() == b""


# -- delays and latency injection ---------------------------------------------------------------------------------


def test_delay_answers_after_the_clock_moves(site, clock: MemoryReactorClock) -> None:
    connection = Connection(site)
    connection.request("GET", "/delay?ms=250")
    clock.advance(0.249)
    assert connection.transport.value() == b""
    clock.advance(0.002)
    response = connection.response()
    assert response.status == 200 and response.body == b"delayed 250 ms\n"


def test_delay_is_cancelled_when_the_client_leaves(site, clock: MemoryReactorClock) -> None:
    connection = Connection(site)
    connection.request("GET", "/delay?ms=250")
    connection.lose()
    assert [call for call in clock.getDelayedCalls() if call.active()] == []


def test_fixed_delay_without_workers(clock: MemoryReactorClock) -> None:
    connection = Connection(make_site("w1", clock, delay_ms=20))
    connection.request("GET", "/")
    clock.advance(0.019)
    assert connection.transport.value() == b""
    clock.advance(0.002)
    response = connection.response()
    assert response.status == 200 and response.header("Content-Length") == str(len(response.body))


def test_workers_serve_a_fifo_queue_with_seeded_exponential_times(clock: MemoryReactorClock) -> None:
    site = make_site("w1", clock, delay_ms=10, workers=1, seed=7)
    draws = random.Random(7)
    first_s, second_s = 0.010 * draws.expovariate(1.0), 0.010 * draws.expovariate(1.0)
    first, second = Connection(site), Connection(site)
    first.request("GET", "/one")
    second.request("GET", "/two")
    clock.advance(first_s - 1e-6)
    assert first.transport.value() == b""
    clock.advance(2e-6)
    assert b"GET /one" in first.response().body
    assert second.transport.value() == b""
    # The second request waited for the only worker and then took its own service time.
    clock.advance(second_s - 2e-6)
    assert second.transport.value() == b""
    clock.advance(2e-6)
    assert b"GET /two" in second.response().body


def test_worker_queue_runs_at_most_workers_jobs_and_skips_withdrawn_ones() -> None:
    clock = Clock()
    queue = WorkerQueue(clock, workers=2, mean_s=0.0, rng=random.Random(0))
    done: list[str] = []
    for name in "abc":
        queue.submit(lambda name=name: done.append(name))
    withdraw_d = queue.submit(lambda: done.append("d"))
    assert queue.busy == 2 and queue.waiting == 2
    withdraw_d()
    assert queue.waiting == 1
    clock.advance(0)
    clock.advance(0)
    assert done == ["a", "b", "c"] and queue.busy == 0


def test_a_queued_request_whose_client_left_is_not_served(clock: MemoryReactorClock) -> None:
    site = make_site("w1", clock, delay_ms=10, workers=1, seed=1)
    first, second = Connection(site), Connection(site)
    first.request("GET", "/one")
    second.request("GET", "/two")
    second.lose()
    clock.advance(10)
    assert b"GET /one" in first.response().body
    assert json.loads(get(site, "/control").body) == {"status": 0, "delay_ms": 0, "busy": 0, "waiting": 0}


# -- control ------------------------------------------------------------------------------------------------------


def test_control_status_applies_to_every_later_response_but_control(site) -> None:
    assert json.loads(get(site, "/control?status=503").body)["status"] == 503
    assert get(site, "/").status == 503
    assert get(site, "/health").status == 503
    assert get(site, "/control").status == 200
    get(site, "/control?status=0")
    assert get(site, "/health").status == 200


def test_control_delay_applies_to_later_requests(site, clock: MemoryReactorClock) -> None:
    get(site, "/control?delay_ms=100")
    connection = Connection(site)
    connection.request("GET", "/health")
    clock.advance(0.099)
    assert connection.transport.value() == b""
    clock.advance(0.002)
    assert connection.response().body == b"ok\n"
    get(site, "/control?delay_ms=0")
    assert get(site, "/health").body == b"ok\n"


def test_control_rejects_bad_values(site) -> None:
    assert get(site, "/control?status=42").status == 400
    assert get(site, "/control?delay_ms=x").status == 400


# -- WebSocket ----------------------------------------------------------------------------------------------------


def test_websocket_accept_of_the_rfc_example() -> None:
    assert websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def open_websocket(site) -> Connection:
    connection = Connection(site)
    connection.request(
        "GET",
        "/ws",
        {
            "Upgrade": "websocket",
            "Connection": "keep-alive, Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    return connection


def test_websocket_handshake(site) -> None:
    connection = open_websocket(site)
    head = connection.take()
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"\r\nUpgrade: websocket\r\n" in head
    assert b"\r\nX-Whoami: w1\r\n" in head


def test_websocket_echoes_the_rfc_hello_frame(site) -> None:
    connection = open_websocket(site)
    connection.take()
    # RFC 6455 section 5.7: a masked "Hello" from a client, and the unmasked frame that carries it back.
    connection.send(bytes.fromhex("818537fa213d7f9f4d5158"))
    assert connection.take() == bytes.fromhex("810548656c6c6f")


def test_websocket_echoes_binary_frames_split_across_reads(site) -> None:
    connection = open_websocket(site)
    connection.take()
    payload = bytes(range(256)) * 2
    frame = encode_frame(OP_BINARY, payload, mask=MASK)
    for byte in range(len(frame)):
        connection.send(frame[byte : byte + 1])
    echoed, used = parse_frame(connection.take(), 1 << 20)
    assert (echoed.opcode, echoed.payload, echoed.masked, echoed.fin) == (OP_BINARY, payload, False, True)


def test_websocket_answers_ping_with_pong_and_returns_close(site) -> None:
    connection = open_websocket(site)
    connection.take()
    connection.send(encode_frame(OP_PING, b"are you there", mask=MASK))
    assert connection.take() == encode_frame(OP_PONG, b"are you there")
    connection.send(encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye", mask=MASK))
    assert connection.take() == encode_frame(OP_CLOSE, struct.pack("!H", 1000))
    assert connection.transport.disconnecting


def test_websocket_closes_with_1002_on_an_unmasked_client_frame(site) -> None:
    connection = open_websocket(site)
    connection.take()
    connection.send(encode_frame(OP_TEXT, b"not masked"))
    assert connection.take() == encode_frame(OP_CLOSE, struct.pack("!H", 1002))
    assert connection.transport.disconnecting


def test_websocket_needs_version_13(site) -> None:
    connection = Connection(site)
    connection.request(
        "GET",
        "/ws",
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
         "Sec-WebSocket-Version": "8"},
    )
    response = connection.response()
    assert response.status == 426 and response.header("Sec-WebSocket-Version") == "13"


def test_websocket_needs_an_upgrade_request(site) -> None:
    assert get(site, "/ws").status == 400


def test_parse_frame_waits_for_a_whole_frame() -> None:
    frame = encode_frame(OP_TEXT, b"x" * 300, mask=MASK)
    assert parse_frame(frame[:3], 1 << 20) is None
    assert parse_frame(frame[:-1], 1 << 20) is None
    parsed, used = parse_frame(frame + b"more", 1 << 20)
    assert parsed.payload == b"x" * 300 and used == len(frame)


# -- command line -------------------------------------------------------------------------------------------------


def test_command_line_defaults_and_options() -> None:
    args = parse_args(["--port", "9001"])
    assert (args.port, args.host, args.name, args.delay_ms, args.workers) == (9001, "127.0.0.1", None, 0.0, 0)
    args = parse_args(["--port", "0", "--name", "slow", "--delay-ms", "10", "--workers", "1", "--seed", "3"])
    assert (args.name, args.delay_ms, args.workers, args.seed) == ("slow", 10.0, 1, 3)


def test_fail_every_answers_500_to_every_nth_response(clock: MemoryReactorClock) -> None:
    site = make_site("w1", clock, fail_every=2)
    statuses = [get(site, "/").status for _ in range(6)]
    assert statuses == [200, 500, 200, 500, 200, 500]
    assert get(site, "/control").status == 200  # never failed, never counted
    assert get(site, "/").status == 200
