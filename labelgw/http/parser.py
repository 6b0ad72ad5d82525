"""Strict HTTP/1.1 message-head parsing and chunked framing. Pure: bytes in, values or HttpError out.

A front proxy must refuse what a backend could read differently (request smuggling): bare LF, obs-fold, spaces
before the colon, control characters, conflicting or malformed framing headers.
"""

from __future__ import annotations

import re

# Re-exported: the limits, the error and the chunked reader and writer live in framing.py, and older callers import
# them from here.
from labelgw.http.framing import (
    LAST_CHUNK,
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    ChunkedReader as ChunkedDecoder,
    HttpError,
    encode_chunk,
)

__all__ = [
    "LAST_CHUNK", "MAX_CHUNK_LINE", "MAX_HEAD_BYTES", "MAX_HEADERS", "ChunkedDecoder", "HttpError", "RequestHead",
    "ResponseHead", "encode_chunk", "parse_request_head", "parse_response_head",
]

# RFC 9110 tchar; translate(None, _TCHAR) leaves only the bytes that are not allowed in a token.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Control characters other than HTAB are never allowed in a head (CR and LF only as line ends, checked apart).
_FORBIDDEN_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_KNOWN_CODINGS = {b"gzip", b"deflate", b"compress", b"x-gzip", b"br", b"zstd"}


_FIELD_PATTERNS: dict[bytes, "re.Pattern[bytes]"] = {}
_NO_TOKENS: frozenset[bytes] = frozenset()
_new = object.__new__
# The longest head a connection keeps as the template of its next one (request_fields and request_from, and the
# same for responses): a keep-alive peer sends the same head again and again (a client's request, a backend's
# response within the second of its Date), and an equal head parses to an equal result.
MAX_REMEMBERED_HEAD = 2048


class _Head:
    """Common to request and response heads: the raw field block, and the fields as pairs on demand.

    Slots, defaults set in __init__: every attribute is read on a path taken twice per request, and a slot is read
    in one step (a class-level default an instance did not set was a dictionary miss and a type lookup)."""

    __slots__ = (
        "block", "forward", "_headers", "version", "content_length", "chunked", "keep_alive", "upgrade",
        "connection_tokens",
    )
    # Every field line, each ending in CRLF, as received.
    block: bytes
    # The field lines labelgw forwards as they are (hop-by-hop, framing and managed fields cut out), or None when the
    # fields must be filtered one by one (fields named in Connection, fields set by hand).
    forward: bytes | None
    _headers: list[tuple[bytes, bytes]] | None
    version: bytes
    # None with chunked False means no body.
    content_length: int | None
    chunked: bool
    keep_alive: bool
    upgrade: bytes | None
    connection_tokens: frozenset[bytes]

    def __init__(self) -> None:
        self.block = b""
        self.forward = None
        self._headers = None
        self.version = b"HTTP/1.1"
        self.content_length = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = None
        self.connection_tokens = _NO_TOKENS

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            self._headers = [
                (name, value.strip(b" \t"))
                for name, _, value in (line.partition(b":") for line in self.block[:-2].split(b"\r\n"))
            ] if self.block else []
        return self._headers

    @headers.setter
    def headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._headers = value
        self.forward = None

    def rewrite_fields(self, drop: "re.Pattern[bytes] | None", add: bytes) -> None:
        """Header rules on the raw lines, keeping the pre-cut forward block (no field-by-field pass later): remove
        the lines `drop` matches (a whole line each, name first), then append `add` (lines ending in CRLF).
        Only for a head whose forward block is set; else assign `headers`."""
        assert self.forward is not None
        if drop is not None and drop.search(self.block) is not None:
            self.block = drop.sub(b"", self.block)
            self.forward = drop.sub(b"", self.forward)
        if add:
            self.block += add
            self.forward += add
        self._headers = None

    def field(self, lower_name: bytes) -> bytes | None:
        """The value of the first field with this (lower-case) name: a search of the raw block, for the few
        fields only some requests need (version pinning, cookies)."""
        pattern = _FIELD_PATTERNS.get(lower_name)
        if pattern is None:
            pattern = _FIELD_PATTERNS[lower_name] = re.compile(
                rb"^" + re.escape(lower_name) + rb":[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE | re.MULTILINE
            )
        match = pattern.search(self.block)
        return match.group(1) if match else None


