#!/usr/bin/env python3
"""Where labelgw's CPU goes under h2load over TLS: a sampling profile (py-spy) of the real twistd process.

Starts bench_tls.py's backend and labelgw (from this tree), then per load runs h2load for `--duration` seconds
while `py-spy record --format raw` samples labelgw, and prints each load's samples grouped by where they were
spent: the h2/hpack/hyperframe libraries, TLS (pyOpenSSL, cffi, Twisted's TLS layer), the reactor (Twisted's
epoll loop and TCP), labelgw itself, and the rest.

    .venv/bin/pip install py-spy   # a tool, not a dependency of labelgw
    .venv/bin/python bench/profile_tls.py [--duration 8] [--loads h1,h2,h2m1] [--top 25]
    .venv/bin/python bench/profile_tls.py --loads hs13,hs12     # new handshakes (openssl s_time -new)

Loopback only; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_proxy import free_port, nginx_backend, wait_ready  # noqa: E402
from bench_tls import TLS12_BENCH_CIPHER, h2load_argv, https_ready, labelgw_tls, mint_bench_certificate  # noqa: E402

LOADS = {"h1": (True, 50, 1), "h2": (False, 10, 10), "h2m1": (False, 50, 1)}
# New handshakes: two `openssl s_time -new` clients (as bench_tls.py runs them), TLS 1.3 or TLS 1.2.
HANDSHAKE_LOADS = {"hs13": False, "hs12": True}
# (label, substrings of a frame's file): the first that matches a sample's innermost Python frame names it.
# py-spy names files relative to their sys.path entry: "(h2/stream.py:134)".
GROUPS = (
    ("h2 library", ("(h2/", "(hpack/", "(hyperframe/")),
    ("TLS (ssl module, labelgw.tls)", ("(ssl.py", "(labelgw/tls/")),
    ("TLS (pyOpenSSL, cffi, twisted.protocols.tls)", ("(OpenSSL/", "(cffi/", "(twisted/protocols/tls.py")),
    ("socket sends (labelgw.http.fastwrite: kernel time)", ("(labelgw/http/fastwrite.py",)),
    ("access log thread", ("(labelgw/http/accesslog.py",)),
    ("labelgw", ("(labelgw/",)),
    ("reactor (twisted.internet, epoll, socket calls)", ("(twisted/internet/", "(twisted/python/")),
)


def group_of(frame: str) -> str:
    for label, parts in GROUPS:
        if any(part in frame for part in parts):
            return label
    return "other"


def summarize(raw: Path, top: int) -> None:
    by_group: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # Innermost Python frame: its own time. py-spy writes "function (file:line)".
        leaf = frames[-1]
        by_group[group_of(leaf)] += count
        by_function[leaf.rsplit(":", 1)[0]] += count
        total += count
    if not total:
        print("  no samples")
        return
    for label, count in by_group.most_common():
        print(f"  {label:<46} {count / total * 100:5.1f} %")
    print(f"  top functions by own samples ({total} samples):")
    for name, count in by_function.most_common(top):
        print(f"    {count / total * 100:5.1f} %  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--loads", default="h1,h2,h2m1")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("missing py-spy: .venv/bin/pip install py-spy")
    prefix = Path(tempfile.mkdtemp(prefix="labelgw-profile-tls-"))
    prefix.chmod(0o755)
    state, certs = prefix / "state", prefix / "certs"
    _, _, der = mint_bench_certificate(state, certs, prefix)
    backend_port, http_port, https_port = free_port(), free_port(), free_port()
    backend = nginx_backend(prefix, backend_port)
    server = labelgw_tls(prefix, http_port, https_port, backend_port, state, certs)
    started = []
    try:
        backend.start()
        started.append(backend)
        problem = wait_ready(backend, backend_port)
        if problem:
            raise SystemExit(f"backend: {problem}")
        server.start()
        started.append(server)
        problem = https_ready(server, https_port, state / "ca.pem", der)
        if problem:
            raise SystemExit(f"labelgw: {problem}\n{server.log_tail()}")
        assert server.process is not None
        for load in [item.strip() for item in args.loads.split(",") if item.strip()]:
            raw = prefix / f"{load}.txt"
            if load in HANDSHAKE_LOADS:
                argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{https_port}", "-new", "-time",
                        str(args.duration + 2)]
                if HANDSHAKE_LOADS[load]:
                    argv += ["-tls1_2", "-cipher", TLS12_BENCH_CIPHER]
                clients = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT) for _ in range(2)]
                title = f"{load} (2 openssl s_time -new, TLS {'1.2' if HANDSHAKE_LOADS[load] else '1.3'})"
            else:
                h1, connections, streams = LOADS[load]
                clients = [subprocess.Popen(
                    h2load_argv(https_port, args.duration + 2, 1, connections, streams, h1),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )]
                title = f"{load} ({'HTTP/1.1' if h1 else 'HTTP/2'} -c{connections} -m{streams})"
            try:
                subprocess.run(
                    [spy, "record", "--pid", str(server.process.pid), "--duration", str(args.duration), "--rate", "250",
                     "--format", "raw", "--output", str(raw), "--nonblocking"],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.duration + 60,
                )
            finally:
                for client in clients:
                    client.kill()
                    client.wait()
            print(f"{title}, own samples by place:")
            summarize(raw, args.top)
    finally:
        for managed in reversed(started):
            managed.stop()
        shutil.rmtree(prefix, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
