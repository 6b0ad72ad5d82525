"""The registry (labelgw.core.registry): container specs in, services, backends and routes out, incrementally."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterator

import pytest

from labelgw.core.backends import Backend, RoundRobin, ServicePool
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.registry import STATIC_PREFIX, Registry
from labelgw.core.routes import Route
from support.specs import typed_options


def spec(
    container_id: str, service: str = "api", address: str = "127.0.0.1", port: int = 8000, hosts: tuple[str, ...] | None = None,
    **changes: Any,
) -> ContainerSpec:
    return ContainerSpec(
        container_id=container_id,
        name=f"{service}-{container_id}",
        service=service,
        address=address,
        port=port,
        hosts=hosts if hosts is not None else (f"{service}.localhost",),
        **changes,
    )


def rejection(container_id: str, reason: str = "bad port") -> Rejection:
    return Rejection(container_id, f"c-{container_id}", "labelgw.port", "x", reason)


class Recorder:
    """A registry with its retired-backend callback and its RouteTable.replace_host calls recorded."""

    def __init__(self) -> None:
        self.retired: list[Backend] = []
        self.policies: list[str] = []
        self.registry = Registry(policy_factory=self._policy, on_backend_retired=self.retired.append)
        self.replaced: list[str] = []
        table = self.registry.table
        original = table.replace_host

        def spy(host: str, routes: Any) -> None:
            self.replaced.append(host)
            original(host, routes)

        table.replace_host = spy  # type: ignore[method-assign]

    def _policy(self, first: ContainerSpec) -> RoundRobin:
        self.policies.append(first.service)
        return RoundRobin()

    def apply(self, *specs: ContainerSpec) -> None:
        for item in specs:
            self.registry.apply(item.container_id, item)

    def route(self, host: str, path: str = "/") -> Route | None:
        return self.registry.table.lookup(host, path)

    def pool(self, service: str) -> ServicePool:
        return self.registry.services[service]

    def backend(self, service: str, container_id: str) -> Backend:
        return self.pool(service).backends[container_id]

    def ready_ids(self, service: str) -> list[str]:
        return [backend.key for backend in self.pool(service).ready]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


# ---------------------------------------------------------------------------------------------------------------
# Services, backends and routes


def test_two_replicas_one_route(rec: Recorder) -> None:
    rec.apply(spec("c1", port=8001), spec("c2", port=8002))
    route = rec.route("api.localhost")
    assert route is not None
    assert route.service is rec.pool("api")
    assert [(b.address, b.port) for b in rec.pool("api").backends.values()] == [("127.0.0.1", 8001), ("127.0.0.1", 8002)]
    assert rec.ready_ids("api") == ["c1", "c2"]
    assert rec.registry.ready_count("api") == 2
    assert len(rec.registry.table.all_routes()) == 1
    assert rec.replaced == ["api.localhost"]
    assert rec.policies == ["api"]


def test_route_settings_come_from_the_spec(rec: Recorder) -> None:
    rec.apply(spec("c1", hosts=("a.localhost", "b.localhost"), path_prefix="/api", strip_prefix=True, scheme="https"))
    for host in ("a.localhost", "b.localhost"):
        route = rec.route(host, "/api/x")
        assert route is not None
        assert (route.host, route.path_prefix, route.strip_prefix, route.scheme) == (host, "/api", True, "https")
    assert rec.route("a.localhost", "/other") is None


def test_versions_are_kept_on_backends(rec: Recorder) -> None:
    rec.apply(spec("c1", version="v1"), spec("c2", version="v2", port=8002))
    assert rec.backend("api", "c1").version == "v1"
    assert rec.backend("api", "c2").version == "v2"
    before = rec.backend("api", "c1")
    rec.apply(spec("c1", version="v3"))
    assert rec.backend("api", "c1") is before
    assert before.version == "v3"
    assert before.spec.version == "v3"
    assert rec.retired == []


@pytest.mark.parametrize(
    "changes", [{"health": "starting"}, {"health": "unhealthy"}, {"paused": True}, {"running": False}]
)
def test_not_ready_container_keeps_the_route(rec: Recorder, changes: dict[str, Any]) -> None:
    rec.apply(spec("c1", **changes))
    # The route exists so the proxy can answer 503 instead of 404.
    route = rec.route("api.localhost")
    assert route is not None
    assert route.service.ready == ()
    assert route.service.pick() is None
    assert rec.registry.ready_count("api") == 0
    assert "c1" in rec.pool("api").backends


def test_container_becomes_ready_in_place(rec: Recorder) -> None:
    rec.apply(spec("c1", health="starting"))
    backend = rec.backend("api", "c1")
    rec.apply(spec("c1", health="healthy"))
    assert rec.backend("api", "c1") is backend
    assert rec.ready_ids("api") == ["c1"]
    assert rec.replaced == ["api.localhost"]


def test_becoming_unready_retires_the_backend(rec: Recorder) -> None:
    rec.apply(spec("c1", health="healthy"), spec("c2", port=8002))
    backend = rec.backend("api", "c1")
    rec.apply(spec("c1", health="unhealthy"))
    assert rec.ready_ids("api") == ["c2"]
    assert rec.retired == [backend]


def test_mark_down(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    backend = rec.backend("api", "c1")
    rec.registry.mark_down("c1")
    # Out of rotation at once, before Docker's inspect confirms anything; the route stays.
    assert rec.ready_ids("api") == ["c2"]
    assert rec.backend("api", "c1") is backend and backend.ready is False
    assert rec.retired == [backend]
    assert rec.route("api.localhost") is not None
    # Twice, or for an unknown container: nothing more happens.
    rec.registry.mark_down("c1")
    rec.registry.mark_down("unknown")
    assert rec.retired == [backend]
    # The container comes back with the same address: the same backend returns to rotation.
    rec.apply(spec("c1"))
    assert rec.backend("api", "c1") is backend
    assert rec.ready_ids("api") == ["c1", "c2"]


def test_mark_down_of_last_replica_keeps_route_for_503(rec: Recorder) -> None:
    rec.apply(spec("c1"))
    rec.registry.mark_down("c1")
    assert rec.route("api.localhost") is not None
    assert rec.registry.ready_count("api") == 0


def test_mark_down_of_unready_container_does_nothing(rec: Recorder) -> None:
    rec.apply(spec("c1", health="starting"))
    rec.registry.mark_down("c1")
    assert rec.retired == []
    assert rec.registry.containers["c1"].running is True


def test_remove(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    first, second = rec.backend("api", "c1"), rec.backend("api", "c2")
    rec.registry.remove("c1")
    assert rec.route("api.localhost") is not None
    assert rec.ready_ids("api") == ["c2"]
    assert rec.retired == [first]
    rec.registry.apply("c2", None)
    assert rec.route("api.localhost") is None
    assert not rec.registry.table.knows_host("api.localhost")
    assert "api" not in rec.registry.services
    assert rec.registry.ready_count("api") == 0
    assert rec.registry.containers == {}
    assert rec.retired == [first, second]
    rec.registry.remove("c2")
    rec.registry.remove("never-seen")
    assert rec.retired == [first, second]


def test_remove_keeps_other_routes_of_the_host(rec: Recorder) -> None:
    rec.apply(spec("c1", service="web", hosts=("site.localhost",)), spec("c2", hosts=("site.localhost",), path_prefix="/api"))
    rec.registry.remove("c2")
    assert rec.route("site.localhost", "/api/x").service.name == "web"  # type: ignore[union-attr]
    assert [(r.host, r.path_prefix) for r in rec.registry.table.all_routes()] == [("site.localhost", "/")]


def test_same_host_different_paths_for_different_services(rec: Recorder) -> None:
    rec.apply(spec("c1", service="web", hosts=("site.localhost",)), spec("c2", hosts=("site.localhost",), path_prefix="/api"))
    assert rec.route("site.localhost", "/").service.name == "web"  # type: ignore[union-attr]
    assert rec.route("site.localhost", "/api/v1").service.name == "api"  # type: ignore[union-attr]
    assert rec.registry.rejections == {}


# ---------------------------------------------------------------------------------------------------------------
# Conflicts and rejections


@pytest.mark.parametrize(("path", "label", "value"), [("/", "host", "shared.localhost"), ("/api", "path", "/api")])
def test_conflict_rejects_the_second_service(rec: Recorder, path: str, label: str, value: str) -> None:
    rec.apply(spec("a1", service="api", hosts=("shared.localhost",), path_prefix=path))
    rec.apply(spec("w1", service="web", hosts=("shared.localhost",), path_prefix=path))
    rejected = rec.registry.rejections["w1"]
    assert rejected.container_id == "w1"
    assert (rejected.label, rejected.value) == (label, value)
    assert "shared.localhost" in rejected.reason and "'api'" in rejected.reason
    assert "shared.localhost" in rejected.describe()
    # The first keeps serving; the second has neither backend nor service.
    assert rec.route("shared.localhost", path).service.name == "api"  # type: ignore[union-attr]
    assert "web" not in rec.registry.services
    assert "w1" not in rec.registry.containers


def test_conflict_on_one_host_rejects_the_whole_container(rec: Recorder) -> None:
    rec.apply(spec("a1", service="api", hosts=("shared.localhost",)))
    rec.apply(spec("w1", service="web", hosts=("web.localhost", "shared.localhost")))
    assert "w1" in rec.registry.rejections
    assert rec.route("web.localhost") is None


def test_rejected_container_is_admitted_once_the_conflict_is_gone(rec: Recorder) -> None:
    api, web = spec("a1", service="api", hosts=("shared.localhost",)), spec("w1", service="web", hosts=("shared.localhost",))
    rec.apply(api, web)
    rec.registry.remove("a1")
    assert rec.route("shared.localhost") is None
    rec.registry.resync({"w1": web})
    assert rec.route("shared.localhost").service.name == "web"  # type: ignore[union-attr]
    assert rec.registry.rejections == {}


def test_conflicting_update_of_a_member(rec: Recorder) -> None:
    # A container that moves to another service whose host is taken loses its routes; the other service stays.
    rec.apply(spec("a1", service="api", hosts=("shared.localhost",)), spec("w1", service="web"))
    rec.apply(spec("w1", service="web", hosts=("shared.localhost",)))
    assert "w1" in rec.registry.rejections
    assert rec.route("web.localhost") is None
    assert rec.route("shared.localhost").service.name == "api"  # type: ignore[union-attr]


def test_rejection_replaces_an_earlier_spec(rec: Recorder) -> None:
    rec.apply(spec("c1"))
    backend = rec.backend("api", "c1")
    rec.registry.apply("c1", rejection("c1"))
    assert "c1" not in rec.registry.containers
    assert rec.registry.rejections["c1"] == rejection("c1")
    assert rec.route("api.localhost") is None
    assert rec.retired == [backend]
    # A later valid spec clears the rejection.
    rec.apply(spec("c1"))
    assert rec.registry.rejections == {}
    assert rec.ready_ids("api") == ["c1"]


def test_rejection_of_one_replica_keeps_the_others(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    rec.registry.apply("c1", rejection("c1"))
    assert rec.ready_ids("api") == ["c2"]
    assert rec.route("api.localhost") is not None


def test_new_rejection_replaces_the_old_one(rec: Recorder) -> None:
    rec.registry.apply("c1", rejection("c1", "first"))
    rec.registry.apply("c1", rejection("c1", "second"))
    assert rec.registry.rejections["c1"].reason == "second"
    rec.registry.apply("c1", None)
    assert rec.registry.rejections == {}


# ---------------------------------------------------------------------------------------------------------------
# Resync


def test_resync_removes_absent_containers_but_not_static_ones(rec: Recorder) -> None:
    static = spec(f"{STATIC_PREFIX}files:0", service="files")
    rec.apply(static, spec("c1"), spec("c2", port=8002), spec("gone", service="old"))
    rec.registry.apply("bad", rejection("bad"))
    rec.registry.resync({"c1": spec("c1"), "c2": spec("c2", port=8002, health="starting"), "new": spec("new", service="web")})
    assert set(rec.registry.containers) == {static.container_id, "c1", "c2", "new"}
    assert rec.registry.rejections == {}
    assert rec.route("old.localhost") is None
    assert rec.route("files.localhost") is not None
    assert rec.route("web.localhost") is not None
    assert rec.ready_ids("api") == ["c1"]


def test_resync_applies_every_kind_of_outcome(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    rec.registry.resync({"c1": None, "c2": rejection("c2"), "c3": spec("c3", port=8003)})
    assert set(rec.registry.containers) == {"c3"}
    assert set(rec.registry.rejections) == {"c2"}


def test_resync_with_nothing_new_changes_nothing(rec: Recorder) -> None:
    specs = [spec("c1"), spec("c2", port=8002), spec("w1", service="web")]
    rec.apply(*specs)
    def snapshot() -> dict[str, tuple[ServicePool, list[Backend]]]:
        return {name: (pool, list(pool.backends.values())) for name, pool in rec.registry.services.items()}

    before, replaced = snapshot(), list(rec.replaced)
    rec.registry.resync({s.container_id: dataclasses.replace(s) for s in specs})
    after = snapshot()
    # The same pool and Backend objects (compared by identity), no table update, nothing retired.
    assert after.keys() == before.keys()
    assert all(after[n][0] is before[n][0] and list(map(id, after[n][1])) == list(map(id, before[n][1])) for n in before)
    assert rec.replaced == replaced
    assert rec.retired == []


# ---------------------------------------------------------------------------------------------------------------
# Idempotency, address changes and the retired callback


def test_applying_the_same_spec_twice_changes_nothing(rec: Recorder) -> None:
    original = spec("c1", version="v1")
    rec.apply(original)
    pool = rec.pool("api")
    backend = rec.backend("api", "c1")
    backend.stats = {"ewma": 0.012}
    backend.in_flight = 3
    backend.idle.append("connection")
    rec.apply(original)
    rec.apply(dataclasses.replace(original))  # equal, not identical
    assert rec.pool("api") is pool
    assert rec.backend("api", "c1") is backend
    assert (backend.stats, backend.in_flight, backend.idle) == ({"ewma": 0.012}, 3, ["connection"])
    assert rec.replaced == ["api.localhost"]
    assert rec.retired == []
    assert rec.policies == ["api"]


def test_change_that_keeps_the_address_keeps_the_backend(rec: Recorder) -> None:
    rec.apply(spec("c1", started_at="2024-01-01T00:00:00Z"))
    backend = rec.backend("api", "c1")
    backend.stats = "kept"
    rec.apply(spec("c1", started_at="2024-01-02T00:00:00Z", **typed_options({"weight": "5"})))
    assert rec.backend("api", "c1") is backend
    assert backend.stats == "kept"
    assert backend.spec.option("weight") == "5"
    assert backend.spec.weight == backend.weight == 5.0


@pytest.mark.parametrize("changes", [{"address": "127.0.0.2"}, {"port": 9000}, {"address": "127.0.0.2", "health": "starting"}])
def test_address_change_makes_a_new_backend(rec: Recorder, changes: dict[str, Any]) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    pool = rec.pool("api")
    old = rec.backend("api", "c1")
    old.stats = "old estimate"
    rec.apply(spec("c1", **changes))
    new = rec.backend("api", "c1")
    assert new is not old
    assert (new.address, new.port) == (changes.get("address", "127.0.0.1"), changes.get("port", 8000))
    assert new.stats is None
    assert rec.retired == [old]
    # Same service pool and route; the pool's ready tuple never holds the retired backend.
    assert rec.pool("api") is pool
    assert old not in pool.ready
    assert (new in pool.ready) is new.ready
    assert rec.replaced == ["api.localhost"]


def test_routing_change_moves_the_container(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    old = rec.backend("api", "c1")
    rec.apply(spec("c1", service="web", hosts=("web.localhost",)))
    assert rec.retired == [old]
    assert rec.ready_ids("api") == ["c2"]
    assert rec.ready_ids("web") == ["c1"]
    assert rec.route("web.localhost").service.name == "web"  # type: ignore[union-attr]
    assert rec.route("api.localhost").service.name == "api"  # type: ignore[union-attr]


def test_host_change_of_the_only_member_moves_the_route(rec: Recorder) -> None:
    rec.apply(spec("c1", hosts=("one.localhost",)))
    rec.apply(spec("c1", hosts=("two.localhost",)))
    assert rec.route("one.localhost") is None
    assert rec.route("two.localhost") is not None
    assert rec.replaced == ["one.localhost", "one.localhost", "two.localhost"]


# ---------------------------------------------------------------------------------------------------------------
# Scale: a change touches only its own container's hosts


SERVICES = 500
REPLICAS = 10


def fleet() -> Iterator[ContainerSpec]:
    for s in range(SERVICES):
        for r in range(REPLICAS):
            yield spec(
                f"c{s}-{r}", service=f"svc{s}", address=f"127.0.{s // 250}.{s % 250 + 1}", port=10000 + r,
                hosts=(f"svc{s}.localhost", f"svc{s}.example"), version=f"v{r % 2}",
            )


@pytest.fixture(scope="module")
def loaded_specs() -> list[ContainerSpec]:
    return list(fleet())


@pytest.fixture
def loaded(loaded_specs: list[ContainerSpec]) -> Recorder:
    rec = Recorder()
    rec.registry.resync({s.container_id: s for s in loaded_specs})
    assert len(rec.registry.containers) == SERVICES * REPLICAS
    # Building the table from scratch replaces each host exactly once.
    assert Counter(rec.replaced) == {host: 1 for s in range(SERVICES) for host in (f"svc{s}.localhost", f"svc{s}.example")}
    rec.replaced.clear()
    return rec


def test_scale_readiness_or_address_change_touches_no_host(loaded: Recorder) -> None:
    loaded.apply(spec("c42-3", service="svc42", address="127.0.0.43", port=10003, hosts=("svc42.localhost", "svc42.example"), version="v1", health="unhealthy"))
    loaded.apply(spec("c42-4", service="svc42", address="127.0.0.99", port=10004, hosts=("svc42.localhost", "svc42.example"), version="v0"))
    loaded.registry.mark_down("c7-0")
    assert loaded.replaced == []
    assert loaded.registry.ready_count("svc42") == REPLICAS - 1


def test_scale_host_change_touches_only_its_own_hosts(loaded: Recorder) -> None:
    old = loaded.registry.containers["c42-3"]
    loaded.apply(dataclasses.replace(old, hosts=(*old.hosts, "extra.localhost")))
    assert set(loaded.replaced) <= {*old.hosts, "extra.localhost"}
    assert loaded.replaced == ["extra.localhost"]


def test_scale_removing_a_service_touches_only_its_hosts(loaded: Recorder, loaded_specs: list[ContainerSpec]) -> None:
    for r in range(REPLICAS):
        loaded.registry.remove(f"c7-{r}")
    assert sorted(loaded.replaced) == ["svc7.example", "svc7.localhost"]
    loaded.replaced.clear()
    # A resync that finds everything else unchanged touches nothing.
    loaded.registry.resync({s.container_id: s for s in loaded_specs if s.service != "svc7"})
    assert loaded.replaced == []
    assert len(loaded.registry.services) == SERVICES - 1


def test_scale_resync_after_a_missed_removal(loaded: Recorder, loaded_specs: list[ContainerSpec]) -> None:
    loaded.registry.resync({s.container_id: s for s in loaded_specs if s.container_id != "c300-0"})
    assert loaded.replaced == []
    assert "c300-0" not in loaded.registry.containers
    assert loaded.registry.ready_count("svc300") == REPLICAS - 1


# ---------------------------------------------------------------------------------------------------------------
# Balancing: policy per service, weights, listeners, readiness from health checks and ejection


class ListenerLog:
    """A BackendListener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def service_added(self, pool: ServicePool) -> None:
        self.events.append(("service", pool.name))

    def backend_added(self, pool: ServicePool, backend: Backend) -> None:
        self.events.append(("added", f"{backend.key}:{backend.port}"))

    def backend_updated(self, pool: ServicePool, backend: Backend) -> None:
        self.events.append(("updated", f"{backend.key}:{backend.port}"))

    def backend_removed(self, pool: ServicePool, backend: Backend) -> None:
        self.events.append(("removed", f"{backend.key}:{backend.port}"))


