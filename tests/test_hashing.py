"""balancer=hash: the ring (labelgw.core.hashing), the policy with bounded loads (labelgw.core.balancer.ConsistentHash),
the key read from a request (labelgw.http.hashkey), the labels and the config file, and a request through the proxy."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from typing import Any, Sequence

import pytest
from twisted.internet.task import Clock

from labelgw.cli.config import ConfigError, build
from labelgw.control.outlier import EjectingPolicy, OutlierDetector
from labelgw.core import hashing
from labelgw.core.backends import Backend, KeyedPolicy, ServicePool
from labelgw.core.balancer import ConsistentHash, describe, make_policy, service_policy_factory
from labelgw.core.hashing import LOAD_FACTOR, Ring, capacity, key_hash, points_for
from labelgw.core.labels import parse_container, parse_hash_key
from labelgw.core.model import ContainerSpec, HashKey, Rejection
from labelgw.core.registry import Registry
from labelgw.core.versions import decide
from labelgw.http.hashkey import cookie_value, request_key
from labelgw.http.parser import parse_request_head

KEYS = [b"user-%d" % i for i in range(10_000)]


def backend(name: str, weight: float = 1.0, version: str | None = None) -> Backend:
    spec = ContainerSpec(container_id=name, name=name, service="api", address="127.0.0.1", port=8000,
                         hosts=("api.localhost",), weight=weight, version=version)
    return Backend(spec)


def policy(clock: Clock | None = None, **params: Any) -> ConsistentHash:
    clock = clock or Clock()
    return ConsistentHash(clock.seconds, random.Random(1), **params)


def mapping(chooser: ConsistentHash, ready: Sequence[Backend], keys: Sequence[bytes] = KEYS) -> dict[bytes, str]:
    """Where each key goes with nothing in flight (every request finished before the next)."""
    result = {}
    for key in keys:
        chosen = chooser.pick_by_key(ready, key)
        assert chosen is not None
        result[key] = chosen.key
    return result


# -- the ring ---------------------------------------------------------------------------------------


def test_key_hash_is_stable_across_processes_and_spreads() -> None:
    # blake2b, not the per-process salted hash(): a fixed value.
    position, draw = key_hash(b"alice")
    assert (position, draw) == key_hash(b"alice")
    assert position == int.from_bytes(__import__("hashlib").blake2b(b"alice", digest_size=16).digest()[:8], "big")
    assert 0 <= draw < 1
    draws = [key_hash(key)[1] for key in KEYS[:2000]]
    assert 0.45 < sum(draws) / len(draws) < 0.55


def test_points_follow_the_weight_within_bounds() -> None:
    assert points_for(1.0) == hashing.POINTS_PER_WEIGHT
    assert points_for(2.0) == 2 * hashing.POINTS_PER_WEIGHT
    assert points_for(0.0001) == 1
    assert points_for(1000.0) == hashing.MAX_POINTS


def test_capacity_is_the_bounded_share_rounded_down_but_at_least_the_share() -> None:
    # max(ceil(share), floor(1.25 x share)), share = (m + 1) x w / W
    assert capacity(1.25, 0, 1.0, 3.0) == 1
    assert capacity(1.25, 11, 1.0, 3.0) == 5
    assert capacity(1.25, 199, 1.0, 5.0) == 50
    assert capacity(1.25, 201, 1.0, 4.0) == 63  # 1.25 x 50.5 = 63.1
    assert capacity(1.25, 4, 1.0, 4.0) == 2  # share 1.25: rounded up, not down to 1
    assert capacity(1.25, 3, 1.0, 5.0) == 1  # 1.25 x 4 / 5 = 1.0 exactly, float noise must not make it 2
    # The capacities add up to more than m: some member always has room.
    for total in range(0, 300, 7):
        assert sum(capacity(1.25, total, w, 10.0) for w in (1.0, 2.0, 3.0, 4.0)) > total


def test_successors_visit_every_member_once_in_ring_order() -> None:
    ring = Ring([("a", 1.0), ("b", 1.0), ("c", 2.0)])
    assert len(ring) == 4 * hashing.POINTS_PER_WEIGHT
    for key in KEYS[:200]:
        position = key_hash(key)[0]
        order = list(ring.successors(position))
        assert sorted(order) == [0, 1, 2]
        assert order[0] == ring.owner(position)
    # Past the last point the ring wraps to the first.
    assert ring.first(2**64 - 1) in (0, len(ring) - 1)
    assert ring.first(ring.points[-1] + 1) == 0


# -- the movement of keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 10, 16])
def test_adding_a_backend_to_n_moves_at_most_one_in_n_plus_one_plus_5_percent(n: int) -> None:
    chooser = policy(slow_start=0)
    old = tuple(backend(f"b{i}") for i in range(n))
    new = old + (backend(f"b{n}"),)
    before, after = mapping(chooser, old), mapping(chooser, new)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert len(moved) / len(KEYS) <= 1 / (n + 1) + 0.05, (n, len(moved))
    # Every key that moved went to the newcomer: none moved between the old backends.
    assert {after[key] for key in moved} <= {f"b{n}"}


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_removing_a_backend_moves_only_its_own_keys(n: int) -> None:
    chooser = policy(slow_start=0)
    ready = tuple(backend(f"b{i}") for i in range(n))
    gone = ready[n // 2]
    before = mapping(chooser, ready)
    after = mapping(chooser, tuple(b for b in ready if b is not gone))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == gone.key}
    # Its keys spread over the others rather than piling onto one neighbour.
    assert len(Counter(after[key] for key in moved)) == n - 1


def test_weights_count_more_points_and_a_larger_share() -> None:
    chooser = policy(slow_start=0)
    ready = (backend("light"), backend("heavy", weight=3.0), backend("other"))
    shares = Counter(mapping(chooser, ready).values())
    assert shares["heavy"] / len(KEYS) == pytest.approx(0.6, abs=0.05)
    assert shares["light"] / len(KEYS) == pytest.approx(0.2, abs=0.05)


def test_one_key_one_backend_while_nothing_changes() -> None:
    chooser = policy()
    ready = tuple(backend(f"b{i}") for i in range(5))
    first = mapping(chooser, ready, KEYS[:500])
    for _ in range(5):
        assert mapping(chooser, ready, KEYS[:500]) == first
    # A new policy object (a gateway restart) maps them the same way.
    assert mapping(policy(), tuple(backend(f"b{i}") for i in range(5)), KEYS[:500]) == first
    # The ready set rebuilt as a new tuple with the same members: the same ring.
    assert mapping(chooser, tuple(ready), KEYS[:500]) == first


# -- bounded loads ----------------------------------------------------------------------------------


def concurrent_run(
    chooser: ConsistentHash, ready: Sequence[Backend], requests: int = 20_000, concurrency: int = 200,
    seed: int = 7, hot: float = 0.0,
) -> tuple[list[str], int, float]:
    """Keys from KEYS (a fraction `hot` of the requests for one key), `concurrency` in flight on average
    (Poisson arrivals, exponential durations). Checks the bound at every placement; returns the backend of each
    request, how many went past their key's first choice, and the largest in-flight / mean seen."""
    rng = random.Random(seed)
    ring = chooser.ring(ready)
    clock = 0.0
    finishing: list[tuple[float, int]] = []
    chosen: list[str] = []
    spilled = 0
    worst = 0.0
    total_weight = sum(b.weight for b in ready)
    for number in range(requests):
        clock += rng.expovariate(concurrency)
        while finishing and finishing[0][0] <= clock:
            _, index = heapq.heappop(finishing)
            ready[index].in_flight -= 1
        key = KEYS[0] if rng.random() < hot else KEYS[rng.randrange(len(KEYS))]
        total = sum(b.in_flight for b in ready)
        picked = chooser.pick_by_key(ready, key)
        assert picked is not None
        picked.in_flight += 1
        # The bound of Mirrokni et al.: after placement, at most 1.25 x (m + 1) x w / W (or that share rounded up).
        assert picked.in_flight <= capacity(LOAD_FACTOR, total, picked.weight, total_weight), (number, picked)
        if picked is not ready[ring.owner(key_hash(key)[0])]:
            spilled += 1
        mean = (total + 1) * picked.weight / total_weight
        if mean >= 4:  # below, the share rounded up is the bound
            worst = max(worst, picked.in_flight / mean)
        chosen.append(picked.key)
        heapq.heappush(finishing, (clock + rng.expovariate(1.0), ready.index(picked)))
    for b in ready:
        b.in_flight = 0
    return chosen, spilled, worst


