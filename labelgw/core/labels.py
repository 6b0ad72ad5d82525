"""Docker inspect data -> what a container asks labelgw to route. Pure: no I/O, no logging.

`parse_container` takes the dict that docker's `APIClient.inspect_container(id)` returns and gives back
a `ContainerSpec`, a `Rejection` (the container opted in but one of its labels is wrong), or None (not ours).
A bad label disables only its own container, and the Rejection names the label, its value and why.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Iterable, Mapping, TypeVar

from labelgw.core.model import (
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_TIMEOUT,
    BalancerName,
    ContainerSpec,
    HashKey,
    HealthCheck,
    Rejection,
    Scheme,
    TlsMode,
    normalize_name,
)
from labelgw.core.units import parse_duration, parse_percent
from labelgw.core.middleware import (
    MIDDLEWARE_LABELS, PLUGIN_LABEL_PREFIX, MiddlewareLabelError, is_middleware_label, parse_middleware,
)

__all__ = [
    "KNOWN_LABELS", "parse_bool", "parse_container", "parse_duration", "parse_hash_key", "parse_hosts", "parse_path",
]

# Suffixes after "<prefix>.". Anything else under the prefix is refused: a typo must not be silently ignored.
KNOWN_LABELS: frozenset[str] = frozenset(
    {
        "service",
        "version",
        "env",
        "port",
        "host",
        "path",
        "strip_prefix",
        "network",
        "scheme",
        "balancer",
        "hash.key",
        "weight",
        "traffic",
        "health.path",
        "health.interval",
        "health.timeout",
        "tls",
        "canary.max_error_rate",
        "canary.max_latency_ratio",
        "tls.verify",
        "tls.ca",
        "tls.server_name",
    }
)

# The middleware labels (ratelimit, max_inflight, breaker.*, fallback.*): labelgw.core.middleware.
KNOWN_LABELS = KNOWN_LABELS | MIDDLEWARE_LABELS

# Label text -> the typed value (a mapping rather than a set, so that the result is the Literal type).
BALANCERS: Mapping[str, BalancerName] = {
    "wrt": "wrt", "round_robin": "round_robin", "least_conn": "least_conn", "hash": "hash",
}
TLS_MODES: Mapping[str, TlsMode] = {"redirect": "redirect", "off": "off", "local": "local"}
SCHEMES: Mapping[str, Scheme] = {"http": "http", "https": "https"}
MAX_WEIGHT = 1000.0
MAX_LATENCY_RATIO = 1000.0

_T = TypeVar("_T")

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PORT = re.compile(r"[0-9]{1,5}")
# Plain decimals only: float() would also take "nan", "inf", "1e3", "1_000" and non-ASCII digits.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_WITH_PORT = re.compile(r"(?P<host>[^:]*):[0-9]*")
_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A header field name (RFC 9110 5.1) or a cookie name (RFC 6265 4.1.1): both are tokens.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class _Invalid(Exception):
    """One label is wrong; carries what the Rejection needs. Never leaves this module."""

    def __init__(self, label: str, value: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.value = value
        self.reason = reason


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off, in any case; anything else raises ValueError."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean (use true/false, 1/0, yes/no or on/off)")


def parse_container(
    inspect: Mapping[str, Any],
    *,
    prefix: str = "labelgw",
    pinned_env: str | None = None,
    own_networks: frozenset[str] = frozenset(),
) -> ContainerSpec | Rejection | None:
    """Read one container's inspect data.

    None: the container has no `<prefix>.service` label, or the gateway is pinned to `pinned_env` and the
    container's `<prefix>.env` is something else (or absent). Otherwise a ContainerSpec, or a Rejection for the
    first problem found; labels are checked in a fixed order so the message for a container never changes.
    `own_networks` are the networks the gateway itself is attached to: a shared one is the reachable address.
    """
    config = _mapping(inspect.get("Config"))
    all_labels = _mapping(config.get("Labels"))
    label_prefix = prefix + "."
    labels: dict[str, str] = {
        key[len(label_prefix) :]: str(value)
        for key, value in all_labels.items()
        if isinstance(key, str) and key.startswith(label_prefix)
    }
    if "service" not in labels:
        return None
    if pinned_env is not None and labels.get("env", "").strip() != pinned_env:
        # Another gateway's container: not an error, and not ours to report.
        return None

    container_id = str(inspect.get("Id") or "")
    name = str(inspect.get("Name") or "").removeprefix("/")
    try:
        return _build_spec(inspect, labels, prefix, pinned_env, own_networks, container_id, name)
    except _Invalid as problem:
        return Rejection(
            container_id=container_id,
            name=name,
            label=problem.label,
            value=problem.value,
            reason=problem.reason,
            hosts=_wanted_hosts(labels, pinned_env),
        )


def _wanted_hosts(labels: Mapping[str, str], pinned_env: str | None) -> tuple[str, ...]:
    """The hosts a rejected container asked for, best effort: its host label, else its default host."""
    try:
        if "host" in labels:
            return parse_hosts(labels["host"].strip())
        parts = [labels.get("service", "").strip().lower()]
        env = labels.get("env", "").strip()
        if env and pinned_env is None:
            parts.append(env.lower())
        return (normalize_name(".".join(parts) + ".localhost"),) if parts[0] else ()
    except ValueError:
        return ()


def _build_spec(
    inspect: Mapping[str, Any],
    labels: Mapping[str, str],
    prefix: str,
    pinned_env: str | None,
    own_networks: frozenset[str],
    container_id: str,
    name: str,
) -> ContainerSpec:
    def full(suffix: str) -> str:
        return f"{prefix}.{suffix}"

    def check(suffix: str, parse: Callable[[str], _T]) -> _T | None:
        """Parse an optional label; None when absent. ValueError from `parse` becomes a Rejection."""
        if suffix not in labels:
            return None
        raw = labels[suffix]
        try:
            return parse(raw.strip())
        except ValueError as error:
            raise _Invalid(full(suffix), raw, str(error)) from None

    # Unknown labels first: a misspelt label is usually the real cause of whatever else looks wrong.
    # plugin.<name>.<key>: a plugin middleware's options, checked by labelgw.core.middleware.
    unknown = sorted(
        name for name in set(labels) - KNOWN_LABELS
        if not is_middleware_label(name) and not name.startswith(PLUGIN_LABEL_PREFIX)
    )
    if unknown:
        raise _Invalid(
            full(unknown[0]),
            labels[unknown[0]],
            "unknown label; known labels are: " + ", ".join(full(known) for known in sorted(KNOWN_LABELS)),
        )

    # Present: parse_container returns None for containers without it.
    service = (check("service", _parse_identifier) or "").lower()
    version: str | None = check("version", _parse_identifier)
    env: str | None = check("env", _parse_identifier)

    port: int | None = check("port", _parse_port)
    if port is None:
        port = _exposed_port(inspect, full("port"))

    hosts: tuple[str, ...] | None = check("host", parse_hosts)
    if hosts is None:
        hosts = _default_hosts(labels, service, env if pinned_env is None else None, full)

    path: str = check("path", parse_path) or "/"
    strip_prefix: bool = bool(check("strip_prefix", parse_bool))
    scheme: Scheme = check("scheme", _parse_scheme) or "http"

    # Read here, once, into typed fields: a bad one disables only this container instead of failing later in
    # the data path, and nothing after this module reads label text again.
    balancer: BalancerName | None = check("balancer", _parse_balancer)
    hash_key: HashKey | None = check("hash.key", parse_hash_key)
    if hash_key is not None and balancer not in (None, "hash"):
        # Absent balancer label: --balancer may be hash. A different one: the key would be silently unused.
        raise _Invalid(full("hash.key"), labels["hash.key"], f"has effect only with {full('balancer')}=hash")
    weight: float | None = check("weight", _parse_weight)
    traffic: float | None = check("traffic", _parse_traffic)
    health_path: str | None = check("health.path", _parse_health_path)
    interval: float | None = check("health.interval", parse_duration)
    timeout: float | None = check("health.timeout", parse_duration)
    tls: TlsMode | None = check("tls", _parse_tls)
    # Backend TLS (scheme=https): verify the backend's certificate, against a CA bundle file, for a name.
    tls_verify = bool(check("tls.verify", parse_bool))
    tls_ca: str | None = check("tls.ca", _parse_ca_path)
    tls_server_name: str | None = check("tls.server_name", _parse_server_name)
    for suffix in ("tls.verify", "tls.ca", "tls.server_name"):
        if suffix in labels and scheme != "https":
            raise _Invalid(full(suffix), labels[suffix], f"has effect only with {full('scheme')}=https")
    if tls_ca is not None and not tls_verify:
        raise _Invalid(full("tls.ca"), labels["tls.ca"], f"has effect only with {full('tls.verify')}=true")
    # Canary analysis limits (labelgw.core.canary): they judge a version against the stable one.
    max_error_rate: float | None = check("canary.max_error_rate", _parse_error_rate)
    max_latency_ratio: float | None = check("canary.max_latency_ratio", _parse_latency_ratio)
    for suffix, limit in (("canary.max_error_rate", max_error_rate), ("canary.max_latency_ratio", max_latency_ratio)):
        if limit is not None and version is None:
            raise _Invalid(full(suffix), labels[suffix], f"canary limits judge a version; set {full('version')}")
    # Interval and timeout without a path check nothing; they are accepted (and kept in `options`).
    health_check = (
        HealthCheck(
            health_path,
            DEFAULT_HEALTH_INTERVAL if interval is None else interval,
            DEFAULT_HEALTH_TIMEOUT if timeout is None else timeout,
        )
        if health_path is not None
        else None
    )

    try:
        middleware = parse_middleware(labels, service)
    except MiddlewareLabelError as problem:
        raise _Invalid(full(problem.label), problem.value, problem.reason) from None

    network: str | None = check("network", _parse_network_name)
    state = _mapping(inspect.get("State"))
    running = bool(state.get("Running", False))
    try:
        address = _select_address(inspect, network, labels.get("network", ""), own_networks, full("network"))
    except _Invalid:
        if running:
            raise
        # A stopped container has no address until it starts again; it stays a known backend that is not ready,
        # so its route answers 503 (not 404) while it restarts.
        address = ""
    # No "Health" key at all means no healthcheck; a healthcheck always reports some status.
    health_state = state.get("Health")
    health = str(_mapping(health_state).get("Status") or "starting") if health_state is not None else None
    return ContainerSpec(
        container_id=container_id,
        name=name,
        service=service,
        address=address,
        port=port,
        hosts=hosts,
        path_prefix=path,
        strip_prefix=strip_prefix,
        scheme=scheme,
        version=version,
        env=env,
        running=running,
        paused=bool(state.get("Paused", False)),
        health=health,
        started_at=str(state.get("StartedAt") or ""),
        weight=1.0 if weight is None else weight,
        traffic=traffic,
        balancer=balancer,
        hash_key=hash_key,
        health_check=health_check,
        tls=tls,
        tls_verify=tls_verify,
        tls_ca=tls_ca,
        tls_server_name=tls_server_name,
        canary_max_error_rate=max_error_rate,
        canary_max_latency_ratio=max_latency_ratio,
        middleware=middleware,
        options=tuple(sorted(labels.items())),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    """Docker writes null for empty maps (Labels, ExposedPorts, Networks ...): treat anything else as empty."""
    return value if isinstance(value, Mapping) else {}


def _parse_identifier(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    if _IDENTIFIER.fullmatch(text) is None:
        raise ValueError(
            "must start with a letter or digit and contain only letters, digits, '_', '.', '-' (at most 63 characters)"
        )
    return text


def _parse_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise ValueError("not a port number (1-65535)")
    return int(text)


def _exposed_port(inspect: Mapping[str, Any], port_label: str) -> int:
    """The container's single exposed tcp port; with none or several, refuse rather than guess."""
    exposed = _mapping(_mapping(inspect.get("Config")).get("ExposedPorts"))
    tcp_ports: set[int] = set()
    for key in exposed:
        number, _, protocol = str(key).partition("/")
        if protocol in ("", "tcp") and _PORT.fullmatch(number) and 1 <= int(number) <= 65535:
            tcp_ports.add(int(number))
    if len(tcp_ports) == 1:
        return tcp_ports.pop()
    if not tcp_ports:
        raise _Invalid(port_label, "", f"no port is exposed by the container; set {port_label}")
    listed = ", ".join(str(number) for number in sorted(tcp_ports))
    raise _Invalid(port_label, "", f"the container exposes several tcp ports ({listed}); set {port_label} to choose one")


