"""The middleware options of a service, as typed values, and their labels. Pure: no I/O, no logging.

`parse_middleware` reads the middleware labels of one container (the suffixes after "<prefix>.") into one frozen
`MiddlewareSpec`, or None when the container sets none; a bad value raises `MiddlewareLabelError` naming the
label, which `labelgw.core.labels` turns into the container's Rejection (the config file: a ConfigError). The
runtime that acts on these values is `labelgw.middleware`.

The order of the chain (fixed, whatever order the labels are written in): rate limit, concurrency limit and
circuit breaker, fallback. The issue's full order also has allowlist, auth, body limit, headers and compression;
they take their places around these when they exist.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, TypeVar

# The request side (issue 10): allowlist, basic auth, body limit, header rules.
from labelgw.core.requestmw import (
    AllowSpec, AuthSpec, HeadersSpec, LabelProblem, REQUEST_LABELS, is_request_label, parse_request_side,
)

__all__ = [
    "MIDDLEWARE_LABELS",
    "BreakerSpec",
    "ConcurrencySpec",
    "FallbackSpec",
    "MiddlewareLabelError",
    "MiddlewareSpec",
    "RateLimitSpec",
    "is_middleware_label",
    "parse_middleware",
]

# Label suffixes after "<prefix>."; labelgw.core.labels adds them to its known labels.
MIDDLEWARE_LABELS: frozenset[str] = frozenset(
    {
        "ratelimit",
        "ratelimit.burst",
        "ratelimit.key",
        "max_inflight",
        "max_pending",
        "pending_timeout",
        "breaker.error_rate",
        "breaker.window",
        "breaker.open",
        "fallback",
        "fallback.status",
        "fallback.body",
    }
) | REQUEST_LABELS


def is_middleware_label(suffix: str) -> bool:
    """A middleware label, including the families whose suffix carries a name (`headers.request.set.X-Env`)."""
    return suffix in MIDDLEWARE_LABELS or is_request_label(suffix)

KeyKind = Literal["ip", "host", "header", "cookie"]

MAX_RATE = 1_000_000.0
MAX_COUNT = 1_000_000
MAX_SECONDS = 3600.0
MAX_BODY = 4096
DEFAULT_PENDING_TIMEOUT = 1.0
DEFAULT_BREAKER_WINDOW = 10.0
DEFAULT_BREAKER_OPEN = 5.0
# Fewer requests than this in the window never open the breaker: 1 failure out of 2 is not a 50 % error rate.
BREAKER_MIN_REQUESTS = 20
# Probes let through while half-open; all must succeed to close again.
BREAKER_PROBES = 3

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(?P<count>[0-9]+(?:\.[0-9]+)?)\s*/\s*(?P<unit>s|m|h)")
_COUNT = re.compile(r"[0-9]{1,7}")
_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*%?")
# A field name (RFC 9110 token) and a cookie name (RFC 6265 token).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

_T = TypeVar("_T")


class MiddlewareLabelError(ValueError):
    """One middleware label is wrong: `label` is its suffix after the prefix, `value` as written."""

    def __init__(self, label: str, value: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label
        self.value = value
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved; one token a request."""

    rate: float
    burst: float
    # As written: "100/s" -> quota 100 per window 1 s (the RateLimit-Policy field says it in these terms).
    quota: float
    window: float
    key: KeyKind = "ip"
    # The field or cookie name for key "header"/"cookie" (field names lower-case); "" otherwise.
    key_name: str = ""


@dataclass(frozen=True, slots=True)
class ConcurrencySpec:
    """At most `max_inflight` requests at once; `max_pending` more wait (FIFO) at most `pending_timeout` s."""

    max_inflight: int
    max_pending: int = 0
    pending_timeout: float = DEFAULT_PENDING_TIMEOUT


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """Open for `open_for` s when `error_rate` (a fraction) of at least `min_requests` requests in the last
    `window` s failed (5xx, gateway errors)."""

    error_rate: float
    window: float = DEFAULT_BREAKER_WINDOW
    open_for: float = DEFAULT_BREAKER_OPEN
    min_requests: int = BREAKER_MIN_REQUESTS
    probes: int = BREAKER_PROBES


@dataclass(frozen=True, slots=True)
class FallbackSpec:
    """Where a request goes that this service cannot take: another service, or a static answer."""

    service: str | None = None
    status: int | None = None
    body: str = ""


@dataclass(frozen=True, slots=True)
class MiddlewareSpec:
    """Every middleware of one service; None fields are off. A service with none of them has no spec at all."""

    ratelimit: RateLimitSpec | None = None
    concurrency: ConcurrencySpec | None = None
    breaker: BreakerSpec | None = None
    fallback: FallbackSpec | None = None
    # The request side (labelgw.core.requestmw, labelgw.middleware.access): allowlist, auth, body limit in bytes,
    # header rules.
    allow: AllowSpec | None = None
    auth: AuthSpec | None = None
    max_body: int | None = None
    headers: HeadersSpec | None = None


