"""The tables of allowed moves (labelgw/http/states.py) and their use by the data path's classes."""

from __future__ import annotations

from enum import IntEnum
from typing import Mapping

import pytest

from labelgw.http.states import (
    CONNECTION_MOVES, EXCHANGE_MOVES, H2_MOVES, STREAM_MOVES, ConnectionState, ExchangeState, H2State, StateError,
    StreamState, check_move, sources,
)

TABLES: list[tuple[type[IntEnum], Mapping]] = [
    (ExchangeState, EXCHANGE_MOVES), (ConnectionState, CONNECTION_MOVES), (H2State, H2_MOVES),
    (StreamState, STREAM_MOVES),
]


@pytest.mark.parametrize(("states", "table"), TABLES)
def test_every_state_has_a_row_and_the_last_is_final(states: type[IntEnum], table: Mapping) -> None:
    assert set(table) == set(states)
    last = max(states)
    assert table[last] == frozenset()
    # Every state but the last can reach the last one directly or through others.
    for state in states:
        seen, todo = {state}, [state]
        while todo:
            for new in table[todo.pop()]:
                if new not in seen:
                    seen.add(new)
                    todo.append(new)
        assert last in seen


def test_check_move_allows_what_the_table_says_and_staying_put() -> None:
    assert check_move(EXCHANGE_MOVES, ExchangeState.CONNECTING, ExchangeState.WAITING) is ExchangeState.WAITING
    assert check_move(EXCHANGE_MOVES, ExchangeState.DONE, ExchangeState.DONE) is ExchangeState.DONE
    with pytest.raises(StateError, match="DONE -> RESPONDING"):
        check_move(EXCHANGE_MOVES, ExchangeState.DONE, ExchangeState.RESPONDING)
    with pytest.raises(StateError):
        check_move(CONNECTION_MOVES, ConnectionState.CLOSED, ConnectionState.IDLE)


def test_sources_are_the_states_a_move_may_start_from() -> None:
    assert sources(EXCHANGE_MOVES, ExchangeState.RESPONDING) == {ExchangeState.WAITING, ExchangeState.RESPONDING}
    assert ConnectionState.CLOSED not in sources(CONNECTION_MOVES, ConnectionState.IDLE)