def test_no_backend_takes_more_than_1_25_times_the_mean_in_flight() -> None:
    ready = tuple(backend(f"b{i}") for i in range(4))
    # A third of the requests for one hot key: without the bound its backend would hold far more than its share.
    chosen, spilled, worst = concurrent_run(policy(), ready, concurrency=400, hot=0.3)
    assert spilled > 0
    assert worst <= LOAD_FACTOR
    assert len(set(chosen)) == 4


def test_the_bound_holds_with_weights() -> None:
    ready = (backend("a"), backend("b", weight=2.0), backend("c", weight=0.5))
    _, _, worst = concurrent_run(policy(), ready, concurrency=300, hot=0.2)
    assert worst <= LOAD_FACTOR


def test_removing_one_under_load_moves_its_own_keys_plus_the_spill() -> None:
    ready = tuple(backend(f"b{i}") for i in range(5))
    gone = ready[2]
    rest = tuple(b for b in ready if b is not gone)
    before, spilled_before, _ = concurrent_run(policy(), ready, requests=10_000, concurrency=100)
    after, spilled_after, _ = concurrent_run(policy(), rest, requests=10_000, concurrency=100)
    # Same seeded requests, in the same order: a request that changed backend and was not on the removed one
    # was moved by the load bound (in one run or the other), not by the ring.
    moved_elsewhere = sum(1 for a, b in zip(before, after) if a != b and a != gone.key)
    assert moved_elsewhere <= spilled_before + spilled_after
    assert spilled_before + spilled_after < 0.25 * 10_000


