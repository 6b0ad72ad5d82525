"""The admin listener: a read-only JSON view of what labelgw routes and how its backends are doing.

`GET /` or `GET /api/state` answers with every service (its balancer, versions and backends: address, weight,
readiness and why, health-check state, ejections, in-flight, requests, errors, latency estimate and slow-start
factor), every route (host + path -> service) and every container skipped for a bad label, with the reason.
It is a twisted.web Site on its own listener (127.0.0.1 only by default), off the proxy's data path; building
the view reads the registry on the reactor thread and changes nothing.

Listening on loopback does not keep web pages out: a page whose host name an attacker re-points at 127.0.0.1
(DNS rebinding) may read the view as its own origin. So the view answers only requests whose Host is
``localhost`` or a name under ``.localhost`` (RFC 6761: browsers resolve those to loopback themselves, never
through DNS, so no page can rebind them), a loopback address (127.0.0.0/8, ``[::1]``), or a name given with
``--admin-host`` / ``admin_hosts``; the port does not matter. Any other Host gets ``421`` and a body saying
why. A request without Host (HTTP/1.0 tools; browsers always send one) is answered.

Besides the JSON view: ``GET /dashboard``, an HTML page (files shipped in ``labelgw/static``, plain JavaScript
that polls the JSON view every second); ``GET /explain?url=...`` (labelgw.control.explain); ``GET /healthz``, ``200``
while labelgw serves and ``503`` once it is stopping (SIGTERM) and draining its connections.
"""

from __future__ import annotations

import ipaddress
import json
import re
from importlib import resources
from typing import Any, Callable, Iterable

from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from labelgw.core import balancer
from labelgw.core.backends import Backend, ServicePool
from labelgw.core.canary import CanaryAnalyzer, describe_service
from labelgw.control.explain import ExplainError, Explainer
from labelgw.cli.listeners import ListenerService
from labelgw.core.registry import Registry

__all__ = [
    "AdminListener", "AdminResource", "admin_host_allowed", "admin_site", "normalize_admin_host", "state", "static_files",
]

Clock = Callable[[], float]
Describe = Callable[[Backend], "dict[str, Any] | None"]
Serving = Callable[[], bool]
# The Prometheus exposition and its content type (labelgw.control.metrics.render).
Metrics = Callable[[], "tuple[bytes, bytes]"]

STATE_PATHS = (b"/", b"/api/state", b"/api/state/")
# The dashboard's files (labelgw/static), by path: read once when the view is built, never on a request.
STATIC = {
    b"/dashboard": ("dashboard.html", b"text/html; charset=utf-8"),
    b"/dashboard/": ("dashboard.html", b"text/html; charset=utf-8"),
    b"/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    b"/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}
# Only the dashboard's own files and fetches to this origin; no inline script, no framing, no forms.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_files() -> dict[str, bytes]:
    """The dashboard's files, from the installed package."""
    folder = resources.files("labelgw") / "static"
    return {name: (folder / name).read_bytes() for name in {name for name, _ in STATIC.values()}}

# A Host field: a name or IPv4 address, or a bracketed IPv6 literal, then an optional port.
_HOST_FIELD = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::[0-9]{0,5})?\Z")


def normalize_admin_host(raw: str) -> str | None:
    """The host of a Host field (lower case, no port, no trailing dot, IPv6 without brackets); None if malformed."""
    match = _HOST_FIELD.match(raw.strip().lower())
    if match is None:
        return None
    return match.group("ip6") or match.group("name").rstrip(".")


