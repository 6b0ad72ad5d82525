"""RFC 9113's rules for a received HTTP/2 field block (sections 8.2 and 8.3), checked by labelgw in one pass.

The `h2` library can check the same (its ``validate_inbound_headers``), through a chain of seven generators per
header block, byte by byte in Python: for a plain GET that cost more than everything else labelgw does with the
request. labelgw turns that off (L{labelgw.http.h2.H2Protocol}) and checks here instead: the same rules, with the
same outcome (a malformed block ends the connection with GOAWAY(PROTOCOL_ERROR), as h2 did), and the cookie
crumbs of section 8.2.3 joined (h2's ``normalize_inbound_headers``, also off) where the request is built
(L{labelgw.http.h2.request_head}).

labelgw's own rules for the fields it relays (the strict HTTP/1.1 parser's, 400 when broken) stay in
request_head; these are HTTP/2's.
"""

from __future__ import annotations

import re

# RFC 9113 section 8.2.2: connection-specific fields make a message malformed.
CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# Section 8.2.1: a name without controls, space, upper case, DEL, non-ASCII or colon (a pseudo-header's leading
# colon is taken off first); a value without NUL, CR or LF, and without whitespace at either end.
_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


def malformed_request(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header block is malformed (RFC 9113 sections 8.2 and 8.3), or None."""
    pseudo: set[bytes] = set()
    regular_seen = False
    method = path = authority = host = None
    bad_name = _BAD_NAME.search
    bad_value = _BAD_VALUE.search
    for name, value in headers:
        if name[:1] == b":":
            if regular_seen:
                return f"pseudo-header field {name!r} after a regular field"
            if name in pseudo:
                return f"duplicate pseudo-header field {name!r}"
            if name not in _PSEUDO:
                return f"pseudo-header field {name!r} not allowed in a request"
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        else:
            regular_seen = True
            if not name or bad_name(name) is not None:
                return f"invalid field name {name!r}"
            if name in CONNECTION_SPECIFIC:
                return f"connection-specific field {name!r}"
            if name == b"te" and value.lower() != b"trailers":
                return f"te field other than trailers: {value!r}"
            if name == b"host":
                if host is not None:
                    return "more than one host field"
                host = value
        if value and bad_value(value) is not None:
            return f"invalid value of field {name!r}"
    if method is None:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in pseudo:
        if b":scheme" in pseudo or path is not None:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in pseudo or path is None:
            return "no :scheme or no :path"
        if b":protocol" in pseudo and method != b"CONNECT":
            return ":protocol without CONNECT"
    if path is not None and not path:
        return "empty :path"
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


def malformed_trailers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a trailer block is malformed (no pseudo-header fields; the field rules of a request's), or None."""
    for name, value in headers:
        if name[:1] == b":":
            return f"pseudo-header field {name!r} in trailers"
        if not name or _BAD_NAME.search(name) is not None:
            return f"invalid field name {name!r}"
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific field {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return f"te field other than trailers: {value!r}"
        if value and _BAD_VALUE.search(value) is not None:
            return f"invalid value of field {name!r}"
    return None
