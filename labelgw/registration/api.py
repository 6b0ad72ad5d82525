"""The registration API (`--registry-api`): a small strict HTTP/1.1 server of JSON requests.

    PUT    /v1/services/<service>/instances/<instance-id>            register (or replace) an instance
    PUT    /v1/services/<service>/instances/<instance-id>/heartbeat  renew its lease
    DELETE /v1/services/<service>/instances/<instance-id>            deregister it
    GET    /v1/services                                              what is registered, with lease expiries

Heads are read by labelgw's own strict parser (labelgw.http.parser); bodies need a Content-Length (chunked: 411)
of at most 64 KiB (413, without reading it). Errors are JSON: `{"error": "...", "field": "..."}`. With a token,
every request needs `Authorization: Bearer <token>` (401 otherwise, compared in constant time). It is not
twisted.web: heartbeats are the hot path (a hundred thousand instances every ten seconds), and a request here
costs a parse of the head, a dict lookup and a short write.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.http.parser import MAX_HEAD_BYTES, HttpError, parse_request_head
from labelgw.registration.embedded import RegistryBackend
from labelgw.registration.model import (
    MAX_BODY, RegistrationError, check_instance_id, check_service, parse_body, parse_registration,
)

__all__ = ["ApiFactory", "ApiProtocol", "RegistrationApi", "Reply"]

Reply = tuple[int, dict[str, Any]]
# A backend's answers that are values (the embedded registry's), told from a Deferred without an ABC isinstance.
_PLAIN = (float, bool, tuple, dict, type(None))
# A connection that leaves a request unfinished (or the connection idle) this long is closed.
IDLE_TIMEOUT = 30.0

_REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict", 411: b"Length Required",
    413: b"Content Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 503: b"Service Unavailable", 505: b"HTTP Version Not Supported",
}


def _error(status: int, message: str, field_name: str = "") -> Reply:
    body: dict[str, Any] = {"error": message}
    if field_name:
        body["field"] = field_name
    return status, body


class RegistrationApi:
    """Requests in, (status, JSON) out; no sockets (ApiProtocol carries the bytes)."""

    _log = Logger()

    def __init__(
        self,
        backend: RegistryBackend,
        token: bytes | None = None,
        *,
        prefix: str = "labelgw",
        pinned_env: str | None = None,
    ) -> None:
        self.backend = backend
        self._token = token
        self._prefix = prefix
        self._pinned_env = pinned_env

    def authorized(self, authorization: bytes | None) -> Reply | None:
        """None when the request may proceed; else the 401 to answer."""
        if self._token is None:
            return None
        if authorization is None:
            return _error(401, "missing Authorization: Bearer <token> (this listener requires the registry token)",
                          "authorization")
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self._token):
            return _error(401, "wrong bearer token", "authorization")
        return None

    def handle(self, method: bytes, target: bytes, body: bytes) -> "Reply | Deferred[Reply]":
        path = target.split(b"?", 1)[0]
        try:
            parts = path.decode("ascii").split("/")
        except UnicodeDecodeError:
            return _error(404, "no such resource")
        # "", "v1", "services", <service>, "instances", <id>[, "heartbeat"]
        if parts[:3] != ["", "v1", "services"]:
            return _error(404, "no such resource; the API lives under /v1/services")
        if len(parts) == 3 or (len(parts) == 4 and parts[3] == ""):
            if method not in (b"GET", b"HEAD"):
                return _error(405, "use GET /v1/services")
            return self._call(self.backend.listing, lambda listing: (200, listing), "", "")
        if len(parts) not in (6, 7) or parts[4] != "instances" or (len(parts) == 7 and parts[6] != "heartbeat"):
            return _error(404, "no such resource; use /v1/services/<service>/instances/<instance-id>[/heartbeat]")
        try:
            service = check_service(parts[3])
            instance = check_instance_id(parts[5])
        except RegistrationError as error:
            return error.status, error.as_json()
        if len(parts) == 7:
            if method != b"PUT":
                return _error(405, "use PUT for a heartbeat")
            return self._call(lambda: self.backend.heartbeat(service, instance), self._renewed, service, instance)
        if method == b"PUT":
            try:
                registration = parse_registration(
                    service, instance, parse_body(body), prefix=self._prefix, pinned_env=self._pinned_env
                )
            except RegistrationError as error:
                return error.status, error.as_json()
            return self._call(
                lambda: self.backend.register(registration),
                lambda outcome: self._registered(registration.ttl, outcome), service, instance,
            )
        if method == b"DELETE":
            return self._call(
                lambda: self.backend.deregister(service, instance),
                lambda removed: (200, {"removed": True}) if removed else _error(
                    404, f"instance {instance!r} of service {service!r} is not registered", "instance"),
                service, instance,
            )
        return _error(405, "use PUT or DELETE on an instance")

    @staticmethod
    def _registered(ttl: float, outcome: tuple[float, bool]) -> Reply:
        expires, replaced = outcome
        return (200 if replaced else 201), {"expires_at": expires, "ttl": ttl, "replaced": replaced}

    @staticmethod
    def _renewed(expires: float | None) -> Reply:
        if expires is None:
            return _error(404, "not registered (its lease expired, or it never registered): register again",
                          "instance")
        return 200, {"expires_at": expires}

    def _call(
        self, operation: Callable[[], Any], answer: Callable[[Any], Reply], service: str, instance: str
    ) -> "Reply | Deferred[Reply]":
        try:
            result = operation()
        except RegistrationError as error:
            return error.status, error.as_json()
        if type(result) in _PLAIN or not isinstance(result, Deferred):
            return answer(result)  # the embedded registry answers at once: no Deferred on the hot path
        deferred: Deferred[Reply] = maybeDeferred(lambda: result).addCallback(answer)

        def failed(failure: Failure) -> Reply:
            if failure.check(RegistrationError):
                error: RegistrationError = failure.value  # type: ignore[assignment]
                return error.status, error.as_json()
            self._log.failure("registry call for {service}/{instance} failed", failure, service=service,
                              instance=instance)
            return _error(503, "the registry is unavailable; try again")

        return deferred.addErrback(failed)


class ApiProtocol(Protocol):
    """One connection: requests handled one at a time, in order (pipelined ones wait in the buffer)."""

    _log = Logger()

    def __init__(self, api: RegistrationApi, clock: Any) -> None:
        self._api = api
        self._clock = clock
        self._buffer = b""
        self._busy = False
        self._closing = False
        self._timer: IDelayedCall | None = None
        self._continued = False

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(IDLE_TIMEOUT, self._timed_out)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._closing = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        if self._buffer and not self._busy:
            self._respond(_error(408, "request not completed in time"), close=True)
        elif self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._next()

    def _next(self) -> None:
        while not self._busy and not self._closing and self._buffer:
            end = self._buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._respond(_error(431, "request head too large"), close=True)
                return
            try:
                head = parse_request_head(self._buffer[:end])
            except HttpError as error:
                self._respond(_error(error.status, f"malformed request: {error.reason}"), close=True)
                return
            if head.chunked:
                self._respond(_error(411, "send the body with a Content-Length (chunked is not accepted)"), close=True)
                return
            length = head.content_length or 0
            if length > MAX_BODY:
                self._respond(_error(413, f"body is larger than {MAX_BODY} bytes", "body"), close=True)
                return
            start = end + 4
            if len(self._buffer) - start < length:
                if not self._continued and head.field(b"expect") == b"100-continue":
                    self._continued = True
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
                return
            body = self._buffer[start:start + length]
            self._buffer = self._buffer[start + length:]
            self._continued = False
            keep_alive = head.keep_alive
            denied = self._api.authorized(head.field(b"authorization"))
            if denied is not None:
                self._respond(denied, close=not keep_alive, head_only=head.method == b"HEAD")
                continue
            try:
                reply = self._api.handle(head.method, head.target, body)
            except Exception:
                self._log.failure("registration API request failed")
                reply = _error(500, "internal error")
            if not isinstance(reply, tuple):  # a Deferred (a tuple test: Deferred's isinstance is an ABC's, slow)
                self._busy = True
                reply.addCallback(self._finish, keep_alive, head.method == b"HEAD").addErrback(
                    lambda failure: self._log.failure("registration API reply failed", failure)
                )
                return
            self._respond(reply, close=not keep_alive, head_only=head.method == b"HEAD")

    def _finish(self, reply: Reply, keep_alive: bool, head_only: bool) -> None:
        self._busy = False
        if self._closing:
            return
        self._respond(reply, close=not keep_alive, head_only=head_only)
        self._next()

    def _respond(self, reply: Reply, close: bool, head_only: bool = False) -> None:
        status, document = reply
        expires = document.get("expires_at") if status == 200 and len(document) == 1 else None
        if type(expires) is float and math.isfinite(expires):
            body = b'{"expires_at":%r}\n' % expires  # a heartbeat's answer (the hot path): what json.dumps writes
        else:
            body = json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n"
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
            status, _REASONS.get(status, b"Unknown"), len(body),
        )
        if status == 401:
            head += b'WWW-Authenticate: Bearer realm="labelgw-registry"\r\n'
        if status == 405:
            head += b"Allow: GET, PUT, DELETE\r\n"
        if close:
            head += b"Connection: close\r\n"
        transport = self.transport
        assert transport is not None
        transport.write(head + b"\r\n" + (b"" if head_only else body))
        if self._timer is not None and self._timer.active():
            self._timer.reset(IDLE_TIMEOUT)
        if close:
            self._closing = True
            self._buffer = b""
            transport.loseConnection()


class ApiFactory(Factory):
    noisy = False  # no "Starting factory" line in the log

    def __init__(self, api: RegistrationApi, clock: Any) -> None:
        self.api = api
        self.clock = clock

    def buildProtocol(self, addr: Any) -> ApiProtocol:
        protocol = ApiProtocol(self.api, self.clock)
        protocol.factory = self
        return protocol
