"""A minimal WebSocket client for end-to-end tests: handshake, then text frames (< 126 bytes) echoed back."""

from __future__ import annotations

import os
import socket
import struct

# RFC 6455 section 1.3: this key's accept value.
EXAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
EXAMPLE_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def text_frame(payload: bytes) -> bytes:
    """A masked text frame, as a client must send it."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def assert_echo(sock: socket.socket, host: str, messages: list[bytes]) -> None:
    """Upgrade `sock` to a WebSocket at /ws and check each message comes back as an unmasked text frame."""
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {EXAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed during the handshake: {head!r}"
        head += chunk
    head, rest = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert EXAMPLE_ACCEPT in head
    for message in messages:
        sock.sendall(text_frame(message))
        data = rest
        while len(data) < 2 + len(message):
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the echo"
            data += chunk
        rest = data[2 + len(message) :]
        assert data[0] == 0x81 and data[1] == len(message) and data[2 : 2 + len(message)] == message
