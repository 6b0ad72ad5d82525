"""The etcd registry (`--registry etcd://HOST:PORT[,HOST:PORT...]`): registrations shared by every gateway.

Each registration is a key `<prefix><service>/<instance>` whose value is the canonical body, bound to an etcd lease
with the instance's TTL: a heartbeat is a lease keep-alive, expiry is etcd's, and deregistering deletes the key and
revokes the lease. Every gateway lists the prefix, then watches it from the next revision and applies each change
through the same label rules; a watch that breaks resumes from its last revision (on the next member), and lists
again when etcd says that revision was compacted.

It speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/lease/grant`, `/v3/watch` ...) with treq on the reactor:
no blocking call, no client library. A request that cannot reach one member tries the next. A probe every
`PROBE_INTERVAL` seconds (a linearizable read: it needs quorum) notices when the cluster is gone or has no quorum;
the gateway then keeps routing the last registrations it knew (and says so), and lists again when etcd is back.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.registration.embedded import conflict_error, describe
from labelgw.registration.model import Registration, RegistrationError, parse_registration, registration_key
from labelgw.registration.settings import EtcdSettings
from labelgw.registration.source import RegisteredSource

__all__ = ["EtcdClient", "EtcdRegistry", "EtcdUnavailable"]

REQUEST_TIMEOUT = 3.0
# Leases renewed per keep-alive request: the heartbeats of one reactor turn go to etcd together (one request, one
# stream on etcd's side, instead of one each).
MAX_KEEPALIVES = 1000
# Requests a keep-alive goes out in before its heartbeat is answered 503 (see _kept_alive).
KEEPALIVE_TRIES = 3
PROBE_INTERVAL = 1.0
MAX_BACKOFF = 2.0
# gRPC codes worth another member: Unavailable, DeadlineExceeded, Unknown (e.g. "leader changed"), Aborted.
_RETRY_CODES = frozenset({14, 4, 2, 10})


class EtcdUnavailable(Exception):
    """No member answered (or none with quorum)."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's convention: last byte + 1)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _tls_policy(settings: EtcdSettings) -> Any:
    """Trust only the given CA (and present a client certificate) when speaking to etcd over TLS."""
    from twisted.internet import ssl
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    with open(settings.ca or "", "rb") as source:
        authority = ssl.Certificate.loadPEM(source.read())
    client = None
    if settings.cert and settings.key:
        with open(settings.cert, "rb") as cert, open(settings.key, "rb") as key:
            client = ssl.PrivateCertificate.loadPEM(cert.read() + b"\n" + key.read())

    @implementer(IPolicyForHTTPS)
    class Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.optionsForClientTLS(hostname.decode("ascii"), authority, client)

    return Policy()


