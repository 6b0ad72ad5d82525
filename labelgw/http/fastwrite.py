"""Write to a TCP transport at once when nothing is queued.

Twisted queues every write until the reactor's next turn: an epoll modify, a writable event and a doWrite per
write, twice per proxied request. When the transport's queue is empty the bytes can go out now with one send on the transport's socket; whatever the kernel does not take, any
error, and every other case go through the ordinary write, which keeps Twisted's error handling. Any other transport (TLS, memory) just uses write.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_DIRECT = (tcp.Server, tcp.Client)
# Larger writes go through the transport (which sends at most this much per call anyway).
_SEND_LIMIT = tcp.Connection.SEND_LIMIT


def write_now(transport: Any, data: bytes) -> None:
    if (
        type(transport) in _DIRECT
        and len(data) <= _SEND_LIMIT
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
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
    transport.write(data)
