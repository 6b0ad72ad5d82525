"""Cross-client isolation against the real product: `twistd -n labelgw` in front of a misbehaving backend.

The backend is a small blocking server on a loopback port, in a thread of the test: keep-alive, one answer per
request path, and it records every request it received. tests/test_upstream_isolation.py has the same attacks on
the deterministic harness; this checks that the installed product behaves the same on a real reactor.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import TwistdProcess
from support.net import LOOPBACK, free_port

# Runs the real product (no engine needed): with the end-to-end tests, out of `-m "not docker"` unit runs.
pytestmark = pytest.mark.docker

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nstolen!"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ANSWERS = {
    b"/ok": [OK],
    # Both framings, then a whole response for whoever reads next.
    b"/cl-te": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED],
    # A complete response, then the same smuggled one a moment later: it reaches an idle pooled connection.
    b"/late": [OK, SMUGGLED],
    b"/bare-lf": [b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"],
    b"/malformed": [b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n"],
    b"/bad-chunk": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"],
}
BACKEND_TIMEOUT = 10.0


class Backend:
    """A keep-alive HTTP/1.1 server that answers by path and records (method, path) of every request."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received: list[tuple[bytes, bytes]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(BACKEND_TIMEOUT)
        buffer = b""
        with connection:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = connection.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                self.received.append((method, path))
                parts = ANSWERS.get(path, [OK])
                try:
                    connection.sendall(parts[0])
                    for part in parts[1:]:
                        time.sleep(0.1)
                        connection.sendall(part)
                except OSError:
                    return

    def count(self, method: bytes, path: bytes) -> int:
        return self.received.count((method, path))

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._accept_thread.join(2)
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


@pytest.fixture
def gateway(tmp_path: Path, backend: Backend) -> Iterator[TwistdProcess]:
    config = tmp_path / "labelgw.yaml"
    config.write_text(
        f"docker: false\nservices:\n  evil:\n    hosts: [evil.localhost]\n    backends: ['127.0.0.1:{backend.port}']\n"
    )
    port = free_port()
    args = [
        "-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface={LOOPBACK}", "--config", str(config),
        "--https", "none", "--admin", "none",
    ]
    process = TwistdProcess(args, port=port, cwd=tmp_path / "run")
    try:
        process.wait_until_listening()
        yield process
    finally:
        process.stop()


def exchange(gateway: TwistdProcess, method: bytes, path: bytes, sock: socket.socket | None = None) -> bytes:
    """One request on `sock` (or a new connection); the response as far as it came within a short read window."""
    own = sock is None
    if sock is None:
        sock = socket.create_connection((LOOPBACK, gateway.port), timeout=10)
    try:
        sock.sendall(method + b" " + path + b" HTTP/1.1\r\nHost: evil.localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    finally:
        if own:
            sock.close()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_content_length_with_chunked_is_502_and_the_tail_reaches_nobody(
    gateway: TwistdProcess, backend: Backend
) -> None:
    first = exchange(gateway, b"GET", b"/cl-te")
    assert status(first) == 502
    second = exchange(gateway, b"GET", b"/ok")
    assert second.endswith(b"\r\n\r\nok")
    assert b"stolen" not in first + second


def test_late_bytes_on_an_idle_connection_reach_nobody(gateway: TwistdProcess, backend: Backend) -> None:
    assert exchange(gateway, b"GET", b"/late").endswith(b"\r\n\r\nok")
    time.sleep(0.5)  # the smuggled response reaches the idle pooled connection
    for _ in range(3):
        response = exchange(gateway, b"GET", b"/ok")
        assert response.endswith(b"\r\n\r\nok"), response


@pytest.mark.parametrize("path", [b"/bare-lf", b"/malformed", b"/bad-chunk"])
def test_malformed_response_is_a_502_at_once(gateway: TwistdProcess, backend: Backend, path: bytes) -> None:
    started = time.monotonic()
    response = exchange(gateway, b"GET", path)
    assert status(response) == 502
    assert time.monotonic() - started < 5  # not the 60 s response timeout


@pytest.mark.parametrize("method", [b"DELETE", b"GET"])
def test_malformed_response_on_a_reused_connection_is_sent_once(
    gateway: TwistdProcess, backend: Backend, method: bytes
) -> None:
    client = socket.create_connection((LOOPBACK, gateway.port), timeout=10)
    with client:
        # The first exchange leaves a pooled upstream connection; the second goes out on it.
        assert exchange(gateway, b"GET", b"/ok", client).endswith(b"ok")
        assert status(exchange(gateway, method, b"/malformed", client)) == 502
    assert backend.count(method, b"/malformed") == 1
