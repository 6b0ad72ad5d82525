"""The request-side middlewares (issue 10): labels and their reasons, CIDR matching, the client address behind
trusted proxies, bcrypt checks (cache, thread), and the data path on the proxy harness over HTTP/1.1 and HTTP/2:
allowlist 403, auth 401 (held exchange while the check runs), body limit 413 on both framings, header rules."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
from typing import Any, Callable

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred

from labelgw.cli.config import ConfigError, build
from labelgw.core.labels import parse_container
from labelgw.core.middleware import MiddlewareLabelError, MiddlewareSpec, parse_middleware
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.requestmw import AllowSpec, AuthSpec, HeadersSpec, parse_allow, parse_size
from labelgw.middleware.access import AUTH_CACHE_TTL, Allowlist, BasicAuth, client_address, parse_networks
from labelgw.middleware.chain import MiddlewareManager
from proxyharness import ProxyHarness, get, ok, spec

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
OTHER = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


# --- labels -----------------------------------------------------------------------------------------------------


def test_labels_parse_into_the_spec() -> None:
    parsed = parse_middleware({
        "allow": "10.0.0.0/8, 127.0.0.1/32,::1",
        "auth.basic": f"alice:{HASH},bob:{OTHER}",
        "auth.realm": "staging",
        "max_body": "10MB",
        "headers.request.set.X-Env": "staging",
        "headers.request.remove": "X-Debug,X-Internal",
        "headers.response.set.Strict-Transport-Security": "max-age=31536000; includeSubDomains",
        "headers.response.remove": "Server",
    }, "api")
    assert parsed is not None
    assert parsed.allow is not None and [str(n) for n in parsed.allow.networks] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
    assert parsed.auth == AuthSpec((("alice", HASH), ("bob", OTHER)), "staging", False)
    assert parsed.max_body == 10_000_000
    assert parsed.headers == HeadersSpec(
        (("X-Env", "staging"),), ("X-Debug", "X-Internal"),
        (("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),), ("Server",),
    )
    assert parsed.ratelimit is None


def test_realm_defaults_to_the_service_and_forward_is_a_boolean() -> None:
    parsed = parse_middleware({"auth.basic": f"alice:{HASH}", "auth.forward": "true"}, "api")
    assert parsed is not None and parsed.auth == AuthSpec((("alice", HASH),), "api", True)


@pytest.mark.parametrize("text, size", [
    ("10MB", 10_000_000), ("1KiB", 1024), ("2 MiB", 2 * 1024 * 1024), ("1GB", 10**9), ("512", 512), ("100B", 100),
    ("1.5KB", 1500), ("1gib", 1 << 30),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("labels, label, reason", [
    ({"allow": "10.0.0.0/33"}, "allow", "not an address or CIDR"),
    ({"allow": "example.com"}, "allow", "not an address or CIDR"),
    ({"allow": " , "}, "allow", "at least one"),
    ({"auth.basic": "alice:plaintext"}, "auth.basic", "not a bcrypt hash"),
    ({"auth.basic": "alice:$2y$05$abc"}, "auth.basic", "$$"),
    ({"auth.basic": f"alice:{HASH},alice:{OTHER}"}, "auth.basic", "twice"),
    ({"auth.basic": "nocolon"}, "auth.basic", "user:hash"),
    ({"auth.realm": "x"}, "auth.realm", "without the auth.basic"),
    ({"auth.basic": f"a:{HASH}", "auth.realm": 'say "hi"'}, "auth.realm", "quotes"),
    ({"auth.basic": f"a:{HASH}", "auth.forward": "maybe"}, "auth.forward", "boolean"),
    ({"max_body": "10 parsecs"}, "max_body", "not a size"),
    ({"max_body": "0"}, "max_body", "at least 1 byte"),
    ({"headers.request.set.Content-Length": "5"}, "headers.request.set.Content-Length", "framing, hop-by-hop"),
    ({"headers.request.set.Host": "evil"}, "headers.request.set.Host", "cannot be set"),
    ({"headers.response.set.Transfer-Encoding": "chunked"}, "headers.response.set.Transfer-Encoding", "framing"),
    ({"headers.request.remove": "X-Debug,Connection"}, "headers.request.remove", "Connection is framing"),
    ({"headers.response.remove": "Keep-Alive"}, "headers.response.remove", "hop-by-hop"),
    ({"headers.request.set.X-Forwarded-For": "1.2.3.4"}, "headers.request.set.X-Forwarded-For", "set by labelgw"),
    ({"headers.request.set.X_Real_IP": "1.2.3.4"}, "headers.request.set.X_Real_IP", "set by labelgw"),
    ({"headers.request.set.X.Forwarded.Host": "h"}, "headers.request.set.X.Forwarded.Host", "set by labelgw"),
    ({"headers.request.set.Bad Name": "x"}, "headers.request.set.Bad Name", "not a header field name"),
    ({"headers.request.set.X-A": "a\r\nX-Injected: 1"}, "headers.request.set.X-A", "CR, LF, NUL"),
    ({"headers.response.set.X-A": "a\x00b"}, "headers.response.set.X-A", "CR, LF, NUL"),
    ({"headers.response.set.X-A": "x", "headers.response.set.x-a": "y"}, "headers.response.set.x-a", "set twice"),
])
def test_bad_labels_are_refused_with_a_reason(labels: dict[str, str], label: str, reason: str) -> None:
    with pytest.raises(MiddlewareLabelError) as caught:
        parse_middleware(labels, "api")
    assert caught.value.label == label
    assert reason in caught.value.reason


def inspect(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "Id": "c1", "Name": "/web-1",
        "Config": {"Labels": {"labelgw.service": "web", "labelgw.port": "80", **labels}},
        "State": {"Running": True},
        "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
    }


def test_container_labels_with_a_field_name_in_them_are_known() -> None:
    parsed = parse_container(inspect({"labelgw.headers.request.set.X-Env": "staging", "labelgw.allow": "127.0.0.1"}))
    assert isinstance(parsed, ContainerSpec) and parsed.middleware is not None
    assert parsed.middleware.headers is not None and parsed.middleware.headers.request_set == (("X-Env", "staging"),)
    rejected = parse_container(inspect({"labelgw.headers.request.set.Connection": "close"}))
    assert isinstance(rejected, Rejection) and rejected.label == "labelgw.headers.request.set.Connection"
    typo = parse_container(inspect({"labelgw.headers.request.sett.X-Env": "staging"}))
    assert isinstance(typo, Rejection) and "unknown label" in typo.reason


def test_static_services_take_the_same_keys() -> None:
    settings = build({}, {"services": {"legacy": {
        "backends": ["127.0.0.1:9000"], "allow": "127.0.0.0/8", "max_body": "1KiB",
        "headers.response.set.X-Frame-Options": "DENY", "auth.basic": f"alice:{HASH}", "auth.forward": True,
    }}})
    middleware = settings.static_services[0].middleware
    assert middleware is not None and middleware.max_body == 1024 and middleware.auth is not None
    assert middleware.auth.forward is True
    with pytest.raises(ConfigError, match="headers.request.set.Host"):
        build({}, {"services": {"legacy": {"backends": ["127.0.0.1:9000"], "headers.request.set.Host": "x"}}})


def test_trusted_proxies_setting() -> None:
    assert build({"trusted_proxies": ["10.0.0.0/8,192.168.1.1"]}).trusted_proxies == ("10.0.0.0/8", "192.168.1.1/32")
    assert build({}, {"trusted_proxies": "fd00::/8"}).trusted_proxies == ("fd00::/8",)
    with pytest.raises(ConfigError, match="--trusted-proxies"):
        build({"trusted_proxies": ["10.0.0.0/40"]})


# --- CIDR matching and client addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("address, allowed", [
    (b"10.1.2.3", True), (b"127.0.0.1", True), (b"127.0.0.2", False), (b"11.0.0.1", False),
    (b"::1", True), (b"::2", False), (b"2001:db8::5", True), (b"2001:db9::5", False),
    (b"::ffff:10.0.0.7", True),  # an IPv4 client on a dual-stack listener
    (b"garbage", False), (b"", False),
])
def test_allowlist_matches_cidrs_ipv4_and_ipv6(address: bytes, allowed: bool) -> None:
    allow = Allowlist(parse_allow("10.0.0.0/8,127.0.0.1/32,::1/128,2001:db8::/32"))
    assert allow.allows(address) is allowed
    assert allow.allows(address) is allowed  # cached verdict


TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize("peer, xff, client", [
    (b"203.0.113.9", [b"1.2.3.4"], b"203.0.113.9"),  # untrusted peer: its X-Forwarded-For means nothing
    (b"10.0.0.2", [b"1.2.3.4"], b"1.2.3.4"),
    (b"10.0.0.2", [b"6.6.6.6, 1.2.3.4, 10.0.0.5"], b"1.2.3.4"),  # spoofed first hop ignored, trusted hops skipped
    (b"10.0.0.2", [b"6.6.6.6", b"1.2.3.4,10.0.0.5"], b"1.2.3.4"),  # several fields read in order
    (b"10.0.0.2", [b"10.0.0.7, 10.0.0.5"], b"10.0.0.7"),  # all trusted: the first
    (b"10.0.0.2", [], b"10.0.0.2"),
    (b"10.0.0.2", [b"1.2.3.4, junk, 10.0.0.5"], b"10.0.0.5"),  # garbage: the last hop that vouches for it
    (b"fd00::1", [b"2001:db8::1"], b"2001:db8::1"),
    (b"10.0.0.2", [b"[2001:db8::2]:4711"], b"2001:db8::2"),
    (b"10.0.0.2", [b"1.2.3.4:8080"], b"1.2.3.4"),
])
def test_client_address_behind_trusted_proxies(peer: bytes, xff: list[bytes], client: bytes) -> None:
    assert client_address(peer, xff, TRUSTED) == client


# --- bcrypt, its cache and its thread ---------------------------------------------------------------------------


class Threads:
    """A thread pool stand-in: the work runs when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.calls.append((function, args, done))
        return done

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for function, args, done in calls:
            done.callback(function(*args))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def seconds(self) -> float:
        return self.now