class RequestHead(_Head):
    __slots__ = (
        "method", "target", "host", "absolute_form", "request_id", "trace_id", "trace_fields", "client_ip", "id_fields",
    )
    method: bytes
    target: bytes
    host: bytes | None
    absolute_form: bool
    # Set by labelgw.http.requestid at dispatch: the request's id and trace id, and the field lines labelgw adds.
    request_id: bytes
    trace_id: bytes
    trace_fields: bytes
    # The client's address behind trusted proxies (--trusted-proxies, labelgw.middleware.access); None: the peer's.
    client_ip: bytes | None
    # How many X-Request-Id and traceparent fields the head has, as the HTTP/1.1 parser counted them while finding
    # its special fields (labelgw.http.requestid then searches nothing); -1: not counted (heads made otherwise).
    id_fields: int

    def __init__(self) -> None:
        # _Head.__init__, written out: one call less per head.
        self.block = b""
        self.forward = None
        self._headers = None
        self.version = b"HTTP/1.1"
        self.content_length = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = None
        self.connection_tokens = _NO_TOKENS
        self.method = self.target = b""
        self.host = None
        self.absolute_form = False
        self.request_id = self.trace_id = self.trace_fields = b""
        self.client_ip = None
        self.id_fields = -1

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ResponseHead(_Head):
    __slots__ = ("status", "status_line")
    status: int
    status_line: bytes

    def __init__(self) -> None:
        # _Head.__init__, written out: one call less per head.
        self.block = b""
        self.forward = None
        self._headers = None
        self.version = b"HTTP/1.1"
        self.content_length = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = None
        self.connection_tokens = _NO_TOKENS
        self.status = 0
        self.status_line = b""


# A whole field block in one match (C speed): token, colon, value, CRLF; control bytes and bare CR/LF are refused
# before. Anything else (obs-fold, space before the colon, bad names) fails it and the slow path says what.
_FIELD_BLOCK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r\n)*")
# The only request fields labelgw reads or removes; every other line is forwarded as it is. These patterns run over
# a whole head (start line included, every line ending in CRLF): each field line is found by the LF before its name
# (a one-byte prefix the regex engine skips to quickly) and ends at its CR, so that a cut leaves the CR of the line
# before and the LF of the line itself: the head stays well formed.
_REQUEST_NAMES = (
    rb"content-length|transfer-encoding|connection|upgrade|keep-alive|proxy-connection|te|trailer|"
    rb"proxy-authenticate|proxy-authorization|http2-settings|x[-_.]forwarded[-_.](?:for|proto|host|port)|"
    rb"x[-_.]real[-_.]ip"
)
_REQUEST_SPECIAL = re.compile(
    rb"\n(host|" + _REQUEST_NAMES + rb"|x-request-id|traceparent):[ \t]*([^\r\n]*)\r", re.IGNORECASE
)
# X-Request-Id and traceparent are only counted (labelgw.http.requestid reads them when there are any). The same
# fields but Host and those two: what is cut from a request's forwarded block.
_REQUEST_CUT = re.compile(rb"\n(?:" + _REQUEST_NAMES + rb"):[^\r\n]*\r", re.IGNORECASE)
_RESPONSE_NAMES = (
    rb"content-length|transfer-encoding|connection|upgrade|keep-alive|proxy-connection|te|trailer|"
    rb"proxy-authenticate|proxy-authorization|http2-settings"
)
_RESPONSE_SPECIAL = re.compile(rb"\n(" + _RESPONSE_NAMES + rb"):[ \t]*([^\r\n]*)\r", re.IGNORECASE)
# A whole well-formed head in one match, request or status line included: what nearly every message is. A head
# it does not match takes the line-by-line path, which either accepts it too or says precisely what is wrong.
_TOKEN_PATTERN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_LINES = rb"((?:" + _TOKEN_PATTERN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)"
# The request target: visible ASCII only (RFC 9112 section 3.2; no obs-text, no HTAB), on both paths.
_TARGET_PATTERN = rb"[!-~]+"
_TARGET = re.compile(_TARGET_PATTERN)
_WELL_FORMED_REQUEST = re.compile(
    rb"(" + _TOKEN_PATTERN + rb") (" + _TARGET_PATTERN + rb") (HTTP/1\.[01])\r\n" + _FIELD_LINES
)
# Host (and an absolute target's authority): uri-host [ ":" port ] (RFC 9110 section 7.2, RFC 3986 section 3.2.2),
# without userinfo: a reg-name or IPv4 address, or an IPv6 address in brackets; the port digits only. Empty is
# allowed (RFC 9112 section 3.2). Anything else ("h:1@evil", "h h", "h/x") would be routed by one part and
# forwarded whole.
_HOST = re.compile(
    rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?"
)
_WELL_FORMED_RESPONSE = re.compile(
    rb"((HTTP/1\.[0-9]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?)\r\n" + _FIELD_LINES
)
# Connection tokens that name no field to remove.
_PLAIN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})


