"""labelgw.tls.stdtls: how records read after the handshake reach the protocol behind.

dataReceived hands one whole record straight to the protocol behind (the steady state of keep-alive HTTPS) and
leaves everything else to the general delivery loop: part of a record, several records, a close_notify with or
after data, a record that does not decrypt, a protocol that pauses. Each of those is driven here byte for byte
against a standard-library client over memory BIOs.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from labelgw.tls.stdtls import StdTLSFactory
from test_tls_deadlines import HEAD_TIMEOUT, Client, OneCertificate


@pytest.fixture
def clock() -> MemoryReactorClock:
    clock = MemoryReactorClock()
    clock.advance(1_000_000)
    return clock


class Calls(Protocol):
    """Keeps each dataReceived call; pauses the transport on "pause"; answers "echo:<x>" with x."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)
        if data == b"pause":
            self.transport.pauseProducing()
        if data.startswith(b"echo:"):
            self.transport.write(data[5:])


def connected(clock: MemoryReactorClock) -> tuple[Client, Calls]:
    factory = StdTLSFactory(OneCertificate(), Factory.forProtocol(Calls), clock=clock, handshake_timeout=HEAD_TIMEOUT)
    client = Client(factory, clock)
    client.handshake()
    client.wire.clear()
    return client, client.server.wrappedProtocol


def records(client: Client, *plaintexts: bytes) -> bytes:
    """The client's records for each plaintext, as they would leave it (one write, one record each)."""
    for plaintext in plaintexts:
        client.tls.write(plaintext)
    return client.outgoing.read()


def answer(client: Client) -> bytes:
    client.incoming.write(client.wire.value())
    client.wire.clear()
    out = b""
    while True:
        try:
            data = client.tls.read(65536)
        except ssl.SSLWantReadError:
            return out
        if not data:
            return out
        out += data


def test_one_record_per_read_is_one_call_and_its_answer_leaves_at_once(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    for n in range(3):
        client.server.dataReceived(records(client, b"echo:%d" % n))
        assert answer(client) == b"%d" % n
    assert protocol.calls == [b"echo:0", b"echo:1", b"echo:2"]


def test_a_record_split_over_reads_is_handed_over_once_whole(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    wire = records(client, b"echo:split")
    for at in range(len(wire)):
        client.server.dataReceived(wire[at : at + 1])
        if at < len(wire) - 1:
            assert protocol.calls == []
    assert protocol.calls == [b"echo:split"]
    assert answer(client) == b"split"


def test_several_records_in_one_read_are_one_call(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    client.server.dataReceived(records(client, b"a", b"b", b"c"))
    assert protocol.calls == [b"abc"]


def test_a_whole_record_followed_by_part_of_the_next(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    wire = records(client, b"first", b"second")
    first_end = 5 + int.from_bytes(wire[3:5], "big")
    client.server.dataReceived(wire[: first_end + 3])
    assert protocol.calls == [b"first"]
    client.server.dataReceived(wire[first_end + 3 :])
    assert protocol.calls == [b"first", b"second"]


def test_data_and_close_notify_in_one_read_deliver_then_close(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    client.tls.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()
    client.server.dataReceived(client.outgoing.read())
    assert protocol.calls == [b"last words"]
    # The server's close_notify answers, and TCP closes.
    client.incoming.write(client.wire.value())
    client.tls.unwrap()
    assert client.wire.closed and not client.wire.aborted


def test_close_notify_alone_after_requests_is_answered(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    client.server.dataReceived(records(client, b"echo:x"))
    assert answer(client) == b"x"
    client.answer_close_notify()
    assert client.close_notify and client.wire.closed and not client.wire.aborted
    assert protocol.calls == [b"echo:x"]


def test_a_record_that_does_not_decrypt_is_refused_and_aborted(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    wire = bytearray(records(client, b"tampered"))
    wire[-1] ^= 0x01  # the AEAD tag
    client.server.dataReceived(bytes(wire))
    assert protocol.calls == []
    assert client.wire.aborted
    assert client.server.factory.refusals == 1
    # The alert went out before the abort.
    client.incoming.write(client.wire.value())
    with pytest.raises(ssl.SSLError):
        client.tls.read(100)


def test_records_that_arrive_while_paused_wait_for_the_resume(clock: MemoryReactorClock) -> None:
    client, protocol = connected(clock)
    client.server.dataReceived(records(client, b"pause"))
    client.server.dataReceived(records(client, b"one"))
    client.server.dataReceived(records(client, b"two"))
    assert protocol.calls == [b"pause"]
    client.server.resumeProducing()
    assert protocol.calls == [b"pause", b"onetwo"]
    # Back to one record per read.
    client.server.dataReceived(records(client, b"three"))
    assert protocol.calls == [b"pause", b"onetwo", b"three"]


def test_the_state_read_per_record_is_the_instances_own(clock: MemoryReactorClock) -> None:
    # Read per record: a class default would cost a dictionary miss and a class lookup each time.
    client, _ = connected(clock)
    own: dict[str, Any] = vars(client.server)
    for name in ("_handshake_done", "_delivering", "_reading_paused", "_closing", "_lost", "disconnecting",
                 "_batch", "_held", "_ticket_due", "_hello"):
        assert name in own, name
