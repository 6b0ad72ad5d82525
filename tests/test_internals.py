"""The private internals of Twisted and h2 that labelgw relies on: present, shaped and behaving as it assumes.

Each set lives in one labelgw module:

- labelgw/cli/reactor.py: EPollReactor's poll step, which LeanEPollReactor re-implements;
- labelgw/http/fastwrite.py: a TCP transport's write queue and socket;
- labelgw/http/h2.py: parts of h2's H2Connection and H2Stream that are not its documented API (the HPACK
  coder attributes, the send buffer, the state machines and windows its own response framing moves);
- labelgw/tls/deadlines.py: TLSMemoryBIOProtocol's handshake flag, the class its factory builds;
- labelgw/cli/listeners.py: StreamServerEndpointService's synchronous start errors;
- labelgw/tls/stdtls.py: CPython's C{SSLContext._wrap_bio} and C{SSLObject._sslobj} (the C object under SSLObject).

When a new Twisted or h2 release fails one of these, read the named labelgw module against the new release
before widening the version bounds in setup.cfg (which this module also checks).
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import inspect
import re
import select
import socket
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import h2
import pytest
import twisted
from packaging.requirements import Requirement
from packaging.version import Version
from twisted.internet.protocol import Factory, Protocol

from support.handpair import connect_by_hand

REPO = Path(__file__).resolve().parent.parent
# The release lines these checks were last verified on. A new major line: run this module, read what failed.
VERIFIED_TWISTED = "26"
VERIFIED_H2 = "4"
HAS_EPOLL = hasattr(select, "epoll")


def fingerprint(function: Callable[..., Any]) -> str:
    """The code of C{function} without its docstring and comments, hashed: changes when its logic changes."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    assert isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef))
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        definition.body = body[1:]
    return hashlib.sha256(ast.unparse(definition).encode()).hexdigest()[:16]


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


# --- versions ----------------------------------------------------------------------------------------------


def twisted_requirement() -> Requirement:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in parser["options"]["install_requires"].splitlines()]
    [requirement] = [Requirement(line) for line in lines if line.lower().startswith("twisted")]
    return requirement


def test_setup_cfg_bounds_twisted_to_the_verified_release_line() -> None:
    requirement = twisted_requirement()
    assert {"tls", "http2"} <= requirement.extras
    upper = [spec for spec in requirement.specifier if spec.operator == "<"]
    assert upper, "setup.cfg: Twisted needs an upper bound: labelgw uses its internals (see this module)"
    assert Version(upper[0].version) == Version(str(int(VERIFIED_TWISTED) + 1)), (
        "setup.cfg's upper bound on Twisted must be the release line after the one verified here"
    )


def test_the_installed_twisted_is_within_the_bounds_and_on_the_verified_line() -> None:
    installed = Version(twisted.__version__)
    assert installed in twisted_requirement().specifier
    assert str(installed.major) == VERIFIED_TWISTED, (
        f"Twisted {installed}: these checks were verified on {VERIFIED_TWISTED}.x; if they pass, update "
        "VERIFIED_TWISTED and the bound in setup.cfg"
    )


def test_the_installed_h2_is_on_the_verified_line() -> None:
    assert str(Version(h2.__version__).major) == VERIFIED_H2, (
        f"h2 {h2.__version__}: labelgw/http/h2.py's use of h2 internals was verified on {VERIFIED_H2}.x"
    )


# --- labelgw/cli/reactor.py: EPollReactor's poll step ----------------------------------------------------------

epoll_only = pytest.mark.skipif(not HAS_EPOLL, reason="epoll is Linux only")