class ReadyLog(RoundRobin):
    def __init__(self) -> None:
        super().__init__()
        self.readied: list[str] = []

    def on_ready(self, backend: Backend) -> None:
        self.readied.append(backend.key)


def with_options(container_id: str, port: int = 8000, service: str = "api", **options: str) -> ContainerSpec:
    return spec(container_id, service=service, port=port, **typed_options(options))


def test_listeners_hear_about_services_and_backends() -> None:
    log = ListenerLog()
    registry = Registry(listeners=[log])
    registry.apply("c1", spec("c1"))
    registry.apply("c2", spec("c2", port=8002))
    registry.apply("c1", spec("c1", running=False))
    registry.apply("c2", spec("c2", port=9002))  # new address: a new backend
    registry.remove("c1")
    assert log.events == [
        ("service", "api"), ("added", "c1:8000"), ("added", "c2:8002"), ("updated", "c1:8000"),
        ("removed", "c2:8002"), ("added", "c2:9002"), ("removed", "c1:8000"),
    ]


def test_weight_comes_from_the_label_and_follows_updates(rec: Recorder) -> None:
    rec.apply(with_options("c1", weight="2.5"), spec("c2", port=8002))
    assert rec.backend("api", "c1").weight == 2.5
    assert rec.backend("api", "c2").weight == 1.0
    rec.apply(with_options("c1", weight="4"))
    assert rec.backend("api", "c1").weight == 4.0


