# -*- test-case-name: tests.test_explain_command -*-
"""``python -m labelgw explain URL``: where a running labelgw would send a request, read from its admin listener.

It asks ``GET /explain`` of the admin listener (labelgw.control.admin, labelgw.control.explain) and prints the answer for a terminal;
``--json`` prints the JSON as it came. A plain blocking HTTP client: this is a command, not the gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import urlencode

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labelgw explain",
        description="Show where a running labelgw would send a request to URL now: the route, the version "
        "decision and why, every ready backend with its cost, and the backend the balancer would choose. "
        "Nothing is sent to any backend and nothing is counted.",
    )
    p.add_argument("url", help="the request's URL, e.g. http://api.localhost/x")
    p.add_argument("--admin", default=DEFAULT_ADMIN_URL, help=f"labelgw's admin listener (default {DEFAULT_ADMIN_URL})")
    p.add_argument("--version", dest="pin", metavar="VERSION", help="as if the request pinned this version (the version header)")
    p.add_argument("--cookie", help="the client's Cookie header (its sticky version cookie, if any)")
    p.add_argument("--json", action="store_true", help="print the JSON answer as it came")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the admin listener (default 5)")
    return p


def fetch(admin: str, url: str, version: str | None, cookie: str | None, timeout: float) -> tuple[int, dict[str, Any]]:
    query = {"url": url}
    if version is not None:
        query["version"] = version
    if cookie is not None:
        query["cookie"] = cookie
    address = admin.rstrip("/") + "/explain?" + urlencode(query)
    try:
        with urllib.request.urlopen(address, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"error": body.decode("utf-8", "replace").strip() or error.reason}


def render(view: dict[str, Any], out: TextIO) -> None:
    def line(label: str, text: str) -> None:
        out.write(f"{label:<10}{text}\n")

    line("request", f"{view['url']}  (host {view['host']}, target {view['target']})")
    route = view.get("route")
    if route is not None:
        strip = ", prefix stripped" if route["strip_prefix"] else ""
        rule = " (wildcard host)" if route.get("match") == "wildcard" else ""
        line("route", f"{route['host']}{route['path']}{rule} -> service {route['service']} over {route['scheme']}{strip}; "
             f"sent upstream as {route['upstream_target']}")
    decision = view.get("version")
    if decision is not None:
        chosen = decision["decision"]
        shares = decision.get("shares")
        share_text = ", ".join(f"{v or '(none)'} {s:g} %" for v, s in shares.items()) if shares else ""
        line("version", (f"{chosen}: " if chosen is not None else "") + decision["why"]
             + (f"  [shares: {share_text}]" if share_text else ""))
        if decision.get("set_cookie"):
            line("", f"Set-Cookie: {decision['set_cookie']}")
    middleware = view.get("middleware")
    if middleware:
        states = {"breaker": lambda m: f"breaker {m['state']}",
                  "fallback": lambda m: f"fallback {'service ' + m['service'] if m['service'] else m['status']}"}
        line("chain", ", ".join(states.get(name, lambda m, n=name: n)(part) for name, part in middleware.items()))
    service = view.get("service")
    if service is not None:
        line("balancer", f"{service['balancer']}: {view.get('cost', '')}")
    rows = view.get("backends") or []
    if rows:
        line("backends", "")
        for row in rows:
            mark = "->" if row["chosen"] else ("  " if row["candidate"] else " x")
            cost = "-" if row["cost"] is None else f"{row['cost']:g}"
            latency = "-" if row["latency_ms"] is None else f"{row['latency_ms']:g} ms"
            version = f"  version {row['version']}" if row["version"] else ""
            slow = f"  slow start {row['slow_start']:g}" if row.get("slow_start") not in (None, 1, 1.0) else ""
            out.write(f"  {mark} {row['container']:<24} {row['address']:<22} cost {cost:<9} latency {latency:<11}"
                      f" in flight {row['in_flight']}  weight {row['weight']:g}{version}{slow}\n")
        if any(not row["candidate"] for row in rows):
            out.write("     (x: not of the chosen version)\n")
    for row in view.get("not_ready") or []:
        out.write(f"  -- {row['container']:<24} {row['address']:<22} not ready: {row['why']}\n")
    line("answer", view["answer"])


def main(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(list(argv))
    try:
        status, view = fetch(args.admin, args.url, args.pin, args.cookie, args.timeout)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        err.write(f"python -m labelgw explain: cannot ask the admin listener at {args.admin}: {reason}\n")
        return 1
    if status != 200:
        err.write(f"python -m labelgw explain: {args.admin} answered {status}: {view.get('error', view)}\n")
        return 1 if status != 400 else 2
    if args.json:
        out.write(json.dumps(view, indent=1) + "\n")
    else:
        render(view, out)
    return 0