def parse_middleware(labels: Mapping[str, str], service: str = "") -> MiddlewareSpec | None:
    """The middleware labels among `labels` (suffix -> value) as one spec; None when there are none.

    Labels are checked in the chain's order so the message for a container never changes; `service` is the
    container's own service (a fallback to itself is refused)."""
    if not any(is_middleware_label(name) for name in labels):
        return None

    def check(suffix: str, parse: Callable[[str], _T]) -> _T | None:
        if suffix not in labels:
            return None
        raw = labels[suffix]
        try:
            return parse(raw.strip())
        except MiddlewareLabelError:
            raise
        except ValueError as error:
            raise MiddlewareLabelError(suffix, raw, str(error)) from None

    def needs(suffix: str, base: str) -> None:
        if suffix in labels and base not in labels:
            raise MiddlewareLabelError(suffix, labels[suffix], f"has no effect without the {base} label")

    ratelimit = None
    rate = check("ratelimit", _parse_rate)
    needs("ratelimit.burst", "ratelimit")
    needs("ratelimit.key", "ratelimit")
    if rate is not None:
        quota, window = rate
        burst = check("ratelimit.burst", _parse_count)
        key = check("ratelimit.key", _parse_key) or ("ip", "")
        per_second = quota / window
        # Default: one second's worth, at least one request.
        default_burst = max(1.0, math.ceil(per_second))
        ratelimit = RateLimitSpec(
            rate=per_second,
            burst=float(burst) if burst is not None else default_burst,
            quota=quota,
            window=window,
            key=key[0],
            key_name=key[1],
        )

    concurrency = None
    needs("max_pending", "max_inflight")
    needs("pending_timeout", "max_inflight")
    max_inflight = check("max_inflight", _parse_count)
    if max_inflight is not None:
        max_pending = check("max_pending", _parse_count_or_zero)
        timeout = check("pending_timeout", _parse_duration)
        concurrency = ConcurrencySpec(
            max_inflight,
            0 if max_pending is None else max_pending,
            DEFAULT_PENDING_TIMEOUT if timeout is None else timeout,
        )

    breaker = None
    needs("breaker.window", "breaker.error_rate")
    needs("breaker.open", "breaker.error_rate")
    error_rate = check("breaker.error_rate", _parse_error_rate)
    if error_rate is not None:
        window_s = check("breaker.window", _parse_duration)
        open_s = check("breaker.open", _parse_duration)
        breaker = BreakerSpec(
            error_rate,
            DEFAULT_BREAKER_WINDOW if window_s is None else window_s,
            DEFAULT_BREAKER_OPEN if open_s is None else open_s,
        )

    fallback = None
    needs("fallback.body", "fallback.status")
    target = check("fallback", _parse_service)
    status = check("fallback.status", _parse_status)
    if target is not None and status is not None:
        raise MiddlewareLabelError(
            "fallback.status", labels["fallback.status"], "choose one: a fallback service or a static status"
        )
    if target is not None and target == service.lower():
        raise MiddlewareLabelError("fallback", labels["fallback"], "a service cannot be its own fallback")
    if target is not None or status is not None:
        body = check("fallback.body", _parse_body) or ""
        fallback = FallbackSpec(target, status, body)

    try:
        allow, auth, max_body, headers = parse_request_side(labels, service)
    except LabelProblem as problem:
        raise MiddlewareLabelError(problem.label, problem.value, problem.reason) from None

    if ratelimit is None and concurrency is None and breaker is None and fallback is None and (
        allow is None and auth is None and max_body is None and headers is None
    ):
        return None
    return MiddlewareSpec(ratelimit, concurrency, breaker, fallback, allow, auth, max_body, headers)


def _parse_rate(text: str) -> tuple[float, float]:
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError('not a rate (examples: "100/s", "600/m", "1000/h")')
    count = float(match["count"])
    window = _UNITS[match["unit"]]
    if not 0 < count or count / window > MAX_RATE:
        raise ValueError(f"rate must be positive and at most {MAX_RATE:g} a second")
    return count, window


def _parse_count(text: str) -> int:
    if _COUNT.fullmatch(text) is None or not 1 <= int(text) <= MAX_COUNT:
        raise ValueError(f"not a whole number from 1 to {MAX_COUNT}")
    return int(text)


def _parse_count_or_zero(text: str) -> int:
    if _COUNT.fullmatch(text) is None or int(text) > MAX_COUNT:
        raise ValueError(f"not a whole number from 0 to {MAX_COUNT}")
    return int(text)


def _parse_key(text: str) -> tuple[KeyKind, str]:
    kind, colon, name = text.partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if kind in ("ip", "host") and not colon:
        return ("ip", "") if kind == "ip" else ("host", "")
    if kind in ("header", "cookie"):
        if not name or _TOKEN.fullmatch(name) is None:
            raise ValueError(f"{kind}: needs a {'field' if kind == 'header' else 'cookie'} name (e.g. {kind}:X-Client)")
        return ("header", name.lower()) if kind == "header" else ("cookie", name)
    raise ValueError("unknown key; use ip, host, header:NAME or cookie:NAME")


def _parse_duration(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError('not a duration (examples: "5", "5s", "500ms", "1m")')
    seconds = float(match["number"]) * _DURATION_UNITS[match["unit"]]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError("duration must be positive and at most 1 hour")
    return seconds


def _parse_error_rate(text: str) -> float:
    match = _PERCENT.fullmatch(text)
    if match is None:
        raise ValueError('not a percentage (example: "50%")')
    percent = float(match["number"])
    if not 0 < percent <= 100:
        raise ValueError("error rate must be more than 0 and at most 100 percent")
    return percent / 100.0


def _parse_service(text: str) -> str:
    if _SERVICE.fullmatch(text) is None:
        raise ValueError("not a service name (letters, digits, '_', '.', '-'; at most 63 characters)")
    return text.lower()


def _parse_status(text: str) -> int:
    if _COUNT.fullmatch(text) is None or not 400 <= int(text) <= 599:
        raise ValueError("not an error status (400-599)")
    return int(text)


def _parse_body(text: str) -> str:
    if len(text) > MAX_BODY:
        raise ValueError(f"at most {MAX_BODY} characters")
    if any(ord(char) < 0x20 and char not in "\t\n" or ord(char) == 0x7F for char in text):
        raise ValueError("must not contain control characters")
    return text
