"""Issue 13, rough edges found by a new user: each fix with its test (the twistd ones as subprocesses)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.python import usage

from labelgw.cli.tap import Options, brief_usage_error
from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.registry import Registry
from proxyharness import ProxyHarness, spec

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_PEER = IPv4Address("TCP", "127.0.0.1", 5555)


# ---------------------------------------------------------------------------------------------------------------
# A bad option: one line naming the option and the reason, no help text.


def test_a_bad_port_names_the_option_and_the_reason() -> None:
    with pytest.raises(usage.UsageError) as error:
        Options().parseOptions(["--http", "tcp:abc"])
    message = str(error.value)
    assert message.startswith("--http 'tcp:abc'")
    assert "port 'abc' is not a number" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("endpoint", "reason"), [("tcp:", "no port given"), ("tcp:99999", "port 99999 is out of range")]
)
def test_other_port_problems_are_said_in_words(endpoint: str, reason: str) -> None:
    with pytest.raises(usage.UsageError, match=reason):
        Options().parseOptions(["--https", "none", "--http", endpoint])


def test_brief_usage_error_is_the_error_and_a_hint() -> None:
    lines = brief_usage_error(usage.UsageError("--http 'tcp:abc': port 'abc' is not a number")).splitlines()
    assert lines == [
        "twistd labelgw: --http 'tcp:abc': port 'abc' is not a number",
        "Run 'twistd labelgw --help' for the list of options.",
    ]


def _twistd(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    twistd = Path(sys.executable).with_name("twistd")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the working tree's labelgw and plugin
    return subprocess.run(
        [str(twistd), "-n", "--pidfile=", "labelgw", *args],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--http", "tcp:abc"], "--http 'tcp:abc': not a valid endpoint: port 'abc' is not a number"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_twistd_prints_a_bad_option_in_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    result = _twistd(*args, tmp_path=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert expected in lines[0]
    assert "--help" in lines[-1]
    # None of the help text, on either stream.
    for output in (result.stdout, result.stderr):
        assert "Options:" not in output and "--docker-host" not in output and "Usage:" not in output


# ---------------------------------------------------------------------------------------------------------------
# Pinning a version: 404 when the version does not exist, 503 when it exists but has no ready backend.


def _versioned(container_id: str, version: str, port: int, running: bool = True) -> ContainerSpec:
    return dataclasses.replace(spec(container_id, "api", port, ("api.localhost",), running=running), version=version)


def _pinned(h: ProxyHarness, version: bytes) -> Any:
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: api.localhost\r\nX-Labelgw-Version: " + version + b"\r\n\r\n")
    return client.response()


def test_a_pinned_version_that_does_not_exist_is_a_404_naming_it() -> None:
    h = ProxyHarness(specs=(_versioned("a1", "v1", 9001), _versioned("a2", "v2", 9002)))
    response = _pinned(h, b"v9")
    assert response.status == 404
    assert response.header(b"retry-after") is None
    assert b"'v9'" in response.body and b"'api'" in response.body


def test_a_pinned_version_without_a_ready_backend_stays_503() -> None:
    h = ProxyHarness(
        specs=(_versioned("a1", "v1", 9001), _versioned("a2", "v2", 9002), _versioned("a3", "v3", 9003, running=False))
    )
    response = _pinned(h, b"v3")
    assert response.status == 503
    assert response.header(b"retry-after") == b"1"


# ---------------------------------------------------------------------------------------------------------------
# A host whose container was skipped for a bad label: the 404 says so, to loopback clients only.


def _inspect(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "Id": "c0ffee" * 10,
        "Name": "/shop-1",
        "Config": {"Labels": labels},
        "State": {"Running": True},
        "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.5"}}},
    }


def test_a_rejection_carries_the_hosts_the_container_asked_for() -> None:
    rejection = parse_container(_inspect({"labelgw.service": "shop", "labelgw.port": "eighty"}))
    assert isinstance(rejection, Rejection)
    assert rejection.hosts == ("shop.localhost",)
    rejection = parse_container(
        _inspect({"labelgw.service": "shop", "labelgw.host": "Shop.Example.com", "labelgw.prot": "80"})
    )
    assert isinstance(rejection, Rejection)
    assert rejection.hosts == ("shop.example.com",)


def _skipped_harness() -> ProxyHarness:
    h = ProxyHarness()
    rejection = parse_container(_inspect({"labelgw.service": "shop", "labelgw.port": "eighty"}))
    assert isinstance(rejection, Rejection)
    h.registry.apply(rejection.container_id, rejection)
    h.gateway.rejected_for = h.registry.rejected_for
    return h


def _get(h: ProxyHarness, host: bytes, peer: IPv4Address | None = None) -> Any:
    client = h.connect(peer) if peer is not None else h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    return client.response()


def test_the_404_of_a_skipped_containers_host_names_it_to_loopback_clients() -> None:
    h = _skipped_harness()
    response = _get(h, b"shop.localhost", LOOPBACK_PEER)
    assert response.status == 404
    assert b"shop-1" in response.body and b"labelgw.port" in response.body and b"skipped" in response.body


def test_other_clients_get_the_plain_404() -> None:
    h = _skipped_harness()
    response = _get(h, b"shop.localhost")  # 10.0.0.9
    assert response.status == 404
    assert b"shop-1" not in response.body and b"labelgw.port" not in response.body


def test_a_host_nobody_asked_for_gets_the_plain_404_on_loopback_too() -> None:
    h = _skipped_harness()
    response = _get(h, b"other.localhost", LOOPBACK_PEER)
    assert response.status == 404 and b"skipped" not in response.body


def test_a_host_clash_names_the_full_label() -> None:
    registry = Registry(label_prefix="labelgw")
    registry.apply("a1", spec("a1", "api", 9001, ("shared.localhost",)))
    registry.apply("w1", spec("w1", "web", 9002, ("shared.localhost",)))
    rejection = registry.rejections["w1"]
    assert rejection.label == "labelgw.host"
    assert "labelgw.host='shared.localhost'" in rejection.describe()
    assert registry.rejected_for("shared.localhost") is rejection


# ---------------------------------------------------------------------------------------------------------------
# The admin view.


def _admin_get(resource: Any, path: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest(path.lstrip(b"/").split(b"/") if path != b"/" else [])
    request.requestHeaders.setRawHeaders(b"host", [b"localhost:8081"])
    body = resource.render(request)
    headers = {name.lower(): values[0] for name, values in request.responseHeaders.getAllRawHeaders()}
    return request.responseCode or 200, headers, body


def test_admin_serves_the_public_ca_certificate_only(tmp_path: Path) -> None:
    from labelgw.control.admin import AdminResource
    from labelgw.tls.ca import LocalCA

    ca = LocalCA.load_or_create(tmp_path)
    resource = AdminResource(Registry(), lambda: 0.0, ca_certificate=lambda: ca.cert_pem)
    status, headers, body = _admin_get(resource, b"/ca.pem")
    assert status == 200
    assert body == ca.cert_pem and body.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" not in body
    assert headers[b"content-type"] == b"application/x-pem-file"


def test_admin_ca_pem_without_https_is_a_404() -> None:
    from labelgw.control.admin import AdminResource

    status, _, body = _admin_get(AdminResource(Registry(), lambda: 0.0, ca_certificate=lambda: None), b"/ca.pem")
    assert status == 404 and b"HTTPS" in body


def test_admin_404_names_the_root() -> None:
    from labelgw.control.admin import AdminResource

    status, _, body = _admin_get(AdminResource(Registry(), lambda: 0.0), b"/nope")
    assert status == 404
    assert "/" in json.loads(body)["try"]


def test_admin_traffic_is_a_number_and_rejections_list_their_hosts() -> None:
    from labelgw.control.admin import state

    registry = Registry()
    v1 = _versioned("a1", "v1", 9001)
    v2 = dataclasses.replace(_versioned("a2", "v2", 9002), traffic=10.0, options=(("traffic", "10"),))
    registry.apply("a1", v1)
    registry.apply("a2", v2)
    rejection = parse_container(_inspect({"labelgw.service": "shop", "labelgw.port": "eighty"}))
    assert isinstance(rejection, Rejection)
    registry.apply(rejection.container_id, rejection)
    view = json.loads(json.dumps(state(registry, 0.0)))
    assert view["services"]["api"]["versions"]["v2"]["traffic"] == 10.0
    assert view["rejections"][0]["hosts"] == ["shop.localhost"]


# ---------------------------------------------------------------------------------------------------------------
# The LICENSE that setup.cfg declares.


def test_license_file_matches_setup_cfg() -> None:
    assert "license = MIT" in (REPO / "setup.cfg").read_text()
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the labelgw authors" in text


# ---------------------------------------------------------------------------------------------------------------
# Logging.


def _levels(logged: list[dict[str, Any]], text: str) -> list[str]:
    from twisted.logger import formatEvent

    return [entry["log_level"].name for entry in logged if text in formatEvent(entry)]


def test_a_periodic_resync_that_changed_nothing_is_logged_at_debug_level() -> None:
    from test_watcher import A, B, World, inspect_of

    world = World(resync_interval=60.0)
    world.engine.containers = {A: inspect_of(A)}
    world.watcher.startService()
    assert _levels(world.logged, "docker resync (") == ["info"]  # the first one says what it found
    world.reactor.advance(60)
    assert _levels(world.logged, "docker resync (periodic)") == ["debug"]
    world.engine.containers[B] = inspect_of(B)  # an event we never got: the resync changes something
    world.reactor.advance(60)
    assert _levels(world.logged, "docker resync (periodic)") == ["debug", "info"]
    del world.engine.containers[B]  # gone without an event: a change too
    world.reactor.advance(60)
    assert _levels(world.logged, "docker resync (periodic)") == ["debug", "info", "info"]


def _connection_error(inner: OSError) -> Exception:
    """What docker-py raises for an engine it cannot reach: requests' error wrapping urllib3's, chained."""
    import docker.errors
    import requests
    from urllib3.exceptions import ProtocolError

    try:
        try:
            raise requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", inner))
        except Exception as error:
            raise docker.errors.DockerException(f"Error while fetching server API version: {error}") from error
    except Exception as outer:
        return outer


def test_an_unreachable_engine_is_one_short_line_once(tmp_path: Path) -> None:
    from test_watcher import FakeReactor, FakeThreads, RecordingSink, fake_parse
    from twisted.logger import Logger, formatEvent

    from labelgw.docker.watcher import DockerWatcher

    def refuse() -> Any:
        raise _connection_error(ConnectionRefusedError(111, "Connection refused"))

    logged: list[dict[str, Any]] = []
    threads = FakeThreads()
    watcher = DockerWatcher(
        FakeReactor(), RecordingSink(), refuse, docker_host="tcp://127.0.0.1:1", parse=fake_parse,
        own_networks=frozenset(), threads_factory=lambda: threads,
    )
    watcher.__dict__["_log"] = Logger(observer=logged.append)  # type: ignore[arg-type]
    watcher.startService()
    for _ in range(3):
        watcher._reactor.advance(10)
    lines = [(entry["log_level"].name, formatEvent(entry)) for entry in logged if "unreachable" in formatEvent(entry)]
    assert lines[0] == ("warn", "docker engine unreachable at tcp://127.0.0.1:1: Connection refused; retrying in 0.1s")
    assert len(lines) >= 3 and all(level == "debug" for level, _ in lines[1:])
    watcher.stopService()


def test_permission_denied_on_the_socket_names_its_group(tmp_path: Path) -> None:
    from test_watcher import FakeReactor, FakeThreads, RecordingSink, fake_parse
    from twisted.logger import Logger, formatEvent

    from labelgw.docker.watcher import DockerWatcher, permission_hint

    sock = tmp_path / "docker.sock"
    sock.touch()
    gid = sock.stat().st_gid
    hint = permission_hint(f"unix://{sock}")
    assert f"--group-add {gid}" in hint and str(sock) in hint

    def deny() -> Any:
        raise _connection_error(PermissionError(13, "Permission denied"))

    logged: list[dict[str, Any]] = []
    threads = FakeThreads()
    watcher = DockerWatcher(
        FakeReactor(), RecordingSink(), deny, docker_host=f"unix://{sock}", parse=fake_parse,
        own_networks=frozenset(), threads_factory=lambda: threads,
    )
    watcher.__dict__["_log"] = Logger(observer=logged.append)  # type: ignore[arg-type]
    watcher.startService()
    [line] = [formatEvent(entry) for entry in logged if "unreachable" in formatEvent(entry)]
    assert line.startswith(f"docker engine unreachable at unix://{sock}: Permission denied; add group {gid}")
    assert "\n" not in line and "urllib3" not in line and "retrying in" in line
    assert watcher._reconnect_call is not None and watcher._reconnect_call.active()  # retried
    watcher.stopService()


def test_permission_hint_reads_the_socket_gid() -> None:
    from types import SimpleNamespace

    from labelgw.docker.watcher import permission_hint

    hint = permission_hint("unix:///var/run/docker.sock", stat=lambda path: SimpleNamespace(st_gid=998))
    assert "group 998" in hint and "--group-add 998" in hint and "999" not in hint


def test_a_backend_turning_unhealthy_is_a_warning() -> None:
    from test_health import Harness, checked
    from twisted.logger import Logger, formatEvent

    from labelgw.control.health import HealthChecker

    logged: list[dict[str, Any]] = []
    h = Harness()
    observer = Logger(observer=logged.append)  # type: ignore[arg-type]
    h.checker.__dict__["_log"] = observer
    h.registry.__dict__["_log"] = observer
    b = h.add(checked("a"))
    h.tick()
    h.http.answer(200)
    for _ in range(3):
        h.tick(5)
        h.http.answer(500)
    assert b.health_state == "unhealthy"
    warnings = [formatEvent(e) for e in logged if e["log_level"].name == "warn"]
    assert any("-> unhealthy" in line for line in warnings)
    assert any("out of rotation" in line for line in warnings)
    assert isinstance(h.checker, HealthChecker)


def test_static_backends_are_not_called_containers() -> None:
    from twisted.logger import Logger, formatEvent

    from labelgw.core.registry import STATIC_PREFIX

    logged: list[dict[str, Any]] = []
    registry = Registry()
    registry.__dict__["_log"] = Logger(observer=logged.append)  # type: ignore[arg-type]
    registry.apply(STATIC_PREFIX + "legacy/0", spec(STATIC_PREFIX + "legacy/0", "legacy", 9001, ("legacy.localhost",)))
    registry.apply("c1", spec("c1", "web", 9002, ("web.localhost",)))
    lines = [formatEvent(e) for e in logged]
    assert any(line.startswith("static backend static:legacy/0 joined service legacy") for line in lines)
    assert any(line.startswith("container c1 joined service web") for line in lines)


def test_quiet_observer_drops_twisteds_port_lines_for_labelgws_ports_and_labelgw_debug() -> None:
    from twisted.logger import LogLevel, LogPublisher

    from labelgw.cli.quietlog import PortLines, QuietObserver, install_quiet_log

    seen: list[dict[str, Any]] = []
    ports = PortLines()
    quiet = QuietObserver(seen.append, ports, debug=False)

    def legacy(text: str) -> dict[str, Any]:
        return {"log_namespace": "log_legacy", "log_text": text, "log_level": LogLevel.info}

    ports.opening += 1
    quiet(legacy("ProxyFactory starting on 8080"))
    quiet(legacy("NegotiatingFactory (TLS) starting on 8443"))
    ports.opening -= 1
    quiet(legacy("Site starting on 9999"))  # not opened by a labelgw listener: kept
    quiet(legacy("(TCP Port 8080 Closed)"))
    quiet(legacy("(TCP Port 9999 Closed)"))
    quiet({"log_namespace": "labelgw.docker.watcher.DockerWatcher", "log_level": LogLevel.debug, "log_text": "resync"})
    quiet({"log_namespace": "labelgw.docker.watcher.DockerWatcher", "log_level": LogLevel.info, "log_text": "kept"})
    assert [event["log_text"] for event in seen] == ["Site starting on 9999", "(TCP Port 9999 Closed)", "kept"]
    loud = QuietObserver(seen.append, PortLines(), debug=True)
    loud({"log_namespace": "labelgw.x", "log_level": LogLevel.debug, "log_text": "wanted"})
    assert seen[-1]["log_text"] == "wanted"

    # Installed around a publisher's observers, which can still be removed by the original.
    publisher = LogPublisher()
    publisher.addObserver(seen.append)
    install_quiet_log(publisher, force=True)
    install_quiet_log(publisher, force=True)  # once only
    assert len(publisher._observers) == 1 and isinstance(publisher._observers[0], QuietObserver)
    publisher.removeObserver(seen.append)
    assert publisher._observers == []


def test_twistd_announces_each_listener_once(tmp_path: Path) -> None:
    import signal
    import time

    twistd = Path(sys.executable).with_name("twistd")
    env = {key: value for key, value in os.environ.items() if key != "LABELGW_DEBUG"}
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "labelgw", "--http", "tcp:0:interface=127.0.0.1",
         "--https", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
         "--state-dir", str(tmp_path / "state"), "--docker-host", "tcp://127.0.0.1:1"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "docker engine unreachable" in line:
                break
        time.sleep(1.0)  # a few retries of the unreachable engine
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        lines.extend(rest.splitlines())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    assert text.count("labelgw listening on http://127.0.0.1:") == 1, text
    assert text.count("labelgw listening on https://127.0.0.1:") == 1, text
    assert text.count("labelgw admin on http://127.0.0.1:") == 1, text
    assert " starting on " not in text and "Port " not in text, text
    unreachable = [line for line in text.splitlines() if "docker engine unreachable" in line]
    assert len(unreachable) == 1, text
    assert unreachable[0].endswith("docker engine unreachable at tcp://127.0.0.1:1: Connection refused; retrying in 0.1s")
