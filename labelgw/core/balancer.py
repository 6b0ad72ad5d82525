"""Selection policies: which ready backend of a service gets the next request. Pure: no I/O, no reactor.

Every policy implements `labelgw.core.backends.Policy`. Time comes from an injected `clock` (`reactor.seconds` in the
proxy, a `task.Clock().seconds` in tests, the simulator's clock in `labelgw.tools.simulate`) and randomness from an
injected `random.Random`, so the same objects run in all three places and are deterministic under test.

The proxy keeps `backend.in_flight` itself; a policy only reads it. A policy keeps its per-backend state in
`backend.stats` (None means "never seen": a new or re-admitted backend).
"""

from __future__ import annotations

import math
import random
from math import exp as _exp
from typing import Any, Callable, Sequence

from labelgw.core.backends import Backend, Policy, RoundRobin
from labelgw.core.hashing import LOAD_FACTOR, Ring, key_hash
from labelgw.core.model import ContainerSpec, HashKey

__all__ = [
    "POLICY_NAMES",
    "ConsistentHash",
    "HashStats",
    "LeastConn",
    "RoundRobin",
    "WeightedResponseTime",
    "WrtStats",
    "describe",
    "make_policy",
    "service_policy_factory",
]

Clock = Callable[[], float]

POLICY_NAMES = ("wrt", "round_robin", "least_conn", "hash")

# Service size up to which `wrt` compares every ready backend; above it, power of two choices.
# Measured with `python -m labelgw.tools.simulate --crossover` (3 to 128 backends, none / one / 1 in 5 of them 10x
# slow, 50 and 80 % load): in tail latency there is no crossover, the scan's p99 is lower from 5 backends
# on (P2C's is 1.2-1.4x the scan's at 50 % load, 1.5-1.9x at 80 %; plain P2C without the redraws below
# goes to 1-2 s at 80 % when 1 in 5 backends is slow).
# What grows is CPU: a scan costs about 0.5 + 0.15 us per backend here (5 us at 32, 9 us at 64, 18 us at
# 128), P2C about 1.2 us at any size; they cost the same at 5-8 backends. 32 keeps the scan under ~5 us a
# pick, a small share of what the proxy spends on a request.
DEFAULT_SCAN_LIMIT = 32

# A backend must be at least 20 % cheaper than the best seen so far to replace it: costs closer than that are a
# tie, which the rotating start breaks, so replicas of about the same speed share a sequential client's traffic
# (a strict argmin sends all of it to whichever measured a hair faster). A 2x gap (one request in flight) or a
# slower backend is never a tie. Simulated S1-S4 p99 stay within a few per cent of the strict scan's.
_TIE = 0.8


class WrtStats:
    """Per-backend state of `WeightedResponseTime`: a Peak-EWMA latency estimate and the slow-start ramp."""

    __slots__ = ("owner", "estimate", "stamp", "ramp_start", "ramp_end", "samples", "failures")

    def __init__(self, owner: WeightedResponseTime, estimate: float, now: float, ramp_end: float) -> None:
        self.owner = owner
        # Latency estimate in seconds as of `stamp`; it decays toward zero with time constant tau after that,
        # so a backend that gets no traffic (because it looked slow) is eventually probed again.
        self.estimate = estimate
        self.stamp = now
        self.ramp_start = now
        # Slow start ends here; equal to ramp_start when the backend starts warm.
        self.ramp_end = ramp_end
        self.samples = 0
        self.failures = 0