def _host_problem(host: str, wildcard: bool = True) -> str | None:
    """Why `host` (already trimmed, lower-cased, without trailing dot) is not usable; None when it is.

    With `wildcard`, `*.<name>` is a host too: it routes every name exactly one label under `<name>`
    (labelgw.core.routes), and `<name>` needs two labels at least, so that `*.localhost` or `*.com` cannot claim a
    whole zone.
    """
    if "*" in host:
        if not wildcard:
            return "a wildcard is not a host name here"
        parent = host[2:] if host.startswith("*.") else ""
        if not parent or "*" in parent:
            return "a wildcard host is one leading '*.' label followed by a name (*.apps.localhost)"
        if "." not in parent:
            return (
                f"too broad: '*.{parent}' would claim every name of the zone {parent!r}; "
                f"a wildcard needs two labels after '*.' (*.apps.{parent})"
            )
        return _host_problem(parent, wildcard=False)
    with_port = _HOST_WITH_PORT.fullmatch(host)
    if with_port is not None and _host_problem(with_port["host"]) is None:
        return "hosts are matched without their port; remove the ':port'"
    if not host.isascii():
        return "not a valid hostname (write international names in their xn-- form)"
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(part) for part in host.split(".")):
        return "not a valid hostname (dot-separated labels of a-z, 0-9 and '-', not starting or ending with '-')"
    return None


