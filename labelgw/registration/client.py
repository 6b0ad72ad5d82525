"""``python -m labelgw register``: register an instance, heartbeat until interrupted, deregister on SIGTERM/SIGINT.

As a sidecar it runs beside the service; as a wrapper (``... -- COMMAND ARGS``) it starts the command, registers once
the instance's port accepts connections, forwards SIGTERM/SIGINT to it and deregisters first, so the gateway stops
sending new requests before the process begins to stop. A heartbeat answered 404 (the lease ran out, or the gateway
lost it) registers again. Plain blocking code: this process has no reactor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["build_body", "main", "parse_args"]

PROGRAM = "python -m labelgw register"
EPILOG = """\
example (a sidecar; Ctrl-C or SIGTERM deregisters):
  python -m labelgw register --api http://127.0.0.1:8082 --service shop --id shop-1 \\
      --address 127.0.0.1 --port 9000 --host shop.example.com --version v2 --health-path /health
example (a wrapper: starts the command, deregisters and forwards SIGTERM to it):
  python -m labelgw register --service shop --id shop-1 --port 9000 -- python -m labelgw.tools.whoami --port 9000
"""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Register an instance with labelgw's registration API and keep it registered.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--api", default=os.environ.get("LABELGW_REGISTRY_API", "http://127.0.0.1:8082"),
                        help="the registration API's URL [default: $LABELGW_REGISTRY_API, else http://127.0.0.1:8082]")
    parser.add_argument("--token-file", help="file with the bearer token the API requires")
    parser.add_argument("--service", required=True)
    parser.add_argument("--id", required=True, dest="instance", help="this instance's unique id")
    parser.add_argument("--address", default="127.0.0.1", help="where the gateway reaches it [default: 127.0.0.1]")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", action="append", default=[], dest="hosts", help="a host name (repeatable)")
    parser.add_argument("--path")
    parser.add_argument("--strip-prefix", action="store_true")
    parser.add_argument("--version")
    parser.add_argument("--env")
    parser.add_argument("--weight", type=float)
    parser.add_argument("--traffic", type=float, help="percent of new clients for this version")
    parser.add_argument("--health-path")
    parser.add_argument("--health-interval", help="seconds, or a duration such as 500ms")
    parser.add_argument("--health-timeout")
    parser.add_argument("--tag", action="append", default=[], dest="tags")
    parser.add_argument("--label", action="append", default=[], dest="labels", metavar="NAME=VALUE",
                        help="any other label without its prefix, e.g. ratelimit=100/s (repeatable)")
    parser.add_argument("--ttl", type=float, default=30.0, help="lease TTL in seconds [default: 30]")
    parser.add_argument("--interval", type=float, help="seconds between heartbeats [default: TTL / 3]")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="wrapper: seconds to wait for the port to accept connections [default: 30]")
    options = parser.parse_args(argv)
    for item in options.labels:
        if "=" not in item:
            parser.error(f"--label {item!r}: NAME=VALUE expected")
    if options.ttl <= 0 or (options.interval is not None and not 0 < options.interval < options.ttl):
        parser.error("--interval must be positive and shorter than --ttl")
    return options, command


def build_body(options: argparse.Namespace) -> dict[str, Any]:
    """The registration's JSON body from the options (the API checks it)."""
    body: dict[str, Any] = {"address": options.address, "port": options.port, "ttl": options.ttl}
    for name in ("path", "version", "env", "weight", "traffic"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    if options.hosts:
        body["hosts"] = options.hosts
    if options.strip_prefix:
        body["strip_prefix"] = True
    health = {
        name: value for name, value in (
            ("path", options.health_path), ("interval", options.health_interval), ("timeout", options.health_timeout),
        ) if value is not None
    }
    if health:
        body["health"] = health
    if options.tags:
        body["tags"] = options.tags
    if options.labels:
        body["labels"] = dict(item.split("=", 1) for item in options.labels)
    return body


class _Api:
    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"{PROGRAM}: --api {url!r}: an http:// or https:// URL expected")
        self._parts = parts
        self._token = token
        self._connection: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more on a new one
            if self._connection is None:
                kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
                self._connection = kind(self._parts.hostname or "", self._parts.port, timeout=10)
            try:
                self._connection.request(method, path, payload, headers)
                response = self._connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                reply = {"error": data.decode("utf-8", "replace")}
            return response.status, reply
        raise AssertionError("unreachable")


def _say(message: str) -> None:
    print(f"labelgw register: {message}", file=sys.stderr, flush=True)


def _wait_for_port(address: str, port: int, timeout: float, child: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if child.poll() is not None:
            return False
        try:
            with socket.create_connection((address, port), timeout=1):
                return True
        except OSError:
            stop.wait(0.1)
    return False


def main(argv: Sequence[str]) -> int:
    options, command = parse_args(argv)
    token = None
    if options.token_file:
        with open(options.token_file, encoding="utf-8") as source:
            token = source.read().strip()
    api = _Api(options.api, token)
    base = f"/v1/services/{quote(options.service, safe='')}/instances/{quote(options.instance, safe='')}"
    body = build_body(options)
    interval = options.interval or options.ttl / 3
    stop = threading.Event()
    received: list[int] = []

    def on_signal(number: int, _frame: Any) -> None:
        received.append(number)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    child: subprocess.Popen[bytes] | None = None
    if command:
        child = subprocess.Popen(command)
        if not _wait_for_port(options.address, options.port, options.wait, child, stop):
            _say(f"{options.address}:{options.port} does not accept connections; not registering")
            return _stop_child(child, received)

    def register() -> bool:
        try:
            status, reply = api.call("PUT", base, body)
        except (OSError, http.client.HTTPException) as error:
            _say(f"registration API unreachable ({error}); trying again in {interval:g} s")
            return False
        if status in (200, 201):
            _say(f"registered {options.service}/{options.instance} (ttl {options.ttl:g} s)")
            return True
        where = f" ({reply['field']})" if "field" in reply else ""
        _say(f"registration refused: {status}{where}: {reply.get('error', reply)}")
        if 400 <= status < 500 and status not in (408, 429):
            raise SystemExit(2)  # the registration itself is wrong: retrying cannot help
        return False

    registered = register()
    while not stop.wait(interval):
        if child is not None and child.poll() is not None:
            _say(f"the command exited with {child.returncode}")
            break
        if not registered:
            registered = register()
            continue
        try:
            status, reply = api.call("PUT", base + "/heartbeat")
        except (OSError, http.client.HTTPException) as error:
            _say(f"heartbeat failed ({error}); trying again in {interval:g} s")
            continue
        if status == 404:
            _say("the gateway no longer knows this instance (lease expired): registering again")
            registered = register()
        elif status != 200:
            _say(f"heartbeat answered {status}: {reply.get('error', reply)}")

    try:
        status, _ = api.call("DELETE", base)
        _say(f"deregistered {options.service}/{options.instance}" if status == 200 else f"deregister answered {status}")
    except (OSError, http.client.HTTPException) as error:
        _say(f"could not deregister ({error}); the lease expires in at most {options.ttl:g} s")
    return _stop_child(child, received) if child is not None else 0


def _stop_child(child: subprocess.Popen[bytes], received: list[int]) -> int:
    if child.poll() is None:
        child.send_signal(received[0] if received else signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