class WeightedResponseTime:
    """`wrt`: cost = decayed peak-sensitive latency estimate x (in_flight + 1) / weight; lowest cost wins.

    Peak EWMA (as in Finagle, Linkerd and Tower): a sample above the current estimate replaces it at once;
    a lower one pulls it down with weight 1 - exp(-dt/tau), dt being the time since the previous sample.
    Between samples the estimate decays toward zero with the same tau, which makes an idle backend cheap
    again after a while so that its recovery gets noticed.

    A failed request counts as a sample of at least `failure_penalty` times the larger of the backend's
    estimate and the service's typical latency, so a backend that fails fast never looks fast.

    A new or re-admitted backend joining a service whose other backends already have samples starts at their
    mean estimate and is in slow start for `slow_start` seconds: it is a candidate in only a fraction
    max(`slow_start_min`, elapsed / slow_start) of the picks, so it receives about that fraction of the
    traffic it would otherwise get.

    Up to `scan_limit` ready backends, every one is compared. Above, two are drawn at random (P2C), and
    another pair (up to `p2c_draws` pairs) while the best drawn is over `p2c_redraw` times slower than the
    service's typical backend. Either way a pick costs a few microseconds and touches only this service.
    """

    name = "wrt"
    # Told of each failed request once the estimate has taken it in, and sets `backend.consecutive_failures` to 0
    # on each success: outlier ejection (labelgw.control.outlier) without a wrapper's call per request. None:
    # nobody listens (the counter is then 0 anyway: only the detector raises it).
    failure_hook: Callable[[Backend], None] | None = None

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        *,
        tau: float = 10.0,
        slow_start: float = 10.0,
        slow_start_min: float = 0.1,
        default_latency: float = 0.03,
        failure_penalty: float = 5.0,
        max_penalty: float = 10.0,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
        p2c_draws: int = 3,
        p2c_redraw: float = 2.0,
    ) -> None:
        if tau <= 0:
            raise ValueError("tau must be positive")
        if slow_start < 0:
            raise ValueError("slow_start must not be negative")
        if not 0 < slow_start_min <= 1:
            raise ValueError("slow_start_min must be in (0, 1]")
        if default_latency <= 0:
            raise ValueError("default_latency must be positive")
        self._clock = clock
        self._rng = rng
        self.tau = tau
        self.slow_start = slow_start
        self.slow_start_min = slow_start_min
        self.default_latency = default_latency
        self.failure_penalty = failure_penalty
        self.max_penalty = max_penalty
        self.scan_limit = scan_limit
        self.p2c_draws = max(1, p2c_draws)
        self.p2c_redraw = p2c_redraw
        # Mean latency of successful requests across this service (count-based EWMA): the scale for penalties.
        self._typical = default_latency
        self._successes = 0
        self._samples = 0
        # Traffic-weighted mean of the backends' estimates: what "a normal backend" costs, for P2C's redraws.
        self._typical_estimate = default_latency
        self._next = 0

    # -- Policy protocol ------------------------------------------------------------------------------

    def pick(self, ready: Sequence[Backend]) -> Backend | None:
        count = len(ready)
        if count == 0:
            return None
        if count == 1:
            return ready[0]
        now = self._clock()
        if count <= self.scan_limit:
            return self._scan(ready, count, now)
        return self._two_choices(ready, count, now)

    def on_start(self, backend: Backend) -> None:
        # The proxy counts in_flight; nothing else is needed at dispatch.
        pass

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        now = self._clock()
        stats = backend.stats
        # Not isinstance: every policy's stats have an owner (as in _scan); this runs once per request.
        if stats is None or stats.owner is not self:
            stats = self._adopt(backend, (), now)
        gap = now - stats.stamp
        if gap > 0:
            decay = _exp(-gap / self.tau)
            current = stats.estimate * decay
        else:
            decay = 1.0
            current = stats.estimate
        if failed:
            stats.failures += 1
            penalty = self.failure_penalty * max(current, self._typical)
            sample = max(elapsed, min(penalty, self.max_penalty))
        else:
            sample = elapsed
            # Running mean over the first 32 successes, then an EWMA over about the last 32: max(0.03, 1 /
            # successes), without the builtin's call or, from the 34th on, the division (1 / 34 < 0.03 <= 1 / 33).
            self._successes = successes = self._successes + 1
            self._typical += (elapsed - self._typical) * (1.0 / successes if successes < 34 else 0.03)
            # A success ends a run of failures (see failure_hook).
            backend.consecutive_failures = 0
        # A lower sample, even the first one after the starting guess, only pulls with the time-based weight:
        # one lucky fast request must not make a backend the favourite of a whole service (in the simulator,
        # trusting first samples raised the p99 of 128-backend services by a third).
        if sample > current:
            stats.estimate = estimate = sample
        else:
            stats.estimate = estimate = current + sample * (1.0 - decay)
        stats.stamp = now
        stats.samples += 1
        # max(0.01, 1 / samples), the same way (1 / 100 is 0.01).
        self._samples = samples = self._samples + 1
        self._typical_estimate += (estimate - self._typical_estimate) * (1.0 / samples if samples < 100 else 0.01)
        if failed:
            hook = self.failure_hook
            if hook is not None:
                hook(backend)

    def on_ready(self, backend: Backend) -> None:
        """The backend (re)enters the ready set after an ejection or a failed health check: start it afresh."""
        backend.stats = None

    # -- internals ------------------------------------------------------------------------------------

    def _scan(self, ready: Sequence[Backend], count: int, now: float) -> Backend:
        exp = math.exp
        inv_tau = 1.0 / self.tau
        # Rotate the starting point so that equal costs (idle backends with equal estimates) take turns.
        start = self._next % count
        self._next = start + 1
        best: Backend | None = None
        best_cost = math.inf
        # Best among the backends a slow-start draw left out, used only if every backend was left out.
        spare: Backend | None = None
        spare_cost = math.inf
        for offset in range(count):
            index = start + offset
            backend = ready[index - count if index >= count else index]
            stats = backend.stats
            if stats is None or stats.owner is not self:
                stats = self._adopt(backend, ready, now)
            age = now - stats.stamp
            # age < 0 only if a wall clock stepped back: no decay then (and no overflow).
            estimate = stats.estimate * exp(-age * inv_tau) if age > 0 else stats.estimate
            cost = estimate * (backend.in_flight + 1) / (backend.weight or 1e-9)
            if stats.ramp_end > now and self._rng.random() >= self._ramp(stats, now):
                if cost < spare_cost:
                    spare, spare_cost = backend, cost
                continue
            # Near-equal costs are a tie (see _TIE), which the rotation above breaks.
            if cost < best_cost * _TIE:
                best, best_cost = backend, cost
        if best is None:
            assert spare is not None
            return spare
        return best

    def _two_choices(self, ready: Sequence[Backend], count: int, now: float) -> Backend:
        rng = self._rng
        best: Backend | None = None
        best_cost = best_estimate = math.inf
        spare: Backend | None = None
        spare_cost = math.inf
        # Plain P2C must take a slow backend whenever both draws are slow: with a fraction f of slow
        # backends they get f^2 of the traffic, more than they can serve once f is large (20 % slow at
        # 10x overloads them at 61 % load). So draw another pair, up to p2c_draws pairs in all, while the
        # best so far is much slower than the service's typical backend.
        limit = self.p2c_redraw * self._typical_estimate
        for _ in range(self.p2c_draws):
            first = rng.randrange(count)
            second = rng.randrange(count - 1)
            if second >= first:
                second += 1
            for backend in (ready[first], ready[second]):
                stats = backend.stats
                if stats is None or stats.owner is not self:
                    stats = self._adopt(backend, ready, now)
                age = now - stats.stamp
                estimate = stats.estimate * math.exp(-age / self.tau) if age > 0 else stats.estimate
                cost = estimate * (backend.in_flight + 1) / (backend.weight or 1e-9)
                # A backend in slow start that loses its draw only wins if every other candidate lost too.
                if stats.ramp_end > now and rng.random() >= self._ramp(stats, now):
                    if cost < spare_cost:
                        spare, spare_cost = backend, cost
                    continue
                if cost < best_cost:
                    best, best_cost, best_estimate = backend, cost, estimate
            if best_estimate <= limit:
                break
        if best is None:
            assert spare is not None
            return spare
        return best

    def _ramp(self, stats: WrtStats, now: float) -> float:
        if now >= stats.ramp_end:
            return 1.0
        return max(self.slow_start_min, (now - stats.ramp_start) / self.slow_start)

    def _adopt(self, backend: Backend, ready: Sequence[Backend], now: float) -> WrtStats:
        """First sight of a backend: a starting estimate, and slow start unless the service is itself new."""
        total = 0.0
        known = 0
        for peer in ready:
            stats = peer.stats
            if peer is not backend and isinstance(stats, WrtStats) and stats.owner is self and stats.samples:
                total += stats.estimate * math.exp(min(0.0, stats.stamp - now) / self.tau)
                known += 1
        if known:
            estimate = total / known
            ramp_end = now + self.slow_start
        else:
            # Nothing to compare with (a new service, or the gateway just started): no one to protect, and
            # every backend starts warm at once; adopting them one by one (as P2C would) would leave all but
            # the first pair in slow start.
            for peer in ready:
                if peer is not backend and not (isinstance(peer.stats, WrtStats) and peer.stats.owner is self):
                    peer.stats = WrtStats(self, self.default_latency, now, now)
            estimate = self.default_latency
            ramp_end = now
        stats = WrtStats(self, max(estimate, 1e-6), now, ramp_end)
        backend.stats = stats
        return stats

    def describe(self, backend: Backend) -> dict[str, Any]:
        stats = backend.stats
        view: dict[str, Any] = {"policy": self.name, "in_flight": backend.in_flight, "weight": backend.weight}
        if not isinstance(stats, WrtStats) or stats.owner is not self:
            view.update(latency_ms=None, slow_start=None, samples=0, failures=0)
            return view
        now = self._clock()
        estimate = stats.estimate * math.exp(min(0.0, stats.stamp - now) / self.tau)
        view.update(
            latency_ms=round(estimate * 1000.0, 3),
            slow_start=round(self._ramp(stats, now), 3),
            samples=stats.samples,
            failures=stats.failures,
        )
        return view


