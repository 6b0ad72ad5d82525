"""Selection policies, one rule per test, with an injected clock and a seeded RNG."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from twisted.internet.task import Clock

from labelgw.core import backends as backends_module
from labelgw.core.backends import Backend
from labelgw.core.balancer import (
    DEFAULT_SCAN_LIMIT,
    ConsistentHash,
    POLICY_NAMES,
    LeastConn,
    RoundRobin,
    WeightedResponseTime,
    describe,
    make_policy,
)
from labelgw.core.model import ContainerSpec


def backend(name: str, weight: float = 1.0) -> Backend:
    spec = ContainerSpec(container_id=name, name=name, service="api", address="127.0.0.1", port=8000,
                         hosts=("api.localhost",))
    return Backend(spec, weight=weight)


def wrt(clock: Clock, seed: int = 1, **params: object) -> WeightedResponseTime:
    # A 1 ms starting guess unless a test says otherwise: the first samples below are peaks and set the estimate.
    params.setdefault("default_latency", 0.001)
    return WeightedResponseTime(clock.seconds, random.Random(seed), **params)  # type: ignore[arg-type]


def estimate_ms(b: Backend) -> float:
    return describe(b)["latency_ms"]


def ms(value: float) -> object:
    """describe() rounds to the microsecond."""
    return pytest.approx(value, abs=0.0011)


# -- factory ----------------------------------------------------------------------------------------


def test_make_policy_builds_each_named_policy() -> None:
    clock = Clock()
    kinds = {name: type(make_policy(name, clock.seconds, random.Random(1))) for name in POLICY_NAMES}
    assert kinds == {
        "wrt": WeightedResponseTime, "round_robin": RoundRobin, "least_conn": LeastConn, "hash": ConsistentHash,
    }
    assert POLICY_NAMES[0] == "wrt"


def test_make_policy_passes_parameters_and_rejects_bad_ones() -> None:
    clock = Clock()
    policy = make_policy("wrt", clock.seconds, random.Random(1), tau=5.0, scan_limit=3)
    assert isinstance(policy, WeightedResponseTime) and policy.tau == 5.0 and policy.scan_limit == 3
    with pytest.raises(ValueError, match="unknown balancer 'fastest'"):
        make_policy("fastest", clock.seconds, random.Random(1))
    with pytest.raises(TypeError):
        make_policy("least_conn", clock.seconds, random.Random(1), tau=5.0)
    with pytest.raises(TypeError):
        make_policy("wrt", clock.seconds, random.Random(1), tua=5.0)


# -- round robin and least connections -----------------------------------------------------------


def test_round_robin_is_the_one_from_backends_and_takes_turns() -> None:
    assert RoundRobin is backends_module.RoundRobin
    pool = [backend(n) for n in "abc"]
    policy = RoundRobin()
    assert [policy.pick(pool).key for _ in range(7)] == list("abcabca")  # type: ignore[union-attr]
    assert policy.pick([]) is None


def test_least_conn_picks_fewest_in_flight() -> None:
    pool = [backend(n) for n in "abc"]
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 2
    assert LeastConn().pick(pool) is pool[1]
    assert LeastConn().pick([]) is None


def test_least_conn_ties_take_turns() -> None:
    pool = [backend(n) for n in "abc"]
    policy = LeastConn()
    assert [policy.pick(pool).key for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]
    pool[1].in_flight = 1
    assert Counter(policy.pick(pool).key for _ in range(60)) == {"a": 30, "c": 30}  # type: ignore[union-attr]


def test_least_conn_divides_by_weight() -> None:
    heavy, light = backend("heavy", weight=3.0), backend("light")
    heavy.in_flight, light.in_flight = 2, 1
    assert LeastConn().pick([light, heavy]) is heavy


# -- wrt: the estimate ----------------------------------------------------------------------------


def test_peak_sample_replaces_the_estimate_at_once() -> None:
    clock = Clock()
    policy = wrt(clock)
    b = backend("a")
    policy.on_finish(b, 0.010, False)
    clock.advance(0.001)
    policy.on_finish(b, 0.500, False)
    assert estimate_ms(b) == ms(500.0)


def test_lower_sample_pulls_with_weight_from_elapsed_time() -> None:
    clock = Clock()
    policy = wrt(clock, tau=10.0)
    b = backend("a")
    policy.on_finish(b, 0.100, False)
    clock.advance(1.0)
    policy.on_finish(b, 0.010, False)
    w = math.exp(-1.0 / 10.0)
    assert estimate_ms(b) == ms(100.0 * w + 10.0 * (1 - w))


def test_estimate_decays_between_samples_with_tau() -> None:
    clock = Clock()
    policy = wrt(clock, tau=10.0)
    b = backend("a")
    policy.on_finish(b, 0.200, False)
    clock.advance(10.0)
    assert estimate_ms(b) == ms(200.0 / math.e)
    # Reading the estimate (describe, pick) does not change it.
    policy.pick([b, backend("b")])
    assert estimate_ms(b) == ms(200.0 / math.e)


def test_an_idle_slow_backend_is_probed_again_once_its_estimate_has_decayed() -> None:
    clock = Clock()
    policy = wrt(clock, tau=10.0)
    fast, slow = backend("fast"), backend("slow")
    policy.pick([fast, slow])
    policy.on_finish(slow, 1.0, False)
    first_probe = None
    for step in range(1, 700):
        clock.advance(0.1)
        picked = policy.pick([fast, slow])
        policy.on_finish(picked, 0.010, False)  # type: ignore[arg-type]
        if picked is slow:
            first_probe = step * 0.1
            break
    # 1 s decays to within the tie band of the fast backend's 10 ms (12.5 ms) after tau * ln(80) = 43.8 s.
    assert first_probe == pytest.approx(10.0 * math.log(100 / 1.25), abs=1.0)


# -- wrt: the cost --------------------------------------------------------------------------------


def test_cost_includes_in_flight_requests() -> None:
    clock = Clock()
    policy = wrt(clock)
    fast, slower = backend("fast"), backend("slower")
    policy.pick([fast, slower])
    policy.on_finish(fast, 0.010, False)
    policy.on_finish(slower, 0.030, False)
    assert policy.pick([fast, slower]) is fast
    fast.in_flight = 3  # 10 ms x (3 + 1) = 40 ms > 30 ms x (0 + 1)
    assert policy.pick([fast, slower]) is slower


def test_cost_divides_by_weight() -> None:
    clock = Clock()
    policy = wrt(clock)
    light, heavy = backend("light"), backend("heavy", weight=2.0)
    policy.pick([light, heavy])
    policy.on_finish(light, 0.015, False)
    policy.on_finish(heavy, 0.020, False)  # 20 ms / 2 = 10 ms < 15 ms
    assert policy.pick([light, heavy]) is heavy


def test_equal_costs_take_turns() -> None:
    clock = Clock()
    policy = wrt(clock)
    pool = [backend(n) for n in "abc"]
    assert [policy.pick(pool).key for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]


def test_a_fast_failing_backend_does_not_look_fast() -> None:
    clock = Clock()
    policy = wrt(clock, failure_penalty=5.0)
    healthy, broken = backend("healthy"), backend("broken")
    policy.pick([healthy, broken])
    for _ in range(20):
        clock.advance(0.05)
        policy.on_finish(healthy, 0.020, False)
    policy.on_finish(broken, 0.001, True)  # a 1 ms connection refused
    assert estimate_ms(broken) == ms(5 * 20.0)
    assert all(policy.pick([healthy, broken]) is healthy for _ in range(5))
    # Repeated failures keep multiplying, up to max_penalty.
    for _ in range(10):
        policy.on_finish(broken, 0.001, True)
    assert estimate_ms(broken) == ms(policy.max_penalty * 1000)


def test_a_timeout_counts_at_least_its_elapsed_time() -> None:
    clock = Clock()
    policy = wrt(clock, max_penalty=1.0)
    b = backend("a")
    policy.on_finish(b, 5.0, True)
    assert estimate_ms(b) == ms(5000.0)
    assert describe(b)["failures"] == 1


# -- wrt: new backends and slow start -------------------------------------------------------------


def test_backends_of_a_new_service_start_warm_at_the_default_latency() -> None:
    clock = Clock()
    policy = wrt(clock, default_latency=0.05, scan_limit=0)
    pool = [backend(str(i)) for i in range(6)]
    policy.pick(pool)
    assert all(describe(b)["slow_start"] == 1.0 for b in pool)
    assert all(estimate_ms(b) == ms(50.0) for b in pool)


def ramp_share(policy: WeightedResponseTime, peers: list[Backend], newcomer: Backend, picks: int = 2000) -> float:
    won = sum(policy.pick(peers + [newcomer]) is newcomer for _ in range(picks))
    return won / picks


def test_a_newcomer_starts_at_its_peers_mean_and_ramps_up_over_the_window() -> None:
    clock = Clock()
    policy = wrt(clock, slow_start=10.0, slow_start_min=0.1)
    peers = [backend(str(i)) for i in range(4)]
    policy.pick(peers)
    for b, latency in zip(peers, (0.010, 0.020, 0.030, 0.040)):
        policy.on_finish(b, latency, False)
        b.in_flight = 3  # 10 ms x 4 > 25 ms: the newcomer is cheaper whenever it is a candidate
    newcomer = backend("new")
    shares = []
    for _ in range(4):
        shares.append(ramp_share(policy, peers, newcomer))
        clock.advance(4.0)
    assert estimate_ms(newcomer) == ms(25.0 * math.exp(-16.0 / 10.0))
    # A candidate in max(10 %, t / 10 s) of the picks: 0 s, 4 s, 8 s, then warm.
    assert shares[0] == pytest.approx(0.1, abs=0.03)
    assert shares[1] == pytest.approx(0.4, abs=0.04)
    assert shares[2] == pytest.approx(0.8, abs=0.04)
    assert shares[3] == 1.0


def test_slow_start_applies_with_power_of_two_choices_too() -> None:
    clock = Clock()
    policy = wrt(clock, scan_limit=2, p2c_draws=1)
    peers = [backend(str(i)) for i in range(5)]
    policy.pick(peers)
    for b in peers:
        policy.on_finish(b, 0.020, False)
        b.in_flight = 1
    newcomer = backend("new")
    # Drawn in 2 of 6 picks; a candidate in 10 % of those.
    assert ramp_share(policy, peers, newcomer, 6000) == pytest.approx(1 / 3 * 0.1, abs=0.012)
    clock.advance(10.0)
    assert ramp_share(policy, peers, newcomer, 6000) == pytest.approx(1 / 3, abs=0.03)


def test_describe_reports_the_slow_start_factor() -> None:
    clock = Clock()
    policy = wrt(clock, slow_start=10.0)
    peer, newcomer = backend("peer"), backend("new", weight=2.0)
    policy.pick([peer])
    policy.on_finish(peer, 0.020, False)
    policy.pick([peer, newcomer])
    clock.advance(5.0)
    newcomer.in_flight = 3
    view = describe(newcomer)
    assert view["slow_start"] == pytest.approx(0.5)
    assert view["latency_ms"] == ms(20.0 * math.exp(-0.5))
    assert (view["policy"], view["in_flight"], view["weight"], view["samples"]) == ("wrt", 3, 2.0, 0)
    assert describe(backend("never-seen"))["latency_ms"] is None


def test_a_readmitted_backend_forgets_its_penalty_and_slow_starts() -> None:
    clock = Clock()
    policy = wrt(clock)
    good, ejected = backend("good"), backend("ejected")
    policy.pick([good, ejected])
    policy.on_finish(good, 0.020, False)
    policy.on_finish(ejected, 5.0, True)
    policy.on_ready(ejected)
    policy.pick([good, ejected])
    assert estimate_ms(ejected) == ms(20.0)
    assert describe(ejected)["slow_start"] == pytest.approx(0.1)


# -- wrt: full scan or power of two choices --------------------------------------------------------


def one_cheap_backend(policy: WeightedResponseTime, count: int) -> list[Backend]:
    pool = [backend(str(i)) for i in range(count)]
    policy.pick(pool)
    for b in pool:
        policy.on_finish(b, 0.050, False)
        b.in_flight = 2
    pool[0].in_flight = 0
    return pool


def test_full_scan_up_to_the_limit_always_finds_the_cheapest() -> None:
    policy = wrt(Clock(), scan_limit=6)
    pool = one_cheap_backend(policy, 6)
    assert all(policy.pick(pool) is pool[0] for _ in range(200))


def test_power_of_two_choices_above_the_limit() -> None:
    policy = wrt(Clock(), scan_limit=5, p2c_draws=1)
    pool = one_cheap_backend(policy, 6)
    share = sum(policy.pick(pool) is pool[0] for _ in range(3000)) / 3000
    # The cheapest wins only when it is one of the two drawn: 2 in 6.
    assert share == pytest.approx(1 / 3, abs=0.03)


def test_power_of_two_choices_divides_by_weight() -> None:
    # Six equal backends above the scan limit; "heavy" has weight 3 and one request in flight:
    # cost 50 ms x 2 / 3 < 50 ms x 1 / 1, so it wins every draw it is in (2 in 6), and only those.
    # Without the weight it would cost 100 ms and lose every draw against an idle peer.
    policy = wrt(Clock(), scan_limit=5, p2c_draws=1)
    pool = [backend(str(i)) for i in range(5)] + [backend("heavy", weight=3.0)]
    policy.pick(pool)
    for b in pool:
        policy.on_finish(b, 0.050, False)
    heavy = pool[-1]
    heavy.in_flight = 1
    picks = Counter(policy.pick(pool).key for _ in range(3000))  # type: ignore[union-attr]
    assert picks["heavy"] / 3000 == pytest.approx(1 / 3, abs=0.03)
    # Three in flight: 50 ms x 4 / 3 > 50 ms: its weight no longer makes up for its load; it loses every draw.
    heavy.in_flight = 3
    picks = Counter(policy.pick(pool).key for _ in range(3000))  # type: ignore[union-attr]
    assert picks["heavy"] == 0 and len(picks) == 5


def test_p2c_draws_again_when_both_candidates_are_slow() -> None:
    def fast_share(draws: int) -> float:
        clock = Clock()
        policy = wrt(clock, scan_limit=4, p2c_draws=draws)
        pool = [backend(str(i)) for i in range(20)]
        policy.pick(pool)
        for b in pool[2:]:
            policy.on_finish(b, 1.0, False)
        for _ in range(500):
            clock.advance(0.01)
            for b in pool[:2]:
                policy.on_finish(b, 0.010, False)
        return sum(policy.pick(pool) in pool[:2] for _ in range(3000)) / 3000

    # Both drawn slow: 18/20 x 17/19 of plain P2C's picks; with 3 pairs that happens 0.805^3 of the time.
    assert fast_share(1) == pytest.approx(1 - 18 / 20 * 17 / 19, abs=0.03)
    assert fast_share(3) == pytest.approx(1 - (18 / 20 * 17 / 19) ** 3, abs=0.03)


def test_default_scan_limit_is_the_measured_crossover() -> None:
    assert WeightedResponseTime(Clock().seconds, random.Random(1)).scan_limit == DEFAULT_SCAN_LIMIT == 32


def test_picks_are_deterministic_for_a_seed() -> None:
    def sequence(seed: int) -> list[str]:
        clock = Clock()
        policy = wrt(clock, seed=seed, scan_limit=2)
        pool = [backend(str(i)) for i in range(8)]
        picks = []
        for step in range(200):
            clock.advance(0.01)
            chosen = policy.pick(pool)
            assert chosen is not None
            picks.append(chosen.key)
            policy.on_finish(chosen, 0.005 + (step % 7) * 0.003, False)
        return picks

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_empty_and_single_backend_services() -> None:
    clock = Clock()
    policy = wrt(clock)
    only = backend("only")
    assert policy.pick([]) is None
    assert policy.pick([only]) is only
    policy.on_start(only)
    policy.on_finish(only, 0.040, False)
    assert estimate_ms(only) == ms(40.0)
    assert describe(only)["slow_start"] == 1.0


def test_stats_are_small() -> None:
    clock = Clock()
    policy = wrt(clock)
    b = backend("a")
    policy.on_finish(b, 0.01, False)
    assert not hasattr(b.stats, "__dict__")


def test_one_lucky_first_sample_does_not_make_a_favourite() -> None:
    clock = Clock()
    policy = wrt(clock, default_latency=0.030)
    lucky, other = backend("lucky"), backend("other")
    policy.pick([lucky, other])
    clock.advance(0.5)
    policy.on_finish(lucky, 0.001, False)
    w = math.exp(-0.5 / 10.0)
    assert estimate_ms(lucky) == ms(30.0 * w + 1.0 * (1 - w))


def test_a_wall_clock_stepping_back_does_not_break_picks() -> None:
    clock = Clock()
    clock.advance(100_000.0)
    policy = wrt(clock)
    pool = [backend(n) for n in "ab"]
    policy.pick(pool)
    policy.on_finish(pool[0], 0.010, False)
    clock.rightNow -= 50_000.0
    assert policy.pick(pool) is not None
    assert policy.pick(pool * 20) is not None  # P2C as well
    assert estimate_ms(pool[0]) == ms(10.0)


# -- found by mutation testing (tests/mutation.md) --------------------------------------------------------------


def test_wrt_rejects_a_negative_slow_start_and_a_minimum_share_over_one() -> None:
    clock = Clock()
    with pytest.raises(ValueError, match="slow_start must not be negative"):
        wrt(clock, slow_start=-1.0)
    with pytest.raises(ValueError, match="slow_start_min"):
        wrt(clock, slow_start_min=1.5)
    assert wrt(clock, slow_start=0.0, slow_start_min=1.0).p2c_draws == 3  # the documented default


def test_a_clock_stepped_back_does_not_inflate_the_estimate() -> None:
    # A wall clock that steps back gives a negative gap: no decay then, not a growth by exp(+gap / tau).
    clock = Clock()
    policy = wrt(clock, tau=10.0)
    b = backend("a")
    clock.advance(10.0)
    policy.on_finish(b, 0.200, False)
    clock.rightNow = 5.0
    policy.on_finish(b, 0.100, False)
    assert estimate_ms(b) == ms(200.0)


def p2c_pair(clock: Clock, **params: object) -> tuple[WeightedResponseTime, Backend, Backend]:
    # Two backends above a scan limit of 1: every pick draws both (power of two choices).
    policy = wrt(clock, tau=1.0, scan_limit=1, p2c_draws=1, **params)
    old, new = backend("old"), backend("new")
    policy.pick([old, new])
    return policy, old, new


def test_power_of_two_choices_decays_the_estimates_it_compares() -> None:
    clock = Clock()
    policy, old, new = p2c_pair(clock)
    policy.on_finish(old, 1.0, False)
    clock.advance(50.0)
    policy.on_finish(new, 0.100, False)
    # old: 1 s fifty tau ago, now far below new's 100 ms.
    assert all(policy.pick([old, new]) is old for _ in range(20))


def test_power_of_two_choices_decays_within_the_first_second_too() -> None:
    clock = Clock()
    policy, old, new = p2c_pair(clock)
    policy.on_finish(old, 1.0, False)
    clock.advance(1.0)
    policy.on_finish(new, 0.950, False)
    # old decayed for one tau: 368 ms against new's 950 ms.
    assert all(policy.pick([old, new]) is old for _ in range(20))


def test_power_of_two_choices_stops_drawing_once_the_best_is_not_much_slower_than_typical() -> None:
    # All estimates equal the typical one: the first pair is good enough, so the cheapest wins only when it is
    # in that pair (2 in 6), even though up to 3 pairs may be drawn.
    policy = wrt(Clock(), scan_limit=5)
    assert policy.p2c_draws == 3
    pool = one_cheap_backend(policy, 6)
    share = sum(policy.pick(pool) is pool[0] for _ in range(3000)) / 3000
    assert share == pytest.approx(1 / 3, abs=0.03)


def test_ring_of_the_same_ready_set_is_built_once() -> None:
    # The simulator asks ring() directly for the same set again and again: the cached ring comes back.
    from labelgw.core.hashing import Ring

    chooser = ConsistentHash(Clock().seconds, random.Random(1))
    ready = (backend("a"), backend("b"), backend("c"))
    first = chooser.ring(ready)
    assert isinstance(first, Ring)
    assert chooser.ring(ready) is first
    assert chooser.ring(list(ready)) is first  # another sequence of the same members: the same ring


def test_adopting_a_backend_into_a_new_service_leaves_warm_peers_as_they_were() -> None:
    # A peer adopted warm (no samples yet) keeps its stamp when another backend joins: its starting guess decays.
    clock = Clock()
    policy = wrt(clock, tau=10.0)
    a, b, c = backend("a"), backend("b"), backend("c")
    policy.pick([a, c])
    clock.advance(10.0)
    policy.pick([a, b])
    assert estimate_ms(a) == ms(1.0 / math.e)
    assert estimate_ms(b) == ms(1.0)


def test_describe_rounds_the_estimate_to_the_microsecond() -> None:
    policy = wrt(Clock())
    b = backend("a")
    policy.on_finish(b, 0.2003456, False)
    assert estimate_ms(b) == 200.346



def test_hash_takes_a_slow_start_spare_in_ring_order_not_the_least_loaded() -> None:
    # The warm backend is full; both newcomers are in slow start and lose their draw for most keys, so the key
    # goes to the first newcomer after its position on the ring, even the busier one (its keys stay put).
    clock = Clock()
    chooser = ConsistentHash(clock.seconds, random.Random(1))
    warm, busy, idle = backend("warm"), backend("busy"), backend("idle")
    keys = [f"key-{i}".encode() for i in range(200)]
    chooser.pick_by_key((warm, backend("gone")), keys[0])  # the service starts (two: one backend is a shortcut)
    ready = (warm, busy, idle)
    warm.in_flight, busy.in_flight = 4, 1
    picks = Counter(chooser.pick_by_key(ready, key).key for key in keys)  # type: ignore[union-attr]
    assert describe(busy)["slow_start"] == pytest.approx(0.1) and describe(idle)["slow_start"] == pytest.approx(0.1)
    assert picks["busy"] > 40 and picks["idle"] > 40 and picks["warm"] == 0


def test_describe_of_a_backend_no_policy_has_seen() -> None:
    b = backend("a")
    expected = {"policy": None, "in_flight": 0, "weight": 1.0, "latency_ms": None, "slow_start": None,
                "samples": 0, "failures": 0}
    assert describe(b) == expected
    # A policy asked directly about a backend it has not adopted reports no estimate rather than failing.
    view = wrt(Clock()).describe(b)
    assert (view["policy"], view["latency_ms"], view["slow_start"], view["samples"]) == ("wrt", None, None, 0)


def test_hash_describe_rounds_the_slow_start_factor_to_three_digits() -> None:
    clock = Clock()
    chooser = ConsistentHash(clock.seconds, random.Random(1))
    warm, newcomer = backend("warm"), backend("new")
    chooser.pick_by_key((warm, backend("other")), b"k")
    for _ in range(50):  # until the newcomer is seen (adopted in slow start)
        chooser.pick((warm, newcomer))
    clock.advance(1.234)
    assert describe(newcomer)["slow_start"] == 0.123


def test_service_policy_factory_gives_tau_to_wrt_only() -> None:
    from labelgw.core.balancer import service_policy_factory

    clock = Clock()
    spec = ContainerSpec(container_id="a", name="a", service="api", address="127.0.0.1", port=8000,
                         hosts=("api.localhost",))
    assert isinstance(service_policy_factory("least_conn", clock.seconds)(spec), LeastConn)
    assert isinstance(service_policy_factory("round_robin", clock.seconds)(spec), RoundRobin)
    policy = service_policy_factory("wrt", clock.seconds, tau=4.0)(spec)
    assert isinstance(policy, WeightedResponseTime) and policy.tau == 4.0


def test_power_of_two_choices_with_two_slow_starting_draws_takes_the_cheaper_spare() -> None:
    # Both drawn backends are in slow start and lose their draw (minimum share 1 %): one of them is still taken,
    # the cheaper one, rather than nothing.
    clock = Clock()
    policy = wrt(clock, scan_limit=2, p2c_draws=1, slow_start_min=0.01)
    warm = backend("warm")
    policy.pick([warm, backend("gone")])
    policy.on_finish(warm, 0.010, False)
    cheap, dear = backend("cheap"), backend("dear")
    ready = [warm, cheap, dear]
    dear.in_flight = 3
    picks = Counter(policy.pick(ready).key for _ in range(600))  # type: ignore[union-attr]
    assert picks["cheap"] > 100 and picks["dear"] < 30
