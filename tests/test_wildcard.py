"""Wildcard hosts (`*.apps.localhost`): one label deep, exact names win; routes, registry clashes, explain, the
admin view, the SNI selector's minting and the HTTPS redirect on a wildcard route (issue 13)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from labelgw.core.backends import RoundRobin, ServicePool
from labelgw.core.model import ContainerSpec
from labelgw.core.registry import Registry
from labelgw.core.routes import Route, RouteTable, is_wildcard, wildcard_of
from labelgw.control.admin import state
from labelgw.control.explain import Explainer


def pool(name: str) -> ServicePool:
    return ServicePool(name, RoundRobin())


def put(table: RouteTable, host: str, *prefixes: str, service: str | None = None) -> None:
    table.replace_host(host, {p: Route(host, p, pool(service or host)) for p in prefixes or ("/",)})


def served(table: RouteTable, host: str, path: str = "/") -> str | None:
    route = table.lookup(host, path)
    return None if route is None else f"{route.host}{route.path_prefix}"


# ---------------------------------------------------------------------------------------------------------------
# The route table


def test_wildcard_matches_one_label_deep_only() -> None:
    table = RouteTable()
    put(table, "*.apps.localhost")
    assert served(table, "a.apps.localhost") == "*.apps.localhost/"
    assert served(table, "b.apps.localhost", "/x/y") == "*.apps.localhost/"
    assert served(table, "apps.localhost") is None
    assert served(table, "a.b.apps.localhost") is None
    assert served(table, "a.other.localhost") is None
    # The literal wildcard is never a request's host.
    assert served(table, "*.apps.localhost") is None
    assert table.knows_host("a.apps.localhost") and not table.knows_host("apps.localhost")
    assert not table.knows_host("*.apps.localhost") and table.knows_exact_host("*.apps.localhost")
    assert not table.knows_exact_host("a.apps.localhost")


def test_exact_host_wins_over_the_wildcard_whatever_the_paths() -> None:
    table = RouteTable()
    put(table, "*.apps.localhost", "/", "/api")
    put(table, "special.apps.localhost", "/only")
    assert served(table, "special.apps.localhost", "/only/x") == "special.apps.localhost/only"
    # The exact host has no route for /api: it does not fall back to the wildcard (exact wins, like a vhost).
    assert served(table, "special.apps.localhost", "/api") is None
    assert served(table, "other.apps.localhost", "/api/v1") == "*.apps.localhost/api"
    assert table.matched_host("special.apps.localhost") == "special.apps.localhost"
    assert table.matched_host("other.apps.localhost") == "*.apps.localhost"
    assert table.matched_host("apps.localhost") is None


def test_replacing_and_removing_a_wildcard() -> None:
    table = RouteTable()
    put(table, "*.apps.localhost")
    put(table, "apps.localhost")
    assert [r.host for r in table.all_routes()] == ["*.apps.localhost", "apps.localhost"]
    table.replace_host("*.apps.localhost", {})
    assert served(table, "a.apps.localhost") is None
    assert served(table, "apps.localhost") == "apps.localhost/"


@pytest.mark.parametrize(
    ("host", "wildcard"),
    [("a.b.c", "*.b.c"), ("a.b", "*.b"), ("a", None), ("", None), (".b", None), ("*.b.c", None), ("a.", None)],
)
def test_wildcard_of(host: str, wildcard: str | None) -> None:
    assert wildcard_of(host) == wildcard


_label = st.text(alphabet="abcx0-", min_size=1, max_size=4).filter(lambda s: s[0] != "-" and s[-1] != "-")
_name = st.lists(_label, min_size=1, max_size=4).map(".".join)


@given(
    exact=st.sets(_name, max_size=6),
    wildcard_parents=st.sets(_name.filter(lambda n: "." in n), max_size=4),
    request=_name,
)
def test_property_exact_wins_and_one_label_deep(exact: set[str], wildcard_parents: set[str], request: str) -> None:
    table = RouteTable()
    for host in exact:
        put(table, host)
    for parent in wildcard_parents:
        put(table, f"*.{parent}")
    route = table.lookup(request, "/")
    parent = request.partition(".")[2]
    if request in exact:
        expected: str | None = request
    elif "." in request and parent in wildcard_parents:
        expected = f"*.{parent}"
    else:
        expected = None
    assert (route.host if route is not None else None) == expected
    assert table.knows_host(request) == (expected is not None)
    assert table.matched_host(request) == expected
    # A wildcard never matches its own parent, nor anything two labels under it.
    for deeper in (f"x.{request}",):
        hit = table.lookup(deeper, "/")
        if hit is not None and is_wildcard(hit.host):
            assert hit.host == f"*.{request}"


# ---------------------------------------------------------------------------------------------------------------
# The registry: clashes


def spec(container_id: str, service: str, *hosts: str, **changes: Any) -> ContainerSpec:
    return ContainerSpec(container_id=container_id, name=f"{service}-{container_id}", service=service,
                         address="127.0.0.1", port=8000, hosts=hosts, **changes)


def registry_with(*specs: ContainerSpec) -> Registry:
    registry = Registry(policy_factory=lambda first: RoundRobin())
    for item in specs:
        registry.apply(item.container_id, item)
    return registry


def test_two_services_on_one_wildcard_clash_like_exact_hosts() -> None:
    registry = registry_with(spec("a1", "apps", "*.apps.localhost"), spec("b1", "other", "*.apps.localhost"))
    rejected = registry.rejections["b1"]
    assert (rejected.label, rejected.value) == ("host", "*.apps.localhost")
    assert "'apps'" in rejected.reason
    assert registry.table.lookup("x.apps.localhost", "/").service.name == "apps"  # type: ignore[union-attr]


def test_one_wildcard_different_paths_do_not_clash() -> None:
    registry = registry_with(spec("a1", "apps", "*.apps.localhost"),
                             spec("b1", "api", "*.apps.localhost", path_prefix="/api"))
    assert registry.rejections == {}
    assert registry.table.lookup("x.apps.localhost", "/api/1").service.name == "api"  # type: ignore[union-attr]
    assert registry.table.lookup("x.apps.localhost", "/").service.name == "apps"  # type: ignore[union-attr]


def test_exact_host_under_a_wildcard_is_not_a_clash() -> None:
    registry = registry_with(spec("a1", "apps", "*.apps.localhost"), spec("s1", "special", "special.apps.localhost"))
    assert registry.rejections == {}
    assert registry.table.lookup("special.apps.localhost", "/").service.name == "special"  # type: ignore[union-attr]
    assert registry.table.lookup("a.apps.localhost", "/").service.name == "apps"  # type: ignore[union-attr]
    registry.remove("s1")
    assert registry.table.lookup("special.apps.localhost", "/").service.name == "apps"  # type: ignore[union-attr]


def test_a_skipped_wildcard_container_is_named_for_names_under_it() -> None:
    registry = registry_with(spec("a1", "apps", "*.apps.localhost"), spec("b1", "other", "*.apps.localhost"))
    # The 404 of a name under a skipped container's wildcard names that container (labelgw.http.dispatch).
    assert registry.rejected_for("x.apps.localhost") == registry.rejections["b1"]
    assert registry.rejected_for("x.y.apps.localhost") is None
    assert registry.rejected_for("apps.localhost") is None


# ---------------------------------------------------------------------------------------------------------------
# Views: explain and the admin state


def test_explain_and_admin_say_which_rule_matched() -> None:
    registry = registry_with(spec("a1", "apps", "*.apps.localhost"), spec("s1", "special", "special.apps.localhost"))
    explainer = Explainer(registry.table)
    wild = explainer.explain("http://a.apps.localhost/x")
    assert wild["route"]["host"] == "*.apps.localhost" and wild["route"]["match"] == "wildcard"
    exact = explainer.explain("http://special.apps.localhost/x")
    assert exact["route"]["host"] == "special.apps.localhost" and exact["route"]["match"] == "exact"
    assert explainer.explain("http://apps.localhost/")["route"] is None
    routes = {r["host"]: r["wildcard"] for r in state(registry, 0.0)["routes"]}
    assert routes == {"*.apps.localhost": True, "special.apps.localhost": False}


# ---------------------------------------------------------------------------------------------------------------
# Certificates: the local CA mints per concrete name under a routed wildcard; --cert-dir wildcards serve one label


def _selector(tmp_path: Any, table: RouteTable, with_cert_dir: bool = False) -> Any:
    from test_tls_support import InlineThreads, real_time_clock

    from labelgw.tls.ca import LocalCA
    from labelgw.tls.certdir import CertDirectory
    from labelgw.tls.sni import SNIContextSelector

    clock, threads = real_time_clock(), InlineThreads()
    ca = LocalCA.load_or_create(tmp_path / "state")
    (tmp_path / "certs").mkdir(exist_ok=True)
    certs = CertDirectory(tmp_path / "certs", clock=clock, run_in_thread=threads) if with_cert_dir else None
    selector = SNIContextSelector(
        clock=clock, run_in_thread=threads, is_routed=table.knows_host, is_exact_routed=table.knows_exact_host,
        local_ca=ca, cert_dir=certs,
    )
    return selector, ca, certs


def test_a_name_under_a_routed_wildcard_gets_its_own_minted_leaf(tmp_path: Any) -> None:
    from test_tls_support import handshake

    table = RouteTable()
    # .test is not local by itself (no leaf without a route): only the wildcard route makes a.apps.test minted.
    put(table, "*.apps.test")
    put(table, "special.apps.test")
    selector, ca, _ = _selector(tmp_path, table)
    for name in ("a.apps.test", "b.apps.test", "special.apps.test"):
        result = handshake(selector, name, cadata=ca.cert_pem)
        assert result.ok, result.error
        # A leaf naming the concrete name, never a wildcard leaf.
        assert result.names == {name}
    # Not under the wildcard one label deep: the default certificate, which a browser refuses for that name.
    for name in ("apps.test", "x.a.apps.test"):
        assert handshake(selector, name).names == {"localhost", "127.0.0.1", "::1"}
        assert not handshake(selector, name, cadata=ca.cert_pem).ok
    # Only the exactly routed name is written to disk: random names under the wildcard stay in memory (LRU).
    leaves = sorted(p.name for p in ca.leaf_dir.iterdir()) if ca.leaf_dir.exists() else []
    assert "special.apps.test.pem" in leaves
    assert not any(name.startswith(("a.apps", "b.apps")) for name in leaves)


def test_a_wildcard_route_under_a_public_zone_is_not_minted(tmp_path: Any) -> None:
    from test_tls_support import handshake

    table = RouteTable()
    put(table, "*.apps.example.com")
    selector, _, _ = _selector(tmp_path, table)
    # The CA's name constraints still apply: a public name gets the default certificate.
    assert handshake(selector, "a.apps.example.com").names == {"localhost", "127.0.0.1", "::1"}


def test_a_cert_dir_wildcard_serves_names_under_a_wildcard_route(tmp_path: Any) -> None:
    from test_tls_sni import ISSUER
    from test_tls_support import cert_pem, handshake, key_pem

    table = RouteTable()
    put(table, "*.apps.test")
    selector, ca, certs = _selector(tmp_path, table, with_cert_dir=True)
    cert, key = ISSUER.issue(["*.apps.test"])
    (tmp_path / "certs" / "wild.pem").write_bytes(cert_pem(cert) + key_pem(key))
    certs.scan_now()
    assert handshake(selector, "a.apps.test").names == {"*.apps.test"}
    # One label only: deeper names are neither covered by the user's wildcard nor routed.
    assert handshake(selector, "x.a.apps.test").names == {"localhost", "127.0.0.1", "::1"}


# ---------------------------------------------------------------------------------------------------------------
# The HTTPS redirect on a wildcard route


def test_https_redirect_label_on_a_wildcard_route() -> None:
    from labelgw.tls.https import HttpsRedirect

    table = RouteTable()
    table.replace_host("*.apps.localhost", {"/": Route("*.apps.localhost", "/", pool("apps"), tls="redirect")})
    redirect = HttpsRedirect(everything=False, listener_port=lambda: 8443)
    route = table.lookup("a.apps.localhost", "/x")
    assert redirect.location("a.apps.localhost", b"/x?y=1", route) == b"https://a.apps.localhost:8443/x?y=1"


# ---------------------------------------------------------------------------------------------------------------
# ACME: concrete names under a public wildcard route get their own certificate on demand, bounded per wildcard


class _AcmeWorld:
    def __init__(self, max_on_demand: int = 3, own: frozenset[str] = frozenset(), stored: Any = None) -> None:
        from test_acme import START, FakeIssuer
        from twisted.internet.task import Clock

        from labelgw.tls.acme import HTTP_01, AcmeManager
        from labelgw.tls.acme_openssl import AcmeContexts
        from labelgw.tls.policy import INTERMEDIATE

        self.clock = Clock()
        self.clock.advance(START.timestamp())
        self.issuer = FakeIssuer(stored)
        self.table = RouteTable()
        self.events: list[dict[str, Any]] = []

        def wildcard_for(name: str) -> str | None:
            matched = self.table.matched_host(name)
            return matched if matched is not None and is_wildcard(matched) else None

        self.manager = AcmeManager(
            clock=self.clock, issuer=self.issuer, challenge_types=(HTTP_01,),
            hosts=lambda: [(r.host, r.tls) for r in self.table.all_routes()],
            has_own_certificate=lambda name: name in own, wildcard_for=wildcard_for, max_on_demand=max_on_demand,
        )
        from twisted.logger import Logger

        self.manager._log = Logger(observer=self.events.append)  # type: ignore[misc]
        self.contexts = AcmeContexts(self.manager, INTERMEDIATE, on_miss=self.manager.on_demand)
        self.manager.startService()
        self.clock.advance(0)

    def hello(self, name: str) -> None:
        """What a handshake for `name` does to ACME (the SNI selector asks the contexts)."""
        self.contexts.served_for(name, lambda: None)

    def ordered(self) -> list[str]:
        return [name for name, _, _ in self.issuer.orders]

    def settle(self) -> None:
        # Each order is answered (fails, to keep going); scans run every 2 s.
        for _ in range(20):
            self.clock.advance(2.0)
            for _, _, d in self.issuer.orders:
                if not d.called:
                    from labelgw.tls.acme import AcmeFailure

                    d.errback(AcmeFailure("test: no server"))


def test_acme_orders_a_name_under_a_public_wildcard_when_a_handshake_asks() -> None:
    world = _AcmeWorld()
    put(world.table, "*.apps.example.com")
    put(world.table, "special.apps.example.com")
    world.clock.advance(2.0)
    # The wildcard itself is never ordered (it needs DNS-01); the exact route is, at once.
    assert world.ordered() == ["special.apps.example.com"]
    world.hello("a.apps.example.com")
    world.hello("a.apps.example.com")
    # Not one label under a routed wildcard, or not public: nothing.
    for name in ("x.a.apps.example.com", "apps.example.com", "a.other.example.com", "a.apps.localhost"):
        world.hello(name)
    world.settle()
    assert sorted(set(world.ordered())) == ["a.apps.example.com", "special.apps.example.com"]


def test_acme_on_demand_names_are_bounded_per_wildcard() -> None:
    world = _AcmeWorld(max_on_demand=3)
    put(world.table, "*.apps.example.com")
    put(world.table, "*.web.example.com")
    for index in range(50):
        world.hello(f"n{index}.apps.example.com")
    world.hello("w.web.example.com")
    world.settle()
    assert sorted(set(world.ordered())) == [
        "n0.apps.example.com", "n1.apps.example.com", "n2.apps.example.com", "w.web.example.com"]
    warnings = [e for e in world.events if "acme_on_demand_max" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["wildcard"] == "*.apps.example.com"


def test_acme_on_demand_respects_tls_local_cert_dir_and_a_removed_wildcard() -> None:
    world = _AcmeWorld(own=frozenset({"own.apps.example.com"}))
    world.table.replace_host("*.local.example.com",
                             {"/": Route("*.local.example.com", "/", pool("l"), tls="local")})
    put(world.table, "*.apps.example.com")
    world.hello("a.local.example.com")
    world.hello("own.apps.example.com")
    world.settle()
    assert world.ordered() == []
    # A removed wildcard forgets its names: they are not ordered later.
    world.table.replace_host("*.apps.example.com", {})
    world.hello("b.apps.example.com")
    world.settle()
    assert world.ordered() == []


# ---------------------------------------------------------------------------------------------------------------
# Static services of the config file, options, and hash balancing through the data path on a wildcard route


def test_static_service_with_a_wildcard_host(tmp_path: Any) -> None:
    from test_config import parse, refused, write

    settings = parse("--config", write(tmp_path, """
        services:
          apps:
            hosts: ["*.Apps.localhost", special.apps.localhost]
            backends: ["127.0.0.1:9000"]
        """))
    assert settings.static_services[0].hosts == ("*.apps.localhost", "special.apps.localhost")
    message = refused("--config", write(tmp_path, """
        services:
          apps:
            hosts: ["*.localhost"]
            backends: ["127.0.0.1:9000"]
        """, "too-broad.yaml"))
    assert "services.apps.hosts" in message and "too broad" in message


def test_acme_on_demand_max_option() -> None:
    from test_config import parse, refused

    assert parse("--acme-email", "ops@example.com").acme.on_demand_max == 100  # type: ignore[union-attr]
    settings = parse("--acme-email", "ops@example.com", "--acme-on-demand-max", "5")
    assert settings.acme.on_demand_max == 5  # type: ignore[union-attr]
    assert "--acme-on-demand-max" in refused("--acme-email", "ops@example.com", "--acme-on-demand-max", "lots")
    assert "needs --acme-email" in refused("--acme-on-demand-max", "5")


def test_hash_balancing_on_a_wildcard_route_keeps_a_user_on_one_backend() -> None:
    from proxyharness import ProxyHarness, ok

    from labelgw.core.balancer import service_policy_factory
    from labelgw.core.model import HashKey
    from labelgw.http.server import Gateway, ProxyFactory
    from labelgw.http.settings import ProxySettings

    h = ProxyHarness(specs=())
    h.registry = Registry(policy_factory=service_policy_factory("wrt", h.reactor.seconds))
    for index, port in enumerate((9101, 9102, 9103)):
        h.registry.apply(f"shop-{index}", ContainerSpec(
            container_id=f"shop-{index}", name=f"shop-{index}", service="shop", address="127.0.0.1", port=port,
            hosts=("*.shop.localhost",), balancer="hash", hash_key=HashKey("header", "x-user"),
        ))
    h.gateway = Gateway(h.reactor, h.registry.table, ProxySettings())
    h.factory = ProxyFactory(h.gateway)

    def served_port(host: bytes, user: bytes) -> int:
        client = h.connect()
        client.send(b"GET /cart HTTP/1.1\r\nHost: %s\r\nX-User: %s\r\n\r\n" % (host, user))
        upstream = h.upstream()
        upstream.accept()
        upstream.send(ok(extra=b"Connection: close\r\n"))
        assert client.response().status == 200
        client.close()
        h.settle()
        return upstream.port

    homes = {b"u%d" % n: served_port(b"a.shop.localhost", b"u%d" % n) for n in range(30)}
    assert set(homes.values()) == {9101, 9102, 9103}
    # The same user on another name under the wildcard: the same backend (one service, one hash ring).
    for user, port in list(homes.items())[:10]:
        assert served_port(b"b.shop.localhost", user) == port


def test_registered_instance_with_a_wildcard_host_but_never_a_wildcard_address() -> None:
    import json

    from labelgw.registration.model import RegistrationError, parse_registration

    document = {"address": "127.0.0.1", "port": 9000, "hosts": ["*.Apps.example.com"]}
    assert parse_registration("web", "i1", document).spec.hosts == ("*.apps.example.com",)
    for hosts in (["*.com"], ["a.*.example.com"]):
        with pytest.raises(RegistrationError) as raised:
            parse_registration("web", "i1", json.loads(json.dumps({**document, "hosts": hosts})))
        assert raised.value.field == "hosts"
    with pytest.raises(RegistrationError) as bad_address:
        parse_registration("web", "i1", {**document, "address": "*.apps.example.com"})
    assert bad_address.value.field == "address" and "wildcard" in bad_address.value.message


def test_explain_command_prints_the_wildcard_rule() -> None:
    import io

    from labelgw.cli.explain_command import render

    registry = registry_with(spec("a1", "apps", "*.apps.localhost"))
    out = io.StringIO()
    render(Explainer(registry.table).explain("http://a.apps.localhost/x"), out)
    assert "*.apps.localhost/ (wildcard host) -> service apps" in out.getvalue()


def test_acme_a_stored_certificate_under_a_wildcard_is_managed_again_after_a_restart() -> None:
    from datetime import timedelta

    from test_acme import START, make_certificate

    stored = make_certificate("a.apps.example.com", START, timedelta(days=90))
    world = _AcmeWorld(stored=[stored])
    put(world.table, "*.apps.example.com")
    world.clock.advance(2.0)
    # Served from the state directory, and managed (renewal scheduled) without any handshake asking.
    assert world.manager.certificate_for("a.apps.example.com") is stored
    view = world.manager.describe()["names"]["a.apps.example.com"]
    assert view["status"] == "valid" and view["renew_at"] is not None
    assert world.ordered() == []
