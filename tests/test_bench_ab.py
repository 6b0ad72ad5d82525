"""bench/ab.py's and bench_tls.py's pure parts: h2load's output, its phase marks, the A/B medians and ratios."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from support.benchscripts import load_bench_script

bench_tls = load_bench_script("bench_tls")
ab = load_bench_script("ab")
bench_proxy = load_bench_script("bench_proxy")

H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 1s of warm-up time and 5s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 6.01s, 5061.33 req/s, 143.94KB/s
requests: 25407 total, 25507 started, 25407 done, 25306 succeeded, 101 failed, 7 errored, 3 timeout
status codes: 25306 2xx, 0 3xx, 90 4xx, 4 5xx
traffic: 431.82KB (442186) total, 75.23KB (77040) headers (space savings 94.82%), 88.97KB (91104) data
                     min         max         mean         sd        +/- sd
time for request:     8.44ms     53.74ms     19.58ms      5.07ms    83.61%
time for connect:     4.97ms     13.22ms     10.74ms      3.02ms    80.00%
time to 1st byte:    13.81ms     59.44ms     50.09ms     14.81ms    90.00%
req/s           :     496.55      510.22      506.02        4.51    80.00%
"""


def test_h2load_summary_gives_protocol_rate_and_counts() -> None:
    result = bench_tls.parse_h2load(H2LOAD_OUTPUT)
    assert (result.protocol, result.requests_per_s, result.finished_s) == ("h2", 5061.33, 6.01)
    assert (result.done, result.succeeded, result.failed, result.timeouts) == (25407, 25306, 101, 3)
    assert (result.status_2xx, result.status_3xx, result.status_4xx, result.status_5xx) == (25306, 0, 90, 4)
    # h2load counts bad statuses, stream errors and timeouts as failed: that is the error count.
    assert (result.requests, result.errors) == (25407, 101)
    assert math.isnan(result.cpu_us_per_request)


def test_h2load_summary_in_milliseconds_and_without_alpn() -> None:
    output = H2LOAD_OUTPUT.replace("finished in 6.01s", "finished in 950.50ms").replace(
        "Application protocol: h2\n", ""
    )
    result = bench_tls.parse_h2load(output)
    assert result.finished_s == pytest.approx(0.9505)
    assert result.protocol == ""


def test_h2load_output_without_a_summary_is_refused() -> None:
    with pytest.raises(ValueError, match="summary"):
        bench_tls.parse_h2load("starting benchmark...\nNo protocol negotiated. Aborted.\n")


def test_h2load_phase_marks() -> None:
    phases = [bench_tls.h2load_phase(line) for line in H2LOAD_OUTPUT.splitlines(keepends=True)]
    assert [p for p in phases if p] == ["main", "over"]
    assert phases.index("main") < phases.index("over")


def test_h2load_argv_keeps_traffic_on_loopback_with_the_bench_host() -> None:
    argv = bench_tls.h2load_argv(4443, duration_s=5, warmup_s=1, clients=10, streams=10, h1=False)
    assert argv == [
        "h2load", "-t1", "-c10", "-m10", "-D", "5", "--warm-up-time=1",
        "--connect-to", "127.0.0.1:4443", "https://bench.localhost/",
    ]
    h1 = bench_tls.h2load_argv(4443, duration_s=5, warmup_s=0, clients=50, streams=1, h1=True)
    assert "--h1" in h1 and "-c50" in h1 and "-m1" in h1
    assert not any(arg.startswith("--warm-up-time") for arg in h1)


def sample(load: str, tree: str, round_index: int, cpu: float, rate: float = 1000.0, errors: int = 0) -> object:
    return ab.Sample(load, tree, round_index, rate, cpu, int(rate * 5), errors)