def admin_host_allowed(host: str, allowed: Iterable[str] = ()) -> bool:
    """Whether the admin view answers a request for C{host} (as L{normalize_admin_host} returns it)."""
    if host == "localhost" or host.endswith(".localhost") or host in allowed:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def state(registry: Registry, now: float, health: Describe | None = None) -> dict[str, Any]:
    """The JSON-ready view of `registry` at clock time `now`; `health` adds each backend's check details."""
    return {
        "time": now,
        "services": {name: _service(pool, now, health) for name, pool in sorted(registry.services.items())},
        "routes": [
            {
                "host": route.host,
                "path": route.path_prefix,
                "service": route.service.name,
                "strip_prefix": route.strip_prefix,
                "scheme": route.scheme,
                # A one-label wildcard host (*.apps.localhost): exact hosts under it win (labelgw.core.routes).
                "wildcard": route.host.startswith("*."),
            }
            for route in registry.routes()
        ],
        "rejections": [
            {
                "container": rejection.name,
                "id": rejection.container_id,
                "label": rejection.label,
                "value": rejection.value,
                "reason": rejection.reason,
                "hosts": list(rejection.hosts),
                "message": rejection.describe(),
            }
            for rejection in sorted(registry.rejections.values(), key=lambda r: (r.name, r.container_id))
        ],
    }


def _service(pool: ServicePool, now: float, health: Describe | None) -> dict[str, Any]:
    backends = sorted(pool.backends.values(), key=lambda b: (b.version or "", b.spec.name, b.key))
    versions: dict[str, dict[str, Any]] = {}
    for backend in backends:
        key = backend.version or ""
        entry = versions.setdefault(key, {"backends": [], "ready": 0, "traffic": None})
        entry["backends"].append(backend.spec.name)
        entry["ready"] += 1 if backend.ready else 0
        # A number (percent), as every other figure in this view; the label's text is in the container's labels.
        traffic = backend.spec.traffic
        if traffic is not None and entry["traffic"] is None:
            entry["traffic"] = traffic
    # The share of new clients each version gets now (labelgw.core.versions); one ready version gets them all.
    split = getattr(pool, "split", None)
    # Clients given each version so far (a cookie keeps them there): counted by labelgw.core.versions.
    sticky = getattr(pool, "sticky_clients", {})
    for key, entry in versions.items():
        if split is not None:
            entry["share"] = round(split.shares.get(key, 0.0), 3)
        else:
            entry["share"] = 100.0 if entry["ready"] else 0.0
        entry["sticky_clients"] = sticky.get(key, 0)
    # Canary analysis (labelgw.core.canary): each version's window and whether it is cut, and why.
    canary: dict[str, dict[str, Any]] = {}
    for key, figures in sorted(describe_service(pool, now).items()):
        if key in versions:
            canary[key] = {
                "requests": figures.requests,
                "errors": figures.errors,
                "error_rate": round(figures.error_rate, 4),
                "p99_ms": round(1000 * figures.p99, 3) if figures.p99 is not None else None,
                "cut": figures.cut,
                "reason": figures.reason,
                "stable": figures.stable,
                "max_error_rate": figures.max_error_rate,
                "max_latency_ratio": figures.max_latency_ratio,
            }
    view = {
        "balancer": getattr(pool.policy, "name", type(pool.policy).__name__),
        "ready": len(pool.ready),
        "total": len(pool.backends),
        "ejected": pool.ejected_count(),
        "versions": versions,
        "canary": canary,
        "backends": [_backend(backend, now, health) for backend in backends],
    }
    # Rate limit, concurrency, breaker and fallback state (labelgw.middleware.chain), for services that have them.
    chain = getattr(pool, "middleware", None)
    if chain is not None:
        view["middleware"] = chain.describe()
    return view


def _backend(backend: Backend, now: float, health: Describe | None) -> dict[str, Any]:
    spec = backend.spec
    selection = balancer.describe(backend)
    until = backend.ejected_until
    return {
        "container": spec.name,
        "id": spec.container_id,
        "address": f"{backend.address}:{backend.port}",
        "version": backend.version,
        "weight": backend.weight,
        "ready": backend.ready,
        # The three sources of `ready`.
        "container_ready": spec.ready,
        "docker_health": spec.health,
        "health": backend.health_state,
        "health_check": health(backend) if health is not None else None,
        "ejected": until is not None,
        "ejected_until": until,
        "ejected_for": round(max(0.0, until - now), 3) if until is not None else None,
        "ejections": backend.ejections,
        "consecutive_failures": backend.consecutive_failures,
        "in_flight": backend.in_flight,
        "requests": backend.requests,
        "errors": backend.errors,
        "latency_ms": selection.get("latency_ms"),
        "slow_start": selection.get("slow_start"),
        "samples": selection.get("samples", 0),
    }