@epoll_only
def test_the_stock_poll_step_is_the_one_lean_epoll_reactor_re_implements() -> None:
    from twisted.internet.epollreactor import EPollReactor

    # LeanEPollReactor.doPoll is this method less log.callWithLogger, with _doReadOrWrite's read path inlined.
    # A change in either: compare labelgw/cli/reactor.py with the new code, then update the fingerprint.
    assert fingerprint(EPollReactor.doPoll) == "63d8cd39bc3446b4", "EPollReactor.doPoll changed"
    assert fingerprint(EPollReactor._doReadOrWrite) == "1c2b886057898f07", "_doReadOrWrite changed"
    assert EPollReactor.doIteration is EPollReactor.doPoll
    assert parameters(EPollReactor.doPoll) == ["self", "timeout"]
    assert parameters(EPollReactor._doReadOrWrite) == ["self", "selectable", "fd", "event"]
    assert parameters(EPollReactor._disconnectSelectable)[:4] == ["self", "selectable", "why", "isRead"]
    assert EPollReactor._POLL_IN == select.EPOLLIN
    # LeanEPollReactor.addReader gives a TCP transport its own defaults, then calls this one.
    assert parameters(EPollReactor.addReader) == ["self", "reader"]


@epoll_only
def test_the_main_loop_lean_epoll_reactor_writes_out_is_the_one_it_was_written_from() -> None:
    from twisted.internet import base
    from twisted.logger import Logger

    # LeanEPollReactor.mainLoop runs runUntilCurrent and timeout only when runUntilCurrent has something to do: a
    # thread call, a new timed call, a due one (the heap's first), a stop, more than 50 cancelled calls. A change
    # in any of these three: compare labelgw/cli/reactor.py with the new code, then update the fingerprints.
    assert fingerprint(base.ReactorBase.mainLoop) == "5e3b6f721dae0aaf", "ReactorBase.mainLoop changed"
    assert fingerprint(base.ReactorBase.runUntilCurrent) == "668ea793c19c2d0b", "runUntilCurrent changed"
    assert fingerprint(base.ReactorBase.timeout) == "103467ec5fc9f854", "ReactorBase.timeout changed"
    assert callable(base._topHandler.__exit__) and isinstance(base._log, Logger)
    from labelgw.cli.reactor import LeanEPollReactor

    reactor = LeanEPollReactor()
    reactor._poller.close()
    reactor.waker.connectionLost(None)
    for name in ("_started", "_pendingTimedCalls", "_newTimedCalls", "_justStopped", "_cancellations"):
        assert hasattr(reactor, name), name
    assert isinstance(reactor.threadCallQueue, list)


class Selectable:
    """A socket end registered with the reactor: what its dispatch calls."""

    def __init__(self, sock: socket.socket, read_result: Any = None) -> None:
        self.sock = sock
        self.read_result = read_result
        self.reads = 0
        self.writes = 0
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "test"

    def doRead(self) -> Any:
        self.reads += 1
        self.sock.recv(4096)
        return self.read_result

    def doWrite(self) -> None:
        self.writes += 1

    def readConnectionLost(self, reason: Any) -> None:
        self.lost.append(reason)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


@pytest.fixture
def lean() -> Iterator[Any]:
    if not HAS_EPOLL:
        pytest.skip("epoll is Linux only")
    from labelgw.cli.reactor import LeanEPollReactor

    reactor = LeanEPollReactor()
    yield reactor
    for selectable in list(reactor._selectables.values()):
        if selectable is not reactor.waker:
            reactor.removeReader(selectable)
            reactor.removeWriter(selectable)
    reactor._poller.close()
    reactor.waker.connectionLost(None)


def test_the_lean_reactor_reads_writes_and_disconnects_with_real_sockets(lean: Any) -> None:
    from twisted.internet.error import ConnectionDone

    here, there = socket.socketpair()
    with here, there:
        reader = Selectable(here)
        lean.addReader(reader)
        assert lean._selectables[here.fileno()] is reader
        there.send(b"x")
        # A socket with data to read and nothing else is exactly _POLL_IN: the fast path's test.
        assert [event for fd, event in lean._poller.poll(1, 8) if fd == here.fileno()] == [lean._POLL_IN]
        lean.doIteration(1)
        assert reader.reads == 1 and not reader.lost
        # A writable socket goes the stock way (_doReadOrWrite).
        lean.removeReader(reader)
        writer = Selectable(here)
        lean.addWriter(writer)
        lean.doIteration(1)
        assert writer.writes == 1
        lean.removeWriter(writer)
        # doRead returning a reason disconnects the selectable, as the stock reactor does.
        closing = Selectable(here, read_result=ConnectionDone())
        lean.addReader(closing)
        there.send(b"y")
        lean.doIteration(1)
        assert len(closing.lost) == 1 and closing.lost[0].check(ConnectionDone)
        assert here.fileno() not in lean._selectables


