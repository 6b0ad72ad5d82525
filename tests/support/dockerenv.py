"""Reaching the Docker engine, naming test objects, and sweeping up after them."""

from __future__ import annotations

import itertools
import os
import re
import secrets

import docker
import docker.errors

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
NAME_PREFIX = "lgwtest-"
# lgwtest-<pid of the pytest process>-<random>-<hint>-<n>: the pid lets a later session tell
# leftovers of a dead session from objects of a session that is still running on the same engine.
_NAME_PATTERN = re.compile(r"^/?lgwtest-(\d+)-")


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def docker_host_url() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def connect_docker(timeout: float = 30.0) -> tuple[docker.DockerClient | None, str]:
    """(client, "") when the engine answers a ping, else (None, why not)."""
    url = docker_host_url()
    try:
        client = docker.DockerClient(base_url=url, timeout=timeout)
    except docker.errors.DockerException as e:
        return None, f"cannot create a Docker client for {url}: {e}"
    try:
        client.ping()
    except Exception as e:  # requests/urllib3 errors, refused socket, missing socket file...
        client.close()
        return None, f"no Docker engine answers at {url}: {e}"
    return client, ""


class NameFactory:
    """Unique, recognisable names for containers, networks and compose projects."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._token = secrets.token_hex(2)
        self._counter = itertools.count(1)

    @property
    def session_prefix(self) -> str:
        return f"{NAME_PREFIX}{self.pid}-{self._token}-"

    def __call__(self, hint: str = "c") -> str:
        clean = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-") or "c"
        return f"{self.session_prefix}{clean}-{next(self._counter)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_leftover(name: str, own_prefix: str | None) -> bool:
    """Own objects (``own_prefix``), or lgwtest- objects whose creating process is gone."""
    name = name.lstrip("/")
    if own_prefix is not None:
        return name.startswith(own_prefix)
    match = _NAME_PATTERN.match(name)
    if match is None:
        return name.startswith(NAME_PREFIX)  # not made by NameFactory: nobody owns it
    return not _pid_alive(int(match.group(1)))


def remove_leftovers(client: docker.DockerClient, own_prefix: str | None = None) -> list[str]:
    """Force-remove lgwtest- containers and networks: this session's own when ``own_prefix`` is
    given, else those of dead sessions. Returns the removed names."""
    removed: list[str] = []
    for container in client.containers.list(all=True, filters={"name": NAME_PREFIX}):
        if _is_leftover(container.name, own_prefix):
            try:
                container.remove(force=True, v=True)
                removed.append(container.name)
            except docker.errors.APIError:
                pass  # already gone, or being removed by its owner right now
    for network in client.networks.list(names=[NAME_PREFIX]):
        if _is_leftover(network.name, own_prefix):
            try:
                network.remove()
                removed.append(network.name)
            except docker.errors.APIError:
                pass  # already gone, or still has an endpoint: best effort
    return removed