def answer(result: Any) -> Any:
    if isinstance(result, Deferred):
        box: list[Any] = []

        def keep(value: Any) -> Any:
            box.append(value)
            return value

        result.addCallback(keep)
        return box[-1] if box else "pending"
    return result


def test_bcrypt_check_runs_in_the_thread_and_successes_are_cached() -> None:
    threads, clock = Threads(), FakeClock()
    auth = BasicAuth(AuthSpec((("alice", HASH),), "r"), clock, threads)
    first = auth.check(basic("alice", "s3cret"))
    second = auth.check(basic("alice", "s3cret"))  # the same credentials wait for the same check
    assert answer(first) == answer(second) == "pending" and len(threads.calls) == 1
    threads.run()
    assert answer(first) is True and answer(second) is True
    assert auth.check(basic("alice", "s3cret")) is True and threads.calls == []  # cached: no bcrypt, no thread
    clock.now += AUTH_CACHE_TTL + 1
    assert answer(auth.check(basic("alice", "s3cret"))) == "pending"  # expired: checked again
    threads.run()
    assert auth.checks == 2


def test_wrong_passwords_are_not_cached_and_malformed_ones_never_reach_bcrypt() -> None:
    threads, clock = Threads(), FakeClock()
    auth = BasicAuth(AuthSpec((("alice", HASH),), "r"), clock, threads)
    wrong = auth.check(basic("alice", "nope"))
    threads.run()
    assert answer(wrong) is False
    again = auth.check(basic("alice", "nope"))
    assert answer(again) == "pending"
    threads.run()
    for header in (None, b"", b"Bearer x", b"Basic !!!", basic("mallory", "s3cret"), b"Basic " + base64.b64encode(b"nocolon")):
        assert auth.check(header) is False
    assert threads.calls == []
    assert b'realm="r"' in auth.challenge


