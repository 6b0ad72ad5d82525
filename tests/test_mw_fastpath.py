"""The middleware chain's per-request shortcuts (issue 10's cost criterion) equal the plain forms they replace:
the header rules' substring look before the line regex, the allowlist's set of admitted addresses, the rate
limit's bucket arithmetic without min/max, and the one `Pass` a stateless chain hands every request."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelgw.http.accesslog import NO_KIND
from labelgw.core.middleware import RateLimitSpec, parse_middleware
from labelgw.core.requestmw import parse_allow
from labelgw.middleware import access
from labelgw.middleware.access import Allowlist, _address, _lines_named, _named_in, _needles, _within
from labelgw.middleware.chain import Pass, Ticket
from labelgw.middleware.ratelimit import KeyedRateLimiter, TokenBucket
from proxyharness import ProxyHarness, get, ok, spec

# Names in any case, near misses (a longer name, the name as a value, after a space), and bytes a case fold could
# confuse (no other byte folds to ASCII in a bytes pattern).
_NAME_PARTS = st.sampled_from(
    [b"x-env", b"X-Env", b"X-ENV", b"x-envoy", b"X-Env-2", b"server", b"SERVER", b"Server ", b" server", b"authorization",
     b"Authorization", b"via", b"x", b"\xc5", b"\xe5", b"K", b"k", b"\xff", b":", b"\r\n", b"\n", b"\r", b"-", b"env"]
)
_BLOCKS = st.lists(_NAME_PARTS, max_size=12).map(b"".join)
_DROP = st.sets(st.sampled_from([b"x-env", b"server", b"authorization", b"via", b"k"]), min_size=1, max_size=3)


@settings(max_examples=500, deadline=None)
@given(block=_BLOCKS, names=_DROP)
def test_the_substring_look_finds_every_line_the_regex_would_drop(block: bytes, names: set[bytes]) -> None:
    """Never a miss: when the line pattern matches, the substring look says so (then the pattern runs); a False
    from the look is always right."""
    pattern = _lines_named(frozenset(names))
    assert pattern is not None
    if pattern.search(block) is not None:
        assert _named_in(block, _needles(frozenset(names)))


_FIELD_NAMES = st.sampled_from([b"X-Env", b"x-env", b"X-ENV", b"x-envoy", b"xx-env", b"X-Env-2", b"Server", b"SERVER",
                                 b"Authorization", b"Via", b"Accept", b"K", b"k"])
_FIELD_VALUES = st.sampled_from([b"1", b" v ", b"", b"x-env: 2", b"server:", b"K"])


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=8), names=_DROP,
       add=st.sampled_from([b"", b"X-Env: bench\r\n"]))
def test_header_rules_with_the_substring_look_equal_the_line_regex(
    fields: list[tuple[bytes, bytes]], names: set[bytes], add: bytes
) -> None:
    """apply_request/apply_response (the look first) leave the very head the plain form leaves: the line regex
    run on every head (`rewrite_fields` with the pattern)."""
    from labelgw.core.requestmw import HeadersSpec
    from labelgw.http.parser import parse_request_head, parse_response_head
    from labelgw.middleware.access import HeaderRules

    wanted = sorted(names)
    spec = HeadersSpec(((b"X-Env".decode(), "bench"),) if add else (), tuple(n.decode() for n in wanted),
                       (), tuple(n.decode() for n in wanted))
    rules = HeaderRules(spec, drop_authorization=False)
    block = b"".join(b"%s:%s\r\n" % pair for pair in fields)
    request = b"GET / HTTP/1.1\r\nHost: api.localhost\r\n" + block
    fast, plain = parse_request_head(request[:-2]), parse_request_head(request[:-2])
    assert fast.forward is not None and plain.forward is not None
    rules.apply_request(fast)
    plain.rewrite_fields(rules._request_drop_lines, rules._request_lines)
    assert (fast.block, fast.forward, fast.headers) == (plain.block, plain.forward, plain.headers)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + block
    fast_r, plain_r = parse_response_head(response[:-2]), parse_response_head(response[:-2])
    assert fast_r.forward is not None and plain_r.forward is not None
    assert rules.apply_response(fast_r) == rules.response_lines
    plain_r.rewrite_fields(rules._response_drop_lines, b"")
    assert (fast_r.block, fast_r.forward, fast_r.headers) == (plain_r.block, plain_r.forward, plain_r.headers)


_IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)).encode())
_IPV6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)).encode())
_NEAR = st.sampled_from([b"10.0.0.9", b"10.255.255.255", b"11.0.0.0", b"127.0.0.1", b"::1", b"::2", b"::ffff:10.0.0.7",
                         b"::ffff:11.0.0.7", b"2001:db8::5", b"2001:db9::", b"10.0.0.9:80", b"[::1]:80", b"", b"junk",
                         b" 10.0.0.9", b"010.0.0.9"])


@settings(max_examples=300, deadline=None)
@given(addresses=st.lists(st.one_of(_NEAR, _IPV4, _IPV6), max_size=40), cache=st.integers(1, 4))
def test_the_allowlist_set_lookup_equals_the_cidr_check(addresses: list[bytes], cache: int) -> None:
    """`ip in allowed or allows(ip)` (the chain's form) gives the CIDR check's verdict for every address, also
    while the cache is cleared under it (a tiny cache here), and counts a refusal for each refused request."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(access, "_ADDRESS_CACHE", cache)
        _check_allowlist(addresses)


def _check_allowlist(addresses: list[bytes]) -> None:
    allow = Allowlist(parse_allow("10.0.0.0/8,127.0.0.1/32,::1/128,2001:db8::/32"))
    refused = 0
    for address in addresses:
        plain = (parsed := _address(address)) is not None and _within(parsed, allow.spec.networks)
        fast = address in allow.allowed or allow.allows(address)
        assert fast == plain
        refused += not plain
        assert allow.refused == refused
        assert allow.allowed <= {a for a, verdict in allow._seen.items() if verdict}


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([b"a", b"b"]), st.floats(0, 2.0)), max_size=40),
       per_second=st.sampled_from([0.5, 1.0, 3.0, 10.0]), burst=st.sampled_from([1.0, 2.0, 5.0]))