def test_compare_gives_medians_their_ratios_and_per_round_ratios() -> None:
    samples = [
        sample("http1", "A", 0, 30.0, 10_000),
        sample("http1", "B", 0, 33.0, 9_000),
        sample("http1", "B", 1, 31.0, 9_500),
        sample("http1", "A", 1, 31.0, 10_500, errors=2),
        sample("http1", "A", 2, 40.0, 8_000),
        sample("http1", "B", 2, 36.0, 8_800),
        sample("h2", "A", 0, 200.0),  # another load: not counted
    ]
    c = ab.compare(samples, "http1")
    assert (c.load, c.rounds, c.errors) == ("http1", 3, 2)
    assert (c.a_cpu_us, c.b_cpu_us) == (31.0, 33.0)
    assert (c.a_requests_per_s, c.b_requests_per_s) == (10_000, 9_000)
    assert c.cpu_ratio == pytest.approx(33.0 / 31.0)
    assert c.rate_ratio == pytest.approx(0.9)
    # Paired within each round, in round order: 33/30, 31/31, 36/40.
    assert c.paired_cpu_ratios == pytest.approx((1.1, 1.0, 0.9))
    assert c.paired_cpu_median == pytest.approx(1.0)
    assert c.b_lower_in == 1


def test_compare_pairs_only_rounds_with_both_trees() -> None:
    samples = [sample("h2", "A", 0, 200.0), sample("h2", "B", 0, 150.0), sample("h2", "A", 1, 210.0)]
    c = ab.compare(samples, "h2")
    assert c.rounds == 1
    assert c.paired_cpu_ratios == pytest.approx((0.75,))
    assert c.a_cpu_us == pytest.approx(205.0)
    assert c.b_lower_in == 1


def test_compare_without_samples_is_nan_not_an_error() -> None:
    c = ab.compare([], "h2")
    assert c.rounds == 0 and math.isnan(c.cpu_ratio) and math.isnan(c.paired_cpu_median)


def test_rounds_alternate_the_order() -> None:
    assert [ab.round_order(i) for i in range(4)] == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]


def test_h2_to_h1_ratio_per_tree() -> None:
    samples = [
        sample("h2", "A", 0, 180.0),
        sample("h2", "A", 1, 200.0),
        sample("h1tls", "A", 0, 60.0),
        sample("h1tls", "A", 1, 60.0),
        sample("h2", "B", 0, 90.0),
    ]
    assert ab.h2_to_h1(samples, "A") == pytest.approx(190.0 / 60.0)
    assert math.isnan(ab.h2_to_h1(samples, "B"))  # no HTTP/1.1-over-TLS sample


def test_report_gives_the_ratios_and_the_h2_to_h1_ratio_per_tree() -> None:
    samples = []
    for index in range(5):
        samples += [
            sample("http1", "A", index, 30.0),
            sample("http1", "B", index, 30.9),
            sample("h2", "A", index, 200.0),
            sample("h2", "B", index, 120.0),
            sample("h1tls", "A", index, 60.0),
            sample("h1tls", "B", index, 70.0),
        ]
    lines = ab.report_lines([ab.compare(samples, load) for load in ("http1", "h2", "h1tls")], samples)
    text = "\n".join(lines)
    assert "x1.030 [1.030-1.030]" in text
    assert "A: HTTP/2 CPU / HTTP/1.1 CPU over TLS x3.33" in text
    assert "B: HTTP/2 CPU / HTTP/1.1 CPU over TLS x1.71" in text
    assert "h2: CPU/request B/A x0.600 [0.600-0.600]: within x1.05; B measurably lower; B lower in 5 of 5" in text
    assert "h1tls: CPU/request B/A x1.167 [1.167-1.167]: OVER x1.05; B measurably higher" in text


def paired(load: str, ratios: list[float]) -> object:
    samples = []
    for index, ratio in enumerate(ratios):
        samples += [sample(load, "A", index, 100.0), sample(load, "B", index, 100.0 * ratio)]
    return ab.compare(samples, load)


