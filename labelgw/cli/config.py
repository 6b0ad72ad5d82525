"""Settings from the command line and the optional YAML file: validated once, before anything listens."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from labelgw.http.settings import ProxySettings
from labelgw.core.labels import BALANCERS, parse_hash_key, parse_hosts, parse_path
from labelgw.core.model import (
    DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT, BalancerName, ContainerSpec, HashKey, HealthCheck,
)
from labelgw.core.registry import STATIC_PREFIX
from labelgw.registration.settings import FILE_KEYS as _REGISTRY_KEYS, RegistrySettings, SettingsError, registry_settings
from labelgw.core.middleware import (
    MIDDLEWARE_LABELS, PLUGIN_LABEL_PREFIX, MiddlewareLabelError, MiddlewareSpec, is_middleware_label,
    parse_middleware,
)

DEFAULT_HTTP = ("tcp:8080",)
DEFAULT_HTTPS = ("tcp:8443",)
DEFAULT_ADMIN = "tcp:8081:interface=127.0.0.1"
DEFAULT_LABEL_PREFIX = "labelgw"
_PREFIX_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TIMEOUTS = ("connect_timeout", "response_timeout", "head_timeout", "idle_timeout", "body_timeout", "send_timeout")
_LIMITS = ("max_in_flight", "max_in_flight_per_service")


class ConfigError(Exception):
    """A setting that cannot be used; the message names the setting and says why."""


@dataclass(frozen=True, slots=True)
class StaticService:
    """A service of the config file; its backends become the same ContainerSpecs a labelled container makes
    (typed options at their defaults)."""

    name: str
    hosts: tuple[str, ...]
    path: str
    strip_prefix: bool
    backends: tuple[tuple[str, int], ...]
    # The `balancer` and `hash.key` labels' settings (`balancer`, `hash_key`); None: the defaults.
    balancer: BalancerName | None = None
    hash_key: HashKey | None = None
    # The middleware labels, written as keys of the service (`ratelimit: 100/s`, `ratelimit.burst: 20`).
    middleware: MiddlewareSpec | None = None
    # `health:` (path, interval, timeout), read by the rules of the health labels; None: no active check.
    health_check: HealthCheck | None = None

    def specs(self) -> list[ContainerSpec]:
        return [
            ContainerSpec(
                container_id=f"{STATIC_PREFIX}{self.name}:{index}",
                name=f"{self.name}[{address}:{port}]",
                service=self.name,
                address=address,
                port=port,
                hosts=self.hosts,
                path_prefix=self.path,
                strip_prefix=self.strip_prefix,
                balancer=self.balancer,
                hash_key=self.hash_key,
                middleware=self.middleware,
                health_check=self.health_check,
            )
            for index, (address, port) in enumerate(self.backends)
        ]


@dataclass(frozen=True, slots=True)
class Settings:
    http: tuple[str, ...] = DEFAULT_HTTP
    docker_host: str | None = None
    label_prefix: str = DEFAULT_LABEL_PREFIX
    env: str | None = None
    docker: bool = True
    static_services: tuple[StaticService, ...] = ()
    proxy: ProxySettings = field(default_factory=ProxySettings)
    resync_interval: float = 60.0
    drain_grace: float = 10.0
    # HTTPS (labelgw.tls.https): no listener at all when `https` is empty (--https none).
    https: tuple[str, ...] = DEFAULT_HTTPS
    state_dir: str | None = None  # None: labelgw.tls.default_state_dir()
    cert_dir: str | None = None
    tls_strict: bool = False
    redirect_https: bool = False
    # Seconds from labelgw's TLS close_notify to its closing of the TCP connection (labelgw.tls.deadlines).
    tls_close_grace: float = 2.0
    # The TLS engine of the HTTPS listeners: "stdlib" (labelgw.tls.stdtls) or "openssl" (labelgw.tls.deadlines).
    tls_engine: str = "stdlib"
    # Load balancing (labelgw.core.balancer, labelgw.control.outlier) and the admin view (labelgw.control.admin; None: --admin none).
    balancer: BalancerName = "wrt"
    balancer_decay: float = 10.0
    ejection_base: float = 30.0
    admin: str | None = DEFAULT_ADMIN
    # Host names the admin view answers besides localhost, *.localhost and loopback addresses (labelgw.control.admin).
    admin_hosts: tuple[str, ...] = ()
        # The request field that pins a request to one version (labelgw.http.versioning).
    version_header: str = "X-Labelgw-Version"
    # Canary analysis (labelgw.core.canary): the sliding window of each version's error rate and p99, seconds.
    canary_window: float = 60.0
    # GET /metrics on the admin listener, and the per-request counters behind it (labelgw.control.metrics).
    metrics: bool = True
    # The access log (labelgw.http.accesslog): common, json or off; a file (None: standard output), reopened on
    # SIGUSR1; and --debug-headers (response fields naming the service, version and backend that answered).
    access_log: str = "common"
    access_log_file: str | None = None
    debug_headers: bool = False
    # --trusted-proxies: CIDR networks whose X-Forwarded-For labelgw believes (labelgw.middleware.access).
    trusted_proxies: tuple[str, ...] = ()
    # --swarm: the labelled Swarm services of the manager, instead of containers (labelgw.docker.swarm_watcher);
    # --swarm-poll: seconds between two listings of their tasks.
    swarm: bool = False
    swarm_poll: float = 1.0
    # The registration API and its registry (labelgw.registration): off unless --registry-api or --registry.
    registration: RegistrySettings = field(default_factory=RegistrySettings)
    # ACME certificates for public names (labelgw.tls.acme): on with an email address (--acme-email).
    acme: AcmeSettings | None = None


LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
ACME_RETRY_BASE = 300.0
ACME_ON_DEMAND_MAX = 100


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    """--acme-email, --acme-directory, --acme-ca-bundle, --acme-challenge; acme_retry_base in the file only."""

    email: str
    directory: str = LETS_ENCRYPT_DIRECTORY
    ca_bundle: str | None = None
    # auto: HTTP-01 and TLS-ALPN-01 in turn (those with a listener); or only one of them.
    challenge: str = "auto"
    # Seconds before the first retry after a failed order (doubling from there; labelgw.tls.acme.retry_delay).
    retry_base: float = ACME_RETRY_BASE
    # Names one label under a wildcard route that get their own certificate when a handshake asks, per wildcard.
    on_demand_max: int = ACME_ON_DEMAND_MAX


ACME_CHALLENGES = ("auto", "http-01", "tls-alpn-01")


# The one place the defaults are written: `build` fills what neither the command line nor the file sets from it.
DEFAULTS = Settings()


def load_file(path: str) -> dict[str, Any]:
    """Read the YAML config file (blocking; called once at start, before the reactor runs)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of settings")
    return data


