"""The discrete-event simulator, and what it shows about the policies on short seeded runs."""

from __future__ import annotations

import random
import statistics
from collections import Counter
from typing import Callable, Sequence

import pytest

from labelgw.core.backends import Backend
from labelgw.core.balancer import WeightedResponseTime
from labelgw.tools.simulate import (
    CLIENT_TIMEOUT,
    Scenario,
    SimBackend,
    compare,
    constant,
    main,
    parse_policy,
    run,
    scenario,
    workload,
)

SEEDS = (1, 2, 3)


def by_policy(scene: str, load: float, seconds: float, policies: list[str]) -> dict[str, object]:
    _, summaries = compare(scene, load, seconds, SEEDS, policies)
    return {s.policy: s for s in summaries}


# -- the machinery ----------------------------------------------------------------------------------


def test_workload_is_a_seeded_poisson_schedule() -> None:
    first, again, other = workload(200.0, 50.0, 1), workload(200.0, 50.0, 1), workload(200.0, 50.0, 2)
    assert first == again
    assert first.arrivals != other.arrivals
    assert len(first.arrivals) == pytest.approx(10_000, rel=0.05)
    assert first.arrivals == sorted(first.arrivals)
    assert statistics.fmean(first.sizes) == pytest.approx(1.0, rel=0.05)


def test_a_run_is_deterministic_for_a_seed() -> None:
    scene = scenario("S1", 10.0)
    load = workload(205.0, 10.0, 4)
    one, two = run(scene, "wrt", load, 10.0, 4), run(scene, "wrt", load, 10.0, 4)
    assert (one.latencies, one.chosen) == (two.latencies, two.chosen)


class Spy:
    """A policy that records what the simulator tells it, and picks in turn."""

    name = "spy"

    def __init__(self, clock: Callable[[], float], rng: random.Random) -> None:
        self.clock = clock
        self.started: dict[str, list[float]] = {}
        self.finished: list[tuple[str, float, float, bool]] = []
        self.in_flight_at_start: list[int] = []
        self.turn = 0

    def pick(self, ready: Sequence[Backend]) -> Backend | None:
        self.turn += 1
        return ready[self.turn % len(ready)]

    def on_start(self, backend: Backend) -> None:
        self.in_flight_at_start.append(backend.in_flight)
        self.started.setdefault(backend.key, []).append(self.clock())

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        self.finished.append((backend.key, self.clock(), elapsed, failed))

    def on_ready(self, backend: Backend) -> None:
        pass


def test_the_proxy_bookkeeping_is_reproduced() -> None:
    spies: list[Spy] = []

    def maker(clock: Callable[[], float], rng: random.Random) -> Spy:
        spies.append(Spy(clock, rng))
        return spies[-1]

    scene = scenario("S1", 5.0)
    load = workload(300.0, 5.0, 1)
    result = run(scene, maker, load, 5.0, 1)
    spy = spies[0]
    # in_flight counted before on_start, back to zero once everything was delivered.
    assert min(spy.in_flight_at_start) >= 1
    assert result.in_flight_after == [0] * 5
    assert len(spy.finished) == len(load.arrivals)
    # on_finish comes at dispatch time + elapsed, in time order.
    times = [at for _, at, _, _ in spy.finished]
    assert times == sorted(times)
    starts = sorted(t for ts in spy.started.values() for t in ts)
    assert starts == pytest.approx(load.arrivals)
    ends = sorted(at - elapsed for _, at, elapsed, _ in spy.finished)
    assert ends == pytest.approx(load.arrivals)


def test_a_client_timeout_is_a_failure_reported_to_the_policy() -> None:
    spies: list[Spy] = []

    def maker(clock: Callable[[], float], rng: random.Random) -> Spy:
        spies.append(Spy(clock, rng))
        return spies[-1]

    scene = Scenario("slow", "one 2 s backend", (SimBackend("slow", constant(2.0)),), capacity=0.5)
    load = workload(2.0, 10.0, 3)
    result = run(scene, maker, load, 10.0, 3)
    failed = [f for f in spies[0].finished if f[3]]
    assert result.failures == len(failed) > 0
    assert all(elapsed == CLIENT_TIMEOUT for _, _, elapsed, _ in failed)
    assert sum(lat == CLIENT_TIMEOUT for lat in result.latencies) == result.failures


def test_the_oracle_sends_each_request_where_it_finishes_first() -> None:
    scene = Scenario("pair", "10 ms and 50 ms", (SimBackend("a", constant(0.010)), SimBackend("b", constant(0.050))),
                     capacity=120.0)
    load = workload(60.0, 20.0, 1)
    chosen = run(scene, "oracle", load, 20.0, 1).chosen
    free_at = [0.0, 0.0]
    for arrival, size, index in zip(load.arrivals, load.sizes, chosen):
        done = [max(arrival, free_at[i]) + size * m for i, m in enumerate((0.010, 0.050))]
        assert done[index] == min(done)
        free_at[index] = done[index]
    assert 0 < chosen.count(1) < chosen.count(0)


def test_policy_specs() -> None:
    assert parse_policy("wrt") == ("wrt", {})
    assert parse_policy("wrt:scan_limit=0,tau=5.0") == ("wrt", {"scan_limit": 0, "tau": 5.0})
    assert parse_policy("oracle") == ("oracle", {})
    with pytest.raises(ValueError):
        parse_policy("random")


