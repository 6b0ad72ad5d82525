"""Throw-away containers for tests: busybox ones, and ones that run a Python backend.

Every container uses the host network by default and must listen on 127.0.0.1 (the tests never
reach container bridge addresses). Everything made here is force-removed by ``cleanup()``.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from .net import LOOPBACK, port_accepts

_NS = 1_000_000_000
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shell_healthcheck(
    command: str, interval: float = 1.0, timeout: float = 1.0, retries: int = 3, start_period: float = 0.0
) -> dict[str, Any]:
    """A Docker healthcheck running ``command`` with /bin/sh (durations in seconds)."""
    return {
        "test": ["CMD-SHELL", command],
        "interval": int(interval * _NS),
        "timeout": int(timeout * _NS),
        "retries": retries,
        "start_period": int(start_period * _NS),
    }


def labelgw_is_installed() -> bool:
    """True when the test interpreter's environment has the labelgw distribution installed
    (scripts/test installs it into .venv); otherwise the working tree is put on PYTHONPATH."""
    try:
        dist = importlib.metadata.distribution("labelgw")
    except importlib.metadata.PackageNotFoundError:
        return False
    # Build metadata left in the working tree (labelgw.egg-info) is not an installation.
    return os.path.realpath(str(dist.locate_file(""))) != os.path.realpath(REPO_ROOT)


def _installation_prefix() -> str:
    """Where the real interpreter behind ``sys.executable`` lives (its stdlib and libpython)."""
    real = os.path.realpath(sys.executable)
    return os.path.dirname(os.path.dirname(real))


def python_runtime_mounts() -> list[tuple[str, str]]:
    """(host path, container path) pairs that let a busybox container run this test venv's Python."""
    wanted: list[tuple[str, str]] = [("/usr", "/usr"), ("/lib", "/lib")]
    if os.path.exists("/lib64"):
        wanted.append(("/lib64", "/lib64"))
    venv = os.path.abspath(sys.prefix)
    wanted.append((os.path.realpath(venv), venv))
    for prefix in (_installation_prefix(), os.path.realpath(sys.base_prefix)):
        wanted.append((prefix, prefix))
    if not labelgw_is_installed():
        wanted.append((REPO_ROOT, REPO_ROOT))
    mounts: list[tuple[str, str]] = []
    for source, target in wanted:
        # A path already visible through a mounted parent needs no mount of its own.
        covered = any(target == t or target.startswith(t.rstrip("/") + "/") for _, t in mounts)
        if not covered:
            mounts.append((source, target))
    return mounts


class ContainerFactory:
    def __init__(
        self, client: docker.DockerClient, image: str, new_name: Callable[[str], str]
    ) -> None:
        self.client = client
        self.image = image
        self._new_name = new_name
        self._containers: list[Container] = []
        self._networks: list[Network] = []

    def run(
        self,
        labels: Mapping[str, str] | None = None,
        command: Sequence[str] | str = ("sleep", "600"),
        network_mode: str | None = "host",
        name: str | None = None,
        healthcheck: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> Container:
        """Start a detached container from the test image (``image=`` overrides it)."""
        image = kw.pop("image", self.image)
        if network_mode is not None and "network" not in kw:
            kw["network_mode"] = network_mode
        container = self.client.containers.create(
            image,
            command=list(command) if not isinstance(command, str) else command,
            labels=dict(labels or {}),
            name=name or self._new_name("c"),
            healthcheck=dict(healthcheck) if healthcheck else None,
            **kw,
        )
        self._containers.append(container)  # tracked before start: a failed start is cleaned too
        container.start()
        container.reload()
        return container

    def python(
        self,
        command_args: Sequence[str],
        labels: Mapping[str, str] | None = None,
        environment: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> Container:
        """Run ``<test venv>/bin/python *command_args`` in a container, host network.

        E.g. ``containers.python(["-m", "labelgw.tools.whoami", "--port", "9001"], labels=...)``.
        The host's /usr, /lib, the venv and the real interpreter are bind-mounted read-only.
        """
        env = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        if not labelgw_is_installed():
            env["PYTHONPATH"] = REPO_ROOT
        env.update(environment or {})
        volumes = [f"{source}:{target}:ro" for source, target in python_runtime_mounts()]
        volumes.extend(kw.pop("volumes", []))
        python = os.path.join(os.path.abspath(sys.prefix), "bin", "python")
        return self.run(
            labels=labels,
            command=[python, *command_args],
            environment=env,
            volumes=volumes,
            working_dir=kw.pop("working_dir", "/tmp"),
            **kw,
        )

    def network(self, name: str | None = None, **kw: Any) -> Network:
        """Create a network (bridge by default) that is removed at cleanup."""
        network = self.client.networks.create(name or self._new_name("net"), **kw)
        self._networks.append(network)
        return network

    def wait_serving(
        self, container: Container, port: int, host: str = LOOPBACK, timeout: float = 20.0
    ) -> None:
        """Wait until ``host:port`` accepts connections; fail early, with the container's logs,
        if the container stops first."""
        deadline = time.monotonic() + timeout
        while not port_accepts(port, host):
            container.reload()
            if container.status not in ("created", "running"):
                raise AssertionError(
                    f"container {container.name} is {container.status} before serving on "
                    f"{host}:{port}; logs:\n{self.logs(container)}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"container {container.name} not serving on {host}:{port} after {timeout}s; "
                    f"logs:\n{self.logs(container)}"
                )
            time.sleep(0.05)

    def wait_healthy(self, container: Container, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            container.reload()
            health = container.attrs.get("State", {}).get("Health", {}).get("Status")
            if health == "healthy":
                return
            if container.status not in ("created", "running") or time.monotonic() >= deadline:
                raise AssertionError(
                    f"container {container.name} not healthy (status {container.status}, "
                    f"health {health}); logs:\n{self.logs(container)}"
                )
            time.sleep(0.1)

    @staticmethod
    def logs(container: Container) -> str:
        try:
            return container.logs().decode("utf-8", errors="replace")
        except docker.errors.APIError as e:
            return f"<logs unavailable: {e}>"

    def cleanup(self) -> None:
        for container in reversed(self._containers):
            try:
                container.remove(force=True, v=True)
            except docker.errors.APIError:
                pass  # gone already; the session sweep catches anything stuck
        self._containers.clear()
        for network in reversed(self._networks):
            try:
                network.remove()
            except docker.errors.APIError:
                pass
        self._networks.clear()
