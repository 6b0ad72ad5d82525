"""compose-examples/swarm/stack.yml: valid for `docker stack config` (else docker-compose config), labelgw on the
managers only with the socket mounted, and the app's deploy.labels routed by the same label parser."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec
from labelgw.docker.swarm import service_outcomes

STACK = Path(__file__).resolve().parent.parent / "compose-examples" / "swarm" / "stack.yml"
ENV = {**os.environ, "DOCKER_GID": "4242"}


def rendered() -> dict[str, Any]:
    if shutil.which("docker") and subprocess.run(
        ["docker", "stack", "config", "--help"], capture_output=True, timeout=30
    ).returncode == 0:
        command = ["docker", "stack", "config", "-c", str(STACK)]
    elif shutil.which("docker-compose"):
        command = ["docker-compose", "-f", str(STACK), "config"]
    else:
        pytest.skip("neither `docker stack config` nor docker-compose is installed")
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_labelgw_runs_once_per_manager_with_the_socket_and_swarm_mode() -> None:
    gateway = rendered()["services"]["labelgw"]
    assert gateway["deploy"]["mode"] == "global"
    assert gateway["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    assert "--swarm" in gateway["command"]
    mounts = gateway["volumes"]
    assert any(
        (m if isinstance(m, str) else f"{m['source']}:{m['target']}").startswith("/var/run/docker.sock:/var/run/docker.sock")
        for m in mounts
    )
    assert {port["mode"] for port in gateway["ports"]} == {"host"}


def test_the_app_labels_are_deploy_labels_that_labelgw_routes() -> None:
    config = rendered()
    app = config["services"]["whoami"]
    assert "labels" not in app  # container labels would be ignored with --swarm
    labels = app["deploy"]["labels"]
    network = config["networks"]["web"]["name"]
    assert labels["labelgw.network"] == network
    assert app["deploy"]["update_config"]["order"] == "start-first"
    service = {"ID": "svc", "Spec": {"Name": "demo_whoami", "Labels": labels}}
    task = {
        "ID": "task1", "ServiceID": "svc", "Slot": 1, "NodeID": "node1", "DesiredState": "running",
        "Status": {"State": "running", "Timestamp": "2026-01-01T00:00:00Z"},
        "NetworksAttachments": [{"Network": {"Spec": {"Name": network}}, "Addresses": ["192.0.2.10/24"]}],
    }
    spec = service_outcomes(service, [task], {}, parse_container)["task1"]
    assert isinstance(spec, ContainerSpec)
    assert (spec.service, spec.port, spec.address, spec.ready) == ("whoami", 8000, "192.0.2.10", True)
