"""The registration API and the embedded registry, without sockets: task.Clock, StringTransport."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from labelgw.cli import config
from labelgw.core.registry import Registry
from labelgw.registration.api import ApiProtocol, RegistrationApi
from labelgw.registration.embedded import EmbeddedRegistry
from labelgw.registration.leases import LeaseBook
from labelgw.registration.model import MAX_BODY, RegistrationError, parse_registration
from labelgw.registration.persist import StateFile, read_records
from labelgw.registration.settings import api_endpoint, is_loopback_endpoint
from labelgw.registration.source import RegisteredSource

BASE = b"/v1/services"


def body(**fields: Any) -> bytes:
    document = {"address": "127.0.0.1", "port": 9000}
    document.update(fields)
    return json.dumps(document).encode()


class Setup:
    def __init__(self, state_path: str | None = None, token: bytes | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = Registry(label_prefix="labelgw")
        self.source = RegisteredSource(self.registry)
        self.embedded = EmbeddedRegistry(
            self.source, self.clock, state_path,
            state_factory=lambda path, reactor, snapshot: StateFile(
                path, reactor, snapshot, run_in_thread=lambda work: succeed(work())
            ),
        )
        self.embedded.start()
        self.api = RegistrationApi(self.embedded, token)

    def call(self, method: bytes, target: bytes, payload: bytes = b"") -> tuple[int, dict[str, Any]]:
        reply = self.api.handle(method, target, payload)
        assert isinstance(reply, tuple)
        return reply

    def put(self, service: str, instance: str, payload: bytes) -> tuple[int, dict[str, Any]]:
        return self.call(b"PUT", f"/v1/services/{service}/instances/{instance}".encode(), payload)

    def backends(self, service: str) -> list[str]:
        pool = self.registry.services.get(service)
        return sorted(pool.backends) if pool else []


# --- the body -> spec, by the label rules ---------------------------------------------------------------------


def test_fields_become_the_spec_the_labels_would_make() -> None:
    registration = parse_registration("Web", "i-1", json.loads(body(
        version="v2", env="prod", hosts=["Web.Example.com."], path="/api/", strip_prefix=True, weight=2.5,
        traffic=10, balancer="hash", hash_key="header:X-User", tags=["blue", "eu"], ttl=12,
        health={"path": "/health", "interval": 3, "timeout": "500ms"}, labels={"ratelimit": "10/s"},
    )))
    spec = registration.spec
    assert (registration.service, registration.instance, registration.ttl) == ("web", "i-1", 12.0)
    assert spec.container_id == "registered:web/i-1" and spec.name == "web/i-1"
    assert (spec.address, spec.port, spec.version, spec.env) == ("127.0.0.1", 9000, "v2", "prod")
    assert spec.hosts == ("web.example.com",) and spec.path_prefix == "/api" and spec.strip_prefix
    assert (spec.weight, spec.traffic, spec.balancer, str(spec.hash_key)) == (2.5, 10.0, "hash", "header:x-user")
    assert spec.health_check is not None
    assert (spec.health_check.path, spec.health_check.interval, spec.health_check.timeout) == ("/health", 3.0, 0.5)
    assert spec.middleware is not None and spec.option("tags") == "blue,eu"


def test_default_host_and_ttl() -> None:
    registration = parse_registration("api", "1", json.loads(body()))
    assert registration.spec.hosts == ("api.localhost",) and registration.ttl == 30.0


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"port": "80"}, "port"),
        ({"port": 0}, "port"),
        ({"port": True}, "port"),
        ({"address": 5}, "address"),
        ({"address": "not an address!"}, "address"),
        ({"weight": -1}, "weight"),
        ({"weight": "heavy"}, "weight"),
        ({"traffic": 150}, "traffic"),
        ({"hosts": ["*.com"]}, "hosts"),  # a wildcard with one label after '*.' is too broad
        ({"hosts": []}, "hosts"),
        ({"path": "no-slash"}, "path"),
        ({"strip_prefix": "yes"}, "strip_prefix"),
        ({"balancer": "fastest"}, "balancer"),
        ({"hash_key": "header:X", "balancer": "wrt"}, "hash_key"),
        ({"health": {"path": "x"}}, "health.path"),
        ({"health": {"interval": "2 weeks", "path": "/h"}}, "health.interval"),
        ({"health": {"bogus": 1}}, "health.bogus"),
        ({"health": "/h"}, "health"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "30"}, "ttl"),
        ({"tags": "a"}, "tags"),
        ({"tags": ["a b"]}, "tags"),
        ({"version": "v 1"}, "version"),
        ({"labels": {"ratelimit": "lots"}}, "labels.ratelimit"),
        ({"labels": {"typo": "1"}}, "labels.typo"),
        ({"labels": {"port": "1"}}, "labels.port"),
        ({"labels": {"network": "x"}}, "labels.network"),
        ({"labels": {"ratelimit": ["10/s"]}}, "labels.ratelimit"),
        ({"labels": "ratelimit=1"}, "labels"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_field_is_refused_by_name(fields: dict[str, Any], field_name: str) -> None:
    with pytest.raises(RegistrationError) as raised:
        parse_registration("web", "i1", json.loads(body(**fields)))
    assert raised.value.status == 400 and raised.value.field == field_name


def test_missing_address_and_port() -> None:
    for missing in ("address", "port"):
        document = json.loads(body())
        del document[missing]
        with pytest.raises(RegistrationError) as raised:
            parse_registration("web", "i1", document)
        assert raised.value.field == missing


def test_bad_service_and_instance_ids() -> None:
    setup = Setup()
    assert setup.put("we b", "i1", body()) == (400, setup.put("we b", "i1", body())[1])
    status, reply = setup.put("web", "-x", body())
    assert status == 400 and reply["field"] == "instance"
    status, reply = setup.put("we%20b", "x", body())
    assert status == 400 and reply["field"] == "service"


# --- the API over the embedded registry ---------------------------------------------------------------------


def test_register_routes_replace_and_list() -> None:
    setup = Setup()
    status, reply = setup.put("web", "i1", body(hosts=["web.test"], ttl=10))
    assert status == 201 and reply == {"expires_at": 1010.0, "ttl": 10.0, "replaced": False}
    assert setup.backends("web") == ["registered:web/i1"]
    assert [str(route.host) for route in setup.registry.routes()] == ["web.test"]
    # Same id again: replaces its entry, no duplicate.
    status, reply = setup.put("web", "i1", body(hosts=["web.test"], port=9001, ttl=10))
    assert status == 200 and reply["replaced"] is True
    assert setup.backends("web") == ["registered:web/i1"]
    assert setup.registry.services["web"].backends["registered:web/i1"].port == 9001
    status, listing = setup.call(b"GET", BASE)
    assert status == 200 and listing["registry"] == "embedded"
    [entry] = listing["services"]["web"]
    assert (entry["instance"], entry["port"], entry["expires_at"], entry["expires_in"]) == ("i1", 9001, 1010.0, 10.0)


def test_heartbeats_keep_and_expiry_removes_at_once() -> None:
    setup = Setup()
    setup.put("web", "i1", body(ttl=3))
    for _ in range(5):
        setup.clock.advance(2.5)
        assert setup.call(b"PUT", BASE + b"/web/instances/i1/heartbeat") == (200, {"expires_at": setup.clock.seconds() + 3})
    assert setup.backends("web") == ["registered:web/i1"]
    setup.clock.advance(2.999)
    assert setup.backends("web") == ["registered:web/i1"]
    setup.clock.advance(0.001)
    assert setup.backends("web") == [] and setup.registry.routes() == []
    status, reply = setup.call(b"PUT", BASE + b"/web/instances/i1/heartbeat")
    assert status == 404 and reply["field"] == "instance"
    assert setup.call(b"GET", BASE)[1]["services"] == {}


def test_expiry_is_logged_with_which_and_why(caplog: Any) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        setup = Setup()
        setup.put("web", "i1", body(ttl=2))
        setup.clock.advance(2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    lines = [formatEvent(event) for event in events]
    assert any("instance i1 of service web removed: lease expired (no heartbeat for 2 s)" in line for line in lines)


def test_delete_removes_at_once() -> None:
    setup = Setup()
    setup.put("web", "i1", body())
    setup.put("web", "i2", body(port=9001))
    assert setup.call(b"DELETE", BASE + b"/web/instances/i1") == (200, {"removed": True})
    assert setup.backends("web") == ["registered:web/i2"]
    status, _ = setup.call(b"DELETE", BASE + b"/web/instances/i1")
    assert status == 404
    # Its lease is gone too: nothing happens when it would have expired.
    setup.clock.advance(60)
    assert setup.backends("web") == []


def test_clash_with_another_service_is_409_naming_both_and_changes_nothing() -> None:
    setup = Setup()
    setup.put("web", "i1", body(hosts=["shop.test"], path="/cart"))
    status, reply = setup.put("api", "i9", body(hosts=["shop.test"], path="/cart"))
    assert status == 409 and reply["field"] == "path"
    assert "'api'" in reply["error"] and "'web'" in reply["error"]
    assert set(setup.registry.services) == {"web"} and setup.registry.rejections == {}
    assert setup.call(b"GET", BASE)[1]["services"].keys() == {"web"}
    # Replacing an instance with a clashing one keeps the old registration as it was.
    setup.put("api", "i9", body(hosts=["api.test"]))
    status, _ = setup.put("api", "i9", body(hosts=["shop.test"], path="/cart"))
    assert status == 409
    assert [route.host for route in setup.registry.routes()] == ["api.test", "shop.test"]
    assert setup.backends("api") == ["registered:api/i9"]


def test_traffic_shares_over_100_are_refused() -> None:
    setup = Setup()
    setup.put("web", "a", body(version="v1", traffic=70))
    status, reply = setup.put("web", "b", body(version="v2", traffic=40, port=9001))
    assert status == 409 and reply["field"] == "traffic"


def test_bad_input_stores_nothing() -> None:
    setup = Setup()
    setup.put("web", "keep", body())
    for payload in (b"{", b"[]", b"\xff\xfe", body(port="x"), body(unknown=1), b"x" * (MAX_BODY + 1)):
        status, reply = setup.put("web", "new", payload)
        assert 400 <= status < 500 and reply["error"]
    assert setup.backends("web") == ["registered:web/keep"]
    assert list(setup.embedded.registrations) == ["web/keep"]


def test_unknown_paths_and_methods() -> None:
    setup = Setup()
    assert setup.call(b"GET", b"/v2/x")[0] == 404
    assert setup.call(b"POST", BASE)[0] == 405
    assert setup.call(b"GET", BASE + b"/web/instances/i1/heartbeat")[0] == 405
    assert setup.call(b"POST", BASE + b"/web/instances/i1")[0] == 405
    assert setup.call(b"PUT", BASE + b"/web/instances")[0] == 404


def test_token() -> None:
    api = Setup(token=b"s3cret").api
    assert api.authorized(None) is not None and api.authorized(None)[0] == 401  # type: ignore[index]
    assert api.authorized(b"Bearer nope")[0] == 401  # type: ignore[index]
    assert api.authorized(b"Basic s3cret")[0] == 401  # type: ignore[index]
    assert api.authorized(b"Bearer s3cret") is None
    assert Setup().api.authorized(None) is None


# --- the wire ------------------------------------------------------------------------------------------------


def connect(setup: Setup) -> tuple[ApiProtocol, StringTransport]:
    protocol = ApiProtocol(setup.api, setup.clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def request(method: str, target: str, payload: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(payload)}\r\n" if payload or method == "PUT" else ""
    return f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{length}{headers}\r\n".encode() + payload


def test_pipelined_requests_answered_in_order() -> None:
    setup = Setup()
    protocol, transport = connect(setup)
    payload = body()
    protocol.dataReceived(
        request("PUT", "/v1/services/web/instances/a", payload) + request("PUT", "/v1/services/web/instances/a/heartbeat")
        + request("DELETE", "/v1/services/web/instances/a")
    )
    text = transport.value()
    assert text.count(b"HTTP/1.1 ") == 3
    assert text.index(b"201 Created") < text.index(b'{"expires_at"') < text.index(b'{"removed":true}')
    assert not transport.disconnecting


def test_wire_errors() -> None:
    setup = Setup(token=b"t0ken")
    protocol, transport = connect(setup)
    protocol.dataReceived(request("GET", "/v1/services"))
    assert transport.value().startswith(b"HTTP/1.1 401 ") and b"WWW-Authenticate: Bearer" in transport.value()
    assert not transport.disconnecting  # a 401 keeps the connection
    transport.clear()
    protocol.dataReceived(request("GET", "/v1/services", headers="Authorization: Bearer t0ken\r\n"))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()
    protocol.dataReceived(b"PUT /v1/services/w/instances/i HTTP/1.1\r\nHost: gw\r\nContent-Length: 999999\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting

    protocol, transport = connect(setup)
    protocol.dataReceived(b"PUT /v1/services/w/instances/i HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 411 ") and transport.disconnecting

    protocol, transport = connect(setup)
    protocol.dataReceived(b"GET /v1/services HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.disconnecting

    protocol, transport = connect(setup)
    protocol.dataReceived(b"GET /v1/serv")
    setup.clock.advance(30)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting
    assert setup.embedded.registrations == {}


def test_expect_continue() -> None:
    setup = Setup()
    protocol, transport = connect(setup)
    payload = body()
    protocol.dataReceived(
        f"PUT /v1/services/web/instances/a HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(payload)
    assert b"201 Created" in transport.value()


# --- leases --------------------------------------------------------------------------------------------------


def test_lease_book_one_timer_and_order() -> None:
    clock = Clock()
    expired: list[str] = []
    book = LeaseBook(clock, expired.append)
    for index in range(100):
        book.grant(f"k{index}", 10 + index % 7)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    assert sorted(expired) == sorted(f"k{i}" for i in range(100) if i % 7 == 0)
    book.renew("k1")  # due at 11, now at 20
    assert book.revoke("k2")
    clock.advance(1)
    assert "k1" not in expired and "k2" not in expired
    clock.advance(10)
    assert "k1" in expired and "k2" not in expired and len(book) == 0
    assert clock.getDelayedCalls() == []


def test_lease_granted_again_is_a_new_lease() -> None:
    clock = Clock()
    expired: list[str] = []
    book = LeaseBook(clock, expired.append)
    book.grant("a", 5)
    clock.advance(4)
    book.grant("a", 5)
    clock.advance(4)
    assert expired == []
    clock.advance(1)
    assert expired == ["a"]


# --- persistence ---------------------------------------------------------------------------------------------


def test_state_file_keeps_live_registrations_across_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "registrations.json")
    first = Setup(path)
    first.put("web", "short", body(ttl=5, hosts=["web.test"]))
    first.put("web", "long", body(ttl=60, port=9001, hosts=["web.test"]))
    first.clock.advance(0.2)
    assert first.embedded.state is not None and first.embedded.state.writes == 1
    assert {record["instance"] for record in read_records(path)} == {"short", "long"}
    # Heartbeats are saved later, and at stop.
    first.clock.advance(3)
    first.call(b"PUT", BASE + b"/web/instances/long/heartbeat")
    first.clock.advance(0.5)
    assert first.embedded.state.writes == 1
    first.embedded.stop()
    assert {r["instance"]: r["expires"] for r in read_records(path)}["long"] == 1003.2 + 60
    assert os.stat(path).st_mode & 0o777 == 0o600

    second = Setup.__new__(Setup)
    second.clock = Clock()
    second.clock.advance(1010)  # "short" ran out meanwhile
    second.registry = Registry(label_prefix="labelgw")
    second.source = RegisteredSource(second.registry)
    second.embedded = EmbeddedRegistry(second.source, second.clock, path)
    second.embedded.start()
    assert second.backends("web") == ["registered:web/long"]
    assert second.embedded.leases.expires("web/long") == 1063.2
    second.clock.advance(53.2)
    assert second.backends("web") == []


def test_a_corrupt_state_file_is_logged_not_fatal(tmp_path: Any) -> None:
    path = tmp_path / "registrations.json"
    path.write_text("{not json")
    setup = Setup(str(path))
    assert setup.embedded.registrations == {}


# --- settings ------------------------------------------------------------------------------------------------


def test_api_endpoint_is_loopback_unless_bound_elsewhere(tmp_path: Any) -> None:
    assert api_endpoint("8082") == "tcp:8082:interface=127.0.0.1"
    assert api_endpoint("tcp:8082") == "tcp:8082:interface=127.0.0.1"
    assert is_loopback_endpoint("tcp:8082:interface=127.0.0.1")
    assert is_loopback_endpoint("tcp6:8082:interface=\\:\\:1")
    assert not is_loopback_endpoint("tcp:8082:interface=0.0.0.0")
    with pytest.raises(config.ConfigError, match="--registry-token-file"):
        config.build({"registry_api": "tcp:8082:interface=0.0.0.0"})
    token = tmp_path / "token"
    token.write_text("abc\n")
    settings = config.build({"registry_api": "tcp:8082:interface=0.0.0.0", "registry_token_file": str(token)})
    assert settings.registration.token == b"abc" and settings.registration.etcd is None
    assert config.build({}).registration.enabled is False
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(config.ConfigError, match="must hold one token"):
        config.build({"registry_api": "8082", "registry_token_file": str(empty)})


def test_etcd_settings() -> None:
    settings = config.build({"registry": "etcd://127.0.0.1:2379,localhost:22379"}).registration
    assert settings.etcd is not None and settings.enabled
    assert settings.etcd.endpoints == ("http://127.0.0.1:2379", "http://localhost:22379")
    for bad in ("etcd://", "etcd://host", "consul://x:1", "etcd://h:99999"):
        with pytest.raises(config.ConfigError, match="--registry"):
            config.build({"registry": bad})


# --- python -m labelgw register ------------------------------------------------------------------------------


def test_register_command_builds_the_body_the_api_checks() -> None:
    from labelgw.registration.client import build_body, parse_args

    options, command = parse_args([
        "--service", "shop", "--id", "shop-1", "--port", "9000", "--host", "shop.test", "--host", "www.shop.test",
        "--version", "v2", "--weight", "2", "--health-path", "/health", "--health-interval", "500ms", "--tag", "eu",
        "--label", "ratelimit=10/s", "--ttl", "12", "--", "sleep", "1",
    ])
    assert command == ["sleep", "1"]
    document = build_body(options)
    assert document == {
        "address": "127.0.0.1", "port": 9000, "ttl": 12.0, "version": "v2", "weight": 2.0,
        "hosts": ["shop.test", "www.shop.test"], "health": {"path": "/health", "interval": "500ms"},
        "tags": ["eu"], "labels": {"ratelimit": "10/s"},
    }
    registration = parse_registration("shop", "shop-1", document)
    assert registration.spec.hosts == ("shop.test", "www.shop.test") and registration.spec.middleware is not None
    with pytest.raises(SystemExit):
        parse_args(["--service", "s", "--id", "i", "--port", "1", "--ttl", "3", "--interval", "5"])


# --- the admin view ------------------------------------------------------------------------------------------


def test_admin_view_lists_registered_instances_and_the_registry() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from labelgw.control.admin import AdminResource

    setup = Setup()
    setup.put("web", "i1", body(tags=["blue"], version="v1"))
    resource = AdminResource(
        setup.registry, setup.clock.seconds, registrations=lambda: {"registry": "embedded", "instances": 1}
    )
    request = DummyRequest([b""])
    view = json.loads(resource.render(request))
    assert view["registrations"] == {"registry": "embedded", "instances": 1}
    [backend] = view["services"]["web"]["backends"]
    assert backend["id"] == "registered:web/i1" and backend["container"] == "web/i1"
    # Without a registry, the view has no such key.
    plain = json.loads(AdminResource(setup.registry, setup.clock.seconds).render(DummyRequest([b""])))
    assert "registrations" not in plain


def test_a_big_registry_is_saved_in_slices(tmp_path: Any) -> None:
    from labelgw.registration import persist

    path = str(tmp_path / "registrations.json")
    setup = Setup(path)
    count = persist.CHUNK * 2 + 7
    for index in range(count):
        setup.embedded.register(parse_registration(f"s{index // 100}", f"i{index}", json.loads(body(port=20000 + index % 1000))))
    setup.clock.advance(0.2)
    records = read_records(path)
    assert len(records) == count and records[-1]["expires"] == 1030.0
    assert {record["instance"] for record in records} == {f"i{index}" for index in range(count)}


def test_a_save_keeps_no_object_per_registration_alive_between_its_slices(tmp_path: Any) -> None:
    # A save spans several reactor turns; a container per registration kept for its whole run (a (key, value) tuple
    # per entry) survives the collector's young generations, counts as long-lived, and after a save or two makes
    # the collector run a full collection over the whole heap (100-1000 ms at 100 000 registrations).
    import gc

    from labelgw.registration import persist

    clock = Clock()
    clock.advance(1000)
    slices: list[Any] = []

    class Turns:
        """The clock, but the save's next slice (a zero delay) waits until the test runs it."""

        def seconds(self) -> float:
            return clock.seconds()

        def callLater(self, delay: float, function: Any, *args: Any) -> Any:
            if delay == 0:
                slices.append(lambda: function(*args))
                return None
            return clock.callLater(delay, function, *args)

    path = str(tmp_path / "registrations.json")
    embedded = EmbeddedRegistry(
        RegisteredSource(Registry(label_prefix="labelgw")), clock, path,
        state_factory=lambda path, reactor, snapshot: StateFile(
            path, Turns(), snapshot, run_in_thread=lambda work: succeed(work())
        ),
    )
    count = persist.CHUNK * 2 + 7
    for index in range(count):
        embedded.register(parse_registration(f"s{index // 100}", f"i{index}", json.loads(body(port=20000 + index % 1000))))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        before = gc.get_count()[0]
        clock.advance(0.2)  # the save starts: its snapshot and first slice
        assert len(slices) == 1
        grown = gc.get_count()[0] - before  # tracked objects allocated and still alive
    finally:
        if was_enabled:
            gc.enable()
    assert grown < count // 4, grown
    while slices:
        slices.pop(0)()
    assert len(read_records(path)) == count


