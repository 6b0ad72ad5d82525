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
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, TypeVar

# The request side (issue 10): allowlist, basic auth, body limit, header rules.
from labelgw.core.units import parse_duration, parse_percent
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
    "CompressSpec",
    "RegexSpec",
    "PluginUse",
    "expand",
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
# Compression, redirect and rewrite, plugins (issue 10): their own block, see "Response and path middlewares".
MIDDLEWARE_LABELS = MIDDLEWARE_LABELS | frozenset(
    {
        "compress",
        "compress.types",
        "compress.min_size",
        "redirect.regex",
        "redirect.replacement",
        "redirect.permanent",
        "rewrite.regex",
        "rewrite.replacement",
        "middlewares",
    }
)
# Labels "<prefix>.plugin.<name>.<key>": a plugin middleware's options (labelgw.middleware.plugin).
PLUGIN_LABEL_PREFIX = "plugin."


def is_middleware_label(suffix: str) -> bool:
    """A middleware label, including the families whose suffix carries a name (`headers.request.set.X-Env`); not
    the plugin options (`plugin.<name>.<key>`), which only labels carry."""
    return suffix in MIDDLEWARE_LABELS or is_request_label(suffix)


KeyKind = Literal["ip", "host", "header", "cookie"]

MAX_RATE = 1_000_000.0
MAX_COUNT = 1_000_000
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
    # Response and path middlewares (labelgw.middleware.compress, .rewrite) and plugin middlewares.
    compress: "CompressSpec | None" = None
    redirect: "RegexSpec | None" = None
    rewrite: "RegexSpec | None" = None
    plugins: "tuple[PluginUse, ...]" = ()


def parse_middleware(labels: Mapping[str, str], service: str = "") -> MiddlewareSpec | None:
    """The middleware labels among `labels` (suffix -> value) as one spec; None when there are none.

    Labels are checked in the chain's order so the message for a container never changes; `service` is the
    container's own service (a fallback to itself is refused)."""
    if not any(is_middleware_label(name) or name.startswith(PLUGIN_LABEL_PREFIX) for name in labels):
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
        timeout = check("pending_timeout", parse_duration)
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
        window_s = check("breaker.window", parse_duration)
        open_s = check("breaker.open", parse_duration)
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
    compress, redirect, rewrite, plugins = _parse_response_and_path(labels, check, needs)

    if (ratelimit is None and concurrency is None and breaker is None and fallback is None
            and allow is None and auth is None and max_body is None and headers is None
            and compress is None and redirect is None and rewrite is None and not plugins):
        return None
    return MiddlewareSpec(
        ratelimit, concurrency, breaker, fallback, allow=allow, auth=auth, max_body=max_body, headers=headers,
        compress=compress, redirect=redirect, rewrite=rewrite, plugins=plugins,
    )


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


def _parse_error_rate(text: str) -> float:
    percent = parse_percent(text)
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


# Response and path middlewares (issue 10): compression, redirect and rewrite by regex, plugin middlewares.

