# -*- test-case-name: tests.test_workers_protocol -*-
"""The channel between the supervisor and a worker: length-prefixed frames, each one pickled message (a tuple whose
first item names it). Sans-io: L{FrameDecoder} turns bytes into messages, L{encode} a message into bytes; the
process plumbing (pipes, spawnProcess) lives in the supervisor and the worker.

Both ends are the same program started by the same user on one host, so pickle is a fair codec here: the specs
are frozen dataclasses, including compiled regular expressions of the rewrite middlewares. A worker started from
newer code reads the supervisor's specs, which must keep their fields: a change of the spec's fields needs a full
restart of labelgw (not a reload).

Supervisor to worker (fd 0 of the worker):
- ``("state", seq, specs, health, ejections, share)``: everything at start: the container outcomes by id, the health
  state of each backend ``(service, key, state)``, the ejections in force ``(service, key, seconds left)``, and
  the worker's share of the gateway-wide limits (1/N);
- ``("op", seq, name, args)``: one call of the registry's sink interface (``apply``, ``mark_down``, ``remove``,
  ``resync``) as the Docker watcher (or a config reload) made it in the supervisor;
- ``("health", seq, service, key, state)``: the supervisor's active health check changed a backend's state;
- ``("eject", seq, service, key, seconds)``: another worker ejected a backend (outlier detection);
- ``("limits", seq, service, rate, burst, inflight, pending)``: this worker's part of a service's rate limit and
  concurrency limit (None: that limit unchanged), rebalanced by the supervisor from the workers' demand;
- ``("acme-state", ...)`` (before ``state``), ``("acme-cert", ...)``, ``("acme-alpn", ...)``, ``("acme-http01", ...)``:
  the ACME certificates and pending challenge answers of the supervisor's manager (labelgw.workers.certs);
- ``("windows_wanted", seq)``: right after the state, this supervisor reads canary window reports (a worker of
  newer code under a supervisor of older code, as after a reload, sends none);
- ``("canary", seq, service, version, reason)``: the supervisor's canary analysis cut that version (reason: why)
  or lifted its cut (None) (labelgw.workers.canary); a new worker gets the cuts in force right after its state;
- ``("stop",)``: stop accepting, finish the requests in flight (up to the drain grace) and exit.

Worker to supervisor (fd 3 of the worker), built-in values only (the supervisor refuses any class: a worker parses
hostile traffic, the supervisor must not run code a worker sends):
- ``("ready", pid)``: listening (the inherited sockets adopted) with the state applied;
- ``("ack", seq, applied)``: a change applied, at `applied` (time.monotonic(), one clock for the host): the
  supervisor measures the push latency to it (an ack without it: to its arrival);
- ``("report", exposition, backends, demand)``: the worker's /metrics exposition (text), per-backend counters
  ``{key: (in_flight, requests, errors, ejections, consecutive_failures)}`` and, per service with a rate or
  concurrency limit, the requests it saw since the last report; sent every REPORT_INTERVAL;
- ``("ejected", service, key, seconds)``: this worker ejected a backend;
- ``("acme-on-demand", name)``: a handshake asked for a name under a public wildcard route that has no ACME
  certificate (labelgw.workers.certs);
- ``("windows", deltas)``: per (service, version), the requests that ended since the last one, their errors and
  their latency histogram ``{(service, version): (requests, errors, {bucket: count})}``, every CANARY_INTERVAL
  (labelgw.workers.canary), only when something ended.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

# A frame's length, big-endian; a frame above MAX_FRAME is a protocol error (a resync of thousands of containers
# is a few MB at most).
_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
# Seconds between two reports of a worker's counters.
REPORT_INTERVAL = 1.0

Message = tuple[Any, ...]


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class _PlainUnpickler(pickle.Unpickler):
    """Only what pickle writes natively (tuples, lists, dicts, str, bytes, numbers, None, booleans): no class is
    looked up, so no code runs. What the supervisor reads from a worker, a process that parses hostile traffic."""

    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"a worker may not send {module}.{name}")


def _plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


class FrameDecoder:
    """Bytes in (in pieces of any size), messages out. C{plain}: only built-in values (L{_PlainUnpickler})."""

    def __init__(self, max_frame: int = MAX_FRAME, plain: bool = False) -> None:
        self._buffer = bytearray()
        self._max = max_frame
        self._loads = _plain_loads if plain else pickle.loads

    def feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        offset = 0
        size = _HEADER.size
        while len(buffer) - offset >= size:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes (at most {self._max})")
            end = offset + size + length
            if end > len(buffer):
                break
            message = self._loads(bytes(buffer[offset + size : end]))
            if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
                raise ProtocolError(f"not a message: {type(message).__name__}")
            messages.append(message)
            offset = end
        del buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buffer)