def parse_hosts(text: str, wildcard: bool = True) -> tuple[str, ...]:
    """Comma-separated host names, normalised (lower case, no trailing dot), duplicates dropped; ValueError
    naming the first bad one. With `wildcard`, `*.<name>` hosts are accepted (`_host_problem`)."""
    hosts: list[str] = []
    # Empty items (a trailing comma) are harmless; an empty list is not.
    for item in text.split(","):
        host = normalize_name(item)
        if not host:
            continue
        problem = _host_problem(host, wildcard)
        if problem is not None:
            raise ValueError(f"{item.strip()!r}: {problem}")
        if host not in hosts:
            hosts.append(host)
    if not hosts:
        raise ValueError("no host given (comma-separated hostnames expected)")
    return tuple(hosts)


def _default_hosts(
    labels: Mapping[str, str], service: str, env: str | None, full: Callable[[str], str]
) -> tuple[str, ...]:
    """`<service>.localhost`, or `<service>.<env>.localhost`; service and env may hold '_' which no hostname can."""
    parts = [("service", service)] + ([("env", env.lower())] if env is not None else [])
    for suffix, part in parts:
        if all(_HOST_LABEL.fullmatch(piece) for piece in part.split(".")):
            continue
        default = ".".join(value for _, value in parts) + ".localhost"
        raise _Invalid(
            full(suffix),
            labels[suffix],
            f"the default host {default!r} is not a valid hostname; set {full('host')}",
        )
    return (".".join(value for _, value in parts) + ".localhost",)