def test_bcrypt_runs_on_a_real_thread_pool() -> None:
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(1, 1)
    pool.start()
    try:
        class Reactor(FakeClock):
            def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
                function(*args)

        reactor = Reactor()
        auth = BasicAuth(AuthSpec((("alice", HASH),), "r"), reactor,
                         lambda function, *args: deferToThreadPool(reactor, pool, function, *args))  # type: ignore[arg-type]
        result = auth.check(basic("alice", "s3cret"))
        assert isinstance(result, Deferred)
        box: list[Any] = []
        result.addCallback(box.append)
        pool.stop()  # waits for the check
        assert box == [True]
    finally:
        if pool.started:
            pool.stop()


# --- the data path ----------------------------------------------------------------------------------------------

API = spec("api-1", "api", 9001, ("api.localhost",))


def harness(threads: Any = None, **parts: Any) -> ProxyHarness:
    h = ProxyHarness(specs=())
    h.registry.add_listener(MiddlewareManager(h.reactor, h.registry.services, threads))
    container = dataclasses.replace(API, middleware=MiddlewareSpec(**parts))
    h.registry.apply(container.container_id, container)
    return h


def test_allowlist_403_and_200() -> None:
    h = harness(allow=parse_allow("127.0.0.1/32,10.0.0.0/24"))
    refused = h.connect(IPv4Address("TCP", "192.168.1.5", 5555))
    refused.send(get())
    assert refused.response().status == 403 and b"not allowed" in refused.response().body
    assert h.new_connects() == []
    client = h.connect(IPv4Address("TCP", "10.0.0.9", 5555))
    client.send(get())
    h.upstream().accept().send(ok())
    assert client.response().status == 200
    h.assert_accounting()