class LeastConn:
    """`least_conn`: fewest in-flight requests per unit of weight; ties taken in turn. Latency-blind."""

    name = "least_conn"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, ready: Sequence[Backend]) -> Backend | None:
        if not ready:
            return None
        best_load = math.inf
        ties = 0
        for backend in ready:
            load = backend.in_flight / (backend.weight or 1e-9)
            if load < best_load:
                best_load, ties = load, 1
            elif load == best_load:
                ties += 1
        # The next of the least loaded in turn: fair among them even when the set of ties changes.
        wanted = self._next % ties
        self._next += 1
        for backend in ready:
            if backend.in_flight / (backend.weight or 1e-9) == best_load:
                if not wanted:
                    return backend
                wanted -= 1
        raise AssertionError("unreachable")

    def on_start(self, backend: Backend) -> None:
        pass

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        pass

    def on_ready(self, backend: Backend) -> None:
        pass


class HashStats:
    """Per-backend state of `ConsistentHash`: its slow-start ramp."""

    __slots__ = ("owner", "ramp_start", "ramp_end")

    def __init__(self, owner: ConsistentHash, now: float, ramp_end: float) -> None:
        self.owner = owner
        self.ramp_start = now
        self.ramp_end = ramp_end


# Rings kept per policy, by ready-set identity and by member list; a service has a handful of live sets (its
# ready set, one per version, a retry's set without the failed backend).
_RING_CACHE = 32


