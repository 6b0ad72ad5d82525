"""labelgw.cli.listeners: Twisted's StreamServerEndpointService with a listen backlog, a URL and a clear start error."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from labelgw.cli.listeners import DEFAULT_BACKLOG, ListenerService, with_backlog


def test_the_default_backlog_is_at_least_nginxs() -> None:
    assert DEFAULT_BACKLOG >= 511


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8080", f"tcp:8080:backlog={DEFAULT_BACKLOG}"),
        ("tcp:8080:interface=127.0.0.1", f"tcp:8080:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        ("TCP6:8443:interface=\\:\\:1", f"TCP6:8443:interface=\\:\\:1:backlog={DEFAULT_BACKLOG}"),
        ("unix:/run/labelgw.sock", f"unix:/run/labelgw.sock:backlog={DEFAULT_BACKLOG}"),
        # An explicit backlog is kept, wherever it stands and however it is spelled.
        ("tcp:8080:backlog=7", "tcp:8080:backlog=7"),
        ("tcp:port=8080:Backlog=7:interface=127.0.0.1", "tcp:port=8080:Backlog=7:interface=127.0.0.1"),
        # An escaped colon does not start a field: this interface is not a backlog.
        ("unix:/tmp/a\\:backlog=3", f"unix:/tmp/a\\:backlog=3:backlog={DEFAULT_BACKLOG}"),
        # Endpoint types that take no backlog are left alone.
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(description: str, expected: str) -> None:
    assert with_backlog(description) == expected


def listen(description: str) -> tuple[MemoryReactorClock, ListenerService]:
    reactor = MemoryReactorClock()
    listener = ListenerService(reactor, description, Factory(), "http")
    listener.privilegedStartService()
    listener.startService()
    return reactor, listener


@pytest.mark.parametrize(
    ("description", "backlog", "interface"),
    [
        ("tcp:8080", DEFAULT_BACKLOG, ""),
        ("tcp:8080:interface=127.0.0.1", DEFAULT_BACKLOG, "127.0.0.1"),
        ("tcp:8080:backlog=64:interface=127.0.0.1", 64, "127.0.0.1"),
        ("tcp6:8080:interface=\\:\\:1", DEFAULT_BACKLOG, "::1"),
    ],
)
def test_the_parsed_endpoint_listens_with_the_backlog(description: str, backlog: int, interface: str) -> None:
    reactor, listener = listen(description)
    [(port, factory, listened_backlog, listened_interface)] = reactor.tcpServers
    assert (port, factory, listened_backlog, listened_interface) == (8080, listener.factory, backlog, interface)


def test_unix_endpoints_get_the_backlog_too(tmp_path: Any) -> None:
    reactor, _ = listen(f"unix:{tmp_path}/gw.sock")
    [(address, _, backlog, _, _)] = reactor.unixServers
    assert (address, backlog) == (f"{tmp_path}/gw.sock", DEFAULT_BACKLOG)


def test_it_is_twisteds_endpoint_service_and_logs_its_url() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        _, listener = listen("tcp:8080:interface=127.0.0.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert isinstance(listener, StreamServerEndpointService)
    assert listener.running and listener.port is not None
    assert [event["url"] for event in events if event.get("log_format") == "labelgw listening on {url}"] == [
        listener.url
    ]
    assert listener.url.startswith("http://") and listener.url.endswith(":8080")


def test_stop_stops_listening_and_forgets_the_port() -> None:
    _, listener = listen("tcp:8080")
    port = listener.port
    calls: list[str] = []
    port.stopListening = lambda: calls.append("stopListening")
    stopped: list[Any] = []
    listener.stopService().addBoth(stopped.append)
    assert stopped == [None] and calls == ["stopListening"]
    assert listener.port is None and not listener.running


def test_stopping_a_listener_that_never_started_is_a_no_op() -> None:
    listener = ListenerService(MemoryReactorClock(), "tcp:8080", Factory())
    stopped: list[Any] = []
    listener.stopService().addBoth(stopped.append)
    assert stopped == [None]


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_a_busy_port_stops_start_up_with_one_line() -> None:
    listener = ListenerService(RefusingReactor(), "tcp:8080:interface=127.0.0.1", Factory())
    with pytest.raises(SystemExit) as stopped:
        listener.privilegedStartService()
    message = str(stopped.value)
    assert message.startswith("labelgw: cannot listen on 'tcp:8080:interface=127.0.0.1': ")
    assert "Address already in use" in message and "\n" not in message


def test_a_bad_endpoint_string_stops_start_up_with_one_line() -> None:
    with pytest.raises(SystemExit, match="labelgw: cannot listen on 'nonsense:1'"):
        ListenerService(MemoryReactorClock(), "nonsense:1", Factory())


def test_every_listener_of_the_gateway_gets_the_backlog(tmp_path: Any) -> None:
    from labelgw.cli import config
    from labelgw.cli.app import LabelgwService

    settings = config.build(
        {
            "http": ["tcp:8080:interface=127.0.0.1", "tcp:8090:backlog=200"],
            "https": ["tcp:8443:interface=127.0.0.1"],
            "admin": "tcp:8081:interface=127.0.0.1",
            "state_dir": str(tmp_path / "state"),
        },
        {"docker": False},
    )
    reactor = MemoryReactorClock()
    service = LabelgwService(settings, reactor)
    for listener in service.listeners:
        listener.privilegedStartService()
    assert sorted((port, backlog) for port, _, backlog, _ in reactor.tcpServers) == [
        (8080, DEFAULT_BACKLOG), (8081, DEFAULT_BACKLOG), (8090, 200), (8443, DEFAULT_BACKLOG),
    ]
