"""bench/attack.py's pure parts: labelgw's config, the probe's summary, /proc's socket tables, HTTP/2 frames by hand,
the verdict and the table; and the TLS client that never says goodbye, over memory BIOs (no network)."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import ssl
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from labelgw.cli import config
from labelgw.tls.ca import LocalCA
from support.benchscripts import load_bench_script

attack = load_bench_script("attack")
ProbeRecord = attack.ProbeRecord
Sample = attack.Sample


# -- labelgw's configuration ---------------------------------------------------------------------------------------


def test_the_config_is_one_labelgw_accepts_with_every_service_and_the_idle_timeout() -> None:
    ports = {name: 40000 + i for i, name in enumerate(attack.SERVICES)}
    settings = config.build({}, yaml.safe_load(attack.labelgw_config(ports, 3.0)))
    assert settings.docker is False
    assert settings.proxy.idle_timeout == 3.0
    hosts = {service.name: (service.hosts, service.backends) for service in settings.static_services}
    assert hosts == {name: ((attack.host(name),), (("127.0.0.1", port),)) for name, port in ports.items()}
    # The launcher's readiness poll asks for the bench service's host.
    assert attack.host("bench") == attack.HOST_HEADER


# -- the well-behaved client's summary -----------------------------------------------------------------------------


def test_probe_summary_counts_failures_at_the_latency_they_failed_with() -> None:
    records = [ProbeRecord(i / 25, 0.002, 200, "", "http:bench") for i in range(97)]
    records += [
        ProbeRecord(4.0, 2.0, 0, "timeout", "https:bench"),
        ProbeRecord(4.1, 0.001, 0, "closed", "http:other"),
        ProbeRecord(4.2, 0.003, 503, "", "http:other"),
    ]
    summary = attack.summarize_probe(records)
    assert (summary.requests, summary.ok, summary.success_pct) == (100, 97, 97.0)
    assert summary.failures == {"closed": 1, "http-503": 1, "timeout": 1}
    assert summary.p50_ms == pytest.approx(2.0)
    assert summary.p99_ms == pytest.approx(3.0)  # the 99th of 100 sorted latencies; the timeout is the 100th
    assert summary.by_target == {"http:bench": 100.0, "http:other": 0.0, "https:bench": 0.0}


def test_probe_summary_of_nothing_is_nan() -> None:
    summary = attack.summarize_probe([])
    assert summary.requests == 0 and math.isnan(summary.success_pct) and math.isnan(summary.p99_ms)


def test_a_redirect_counts_as_served_and_an_error_status_does_not() -> None:
    assert ProbeRecord(0, 0, 308, "", "http:bench").ok
    assert not ProbeRecord(0, 0, 502, "", "http:bench").ok
    assert not ProbeRecord(0, 0, 200, "closed", "http:bench").ok


# -- labelgw's sockets from /proc ----------------------------------------------------------------------------------

TCP_TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 101 1 0 20 4 30 10 -1
   2: 0100007F:20FB 0100007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0 20 4 30 10 -1
   3: 0100007F:C352 0100007F:2328 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0 20 4 30 10 -1
   4: 0100007F:C353 0100007F:2329 08 00000000:00000000 00:00000000 00000000     0        0 104 1 0 20 4 30 10 -1
   5: 0100007F:C354 0100007F:1234 01 00000000:00000000 00:00000000 00000000     0        0 105 1 0 20 4 30 10 -1
"""


def test_tcp_table_gives_ports_and_state_by_inode() -> None:
    table = attack.tcp_table(TCP_TABLE)
    assert table[100] == (8080, 0, attack.TCP_LISTEN)
    assert table[101] == (8080, 50000, 1)
    assert table[104] == (50003, 9001, 8)
    assert len(table) == 6


def test_sockets_are_clients_on_a_listener_or_upstream_to_a_backend() -> None:
    table = attack.tcp_table(TCP_TABLE)
    # 100 is the listener itself, 105 goes elsewhere, 999 is not TCP (a pipe, an epoll): none of them counts.
    inodes = [100, 101, 102, 103, 104, 105, 999]
    assert attack.classify_sockets(inodes, table, (8080, 8443), (9000, 9001)) == (2, 2)
    assert attack.classify_sockets([101], table, (), ()) == (0, 0)