def test_verdict_is_only_as_sure_as_the_interval() -> None:
    # The median is under the bound, but the rounds scatter across it: not resolved, and no difference from A.
    noisy = ab.verdict(paired("http1", [0.90, 0.97, 1.00, 1.02, 1.12]))
    assert "x1.000 [0.900-1.120]: not resolved against x1.05" in noisy
    assert "no difference beyond the noise" in noisy
    steady = ab.verdict(paired("http1", [0.99, 1.00, 1.01, 1.02, 1.03]))
    assert "within x1.05; no difference beyond the noise; B lower in 1 of 5 rounds" in steady
    faster = ab.verdict(paired("h2", [0.70, 0.72, 0.75, 0.71, 0.80]))
    assert "within x1.05; B measurably lower; B lower in 5 of 5 rounds" in faster
    assert ab.verdict(ab.compare([], "h2")) == "h2: no pair of A and B measured"
    # Under 5 rounds not even the range holds the median with 90 % confidence.
    assert "too few rounds to tell (4; 5 or more" in ab.verdict(paired("h2", [0.70, 0.72, 0.75, 0.71]))
    assert ab._coverage(ab.MIN_ROUNDS - 1, 1) < ab.CONFIDENCE <= ab._coverage(ab.MIN_ROUNDS, 1)


def test_median_interval_widens_to_keep_its_coverage() -> None:
    assert ab.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)  # n = 5: the range covers 94 %
    assert ab.median_interval([float(v) for v in range(1, 9)]) == (2.0, 7.0)  # n = 8: 2nd to 7th, 93 %
    assert ab.median_interval([float(v) for v in range(1, 21)]) == (6.0, 15.0)  # n = 20: 6th to 15th, 96 %
    assert ab.median_interval([1.5]) == (1.5, 1.5)
    assert all(math.isnan(v) for v in ab.median_interval([]))
    assert ab._coverage(8, 2) == pytest.approx(1 - 2 * 9 / 256)


def test_the_log_lines_name_the_labelgw_and_the_tap_module_the_process_imported() -> None:
    log = (
        "noise\nbench: labelgw imported from /tmp/tree-A/labelgw/__init__.py\n"
        "bench: labelgw plugin module imported from /tmp/tree-A/labelgw/cli/tap.py\n"
        "2026-11-30T07:09:51 [twistd] starting\n"
    )
    assert bench_proxy.imported_from(log) == (
        Path("/tmp/tree-A/labelgw/__init__.py"),
        Path("/tmp/tree-A/labelgw/cli/tap.py"),
    )
    assert bench_proxy.imported_from("twistd starting\n") == (None, None)


def test_a_directory_without_labelgw_is_not_a_tree(tmp_path: Path) -> None:
    (tmp_path / "labelgw").mkdir()
    (tmp_path / "labelgw" / "__init__.py").write_text("")
    with pytest.raises(SystemExit, match="labelgw_plugin.py"):
        ab.resolve_tree("A", str(tmp_path), tmp_path / "work")


def test_arguments_default_to_a_short_run_of_both_loads() -> None:
    args = ab.parse_args(["main", "HEAD"])
    assert (args.tree_a, args.tree_b, args.loads) == ("main", "HEAD", ["http1", "h2"])
    # About 2-3 minutes with the defaults.
    assert 100 <= ab.estimate_s(args) <= 180
    assert ab.parse_args(["a", "b", "--loads", "h1tls,h2"]).loads == ["h2", "h1tls"]
    with pytest.raises(SystemExit):
        ab.parse_args(["a", "b", "--loads", "http3"])


def test_concurrent_runs_twice_the_rounds_in_the_same_time() -> None:
    interleaved, concurrent = ab.parse_args(["a", "b"]), ab.parse_args(["a", "b", "--concurrent"])
    assert (interleaved.rounds, concurrent.rounds) == (8, 16)
    assert ab.estimate_s(concurrent) == pytest.approx(ab.estimate_s(interleaved))
    assert ab.parse_args(["a", "b", "--concurrent", "--rounds", "3"]).rounds == 3
