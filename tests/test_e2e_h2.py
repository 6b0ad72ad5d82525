"""End to end: HTTP/2 over TLS (ALPN h2) through the real `twistd -n labelgw`, with real HTTP/2 clients."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from typing import Any

import pytest

from support.net import free_port
from support.measurements import record
from test_e2e_tls import routed_over_https, service_name, whoami

pytestmark = pytest.mark.docker


def test_curl_negotiates_h2_and_gets_every_set_cookie(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = service_name(unique_name, "h2curl")
    host = f"{service}.localhost"
    whoami(containers, service, free_port())
    routed_over_https(gw, host)
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", "10", "--cacert", str(gw.state_dir / "ca.pem"),
         "--resolve", f"{host}:{gw.https_port}:127.0.0.1", "-D", "-", "-o", "/dev/null",
         "-w", "version=%{http_version}\n", f"https://{host}:{gw.https_port}/cookies"],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert "version=2" in result.stdout
    assert result.stdout.lower().count("set-cookie:") == 3


def test_h2_streams_do_not_block_each_other(labelgw: Any, containers: Any, unique_name: Any) -> None:
    import h2.config
    import h2.connection
    import h2.events

    gw = labelgw()
    service = service_name(unique_name, "h2streams")
    host = f"{service}.localhost"
    whoami(containers, service, free_port())
    routed_over_https(gw, host)

    context = ssl.create_default_context(cafile=str(gw.state_dir / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", gw.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            assert sock.selected_alpn_protocol() == "h2"
            connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            connection.initiate_connection()
            started = time.monotonic()
            for stream_id, path in ((1, "/delay?ms=1500"), (3, "/")):
                connection.send_headers(
                    stream_id, [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", host)], end_stream=True
                )
            sock.sendall(connection.data_to_send())
            finished: dict[int, float] = {}
            statuses: dict[int, str] = {}
            while len(finished) < 2:
                data = sock.recv(65536)
                assert data, "connection closed"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = dict(event.headers)[":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        finished[event.stream_id] = time.monotonic() - started
                sock.sendall(connection.data_to_send())
    record("h2: fast stream / slow stream (1.5 s) finished after (s)", f"{finished[3]:.2f} / {finished[1]:.2f}")
    assert statuses == {1: "200", 3: "200"}
    assert finished[3] < 1.0 < finished[1]
