"""End to end: dot segments and encoded slashes against path-prefix routes, through the real `twistd -n labelgw`
(static services, no Docker watcher) to real labelgw.tools.whoami backends that echo the request line they received.
Loopback only; one gateway and three backends for the whole module."""

from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest

from support import TwistdProcess, free_port, labelgw_args, raw_exchange, wait_for_port
from support.net import LOOPBACK

pytestmark = pytest.mark.docker  # runs the real product (the suite's marker for that), needs no engine

HOST = "paths.localhost"
# service -> (path prefix, strip_prefix)
SERVICES = {"root": ("/", False), "public": ("/public", False), "api": ("/api", True)}


class World:
    def __init__(self, gateway: TwistdProcess) -> None:
        self.gateway = gateway

    def send(self, request_line: bytes, host: bytes = HOST.encode()) -> tuple[int, str | None, str]:
        """One request on a fresh connection: (status, the backend that answered, the request line it saw)."""
        raw = raw_exchange(
            self.gateway.port, request_line + b"\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n", timeout=10
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        name = None
        for line in head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.lower() == b"x-whoami":
                name = value.strip().decode()
        lines = body.decode("latin-1").splitlines()
        return status, name, lines[2] if name is not None and len(lines) > 2 else body.decode("latin-1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("e2e-paths")
    backends: list[subprocess.Popen[bytes]] = []
    gateway = None
    try:
        services = []
        for name, (prefix, strip) in SERVICES.items():
            port = free_port()
            backends.append(subprocess.Popen(
                [sys.executable, "-m", "labelgw.tools.whoami", "--host", LOOPBACK, "--port", str(port), "--name", name],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            wait_for_port(port)
            services.append(
                f"  {name}:\n    hosts: [{HOST}]\n    path: {prefix}\n    strip_prefix: {str(strip).lower()}\n"
                f'    backends: ["{LOOPBACK}:{port}"]\n'
            )
        config = base / "labelgw.yaml"
        config.write_text("docker: false\nservices:\n" + "".join(services))
        port = free_port()
        gateway = TwistdProcess(
            labelgw_args(port, None, ["--config", str(config), "--https", "none", "--admin", "none"]),
            port=port, cwd=base / "gateway",
        )
        gateway.wait_until_listening()
        yield World(gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        for backend in backends:
            backend.terminate()
            backend.wait(10)


@pytest.mark.parametrize(
    ("target", "backend", "received"),
    [
        # Already normal: byte for byte.
        (b"/public/a.css?x=/../y", "public", b"/public/a.css?x=/../y"),
        (b"/api/users?q=1", "api", b"/users?q=1"),
        # "..": routed and forwarded resolved, never to the prefix it was sent under.
        (b"/public/../admin", "root", b"/admin"),
        (b"/api/../admin", "root", b"/admin"),
        (b"/public/x/../../api/users", "api", b"/users"),
        # ".": dropped.
        (b"/public/./a", "public", b"/public/a"),
        (b"/api/./users/.", "api", b"/users/"),
        # Encoded dots, every case.
        (b"/public/%2e%2e/admin", "root", b"/admin"),
        (b"/public/%2E%2e/api/x", "api", b"/x"),
        (b"/public/.%2e/admin", "root", b"/admin"),
        # An encoded slash separates for matching and stays encoded upstream (stripped at it).
        (b"/api%2Fusers", "api", b"/users"),
        (b"/public%2Fa", "public", b"/public%2Fa"),
        # Double slashes merged.
        (b"//public//a", "public", b"/public/a"),
        (b"/api//users", "api", b"/users"),
        # The query is the client's.
        (b"/api/../public/x?next=/../%2e%2e", "public", b"/public/x?next=/../%2e%2e"),
    ],
)
def test_backends_receive_the_normal_path(world: World, target: bytes, backend: str, received: bytes) -> None:
    status, name, line = world.send(b"GET " + target + b" HTTP/1.1")
    assert (status, name, line) == (200, backend, "GET " + received.decode() + " HTTP/1.1")


@pytest.mark.parametrize(
    "target",
    [b"/../admin", b"/public/../../admin", b"/public%2F..%2Fadmin", b"/api/..%2f", b"/public/..;/admin",
     b"/public\\..\\admin"],
)
def test_paths_that_could_leave_their_prefix_are_refused(world: World, target: bytes) -> None:
    status, name, body = world.send(b"GET " + target + b" HTTP/1.1")
    assert (status, name) == (400, None)
    assert body.startswith("labelgw: ")


def test_absolute_form_and_options_asterisk(world: World) -> None:
    assert world.send(b"GET http://paths.localhost/api/%2e%2e/public/x?y HTTP/1.1", host=b"ignored") == (
        200, "public", "GET /public/x?y HTTP/1.1"
    )
    # twisted.web answers "OPTIONS *" itself, without whoami's X-Whoami: a 200 means it reached the root backend
    # (the only route a "*" can match) as it was sent.
    assert world.send(b"OPTIONS * HTTP/1.1") == (200, None, "")