DEFAULT_COMPRESS_TYPES = (
    "text/*", "application/json", "application/javascript", "application/xml", "image/svg+xml",
    "application/wasm",
)
DEFAULT_COMPRESS_MIN_SIZE = 1024
MAX_REGEX = 1024
MAX_REPLACEMENT = 2048
_SIZE = re.compile(r"(?P<number>[0-9]{1,10})\s*(?P<unit>b|kb|kib|mb|mib)?", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024 * 1024, "mib": 1024 * 1024}
_MEDIA_RANGE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/(?:\*|[a-z0-9][a-z0-9!#$&^_.+-]*)")
# $1, ${1}, ${name} or $$ in a replacement.
_REFERENCE = re.compile(r"\$(?:(\d+)|\{(\w+)\}|(\$))")
_PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PLUGIN_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class CompressSpec:
    """gzip for responses of these media types (`text/*` matches every text type) of at least min_size bytes."""

    types: tuple[str, ...] = DEFAULT_COMPRESS_TYPES
    min_size: int = DEFAULT_COMPRESS_MIN_SIZE


@dataclass(frozen=True, slots=True)
class RegexSpec:
    """A regex and its replacement, pieces of literal text (str) and group references (int index or str name).
    For a redirect `permanent` chooses 308 over 307 (both keep the method)."""

    pattern: "re.Pattern[str]"
    replacement: tuple[str | int, ...]
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class PluginUse:
    """A plugin middleware (labelgw.middleware.plugin): its name, its options as labelled, and what the plugin's
    option parser made of them (not compared: the labels say the same)."""

    name: str
    options: tuple[tuple[str, str], ...]
    parsed: object = field(default=None, compare=False, hash=False)


def expand(spec: RegexSpec, match: "re.Match[str]") -> str:
    """The replacement for one match, its references filled with the groups (an unmatched group is "")."""
    return "".join(piece if isinstance(piece, str) else (match.group(piece) or "") for piece in spec.replacement)


def _parse_response_and_path(
    labels: Mapping[str, str], check: Callable[..., object], needs: Callable[[str, str], None]
) -> tuple[CompressSpec | None, RegexSpec | None, RegexSpec | None, tuple[PluginUse, ...]]:
    compress = None
    needs("compress.types", "compress")
    needs("compress.min_size", "compress")
    if check("compress", _parse_switch):
        types = check("compress.types", _parse_types)
        min_size = check("compress.min_size", _parse_size)
        compress = CompressSpec(
            types if isinstance(types, tuple) else DEFAULT_COMPRESS_TYPES,
            min_size if isinstance(min_size, int) else DEFAULT_COMPRESS_MIN_SIZE,
        )

    redirect = _regex_pair(labels, "redirect", check)
    needs("redirect.permanent", "redirect.regex")
    if redirect is not None and check("redirect.permanent", _parse_switch):
        redirect = RegexSpec(redirect.pattern, redirect.replacement, True)
    rewrite = _regex_pair(labels, "rewrite", check)
    if rewrite is not None and labels.get("strip_prefix", "").strip().lower() in ("true", "1", "yes", "on"):
        raise MiddlewareLabelError(
            "rewrite.regex", labels["rewrite.regex"],
            "rewrite replaces the whole path: drop strip_prefix and remove the prefix in the regex instead",
        )
    return compress, redirect, rewrite, _parse_plugins(labels)


def _regex_pair(labels: Mapping[str, str], kind: str, check: Callable[..., object]) -> RegexSpec | None:
    regex_label, replacement_label = f"{kind}.regex", f"{kind}.replacement"
    if (regex_label in labels) != (replacement_label in labels):
        present = regex_label if regex_label in labels else replacement_label
        absent = replacement_label if present == regex_label else regex_label
        raise MiddlewareLabelError(present, labels[present], f"needs {absent} as well")
    pattern = check(regex_label, _parse_regex)
    if not isinstance(pattern, re.Pattern):
        return None
    raw = labels[replacement_label]
    try:
        replacement = _parse_replacement(raw.strip(), pattern)
    except ValueError as error:
        raise MiddlewareLabelError(replacement_label, raw, str(error)) from None
    return RegexSpec(pattern, replacement)


def _parse_switch(text: str) -> bool:
    lower = text.lower()
    if lower in ("true", "1", "yes", "on"):
        return True
    if lower in ("false", "0", "no", "off"):
        return False
    raise ValueError("not a boolean (true or false)")


def _parse_types(text: str) -> tuple[str, ...]:
    types = tuple(item.strip().lower() for item in text.split(",") if item.strip())
    if not types or len(types) > 32:
        raise ValueError("list 1 to 32 media types, e.g. text/*,application/json")
    for media in types:
        if _MEDIA_RANGE.fullmatch(media) is None or media.startswith("*"):
            raise ValueError(f"{media!r} is not a media type or type/*")
    return types


def _parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError('not a size (examples: "512", "1KB", "1MB")')
    size = int(match["number"]) * _SIZE_UNITS[(match["unit"] or "").lower() or None]
    if size > 1024 * 1024 * 1024:
        raise ValueError("at most 1GB")
    return size


def _parse_regex(text: str) -> "re.Pattern[str]":
    if not text:
        raise ValueError("empty regex")
    if len(text) > MAX_REGEX:
        raise ValueError(f"at most {MAX_REGEX} characters")
    try:
        return re.compile(text)
    except re.error as error:
        raise ValueError(f"not a valid regex: {error}") from None


def _parse_replacement(text: str, pattern: "re.Pattern[str]") -> tuple[str | int, ...]:
    if len(text) > MAX_REPLACEMENT:
        raise ValueError(f"at most {MAX_REPLACEMENT} characters")
    if any(not 0x21 <= ord(char) <= 0x7E for char in text):
        raise ValueError("only visible ASCII characters (no spaces or control characters)")
    pieces: list[str | int] = []
    at = 0
    for match in _REFERENCE.finditer(text):
        pieces.append(text[at:match.start()])
        at = match.end()
        number, name, dollar = match.groups()
        if dollar:
            pieces.append("$")
        elif number is not None or name.isdigit():
            index = int(number if number is not None else name)
            if index > pattern.groups:
                raise ValueError(f"${index}: the regex has {pattern.groups} group(s)")
            pieces.append(index)
        else:
            if name not in pattern.groupindex:
                raise ValueError(f"${{{name}}}: the regex has no group of that name")
            pieces.append(pattern.groupindex[name])
    pieces.append(text[at:])
    if "$" in _REFERENCE.sub("", text):
        raise ValueError("a '$' must start $N, ${N}, ${name} or $$")
    return tuple(piece for piece in pieces if piece != "")


def _parse_plugins(labels: Mapping[str, str]) -> tuple[PluginUse, ...]:
    """`middlewares=a,b` names the plugin middlewares in order; `plugin.<name>.<key>` are their options."""
    options: dict[str, dict[str, str]] = {}
    for label, value in labels.items():
        if not label.startswith(PLUGIN_LABEL_PREFIX):
            continue
        name, dot, key = label[len(PLUGIN_LABEL_PREFIX):].partition(".")
        if not dot or _PLUGIN_NAME.fullmatch(name) is None or _PLUGIN_KEY.fullmatch(key) is None:
            raise MiddlewareLabelError(label, value, "not plugin.<name>.<option> (lower-case letters, digits, '_', '-')")
        options.setdefault(name, {})[key] = value.strip()
    raw = labels.get("middlewares")
    order: list[str] = []
    if raw is not None:
        for item in raw.split(","):
            name = item.strip().lower()
            if _PLUGIN_NAME.fullmatch(name) is None or name in order:
                raise MiddlewareLabelError("middlewares", raw, f"{name!r}: not a plugin name, or named twice")
            order.append(name)
    for name in sorted(options):
        if name not in order:
            label = f"{PLUGIN_LABEL_PREFIX}{name}.{sorted(options[name])[0]}"
            raise MiddlewareLabelError(label, labels[label], f"plugin {name!r} is not named in the middlewares label")
    uses = []
    for name in order:
        given = options.get(name, {})
        # Discovery and the plugin's own option check live outside the pure core, imported only when used.
        from labelgw.middleware.plugin import PluginOptionError, check_plugin

        try:
            parsed = check_plugin(name, given)
        except PluginOptionError as error:
            label = f"{PLUGIN_LABEL_PREFIX}{name}.{error.key}" if error.key in given else "middlewares"
            raise MiddlewareLabelError(label, given.get(error.key, raw or ""), error.reason) from None
        uses.append(PluginUse(name, tuple(sorted(given.items())), parsed))
    return tuple(uses)