def test_allowlist_uses_the_address_behind_a_trusted_proxy_and_forwards_it() -> None:
    h = harness(allow=parse_allow("1.2.3.4"))
    h.gateway.trusted_proxies = parse_networks(["10.0.0.0/8"])
    client = h.connect(IPv4Address("TCP", "10.0.0.9", 5555))
    client.send(get(extra=b"X-Forwarded-For: 9.9.9.9, 1.2.3.4\r\n"))
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.all(b"X-Forwarded-For") == [b"1.2.3.4"] and request.header(b"X-Real-IP") == b"1.2.3.4"
    upstream.send(ok())
    assert client.response().status == 200
    spoofed = h.connect(IPv4Address("TCP", "10.0.0.9", 5555))
    spoofed.send(get(extra=b"X-Forwarded-For: 1.2.3.4, 9.9.9.9\r\n"))
    assert spoofed.response().status == 403
    h.assert_accounting()


def test_auth_401_then_held_until_the_thread_answers_then_cached() -> None:
    threads = Threads()
    h = harness(threads, auth=AuthSpec((("alice", HASH),), "staging"))
    client = h.connect()
    client.send(get())
    refused = client.response()
    assert refused.status == 401 and refused.header(b"WWW-Authenticate") == b'Basic realm="staging", charset="UTF-8"'
    client.take()
    client.send(get(extra=b"Authorization: " + basic("alice", "s3cret") + b"\r\n"))
    assert h.new_connects() == [] and client.received() == b""  # held while bcrypt runs
    threads.run()
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.header(b"Authorization") is None  # not forwarded by default
    upstream.send(ok())
    assert client.response().status == 200
    client.take()
    upstream.take()
    client.send(get(extra=b"Authorization: " + basic("alice", "s3cret") + b"\r\n"))
    assert threads.calls == []  # cached: straight through on the keep-alive connection
    upstream.send(ok())
    assert client.response().status == 200
    h.assert_accounting()


def test_auth_wrong_password_after_the_thread_is_a_401() -> None:
    threads = Threads()
    h = harness(threads, auth=AuthSpec((("alice", HASH),), "r", forward=True))
    client = h.connect()
    client.send(get(extra=b"Authorization: " + basic("alice", "wrong") + b"\r\n"))
    threads.run()
    assert client.response().status == 401 and h.new_connects() == []
    h.assert_accounting()


def test_auth_forward_keeps_the_field() -> None:
    h = harness(auth=AuthSpec((("alice", HASH),), "r", forward=True))  # the harness clock has no threads: in place
    client = h.connect()
    client.send(get(extra=b"Authorization: " + basic("alice", "s3cret") + b"\r\n"))
    upstream = h.upstream().accept()
    assert upstream.request().header(b"Authorization") == basic("alice", "s3cret")
    upstream.send(ok())
    assert client.response().status == 200
    h.assert_accounting()


def test_auth_client_gone_while_the_check_runs() -> None:
    threads = Threads()
    h = harness(threads, auth=AuthSpec((("alice", HASH),), "r"))
    client = h.connect()
    client.send(get(extra=b"Authorization: " + basic("alice", "s3cret") + b"\r\n"))
    client.close()
    h.settle()
    threads.run()
    assert h.new_connects() == []
    h.assert_accounting()


