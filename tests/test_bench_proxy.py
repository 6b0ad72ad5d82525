"""bench/bench_proxy.py's pure parts: reading wrk's output, and the CPU time of a server's session."""

from __future__ import annotations

import math
import subprocess
import sys

from support.benchscripts import load_bench_script

bench_proxy = load_bench_script("bench_proxy")

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:40001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.42ms  380.12us   9.01ms   80.00%
    Req/Sec    35.27k     1.10k   37.00k    70.00%
  Latency Distribution
     50%    1.31ms
     75%    1.52ms
     90%    1.80ms
     99%    2.90ms
  352650 requests in 10.00s, 52.13MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  35265.13
Transfer/sec:      5.21MB
"""


def test_wrk_output_gives_rate_percentiles_and_errors() -> None:
    result = bench_proxy.parse_wrk(WRK_OUTPUT)
    assert (result.requests_per_s, result.p50_ms, result.p99_ms, result.requests) == (35265.13, 1.31, 2.90, 352650)
    assert (result.socket_errors, result.timeouts, result.non_2xx_3xx, result.errors) == (3, 1, 4, 7)
    assert math.isnan(result.cpu_us_per_request)


SPINNER = """
import sys, time
deadline = time.process_time() + 0.3
while time.process_time() < deadline:
    pass
print("spun", flush=True)
sys.stdin.read()  # until the test closes it
"""


def test_session_cpu_counts_the_work_of_the_processes_in_the_session() -> None:
    # A child in a session of its own, so other work in the test's session does not count.
    child = subprocess.Popen(
        [sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        spent = bench_proxy.session_cpu_s(child.pid)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    # 0.3 s spinning, plus the interpreter's start-up.
    assert 0.28 <= spent < 2.0
    assert bench_proxy.session_cpu_s(2**22 + 12345) == 0.0  # no such session
