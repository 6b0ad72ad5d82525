"""A real etcd cluster on loopback ports for end-to-end tests (Debian's etcd-server package: /usr/bin/etcd).

`EtcdCluster(base, size=3)` starts `size` members in their own data directories, each with a client port and a
peer port on 127.0.0.1; `kill(i)` stops one with SIGKILL, `start(i)` brings it back with its data (it rejoins),
`stop()` ends them all. Fast raft timings (50 ms heartbeats, 500 ms elections) keep failover quick in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .net import LOOPBACK, free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK)


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        self.size = size
        self.client_ports = [free_port() for _ in range(size)]
        self.peer_ports = [free_port() for _ in range(size)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * size
        self.initial = ",".join(f"m{i}=http://{LOOPBACK}:{self.peer_ports[i]}" for i in range(size))
        for index in range(size):
            self.start(index, new=True)
        self.wait_healthy()

    def url(self, index: int) -> str:
        return f"http://{LOOPBACK}:{self.client_ports[index]}"

    def endpoints(self, order: list[int] | None = None) -> str:
        """`etcd://HOST:PORT,...` for --registry, members in `order`."""
        indexes = order if order is not None else list(range(self.size))
        return "etcd://" + ",".join(f"{LOOPBACK}:{self.client_ports[i]}" for i in indexes)

    def start(self, index: int, new: bool = False) -> None:
        data = self.base / f"m{index}"
        client = f"http://{LOOPBACK}:{self.client_ports[index]}"
        peer = f"http://{LOOPBACK}:{self.peer_ports[index]}"
        log = open(self.base / f"m{index}.log", "ab")
        self.processes[index] = subprocess.Popen(
            [
                ETCD, "--name", f"m{index}", "--data-dir", str(data),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.initial, "--initial-cluster-token", f"lgw-{self.base.name}",
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        self.processes[index] = None

    def healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(self.url(index) + "/health", timeout=1) as response:
                return json.loads(response.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, indexes: list[int] | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        wanted = indexes if indexes is not None else [i for i in range(self.size) if self.processes[i] is not None]
        while not all(self.healthy(i) for i in wanted):
            for i in wanted:
                process = self.processes[i]
                if process is None or process.poll() is not None:
                    raise AssertionError(f"etcd member m{i} exited:\n{(self.base / f'm{i}.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd members {wanted} not healthy after {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for index in range(self.size):
            process = self.processes[index]
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.processes[index] = None