def test_a_service_gets_the_policy_its_first_container_names() -> None:
    from labelgw.core.balancer import LeastConn, WeightedResponseTime, service_policy_factory
    from twisted.internet.task import Clock

    clock = Clock()
    registry = Registry(policy_factory=service_policy_factory("wrt", clock.seconds, tau=3.0))
    registry.apply("a", with_options("a", service="plain"))
    registry.apply("b", with_options("b", service="lc", balancer="least_conn"))
    registry.apply("c", with_options("c", service="rr", balancer="round_robin"))
    # A later replica that disagrees is logged and ignored: one policy per service.
    registry.apply("d", with_options("d", port=8001, service="lc", balancer="wrt"))
    policies = {name: pool.policy for name, pool in registry.services.items()}
    assert isinstance(policies["plain"], WeightedResponseTime) and policies["plain"].tau == 3.0
    assert isinstance(policies["lc"], LeastConn)
    assert isinstance(policies["rr"], RoundRobin)
    # --balancer sets the default.
    other = Registry(policy_factory=service_policy_factory("least_conn", clock.seconds))
    other.apply("a", with_options("a"))
    assert isinstance(other.services["api"].policy, LeastConn)
    with pytest.raises(ValueError):
        service_policy_factory("fastest", clock.seconds)


def test_on_ready_when_a_backend_reenters_rotation() -> None:
    policy = ReadyLog()
    registry = Registry(policy_factory=lambda first: policy)
    registry.apply("c1", spec("c1"))
    assert policy.readied == []  # new and ready at once: nothing to forget
    registry.apply("c1", spec("c1", health="unhealthy"))
    registry.apply("c1", spec("c1", health="healthy"))
    assert policy.readied == ["c1"]