_FILE_KEYS = {"http", "docker_host", "label_prefix", "env", "docker", "services", "resync_interval", "drain_grace", *_TIMEOUTS, *_LIMITS}
_HTTPS_KEYS = {"https", "state_dir", "cert_dir", "tls_strict", "redirect_https", "tls_close_grace", "tls_engine"}
_FILE_KEYS |= _HTTPS_KEYS
_BALANCING_KEYS = {"balancer", "balancer_decay", "ejection_base", "admin", "admin_hosts", "version_header"}
_FILE_KEYS |= _BALANCING_KEYS
_FILE_KEYS |= {"canary_window"}
_FILE_KEYS |= {"metrics"}
_FILE_KEYS |= {"access_log", "access_log_file", "debug_headers"}
_FILE_KEYS |= {"trusted_proxies"}
_FILE_KEYS |= {"swarm", "swarm_poll"}
_FILE_KEYS |= _REGISTRY_KEYS
_FILE_KEYS |= {"acme_email", "acme_directory", "acme_ca_bundle", "acme_challenge", "acme_retry_base"}
_FILE_KEYS |= {"acme_on_demand_max"}


def build(cli: Mapping[str, Any], file: Mapping[str, Any] | None = None) -> Settings:
    """Command-line values win over the file's; defaults fill the rest."""
    file = dict(file or {})
    unknown = sorted(set(file) - _FILE_KEYS)
    if unknown:
        raise ConfigError(f"config file: unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(_FILE_KEYS))}")

    def pick(name: str) -> Any:
        value = cli.get(name)
        return value if value not in (None, [], ()) else file.get(name)

    http = pick("http") or list(DEFAULTS.http)
    if isinstance(http, str):
        http = [http]
    if not isinstance(http, list) or not all(isinstance(item, str) and item for item in http):
        raise ConfigError("http: must be a list of Twisted endpoint strings such as 'tcp:8080'")

    docker_host = pick("docker_host") or os.environ.get("DOCKER_HOST") or None
    if docker_host is not None and not isinstance(docker_host, str):
        raise ConfigError("docker_host: must be a URL such as unix:///var/run/docker.sock")

    prefix = pick("label_prefix") or DEFAULTS.label_prefix
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ConfigError(f"label_prefix: {prefix!r} is not a valid label prefix (lower-case letters, digits, dots, dashes)")

    env = pick("env")
    if env is not None and (not isinstance(env, str) or not _NAME_RE.match(env)):
        raise ConfigError(f"env: {env!r} is not a valid environment name")

    docker = file.get("docker", DEFAULTS.docker)
    if not isinstance(docker, bool):
        raise ConfigError("docker: must be true or false")

    def seconds(name: str, default: float) -> float:
        value = pick(name)
        return default if value is None else _positive_number(name, value)

    defaults = DEFAULTS.proxy
    proxy = ProxySettings(
        connect_timeout=seconds("connect_timeout", defaults.connect_timeout),
        response_timeout=seconds("response_timeout", defaults.response_timeout),
        head_timeout=seconds("head_timeout", defaults.head_timeout),
        idle_timeout=seconds("idle_timeout", defaults.idle_timeout),
        body_timeout=seconds("body_timeout", defaults.body_timeout),
        send_timeout=seconds("send_timeout", defaults.send_timeout),
        max_in_flight=_count("max_in_flight", file.get("max_in_flight", defaults.max_in_flight)),
        max_in_flight_per_service=(
            None if file.get("max_in_flight_per_service") is None
            else _count("max_in_flight_per_service", file["max_in_flight_per_service"])
        ),
    )

    services = file.get("services") or {}
    if not isinstance(services, dict):
        raise ConfigError("services: must be a mapping of service name to its settings")
    static = tuple(_static_service(name, spec) for name, spec in services.items())
    names = [service.name for service in static]
    for name in names:
        # Names are lower-cased, and two services with one name would share (and overwrite) backend ids.
        if names.count(name) > 1:
            raise ConfigError(f"services.{name}: defined more than once (service names ignore case)")

    metrics = file.get("metrics", DEFAULTS.metrics)
    if not isinstance(metrics, bool):
        raise ConfigError("metrics: must be true or false")

    swarm = pick("swarm")
    if swarm is None:
        swarm = DEFAULTS.swarm
    if not isinstance(swarm, bool):
        raise ConfigError("swarm: must be true or false")

    try:
        registration = registry_settings(pick)
    except SettingsError as error:
        raise ConfigError(str(error)) from None

    return Settings(
        swarm=swarm,
        swarm_poll=_positive_number("swarm_poll", DEFAULTS.swarm_poll if pick("swarm_poll") is None else pick("swarm_poll")),
        registration=registration,
        trusted_proxies=_trusted_proxies(pick("trusted_proxies")),
        metrics=metrics,
        http=tuple(http),
        docker_host=docker_host,
        label_prefix=prefix,
        env=env,
        docker=docker,
        static_services=static,
        proxy=proxy,
        resync_interval=_positive_number("resync_interval", file.get("resync_interval", DEFAULTS.resync_interval)),
        drain_grace=_positive_number("drain_grace", file.get("drain_grace", DEFAULTS.drain_grace)),
        canary_window=_positive_number("canary_window", file.get("canary_window", DEFAULTS.canary_window)),
        **_https_settings(pick),
        acme=_acme_settings(pick),
        **_balancing_settings(pick),
        **_access_log_settings(pick),
    )


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"{name}: {value!r} must be a whole number from 1 to 1000000")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        # YAML reads "yes"/"on" as true, which float() would take for 1 second.
        raise ConfigError(f"{name}: {value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number of seconds") from None
    if not number > 0 or number > 86400:
        raise ConfigError(f"{name}: {value!r} must be more than 0 and at most 86400 seconds")
    return number


