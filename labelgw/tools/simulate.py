"""Deterministic discrete-event simulator that drives the proxy's own selection policies.

Open loop: seeded Poisson arrivals, each request with a size x ~ Exp(1); latency counts from the intended send
time. Backends are FIFO queues with a fixed number of workers serving a request in x * m_i(t) seconds. The
proxy's bookkeeping is reproduced: `in_flight` goes up at dispatch and down when the response completes or the
5 s client timeout fires, with `on_start` / `on_finish` called at those moments on the policy, which reads a
simulated clock. A timed-out request still occupies its backend (servers rarely notice that a client left).
Every policy sees the same request sequence for a given seed. The clairvoyant oracle picks the backend
where the request would finish first (argmin of max(now, free_at) + x * m_i): a lower bound, not a policy.

    python -m labelgw.tools.simulate [--scenario S1] [--load 0.5] [--seconds 60] [--seeds 3] [--policies ...]
    python -m labelgw.tools.simulate --crossover
    python -m labelgw.tools.simulate --hashing

`hash` is driven with a key per request: Zipf-distributed (s = 1) over 10 000 keys, so a few keys are hot; its
extra columns are `spill %` (requests the load bound sent past their key's first backend) and `max/share` (the
most in flight a backend was given, over its weighted share of the requests in flight, where that share is 4 or
more). `--hashing` prints how many of 10 000 keys move when a backend is added or removed, and runs H1: five
10 ms backends at 80 % load, hash with and without the load bound against wrt and least_conn.

Scenarios, five single-worker backends: S1 4 x 10 ms + 1 x 100 ms (capacity
410 req/s); S2 5 x 10 ms, one at 100 ms during the middle third of the run; S3 one backend at 2 ms (90 %) or
82 ms (10 %); S4 a fifth backend joins after a third of the run and is 10 x slow for 10 s. S2-S4 count 500
req/s as 100 %. Columns: p50/p99/p99.9 over all requests (a timeout counts as 5 000 ms), `win p99` over the
requests sent during the degradation (S2) or the newcomer's slow period (S4), `off s` the seconds until the
degraded backend's share of each 0.25 s stays under a quarter of a fair share, `us/pick` host CPU per pick.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from labelgw.core.backends import Backend, KeyedPolicy, Policy
from labelgw.core.balancer import POLICY_NAMES, ConsistentHash, make_policy
from labelgw.core.hashing import key_hash
from labelgw.core.model import ContainerSpec

# (now, u) -> seconds per unit of request size; u is a per-request uniform draw shared by all backends.
Multiplier = Callable[[float, float], float]
# Builds a policy from the simulated clock and a seeded RNG (for policies that are not in make_policy).
PolicyMaker = Callable[[Callable[[], float], random.Random], Policy]

ORACLE = "oracle"
CLIENT_TIMEOUT = 5.0
OFF_BIN = 0.25


@dataclass(frozen=True)
class SimBackend:
    name: str
    multiplier: Multiplier
    workers: int = 1
    joins_at: float = 0.0
    weight: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    backends: tuple[SimBackend, ...]
    # Requests per second that 100 % load means.
    capacity: float
    # Interval whose requests get their own percentiles (the degradation, the newcomer's slow period).
    window: tuple[float, float] | None = None
    # Backend whose loss of traffic is timed from window[0] (S2).
    degraded: int | None = None


def constant(seconds_per_unit: float) -> Multiplier:
    return lambda now, u: seconds_per_unit


def slow_between(start: float, end: float, normal: float, slow: float) -> Multiplier:
    return lambda now, u: slow if start <= now < end else normal


def bimodal(p_fast: float, fast: float, slow: float) -> Multiplier:
    return lambda now, u: fast if u < p_fast else slow


def scenario(name: str, seconds: float) -> Scenario:
    """S1-S4 as the module docstring describes them; event times scale with the run length (20 s marks at 60 s)."""
    fast = constant(0.010)
    name = name.upper()
    if name == "S1":
        backends = tuple(SimBackend(f"fast{i}", fast) for i in range(4)) + (SimBackend("slow", constant(0.100)),)
        return Scenario("S1", "4 x 10 ms + 1 x 100 ms", backends, capacity=410.0)
    if name == "S2":
        start, end = seconds / 3, seconds * 2 / 3
        backends = (SimBackend("degrading", slow_between(start, end, 0.010, 0.100)),) + tuple(
            SimBackend(f"fast{i}", fast) for i in range(4)
        )
        return Scenario("S2", f"5 x 10 ms; b0 at 100 ms from {start:g} to {end:g} s", backends, 500.0, (start, end), 0)
    if name == "S3":
        backends = (SimBackend("variable", bimodal(0.9, 0.002, 0.082)),) + tuple(
            SimBackend(f"fast{i}", fast) for i in range(4)
        )
        return Scenario("S3", "4 x 10 ms + 1 x (90 % 2 ms, 10 % 82 ms)", backends, 500.0)
    if name == "S4":
        join, slow_for = seconds / 3, min(10.0, seconds / 6)
        backends = tuple(SimBackend(f"fast{i}", fast) for i in range(4)) + (
            SimBackend("newcomer", slow_between(join, join + slow_for, 0.010, 0.100), joins_at=join),
        )
        return Scenario(
            "S4", f"4 x 10 ms; b4 joins at {join:g} s, 100 ms until {join + slow_for:g} s", backends, 500.0,
            (join, join + slow_for),
        )
    if name == "H1":
        return Scenario("H1", "5 x 10 ms, Zipf keys", tuple(SimBackend(f"b{i}", fast) for i in range(5)), 500.0)
    raise ValueError(f"unknown scenario {name!r}; expected S1, S2, S3, S4 or H1")


def mixed(count: int, slow: int) -> Scenario:
    """`count` backends at 10 ms of which the last `slow` are at 100 ms: S1's shape at any size (--crossover)."""
    backends = tuple(
        SimBackend(f"b{i}", constant(0.100 if i >= count - slow else 0.010)) for i in range(count)
    )
    capacity = sum(1.0 / b.multiplier(0.0, 0.0) for b in backends)
    return Scenario(f"mix{count}/{slow}", f"{count} backends, {slow} at 100 ms", backends, capacity)