# -- readiness, slow start, no key ------------------------------------------------------------------


def test_an_ejected_backends_keys_move_to_the_next_and_come_back() -> None:
    clock = Clock()
    chooser = policy(clock)
    ready = tuple(backend(f"b{i}") for i in range(4))
    before = mapping(chooser, ready)
    out = ready[1]
    without = tuple(b for b in ready if b is not out)
    during = mapping(chooser, without)
    assert {key for key in KEYS if before[key] != during[key]} == {key for key in KEYS if before[key] == out.key}
    # Back in rotation (ServicePool.recompute calls on_ready): slow start, then every key home again.
    chooser.on_ready(out)
    clock.advance(1.0)
    ramping = mapping(chooser, ready)
    regained = sum(1 for key in KEYS if before[key] == out.key and ramping[key] == out.key)
    own = sum(1 for key in KEYS if before[key] == out.key)
    assert 0.05 * own < regained < 0.3 * own  # max(10 %, 1 s / 10 s) of its keys
    # Only its own keys move to it, never someone else's.
    assert all(before[key] == out.key for key in KEYS if ramping[key] == out.key)
    clock.advance(4.0)
    halfway = mapping(chooser, ready)
    # The fraction only grows: a key that came back stays.
    assert all(halfway[key] == out.key for key in KEYS if ramping[key] == out.key)
    clock.advance(6.0)  # slow start runs 10 s from its first sight (t = 1)
    assert mapping(chooser, ready) == before


def test_a_new_backend_joining_a_running_service_slow_starts_but_a_new_service_does_not() -> None:
    clock = Clock()
    chooser = policy(clock)
    ready = tuple(backend(f"b{i}") for i in range(3))
    assert describe(ready[0])["slow_start"] is None
    mapping(chooser, ready, KEYS[:10])
    assert [describe(b)["slow_start"] for b in ready] == [1.0, 1.0, 1.0]
    newcomer = backend("b3")
    grown = ready + (newcomer,)
    mapping(chooser, grown, KEYS[:10])
    view = describe(newcomer)
    assert view["slow_start"] == pytest.approx(0.1)
    assert (view["policy"], view["hash_key"]) == ("hash", "ip")
    clock.advance(10.0)
    assert describe(newcomer)["slow_start"] == 1.0