def parse_path(text: str) -> str:
    """A path prefix: starts with '/', whole segments, no trailing '/' (except the root); ValueError saying why."""
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    if "?" in text or "#" in text:
        raise ValueError("must not contain '?' or '#' (a path prefix matches the path only)")
    if not text.isascii():
        raise ValueError("must be ASCII; percent-encode other characters")
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError("must not contain whitespace or control characters")
    if _PERCENT_ESCAPE.search(text):
        raise ValueError("'%' must start a percent-escape of two hex digits")
    if "//" in text:
        raise ValueError("must not contain '//'")
    if any(segment in (".", "..") for segment in text.split("/")):
        raise ValueError("must not contain '.' or '..' segments")
    return text.rstrip("/") or "/"


def _parse_scheme(text: str) -> Scheme:
    scheme = SCHEMES.get(text.lower())
    if scheme is None:
        raise ValueError("scheme must be http or https")
    return scheme


def _unknown_choice(what: str, allowed: Mapping[str, str]) -> ValueError:
    return ValueError(f"unknown {what}; use one of: {', '.join(sorted(allowed))}")


def _parse_balancer(text: str) -> BalancerName:
    balancer = BALANCERS.get(text)
    if balancer is None:
        raise _unknown_choice("balancer", BALANCERS)
    return balancer