def _static_service(name: Any, spec: Any) -> StaticService:
    where = f"services.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: {name!r} is not a valid service name")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping with hosts and backends")
    known = {"hosts", "path", "strip_prefix", "backends", "balancer", "hash_key", "health"}
    unknown = sorted(key for key in set(spec) - known - {"plugin"}
                     if not (isinstance(key, str) and (is_middleware_label(key) or key.startswith(PLUGIN_LABEL_PREFIX))))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown setting (known: {', '.join(sorted(known | MIDDLEWARE_LABELS))})"
        )
    middleware = _static_middleware(where, name, spec)
    hosts = spec.get("hosts") or [f"{name.lower()}.localhost"]
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h and "," not in h for h in hosts):
        raise ConfigError(f"{where}.hosts: must be a list of host names without ports")
    # The rules (and the normal form) of the host and path labels.
    try:
        normal_hosts = parse_hosts(",".join(hosts))
    except ValueError as error:
        raise ConfigError(f"{where}.hosts: {error}") from None
    path = spec.get("path", "/")
    if not isinstance(path, str):
        raise ConfigError(f"{where}.path: {path!r} must start with '/'")
    try:
        path = parse_path(path.strip())
    except ValueError as error:
        raise ConfigError(f"{where}.path: {path!r} {error}") from None
    strip = spec.get("strip_prefix", False)
    if not isinstance(strip, bool):
        raise ConfigError(f"{where}.strip_prefix: must be true or false")
    raw_backends = spec.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise ConfigError(f"{where}.backends: must be a non-empty list of 'address:port'")
    backends = []
    for item in raw_backends:
        address, _, port = str(item).rpartition(":")
        if not address or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{where}.backends: {item!r} is not 'address:port'")
        backends.append((address.strip("[]"), int(port)))
    balancer, hash_key = _static_balancer(where, spec)
    health = _static_health(where, spec.get("health"))
    return StaticService(
        name.lower(), normal_hosts, path, strip, tuple(backends), balancer, hash_key, middleware, health
    )


