"""The request-side middleware options (issue 10): allowlist, basic auth, body limit, header rules. Pure: no I/O.

Read by `labelgw.core.middleware.parse_middleware` from the labels (or a static service's keys):

    allow=10.0.0.0/8,127.0.0.1/32            CIDR list; the client address labelgw sees (or, with
                                             --trusted-proxies, the last untrusted X-Forwarded-For address)
    auth.basic=alice:$2y$12$...,bob:$2b$...  htpasswd lines (bcrypt only), comma-separated
    auth.realm=staging                       the realm of the 401's WWW-Authenticate (default: the service)
    auth.forward=true                        pass the Authorization field on (default: removed)
    max_body=10MB                            B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB
    headers.request.set.NAME=VALUE           one label per field: the name is in the label, the value its value
    headers.request.remove=NAME,NAME
    headers.response.set.NAME=VALUE
    headers.response.remove=NAME,NAME

A bad value raises ValueError with the reason; the caller names the label.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

_T = TypeVar("_T")

__all__ = [
    "AUTH_LABELS",
    "HEADER_SET_PREFIXES",
    "REQUEST_LABELS",
    "AllowSpec",
    "AuthSpec",
    "HeadersSpec",
    "parse_allow",
    "parse_auth_users",
    "parse_field_names",
    "parse_field_value",
    "LabelProblem",
    "is_request_label",
    "parse_request_side",
    "parse_realm",
    "parse_size",
]

# Fixed label suffixes; the `headers.*.set.NAME` ones carry the field name and are recognised by prefix.
REQUEST_LABELS: frozenset[str] = frozenset(
    {"allow", "auth.basic", "auth.realm", "auth.forward", "max_body", "headers.request.remove", "headers.response.remove"}
)
AUTH_LABELS = ("auth.realm", "auth.forward")
HEADER_SET_PREFIXES = ("headers.request.set.", "headers.response.set.")

MAX_CIDRS = 1000
MAX_USERS = 1000
MAX_FIELDS = 50
MAX_VALUE = 4096
MAX_BODY_BYTES = 1 << 50

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
# A field value as it may be written upstream or to a client: visible ASCII, space and tab; no CR, LF, NUL.
_VALUE = re.compile(r"[\t\x20-\x7e]*")
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "k": 1000, "m": 1000**2, "g": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
# bcrypt hashes as htpasswd -B writes them ($2y$), and the other prefixes the bcrypt package checks.
_BCRYPT = re.compile(r"\$2[abxy]?\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_USER = re.compile(r"[^:\s,]{1,128}")
_REALM = re.compile(r'[\x20-\x7e]{1,128}')

# Fields a label may never set or remove: the message's framing, the connection's own fields (hop by hop), Host
# (the route), and those labelgw writes itself (X-Forwarded-*, X-Real-IP): a rule on them would be smuggling or
# spoofing waiting to happen.
FORBIDDEN_FIELDS = frozenset(
    {
        "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "upgrade", "host", "http2-settings", "proxy-authenticate", "proxy-authorization",
        "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip",
    }
)


@dataclass(frozen=True, slots=True)
class AllowSpec:
    """Client networks let in; anything else gets 403."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True, slots=True)
class AuthSpec:
    """HTTP Basic authentication against bcrypt hashes (user -> hash, as htpasswd -B writes them)."""

    users: tuple[tuple[str, str], ...]
    realm: str
    forward: bool = False


@dataclass(frozen=True, slots=True)
class HeadersSpec:
    """Field rules, names as written (compared case-insensitively); `set` replaces every field of that name."""

    request_set: tuple[tuple[str, str], ...] = ()
    request_remove: tuple[str, ...] = ()
    response_set: tuple[tuple[str, str], ...] = ()
    response_remove: tuple[str, ...] = ()


def parse_allow(text: str) -> AllowSpec:
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network (examples: 10.0.0.0/8, 127.0.0.1, ::1/128)") from None
        networks.append(network)
    if not networks:
        raise ValueError("needs at least one address or CIDR network")
    if len(networks) > MAX_CIDRS:
        raise ValueError(f"at most {MAX_CIDRS} networks")
    return AllowSpec(tuple(networks))


def parse_auth_users(text: str) -> tuple[tuple[str, str], ...]:
    users: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, colon, hashed = item.partition(":")
        if not colon or _USER.fullmatch(user) is None:
            raise ValueError(f"{item[:20]!r}...: not an htpasswd line user:hash")
        if _BCRYPT.fullmatch(hashed) is None:
            raise ValueError(
                f"user {user!r}: not a bcrypt hash ($2y$... from htpasswd -nB; in a Compose file write each $ as $$)"
            )
        if user in users:
            raise ValueError(f"user {user!r} appears twice")
        users[user] = hashed
    if not users:
        raise ValueError("needs at least one user:hash")
    if len(users) > MAX_USERS:
        raise ValueError(f"at most {MAX_USERS} users")
    return tuple(users.items())