def test_a_request_without_a_key_is_placed_at_random_under_the_bound() -> None:
    chooser = policy()
    ready = tuple(backend(f"b{i}") for i in range(3))
    counts = Counter(chooser.pick(ready).key for _ in range(3000))  # type: ignore[union-attr]
    assert set(counts) == {"b0", "b1", "b2"}
    assert min(counts.values()) > 700
    assert chooser.pick(()) is None and chooser.pick_by_key((), b"x") is None
    assert chooser.pick_by_key(ready[:1], b"x") is ready[0]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        policy(load_factor=1.0)
    with pytest.raises(ValueError):
        policy(slow_start=-1)


# -- the pool, versions, outlier ejection -----------------------------------------------------------


def test_the_pool_passes_the_key_only_to_a_keyed_policy() -> None:
    clock = Clock()
    pool = ServicePool("api", make_policy("hash", clock.seconds, random.Random(1), key_source=HashKey("header", "x-user")))
    assert pool.key_source == HashKey("header", "x-user")
    assert ServicePool("api", make_policy("wrt", clock.seconds, random.Random(1))).key_source is None
    for name in ("b0", "b1", "b2"):
        pool.backends[name] = backend(name)
        pool.backends[name].ready = True
    pool.refresh()
    first = pool.pick(key=b"alice")
    assert all(pool.pick(key=b"alice") is first for _ in range(20))
    # A retry excludes the failed backend: the key goes to the next on the ring, the same one every time.
    second = pool.pick(exclude=first, key=b"alice")
    assert second is not first
    assert all(pool.pick(exclude=first, key=b"alice") is second for _ in range(5))


def test_within_a_version_split_the_version_comes_first_then_the_key() -> None:
    clock = Clock()
    pool = ServicePool("api", make_policy("hash", clock.seconds, random.Random(1)))
    for name, version in (("a1", "v1"), ("a2", "v1"), ("a3", "v1"), ("b1", "v2"), ("b2", "v2")):
        pool.backends[name] = backend(name, version=version)
        pool.backends[name].ready = True
    pool.refresh()
    assert pool.split is not None
    seen: dict[str, set[str]] = {"v1": set(), "v2": set()}
    for key in KEYS[:300]:
        decision = decide(pool, sticky="v2", key=key)
        assert decision.version == "v2" and decision.backend is not None
        assert decide(pool, sticky="v2", key=key).backend is decision.backend
        seen["v2"].add(decision.backend.key)
        pinned = decide(pool, pinned="v1", key=key)
        assert pinned.backend is not None and pinned.backend.version == "v1"
        seen["v1"].add(pinned.backend.key)
    assert seen == {"v1": {"a1", "a2", "a3"}, "v2": {"b1", "b2"}}


def test_outlier_ejection_wraps_the_keyed_policy_and_keeps_its_key() -> None:
    clock = Clock()
    registry = Registry(policy_factory=service_policy_factory("wrt", clock.seconds))
    detector = OutlierDetector(clock, registry.backend_state_changed)
    registry.add_listener(detector)
    for index in range(3):
        registry.apply(f"c{index}", ContainerSpec(
            container_id=f"c{index}", name=f"c{index}", service="api", address="127.0.0.1", port=8000 + index,
            hosts=("api.localhost",), balancer="hash", hash_key=HashKey("cookie", "session"),
        ))
    pool = registry.services["api"]
    assert isinstance(pool.policy, EjectingPolicy)
    assert isinstance(pool.policy, KeyedPolicy)
    assert pool.key_source == HashKey("cookie", "session")
    home = pool.pick(key=b"alice")
    assert home is not None
    for _ in range(5):
        pool.policy.on_finish(home, 0.01, True)
    assert not home.ready
    elsewhere = pool.pick(key=b"alice")
    assert elsewhere is not None and elsewhere is not home
    clock.advance(30.0)  # re-admitted; slow start over 10 s from its first sight, then the key is home again
    pool.pick(key=b"alice")
    clock.advance(10.0)
    assert pool.pick(key=b"alice") is home


