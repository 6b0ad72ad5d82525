"""Settings from the command line and the YAML file (labelgw.cli.tap.Options -> labelgw.cli.config). No reactor, no engine."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from twisted.python import usage

from labelgw.cli import config
from labelgw.cli.config import Settings, StaticService
from labelgw.http.settings import ProxySettings
from labelgw.core.model import ContainerSpec
from labelgw.cli.tap import Options


@pytest.fixture(autouse=True)
def _no_docker_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # The development machine exports DOCKER_HOST; defaults must be checked without it.
    monkeypatch.delenv("DOCKER_HOST", raising=False)


def parse(*args: str) -> Settings:
    options = Options()
    options.parseOptions(list(args))
    return options.settings


def refused(*args: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(*args)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def write(tmp_path: Path, text: str, name: str = "labelgw.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_defaults() -> None:
    settings = parse()
    assert settings == Settings()
    assert settings.http == ("tcp:8080",)
    assert settings.docker_host is None
    assert settings.label_prefix == "labelgw"
    assert settings.env is None
    assert settings.docker is True
    assert settings.static_services == ()
    assert settings.proxy == ProxySettings()
    assert (settings.resync_interval, settings.drain_grace) == (60.0, 10.0)


def test_http_is_repeatable_and_keeps_order() -> None:
    settings = parse("--http", "tcp:18080:interface=127.0.0.1", "--http", r"tcp:18081:interface=\:\:1", "--http", "unix:/tmp/lgw.sock")
    assert settings.http == ("tcp:18080:interface=127.0.0.1", r"tcp:18081:interface=\:\:1", "unix:/tmp/lgw.sock")


def test_options_are_independent() -> None:
    # The endpoint list is per instance, not a class-level default shared by every Options.
    parse("--http", "tcp:1")
    assert parse().http == ("tcp:8080",)


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:notaport", "tcp:", "nosuchtype:80", "tcp:8080:bogus=1", "tcp:8080:interface=127.0.0.1:backlog=x", "tcp:8080:interface=::1"],
)
def test_bad_endpoint_names_http(endpoint: str) -> None:
    message = refused("--http", "tcp:8080", "--http", endpoint)
    assert message.startswith(f"--http {endpoint!r}: not a valid endpoint")


def test_empty_endpoint() -> None:
    assert refused("--http", "").startswith("http: must be a list of Twisted endpoint strings")


def test_other_command_line_settings() -> None:
    settings = parse(
        "--docker-host", "unix:///tmp/x/docker.sock", "--label-prefix", "acme.gw", "--env", "staging",
        "--connect-timeout", "2.5", "--response-timeout", "30",
    )
    assert settings.docker_host == "unix:///tmp/x/docker.sock"
    assert settings.label_prefix == "acme.gw"
    assert settings.env == "staging"
    assert settings.proxy == ProxySettings(connect_timeout=2.5, response_timeout=30.0)


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        (["--label-prefix", "Bad_Prefix"], "label_prefix"),
        (["--label-prefix", "-x"], "label_prefix"),
        (["--env", "two words"], "env"),
        (["--env", "-lead"], "env"),
        (["--connect-timeout", "soon"], "connect_timeout"),
        (["--connect-timeout", "0"], "connect_timeout"),
        (["--connect-timeout", "-1"], "connect_timeout"),
        (["--connect-timeout", "nan"], "connect_timeout"),
        (["--connect-timeout", "inf"], "connect_timeout"),
        (["--response-timeout", "86401"], "response_timeout"),
    ],
)
def test_bad_command_line_values(args: list[str], setting: str) -> None:
    assert refused(*args).startswith(f"{setting}: ")


def test_unknown_option() -> None:
    with pytest.raises(usage.UsageError):
        parse("--no-such-option")


# ---------------------------------------------------------------------------------------------------------------
# DOCKER_HOST


def test_docker_host_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/env/docker.sock")
    assert parse().docker_host == "unix:///tmp/env/docker.sock"


def test_command_line_docker_host_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/env/docker.sock")
    assert parse("--docker-host", "tcp://127.0.0.1:2375").docker_host == "tcp://127.0.0.1:2375"


def test_file_docker_host_wins_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/env/docker.sock")
    path = write(tmp_path, "docker_host: unix:///tmp/file/docker.sock\n")
    assert parse("--config", path).docker_host == "unix:///tmp/file/docker.sock"


def test_empty_docker_host_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "")
    assert parse().docker_host is None


# ---------------------------------------------------------------------------------------------------------------
# Config file

FULL = """\
    http:
      - tcp:18080:interface=127.0.0.1
      - tcp:18081:interface=127.0.0.1
    docker_host: unix:///tmp/lgwd/docker.sock
    label_prefix: acme
    env: staging
    docker: false
    connect_timeout: 3
    response_timeout: 20.5
    head_timeout: 5
    idle_timeout: 100
    body_timeout: 30
    resync_interval: 15
    drain_grace: 2
    services:
      static-api:
        hosts: [static.localhost, API.Example.]
        path: /
        backends: ["127.0.0.1:9000", "127.0.0.1:9001"]
      Files:
        path: /files/
        strip_prefix: true
        backends: ["[::1]:9100"]