def test_readiness_is_container_and_health_check_and_not_ejected(rec: Recorder) -> None:
    rec.apply(with_options("c1", **{"health.path": "/h"}), spec("c2", port=8002))
    pool = rec.pool("api")
    b = rec.backend("api", "c1")
    assert (b.health_state, b.ready) == ("unknown", False)  # no traffic before a first successful check
    b.health_state = "healthy"
    rec.registry.backend_state_changed(pool, b)
    assert rec.ready_ids("api") == ["c1", "c2"]
    b.ejected_until = 123.0
    rec.registry.backend_state_changed(pool, b)
    assert rec.ready_ids("api") == ["c2"]
    assert rec.retired == [b]
    b.ejected_until = None
    rec.apply(dataclasses.replace(with_options("c1", **{"health.path": "/h"}), running=False))
    assert rec.ready_ids("api") == ["c2"]
    rec.apply(with_options("c1", **{"health.path": "/h"}))
    assert rec.ready_ids("api") == ["c1", "c2"]


def test_state_change_of_a_backend_that_left_is_ignored(rec: Recorder) -> None:
    rec.apply(spec("c1"), spec("c2", port=8002))
    pool = rec.pool("api")
    gone = rec.backend("api", "c1")
    rec.registry.remove("c1")
    gone.ejected_until = None
    gone.health_state = "healthy"
    rec.registry.backend_state_changed(pool, gone)
    assert rec.ready_ids("api") == ["c2"]


