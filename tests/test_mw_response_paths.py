"""Issue 10 middlewares: compression (Accept-Encoding, types, streaming gzip), regex redirect and rewrite, plugin
middlewares; units, then the deterministic proxy harness over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from pathlib import Path
from typing import Any

import pytest

from labelgw.http.accesslog import FLUSH_DELAY, NO_KIND, AccessLog
from labelgw.core.labels import parse_container
from labelgw.core.middleware import (
    CompressSpec, MiddlewareLabelError, MiddlewareSpec, parse_middleware,
)
from labelgw.core.paths import PathRefused
from labelgw.http.parser import RequestHead, ResponseHead
from labelgw.middleware import plugin as plugin_module
from labelgw.middleware.compress import CompressingSide, accepts_gzip, type_matches
from labelgw.middleware.rewrite import redirect_location, rewrite_target
from proxyharness import ProxyHarness, ok, spec
from test_mw_chain import API, Served, harness

PLUGINS = Path(__file__).resolve().parent / "plugins"


# Accept-Encoding and types.


@pytest.mark.parametrize("value, expected", [
    (b"gzip", True), (b"gzip, deflate, br", True), (b"br;q=1.0, gzip;q=0.5", True), (b"GZIP", True),
    (b"x-gzip", True), (b"gzip;q=0", False), (b"gzip; q=0.000", False), (b"*", True), (b"*;q=0", False),
    (b"br, *;q=0.1", True), (b"gzip;q=0, *", False), (b"identity", False), (b"", False), (None, False),
    (b"br", False), (b"gzip;q=bad", False),
])
def test_accept_encoding(value: bytes | None, expected: bool) -> None:
    assert accepts_gzip(value) is expected


def test_types() -> None:
    types = ("text/*", "application/json")
    assert type_matches(b"text/html; charset=utf-8", types)
    assert type_matches(b"Application/JSON", types)
    assert not type_matches(b"image/png", types)
    assert not type_matches(b"text/event-stream", types)
    assert not type_matches(None, types)


# The compressing side on a recording inner side.


class Recorder:
    peer_ip = b"127.0.0.1"
    proto = b"http"
    local_port = b"80"
    log_kind = NO_KIND
    log_kind_keeper = None
    is_http2 = False

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.data: list[bytes] = []
        self.ended = False
        self.flushes = 0

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        self.head = head

    def response_data(self, data: bytes) -> None:
        self.data.append(data)

    def flush(self) -> None:
        self.flushes += 1

    def response_end(self) -> None:
        self.ended = True

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def request(accept: bytes | None = b"gzip") -> RequestHead:
    head = RequestHead()
    head.method = b"GET"
    head.block = b"accept-encoding: " + accept + b"\r\n" if accept is not None else b""
    return head


def response(fields: bytes, length: int | None = None, status: int = 200) -> ResponseHead:
    head = ResponseHead()
    head.status = status
    head.block = fields
    head.content_length = length
    return head


def test_streaming_gzip_decompresses_to_the_original_across_many_chunks() -> None:
    inner = Recorder()
    side = CompressingSide(inner, CompressSpec(), request())  # type: ignore[arg-type]
    head = response(b"Content-Type: text/plain\r\nETag: \"abc\"\r\nContent-Length: 200000\r\n", 200000)
    side.response_head(head, True, False, b"")
    original = b"".join(b"line %d of a text body\n" % i for i in range(8000))
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    seen = b""
    for at in range(0, len(original), 1000):
        side.response_data(original[at:at + 1000])
        if at % 7000 == 0:
            side.flush()
            # Everything written so far is decodable after the flush: a stream reaches the client as it comes.
            seen += decompressor.decompress(b"".join(inner.data))
            inner.data.clear()
            assert original.startswith(seen) and len(seen) == at + 1000
    side.response_end()
    seen += decompressor.decompress(b"".join(inner.data)) + decompressor.flush()
    assert seen == original and inner.ended
    assert inner.head is head and head.content_length is None
    fields = dict((n.lower(), v) for n, v in head.headers)
    assert fields[b"content-encoding"] == b"gzip" and fields[b"vary"] == b"Accept-Encoding"
    assert fields[b"etag"] == b'W/"abc"' and b"content-length" not in fields


@pytest.mark.parametrize("fields, length, status, accept", [
    (b"Content-Type: text/plain\r\nContent-Encoding: br\r\n", None, 200, b"gzip"),
    (b"Content-Type: image/png\r\n", None, 200, b"gzip"),
    (b"Content-Type: text/plain\r\n", 100, 200, b"gzip"),  # smaller than min_size
    (b"Content-Type: text/plain\r\n", None, 206, b"gzip"),
    (b"Content-Type: text/plain\r\nCache-Control: no-transform\r\n", None, 200, b"gzip"),
    (b"Content-Type: text/plain\r\n", None, 200, b"gzip;q=0"),
    (b"Content-Type: text/plain\r\n", None, 200, None),
])
def test_not_compressed(fields: bytes, length: int | None, status: int, accept: bytes | None) -> None:
    inner = Recorder()
    side = CompressingSide(inner, CompressSpec(), request(accept))  # type: ignore[arg-type]
    head = response(fields, length, status)
    side.response_head(head, True, False, b"")
    side.response_data(b"x" * 5000)
    side.response_end()
    assert inner.data == [b"x" * 5000]
    assert (b"Content-Encoding", b"gzip") not in head.headers


def test_no_body_responses_are_not_compressed() -> None:
    for status in (204, 304):
        inner = Recorder()
        side = CompressingSide(inner, CompressSpec(), request())  # type: ignore[arg-type]
        head = response(b"Content-Type: text/plain\r\n", None, status)
        side.response_head(head, False, False, b"")
        side.response_end()
        assert (b"Content-Encoding", b"gzip") not in head.headers and inner.data == []


def test_an_uncompressible_client_still_gets_vary() -> None:
    inner = Recorder()
    side = CompressingSide(inner, CompressSpec(), request(None))  # type: ignore[arg-type]
    head = response(b"Content-Type: text/plain\r\nVary: Cookie\r\n")
    side.response_head(head, True, False, b"")
    assert [v for n, v in head.headers if n.lower() == b"vary"] == [b"Cookie, Accept-Encoding"]


# Labels.


def parse(**labels: str) -> MiddlewareSpec | None:
    return parse_middleware({key.replace("__", "."): value for key, value in labels.items()}, "api")


def test_compress_labels() -> None:
    got = parse(compress="true", compress__types="text/*,application/json", compress__min_size="2KB")
    assert got is not None and got.compress == CompressSpec(("text/*", "application/json"), 2048)
    assert parse(compress="false") is None
    for labels, label in (({"compress.types": "text/*"}, "compress.types"), ({"compress": "maybe"}, "compress"),
                          ({"compress": "true", "compress.types": "text"}, "compress.types"),
                          ({"compress": "true", "compress.min_size": "lots"}, "compress.min_size")):
        with pytest.raises(MiddlewareLabelError) as caught:
            parse_middleware(labels, "api")
        assert caught.value.label == label


def test_redirect_and_rewrite_labels() -> None:
    got = parse(redirect__regex="^/old/(.*)", redirect__replacement="/new/$1", redirect__permanent="true")
    assert got is not None and got.redirect is not None and got.redirect.permanent
    assert redirect_location(got.redirect, b"/old/a/b?x=1") == b"/new/a/b?x=1"
    assert redirect_location(got.redirect, b"/other") is None
    named = parse(rewrite__regex="^/api/(?P<rest>.*)", rewrite__replacement="/v2/${rest}$$")
    assert named is not None and named.rewrite is not None
    assert rewrite_target(named.rewrite, b"/api/x?q=1") == b"/v2/x$?q=1"
    assert parse(redirect__regex="^/a", redirect__replacement="/b") == parse(redirect__regex="^/a", redirect__replacement="/b")
    bad = [
        ({"redirect.regex": "^/(unclosed", "redirect.replacement": "/x"}, "redirect.regex", "not a valid regex"),
        ({"redirect.regex": "^/a"}, "redirect.regex", "needs redirect.replacement"),
        ({"rewrite.regex": "^/(a)", "rewrite.replacement": "/$2"}, "rewrite.replacement", "1 group"),
        ({"rewrite.regex": "^/a", "rewrite.replacement": "/b c"}, "rewrite.replacement", "visible ASCII"),
        ({"rewrite.regex": "x" * 2000, "rewrite.replacement": "/"}, "rewrite.regex", "at most"),
        ({"rewrite.regex": "^/a", "rewrite.replacement": "/$x"}, "rewrite.replacement", "'$'"),
        ({"rewrite.regex": "^/a", "rewrite.replacement": "/b", "strip_prefix": "true"}, "rewrite.regex", "strip_prefix"),
    ]
    for labels, label, reason in bad:
        with pytest.raises(MiddlewareLabelError) as caught:
            parse_middleware(labels, "api")
        assert caught.value.label == label and reason in caught.value.reason, caught.value.reason


def test_rewrite_results_are_checked() -> None:
    up = parse(rewrite__regex="^/a/(.*)", rewrite__replacement="/b/../../$1")
    assert up is not None and up.rewrite is not None
    with pytest.raises(PathRefused, match="climbs"):
        rewrite_target(up.rewrite, b"/a/x")
    relative = parse(rewrite__regex="^/a/(.*)", rewrite__replacement="$1")
    assert relative is not None and relative.rewrite is not None
    with pytest.raises(PathRefused, match="not absolute"):
        rewrite_target(relative.rewrite, b"/a/x")
    dots = parse(rewrite__regex="^/a/(.*)", rewrite__replacement="/b/$1")
    assert dots is not None and dots.rewrite is not None
    assert rewrite_target(dots.rewrite, b"/a/c/./d") == b"/b/c/d"


# Plugins.


@pytest.fixture
def example_plugin(monkeypatch: pytest.MonkeyPatch) -> Any:
    from twisted import plugins

    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(PLUGINS / "twisted" / "plugins")])
    plugin_module.find_plugins(refresh=True)
    yield
    monkeypatch.undo()
    plugin_module.find_plugins(refresh=True)


def test_plugin_discovery_and_option_errors(example_plugin: Any) -> None:
    assert "stamp" in plugin_module.find_plugins()
    got = parse(middlewares="stamp", plugin__stamp__header="X-Stamp")
    assert got is not None and [use.name for use in got.plugins] == ["stamp"]
    bad = [
        ({"middlewares": "nosuch"}, "middlewares", "no middleware plugin named 'nosuch'"),
        ({"middlewares": "stamp", "plugin.stamp.header": "X-S", "plugin.stamp.colour": "red"}, "plugin.stamp.colour",
         "unknown option"),
        ({"middlewares": "stamp"}, "middlewares", "needs a field name"),
        ({"plugin.stamp.header": "X-S"}, "plugin.stamp.header", "not named in the middlewares"),
    ]
    for labels, label, reason in bad:
        with pytest.raises(MiddlewareLabelError) as caught:
            parse_middleware(labels, "api")
        assert caught.value.label == label and reason in caught.value.reason, caught.value.reason


def test_plugin_labels_pass_the_unknown_label_check(example_plugin: Any) -> None:
    from labelgw.core.model import Rejection

    inspect = {"Id": "c1", "Name": "/c1", "State": {"Running": True}, "Config": {"Labels": {
        "labelgw.service": "api", "labelgw.port": "80", "labelgw.middlewares": "stamp",
        "labelgw.plugin.stamp.header": "X-Stamp"}}, "NetworkSettings": {"Networks": {"n": {"IPAddress": "127.0.0.1"}}}}
    result = parse_container(inspect)
    assert not isinstance(result, Rejection), result
    assert result is not None and result.middleware is not None and result.middleware.plugins[0].name == "stamp"


def test_static_services_take_plugin_options_flat_or_nested(example_plugin: Any) -> None:
    from labelgw.cli.config import ConfigError, build

    backends = ["127.0.0.1:9001"]
    flat = {"services": {"api": {"backends": backends, "middlewares": "stamp", "plugin.stamp.header": "X-Stamp"}}}
    nested = {"services": {"api": {"backends": backends, "middlewares": "stamp",
                                   "plugin": {"stamp": {"header": "X-Stamp", "value": "yes"}}}}}
    for file in (flat, nested):
        [static] = build({}, file).static_services
        assert static.middleware is not None and [use.name for use in static.middleware.plugins] == ["stamp"]
    bad = [
        ({"middlewares": "stamp", "plugin": {"stamp": {"header": "X-S", "colour": "red"}}}, "plugin.stamp.colour"),
        ({"middlewares": "stamp", "plugin": "stamp"}, "services.api.plugin: must be a mapping"),
        ({"plugin.stamp.header": "X-S"}, "not named in the middlewares"),
    ]
    for keys, said in bad:
        with pytest.raises(ConfigError) as caught:
            build({}, {"services": {"api": {"backends": backends, **keys}}})
        assert said in str(caught.value), str(caught.value)


# The harness: HTTP/1.1.


class Recording(Served):
    """Served, keeping each request as the backend received it."""

    def __init__(self, h: ProxyHarness) -> None:
        super().__init__(h)
        self.requests: list[Any] = []

    def pending(self) -> Any:
        upstream = super().pending()
        if upstream is not None:
            self.requests.append(upstream.request())
        return upstream


def with_spec(**labels: str) -> Any:
    got = parse(**labels)
    assert got is not None
    return dataclasses.replace(API, middleware=got)


def test_compression_over_http1_is_chunked_gzip() -> None:
    h = harness(with_spec(compress="true"))
    body = b"hello world " * 1000
    answer = ok(body, extra=b"Content-Type: text/html\r\nETag: \"v1\"\r\n")
    served = Served(h)
    r = served.request(extra=b"Accept-Encoding: gzip, br\r\n", answer=answer)
    assert r.status == 200 and r.chunked
    assert r.header(b"Content-Encoding") == b"gzip" and r.header(b"Content-Length") is None
    assert r.header(b"ETag") == b'W/"v1"' and r.header(b"Vary") == b"Accept-Encoding"
    assert gzip.decompress(r.body) == body
    plain = served.request(answer=answer)
    assert plain.body == body and plain.header(b"Content-Encoding") is None
    h.assert_accounting()


def test_head_is_not_compressed() -> None:
    h = harness(with_spec(compress="true"))
    served = Served(h)
    client = h.connect()
    client.send(b"HEAD / HTTP/1.1\r\nHost: api.localhost\r\nAccept-Encoding: gzip\r\n\r\n")
    upstream = h.new_connects()[0].accept()
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5000\r\n\r\n")
    h.settle()
    r = client.response(head_only=True)
    assert r.header(b"Content-Encoding") is None and r.header(b"Content-Length") == b"5000"
    del served


def test_redirect_and_rewrite_over_http1() -> None:
    h = harness(with_spec(redirect__regex="^/old/(.*)", redirect__replacement="/new/$1"))
    r = Served(h).request(path=b"/old/x?y=1")
    assert r.status == 307 and r.header(b"Location") == b"/new/x?y=1"
    assert h.new_connects() == []
    h = harness(with_spec(rewrite__regex="^/api/(.*)", rewrite__replacement="/v2/$1"))
    served = Recording(h)
    assert served.request(path=b"/api/users?x=1").status == 200
    assert served.requests[0].target == b"/v2/users?x=1"
    h = harness(with_spec(rewrite__regex="^/api/(.*)", rewrite__replacement="/v2/../../$1"))
    r = Served(h).request(path=b"/api/users")
    assert r.status == 400 and b"climbs" in r.body


def test_plugin_over_http1(example_plugin: Any) -> None:
    h = harness(with_spec(middlewares="stamp", plugin__stamp__header="X-Stamp", plugin__stamp__value="yes",
                          plugin__stamp__deny="/secret"))
    served = Recording(h)
    r = served.request(path=b"/open")
    assert r.status == 200 and r.header(b"X-Stamp") == b"yes"
    assert served.requests[0].header(b"X-Stamp") == b"yes"
    denied = served.request(path=b"/secret/x")
    assert denied.status == 403 and b"stamp" in denied.body
    crashed = served.request(path=b"/crash")
    assert crashed.status == 500 and b"plugin middleware" in crashed.body
    assert served.request(path=b"/open").status == 200
    h.assert_accounting()


# The harness: HTTP/2.


def test_compression_and_redirect_over_http2() -> None:
    from test_h2 import H2Client

    h = harness(with_spec(compress="true", redirect__regex="^/old$", redirect__replacement="/new"))
    h.registry.apply("solo-1", spec("solo-1", "api", 9001, ("solo.localhost",)))
    client = H2Client(h)
    stream = client.request(b"/page", headers=[(b"accept-encoding", b"gzip")])
    upstream = h.new_connects()[0].accept()
    body = b"<p>hi</p>" * 2000
    upstream.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n")
    for at in range(0, len(body), 3000):
        piece = body[at:at + 3000]
        upstream.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    upstream.send(b"0\r\n\r\n")
    client.exchange()
    result = client.streams[stream]
    assert result.status == 200 and result.ended
    assert result.header(b"content-encoding") == b"gzip" and result.header(b"content-length") is None
    assert gzip.decompress(result.body) == body
    moved = client.request(b"/old")
    client.exchange()
    assert client.streams[moved].status == 307 and client.streams[moved].header(b"location") == b"/new"


def test_rewrite_and_plugin_over_http2(example_plugin: Any) -> None:
    from test_h2 import H2Client

    h = harness(with_spec(rewrite__regex="^/api/(.*)", rewrite__replacement="/v2/$1", middlewares="stamp",
                          plugin__stamp__header="X-Stamp", plugin__stamp__deny="/v2/secret"))
    h.registry.apply("solo-1", spec("solo-1", "api", 9001, ("solo.localhost",)))
    client = H2Client(h)
    stream = client.request(b"/api/users?x=1")
    upstream = h.new_connects()[0].accept()
    request = upstream.request()
    assert request.target == b"/v2/users?x=1" and request.header(b"X-Stamp") == b"stamped"
    upstream.send(ok(b"hi"))
    client.exchange()
    result = client.streams[stream]
    assert result.status == 200 and result.header(b"x-stamp") == b"stamped" and result.body == b"hi"
    denied = client.request(b"/api/secret")
    client.exchange()
    assert client.streams[denied].status == 403


@pytest.mark.parametrize("format", ["json", "common"])
@pytest.mark.parametrize("labels", [
    {"compress": "true"},
    {"middlewares": "stamp", "plugin__stamp__header": "X-Stamp"},
    {"compress": "true", "middlewares": "stamp", "plugin__stamp__header": "X-Stamp"},
], ids=["compression", "plugin", "both"])
def test_an_http2_request_behind_a_wrapping_middleware_is_logged_as_http2(
    example_plugin: Any, labels: dict[str, str], format: str,
) -> None:
    # The wrappers (CompressingSide, PluginSide) state the protocol of the stream they wrap: the access log read
    # it as HTTP/1.1 once (it probed the side for an HTTP/2 stream's attribute, which a wrapper has not).
    from test_accesslog import ListSink
    from test_h2 import H2Client

    h = harness(with_spec(**labels))
    h.registry.apply("solo-1", spec("solo-1", "api", 9001, ("solo.localhost",)))
    sink = ListSink()
    h.gateway.access_log = AccessLog(h.reactor, format, sink)
    client = H2Client(h)
    upstreams = []
    for _ in range(2):  # the second one through the connection's kept line kind
        stream = client.request(b"/page", headers=[(b"accept-encoding", b"gzip")])
        upstreams += [fresh.accept() for fresh in h.new_connects()]
        upstreams[-1].take()
        upstreams[-1].send(ok(b"hi"))
        client.exchange()
        assert client.streams[stream].status == 200
    h.advance(FLUSH_DELAY)
    if format == "json":
        assert [record["protocol"] for record in sink.records()] == ["HTTP/2", "HTTP/2"]
    else:
        lines = sink.lines()
        assert len(lines) == 2 and all('"GET /page HTTP/2" 200 ' in line for line in lines), lines


def test_compression_applies_to_the_fallback_service_when_no_backend_is_ready() -> None:
    down = dataclasses.replace(API, running=False)
    got = parse(compress="true", compress__min_size="0", fallback="spare")
    assert got is not None
    h = harness(spec("spare-1", "spare", 9601, ("spare.localhost",)), dataclasses.replace(down, middleware=got))
    r = Served(h).request(extra=b"Accept-Encoding: gzip\r\n", answer=ok(b"spare body", extra=b"Content-Type: text/plain\r\n"))
    assert r.status == 200 and gzip.decompress(r.body) == b"spare body"
