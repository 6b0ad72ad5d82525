"""The key `balancer=hash` places a request by, read from the request head: the client's address, a header, a
cookie or the path (the `hash.key` label, a `labelgw.core.model.HashKey`). The core's policy gets plain bytes.

A request without the header or the cookie has no key (None): the policy then places it at random, under the
same load bound. The path is the one the request is routed on (its normal form, without the query), so
`/a/../b` and `/b` share a key.
"""

from __future__ import annotations

import re

from labelgw.core.model import HashKey
from labelgw.http.parser import RequestHead

__all__ = ["cookie_value", "request_key"]

# Cookie name -> the pattern of its cookie-pair in a Cookie header (RFC 6265 4.2.1: pairs separated by ";" and
# optional spaces; the name matched exactly, case included).
_COOKIE_PATTERNS: dict[str, re.Pattern[bytes]] = {}
_COOKIE_FIELDS = re.compile(rb"^cookie:[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE | re.MULTILINE)
# Header name -> its lower-case bytes, as RequestHead.field wants them.
_FIELD_NAMES: dict[str, bytes] = {}


def cookie_value(cookie_header: bytes | None, name: str) -> bytes | None:
    """The value of the first cookie called `name` in a Cookie header (without its optional double quotes)."""
    if not cookie_header:
        return None
    pattern = _COOKIE_PATTERNS.get(name)
    if pattern is None:
        pattern = _COOKIE_PATTERNS[name] = re.compile(rb"(?:^|;)[ \t]*" + re.escape(name.encode("latin-1")) + rb"=([^;\s]*)")
    match = pattern.search(cookie_header)
    if match is None:
        return None
    value = match.group(1)
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        value = value[1:-1]
    return value


def request_key(source: HashKey, head: RequestHead, peer_ip: bytes, path: str) -> bytes | None:
    """The key of one request, or None when the request does not carry it (an empty value counts as none)."""
    kind = source.kind
    if kind == "ip":
        return peer_ip or None
    if kind == "header":
        name = _FIELD_NAMES.get(source.name)
        if name is None:
            name = _FIELD_NAMES[source.name] = source.name.lower().encode("latin-1")
        return head.field(name) or None
    if kind == "cookie":
        # HTTP/2 clients may send each cookie in a field of its own (RFC 9113 8.2.3): read every Cookie field.
        return cookie_value(b"; ".join(_COOKIE_FIELDS.findall(head.block)), source.name) or None
    return path.encode("latin-1")
