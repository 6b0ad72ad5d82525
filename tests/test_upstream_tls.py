"""Backends labelled labelgw.scheme=https are reached over TLS on the standard library's ssl (labelgw.tls.backends):
encrypted and not verified by default; with labelgw.tls.verify=true verified against the system's CAs or the
bundle of labelgw.tls.ca, for labelgw.tls.server_name (default: the route's first host)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from labelgw.core.backends import Backend
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.core.labels import parse_container
from labelgw.http.settings import ProxySettings
from labelgw.http.upstream import UpstreamConnection, UpstreamPool
from labelgw.tls.stdtls import StdTLSClientFactory
from test_labels import load, rejection_of, set_labels, spec_of
from test_tls_support import UserIssuer, cert_pem, key_pem


class _Sink:
    def upstream_connected(self, connection: object) -> None:
        pass

    def upstream_connect_failed(self, reason: object) -> None:
        pass


def backend(scheme: str, **tls: Any) -> Backend:
    return Backend(ContainerSpec(container_id=scheme, name=scheme, service="s", address="127.0.0.1", port=9443,
                                 hosts=("s.localhost",), scheme=scheme, **tls))


def test_https_backends_are_dialled_with_tls_and_http_ones_without() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, ProxySettings(connect_timeout=3.0))
    pool.connect(backend("https"), _Sink())
    pool.connect(backend("http"), _Sink())
    [(host, port, tls, timeout, _), (plain_host, plain_port, plain, *_)] = reactor.tcpClients
    assert (host, port, timeout) == ("127.0.0.1", 9443, 3.0)
    assert isinstance(tls, StdTLSClientFactory) and not isinstance(plain, StdTLSClientFactory)
    assert (plain_host, plain_port) == ("127.0.0.1", 9443)
    # Encrypted, not verified: containers mostly serve self-signed certificates.
    assert tls.context.verify_mode == ssl.CERT_NONE and not tls.context.check_hostname
    assert tls.server_hostname == "s.localhost"
    pool.connect(backend("https"), _Sink())
    assert reactor.tcpClients[2][2].context is tls.context  # one context, built once
    pool.connect(backend("https", tls_verify=True), _Sink())
    verifying = reactor.tcpClients[3][2]
    assert verifying.context.verify_mode == ssl.CERT_REQUIRED and verifying.context.check_hostname


def test_an_unreadable_ca_bundle_fails_the_connection_with_the_reason_logged(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, ProxySettings(connect_timeout=3.0))
    failed: list[Failure] = []

    class Sink(_Sink):
        def upstream_connect_failed(self, reason: Failure) -> None:
            failed.append(reason)

    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pool.connect(backend("https", tls_verify=True, tls_ca=str(tmp_path / "missing.pem")), Sink())
        reactor.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not reactor.tcpClients and len(failed) == 1
    assert any("cannot read the CA bundle" in str(e.get("reason", "")) for e in events)


# --- the labels ---------------------------------------------------------------------------------------------------


def test_tls_labels_are_parsed() -> None:
    spec = spec_of(set_labels(load("twonet"), scheme="https", tls__verify="true", tls__ca="/etc/labelgw/ca.pem",
                              tls__server_name="API.Internal."))
    assert (spec.tls_verify, spec.tls_ca, spec.tls_server_name) == (True, "/etc/labelgw/ca.pem", "api.internal")
    plain = spec_of(set_labels(load("twonet"), scheme="https"))
    assert (plain.tls_verify, plain.tls_ca, plain.tls_server_name) == (False, None, None)


@pytest.mark.parametrize(
    ("labels", "label", "reason"),
    [
        ({"tls__verify": "true"}, "labelgw.tls.verify", "has effect only with labelgw.scheme=https"),
        ({"scheme": "https", "tls__verify": "maybe"}, "labelgw.tls.verify", "not a boolean"),
        ({"scheme": "https", "tls__ca": "/ca.pem"}, "labelgw.tls.ca", "has effect only with labelgw.tls.verify=true"),
        ({"scheme": "https", "tls__verify": "1", "tls__ca": "ca.pem"}, "labelgw.tls.ca", "must be an absolute path"),
        ({"scheme": "https", "tls__server_name": "bad name"}, "labelgw.tls.server_name", "must be a DNS name"),
    ],
)
def test_bad_tls_labels_are_refused(labels: dict[str, str], label: str, reason: str) -> None:
    rejection = rejection_of(set_labels(load("twonet"), **labels))
    assert rejection.label == label and reason in rejection.reason


# --- a real backend over loopback --------------------------------------------------------------------------------

NAME = "backend.test"


class TLSBackend:
    """One-shot HTTPS on a loopback port, its certificate for NAME issued by a test CA."""

    def __init__(self, tmp_path: Path) -> None:
        self.issuer = UserIssuer.create("backend CA")
        certificate, key = self.issuer.issue([NAME])
        (tmp_path / "backend.pem").write_bytes(cert_pem(certificate) + key_pem(key))
        (tmp_path / "ca.pem").write_bytes(self.issuer.pem)
        (tmp_path / "other-ca.pem").write_bytes(UserIssuer.create("another CA").pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tmp_path / "backend.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            raw.settimeout(10)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = tls.recv(4096)
                        if not data:
                            break
                        request += data
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nverified")
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def tls_backend(tmp_path: Path) -> Iterator[TLSBackend]:
    server = TLSBackend(tmp_path)
    yield server
    server.close()


class RecordingSink:
    def __init__(self) -> None:
        self.done: defer.Deferred[tuple[str, Any]] = defer.Deferred()
        self.body = b""

    def upstream_connected(self, connection: UpstreamConnection) -> None:
        connection.send(self, b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n", False)

    def upstream_connect_failed(self, reason: Failure) -> None:
        self.done.callback(("connect failed", reason))

    def response_head(self, head: Any, connection: Any) -> None:
        pass

    def response_data(self, data: bytes) -> None:
        self.body += data

    def response_whole(self, head: Any, connection: Any, body: bytes) -> None:
        self.response_head(head, connection)
        self.response_data(body)
        self.response_done()

    def response_done(self) -> None:
        self.done.callback(("done", self.body))

    def flush(self) -> None:
        pass

    def upstream_failed(self, status: int, reason: str, retryable: bool = False) -> None:
        self.done.callback(("failed", status))

    def tunnel_data(self, data: bytes) -> None:
        pass

    def tunnel_closed(self) -> None:
        pass


def _spec(port: int, **tls: Any) -> ContainerSpec:
    return ContainerSpec(container_id="b", name="b", service="b", address="127.0.0.1", port=port, hosts=(NAME,),
                         scheme="https", **tls)


@pytest.mark.docker  # real sockets on the real reactor: with the end-to-end tests
@pytest_twisted.inlineCallbacks
def test_a_backend_certificate_is_verified_against_the_ca_label(tls_backend: TLSBackend, tmp_path: Path) -> Any:
    from twisted.internet import reactor

    pool = UpstreamPool(reactor, ProxySettings(connect_timeout=5.0, response_timeout=10.0))
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        verified = RecordingSink()
        pool.connect(Backend(_spec(tls_backend.port, tls_verify=True, tls_ca=str(tmp_path / "ca.pem"))), verified)
        assert (yield verified.done) == ("done", b"verified")
        unverified = RecordingSink()
        pool.connect(Backend(_spec(tls_backend.port)), unverified)
        assert (yield unverified.done) == ("done", b"verified")
        # The wrong CA: the handshake fails, the exchange gets a 502, and the log says why.
        wrong = RecordingSink()
        pool.connect(Backend(_spec(tls_backend.port, tls_verify=True, tls_ca=str(tmp_path / "other-ca.pem"))), wrong)
        assert (yield wrong.done) == ("failed", 502)
        # The right CA but another name.
        misnamed = RecordingSink()
        pool.connect(Backend(_spec(tls_backend.port, tls_verify=True, tls_ca=str(tmp_path / "ca.pem"),
                                   tls_server_name="other.test")), misnamed)
        assert (yield misnamed.done) == ("failed", 502)
    finally:
        globalLogPublisher.removeObserver(events.append)
    reasons = [str(e.get("reason", "")) for e in events if "TLS to backend" in str(e.get("log_format", ""))]
    assert len(reasons) == 2
    assert "CERTIFICATE_VERIFY_FAILED" in reasons[0] and "unable to get local issuer certificate" in reasons[0]
    assert "Hostname mismatch" in reasons[1] or "hostname" in reasons[1].lower()


def test_parse_container_keeps_rejections_typed() -> None:
    assert isinstance(parse_container(set_labels(load("twonet"), tls__verify="true")), Rejection)
