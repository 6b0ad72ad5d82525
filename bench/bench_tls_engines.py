#!/usr/bin/env python3
"""The TLS engines alone: a minimal keep-alive HTTP responder behind each engine's listener factory, loaded by wrk.

Isolates what the TLS layer costs per request (no proxy, no backend): the server runs in a child process per
engine, and its CPU time (user + system, from /proc) per request is reported next to req/s. The CPU per request is
the figure to compare on a shared machine; req/s only indicates.

    .venv/bin/python bench/bench_tls_engines.py [--duration 5] [--connections 32] [--engines stdlib,openssl,plain]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SERVER = r'''
import sys
sys.path.insert(0, sys.argv[3])
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from labelgw.tls.ca import LocalCA
from labelgw.tls.material import CertificateMaterial
from labelgw.tls.policy import INTERMEDIATE, build_server_context
from labelgw.tls.stdtls import factory_for_engine
from OpenSSL import SSL

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nhello\n"

class Responder(Protocol):
    buffer = b""
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
    def dataReceived(self, data):
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")
        if count:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(RESPONSE * count)

ca = LocalCA.load_or_create(__import__("pathlib").Path(sys.argv[2]))
leaf = ca.issue_leaf(("localhost",), __import__("datetime").datetime.now(__import__("datetime").UTC))

from zope.interface import implementer
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

@implementer(IOpenSSLServerConnectionCreator)
class One:
    policy = INTERMEDIATE
    def __init__(self):
        self.material = CertificateMaterial(leaf.certificate, leaf.private_key)
        self.context = build_server_context(INTERMEDIATE, leaf.certificate, leaf.private_key)
    def choose(self, name):
        return self
    def serverConnectionForTLS(self, protocol):
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        return connection

engine = sys.argv[1]
app = Factory.forProtocol(Responder)
factory = app if engine == "plain" else factory_for_engine(engine, One(), app, reactor, 10.0)
port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
print(port.getHost().port, flush=True)
reactor.run()
'''


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s_time(port: int, duration: int, tls12: bool) -> int:
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(duration)]
    argv += ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"] if tls12 else ["-tls1_3"]
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return int(re.search(r"(\d+) connections in", out).group(1))  # type: ignore[union-attr]


def run_handshakes(engine: str, duration: int, state: Path, tls12: bool) -> tuple[float, float]:
    server = subprocess.Popen([sys.executable, "-c", SERVER, engine, str(state), str(REPO)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        s_time(port, 1, tls12)
        before = cpu_s(server.pid)
        count = s_time(port, duration, tls12)
        used = cpu_s(server.pid) - before
        return count / duration, used / count * 1e6
    finally:
        server.terminate()
        server.wait()


def run(engine: str, duration: int, connections: int, state: Path) -> tuple[float, float]:
    server = subprocess.Popen([sys.executable, "-c", SERVER, engine, str(state), str(REPO)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        scheme = "http" if engine == "plain" else "https"
        url = f"{scheme}://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", url], capture_output=True, check=True)
        before = cpu_s(server.pid)
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url], capture_output=True,
                             text=True, check=True).stdout
        used = cpu_s(server.pid) - before
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        return requests / duration, used / requests * 1e6
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--engines", default="stdlib,openssl,plain")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--handshakes", choices=("tls13", "tls12"), help="new handshakes (s_time -new) instead of wrk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        results: dict[str, list[tuple[float, float]]] = {}
        for round_index in range(args.rounds):
            engines = args.engines.split(",")
            for engine in engines if round_index % 2 == 0 else reversed(engines):
                if args.handshakes:
                    if engine == "plain":
                        continue
                    result = run_handshakes(engine, args.duration, Path(state), args.handshakes == "tls12")
                else:
                    result = run(engine, args.duration, args.connections, Path(state))
                results.setdefault(engine, []).append(result)
                rate, cpu = result
                unit = "hs" if args.handshakes else "req"
                print(f"round {round_index + 1} {engine:<8} {rate:9.0f} {unit}/s {cpu:7.1f} cpu us/{unit}", flush=True)
    unit = "hs" if args.handshakes else "req"
    what = f"openssl s_time -new ({args.handshakes})" if args.handshakes else f"wrk -t1 -c{args.connections}"
    print(f"\n{what} -d{args.duration}s, a minimal keep-alive responder; medians")
    for engine, values in results.items():
        rates = sorted(v[0] for v in values)
        cpus = sorted(v[1] for v in values)
        print(f"{engine:<8} {rates[len(rates) // 2]:9.0f} {unit}/s {cpus[len(cpus) // 2]:7.1f} cpu us/{unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