class ConsistentHash:
    """`hash`: one request key (the client address, a header, a cookie, the path: `key_source`, read by the HTTP
    layer) always reaches the same backend while the ready set is unchanged; consistent hashing with bounded
    loads (Mirrokni, Thorup, Zadimoghaddam 2018) over a ring with points in proportion to the weights
    (labelgw.core.hashing).

    A key goes to the first backend clockwise from its hash that has room: after taking the request it may hold
    at most load_factor x its weighted share of the m + 1 requests in flight to the candidates (rounded down;
    never less than the share rounded up; labelgw.core.hashing.capacity). So no backend is given a request that
    takes it over 1.25 x its share, and a hot key spills to the next backends on the ring (and comes back when
    the load falls). An ejected or unready backend is not in the ready set: its keys go to the
    next backend on the ring and come back when it does; nobody else's keys move.

    A new or re-admitted backend joining a service that already had traffic is in slow start for `slow_start`
    seconds: it takes only the keys whose own uniform draw is under max(`slow_start_min`, elapsed / slow_start),
    a fraction that only grows, so a key moves to it once and stays. A request without a key (the header or
    cookie missing) gets a random position on the ring, under the same bound.
    """

    name = "hash"

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        *,
        key_source: HashKey | None = None,
        load_factor: float = LOAD_FACTOR,
        slow_start: float = 10.0,
        slow_start_min: float = 0.1,
    ) -> None:
        if load_factor <= 1:
            raise ValueError("load_factor must be above 1")
        if slow_start < 0:
            raise ValueError("slow_start must not be negative")
        if not 0 < slow_start_min <= 1:
            raise ValueError("slow_start_min must be in (0, 1]")
        self._clock = clock
        self._rng = rng
        self.key_source = key_source if key_source is not None else HashKey()
        self.load_factor = load_factor
        self.slow_start = slow_start
        self.slow_start_min = slow_start_min
        self._by_identity: dict[int, tuple[Sequence[Backend], Ring]] = {}
        self._by_members: dict[tuple[tuple[str, float], ...], Ring] = {}

    # -- Policy protocol ------------------------------------------------------------------------------

    def pick(self, ready: Sequence[Backend]) -> Backend | None:
        """A request without a key: a random position on the ring."""
        if not ready:
            return None
        return self._place(ready, self._rng.getrandbits(64), self._rng.random())

    def pick_by_key(self, ready: Sequence[Backend], key: bytes) -> Backend | None:
        """The backend for `key` (the bytes the HTTP layer read from the request)."""
        if not ready:
            return None
        position, draw = key_hash(key)
        return self._place(ready, position, draw)

    def on_start(self, backend: Backend) -> None:
        pass

    def on_finish(self, backend: Backend, elapsed: float, failed: bool) -> None:
        pass

    def on_ready(self, backend: Backend) -> None:
        backend.stats = None  # slow start again on next sight

    # -- internals ------------------------------------------------------------------------------------

    def ring(self, ready: Sequence[Backend]) -> Ring:
        """The ring of this ready set (cached: built again only when the set is rebuilt with other members or
        weights)."""
        entry = self._by_identity.get(id(ready))
        if entry is not None and entry[0] is ready:
            return entry[1]
        members = tuple((backend.key, backend.weight) for backend in ready)
        ring = self._by_members.get(members)
        if ring is None:
            if len(self._by_members) >= _RING_CACHE:
                self._by_members.clear()
            ring = self._by_members[members] = Ring(members)
        if len(self._by_identity) >= _RING_CACHE:
            self._by_identity.clear()
        # The tuple is kept with its id, so that the id cannot be reused by another set while cached.
        self._by_identity[id(ready)] = (ready, ring)
        return ring

    def _place(self, ready: Sequence[Backend], position: int, draw: float) -> Backend:
        if len(ready) == 1:
            return ready[0]
        entry = self._by_identity.get(id(ready))
        ring = entry[1] if entry is not None and entry[0] is ready else self.ring(ready)
        now = self._clock()
        total = 0
        for backend in ready:
            total += backend.in_flight
        load_factor = self.load_factor
        share = (total + 1) / ring.total_weight
        # The common case first: the key's own backend, warm, with room.
        backend = ready[ring.owners[ring.first(position)]]
        stats = backend.stats
        if isinstance(stats, HashStats) and stats.owner is self and stats.ramp_end <= now:
            fair = share * backend.weight
            if backend.in_flight < max(math.ceil(fair - 1e-9), math.floor(load_factor * fair + 1e-9)):
                return backend
        # Passed over only for slow start: taken if nobody else has room.
        spare: Backend | None = None
        for index in ring.successors(position):
            backend = ready[index]
            stats = backend.stats
            if not isinstance(stats, HashStats) or stats.owner is not self:
                stats = self._adopt(backend, ready, now)
            # labelgw.core.hashing.capacity, inlined: this runs once or twice per request.
            fair = share * backend.weight
            room = backend.in_flight < max(math.ceil(fair - 1e-9), math.floor(load_factor * fair + 1e-9))
            if stats.ramp_end > now and draw >= self._ramp(stats, now):
                if room and spare is None:
                    spare = backend
                continue
            if room:
                return backend
        if spare is not None:
            return spare
        # Unreachable while weights are positive (the capacities add up to more than m); kept for safety.
        return min(ready, key=lambda backend: backend.in_flight / (backend.weight or 1e-9))

    def _ramp(self, stats: HashStats, now: float) -> float:
        if now >= stats.ramp_end:
            return 1.0
        return max(self.slow_start_min, (now - stats.ramp_start) / self.slow_start)

    def _adopt(self, backend: Backend, ready: Sequence[Backend], now: float) -> HashStats:
        """First sight of a backend: slow start, unless the service is itself new (then everyone starts warm)."""
        known = any(
            isinstance(peer.stats, HashStats) and peer.stats.owner is self for peer in ready if peer is not backend
        )
        if not known:
            for peer in ready:
                if peer is not backend:
                    peer.stats = HashStats(self, now, now)
        stats = HashStats(self, now, now + self.slow_start if known else now)
        backend.stats = stats
        return stats

    def describe(self, backend: Backend) -> dict[str, Any]:
        stats = backend.stats
        ramp = None
        if isinstance(stats, HashStats) and stats.owner is self:
            ramp = round(self._ramp(stats, self._clock()), 3)
        return {
            "policy": self.name, "in_flight": backend.in_flight, "weight": backend.weight, "latency_ms": None,
            "slow_start": ramp, "samples": 0, "failures": 0, "hash_key": str(self.key_source),
        }