# --- labelgw/http/fastwrite.py: a TCP transport's write queue ----------------------------------------------


class Keep(Protocol):
    def __init__(self, kept: list[Any]) -> None:
        self.kept = kept
        self.received = b""

    def connectionMade(self) -> None:
        self.kept.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest.fixture
def tcp_pair() -> Iterator[tuple[Any, Keep, Keep]]:
    """A real loopback TCP connection on a reactor of its own, driven by hand."""
    from twisted.internet.selectreactor import SelectReactor

    reactor = SelectReactor()
    port, server, client = connect_by_hand(reactor, Keep)
    yield reactor, server, client
    server.transport.abortConnection()
    client.transport.abortConnection()
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0)
    reactor.waker.connectionLost(None)


def queue_is_empty(transport: Any) -> bool:
    """write_now's test for "nothing queued"."""
    return not transport._tempDataBuffer and not transport.dataBuffer


def test_the_write_steps_fastwrite_relies_on_are_the_ones_it_was_written_from() -> None:
    from twisted.internet import abstract

    # write_now takes an empty buffer for "all of it went out": doWrite empties the buffer (b"", offset 0) when
    # it sent the whole of it, and write only appends to the list of pending writes. own_defaults copies class-level
    # defaults onto the instance, which these only ever assign. A change: compare labelgw/http/fastwrite.py.
    assert fingerprint(abstract.FileDescriptor.doWrite) == "59d5e53f857a62d1", "FileDescriptor.doWrite changed"
    assert fingerprint(abstract.FileDescriptor.write) == "6be1610913d28b12", "FileDescriptor.write changed"


def test_own_defaults_copies_twisteds_class_level_values() -> None:
    from twisted.internet import tcp

    from labelgw.http.fastwrite import DEFAULTS, own_defaults

    assert DEFAULTS == {
        "dataBuffer": b"", "offset": 0, "disconnecting": 0, "_writeDisconnected": False, "bufferSize": 65536,
    }
    for name, value in DEFAULTS.items():
        assert getattr(tcp.Server, name) == value and getattr(tcp.Client, name) == value, name
    transport = object.__new__(tcp.Client)
    transport.offset = 7  # state Twisted set is kept
    own_defaults(transport)
    assert vars(transport) == {**DEFAULTS, "offset": 7}


def test_tcp_transports_have_the_write_queue_fastwrite_reads(tcp_pair: tuple[Any, Keep, Keep]) -> None:
    from twisted.internet import tcp

    _, server, client = tcp_pair
    assert type(server.transport) is tcp.Server and type(client.transport) is tcp.Client
    assert isinstance(tcp.Connection.SEND_LIMIT, int) and tcp.Connection.SEND_LIMIT > 0
    transport = server.transport
    assert isinstance(transport._tempDataBuffer, list)
    assert isinstance(transport.dataBuffer, bytes) and isinstance(transport.offset, int)
    assert transport.connected and not transport.disconnecting and not transport._writeDisconnected
    assert callable(transport.socket.send)
    assert queue_is_empty(transport)


def test_a_queued_write_is_seen_as_queued_until_the_reactor_sends_it(tcp_pair: tuple[Any, Keep, Keep]) -> None:
    reactor, server, client = tcp_pair
    server.transport.write(b"queued")
    # Twisted holds writes until the reactor's next turn: write_now must not overtake them.
    assert not queue_is_empty(server.transport)
    for _ in range(100):
        if client.received == b"queued":
            break
        reactor.iterate(0.01)
    assert client.received == b"queued" and queue_is_empty(server.transport)
    assert server.transport.dataBuffer == b"" and server.transport.offset == 0


