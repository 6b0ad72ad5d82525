"""A real headless Chromium for end-to-end tests, driven over the DevTools protocol on loopback.

``Browser.start(profile_dir)`` runs Debian's ``chromium`` with ``--remote-debugging-port=0`` (it picks a free
loopback port and writes it to ``DevToolsActivePort`` in the profile), finds the page target, and talks to it over
one WebSocket: ``navigate``, ``evaluate`` (a JavaScript expression's value), ``screenshot`` (PNG bytes). The
WebSocket client is the minimal RFC 6455 client side: masked text frames out, text frames (possibly fragmented,
any length) in, pings answered. Background networking is turned off: the browser talks to loopback only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

# No update checks, sync, metrics, safe browsing or other traffic off loopback; no sandbox (tests run as root).
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--no-pings",
    "--password-store=basic",
    "--use-mock-keychain",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1000",
    "--hide-scrollbars",
    # The page polls every second: its timers must run at full speed although no one looks at it.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class DevToolsError(AssertionError):
    pass


class _WebSocket:
    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise DevToolsError(f"DevTools closed the WebSocket handshake: {head!r}")
            head += chunk
        head, self._buffer = head.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise DevToolsError(f"DevTools refused the WebSocket: {head!r}")

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise DevToolsError("DevTools closed the WebSocket")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self) -> bytes:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read(8))
            payload = self._read(size)  # a server never masks
            if opcode == 0x8:
                raise DevToolsError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self.send(payload, 0xA)
                continue
            if opcode == 0xA:
                continue
            message += payload
            if first & 0x80:
                return message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Browser:
    def __init__(self, process: subprocess.Popen[bytes], socket_: _WebSocket, log_path: Path) -> None:
        self.process = process
        self._ws = socket_
        self._ids = 0
        self.log_path = log_path

    @classmethod
    def start(cls, executable: str, profile: Path, timeout: float = 30.0) -> "Browser":
        profile.mkdir(parents=True, exist_ok=True)
        log_path = profile.parent / "chromium.log"
        log = open(log_path, "wb")
        process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        port = None
        try:
            while port is None:
                if process.poll() is not None:
                    raise DevToolsError(f"chromium exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
                if time.monotonic() > deadline:
                    raise DevToolsError(f"chromium gave no DevTools port in {timeout} s:\n{log_path.read_text(errors='replace')}")
                lines = active.read_text().splitlines() if active.exists() else []
                if len(lines) >= 2 and lines[0].isdigit():
                    port = int(lines[0])
                else:
                    time.sleep(0.05)
            page = None
            while page is None:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    targets = json.loads(response.read())
                page = next((t for t in targets if t.get("type") == "page"), None)
                if page is None:
                    if time.monotonic() > deadline:
                        raise DevToolsError(f"no page target: {targets}")
                    time.sleep(0.05)
            browser = cls(process, _WebSocket(page["webSocketDebuggerUrl"], timeout), log_path)
        except BaseException:
            _stop(process)
            raise
        browser.call("Page.enable")
        browser.call("Runtime.enable")
        return browser

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        ident = self._ids
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}).encode())
        while True:
            message = json.loads(self._ws.receive())
            if message.get("id") == ident:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError(f"navigating to {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.05) -> Any:
        """Poll a JavaScript expression until it is truthy; its value. Raises after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                raise DevToolsError(f"not true within {timeout} s: {expression}")
            time.sleep(interval)

    def screenshot(self, path: Path) -> Path:
        # The whole page, not only the window.
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self._ws.close()
        _stop(self.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        # Its own session: the renderer and GPU processes go with it.
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
