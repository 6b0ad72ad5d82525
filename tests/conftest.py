"""Fixtures for the whole suite.

Markers: ``docker`` is put automatically on every test that uses an engine or the real product
(``pytest -m "not docker"`` runs the unit tests only). Without a reachable engine those tests skip,
except under CI=true, where they fail.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Iterator

import docker
import pytest

from support import (
    BUSYBOX_IMAGE,
    ContainerFactory,
    NameFactory,
    TwistdProcess,
    connect_docker,
    docker_host_url,
    ensure_busybox_image,
    free_port,
    is_ci,
    labelgw_args,
)
from support.dockerenv import remove_leftovers

# Fixtures that need the Docker engine or start the real product: their tests get the marker.
DOCKER_FIXTURES = frozenset(
    {"docker_client", "docker_api", "busybox_image", "containers", "labelgw", "compose_project"}
)

_names = NameFactory()

# TLS engines (--tls-engine): every test of these modules runs on each; elsewhere the engine is
# $LABELGW_TEST_TLS_ENGINE, else labelgw's default. A module opts in by using the ``tls_engine`` fixture (directly,
# or through ``labelgw``).
TLS_ENGINES = ("stdlib", "openssl")
TLS_ENGINE_MODULES = frozenset(
    {"test_e2e_tls", "test_e2e_tls_deadlines", "test_e2e_h2", "test_tls_deadlines", "test_stdtls", "test_e2e_stdtls"}
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tls_engine" in metafunc.fixturenames and metafunc.module.__name__.rpartition(".")[2] in TLS_ENGINE_MODULES:
        metafunc.parametrize("tls_engine", TLS_ENGINES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def tls_engine(request: pytest.FixtureRequest) -> str | None:
    """The TLS engine under test ("stdlib" or "openssl"); None: labelgw's default, and no option given (a stand-in
    product may not know it)."""
    return getattr(request, "param", None) or os.environ.get("LABELGW_TEST_TLS_ENGINE") or None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "docker: needs a Docker engine and/or runs the real product (applied automatically; "
        'deselect with -m "not docker")',
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


def _engine_unavailable(reason: str) -> None:
    if is_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftover_docker_objects(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remove lgwtest- containers/networks of dead sessions before, and our own after, the run.

    Does nothing (and never skips) when no selected test uses Docker or no engine answers.
    """
    uses_docker = any(item.get_closest_marker("docker") for item in request.session.items)
    client = connect_docker(timeout=10)[0] if uses_docker else None
    if client is None:
        yield
        return
    try:
        remove_leftovers(client)
        yield
        remove_leftovers(client, own_prefix=_names.session_prefix)
    finally:
        client.close()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client, problem = connect_docker()
    if client is None:
        _engine_unavailable(problem)
    yield client
    client.close()


@pytest.fixture(scope="session")
def docker_api(docker_client: docker.DockerClient) -> docker.APIClient:
    return docker_client.api


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    ensure_busybox_image(docker_client)
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def unique_name() -> Callable[..., str]:
    """``unique_name("web")`` -> ``lgwtest-<pid>-<rand>-web-<n>``: unique in the session."""
    return _names


@pytest.fixture
def containers(
    docker_client: docker.DockerClient, busybox_image: str
) -> Iterator[ContainerFactory]:
    """``containers.run(labels=..., command=...)`` / ``containers.python([...])``; all removed after."""
    factory = ContainerFactory(docker_client, busybox_image, _names)
    yield factory
    factory.cleanup()


_USE_DEFAULT = object()


@pytest.fixture
def labelgw(tmp_path: Path, tls_engine: str | None) -> Iterator[Callable[..., TwistdProcess]]:
    """Start the real product: ``gw = labelgw("--env", "staging")``; ``gw.base_url``, ``gw.port``.

    ``twistd -n --pidfile= labelgw --http tcp:PORT:interface=127.0.0.1 --docker-host $DOCKER_HOST``
    with cwd in tmp_path; returns once the port accepts connections (20 s, else fails with the log).
    Keywords: ``docker_host=None`` leaves out --docker-host, ``env={...}`` adds environment,
    ``timeout=``. Every gateway is stopped at teardown (SIGTERM, then SIGKILL after 10 s).
    """
    started: list[TwistdProcess] = []
    counter = itertools.count(1)

    def start(
        *extra_args: str,
        docker_host: object = _USE_DEFAULT,
        env: dict[str, str] | None = None,
        timeout: float = 20.0,
    ) -> TwistdProcess:
        host = docker_host_url() if docker_host is _USE_DEFAULT else docker_host
        port = free_port()
        if tls_engine is not None and not any(arg.split("=", 1)[0] == "--tls-engine" for arg in extra_args):
            extra_args = (*extra_args, "--tls-engine", tls_engine)
        gateway = TwistdProcess(
            labelgw_args(port, host, extra_args),  # type: ignore[arg-type]
            port=port,
            cwd=tmp_path / f"labelgw-{next(counter)}",
            env=env,
        )
        started.append(gateway)
        gateway.wait_until_listening(timeout)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def pytest_terminal_summary(terminalreporter: "pytest.TerminalReporter") -> None:
    """Figures end-to-end tests measured (reported, never asserted against tight bounds)."""
    from support.measurements import MEASUREMENTS

    if MEASUREMENTS:
        terminalreporter.section("labelgw measurements")
        for what, value in MEASUREMENTS:
            terminalreporter.write_line(f"{what}: {value}")
