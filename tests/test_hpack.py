"""labelgw.http.hpack against the `hpack` package as an oracle (property tests) and at the edges of RFC 7541."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labelgw.http.hpack import CACHE_ENTRIES, STATIC_TABLE, CachingDecoder, Encoder, encode_integer, only_indexed

# Field names and values as HTTP/2 carries them: names lower-case tokens (often static-table names), any value
# bytes (HPACK itself does not care), lengths across the 7-bit prefix boundary (127).
_NAMES = st.one_of(
    st.sampled_from([name for name, _ in STATIC_TABLE]),
    st.binary(min_size=1, max_size=140),
)
_VALUES = st.one_of(
    st.sampled_from([value for _, value in STATIC_TABLE]),
    st.binary(max_size=160),
)
_FIELDS = st.lists(st.one_of(st.tuples(_NAMES, _VALUES), st.sampled_from(STATIC_TABLE)), max_size=20)


def pairs(headers: object) -> list[tuple[bytes, bytes]]:
    return [(bytes(name), bytes(value)) for name, value in headers]  # type: ignore[attr-defined]


@settings(max_examples=100, deadline=None)
@given(st.lists(_FIELDS, min_size=1, max_size=5))
def test_hpack_decodes_what_labelgw_encodes(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    encoder = Encoder()
    decoder = hpack.Decoder(max_header_list_size=2**30)
    for fields in blocks:
        assert pairs(decoder.decode(encoder.encode(fields), raw=True)) == fields
    # labelgw's encoder never adds to the dynamic table.
    assert len(decoder.header_table.dynamic_entries) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3]), _FIELDS), min_size=1, max_size=8), st.booleans())
def test_labelgw_decodes_every_block_as_hpack_does(steps: list[tuple[int, list[tuple[bytes, bytes]]]], huffman: bool) -> None:
    """Blocks from hpack's encoder (dynamic table, Huffman), some sent again (indexed-only: the cache's case), with
    table size changes in between: the caching decoder gives what hpack's own gives, block after block."""
    encoder = hpack.Encoder()
    oracle = hpack.Decoder(max_header_list_size=2**30)
    decoder = CachingDecoder(max_header_list_size=2**30)
    previous: list[tuple[bytes, bytes]] = []
    for action, fields in steps:
        if action in (1, 3) and previous:
            fields = previous
        elif action == 2:
            # The encoder resizes its table (within the decoder's 4096): a size update at the next block's start.
            encoder.header_table_size = min(len(fields) * 40, 4096)
        block = encoder.encode(fields, huffman=huffman)
        # An indexed-only block twice (it leaves the table as it was): the second time the cache may answer.
        for _ in range(2 if action == 3 and only_indexed(block) else 1):
            expected = oracle.decode(block, raw=True)
            got = decoder.decode(block, raw=True)
            assert pairs(got) == pairs(expected)
            assert pairs(got) == fields
            assert list(decoder.header_table.dynamic_entries) == list(oracle.header_table.dynamic_entries)
        previous = fields


def test_a_repeated_indexed_block_comes_from_the_cache_and_a_table_change_forgets_it() -> None:
    encoder = hpack.Encoder()
    decoder = CachingDecoder()
    fields = [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"api.localhost"), (b"user-agent", b"x/1")]
    first = encoder.encode(fields)
    second = encoder.encode(fields)
    assert not only_indexed(first) and only_indexed(second)
    assert pairs(decoder.decode(first, raw=True)) == fields
    assert pairs(decoder.decode(second, raw=True)) == fields
    assert len(decoder._cache) == 1
    # Callers may change what they got: the cached list is not theirs.
    decoder.decode(second, raw=True).clear()
    assert pairs(decoder.decode(second, raw=True)) == fields
    # A block with a literal (which may add to the table) empties the cache; so does a new table size.
    decoder.decode(encoder.encode([(b"x-new", b"1")]), raw=True)
    assert not decoder._cache
    decoder.decode(second, raw=True)
    decoder.header_table_size = 100
    assert not decoder._cache


def test_the_cache_is_bounded() -> None:
    decoder = CachingDecoder()
    for index in range(1, 62):
        decoder.decode(encode_integer(index, 7, 0x80), raw=True)
        assert len(decoder._cache) <= CACHE_ENTRIES
    # Long blocks are not kept.
    decoder.decode(b"\x82" * 600, raw=True)
    assert (b"\x82" * 600, True, decoder.max_header_list_size) not in decoder._cache


def test_an_oversized_header_list_is_refused_from_the_cache_too() -> None:
    block = b"\x82" * 100  # 100 times ":method: GET", 42 bytes each as RFC 7541 counts them
    decoder = CachingDecoder(max_header_list_size=10000)
    assert len(decoder.decode(block, raw=True)) == 100
    decoder.max_header_list_size = 1000
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)


@pytest.mark.parametrize(
    ("value", "bits", "encoded"),
    # RFC 7541 appendix C.1.
    [(10, 5, b"\x0a"), (1337, 5, b"\x1f\x9a\x0a"), (42, 8, b"\x2a"), (31, 5, b"\x1f\x00")],
)
def test_integers_as_rfc_7541_shows_them(value: int, bits: int, encoded: bytes) -> None:
    assert encode_integer(value, bits) == encoded
    assert hpack.hpack.decode_integer(encoded, bits) == (value, len(encoded))


def test_the_static_table_is_rfc_7541s() -> None:
    assert STATIC_TABLE == hpack.table.HeaderTable.STATIC_TABLE


def test_static_fields_are_one_byte_names_are_indexed_and_credentials_never_indexed() -> None:
    encoder = Encoder()
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    assert encoder.encode([(b"content-length", b"5")]) == b"\x0f\x0d\x015"
    assert encoder.encode([(b"x-a", b"b")]) == b"\x00\x03x-a\x01b"
    assert encoder.encode([(b"set-cookie", b"a=b")]) == b"\x1f\x28\x03a=b"
    assert encoder.encode([(b"x-secret", b"s")]) == b"\x00\x08x-secret\x01s"
    assert encoder.encode([hpack.NeverIndexedHeaderTuple(b"x-secret", b"s")]) == b"\x10\x08x-secret\x01s"
    decoded = hpack.Decoder().decode(encoder.encode([(b"set-cookie", b"a=b")]), raw=True)
    assert isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)


def test_a_new_table_size_from_the_peer_is_answered_with_a_size_update_to_0() -> None:
    encoder = Encoder()
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 0
    encoder.header_table_size = 0
    block = encoder.encode([(b":status", b"200")])
    assert block == b"\x20\x88"
    assert pairs(decoder.decode(block, raw=True)) == [(b":status", b"200")]
    # Once only.
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
