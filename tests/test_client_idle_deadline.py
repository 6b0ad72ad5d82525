"""An idle timeout shorter than the head timeout is kept after a proxied answer (HTTP/1.1).

The connection's one lazy timer is armed for the head deadline at its start; the idle deadline after the answer
comes earlier and must pull it in (bench/attack.py case 5: idle_timeout 3 s, head_timeout 10 s held 250 kept-alive
TLS clients 10 s). Deterministic: tests/proxyharness.py on a MemoryReactorClock.
"""

from __future__ import annotations

from labelgw.http.settings import ProxySettings
from proxyharness import ProxyHarness, get, ok

SOLO = b"solo.localhost"


def test_a_kept_alive_connection_closes_at_an_idle_timeout_shorter_than_the_head_timeout() -> None:
    h = ProxyHarness(ProxySettings(head_timeout=10.0, idle_timeout=3.0))
    client = h.connect()
    h.advance(1.0)
    client.send(get(SOLO))
    h.upstream().accept().send(ok())
    assert client.response().status == 200
    h.advance(3.0 - 0.01)
    assert not client.closing
    h.advance(0.01)
    assert client.closing
    h.assert_accounting()