def test_the_rate_limit_arithmetic_equals_the_token_bucket(
    steps: list[tuple[bytes, float]], per_second: float, burst: float
) -> None:
    """KeyedRateLimiter.allow (min and max written out) leaves the same tokens and gives the same waits as
    TokenBucket.take/wait, float for float."""
    limiter = KeyedRateLimiter(RateLimitSpec(per_second, burst, per_second, 1.0, "ip", ""))
    model: dict[bytes, TokenBucket] = {}
    now = 1_000_000.0
    for key, step in steps:
        now += step
        bucket = model.get(key)
        if bucket is None or bucket.stamp <= now - burst / per_second:
            bucket = model[key] = TokenBucket(burst, now)  # an expired bucket is a full one
        allowed = bucket.take(per_second, burst, now)
        wait = limiter.allow(key, now)
        assert (wait == 0.0) == allowed
        assert wait == (0.0 if allowed else bucket.wait(per_second))
        assert limiter._buckets[key].tokens == bucket.tokens


MW = {"ratelimit": "1000000/s", "headers.request.set.X-Env": "bench", "headers.response.remove": "X-Powered-By",
      "allow": "10.0.0.0/8"}


def _harness(labels: dict[str, str]) -> ProxyHarness:
    from labelgw.core.registry import Registry
    from labelgw.middleware.chain import MiddlewareManager

    harness = ProxyHarness(specs=())
    registry = Registry()
    registry.add_listener(MiddlewareManager(harness.reactor, registry.services))
    container = dataclasses.replace(spec("api-1", "api", 9001, ("api.localhost",)), middleware=parse_middleware(labels, "api"))
    registry.apply(container.container_id, container)
    harness.registry = registry
    harness.gateway.table = registry.table
    return harness


def test_a_stateless_chain_hands_every_request_one_pass_and_applies_its_rules() -> None:
    harness = _harness(MW)
    chain = harness.registry.services["api"].middleware
    assert chain is not None
    client = harness.connect()
    passes = []
    for _ in range(3):
        client.send(get(extra=b"x-ENV: spoofed\r\n"))
        upstream = harness.upstreams[0] if harness.upstreams else harness.upstream().accept()
        request = upstream.request()
        assert request.all(b"x-env") == [b"bench"]
        upstream.transport.clear()
        upstream.send(ok(extra=b"X-POWERED-BY: php\r\nServer: nginx\r\n"))
        response = client.responses()[-1]
        assert response.status == 200 and response.header(b"x-powered-by") is None and response.header(b"server") == b"nginx"
        passes.append(chain._pass)
    assert isinstance(passes[0], Pass) and passes[0] is passes[1] is passes[2]
    harness.assert_accounting()


def test_a_chain_that_holds_something_still_makes_a_ticket_per_request() -> None:
    harness = _harness({**MW, "max_inflight": "5"})
    chain = harness.registry.services["api"].middleware
    assert chain is not None and not chain._stateless
    client = harness.connect()
    client.send(get())
    upstream = harness.upstream().accept()
    upstream.send(ok())
    assert client.response().status == 200
    assert chain._pass is None and chain.concurrency is not None and chain.concurrency.active == 0
    harness.assert_accounting()


