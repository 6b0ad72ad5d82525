"""Self-tests of the test harness (helpers and fixtures), with stand-ins for the product."""

from __future__ import annotations

import signal
import socket
import tarfile
import io
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import docker
import docker.errors
import pytest

from support import (
    ContainerFactory,
    GatewayStartError,
    NameFactory,
    TwistdProcess,
    free_port,
    http_get,
    raw_exchange,
    shell_healthcheck,
)
from support.dockerenv import _is_leftover
from support.images import APPLETS, busybox_rootfs_tar, find_static_busybox


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"host={self.headers['Host']} path={self.path}".encode()
        self.send_response(200)
        self.send_header("Set-Cookie", "a=1")
        self.send_header("Set-Cookie", "b=2")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_port_stays_outside_outgoing_source_ports_and_never_repeats() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(1024 <= port < ephemeral_low for port in ports)


def test_http_get_overrides_host_and_keeps_duplicate_headers(echo_server: int) -> None:
    response = http_get(f"http://127.0.0.1:{echo_server}/p?q=1", host="api.localhost")
    assert response.status == 200
    assert response.body == b"host=api.localhost path=/p?q=1"
    assert response.header_values("set-cookie") == ["a=1", "b=2"]
    assert response.version == "HTTP/1.1"


def test_http_get_refuses_non_loopback() -> None:
    with pytest.raises(ValueError):
        http_get("http://10.0.0.1/")


