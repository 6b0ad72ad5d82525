"""Rate limit: a token bucket per key (client address, host, a request field or a cookie), shared by every
container of a service. Pure: time comes in as numbers, so the tests drive it with any clock.

Memory is bounded two ways. A bucket that has been idle long enough to be full again is the same as no bucket,
so it is dropped (checked from the least recently used end on every request: amortised O(1)). And at most
`max_keys` buckets are kept; a new key beyond that evicts the least recently used one, which only makes its
client look new (its bucket starts full): the limit can be exceeded by evicted clients, never be made stricter.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

from labelgw.core.middleware import RateLimitSpec
from labelgw.http.parser import RequestHead

__all__ = ["DEFAULT_MAX_KEYS", "KeyedRateLimiter", "TokenBucket", "key_function"]

DEFAULT_MAX_KEYS = 10_000
# Clock readings are floats near 1e9: a token due "exactly now" can come out a few 1e-11 short.
_ONE = 1.0 - 1e-6


class TokenBucket:
    """`rate` tokens a second, at most `burst`; starts full."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.stamp = now

    def refill(self, rate: float, burst: float, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(burst, self.tokens + elapsed * rate)
            self.stamp = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        """One token if there is one."""
        self.refill(rate, burst, now)
        if self.tokens >= _ONE:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def wait(self, rate: float) -> float:
        """Seconds until the next token (0 when there is one)."""
        return 0.0 if self.tokens >= _ONE else (1.0 - self.tokens) / rate


class KeyedRateLimiter:
    """One token bucket per key, least recently used first; idle ones expire, at most `max_keys` kept."""

    def __init__(self, spec: RateLimitSpec, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.spec = spec
        self.rate = spec.rate
        self.burst = spec.burst
        self.max_keys = max_keys
        # A bucket idle this long is full again: forgetting it changes nothing.
        self.idle_expiry = spec.burst / spec.rate
        self._buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()
        # No bucket can have expired before this time (never later than the oldest bucket's expiry: a used bucket
        # only moves that expiry later), so most requests skip the look at the oldest bucket.
        self._sweep_at = math.inf
        # The key last inserted or moved to the end: while it is in `_buckets` it is the last one (expiry and eviction
        # take from the front), so a client asking again needs no move_to_end (the chain reads it too).
        self._newest: bytes | None = None
        self.limited = 0
        self.evicted = 0
        # RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers): the quota as the label states it.
        self.policy_field = b'RateLimit-Policy: "default";q=%d;w=%d\r\n' % (
            max(1, round(spec.quota)), max(1, round(spec.window))
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: bytes, now: float) -> float:
        """0.0 when the request may go (one token taken); else the seconds until the key's next token."""
        buckets = self._buckets
        # Runs per request: the expiry scan only when the oldest bucket may be due, TokenBucket.take inlined.
        if now >= self._sweep_at:
            self._expire(now)
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
                self.evicted += 1
            bucket = buckets[key] = TokenBucket(self.burst, now)
            if len(buckets) == 1:
                self._sweep_at = now + self.idle_expiry
        else:
            buckets.move_to_end(key)
        self._newest = key
        tokens = bucket.tokens
        elapsed = now - bucket.stamp
        if elapsed > 0:
            # min(burst, ...) and max(0.0, ...) below, written out: no builtin calls per request.
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            bucket.stamp = now
        if tokens >= _ONE:
            bucket.tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return 0.0
        bucket.tokens = tokens
        self.limited += 1
        return bucket.wait(self.rate)

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        horizon = now - self.idle_expiry
        while buckets:
            key, oldest = next(iter(buckets.items()))
            if oldest.stamp > horizon:
                self._sweep_at = oldest.stamp + self.idle_expiry
                return
            del buckets[key]
        self._sweep_at = math.inf

    def refusal_fields(self, wait: float) -> bytes:
        """Retry-After and the draft's RateLimit fields of a 429 (whole seconds, rounded up, at least 1)."""
        seconds = max(1, math.ceil(wait))
        return b"Retry-After: %d\r\n%sRateLimit: \"default\";r=0;t=%d\r\n" % (seconds, self.policy_field, seconds)


def key_function(spec: RateLimitSpec) -> Callable[[RequestHead, bytes], bytes]:
    """The request's bucket key: from the head and the client address. A request without the field or cookie
    the key names is keyed by its client address (it cannot escape the limit by leaving the field out)."""
    kind = spec.key
    if kind == "ip":
        return lambda head, peer: peer
    if kind == "host":
        return lambda head, peer: b"\x00h" + (head.host or b"").lower()
    if kind == "header":
        field = spec.key_name.encode("ascii")

        def by_header(head: RequestHead, peer: bytes) -> bytes:
            value = head.field(field)
            return b"\x00f" + value if value is not None else peer

        return by_header
    name = spec.key_name.encode("ascii")

    def by_cookie(head: RequestHead, peer: bytes) -> bytes:
        if head.field(b"cookie") is None:
            return peer
        # Every Cookie field: HTTP/2 clients send each cookie as a field of its own (RFC 9113 8.2.3).
        for field_name, cookies in head.headers:
            if field_name.lower() != b"cookie":
                continue
            for pair in cookies.split(b";"):
                key, equals, value = pair.strip().partition(b"=")
                if equals and key == name:
                    return b"\x00c" + value
        return peer

    return by_cookie