def test_write_now_sends_at_once_on_an_idle_tcp_transport(tcp_pair: tuple[Any, Keep, Keep]) -> None:
    from labelgw.http.fastwrite import write_now

    reactor, server, client = tcp_pair
    write_now(server.transport, b"direct")
    # Nothing was queued: the bytes are in the kernel already.
    assert queue_is_empty(server.transport)
    for _ in range(100):
        if client.received == b"direct":
            break
        reactor.iterate(0.01)
    assert client.received == b"direct"
    server.transport.loseConnection()
    assert server.transport.disconnecting


def test_write_now_on_both_tcp_transport_types_keeps_the_order_of_queued_writes(
    tcp_pair: tuple[Any, Keep, Keep],
) -> None:
    from labelgw.http.fastwrite import write_now

    reactor, server, client = tcp_pair
    for writer, reader in ((server, client), (client, server)):
        # Sent at once on an idle transport of either type (tcp.Server, tcp.Client: two code paths).
        write_now(writer.transport, b"a")
        assert queue_is_empty(writer.transport)
        # Queued by Twisted: write_now queues behind it instead of overtaking it.
        writer.transport.write(b"b")
        write_now(writer.transport, b"c")
        assert not queue_is_empty(writer.transport)
        for _ in range(100):
            if reader.received.endswith(b"c"):
                break
            reactor.iterate(0.01)
        assert reader.received == b"abc"
    # A closing transport takes the ordinary path too (its bytes still go out before the close).
    server.transport.loseConnection()
    write_now(server.transport, b"d")
    for _ in range(100):
        if client.received.endswith(b"d"):
            break
        reactor.iterate(0.01)
    assert client.received == b"abcd"


# --- labelgw/http/h2.py: h2 beyond its documented API ------------------------------------------------------


def h2_pair() -> tuple[Any, Any]:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    server = H2Connection(
        H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True,
            validate_outbound_headers=False, normalize_outbound_headers=False,
        )
    )
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    return server, client


REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


def test_local_settings_replaced_before_initiate_connection_are_what_the_server_announces() -> None:
    from h2.events import RemoteSettingsChanged
    from h2.settings import SettingCodes, Settings

    server, client = h2_pair()
    server.local_settings = Settings(
        client=False,
        initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 7, SettingCodes.MAX_HEADER_LIST_SIZE: 4096},
    )
    server.initiate_connection()
    client.initiate_connection()
    [changed] = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, RemoteSettingsChanged)]
    assert changed.changed_settings[SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 7
    assert changed.changed_settings[SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 4096


def test_the_decoders_header_list_limit_is_enforced() -> None:
    from h2.exceptions import ProtocolError

    server, client = h2_pair()
    server.initiate_connection()
    client.initiate_connection()
    server.decoder.max_header_list_size = 1000
    client.send_headers(1, [*REQUEST, (b"x-big", b"a" * 2000)], end_stream=True)
    with pytest.raises(ProtocolError):
        server.receive_data(client.data_to_send())


def test_an_unfinished_header_block_waits_in_the_incoming_buffer() -> None:
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    server, client = h2_pair()
    server.initiate_connection()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.send_headers(1, [*REQUEST, (b"x-pad", b"p" * 40)], end_stream=True)
    block = client.data_to_send()
    # Split the block: HEADERS without END_HEADERS, then CONTINUATION frames; h2.py sums what waits.
    from hyperframe.frame import Frame

    frame, length = Frame.parse_frame_header(memoryview(block[:9]))
    frame.parse_body(memoryview(block[9 : 9 + length]))
    assert isinstance(frame, HeadersFrame)
    fragment = frame.data
    headers = HeadersFrame(1, data=fragment[:5], flags={"END_STREAM"})
    middle = ContinuationFrame(1, data=fragment[5:10])
    last = ContinuationFrame(1, data=fragment[10:], flags={"END_HEADERS"})
    server.receive_data(headers.serialize() + middle.serialize())
    waiting = server.incoming_buffer._headers_buffer
    assert sum(len(f.data) for f in waiting) == 10
    events = server.receive_data(last.serialize())
    assert not server.incoming_buffer._headers_buffer
    assert [type(e).__name__ for e in events][:1] == ["RequestReceived"]
    assert server.highest_inbound_stream_id == 1


def test_event_fields_h2_py_reads() -> None:
    from h2.errors import ErrorCodes
    from h2.events import DataReceived, RequestReceived, StreamReset

    server, client = h2_pair()
    server.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]])
    client.send_data(1, b"body")
    events = server.receive_data(client.data_to_send())
    [request] = [e for e in events if isinstance(e, RequestReceived)]
    assert request.stream_ended is None  # a body follows
    [data] = [e for e in events if isinstance(e, DataReceived)]
    assert (data.data, data.flow_controlled_length) == (b"body", 4)
    client.reset_stream(1, ErrorCodes.CANCEL)
    [reset] = [e for e in server.receive_data(client.data_to_send()) if isinstance(e, StreamReset)]
    assert reset.remote_reset and reset.stream_id == 1


