"""End to end: HTTPS connections labelgw has finished with are closed, whatever the client does.

The real `twistd -n labelgw` (no Docker: `docker: false`, short deadlines from its config file) and real TLS
clients on loopback: the standard library's ssl over memory BIOs on a plain socket, so the test controls every
byte the client sends (no close_notify, no FIN) and sees when the server's TCP connection ends.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.gateway import TwistdProcess
from support.measurements import record
from support.net import LOOPBACK, free_port

pytestmark = pytest.mark.docker  # runs the real product (no engine needed)

HEAD_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
CLOSE_GRACE = 1.0
# Scheduling on a loaded 2-core machine: how late a deadline may fire and still count.
SLACK = 2.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tls_engine: str) -> Iterator[TwistdProcess]:
    cwd = tmp_path_factory.mktemp("tls-deadlines")
    config = cwd / "labelgw.yaml"
    config.write_text(
        "docker: false\n"
        f"head_timeout: {HEAD_TIMEOUT}\nidle_timeout: {IDLE_TIMEOUT}\ntls_close_grace: {CLOSE_GRACE}\n"
    )
    port, https_port = free_port(), free_port()
    args = [
        "-n", "--pidfile=", "labelgw", "--config", str(config),
        "--http", f"tcp:{port}:interface={LOOPBACK}", "--https", f"tcp:{https_port}:interface={LOOPBACK}",
        "--state-dir", "state", "--admin", "none", "--tls-engine", tls_engine,
    ]
    gw = TwistdProcess(args, port=port, cwd=cwd / "run")
    try:
        gw.wait_until_listening()
        yield gw
    finally:
        gw.stop()


class RawTLSClient:
    """A TLS client that sends only what the test asks for: never close_notify, never a FIN."""

    def __init__(self, port: int, alpn: list[str] | None = None) -> None:
        self.started = time.monotonic()
        self.sock = socket.create_connection((LOOPBACK, port), timeout=15)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="nowhere.localhost")
        self.received = b""
        self.close_notify_at: float | None = None

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                assert data, "the server closed during the handshake"
                self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def wait_for_eof(self) -> float:
        """Read (decrypting, never answering) until the server's TCP connection ends; seconds since connect."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return time.monotonic() - self.started
            if self.tls.version() is None:
                continue  # handshake bytes: this client is not taking part
            self.incoming.write(data)
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    # SSLObject's way of saying close_notify.
                    if self.close_notify_at is None:
                        self.close_notify_at = time.monotonic() - self.started
                    break
                self.received += chunk


def test_a_connection_close_request_is_closed_within_the_grace_when_the_client_never_closes(
    gateway: TwistdProcess,
) -> None:
    assert gateway.https_port is not None
    client = RawTLSClient(gateway.https_port, ["http/1.1"])
    try:
        client.handshake()
        client.send(b"GET / HTTP/1.1\r\nHost: nowhere.localhost\r\nConnection: close\r\n\r\n")
        sent = time.monotonic() - client.started
        eof = client.wait_for_eof()
    finally:
        client.close()
    assert client.received.startswith(b"HTTP/1.1 404 ")
    assert client.close_notify_at is not None
    record("HTTPS Connection: close, silent client: TCP closed after close_notify (s)",
           f"{eof - client.close_notify_at:.2f} (grace {CLOSE_GRACE:g})")
    assert eof - sent < CLOSE_GRACE + SLACK
    assert eof - client.close_notify_at >= CLOSE_GRACE - 0.2


def test_a_client_that_never_sends_a_client_hello_is_closed_by_the_head_deadline(gateway: TwistdProcess) -> None:
    assert gateway.https_port is not None
    client = RawTLSClient(gateway.https_port)
    try:
        eof = client.wait_for_eof()
    finally:
        client.close()
    record("HTTPS client without ClientHello: closed after (s)", f"{eof:.2f} (head deadline {HEAD_TIMEOUT:g})")
    assert HEAD_TIMEOUT - 0.2 <= eof < HEAD_TIMEOUT + SLACK


def test_a_client_that_stops_half_way_through_the_handshake_is_closed_by_the_head_deadline(
    gateway: TwistdProcess,
) -> None:
    assert gateway.https_port is not None
    client = RawTLSClient(gateway.https_port)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            client.tls.do_handshake()
        client._flush()  # the ClientHello; the server's answer is never acknowledged
        eof = client.wait_for_eof()
    finally:
        client.close()
    assert HEAD_TIMEOUT - 0.2 <= eof < HEAD_TIMEOUT + SLACK


@pytest.mark.parametrize("alpn", [["http/1.1"], ["h2"]])
def test_a_client_that_handshakes_then_sends_nothing_is_closed_by_the_head_deadline_and_the_grace(
    gateway: TwistdProcess, alpn: list[str]
) -> None:
    assert gateway.https_port is not None
    client = RawTLSClient(gateway.https_port, alpn)
    try:
        client.handshake()
        assert client.tls.selected_alpn_protocol() == alpn[0]
        eof = client.wait_for_eof()
    finally:
        client.close()
    record(f"HTTPS ({alpn[0]}) handshake then silence: close_notify / TCP closed after (s)",
           f"{client.close_notify_at or 0:.2f} / {eof:.2f} (head {HEAD_TIMEOUT:g} + grace {CLOSE_GRACE:g})")
    assert client.close_notify_at is not None and HEAD_TIMEOUT - 0.2 <= client.close_notify_at < HEAD_TIMEOUT + SLACK
    assert CLOSE_GRACE - 0.2 <= eof - client.close_notify_at < CLOSE_GRACE + SLACK


def test_many_silent_clients_all_get_closed(gateway: TwistdProcess) -> None:
    """The reported failure: hundreds of finished HTTPS connections held open, then new clients refused."""
    assert gateway.https_port is not None
    clients = [RawTLSClient(gateway.https_port, ["http/1.1"]) for _ in range(100)]
    try:
        for client in clients:
            client.handshake()
            client.send(b"GET / HTTP/1.1\r\nHost: nowhere.localhost\r\nConnection: close\r\n\r\n")
        started = time.monotonic()
        for client in clients:
            client.wait_for_eof()
        took = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    record("HTTPS: 100 silent Connection: close clients all closed within (s)", f"{took:.2f}")
    assert all(client.received.startswith(b"HTTP/1.1 404 ") for client in clients)
    assert took < CLOSE_GRACE + HEAD_TIMEOUT + SLACK
