"""HPACK (RFC 7541) for labelgw's HTTP/2 side: a cheap encoder for response heads, a cached decoder for requests.

Both plug into the `h2` library's connection in place of the `hpack` package's classes (in
L{labelgw.http.h2.H2Protocol}, with h2's other internals); h2 calls
``encoder.encode(headers)``, sets ``encoder.header_table_size`` when the client's SETTINGS_HEADER_TABLE_SIZE
changes, and calls ``decoder.decode(block, raw=True)``.

L{Encoder}: never touches the dynamic table and never Huffman-codes. Each field is one static-table index
(``:status: 200``), or a literal "without indexing" whose name is a static index when the table has it, with the
value's bytes as they are. Producing that is a dictionary look-up and a join per field, against the `hpack`
encoder's table search and Huffman coding in Python; the peer decodes it as any other block. The cost is a few
bytes on the wire per response (values are not Huffman-coded). Since the dynamic table stays empty, a change of
the client's SETTINGS_HEADER_TABLE_SIZE is answered, as RFC 7541 section 4.2 requires, with a dynamic table size
update to 0 at the start of the next block.

L{CachingDecoder}: the `hpack` package's decoder with a cache in front. Clients such as h2load and browsers send
the same header block again and again once its fields are in the dynamic table: a block made only of indexed
fields. Such a block does not change the table, so while the table does not change its decoding is the same; the
cache keeps those (small ones, a few per connection) and forgets them all whenever a block that may change the
table is decoded or the table's size is set.
"""

from __future__ import annotations

from typing import Any, Iterable

from hpack import Decoder as _HpackDecoder
from hpack import NeverIndexedHeaderTuple

# RFC 7541 Appendix A: the static table, index 1 first.
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 section 5.1: `value` on a `prefix_bits`-bit prefix, `first` holding the first byte's other bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Whole fields the static table holds (index 1 is ":authority" with an empty value: a real field too).
_INDEXED: dict[tuple[bytes, bytes], bytes] = {}
# Names it holds: the start of a literal field "without indexing" (section 6.2.2, 4-bit prefix) and "never
# indexed" (section 6.2.3).
_NAMED: dict[bytes, bytes] = {}
_NAMED_NEVER: dict[bytes, bytes] = {}
for _index, _field in enumerate(STATIC_TABLE, 1):
    _INDEXED.setdefault(_field, encode_integer(_index, 7, 0x80))
    _NAMED.setdefault(_field[0], encode_integer(_index, 4, 0x00))
    _NAMED_NEVER.setdefault(_field[0], encode_integer(_index, 4, 0x10))
del _index, _field
# A string's length byte for short strings, H bit clear (section 5.2).
_SHORT = [bytes((size,)) for size in range(127)]
# Fields that no intermediary may put in a table (credentials): sent as "never indexed".
SENSITIVE = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
# Section 6.3: a dynamic table size update to 0.
_SIZE_UPDATE_0 = b"\x20"


def _string(data: bytes) -> bytes:
    size = len(data)
    return (_SHORT[size] if size < 127 else encode_integer(size, 7)) + data


class Encoder:
    """A header block encoder that uses the static table only and no Huffman code (the module's docstring)."""

    def __init__(self) -> None:
        self._size_update = False
        self._table_size = 4096

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # The peer's limit changed: say the (empty, unused) table is 0 bytes, at the start of the next block.
        self._table_size = value
        self._size_update = True

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        """The header block of `headers` (pairs of bytes; `huffman` is accepted and ignored)."""
        if self._size_update:
            self._size_update = False
            return _SIZE_UPDATE_0 + encode_fields(headers)
        return encode_fields(headers)

    def prefix(self) -> bytes:
        """What must open the next block (a size update owed to the peer, else nothing): for a block made earlier
        by L{encode_fields}, which depends on the fields only (no dynamic table)."""
        if self._size_update:
            self._size_update = False
            return _SIZE_UPDATE_0
        return b""


def encode_fields(headers: Iterable[Any]) -> bytes:
    """The fields' block, without anything the encoder owes the peer (L{Encoder.prefix}): the same for every
    connection, so it may be kept and reused."""
    out = []
    indexed = _INDEXED
    named = _NAMED
    for field in headers:
        name, value = field[0], field[1]
        index = indexed.get((name, value))
        if index is not None:
            out.append(index)
            continue
        if name in SENSITIVE or isinstance(field, NeverIndexedHeaderTuple):
            prefix = _NAMED_NEVER.get(name)
            if prefix is None:
                prefix = b"\x10" + _string(name)
        else:
            prefix = named.get(name)
            if prefix is None:
                prefix = b"\x00" + _string(name)
        size = len(value)
        out.append(prefix + (_SHORT[size] if size < 127 else encode_integer(size, 7)) + value)
    return b"".join(out)


# Blocks the decoder's cache keeps: at most this many, each at most this long (encoded).
CACHE_ENTRIES = 8
CACHE_BLOCK = 512


def only_indexed(block: bytes) -> bool:
    """Whether a header block is made only of indexed fields (section 6.1), which leave the dynamic table as it was."""
    at = 0
    end = len(block)
    while at < end:
        first = block[at]
        if not first & 0x80:
            return False
        at += 1
        if first & 0x7F == 0x7F:
            # The index goes on in the following bytes, the last one with its high bit clear.
            while at < end and block[at] & 0x80:
                at += 1
            at += 1
    return at == end


class CachingDecoder(_HpackDecoder):
    """The `hpack` decoder, with the decodings of indexed-only blocks kept while the dynamic table is unchanged."""

    def __init__(self, max_header_list_size: int = 65536) -> None:
        super().__init__(max_header_list_size)
        self._cache: dict[tuple[bytes, bool, int], list[Any]] = {}
        # What the user made of a cached block (labelgw.http.h2: the checked request head), by the user's key;
        # emptied with the cache, so an entry stands only while its block decodes to the same fields.
        self.known: dict[Any, Any] = {}

    def _forget(self) -> None:
        self._cache.clear()
        self.known.clear()

    def cached(self, data: bytes, raw: bool = True) -> bool:
        """Whether `data` decodes to fields kept in the cache (an indexed-only block, the table unchanged since);
        `raw` as given to decode (h2 decodes raw)."""
        return (data, raw, self.max_header_list_size) in self._cache

    @property  # type: ignore[override]
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._forget()
        self.header_table.maxsize = value

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:  # type: ignore[override]
        cache = self._cache
        # The header list limit too: a block within the old one may be past a new one.
        key = (data, raw, self.max_header_list_size)
        headers = cache.get(key)
        if headers is not None:
            return list(headers)
        try:
            headers = list(super().decode(data, raw))
        except Exception:
            self._forget()
            raise
        if len(data) <= CACHE_BLOCK and only_indexed(data):
            if len(cache) >= CACHE_ENTRIES:
                self._forget()
            cache[key] = headers
            return list(headers)
        # The block may have added to the table, evicted from it or resized it: what was cached may be stale.
        self._forget()
        return headers