def test_restored_registrations_leave_the_collectors_full_passes(tmp_path: Any) -> None:
    import gc

    from labelgw.registration.service import STATE_FILE, RegistrationService
    from labelgw.registration.settings import RegistrySettings

    first = Setup(str(tmp_path / STATE_FILE))
    first.put("web", "a", body(ttl=60))
    first.embedded.stop()
    clock = Clock()
    clock.advance(1010)
    frozen = gc.get_freeze_count()
    try:
        empty = RegistrationService(RegistrySettings(), clock, Registry(label_prefix="labelgw"), str(tmp_path / "none"))
        empty.startService()  # nothing restored: nothing frozen
        assert gc.get_freeze_count() == frozen
        service = RegistrationService(RegistrySettings(), clock, Registry(label_prefix="labelgw"), str(tmp_path))
        service.startService()
        assert service.summary()["instances"] == 1
        assert gc.get_freeze_count() > frozen
        assert gc.isenabled()  # off only while the saved registrations were applied
    finally:
        gc.unfreeze()


def test_a_registration_keeps_few_objects_for_the_collector() -> None:
    # Its canonical body holds tuples, not lists (the same JSON), so the collector stops tracking it; a lease is
    # numbers in the lease book, not an object.
    import gc

    # (A body with an object inside, health or labels, stays tracked: CPython keeps tracking a dict holding a dict.)
    registration = parse_registration("web", "i1", json.loads(body(hosts=["a.test", "b.test"], tags=["x"])))
    assert registration.body["hosts"] == ("a.test", "b.test") and registration.body["tags"] == ("x",)
    assert json.loads(registration.record + b"}")["body"]["hosts"] == ["a.test", "b.test"]
    gc.collect()  # dicts are untracked in full collections only
    assert not gc.is_tracked(registration.body)
    book = LeaseBook(Clock(), lambda key: None)
    book.grant("web/i1", 30)
    assert book.snapshot() == {"web/i1": 30.0} and not gc.is_tracked(book.snapshot()["web/i1"])
