# -*- test-case-name: tests.test_paths -*-
"""Request paths as routing sees them: one normal form to match on, one safe target to forward. Pure.

A path-prefix route is only a boundary if labelgw and the backend agree on which prefix a path is under. Backends
resolve dot segments (``/public/../admin`` is ``/admin`` to them), many decode ``%2e`` to ``.`` first, some take
``%2F`` or a backslash for a separator, Tomcat drops ``;parameters`` before resolving. So labelgw:

- matches on the *matching form*: unreserved escapes decoded (``%7E`` is ``~``, ``%2e`` is ``.``), other escapes
  in upper case, ``%2F`` taken as ``/``, runs of ``/`` merged, dot segments removed (RFC 3986 sections 6.2.2 and
  5.2.4) - what nginx matches its locations against;
- forwards the *forwarded form*: the path as received with runs of ``/`` merged and dot segments (``.``, ``..``
  and their encodings such as ``%2e%2e`` or ``.%2E``) removed, every other byte as received (escapes are not
  decoded, ``%2F`` stays ``%2F``); the query is never touched. The matching form of the forwarded form is the
  matching form of the request, so a backend cannot resolve the forwarded path out of the prefix it matched;
- refuses with 400 what cannot be made to agree: a ``..`` that climbs above the root, a dot segment carrying
  ``;parameters`` (``..;``), and dot segments in a path that also has an encoded slash, a backslash or ``%5C``
  (whether those separate segments is the backend's choice, so where the dots lead is too).

Nearly every request has no ``%``, no ``/.``, no ``//`` and no backslash: four substring searches (about 0.1 us
in all), and its path is both forms as it is.
"""

from __future__ import annotations

import re


class PathRefused(ValueError):
    """A path labelgw will not route: the HTTP layer answers 400 with the reason."""

    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# What some backends take for a segment separator besides "/" (after escapes are normalised to upper case).
_LOOSE_SEPARATOR = re.compile(r"/|\\|%2F|%5C")
# A piece that could be a dot segment starts with "." or "%2e" right after some separator: without one, no
# segment needs looking at.
_MAYBE_DOT = re.compile(r"(?:[/\\]|%2[fF]|%5[cC])(?:\.|%2[eE])")
_SLASHES = re.compile(r"//+")
# What the matching form splits segments at.
_STRICT_SEPARATOR = re.compile(rb"/|%2[fF]")
_DOTS = (".", "..")

# Work is done on paths decoded as latin-1 (one character per byte): "in" on bytes first tries its operand as an
# int and costs several times what it does on str.


def _escape(match: "re.Match[str]") -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def decode_unreserved(text: str) -> str:
    """RFC 3986 section 6.2.2: escapes of unreserved characters decoded, every other escape in upper case."""
    return _ESCAPE.sub(_escape, text) if "%" in text else text


def _matching_form(path: str) -> str:
    """The matching form of a path that has no dot segments left: escapes normalised, %2F a "/", "/" runs merged."""
    if "%" in path:
        path = decode_unreserved(path).replace("%2F", "/")
    return _SLASHES.sub("/", path) if "//" in path else path


def route_target(target: bytes) -> tuple[str, bytes]:
    """Split a request target (origin form, or ``*``) into the path to route on (matching form) and the target to
    forward (forwarded form, query as received). Raises PathRefused for a path labelgw refuses (a 400)."""
    # An int needle is a memchr; find() would parse its arguments first (most targets have no query).
    query = target.find(b"?") if 63 in target else -1
    path = (target if query == -1 else target[:query]).decode("latin-1")
    if "%" not in path and "/." not in path and "//" not in path and "\\" not in path or path[:1] != "/":
        return path, target
    forward = _forwarded_path(path)
    if forward is not path:
        target = forward.encode("latin-1") + (b"" if query == -1 else target[query:])
    return _matching_form(forward), target


def _forwarded_path(path: str) -> str:
    if _MAYBE_DOT.search(path) is None:
        return _SLASHES.sub("/", path) if "//" in path else path
    segments = path.split("/")
    ambiguous = _has_ambiguous_separator(path)
    has_dots = False
    for segment in segments:
        decoded = decode_unreserved(segment)
        for piece in _LOOSE_SEPARATOR.split(decoded) if ambiguous else (decoded,):
            name, semicolon, _ = piece.partition(";")
            if name in _DOTS:
                if semicolon:
                    raise PathRefused("dot segment with parameters in the path")
                has_dots = True
    if not has_dots:
        return _SLASHES.sub("/", path) if "//" in path else path
    if ambiguous:
        raise PathRefused("dot segments in a path with an encoded slash or a backslash")
    # RFC 3986 section 5.2.4 over whole segments, empty segments (runs of "/") merged first as nginx does.
    kept: list[str] = []
    trailing = False
    last = len(segments) - 1
    for index in range(1, last + 1):
        segment = segments[index]
        name = decode_unreserved(segment)
        if name == "..":
            if not kept:
                raise PathRefused("the path climbs above the root")
            kept.pop()
            trailing = True
        elif name == "." or not segment:
            trailing = True
        else:
            kept.append(segment)
            trailing = False
        if index != last:
            trailing = False
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def _has_ambiguous_separator(path: str) -> bool:
    if "\\" in path:
        return True
    if "%" not in path:
        return False
    upper = path.upper()
    return "%2F" in upper or "%5C" in upper


def match_prefix(prefix: str) -> str:
    """A route's path prefix in matching form, no trailing "/": what request paths in matching form are compared
    with. Labels refuse dot segments in prefixes; a configured one is resolved (clamped at the root)."""
    kept: list[str] = []
    for piece in _matching_form(prefix).split("/"):
        if piece == "..":
            if kept:
                kept.pop()
        elif piece and piece != ".":
            kept.append(piece)
    return "/" + "/".join(kept)


def strip_segments(target: bytes, prefix: str) -> bytes:
    """The forwarded target with the route's prefix (matching form, as from match_prefix) cut off: always starts
    with "/", query kept. The target is a forwarded form whose matching form is under the prefix."""
    size = len(prefix)
    if target[:size] == prefix.encode("latin-1") and target[size : size + 1] in (b"", b"/", b"?"):
        rest = target[size:]
        return rest if rest[:1] == b"/" else b"/" + rest
    # The prefix's segments end inside the target differently: escapes, or a %2F the matching form splits at.
    query = target.find(b"?")
    path, tail = (target, b"") if query == -1 else (target[:query], target[query:])
    count = prefix.count("/")
    position = 0
    for separator in _STRICT_SEPARATOR.finditer(path):
        if separator.start() > position:
            count -= 1
            if count < 0:
                return b"/" + path[position:] + tail
        position = separator.end()
    if count > 0 or position >= len(path):
        return b"/" + tail
    return b"/" + path[position:] + tail
