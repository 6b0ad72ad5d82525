"""Routing, written once for HTTP/1.1 and HTTP/2: a parsed request head in, an exchange (or labelgw's own
answer) out. Route lookup, the redirect to HTTPS, 404 and 503 answers, the in-flight bounds, the version choice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from labelgw.http.exchange import Exchange
from labelgw.middleware.access import client_address
from labelgw.http.hashkey import request_key
from labelgw.http.parser import RequestHead
from labelgw.http.sides import RequestSide
from labelgw.core.routes import normalize_host
from labelgw.http.versioning import choose_version
from labelgw.core.paths import PathRefused, route_target
from labelgw.tls.acme_http import answer_http01

if TYPE_CHECKING:
    from labelgw.core.backends import Backend, ServicePool
    from labelgw.http.server import Gateway

# Raw Host header -> normalised host name: the same few values arrive on every request.
_HOSTS: dict[bytes, str] = {}
# Request target -> its path to route on and target to forward (route_target: a pure function of the target, and
# a refused one is never kept): a client's requests repeat a few targets. Targets up to 512 bytes, 4096 of them.
_TARGETS: dict[bytes, tuple[str, bytes]] = {}
_TARGET_KEPT = 512


def _close(head: RequestHead) -> bool:
    # An unread request body would be taken for the next request: answers without an exchange close instead.
    return head.has_body or not head.keep_alive


def _has_version(service: "ServicePool", version: str) -> bool:
    """Has the service any backend of this version, ready or not?"""
    return any((backend.version or "") == version for backend in service.backends.values())


def _loopback(peer_ip: bytes) -> bool:
    return peer_ip.startswith(b"127.") or peer_ip in (b"::1", b"::ffff:127.0.0.1") or peer_ip.startswith(b"::ffff:127.")


def dispatch(
    gateway: "Gateway", head: RequestHead, side: RequestSide, make: type[Exchange] = Exchange
) -> Exchange | None:
    """The exchange that will serve `head` (not started yet), or None after `side` answered it itself. `make`: the
    exchange's class (HTTP/1.1's client side takes a whole response in one call: WholeExchange)."""
    trusted = gateway.trusted_proxies
    if trusted is not None:
        # --trusted-proxies: the client is the last untrusted X-Forwarded-For hop (labelgw.middleware.access).
        head.client_ip = client_address(side.peer_ip, [v for n, v in head.headers if n.lower() == b"x-forwarded-for"], trusted)
    # X-Request-Id and traceparent kept or made (labelgw.http.requestid); added upstream by labelgw.http.headers.
    gateway.request_ids.assign(head)
    raw_host = head.host
    if raw_host:
        host = _HOSTS.get(raw_host)
        if host is None:
            host = normalize_host(raw_host.decode("latin-1"))
            if len(_HOSTS) >= 4096:
                _HOSTS.clear()
            _HOSTS[raw_host] = host
    else:
        host = ""
    # Routed on the path's normal form, forwarded without dot segments; or refused (labelgw.core.paths).
    raw_target = head.target
    routed = _TARGETS.get(raw_target)
    if routed is None:
        try:
            routed = route_target(raw_target)
        except PathRefused as error:
            if gateway.metrics is not None:
                gateway.metrics.refused(None, None, head.method, 400)
            side.refuse(400, error.reason, _close(head))
            return None
        if len(raw_target) <= _TARGET_KEPT:
            if len(_TARGETS) >= 4096:
                _TARGETS.clear()
            _TARGETS[raw_target] = routed
    path, target = routed
    head.target = target
    # ACME HTTP-01 validations of labelgw's own orders, before routing and the HTTPS redirect (labelgw.tls.acme_http).
    # (The second character first: one comparison for nearly every path.)
    if path[1:2] == "." and path.startswith("/.well-known/acme-challenge/") and answer_http01(gateway, path, head, side):
        return None
    route = gateway.table.lookup(host, path)
    # Plain HTTP answered with a 308 to HTTPS (--redirect-https, <prefix>.tls=redirect): labelgw.tls.https.
    redirect = gateway.https_redirect
    if redirect is not None and side.proto == b"http":
        location = redirect.location(host, target, route)
        if location is not None:
            if gateway.metrics is not None:
                gateway.metrics.refused(None, None, head.method, 308)
            side.refuse(308, "use HTTPS", _close(head), b"Location: %s\r\n" % location)
            return None
    if route is None:
        if gateway.table.knows_host(host):
            message = f"no route for http://{host}{path}"
        else:
            message = f"no route for host {host!r}" if host else "no Host header"
            # A container that asked for this host but was skipped for a bad label: said only to loopback clients
            # (the label text may be internal); anyone else gets the plain 404.
            if host and gateway.rejected_for is not None and _loopback(side.peer_ip):
                rejection = gateway.rejected_for(host)
                if rejection is not None:
                    message += f"; {rejection.describe()} (skipped)"
        if gateway.metrics is not None:
            gateway.metrics.refused(None, None, head.method, 404)
        side.refuse(404, message, _close(head))
        return None
    service = route.service
    if gateway.in_flight >= gateway.settings.max_in_flight:
        if gateway.metrics is not None:
            gateway.metrics.refused(service.name, None, head.method, 503, "in_flight_limit")
        side.refuse(503, "too many requests in flight", _close(head), b"Retry-After: 1\r\n")
        return None
    if service.in_flight >= gateway.service_limit:
        if gateway.metrics is not None:
            gateway.metrics.refused(service.name, None, head.method, 503, "service_in_flight_limit")
        side.refuse(503, f"too many requests in flight to service {service.name!r}", _close(head), b"Retry-After: 1\r\n")
        return None
    ticket = None
    chain = service.middleware
    if chain is not None:
        # Rate limit, breaker, concurrency limit, fallback (labelgw.middleware.chain): may answer or divert.
        ticket = chain.enter(gateway, head, side, route)
        if ticket is None:
            return None
        route = ticket.route
        service = route.service
    if service.key_source is None and service.split is None:
        # The common route (no hash key, one version): the policy's pick among the ready backends, as _pick would
        # return it; without a middleware, an exchange with nothing more to set.
        backend = service.policy.pick(service.ready)
        if backend is not None:
            if ticket is None:
                return make(side, gateway, head, route, backend)
            if ticket.plain:
                # Pass.bind's common case written out (a call less per request): only the response rules to set.
                exchange = make(side, gateway, head, route, backend)
                exchange.response_rules = ticket.response_rules
                return exchange
        version, cookie, pinned, key = None, b"", False, None
    else:
        backend, version, cookie, pinned, key = _pick(gateway, service, head, side, path)
    if backend is None:
        if ticket is not None and ticket.divert(gateway, head, side, _close(head)):
            if ticket.route is route:
                return None  # a static fallback answered
            # The fallback service is picked from as any request to it: its versions, cookie and hash key count.
            route = ticket.route
            backend, version, cookie, pinned, key = _pick(gateway, route.service, head, side, path)
    if backend is None:
        service = route.service
        if pinned and version is not None and not _has_version(service, version):
            # No container of that version at all: a retry cannot help, so no 503 and no Retry-After.
            if gateway.metrics is not None:
                gateway.metrics.refused(service.name, version, head.method, 404)
            side.refuse(404, f"service {service.name!r} has no version {version!r}", _close(head))
            return None
        what = f" of version {version!r}" if version is not None else ""
        if gateway.metrics is not None:
            gateway.metrics.refused(service.name, version, head.method, 503, "no_ready_backend")
        side.refuse(503, f"service {service.name!r} has no ready backend{what}", _close(head), b"Retry-After: 1\r\n")
        return None
    exchange = make(side, gateway, head, route, backend)
    if key is not None:
        exchange.hash_key = key  # a retry is placed by the same key
    if version is not None:
        exchange.version = version
        exchange.pinned = pinned
        exchange.response_extra = cookie
    if ticket is not None:
        if ticket.plain:
            exchange.response_rules = ticket.response_rules  # as above
        else:
            ticket.bind(exchange)
            if exchange.client is not side and type(exchange) is not Exchange:
                # A response transform wrapped the client side (labelgw.middleware: compression, plugins): the
                # response goes to it in the three steps every client side takes, not whole.
                exchange.__class__ = Exchange
    return exchange


def _pick(
    gateway: "Gateway", service: ServicePool, head: RequestHead, side: RequestSide, path: str
) -> tuple[Backend | None, str | None, bytes, bool, bytes | None]:
    """Backend, version, Set-Cookie line, pinned, and the hash key the request was placed by."""
    # balancer=hash: the request's key, read here (the core knows no HTTP); None for every other policy.
    key_source = service.key_source
    if key_source is None:
        if service.split is None:
            # ServicePool.pick() with nothing excluded, no version and no key: the policy's pick among the ready.
            return service.policy.pick(service.ready), None, b"", False, None
        key = None
    else:
        key = request_key(key_source, head, side.peer_ip, path)
    if service.split is None:
        return service.pick(key=key), None, b"", False, key
    backend, version, cookie, pinned = choose_version(service, head, gateway.version_header, key)
    return backend, version, cookie, pinned, key
