"""The middlewares' pure parts, each with time passed in or a task.Clock: token buckets and their keys, the
keyed limiter's memory bounds, the concurrency limiter's FIFO queue and timeouts, the circuit breaker."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from labelgw.core.middleware import BreakerSpec, ConcurrencySpec, RateLimitSpec
from labelgw.http.parser import parse_request_head
from labelgw.middleware.breaker import CLOSED, DENY, HALF_OPEN, OPEN, PASS, PROBE, CircuitBreaker
from labelgw.middleware.concurrency import ADMITTED, QUEUED, REJECTED, ConcurrencyLimiter
from labelgw.middleware.ratelimit import KeyedRateLimiter, TokenBucket, key_function

T0 = 1_000_000.0


def rate(per_second: float, burst: float, key: Any = "ip", key_name: str = "") -> RateLimitSpec:
    return RateLimitSpec(rate=per_second, burst=burst, quota=per_second, window=1.0, key=key, key_name=key_name)


# --- token bucket -----------------------------------------------------------------------------------------------


def test_bucket_starts_full_and_spends_its_burst() -> None:
    bucket = TokenBucket(3, T0)
    assert [bucket.take(1.0, 3, T0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(1.0) == pytest.approx(1.0)


def test_bucket_refills_at_the_rate_and_never_above_the_burst() -> None:
    bucket = TokenBucket(2, T0)
    assert bucket.take(10.0, 2, T0) and bucket.take(10.0, 2, T0) and not bucket.take(10.0, 2, T0)
    assert not bucket.take(10.0, 2, T0 + 0.05)  # half a token
    assert bucket.take(10.0, 2, T0 + 0.1)
    bucket.refill(10.0, 2, T0 + 1000)
    assert bucket.tokens == 2


def test_limiter_ten_per_second_burst_ten() -> None:
    limiter = KeyedRateLimiter(rate(10, 10))
    answers = [limiter.allow(b"10.0.0.1", T0) for _ in range(30)]
    assert answers[:10] == [0.0] * 10
    assert all(wait == pytest.approx(0.1) for wait in answers[10:])
    assert limiter.limited == 20
    # Another key is not affected; the first gets one token back 0.1 s later.
    assert limiter.allow(b"10.0.0.2", T0) == 0.0
    assert limiter.allow(b"10.0.0.1", T0 + 0.1) == 0.0
    assert limiter.allow(b"10.0.0.1", T0 + 0.1) > 0


def test_refusal_fields_follow_the_draft() -> None:
    spec = RateLimitSpec(rate=100 / 60, burst=2, quota=100, window=60)
    fields = KeyedRateLimiter(spec).refusal_fields(0.6)
    assert fields == b'Retry-After: 1\r\nRateLimit-Policy: "default";q=100;w=60\r\nRateLimit: "default";r=0;t=1\r\n'
    assert KeyedRateLimiter(spec).refusal_fields(2.01).startswith(b"Retry-After: 3\r\n")


def test_idle_keys_expire_once_their_bucket_is_full_again() -> None:
    limiter = KeyedRateLimiter(rate(10, 5))  # full again after 0.5 s idle
    limiter.allow(b"a", T0)
    limiter.allow(b"b", T0 + 0.3)
    assert len(limiter) == 2
    limiter.allow(b"c", T0 + 0.6)  # a idle 0.6 s: gone; b idle 0.3 s: kept
    assert len(limiter) == 2
    limiter.allow(b"c", T0 + 10)
    assert len(limiter) == 1


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.floats(0, 0.4)), max_size=40),
       max_keys=st.integers(1, 3))
def test_expiry_skipped_between_sweeps_keeps_exactly_the_buckets_a_scan_per_request_keeps(
    steps: list[tuple[bytes, float]], max_keys: int
) -> None:
    """The sweep time only saves looks at the oldest bucket: same buckets, same answers as scanning every time."""
    limiter = KeyedRateLimiter(rate(10, 3), max_keys=max_keys)  # idle expiry 0.3 s
    model: dict[bytes, TokenBucket] = {}
    now = T0
    for key, step in steps:
        now += step
        for old in [k for k, bucket in model.items() if bucket.stamp <= now - 0.3]:
            del model[old]
        if key not in model and len(model) >= max_keys:
            del model[next(iter(model))]
        bucket = model.pop(key, None) or TokenBucket(3, now)
        model[key] = bucket
        allowed = bucket.take(10, 3, now)
        assert (limiter.allow(key, now) == 0.0) == allowed
        assert list(limiter._buckets) == list(model)


def test_key_count_is_capped_least_recently_used_first() -> None:
    limiter = KeyedRateLimiter(rate(1, 1), max_keys=3)
    for key in (b"a", b"b", b"c"):
        assert limiter.allow(key, T0) == 0.0
    assert limiter.allow(b"a", T0) > 0  # a is now the most recently used
    assert limiter.allow(b"d", T0) == 0.0  # evicts b
    assert len(limiter) == 3 and limiter.evicted == 1
    assert limiter.allow(b"a", T0) > 0  # a kept its empty bucket
    assert limiter.allow(b"b", T0) == 0.0  # b forgotten: new and full (evicts c)


def head(extra: bytes = b"", host: bytes = b"api.localhost") -> Any:
    return parse_request_head(b"GET / HTTP/1.1\r\nHost: " + host + (b"\r\n" + extra[:-2] if extra else b""))


def test_keys() -> None:
    peer = b"10.0.0.9"
    assert key_function(rate(1, 1))(head(), peer) == peer
    by_host = key_function(rate(1, 1, "host"))
    assert by_host(head(host=b"API.localhost"), peer) == by_host(head(), b"10.0.0.1") != peer
    by_header = key_function(rate(1, 1, "header", "x-client"))
    assert by_header(head(b"X-Client: alice\r\n"), peer) != by_header(head(b"x-client: bob\r\n"), peer)
    assert by_header(head(b"X-Client: alice\r\n"), peer) == by_header(head(b"X-Client: alice\r\n"), b"10.0.0.1")
    assert by_header(head(), peer) == peer  # no field: keyed by the client address
    by_cookie = key_function(rate(1, 1, "cookie", "session"))
    assert by_cookie(head(b"Cookie: a=1; session=s1\r\n"), peer) == by_cookie(head(b"Cookie: session=s1\r\n"), b"x")
    assert by_cookie(head(b"Cookie: sessionx=s1\r\n"), peer) == peer
    assert by_cookie(head(b"Cookie: a=1\r\nCookie: session=s1\r\n"), peer) == by_cookie(head(b"Cookie: session=s1\r\n"), peer)
    # A field value can never pose as a client address.
    assert by_header(head(b"X-Client: 10.0.0.9\r\n"), b"10.0.0.1") != peer


# --- concurrency limiter ----------------------------------------------------------------------------------------


class W:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    def admitted(self) -> None:
        self.log.append(f"{self.name} admitted")

    def timed_out(self) -> None:
        self.log.append(f"{self.name} timed out")


def test_limit_then_fifo_queue_then_rejection() -> None:
    clock = Clock()
    log: list[str] = []
    limiter = ConcurrencyLimiter(ConcurrencySpec(2, 2, 1.0), clock)
    waiters = [W(log, str(i)) for i in range(5)]
    assert [limiter.acquire(w) for w in waiters] == [ADMITTED, ADMITTED, QUEUED, QUEUED, REJECTED]
    assert (limiter.active, limiter.pending, limiter.rejected) == (2, 2, 1)
    limiter.release()
    assert log == ["2 admitted"]
    limiter.release()
    assert log == ["2 admitted", "3 admitted"]
    assert (limiter.active, limiter.pending) == (2, 0)
    clock.advance(5)
    assert log == ["2 admitted", "3 admitted"]  # admitted waiters' timers were cancelled
    assert not clock.getDelayedCalls()


def test_waiters_time_out_in_order_and_a_later_slot_skips_them() -> None:
    clock = Clock()
    log: list[str] = []
    limiter = ConcurrencyLimiter(ConcurrencySpec(1, 3, 1.0), clock)
    first, second, third = W(log, "a"), W(log, "b"), W(log, "c")
    assert limiter.acquire(W(log, "x")) == ADMITTED
    limiter.acquire(first)
    clock.advance(0.5)
    limiter.acquire(second)
    limiter.acquire(third)
    limiter.cancel(third)  # its client left
    clock.advance(0.5)
    assert log == ["a timed out"]
    clock.advance(0.5)
    assert log == ["a timed out", "b timed out"]
    assert limiter.timeouts == 2 and limiter.pending == 0
    limiter.release()
    assert limiter.active == 0 and log == ["a timed out", "b timed out"]


def test_without_a_queue_the_request_over_the_limit_is_rejected() -> None:
    limiter = ConcurrencyLimiter(ConcurrencySpec(1), Clock())
    assert limiter.acquire(W([], "a")) == ADMITTED
    assert limiter.acquire(W([], "b")) == REJECTED
    limiter.release()
    assert limiter.acquire(W([], "c")) == ADMITTED


def test_a_new_request_never_overtakes_the_queue() -> None:
    log: list[str] = []
    limiter = ConcurrencyLimiter(ConcurrencySpec(1, 1, 1.0), Clock())
    limiter.acquire(W(log, "a"))
    limiter.acquire(W(log, "b"))
    limiter.active = 0  # a slot came free without a release (cannot happen; checks the rule alone)
    assert limiter.acquire(W(log, "c")) == REJECTED


# --- circuit breaker --------------------------------------------------------------------------------------------


def traffic(breaker: CircuitBreaker, now: float, ok: int, failed: int) -> None:
    for _ in range(ok):
        assert breaker.admit(now) == PASS
        breaker.record(now, False)
    for _ in range(failed):
        if breaker.admit(now) == PASS:
            breaker.record(now, True)


def test_breaker_needs_enough_requests_and_the_error_rate() -> None:
    breaker = CircuitBreaker(BreakerSpec(0.5, window=10, open_for=5))
    traffic(breaker, T0, 0, 19)
    assert breaker.state is CLOSED  # 19 requests: below the minimum of 20
    traffic(breaker, T0, 0, 1)
    assert breaker.state is OPEN and breaker.opened == 1
    assert breaker.admit(T0 + 1) == DENY
    assert breaker.retry_after(T0 + 1) == 4


def test_breaker_stays_closed_below_the_rate() -> None:
    breaker = CircuitBreaker(BreakerSpec(0.5))
    traffic(breaker, T0, 60, 59)
    assert breaker.state is CLOSED
    assert breaker.counts(T0) == (119, 59)


def test_window_slides() -> None:
    breaker = CircuitBreaker(BreakerSpec(0.5, window=10))
    traffic(breaker, T0, 0, 15)
    # 11 s later those failures have left the window: 15 more are again below the minimum... and then not.
    traffic(breaker, T0 + 11, 0, 15)
    assert breaker.state is CLOSED and breaker.counts(T0 + 11) == (15, 15)
    traffic(breaker, T0 + 12, 0, 5)
    assert breaker.state is OPEN


def open_breaker(probes: int = 3) -> CircuitBreaker:
    breaker = CircuitBreaker(BreakerSpec(0.5, window=10, open_for=5, probes=probes))
    traffic(breaker, T0, 0, 20)
    assert breaker.state is OPEN
    return breaker


def test_half_open_lets_probes_through_and_closes_after_they_succeed() -> None:
    breaker = open_breaker()
    assert breaker.admit(T0 + 4.9) == DENY
    assert [breaker.admit(T0 + 5) for _ in range(4)] == [PROBE, PROBE, PROBE, DENY]
    assert breaker.state is HALF_OPEN
    breaker.record(T0 + 5.1, False, probe=True)
    breaker.record(T0 + 5.1, False, probe=True)
    assert breaker.state is HALF_OPEN
    breaker.record(T0 + 5.1, False, probe=True)
    assert breaker.state is CLOSED and breaker.counts(T0 + 5.1) == (0, 0)
    assert breaker.admit(T0 + 5.2) == PASS


def test_a_failed_probe_opens_again() -> None:
    breaker = open_breaker()
    assert breaker.admit(T0 + 5) == PROBE
    breaker.record(T0 + 6, True, probe=True)
    assert breaker.state is OPEN and breaker.opened == 2
    assert breaker.admit(T0 + 10.9) == DENY
    assert breaker.admit(T0 + 11) == PROBE


def test_an_abandoned_probe_gives_its_place_back() -> None:
    breaker = open_breaker(probes=1)
    assert breaker.admit(T0 + 5) == PROBE
    assert breaker.admit(T0 + 5) == DENY
    breaker.abandon(probe=True)
    assert breaker.admit(T0 + 5) == PROBE


def test_outcomes_of_requests_admitted_before_opening_are_ignored() -> None:
    breaker = open_breaker()
    breaker.record(T0 + 1, False)
    breaker.record(T0 + 1, True)
    assert breaker.state is OPEN and breaker.counts(T0 + 1) == (0, 0)