def _static_balancer(where: str, spec: Mapping[str, Any]) -> tuple[BalancerName | None, HashKey | None]:
    """A static service's `balancer` and `hash_key`, by the rules of the `balancer` and `hash.key` labels."""
    raw = spec.get("balancer")
    balancer = BALANCERS.get(raw) if isinstance(raw, str) else None
    if raw is not None and balancer is None:
        raise ConfigError(f"{where}.balancer: {raw!r} is not a balancer; use one of: {', '.join(BALANCERS)}")
    raw_key = spec.get("hash_key")
    if raw_key is None:
        return balancer, None
    if not isinstance(raw_key, str):
        raise ConfigError(f"{where}.hash_key: must be ip, path, header:NAME or cookie:NAME")
    try:
        hash_key = parse_hash_key(raw_key.strip())
    except ValueError as error:
        raise ConfigError(f"{where}.hash_key: {raw_key!r}: {error}") from None
    if balancer not in (None, "hash"):
        raise ConfigError(f"{where}.hash_key: has effect only with balancer: hash")
    return balancer, hash_key


def _static_middleware(where: str, name: str, spec: Mapping[str, Any]) -> MiddlewareSpec | None:
    """The middleware keys of a static service, read by the label parser (YAML numbers taken as written)."""
    def text(value: Any) -> str:
        return "true" if value is True else "false" if value is False else str(value)

    labels = {key: text(value) for key, value in spec.items()
              if isinstance(key, str) and (is_middleware_label(key) or key.startswith(PLUGIN_LABEL_PREFIX))}
    # Plugin options as YAML nests them (`plugin: {stamp: {value: x}}`), the same as `plugin.stamp.value: x`.
    nested = spec.get("plugin")
    if nested is not None:
        if not isinstance(nested, dict):
            raise ConfigError(f"{where}.plugin: must be a mapping of plugin name to its options")
        for plugin, options in nested.items():
            if not isinstance(options, dict):
                raise ConfigError(f"{where}.plugin.{plugin}: must be a mapping of option to value")
            for key, value in options.items():
                labels[f"{PLUGIN_LABEL_PREFIX}{plugin}.{key}"] = text(value)
    try:
        return parse_middleware(labels, name)
    except MiddlewareLabelError as error:
        raise ConfigError(f"{where}.{error.label}: {error.value!r}: {error.reason}") from None


def _static_health(where: str, value: Any) -> HealthCheck | None:
    """A static service's `health:` mapping, checked like the labels `health.path`, `.interval`, `.timeout`."""
    from labelgw.core.labels import _parse_health_path, parse_duration

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.health: must be a mapping with path, interval and timeout")
    unknown = sorted(set(value) - {"path", "interval", "timeout"})
    if unknown:
        raise ConfigError(f"{where}.health.{unknown[0]}: unknown setting (known: path, interval, timeout)")
    path = value.get("path")
    if not isinstance(path, str):
        raise ConfigError(f"{where}.health.path: {path!r} must be a path starting with '/'")
    try:
        path = _parse_health_path(path)
    except ValueError as error:
        raise ConfigError(f"{where}.health.path: {path!r} {error}") from None

    def duration(name: str, default: float) -> float:
        raw = value.get(name)
        if raw is None:
            return default
        if isinstance(raw, bool):
            raise ConfigError(f"{where}.health.{name}: {raw!r} is not a duration")
        try:
            return parse_duration(str(raw))
        except ValueError as error:
            raise ConfigError(f"{where}.health.{name}: {raw!r} {error}") from None

    return HealthCheck(path, duration("interval", DEFAULT_HEALTH_INTERVAL), duration("timeout", DEFAULT_HEALTH_TIMEOUT))