class EtcdClient:
    """The few v3 JSON gateway calls labelgw needs, over treq, failing over between members."""

    _log = Logger()

    def __init__(self, reactor: Any, settings: EtcdSettings, http: Any = None) -> None:
        self._reactor = reactor
        self._endpoints = list(settings.endpoints)
        self._current = 0
        self._settings = settings
        self._token: str | None = None
        if http is None:
            import treq
            from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

            class QuietFactory(_HTTP11ClientFactory):
                noisy = False  # no "Starting factory" line per etcd connection

            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool._factory = QuietFactory
            self.pool.maxPersistentPerHost = 16
            policy = _tls_policy(settings) if settings.ca else None
            agent = (
                Agent(reactor, contextFactory=policy, pool=self.pool, connectTimeout=REQUEST_TIMEOUT)
                if policy is not None else Agent(reactor, pool=self.pool, connectTimeout=REQUEST_TIMEOUT)
            )
            http = treq.client.HTTPClient(agent)
        self._http = http

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    def rotate(self) -> None:
        self._current = (self._current + 1) % len(self._endpoints)

    def _headers(self) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if self._token is not None:
            headers[b"Authorization"] = [self._token.encode("ascii")]
        return headers

    def call(self, path: str, body: dict[str, Any], attempts: int | None = None) -> "Deferred[dict[str, Any]]":
        """POST `body` to `path` on the current member, then the next ones; the reply as a dict (an error reply
        that another member cannot fix, such as "lease not found", is returned as it is)."""
        return self._post(path, json.dumps(body).encode(), lambda content: json.loads(content or b"{}"), attempts)

    def stream_call(
        self, path: str, bodies: list[dict[str, Any]], attempts: int | None = None
    ) -> "Deferred[list[dict[str, Any]]]":
        """Several messages of a streaming call (`/v3/lease/keepalive`) in one request: the gateway sends each to
        etcd over one stream, answers each, and ends the response when the request's body ends. The answers, in
        order; failover as `call`."""
        data = b"\n".join(json.dumps(body).encode() for body in bodies)

        def parse(content: bytes) -> Any:
            messages = _messages(content)
            # An error on the stream comes as {"error": {"grpc_code": ..., "message": ...}}: the first one decides.
            for message in messages:
                error = message.get("error")
                if isinstance(error, dict):
                    return {"code": error.get("grpc_code"), "message": error.get("message"), "error": error}
            return messages

        return self._post(path, data, parse, attempts)

    def _post(self, path: str, data: bytes, parse: Callable[[bytes], Any], attempts: int | None) -> "Deferred[Any]":
        remaining = len(self._endpoints) if attempts is None else attempts
        result: Deferred[Any] = Deferred()
        errors: list[str] = []

        def attempt() -> None:
            nonlocal remaining
            remaining -= 1
            endpoint = self.endpoint
            sent = self._http.post(endpoint + path, data=data, headers=self._headers(), timeout=REQUEST_TIMEOUT)
            sent.addCallback(lambda response: response.content())
            sent.addCallback(parse)
            sent.addCallbacks(answered, failed, errbackArgs=(endpoint,))

        def answered(reply: Any) -> None:
            if isinstance(reply, list):
                result.callback(reply)
                return
            if not isinstance(reply, dict):
                failed(Failure(ValueError(f"not a JSON object: {reply!r}")), self.endpoint)
                return
            code = reply.get("code")
            if code == 16 and self._settings.user is not None:  # Unauthenticated: the token expired
                self._token = None
                self.authenticate().addCallbacks(lambda _: retry_same(), lambda f: failed(f, self.endpoint))
                return
            if code in _RETRY_CODES:
                failed(Failure(EtcdUnavailable(str(reply.get("message") or reply.get("error")))), self.endpoint)
                return
            result.callback(reply)

        def retry_same() -> None:
            nonlocal remaining
            remaining += 1
            attempt()

        def failed(failure: Failure, endpoint: str) -> None:
            errors.append(f"{endpoint}: {failure.getErrorMessage() or failure.type.__name__}")
            if endpoint == self.endpoint:
                self.rotate()
            if remaining > 0:
                attempt()
            else:
                result.errback(EtcdUnavailable("; ".join(errors)))

        attempt()
        return result

    def authenticate(self) -> "Deferred[None]":
        if self._settings.user is None:
            return succeed(None)
        asked = self.call("/v3/auth/authenticate", {"name": self._settings.user, "password": self._settings.password})

        def keep(reply: dict[str, Any]) -> None:
            token = reply.get("token")
            if not isinstance(token, str):
                raise EtcdUnavailable(f"authentication refused: {reply.get('message') or reply}")
            self._token = token

        return asked.addCallback(keep)

    def watch(self, key: bytes, end: bytes, start_revision: int, stream: "WatchStream") -> "Deferred[None]":
        """Open a watch on the current member; fires once the stream is delivering (or fails)."""
        body = {"create_request": {"key": _b64(key), "range_end": _b64(end), "start_revision": start_revision}}
        stream.endpoint = self.endpoint
        sent = self._http.post(
            self.endpoint + "/v3/watch", data=json.dumps(body).encode(), headers=self._headers(),
            unbuffered=True, timeout=REQUEST_TIMEOUT,
        )
        return sent.addCallback(lambda response: response.deliverBody(stream))

    def close(self) -> "Deferred[None]":
        pool = getattr(self, "pool", None)
        return pool.closeCachedConnections() if pool is not None else succeed(None)