def test_the_command_line_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scenario", "S2", "--load", "0.5", "--seconds", "6", "--seeds", "1",
                 "--policies", "wrt", "least_conn", "oracle"]) == 0
    out = capsys.readouterr().out
    assert "S2 (" in out and "p99.9" in out and "off s" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["wrt", "least_conn", "oracle"]


# -- what the simulation shows (the targets of issue 3) --------------------------------------------


def test_s1_at_half_load_wrt_is_near_the_oracle_and_far_ahead_of_least_conn() -> None:
    result = by_policy("S1", 0.5, 30.0, ["wrt", "least_conn", "oracle"])
    wrt, least_conn, oracle = result["wrt"], result["least_conn"], result["oracle"]
    assert wrt.p99_ms <= 1.5 * oracle.p99_ms  # type: ignore[attr-defined]
    assert wrt.p99_ms < 0.5 * least_conn.p99_ms  # type: ignore[attr-defined]
    assert wrt.share_pct[4] < 2.0  # type: ignore[attr-defined]
    assert wrt.failure_pct == 0.0  # type: ignore[attr-defined]


def test_s2_wrt_moves_traffic_off_the_degraded_backend_within_two_seconds() -> None:
    result = by_policy("S2", 0.5, 30.0, ["wrt", "round_robin"])
    assert result["wrt"].off_after is not None and result["wrt"].off_after <= 2.0  # type: ignore[attr-defined]
    assert result["round_robin"].off_after is None  # type: ignore[attr-defined]


def test_round_robin_is_unstable_once_the_slow_backend_is_over_capacity() -> None:
    result = by_policy("S1", 0.5, 30.0, ["round_robin", "wrt", "least_conn"])
    rr = result["round_robin"]
    # 41 req/s to a backend that serves 10: its queue grows until clients time out.
    assert rr.share_pct == pytest.approx((20.0,) * 5, abs=0.1)  # type: ignore[attr-defined]
    assert rr.failure_pct > 10.0  # type: ignore[attr-defined]
    assert rr.p99_ms == CLIENT_TIMEOUT * 1000  # type: ignore[attr-defined]
    assert rr.p99_ms > 20 * result["wrt"].p99_ms  # type: ignore[attr-defined]
    assert result["least_conn"].failure_pct == 0.0  # type: ignore[attr-defined]


def test_s3_and_s4_wrt_beats_least_conn() -> None:
    s3 = by_policy("S3", 0.5, 20.0, ["wrt", "least_conn"])
    assert s3["wrt"].p99_ms < s3["least_conn"].p99_ms  # type: ignore[attr-defined]
    s4 = by_policy("S4", 0.5, 30.0, ["wrt", "least_conn", "oracle"])
    assert s4["wrt"].window_p99_ms < 0.5 * s4["least_conn"].window_p99_ms  # type: ignore[attr-defined]
    assert s4["wrt"].window_p99_ms < 1.5 * s4["oracle"].window_p99_ms  # type: ignore[attr-defined]


def test_the_simulator_drives_the_proxy_policy_class() -> None:
    made: list[object] = []

    def maker(clock: Callable[[], float], rng: random.Random) -> WeightedResponseTime:
        made.append(WeightedResponseTime(clock, rng))
        return made[-1]  # type: ignore[return-value]

    scene = scenario("S1", 5.0)
    load = workload(205.0, 5.0, 1)
    assert run(scene, maker, load, 5.0, 1).latencies == run(scene, "wrt", load, 5.0, 1).latencies


# -- hash (issue 10) --------------------------------------------------------------------------------


def test_hash_gets_zipf_keys_and_keeps_the_load_bound_where_plain_consistent_hashing_does_not() -> None:
    results = by_policy("H1", 0.8, 20.0, ["hash", "hash:load_factor=1000000"])
    bounded, plain = results["hash"], results["hash:load_factor=1000000"]
    assert bounded.max_share is not None and bounded.max_share <= 1.25  # type: ignore[attr-defined]
    assert 0 < bounded.spill_pct  # type: ignore[attr-defined]
    assert bounded.failure_pct == 0  # type: ignore[attr-defined]
    # Without the bound the hot keys' backend is overloaded: timeouts.
    assert plain.max_share > 2 and plain.spill_pct == 0  # type: ignore[attr-defined]
    assert plain.failure_pct > 1  # type: ignore[attr-defined]


def test_zipf_keys_are_seeded_and_skewed() -> None:
    from labelgw.tools.simulate import zipf_keys

    keys = zipf_keys(20_000, 1)
    assert keys == zipf_keys(20_000, 1) != zipf_keys(20_000, 2)
    counts = sorted(Counter(keys).values(), reverse=True)
    assert counts[0] > 0.08 * len(keys)  # the hottest key: about 1 / H(10 000) = 10 %
    assert len(counts) > 3000


def test_the_hashing_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hashing", "--seconds", "4", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:9]]
    for row in rows:
        n, moved_add, bound = int(row[0]), float(row[1]), float(row[2])
        assert moved_add <= bound, row
        if n > 1:
            assert float(row[3]) == float(row[4]) and row[5] == "0", row  # only its own keys
    assert "H1 (" in out and "spill %" in out
