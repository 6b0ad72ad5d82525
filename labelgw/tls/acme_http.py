"""HTTP-01 answers (RFC 8555 section 8.3): ``GET /.well-known/acme-challenge/<token>`` on the HTTP listeners.

labelgw.http.dispatch calls L{answer_http01} for request paths under L{PREFIX} only, before the route lookup and
the redirect to HTTPS: a validation request is answered by labelgw while labelgw's own order waits for it, whatever
the route says. A token labelgw does not know goes on like any request (to the route's backend, which may run
its own ACME client).
"""

from __future__ import annotations

from typing import Any

from labelgw.http.parser import RequestHead, parse_response_head
from labelgw.http.sides import RequestSide

PREFIX = "/.well-known/acme-challenge/"


def answer_http01(gateway: Any, path: str, head: RequestHead, side: RequestSide) -> bool:
    """Answer the validation request if its token is pending (True), else leave it to routing (False)."""
    acme = getattr(gateway, "acme", None)
    if acme is None or head.method not in (b"GET", b"HEAD"):
        return False
    token = path[len(PREFIX):]
    if not token or "/" in token:
        return False
    body = acme.http01_answer(token.encode("ascii", "replace"))
    if body is None:
        return False
    response = parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        b"Cache-Control: no-store" % len(body)
    )
    # The key authorization exactly (no "labelgw:" text around it, unlike refuse()), and the connection closed
    # after it: validation servers use a connection per validation, and no request state is left behind.
    side.response_head(response, head.method != b"HEAD", True, b"")
    if head.method != b"HEAD":
        side.response_data(body)
    side.response_end()
    from labelgw.http.server import ClientConnection  # noqa: PLC0415 - server imports dispatch, which imports this

    if isinstance(side, ClientConnection):
        # HTTP/1.1: the response is over and the connection closes (an HTTP/2 stream simply ends).
        side.exchange_done(None, True)  # type: ignore[arg-type]
    return True