def test_the_hpack_encoder_and_decoder_are_attributes_h2_calls() -> None:
    """h2.py puts labelgw.http.hpack's classes in H2Connection.encoder / .decoder: h2 encodes every header block it
    sends with encoder.encode(headers), decodes every block it receives with decoder.decode(block, raw=True), sets
    encoder.header_table_size on the peer's SETTINGS_HEADER_TABLE_SIZE and decoder.max_header_list_size."""
    from h2.events import RequestReceived
    from h2.settings import SettingCodes

    from labelgw.http.hpack import CachingDecoder, Encoder

    calls: list[str] = []

    class SpyEncoder(Encoder):
        def encode(self, headers: Any, huffman: bool = True) -> bytes:
            calls.append("encode")
            return super().encode(headers, huffman)

    class SpyDecoder(CachingDecoder):
        def decode(self, data: bytes, raw: bool = False) -> list[Any]:
            calls.append(f"decode raw={raw}")
            return super().decode(data, raw)

    server, client = h2_pair()
    assert hasattr(server, "encoder") and hasattr(server, "decoder")
    server.encoder = SpyEncoder()
    server.decoder = SpyDecoder(1000)
    server.initiate_connection()
    client.initiate_connection()
    client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 0})
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert server.encoder._size_update, "the client's new table size reached the encoder"
    client.send_headers(1, REQUEST, end_stream=True)
    [request] = [e for e in server.receive_data(client.data_to_send()) if isinstance(e, RequestReceived)]
    assert list(request.headers) == REQUEST
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    client.receive_data(server.data_to_send())
    assert calls == ["decode raw=True", "encode"]
    assert server.decoder.max_header_list_size == 1000