def _check_head(head: bytes, status: int) -> tuple[bytes, bytes]:
    """Refuse bare CR or LF and control bytes; return the first line and the field block (lines with CRLF)."""
    if _FORBIDDEN_IN_HEAD.search(head) is not None:
        raise HttpError(status, "control character in message head")
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise HttpError(status, "bare CR or LF in message head")
    if crlf > MAX_HEADERS:
        raise HttpError(431 if status == 400 else status, f"more than {MAX_HEADERS} header fields")
    end = head.find(b"\r\n")
    if end == -1:
        return head, b""
    block = head[end + 2 :] + b"\r\n"
    if _FIELD_BLOCK.fullmatch(block) is None:
        raise _field_error(block[:-2].split(b"\r\n"), status)
    return head[:end], block


def _field_error(lines: list[bytes], status: int) -> HttpError:
    """What is wrong with a field block the one-pattern check refused, said precisely."""
    for line in lines:
        colon = line.find(b":")
        if colon <= 0:
            if line[:1] in (b" ", b"\t"):
                return HttpError(status, "obsolete line folding in header field")
            return HttpError(status, "header field without a name and colon")
        name = line[:colon]
        if name.translate(None, _TCHAR):
            return HttpError(status, f"invalid header field name {name[:40]!r}")
    return HttpError(status, "malformed header field")


def _parse_content_length(value: bytes, status: int) -> int:
    # Digits only: no sign, no hex, no list ("5, 5"), bounded length.
    if not value.isdigit() or len(value) > 18:
        raise HttpError(status, f"invalid Content-Length {value[:40]!r}")
    return int(value)


_COMMON_TOKENS = {b"keep-alive": frozenset({b"keep-alive"}), b"close": frozenset({b"close"})}
_KEEP_ALIVE_TOKENS = _COMMON_TOKENS[b"keep-alive"]


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        common = _COMMON_TOKENS.get(values[0].lower())
        if common is not None:
            return common
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip(b" \t").lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def _keep_alive(version: bytes, tokens: frozenset[bytes]) -> bool:
    # "close" wins over everything; HTTP/1.0 persists only when asked to (RFC 9112 section 9.3).
    if b"close" in tokens:
        return False
    return version == b"HTTP/1.1" or b"keep-alive" in tokens


