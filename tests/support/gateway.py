"""Run twistd (the real labelgw, or another twistd plugin as a stand-in) as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from .containers import REPO_ROOT, labelgw_is_installed
from .net import LOOPBACK, free_port, port_accepts

START_TIMEOUT = 20.0
STOP_GRACE = 10.0


class GatewayStartError(AssertionError):
    """twistd exited or never accepted connections; the message carries its log."""


def venv_script(name: str) -> str:
    """A console script of the test interpreter's environment (e.g. .venv/bin/twistd)."""
    return os.path.join(os.path.abspath(sys.prefix), "bin", name)


def twistd_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if not labelgw_is_installed():
        # A venv without labelgw (e.g. the shared dev venv): run the working tree instead.
        # twisted.plugins picks up <repo>/twisted/plugins from sys.path (it has no __init__.py).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


class TwistdProcess:
    """``twistd <args>`` started in ``cwd`` with stdout+stderr going to ``cwd/twistd.out``."""

    def __init__(
        self,
        twistd_args: Sequence[str],
        port: int,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        host: str = LOOPBACK,
    ) -> None:
        self.port = port
        self.host = host
        self.cwd = cwd
        self.args = [venv_script("twistd"), *twistd_args]
        self.log_path = cwd / "twistd.out"
        cwd.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=twistd_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on pytest must not kill it before teardown
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def option(self, name: str) -> str | None:
        """The first value given to ``name`` (e.g. "--https") on the command line, or None."""
        for index, arg in enumerate(self.args):
            if arg == name and index + 1 < len(self.args):
                return self.args[index + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
        return None

    @property
    def https_port(self) -> int | None:
        """The port of the first ``--https tcp:PORT...`` listener (None without one)."""
        endpoint = self.option("--https")
        if endpoint is None or not endpoint.startswith("tcp:"):
            return None
        return int(endpoint.split(":")[1])

    @property
    def https_url(self) -> str:
        assert self.https_port is not None, "this gateway has no --https tcp: listener"
        return f"https://{self.host}:{self.https_port}"

    @property
    def admin_url(self) -> str | None:
        """The admin JSON view of the ``--admin tcp:PORT...`` listener (None with ``--admin none``)."""
        endpoint = self.option("--admin")
        if endpoint is None or not endpoint.startswith("tcp:"):
            return None
        return f"http://{self.host}:{int(endpoint.split(':')[1])}"

    @property
    def state_dir(self) -> Path | None:
        """``--state-dir``, resolved against the gateway's cwd: where its local CA lives (ca.pem)."""
        value = self.option("--state-dir")
        return None if value is None else self.cwd / value

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_mark(self) -> int:
        """An offset for ``wait_for_log(..., since=mark)``: only text logged after now counts."""
        return len(self.log_text())

    def _describe(self, problem: str) -> str:
        return (
            f"{problem}\ncommand: {' '.join(self.args)}\ncwd: {self.cwd}\n"
            f"--- log ({self.log_path}) ---\n{self.log_text()}--- end of log ---"
        )

    def _listening_ports(self) -> list[int]:
        """The HTTP port, then the first --https and the --admin tcp: ports given (labelgw starts its listeners in
        that order: the HTTP one accepting says nothing yet of the others, and a test that connects to the HTTPS
        port at once would find it refused on a loaded machine)."""
        ports = [self.port]
        for name in ("--https", "--admin"):
            endpoint = self.option(name)
            if endpoint is not None and endpoint.startswith("tcp:"):
                number = endpoint.split(":")[1]
                if number.isdigit() and int(number) > 0:
                    ports.append(int(number))
        return ports

    def wait_until_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for port in self._listening_ports():
            while not port_accepts(port, self.host, timeout=0.2):
                code = self.process.poll()
                if code is not None:
                    raise GatewayStartError(self._describe(f"twistd exited with code {code} before listening"))
                if time.monotonic() >= deadline:
                    self.stop()
                    raise GatewayStartError(
                        self._describe(f"twistd not listening on {self.host}:{port} after {timeout}s")
                    )
                time.sleep(0.05)

    def wait_for_log(self, substring: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until ``substring`` appears in the log (after offset ``since``); returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if substring in text[since:]:
                return text
            if self.process.poll() is not None:
                raise AssertionError(
                    self._describe(f"twistd exited ({self.process.returncode}) without logging {substring!r}")
                )
            if time.monotonic() >= deadline:
                raise AssertionError(self._describe(f"{substring!r} not logged within {timeout}s"))
            time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log_file.closed:
            self._log_file.close()
        return self.process.returncode


def labelgw_args(port: int, docker_host: str | None, extra: Sequence[str] = ()) -> list[str]:
    """The command line of a test gateway. Unless ``extra`` says otherwise, HTTPS listens on a free loopback
    port (never the shared default 8443), the local CA lives in ``state`` under the gateway's cwd (never in
    ~/.local/share), and the admin view listens on a free loopback port (``gateway.admin_url``)."""
    args = ["-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface={LOOPBACK}"]
    if docker_host is not None:
        args += ["--docker-host", docker_host]
    given = {arg.split("=", 1)[0] for arg in extra}
    if "--https" not in given:
        args += ["--https", f"tcp:{free_port()}:interface={LOOPBACK}"]
    if "--state-dir" not in given:
        args += ["--state-dir", "state"]
    if "--admin" not in given:
        # Never the shared default 8081: several gateways run at once or one after another.
        args += ["--admin", f"tcp:{free_port()}:interface={LOOPBACK}"]
    return [*args, *extra]
