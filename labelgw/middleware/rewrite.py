"""Redirects and path rewrites by regex (`<prefix>.redirect.*`, `<prefix>.rewrite.*`), after routing.

Both run on the forwarded form of the request (labelgw.core.paths: dot segments removed, escapes as received),
first in the service's chain, so a redirected request takes no rate-limit token or concurrency slot.

- redirect: the regex is searched in the target (path and query); its first match is replaced (`$1`, `${name}`)
  and the result answered as Location, with 307 (308 when `redirect.permanent=true`): the client keeps the method
  and body, which 301/302 let clients change to GET.
- rewrite: the regex is searched in the path only (the query is kept) and the first match replaced; the route is
  not looked up again (Traefik's ReplacePathRegex does the same). The result goes through labelgw's path rules
  once more: it must be absolute (else 400), dot segments are removed, and a `..` that climbs above the root is
  refused with 400 - a rewrite cannot forward what labelgw would refuse from a client.
"""

from __future__ import annotations

from labelgw.core.middleware import RegexSpec, expand
from labelgw.core.paths import PathRefused, route_target
from labelgw.http.parser import RequestHead

__all__ = ["redirect_location", "rewrite_target"]


def redirect_location(spec: RegexSpec, target: bytes) -> bytes | None:
    """The Location for a target the redirect regex matches; None when it does not match."""
    text = target.decode("latin-1")
    match = spec.pattern.search(text)
    if match is None:
        return None
    return (text[:match.start()] + expand(spec, match) + text[match.end():]).encode("latin-1")


def rewrite_target(spec: RegexSpec, target: bytes) -> bytes:
    """The target with its path rewritten (the same target when the regex does not match); PathRefused for a
    result that is not an absolute path or that climbs above the root."""
    query = target.find(b"?")
    path = (target if query == -1 else target[:query]).decode("latin-1")
    match = spec.pattern.search(path)
    if match is None:
        return target
    new = path[:match.start()] + expand(spec, match) + path[match.end():]
    if not new.startswith("/"):
        raise PathRefused(f"the rewritten path {new[:200]!r} is not absolute")
    _, forwarded = route_target(new.encode("latin-1") + (b"" if query == -1 else target[query:]))
    return forwarded


def apply(redirect: RegexSpec | None, rewrite: RegexSpec | None, head: RequestHead) -> tuple[int, bytes] | None:
    """Redirect or rewrite `head`: (status, Location) for a redirect, else None (the target possibly rewritten).
    Raises PathRefused for a rewrite labelgw refuses."""
    if redirect is not None:
        location = redirect_location(redirect, head.target)
        if location is not None:
            return (308 if redirect.permanent else 307), location
    if rewrite is not None:
        head.target = rewrite_target(rewrite, head.target)
    return None
