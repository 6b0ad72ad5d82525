"""Versions over HTTP: the pinning request header and the sticky cookie, around `labelgw.core.versions.decide`.

The core decides from plain values; this module reads them from a request head and writes the `Set-Cookie`
line that keeps a new client on its version (`labelgw_version_<service>`: a session cookie, HttpOnly,
SameSite=Lax; JavaScript does not need it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from labelgw.core.versions import decide

if TYPE_CHECKING:
    from labelgw.core.backends import Backend, ServicePool
    from labelgw.http.parser import RequestHead

__all__ = [
    "COOKIE_PREFIX",
    "DEFAULT_VERSION_HEADER",
    "choose_version",
    "cookie_name",
    "set_cookie_line",
    "sticky_version",
]

DEFAULT_VERSION_HEADER = b"x-labelgw-version"
COOKIE_PREFIX = "labelgw_version_"


def cookie_name(service: str) -> str:
    return COOKIE_PREFIX + service


# Service name -> the pattern of its cookie-pair in a Cookie header (RFC 6265 section 4.2.1: pairs separated by
# ";" and optional spaces): the name exactly (case matters), "=", then the value up to the next ";" or whitespace.
# One entry per service that ever had versions.
_COOKIE_PATTERNS: dict[str, re.Pattern[bytes]] = {}


def _cookie_pattern(service: str) -> re.Pattern[bytes]:
    pattern = _COOKIE_PATTERNS.get(service)
    if pattern is None:
        pattern = _COOKIE_PATTERNS[service] = re.compile(
            rb"(?:^|;)[ \t]*" + re.escape(cookie_name(service).encode()) + rb"=([^;\s]*)"
        )
    return pattern


def sticky_version(cookie_header: bytes | None, service: str) -> str | None:
    """The version named by this service's cookie in a Cookie header, if any (the first pair of that name).

    A value in double quotes (allowed by RFC 6265) is read without them."""
    if not cookie_header:
        return None
    match = _cookie_pattern(service).search(cookie_header)
    if match is None:
        return None
    value = match.group(1)
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        value = value[1:-1]
    return value.decode("latin-1")


def set_cookie_line(service: str, version: str) -> bytes:
    return f"Set-Cookie: {cookie_name(service)}={version}; Path=/; HttpOnly; SameSite=Lax\r\n".encode("latin-1")


def choose_version(
    service: ServicePool, head: RequestHead, version_header: bytes, key: bytes | None = None
) -> tuple[Backend | None, str | None, bytes, bool]:
    """Backend, version, Set-Cookie line (or b"") and whether the request pinned its version (`key`: the
    request's hash key, for `balancer=hash`)."""
    pinned = head.field(version_header)
    decision = decide(
        service,
        pinned=None if pinned is None else pinned.decode("latin-1"),
        sticky=sticky_version(head.field(b"cookie"), service.name),
        key=key,
    )
    cookie = set_cookie_line(service.name, decision.version) if decision.assigned else b""
    return decision.backend, decision.version, cookie, decision.pinned
