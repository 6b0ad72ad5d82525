"""bench/bench_many.py's pure parts: batches, percentiles, labels, the config, labelgw's resync lines, CPU windows."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from support.benchscripts import load_bench_script

bench_many = load_bench_script("bench_many")


def test_containers_are_started_in_a_first_batch_of_100_then_the_rest() -> None:
    assert bench_many.batches(500) == [range(100), range(100, 500)]
    assert bench_many.batches(100) == [range(100)]
    assert bench_many.batches(30) == [range(30)]
    assert bench_many.batches(0) == []


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench_many.percentile(values, 0.5) == 50.0
    assert bench_many.percentile(values, 0.99) == 99.0
    assert bench_many.percentile(values, 1.0) == 100.0
    assert bench_many.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert math.isnan(bench_many.percentile([], 0.5))


def test_each_container_is_its_own_service_on_its_own_port() -> None:
    labels = bench_many.container_labels(7, "run1")
    assert labels == {"labelgw.service": "s7", "labelgw.port": "20007", "labelgw-bench.owner": "run1"}
    assert bench_many.container_labels(8, "run1")["labelgw.port"] != labels["labelgw.port"]


def test_config_turns_the_watcher_on_with_the_resync_interval_and_the_web_service() -> None:
    text = bench_many.labelgw_config([4001, 4002], 3.5)
    assert "docker: true\n" in text
    assert "resync_interval: 3.5\n" in text
    assert "hosts: [web.localhost]" in text
    assert 'backends: ["127.0.0.1:4001", "127.0.0.1:4002"]' in text


LOG = """\
2026-11-30T08:35:01+0000 [-] bench: labelgw imported from /x/labelgw/__init__.py
2026-11-30T08:35:02+0000 [labelgw.docker.watcher.DockerWatcher#info] watching docker events at unix:///tmp/d.sock
2026-11-30T08:35:02+0000 [labelgw.docker.watcher.DockerWatcher#info] docker resync (connected): 100 containers, \
100 routed, 0 rejected, 0 changed meanwhile, in 166.2 ms
2026-11-30T08:35:06+0000 [labelgw.docker.watcher.DockerWatcher#info] docker resync (periodic): 100 containers, \
99 routed, 1 rejected, 0 changed meanwhile, in 221.0 ms
"""


def test_resync_lines_give_reason_counts_duration_and_log_time() -> None:
    lines = bench_many.parse_resyncs(LOG)
    assert [(r.reason, r.containers, r.routed, r.elapsed_ms) for r in lines] == [
        ("connected", 100, 100, 166.2),
        ("periodic", 100, 99, 221.0),
    ]
    assert lines[1].logged_at == datetime(2026, 11, 30, 8, 35, 6, tzinfo=timezone.utc).timestamp()


def test_cpu_between_interpolates_the_cumulative_samples() -> None:
    samples = [(0.0, 1.0), (1.0, 1.0), (2.0, 1.5), (3.0, 1.5)]
    assert bench_many.cpu_between(samples, 1.0, 2.0) == pytest.approx(0.5)
    assert bench_many.cpu_between(samples, 1.5, 2.5) == pytest.approx(0.25)
    assert bench_many.cpu_between(samples, -5.0, 10.0) == pytest.approx(0.5)
    assert bench_many.cpu_between([], 0.0, 1.0) == 0.0


def test_report_rows_line_up_in_a_table() -> None:
    report = bench_many.Report()
    report.add("a", "1")
    report.add("longer", "2")
    assert report.table() == "a       1\nlonger  2"


def test_arguments_are_bounded() -> None:
    args = bench_many.parse_args(["--containers", "100"])
    assert (args.containers, args.workers, args.resync_interval) == (100, 8, 4.0)
    with pytest.raises(SystemExit):
        bench_many.parse_args(["--containers", "0"])
    with pytest.raises(SystemExit):
        bench_many.parse_args(["--resync-interval", "0.5"])


def test_the_resync_labelgw_keeps_debug_lines_so_periodic_resyncs_are_logged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    quiet = bench_many.labelgw_process(tmp_path, "a", 1, 2, "unix:///x.sock", "docker: true\n")
    loud = bench_many.labelgw_process(tmp_path, "b", 1, 2, "unix:///x.sock", "docker: true\n", debug=True)
    assert "LABELGW_DEBUG" not in quiet.env or quiet.env["LABELGW_DEBUG"] in ("", "0")
    assert loud.env["LABELGW_DEBUG"] == "1"
