"""A service's middleware chain, and the registry listener that builds it.

The chain is resolved once, when a service appears, from its first container's spec (as for `balancer`): the
service's `ServicePool.middleware` is then a `Chain`, or stays None, and the dispatcher pays one attribute read
per request for a service without middlewares.

Per request (`labelgw.http.dispatch`), in this order (the request side, issue 10, in
`labelgw.middleware.access`):
  0. allowlist (403), basic auth (401; a bcrypt check in a thread holds the exchange until it answers), then the
     rate limit, the body limit on Content-Length (413; a chunked body is counted by the exchange), the request
     header rules (the head is rewritten before the exchange builds its upstream head);
  1. rate limit: a token per key, else `429` with Retry-After and the RateLimit fields (never a fallback:
     the client is asked to slow down, not served elsewhere);
  2. circuit breaker: while open, the request fails fast or goes to the fallback;
  3. concurrency limit: a slot, or a place in the FIFO queue, else the fallback or a fast `503`;
  4. fallback: used by 2 and 3, and when the service has no ready backend; another service, or a static answer.
Response header rules go on the exchange (`response_rules`, applied to the response head); compression after.

The outcome comes back through the exchange's `on_done` hook: the concurrency slot is released (the first
waiter gets it) and the breaker counts the request.

Issue 10's steps: a regex redirect or rewrite runs first of all (`_paths`; a redirect takes no token), plugin
middlewares after the built-in request steps (`plugin_steps`), and the response transforms (plugin response
steps, compression) wrap the client side of the exchange in `Ticket.bind` (`transform`), for this service only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from twisted.logger import Logger

from labelgw.core.backends import Backend, ServicePool
from labelgw.core.middleware import MiddlewareSpec
from labelgw.core.routes import Route
from labelgw.http.exchange import Exchange
from labelgw.http.parser import RequestHead
from labelgw.middleware.access import Allowlist, BasicAuth, HeaderRules
from labelgw.middleware.breaker import DENY, PROBE, CircuitBreaker
from labelgw.middleware.concurrency import ADMITTED, QUEUED, ConcurrencyLimiter
from labelgw.middleware.ratelimit import _ONE, KeyedRateLimiter, key_function
from labelgw.middleware import compress as _compress, plugin as _plugin, rewrite as _rewrite
from labelgw.core.paths import PathRefused

if TYPE_CHECKING:
    from labelgw.http.sides import RequestSide

__all__ = ["Chain", "MiddlewareManager", "Ticket"]

BREAKER_OPEN = "breaker open"
CONCURRENCY_LIMIT = "concurrency limit"
NO_BACKEND = "no ready backend"


class Ticket:
    """One request's passage through a chain: what it holds (a concurrency slot or a place in the queue, a
    breaker probe) until its exchange completes, and the route it goes to (the fallback's, when diverted)."""

    __slots__ = ("chain", "route", "fallback_reason", "slot", "queued", "probe", "exchange", "auth_wait")
    # As Pass's (the dispatcher reads them): a ticket's bind always has more to do than set the response rules.
    plain = False
    response_rules: "HeaderRules | None" = None

    def __init__(self, chain: "Chain", route: Route) -> None:
        self.chain = chain
        self.route = route
        self.fallback_reason: str | None = None
        self.slot = False
        self.queued = False
        self.probe = False
        self.exchange: Exchange | None = None
        # A bcrypt check runs in a thread: the exchange is held until it answers (`auth_answered`).
        self.auth_wait = False

    def bind(self, exchange: Exchange) -> None:
        """The exchange that serves the request (not started yet)."""
        self.exchange = exchange
        chain = self.chain
        if self.auth_wait:
            exchange.hold()
            if exchange.on_done is None:
                exchange.on_done = self.done
        if chain.max_body is not None:
            exchange.body_limit = chain.max_body
        if chain.response_rules is not None:
            exchange.response_rules = chain.response_rules
        if chain.response_transforms:
            chain.transform(exchange)
        if self.fallback_reason is not None:
            exchange.fallback_reason = self.fallback_reason
            return
        if self.queued:
            exchange.hold()
        if self.slot or self.queued or self.chain.breaker is not None:
            exchange.on_done = self.done

    def divert(self, gateway: Any, head: RequestHead, side: "RequestSide", close: bool) -> bool:
        """The service has no ready backend: True when the fallback took the request (then `route` leads to the
        fallback service, whose backend the dispatcher picks, or a static answer was sent and `route` is
        unchanged); False: the dispatcher answers 503 itself."""
        self._release(observed=False)
        if self.fallback_reason is not None:
            return False  # already at the fallback service: no fallback of the fallback
        taken = self.chain.fall_back(self, gateway, head, side, close, NO_BACKEND, 503, "has no ready backend", 1)
        if taken and self.auth_wait and self.exchange is not None:
            # The fallback's exchange waits for the same check: no way round the authentication.
            self.exchange.hold()
            self.exchange.on_done = self.done
        return taken

    def auth_answered(self, ok: bool) -> None:
        """The bcrypt check answered: the held exchange starts (unless it still waits for a slot), or gets 401."""
        self.auth_wait = False
        exchange = self.exchange
        if exchange is None or exchange.finished:
            return
        if not ok:
            auth = self.chain.auth
            exchange.reject(401, "authentication required", auth.challenge if auth is not None else b"")
            return
        if not self.queued:
            exchange.admitted()

    def done(self, exchange: Exchange, failed: bool, observed: bool) -> None:
        self._release(observed, failed)

    def _release(self, observed: bool, failed: bool = False) -> None:
        chain = self.chain
        limiter = chain.concurrency
        if limiter is not None:
            if self.queued:
                self.queued = False
                limiter.cancel(self)
            elif self.slot:
                self.slot = False
                limiter.release()
        breaker = chain.breaker
        if breaker is not None and self.fallback_reason is None:
            if observed:
                breaker.record(chain.clock.seconds(), failed, self.probe)
            else:
                breaker.abandon(self.probe)
            self.probe = False

    # The concurrency limiter's waiter.

    def admitted(self) -> None:
        self.queued = False
        self.slot = True
        exchange = self.exchange
        if exchange is None or exchange.finished:
            # Cannot happen (a finished exchange has left the queue); a slot must never leak if it does.
            self._release(observed=False)
            return
        if self.auth_wait:
            return  # auth_answered starts it
        exchange.admitted()

    def timed_out(self) -> None:
        self.queued = False
        exchange = self.exchange
        if exchange is None:
            return
        chain = self.chain
        name = chain.pool.name
        fallback = chain.spec.fallback
        if fallback is not None and fallback.status is not None:
            # Static degradation; a fallback service cannot take over an exchange already bound to this one.
            exchange.fallback_reason = CONCURRENCY_LIMIT
            exchange.reject(fallback.status, fallback.body or f"service {name!r} is degraded", _retry_after(fallback.status, 1))
        else:
            exchange.reject(503, f"service {name!r}: waited too long for a free slot (max_inflight)", b"Retry-After: 1\r\n")


class Pass:
    """The ticket of a chain that holds nothing per request (no auth, concurrency limit, breaker or fallback):
    one per route, made once and handed to every request (no allocation per request). `bind` puts the chain's
    per-exchange settings on the exchange; with no fallback, a service without a ready backend gets the
    dispatcher's own 503, as `Ticket.divert` would give it."""

    __slots__ = ("chain", "route", "response_rules", "plain")
    fallback_reason: str | None = None

    def __init__(self, chain: "Chain", route: Route) -> None:
        self.chain = chain
        self.route = route
        self.response_rules = chain.response_rules
        # Nothing but the response rules to put on an exchange (no body limit, no response transform): then the
        # dispatcher sets them itself instead of calling bind.
        self.plain = chain.max_body is None and not chain.response_transforms

    def bind(self, exchange: Exchange) -> None:
        if self.plain:
            exchange.response_rules = self.response_rules
            return
        chain = self.chain
        if chain.max_body is not None:
            exchange.body_limit = chain.max_body
        exchange.response_rules = self.response_rules
        if chain.response_transforms:
            chain.transform(exchange)

    def divert(self, gateway: Any, head: RequestHead, side: "RequestSide", close: bool) -> bool:
        return False


def _close(head: RequestHead) -> bool:
    # As the dispatcher's: an answer without an exchange closes when a request body is unread (it would be taken
    # for the next request) or the client asked to. Worked out only when the chain answers.
    return head.has_body or not head.keep_alive


def _diverted(ticket: Ticket, route: Route) -> Ticket | None:
    """After a fall_back from `enter`: the ticket when it now leads to the fallback service; None when the
    request was answered (a static fallback, or this service's own 503)."""
    return ticket if ticket.route is not route else None


def _count(gateway: Any, service: str, head: RequestHead, status: int) -> None:
    """The chain's own answers count in labelgw_requests_total, as the dispatcher's do."""
    if gateway.metrics is not None:
        gateway.metrics.refused(service, None, head.method, status)


def _retry_after(status: int, seconds: int) -> bytes:
    return b"Retry-After: %d\r\n" % seconds if status in (429, 503) else b""


class Chain:
    _log = Logger()

    def __init__(
        self, spec: MiddlewareSpec, pool: ServicePool, clock: Any, services: Mapping[str, ServicePool],
        threads: Any = None,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.clock = clock
        self._services = services
        # The request side (labelgw.middleware.access): allowlist, auth, body limit, header rules.
        self.allow = Allowlist(spec.allow) if spec.allow is not None else None
        self.auth = BasicAuth(spec.auth, clock, threads or _thread_runner(clock)) if spec.auth is not None else None
        self.max_body = spec.max_body
        drop_authorization = spec.auth is not None and not spec.auth.forward
        self.headers = HeaderRules(spec.headers, drop_authorization) if spec.headers is not None or drop_authorization else None
        self.body_refused = 0
        self.ratelimit = KeyedRateLimiter(spec.ratelimit) if spec.ratelimit is not None else None
        self._key = key_function(spec.ratelimit) if spec.ratelimit is not None else None
        # The default key, the client address, without a call per request.
        self._key_is_ip = spec.ratelimit is not None and spec.ratelimit.key == "ip"
        self.concurrency = ConcurrencyLimiter(spec.concurrency, clock) if spec.concurrency is not None else None
        self.breaker = CircuitBreaker(spec.breaker) if spec.breaker is not None else None
        self.fallbacks = 0
        # Original route -> the same route to the fallback service, built on first use.
        self._fallback_routes: dict[Route, Route] = {}
        # Redirect, rewrite, plugins, compression (labelgw.middleware.rewrite, .plugin, .compress).
        self.paths = spec.redirect is not None or spec.rewrite is not None
        self._redirect_search = spec.redirect.pattern.search if spec.redirect is not None else None
        self.plugin_steps = [(use.name, _plugin.make_step(use.name, use.parsed)) for use in spec.plugins]
        self.plugin_hooks = [step.response_head for _, step in self.plugin_steps if hasattr(step, "response_head")]
        self.response_transforms = spec.compress is not None or bool(self.plugin_hooks)
        # Worked out here, not per request: the allowlist's admitted addresses (a set lookup per request), the rules
        # each side applies (None: none), and whether a request's passage holds anything (`Pass` when it does not).
        self._allowed = self.allow.allowed if self.allow is not None else None
        headers = self.headers
        self.request_rules = headers if headers is not None and headers.request else None
        self.response_rules = headers if headers is not None and headers.response else None
        self._stateless = spec.auth is None and spec.concurrency is None and spec.breaker is None and spec.fallback is None
        self._pass: Pass | None = None

    def enter(self, gateway: Any, head: RequestHead, side: "RequestSide", route: Route) -> "Ticket | Pass | None":
        """The request's ticket, or None when the chain answered it (429, 503, a static fallback)."""
        if self.paths and not self._paths(head, side):
            return None
        client_ip = head.client_ip or side.peer_ip
        allowed = self._allowed
        if allowed is not None and client_ip not in allowed and not self.allow.allows(client_ip):  # type: ignore[union-attr]
            side.refuse(403, f"service {self.pool.name!r}: client address not allowed", _close(head))
            return None
        auth_wait = None
        auth = self.auth
        if auth is not None:
            checked = auth.check(head.field(b"authorization"))
            if checked is False:
                side.refuse(401, "authentication required", _close(head), auth.challenge)
                return None
            if checked is None:
                side.refuse(503, "too many authentication checks in progress", _close(head), b"Retry-After: 1\r\n")
                return None
            if checked is not True:
                auth_wait = checked
        limiter = self.ratelimit
        if limiter is not None:
            key = client_ip if self._key_is_ip else self._key(head, client_ip)  # type: ignore[misc]
            now = self.clock.seconds()
            # KeyedRateLimiter.allow's common case written out (a call less per request): a known key, no expiry
            # due, a token there. Anything else goes through allow, on the bucket untouched (the same sum again).
            bucket = limiter._buckets.get(key)
            if bucket is not None and now < limiter._sweep_at:
                tokens = bucket.tokens
                elapsed = now - bucket.stamp
                if elapsed > 0:
                    tokens += elapsed * limiter.rate
                    if tokens > limiter.burst:
                        tokens = limiter.burst
                if tokens >= _ONE:
                    if key != limiter._newest:
                        limiter._buckets.move_to_end(key)
                        limiter._newest = key
                    if elapsed > 0:
                        bucket.stamp = now
                    bucket.tokens = tokens - 1.0 if tokens > 1.0 else 0.0
                elif self._limited(limiter, key, now, gateway, head, side):
                    return None
            elif self._limited(limiter, key, now, gateway, head, side):
                return None
        max_body = self.max_body
        if max_body is not None and head.content_length is not None and head.content_length > max_body:
            self.body_refused += 1
            side.refuse(413, f"request body over the limit of service {self.pool.name!r} ({max_body} bytes)", True)
            return None
        request_rules = self.request_rules
        if request_rules is not None:
            if head.forward is None:
                request_rules.apply_request(head)
            else:
                # HeaderRules.apply_request's common case written out (a call less per request): none of the fields
                # to drop is in the head, only the rule's lines are added; after a hit, apply_request does it all.
                block = head.block
                forward = head.forward
                if block is request_rules.kept_block and forward is request_rules.kept_forward:
                    # The very bytes objects of the last head rewritten this way (a repeated head shares its
                    # predecessor's: labelgw.http.parser.request_from): the same result, without the search.
                    head.block, head.forward = request_rules.kept_result
                    head._headers = None
                else:
                    lowered = block.lower()
                    for needle in request_rules.request_needles:
                        if lowered.partition(needle)[1]:  # not `in`: see _named_in
                            request_rules.apply_request(head)
                            break
                    else:
                        add = request_rules.request_lines
                        if add:
                            # RequestHead.rewrite_fields(None, add), written out too.
                            head.block = block + add
                            head.forward = forward + add
                            head._headers = None
                            request_rules.keep(block, forward, head.block, head.forward)
        if self._stateless:
            if self.plugin_steps and not self._plugins_pass(head, side):
                return None
            passage = self._pass
            if passage is None or passage.route is not route:
                passage = self._pass = Pass(self, route)
            return passage
        now = self.clock.seconds()
        ticket = Ticket(self, route)
        if auth_wait is not None:
            ticket.auth_wait = True
            auth_wait.addCallback(ticket.auth_answered)
            auth_wait.addErrback(lambda failure: self._log.failure("auth answer", failure))
        breaker = self.breaker
        if breaker is not None:
            verdict = breaker.admit(now)
            if verdict == DENY:
                self.fall_back(
                    ticket, gateway, head, side, _close(head), BREAKER_OPEN, 503, "circuit breaker open",
                    breaker.retry_after(now),
                )
                return _diverted(ticket, route)
            ticket.probe = verdict == PROBE
        concurrency = self.concurrency
        if concurrency is not None:
            result = concurrency.acquire(ticket)
            if result == ADMITTED:
                ticket.slot = True
            elif result == QUEUED:
                ticket.queued = True
            else:
                if breaker is not None:
                    breaker.abandon(ticket.probe)
                    ticket.probe = False
                self.fall_back(
                    ticket, gateway, head, side, _close(head), CONCURRENCY_LIMIT, 503,
                    f"too many requests in flight (max_inflight {concurrency.limit})", 1,
                )
                return _diverted(ticket, route)
        if self.plugin_steps and not self._plugins_pass(head, side):
            ticket._release(observed=False)
            return None
        return ticket

    def _limited(
        self, limiter: KeyedRateLimiter, key: bytes, now: float, gateway: Any, head: RequestHead, side: "RequestSide"
    ) -> bool:
        """KeyedRateLimiter.allow, when enter's written-out common case did not take a token: True after a 429."""
        wait = limiter.allow(key, now)
        if not wait:
            return False
        _count(gateway, self.pool.name, head, 429)
        side.refuse(429, f"rate limit of service {self.pool.name!r} exceeded", _close(head), limiter.refusal_fields(wait))
        return True

    def _plugins_pass(self, head: RequestHead, side: "RequestSide") -> bool:
        """The plugin middlewares' request steps: False when one answered the request."""
        try:
            answer = _plugin.run_request_steps(self.plugin_steps, head, side.peer_ip)
        except Exception:
            # A plugin's bug answers its own request with a 500; labelgw and other requests go on.
            self._log.failure("service {service}: a plugin middleware failed", service=self.pool.name)
            answer = _plugin.Answer(500, f"a plugin middleware of service {self.pool.name!r} failed")
        if answer is None:
            return True
        side.refuse(answer.status, answer.message, _close(head), answer.extra)
        return False

    def _paths(self, head: RequestHead, side: "RequestSide") -> bool:
        """Redirect or rewrite by regex: False when the request was answered (the redirect, or 400)."""
        spec = self.spec
        search = self._redirect_search
        if search is not None and spec.rewrite is None and search(head.target.decode("latin-1")) is None:
            return True  # the common case, inline: a redirect regex that does not match
        try:
            redirect = _rewrite.apply(spec.redirect, spec.rewrite, head)
        except PathRefused as error:
            side.refuse(400, f"rewrite of service {self.pool.name!r}: {error.reason}", _close(head))
            return False
        if redirect is None:
            return True
        status, location = redirect
        side.refuse(status, "redirected", _close(head), b"Location: %s\r\n" % location)
        return False

    def transform(self, exchange: Exchange) -> None:
        """The response transforms of this service on an exchange: plugin response steps, then compression."""
        if self.spec.compress is not None:
            _compress.wrap(exchange, self.spec.compress)
        if self.plugin_hooks:
            _plugin.wrap(exchange, self.plugin_hooks)

    def fall_back(
        self, ticket: Ticket, gateway: Any, head: RequestHead, side: "RequestSide", close: bool, reason: str,
        status: int, what: str, retry_after: int,
    ) -> bool:
        """Send the request to the fallback: True when it took it (a static answer was sent, or `ticket.route`
        now leads to the fallback service and, from `divert`, `ticket.exchange` is its exchange). False when
        there is none or it has no ready backend: this service's own answer was sent (from `enter`) or is up
        to the caller (from `divert`)."""
        fallback = self.spec.fallback
        name = self.pool.name
        if fallback is not None and fallback.status is not None:
            self.fallbacks += 1
            _count(gateway, name, head, fallback.status)
            side.refuse(fallback.status, fallback.body or f"service {name!r} is degraded ({reason})", close,
                        _retry_after(fallback.status, retry_after))
            return True
        target = self._services.get(fallback.service) if fallback is not None and fallback.service else None
        if target is not None and target.ready and target is not self.pool:
            route = ticket.route
            alternative = self._fallback_routes.get(route)
            if alternative is None or alternative.service is not target:
                alternative = self._fallback_routes[route] = Route(
                    route.host, route.path_prefix, target, route.strip_prefix, route.scheme, route.tls
                )
            self.fallbacks += 1
            ticket.route = alternative
            ticket.fallback_reason = reason
            # NO_BACKEND: the dispatcher picks among the fallback's backends (its versions and hash key count).
            return True
        if reason != NO_BACKEND:
            _count(gateway, name, head, status)
            side.refuse(status, f"service {name!r}: {what}", close, b"Retry-After: %d\r\n" % retry_after)
        return False

    def describe(self) -> dict[str, Any]:
        """For the admin view."""
        now = self.clock.seconds()
        view: dict[str, Any] = {}
        if self.allow is not None:
            view["allow"] = {"networks": [str(n) for n in self.allow.spec.networks], "refused": self.allow.refused}
        if self.auth is not None:
            a = self.auth
            view["auth"] = {"users": len(a.spec.users), "realm": a.spec.realm, "refused": a.refused, "checks": a.checks,
                            "pending": a.pending}
        if self.max_body is not None:
            view["max_body"] = {"bytes": self.max_body, "refused": self.body_refused}
        if self.spec.headers is not None:
            h = self.spec.headers
            view["headers"] = {"request_set": [n for n, _ in h.request_set], "request_remove": list(h.request_remove),
                               "response_set": [n for n, _ in h.response_set], "response_remove": list(h.response_remove)}
        if self.ratelimit is not None:
            spec = self.ratelimit.spec
            view["ratelimit"] = {
                "rate_per_second": spec.rate, "burst": spec.burst, "key": spec.key + (f":{spec.key_name}" if spec.key_name else ""),
                "keys": len(self.ratelimit), "limited": self.ratelimit.limited,
            }
        if self.concurrency is not None:
            c = self.concurrency
            view["concurrency"] = {
                "max_inflight": c.limit, "max_pending": c.max_pending, "active": c.active, "pending": c.pending,
                "rejected": c.rejected, "timeouts": c.timeouts,
            }
        if self.breaker is not None:
            b = self.breaker
            total, failures = b.counts(now)
            view["breaker"] = {"state": b.state, "opened": b.opened, "window_requests": total, "window_failures": failures}
        fallback = self.spec.fallback
        if fallback is not None:
            view["fallback"] = {"service": fallback.service, "status": fallback.status, "used": self.fallbacks}
        return view


class MiddlewareManager:
    """A registry listener: gives each new service the chain its first container asks for."""

    _log = Logger()

    def __init__(self, clock: Any, services: Mapping[str, ServicePool], threads: Any = None) -> None:
        self._clock = clock
        self._services = services
        # Runs a bcrypt check off the reactor thread: threads(function, *args) -> Deferred (None: the clock's pool).
        self._threads = threads
        # Services that have not seen their first backend yet.
        self._fresh: set[int] = set()

    def service_added(self, pool: ServicePool) -> None:
        self._fresh.add(id(pool))

    def backend_added(self, pool: ServicePool, backend: Backend) -> None:
        spec = backend.spec.middleware
        if id(pool) in self._fresh:
            self._fresh.discard(id(pool))
            if spec is not None:
                pool.middleware = Chain(spec, pool, self._clock, self._services, self._threads)
                self._log.info("service {service}: middlewares {names}", service=pool.name, names=", ".join(_names(spec)))
            return
        current = pool.middleware.spec if pool.middleware is not None else None
        if spec != current:
            self._log.warn(
                "container {name} asks for other middleware options than service {service} uses (its first "
                "container's); they are ignored", name=backend.spec.name, service=pool.name,
            )

    def backend_updated(self, pool: ServicePool, backend: Backend) -> None:
        # A container's labels never change in place; a static service's keys do, on a config reload. Once every
        # backend of the service asks for the same new options, the chain is rebuilt (or dropped) to match them:
        # requests already holding a ticket finish on the old chain.
        spec = backend.spec.middleware
        current = pool.middleware.spec if pool.middleware is not None else None
        if spec == current or any(b.spec.middleware != spec for b in pool.backends.values()):
            return
        pool.middleware = Chain(spec, pool, self._clock, self._services) if spec is not None else None
        self._log.info("service {service}: middlewares now {names}", service=pool.name,
                       names=", ".join(_names(spec)) if spec is not None else "none")

    def backend_removed(self, pool: ServicePool, backend: Backend) -> None:
        pass


def _names(spec: MiddlewareSpec) -> list[str]:
    return [name for name, value in (
        ("allow", spec.allow), ("auth", spec.auth), ("max_body", spec.max_body), ("headers", spec.headers),
        ("ratelimit", spec.ratelimit), ("concurrency", spec.concurrency), ("breaker", spec.breaker),
        ("fallback", spec.fallback), ("compress", spec.compress), ("redirect", spec.redirect),
        ("rewrite", spec.rewrite),
    ) if value is not None] + [f"plugin {use.name}" for use in spec.plugins]


def _thread_runner(clock: Any) -> Any:
    """deferToThreadPool on the reactor's pool (the reactor is the clock in labelgw), else run in place (a test
    clock has no threads)."""
    get_pool = getattr(clock, "getThreadPool", None)
    if get_pool is None:
        from labelgw.middleware.access import synchronous

        return synchronous
    from twisted.internet.threads import deferToThreadPool

    return lambda function, *args: deferToThreadPool(clock, get_pool(), function, *args)
