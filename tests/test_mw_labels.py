"""The middleware labels: parsed once into typed values, a bad one disables only its container (with the label,
value and reason), and the same keys on a static service of the config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from labelgw.cli.config import ConfigError, build, load_file
from labelgw.core.middleware import (
    BreakerSpec, ConcurrencySpec, FallbackSpec, MiddlewareSpec, RateLimitSpec, parse_middleware,
)
from test_labels import load, rejection_of, set_labels, spec_of


def labelled(**labels: str) -> dict[str, Any]:
    return set_labels(load("twonet"), **labels)


def test_no_middleware_labels_means_no_spec() -> None:
    assert spec_of(load("twonet")).middleware is None
    assert parse_middleware({"service": "api", "port": "80"}) is None


def test_rate_limit_and_its_defaults() -> None:
    spec = spec_of(labelled(ratelimit="100/s")).middleware
    assert spec == MiddlewareSpec(ratelimit=RateLimitSpec(rate=100.0, burst=100.0, quota=100.0, window=1.0, key="ip"))
    per_minute = parse_middleware({"ratelimit": "30/m"})
    assert per_minute is not None and per_minute.ratelimit is not None
    assert (per_minute.ratelimit.rate, per_minute.ratelimit.burst, per_minute.ratelimit.window) == (0.5, 1.0, 60.0)
    per_hour = parse_middleware({"ratelimit": "7200 / h", "ratelimit.burst": "5", "ratelimit.key": "header:X-Client"})
    assert per_hour is not None and per_hour.ratelimit == RateLimitSpec(
        rate=2.0, burst=5.0, quota=7200.0, window=3600.0, key="header", key_name="x-client"
    )


@pytest.mark.parametrize(
    ("key", "kind", "name"),
    [("ip", "ip", ""), ("host", "host", ""), ("HOST", "host", ""), ("header:X-Client", "header", "x-client"),
     ("cookie:session_id", "cookie", "session_id")],
)
def test_rate_limit_keys(key: str, kind: str, name: str) -> None:
    spec = parse_middleware({"ratelimit": "10/s", "ratelimit.key": key})
    assert spec is not None and spec.ratelimit is not None
    assert (spec.ratelimit.key, spec.ratelimit.key_name) == (kind, name)


def test_concurrency_and_breaker_and_their_defaults() -> None:
    spec = spec_of(labelled(max_inflight="2", **{"breaker__error_rate": "50%"})).middleware
    assert spec == MiddlewareSpec(concurrency=ConcurrencySpec(2, 0, 1.0), breaker=BreakerSpec(0.5, 10.0, 5.0))
    spec = parse_middleware({
        "max_inflight": "8", "max_pending": "16", "pending_timeout": "250ms",
        "breaker.error_rate": "25", "breaker.window": "30s", "breaker.open": "1m",
    })
    assert spec == MiddlewareSpec(concurrency=ConcurrencySpec(8, 16, 0.25), breaker=BreakerSpec(0.25, 30.0, 60.0))


def test_fallbacks() -> None:
    assert parse_middleware({"fallback": "Static-Site"}) == MiddlewareSpec(fallback=FallbackSpec(service="static-site"))
    assert parse_middleware({"fallback.status": "503", "fallback.body": "back soon"}) == MiddlewareSpec(
        fallback=FallbackSpec(status=503, body="back soon")
    )


@pytest.mark.parametrize(
    ("labels", "label", "reason_part"),
    [
        ({"ratelimit": "100"}, "ratelimit", "not a rate"),
        ({"ratelimit": "100/d"}, "ratelimit", "not a rate"),
        ({"ratelimit": "0/s"}, "ratelimit", "positive"),
        ({"ratelimit": "-1/s"}, "ratelimit", "not a rate"),
        ({"ratelimit": "nan/s"}, "ratelimit", "not a rate"),
        ({"ratelimit": "10/s", "ratelimit.burst": "0"}, "ratelimit.burst", "whole number"),
        ({"ratelimit": "10/s", "ratelimit.burst": "1.5"}, "ratelimit.burst", "whole number"),
        ({"ratelimit": "10/s", "ratelimit.key": "user"}, "ratelimit.key", "unknown key"),
        ({"ratelimit": "10/s", "ratelimit.key": "header:"}, "ratelimit.key", "needs a field name"),
        ({"ratelimit": "10/s", "ratelimit.key": "header:a b"}, "ratelimit.key", "needs a field name"),
        ({"ratelimit": "10/s", "ratelimit.key": "ip:x"}, "ratelimit.key", "unknown key"),
        ({"ratelimit.burst": "10"}, "ratelimit.burst", "without the ratelimit label"),
        ({"max_inflight": "0"}, "max_inflight", "whole number"),
        ({"max_inflight": "two"}, "max_inflight", "whole number"),
        ({"max_inflight": "2", "max_pending": "-1"}, "max_pending", "whole number"),
        ({"max_inflight": "2", "pending_timeout": "2d"}, "pending_timeout", "not a duration"),
        ({"max_inflight": "2", "pending_timeout": "0s"}, "pending_timeout", "positive"),
        ({"max_pending": "5"}, "max_pending", "without the max_inflight label"),
        ({"breaker.error_rate": "0%"}, "breaker.error_rate", "more than 0"),
        ({"breaker.error_rate": "150%"}, "breaker.error_rate", "at most 100"),
        ({"breaker.error_rate": "half"}, "breaker.error_rate", "not a percentage"),
        ({"breaker.error_rate": "50%", "breaker.window": "2h"}, "breaker.window", "at most 1 hour"),
        ({"breaker.open": "5s"}, "breaker.open", "without the breaker.error_rate label"),
        ({"fallback": "bad name"}, "fallback", "not a service name"),
        ({"fallback": "API"}, "fallback", "its own fallback"),
        ({"fallback": "other", "fallback.status": "503"}, "fallback.status", "choose one"),
        ({"fallback.status": "200"}, "fallback.status", "400-599"),
        ({"fallback.status": "5xx"}, "fallback.status", "400-599"),
        ({"fallback.body": "x"}, "fallback.body", "without the fallback.status label"),
    ],
)
def test_a_bad_value_disables_only_its_container(labels: dict[str, str], label: str, reason_part: str) -> None:
    rejection = rejection_of(labelled(**{key.replace(".", "__"): value for key, value in labels.items()}, service="api"))
    assert (rejection.label, rejection.value) == (f"labelgw.{label}", labels[label])
    assert reason_part in rejection.reason, rejection.reason


def test_fallback_body_must_be_printable_and_short() -> None:
    rejection = rejection_of(labelled(fallback__status="503", fallback__body="a\x01b"))
    assert rejection.label == "labelgw.fallback.body" and "control characters" in rejection.reason
    rejection = rejection_of(labelled(fallback__status="503", fallback__body="x" * 5000))
    assert "at most 4096" in rejection.reason


def test_misspelt_middleware_label_is_unknown() -> None:
    rejection = rejection_of(labelled(rate_limit="10/s"))
    assert rejection.label == "labelgw.rate_limit" and rejection.reason.startswith("unknown label")
    assert "labelgw.ratelimit.burst" in rejection.reason


# --- the config file's static services ------------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "labelgw.yaml"
    path.write_text(text, encoding="utf-8")
    return build({}, load_file(str(path)))


def test_static_service_takes_the_same_keys(tmp_path: Path) -> None:
    settings = config(tmp_path, (
        "services:\n  legacy:\n    backends: ['127.0.0.1:9000']\n    ratelimit: 100/m\n    ratelimit.burst: 20\n"
        "    max_inflight: 4\n    breaker.error_rate: 50%\n    fallback.status: 503\n    fallback.body: later\n"
    ))
    [static] = settings.static_services
    expected = MiddlewareSpec(
        ratelimit=RateLimitSpec(rate=100 / 60, burst=20.0, quota=100.0, window=60.0),
        concurrency=ConcurrencySpec(4), breaker=BreakerSpec(0.5), fallback=FallbackSpec(status=503, body="later"),
    )
    assert static.middleware == expected
    assert all(spec.middleware == expected for spec in static.specs())


def test_static_service_without_middleware(tmp_path: Path) -> None:
    [static] = config(tmp_path, "services:\n  legacy:\n    backends: ['127.0.0.1:9000']\n").static_services
    assert static.middleware is None


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("    ratelimit: fast\n", "services.legacy.ratelimit: 'fast': not a rate"),
        ("    max_pending: 3\n", "services.legacy.max_pending: '3': has no effect"),
        ("    fallback: legacy\n", "services.legacy.fallback: 'legacy': a service cannot be its own fallback"),
        ("    breaker: 50%\n", "services.legacy.breaker: unknown setting"),
    ],
)
def test_static_service_bad_middleware_stops_startup(tmp_path: Path, text: str, start: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config(tmp_path, "services:\n  legacy:\n    backends: ['127.0.0.1:9000']\n" + text)
    assert str(raised.value).startswith(start), str(raised.value)


def test_the_compose_example_labels_are_valid() -> None:
    import yaml

    example = Path(__file__).resolve().parent.parent / "compose-examples" / "middleware" / "docker-compose.yml"
    services = yaml.safe_load(example.read_text())["services"]
    specs = {}
    for name, service in services.items():
        labels = {key.removeprefix("labelgw."): str(value) for key, value in service["labels"].items()}
        specs[name] = parse_middleware(labels, labels["service"])
    assert specs["api"] is not None and specs["api"].ratelimit is not None and specs["api"].ratelimit.key == "header"
    assert specs["shop"] == MiddlewareSpec(breaker=BreakerSpec(0.5), fallback=FallbackSpec(service="shop-static"))
    assert specs["shop-static"] is None
