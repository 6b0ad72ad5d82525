"""HTTPS wiring (labelgw/tls/https.py, the options in tap/config, the redirect hook in the HTTP/1.1 server).

Deterministic: MemoryReactorClock and in-memory transports; real handshakes are in tests/test_e2e_tls.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from labelgw.cli import config
from labelgw.cli.app import LabelgwService
from labelgw.core.backends import RoundRobin, ServicePool
from labelgw.http.h2 import NegotiatingFactory
from labelgw.http.server import ProxyFactory
from labelgw.tls.https import HttpsRedirect, HttpsService
from labelgw.core.model import ContainerSpec
from labelgw.core.routes import Route
from labelgw.cli.tap import Options
from labelgw.tls import CertDirectory, SNIContextSelector
from labelgw.tls.stdtls import StdTLSFactory
from proxyharness import ProxyHarness, spec

# --- options ----------------------------------------------------------------------------------------------


def parse(*argv: str) -> config.Settings:
    options = Options()
    options.parseOptions(list(argv))
    return options.settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    settings = parse()
    assert settings.https == ("tcp:8443",)
    assert (settings.state_dir, settings.cert_dir, settings.tls_strict, settings.redirect_https) == (
        None, None, False, False,
    )
    # The pure core agrees with the dataclass defaults.
    assert config.build({}) == config.Settings()


def test_every_https_option(tmp_path: Path) -> None:
    settings = parse(
        "--https", "tcp:9443:interface=127.0.0.1", "--https", "tcp:9444",
        "--state-dir", str(tmp_path / "state"), "--cert-dir", str(tmp_path),
        "--tls-strict", "--redirect-https",
    )
    assert settings.https == ("tcp:9443:interface=127.0.0.1", "tcp:9444")
    assert settings.state_dir == str(tmp_path / "state")
    assert settings.cert_dir == str(tmp_path)
    assert settings.tls_strict and settings.redirect_https


def test_https_none_disables_https() -> None:
    assert parse("--https", "none").https == ()
    assert parse("--https", "NONE").https == ()


def test_relative_directories_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "certs").mkdir()
    settings = parse("--state-dir", "state", "--cert-dir", "certs")
    assert settings.state_dir == str(tmp_path / "state")
    assert settings.cert_dir == str(tmp_path / "certs")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--https", "none", "--https", "tcp:9443"], "--https none: cannot be combined"),
        (["--https", "ssl:443"], "--https 'ssl:443': give a plain endpoint"),
        (["--https", "bogus:1"], "--https 'bogus:1': not a valid endpoint"),
        (["--https", "tcp:notaport"], "--https 'tcp:notaport': not a valid endpoint"),
        (["--cert-dir", "/nonexistent/labelgw-certs"], "--cert-dir '/nonexistent/labelgw-certs': not a directory"),
        (["--state-dir", "/etc/hostname"], "--state-dir '/etc/hostname': exists and is not a directory"),
        (["--redirect-https", "--https", "none"], "--redirect-https: needs an HTTPS listener"),
    ],
)
def test_bad_options_are_one_line_usage_errors_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as error:
        parse(*argv)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "labelgw.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_file_settings_and_command_line_precedence(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    file = write_yaml(
        tmp_path,
        f"https: [tcp:9443, tcp:9444]\nstate_dir: {tmp_path}/s\ncert_dir: {tmp_path}/certs\n"
        "tls_strict: true\nredirect_https: true\n",
    )
    settings = parse("--config", file)
    assert settings.https == ("tcp:9443", "tcp:9444")
    assert settings.state_dir == f"{tmp_path}/s" and settings.cert_dir == f"{tmp_path}/certs"
    assert settings.tls_strict and settings.redirect_https
    # The command line wins; an absent flag leaves the file's value alone.
    settings = parse("--config", file, "--https", "tcp:7443", "--state-dir", str(tmp_path / "t"))
    assert settings.https == ("tcp:7443",) and settings.state_dir == str(tmp_path / "t")
    assert settings.tls_strict


@pytest.mark.parametrize(
    ("text", "expected"),
    [("https: none\n", ()), ("https: []\n", ()), ("https: tcp:9443\n", ("tcp:9443",)), ("https:\n", ("tcp:8443",))],
)
def test_yaml_https_forms(tmp_path: Path, text: str, expected: tuple[str, ...]) -> None:
    assert parse("--config", write_yaml(tmp_path, text)).https == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_strict: yes please\n", "--tls-strict: must be true or false"),
        ("redirect_https: 1\n", "--redirect-https: must be true or false"),
        ("https: [tcp:9443, 5]\n", "--https: must be Twisted endpoint strings"),
        ("cert_dir: 5\n", "--cert-dir: must be a directory path"),
    ],
)
def test_bad_yaml_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse("--config", write_yaml(tmp_path, text))


# --- the redirect rule --------------------------------------------------------------------------------------


def route(tls: str | None) -> Route:
    return Route("api.localhost", "/", ServicePool("api", RoundRobin()), tls=tls)


@pytest.mark.parametrize(
    ("everything", "tls", "expected"),
    [
        (True, None, b"https://api.localhost:8443/a/b?c=d&e"),
        (True, "redirect", b"https://api.localhost:8443/a/b?c=d&e"),
        (True, "off", None),
        (False, None, None),
        (False, "redirect", b"https://api.localhost:8443/a/b?c=d&e"),
        (False, " redirect ", b"https://api.localhost:8443/a/b?c=d&e"),
        (False, "off", None),
    ],
)
def test_who_is_redirected(everything: bool, tls: str | None, expected: bytes | None) -> None:
    redirect = HttpsRedirect(everything, lambda: 8443)
    assert redirect.location("api.localhost", b"/a/b?c=d&e", route(tls)) == expected


def test_unrouted_hosts_are_redirected_only_with_redirect_https() -> None:
    assert HttpsRedirect(True, lambda: 8443).location("nope.localhost", b"/", None) == b"https://nope.localhost:8443/"
    assert HttpsRedirect(False, lambda: 8443).location("nope.localhost", b"/", None) is None


def test_port_443_is_left_out_and_the_port_is_looked_up_once_known() -> None:
    assert HttpsRedirect(True, lambda: 443).location("a.test", b"/x", None) == b"https://a.test/x"
    ports: list[int | None] = [None, 9443, 1]
    redirect = HttpsRedirect(True, lambda: ports[0])
    assert redirect.location("a.test", b"/", None) == b"https://a.test/"
    ports.pop(0)
    assert redirect.location("a.test", b"/", None) == b"https://a.test:9443/"
    ports.pop(0)
    assert redirect.location("a.test", b"/", None) == b"https://a.test:9443/"


@pytest.mark.parametrize("host", ["", "a.test\r\nx: y", 'a"b.test', "a b", "bad<host>"])
def test_hosts_that_would_need_escaping_are_not_redirected(host: str) -> None:
    assert HttpsRedirect(True, lambda: 8443).location(host, b"/", None) is None


def test_ipv6_literal_and_asterisk_target() -> None:
    redirect = HttpsRedirect(True, lambda: 8443)
    assert redirect.location("[::1]", b"/x", None) == b"https://[::1]:8443/x"
    assert redirect.location("a.test", b"*", None) is None


# --- the hook in the HTTP/1.1 server ------------------------------------------------------------------------


def labelled(container_id: str, service: str, port: int, host: str, tls: str) -> ContainerSpec:
    base = spec(container_id, service, port, (host,))
    return ContainerSpec(**{**{f: getattr(base, f) for f in base.__slots__}, "options": (("tls", tls),), "tls": tls})


@pytest.fixture
def h() -> ProxyHarness:
    specs = (
        spec("plain-1", "plain", 9001, ("plain.localhost",)),
        labelled("secure-1", "secure", 9002, "secure.localhost", "redirect"),
        labelled("open-1", "open", 9003, "open.localhost", "off"),
    )
    harness = ProxyHarness(specs=specs)
    harness.gateway.https_redirect = HttpsRedirect(False, lambda: 8443)  # type: ignore[attr-defined]
    return harness


def test_the_registry_copies_the_tls_label_into_the_route(h: ProxyHarness) -> None:
    assert h.registry.table.lookup("secure.localhost", "/").tls == "redirect"  # type: ignore[union-attr]
    assert h.registry.table.lookup("plain.localhost", "/").tls is None  # type: ignore[union-attr]


def test_labelled_route_answers_plain_http_with_308_and_keeps_the_connection(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"GET /p/q?x=1 HTTP/1.1\r\nHost: Secure.Localhost:8080\r\n\r\n")
    response = client.response()
    assert response.status == 308
    assert response.header(b"Location") == b"https://secure.localhost:8443/p/q?x=1"
    assert response.header(b"Connection") is None and not client.closing
    assert h.new_connects() == []
    # The next request on the connection, for another route, is proxied as usual.
    client.take()
    client.send(b"GET / HTTP/1.1\r\nHost: plain.localhost\r\n\r\n")
    assert len(h.new_connects()) == 1


def test_a_request_with_a_body_is_redirected_and_the_connection_closed(h: ProxyHarness) -> None:
    client = h.connect()
    client.send(b"POST /form HTTP/1.1\r\nHost: secure.localhost\r\nContent-Length: 5\r\n\r\nhello")
    response = client.response()
    assert response.status == 308 and response.header(b"Connection") == b"close"
    assert response.header(b"Location") == b"https://secure.localhost:8443/form"
    h.settle()
    assert client.lost


def test_https_connections_are_never_redirected(h: ProxyHarness) -> None:
    h.factory = ProxyFactory(h.gateway, b"https")
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: secure.localhost\r\n\r\n")
    upstream = h.upstream().accept()
    assert upstream.request().header(b"X-Forwarded-Proto") == b"https"


def test_redirect_everything_except_tls_off(h: ProxyHarness) -> None:
    h.gateway.https_redirect = HttpsRedirect(True, lambda: 443)  # type: ignore[attr-defined]
    client = h.connect()
    client.send(b"GET /a HTTP/1.1\r\nHost: plain.localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: unknown.test\r\n\r\n")
    first, second = client.responses()
    assert (first.status, first.header(b"Location")) == (308, b"https://plain.localhost/a")
    assert (second.status, second.header(b"Location")) == (308, b"https://unknown.test/b")
    client.take()
    client.send(b"GET / HTTP/1.1\r\nHost: open.localhost\r\n\r\n")
    assert len(h.new_connects()) == 1


def test_no_redirect_object_means_no_redirect(h: ProxyHarness) -> None:
    h.gateway.https_redirect = None  # type: ignore[attr-defined]
    client = h.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: secure.localhost\r\n\r\n")
    assert len(h.new_connects()) == 1


# --- HttpsService ------------------------------------------------------------------------------------------


class _InlinePool:
    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Reactor(MemoryReactorClock):
    """A memory reactor whose thread pool runs the work inline (disk cache writes, cert dir scans)."""

    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def settings(tmp_path: Path, **changes: Any) -> config.Settings:
    values: dict[str, Any] = {
        "https": ("tcp:0:interface=127.0.0.1",), "state_dir": str(tmp_path / "state"), "docker": False,
        "http": ("tcp:0:interface=127.0.0.1",),
    }
    values.update(changes)
    return config.Settings(**values)


def test_https_listeners_wrap_the_proxy_in_tls_with_the_sni_selector(tmp_path: Path) -> None:
    reactor = Reactor()
    service = LabelgwService(settings(tmp_path, https=("tcp:0", "tcp:1")), reactor)
    https = service.https
    assert [listener.scheme for listener in https.listeners] == ["https", "https"]
    assert all(listener in service.listeners for listener in https.listeners)
    factory = https.listeners[0].factory
    # The standard library's TLS by default (labelgw.tls.stdtls); Twisted's layer with --tls-engine openssl.
    assert isinstance(factory, StdTLSFactory)
    openssl = LabelgwService(settings(tmp_path, tls_engine="openssl"), reactor).https.listeners[0].factory
    assert isinstance(openssl, TLSMemoryBIOFactory)
    # HTTP/2 or HTTP/1.1 as ALPN decides, both serving the same gateway.
    assert isinstance(factory.wrappedFactory, NegotiatingFactory) and factory.wrappedFactory.proto == b"https"
    assert factory.wrappedFactory.acceptableProtocols() == [b"h2", b"http/1.1"]
    assert factory.wrappedFactory.gateway is service.gateway
    assert isinstance(https.selector, SNIContextSelector)
    assert https.cert_dir is None
    assert service.gateway.https_redirect is https.redirect  # type: ignore[attr-defined]
    assert https.redirect is not None and not https.redirect.everything


def test_the_local_ca_is_created_at_build_time_with_a_private_key(tmp_path: Path) -> None:
    HttpsService(settings(tmp_path), Reactor(), LabelgwService(settings(tmp_path, https=()), Reactor()).gateway)
    state = tmp_path / "state"
    assert (state / "ca.pem").exists()
    assert stat.S_IMODE(os.stat(state / "ca-key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def test_https_none_creates_no_ca_and_no_listener(tmp_path: Path) -> None:
    service = LabelgwService(settings(tmp_path, https=()), Reactor())
    assert service.https.listeners == [] and service.https.ca is None
    assert service.gateway.https_redirect is None  # type: ignore[attr-defined]
    assert not (tmp_path / "state").exists()


def test_cert_dir_is_a_child_service_polled_while_running(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    service = LabelgwService(settings(tmp_path, cert_dir=str(tmp_path / "certs")), Reactor())
    assert isinstance(service.https.cert_dir, CertDirectory)
    assert service.https.cert_dir.parent is service.https
    assert service.https.selector is not None


def test_unusable_ca_stops_start_up_with_a_line_naming_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "ca.pem").write_text("not a certificate")
    (state / "ca-key.pem").write_text("not a key")
    with pytest.raises(SystemExit) as stopped:
        LabelgwService(settings(tmp_path), Reactor())
    message = str(stopped.value)
    assert message.startswith(f"labelgw: --state-dir {state}: cannot load or create the local CA")
    assert "\n" not in message


def test_start_logs_the_ca_path_never_the_key(tmp_path: Path) -> None:
    reactor = Reactor()
    service = LabelgwService(settings(tmp_path), reactor)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.https.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    key = (tmp_path / "state" / "ca-key.pem").read_text()
    key_body = "".join(key.splitlines()[1:-1])
    text = repr(events)
    assert str(tmp_path / "state" / "ca.pem") in text
    assert key_body[:40] not in text and "PRIVATE KEY" not in text
    service.https.stopService()


def test_routed_names_count_as_routed_for_minting(tmp_path: Path) -> None:
    service = LabelgwService(settings(tmp_path), Reactor())
    service.registry.apply("c1", spec("c1", "api", 9000, ("api.example.test",)))
    selector = service.https.selector
    assert selector is not None
    # A routed name outside .localhost gets a minted leaf naming it; an unrouted one gets the default.
    routed = selector.context_for("api.example.test")
    unknown = selector.context_for("nobody.example.test")
    assert routed is not unknown
    assert unknown is selector.context_for(None)


def test_redirect_uses_the_first_https_listeners_real_port(tmp_path: Path) -> None:
    reactor = Reactor()
    service = LabelgwService(settings(tmp_path, https=("tcp:9443", "tcp:9444"), redirect_https=True), reactor)
    for listener in service.listeners:
        listener.privilegedStartService()
    assert service.https.redirect is not None
    assert service.https.redirect.location("a.test", b"/", None) == b"https://a.test:9443/"


def test_listener_url_says_https(tmp_path: Path) -> None:
    reactor = Reactor()
    service = LabelgwService(settings(tmp_path, https=("tcp:9443:interface=127.0.0.1",)), reactor)
    listener = service.https.listeners[0]
    listener.privilegedStartService()
    assert reactor.tcpServers[-1][:2] == (9443, listener.factory)
    # MemoryReactor's fake port says 0.0.0.0 whatever the interface.
    assert listener.url == "https://0.0.0.0:9443"
