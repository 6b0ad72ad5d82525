"""The etcd registry without etcd: a small in-memory stand-in for the v3 JSON gateway (tests/…/FakeEtcd), task.Clock.
The real cluster is in tests/test_e2e_etcd.py."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from labelgw.core.registry import Registry
from labelgw.registration.api import RegistrationApi
from labelgw.registration.etcd import EtcdRegistry, EtcdUnavailable, WatchStream, prefix_end
from labelgw.registration.model import parse_registration
from labelgw.registration.settings import EtcdSettings
from labelgw.registration.source import RegisteredSource

PREFIX = "/lgw/"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class FakeEtcd:
    """Keys, leases, revisions and watchers, as the JSON gateway shows them. `down` makes every call fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.revision = 1
        self.kvs: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, float] = {}
        self.next_lease = 100
        self.watchers: list[WatchStream] = []
        self.down = False
        self.endpoint = "http://fake:2379"
        self.calls: list[str] = []
        # The messages of each streaming request.
        self.streams: list[int] = []

    # The EtcdClient interface.

    def rotate(self) -> None:
        pass

    def authenticate(self) -> "Deferred[None]":
        return succeed(None)

    def close(self) -> "Deferred[None]":
        return succeed(None)

    def stream_call(
        self, path: str, bodies: list[dict[str, Any]], attempts: int | None = None
    ) -> "Deferred[list[dict[str, Any]]]":
        self.streams.append(len(bodies))
        if self.down:
            self.calls.append(path)
            return fail(EtcdUnavailable("down"))
        replies: list[dict[str, Any]] = []
        for body in bodies:
            self.call(path, body).addCallback(replies.append)
        return succeed(replies)

    def call(self, path: str, body: dict[str, Any], attempts: int | None = None) -> "Deferred[dict[str, Any]]":
        self.calls.append(path)
        if self.down:
            return fail(EtcdUnavailable("down"))
        header = {"revision": str(self.revision)}
        if path == "/v3/lease/grant":
            lease = str(self.next_lease)
            self.next_lease += 1
            self.leases[lease] = body["TTL"]
            return succeed({"header": header, "ID": lease, "TTL": str(body["TTL"])})
        if path == "/v3/kv/put":
            self.revision += 1
            kv = {"key": body["key"], "value": body["value"], "lease": body.get("lease"), "mod_revision": str(self.revision)}
            self.kvs[body["key"]] = kv
            self.emit({"kv": kv})
            return succeed({"header": {"revision": str(self.revision)}})
        if path == "/v3/kv/range":
            if "range_end" in body:
                kvs = [kv for key, kv in sorted(self.kvs.items()) if base64.b64decode(key).startswith(PREFIX.encode())]
            else:
                kvs = [self.kvs[body["key"]]] if body["key"] in self.kvs else []
            return succeed({"header": header, "kvs": kvs, "count": str(len(kvs))})
        if path == "/v3/kv/deleterange":
            kv = self.kvs.pop(body["key"], None)
            if kv is None:
                return succeed({"header": header, "deleted": "0"})
            self.revision += 1
            self.emit({"type": "DELETE", "kv": {"key": body["key"], "mod_revision": str(self.revision)}})
            return succeed({"header": {"revision": str(self.revision)}, "deleted": "1", "prev_kvs": [kv]})
        if path == "/v3/lease/keepalive":
            if body["ID"] not in self.leases:
                return succeed({"result": {"header": header, "ID": body["ID"]}})
            return succeed({"result": {"header": header, "ID": body["ID"], "TTL": str(self.leases[body["ID"]])}})
        if path == "/v3/lease/revoke":
            self.expire(body["ID"])
            return succeed({"header": header})
        if path == "/v3/lease/timetolive":
            return succeed({"header": header, "TTL": str(self.leases.get(body["ID"], -1))})
        raise AssertionError(path)

    def watch(self, key: bytes, end: bytes, start_revision: int, stream: WatchStream) -> "Deferred[None]":
        self.calls.append(f"watch@{start_revision}")
        if self.down:
            return fail(EtcdUnavailable("down"))
        stream.endpoint = self.endpoint
        self.watchers.append(stream)
        self.send({"result": {"header": {"revision": str(self.revision)}, "created": True}})
        return succeed(None)

    # Test controls.

    def send(self, message: dict[str, Any]) -> None:
        for stream in list(self.watchers):
            if not stream.ended:
                stream.dataReceived(json.dumps(message).encode() + b"\n")

    def emit(self, event: dict[str, Any]) -> None:
        self.send({"result": {"header": {"revision": str(self.revision)}, "events": [event]}})

    def expire(self, lease: str) -> None:
        self.leases.pop(lease, None)
        for key, kv in list(self.kvs.items()):
            if kv.get("lease") == lease:
                del self.kvs[key]
                self.revision += 1
                self.emit({"type": "DELETE", "kv": {"key": key, "mod_revision": str(self.revision)}})

    def cut(self) -> None:
        for stream in self.watchers:
            stream.connectionLost(Failure(ConnectionError("cut")))
        self.watchers = []


