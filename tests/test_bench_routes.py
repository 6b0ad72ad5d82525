"""bench/bench_routes.py: the same Python calls per proxied request with 1 route and with many."""

from __future__ import annotations

from support.benchscripts import load_bench_script

bench_routes = load_bench_script("bench_routes")


def test_calls_per_request_do_not_depend_on_the_number_of_routes() -> None:
    one = bench_routes.calls_per_request(1, 20)
    assert one > 20
    assert bench_routes.calls_per_request(60, 20) == one