def test_first_release_looks_at_client_sockets_from_a_time_on() -> None:
    samples = [Sample(0.0, 60, 20, 2), Sample(1.0, 60, 1000, 990), Sample(2.0, 60, 500, 480), Sample(3.0, 60, 90, 20),
               Sample(4.0, 60, 30, 5)]
    assert attack.first_release(samples, 0.5, 32) == 3.0
    assert attack.first_release(samples, 3.5, 32) == 4.0
    assert attack.first_release(samples[:3], 0.5, 32) is None
    assert Sample(0, 0, 100, 10, 60).not_upstream == 40


def test_timeline_takes_a_sample_per_step_from_the_start() -> None:
    samples = [Sample(round(0.2 * i, 1), 60, 100, 1000 - i) for i in range(40)]  # 0.0 .. 7.8 s
    assert attack.timeline(samples, 2.0, 7.0, 2.0) == [(0.0, 990), (2.0, 980), (4.0, 970)]
    assert attack.timeline(samples, 2.1, 2.5, 2.0) == [(0.1, 989)]
    assert attack.timeline([], 0.0, 1.0, 1.0) == []


def test_open_file_limits_read_from_proc_and_set_for_children() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert attack.proc_nofile(os.getpid()) == (None if soft == resource.RLIM_INFINITY else soft)
    assert attack.proc_nofile(2**22 + 12345) is None  # no such process
    with attack.nofile_soft_limit(256):
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


# -- HTTP/2 frames by hand (case 7) --------------------------------------------------------------------------------


def test_frames_round_trip_and_a_partial_frame_stays_in_the_buffer() -> None:
    wire = attack.h2_frame(attack.HEADERS, attack.END_STREAM | attack.END_HEADERS, 3, b"abc")
    assert wire[:9] == b"\x00\x00\x03\x01\x05\x00\x00\x00\x03"
    buffer = bytearray(wire + attack.h2_frame(attack.GOAWAY, 0, 0, struct.pack(">II", 7, 11))[:12])
    assert attack.h2_frames(buffer) == [(attack.HEADERS, 5, 3, b"abc")]
    assert len(buffer) == 12
    buffer += struct.pack(">II", 7, 11)[3:]
    assert attack.h2_frames(buffer) == [(attack.GOAWAY, 0, 0, struct.pack(">II", 7, 11))]
    assert buffer == bytearray()


def test_reset_triggers_alternate_data_after_end_stream_and_an_overflowing_window_update() -> None:
    data = attack.h2_frames(bytearray(attack.reset_trigger(5, 0)))
    window = attack.h2_frames(bytearray(attack.reset_trigger(7, 1)))
    assert data == [(attack.DATA, 0, 5, b"x")]
    assert window == [(attack.WINDOW_UPDATE, 0, 7, struct.pack(">I", 2**31 - 1))]
    # Any stream's window is at least 0, so this increment takes it past the 2^31 - 1 maximum.
    assert 65535 + 2**31 - 1 > 2**31 - 1


# -- the verdict and the table -------------------------------------------------------------------------------------


def result(case: str = "6c", **changes: Any) -> Any:
    probe = attack.summarize_probe([ProbeRecord(i / 25, 0.004, 200, "", "http:bench") for i in range(150)])
    fields: dict[str, Any] = dict(
        case=case, title=attack.CASE_TITLES[case], probe=probe, baseline_fds=15, baseline_rss_mib=58.0,
        peak_fds=900, peak_rss_mib=70.0, after_fds=40, after_rss_mib=60.0, alive=True, attack_s=9.0,
        baseline_upstream=1, after_upstream=30,
    )
    fields.update(changes)
    return attack.CaseResult(**fields)


def test_served_bounded_and_cleaned_up_is_a_pass() -> None:
    assert attack.judge(result()) == ("PASS", [])
    assert attack.judge(result("7", details={"goaway": {"error": "ENHANCE_YOUR_CALM"}})) == ("PASS", [])
    assert attack.judge(result("5", details={"still_open_at_end": 0})) == ("PASS", [])


def test_each_failure_is_named() -> None:
    slow = attack.summarize_probe([ProbeRecord(i / 25, 1.5 if i < 5 else 0.004, 200 if i > 3 else 0,
                                               "" if i > 3 else "connect", "http:bench") for i in range(100)])
    verdict, reasons = attack.judge(result(probe=slow, peak_rss_mib=400.0, after_fds=70, alive=False))
    assert verdict == "FAIL"
    assert reasons == ["labelgw exited", "others served 96.0 % < 99 %", "others' p99 1500 ms > 1000 ms",
                       "RSS grew 342 MiB > 256 MiB", "26 more fds (not to backends) open after the attack than before"]
    assert attack.judge(result("5", details={"still_open_at_end": 975}))[1] == [
        "975 sockets kept open without close_notify"]
    assert attack.judge(result("7", details={"goaway": None}))[1] == ["no GOAWAY"]
    idle_close = {"error": "NO_ERROR", "last_stream_id": 19999, "after_streams": 10000, "after_s": 10.1}
    assert attack.judge(result("7", details={"goaway": idle_close, "flood_s": 4.0}))[1][0].startswith(
        "no GOAWAY against the flood")