def parse_hash_key(text: str) -> HashKey:
    """`ip`, `path`, `header:NAME` or `cookie:NAME` (NAME a token); ValueError saying what is expected."""
    kind, colon, name = text.partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if not colon and kind in ("ip", "path"):
        return HashKey("ip") if kind == "ip" else HashKey("path")
    if colon and kind in ("header", "cookie"):
        if not name:
            raise ValueError(f"{kind}: needs a name ({kind}:NAME)")
        if _TOKEN.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a {kind} name (letters, digits and !#$%&'*+.^_`|~-)")
        if kind == "header":
            if name.lower() == "cookie":
                raise ValueError("hash on one cookie with cookie:NAME, not on the whole Cookie header")
            return HashKey("header", name.lower())
        return HashKey("cookie", name)
    raise ValueError("not a hash key; use ip, path, header:NAME or cookie:NAME")


def _parse_tls(text: str) -> TlsMode:
    mode = TLS_MODES.get(text)
    if mode is None:
        raise _unknown_choice("tls mode", TLS_MODES)
    return mode


def _parse_number(text: str) -> float:
    if _DECIMAL.fullmatch(text) is None:
        raise ValueError("not a number")
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("not a number")
    return number


def _parse_weight(text: str) -> float:
    try:
        weight = _parse_number(text)
    except ValueError:
        raise ValueError(f"not a number (a positive weight up to {MAX_WEIGHT:g})") from None
    if not 0 < weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be positive and at most {MAX_WEIGHT:g}")
    return weight


def _parse_traffic(text: str) -> float:
    percent = parse_percent(text)
    if percent > 100:
        raise ValueError("traffic share must be between 0 and 100 percent")
    return percent


def _parse_error_rate(text: str) -> float:
    """A percentage ("5%" or "5"), returned as a fraction (0.05)."""
    percent = parse_percent(text)
    if percent > 100:
        raise ValueError("error rate limit must be between 0 and 100 percent")
    return percent / 100.0


def _parse_latency_ratio(text: str) -> float:
    try:
        ratio = _parse_number(text)
    except ValueError:
        raise ValueError(f"not a number (a ratio above 1 and at most {MAX_LATENCY_RATIO:g}, e.g. 2)") from None
    if not 1 < ratio <= MAX_LATENCY_RATIO:
        raise ValueError(f"latency ratio must be above 1 and at most {MAX_LATENCY_RATIO:g}")
    return ratio


def _parse_health_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    if not text.isascii() or any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError("must be ASCII without whitespace or control characters")
    return text


def _parse_ca_path(text: str) -> str:
    # A PEM bundle in labelgw's own file system (mounted into its container), read when a backend is dialled.
    if not text.startswith("/"):
        raise ValueError("must be an absolute path to a PEM file of CA certificates")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError("must not contain control characters")
    return text


def _parse_server_name(text: str) -> str:
    name = text.lower().rstrip(".")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        try:
            return ipaddress.ip_address(name.strip("[]")).compressed
        except ValueError:
            raise ValueError("must be a DNS name or an IP address") from None
    return name


def _parse_network_name(text: str) -> str:
    if not text:
        raise ValueError("must not be empty; remove the label or name a network")
    return text


def _describe_networks(names: Iterable[str]) -> str:
    listed = ", ".join(sorted(names))
    return listed or "none"


def _select_address(
    inspect: Mapping[str, Any],
    network: str | None,
    network_raw: str,
    own_networks: frozenset[str],
    network_label: str,
) -> str:
    host_config = _mapping(inspect.get("HostConfig"))
    network_mode = str(host_config.get("NetworkMode") or "")
    if network_mode == "host":
        # The service listens on the host's own addresses; labelgw runs on that host.
        return "127.0.0.1"

    networks = _mapping(_mapping(inspect.get("NetworkSettings")).get("Networks"))
    addresses = {
        str(net_name): str(_mapping(settings).get("IPAddress") or "") for net_name, settings in networks.items()
    }
    on_networks = _describe_networks(addresses)

    if network is not None:
        if network not in addresses:
            raise _Invalid(
                network_label,
                network_raw,
                f"the container is not on network {network!r} (networks: {on_networks})",
            )
        if not addresses[network]:
            raise _Invalid(
                network_label,
                network_raw,
                f"the container has no IP address on network {network!r} (networks: {on_networks})",
            )
        return addresses[network]

    # A gateway in a container reaches only the networks it shares with the target: prefer those.
    for net_name in sorted(addresses):
        if net_name in own_networks and addresses[net_name]:
            return addresses[net_name]
    for net_name in sorted(addresses):
        if addresses[net_name]:
            return addresses[net_name]

    if network_mode.startswith("container:"):
        reason = f"the container shares the network of another container ({network_mode}); label that container"
    else:
        reason = f"container has no IP address on any network (networks: {on_networks})"
    raise _Invalid(network_label, "", reason)
