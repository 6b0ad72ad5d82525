"""Blocking loopback network helpers for end-to-end tests (never used on the reactor thread)."""

from __future__ import annotations

import http.client
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"

HeaderPairs = list[tuple[str, str]]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out come from below the kernel's ephemeral range: a port chosen by binding to 0 lies inside it, and an
# outgoing connection (this suite's clients, labelgw's upstream pool) could be given it as its source port between
# the choice and the listen ("Address already in use", seen once in CI). Below the range only listeners compete,
# and each is checked by a bind. Each process starts at its own place (pid) so concurrent suites rarely meet.
_PORT_FLOOR = 15000
_port_span = max(0, _ephemeral_low() - _PORT_FLOOR)
_next_offset = (os.getpid() * 7919) % _port_span if _port_span else 0
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago and lies outside the kernel's range for outgoing connections' source
    ports (so only another listener can take it before the caller listens); never the same one twice per process."""
    global _next_offset
    for _ in range(_port_span):
        port = _PORT_FLOOR + _next_offset
        _next_offset = (_next_offset + 1) % _port_span
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def wait_for_port(port: int, host: str = LOOPBACK, timeout: float = 10.0) -> None:
    wait_until(lambda: port_accepts(port, host), timeout, what=f"{host}:{port} to accept connections")


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: HeaderPairs  # in received order, duplicates kept
    body: bytes
    version: str  # "HTTP/1.1" or "HTTP/1.0"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def http_get(
    url: str,
    host: str | None = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    timeout: float = 5.0,
    method: str = "GET",
    body: bytes | None = None,
) -> Response:
    """One request on a fresh connection to a loopback URL.

    ``host`` overrides the Host header (the URL still decides where to connect), so
    ``http_get(gw.base_url + "/x", host="api.localhost")`` reaches the gateway for api.localhost.
    Nothing is added but Host (and Content-Length when there is a body).
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") and not (
        parts.hostname or ""
    ).startswith("127."):
        raise ValueError(f"tests only talk to loopback, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else parts.netloc)
        for key, value in pairs:
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        version = "HTTP/1.1" if response.version == 11 else "HTTP/1.0"
        return Response(response.status, response.reason, response.getheaders(), data, version)
    finally:
        conn.close()


def raw_exchange(
    port: int,
    request: bytes,
    host: str = LOOPBACK,
    timeout: float = 5.0,
    half_close: bool = False,
) -> bytes:
    """Send raw bytes and return everything read until the peer closes or ``timeout`` passes.

    For malformed-request tests where http.client would refuse to send the request. With
    ``half_close`` the write side is shut after sending (a server that does not support half-close
    may then drop the connection without answering, so it is off by default).
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        if half_close:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer may already have closed after an early error response
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            s.settimeout(remaining)
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)