def _connection_options(message: _Head, version: bytes, values: list[bytes]) -> bool:
    """Set a message's Connection tokens and whether its connection persists; True when no token names a field
    (the forwarded block can then be cut by pattern, not field by field)."""
    if not values:
        if version != b"HTTP/1.1":
            message.keep_alive = False
        return True
    tokens = message.connection_tokens = _connection_tokens(values)
    if not _keep_alive(version, tokens):
        message.keep_alive = False
    return tokens <= _PLAIN_TOKENS


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head: everything before the blank line that ends it."""
    return parse_request_lines(head + b"\r\n")


# A head this short cannot hold more than MAX_HEADERS field lines that the one-pattern path accepts (a request line
# takes 14 bytes at least, a field line 4): its CRLFs need no counting.
_SHORT_HEAD = 14 + 4 * MAX_HEADERS
# Host values found valid (a bounded set): the same few arrive on nearly every request.
_VALID_HOSTS: set[bytes] = set()


def parse_request_lines(data: bytes) -> RequestHead:
    """parse_request_head of a head given with its last line's CRLF (the buffer up to the blank line): the client
    side's call, which copies nothing to add it."""
    if len(data) <= _SHORT_HEAD or data.count(b"\r\n") <= MAX_HEADERS + 1:
        well_formed = _WELL_FORMED_REQUEST.fullmatch(data)
    else:
        well_formed = None
    if well_formed is not None:
        method, target, version, block = well_formed.groups()
        block_start = well_formed.start(4)
    else:
        line, block = _check_head(data[:-2], 400)
        block_start = len(line) + 2
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if method.translate(None, _TCHAR):
            raise HttpError(400, "invalid method")
        if _TARGET.fullmatch(target) is None:
            raise HttpError(400, "invalid request target")
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            if version.startswith(b"HTTP/") and len(version) == 8:
                raise HttpError(505, "HTTP version not supported")
            raise HttpError(400, "malformed HTTP version")
    # RequestHead.__init__, written out on a head made without it (a class call with __init__ costs as much as
    # the stores themselves); tests/test_parser_fast.py checks that both set every slot alike.
    request = _new(RequestHead)
    request.method = method
    request.version = version
    request.block = block
    request._headers = None
    request.content_length = None
    request.chunked = False
    request.keep_alive = True
    request.upgrade = None
    request.connection_tokens = _NO_TOKENS
    request.absolute_form = False
    request.request_id = request.trace_id = request.trace_fields = b""
    request.client_ip = None

    host = None
    content_length = None
    transfer_encoding = None
    connection_values = []
    id_fields = 0
    # Every field matched here but Host, X-Request-Id and traceparent is cut from what is forwarded (labelgw writes
    # framing, hop-by-hop fields are the connection's own, X-Forwarded-* and X-Real-IP are labelgw's to set).
    specials = _REQUEST_SPECIAL.findall(data)
    for name, value in specials:
        # The pattern keeps trailing whitespace in the value (a lazy match would cost twice as much): cut it here.
        value = value.rstrip(b" \t")
        lower = name.lower()
        if lower == b"host":
            if host is not None:
                raise HttpError(400, "more than one Host header")
            host = value
        elif lower == b"content-length":
            if content_length is not None:
                raise HttpError(400, "more than one Content-Length header")
            content_length = _parse_content_length(value, 400)
        elif lower == b"transfer-encoding":
            if transfer_encoding is not None:
                raise HttpError(400, "more than one Transfer-Encoding header")
            transfer_encoding = value
        elif lower == b"connection":
            connection_values.append(value)
        elif lower == b"upgrade":
            request.upgrade = value
        elif lower == b"x-request-id" or lower == b"traceparent":
            id_fields += 1
    request.id_fields = id_fields

    if transfer_encoding is not None:
        if content_length is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        coding = transfer_encoding.lower()
        if coding != b"chunked":
            if coding in _KNOWN_CODINGS:
                raise HttpError(501, f"transfer coding {transfer_encoding[:40]!r} not supported")
            raise HttpError(400, f"invalid Transfer-Encoding {transfer_encoding[:40]!r}")
        request.chunked = True
    if content_length is not None:
        request.content_length = content_length

    if target[:1] == b"/":
        request.target = target
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # Absolute form: its authority wins over the Host header (RFC 9112 section 3.2.2).
        rest = target.split(b"://", 1)[1]
        # The authority ends at the first "/" or "?" (RFC 3986 section 3.2): "http://h?q" is host h, "/?q".
        end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i != -1), default=len(rest))
        authority, path = rest[:end], rest[end:]
        if path[:1] != b"/":
            path = b"/" + path
        if not authority or _HOST.fullmatch(authority) is None:
            raise HttpError(400, "invalid absolute request target")
        host = authority
        request.target = path
        request.absolute_form = True
    elif target == b"*" and method == b"OPTIONS":
        request.target = target
    else:
        raise HttpError(400, "invalid request target")
    if host is None:
        if version == b"HTTP/1.1":
            raise HttpError(400, "HTTP/1.1 request without Host")
    elif host not in _VALID_HOSTS:
        if _HOST.fullmatch(host) is None:
            raise HttpError(400, "invalid Host header")
        if len(_VALID_HOSTS) >= 1024:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(host)
    request.host = host

    if connection_values:
        plain = _connection_options(request, version, connection_values)
    else:
        # No Connection field (most requests): _connection_options' first case, without the call.
        if version != b"HTTP/1.1":
            request.keep_alive = False
        plain = True
    if plain and not request.absolute_form:
        cut = len(specials) - id_fields > (host is not None)
        request.forward = _REQUEST_CUT.sub(b"", data)[block_start:] if cut else block
    else:
        request.forward = None
    # An Upgrade in an HTTP/1.0 request is ignored (RFC 9110 section 7.8), as is one not named in Connection.
    if request.upgrade is not None and (b"upgrade" not in request.connection_tokens or version != b"HTTP/1.1"):
        request.upgrade = None
    return request


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream's response head; anything malformed is a 502 to the client."""
    return parse_response_lines(head + b"\r\n")