def test_raw_exchange(echo_server: int) -> None:
    raw = raw_exchange(echo_server, b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.0 200") or raw.startswith(b"HTTP/1.1 200")
    assert raw.endswith(b"host=x path=/r")


def test_names_are_unique_and_carry_the_pid() -> None:
    names = NameFactory(pid=4242)
    first, second = names("Web 1"), names("web 1")
    assert first != second
    assert first.startswith("lgwtest-4242-") and "-web-1-" in first
    assert _is_leftover(first, own_prefix=names.session_prefix)
    assert not _is_leftover("lgwtest-1-abcd-c-1", own_prefix=names.session_prefix)


def test_leftovers_of_dead_sessions_only() -> None:
    import os

    assert not _is_leftover(f"lgwtest-{os.getpid()}-abcd-c-1", own_prefix=None)
    assert _is_leftover("/lgwtest-999999999-abcd-c-1", own_prefix=None)  # no such pid
    assert not _is_leftover("somebody-else", own_prefix=None)


def test_busybox_rootfs_has_the_applets() -> None:
    try:
        path = find_static_busybox()
    except RuntimeError as e:
        pytest.skip(str(e))
    with tarfile.open(fileobj=io.BytesIO(busybox_rootfs_tar(path))) as tar:
        names = set(tar.getnames())
    assert "bin/busybox" in names
    assert {f"bin/{a}" for a in APPLETS} <= names


# --- Docker -------------------------------------------------------------------------------------


def test_busybox_container_serves_on_loopback(
    containers: ContainerFactory, docker_client: docker.DockerClient
) -> None:
    port = free_port()
    container = containers.run(
        labels={"labelgw.service": "web", "labelgw.port": str(port)},
        command=["sh", "-c", f"echo hello-from-busybox > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"],
        healthcheck=shell_healthcheck(f"wget -q -O /dev/null http://127.0.0.1:{port}/", interval=0.5),
    )
    containers.wait_serving(container, port)
    assert http_get(f"http://127.0.0.1:{port}/").body == b"hello-from-busybox\n"
    inspected = docker_client.api.inspect_container(container.id)
    assert inspected["Config"]["Labels"] == {"labelgw.service": "web", "labelgw.port": str(port)}
    assert inspected["HostConfig"]["NetworkMode"] == "host"
    containers.wait_healthy(container)


def test_container_factory_removes_everything(
    docker_client: docker.DockerClient, busybox_image: str, unique_name: Callable[..., str]
) -> None:
    factory = ContainerFactory(docker_client, busybox_image, unique_name)
    container = factory.run()
    network = factory.network()
    factory.cleanup()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(network.id)


def test_python_backend_in_a_container(containers: ContainerFactory) -> None:
    port = free_port()
    container = containers.python(
        ["-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", "/bin"],
        labels={"labelgw.service": "py"},
    )
    containers.wait_serving(container, port)
    response = http_get(f"http://127.0.0.1:{port}/")
    assert response.status == 200
    assert b"busybox" in response.body  # the container's /bin, not the host's


def test_failed_container_is_reported_with_logs(containers: ContainerFactory) -> None:
    container = containers.run(command=["sh", "-c", "echo broken-backend; exit 3"])
    with pytest.raises(AssertionError, match="broken-backend"):
        containers.wait_serving(container, free_port(), timeout=10)


# --- twistd subprocess --------------------------------------------------------------------------


def test_twistd_process_with_a_stand_in_plugin(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("stand-in")
    port = free_port()
    gateway = TwistdProcess(
        ["-n", "--pidfile=", "web", "--listen", f"tcp:{port}:interface=127.0.0.1", "--path", str(tmp_path / "www")],
        port=port,
        cwd=tmp_path / "run",
    )
    try:
        gateway.wait_until_listening()
        assert http_get(gateway.base_url + "/index.html").body == b"stand-in"
        gateway.wait_for_log("Site starting on", timeout=5)
        started = time.monotonic()
        # twistd re-raises the signal after a clean shutdown, so -SIGTERM is a clean exit too.
        assert gateway.stop() in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 5
        assert "Server Shut Down." in gateway.log_text()
    finally:
        gateway.stop()


def test_twistd_process_that_dies_fails_fast_with_its_log(tmp_path: Path) -> None:
    port = free_port()
    gateway = TwistdProcess(["-n", "--pidfile=", "no-such-plugin"], port=port, cwd=tmp_path)
    started = time.monotonic()
    with pytest.raises(GatewayStartError, match="no-such-plugin") as failure:
        gateway.wait_until_listening()
    assert time.monotonic() - started < 15
    assert "--- log" in str(failure.value)


STAND_IN_TAP = textwrap.dedent(
    '''
    """Stand-in for labelgw.cli.tap: the command-line contract, a static page, the start-up log line."""
    from twisted.application import strports
    from twisted.python import usage
    from twisted.web import resource, server, static


    class Options(usage.Options):
        # The options the fixture always passes (see labelgw_args), accepted and ignored.
        optParameters = [["docker-host", None, None, ""], ["https", None, None, ""], ["state-dir", None, None, ""],
                         ["admin", None, None, ""]]

        def __init__(self):
            super().__init__()
            self["http"] = []

        def opt_http(self, endpoint):
            self["http"].append(endpoint)


    def makeService(options):
        from twisted.logger import Logger
        root = resource.Resource()
        root.putChild(b"", static.Data(("stand-in " + options["docker-host"]).encode(), "text/plain"))
        port = options["http"][0].split(":")[1]
        Logger().info("labelgw listening on http://127.0.0.1:{port}", port=port)
        from twisted.application.service import MultiService
        top = MultiService()
        strports.service(options["http"][0], server.Site(root)).setServiceParent(top)
        # The fixture waits for the --https and --admin ports too: the stand-in listens there as well.
        for name in ("https", "admin"):
            if options[name].startswith("tcp:"):
                strports.service(options[name], server.Site(root)).setServiceParent(top)
        return top
    '''
)


def test_labelgw_fixture_with_a_stand_in_product(
    labelgw: Callable[..., TwistdProcess], tmp_path: Path
) -> None:
    """The fixture's contract, with the product replaced by a stand-in ``labelgw`` package that
    shadows the real one (the real plugin file still points twistd at ``labelgw.cli.tap``)."""
    import os
    from support.containers import REPO_ROOT

    stub = tmp_path / "stub" / "labelgw"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "cli").mkdir()
    (stub / "cli" / "__init__.py").write_text("")
    (stub / "cli" / "tap.py").write_text(STAND_IN_TAP)
    # REPO_ROOT comes after the stub: it provides twisted/plugins/labelgw_plugin.py when the
    # test venv does not have labelgw installed.
    pythonpath = os.pathsep.join([str(stub.parent), REPO_ROOT])
    gateway = labelgw(docker_host="unix:///nowhere.sock", env={"PYTHONPATH": pythonpath})
    assert gateway.base_url == f"http://127.0.0.1:{gateway.port}"
    gateway.wait_for_log(f"labelgw listening on http://127.0.0.1:{gateway.port}", timeout=5)
    assert http_get(gateway.base_url + "/").body == b"stand-in unix:///nowhere.sock"
    mark = gateway.log_mark()
    with pytest.raises(AssertionError, match="not logged within"):
        gateway.wait_for_log("labelgw listening", timeout=0.3, since=mark)
    assert gateway.stop() in (0, -signal.SIGTERM)
    assert "Server Shut Down." in gateway.log_text()
