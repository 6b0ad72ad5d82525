"""balancer=hash through the data path (dispatch reads the key, the exchange keeps it for a retry), on the
deterministic proxy harness: memory transports, a MemoryReactorClock, no sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.address import IPv4Address

from labelgw.core.balancer import service_policy_factory
from labelgw.core.model import ContainerSpec, HashKey
from labelgw.core.registry import Registry
from labelgw.http.server import Gateway, ProxyFactory
from labelgw.http.settings import ProxySettings
from proxyharness import ProxyHarness, ok

PORTS = (9101, 9102, 9103)


def hashed(key: HashKey | None = None, versions: tuple[str | None, ...] = (None, None, None)) -> ProxyHarness:
    h = ProxyHarness(specs=())
    h.registry = Registry(policy_factory=service_policy_factory("wrt", h.reactor.seconds))
    for index, (port, version) in enumerate(zip(PORTS, versions)):
        h.registry.apply(f"shop-{index}", ContainerSpec(
            container_id=f"shop-{index}", name=f"shop-{index}", service="shop", address="127.0.0.1", port=port,
            hosts=("shop.localhost",), balancer="hash", hash_key=key, version=version,
        ))
    h.gateway = Gateway(h.reactor, h.registry.table, ProxySettings())
    h.factory = ProxyFactory(h.gateway)
    return h


def request(user: bytes | None = None, extra: bytes = b"") -> bytes:
    field = b"X-User: %s\r\n" % user if user is not None else b""
    return b"GET /cart HTTP/1.1\r\nHost: shop.localhost\r\n%s%s\r\n" % (field, extra)


def served_port(h: ProxyHarness, data: bytes, peer: Any = None) -> int:
    client = h.connect(peer) if peer is not None else h.connect()
    client.send(data)
    upstream = h.upstream()
    upstream.accept()
    # Not kept alive: every request opens its own upstream connection, which names its backend.
    upstream.send(ok(extra=b"Connection: close\r\n"))
    assert client.response().status == 200
    client.close()
    h.settle()
    return upstream.port


def test_one_user_one_backend_and_users_spread_over_all() -> None:
    h = hashed(HashKey("header", "x-user"))
    homes = {}
    for number in range(60):
        user = b"user-%d" % number
        homes[user] = served_port(h, request(user))
    for user, port in list(homes.items())[:20]:
        assert served_port(h, request(user)) == port
    assert set(homes.values()) == set(PORTS)
    h.assert_accounting()


def test_the_client_address_is_the_default_key() -> None:
    h = hashed()
    assert h.registry.services["shop"].key_source == HashKey("ip")
    ports = Counter()
    for last in range(1, 40):
        peer = IPv4Address("TCP", f"10.0.0.{last}", 50000)
        first = served_port(h, request(), peer)
        assert served_port(h, request(), peer) == first
        ports[first] += 1
    assert set(ports) == set(PORTS)


def test_a_connect_failure_retries_on_the_next_backend_of_the_ring_for_that_key() -> None:
    h = hashed(HashKey("header", "x-user"))
    home = served_port(h, request(b"alice"))
    client = h.connect()
    client.send(request(b"alice"))
    first = h.upstream()
    assert first.port == home
    first.refuse()
    retry = h.upstream()
    assert retry.port != home
    retry.accept()
    retry.send(ok(extra=b"Connection: close\r\n"))
    assert client.response().status == 200
    # The next one on alice's ring, not a random backend: the same one that takes her keys when home is out.
    pool = h.registry.services["shop"]
    assert retry.port == pool.pick(exclude=h.backend(f"shop-{PORTS.index(home)}"), key=b"alice").port  # type: ignore[union-attr]


def test_requests_without_the_header_still_get_served() -> None:
    h = hashed(HashKey("header", "x-user"))
    ports = {served_port(h, request()) for _ in range(40)}
    assert len(ports) > 1


def test_within_versions_the_key_picks_among_the_versions_backends() -> None:
    h = hashed(HashKey("header", "x-user"), versions=("v1", "v1", "v2"))
    for number in range(20):
        user = b"user-%d" % number
        port = served_port(h, request(user, b"X-Labelgw-Version: v1\r\n"))
        assert port in PORTS[:2]
        assert served_port(h, request(user, b"X-Labelgw-Version: v1\r\n")) == port
        assert served_port(h, request(user, b"X-Labelgw-Version: v2\r\n")) == PORTS[2]