# Status codes as the status line spells them (three digits, 100-999) -> their value: a dict lookup, not an int().
_STATUS_CODES = {b"%d" % code: code for code in range(100, 1000)}


def parse_response_lines(data: bytes) -> ResponseHead:
    """parse_response_head of a head given with its last line's CRLF (the buffer up to the blank line): the
    upstream side's call, which copies nothing to add it."""
    if len(data) <= _SHORT_HEAD or data.count(b"\r\n") <= MAX_HEADERS + 1:
        well_formed = _WELL_FORMED_RESPONSE.fullmatch(data)
    else:
        well_formed = None
    if well_formed is not None:
        line, version, code, block = well_formed.groups()
        block_start = well_formed.start(4)
    else:
        line, block = _check_head(data[:-2], 502)
        block_start = len(line) + 2
        if not line.startswith(b"HTTP/1.") or not line[7:8].isdigit() or len(line) < 12 or line[8:9] != b" ":
            raise HttpError(502, "malformed status line from upstream")
        code = line[9:12]
        # A status below 100 would be taken for an interim response by some code paths and a final one by others.
        if not code.isdigit() or code[:1] == b"0" or (len(line) > 12 and line[12:13] != b" "):
            raise HttpError(502, "malformed status code from upstream")
        version = line[:8]
    # ResponseHead.__init__, written out (see parse_request_lines).
    response = _new(ResponseHead)
    response.version = version
    response.status = _STATUS_CODES[code]
    response.status_line = line
    response.block = block
    response._headers = None
    response.content_length = None
    response.chunked = False
    response.keep_alive = True
    response.upgrade = None
    response.connection_tokens = _NO_TOKENS
    response.forward = None
    transfer_encoding = None
    connection_values = []
    # One pass finds the fields labelgw reads and cuts them: [text, name, value, text, name, value, ..., text].
    pieces = _RESPONSE_SPECIAL.split(data)
    content_length = None
    if len(pieces) > 1:
        triples = iter(pieces)
        next(triples)
        for name, value, _ in zip(triples, triples, triples):
            # Trailing whitespace is left in the value by the pattern (cheaper than a lazy match): cut here.
            value = value.rstrip(b" \t")
            lower = name.lower()
            if lower == b"content-length":
                # _parse_content_length, inlined: nearly every response has one.
                if not value.isdigit() or len(value) > 18:
                    raise HttpError(502, f"invalid Content-Length {value[:40]!r}")
                length = int(value)
                if content_length is not None and content_length != length:
                    raise HttpError(502, "conflicting Content-Length from upstream")
                content_length = length
            elif lower == b"connection":
                connection_values.append(value)
            elif lower == b"upgrade":
                response.upgrade = value
            elif lower == b"transfer-encoding":
                transfer_encoding = value if transfer_encoding is None else transfer_encoding + b", " + value
        response.content_length = content_length
    if transfer_encoding is not None:
        # Only plain chunked is relayed: a transfer coding such as gzip would have to be removed by a proxy.
        if transfer_encoding.strip(b" \t").lower() != b"chunked":
            raise HttpError(502, f"unsupported Transfer-Encoding {transfer_encoding[:40]!r} from upstream")
        # RFC 9112 section 6.3 lets a recipient read such a message as chunked, but a backend that sends both
        # frames its messages in two ways: what follows may be read by another request. Never relay it.
        if content_length is not None:
            raise HttpError(502, "both Content-Length and Transfer-Encoding from upstream")
        response.chunked = True
    if not connection_values:
        # No Connection field: _connection_options' first case, without the call.
        if version != b"HTTP/1.1":
            response.keep_alive = False
        plain = True
    elif len(connection_values) == 1 and version == b"HTTP/1.1" and connection_values[0].lower() == b"keep-alive":
        # "Connection: keep-alive" on HTTP/1.1 (what nginx and most servers send): no token names a field.
        response.connection_tokens = _KEEP_ALIVE_TOKENS
        plain = True
    else:
        plain = _connection_options(response, version, connection_values)
    if plain:
        # Every matched field is cut: labelgw writes framing and Connection itself.
        response.forward = b"".join(pieces[::3])[block_start:] if len(pieces) > 1 else block
    return response


