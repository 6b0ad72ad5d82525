"""compose-examples/: every file is valid Compose, and the basic stack runs with the right labels."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import docker
import pytest

from support import TwistdProcess, free_port, http_get, is_ci, wait_for_port

EXAMPLES = Path(__file__).resolve().parent.parent / "compose-examples"
COMPOSE_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yml", ".yaml"))
BASIC = EXAMPLES / "basic" / "docker-compose.yml"

# service -> (port variable, labels without labelgw.port, body served)
BASIC_SERVICES = {
    "web-1": ("LABELGW_EXAMPLE_WEB_1_PORT", {"labelgw.service": "web"}, b"web-1\n"),
    "web-2": ("LABELGW_EXAMPLE_WEB_2_PORT", {"labelgw.service": "web"}, b"web-2\n"),
    "api-v1": ("LABELGW_EXAMPLE_API_V1_PORT", {"labelgw.service": "api", "labelgw.version": "v1"}, b"api v1\n"),
    "api-v2": ("LABELGW_EXAMPLE_API_V2_PORT", {"labelgw.service": "api", "labelgw.version": "v2"}, b"api v2\n"),
}


def compose_command() -> list[str]:
    """docker-compose (v1, Debian's package), else the `docker compose` plugin; skip or fail if none."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    reason = "neither docker-compose nor the docker compose plugin is installed"
    if is_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def run_compose(args: list[str], env: dict[str, str] | None = None, timeout: float = 180) -> str:
    command = [*compose_command(), *args]
    result = subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def test_there_are_examples() -> None:
    assert BASIC in COMPOSE_FILES


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_compose_file_is_valid(compose_file: Path) -> None:
    run_compose(["-f", str(compose_file), "config", "-q"])


def test_basic_with_the_gateway_is_valid() -> None:
    run_compose(["-f", str(BASIC), "-f", str(BASIC.parent / "gateway.yml"), "config", "-q"])


@dataclass(frozen=True)
class ComposeProject:
    name: str
    ports: dict[str, int]  # compose service -> port it listens on (127.0.0.1)


@pytest.fixture(scope="module")
def compose_project(
    docker_client: docker.DockerClient, busybox_image: str, unique_name: Callable[..., str]
) -> Iterator[ComposeProject]:
    """compose-examples/basic up (local busybox image, free ports); `down -v` afterwards."""
    project = ComposeProject(unique_name("basic"), {s: free_port() for s in BASIC_SERVICES})
    env = dict(os.environ, LABELGW_EXAMPLE_IMAGE=busybox_image)
    for service, (variable, _, _) in BASIC_SERVICES.items():
        env[variable] = str(project.ports[service])
    base = ["-p", project.name, "-f", str(BASIC)]
    try:
        run_compose([*base, "up", "-d"], env=env)
        yield project
    finally:
        run_compose([*base, "down", "-v", "--remove-orphans", "-t", "1"], env=env)


def test_basic_stack_runs_with_the_right_labels(
    compose_project: ComposeProject, docker_client: docker.DockerClient
) -> None:
    running = docker_client.containers.list(
        filters={"label": f"com.docker.compose.project={compose_project.name}"}
    )
    by_service = {c.labels["com.docker.compose.service"]: c for c in running}
    assert sorted(by_service) == sorted(BASIC_SERVICES)
    for service, (_, labels, body) in BASIC_SERVICES.items():
        container = by_service[service]
        port = compose_project.ports[service]
        assert container.status == "running"
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        labelgw_labels = {k: v for k, v in container.labels.items() if k.startswith("labelgw.")}
        assert labelgw_labels == {**labels, "labelgw.port": str(port)}
        wait_for_port(port, timeout=20)
        assert http_get(f"http://127.0.0.1:{port}/").body == body


def test_basic_stack_is_routed_through_labelgw(
    compose_project: ComposeProject, labelgw: Callable[..., TwistdProcess]
) -> None:
    for port in compose_project.ports.values():
        wait_for_port(port, timeout=20)
    gateway = labelgw()

    # Routes appear once the watcher has listed the containers.
    deadline = time.monotonic() + 15
    while http_get(gateway.base_url + "/", host="web.localhost").status != 200:
        assert time.monotonic() < deadline, gateway.log_text()
        time.sleep(0.1)

    # Both replicas take traffic. wrt sends to the faster-looking one while their estimates differ by more
    # than 20 % (a cold first request on a loaded machine does that), so ask until both answered, bounded.
    web = []
    while {r.body for r in web} != {b"web-1\n", b"web-2\n"} and len(web) < 200:
        web.append(http_get(gateway.base_url + "/", host="web.localhost"))
    assert [r.status for r in web] == [200] * len(web)
    assert {r.body for r in web} == {b"web-1\n", b"web-2\n"}

    api = [http_get(gateway.base_url + "/", host="api.localhost") for _ in range(6)]
    assert [r.status for r in api] == [200] * 6
    assert {r.body for r in api} <= {b"api v1\n", b"api v2\n"}

    assert http_get(gateway.base_url + "/", host="nope.localhost").status == 404