def post(body: bytes, chunked: bool = False) -> bytes:
    if chunked:
        return (b"POST / HTTP/1.1\r\nHost: api.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(body), body))
    return b"POST / HTTP/1.1\r\nHost: api.localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_body_limit_content_length_413_before_connecting() -> None:
    h = harness(max_body=10)
    client = h.connect()
    client.send(post(b"x" * 11))
    assert client.response().status == 413 and client.closing
    assert h.new_connects() == []
    ok_client = h.connect()
    ok_client.send(post(b"x" * 10))
    upstream = h.upstream().accept()
    upstream.send(ok())
    assert ok_client.response().status == 200
    h.assert_accounting()


def test_body_limit_chunked_413_when_no_response_started() -> None:
    h = harness(max_body=10)
    client = h.connect()
    client.send(post(b"x" * 8, chunked=True))
    upstream = h.upstream().accept()
    client.send(b"8\r\nyyyyyyyy\r\n")
    assert client.response().status == 413 and client.closing
    h.settle()
    assert upstream.aborted
    h.assert_accounting()


def test_body_limit_chunked_after_the_response_started_cuts_both() -> None:
    h = harness(max_body=10)
    client = h.connect()
    client.send(post(b"x" * 8, chunked=True))
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
    client.send(b"8\r\nyyyyyyyy\r\n")
    h.settle()
    assert upstream.aborted and client.aborted
    assert client.response().complete is False
    h.assert_accounting()


def test_header_rules_on_request_and_response() -> None:
    rules = HeadersSpec((("X-Env", "staging"),), ("X-Debug",), (("Strict-Transport-Security", "max-age=60"),), ("Server",))
    h = harness(headers=rules)
    client = h.connect()
    client.send(get(extra=b"X-Debug: 1\r\nX-Env: prod\r\nX-Keep: yes\r\n"))
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.all(b"X-Env") == [b"staging"] and request.header(b"X-Debug") is None
    assert request.header(b"X-Keep") == b"yes" and request.header(b"Host") == b"api.localhost"
    assert request.all(b"X-Forwarded-For") == [b"10.0.0.9"]
    upstream.send(ok(extra=b"Server: gunicorn\r\nX-Other: 1\r\n"))
    response = client.response()
    assert response.header(b"Server") is None and response.header(b"X-Other") == b"1"
    assert response.header(b"Strict-Transport-Security") == b"max-age=60" and response.body == b"hello"
    h.assert_accounting()


def test_a_route_without_header_rules_keeps_the_pre_cut_head() -> None:
    h = harness(max_body=100)
    client = h.connect()
    client.send(get(extra=b"X-Debug: 1\r\n"))
    assert client.protocol.exchange.head.forward is not None  # the fast path, untouched
    h.upstream().accept().send(ok())
    assert client.response().status == 200
    h.assert_accounting()


def _fields(head_bytes: bytes) -> list[tuple[bytes, bytes]]:
    lines = head_bytes.split(b"\r\n")[1:]
    return [(name.lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines if line)]


_NAMES = st.sampled_from([b"X-Env", b"x-env", b"X-ENV", b"X-Debug", b"x-debug", b"X-Keep", b"X-Envoy", b"Server",
                          b"Accept", b"X-Debug-Not"])


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(_NAMES, st.sampled_from([b"1", b" two ", b"x:y", b""])), max_size=8))
def test_header_rules_on_raw_lines_equal_the_field_by_field_rules(fields: list[tuple[bytes, bytes]]) -> None:
    """The rules applied to the pre-cut block give the fields the field-by-field path gives, in the same order."""
    from labelgw.http.headers import upstream_request_head
    from labelgw.http.parser import parse_request_head, parse_response_head
    from labelgw.middleware.access import HeaderRules

    rules = HeaderRules(HeadersSpec((("X-Env", "staging"),), ("X-Debug",), (("Via", "labelgw"),), ("Server", "x-env")),
                        drop_authorization=False)
    text = b"GET / HTTP/1.1\r\nHost: api.localhost\r\n" + b"".join(b"%s:%s\r\n" % pair for pair in fields)
    text = text[:-2]  # the parsers take the head without its last CRLF
    fast, slow = parse_request_head(text), parse_request_head(text)
    assert fast.forward is not None
    slow.headers = slow.headers  # the field-by-field path
    rules.apply_request(fast)
    rules.apply_request(slow)
    assert fast.forward is not None and slow.forward is None
    assert _fields(upstream_request_head(fast, b"/", b"10.0.0.9", b"http", b"80")) == \
        _fields(upstream_request_head(slow, b"/", b"10.0.0.9", b"http", b"80"))
    assert fast.headers == slow.headers
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"".join(b"%s:%s\r\n" % pair for pair in fields)
    fast_r, slow_r = parse_response_head(response[:-2]), parse_response_head(response[:-2])
    slow_r.headers = slow_r.headers
    assert rules.apply_response(fast_r) == rules.apply_response(slow_r) == b"Via: labelgw\r\n"
    assert fast_r.headers == slow_r.headers


