"""bench/floor_proxy.py (the floor of bench/bench_floor.py) forwards requests and responses unchanged, on both
event loops and over TLS; and bench_floor.py's options and verdict arithmetic. Loopback, no Docker, a few seconds."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterator

import pytest

from support.benchscripts import BENCH_DIR, load_bench_script

floor_proxy = load_bench_script("floor_proxy")

RESPONSE = b"HTTP/1.1 200 OK\r\nServer: t\r\ncontent-length: 6\r\nX-Kept: yes\r\n\r\nhello\n"


class Backend:
    """A keep-alive backend on 127.0.0.1 that records every request head it reads, per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[list[bytes]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection: socket.socket) -> None:
        heads: list[bytes] = []
        self.connections.append(heads)
        buffered = b""
        with connection:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffered += chunk
                while b"\r\n\r\n" in buffered:
                    head, buffered = buffered.split(b"\r\n\r\n", 1)
                    heads.append(head + b"\r\n\r\n")
                    # The head and the body in two writes: the proxy reassembles nothing, it only counts.
                    connection.sendall(RESPONSE[:-6])
                    connection.sendall(RESPONSE[-6:])

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


def start_floor(backend_port: int, *options: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "floor_proxy.py"), "--listen", "0", "--backend", str(backend_port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("floor-proxy: listening on "):
        process.kill()
        raise AssertionError(f"floor proxy did not start: {line}{process.stdout.read()}")
    return process, int(line.rsplit(" ", 1)[1])


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(10)


REQUEST = b"GET /a?b=1 HTTP/1.1\r\nHost: bench.localhost\r\nX-Odd:  kept  as is\r\n\r\n"


def exchange_twice(connection: socket.socket) -> list[bytes]:
    """Two requests on one connection, one at a time; the two answers."""
    answers = []
    for _ in range(2):
        # Split inside the head: the proxy waits for its end.
        connection.sendall(REQUEST[:10])
        connection.sendall(REQUEST[10:])
        answer = b""
        while len(answer) < len(RESPONSE):
            chunk = connection.recv(65536)
            assert chunk, "the proxy closed the connection"
            answer += chunk
        answers.append(answer)
    return answers


@pytest.mark.parametrize("options", [(), ("--reactor", "epoll"), ("--loop", "asyncio")], ids=["lean", "epoll", "asyncio"])
def test_requests_and_responses_pass_unchanged_over_one_upstream_connection(backend: Backend, options: tuple[str, ...]) -> None:
    process, port = start_floor(backend.port, *options)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            assert exchange_twice(connection) == [RESPONSE, RESPONSE]
        assert backend.connections == [[REQUEST, REQUEST]]
    finally:
        stop(process)


@pytest.mark.parametrize("loop", ["twisted", "asyncio"])
def test_tls_client_side(backend: Backend, tmp_path: Path, loop: str) -> None:
    from labelgw.tls.ca import LocalCA

    leaf = LocalCA.load_or_create(tmp_path / "state").issue_leaf(["bench.localhost"], datetime.now(UTC))
    pem = tmp_path / "leaf.pem"
    pem.write_bytes(leaf.cert_pem + leaf.key_pem)
    process, port = start_floor(backend.port, "--tls", str(pem), "--loop", loop)
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "state" / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="bench.localhost") as tls:
                assert exchange_twice(tls) == [RESPONSE, RESPONSE]  # type: ignore[arg-type]
        # And with the standard library's HTTP client, as the bench's readiness check does.
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        context.check_hostname = False
        connection.request("GET", "/", headers={"Host": "bench.localhost"})
        response = connection.getresponse()
        assert (response.status, response.read(), response.getheader("X-Kept")) == (200, b"hello\n", "yes")
        connection.close()
        assert [len(heads) for heads in backend.connections] == [2, 1]
    finally:
        stop(process)


def test_response_frames_count_whole_responses_across_any_split() -> None:
    two = RESPONSE + b"HTTP/1.1 204 No Content\r\nServer: t\r\n\r\n" + RESPONSE
    for size in (1, 2, 7, len(two)):
        frames = floor_proxy.ResponseFrames()
        for start in range(0, len(two), size):
            frames.feed(two[start : start + size])
        assert (frames.completed, frames.remaining, frames.head) == (3, 0, b"")


def test_content_length_in_any_case() -> None:
    assert floor_proxy.content_length(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == 12
    assert floor_proxy.content_length(b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH:3\r\nA: b") == 3
    assert floor_proxy.content_length(b"HTTP/1.1 204 No Content\r\nA: b") == 0


bench_floor = load_bench_script("bench_floor")


def test_bench_floor_defaults_and_target_choice() -> None:
    args = bench_floor.parse_args([])
    assert (args.duration, args.warmup, args.rounds, args.parts) == (4, 1, 3, ["plain", "keepalive", "handshakes"])
    assert args.targets == list(bench_floor.DEFAULT_TARGETS)
    chosen = bench_floor.parse_args(["--targets", "labelgw,floor-proxy", "--parts", "plain"])
    assert (chosen.targets, chosen.parts) == (["floor-proxy", "labelgw"], ["plain"])
    with pytest.raises(SystemExit):
        bench_floor.parse_args(["--targets", "nginx"])


def test_verdicts_compare_the_floor_with_issue_12s_ratios() -> None:
    Figure = bench_floor.Figure
    results = {
        "plain": {"nginx-proxy": [Figure(100.0, 10.0, 0)], "floor-proxy": [Figure(60.0, 20.0, 0)],
                  "labelgw": [Figure(30.0, 40.0, 0)]},
        "tls13": {"nginx-tls": [Figure(1000.0, 300.0, 0)], "floor-proxy-tls": [Figure(700.0, 500.0, 0)]},
    }
    lines = bench_floor.verdicts(bench_floor.summarize(results))
    assert len(lines) == 2
    # 0.45 / 0.60: labelgw must keep 75 % of the floor's rate; it keeps 50 %.
    assert "floor reaches x0.60 (x0.50 by CPU per request)" in lines[0]
    assert ">= 75% of the floor's rate (labelgw keeps 50% today: x0.30 of nginx)" in lines[0]
    assert "floor reaches x0.70" in lines[1] and "out of reach" in lines[1]