def parse_realm(text: str) -> str:
    if _REALM.fullmatch(text) is None or '"' in text or "\\" in text:
        raise ValueError("1-128 printable characters, without quotes or backslashes")
    return text


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    unit = match["unit"].lower() if match is not None else ""
    if match is None or unit not in _UNITS:
        raise ValueError('not a size (examples: "10MB", "512KB", "1GiB", "1000B")')
    size = int(float(match["number"]) * _UNITS[unit])
    if not 0 < size <= MAX_BODY_BYTES:
        raise ValueError("must be at least 1 byte")
    return size


def parse_field_name(name: str) -> str:
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"{name[:40]!r} is not a header field name (a token: letters, digits, !#$%&'*+.^_`|~-)")
    # Look-alikes too (X_Forwarded_For, X.Real.IP): a backend may read them as the real field.
    if name.lower().replace("_", "-").replace(".", "-") in FORBIDDEN_FIELDS:
        raise ValueError(f"{name} is framing, hop-by-hop or set by labelgw itself: it cannot be set or removed")
    return name


def parse_field_names(text: str) -> tuple[str, ...]:
    names = tuple(parse_field_name(item.strip()) for item in text.split(",") if item.strip())
    if not names:
        raise ValueError("needs at least one field name")
    if len(names) > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} fields")
    return names


def parse_field_value(text: str) -> str:
    if len(text) > MAX_VALUE:
        raise ValueError(f"at most {MAX_VALUE} characters")
    if _VALUE.fullmatch(text) is None:
        raise ValueError("a field value must not contain CR, LF, NUL or other control characters (nor non-ASCII)")
    return text


class LabelProblem(ValueError):
    """A request-side label is wrong: `label` its suffix, `value` as written (the caller makes its own error)."""

    def __init__(self, label: str, value: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.value = value
        self.reason = reason


def parse_request_side(
    labels: Mapping[str, str], service: str
) -> tuple[AllowSpec | None, AuthSpec | None, int | None, HeadersSpec | None]:
    """The allowlist, auth, body limit and header rules among `labels` (suffix -> value), checked in the chain's
    order; LabelProblem for the first bad one."""

    def check(suffix: str, parse: Callable[[str], _T]) -> _T | None:
        if suffix not in labels:
            return None
        raw = labels[suffix]
        try:
            return parse(raw.strip())
        except ValueError as error:
            raise LabelProblem(suffix, raw, str(error)) from None

    allow = check("allow", parse_allow)
    auth = None
    users = check("auth.basic", parse_auth_users)
    for suffix in AUTH_LABELS:
        if suffix in labels and users is None:
            raise LabelProblem(suffix, labels[suffix], "has no effect without the auth.basic label")
    if users is not None:
        realm = check("auth.realm", parse_realm) or service or "labelgw"
        forward = check("auth.forward", _parse_bool)
        auth = AuthSpec(users, realm, bool(forward))
    max_body = check("max_body", parse_size)
    headers = None
    sets: dict[str, list[tuple[str, str]]] = {"request": [], "response": []}
    for suffix in sorted(labels):
        for side in ("request", "response"):
            prefix = f"headers.{side}.set."
            if suffix.startswith(prefix):
                name = suffix[len(prefix):]
                try:
                    parse_field_name(name)
                except ValueError as error:
                    raise LabelProblem(suffix, labels[suffix], str(error)) from None
                value = check(suffix, parse_field_value)
                assert value is not None
                if any(seen.lower() == name.lower() for seen, _ in sets[side]):
                    raise LabelProblem(suffix, labels[suffix], f"{name} is set twice (field names ignore case)")
                sets[side].append((name, value))
    request_remove = check("headers.request.remove", parse_field_names) or ()
    response_remove = check("headers.response.remove", parse_field_names) or ()
    if sets["request"] or sets["response"] or request_remove or response_remove:
        headers = HeadersSpec(tuple(sets["request"]), request_remove, tuple(sets["response"]), response_remove)
    return allow, auth, max_body, headers


def is_request_label(suffix: str) -> bool:
    """One of this module's labels (the `headers.*.set.NAME` family included)."""
    return suffix in REQUEST_LABELS or suffix.startswith(HEADER_SET_PREFIXES)


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean (use true/false, 1/0, yes/no or on/off)")
