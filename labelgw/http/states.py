"""The states of the data path's objects, and the moves allowed between them (h11's ``_state.py`` is the model).

Each class keeps one ``state`` attribute and changes it only through L{move}, which refuses a move the table does
not allow: a bug shows up as an error where it happens, not as a connection that hangs later. The states are
IntEnums in the order a connection lives through them, so "closing or closed" is one comparison.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Mapping, TypeVar


class ExchangeState(IntEnum):
    """One request, as its exchange sees it."""

    # No upstream connection yet (also again during a retry).
    CONNECTING = 0
    # The request head went upstream; no final response head yet.
    WAITING = 1
    # The response head went to the client; its body follows.
    RESPONDING = 2
    # A 101 switched protocols: bytes are relayed both ways until one side closes.
    TUNNEL = 3
    # Answered, failed or abandoned; counters released.
    DONE = 4


class ConnectionState(IntEnum):
    """One HTTP/1.1 client connection."""

    # Between requests: nothing of the next request yet.
    IDLE = 0
    # Part of a request head arrived: the head deadline runs.
    HEAD = 1
    # An exchange is in progress and its request body is still arriving.
    BODY = 2
    # An exchange is in progress, its request complete (pipelined bytes wait in the buffer).
    RESPONSE = 3
    # The connection carries an upgraded protocol.
    TUNNEL = 4
    # Closing once what was written is sent.
    CLOSING = 5
    # connectionLost was called.
    CLOSED = 6


class H2State(IntEnum):
    """One HTTP/2 client connection."""

    OPEN = 0
    # GOAWAY sent for a drain: the streams in flight finish, new ones are refused.
    DRAINING = 1
    CLOSED = 2


class StreamState(IntEnum):
    """The response side of one HTTP/2 stream."""

    # No response head yet.
    WAITING = 0
    # HEADERS sent; DATA follows.
    SENDING = 1
    # The response is complete upstream; END_STREAM goes out with the last queued byte.
    ENDING = 2
    # END_STREAM or RST_STREAM sent, or the connection is gone: nothing more is sent.
    DONE = 3


_E, _C, _H, _S = ExchangeState, ConnectionState, H2State, StreamState

EXCHANGE_MOVES: Mapping[ExchangeState, frozenset[ExchangeState]] = {
    _E.CONNECTING: frozenset({_E.WAITING, _E.DONE}),
    # Back to CONNECTING: a retry after the upstream failed before any response.
    _E.WAITING: frozenset({_E.CONNECTING, _E.RESPONDING, _E.TUNNEL, _E.DONE}),
    _E.RESPONDING: frozenset({_E.DONE}),
    _E.TUNNEL: frozenset({_E.DONE}),
    _E.DONE: frozenset(),
}

CONNECTION_MOVES: Mapping[ConnectionState, frozenset[ConnectionState]] = {
    _C.IDLE: frozenset({_C.HEAD, _C.BODY, _C.RESPONSE, _C.CLOSING, _C.CLOSED}),
    _C.HEAD: frozenset({_C.IDLE, _C.BODY, _C.RESPONSE, _C.CLOSING, _C.CLOSED}),
    # BODY -> IDLE: the exchange ended while the body was arriving; only with a close, but the close comes after.
    _C.BODY: frozenset({_C.RESPONSE, _C.IDLE, _C.TUNNEL, _C.CLOSING, _C.CLOSED}),
    _C.RESPONSE: frozenset({_C.IDLE, _C.TUNNEL, _C.CLOSING, _C.CLOSED}),
    _C.TUNNEL: frozenset({_C.CLOSING, _C.CLOSED}),
    _C.CLOSING: frozenset({_C.CLOSED}),
    _C.CLOSED: frozenset(),
}

H2_MOVES: Mapping[H2State, frozenset[H2State]] = {
    _H.OPEN: frozenset({_H.DRAINING, _H.CLOSED}),
    _H.DRAINING: frozenset({_H.CLOSED}),
    _H.CLOSED: frozenset(),
}

STREAM_MOVES: Mapping[StreamState, frozenset[StreamState]] = {
    _S.WAITING: frozenset({_S.SENDING, _S.ENDING, _S.DONE}),
    _S.SENDING: frozenset({_S.ENDING, _S.DONE}),
    _S.ENDING: frozenset({_S.DONE}),
    _S.DONE: frozenset(),
}

State = TypeVar("State", bound=IntEnum)


class StateError(RuntimeError):
    """A move the table does not allow: a bug in labelgw, never a client's doing."""


def check_move(table: Mapping[State, frozenset[State]], old: State, new: State) -> State:
    """`new`, when the table allows moving there from `old`; a move to the same state is always allowed."""
    if new is not old and new not in table[old]:
        raise StateError(f"{type(old).__name__}: {old.name} -> {new.name} is not allowed")
    return new


def sources(table: Mapping[State, frozenset[State]], new: State) -> frozenset[State]:
    """The states from which `table` allows moving to `new` (and `new` itself): for the checks made inline on
    the per-request path, one set lookup instead of a call."""
    return frozenset(old for old, allowed in table.items() if new in allowed or old is new)
