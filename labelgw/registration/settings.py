"""The registry's settings (`--registry-api`, `--registry-token-file`, `--registry`, the etcd TLS and auth options),
validated once before anything listens. Reading the token and password files blocks: it happens at start."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["FILE_KEYS", "DEFAULT_ETCD_PREFIX", "EtcdSettings", "RegistrySettings", "SettingsError", "registry_settings"]

DEFAULT_ETCD_PREFIX = "/labelgw/registrations/"
FILE_KEYS = frozenset({
    "registry_api", "registry_token_file", "registry", "registry_prefix", "registry_ca", "registry_cert",
    "registry_key", "registry_user", "registry_password_file",
})
_ENDPOINT = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


class SettingsError(ValueError):
    """A registry setting that cannot be used; the message names the option."""


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    # Base URLs of the members' JSON gateways: http://HOST:PORT, or https:// with a CA.
    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_ETCD_PREFIX
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    # The API's endpoint (None: no API); loopback unless an interface is named.
    api: str | None = None
    token: bytes | None = None
    # None: the embedded registry.
    etcd: EtcdSettings | None = None

    @property
    def enabled(self) -> bool:
        return self.api is not None or self.etcd is not None


def api_endpoint(value: str) -> str:
    """`8082` or `tcp:8082` -> `tcp:8082:interface=127.0.0.1`: the API is loopback unless bound elsewhere."""
    text = value.strip()
    if text.isdigit():
        text = f"tcp:{text}"
    kind, _, rest = text.partition(":")
    if kind in ("tcp", "tcp6") and "interface=" not in rest:
        loopback = "\\:\\:1" if kind == "tcp6" else "127.0.0.1"  # colons escaped in an endpoint string
        text = f"{text}:interface={loopback}"
    return text


def is_loopback_endpoint(description: str) -> bool:
    from labelgw.cli.listeners import _fields  # the endpoint syntax's escaped colons (IPv6 addresses)

    kind, *rest = _fields(description)
    if kind == "unix":
        return True  # a local socket: its file's permissions decide who connects
    if kind not in ("tcp", "tcp6"):
        return False
    for part in rest:
        if part.startswith("interface="):
            interface = part[len("interface="):].replace("\\", "")
            if interface == "localhost":
                return True
            try:
                return ipaddress.ip_address(interface).is_loopback
            except ValueError:
                return False
    return False


def _read_secret(option: str, path: Any) -> str:
    if not isinstance(path, str) or not path.strip():
        raise SettingsError(f"{option}: must be a file path")
    try:
        with open(path, encoding="utf-8") as source:
            secret = source.read().strip()
    except OSError as error:
        raise SettingsError(f"{option} {path!r}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{option} {path!r}: not UTF-8 text") from None
    if not secret or any(char.isspace() for char in secret):
        raise SettingsError(f"{option} {path!r}: must hold one token (no spaces), and not be empty")
    return secret


def _etcd(value: str, pick: Callable[[str], Any]) -> EtcdSettings:
    if not value.startswith("etcd://"):
        raise SettingsError(f"--registry {value!r}: use embedded, or etcd://HOST:PORT[,HOST:PORT...]")
    tls = pick("registry_ca") is not None
    endpoints = []
    for item in value[len("etcd://"):].rstrip("/").split(","):
        match = _ENDPOINT.fullmatch(item.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise SettingsError(f"--registry: {item.strip()!r} is not HOST:PORT")
        endpoints.append(f"{'https' if tls else 'http'}://{match['host']}:{int(match['port'])}")
    prefix = pick("registry_prefix") or DEFAULT_ETCD_PREFIX
    if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/") or not prefix.isascii():
        raise SettingsError(f"--registry-prefix {prefix!r}: an ASCII key prefix that starts and ends with '/'")
    files = {}
    for name in ("registry_ca", "registry_cert", "registry_key"):
        path = pick(name)
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as error:
                raise SettingsError(f"--{name.replace('_', '-')} {path!r}: cannot be read ({error.strerror})") from None
        files[name] = path
    if (files["registry_cert"] is None) != (files["registry_key"] is None):
        raise SettingsError("--registry-cert and --registry-key: give both (a client certificate and its key) or none")
    if files["registry_cert"] is not None and not tls:
        raise SettingsError("--registry-cert: a client certificate needs TLS: give --registry-ca too")
    user = pick("registry_user")
    password_file = pick("registry_password_file")
    if (user is None) != (password_file is None):
        raise SettingsError("--registry-user and --registry-password-file: give both or none")
    password = None if password_file is None else _read_secret("--registry-password-file", password_file)
    return EtcdSettings(
        tuple(endpoints), prefix, files["registry_ca"], files["registry_cert"], files["registry_key"], user, password,
    )


def registry_settings(pick: Callable[[str], Any]) -> RegistrySettings:
    """From the command line and the config file (`pick` prefers the command line)."""
    api = pick("registry_api")
    if api is not None and (not isinstance(api, str) or not api.strip() or api.strip() == "none"):
        api = None
    token_file = pick("registry_token_file")
    token = None if token_file is None else _read_secret("--registry-token-file", token_file).encode("utf-8")
    if api is not None:
        api = api_endpoint(api)
        if token is None and not is_loopback_endpoint(api):
            raise SettingsError(
                f"--registry-api {api!r}: not a loopback address, so a token is required: give --registry-token-file"
            )
    kind = pick("registry") or "embedded"
    if not isinstance(kind, str):
        raise SettingsError("--registry: use embedded, or etcd://HOST:PORT[,HOST:PORT...]")
    etcd = None if kind.strip() == "embedded" else _etcd(kind.strip(), pick)
    return RegistrySettings(api, token, etcd)