def test_routes_lists_every_route(rec: Recorder) -> None:
    rec.apply(spec("c1", hosts=("b.localhost", "a.localhost")), spec("c2", service="web", path_prefix="/web", hosts=("a.localhost",)))
    assert [(r.host, r.path_prefix, r.service.name) for r in rec.registry.routes()] == [
        ("a.localhost", "/", "api"), ("a.localhost", "/web", "web"), ("b.localhost", "/", "api"),
    ]


# Traffic shares: rules between the containers of one service (the label parser sees one container at a time).


def test_containers_of_one_version_with_different_traffic_skip_the_later_one(rec: Recorder) -> None:
    rec.apply(
        spec("a", version="v1", port=8001),
        spec("b", version="v2", port=8002, traffic=10.0),
        spec("c", version="v2", port=8003, traffic=20.0),
    )
    skipped = rec.registry.rejections["c"]
    assert (skipped.label, skipped.value) == ("traffic", "20 %")
    assert "api-b" in skipped.reason and "10 %" in skipped.reason and "same share" in skipped.reason
    pool = rec.pool("api")
    assert sorted(pool.backends) == ["a", "b"]
    assert pool.split is not None and pool.split.shares == pytest.approx({"v1": 90.0, "v2": 10.0})


def test_an_undeclared_share_differs_from_a_declared_one(rec: Recorder) -> None:
    rec.apply(spec("b", version="v2", port=8002, traffic=10.0), spec("c", version="v2", port=8003))
    assert rec.registry.rejections["c"].value == "none"
    assert sorted(rec.pool("api").backends) == ["b"]


