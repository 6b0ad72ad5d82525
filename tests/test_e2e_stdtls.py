"""HTTPS end to end on both TLS engines (``--tls-engine stdlib|openssl``, the ``tls_engine`` fixture): real
handshakes against the real `twistd -n labelgw`, with openssl s_client and Python clients, in front of a static
backend that is a small HTTP/1.1 server in a thread of the test (no containers).

hardening.md item 22 (TLS scan) and item 23 (HTTP/2 floods over TLS) are one test each here.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives import serialization

from support.gateway import TwistdProcess
from support.net import LOOPBACK
from test_tls_support import UserIssuer, cert_pem, key_pem, replace_file

pytestmark = pytest.mark.docker

HOST = "files.localhost"
# The large download: 256 MiB (1 GiB takes minutes on the shared 2-core machine; the memory bound is the same).
LARGE = 256 * 1024 * 1024
CHUNK = 256 * 1024
# The gateway's resident memory may grow this much during the large download (its buffers are bounded).
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


class Backend:
    """Keep-alive HTTP/1.1 on a loopback port: GET /bytes/N answers N bytes, anything else "ok"."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(60)
        buffer = b""
        block = b"x" * CHUNK
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/bytes/"):
                    size = int(path[len(b"/bytes/"):])
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    while size > 0:
                        piece = block if size >= CHUNK else block[:size]
                        connection.sendall(piece)
                        size -= len(piece)
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            return
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


@pytest.fixture
def gw(labelgw: Any, backend: Backend, tmp_path: Path) -> TwistdProcess:
    config = tmp_path / "labelgw.yaml"
    config.write_text(
        "docker: false\n"
        f"services:\n  files:\n    hosts: [{HOST}]\n    backends: ['{LOOPBACK}:{backend.port}']\n"
    )
    gateway: TwistdProcess = labelgw("--config", str(config), docker_host=None)
    return gateway


def client_context(alpn: list[str] | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for attribute, version in versions.items():
        setattr(context, attribute, version)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def connect(port: int, context: ssl.SSLContext | None = None, name: str = HOST, **kwargs: Any) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, port), timeout=30)
    return (context or client_context()).wrap_socket(raw, server_hostname=name, **kwargs)