def _https_settings(pick: Any) -> dict[str, Any]:
    """The HTTPS settings, named as on the command line in errors (the file's keys are the same with '_')."""
    https = _https_endpoints(pick("https"))
    grace = pick("tls_close_grace")
    redirect = _flag("--redirect-https", pick("redirect_https"))
    if redirect and not https:
        raise ConfigError("--redirect-https: needs an HTTPS listener, but --https is none")
    return {
        "https": https,
        "state_dir": _directory("--state-dir", pick("state_dir"), must_exist=False),
        "cert_dir": _directory("--cert-dir", pick("cert_dir"), must_exist=True),
        "tls_strict": _flag("--tls-strict", pick("tls_strict")),
        "redirect_https": redirect,
        "tls_close_grace": _positive_number("tls_close_grace", 2.0 if grace is None else grace),
        "tls_engine": _tls_engine(pick("tls_engine")),
    }


def _tls_engine(value: Any) -> str:
    if value is None:
        return "stdlib"
    if value not in ("stdlib", "openssl"):
        raise ConfigError(f"--tls-engine: {value!r} is not stdlib or openssl")
    return str(value)


def _acme_settings(pick: Any) -> AcmeSettings | None:
    email = pick("acme_email")
    rest = [
        key for key in ("acme_directory", "acme_ca_bundle", "acme_challenge", "acme_on_demand_max")
        if pick(key) is not None
    ]
    if email is None:
        if rest:
            raise ConfigError(f"--{rest[0].replace('_', '-')}: needs --acme-email (ACME is off without it)")
        return None
    if not isinstance(email, str) or (email and ("@" not in email or any(c in email for c in " \t\r\n,<>"))):
        raise ConfigError(f"--acme-email: {email!r} is not an email address")
    directory = pick("acme_directory") or LETS_ENCRYPT_DIRECTORY
    if not isinstance(directory, str) or not directory.startswith(("https://", "http://")):
        raise ConfigError(f"--acme-directory: {directory!r} is not an http(s) URL")
    bundle = pick("acme_ca_bundle")
    if bundle is not None:
        if not isinstance(bundle, str) or not os.path.isfile(os.path.expanduser(bundle)):
            raise ConfigError(f"--acme-ca-bundle: {bundle!r} is not a file")
        bundle = os.path.abspath(os.path.expanduser(bundle))
    challenge = pick("acme_challenge") or "auto"
    if challenge not in ACME_CHALLENGES:
        raise ConfigError(f"--acme-challenge: {challenge!r} is not one of {', '.join(ACME_CHALLENGES)}")
    base = pick("acme_retry_base")
    on_demand = pick("acme_on_demand_max")
    if on_demand is not None:
        try:
            on_demand = int(str(on_demand).strip()) if not isinstance(on_demand, bool) else -1
        except ValueError:
            on_demand = -1
        if not 0 <= on_demand <= 10000:
            raise ConfigError(f"--acme-on-demand-max: {pick('acme_on_demand_max')!r} is not a whole number from 0 to "
                              "10000")
    return AcmeSettings(
        email=email,
        directory=directory,
        ca_bundle=bundle,
        challenge=challenge,
        retry_base=ACME_RETRY_BASE if base is None else _positive_number("acme_retry_base", base),
        on_demand_max=ACME_ON_DEMAND_MAX if on_demand is None else on_demand,
    )


def _https_endpoints(value: Any) -> tuple[str, ...]:
    if value is None:
        return DEFAULTS.https
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ConfigError("--https: must be Twisted endpoint strings such as 'tcp:8443', or 'none'")
    if any(item.strip().lower() == "none" for item in value):
        if len(value) > 1:
            raise ConfigError("--https none: cannot be combined with other HTTPS endpoints")
        return ()
    for item in value:
        if item.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise ConfigError(f"--https {item!r}: give a plain endpoint such as 'tcp:8443'; labelgw adds TLS itself")
    return tuple(value)


