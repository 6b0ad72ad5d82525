"""labelgw.core.labels against live inspect data from the Docker engine. Sends no traffic to any container.

Needs the `docker_client` (docker.DockerClient) and `unique_name` (callable returning a fresh name) fixtures
from tests/conftest.py.
"""

from __future__ import annotations

from typing import Any, Callable

from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec

TEST_IMAGE = "labelgw-test-busybox"


def test_network_label_picks_that_networks_address(docker_client: Any, unique_name: Callable[[], str]) -> None:
    first_name, second_name = unique_name(), unique_name()
    networks_made: list[Any] = []
    containers_made: list[Any] = []
    try:
        first = docker_client.networks.create(first_name, driver="bridge")
        networks_made.append(first)
        second = docker_client.networks.create(second_name, driver="bridge")
        networks_made.append(second)
        # The port comes from a label: publishing a port would open a listener on the host.
        container = docker_client.containers.create(
            TEST_IMAGE,
            ["sleep", "3600"],
            name=unique_name(),
            network=first_name,
            labels={"labelgw.service": "live", "labelgw.port": "8080", "labelgw.network": second_name},
        )
        containers_made.append(container)
        second.connect(container)
        container.start()

        inspect = docker_client.api.inspect_container(container.id)
        networks = inspect["NetworkSettings"]["Networks"]
        assert set(networks) == {first_name, second_name}
        first_address = networks[first_name]["IPAddress"]
        second_address = networks[second_name]["IPAddress"]
        assert first_address and second_address and first_address != second_address

        spec = parse_container(inspect)
        assert isinstance(spec, ContainerSpec), spec
        assert spec.address == second_address
        assert spec.container_id == container.id
        assert (spec.service, spec.port, spec.running) == ("live", 8080, True)

        # Without the label, the gateway's own network decides; the live data must support that too.
        spec_shared = parse_container(
            {**inspect, "Config": {**inspect["Config"], "Labels": {"labelgw.service": "live", "labelgw.port": "8080"}}},
            own_networks=frozenset({second_name}),
        )
        assert isinstance(spec_shared, ContainerSpec) and spec_shared.address == second_address
    finally:
        # Containers first: a network with an attached container cannot be removed.
        for made in containers_made:
            made.remove(force=True)
        for network in networks_made:
            network.remove()
