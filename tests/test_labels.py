"""labelgw.core.labels against real `docker inspect` output (tests/data/inspect/*.json), mutated per case.

The fixtures were captured from a dockerd 20.10 engine:
  host.json       --network host, labels service=Whoami, port=18081, env=dev (+ one foreign label)
  twonet.json     on user-defined bridges lgw-a and lgw-b, --expose 8080, labels service, version, env,
                  network=lgw-b, host, path, strip_prefix (+ one foreign label)
  multiport.json  on lgw-a, --expose 80 --expose 81, label service=multi
  health.json     on lgw-a, --expose 8000, --health-cmd true (healthy), label service=checked
  created.json    on lgw-a, --expose 9000, created but never started (network without address)
The 172.x addresses in them are data only; nothing here connects anywhere.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from labelgw.core.labels import KNOWN_LABELS, parse_bool, parse_container, parse_duration
from labelgw.core.model import ContainerSpec, HealthCheck, Rejection

FIXTURES = Path(__file__).parent / "data" / "inspect"


@cache
def _fixture_text(case: str) -> str:
    return (FIXTURES / f"{case}.json").read_text()


def load(case: str) -> dict[str, Any]:
    """A fresh copy of one fixture, safe to mutate."""
    return json.loads(_fixture_text(case))


def set_labels(inspect: dict[str, Any], drop: tuple[str, ...] = (), **labels: str) -> dict[str, Any]:
    """Set or drop labels; keyword names use '__' for '.' (health__path -> labelgw.health.path)."""
    current = inspect["Config"].setdefault("Labels", {}) or {}
    for suffix in drop:
        current.pop(f"labelgw.{suffix}", None)
    for key, value in labels.items():
        current["labelgw." + key.replace("__", ".")] = value
    inspect["Config"]["Labels"] = current
    return inspect


def address_on(inspect: dict[str, Any], network: str) -> str:
    return inspect["NetworkSettings"]["Networks"][network]["IPAddress"]


def spec_of(inspect: dict[str, Any], **kwargs: Any) -> ContainerSpec:
    result = parse_container(inspect, **kwargs)
    assert isinstance(result, ContainerSpec), result
    return result


def rejection_of(inspect: dict[str, Any], **kwargs: Any) -> Rejection:
    result = parse_container(inspect, **kwargs)
    assert isinstance(result, Rejection), result
    return result


# --- the real fixtures, unchanged -------------------------------------------------------------------------


def test_host_network_container() -> None:
    inspect = load("host")
    spec = spec_of(inspect)
    assert spec.container_id == inspect["Id"]
    assert spec.name == "lgwfx-host"
    assert spec.service == "whoami"  # label says "Whoami"
    assert spec.address == "127.0.0.1"
    assert spec.port == 18081
    assert spec.env == "dev"
    assert spec.hosts == ("whoami.dev.localhost",)
    assert spec.path_prefix == "/"
    assert spec.strip_prefix is False
    assert spec.scheme == "http"
    assert spec.version is None
    assert (spec.running, spec.paused, spec.health) == (True, False, None)
    assert spec.started_at == inspect["State"]["StartedAt"] != ""
    assert spec.ready
    # Only labels under the prefix, sorted, values as written; "other.label" is not ours.
    assert spec.options == (("env", "dev"), ("port", "18081"), ("service", "Whoami"))


def test_two_networks_with_labels() -> None:
    inspect = load("twonet")
    spec = spec_of(inspect)
    assert spec.name == "lgwfx-twonet"
    assert spec.service == "api"
    assert spec.version == "v2"
    assert spec.env == "staging"
    assert spec.port == 8080  # the single exposed port
    assert spec.hosts == ("api.example.test",)
    assert spec.path_prefix == "/api"
    assert spec.strip_prefix is True
    assert spec.address == address_on(inspect, "lgw-b") != address_on(inspect, "lgw-a")
    assert spec.option("network") == "lgw-b"
    assert spec.option("team") is None  # com.example.team is not under the prefix


def test_several_exposed_ports_refused() -> None:
    rejection = rejection_of(load("multiport"))
    assert rejection.label == "labelgw.port"
    assert rejection.value == ""
    assert "80, 81" in rejection.reason
    assert "set labelgw.port" in rejection.reason
    assert rejection.name == "lgwfx-multiport"


def test_several_exposed_ports_with_port_label() -> None:
    spec = spec_of(set_labels(load("multiport"), port="81"))
    assert spec.port == 81


def test_healthcheck_state() -> None:
    spec = spec_of(load("health"))
    assert spec.health == "healthy"
    assert spec.ready
    assert spec.port == 8000
    assert spec.hosts == ("checked.localhost",)


@pytest.mark.parametrize("status, ready", [("starting", False), ("unhealthy", False), ("healthy", True)])
def test_health_status_copied(status: str, ready: bool) -> None:
    inspect = load("health")
    inspect["State"]["Health"]["Status"] = status
    spec = spec_of(inspect)
    assert spec.health == status
    assert spec.ready is ready


def test_stopped_container_without_address_is_known_but_not_ready() -> None:
    # Its route must answer 503 while it (re)starts, not 404.
    spec = spec_of(load("created"))
    assert (spec.address, spec.running, spec.ready) == ("", False, False)


def test_running_container_without_address_is_rejected() -> None:
    inspect = load("created")
    inspect["State"]["Running"] = True
    rejection = rejection_of(inspect)
    assert rejection.label == "labelgw.network"
    assert rejection.value == ""
    assert rejection.reason == "container has no IP address on any network (networks: lgw-a)"


def test_created_container_state_read_when_address_given() -> None:
    inspect = load("created")
    inspect["NetworkSettings"]["Networks"]["lgw-a"]["IPAddress"] = "172.17.0.9"
    spec = spec_of(inspect)
    assert (spec.running, spec.paused) == (False, False)
    assert spec.started_at == "0001-01-01T00:00:00Z"
    assert not spec.ready


def test_paused_container_not_ready() -> None:
    inspect = load("twonet")
    inspect["State"]["Paused"] = True
    spec = spec_of(inspect)
    assert spec.paused and not spec.ready


def test_rejection_describe_names_container_label_and_value() -> None:
    inspect = set_labels(load("twonet"), port="80a")
    text = rejection_of(inspect).describe()
    assert "lgwfx-twonet" in text
    assert inspect["Id"][:12] in text
    assert "labelgw.port='80a'" in text


# --- opting in, pinned env, tolerance of missing keys -------------------------------------------------------


@pytest.mark.parametrize("case", ["host", "twonet", "multiport", "health", "created"])
def test_no_service_label_means_not_ours(case: str) -> None:
    assert parse_container(set_labels(load(case), drop=("service",))) is None


def test_no_labels_at_all() -> None:
    inspect = load("twonet")
    inspect["Config"]["Labels"] = None  # what docker writes for a container without labels
    assert parse_container(inspect) is None
    del inspect["Config"]
    assert parse_container(inspect) is None


@pytest.mark.parametrize("inspect", [{}, {"Config": None}, {"Config": {"Labels": {}}}])
def test_empty_inspect_data(inspect: dict[str, Any]) -> None:
    assert parse_container(inspect) is None


def test_minimal_inspect_data() -> None:
    inspect = {
        "Id": "abc",
        "Name": "/x",
        "Config": {"Labels": {"labelgw.service": "x", "labelgw.port": "80"}},
        "HostConfig": {"NetworkMode": "host"},
    }
    spec = spec_of(inspect)
    assert (spec.container_id, spec.name, spec.address, spec.port) == ("abc", "x", "127.0.0.1", 80)
    assert (spec.running, spec.paused, spec.health, spec.started_at) == (False, False, None, "")


def test_missing_network_settings() -> None:
    inspect = load("twonet")
    set_labels(inspect, drop=("network",))
    del inspect["NetworkSettings"]
    rejection = rejection_of(inspect)
    assert rejection.label == "labelgw.network"
    assert rejection.reason == "container has no IP address on any network (networks: none)"


@pytest.mark.parametrize(
    "pinned, expected",
    [
        (None, ("api.example.test",)),
        ("staging", ("api.example.test",)),
        ("prod", None),
        ("Staging", None),  # compared exactly
    ],
)
def test_pinned_env(pinned: str | None, expected: tuple[str, ...] | None) -> None:
    result = parse_container(load("twonet"), pinned_env=pinned)
    if expected is None:
        assert result is None
    else:
        assert isinstance(result, ContainerSpec) and result.hosts == expected


def test_pinned_env_skips_container_without_env() -> None:
    assert parse_container(load("health"), pinned_env="staging") is None


def test_pinned_env_skips_before_validating() -> None:
    # Another environment's broken container is that gateway's business, not ours.
    inspect = set_labels(load("twonet"), env="prod", port="nope")
    assert parse_container(inspect, pinned_env="staging") is None


# --- service, version, env --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, stored",
    [
        ("api", "api"),
        ("API", "api"),
        ("My-Api_2", "my-api_2"),
        ("0day", "0day"),
        ("a" * 63, "a" * 63),
        (" api ", "api"),  # surrounding whitespace ignored
    ],
)
def test_service_valid(value: str, stored: str) -> None:
    spec = spec_of(set_labels(load("twonet"), service=value))
    assert spec.service == stored


@pytest.mark.parametrize(
    "value, reason_part",
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("-api", "must start with a letter or digit"),
        ("_api", "must start with a letter or digit"),
        ("a" * 64, "at most 63 characters"),
        ("api v2", "only letters, digits"),
        ("api/v2", "only letters, digits"),
        ("apí", "only letters, digits"),
    ],
)
@pytest.mark.parametrize("suffix", ["service", "version", "env"])
def test_identifier_invalid(suffix: str, value: str, reason_part: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), **{suffix: value}))
    assert rejection.label == f"labelgw.{suffix}"
    assert rejection.value == value
    assert reason_part in rejection.reason


def test_version_and_env_kept_as_written() -> None:
    spec = spec_of(set_labels(load("twonet"), version="V2.1-rc_1", env="Staging"))
    assert spec.version == "V2.1-rc_1"
    assert spec.env == "Staging"


# --- port ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, port", [("1", 1), ("80", 80), ("65535", 65535), ("08080", 8080), (" 81 ", 81)])
def test_port_label(value: str, port: int) -> None:
    assert spec_of(set_labels(load("twonet"), port=value)).port == port


@pytest.mark.parametrize("value", ["", "0", "65536", "80a", "-1", "+80", "8 0", "1e3", "99999999", "٨٠"])
def test_port_label_invalid(value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), port=value))
    assert (rejection.label, rejection.value) == ("labelgw.port", value)
    assert rejection.reason == "not a port number (1-65535)"


@pytest.mark.parametrize(
    "exposed, port",
    [
        ({"8080/tcp": {}}, 8080),
        ({"53/udp": {}, "8080/tcp": {}}, 8080),  # only tcp counts
        ({"8080/tcp": {}, "8080/udp": {}}, 8080),
        ({"9000": {}}, 9000),  # no protocol means tcp
    ],
)
def test_exposed_port(exposed: dict[str, Any], port: int) -> None:
    inspect = load("twonet")
    inspect["Config"]["ExposedPorts"] = exposed
    assert spec_of(inspect).port == port


@pytest.mark.parametrize("exposed", [None, {}, {"53/udp": {}}])
def test_no_exposed_port(exposed: dict[str, Any] | None) -> None:
    inspect = load("twonet")
    inspect["Config"]["ExposedPorts"] = exposed
    rejection = rejection_of(inspect)
    assert (rejection.label, rejection.value) == ("labelgw.port", "")
    assert rejection.reason == "no port is exposed by the container; set labelgw.port"


def test_host_network_without_port_label() -> None:
    rejection = rejection_of(set_labels(load("host"), drop=("port",)))
    assert rejection.label == "labelgw.port"
    assert "no port is exposed" in rejection.reason


def test_several_exposed_ports_listed_in_numeric_order() -> None:
    inspect = load("multiport")
    inspect["Config"]["ExposedPorts"] = {"9000/tcp": {}, "443/tcp": {}, "80/tcp": {}, "53/udp": {}}
    rejection = rejection_of(inspect)
    assert rejection.reason == "the container exposes several tcp ports (80, 443, 9000); set labelgw.port to choose one"


# --- host ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, hosts",
    [
        ("api.test", ("api.test",)),
        ("API.Example.TEST", ("api.example.test",)),
        ("api.test.", ("api.test",)),
        (" a.test , b.test ", ("a.test", "b.test")),
        ("b.test,a.test,B.test,a.test.", ("b.test", "a.test")),  # duplicates removed, order kept
        ("a.test,", ("a.test",)),  # a trailing comma is harmless
        ("localhost", ("localhost",)),
        ("127.0.0.1", ("127.0.0.1",)),
        ("xn--caf-dma.test", ("xn--caf-dma.test",)),
        ("a-b.c-d.test", ("a-b.c-d.test",)),
        ("a" * 63 + ".test", ("a" * 63 + ".test",)),
        (".".join(["a" * 62] * 4), (".".join(["a" * 62] * 4),)),  # 251 characters
    ],
)
def test_host_valid(value: str, hosts: tuple[str, ...]) -> None:
    assert spec_of(set_labels(load("twonet"), host=value)).hosts == hosts


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "no host given (comma-separated hostnames expected)"),
        (" , ,", "no host given (comma-separated hostnames expected)"),
        ("*.localhost", "'*.localhost': too broad: '*.localhost' would claim every name of the zone 'localhost'; "
         "a wildcard needs two labels after '*.' (*.apps.localhost)"),
        ("a.test,*.test", "'*.test': too broad: '*.test' would claim every name of the zone 'test'; "
         "a wildcard needs two labels after '*.' (*.apps.test)"),
        ("*.*.b.test", "'*.*.b.test': a wildcard host is one leading '*.' label followed by a name (*.apps.localhost)"),
        ("a.*.b.test", "'a.*.b.test': a wildcard host is one leading '*.' label followed by a name (*.apps.localhost)"),
        ("a*.b.test", "'a*.b.test': a wildcard host is one leading '*.' label followed by a name (*.apps.localhost)"),
        ("*", "'*': a wildcard host is one leading '*.' label followed by a name (*.apps.localhost)"),
        ("*.b-.test", "'*.b-.test': not a valid hostname (dot-separated labels of a-z, 0-9 and '-', not starting or "
         "ending with '-')"),
        ("*.b.test:80", "'*.b.test:80': hosts are matched without their port; remove the ':port'"),
        ("api.test:8080", "'api.test:8080': hosts are matched without their port; remove the ':port'"),
        ("localhost:80", "'localhost:80': hosts are matched without their port; remove the ':port'"),
    ],
)
def test_host_invalid_reason(value: str, reason: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), host=value))
    assert (rejection.label, rejection.value, rejection.reason) == ("labelgw.host", value, reason)


@pytest.mark.parametrize(
    "value",
    [
        "-api.test",
        "api-.test",
        "api..test",
        "api_v2.test",
        "api test",
        "http://api.test",
        "api.test/path",
        "[::1]",
        "a" * 64 + ".test",
        ".".join(["a" * 62] * 4) + ".ab",  # 254 characters
        "café.test",
    ],
)
def test_host_not_a_hostname(value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), host=value))
    assert (rejection.label, rejection.value) == ("labelgw.host", value)
    assert rejection.reason.startswith(f"{value!r}: not a valid hostname")


def test_host_international_name_hint() -> None:
    rejection = rejection_of(set_labels(load("twonet"), host="café.test"))
    assert "xn--" in rejection.reason


@pytest.mark.parametrize(
    "case, labels, pinned, hosts",
    [
        ("health", {}, None, ("checked.localhost",)),
        ("twonet", {"service": "API"}, None, ("api.staging.localhost",)),
        ("twonet", {"env": "QA"}, None, ("api.qa.localhost",)),
        ("twonet", {}, "staging", ("api.localhost",)),  # pinned: the env is implied
        ("twonet", {"service": "api.v1"}, None, ("api.v1.staging.localhost",)),
    ],
)
def test_default_host(case: str, labels: dict[str, str], pinned: str | None, hosts: tuple[str, ...]) -> None:
    inspect = set_labels(load(case), drop=("host",), **labels)
    assert spec_of(inspect, pinned_env=pinned).hosts == hosts


@pytest.mark.parametrize(
    "labels, label, value",
    [
        ({"service": "my_api"}, "labelgw.service", "my_api"),
        ({"env": "stag_ing"}, "labelgw.env", "stag_ing"),
        ({"service": "api..v1"}, "labelgw.service", "api..v1"),
        ({"service": "api-"}, "labelgw.service", "api-"),
    ],
)
def test_default_host_not_a_hostname(labels: dict[str, str], label: str, value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), drop=("host",), **labels))
    assert (rejection.label, rejection.value) == (label, value)
    assert "is not a valid hostname; set labelgw.host" in rejection.reason


def test_explicit_host_allows_service_with_underscore() -> None:
    spec = spec_of(set_labels(load("twonet"), service="my_api", host="api.test"))
    assert (spec.service, spec.hosts) == ("my_api", ("api.test",))


# --- path ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, path",
    [
        ("/", "/"),
        ("/api", "/api"),
        ("/api/", "/api"),
        ("/api/v2/", "/api/v2"),
        ("/a.b/..c/.d", "/a.b/..c/.d"),  # dots inside names are fine
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a-b_c~d", "/a-b_c~d"),
    ],
)
def test_path_valid(value: str, path: str) -> None:
    assert spec_of(set_labels(load("twonet"), path=value)).path_prefix == path


@pytest.mark.parametrize(
    "value, reason_part",
    [
        ("", "must start with '/'"),
        ("api", "must start with '/'"),
        ("/api?x=1", "must not contain '?' or '#'"),
        ("/api#top", "must not contain '?' or '#'"),
        ("/a b", "whitespace or control characters"),
        ("/a\tb", "whitespace or control characters"),
        ("/a\x00b", "whitespace or control characters"),
        ("/a\x7fb", "whitespace or control characters"),
        ("//api", "must not contain '//'"),
        ("/api//v2", "must not contain '//'"),
        ("/api//", "must not contain '//'"),
        ("/api/./v2", "'.' or '..' segments"),
        ("/api/..", "'.' or '..' segments"),
        ("/..", "'.' or '..' segments"),
        ("/api/.", "'.' or '..' segments"),
        ("/café", "must be ASCII"),
        ("/100%", "percent-escape"),
        ("/a%zz", "percent-escape"),
    ],
)
def test_path_invalid(value: str, reason_part: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), path=value))
    assert (rejection.label, rejection.value) == ("labelgw.path", value)
    assert reason_part in rejection.reason


# --- strip_prefix, scheme -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("OFF", False),
        (" yes ", True),
    ],
)
def test_strip_prefix(value: str, expected: bool) -> None:
    assert spec_of(set_labels(load("twonet"), strip_prefix=value)).strip_prefix is expected


@pytest.mark.parametrize("value", ["", "y", "n", "2", "enabled", "truee", "t"])
def test_strip_prefix_invalid(value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), strip_prefix=value))
    assert (rejection.label, rejection.value) == ("labelgw.strip_prefix", value)
    assert rejection.reason == "not a boolean (use true/false, 1/0, yes/no or on/off)"


def test_strip_prefix_default() -> None:
    assert spec_of(set_labels(load("twonet"), drop=("strip_prefix",))).strip_prefix is False


@pytest.mark.parametrize("value, scheme", [("http", "http"), ("https", "https"), ("HTTPS", "https")])
def test_scheme(value: str, scheme: str) -> None:
    assert spec_of(set_labels(load("twonet"), scheme=value)).scheme == scheme


@pytest.mark.parametrize("value", ["", "ftp", "h2c", "https://", "http2"])
def test_scheme_invalid(value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), scheme=value))
    assert (rejection.label, rejection.value, rejection.reason) == (
        "labelgw.scheme",
        value,
        "scheme must be http or https",
    )


# --- network and address ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "network_label, own, expected_network",
    [
        ("lgw-b", frozenset(), "lgw-b"),
        ("lgw-a", frozenset(), "lgw-a"),
        ("lgw-a", frozenset({"lgw-b"}), "lgw-a"),  # the label beats shared networks
        (None, frozenset(), "lgw-a"),  # first by name
        (None, frozenset({"lgw-b"}), "lgw-b"),  # shared with the gateway
        (None, frozenset({"lgw-b", "lgw-a"}), "lgw-a"),  # several shared: first by name
        (None, frozenset({"elsewhere"}), "lgw-a"),
    ],
)
def test_address_selection(network_label: str | None, own: frozenset[str], expected_network: str) -> None:
    inspect = load("twonet")
    if network_label is None:
        set_labels(inspect, drop=("network",))
    else:
        set_labels(inspect, network=network_label)
    assert spec_of(inspect, own_networks=own).address == address_on(inspect, expected_network)


def test_address_selection_order_is_by_name_not_by_dict_order() -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    networks = inspect["NetworkSettings"]["Networks"]
    inspect["NetworkSettings"]["Networks"] = {"lgw-b": networks["lgw-b"], "lgw-a": networks["lgw-a"]}
    assert spec_of(inspect).address == address_on(inspect, "lgw-a")


def test_shared_network_without_address_is_skipped() -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    inspect["NetworkSettings"]["Networks"]["lgw-b"]["IPAddress"] = ""
    assert spec_of(inspect, own_networks=frozenset({"lgw-b"})).address == address_on(inspect, "lgw-a")


def test_first_network_without_address_is_skipped() -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    inspect["NetworkSettings"]["Networks"]["lgw-a"]["IPAddress"] = ""
    assert spec_of(inspect).address == address_on(inspect, "lgw-b")


def test_network_label_unknown_network() -> None:
    rejection = rejection_of(set_labels(load("twonet"), network="lgw-c"))
    assert (rejection.label, rejection.value) == ("labelgw.network", "lgw-c")
    assert rejection.reason == "the container is not on network 'lgw-c' (networks: lgw-a, lgw-b)"


def test_network_label_network_without_address() -> None:
    inspect = set_labels(load("created"), network="lgw-a")
    inspect["State"]["Running"] = True
    rejection = rejection_of(inspect)
    assert (rejection.label, rejection.value) == ("labelgw.network", "lgw-a")
    assert rejection.reason == "the container has no IP address on network 'lgw-a' (networks: lgw-a)"


def test_network_label_empty() -> None:
    rejection = rejection_of(set_labels(load("twonet"), network=""))
    assert (rejection.label, rejection.value) == ("labelgw.network", "")
    assert "must not be empty" in rejection.reason


def test_host_mode_wins_over_network_label() -> None:
    spec = spec_of(set_labels(load("host"), network="lgw-a"), own_networks=frozenset({"lgw-a"}))
    assert spec.address == "127.0.0.1"


def test_no_address_on_any_network_lists_them() -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    for settings in inspect["NetworkSettings"]["Networks"].values():
        settings["IPAddress"] = ""
    rejection = rejection_of(inspect)
    assert (rejection.label, rejection.value) == ("labelgw.network", "")
    assert rejection.reason == "container has no IP address on any network (networks: lgw-a, lgw-b)"


@pytest.mark.parametrize("networks", [None, {}])
def test_no_networks(networks: dict[str, Any] | None) -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    inspect["NetworkSettings"]["Networks"] = networks
    assert rejection_of(inspect).reason == "container has no IP address on any network (networks: none)"


def test_container_network_mode_explained() -> None:
    inspect = set_labels(load("twonet"), drop=("network",))
    inspect["HostConfig"]["NetworkMode"] = "container:0123456789ab"
    inspect["NetworkSettings"]["Networks"] = {}
    rejection = rejection_of(inspect)
    assert rejection.label == "labelgw.network"
    assert "container:0123456789ab" in rejection.reason


# --- labels for later issues ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, value",
    [
        ("balancer", "wrt"),
        ("balancer", "round_robin"),
        ("balancer", "least_conn"),
        ("weight", "1"),
        ("weight", "0.5"),
        ("weight", ".5"),
        ("weight", "1000"),
        ("weight", "2."),
        ("traffic", "0"),
        ("traffic", "10"),
        ("traffic", "12.5"),
        ("traffic", "100"),
        ("traffic", "10%"),
        ("traffic", "100%"),
        ("health.path", "/"),
        ("health.path", "/healthz"),
        ("health.path", "/status?full=1"),
        ("health.interval", "5"),
        ("health.interval", "5s"),
        ("health.interval", "500ms"),
        ("health.interval", "1m"),
        ("health.interval", "1h"),
        ("health.timeout", "2s"),
        ("health.timeout", "0.5"),
        ("tls", "redirect"),
        ("tls", "off"),
        ("tls", "local"),
    ],
)
def test_later_labels_valid(suffix: str, value: str) -> None:
    spec = spec_of(set_labels(load("twonet"), **{suffix.replace(".", "__"): value}))
    assert spec.option(suffix) == value


def test_tls_local_opts_a_route_out_of_acme() -> None:
    assert spec_of(set_labels(load("twonet"), tls="local")).tls == "local"


def test_typed_options_are_read_once() -> None:
    labels = {
        "balancer": "least_conn", "weight": "2.5", "traffic": "12.5%", "health__path": "/healthz",
        "health__interval": "500ms", "health__timeout": "1m", "tls": "redirect",
    }
    spec = spec_of(set_labels(load("twonet"), **labels))
    assert (spec.balancer, spec.weight, spec.traffic, spec.tls) == ("least_conn", 2.5, 12.5, "redirect")
    assert spec.health_check == HealthCheck("/healthz", interval=0.5, timeout=60.0)


def test_typed_options_defaults() -> None:
    spec = spec_of(load("twonet"))
    assert (spec.balancer, spec.weight, spec.traffic, spec.tls, spec.health_check) == (None, 1.0, None, None, None)
    # Interval and timeout alone check nothing; the path alone gets the default interval and timeout.
    spec = spec_of(set_labels(load("twonet"), health__interval="1s", health__timeout="1s"))
    assert spec.health_check is None
    spec = spec_of(set_labels(load("twonet"), health__path="/"))
    assert spec.health_check == HealthCheck("/", interval=5.0, timeout=2.0)


@pytest.mark.parametrize(
    "suffix, value, reason_part",
    [
        ("balancer", "", "unknown balancer; use one of: hash, least_conn, round_robin, wrt"),
        ("balancer", "wrr", "unknown balancer; use one of: hash, least_conn, round_robin, wrt"),
        ("balancer", "RoundRobin", "unknown balancer"),
        ("weight", "", "not a number"),
        ("weight", "0", "weight must be positive and at most 1000"),
        ("weight", "0.0", "must be positive"),
        ("weight", "-1", "not a number"),
        ("weight", "1001", "at most 1000"),
        ("weight", "nan", "not a number"),
        ("weight", "inf", "not a number"),
        ("weight", "1e3", "not a number"),
        ("weight", "1_0", "not a number"),
        ("weight", "heavy", "not a number"),
        ("traffic", "", "not a percentage"),
        ("traffic", "%", "not a percentage"),
        ("traffic", "101", "between 0 and 100"),
        ("traffic", "100.5%", "between 0 and 100"),
        ("traffic", "-5", "not a percentage"),
        ("traffic", "ten", "not a percentage"),
        ("traffic", "nan", "not a percentage"),
        ("health.path", "", "must start with '/'"),
        ("health.path", "healthz", "must start with '/'"),
        ("health.path", "/health check", "without whitespace"),
        ("health.interval", "", "not a duration"),
        ("health.interval", "0", "must be positive"),
        ("health.interval", "0s", "must be positive"),
        ("health.interval", "2h", "at most 1 hour"),
        ("health.interval", "61m", "at most 1 hour"),
        ("health.interval", "-5s", "not a duration"),
        ("health.interval", "5 s", "not a duration"),
        ("health.interval", "5sec", "not a duration"),
        ("health.timeout", "fast", "not a duration"),
        ("health.timeout", "1d", "not a duration"),
        ("tls", "", "unknown tls mode; use one of: local, off, redirect"),
        ("tls", "on", "unknown tls mode"),
        ("tls", "REDIRECT", "unknown tls mode"),
    ],
)
def test_later_labels_invalid(suffix: str, value: str, reason_part: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), **{suffix.replace(".", "__"): value}))
    assert (rejection.label, rejection.value) == (f"labelgw.{suffix}", value)
    assert reason_part in rejection.reason


# --- unknown labels, custom prefix, order of checks ----------------------------------------------------------


def test_known_labels() -> None:
    from labelgw.core.middleware import MIDDLEWARE_LABELS

    assert MIDDLEWARE_LABELS <= KNOWN_LABELS
    assert "canary.max_error_rate" in KNOWN_LABELS and "canary.max_latency_ratio" in KNOWN_LABELS
    assert KNOWN_LABELS - MIDDLEWARE_LABELS - {"canary.max_error_rate", "canary.max_latency_ratio"} == {
        "service", "version", "env", "port", "host", "path", "strip_prefix", "network", "scheme",
        "balancer", "hash.key", "weight", "traffic", "health.path", "health.interval", "health.timeout", "tls",
        "tls.verify", "tls.ca", "tls.server_name",
    }  # fmt: skip


@pytest.mark.parametrize("suffix", ["prot", "Service", "hosts", "health", "health.paht", "strip-prefix", ""])
def test_unknown_label(suffix: str) -> None:
    inspect = load("twonet")
    inspect["Config"]["Labels"][f"labelgw.{suffix}"] = "x"
    rejection = rejection_of(inspect)
    assert (rejection.label, rejection.value) == (f"labelgw.{suffix}", "x")
    assert rejection.reason.startswith("unknown label; known labels are: ")
    assert "labelgw.strip_prefix" in rejection.reason and "labelgw.health.interval" in rejection.reason


def test_first_unknown_label_by_name() -> None:
    inspect = set_labels(load("twonet"), zz="1", aa="2")
    assert rejection_of(inspect).label == "labelgw.aa"


def test_unknown_label_reported_before_other_problems() -> None:
    # With several exposed ports, the misspelt port label is the real cause.
    inspect = set_labels(load("multiport"), prot="80")
    rejection = rejection_of(inspect)
    assert (rejection.label, rejection.value) == ("labelgw.prot", "80")


@pytest.mark.parametrize(
    "labels, first",
    [
        ({"service": "-x", "port": "0", "host": "*.t"}, "labelgw.service"),
        ({"version": "v 2", "env": "e v"}, "labelgw.version"),
        ({"env": "e v", "port": "0"}, "labelgw.env"),
        ({"port": "0", "host": "*.t", "path": "x"}, "labelgw.port"),
        ({"host": "*.t", "path": "x"}, "labelgw.host"),
        ({"path": "x", "strip_prefix": "maybe"}, "labelgw.path"),
        ({"strip_prefix": "maybe", "scheme": "ftp"}, "labelgw.strip_prefix"),
        ({"scheme": "ftp", "balancer": "x"}, "labelgw.scheme"),
        ({"balancer": "x", "weight": "0", "network": "nope"}, "labelgw.balancer"),
        ({"weight": "0", "traffic": "200"}, "labelgw.weight"),
        ({"traffic": "200", "health__path": "x"}, "labelgw.traffic"),
        ({"health__path": "x", "health__interval": "0"}, "labelgw.health.path"),
        ({"health__interval": "0", "health__timeout": "0"}, "labelgw.health.interval"),
        ({"health__timeout": "0", "tls": "x"}, "labelgw.health.timeout"),
        ({"tls": "x", "network": "nope"}, "labelgw.tls"),
    ],
)
def test_first_problem_wins_in_fixed_order(labels: dict[str, str], first: str) -> None:
    assert rejection_of(set_labels(load("twonet"), **labels)).label == first


def test_same_input_same_rejection() -> None:
    labels = {"port": "0", "host": "*.t", "path": "x", "tls": "x"}
    results = {rejection_of(set_labels(load("twonet"), **labels)) for _ in range(3)}
    assert len(results) == 1


def test_custom_prefix() -> None:
    inspect = load("twonet")
    inspect["Config"]["Labels"] = {
        "acme.gw.service": "Shop",
        "acme.gw.port": "9000",
        "acme.gw.network": "lgw-b",
        "labelgw.service": "ignored",  # not under the custom prefix
        "labelgw.bogus": "ignored",
        "acme.gwx.service": "ignored",
    }
    spec = spec_of(inspect, prefix="acme.gw")
    assert (spec.service, spec.port, spec.hosts) == ("shop", 9000, ("shop.localhost",))
    assert spec.address == address_on(inspect, "lgw-b")
    assert spec.options == (("network", "lgw-b"), ("port", "9000"), ("service", "Shop"))


def test_custom_prefix_messages_use_it() -> None:
    inspect = load("multiport")
    inspect["Config"]["Labels"] = {"acme.gw.service": "multi"}
    rejection = rejection_of(inspect, prefix="acme.gw")
    assert rejection.label == "acme.gw.port"
    assert "set acme.gw.port" in rejection.reason
    inspect["Config"]["Labels"]["acme.gw.colour"] = "blue"
    rejection = rejection_of(inspect, prefix="acme.gw")
    assert rejection.label == "acme.gw.colour"
    assert "acme.gw.service" in rejection.reason


def test_custom_prefix_ignores_default_prefix_containers() -> None:
    assert parse_container(load("twonet"), prefix="acme.gw") is None


# --- helpers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("5", 5.0),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("1m", 60.0),
        ("60m", 3600.0),
        ("1h", 3600.0),
        ("3600", 3600.0),
        (" 2s ", 2.0),
        (".25", 0.25),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text", ["", "s", "0", "0ms", "3601", "1.5h", "-1", "1e3", "5S", "5 s", "1m30s", "nan", "inf"])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "YES", " On "])
def test_parse_bool_true(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "0", "no", "off", "No", "FALSE"])
def test_parse_bool_false(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "2", "y", "none", "null", "tru"])
def test_parse_bool_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


def test_fixtures_are_not_mutated_between_tests() -> None:
    first = load("twonet")
    first["Config"]["Labels"].clear()
    assert load("twonet")["Config"]["Labels"]["labelgw.service"] == "api"


# --- found by mutation testing (tests/mutation.md) -----------------------------------------------------------


@pytest.mark.parametrize("exposed, port", [({"1/tcp": {}}, 1), ({"65535/tcp": {}}, 65535), ({"0/tcp": {}, "80/tcp": {}}, 80), ({"65536/tcp": {}, "80": {}}, 80)])
def test_exposed_ports_count_only_in_1_to_65535(exposed: dict[str, Any], port: int) -> None:
    inspect = load("twonet")
    inspect["Config"]["ExposedPorts"] = exposed
    assert spec_of(inspect).port == port


@pytest.mark.parametrize("pinned, env_part", [(None, ".staging"), ("staging", "")])
def test_a_rejection_names_the_default_host_it_asked_for_env_included_unless_pinned(
    pinned: str | None, env_part: str
) -> None:
    labels = set_labels(load("twonet"), drop=("host",))
    hosts = spec_of(labels, pinned_env=pinned).hosts
    assert hosts[0].endswith(env_part + ".localhost") and hosts[0].count(".") == 1 + env_part.count(".")
    rejected = rejection_of(set_labels(load("twonet"), drop=("host",), port="nope"), pinned_env=pinned)
    assert rejected.hosts == hosts


@pytest.mark.parametrize("value", ["/a\x7fb", "/a\x1fb", "/a b", "/a\x00b"])
def test_health_path_refuses_control_characters_and_space(value: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), health__path=value))
    assert (rejection.label, rejection.value) == ("labelgw.health.path", value)
    assert "whitespace or control characters" in rejection.reason


def test_health_path_takes_every_visible_ascii_character() -> None:
    value = "/~a!$&'()*+,;=:@-._"
    assert isinstance(parse_container(set_labels(load("twonet"), health__path=value)), ContainerSpec)


@pytest.mark.parametrize(
    "value, hosts",
    [
        ("*.example.test", ("*.example.test",)),
        ("*.Apps.LOCALHOST.", ("*.apps.localhost",)),
        ("a.test,*.b.test", ("a.test", "*.b.test")),
        ("special.apps.localhost, *.apps.localhost", ("special.apps.localhost", "*.apps.localhost")),
    ],
)
def test_host_wildcard_valid(value: str, hosts: tuple[str, ...]) -> None:
    # One leading '*.' label and at least two labels after it (labelgw.core.routes matches it one label deep).
    assert spec_of(set_labels(load("twonet"), host=value)).hosts == hosts
