"""compose-examples/: every file is valid Compose, and the basic stack runs with the right labels."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import docker
import pytest
import yaml

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


# The gateway's files need the Docker socket's group, which they do not guess (see gateway.yml).
GID_ENV = {**os.environ, "DOCKER_GID": "4242"}
GATEWAY = BASIC.parent / "gateway.yml"
BRIDGE = EXAMPLES / "bridge" / "docker-compose.yml"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_compose_file_is_valid(compose_file: Path) -> None:
    run_compose(["-f", str(compose_file), "config", "-q"], env=GID_ENV)


def test_basic_with_the_gateway_is_valid() -> None:
    run_compose(["-f", str(BASIC), "-f", str(GATEWAY), "config", "-q"], env=GID_ENV)


def _gateway_service(*files: Path) -> dict[str, Any]:
    args = [arg for path in files for arg in ("-f", str(path))]
    config = yaml.safe_load(run_compose([*args, "config"], env=GID_ENV))
    return dict(config["services"]["labelgw"], _volumes=config.get("volumes") or {})


@pytest.mark.parametrize("files", [(BASIC, GATEWAY), (BRIDGE,)], ids=["host-network", "bridge"])
def test_gateway_group_is_the_sockets_not_a_guess(files: tuple[Path, ...]) -> None:
    service = _gateway_service(*files)
    assert [str(gid) for gid in service["group_add"]] == ["4242"]
    # Without DOCKER_GID, Compose refuses and says what to set, instead of using a group that may be wrong.
    command = [*compose_command(), *[a for p in files for a in ("-f", str(p))], "config", "-q"]
    env = {key: value for key, value in os.environ.items() if key != "DOCKER_GID"}
    result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "DOCKER_GID" in result.stderr and "stat -c %g" in result.stderr


@pytest.mark.parametrize("files", [(BASIC, GATEWAY), (BRIDGE,)], ids=["host-network", "bridge"])
def test_gateway_state_dir_is_a_named_volume(files: tuple[Path, ...]) -> None:
    service = _gateway_service(*files)
    volumes = [str(v) if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in service["volumes"]]
    state = [v for v in volumes if "/home/labelgw/.local/share/labelgw" in v]
    assert len(state) == 1 and state[0].split(":")[0] == "labelgw-state", volumes
    assert "labelgw-state" in service["_volumes"]


def _option_values(command: list[str], option: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == option]


def _interface(endpoint: str) -> str | None:
    for part in endpoint.split(":")[2:]:
        if part.startswith("interface="):
            return part[len("interface="):]
    return None


@pytest.mark.parametrize("files", [(BASIC, GATEWAY), (BRIDGE,)], ids=["host-network", "bridge"])
def test_gateway_https_binds_the_interface_of_http(files: tuple[Path, ...]) -> None:
    command = [str(arg) for arg in _gateway_service(*files)["command"]]
    [http] = _option_values(command, "--http")
    [https] = _option_values(command, "--https")
    assert _interface(https) == _interface(http)


def test_bridge_example_shares_one_network_and_publishes_only_labelgw() -> None:
    config = yaml.safe_load(run_compose(["-f", str(BRIDGE), "config"], env=GID_ENV))
    services = config["services"]
    assert "network_mode" not in services["labelgw"]
    network = config["networks"]["web"]["name"]
    for name, service in services.items():
        assert "web" in service["networks"], name
        if name != "labelgw":
            assert "ports" not in service, name
            assert service["labels"]["labelgw.network"] == network
    # Published on the host's loopback only.
    ports = services["labelgw"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") or (isinstance(p, dict) and p.get("host_ip") == "127.0.0.1")
                         for p in ports), ports


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
