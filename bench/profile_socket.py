#!/usr/bin/env python3
"""Where labelgw's reactor thread spends its Python calls under real socket load: bench_proxy.py's `labelgw` target
(or `--bare`: metrics off, access log off) profiled with cProfile during one wrk run.

    .venv/bin/python bench/profile_socket.py [--bare] [--duration 5] [--connections 50] [--top 50] [--out FILE]

labelgw runs from this tree with a SIGUSR2 handler that starts cProfile on the reactor thread; a second SIGUSR2
stops it and writes the stats. The warm-up is not profiled. Calls per request are counted over the requests wrk
reports; profiling slows labelgw several times, so its req/s here mean nothing. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_proxy import (  # noqa: E402
    TWISTD_LOGGING_ORIGIN,
    free_port,
    labelgw,
    labelgw_bare,
    nginx_backend,
    run_wrk,
    wait_ready,
)

PROFILER = """
import cProfile, os, signal
_profile = [None]
def _toggle(signum, frame):
    if _profile[0] is None:
        _profile[0] = cProfile.Profile()
        _profile[0].enable()
    else:
        _profile[0].disable()
        _profile[0].dump_stats(os.environ["LABELGW_PROFILE_OUT"])
        _profile[0] = None
signal.signal(signal.SIGUSR2, _toggle)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--sort", default="calls", choices=("calls", "tottime", "cumulative"))
    parser.add_argument("--out", default=None, help="keep the raw stats in this file")
    args = parser.parse_args(argv)
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-profile-"))
    prefix.chmod(0o755)
    out = Path(args.out) if args.out else prefix / "stats"
    backend_port, port = free_port(), free_port()
    backend = nginx_backend(prefix, backend_port)
    server = (labelgw_bare if args.bare else labelgw)(prefix, port, backend_port)
    server.argv[server.argv.index(TWISTD_LOGGING_ORIGIN)] = PROFILER + TWISTD_LOGGING_ORIGIN
    server.env = dict(server.env or os.environ, LABELGW_PROFILE_OUT=str(out))
    try:
        backend.start()
        if wait_ready(backend, backend_port):
            raise SystemExit("backend did not start")
        server.start()
        problem = wait_ready(server, port)
        if problem:
            raise SystemExit(f"labelgw {problem}:\n{server.log_tail()}")
        run_wrk(port, 1, args.connections, 1)
        assert server.process is not None
        server.process.send_signal(signal.SIGUSR2)
        result = run_wrk(port, args.duration, args.connections, 1)
        server.process.send_signal(signal.SIGUSR2)
        for _ in range(100):
            if out.exists() and out.stat().st_size:
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        server.stop()
        backend.stop()
    stats = pstats.Stats(str(out))
    raw = stats.stats  # type: ignore[attr-defined]
    requests = result.requests
    total = sum(calls for (_f, _l, _n), (_p, calls, _o, _c, _callers) in raw.items())
    own_total = sum(own for (_f, _l, _n), (_p, _calls, own, _c, _callers) in raw.items())
    print(f"{requests} requests profiled; {total / requests:.1f} Python calls per request, "
          f"{own_total / requests * 1e6:.1f} us profiled time per request ({'bare' if args.bare else 'default'})")
    key = {"calls": 1, "tottime": 2, "cumulative": 3}[args.sort]
    rows = sorted(raw.items(), key=lambda item: -item[1][key])[: args.top]
    for (filename, line, name), (_p, calls, own, cumulative, _callers) in rows:
        print(f"  {calls / requests:6.2f} calls  {own / requests * 1e6:6.2f} us own  {cumulative / requests * 1e6:7.2f} cum"
              f"  {Path(filename).name}:{line}({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