def _directory(option: str, value: Any, must_exist: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{option}: must be a directory path")
    path = os.path.abspath(os.path.expanduser(value))
    if must_exist and not os.path.isdir(path):
        raise ConfigError(f"{option} {value!r}: not a directory")
    if not must_exist and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {value!r}: exists and is not a directory")
    return path


def _flag(option: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{option}: must be true or false")
    return value


def _balancing_settings(pick: Any) -> dict[str, Any]:
    """--balancer and --admin, and two file-only knobs: `balancer_decay` (the wrt latency estimate's time
    constant, seconds) and `ejection_base` (outlier ejection lasts this x the ejection count, at most 300 s)."""
    from labelgw.core.balancer import POLICY_NAMES

    chosen = pick("balancer") or DEFAULTS.balancer
    balancer = BALANCERS.get(chosen) if isinstance(chosen, str) else None
    if balancer is None:
        raise ConfigError(f"--balancer: {chosen!r} is not a balancer; use one of: {', '.join(POLICY_NAMES)}")
    admin = pick("admin")
    if admin is None:
        admin = DEFAULTS.admin
    elif admin is False or (isinstance(admin, str) and admin.strip().lower() == "none"):
        admin = None
    elif not isinstance(admin, str) or not admin.strip():
        raise ConfigError("--admin: must be a Twisted endpoint string such as 'tcp:8081:interface=127.0.0.1', or 'none'")

    def number(name: str, default: float) -> float:
        value = pick(name)
        return _positive_number(name, default if value is None else value)

    ejection_base = number("ejection_base", DEFAULTS.ejection_base)
    if ejection_base > 300:
        raise ConfigError(f"ejection_base: {ejection_base:g} must be at most 300 seconds (the ejection cap)")
    version_header = pick("version_header") or DEFAULTS.version_header
    if not isinstance(version_header, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", version_header):
        raise ConfigError(f"--version-header: {version_header!r} is not a header field name")
    return {
        "balancer": balancer,
        "balancer_decay": number("balancer_decay", DEFAULTS.balancer_decay),
        "ejection_base": ejection_base,
        "admin": admin,
        "admin_hosts": _admin_hosts(pick("admin_hosts")),
        "version_header": version_header,
    }


def _admin_hosts(value: Any) -> tuple[str, ...]:
    from labelgw.control.admin import normalize_admin_host

    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError("--admin-host: must be host names such as 'gw.example.com'")
    hosts = []
    for item in value:
        host = normalize_admin_host(item) if isinstance(item, str) else None
        if not host:
            raise ConfigError(f"--admin-host {item!r}: not a host name or IP address")
        hosts.append(host)
    return tuple(dict.fromkeys(hosts))


def _access_log_settings(pick: Any) -> dict[str, Any]:
    """--access-log FORMAT, --access-log-file PATH (its directory must exist; the file is created), --debug-headers."""
    from labelgw.http.accesslog import FORMATS

    chosen = pick("access_log")
    if chosen is False:
        chosen = "off"  # YAML reads a bare `off` as false
    chosen = DEFAULTS.access_log if chosen is None else chosen
    if not isinstance(chosen, str) or chosen.strip().lower() not in FORMATS:
        raise ConfigError(f"--access-log: {chosen!r} is not a format; use one of: {', '.join(FORMATS)}")
    path = pick("access_log_file")
    if path is not None:
        if not isinstance(path, str) or not path.strip():
            raise ConfigError("--access-log-file: must be a file path")
        path = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(path):
            raise ConfigError(f"--access-log-file {path!r}: is a directory")
        if not os.path.isdir(os.path.dirname(path)):
            raise ConfigError(f"--access-log-file {path!r}: its directory does not exist")
    return {
        "access_log": chosen.strip().lower(),
        "access_log_file": path,
        "debug_headers": _flag("--debug-headers", pick("debug_headers")),
    }


def _trusted_proxies(value: Any) -> tuple[str, ...]:
    """--trusted-proxies: CIDR networks (a list, or one comma-separated string), kept in their normal form."""
    from labelgw.middleware.access import parse_networks

    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError("--trusted-proxies: must be CIDR networks such as 10.0.0.0/8")
    try:
        return tuple(str(network) for network in parse_networks(value))
    except ValueError as error:
        raise ConfigError(f"--trusted-proxies: {error}") from None
