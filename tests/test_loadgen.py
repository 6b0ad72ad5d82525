"""bench/loadgen.py's pure parts: the seeded Poisson schedule, the response parser and the latency accounting.

No network, no sleeps: outcomes are built by hand with the times a run would record.
"""

from __future__ import annotations

import math
import statistics

import pytest

from support.benchscripts import load_bench_script

loadgen = load_bench_script("loadgen")
Outcome = loadgen.Outcome


# -- schedule -------------------------------------------------------------------------------------------------------


def test_schedule_is_seeded_increasing_and_bounded() -> None:
    first = loadgen.poisson_schedule(205.0, 30.0, seed=7)
    assert first == loadgen.poisson_schedule(205.0, 30.0, seed=7)
    assert first != loadgen.poisson_schedule(205.0, 30.0, seed=8)
    assert all(a < b for a, b in zip(first, first[1:]))
    assert 0.0 < first[0] and first[-1] < 30.0


def test_schedule_has_the_rate_and_exponential_gaps() -> None:
    times = loadgen.poisson_schedule(205.0, 100.0, seed=1)
    # 20 500 expected arrivals; a Poisson count's standard deviation is sqrt(20 500) ~ 143.
    assert abs(len(times) - 20_500) < 5 * 143
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 205.0, rel=0.03)
    # Exponential: the standard deviation equals the mean, and P(gap > mean) = 1/e.
    assert statistics.pstdev(gaps) == pytest.approx(mean, rel=0.05)
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)


def test_schedule_rejects_empty_runs() -> None:
    with pytest.raises(ValueError):
        loadgen.poisson_schedule(0.0, 10.0, seed=1)
    with pytest.raises(ValueError):
        loadgen.poisson_schedule(10.0, 0.0, seed=1)


# -- response parser ------------------------------------------------------------------------------------------------

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Whoami: b2\r\n\r\nhello"


def test_parser_reads_status_backend_and_length_in_any_split() -> None:
    for cut in range(1, len(ANSWER)):
        parser = loadgen.ResponseParser()
        got = parser.feed(ANSWER[:cut]) + parser.feed(ANSWER[cut:])
        assert got == [loadgen.Response(200, "b2", True, 5)], cut
        assert parser.idle


def test_parser_reads_back_to_back_and_chunked_answers() -> None:
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nx-whoami: b4\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
    )
    parser = loadgen.ResponseParser()
    got = parser.feed(ANSWER + chunked)
    assert got == [loadgen.Response(200, "b2", True, 5), loadgen.Response(503, "b4", True, 5)]


def test_parser_skips_interim_answers_and_honours_connection_close() -> None:
    parser = loadgen.ResponseParser()
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    assert parser.feed(data) == [loadgen.Response(204, "", False, 0)]


def test_parser_reads_a_body_until_close() -> None:
    parser = loadgen.ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\n\r\nabc") == []
    assert parser.feed(b"de") == []
    assert parser.eof() == loadgen.Response(200, "", False, 5)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_parser_refuses_malformed_answers(data: bytes) -> None:
    with pytest.raises(loadgen.ProtocolError):
        loadgen.ResponseParser().feed(data)


# -- accounting -----------------------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert loadgen.percentile(values, 0.5) == 500.0
    assert loadgen.percentile(values, 0.99) == 990.0
    assert loadgen.percentile(values, 0.999) == 999.0
    assert loadgen.percentile([3.0], 0.99) == 3.0
    assert math.isnan(loadgen.percentile([], 0.5))


def test_latency_counts_from_the_intended_time_not_the_send_time() -> None:
    # Sent 40 ms late (the generator was stalled), answered 10 ms after sending: 50 ms of latency.
    late = Outcome(intended=1.0, sent=1.040, finished=1.050, status=200, backend="b0")
    assert late.latency == pytest.approx(0.050)
    assert late.lateness == pytest.approx(0.040)
    summary = loadgen.summarize([late], 0.0, 2.0)
    assert summary.p99_ms == pytest.approx(50.0)
    assert summary.lateness_max_ms == pytest.approx(40.0)


def test_summary_counts_failures_in_the_tail_and_shares_by_backend() -> None:
    outcomes = []
    # 100 answered requests in the window: 90 from fast backends in 10 ms, 8 from the slow one in 100 ms.
    for i in range(90):
        t = 10.0 + i * 0.01
        outcomes.append(Outcome(t, t + 0.001, t + 0.010, 200, f"b{i % 4}"))
    for i in range(8):
        t = 12.0 + i * 0.01
        outcomes.append(Outcome(t, t + 0.001, t + 0.100, 200, "b4"))
    # A 502 from a backend, a timeout (never answered) and one that could not connect.
    outcomes.append(Outcome(13.0, 13.001, 13.020, 502, "b1"))
    outcomes.append(Outcome(13.5, 13.501, 18.5, error=loadgen.TIMEOUT))
    outcomes.append(Outcome(14.0, math.nan, 14.002, error=loadgen.CONNECT, new_connection=True))
    # Warm-up and after-window requests are left out, however bad.
    outcomes.append(Outcome(9.99, 10.0, 15.0, error=loadgen.TIMEOUT))
    outcomes.append(Outcome(40.0, 40.0, 45.0, error=loadgen.TIMEOUT))

    summary = loadgen.summarize(outcomes, 10.0, 40.0, slow_backends=["b4"])

    assert summary.requests == 101
    assert summary.ok == 98
    assert summary.failures == 3
    assert summary.timeouts == 1
    assert summary.failure_kinds == {"connect": 1, "http-502": 1, "timeout": 1}
    # The timeout is the slowest of 101: it is the p99.9 and the max, and the p99 is the slow backend's 100 ms.
    assert summary.p999_ms == pytest.approx(5000.0)
    assert summary.max_ms == pytest.approx(5000.0)
    assert summary.p99_ms == pytest.approx(100.0)
    assert summary.p50_ms == pytest.approx(10.0)
    assert summary.throughput == pytest.approx(98 / 30.0)
    # Shares are over the 99 answers that named a backend (the 502 included).
    assert summary.answered_by == {"b0": 23, "b1": 24, "b2": 22, "b3": 22, "b4": 8}
    assert sum(summary.share.values()) == pytest.approx(1.0)
    assert summary.slow_share == pytest.approx(8 / 99)
    assert summary.unsent == 1
    assert summary.new_connections == 1
    assert summary.lateness_max_ms == pytest.approx(1.0)


def test_summary_without_slow_backends_or_requests() -> None:
    summary = loadgen.summarize([], 0.0, 1.0)
    assert summary.requests == 0 and summary.failures == 0
    assert math.isnan(summary.p99_ms) and math.isnan(summary.slow_share)
    with pytest.raises(ValueError):
        loadgen.summarize([], 1.0, 1.0)


def test_format_summary_mentions_the_figures() -> None:
    outcomes = [Outcome(0.5, 0.5005, 0.512, 200, "b0")]
    text = loadgen.format_summary(loadgen.summarize(outcomes, 0.0, 1.0, ["b4"]))
    assert "p99 12.0" in text and "b0 100.0%" in text and "lateness" in text