def test_a_goaway_answers_the_flood_with_an_error_code_or_while_it_lasts() -> None:
    assert attack.goaway_answers_flood({"error": "ENHANCE_YOUR_CALM", "after_s": 9.0}, 4.0)
    assert attack.goaway_answers_flood({"error": "NO_ERROR", "after_s": 0.8}, 0.5)
    assert not attack.goaway_answers_flood({"error": "NO_ERROR", "after_s": 7.0}, 4.0)
    assert not attack.goaway_answers_flood(None, 4.0)
    assert attack.judge(result(probe=None))[1] == ["no well-behaved requests measured"]
    assert attack.judge(result(error="labelgw not ready")) == ("ERROR", ["labelgw not ready"])
    assert attack.judge(attack.failed_case("6b", "RuntimeError: boom")) == ("ERROR", ["RuntimeError: boom"])


def test_fds_left_after_the_attack_do_not_count_pooled_upstream_connections() -> None:
    # 15 before (1 upstream), 40 after of which 30 upstream: 9 others more than the 14 before.
    assert attack.judge(result(after_fds=40, after_upstream=30))[0] == "PASS"
    assert attack.judge(result(after_fds=40, after_upstream=5))[1] == [
        "21 more fds (not to backends) open after the attack than before"]


def test_the_table_has_a_row_per_case_with_the_figures() -> None:
    rows = [result(), result("7", probe=None, after_fds=None, after_rss_mib=None, verdict="FAIL")]
    rows[0].verdict = "PASS"
    lines = attack.format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["case", "what", "others"]
    assert lines[2].split()[-5:] == ["100.0", "4", "70/60", "900/40", "PASS"]
    assert lines[3].split()[-5:] == ["-", "-", "70/-", "900/-", "FAIL"]
    broken = attack.failed_case("6a", "labelgw not ready")
    broken.verdict = "ERROR"
    assert attack.format_table([broken]).splitlines()[2].split()[-5:] == ["-", "-", "0/-", "0/-", "ERROR"]


# -- options -------------------------------------------------------------------------------------------------------


def test_cases_option_picks_some_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert attack.parse_args([]).cases == list(attack.CASES)
    assert attack.parse_args(["--cases", "7, 6c"]).cases == ["7", "6c"]
    for bad in (["--cases", "6d"], ["--cases", ","], ["--hold", "0"], ["--tls-clients", "100000"]):
        with pytest.raises(SystemExit):
            attack.parse_args(bad)
    assert "--cases" in capsys.readouterr().err


# -- the TLS client that never says goodbye (memory BIOs, no sockets) ----------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


def test_lingering_client_reads_the_answer_and_close_notify_and_sends_nothing_back(tmp_path: Path) -> None:
    leaf = LocalCA.load_or_create(tmp_path / "ca").issue_leaf(["bench.localhost"], datetime.now(UTC))
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem + leaf.key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "leaf.pem")
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)

    async def scenario() -> tuple[Any, bytes]:
        client = attack._LingeringTLS(attack.insecure_tls(), "bench.localhost", b"GET / HTTP/1.1\r\n\r\n")
        transport = _Transport()
        client.connection_made(transport)
        request = b""
        for _ in range(10):  # the handshake, then the request
            s_in.write(bytes(transport.written))
            transport.written.clear()
            try:
                server.do_handshake()
                request += server.read(1024)
            except ssl.SSLWantReadError:
                pass
            if out := s_out.read():
                client.data_received(out)
            if request:
                break
        server.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        try:
            server.unwrap()  # the server's close_notify
        except ssl.SSLWantReadError:
            pass
        transport.written.clear()
        client.data_received(s_out.read())
        assert client.answered.done() and client.answered.exception() is None
        assert client.eof_received() is True  # the server's FIN leaves our half open
        return client, bytes(transport.written) + request

    client, sent = asyncio.run(scenario())
    assert sent.startswith(b"GET / HTTP/1.1")
    assert client.close_notify_at is not None and client.server_fin_at is not None
    # Nothing went back after the server's close_notify: in particular not ours.
    assert sent == b"GET / HTTP/1.1\r\n\r\n"