# --- HTTP/2 -----------------------------------------------------------------------------------------------------


def test_http2_header_rules_auth_and_body_limit() -> None:
    from test_h2 import H2Client

    rules = HeadersSpec((("X-Env", "staging"),), ("X-Debug",), (("X-Frame-Options", "DENY"),), ("Server",))
    h = harness(headers=rules, auth=AuthSpec((("alice", HASH),), "r"), max_body=10)
    client = H2Client(h)
    denied = client.request(authority=b"api.localhost")
    assert client.streams[denied].status == 401
    assert client.streams[denied].header(b"www-authenticate") == b'Basic realm="r", charset="UTF-8"'
    creds = [(b"authorization", basic("alice", "s3cret"))]
    stream = client.request(authority=b"api.localhost", headers=creds + [(b"x-debug", b"1")])
    upstream = h.upstream().accept()
    request = upstream.request()
    assert request.header(b"x-env") == b"staging" and request.header(b"x-debug") is None
    assert request.header(b"authorization") is None
    upstream.send(ok(extra=b"Server: x\r\n"))
    client.exchange()
    result = client.streams[stream]
    assert result.status == 200 and result.header(b"x-frame-options") == b"DENY" and result.header(b"server") is None
    big = client.request(authority=b"api.localhost", method=b"POST", headers=creds + [(b"content-length", b"11")],
                         body=b"x" * 11)
    assert client.streams[big].status == 413
    upstream.take()
    streamed = client.request(authority=b"api.localhost", method=b"POST", headers=creds, body=b"x" * 8, end=False)
    client.send(streamed, b"y" * 8)
    assert client.streams[streamed].status == 413
    h.assert_accounting()


def test_http2_allowlist() -> None:
    from test_h2 import H2Client

    h = harness(allow=AllowSpec((ipaddress.ip_network("127.0.0.1/32"),)))
    client = H2Client(h)  # the harness's client is 10.0.0.9
    stream = client.request(authority=b"api.localhost")
    assert client.streams[stream].status == 403
    h.assert_accounting()


# --- the Compose example ----------------------------------------------------------------------------------------


def test_the_compose_example_labels_parse_as_compose_passes_them() -> None:
    import pathlib

    import yaml

    path = pathlib.Path(__file__).resolve().parent.parent / "compose-examples" / "request-middleware" / "docker-compose.yml"
    services = yaml.safe_load(path.read_text())["services"]
    private = {k: v.replace("$$", "$") for k, v in services["private"]["labels"].items()}  # Compose's unescaping
    parsed = parse_middleware({k.removeprefix("labelgw."): v for k, v in private.items()}, "private")
    assert parsed is not None and parsed.auth is not None and parsed.max_body == 64 * 1024
    user, hashed = parsed.auth.users[0]
    assert user == "alice" and bcrypt.checkpw(b"s3cret", hashed.encode())
    web = {k.removeprefix("labelgw."): v for k, v in services["web"]["labels"].items()}
    headers = parse_middleware(web, "web")
    assert headers is not None and headers.headers is not None and headers.headers.response_remove == ("Server",)