class Gateway:
    def __init__(self, etcd: FakeEtcd) -> None:
        self.clock = etcd.clock
        self.registry = Registry(label_prefix="labelgw")
        self.source = RegisteredSource(self.registry)
        self.backend = EtcdRegistry(
            self.source, etcd.clock, EtcdSettings(("http://fake:2379",), PREFIX), client=etcd,  # type: ignore[arg-type]
        )
        self.api = RegistrationApi(self.backend)
        self.backend.start()

    def call(self, method: bytes, target: bytes, payload: bytes = b"") -> tuple[int, dict[str, Any]]:
        reply = self.api.handle(method, target, payload)
        if isinstance(reply, Deferred):
            result: list[Any] = []
            reply.addBoth(result.append)
            if not result:
                self.clock.advance(0)  # keep-alives go out at the end of the reactor turn
            assert result, "the fake answers at once"
            return result[0]  # type: ignore[no-any-return]
        return reply

    def put(self, service: str, instance: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        document = {"address": "127.0.0.1", "port": 9000, **fields}
        return self.call(b"PUT", f"/v1/services/{service}/instances/{instance}".encode(), json.dumps(document).encode())

    def backends(self, service: str) -> list[str]:
        pool = self.registry.services.get(service)
        return sorted(pool.backends) if pool else []


def world() -> tuple[Clock, FakeEtcd, Gateway, Gateway]:
    clock = Clock()
    etcd = FakeEtcd(clock)
    return clock, etcd, Gateway(etcd), Gateway(etcd)


def test_watch_stream_reads_messages_split_and_joined() -> None:
    messages: list[dict[str, Any]] = []
    stream = WatchStream(messages.append, lambda reason: None)
    stream.dataReceived(b'{"result": {"a": 1}}\n{"res')
    stream.dataReceived(b'ult": {"b": 2}}{"result": {"c": 3}}')
    assert [list(m["result"]) for m in messages] == [["a"], ["b"], ["c"]]
    assert prefix_end(b"/lgw/") == b"/lgw0"


def test_registered_through_one_is_applied_by_both_and_removed_by_expiry() -> None:
    clock, etcd, a, b = world()
    status, reply = a.put("web", "i1", hosts=["web.test"], ttl=5)
    assert status == 201 and reply["replaced"] is False
    assert a.backends("web") == b.backends("web") == ["registered:web/i1"]
    key = b64(PREFIX + "web/i1")
    lease = etcd.kvs[key]["lease"]
    assert etcd.leases[lease] == 5
    # A heartbeat through the other gateway is a keep-alive of that lease.
    status, reply = b.call(b"PUT", b"/v1/services/web/instances/i1/heartbeat")
    assert status == 200 and "/v3/lease/keepalive" in etcd.calls
    etcd.expire(lease)
    assert a.backends("web") == b.backends("web") == []
    assert b.call(b"PUT", b"/v1/services/web/instances/i1/heartbeat")[0] == 404


def test_same_id_replaces_and_revokes_the_old_lease() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1", port=9000)
    first = etcd.kvs[b64(PREFIX + "web/i1")]["lease"]
    status, reply = b.put("web", "i1", port=9001)
    assert status == 200 and reply["replaced"] is True
    assert first not in etcd.leases and len(etcd.kvs) == 1
    assert a.registry.services["web"].backends["registered:web/i1"].port == 9001


def test_delete_at_once_and_stale_events_do_not_bring_it_back() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1")
    put_event = {"kv": dict(etcd.kvs[b64(PREFIX + "web/i1")])}
    assert a.call(b"DELETE", b"/v1/services/web/instances/i1") == (200, {"removed": True})
    assert a.backends("web") == b.backends("web") == []
    etcd.emit(put_event)  # an old PUT delivered late
    assert a.backends("web") == b.backends("web") == []
    assert a.call(b"DELETE", b"/v1/services/web/instances/i1")[0] == 404


def test_clash_is_409_and_nothing_is_stored() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1", hosts=["shop.test"])
    status, reply = b.put("api", "i2", hosts=["shop.test"])
    assert status == 409 and "'api'" in reply["error"] and "'web'" in reply["error"]
    assert len(etcd.kvs) == 1 and set(b.registry.services) == {"web"}


def test_etcd_down_registration_is_503_and_rolled_back_routes_kept() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1", hosts=["web.test"])
    etcd.down = True
    status, reply = a.put("api", "i2", hosts=["api.test"])
    assert status == 503 and "etcd" in reply["error"]
    assert set(a.registry.services) == {"web"}
    assert a.call(b"PUT", b"/v1/services/web/instances/i1/heartbeat")[0] == 503
    clock.advance(1)  # the probe notices
    assert not a.backend.available and a.backends("web") == ["registered:web/i1"]
    etcd.down = False
    clock.advance(1)
    assert a.backend.available and a.backends("web") == ["registered:web/i1"]


def test_during_a_known_outage_a_registration_is_refused_without_asking_etcd() -> None:
    clock, etcd, a, b = world()
    etcd.down = True
    clock.advance(1)  # the probe notices: no quorum
    asked = len(etcd.calls)
    status, reply = a.put("api", "i2", hosts=["api.test"])
    assert status == 503 and "no quorum" in reply["error"]
    assert len(etcd.calls) == asked and "api" not in a.registry.services
    etcd.down = False
    clock.advance(1)
    assert a.put("api", "i2", hosts=["api.test"])[0] == 201


def test_a_cut_watch_resumes_from_its_revision_and_a_compacted_one_lists_again() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1")
    etcd.cut()
    # Written while b watches nothing.
    etcd.calls.clear()
    a_put_direct = parse_registration("web", "i2", {"address": "127.0.0.1", "port": 9002})
    etcd.revision += 1
    value = json.dumps({"service": "web", "instance": "i2", "ttl": 30, "body": dict(a_put_direct.body)})
    etcd.kvs[b64(PREFIX + "web/i2")] = {
        "key": b64(PREFIX + "web/i2"), "value": b64(value), "lease": "7", "mod_revision": str(etcd.revision),
    }
    written_at = etcd.revision
    clock.advance(0.1)
    assert f"watch@{written_at}" in etcd.calls  # resumed from the revision after the last one seen
    # The fake does not replay history: deliver what etcd would from that revision.
    etcd.emit({"kv": etcd.kvs[b64(PREFIX + "web/i2")]})
    assert b.backends("web") == ["registered:web/i1", "registered:web/i2"]
    # Compaction: the watch is canceled and the gateway lists again (i1 deleted meanwhile is dropped).
    del etcd.kvs[b64(PREFIX + "web/i1")]
    etcd.send({"result": {"header": {"revision": str(etcd.revision)}, "canceled": True, "compact_revision": "99"}})
    assert b.backends("web") == ["registered:web/i2"]
    assert b.backend.resyncs == 2


def test_a_value_that_is_not_a_registration_is_skipped() -> None:
    clock, etcd, a, b = world()
    etcd.revision += 1
    etcd.emit({"kv": {"key": b64(PREFIX + "x/y"), "value": b64("not json"), "mod_revision": str(etcd.revision)}})
    etcd.emit({"kv": {"key": b64(PREFIX + "x/z"), "value": b64(json.dumps({"service": "x", "instance": "z",
               "body": {"address": "127.0.0.1", "port": "bad"}})), "mod_revision": str(etcd.revision)}})
    assert a.registry.services == {} and a.backend.entries == {}


def test_listing_shows_leases_and_etcd_state() -> None:
    clock, etcd, a, b = world()
    a.put("web", "i1", ttl=10)
    status, listing = b.call(b"GET", b"/v1/services")
    assert status == 200 and listing["registry"] == "etcd" and listing["etcd"]["watching"] is True
    [entry] = listing["services"]["web"]
    assert entry["instance"] == "i1" and entry["expires_in"] == 10.0 and entry["lease"]


def test_tls_settings_make_a_policy_that_trusts_the_given_ca(tmp_path: Any) -> None:
    from labelgw.registration.etcd import EtcdClient, _tls_policy
    from labelgw.tls.ca import LocalCA

    ca = LocalCA.load_or_create(tmp_path / "ca")
    cert_pem, key_pem = ca.mint_leaf("client.localhost")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    (tmp_path / "client.pem").write_bytes(cert_pem)
    (tmp_path / "client.key").write_bytes(key_pem)
    settings = EtcdSettings(
        ("https://127.0.0.1:2379",), PREFIX, str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"),
        str(tmp_path / "client.key"),
    )
    policy = _tls_policy(settings)
    assert policy.creatorForNetloc(b"127.0.0.1", 2379) is not None
    client = EtcdClient(Clock(), settings)
    assert client.endpoint == "https://127.0.0.1:2379"


def test_the_heartbeats_of_one_reactor_turn_are_one_keep_alive_request() -> None:
    clock, etcd, a, b = world()
    for index in range(3):
        assert a.put("web", f"i{index}", hosts=["web.test"], ttl=5)[0] == 201
    gone = etcd.kvs[b64(PREFIX + "web/i2")]["lease"]
    etcd.leases.pop(gone)  # etcd no longer has i2's lease (the key is still listed)
    replies: list[Any] = []
    for instance in ("i0", "i1", "i0", "i2"):
        reply = a.api.handle(b"PUT", f"/v1/services/web/instances/{instance}/heartbeat".encode(), b"")
        assert isinstance(reply, Deferred)
        reply.addBoth(replies.append)
    assert replies == [] and etcd.streams == []
    clock.advance(0)
    # One request with one message per lease (i0's twice in the turn: once), each heartbeat answered by its lease.
    assert etcd.streams == [3]
    assert [status for status, _ in replies] == [200, 200, 200, 404]
    assert replies[0][1]["expires_at"] == 5.0


def test_a_keep_alive_without_an_answer_goes_again_then_is_503_not_404() -> None:
    clock, etcd, a, b = world()
    assert a.put("web", "i1", hosts=["web.test"], ttl=5)[0] == 201
    assert a.put("web", "i2", hosts=["web.test"], ttl=5)[0] == 201
    real = etcd.stream_call
    cut: list[int] = [1]

    def cutting(path: str, bodies: list[dict[str, Any]], attempts: int | None = None) -> Any:
        # etcd's gateway ending a busy stream before its last answers: the last one is lost, `cut[0]` times.
        answered: Any = real(path, bodies, attempts)
        if cut[0]:
            cut[0] -= 1
            answered.addCallback(lambda replies: replies[:-1])
        return answered

    etcd.stream_call = cutting  # type: ignore[method-assign]
    replies: list[Any] = []
    for instance in ("i1", "i2"):
        reply = a.api.handle(b"PUT", f"/v1/services/web/instances/{instance}/heartbeat".encode(), b"")
        assert isinstance(reply, Deferred)
        reply.addBoth(replies.append)
    clock.advance(0)  # i2's keep-alive went again, alone, in the next turn
    assert [status for status, _ in replies] == [200, 200] and etcd.streams == [2, 1]
    # Never answered: three requests, then 503 (etcd's state is unknown), not 404 (which means "register again").
    sent: list[int] = []
    etcd.stream_call = lambda path, bodies, attempts=None: succeed(sent.append(len(bodies)) or [])  # type: ignore[method-assign]
    reply = a.api.handle(b"PUT", b"/v1/services/web/instances/i1/heartbeat", b"")
    assert isinstance(reply, Deferred)
    reply.addBoth(replies.append)
    clock.advance(0)
    assert replies[-1][0] == 503 and sent == [1, 1, 1]


def test_stream_call_sends_messages_in_one_body_and_reads_each_answer() -> None:
    from labelgw.registration.etcd import EtcdClient

    posted: list[tuple[str, bytes]] = []
    answers = [
        b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}',
        b'{"result":{"ID":"1","TTL":"5"}}\n{"result":{"ID":"2"}}\n',
    ]

    class Response:
        def __init__(self, content: bytes) -> None:
            self._content = content

        def content(self) -> "Deferred[bytes]":
            return succeed(self._content)

    class Http:
        def post(self, url: str, data: bytes, **_: Any) -> "Deferred[Response]":
            posted.append((url, data))
            return succeed(Response(answers[len(posted) - 1]))

    client = EtcdClient(Clock(), EtcdSettings(("http://m1:2379", "http://m2:2379"), PREFIX), http=Http())
    result: list[Any] = []
    client.stream_call("/v3/lease/keepalive", [{"ID": "1"}, {"ID": "2"}]).addBoth(result.append)
    # The first member had no leader: the same body again on the next member.
    assert [url for url, _ in posted] == ["http://m1:2379/v3/lease/keepalive", "http://m2:2379/v3/lease/keepalive"]
    assert posted[0][1] == b'{"ID": "1"}\n{"ID": "2"}' == posted[1][1]
    assert result == [[{"result": {"ID": "1", "TTL": "5"}}, {"result": {"ID": "2"}}]]