# -- the key from a request -------------------------------------------------------------------------


def head(extra: bytes = b"", target: bytes = b"/cart?x=1") -> Any:
    return parse_request_head((b"GET %s HTTP/1.1\r\nHost: shop.localhost\r\n%s" % (target, extra)).removesuffix(b"\r\n"))


@pytest.mark.parametrize(
    "source, extra, expected",
    [
        (HashKey("ip"), b"", b"10.0.0.7"),
        (HashKey("header", "x-user"), b"X-User: alice\r\n", b"alice"),
        (HashKey("header", "x-user"), b"x-user:   bob  \r\n", b"bob"),
        (HashKey("header", "x-user"), b"", None),
        (HashKey("header", "x-user"), b"X-User: \r\n", None),
        (HashKey("cookie", "sid"), b"Cookie: a=1; sid=abc; b=2\r\n", b"abc"),
        (HashKey("cookie", "sid"), b'Cookie: sid="q"\r\n', b"q"),
        (HashKey("cookie", "sid"), b"Cookie: xsid=1; SID=2\r\n", None),
        (HashKey("cookie", "sid"), b"", None),
        (HashKey("cookie", "sid"), b"Cookie: a=1\r\nX-Other: sid=no\r\ncookie: sid=two\r\n", b"two"),
        (HashKey("path"), b"", b"/cart"),
    ],
)
def test_request_key(source: HashKey, extra: bytes, expected: bytes | None) -> None:
    assert request_key(source, head(extra), b"10.0.0.7", "/cart") == expected


def test_cookie_value_reads_the_first_pair_of_that_name() -> None:
    assert cookie_value(b"sid=1; sid=2", "sid") == b"1"
    assert cookie_value(None, "sid") is None


# -- labels and the config file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ip", HashKey("ip")),
        ("IP", HashKey("ip")),
        ("path", HashKey("path")),
        ("header:X-User", HashKey("header", "x-user")),
        ("header: X-User ", HashKey("header", "x-user")),
        ("cookie:SessionId", HashKey("cookie", "SessionId")),
    ],
)
def test_parse_hash_key(text: str, expected: HashKey) -> None:
    assert parse_hash_key(text) == expected
    assert str(parse_hash_key(str(expected))) == str(expected)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "not a hash key; use ip, path, header:NAME or cookie:NAME"),
        ("uri", "not a hash key; use ip, path, header:NAME or cookie:NAME"),
        ("ip:1", "not a hash key; use ip, path, header:NAME or cookie:NAME"),
        ("header", "not a hash key; use ip, path, header:NAME or cookie:NAME"),
        ("header:", "header: needs a name (header:NAME)"),
        ("header:X User", "'X User' is not a header name"),
        ("cookie:a=b", "'a=b' is not a cookie name"),
        ("header:Cookie", "hash on one cookie with cookie:NAME, not on the whole Cookie header"),
    ],
)
def test_parse_hash_key_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_hash_key(text)
    assert str(error.value).startswith(reason)


def inspect(**labels: str) -> dict[str, Any]:
    return {
        "Id": "abc123", "Name": "/shop-1",
        "Config": {"Labels": {"labelgw.service": "shop", "labelgw.port": "8000", **labels}},
        "State": {"Running": True},
        "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
    }


def test_labels_give_typed_fields() -> None:
    spec = parse_container(inspect(**{"labelgw.balancer": "hash", "labelgw.hash.key": "header:X-User"}))
    assert isinstance(spec, ContainerSpec)
    assert (spec.balancer, spec.hash_key) == ("hash", HashKey("header", "x-user"))
    plain = parse_container(inspect(**{"labelgw.balancer": "hash"}))
    assert isinstance(plain, ContainerSpec) and plain.hash_key is None
    # No balancer label: --balancer may be hash, so the key is accepted.
    alone = parse_container(inspect(**{"labelgw.hash.key": "path"}))
    assert isinstance(alone, ContainerSpec) and alone.hash_key == HashKey("path")