@dataclass(frozen=True)
class Workload:
    arrivals: list[float]
    sizes: list[float]
    draws: list[float]


def workload(rate: float, seconds: float, seed: int) -> Workload:
    rng = random.Random(seed)
    arrivals: list[float] = []
    now = rng.expovariate(rate)
    while now < seconds:
        arrivals.append(now)
        now += rng.expovariate(rate)
    sizes = [rng.expovariate(1.0) for _ in arrivals]
    draws = [rng.random() for _ in arrivals]
    return Workload(arrivals, sizes, draws)


class SimClock:
    """The simulator's time, read by the policies through `seconds` (the same shape as task.Clock)."""

    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


@dataclass
class RunResult:
    policy: str
    seconds: float
    latencies: list[float]
    chosen: list[int]
    failures: int
    share: list[float]
    window_latencies: list[float] = field(default_factory=list)
    off_after: float | None = None
    pick_seconds: float = 0.0
    # The proxy's in-flight counts once every response and timeout was delivered: all zero if the
    # bookkeeping is right.
    in_flight_after: list[int] = field(default_factory=list)
    # Keyed policies (hash): requests placed past their key's first backend by the load bound, and the most in
    # flight a backend was given over its weighted share of the requests in flight (shares of 4 or more).
    spilled: int = 0
    max_share_ratio: float = 0.0
    keyed: bool = False


HASH_KEYS = 10_000


def zipf_keys(count: int, seed: int, keys: int = HASH_KEYS, exponent: float = 1.0) -> list[bytes]:
    """`count` request keys drawn from `keys` keys with Zipf weights 1/rank^exponent: a few hot keys."""
    rng = random.Random(seed * 104729 + 3)
    cumulative = list(itertools.accumulate(1.0 / (rank ** exponent) for rank in range(1, keys + 1)))
    total = cumulative[-1]
    return [b"key-%d" % bisect.bisect_left(cumulative, rng.random() * total) for _ in range(count)]