def test_no_way_round_auth_through_the_fallback_service() -> None:
    from labelgw.core.middleware import FallbackSpec

    threads = Threads()
    h = ProxyHarness(specs=())
    h.registry.add_listener(MiddlewareManager(h.reactor, h.registry.services, threads))
    stopped = dataclasses.replace(API, running=False, middleware=MiddlewareSpec(
        auth=AuthSpec((("alice", HASH),), "r"), fallback=FallbackSpec(service="spare")))
    h.registry.apply(stopped.container_id, stopped)
    spare = spec("spare-1", "spare", 9601, ("spare.localhost",))
    h.registry.apply(spare.container_id, spare)
    client = h.connect()
    client.send(get(extra=b"Authorization: " + basic("alice", "wrong") + b"\r\n"))
    assert h.new_connects() == []  # the fallback's exchange waits for the check too
    threads.run()
    assert client.response().status == 401 and h.new_connects() == []
    h.assert_accounting()


def test_admin_view_describes_the_request_side() -> None:
    from labelgw.control.admin import state

    h = harness(allow=parse_allow("127.0.0.1"), auth=AuthSpec((("alice", HASH),), "r"), max_body=5,
                headers=HeadersSpec((("X-Env", "s"),)))
    client = h.connect()
    client.send(get())
    view = state(h.registry, h.now())["services"]["api"]["middleware"]
    assert view["allow"] == {"networks": ["127.0.0.1/32"], "refused": 1}
    assert view["auth"]["users"] == 1 and view["max_body"]["bytes"] == 5
    assert view["headers"]["request_set"] == ["X-Env"]


def test_trusted_proxies_option_reaches_the_gateway() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from labelgw.cli.app import LabelgwService
    from labelgw.cli.tap import Options

    options = Options()
    options.parseOptions(["--https", "none", "--admin", "none", "--trusted-proxies", "10.0.0.0/8,fd00::/8",
                          "--trusted-proxies", "192.168.0.1"])
    assert options.settings.trusted_proxies == ("10.0.0.0/8", "fd00::/8", "192.168.0.1/32")
    service = LabelgwService(dataclasses.replace(options.settings, docker=False), MemoryReactorClock())
    assert [str(n) for n in service.gateway.trusted_proxies] == ["10.0.0.0/8", "fd00::/8", "192.168.0.1/32"]
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="--trusted-proxies"):
        Options().parseOptions(["--https", "none", "--trusted-proxies", "10.0.0.0/99"])


def test_http2_body_over_the_limit_after_the_response_started_resets_the_stream() -> None:
    from test_h2 import H2Client

    h = harness(max_body=10)
    client = H2Client(h)
    stream = client.request(authority=b"api.localhost", method=b"POST", body=b"x" * 8, end=False)
    upstream = h.upstream().accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
    client.exchange()
    assert client.streams[stream].status == 200
    client.send(stream, b"y" * 8)
    h.settle()
    assert client.streams[stream].reset is not None and upstream.aborted
    h.assert_accounting()


def test_header_rules_on_repeated_heads_on_one_connection() -> None:
    """Repeated heads share their predecessor's bytes objects, and the rules keep their last result by identity:
    every request still gets the rules exactly once (no line added twice, a field to drop dropped), and a head with
    a field to drop between repeated ones is not mistaken for them."""
    rules = HeadersSpec((("X-Env", "staging"),), ("X-Debug",), (("Strict-Transport-Security", "max-age=60"),), ("Server",))
    h = harness(headers=rules)
    client = h.connect()
    upstream = None
    sends = [b"X-Keep: yes\r\n"] * 3 + [b"X-Debug: 1\r\n"] + [b"X-Keep: yes\r\n"] * 3
    answers = [b"X-Other: 1\r\n"] * 3 + [b"Server: gunicorn\r\n"] + [b"X-Other: 1\r\n"] * 3
    for extra, answer in zip(sends, answers):
        client.send(get(extra=extra))
        if upstream is None:
            upstream = h.upstream().accept()
        request = upstream.request()
        assert request.all(b"X-Env") == [b"staging"] and request.header(b"X-Debug") is None
        assert request.header(b"X-Keep") == (b"yes" if b"X-Keep" in extra else None)
        upstream.send(ok(extra=answer))
        response = client.response()
        assert response.header(b"Server") is None
        assert response.all(b"Strict-Transport-Security") == [b"max-age=60"] and response.body == b"hello"
        client.take()
        upstream.take()
    h.assert_accounting()
