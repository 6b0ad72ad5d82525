"""Helpers shared by the test suite (fixtures live in tests/conftest.py).

Import as ``from support import http_get, free_port`` (pytest puts tests/ on sys.path).
"""

from .containers import ContainerFactory, python_runtime_mounts, shell_healthcheck
from .dockerenv import NAME_PREFIX, NameFactory, connect_docker, docker_host_url, is_ci
from .gateway import GatewayStartError, TwistdProcess, labelgw_args
from .images import BUSYBOX_IMAGE, ensure_busybox_image
from .net import (
    LOOPBACK,
    Response,
    free_port,
    http_get,
    port_accepts,
    raw_exchange,
    wait_for_port,
    wait_until,
)

__all__ = [
    "BUSYBOX_IMAGE",
    "LOOPBACK",
    "NAME_PREFIX",
    "ContainerFactory",
    "GatewayStartError",
    "NameFactory",
    "Response",
    "TwistdProcess",
    "connect_docker",
    "docker_host_url",
    "ensure_busybox_image",
    "free_port",
    "http_get",
    "is_ci",
    "labelgw_args",
    "port_accepts",
    "python_runtime_mounts",
    "raw_exchange",
    "shell_healthcheck",
    "wait_for_port",
    "wait_until",
]
