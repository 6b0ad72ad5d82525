"""The request-side middlewares (issue 10) at run time: the allowlist, basic auth (bcrypt off the reactor thread,
successes cached), the client address behind trusted proxies, and the header rules.

The specs come from `labelgw.core.requestmw`; `labelgw.middleware.chain` calls these in the chain's order.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from labelgw.core.requestmw import AllowSpec, AuthSpec, HeadersSpec
from labelgw.http.parser import RequestHead, ResponseHead

__all__ = [
    "AUTH_CACHE_SIZE", "AUTH_CACHE_TTL", "Allowlist", "BasicAuth", "HeaderRules", "client_address", "parse_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Successful checks remembered (sha256 of user:password -> expiry): a keep-alive client pays bcrypt once.
AUTH_CACHE_SIZE = 1024
AUTH_CACHE_TTL = 300.0
# bcrypt checks running at once per service: beyond, a fast 503 (a flood of wrong passwords cannot queue
# unbounded CPU work).
AUTH_MAX_PENDING = 32
_ADDRESS_CACHE = 4096


def _address(text: bytes | str) -> Address | None:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]  # "[::1]:1234"
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # "1.2.3.4:1234"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDR networks (a bare address is its /32 or /128); ValueError naming the bad one."""
    networks = []
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if part:
                try:
                    networks.append(ipaddress.ip_network(part, strict=False))
                except ValueError:
                    raise ValueError(f"{part!r} is not an address or CIDR network") from None
    return tuple(networks)


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def client_address(peer_ip: bytes, forwarded_for: Sequence[bytes], trusted: Sequence[Network]) -> bytes:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the last address of
    X-Forwarded-For (read right to left, every field in order) that is not a trusted proxy. All trusted: the
    first one. An entry that is not an address ends the walk at the last trusted hop (it vouches for no more)."""
    peer = _address(peer_ip)
    if peer is None or not _within(peer, trusted):
        return peer_ip
    hops = [hop for value in forwarded_for for hop in value.split(b",")]
    last = peer_ip
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return last
        last = str(address).encode("ascii")
        if not _within(address, trusted):
            return last
    return last


class Allowlist:
    def __init__(self, spec: AllowSpec) -> None:
        self.spec = spec
        self.refused = 0
        # Client address -> verdict: the same few addresses arrive on every request.
        self._seen: dict[bytes, bool] = {}
        # The addresses found inside a network, exactly as they came (a subset of `_seen`): the chain lets a request
        # through on `client_ip in allowed` (a set lookup, no call) and asks `allows` only for the others.
        self.allowed: set[bytes] = set()

    def allows(self, client_ip: bytes) -> bool:
        verdict = self._seen.get(client_ip)
        if verdict is None:
            address = _address(client_ip)
            verdict = address is not None and _within(address, self.spec.networks)
            if len(self._seen) >= _ADDRESS_CACHE:
                self._seen.clear()
                self.allowed.clear()
            self._seen[client_ip] = verdict
            if verdict:
                self.allowed.add(client_ip)
        if not verdict:
            self.refused += 1
        return verdict


def _check_bcrypt(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:
        return False


class BasicAuth:
    """HTTP Basic against bcrypt hashes. `check` answers True/False at once (malformed, unknown user, a cached
    success) or a Deferred firing with the verdict of a bcrypt check run by `threads(function, *args)`."""

    _log = Logger()

    def __init__(self, spec: AuthSpec, clock: Any, threads: Callable[..., "Deferred[bool]"]) -> None:
        self.spec = spec
        self._clock = clock
        self._threads = threads
        self._users = {user.encode("utf-8"): hashed.encode("ascii") for user, hashed in spec.users}
        self._cache: dict[bytes, float] = {}
        self._pending: dict[bytes, list[Deferred[bool]]] = {}
        self.challenge = b'WWW-Authenticate: Basic realm="%s", charset="UTF-8"\r\n' % spec.realm.encode("ascii")
        self.refused = 0
        self.checks = 0
        self.busy = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def check(self, authorization: bytes | None) -> "bool | Deferred[bool] | None":
        """True, False, a Deferred verdict, or None when too many checks already run (answer 503)."""
        credentials = _credentials(authorization)
        if credentials is None:
            self.refused += 1
            return False
        user, password = credentials
        hashed = self._users.get(user)
        if hashed is None:
            self.refused += 1
            return False
        key = hashlib.sha256(hashed + b"\0" + user + b":" + password).digest()
        now = self._clock.seconds()
        expiry = self._cache.get(key)
        if expiry is not None:
            if expiry > now:
                return True
            del self._cache[key]
        waiting = self._pending.get(key)
        if waiting is None:
            if len(self._pending) >= AUTH_MAX_PENDING:
                self.busy += 1
                return None
            waiting = self._pending[key] = []
            answer: Deferred[bool] = Deferred()
            waiting.append(answer)
            self.checks += 1
            checked = self._threads(_check_bcrypt, password, hashed)
            checked.addCallback(self._checked, key)
            checked.addErrback(self._failed, key)
            if key not in self._pending:
                # Answered in place (a runner without threads): the verdict now, never a Deferred already fired.
                verdict: list[bool] = []
                answer.addCallback(verdict.append)
                return verdict[0]
            return answer
        answer = Deferred()
        waiting.append(answer)
        return answer

    def _checked(self, ok: bool, key: bytes) -> None:
        if ok:
            cache = self._cache
            if len(cache) >= AUTH_CACHE_SIZE:
                del cache[next(iter(cache))]  # the oldest entry
            cache[key] = self._clock.seconds() + AUTH_CACHE_TTL
        else:
            self.refused += 1
        for answer in self._pending.pop(key, []):
            answer.callback(ok)

    def _failed(self, failure: Any, key: bytes) -> None:
        self._log.failure("bcrypt check failed", failure)
        self._checked(False, key)


def _credentials(authorization: bytes | None) -> tuple[bytes, bytes] | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic" or len(token) > 4096:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


class HeaderRules:
    """A service's header rules, pre-encoded: request fields rewritten in the head before the exchange builds its
    upstream head; response fields removed and added on the way to the client (HTTP/1.1 and HTTP/2 alike)."""

    def __init__(self, spec: HeadersSpec | None, drop_authorization: bool) -> None:
        self.spec = spec
        request_set = spec.request_set if spec is not None else ()
        request_remove = spec.request_remove if spec is not None else ()
        self._request_drop = frozenset(
            name.lower().encode("ascii") for name in (*request_remove, *(name for name, _ in request_set))
        ) | ({b"authorization"} if drop_authorization else frozenset())
        self._request_add = [(name.encode("ascii"), value.encode("ascii")) for name, value in request_set]
        response_set = spec.response_set if spec is not None else ()
        response_remove = spec.response_remove if spec is not None else ()
        self._response_drop = frozenset(
            name.lower().encode("ascii") for name in (*response_remove, *(name for name, _ in response_set))
        )
        self.response_lines = b"".join(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("ascii")) for name, value in response_set)
        self.request = bool(self._request_drop or self._request_add)
        self.response = bool(self._response_drop)
        # The same rules on raw field lines, for heads whose forward block the parser cut already (nearly all):
        # the head keeps its fast path instead of being filtered field by field.
        self._request_lines = b"".join(b"%s: %s\r\n" % pair for pair in self._request_add)
        self._request_drop_lines = _lines_named(self._request_drop)
        self._response_drop_lines = _lines_named(self._response_drop)
        # Whether a head has any field to drop, asked first (see `_named_in`): nearly always it has none, and then
        # the line pattern (a case-insensitive search at every line start: ~8 000 instructions on a 100-byte
        # block) does not run at all.
        self._request_needles = _needles(self._request_drop)
        self._response_needles = _needles(self._response_drop)
        # For the chain, which writes out apply_request's common case.
        self.request_needles = self._request_needles
        self.request_lines = self._request_lines
        # And the exchange, which writes out apply_response's.
        self.response_needles = self._response_needles
        # The last request head rewritten by the common case (its block and forward block, the bytes objects
        # themselves) and what they became; and the last response block found without a field to drop. A repeated
        # head is made from its predecessor's very objects (labelgw.http.parser.request_from), so an identity test
        # stands for the search. Bytes are immutable and held here, so an identical object means identical bytes.
        self.kept_block: bytes | None = None
        self.kept_forward: bytes | None = None
        self.kept_result: tuple[bytes, bytes] = (b"", b"")
        self.clean_response_block: bytes | None = None

    def keep(self, block: bytes, forward: bytes, new_block: bytes, new_forward: bytes) -> None:
        self.kept_block, self.kept_forward, self.kept_result = block, forward, (new_block, new_forward)

    def apply_request(self, head: RequestHead) -> None:
        if head.forward is not None:
            # _named_in, written out (a call less per request).
            lowered = head.block.lower()
            for needle in self._request_needles:
                if lowered.partition(needle)[1]:
                    head.rewrite_fields(self._request_drop_lines, self._request_lines)
                    return
            if self._request_lines:
                head.rewrite_fields(None, self._request_lines)
            return
        drop = self._request_drop
        # Fields named in Connection, an absolute-form target: labelgw.http.headers filters field by field anyway.
        head.headers = [(name, value) for name, value in head.headers if name.lower() not in drop] + self._request_add

    def apply_response(self, head: ResponseHead) -> bytes:
        if head.forward is not None:
            # _named_in, written out (a call less per request).
            lowered = head.block.lower()
            for needle in self._response_needles:
                if lowered.partition(needle)[1]:
                    head.rewrite_fields(self._response_drop_lines, b"")
                    break
            return self.response_lines
        drop = self._response_drop
        head.headers = [(name, value) for name, value in head.headers if name.lower() not in drop]
        return self.response_lines


def _needles(names: frozenset[bytes]) -> tuple[bytes, ...]:
    """What `_named_in` looks for: each (lower-case) name with its colon."""
    return tuple(name + b":" for name in sorted(names))


def _named_in(block: bytes, needles: tuple[bytes, ...]) -> bool:
    """May a field block have a line named by one of the needles (case-insensitively)? True whenever the
    `_lines_named` pattern would find a line: such a line holds "name:", and bytes patterns fold ASCII case only, as
    bytes.lower does. Now and then True when it would not (a longer name ending in it, "name:" inside a value): the
    pattern, which runs only after a True, decides. One lower() and a substring search each: a few hundred
    instructions, no line-start anchor to try at every byte. (partition, not `in`: bytes' `in` first tries the
    needle as an integer, an exception made and cleared each time.)"""
    lowered = block.lower()
    for needle in needles:
        if lowered.partition(needle)[1]:
            return True
    return False


def _lines_named(names: frozenset[bytes]) -> "re.Pattern[bytes] | None":
    """Whole field lines with one of these (lower-case) names; the parser admits no space before the colon."""
    if not names:
        return None
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"^(?:" + alternatives + rb"):[^\n]*\n", re.IGNORECASE | re.MULTILINE)


def synchronous(function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """A `threads` runner that runs on the calling thread (tests, and a clock without a thread pool)."""
    return succeed(function(*args))
