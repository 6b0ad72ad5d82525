"""A registration's JSON body -> a `Registration` whose spec the label parser built. Pure: no I/O, no logging.

The body's fields are mapped to label keys (`port` -> `<prefix>.port`, `hosts` -> `<prefix>.host`, `health.path`
-> `<prefix>.health.path`, and `labels` passes any other label through) and read by
`labelgw.core.labels.parse_container`: one set of rules for labels and registrations, and a bad field is refused
with the name of the JSON field, as a bad label is with the label's.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from labelgw.core.labels import parse_container, parse_hosts
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.registry import REGISTERED_PREFIX

__all__ = [
    "DEFAULT_TTL", "FIELDS", "MAX_BODY", "MAX_TTL", "MIN_TTL", "Registration", "RegistrationError",
    "check_instance_id", "parse_body", "parse_registration", "registration_key",
]

DEFAULT_TTL = 30.0
MIN_TTL = 1.0
MAX_TTL = 3600.0
# A registration is a few hundred bytes; anything near this limit is a mistake or an attack.
MAX_BODY = 64 * 1024
MAX_TAGS = 32
MAX_TAG_LENGTH = 128

# JSON field -> the label it is read as (the JSON name is what errors name).
_LABEL_OF: dict[str, str] = {
    "port": "port",
    "version": "version",
    "env": "env",
    "hosts": "host",
    "path": "path",
    "strip_prefix": "strip_prefix",
    "scheme": "scheme",
    "weight": "weight",
    "traffic": "traffic",
    "balancer": "balancer",
    "hash_key": "hash.key",
    "health.path": "health.path",
    "health.interval": "health.interval",
    "health.timeout": "health.timeout",
}
_FIELD_OF = {label: name for name, label in _LABEL_OF.items()} | {"network": "address"}
_HEALTH_FIELDS = frozenset({"path", "interval", "timeout"})
FIELDS = frozenset(name for name in _LABEL_OF if not name.startswith("health.")) | {
    "address", "health", "tags", "ttl", "labels",
}
# Labels that have a field of their own, or mean nothing for a registered instance (the Docker network).
_NOT_IN_LABELS = frozenset(_LABEL_OF.values()) | {"service", "network"}
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_NETWORK = "registered"


class RegistrationError(Exception):
    """A registration refused: the HTTP status, the JSON field at fault ("" for the body as a whole) and why."""

    def __init__(self, status: int, field_name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field_name
        self.message = message

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.field:
            body["field"] = self.field
        return body


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered instance: its canonical body (what is persisted and shared through etcd), its lease TTL and
    the spec the label parser made of it."""

    service: str
    instance: str
    ttl: float
    body: Mapping[str, Any] = field(compare=False)
    spec: ContainerSpec
    tags: tuple[str, ...] = ()
    # The persisted form, a JSON object without its closing brace (the state file adds the lease's expiry):
    # encoded once here, not at every save.
    record: bytes = field(default=b"", compare=False, repr=False)

    @property
    def key(self) -> str:
        return registration_key(self.service, self.instance)


def registration_key(service: str, instance: str) -> str:
    return f"{service}/{instance}"


def container_id(service: str, instance: str) -> str:
    """The id a registered instance carries in the core registry (and in the admin views)."""
    return f"{REGISTERED_PREFIX}{service}/{instance}"


def check_instance_id(instance: str) -> str:
    if _INSTANCE_ID.fullmatch(instance) is None:
        raise RegistrationError(
            400, "instance",
            f"instance id {instance!r} must start with a letter or digit and contain only letters, digits, "
            "'_', '.', ':', '-' (at most 128 characters)",
        )
    return instance


def check_service(service: str) -> str:
    if _SERVICE.fullmatch(service) is None:
        raise RegistrationError(
            400, "service",
            f"service {service!r} must start with a letter or digit and contain only letters, digits, '_', '.', '-' "
            "(at most 63 characters)",
        )
    return service.lower()


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; RegistrationError for anything else."""
    if len(raw) > MAX_BODY:
        raise RegistrationError(413, "", f"body is larger than {MAX_BODY} bytes")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RegistrationError(400, "", "body is not UTF-8") from None
    except ValueError as error:
        raise RegistrationError(400, "", f"body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise RegistrationError(400, "", "body must be a JSON object")
    return value


def parse_registration(
    service: str,
    instance: str,
    body: Mapping[str, Any],
    *,
    prefix: str = "labelgw",
    pinned_env: str | None = None,
) -> Registration:
    """Check `body` and build the instance's spec through the label parser; RegistrationError naming the field."""
    service = check_service(service)
    check_instance_id(instance)
    unknown = sorted(str(name) for name in body if name not in FIELDS)
    if unknown:
        raise RegistrationError(400, unknown[0], f"unknown field; known fields are: {', '.join(sorted(FIELDS))}")
    address = _address(body.get("address"))
    if "port" not in body:
        raise RegistrationError(400, "port", "required (the instance's port, 1-65535)")
    ttl = _ttl(body.get("ttl", DEFAULT_TTL))
    tags = _tags(body.get("tags", []))

    labels: dict[str, str] = {"service": service}
    flat = {name: value for name, value in body.items() if name in _LABEL_OF}
    health = body.get("health")
    if health is not None:
        if not isinstance(health, dict):
            raise RegistrationError(400, "health", "must be an object with path, interval, timeout")
        for name, value in health.items():
            if name not in _HEALTH_FIELDS:
                raise RegistrationError(400, f"health.{name}", "unknown field; known: path, interval, timeout")
            flat[f"health.{name}"] = value
    for name, value in flat.items():
        labels[_LABEL_OF[name]] = _label_text(name, value)
    for name, value in _extra_labels(body.get("labels", {})).items():
        labels[name] = value

    inspect = {
        "Id": container_id(service, instance),
        "Name": registration_key(service, instance),
        "Config": {"Labels": {f"{prefix}.{name}": value for name, value in labels.items()}},
        "State": {"Running": True},
        "NetworkSettings": {"Networks": {_NETWORK: {"IPAddress": address}}},
    }
    outcome = parse_container(inspect, prefix=prefix, pinned_env=pinned_env)
    if outcome is None:
        raise RegistrationError(400, "env", f"this gateway routes only env {pinned_env!r}")
    if isinstance(outcome, Rejection):
        raise RegistrationError(400, _field_of(outcome.label, prefix), f"{outcome.value!r}: {outcome.reason}")
    options = outcome.options + ((("tags", ",".join(tags)),) if tags else ())
    spec = _replace_options(outcome, tuple(sorted(options)))
    # Lists as tuples (the same JSON): a body of strings, numbers and tuples is one the cyclic garbage collector stops
    # tracking at its next full pass, instead of walking two objects more per registration in every one after.
    canonical = {name: _atoms(value) for name, value in body.items()}
    canonical["ttl"] = ttl
    record = json.dumps(
        {"service": service, "instance": instance, "ttl": ttl, "body": canonical}, separators=(",", ":")
    ).encode("utf-8")[:-1]
    return Registration(service, instance, ttl, canonical, spec, tags, record)


