"""dispatch keeps route_target's answer per request target (labelgw.http.dispatch._TARGETS): a kept answer routes
and forwards as route_target does, a refused target is refused every time, and the store stays bounded."""

from __future__ import annotations

import pytest

from labelgw.core.paths import route_target
from labelgw.http import dispatch as dispatch_module
from proxyharness import ProxyHarness, get, ok


@pytest.fixture(autouse=True)
def _empty() -> None:
    dispatch_module._TARGETS.clear()


def test_a_repeated_target_is_forwarded_as_route_target_says() -> None:
    h = ProxyHarness()
    client = h.connect()
    upstream = None
    for _ in range(3):
        client.send(get(b"solo.localhost", path=b"/a/./b//c?x=%2e"))
        upstream = upstream or h.upstream().accept()
        assert upstream.take().startswith(b"GET /a/b/c?x=%2e HTTP/1.1\r\n")
        upstream.send(ok())
    assert dispatch_module._TARGETS[b"/a/./b//c?x=%2e"] == route_target(b"/a/./b//c?x=%2e")
    assert [r.status for r in client.responses()] == [200, 200, 200]
    h.assert_accounting()


def test_a_refused_target_is_refused_each_time_and_not_kept() -> None:
    h = ProxyHarness()
    for _ in range(2):
        client = h.connect()
        client.send(get(b"solo.localhost", path=b"/a/..;x/b"))
        assert client.response().status == 400
    assert b"/a/..;x/b" not in dispatch_module._TARGETS
    h.assert_accounting()


def test_long_targets_are_not_kept_and_the_store_is_bounded() -> None:
    h = ProxyHarness()
    client = h.connect()
    long_path = b"/" + b"x" * dispatch_module._TARGET_KEPT
    client.send(get(b"solo.localhost", path=long_path))
    upstream = h.upstream().accept()
    upstream.send(ok())
    assert long_path not in dispatch_module._TARGETS
    for index in range(4100):
        dispatch_module._TARGETS[b"/%d" % index] = ("/%d" % index, b"/%d" % index)
    client.send(get(b"solo.localhost", path=b"/new"))
    upstream.send(ok())
    assert len(dispatch_module._TARGETS) <= 4096 and b"/new" in dispatch_module._TARGETS
    assert [r.status for r in client.responses()] == [200, 200]
    h.assert_accounting()
