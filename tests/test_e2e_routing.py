"""End to end: the real `twistd -n labelgw` against a real Docker engine and real containers."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from typing import Any, Callable

import pytest

from support.net import free_port, http_get
from support.measurements import record
from support.websocket import assert_echo

pytestmark = pytest.mark.docker


def whoami(containers: Any, service: str, name: str, port: int, **labels: str) -> Any:
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), **{f"labelgw.{k}": v for k, v in labels.items()}}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", name], labels=all_labels)
    containers.wait_serving(container, port)
    return container


def poll(gw: Any, host: str, until: Callable[[Any], bool], timeout: float = 10.0, path: str = "/", interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = http_get(gw.base_url + path, host=host, timeout=2)
            if until(last):
                return last
        except OSError as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting on {host}{path}; last answer: {getattr(last, 'status', last)}\n{gw.log_text()[-3000:]}")


class EventClock:
    """Records when the engine says each container started (the event's own timestamp)."""

    def __init__(self, docker_client: Any) -> None:
        self.started: dict[str, int] = {}
        self._stream = docker_client.api.events(since=int(time.time()) - 1, filters={"type": "container", "event": "start"}, decode=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.started[event.get("id") or event.get("Actor", {}).get("ID", "")] = int(event["timeNano"])
        except Exception:
            pass

    def wait(self, container_id: str, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while container_id not in self.started:
            assert time.monotonic() < deadline, "no start event seen"
            time.sleep(0.005)
        return self.started[container_id]

    def close(self) -> None:
        self._stream.close()


def test_start_is_routed_within_milliseconds_then_stop_answers_503_then_remove_404(labelgw: Any, containers: Any, docker_client: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("svc").replace("-", "")
    host = f"{service}.localhost"
    assert http_get(gw.base_url, host=host).status == 404
    clock = EventClock(docker_client)
    try:
        delays = []
        for round_ in range(3):
            port = free_port()
            container = containers.run(
                labels={"labelgw.service": service, "labelgw.port": str(port)},
                command=["sh", "-c", f"/bin/busybox mkdir -p /www && echo round{round_} > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"],
            )
            event_ns = clock.wait(container.id)
            # Routed = labelgw stops answering 404 for the host; measured against the engine's event timestamp.
            poll(gw, host, lambda r: r.status != 404, interval=0.001)
            delays.append((time.time_ns() - event_ns) / 1e6)
            poll(gw, host, lambda r: r.status == 200 and f"round{round_}" in r.text)
            container.stop(timeout=1)
            assert poll(gw, host, lambda r: r.status == 503).header("Retry-After")
            container.remove()
            poll(gw, host, lambda r: r.status == 404)
        record("start event -> routed (ms, 3 rounds)", ", ".join(f"{d:.1f}" for d in delays))
        # Generous bound: the figure is reported, the 50 ms target is checked in the report, not as a flaky assertion.
        assert min(delays) < 1000
    finally:
        clock.close()


def test_no_failed_request_while_one_of_two_replicas_is_stopped(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("rep").replace("-", "")
    host = f"{service}.localhost"
    port_a, port_b = free_port(), free_port()
    replica_a = whoami(containers, service, "replica-a", port_a)
    whoami(containers, service, "replica-b", port_b)
    seen: set[str] = set()
    poll(gw, host, lambda r: r.status == 200 and (seen.add(r.header("X-Whoami") or "") or len(seen) == 2), timeout=20)

    failures: list[str] = []
    answers: list[tuple[float, str]] = []
    stop = threading.Event()

    def stream() -> None:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        while not stop.is_set():
            try:
                connection.request("GET", "/", headers={"Host": host})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"status {response.status}")
                answers.append((time.monotonic(), response.getheader("X-Whoami") or ""))
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except Exception as error:  # any failure counts
                failures.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
            time.sleep(0.002)
        connection.close()

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    replica_a.stop(timeout=10)
    stopped_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    record("requests during replica stop (count, failures)", f"{len(answers)}, {len(failures)}")
    assert not failures, failures[:5]
    assert len(answers) > 100
    assert {name for at, name in answers if at > stopped_at + 0.2} == {"replica-b"}


def test_bad_label_disables_only_its_own_container(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    good, bad = unique_name("good").replace("-", ""), unique_name("bad").replace("-", "")
    port = free_port()
    whoami(containers, good, "good", port)
    broken = containers.run(labels={"labelgw.service": bad, "labelgw.port": "80a"})
    assert poll(gw, f"{good}.localhost", lambda r: r.status == 200).header("X-Whoami") == "good"
    line = gw.wait_for_log("label labelgw.port='80a'")
    assert broken.name in line and "not a port number" in line
    assert http_get(gw.base_url, host=f"{bad}.localhost").status == 404


def test_routes_converge_after_the_engine_restarts(labelgw: Any, busybox_image: str, docker_client: Any, tmp_path: Any) -> None:
    from support.engine import PrivateEngine
    from support.images import BUSYBOX_IMAGE, ensure_busybox_image

    engine = PrivateEngine()
    try:
        client = engine.start()
        ensure_busybox_image(client)
        image = BUSYBOX_IMAGE
        gw = labelgw(docker_host=engine.url)
        port_old, port_new = free_port(), free_port()

        def httpd(service: str, port: int) -> Any:
            return client.containers.run(
                image, ["sh", "-c", f"/bin/busybox mkdir -p /www && echo {service} > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"],
                labels={"labelgw.service": service, "labelgw.port": str(port)}, network_mode="host", detach=True,
            )

        httpd("before", port_old)
        poll(gw, "before.localhost", lambda r: r.status == 200)
        engine.kill()
        # The engine is gone: the last good routes stay (the backend process may be gone too).
        assert http_get(gw.base_url, host="before.localhost").status in (200, 502, 503)
        client = engine.start()
        httpd("after", port_new)
        # Without restarting labelgw: the new container is routed, the old one (not restarted) is not ready.
        poll(gw, "after.localhost", lambda r: r.status == 200, timeout=30)
        poll(gw, "before.localhost", lambda r: r.status in (503, 404), timeout=30)
        assert "reconnect" in gw.log_text().lower() or "unreachable" in gw.log_text().lower()
    finally:
        engine.stop()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_one_gib_upload_and_download_stream_with_flat_memory(labelgw: Any, containers: Any, unique_name: Any) -> None:
    import http.client

    gw = labelgw()
    service = unique_name("big").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "big", free_port())
    poll(gw, host, lambda r: r.status == 200)
    rss_before = _rss_kib(gw.pid)
    size = 1 << 30
    block = hashlib.sha256(b"labelgw").digest() * 2048  # 64 KiB

    def body() -> Any:
        for _ in range(size // len(block)):
            yield block

    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    connection.request("POST", "/upload", body=body(), headers={"Host": host, "Content-Length": str(size)})
    response = connection.getresponse()
    answer = response.read().decode()
    upload_s = time.monotonic() - started
    assert response.status == 200, answer
    assert f'"bytes": {size}' in answer and expected.hexdigest() in answer
    rss_upload = _rss_kib(gw.pid)

    started = time.monotonic()
    connection.request("GET", f"/download?bytes={size}", headers={"Host": host})
    response = connection.getresponse()
    received = 0
    while True:
        piece = response.read(1 << 20)
        if not piece:
            break
        received += len(piece)
    download_s = time.monotonic() - started
    connection.close()
    rss_after = _rss_kib(gw.pid)
    assert received == size
    record("1 GiB upload / download through labelgw (s)", f"{upload_s:.1f} / {download_s:.1f}")
    record("labelgw RSS before / after upload / after download (MiB)", f"{rss_before // 1024} / {rss_upload // 1024} / {rss_after // 1024}")
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_upload, rss_after)


def test_websocket_echo_passes_through(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("ws").replace("-", "")
    host = f"{service}.localhost"
    whoami(containers, service, "ws", free_port())
    poll(gw, host, lambda r: r.status == 200)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        assert_echo(sock, host, [b"hello labelgw", b"second message"])


def test_several_set_cookie_headers_are_kept(labelgw: Any, containers: Any, unique_name: Any) -> None:
    gw = labelgw()
    service = unique_name("ck").replace("-", "")
    whoami(containers, service, "ck", free_port())
    response = poll(gw, f"{service}.localhost", lambda r: r.status == 200, path="/cookies")
    assert response.header_values("Set-Cookie") == ["a=1", "b=2", "c=3"]
