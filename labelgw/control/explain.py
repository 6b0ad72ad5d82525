# -*- test-case-name: tests.test_explain -*-
"""What labelgw would do with one request, without doing it: the route that matches, the version decision and
why, every ready backend with its current cost, and the backend the balancer would choose now.

Served by the admin listener as ``GET /explain?url=...`` (labelgw.control.admin) and printed by
``python -m labelgw explain URL`` (labelgw.cli.explain_command). It runs on the reactor thread, between requests, and
leaves no trace: a policy's pick moves its rotation, draws from its random source and may give a backend its
first estimate, and a new client's version moves the split's round robin; all of that is put back as it was, so
the next real request is decided exactly as if nobody had asked. Nothing is counted as a request.

Every use of the balancer's and the version split's internals is in this module (``_dry_pick``, ``_costs``,
``_dry_version``), so that a change of their API is adapted here alone.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from labelgw.core import balancer
from labelgw.core.backends import Backend, ServicePool
from labelgw.http.versioning import cookie_name
from labelgw.core.paths import PathRefused, route_target
from labelgw.core.routes import Route, RouteTable, is_wildcard, normalize_host

__all__ = ["Explainer", "ExplainError", "parse_url"]

# The HTTPS redirect rule of the gateway (labelgw.tls.https.HttpsRedirect), read when asked: it is set after start.
RedirectRule = Callable[[], Any]


class ExplainError(ValueError):
    """The question cannot be asked: no URL, or one that is not an http(s) URL with a host."""


@dataclass(frozen=True, slots=True)
class RequestLine:
    """The parts of a URL routing looks at."""

    scheme: str
    host: str
    target: bytes


def parse_url(url: str) -> RequestLine:
    """``http://api.localhost:8080/x?y`` -> scheme, normalised host (no port), origin-form target."""
    text = url.strip()
    if not text:
        raise ExplainError("give a URL: /explain?url=http://api.localhost/x")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
    except ValueError as error:
        raise ExplainError(f"not a URL: {url!r} ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ExplainError(f"not an http or https URL: {url!r}")
    netloc = parts.netloc.rpartition("@")[2]
    host = normalize_host(netloc)
    if not host:
        raise ExplainError(f"no host in {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        raw = target.encode("ascii")
    except UnicodeEncodeError:
        raise ExplainError(f"the path of {url!r} is not ASCII: percent-encode it as a client would") from None
    return RequestLine(parts.scheme, host, raw)


class Explainer:
    """Answers "where would this request go now?" from the live route table."""

    def __init__(
        self, table: RouteTable, version_header: str = "X-Labelgw-Version", redirect: RedirectRule | None = None
    ) -> None:
        self._table = table
        self.version_header = version_header
        self._redirect = redirect

    def explain(self, url: str, version: str | None = None, cookie: str | None = None) -> dict[str, Any]:
        """The decision for a request to `url`; `version` as if sent in the version header, `cookie` as the
        client's Cookie header (which may hold its sticky version). Raises ExplainError for a bad URL."""
        line = parse_url(url)
        view: dict[str, Any] = {
            "url": url,
            "scheme": line.scheme,
            "host": line.host,
            "target": line.target.decode("ascii"),
            "route": None,
            "version": None,
            "backends": [],
            "not_ready": [],
            "choice": None,
        }
        try:
            path, forwarded = route_target(line.target)
        except PathRefused as error:
            return _answer(view, 400, f"refused before any backend: {error.reason}")
        view["path"] = path
        route = self._table.lookup(line.host, path)
        rule = self._redirect() if self._redirect is not None else None
        if rule is not None and line.scheme == "http":
            location = rule.location(line.host, forwarded, route)
            if location is not None:
                return _answer(view, 308, f"plain HTTP is redirected to {location.decode('ascii')}")
        if route is None:
            if self._table.knows_host(line.host):
                return _answer(view, 404, f"host {line.host!r} is known, but no path prefix of it matches {path!r}")
            return _answer(view, 404, f"no route for host {line.host!r}")
        service = route.service
        view["route"] = _route(route, forwarded)
        view["service"] = {"name": service.name, "balancer": _policy_name(service)}
        chain = service.middleware
        if chain is not None:
            # The chain may answer or divert before any backend (labelgw.middleware.chain); its state, read only.
            view["middleware"] = chain.describe()
            breaker = chain.breaker
            if breaker is not None and breaker.state == "open" and chain.clock.seconds() < breaker.open_until:
                diverted = self._fallback(view, chain, route, forwarded, "the circuit breaker is open")
                if diverted is not None:
                    return diverted
                wait = breaker.retry_after(chain.clock.seconds())
                return _answer(view, 503, f"service {service.name!r}: circuit breaker open (Retry-After: {wait})")
        candidates, decision = self._version(service, version, cookie)
        view["version"] = decision
        view["not_ready"] = [
            {"container": b.spec.name, "id": b.key, "address": f"{b.address}:{b.port}", "version": b.version,
             "why": _not_ready_reason(b)}
            for b in _sorted(service.backends.values()) if not b.ready
        ]
        key = _known_key(service, path, cookie)
        chosen, costs = _dry_pick(service, candidates, key)
        view["cost"] = _cost_rule(service, len(candidates), key is not None)
        view["backends"] = [
            dict(costs[b.key], candidate=any(b is c for c in candidates), chosen=b is chosen)
            for b in _sorted(service.ready)
        ]
        if chosen is None:
            if chain is not None and not service.ready:
                diverted = self._fallback(view, chain, route, forwarded, "the service has no ready backend")
                if diverted is not None:
                    return diverted
            pinned = decision["decision"] if decision["pinned"] else None
            if pinned is not None and not any((b.version or "") == pinned for b in service.backends.values()):
                # As labelgw.http.dispatch: no container of that version at all, so no retry can help.
                return _answer(view, 404, f"service {service.name!r} has no version {pinned!r}")
            what = f" of version {decision['decision']!r}" if decision["decision"] is not None else ""
            return _answer(view, 503, f"service {service.name!r} has no ready backend{what} (Retry-After: 1)")
        view["choice"] = {"container": chosen.spec.name, "id": chosen.key, "address": f"{chosen.address}:{chosen.port}",
                          "version": chosen.version}
        return _answer(
            view, None,
            f"forwarded to {chosen.spec.name} ({chosen.address}:{chosen.port}) as {route.upstream_path(forwarded).decode('latin-1')}",
        )

    def _fallback(
        self, view: dict[str, Any], chain: Any, route: Route, forwarded: bytes, why: str
    ) -> dict[str, Any] | None:
        """The answer when the chain's fallback takes the request (as `Chain.fall_back` decides); None without one."""
        fallback = chain.spec.fallback
        if fallback is None:
            return None
        if fallback.status is not None:
            return _answer(view, fallback.status, f"{why}: the static fallback answers {fallback.body or 'degraded'!r}")
        target = chain._services.get(fallback.service) if fallback.service else None
        if target is None or not target.ready or target is route.service:
            return None
        view["fallback"] = {"service": target.name, "why": why}
        candidates, _ = self._version(target, None, None)
        chosen, _ = _dry_pick(target, candidates)
        if chosen is None:
            return None
        view["choice"] = {"container": chosen.spec.name, "id": chosen.key, "address": f"{chosen.address}:{chosen.port}",
                          "version": chosen.version}
        return _answer(
            view, None,
            f"{why}: diverted to the fallback service {target.name!r}, forwarded to {chosen.spec.name} "
            f"({chosen.address}:{chosen.port}) as {route.upstream_path(forwarded).decode('latin-1')}",
        )

    # -- the version decision (as labelgw.core.versions.choose_version makes it) ---------------------------------

    def _version(
        self, service: ServicePool, pinned: str | None, cookie: str | None
    ) -> tuple[Sequence[Backend], dict[str, Any]]:
        split = service.split
        decision: dict[str, Any] = {"split": split is not None, "decision": None, "pinned": False,
                                    "sticky": None, "set_cookie": None, "shares": None, "why": ""}
        if split is None:
            versions = sorted({b.version or "" for b in service.ready})
            decision["why"] = (
                "no ready backend" if not versions
                else "one version: no split" if versions == [""]
                else f"every ready backend is version {versions[0]!r}: no split"
            )
            return service.ready, decision
        decision["shares"] = {v: round(split.shares[v], 3) for v in sorted(split.shares)}
        if pinned is not None:
            decision.update(decision=pinned, pinned=True)
            subset = split.subsets.get(pinned, ())
            decision["why"] = f"pinned by the {self.version_header} header" + (
                "" if subset else f"; version {pinned!r} has no ready backend, and a pinned request never leaves it"
            )
            return subset, decision
        name = cookie_name(service.name)
        sticky = _cookie_value(cookie, name)
        decision["sticky"] = sticky
        if sticky is not None and sticky in split.subsets and sticky not in split.cut:
            decision.update(decision=sticky, why=f"sticky: the client's cookie {name}={sticky}")
            return split.subsets[sticky], decision
        version = _dry_version(service)
        lost = f"its cookie names version {sticky!r}, which has no ready backend now; " if sticky is not None else ""
        if sticky is not None and sticky in split.cut:
            lost = f"its cookie names version {sticky!r}, which canary analysis cut; "
        decision.update(
            decision=version, set_cookie=f"{name}={version}",
            why=f"a new client: {lost}the split's smooth weighted round robin over the shares gives the next new "
            f"client {version!r}, and a cookie that keeps it there",
        )
        return split.subsets[version], decision


def _answer(view: dict[str, Any], status: int | None, detail: str) -> dict[str, Any]:
    view["status"] = status
    view["answer"] = detail if status is None else f"{status}: {detail}"
    return view


def _route(route: Route, forwarded: bytes) -> dict[str, Any]:
    return {
        "host": route.host,
        # Which host rule matched: the request's host itself, or a one-label wildcard covering it (exact wins).
        "match": "wildcard" if is_wildcard(route.host) else "exact",
        "path": route.path_prefix,
        "service": route.service.name,
        "strip_prefix": route.strip_prefix,
        "scheme": route.scheme,
        "upstream_target": route.upstream_path(forwarded).decode("latin-1"),
    }


def _sorted(backends: Any) -> list[Backend]:
    return sorted(backends, key=lambda b: (b.version or "", b.spec.name, b.key))


def _cookie_value(cookie: str | None, name: str) -> str | None:
    for part in (cookie or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip()
    return None


def _not_ready_reason(backend: Backend) -> str:
    spec = backend.spec
    if not spec.running:
        return "container not running (or being stopped)"
    if spec.paused:
        return "container paused"
    if spec.health not in (None, "healthy"):
        return f"Docker healthcheck {spec.health}"
    if backend.ejected_until is not None:
        return f"ejected after {backend.consecutive_failures} consecutive failures"
    if backend.health_state is not None and backend.health_state != "healthy":
        return f"health check {backend.health_state}"
    return "not ready"


# -- the balancer, dry ------------------------------------------------------------------------------------


def _policy_name(service: ServicePool) -> str:
    return str(getattr(service.policy, "name", type(service.policy).__name__))


@contextmanager
def _undone(service: ServicePool) -> Iterator[None]:
    """Whatever a pick changes is put back: the policy's attributes (its rotation), its random source's state
    and every backend's selection state (a first pick gives backends their starting estimate)."""
    policy = service.policy
    saved = _attributes(policy)
    sources = [(value, value.getstate()) for value in saved.values() if isinstance(value, random.Random)]
    stats = [(backend, backend.stats) for backend in service.backends.values()]
    try:
        yield
    finally:
        for backend, value in stats:
            backend.stats = value
        for source, state in sources:
            source.setstate(state)
        for name, value in saved.items():
            setattr(policy, name, value)


def _attributes(policy: object) -> dict[str, Any]:
    """A policy's own attributes, whether kept in a __dict__ or in __slots__."""
    names = set(getattr(policy, "__dict__", ()))
    for cls in type(policy).__mro__:
        slots = getattr(cls, "__slots__", ())
        names.update((slots,) if isinstance(slots, str) else slots)
    names.discard("__dict__")
    names.discard("__weakref__")
    return {name: getattr(policy, name) for name in names if hasattr(policy, name)}


def _known_key(service: ServicePool, path: str, cookie: str | None) -> bytes | None:
    """The hash key of the request when the URL (`path`) or the given cookies (`cookie:NAME`) hold it."""
    source = service.key_source
    if source is None:
        return None
    if source.kind == "path":
        return path.encode("latin-1")
    if source.kind == "cookie" and cookie:
        value = _cookie_value(cookie, source.name)
        return value.encode("latin-1") if value else None
    return None


def _dry_pick(
    service: ServicePool, candidates: Sequence[Backend], key: bytes | None = None
) -> tuple[Backend | None, dict[str, dict[str, Any]]]:
    """The backend the policy would pick now among `candidates` (by `key` for a keyed policy), and each ready
    backend's cost; nothing kept."""
    with _undone(service):
        policy: Any = service.policy
        if not candidates:
            chosen = None
        elif key is not None and hasattr(policy, "pick_by_key"):
            chosen = policy.pick_by_key(tuple(candidates), key)
        else:
            chosen = policy.pick(tuple(candidates))
        # Read while the pick's starting estimates are in place: what the pick itself compared.
        costs = {backend.key: _costs(service, backend) for backend in service.ready}
    return chosen, costs


def _costs(service: ServicePool, backend: Backend) -> dict[str, Any]:
    selection = balancer.describe(backend)
    name = _policy_name(service)
    weight = backend.weight or 1e-9
    latency = selection.get("latency_ms")
    if name == "wrt" and latency is not None:
        cost: float | None = round(latency * (backend.in_flight + 1) / weight, 3)
    elif name == "least_conn":
        cost = round(backend.in_flight / weight, 3)
    else:
        cost = None
    return {
        "container": backend.spec.name,
        "id": backend.key,
        "address": f"{backend.address}:{backend.port}",
        "version": backend.version,
        "weight": backend.weight,
        "in_flight": backend.in_flight,
        "latency_ms": latency,
        "slow_start": selection.get("slow_start"),
        "cost": cost,
    }


def _cost_rule(service: ServicePool, candidates: int, keyed: bool = False) -> str:
    policy = service.policy
    name = _policy_name(service)
    if name == "wrt":
        rule = ("cost = latency estimate (ms, Peak EWMA decayed to now) x (in flight + 1) / weight; the lowest wins, "
                "costs within 20 % of each other are a tie taken in turn; a backend in slow start is a candidate "
                "in only a fraction (slow_start) of the picks")
        if candidates > getattr(policy, "scan_limit", candidates):
            rule += f"; above {policy.scan_limit} candidates two are drawn at random and compared (P2C)"  # type: ignore[attr-defined]
        return rule
    if name == "least_conn":
        return "cost = in flight / weight; the lowest wins, ties taken in turn"
    if name == "round_robin":
        return "no cost: each ready backend in turn"
    if name == "hash":
        source = getattr(service, "key_source", None)
        shown = ("the pick shown is for this request's key" if keyed
                 else "the pick shown is for a request without a key (a random position)")
        return (f"consistent hashing on {source}: the first backend on the ring from the key's hash that stays within "
                f"1.25 x its share of the requests in flight; {shown}")
    return f"policy {name}"


def _dry_version(service: ServicePool) -> str:
    """The version the split gives the next new client; its round robin is put back."""
    split = service.split
    assert split is not None
    saved = dict(split._current)
    try:
        return split.choose()
    finally:
        split._current = saved