def parse_policy(spec: str) -> tuple[str, dict[str, Any]]:
    """`wrt` or `wrt:scan_limit=0,tau=5`: a policy name and constructor parameters."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    if name != ORACLE and name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES + (ORACLE,))}")
    return name, params


def run(scene: Scenario, policy_spec: str | PolicyMaker, load: Workload, seconds: float, seed: int) -> RunResult:
    """Drive one policy (a spec for `parse_policy`, or a maker given the clock and an RNG) through one workload;
    deterministic for a given seed."""
    clock = SimClock()
    rng = random.Random(seed * 7919 + 17)
    policy: Policy | None
    if isinstance(policy_spec, str):
        name, params = parse_policy(policy_spec)
        label = name if not params else policy_spec
        policy = None if name == ORACLE else make_policy(name, clock.seconds, rng, **params)
    else:
        policy = policy_spec(clock.seconds, rng)
        label = policy.name
    count = len(scene.backends)
    backends = [
        Backend(
            ContainerSpec(
                container_id=f"sim{i}", name=sim.name, service="sim", address="127.0.0.1", port=20000 + i,
                hosts=("sim.localhost",),
            ),
            weight=sim.weight,
        )
        for i, sim in enumerate(scene.backends)
    ]
    index_of = {id(b): i for i, b in enumerate(backends)}
    multipliers = [sim.multiplier for sim in scene.backends]
    workers: list[list[float]] = [[0.0] * sim.workers for sim in scene.backends]
    # Joins in time order: (time, backend index).
    joins = sorted((sim.joins_at, i) for i, sim in enumerate(scene.backends) if sim.joins_at > 0)
    ready = tuple(b for i, b in enumerate(backends) if scene.backends[i].joins_at <= 0)
    ready_indices = [index_of[id(b)] for b in ready]

    keyed = policy if isinstance(policy, KeyedPolicy) else None
    keys = zipf_keys(len(load.arrivals), seed) if keyed is not None else []
    spilled = 0
    max_share_ratio = 0.0
    events: list[tuple[float, int, int, float, bool]] = []  # (time, seq, backend, elapsed, failed)
    latencies: list[float] = []
    chosen: list[int] = []
    failures = 0
    timeout = CLIENT_TIMEOUT
    pick_seconds = 0.0
    heappush, heappop = heapq.heappush, heapq.heappop
    perf = time.perf_counter

    def settle(until: float) -> None:
        """Deliver the responses and timeouts due by `until`, in time order."""
        while events and events[0][0] <= until:
            at, _, index, elapsed, failed = heappop(events)
            clock.now = at
            backend = backends[index]
            backend.in_flight -= 1
            if policy is not None:
                policy.on_finish(backend, elapsed, failed)

    for seq, (arrival, size, draw) in enumerate(zip(load.arrivals, load.sizes, load.draws)):
        while joins and joins[0][0] <= arrival:
            at, index = joins.pop(0)
            settle(at)
            clock.now = at
            ready = ready + (backends[index],)
            ready_indices.append(index)
            if policy is not None:
                policy.on_ready(backends[index])
        settle(arrival)
        clock.now = arrival

        if policy is None:
            index = _oracle(arrival, size, draw, ready_indices, workers, multipliers)
        elif keyed is not None:
            key = keys[seq]
            started = perf()
            picked = keyed.pick_by_key(ready, key)
            pick_seconds += perf() - started
            assert picked is not None
            index = index_of[id(picked)]
            if isinstance(keyed, ConsistentHash) and len(ready) > 1:
                ring = keyed.ring(ready)
                if ready[ring.owner(key_hash(key)[0])] is not picked:
                    spilled += 1
                fair = (sum(b.in_flight for b in ready) + 1) * picked.weight / ring.total_weight
                if fair >= 4:
                    max_share_ratio = max(max_share_ratio, (picked.in_flight + 1) / fair)
        else:
            started = perf()
            picked = policy.pick(ready)
            pick_seconds += perf() - started
            assert picked is not None
            index = index_of[id(picked)]
        backend = backends[index]
        backend.in_flight += 1
        if policy is not None:
            policy.on_start(backend)

        pool = workers[index]
        free_at = pool[0] if len(pool) == 1 else min(pool)
        start = free_at if free_at > arrival else arrival
        done = start + size * multipliers[index](start, draw)
        if len(pool) == 1:
            pool[0] = done
        else:
            pool[pool.index(free_at)] = done
        latency = done - arrival
        if latency > timeout:
            failures += 1
            latency = timeout
            heappush(events, (arrival + timeout, seq, index, timeout, True))
        else:
            heappush(events, (done, seq, index, latency, False))
        latencies.append(latency)
        chosen.append(index)

    settle(math.inf)
    total = len(chosen) or 1
    share = [0.0] * count
    for index in chosen:
        share[index] += 1
    share = [s / total for s in share]
    result = RunResult(label, seconds, latencies, chosen, failures, share, pick_seconds=pick_seconds,
                       in_flight_after=[b.in_flight for b in backends], spilled=spilled,
                       max_share_ratio=max_share_ratio, keyed=keyed is not None)
    if scene.window is not None:
        low, high = scene.window
        result.window_latencies = [lat for at, lat in zip(load.arrivals, latencies) if low <= at < high]
        if scene.degraded is not None:
            result.off_after = _off_after(load.arrivals, chosen, scene.degraded, low, high, len(ready))
    return result


def _oracle(now: float, size: float, draw: float, ready: Sequence[int], workers: list[list[float]],
            multipliers: list[Multiplier]) -> int:
    best, best_done = ready[0], math.inf
    for index in ready:
        free_at = min(workers[index])
        start = free_at if free_at > now else now
        done = start + size * multipliers[index](start, draw)
        if done < best_done:
            best, best_done = index, done
    return best


def _off_after(arrivals: Sequence[float], chosen: Sequence[int], degraded: int, low: float, high: float,
               backends: int) -> float | None:
    """Seconds from `low` until the degraded backend's share, per 0.25 s bin, stays under a quarter of a fair
    share for the rest of the window; None if it never does."""
    bins = max(1, int((high - low) / OFF_BIN))
    hits = [0] * bins
    totals = [0] * bins
    for at, index in zip(arrivals, chosen):
        if low <= at < high:
            slot = min(bins - 1, int((at - low) / OFF_BIN))
            totals[slot] += 1
            hits[slot] += index == degraded
    limit = 0.25 / backends
    settled = bins
    for slot in range(bins - 1, -1, -1):
        if totals[slot] and hits[slot] / totals[slot] >= limit:
            break
        settled = slot
    if settled == bins:
        return None
    return settled * OFF_BIN


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    rank = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass(frozen=True)
class Summary:
    """Median over seeds of each figure of one policy in one configuration."""

    policy: str
    p50_ms: float
    p99_ms: float
    p999_ms: float
    throughput: float
    failure_pct: float
    share_pct: tuple[float, ...]
    window_p99_ms: float | None
    off_after: float | None
    pick_us: float
    # Keyed policies only (hash): per cent of requests past their key's first backend, max in flight / share.
    spill_pct: float | None = None
    max_share: float | None = None


def summarize(results: Sequence[RunResult]) -> Summary:
    def median(values: Iterable[float]) -> float:
        return statistics.median(list(values))

    per_seed = []
    for result in results:
        ordered = sorted(result.latencies)
        window = sorted(result.window_latencies)
        per_seed.append(
            (
                percentile(ordered, 0.50) * 1000,
                percentile(ordered, 0.99) * 1000,
                percentile(ordered, 0.999) * 1000,
                (len(result.latencies) - result.failures) / result.seconds,
                100.0 * result.failures / max(1, len(result.latencies)),
                percentile(window, 0.99) * 1000 if window else None,
                result.off_after,
                1e6 * result.pick_seconds / max(1, len(result.latencies)),
            )
        )
    backends = len(results[0].share)
    offs = [row[6] for row in per_seed]
    windows = [row[5] for row in per_seed if row[5] is not None]
    return Summary(
        policy=results[0].policy,
        p50_ms=median(row[0] for row in per_seed),
        p99_ms=median(row[1] for row in per_seed),
        p999_ms=median(row[2] for row in per_seed),
        throughput=median(row[3] for row in per_seed),
        failure_pct=median(row[4] for row in per_seed),
        share_pct=tuple(median(100 * r.share[i] for r in results) for i in range(backends)),
        window_p99_ms=median(windows) if windows else None,
        # A run that never moved off counts as infinitely late.
        off_after=_median_off(offs),
        pick_us=median(row[7] for row in per_seed),
        spill_pct=median(100.0 * r.spilled / max(1, len(r.latencies)) for r in results) if results[0].keyed else None,
        max_share=max(r.max_share_ratio for r in results) if results[0].keyed else None,
    )


def _median_off(offs: Sequence[float | None]) -> float | None:
    if all(off is None for off in offs):
        return None
    value = statistics.median([math.inf if off is None else off for off in offs])
    return None if math.isinf(value) else value


def compare(scene_name: str, load_fraction: float, seconds: float, seeds: Sequence[int],
            policies: Sequence[str]) -> tuple[Scenario, list[Summary]]:
    """Run every policy on the same seeded workloads; one Summary (median over seeds) per policy."""
    if scene_name.startswith("mix"):
        count, _, slow = scene_name[3:].partition("/")
        scene = mixed(int(count), int(slow))
    else:
        scene = scenario(scene_name, seconds)
    loads = {seed: workload(load_fraction * scene.capacity, seconds, seed) for seed in seeds}
    summaries = [
        summarize([run(scene, spec, loads[seed], seconds, seed) for seed in seeds]) for spec in policies
    ]
    return scene, summaries


def format_table(scene: Scenario, load_fraction: float, seconds: float, seeds: Sequence[int],
                 summaries: Sequence[Summary]) -> str:
    names = " ".join(f"{b.name[:7]:>7}" for b in scene.backends)
    has_window = scene.window is not None
    keyed = any(summary.spill_pct is not None for summary in summaries)
    lines = [
        f"{scene.name} ({scene.description}) at {load_fraction:.0%} of {scene.capacity:g} req/s = "
        f"{load_fraction * scene.capacity:g} req/s, {seconds:g} s, seeds {','.join(map(str, seeds))} (median)",
        f"{'policy':<22} {'p50':>7} {'p99':>8} {'p99.9':>8} "
        + (f"{'win p99':>8} " if has_window else "")
        + f"{'req/s':>6} {'fail%':>6} "
        + (f"{'off s':>5} " if scene.degraded is not None else "")
        + f"{'us/pick':>7}  share % {names}"
        + (f"  {'spill %':>7} {'max/share':>9}" if keyed else ""),
    ]
    for s in summaries:
        row = f"{s.policy:<22} {s.p50_ms:7.1f} {s.p99_ms:8.1f} {s.p999_ms:8.1f} "
        if has_window:
            row += f"{s.window_p99_ms:8.1f} " if s.window_p99_ms is not None else f"{'-':>8} "
        row += f"{s.throughput:6.1f} {s.failure_pct:6.2f} "
        if scene.degraded is not None:
            row += f"{s.off_after:5.2f} " if s.off_after is not None else f"{'never':>5} "
        row += f"{s.pick_us:7.1f}          " + " ".join(f"{v:7.1f}" for v in s.share_pct)
        if keyed:
            row += (f"  {s.spill_pct:7.1f} {s.max_share:9.2f}" if s.spill_pct is not None and s.max_share is not None
                    else f"  {'-':>7} {'-':>9}")
        lines.append(row)
    return "\n".join(lines)


CROSSOVER_FAMILIES: dict[str, Callable[[int], int]] = {
    "one slow": lambda count: 1,
    "none slow": lambda count: 0,
    "1 in 5 slow": lambda count: max(1, count // 5),
}


def crossover(seconds: float, seeds: Sequence[int], loads: Sequence[float], sizes: Sequence[int]) -> str:
    """`wrt` with a full scan against power of two choices (with and without redraws) as services grow."""
    lines = [f"wrt full scan vs P2C, {seconds:g} s, seeds {','.join(map(str, seeds))} (median); p99 in ms, "
             "us = microseconds per pick",
             f"{'family':<12} {'backends':>8} {'load':>5} {'scan p99':>9} {'p2c p99':>8} {'plain p99':>9} "
             f"{'p2c/scan':>8} {'scan us':>8} {'p2c us':>7} {'oracle p99':>10}"]
    for family, slow_count in CROSSOVER_FAMILIES.items():
        for count in sizes:
            for fraction in loads:
                _, (scan, p2c, plain, oracle) = compare(
                    f"mix{count}/{slow_count(count)}", fraction, seconds, seeds,
                    ["wrt:scan_limit=1000000", "wrt:scan_limit=0", "wrt:scan_limit=0,p2c_draws=1", ORACLE],
                )
                lines.append(f"{family:<12} {count:8d} {fraction:5.0%} {scan.p99_ms:9.1f} {p2c.p99_ms:8.1f} "
                             f"{plain.p99_ms:9.1f} {p2c.p99_ms / scan.p99_ms:8.2f} {scan.pick_us:8.1f} "
                             f"{p2c.pick_us:7.1f} {oracle.p99_ms:10.1f}")
    return "\n".join(lines)


def hash_movement(sizes: Sequence[int] = (1, 2, 3, 4, 5, 8, 16), keys: int = HASH_KEYS) -> str:
    """How many of `keys` keys move when a backend joins n backends, and when one of n leaves (nothing in flight,
    so no load bound at work: the ring alone)."""
    names = [b"key-%d" % number for number in range(keys)]
    lines = [f"hash: keys moved among {keys} keys (ring only, nothing in flight)",
             f"{'n':>3} {'add 1: moved %':>15} {'bound 1/(n+1)+5':>16} {'remove 1: moved %':>18} "
             f"{'its own %':>10} {'others moved':>13}"]
    for n in sizes:
        policy = ConsistentHash(SimClock().seconds, random.Random(1), slow_start=0.0)
        members = [Backend(ContainerSpec(container_id=f"b{i}", name=f"b{i}", service="sim", address="127.0.0.1",
                                         port=20000 + i, hosts=("sim.localhost",))) for i in range(n + 1)]

        def place(ready: Sequence[Backend]) -> list[str]:
            return [policy.pick_by_key(ready, key).key for key in names]  # type: ignore[union-attr]

        base = place(tuple(members[:n]))
        added = place(tuple(members))
        moved_add = sum(1 for a, b in zip(base, added) if a != b)
        if n > 1:
            gone = members[n // 2].key
            removed = place(tuple(m for m in members[:n] if m.key != gone))
            moved_remove = sum(1 for a, b in zip(base, removed) if a != b)
            own = sum(1 for a in base if a == gone)
            others = sum(1 for a, b in zip(base, removed) if a != b and a != gone)
            remove = f"{100 * moved_remove / keys:18.1f} {100 * own / keys:10.1f} {others:13d}"
        else:
            remove = f"{'-':>18} {'-':>10} {'-':>13}"
        lines.append(f"{n:3d} {100 * moved_add / keys:15.1f} {100 * (1 / (n + 1) + 0.05):16.1f} {remove}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelgw.tools.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append",
                        choices=["S1", "S2", "S3", "S4", "H1", "s1", "s2", "s3", "s4", "h1"],
                        help="scenario (repeatable); default: S1 to S4")
    parser.add_argument("--load", action="append", type=float,
                        help="fraction of capacity (repeatable); default 0.1, 0.5, 0.8 for S1 and 0.5 otherwise")
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per run (default 60)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 1..N; figures are medians")
    parser.add_argument("--policies", nargs="+", default=list(POLICY_NAMES) + [ORACLE],
                        help="policies to compare, e.g. wrt least_conn oracle 'wrt:scan_limit=0,tau=5'")
    parser.add_argument("--crossover", action="store_true",
                        help="compare wrt's full scan with P2C as the number of backends grows")
    parser.add_argument("--hashing", action="store_true",
                        help="hash: keys moved when a backend joins or leaves, and H1 (hash with and without the "
                             "load bound against wrt and least_conn, at 80 %% load)")
    args = parser.parse_args(argv)
    seeds = list(range(1, args.seeds + 1))
    for spec in args.policies:
        try:
            parse_policy(spec)
        except ValueError as error:
            parser.error(str(error))
    if args.hashing:
        print(hash_movement())
        print()
        scene, summaries = compare("H1", args.load[0] if args.load else 0.8, args.seconds, seeds,
                                   ["hash", "hash:load_factor=1000000", "wrt", "least_conn", ORACLE])
        print(format_table(scene, args.load[0] if args.load else 0.8, args.seconds, seeds, summaries))
        return 0
    if args.crossover:
        # Short runs: the largest services carry thousands of requests per simulated second.
        print(crossover(min(args.seconds, 10.0), seeds, args.load or [0.5, 0.8], [3, 5, 8, 16, 32, 64, 128]))
        return 0
    for name in [s.upper() for s in args.scenario] if args.scenario else ["S1", "S2", "S3", "S4"]:
        for fraction in args.load or ([0.1, 0.5, 0.8] if name == "S1" else [0.5]):
            scene, summaries = compare(name, fraction, args.seconds, seeds, args.policies)
            print(format_table(scene, fraction, args.seconds, seeds, summaries))
            print()
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
