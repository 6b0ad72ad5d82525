"""A second, private Docker engine that a test may kill and restart without disturbing the suite's engine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker


class PrivateEngine:
    def __init__(self) -> None:
        # Short path: unix socket paths are limited to about 100 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="lgwe-", dir="/tmp"))
        self.socket = self.root / "d.sock"
        self.url = f"unix://{self.socket}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = open(self.root / "dockerd.log", "ab")

    def start(self, timeout: float = 60.0) -> docker.DockerClient:
        self._process = subprocess.Popen(
            [
                shutil.which("dockerd") or "dockerd",
                "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "x"),
                "--pidfile", str(self.root / "pid"), "-H", self.url, "--storage-driver", "vfs",
                "--iptables=false", "--bridge=none",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = docker.DockerClient(base_url=self.url, timeout=10)
                client.ping()
                return client
            except Exception:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"private dockerd did not start:\n{self.log_tail()}")
                time.sleep(0.2)

    def kill(self) -> None:
        """Stop the engine abruptly (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(30)
        # containerd is dockerd's child in its own session: stop it too so the next start is clean.
        subprocess.run(["pkill", "-KILL", "-f", f"containerd.*{self.root}"], check=False)
        time.sleep(0.5)
        # A killed containerd may stay a zombie where nothing reaps orphans (as in some sandboxes); its pid file
        # would make the next dockerd wait for it. On a real host init reaps it and dockerd removes the file.
        for stale in (self.socket, self.root / "x" / "containerd" / "containerd.pid", self.root / "pid"):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        subprocess.run(["pkill", "-KILL", "-f", f"containerd.*{self.root}"], check=False)
        self._log.close()
        subprocess.run(["umount", "-R", str(self.root / "x")], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"