def _messages(content: bytes) -> list[dict[str, Any]]:
    """JSON objects one after another (a streaming call's answers)."""
    decoder = json.JSONDecoder()
    text = content.decode("utf-8")
    messages: list[dict[str, Any]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return messages
        message, position = decoder.raw_decode(text, position)
        if isinstance(message, dict):
            messages.append(message)


class WatchStream(Protocol):
    """The body of a watch response: JSON messages one after another; each goes to `on_message`."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_end: Callable[[Failure], None]) -> None:
        self._on_message = on_message
        self._on_end = on_end
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self.ended = False
        # The member it streams from.
        self.endpoint = ""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data.decode("utf-8")
        while True:
            text = self._buffer.lstrip()
            if not text:
                self._buffer = ""
                return
            try:
                message, used = self._decoder.raw_decode(text)
            except ValueError:
                self._buffer = text  # an incomplete message: wait for the rest
                return
            self._buffer = text[used:]
            if isinstance(message, dict):
                self._on_message(message)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if not self.ended:
            self.ended = True
            self._on_end(reason)

    def cancel(self) -> None:
        """Stop this stream (at stop, or when a new one replaces it)."""
        self.ended = True
        transport: Any = self.transport  # the response body's producer: stopping it closes the connection
        if transport is not None:
            transport.stopProducing()


@dataclass(slots=True)
class _Entry:
    registration: Registration
    lease: str
    revision: int


class EtcdRegistry:
    name = "etcd"
    _log = Logger()

    def __init__(
        self, source: RegisteredSource, reactor: Any, settings: EtcdSettings, *,
        prefix: str = "labelgw", pinned_env: str | None = None, client: EtcdClient | None = None,
    ) -> None:
        self._source = source
        self._reactor = reactor
        self._settings = settings
        self._label_prefix = prefix
        self._pinned_env = pinned_env
        self._client = client or EtcdClient(reactor, settings)
        self._key_prefix = settings.prefix.encode("ascii")
        self.entries: dict[str, _Entry] = {}
        # Keys this gateway deleted, by the revision of the delete: older watch events for them are stale.
        self._tombstones: dict[str, int] = {}
        self._revision = 0
        self._stream: WatchStream | None = None
        self._retry: IDelayedCall | None = None
        self._probe: IDelayedCall | None = None
        self._backoff = 0.1
        self._running = False
        self.available = False
        self._reported_unavailable = False
        self.watching = False
        self.resyncs = 0
        # When this gateway last renewed each lease (the listing's expiry when etcd is not asked).
        self._renewed: dict[str, float] = {}
        # Keep-alives waiting for this turn's request, by lease.
        self._keepalives: dict[str, list[Deferred[dict[str, Any]]]] = {}
        self._keepalive_timer: IDelayedCall | None = None
        self._keepalive_tries: dict[str, int] = {}

    # The RegistryBackend interface.

    def start(self) -> None:
        self._running = True
        self._sync("start")
        self._probe = self._reactor.callLater(PROBE_INTERVAL, self._check)

    def stop(self) -> "Deferred[None]":
        self._running = False
        for timer in (self._retry, self._probe):
            if timer is not None and timer.active():
                timer.cancel()
        if self._keepalive_timer is not None and self._keepalive_timer.active():
            self._keepalive_timer.cancel()
            self._send_keepalives()  # heartbeats already accepted go out
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        return self._client.close()

    def register(self, registration: Registration) -> "Deferred[tuple[float, bool]]":
        key = registration.key
        previous = self.entries.get(key)
        if self._reported_unavailable:
            # A known outage (the probe found no quorum): answer now, not after every member's request timeout.
            raise RegistrationError(503, "", "etcd is unavailable (no quorum), nothing stored; retry later")
        rejection = self._source.admit(registration)
        if rejection is not None:
            raise conflict_error(registration, rejection)
        ttl = max(1, math.ceil(registration.ttl))
        value = json.dumps({
            "service": registration.service, "instance": registration.instance, "ttl": registration.ttl,
            "body": registration.body,
        }, separators=(",", ":"))
        granted = self._client.call("/v3/lease/grant", {"TTL": ttl})

        def put(reply: dict[str, Any]) -> Any:
            lease = str(reply.get("ID") or "")
            if not lease or "error" in reply:
                raise EtcdUnavailable(f"no lease granted: {reply.get('message') or reply}")
            stored = self._client.call(
                "/v3/kv/put", {"key": _b64(self._key(key)), "value": _b64(value), "lease": lease}
            )
            return stored.addCallback(lambda answer: (lease, answer))

        def stored(outcome: tuple[str, dict[str, Any]]) -> tuple[float, bool]:
            lease, reply = outcome
            if "error" in reply:
                raise EtcdUnavailable(str(reply.get("message")))
            revision = int(reply.get("header", {}).get("revision", 0))
            self.entries[key] = _Entry(registration, lease, revision)
            self._tombstones.pop(key, None)
            self._renewed[key] = self._reactor.seconds()
            if previous is not None and previous.lease != lease:
                self._revoke(previous.lease)
            return self._reactor.seconds() + registration.ttl, previous is not None

        def failed(failure: Failure) -> Failure:
            # Not stored: undo the local admission (and bring back what this instance had before).
            if self.entries.get(key) is previous:
                self._source.withdraw(registration.service, registration.instance, "not stored in etcd")
                if previous is not None:
                    self._source.apply(previous.registration)
            if failure.check(RegistrationError):
                return failure
            self._log.warn("registration of {key} not stored in etcd: {error}", key=key, error=failure.getErrorMessage())
            return Failure(RegistrationError(503, "", f"etcd is unavailable, nothing stored: {failure.getErrorMessage()}"))

        return granted.addCallback(put).addCallback(stored).addErrback(failed)

    def heartbeat(self, service: str, instance: str) -> "Deferred[float | None]":
        key = registration_key(service, instance)
        found = self._lease_of(key)

        def renew(lease: str | None) -> Any:
            if lease is None:
                return None
            return self._keep_alive(lease).addCallback(lambda reply: self._renewed_at(key, reply))

        renewed: Deferred[Any] = found.addCallback(renew)
        return renewed.addErrback(self._unavailable)

    def deregister(self, service: str, instance: str) -> "Deferred[bool]":
        key = registration_key(service, instance)
        deleted = self._client.call("/v3/kv/deleterange", {"key": _b64(self._key(key)), "prev_kv": True})

        def done(reply: dict[str, Any]) -> bool:
            if "error" in reply:
                raise EtcdUnavailable(str(reply.get("message")))
            entry = self.entries.pop(key, None)
            self._renewed.pop(key, None)
            previous = reply.get("prev_kvs") or []
            self._tombstones[key] = int(reply.get("header", {}).get("revision", 0))
            self._source.withdraw(service, instance, "deregistered")
            lease = entry.lease if entry is not None else (previous[0].get("lease") if previous else None)
            if lease:
                self._revoke(str(lease))
            return bool(int(reply.get("deleted", 0) or 0))

        return deleted.addCallback(done).addErrback(self._unavailable)

    def listing(self) -> "Deferred[dict[str, Any]]":
        now = self._reactor.seconds()
        items = sorted(self.entries.items())

        def ask(entry: _Entry) -> "Deferred[Any]":
            asked: Deferred[Any] = self._client.call("/v3/lease/timetolive", {"ID": entry.lease}, attempts=1)
            asked.addCallback(lambda reply: now + float(reply["TTL"]) if int(reply.get("TTL", -1)) >= 0 else None)
            return asked.addErrback(lambda _: None)

        # The lease's time left from etcd for a bounded number of entries; the rest from this gateway's renewals.
        asked = [ask(entry) for _, entry in items[:500]]

        def build(expiries: list[float | None]) -> dict[str, Any]:
            services: dict[str, list[dict[str, Any]]] = {}
            for index, (key, entry) in enumerate(items):
                if index < len(expiries):
                    expires = expiries[index]
                else:
                    renewed = self._renewed.get(key)
                    expires = None if renewed is None else renewed + entry.registration.ttl
                item = describe(entry.registration, expires, now)
                item["lease"] = entry.lease
                services.setdefault(entry.registration.service, []).append(item)
            return {
                "registry": self.name, "time": now, "services": services, "etcd": {
                    "available": self.available, "watching": self.watching, "revision": self._revision,
                    "endpoint": self._client.endpoint,
                    "watch_endpoint": self._stream.endpoint if self._stream is not None else None,
                },
            }

        return gatherResults(asked).addCallback(build)

    # Internals: requests.

    def _key(self, key: str) -> bytes:
        return self._key_prefix + key.encode("utf-8")

    def _lease_of(self, key: str) -> "Deferred[str | None]":
        entry = self.entries.get(key)
        if entry is not None:
            return succeed(entry.lease)
        # Not seen by this gateway's watch yet: ask etcd.
        asked = self._client.call("/v3/kv/range", {"key": _b64(self._key(key))})
        return asked.addCallback(lambda reply: str((reply.get("kvs") or [{}])[0].get("lease") or "") or None)

    def _renewed_at(self, key: str, reply: dict[str, Any]) -> float | None:
        result = reply.get("result", reply)
        ttl = int(result.get("TTL", 0) or 0) if isinstance(result, dict) else 0
        if ttl <= 0:
            return None  # the lease is gone: the client registers again
        now = self._reactor.seconds()
        self._renewed[key] = now
        return now + ttl

    def _keep_alive(self, lease: str) -> "Deferred[dict[str, Any]]":
        """etcd's answer to a keep-alive of `lease` ({"ID", "TTL"}; no TTL when the lease is gone), sent with the
        other keep-alives of this reactor turn."""
        waiting: Deferred[dict[str, Any]] = Deferred()
        self._keepalives.setdefault(lease, []).append(waiting)
        if self._keepalive_timer is None:
            self._keepalive_timer = self._reactor.callLater(0, self._send_keepalives)
        return waiting

    def _send_keepalives(self) -> None:
        self._keepalive_timer = None
        pending, self._keepalives = self._keepalives, {}
        leases = list(pending)
        for start in range(0, len(leases), MAX_KEEPALIVES):
            batch = leases[start:start + MAX_KEEPALIVES]
            sent = self._client.stream_call("/v3/lease/keepalive", [{"ID": lease} for lease in batch])
            sent.addCallbacks(
                self._kept_alive, self._keepalives_failed, callbackArgs=(batch, pending), errbackArgs=(batch, pending)
            )

    def _kept_alive(
        self, replies: list[dict[str, Any]], batch: list[str], pending: dict[str, list["Deferred[dict[str, Any]]"]]
    ) -> None:
        answers: dict[str, dict[str, Any]] = {}
        for reply in replies:
            result = reply.get("result")
            if isinstance(result, dict) and result.get("ID") is not None:
                answers[str(result["ID"])] = result
        for lease in batch:
            answer = answers.get(lease)
            waiting = pending.pop(lease, [])
            if answer is not None:
                self._keepalive_tries.pop(lease, None)
                for one in waiting:
                    one.callback(answer)
                continue
            # No answer for it: etcd's gateway sometimes ends a busy keep-alive stream before its last answers. A
            # keep-alive is idempotent: again with the next turn's, and a 503 (unknown, not gone) after the third.
            tries = self._keepalive_tries.get(lease, 0) + 1
            if tries < KEEPALIVE_TRIES and self._running:
                self._keepalive_tries[lease] = tries
                self._keepalives.setdefault(lease, []).extend(waiting)
                if self._keepalive_timer is None:
                    self._keepalive_timer = self._reactor.callLater(0, self._send_keepalives)
                continue
            self._keepalive_tries.pop(lease, None)
            for one in waiting:
                one.errback(EtcdUnavailable(f"no keep-alive answer for lease {lease}"))

    @staticmethod
    def _keepalives_failed(
        failure: Failure, batch: list[str], pending: dict[str, list["Deferred[dict[str, Any]]"]]
    ) -> None:
        for lease in batch:
            for waiting in pending.pop(lease, []):
                waiting.errback(failure)

    def _revoke(self, lease: str) -> None:
        revoked = self._client.call("/v3/lease/revoke", {"ID": lease})
        revoked.addErrback(lambda failure: self._log.info(
            "etcd lease {lease} not revoked ({error}); it expires on its own", lease=lease,
            error=failure.getErrorMessage()))

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(RegistrationError):
            return failure
        return Failure(RegistrationError(503, "", f"etcd is unavailable: {failure.getErrorMessage()}"))

    # Internals: the list-and-watch loop.

    def _sync(self, why: str) -> None:
        """List the prefix, apply it as the whole truth, then watch from the next revision."""
        if not self._running:
            return
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self.watching = False
        listed = self._client.authenticate().addCallback(lambda _: self._client.call(
            "/v3/kv/range", {"key": _b64(self._key_prefix), "range_end": _b64(prefix_end(self._key_prefix))}
        ))
        listed.addCallback(self._listed, why)
        listed.addErrback(self._sync_failed, why)

    def _listed(self, reply: dict[str, Any], why: str) -> None:
        if "error" in reply:
            raise EtcdUnavailable(str(reply.get("message")))
        revision = int(reply.get("header", {}).get("revision", 0))
        seen = set()
        for kv in reply.get("kvs") or []:
            key = self._apply_kv(kv, listing=True)
            if key is not None:
                seen.add(key)
        for key in set(self.entries) - seen:
            entry = self.entries.pop(key)
            self._source.withdraw(
                entry.registration.service, entry.registration.instance, "no longer in etcd (found by a full list)"
            )
        self._tombstones.clear()
        self._revision = revision
        self.resyncs += 1
        self._became_available()
        self._log.info(
            "etcd registry listed {count} registrations at revision {revision} ({why}); watching {prefix}",
            count=len(self.entries), revision=revision, why=why, prefix=self._settings.prefix,
        )
        self._watch()

    def _sync_failed(self, failure: Failure, why: str) -> None:
        self._became_unavailable(failure.getErrorMessage())
        self._schedule(lambda: self._sync(why))

    def _schedule(self, action: Callable[[], None]) -> None:
        if not self._running:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        delay = self._backoff
        self._backoff = min(MAX_BACKOFF, self._backoff * 2)
        self._retry = self._reactor.callLater(delay, action)

    def _watch(self) -> None:
        if not self._running:
            return
        stream = WatchStream(self._on_watch_message, lambda reason: self._watch_ended(stream, reason))
        self._stream = stream
        opened = self._client.watch(
            self._key_prefix, prefix_end(self._key_prefix), self._revision + 1, stream
        )

        def failed(failure: Failure) -> None:
            if self._stream is stream:
                self._stream = None
                self.watching = False
                self._client.rotate()
                self._log.info("etcd watch could not be opened ({error}); trying the next member",
                               error=failure.getErrorMessage())
                self._schedule(self._watch)

        opened.addErrback(failed)

    def _watch_ended(self, stream: WatchStream, reason: Failure) -> None:
        if self._stream is not stream or not self._running:
            return
        self._stream = None
        self.watching = False
        if self._client.endpoint == stream.endpoint:
            self._client.rotate()
        self._log.info(
            "etcd watch on {lost} ended ({error}); resuming from revision {revision} on {endpoint}",
            lost=stream.endpoint, error=reason.getErrorMessage(), revision=self._revision + 1,
            endpoint=self._client.endpoint,
        )
        self._schedule(self._watch)

    def _on_watch_message(self, message: dict[str, Any]) -> None:
        result = message.get("result")
        if not isinstance(result, dict):
            if "error" in message:
                self._log.info("etcd watch error: {error}", error=message.get("error"))
            return
        if result.get("compact_revision") not in (None, "0", 0) or result.get("canceled"):
            self._log.warn(
                "etcd watch from revision {revision} canceled (compacted to {compact}): listing again",
                revision=self._revision + 1, compact=result.get("compact_revision"),
            )
            self._sync("watch compacted")
            return
        if result.get("created"):
            self.watching = True
            self._backoff = 0.1
            return
        for event in result.get("events") or []:
            kv = event.get("kv") or {}
            revision = int(kv.get("mod_revision", 0) or 0)
            if revision <= self._revision:
                continue  # already seen (a list or an earlier stream covered it): the watch never goes back
            if event.get("type") == "DELETE":
                self._apply_delete(kv, revision)
            else:
                self._apply_kv(kv, listing=False)
            self._revision = max(self._revision, revision)
        header_revision = int(result.get("header", {}).get("revision", 0) or 0)
        if not result.get("events"):
            self._revision = max(self._revision, header_revision)

    def _split(self, raw_key: str) -> str | None:
        key = _unb64(raw_key)
        if not key.startswith(self._key_prefix):
            return None
        return key[len(self._key_prefix):].decode("utf-8", "replace")

    def _apply_kv(self, kv: dict[str, Any], listing: bool) -> str | None:
        key = self._split(str(kv.get("key", "")))
        if key is None:
            return None
        revision = int(kv.get("mod_revision", 0) or 0)
        tombstone = self._tombstones.get(key)
        if not listing and tombstone is not None and revision <= tombstone:
            return None  # deleted by this gateway after this event was written
        entry = self.entries.get(key)
        if entry is not None and revision <= entry.revision and not listing:
            return key  # already applied (this gateway stored it)
        try:
            document = json.loads(_unb64(str(kv.get("value", ""))))
            registration = parse_registration(
                str(document["service"]), str(document["instance"]), document["body"],
                prefix=self._label_prefix, pinned_env=self._pinned_env,
            )
        except (KeyError, TypeError, ValueError, RegistrationError) as error:
            self._log.warn("etcd key {key} is not a registration labelgw can route: {error}", key=key, error=error)
            return None
        lease = str(kv.get("lease") or "")
        if entry is None or entry.registration.spec != registration.spec:
            self._source.apply(registration)
        self.entries[key] = _Entry(registration, lease, revision)
        return key

    def _apply_delete(self, kv: dict[str, Any], revision: int) -> None:
        key = self._split(str(kv.get("key", "")))
        if key is None:
            return
        if self._tombstones.get(key) == revision:
            del self._tombstones[key]
        entry = self.entries.get(key)
        if entry is None or revision <= entry.revision:
            return
        del self.entries[key]
        self._renewed.pop(key, None)
        self._source.withdraw(
            entry.registration.service, entry.registration.instance,
            f"removed from etcd (its lease of {entry.registration.ttl:g} s expired, or it was deregistered)",
        )

    # Internals: is etcd there?

    def _check(self) -> None:
        """A linearizable read (needs quorum) every PROBE_INTERVAL: says when etcd goes and comes back."""
        if not self._running:
            return
        probe = self._client.call("/v3/kv/range", {"key": _b64(self._key_prefix), "count_only": True})

        def ok(reply: dict[str, Any]) -> None:
            if "error" in reply:
                raise EtcdUnavailable(str(reply.get("message")))
            if not self.available:
                self._sync("etcd reachable again")

        def bad(failure: Failure) -> None:
            self._became_unavailable(failure.getErrorMessage())

        def again(_: object) -> None:
            if self._running:
                self._probe = self._reactor.callLater(PROBE_INTERVAL, self._check)

        probe.addCallbacks(ok, bad).addErrback(bad).addBoth(again)

    def _became_available(self) -> None:
        if not self.available:
            if self._reported_unavailable:
                self._log.info("etcd available again: registrations listed and watched")
            self.available = True
            self._reported_unavailable = False
            self._backoff = 0.1

    def _became_unavailable(self, error: str) -> None:
        self.available = False
        if not self._reported_unavailable:
            self._reported_unavailable = True
            self._log.warn(
                "etcd unavailable ({error}): keeping the last known {count} registrations routed until it returns",
                error=error, count=len(self.entries),
            )