def make_policy(name: str, clock: Clock, rng: random.Random, **params: Any) -> Policy:
    """Build the policy called `name` (one of POLICY_NAMES). `params` go to its constructor (wrt and hash)."""
    if name == "wrt":
        return WeightedResponseTime(clock, rng, **params)
    if name == "hash":
        return ConsistentHash(clock, rng, **params)
    if params:
        raise TypeError(f"policy {name!r} takes no parameters, got {sorted(params)}")
    if name == "round_robin":
        return RoundRobin()
    if name == "least_conn":
        return LeastConn()
    raise ValueError(f"unknown balancer {name!r}; expected one of {', '.join(POLICY_NAMES)}")


def service_policy_factory(
    default: str,
    clock: Clock,
    *,
    tau: float = 10.0,
    rng_factory: Callable[[], random.Random] = random.Random,
) -> Callable[[ContainerSpec], Policy]:
    """The registry's policy factory: a service gets the policy its first container's `balancer` label names,
    else `default` (--balancer); `wrt` with the time constant `tau`. Each service has its own random source."""
    if default not in POLICY_NAMES:
        raise ValueError(f"unknown balancer {default!r}; expected one of {', '.join(POLICY_NAMES)}")

    def build(spec: ContainerSpec) -> Policy:
        name = spec.balancer or default
        params: dict[str, Any] = {"tau": tau} if name == "wrt" else {}
        if name == "hash":
            params = {"key_source": spec.hash_key}
        return make_policy(name, clock, rng_factory(), **params)

    return build


def describe(backend: Backend) -> dict[str, Any]:
    """Read-only snapshot of a backend's selection state for the admin view (JSON-ready)."""
    stats = backend.stats
    if isinstance(stats, (WrtStats, HashStats)):
        return stats.owner.describe(backend)
    return {
        "policy": None,
        "in_flight": backend.in_flight,
        "weight": backend.weight,
        "latency_ms": None,
        "slow_start": None,
        "samples": 0,
        "failures": 0,
    }