"""


def test_full_file(tmp_path: Path) -> None:
    settings = parse("--config", write(tmp_path, FULL))
    assert settings.http == ("tcp:18080:interface=127.0.0.1", "tcp:18081:interface=127.0.0.1")
    assert settings.docker_host == "unix:///tmp/lgwd/docker.sock"
    assert settings.label_prefix == "acme"
    assert settings.env == "staging"
    assert settings.docker is False
    assert settings.proxy == ProxySettings(
        connect_timeout=3.0, response_timeout=20.5, head_timeout=5.0, idle_timeout=100.0, body_timeout=30.0
    )
    assert (settings.resync_interval, settings.drain_grace) == (15.0, 2.0)
    assert settings.static_services == (
        StaticService("static-api", ("static.localhost", "api.example"), "/", False, (("127.0.0.1", 9000), ("127.0.0.1", 9001))),
        # Name lower-cased, default host from it, path without its trailing slash, IPv6 brackets removed.
        StaticService("files", ("files.localhost",), "/files", True, (("::1", 9100),)),
    )


def test_short_config_option(tmp_path: Path) -> None:
    assert parse("-c", write(tmp_path, "env: prod\n")).env == "prod"


def test_static_service_specs(tmp_path: Path) -> None:
    settings = parse("--config", write(tmp_path, FULL))
    specs = settings.static_services[0].specs()
    assert specs == [
        ContainerSpec(
            container_id="static:static-api:0", name="static-api[127.0.0.1:9000]", service="static-api",
            address="127.0.0.1", port=9000, hosts=("static.localhost", "api.example"),
        ),
        ContainerSpec(
            container_id="static:static-api:1", name="static-api[127.0.0.1:9001]", service="static-api",
            address="127.0.0.1", port=9001, hosts=("static.localhost", "api.example"),
        ),
    ]
    assert all(spec.ready and spec.container_id.startswith("static:") for spec in specs)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert parse("--config", write(tmp_path, text)) == Settings()


def test_http_as_a_single_string(tmp_path: Path) -> None:
    assert parse("--config", write(tmp_path, "http: tcp:18080\n")).http == ("tcp:18080",)


def test_endpoints_from_the_file_are_checked(tmp_path: Path) -> None:
    assert refused("--config", write(tmp_path, "http: [tcp:nope]\n")).startswith("--http 'tcp:nope'")


@pytest.mark.parametrize(
    ("file_text", "args", "attribute", "expected"),
    [
        ("http: [tcp:1]\n", ["--http", "tcp:2", "--http", "tcp:3"], "http", ("tcp:2", "tcp:3")),
        ("env: staging\n", ["--env", "prod"], "env", "prod"),
        ("label_prefix: filegw\n", ["--label-prefix", "cligw"], "label_prefix", "cligw"),
        ("docker_host: unix:///file.sock\n", ["--docker-host", "unix:///cli.sock"], "docker_host", "unix:///cli.sock"),
        ("http: [tcp:1]\n", [], "http", ("tcp:1",)),
        ("env: staging\n", [], "env", "staging"),
    ],
)
def test_command_line_wins_over_file(tmp_path: Path, file_text: str, args: list[str], attribute: str, expected: object) -> None:
    settings = parse("--config", write(tmp_path, file_text), *args)
    assert getattr(settings, attribute) == expected


def test_command_line_timeout_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "connect_timeout: 3\nresponse_timeout: 40\n")
    settings = parse("--config", path, "--connect-timeout", "4")
    assert (settings.proxy.connect_timeout, settings.proxy.response_timeout) == (4.0, 40.0)


@pytest.mark.parametrize(
    ("text", "start"),
    [
        # Unknown keys, at the top and inside a service.
        ("listen: tcp:80\n", "config file: unknown setting 'listen'"),
        ("services:\n  api:\n    backends: ['127.0.0.1:1']\n    weight: 2\n", "services.api.weight: unknown setting"),
        # Bad values: the message starts with the setting's name.
        ("http: 8080\n", "http: "),
        ("http: ['']\n", "http: "),
        ("http: {a: b}\n", "http: "),
        ("docker_host: 5\n", "docker_host: "),
        ("label_prefix: UPPER\n", "label_prefix: "),
        ("env: 'two words'\n", "env: "),
        ("env: [a]\n", "env: "),
        ("docker: 'yes please'\n", "docker: "),
        ("resync_interval: 0\n", "resync_interval: "),
        ("resync_interval: soon\n", "resync_interval: "),
        ("resync_interval: yes\n", "resync_interval: "),
        ("drain_grace: -1\n", "drain_grace: "),
        ("head_timeout: abc\n", "head_timeout: "),
        ("idle_timeout: 1e9\n", "idle_timeout: "),
        ("body_timeout: [1]\n", "body_timeout: "),
        ("services: [api]\n", "services: "),
        ("services:\n  api: [127.0.0.1:1]\n", "services.api: "),
        ("services:\n  'bad name':\n    backends: ['127.0.0.1:1']\n", "services.bad name: "),
        ("services:\n  _api:\n    backends: ['127.0.0.1:1']\n", "services._api: "),
        ("services:\n  api:\n    hosts: ['api.localhost:8080']\n    backends: ['127.0.0.1:1']\n", "services.api.hosts: "),
        ("services:\n  api:\n    hosts: [5]\n    backends: ['127.0.0.1:1']\n", "services.api.hosts: "),
        ("services:\n  api:\n    path: api\n    backends: ['127.0.0.1:1']\n", "services.api.path: "),
        # The host and path rules of the labels.
        ("services:\n  api:\n    hosts: ['bad_host']\n    backends: ['127.0.0.1:1']\n", "services.api.hosts: 'bad_host': not a valid"),
        ("services:\n  api:\n    hosts: ['*.localhost']\n    backends: ['127.0.0.1:1']\n", "services.api.hosts: "),
        ("services:\n  api:\n    hosts: ['a.localhost,b.localhost']\n    backends: ['127.0.0.1:1']\n", "services.api.hosts: "),
        ("services:\n  api:\n    path: /a/../b\n    backends: ['127.0.0.1:1']\n", "services.api.path: '/a/../b' must not contain"),
        ("services:\n  api:\n    path: /a?b\n    backends: ['127.0.0.1:1']\n", "services.api.path: "),
        ("services:\n  api:\n    strip_prefix: 'yes'\n    backends: ['127.0.0.1:1']\n", "services.api.strip_prefix: "),
        ("services:\n  api:\n    hosts: [a.localhost]\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: []\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: '127.0.0.1:1'\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: ['127.0.0.1']\n", "services.api.backends: '127.0.0.1'"),
        ("services:\n  api:\n    backends: [':80']\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: ['h:0']\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: ['h:65536']\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: ['h:+80']\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: ['h:\u0668\u0660']\n", "services.api.backends: "),
        ("services:\n  api:\n    backends: [9000]\n", "services.api.backends: 9000"),
        (
            "services:\n  Api:\n    backends: ['127.0.0.1:1']\n  api:\n    backends: ['127.0.0.1:2']\n",
            "services.api: defined more than once",
        ),
    ],
)
def test_bad_file_settings(tmp_path: Path, text: str, start: str) -> None:
    assert refused("--config", write(tmp_path, text)).startswith(start)


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- tcp:8080\n")
    assert refused("--config", path) == f"--config {path}: the top level must be a mapping of settings"


def test_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "http: [tcp:8080\nenv: x\n")
    message = refused("--config", path)
    assert message.startswith(f"--config {path}: not valid YAML at line ")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    assert refused("--config", path) == f"--config {path}: cannot read: No such file or directory"


def test_build_without_file() -> None:
    # The pure core, as tap.settings_from_options calls it.
    assert config.build({"http": [], "docker_host": None}) == Settings()