def test_response_frames_built_by_h2_py_move_h2s_state_as_its_send_methods_do() -> None:
    """h2.py builds HEADERS, CONTINUATION and DATA itself (send_headers_frames, send_data_frame): it moves the h2
    stream's state_machine with StreamInputs, debits outbound_flow_control_window on the stream and the
    connection, reads state_machine.state and max_outbound_frame_size, and appends to _data_to_send."""
    from h2.connection import ConnectionState
    from h2.events import DataReceived, InformationalResponseReceived, ResponseReceived, StreamEnded
    from h2.exceptions import StreamClosedError
    from h2.stream import StreamInputs

    from labelgw.http.h2 import send_data_frame, send_headers_frames, send_window
    from labelgw.http.hpack import Encoder

    assert {"SEND_HEADERS", "SEND_INFORMATIONAL_HEADERS", "SEND_DATA", "SEND_END_STREAM"} <= set(StreamInputs.__members__)
    server, client = h2_pair()
    server.encoder = Encoder()
    server.initiate_connection()
    client.initiate_connection()
    client.receive_data(server.data_to_send())
    client.send_headers(1, REQUEST, end_stream=True)
    client.send_headers(3, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    assert isinstance(server._data_to_send, bytearray) and server.state_machine.state is not ConnectionState.CLOSED
    stream = server.streams[1]
    before = (server.outbound_flow_control_window, stream.outbound_flow_control_window)
    assert send_window(server, stream) == min(before) == server.local_flow_control_window(1)
    send_headers_frames(server, stream, [(b":status", b"103"), (b"link", b"</a>")], False)
    # A head past the peer's frame size: HEADERS then CONTINUATION.
    big = [(b":status", b"200"), (b"x-big", b"b" * (server.max_outbound_frame_size + 10))]
    send_headers_frames(server, stream, big, False)
    send_data_frame(server, stream, memoryview(b"hello"), False)
    send_data_frame(server, stream, b"", True)
    assert (server.outbound_flow_control_window, stream.outbound_flow_control_window) == (before[0] - 5, before[1] - 5)
    assert stream.closed
    with pytest.raises(StreamClosedError):
        send_data_frame(server, stream, b"x", False)
    send_headers_frames(server, server.streams[3], [(b":status", b"204")], True)
    events = [e for e in client.receive_data(server.data_to_send()) if hasattr(e, "stream_id")]
    kinds = [(type(e).__name__, e.stream_id) for e in events]
    assert kinds == [
        # The empty DATA that ends stream 1 is an (empty) DataReceived too, as after h2's own end_stream.
        ("InformationalResponseReceived", 1), ("ResponseReceived", 1), ("DataReceived", 1), ("DataReceived", 1),
        ("StreamEnded", 1), ("ResponseReceived", 3), ("StreamEnded", 3),
    ]
    assert isinstance(events[0], InformationalResponseReceived) and isinstance(events[1], ResponseReceived)
    assert list(events[1].headers) == big
    assert isinstance(events[2], DataReceived) and events[2].data == b"hello"
    assert isinstance(events[4], StreamEnded)


def test_a_hand_written_goaway_is_understood() -> None:
    from h2.events import ConnectionTerminated
    from hyperframe.frame import GoAwayFrame

    _, client = h2_pair()
    client.initiate_connection()
    [terminated] = [
        e for e in client.receive_data(GoAwayFrame(0, last_stream_id=5, error_code=0).serialize())
        if isinstance(e, ConnectionTerminated)
    ]
    assert (terminated.last_stream_id, terminated.error_code) == (5, 0)


# --- labelgw/tls/deadlines.py and labelgw/cli/listeners.py: Twisted's TLS layer and endpoint service -----------


def test_tls_memory_bio_protocol_keeps_the_handshake_flag_and_builds_the_factorys_protocol() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    assert TLSMemoryBIOProtocol._handshakeDone is False
    assert TLSMemoryBIOFactory.protocol is BufferingTLSTransport
    assert parameters(TLSMemoryBIOFactory.__init__) == ["self", "contextFactory", "isClient", "wrappedFactory", "clock"]
    assert parameters(BufferingTLSTransport.__init__)[:3] == ["self", "factory", "wrappedProtocol"]

    from labelgw.tls.deadlines import TLSServerFactory, TLSServerProtocol
    from test_tls_deadlines import OneCertificate

    factory = TLSServerFactory(OneCertificate(), Factory.forProtocol(Protocol), clock=Clock(), handshake_timeout=1)
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)), TLSServerProtocol)


def test_the_handshake_flag_turns_true_and_the_wrapped_protocol_is_connected_before_the_handshake() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from test_tls_deadlines import Client, factory_for

    connected: list[bool] = []

    class Watch(Protocol):
        def connectionMade(self) -> None:
            connected.append(self.transport._handshakeDone)

    clock = MemoryReactorClock()
    client = Client(factory_for(clock, Factory.forProtocol(Watch)), clock)
    # The ALPN switch relies on this: its protocol (and the head deadline) starts at the TCP connection.
    assert connected == [False]
    client.handshake()
    assert client.server._handshakeDone is True