class AdminResource(Resource):
    isLeaf = True

    def __init__(
        self,
        registry: Registry,
        clock: Clock,
        health: Describe | None = None,
        allowed_hosts: Iterable[str] = (),
        explainer: Explainer | None = None,
        serving: Serving | None = None,
        canary: CanaryAnalyzer | None = None,
        metrics: Metrics | None = None,
        ca_certificate: Callable[[], bytes | None] | None = None,
        registrations: Callable[[], dict[str, Any]] | None = None,
        acme: Callable[[], Any] | None = None,
    ) -> None:
        Resource.__init__(self)
        # The registration API's registry (labelgw.registration): its kind, instance count and etcd state.
        self._registrations = registrations
        # GET /acme: the ACME certificates of public names, and why a name has none yet (labelgw.tls.acme).
        self._acme = acme
        # GET /ca.pem: the local CA's public certificate (never its key); None or None returned: no HTTPS CA.
        self._ca_certificate = ca_certificate
        self._canary = canary if canary is not None else CanaryAnalyzer()
        self._metrics = metrics
        self._registry = registry
        self._clock = clock
        self._health = health
        self._allowed_hosts = frozenset(allowed_hosts)
        self._explainer = explainer if explainer is not None else Explainer(registry.table)
        self._serving = serving
        self._static = static_files()
        # GET /workers: set by the supervisor of `--workers N` (labelgw.workers.supervisor); None: one process.
        self.workers: Callable[[], Any] | None = None

    def render(self, request: Request) -> bytes:
        # Before anything else, whatever the method: a page reached through DNS rebinding learns nothing.
        raw = request.getHeader(b"host")
        if raw is not None:
            text = raw.decode("latin-1")
            host = normalize_admin_host(text)
            if host is None or not admin_host_allowed(host, self._allowed_hosts):
                request.setHeader(b"cache-control", b"no-store")
                request.setResponseCode(421)
                return self._json(request, {
                    "error": f"the admin view does not answer for host {text!r}",
                    "allowed": "localhost, *.localhost, loopback addresses (127.0.0.0/8, [::1]) and the names "
                    "given with --admin-host or admin_hosts",
                })
        result: bytes = Resource.render(self, request)
        return result

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        # A leaf at the site's root: the path is all in postpath.
        path = b"/" + b"/".join(request.postpath or [])
        if path in STATE_PATHS:
            view = state(self._registry, self._clock(), self._health)
            if self._registrations is not None:
                view["registrations"] = self._registrations()
            return self._json(request, view)
        if path == b"/healthz":
            return self._healthz(request)
        if path == b"/explain":
            return self._explain(request)
        if path == b"/workers" and self.workers is not None:
            return self._json(request, self.workers())
        if path == b"/metrics" and self._metrics is not None:
            body, content_type = self._metrics()
            request.setHeader(b"content-type", content_type)
            return body
        static = STATIC.get(path)
        if static is not None:
            name, content_type = static
            request.setHeader(b"content-type", content_type)
            return self._static[name]
        if path == b"/acme":
            described = self._acme() if self._acme is not None else None
            if described is None:
                request.setResponseCode(404)
                return self._json(request, {"error": "ACME is off (no --acme-email)"})
            return self._json(request, described)
        if path == b"/ca.pem":
            pem = self._ca_certificate() if self._ca_certificate is not None else None
            if pem is not None:
                request.setHeader(b"content-type", b"application/x-pem-file")
                request.setHeader(b"content-disposition", b'attachment; filename="labelgw-ca.pem"')
                return pem
            request.setResponseCode(404)
            return self._json(request, {"error": "no local CA: HTTPS is off"})
        request.setResponseCode(404)
        return self._json(request, {
            "error": "not found",
            "try": ["/", "/api/state", "/dashboard", "/explain?url=", "/healthz", "/ca.pem", "/acme"]
            + (["/metrics"] if self._metrics is not None else []),
        })

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)

    def render_POST(self, request: Request) -> bytes:
        """POST /canary/<service>/<version>/resume: lift a canary cut (labelgw.core.canary)."""
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # A page on another site may make a browser POST here (a form needs no preflight); browsers say where
        # it came from in Origin, which must then be one of the names the admin view answers for.
        origin = request.getHeader(b"origin")
        if origin is not None and not self._origin_allowed(origin.decode("latin-1")):
            request.setResponseCode(403)
            return self._json(request, {"error": f"the admin listener does not take changes from origin {origin.decode('latin-1')!r}"})
        parts = [part.decode("utf-8", "replace") for part in request.postpath or []]
        if len(parts) == 4 and parts[0] == "canary" and parts[3] == "resume":
            service, version = parts[1].lower(), parts[2]
            pool = self._registry.services.get(service)
            if pool is None or not self._canary.resume(pool, version):
                request.setResponseCode(404)
                return self._json(request, {"error": f"no version {version!r} of service {service!r}"})
            figures = describe_service(pool, self._clock())[version]
            return self._json(request, {
                "service": service, "version": version, "resumed": True, "cut": figures.cut,
                "share": round(pool.split.shares.get(version, 0.0), 3) if pool.split is not None else None,
            })
        if parts and parts[0] == "canary":
            request.setResponseCode(404)
            return self._json(request, {"error": "not found", "try": "POST /canary/<service>/<version>/resume"})
        # Every other path is read-only: twisted.web's 405.
        raise UnsupportedMethod([b"GET", b"HEAD"])

    def _origin_allowed(self, origin: str) -> bool:
        scheme, _, rest = origin.strip().partition("://")
        if scheme.lower() not in ("http", "https") or not rest or "/" in rest:
            return False
        host = normalize_admin_host(rest)
        return host is not None and admin_host_allowed(host, self._allowed_hosts)

    def _healthz(self, request: Request) -> bytes:
        serving = self._serving is None or self._serving()
        if not serving:
            request.setResponseCode(503)
        return self._json(request, {"status": "serving" if serving else "draining"})

    def _explain(self, request: Request) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}

        def arg(name: bytes) -> str | None:
            values = args.get(name)
            return values[0].decode("utf-8", "replace") if values else None

        version = arg(b"version")
        if version is None:
            # The version header, passed along on the explain request itself.
            header = request.getHeader(self._explainer.version_header.lower().encode("ascii"))
            version = header.decode("latin-1") if header is not None else None
        try:
            view = self._explainer.explain(arg(b"url") or "", version=version, cookie=arg(b"cookie"))
        except ExplainError as error:
            request.setResponseCode(400)
            return self._json(request, {"error": str(error), "try": "/explain?url=http://api.localhost/x&version=v2"})
        return self._json(request, view)

    @staticmethod
    def _json(request: Request, body: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=1, sort_keys=False).encode("utf-8") + b"\n"


class AdminSite(Site):
    """No access log: tests and dashboards poll the admin view, which would drown the gateway's own log."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def admin_site(
    registry: Registry,
    clock: Clock,
    health: Describe | None = None,
    allowed_hosts: Iterable[str] = (),
    explainer: Explainer | None = None,
    serving: Serving | None = None,
    canary: CanaryAnalyzer | None = None,
    metrics: Metrics | None = None,
    ca_certificate: Callable[[], bytes | None] | None = None,
    registrations: Callable[[], dict[str, Any]] | None = None,
    acme: Callable[[], Any] | None = None,
) -> Site:
    return AdminSite(
        AdminResource(
            registry, clock, health, allowed_hosts, explainer, serving, canary, metrics, ca_certificate, registrations,
            acme,
        )
    )


class AdminListener(ListenerService):
    """The admin endpoint; logs `labelgw admin on http://...` instead of the proxy listeners' line."""

    started_message = "labelgw admin on {url}"