# A head's slots as parsed, as one tuple (a connection's template of its last head: the head itself is handed out and
# changed by dispatch, middlewares and header rules), and a new head from such a tuple: every slot set in one
# unpacking (tests/test_parser_fast.py checks that none is left out).
RequestFields = tuple[
    bytes, "bytes | None", None, bytes, "int | None", bool, bool, "bytes | None", frozenset, bytes, bytes, "bytes | None",
    bool, bytes, bytes, bytes, "bytes | None", int,
]


def request_fields(head: RequestHead) -> RequestFields:
    """What request_from needs to make a head equal to `head` as the parser made it."""
    return (
        head.block, head.forward, None, head.version, head.content_length, head.chunked, head.keep_alive, head.upgrade,
        head.connection_tokens, head.method, head.target, head.host, head.absolute_form, head.request_id, head.trace_id,
        head.trace_fields, head.client_ip, head.id_fields,
    )


def request_from(fields: RequestFields) -> RequestHead:
    head = _new(RequestHead)
    (
        head.block, head.forward, head._headers, head.version, head.content_length, head.chunked, head.keep_alive,
        head.upgrade, head.connection_tokens, head.method, head.target, head.host, head.absolute_form, head.request_id,
        head.trace_id, head.trace_fields, head.client_ip, head.id_fields,
    ) = fields
    return head


ResponseFields = tuple[
    bytes, "bytes | None", None, bytes, "int | None", bool, bool, "bytes | None", frozenset, int, bytes,
]


def response_fields(head: ResponseHead) -> ResponseFields:
    """What response_from needs to make a head equal to `head` as the parser made it."""
    return (
        head.block, head.forward, None, head.version, head.content_length, head.chunked, head.keep_alive, head.upgrade,
        head.connection_tokens, head.status, head.status_line,
    )


def response_from(fields: ResponseFields) -> ResponseHead:
    head = _new(ResponseHead)
    (
        head.block, head.forward, head._headers, head.version, head.content_length, head.chunked, head.keep_alive,
        head.upgrade, head.connection_tokens, head.status, head.status_line,
    ) = fields
    return head