def _atoms(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_atoms(item) for item in value)
    if isinstance(value, dict):
        return {name: _atoms(item) for name, item in value.items()}
    return value


def _replace_options(spec: ContainerSpec, options: tuple[tuple[str, str], ...]) -> ContainerSpec:
    import dataclasses

    return dataclasses.replace(spec, options=options)


def _field_of(label: str, prefix: str) -> str:
    suffix = label.removeprefix(prefix + ".")
    return _FIELD_OF.get(suffix, f"labels.{suffix}")


def _address(value: Any) -> str:
    if value is None:
        raise RegistrationError(400, "address", "required (the instance's IP address or host name)")
    if not isinstance(value, str):
        raise RegistrationError(400, "address", "must be a string (an IP address or a host name)")
    text = value.strip().strip("[]") if value.strip().startswith("[") else value.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        hosts = parse_hosts(text, wildcard=False) if "," not in text else ()
    except ValueError as error:
        raise RegistrationError(400, "address", f"{value!r} is not an IP address or a host name: {error}") from None
    if len(hosts) != 1:
        raise RegistrationError(400, "address", f"{value!r} is not one IP address or host name")
    return hosts[0]


def _ttl(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistrationError(400, "ttl", "must be a number of seconds")
    if not MIN_TTL <= value <= MAX_TTL:
        raise RegistrationError(400, "ttl", f"must be from {MIN_TTL:g} to {MAX_TTL:g} seconds")
    return float(value)


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise RegistrationError(400, "tags", f"must be a list of at most {MAX_TAGS} strings")
    for tag in value:
        if not isinstance(tag, str) or len(tag) > MAX_TAG_LENGTH or _PRINTABLE.fullmatch(tag) is None or "," in tag:
            raise RegistrationError(
                400, "tags", f"{tag!r}: a tag is a string of printable ASCII without spaces or commas "
                f"(at most {MAX_TAG_LENGTH} characters)",
            )
    return tuple(dict.fromkeys(value))


# The JSON type each field takes (a label reads text; JSON says what it is).
_NUMBER_FIELDS = frozenset({"port", "weight", "traffic", "health.interval", "health.timeout"})
_BOOL_FIELDS = frozenset({"strip_prefix"})


def _label_text(name: str, value: Any) -> str:
    """A field's value as the text of its label; RegistrationError when its JSON type is wrong."""
    if name == "hosts":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(h, str) and "," not in h for h in value):
            raise RegistrationError(400, "hosts", "must be a non-empty list of host names")
        return ",".join(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise RegistrationError(400, name, "must be true or false")
        return "true" if value else "false"
    if name == "port":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RegistrationError(400, name, "must be an integer (1-65535)")
        return str(value)
    if name in ("health.interval", "health.timeout"):
        # Seconds as a number, or a duration as the label writes it ("500ms").
        if isinstance(value, str):
            return value
        return _number_text(name, value) + "s"
    if name in _NUMBER_FIELDS:
        return _number_text(name, value)
    if not isinstance(value, str):
        raise RegistrationError(400, name, "must be a string")
    return value


def _number_text(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RegistrationError(400, name, "must be a number")
    if isinstance(value, int):
        return str(value)
    # Positional notation: the label rule reads plain decimals only.
    return format(value, ".6f").rstrip("0").rstrip(".") if value else "0"


def _extra_labels(value: Any) -> dict[str, str]:
    """`labels`: any other label (middleware, canary, tls ...) as the container would write it, prefix removed."""
    if not isinstance(value, dict):
        raise RegistrationError(400, "labels", "must be an object of label name (without prefix) to value")
    labels: dict[str, str] = {}
    for name, raw in value.items():
        where = f"labels.{name}"
        if name in _NOT_IN_LABELS:
            own = _FIELD_OF.get(name)
            hint = f"use the field {own!r}" if own else "not for registered instances"
            raise RegistrationError(400, where, f"set by a field of its own or not allowed here ({hint})")
        if isinstance(raw, bool):
            labels[name] = "true" if raw else "false"
        elif isinstance(raw, (int, float)) and math.isfinite(raw):
            labels[name] = _number_text(where, raw)
        elif isinstance(raw, str):
            labels[name] = raw
        else:
            raise RegistrationError(400, where, "must be a string, a number or a boolean")
    return labels