def test_a_refused_address_is_refused_with_the_close_a_body_needs() -> None:
    harness = _harness({"allow": "192.168.0.0/16"})
    client = harness.connect()
    client.send(get(method=b"POST", extra=b"Content-Length: 3\r\n") + b"abc")
    assert client.response().status == 403
    assert client.closing  # the unread body would be taken for the next request
    keep = harness.connect()
    keep.send(get())
    assert keep.response().status == 403 and not keep.closing
    assert isinstance(Ticket, type)


class _NoMetrics:
    metrics = None


class _Side:
    def __init__(self) -> None:
        self.peer_ip = b""
        self.log_kind = NO_KIND
        self.log_kind_keeper = None
        self.is_http2 = False
        self.refused: list[int] = []

    def refuse(self, status: int, message: str, close: bool, extra: bytes = b"") -> None:
        self.refused.append(status)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([b"10.0.0.1", b"10.0.0.2", b"10.0.0.3"]), st.floats(0, 1.5)),
                      max_size=50),
       limit=st.sampled_from(["1/s", "2/s", "10/s", "30/m"]), burst=st.sampled_from(["1", "2", "3"]),
       max_keys=st.integers(1, 3))
def test_the_chains_written_out_rate_limit_equals_keyed_rate_limiter_allow(
    steps: list[tuple[bytes, float]], limit: str, burst: str, max_keys: int
) -> None:
    """Chain.enter's inlined common case and KeyedRateLimiter.allow: the same verdicts, and the same buckets (order,
    tokens, stamps) after every request."""
    from twisted.internet.task import Clock

    from labelgw.core.backends import ServicePool
    from labelgw.core.routes import Route
    from labelgw.http.parser import parse_request_head
    from labelgw.middleware.chain import Chain

    spec = parse_middleware({"ratelimit": limit, "ratelimit.burst": burst}, "api")
    assert spec is not None and spec.ratelimit is not None
    clock = Clock()
    clock.advance(1_000_000)
    pool = ServicePool.__new__(ServicePool)
    pool.name = "api"
    chain = Chain(spec, pool, clock, {})
    assert chain.ratelimit is not None
    chain.ratelimit.max_keys = max_keys
    model = KeyedRateLimiter(spec.ratelimit, max_keys=max_keys)
    route = Route("api.localhost", "/", pool)
    side = _Side()
    for address, step in steps:
        clock.advance(step)
        side.peer_ip = address
        head = parse_request_head(b"GET / HTTP/1.1\r\nHost: api.localhost")
        allowed = model.allow(address, clock.seconds()) == 0.0
        refused = len(side.refused)
        ticket = chain.enter(_NoMetrics(), head, side, route)
        assert (ticket is not None) == allowed
        assert side.refused[refused:] == ([] if allowed else [429])
        mine, theirs = chain.ratelimit._buckets, model._buckets
        assert [(k, b.tokens, b.stamp) for k, b in mine.items()] == [(k, b.tokens, b.stamp) for k, b in theirs.items()]
        assert chain.ratelimit.limited == model.limited


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=8), names=_DROP,
       add=st.sampled_from(["", "bench"]))
def test_the_chains_written_out_request_rules_equal_the_line_regex(
    fields: list[tuple[bytes, bytes]], names: set[bytes], add: str
) -> None:
    """Chain.enter's inlined request rules leave the head the plain form (the line regex on every head) leaves."""
    from twisted.internet.task import Clock

    from labelgw.core.backends import ServicePool
    from labelgw.core.routes import Route
    from labelgw.http.parser import parse_request_head
    from labelgw.middleware.chain import Chain

    labels = {"headers.request.remove": ",".join(n.decode() for n in sorted(names))}
    if add:
        labels["headers.request.set.X-Env"] = add
    spec = parse_middleware(labels, "api")
    assert spec is not None
    pool = ServicePool.__new__(ServicePool)
    pool.name = "api"
    chain = Chain(spec, pool, Clock(), {})
    rules = chain.request_rules
    assert rules is not None
    side = _Side()
    side.peer_ip = b"10.0.0.9"
    request = b"GET / HTTP/1.1\r\nHost: api.localhost\r\n" + b"".join(b"%s:%s\r\n" % pair for pair in fields)
    fast, plain = parse_request_head(request[:-2]), parse_request_head(request[:-2])
    assert chain.enter(_NoMetrics(), fast, side, Route("api.localhost", "/", pool)) is not None
    plain.rewrite_fields(rules._request_drop_lines, rules._request_lines)
    assert (fast.block, fast.forward, fast.headers) == (plain.block, plain.forward, plain.headers)
