"""Blocking helpers for the registration API in end-to-end tests (loopback only)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .net import LOOPBACK, Response, free_port, http_get, wait_for_port


class RegistryClient:
    """Calls the registration API of one gateway (`--registry-api tcp:PORT:interface=127.0.0.1`)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None) -> Response:
        headers = []
        bearer = token if token is not None else self.token
        if bearer:
            headers.append(("Authorization", f"Bearer {bearer}"))
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if payload is not None:
            headers.append(("Content-Type", "application/json"))
        return http_get(f"http://{LOOPBACK}:{self.port}{path}", headers=headers, method=method, body=payload)

    def register(self, service: str, instance: str, **fields: Any) -> Response:
        return self.call("PUT", f"/v1/services/{service}/instances/{instance}", fields)

    def heartbeat(self, service: str, instance: str) -> Response:
        return self.call("PUT", f"/v1/services/{service}/instances/{instance}/heartbeat", raw=b"")

    def deregister(self, service: str, instance: str) -> Response:
        return self.call("DELETE", f"/v1/services/{service}/instances/{instance}")

    def listing(self) -> dict[str, Any]:
        response = self.call("GET", "/v1/services")
        assert response.status == 200, response
        return json.loads(response.body)


def start_whoami(name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(port), "--name", name],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return process, port


def routed_to(gateway_port: int, host: str, timeout: float = 2.0) -> str | None:
    """The whoami name that answered for `host`, or None (404, 503 ...)."""
    try:
        response = http_get(f"http://{LOOPBACK}:{gateway_port}/", host=host, timeout=timeout)
    except OSError:
        return None
    return response.header("X-Whoami") if response.status == 200 else None
