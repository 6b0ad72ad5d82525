"""Request ids and trace context (labelgw.http.requestid): kept when sane, replaced when not, generated when missing;
and what reaches the backend (labelgw.http.headers' upstream head)."""

from __future__ import annotations

import re

import pytest

from labelgw.http.headers import upstream_request_head
from labelgw.http.parser import parse_request_head
from labelgw.http.requestid import RequestIds, sane_request_id, valid_traceparent

TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACEPARENT_RE = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def forwarded(extra: bytes, ids: RequestIds | None = None) -> tuple[object, list[tuple[bytes, bytes]]]:
    """The head after assign, and the fields of the upstream head built from it."""
    head = parse_request_head(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n" + extra + b"Accept: */*")
    (ids or RequestIds(bytes(range(16)))).assign(head)
    raw = upstream_request_head(head, b"/", b"10.0.0.1", b"http", b"8080")
    lines = raw.split(b"\r\n")[1:-2]
    return head, [(name.lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in fields if key == name]


def test_without_either_labelgw_makes_both_and_they_join() -> None:
    head, fields = forwarded(b"")
    [request_id] = values(fields, b"x-request-id")
    [traceparent] = values(fields, b"traceparent")
    match = TRACEPARENT_RE.fullmatch(traceparent)
    assert match is not None and valid_traceparent(traceparent) == match.group(1)
    # One id: the request id is the trace id, so the access log line and the backend's trace meet.
    assert request_id == match.group(1) == head.request_id == head.trace_id  # type: ignore[attr-defined]
    assert values(fields, b"accept") == [b"*/*"]


def test_generated_ids_differ_per_request_and_per_process() -> None:
    ids = RequestIds()
    first, second = forwarded(b"", ids)[0], forwarded(b"", ids)[0]
    other = forwarded(b"", RequestIds())[0]
    assert len({first.request_id, second.request_id, other.request_id}) == 3  # type: ignore[attr-defined]
    parents = {TRACEPARENT_RE.fullmatch(values(forwarded(b"", ids)[1], b"traceparent")[0]).group(2) for _ in range(3)}  # type: ignore[union-attr]
    assert len(parents) == 3


@pytest.mark.parametrize(
    "value", [b"abc", b"f47ac10b-58cc-4372-a567-0e02b2c3d479", b"01ARZ3NDEKTSV4RRFFQ69G5FAV", b"a.b_c~d:e+f=g/h@i", b"x" * 128]
)
def test_a_sane_client_id_is_kept_as_it_is(value: bytes) -> None:
    head, fields = forwarded(b"X-Request-ID: " + value + b"\r\n")
    assert values(fields, b"x-request-id") == [value]
    assert head.request_id == value  # type: ignore[attr-defined]
    # The trace is still started by labelgw, with an id of its own.
    [traceparent] = values(fields, b"traceparent")
    assert valid_traceparent(traceparent) == head.trace_id != value  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Request-Id: " + b"x" * 129 + b"\r\n",
        b"X-Request-Id: has space\r\n",
        b'X-Request-Id: quote"d\r\n',
        b"X-Request-Id: <script>\r\n",
        b"X-Request-Id: \xc3\xa9\r\n",
        b"X-Request-Id: \r\n",
        b"X-Request-Id: a\r\nx-request-id: b\r\n",
    ],
)
def test_an_insane_client_id_is_replaced(extra: bytes) -> None:
    head, fields = forwarded(extra)
    [request_id] = values(fields, b"x-request-id")
    assert re.fullmatch(rb"[0-9a-f]{32}", request_id) and head.request_id == request_id  # type: ignore[attr-defined]
    assert values(fields, b"accept") == [b"*/*"] and values(fields, b"host") == [b"a.localhost"]


def test_a_valid_traceparent_passes_through_unchanged_with_its_tracestate() -> None:
    head, fields = forwarded(b"traceparent: " + TRACE + b"\r\ntracestate: vendor=1\r\n")
    assert values(fields, b"traceparent") == [TRACE]
    assert values(fields, b"tracestate") == [b"vendor=1"]
    assert head.trace_id == b"0af7651916cd43dd8448eb211c80319c"  # type: ignore[attr-defined]
    # A request id is still made.
    assert len(values(fields, b"x-request-id")) == 1


def test_a_future_version_may_carry_more_fields() -> None:
    value = b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"
    assert valid_traceparent(value) == b"0af7651916cd43dd8448eb211c80319c"
    assert values(forwarded(b"Traceparent: " + value + b"\r\n")[1], b"traceparent") == [value]


@pytest.mark.parametrize(
    "value",
    [
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is invalid
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero parent id
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        b"00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",  # short trace id
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",  # version 00 has exactly four fields
        b"garbage",
    ],
)
def test_an_invalid_traceparent_is_replaced_and_its_tracestate_dropped(value: bytes) -> None:
    assert valid_traceparent(value) is None
    head, fields = forwarded(b"traceparent: " + value + b"\r\ntracestate: vendor=1\r\n")
    [traceparent] = values(fields, b"traceparent")
    assert traceparent != value and valid_traceparent(traceparent) == head.trace_id  # type: ignore[attr-defined]
    assert values(fields, b"tracestate") == []


def test_two_traceparents_are_one_too_many() -> None:
    head, fields = forwarded(b"traceparent: " + TRACE + b"\r\ntraceparent: " + TRACE + b"\r\n")
    [traceparent] = values(fields, b"traceparent")
    assert traceparent != TRACE


def test_sane_ids() -> None:
    assert sane_request_id(b"a-b") and not sane_request_id(b"") and not sane_request_id(b"a\tb")


@pytest.mark.parametrize("seed", [bytes(16), b"\xff" * 16, bytes(range(16))])
def test_generated_ids_are_always_full_width_and_valid(seed: bytes) -> None:
    # The counter starts at 2**60 so that `%x` needs no padding; the parent ids keep its top digit (never zeros).
    ids = RequestIds(seed)
    seen: set[bytes] = set()
    parents: set[bytes] = set()
    for _ in range(50):
        head, fields = forwarded(b"", ids)
        [traceparent] = values(fields, b"traceparent")
        match = TRACEPARENT_RE.fullmatch(traceparent)
        assert match is not None and valid_traceparent(traceparent) == head.request_id  # type: ignore[attr-defined]
        assert head.request_id.startswith(seed[:8].hex().encode())  # type: ignore[attr-defined]
        seen.add(head.request_id)  # type: ignore[attr-defined]
        parents.add(match.group(2))
    # With a client id (the other path), the generated trace is full width too.
    head, fields = forwarded(b"X-Request-Id: abc\r\n", ids)
    [traceparent] = values(fields, b"traceparent")
    assert TRACEPARENT_RE.fullmatch(traceparent) is not None and valid_traceparent(traceparent) is not None
    assert len(seen) == len(parents) == 50
