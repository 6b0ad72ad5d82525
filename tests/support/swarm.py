"""A single-node Docker Swarm on loopback, in an engine of its own (so the suite's engine never becomes a manager).

`SwarmEngine().start()` runs a second private dockerd (tests/support/engine.py), imports the test image, creates
`docker_gwbridge` itself (a /24 of its own, masquerade and inter-container traffic off, its own bridge name) and
runs `docker swarm init` listening and advertising on 127.0.0.1 with free ports. Services that serve use the host
network on 127.0.0.1 ports: nothing here ever sends traffic to a bridge or overlay address.

Swarm's gossip port (7946) cannot be chosen, so two swarms on one machine would collide: a file lock lets one
SwarmEngine exist at a time (another test run waits for it).
"""

from __future__ import annotations

import fcntl
import json
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import docker
import docker.errors
import docker.types

from .engine import PrivateEngine
from .images import BUSYBOX_IMAGE, ensure_busybox_image
from .net import LOOPBACK, free_port

LOCK_FILE = "/tmp/labelgw-test-swarm.lock"


class SwarmEngine:
    def __init__(self, lock_timeout: float = 600.0) -> None:
        self.engine = PrivateEngine()
        self.url = self.engine.url
        self.client: docker.DockerClient | None = None
        self._lock_timeout = lock_timeout
        self._lock: Any = None
        self.bridge = f"lgws{random.randrange(16**4):04x}"
        self.subnet = f"10.254.{random.randrange(100, 250)}.0/24"
        self.listen_port = free_port()

    @property
    def api(self) -> docker.APIClient:
        assert self.client is not None
        return self.client.api

    def start(self) -> "SwarmEngine":
        self._lock = open(LOCK_FILE, "w")
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another test swarm held {LOCK_FILE} for {self._lock_timeout}s")
                time.sleep(0.5)
        self.client = self.engine.start()
        ensure_busybox_image(self.client)
        self.client.networks.create(
            "docker_gwbridge",
            driver="bridge",
            ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=self.subnet)]),
            options={
                "com.docker.network.bridge.name": self.bridge,
                "com.docker.network.bridge.enable_icc": "false",
                "com.docker.network.bridge.enable_ip_masquerade": "false",
            },
        )
        self.init()
        return self

    def init(self) -> None:
        address = f"{LOOPBACK}:{self.listen_port}"
        assert self.client is not None
        self.client.swarm.init(
            listen_addr=address, advertise_addr=address, data_path_port=_free_udp_port(), force_new_cluster=False
        )

    def leave(self) -> None:
        assert self.client is not None
        # Leaving waits for the node's raft to stop: seconds on a loaded machine, past the client's 10 s default.
        slow = docker.DockerClient(base_url=self.engine.url, timeout=60)
        try:
            slow.swarm.leave(force=True)
        finally:
            slow.close()

    def stop(self) -> None:
        try:
            if self.client is not None:
                try:
                    self.client.swarm.leave(force=True)
                except docker.errors.APIError:
                    pass  # not in a swarm any more
                self.client.close()
            self.engine.stop()
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock

    # Services: host network, loopback ports, the test image.

    def http_service(
        self,
        name: str,
        port: int,
        labels: Mapping[str, str],
        *,
        body: str | None = None,
        replicas: int = 1,
        order: str = "start-first",
        stop_grace_s: float = 2.0,
    ) -> str:
        """A busybox httpd on 127.0.0.1:port answering `body` (default: the name) at /; returns the service id."""
        service = self.api.create_service(
            docker.types.TaskTemplate(
                container_spec=docker.types.ContainerSpec(
                    BUSYBOX_IMAGE, command=httpd_command(port, body or name),
                    stop_grace_period=int(stop_grace_s * 1e9),
                ),
                networks=["host"],
                restart_policy=docker.types.RestartPolicy(condition="any", delay=int(0.5e9)),
            ),
            name=name,
            labels=dict(labels),
            mode=docker.types.ServiceMode("replicated", replicas),
            update_config=docker.types.UpdateConfig(order=order, monitor=int(1e9)),
        )
        return str(service["ID"])

    def update_http_service(self, service_id: str, port: int, labels: Mapping[str, str], body: str) -> None:
        """A rolling update to a new port and answer (the spec's update order applies)."""
        current = self.api.inspect_service(service_id)
        spec = current["Spec"]
        template = spec["TaskTemplate"]
        template["ContainerSpec"]["Command"] = httpd_command(port, body)
        self.api.update_service(
            service_id, current["Version"]["Index"], task_template=template, name=spec["Name"],
            labels=dict(labels), mode=spec["Mode"], update_config=spec.get("UpdateConfig"),
            fetch_current_spec=False,
        )

    def scale(self, service_id: str, replicas: int) -> None:
        current = self.api.inspect_service(service_id)
        self.api.update_service(
            service_id, current["Version"]["Index"], mode=docker.types.ServiceMode("replicated", replicas),
            fetch_current_spec=True,
        )

    def update_state(self, service_id: str) -> str:
        return str((self.api.inspect_service(service_id).get("UpdateStatus") or {}).get("State") or "")

    def tasks(self, service_id: str) -> list[dict[str, Any]]:
        return list(self.api.tasks(filters={"service": service_id}))

    def capture(self, service_id: str, path: Path) -> None:
        """Write `docker service inspect` and the tasks as JSON test data (tests/data/swarm/)."""
        data = {"service": self.api.inspect_service(service_id), "tasks": self.tasks(service_id)}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def httpd_command(port: int, body: str) -> Sequence[str]:
    page = body.replace("'", "")
    return ["sh", "-c", f"echo '{page}' > /www/index.html && exec httpd -f -p {LOOPBACK}:{port} -h /www"]


def _free_udp_port() -> int:
    """A free UDP port in the range Swarm accepts for its data path (1024-49151)."""
    import socket

    for _ in range(100):
        port = random.randrange(40000, 49151)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free UDP port for the swarm data path")


def running_tasks(tasks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [t for t in tasks if (t.get("Status") or {}).get("State") == "running" and t.get("DesiredState") == "running"]