def test_replicas_with_the_same_share_are_fine(rec: Recorder) -> None:
    rec.apply(
        spec("a", version="v1", port=8001),
        spec("b", version="v2", port=8002, traffic=10.0),
        spec("c", version="v2", port=8003, traffic=10.0),
        spec("d", version="v3", port=8004, traffic=90.0),
    )
    assert rec.registry.rejections == {}
    pool = rec.pool("api")
    assert pool.split is not None and pool.split.shares == pytest.approx({"v1": 0.0, "v2": 10.0, "v3": 90.0})


def test_shares_over_100_percent_skip_the_container_that_exceeds(rec: Recorder) -> None:
    rec.apply(
        spec("a", version="v1", port=8001, traffic=60.0),
        spec("b", version="v2", port=8002, traffic=50.0),
        spec("c", version="v3", port=8003),
    )
    skipped = rec.registry.rejections["b"]
    assert (skipped.label, skipped.value) == ("traffic", "50 %")
    assert "add up to 110 % (v1 60 %, v2 50 %)" in skipped.reason and "at most 100 %" in skipped.reason
    pool = rec.pool("api")
    assert sorted(pool.backends) == ["a", "c"]
    assert pool.split is not None and pool.split.shares == pytest.approx({"v1": 60.0, "v3": 40.0})
    assert all(share >= 0 for share in pool.split.shares.values())
    # Exactly 100 % is allowed; once v1 is gone, v2 fits, at the next resync.
    rec.registry.remove("a")
    rec.registry.resync({"b": spec("b", version="v2", port=8002, traffic=50.0), "c": spec("c", version="v3", port=8003)})
    assert rec.registry.rejections == {}
    assert sorted(rec.pool("api").backends) == ["b", "c"]


def test_a_share_change_that_conflicts_skips_the_container(rec: Recorder) -> None:
    rec.apply(spec("a", version="v1", port=8001, traffic=60.0), spec("b", version="v2", port=8002, traffic=40.0))
    rec.apply(spec("b", version="v2", port=8002, traffic=41.0))
    assert "b" in rec.registry.rejections and sorted(rec.pool("api").backends) == ["a"]


def test_share_rejections_show_in_the_admin_view(rec: Recorder) -> None:
    from labelgw.control.admin import state

    rec.apply(spec("a", version="v1", port=8001, traffic=70.0), spec("b", version="v2", port=8002, traffic=70.0))
    view = state(rec.registry, 0.0)
    assert [(item["id"], item["label"]) for item in view["rejections"]] == [("b", "traffic")]
    assert "140 %" in view["rejections"][0]["reason"]
