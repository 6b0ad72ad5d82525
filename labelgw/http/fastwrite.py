"""Write to a TCP transport at once when nothing is queued.

Twisted queues every write until the reactor's next turn: an epoll modify, a writable event and a doWrite per
write, twice per proxied request. When the transport's queue is empty the bytes can go out now with one send on the transport's socket; whatever the kernel does not take, any
error, and every other case go through the ordinary write, which keeps Twisted's error handling. Any other transport (TLS, memory) just uses write.

`own_defaults` copies the class-level defaults of the transport state these fast paths read (the write queue, the
closing flags, the read size) onto a TCP transport: equal values, so nothing changes for Twisted, which assigns
them on the instance anyway once they change. CPython 3.11 reads an attribute that only the class holds through
its generic lookup (the type's attributes, then a miss in the instance dictionary): about 300 instructions against
about 60 for one the instance holds, and write_now reads four of them per write (bench/reactor_cost.py). labelgw's
TCP listener (labelgw.cli.accept) and its reactor (labelgw.cli.reactor, for the transports it is handed to read)
call it once per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_SERVER = tcp.Server
_CLIENT = tcp.Client
# Larger writes go through the transport (which sends at most this much per call anyway).
_SEND_LIMIT = tcp.Connection.SEND_LIMIT
# The class-level state write_now and the reactor's read step read on every call, with Twisted's own values.
DEFAULTS = {
    name: getattr(tcp.Connection, name)
    for name in ("dataBuffer", "offset", "disconnecting", "_writeDisconnected", "bufferSize")
}


def own_defaults(transport: Any) -> None:
    """Give a TCP transport its own copy of each default in DEFAULTS it has not set yet (same values)."""
    state = transport.__dict__
    for name, value in DEFAULTS.items():
        if name not in state:
            state[name] = value


def write_now(transport: Any, data: bytes) -> None:
    # Nothing queued is an empty list of pending writes and an empty buffer (Twisted empties the buffer once all of
    # it went out, so one sent in full is empty, never a non-empty one with its offset at the end). The same test
    # twice, once per transport type: CPython specialises each attribute read for the one type it sees there, and a
    # client's and an upstream's transport written at one place would miss that cache at nearly every write.
    kind = type(transport)
    if kind is _SERVER:
        if (
            not transport._tempDataBuffer
            and not transport.dataBuffer
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and len(data) <= _SEND_LIMIT
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:
                # EAGAIN, EINTR or a real error: the ordinary path below retries it or reports the connection lost.
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
    elif kind is _CLIENT:
        if (
            not transport._tempDataBuffer
            and not transport.dataBuffer
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and len(data) <= _SEND_LIMIT
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
    transport.write(data)
