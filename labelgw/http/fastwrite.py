"""Write to a TCP transport at once when nothing is queued.

Twisted queues every write until the reactor's next turn: an epoll modify, a writable event and a doWrite per
write, twice per proxied request. When the transport's queue is empty the bytes can go out now through the
transport's own writeSomeData (which keeps Twisted's error handling); whatever the kernel does not take, and
every other case, goes through the ordinary write. Any other transport (TLS, memory) just uses write.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_DIRECT = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    if (
        type(transport) in _DIRECT
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