@pytest.mark.parametrize(
    "labels, label, reason",
    [
        ({"labelgw.balancer": "hash", "labelgw.hash.key": "header:"}, "labelgw.hash.key", "header: needs a name"),
        ({"labelgw.balancer": "hash", "labelgw.hash.key": "src"}, "labelgw.hash.key", "not a hash key"),
        ({"labelgw.balancer": "wrt", "labelgw.hash.key": "ip"}, "labelgw.hash.key",
         "has effect only with labelgw.balancer=hash"),
        ({"labelgw.balancer": "hashed"}, "labelgw.balancer", "unknown balancer; use one of: hash, least_conn"),
    ],
)
def test_a_bad_hash_label_rejects_only_that_container(labels: dict[str, str], label: str, reason: str) -> None:
    outcome = parse_container(inspect(**labels))
    assert isinstance(outcome, Rejection)
    assert outcome.label == label
    assert outcome.reason.startswith(reason), outcome.reason


def test_static_services_take_balancer_and_hash_key() -> None:
    settings = build({}, {"services": {"legacy": {
        "backends": ["127.0.0.1:9000", "127.0.0.1:9001"], "balancer": "hash", "hash_key": "cookie:sid",
    }}})
    specs = settings.static_services[0].specs()
    assert {(s.balancer, s.hash_key) for s in specs} == {("hash", HashKey("cookie", "sid"))}
    assert build({"balancer": "hash"}).balancer == "hash"


@pytest.mark.parametrize(
    "service, message",
    [
        ({"balancer": "fastest"}, "services.legacy.balancer: 'fastest' is not a balancer"),
        ({"balancer": "hash", "hash_key": "header:"}, "services.legacy.hash_key: 'header:': header: needs a name"),
        ({"balancer": "wrt", "hash_key": "ip"}, "services.legacy.hash_key: has effect only with balancer: hash"),
        ({"hash_key": 5}, "services.legacy.hash_key: must be ip, path, header:NAME or cookie:NAME"),
    ],
)
def test_static_service_hash_errors(service: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build({}, {"services": {"legacy": {"backends": ["127.0.0.1:9000"], **service}}})
    assert str(error.value).startswith(message), str(error.value)


def test_the_factory_builds_hash_with_the_containers_key() -> None:
    clock = Clock()
    factory = service_policy_factory("hash", clock.seconds)
    spec = ContainerSpec(container_id="c", name="c", service="s", address="a", port=1, hosts=("s.localhost",))
    built = factory(spec)
    assert isinstance(built, ConsistentHash) and built.key_source == HashKey("ip")
    keyed = factory(ContainerSpec(container_id="c", name="c", service="s", address="a", port=1,
                                  hosts=("s.localhost",), balancer="hash", hash_key=HashKey("path")))
    assert isinstance(keyed, ConsistentHash) and keyed.key_source == HashKey("path")
    assert math.isclose(built.load_factor, 1.25)


def test_a_replica_asking_for_another_key_is_logged_and_the_first_key_kept() -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        registry = Registry(policy_factory=service_policy_factory("wrt", Clock().seconds))
        for index, key in enumerate((HashKey("header", "x-user"), HashKey("path"))):
            registry.apply(f"c{index}", ContainerSpec(
                container_id=f"c{index}", name=f"c{index}", service="api", address="127.0.0.1", port=8000 + index,
                hosts=("api.localhost",), balancer="hash", hash_key=key,
            ))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert registry.services["api"].key_source == HashKey("header", "x-user")
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn and "hash key" in e.get("log_format", "")]
    assert len(warnings) == 1 and (warnings[0]["wanted"], warnings[0]["chosen"]) == ("path", "header:x-user")