def test_tls_lose_connection_waits_for_a_registered_producer() -> None:
    # Why the close grace also counts when no close_notify could be sent (HTTP/2 keeps a producer registered).
    from twisted.internet.testing import MemoryReactorClock

    from test_tls_deadlines import Client, Closer, factory_for

    clock = MemoryReactorClock()
    client = Client(factory_for(clock, Factory.forProtocol(lambda: Closer(with_producer=True))), clock)
    client.handshake()
    client.send(b"hello")
    assert client.server.disconnecting and not client.close_notify


def test_stream_server_endpoint_service_raises_start_errors_synchronously_when_asked() -> None:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.defer import fail

    class Refusing:
        def listen(self, factory: Any) -> Any:
            return fail(OSError("busy"))

    assert StreamServerEndpointService._raiseSynchronously is False
    service = StreamServerEndpointService(Refusing(), Factory())
    service._raiseSynchronously = True
    with pytest.raises(OSError, match="busy"):
        service.privilegedStartService()


def test_every_private_name_the_reactor_and_fastwrite_use_is_checked_here() -> None:
    """These two modules have no private names of their own: every one they use is Twisted's, and checked above."""
    checked = {
        "labelgw/cli/reactor.py": {
            "_POLL_IN", "_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable", "_READABLE",
            # labelgw's own aliases of public names (tcp.Server, tcp.Client, errno.EWOULDBLOCK)
            "_SERVER", "_CLIENT", "_EWOULDBLOCK",
            # the main loop's (test_the_main_loop_lean_epoll_reactor_writes_out_is_the_one_it_was_written_from)
            "_started", "_pendingTimedCalls", "_newTimedCalls", "_justStopped", "_cancellations", "_topHandler",
            "_log", "_TOP_HANDLER", "_BASE_LOG", "_LONGEST_WAIT",
        },
        "labelgw/http/fastwrite.py": {
            "_tempDataBuffer", "_writeDisconnected", "_SERVER", "_CLIENT", "_SEND_LIMIT",
        },
    }
    for path, names in checked.items():
        source = (REPO / path).read_text()
        used = set(re.findall(r"\b_[A-Za-z]\w*", source))
        assert used <= names, f"{path} uses {sorted(used - names)}: add checks to tests/test_internals.py"


def test_the_log_publisher_keeps_its_observers_in_a_list_quietlog_can_wrap() -> None:
    """labelgw.cli.quietlog wraps twistd's log observers through LogPublisher._observers (no public accessor)."""
    from twisted.logger import LogPublisher

    from labelgw.cli.quietlog import QuietObserver, install_quiet_log

    seen: list[dict[str, Any]] = []
    publisher = LogPublisher(seen.append)
    assert isinstance(publisher._observers, list) and publisher._observers == [seen.append]
    install_quiet_log(publisher, force=True)
    assert [type(observer) for observer in publisher._observers] == [QuietObserver]
    publisher({"log_format": "kept", "log_level": None})
    assert [event["log_format"] for event in seen] == ["kept"]


# --- CPython's ssl module (labelgw/tls/stdtls.py) ------------------------------------------------------------


def test_ssl_context_wrap_bio_makes_the_c_object_that_sslobject_wraps() -> None:
    """stdtls.raw_tls holds the C object SSLObject wraps (made by the private C{SSLContext._wrap_bio}, its SNI
    callback handed the owner) and reads a client's C{SSLObject._sslobj}: both must exist with these shapes."""
    import ssl

    from labelgw.tls.stdtls import raw_tls

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    class Owner:  # the owner is held by weak reference
        pass

    owner = Owner()
    c_object = raw_tls(context, ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True, owner=owner)
    assert c_object.owner is owner
    for method in ("read", "write", "pending", "do_handshake", "shutdown", "version", "selected_alpn_protocol"):
        assert callable(getattr(c_object, method)), method
    assert type(c_object) is type(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())._sslobj)
    client = raw_tls(ssl.create_default_context(), ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=False, owner=None,
                     server_hostname="example.localhost")
    assert type(client) is type(c_object)