def get(tls: ssl.SSLSocket, path: str, host: str = HOST) -> tuple[bytes, int]:
    """One keep-alive GET: (head, body length); the body is read and counted, not kept."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = tls.recv(65536)
        assert data, f"closed before the head: {buffer!r}"
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    received = len(rest)
    while received < length:
        data = tls.recv(1 << 20)
        assert data, f"closed after {received} of {length} body bytes"
        received += len(data)
    return head, received


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def s_client(port: int, *args: str, name: str = HOST, brief: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", name, *(["-brief"] if brief else []),
         *args],
        input="", capture_output=True, text=True, timeout=30,
    )


def handshake_ok(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "CONNECTION ESTABLISHED" in result.stderr


# --- requests, resumption, ALPN -------------------------------------------------------------------------------


def test_keep_alive_requests_and_the_engine_in_use(gw: TwistdProcess, tls_engine: str) -> None:
    with connect(gw.https_port) as tls:
        for _ in range(20):
            head, length = get(tls, "/")
            assert head.startswith(b"HTTP/1.1 200") and length == 2
    assert f"--tls-engine {tls_engine}" in " ".join(gw.args)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_sessions_are_resumed_with_tickets(gw: TwistdProcess, version: str, tls_engine: str) -> None:
    tls_version = getattr(ssl.TLSVersion, version)
    context = client_context(minimum_version=tls_version, maximum_version=tls_version)
    with connect(gw.https_port, context) as first:
        get(first, "/")  # TLS 1.3 tickets arrive after the handshake
        session = first.session
        assert not first.session_reused
    with connect(gw.https_port, context, session=session) as second:
        # Twisted's layer has tickets and the session cache off (a ticket key that never rotates): a full handshake.
        assert second.session_reused is (tls_engine != "openssl")
        assert get(second, "/")[0].startswith(b"HTTP/1.1 200")


def test_alpn_picks_h2_or_http11_and_h2_serves_requests(gw: TwistdProcess) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, StreamEnded

    with connect(gw.https_port, client_context(alpn=["http/1.1"])) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
    with connect(gw.https_port, client_context(alpn=["h2", "http/1.1"])) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        # Two streams at once, each 1 MiB against a 64 KiB window: flow control has to be honoured both ways.
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        size = 1 << 20
        for stream in (1, 3):
            conn.send_headers(stream, [(":method", "GET"), (":path", f"/bytes/{size}"), (":scheme", "https"),
                                       (":authority", HOST)], end_stream=True)
        tls.sendall(conn.data_to_send())
        received = {1: 0, 3: 0}
        ended: set[int] = set()
        deadline = time.monotonic() + 60
        while ended != {1, 3} and time.monotonic() < deadline:
            data = tls.recv(65536)
            assert data, "the gateway closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    received[event.stream_id] += len(event.data)
                    # Credit only what was read: the gateway must wait for it.
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    ended.add(event.stream_id)
            tls.sendall(conn.data_to_send())
        assert received == {1: size, 3: size}


# --- aborts and memory ------------------------------------------------------------------------------------------


def _reset(sock: socket.socket) -> None:
    # An RST, not a FIN: the client is gone at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_aborting_mid_handshake_and_mid_body_leave_the_gateway_serving(gw: TwistdProcess) -> None:
    port = gw.https_port
    for _ in range(20):
        # Half a ClientHello, then gone.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context().wrap_bio(incoming, outgoing, server_hostname=HOST)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw = socket.create_connection((LOOPBACK, port), timeout=10)
        hello = outgoing.read()
        raw.sendall(hello[: len(hello) // 2])
        _reset(raw)
    for _ in range(5):
        # A large body, a little of it read, then gone.
        tls_socket = connect(port)
        tls_socket.sendall(f"GET /bytes/{64 << 20} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        tls_socket.recv(65536)
        _reset(tls_socket)
    for _ in range(5):
        # A request body, a part of it sent, then gone.
        tls_socket = connect(port)
        tls_socket.sendall(f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {10 << 20}\r\n\r\n".encode())
        tls_socket.sendall(b"y" * (256 << 10))
        _reset(tls_socket)
    with connect(port) as tls_socket:
        assert get(tls_socket, "/")[0].startswith(b"HTTP/1.1 200")
    log = gw.log_text()
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]


def test_a_large_download_over_tls_keeps_memory_flat(gw: TwistdProcess) -> None:
    with connect(gw.https_port) as tls:
        get(tls, "/bytes/1048576")  # warmed up: first-use allocations are not growth
        before = rss(gw.pid)
        started = time.monotonic()
        head, length = get(tls, f"/bytes/{LARGE}")
        took = time.monotonic() - started
        peak = rss(gw.pid, "VmHWM")
    assert head.startswith(b"HTTP/1.1 200") and length == LARGE
    assert peak - before < RSS_GROWTH_LIMIT, f"RSS grew from {before >> 20} MiB to a peak of {peak >> 20} MiB"
    print(f"{LARGE >> 20} MiB over TLS in {took:.1f} s; RSS {before >> 20} MiB, peak {peak >> 20} MiB")


# --- hardening.md item 22: a TLS scan ---------------------------------------------------------------------------


def test_hardening_22_tls_scan_and_rotation(labelgw: Any, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    issuer = UserIssuer.create()
    first, first_key = issuer.issue(["scan.example.test"])
    replace_file(certs / "scan.pem", cert_pem(first) + key_pem(first_key))
    gw = labelgw("--cert-dir", str(certs), docker_host=None)
    port = gw.https_port
    name = "scan.example.test"
    # Protocol versions: 1.2 and 1.3 only.
    assert handshake_ok(s_client(port, "-tls1_3", name=name))
    assert handshake_ok(s_client(port, "-tls1_2", name=name))
    for old in ("-tls1", "-tls1_1"):
        assert not handshake_ok(s_client(port, old, "-cipher", "DEFAULT:@SECLEVEL=0", name=name)), old
    # TLS 1.2 suites: ECDHE with AEAD only.
    for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert handshake_ok(s_client(port, "-tls1_2", "-cipher", cipher, name=name)), cipher
    for cipher in ("AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256",
                   "DHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-NULL-SHA"):
        assert not handshake_ok(s_client(port, "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0", name=name)), cipher
    # TLS 1.3 suites: all three AEADs.
    for suite in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"):
        assert handshake_ok(s_client(port, "-tls1_3", "-ciphersuites", suite, name=name)), suite
    # Groups: X25519, P-256, P-384; nothing else.
    for group in ("X25519", "P-256", "P-384"):
        assert handshake_ok(s_client(port, "-groups", group, name=name)), group
    for group in ("X448", "P-521"):
        assert not handshake_ok(s_client(port, "-groups", group, name=name)), group
    # ALPN: h2 first, http/1.1 for a client without h2.
    assert "ALPN protocol: h2" in s_client(port, "-alpn", "h2,http/1.1", name=name, brief=False).stdout
    assert "ALPN protocol: http/1.1" in s_client(port, "-alpn", "http/1.1", name=name, brief=False).stdout
    # Rotation: a new file renamed over the old one is served to new handshakes, without a restart.
    second, second_key = issuer.issue([name])
    replace_file(certs / "scan.pem", cert_pem(second) + key_pem(second_key))
    wanted = second.public_bytes(serialization.Encoding.DER)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with connect(port, name=name) as tls:
            if tls.getpeercert(binary_form=True) == wanted:
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the rotated certificate was not served within 15 s")


# --- hardening.md item 23: HTTP/2 floods over TLS ----------------------------------------------------------------


def _h2_connection(port: int) -> Any:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    tls = connect(port, client_context(alpn=["h2"]))
    assert tls.selected_alpn_protocol() == "h2"
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    return tls, conn


def _goaway_code(tls: ssl.SSLSocket, conn: Any) -> int | None:
    from h2.events import ConnectionTerminated
    from h2.exceptions import ProtocolError

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            data = tls.recv(65536)
        except (ssl.SSLError, OSError):
            return None
        if not data:
            return None
        try:
            events = conn.receive_data(data)
        except ProtocolError:
            continue
        for event in events:
            if isinstance(event, ConnectionTerminated):
                return int(event.error_code)
    return None


def test_hardening_23_http2_rapid_reset_and_continuation_floods_get_goaway(gw: TwistdProcess) -> None:
    from h2.errors import ErrorCodes
    from h2.frame_buffer import FrameBuffer  # noqa: F401 - h2 is the client library
    from hyperframe.frame import ContinuationFrame, HeadersFrame, RstStreamFrame

    before = rss(gw.pid)
    # Rapid reset: streams opened and reset at once, far past the budget.
    tls, conn = _h2_connection(gw.https_port)
    burst = bytearray()
    for stream in range(1, 2 * 1000, 2):
        headers = HeadersFrame(stream, data=conn.encoder.encode(
            [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", HOST)]), flags=["END_HEADERS"])
        burst += headers.serialize() + RstStreamFrame(stream, error_code=8).serialize()
    try:
        tls.sendall(bytes(burst))
    except OSError:
        pass
    assert _goaway_code(tls, conn) == ErrorCodes.ENHANCE_YOUR_CALM
    tls.close()
    # CONTINUATION flood: one header block that never ends.
    tls, conn = _h2_connection(gw.https_port)
    start = HeadersFrame(1, data=conn.encoder.encode(
        [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", HOST)]), flags=[])
    flood = bytearray(start.serialize())
    filler = ContinuationFrame(1, data=b"\x40\x01a\x01b" * 2000).serialize()
    for _ in range(200):
        flood += filler
    try:
        tls.sendall(bytes(flood))
    except OSError:
        pass
    code = _goaway_code(tls, conn)
    tls.close()
    assert code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.PROTOCOL_ERROR, ErrorCodes.COMPRESSION_ERROR)
    # Memory stays bounded, and the gateway serves on.
    assert rss(gw.pid) - before < RSS_GROWTH_LIMIT
    with connect(gw.https_port) as fresh:
        assert get(fresh, "/")[0].startswith(b"HTTP/1.1 200")
