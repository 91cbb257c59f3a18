"""wire/hpack_codec.py: RFC 7541's examples, python-hyper's hpack as the reference both ways,
and the blocks a hostile client can send."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    HPACKError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.table import HeaderTable
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.wire.hpack_codec import STATIC_TABLE, FieldDecoder, FieldEncoder

Fields = list[tuple[bytes, bytes]]


def test_the_static_table_is_the_rfcs() -> None:
    assert list(STATIC_TABLE) == [tuple(entry) for entry in HeaderTable.STATIC_TABLE]


REQUESTS_WITHOUT_HUFFMAN = [  # RFC 7541 C.3: three requests on one connection
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
REQUESTS_WITH_HUFFMAN = [  # C.4: the same with Huffman-coded strings
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
DECODED = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]  # fmt: skip


@pytest.mark.parametrize("blocks", [REQUESTS_WITHOUT_HUFFMAN, REQUESTS_WITH_HUFFMAN])
def test_the_rfcs_request_examples(blocks: list[str]) -> None:
    decoder = FieldDecoder()
    assert [decoder.decode(bytes.fromhex(block)) for block in blocks] == DECODED


def test_a_literal_with_indexing_enters_the_dynamic_table() -> None:
    decoder = FieldDecoder()  # C.2.1, then the entry referenced by its index (62)
    assert decoder.decode(bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572"))
    assert decoder.decode(b"\xbe") == [(b"custom-key", b"custom-header")]


# python-hyper's hpack as the reference: any sequence of field lists it encodes (Huffman or
# not, indexed or not, table sizes changing), this decoder reads as it does; whatever this
# encoder writes, it reads back as given.

_token = st.binary(min_size=1, max_size=12).map(lambda b: bytes(97 + x % 26 for x in b))
_name = st.one_of(st.sampled_from([name for name, _ in STATIC_TABLE]), _token)
_value = st.one_of(
    st.sampled_from([value for _, value in STATIC_TABLE]),
    st.binary(max_size=60),
    st.binary(min_size=200, max_size=1500),  # entries that evict, or that empty the table
)
_field = st.tuples(_name, _value, st.booleans())
_blocks = st.lists(
    st.tuples(st.lists(_field, max_size=10), st.booleans(), st.sampled_from([None, 0, 256, 4096])),
    min_size=1,
    max_size=6,
)


def _reference_field(name: bytes, value: bytes, sensitive: bool) -> HeaderTuple:
    return NeverIndexedHeaderTuple(name, value) if sensitive else HeaderTuple(name, value)


@settings(max_examples=300, deadline=None)
@given(_blocks)
def test_it_reads_what_the_reference_encoder_writes(
    blocks: list[tuple[list[tuple[bytes, bytes, bool]], bool, int | None]],
) -> None:
    reference_encoder, reference_decoder = Encoder(), Decoder()
    decoder = FieldDecoder(max_header_list_size=1 << 20)
    reference_decoder.max_header_list_size = 1 << 20
    for fields, huffman, table_size in blocks:
        if table_size is not None:
            reference_encoder.header_table_size = table_size
        block = reference_encoder.encode(
            [_reference_field(*field) for field in fields], huffman=huffman
        )
        expected = [tuple(field) for field in reference_decoder.decode(block, raw=True)]
        assert decoder.decode(block) == expected
        assert decoder.header_table_size == reference_decoder.header_table_size


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(_name, st.binary(max_size=300)), max_size=12), max_size=5))
def test_what_it_writes_reads_back_as_given(heads: list[Fields]) -> None:
    encoder, reference_decoder, decoder = FieldEncoder(), Decoder(), FieldDecoder()
    for fields in heads:
        block = encoder.encode(fields)
        assert [tuple(field) for field in reference_decoder.decode(block, raw=True)] == fields
        assert decoder.decode(block) == fields


def test_it_writes_what_the_static_table_holds_as_one_byte_and_credentials_never_indexed() -> None:
    block = FieldEncoder().encode(
        [(b":status", b"200"), (b"content-length", b"5"), (b"set-cookie", b"s=1")]
    )
    assert block == b"\x88" + b"\x0f\x0d\x015" + b"\x1f\x28\x03s=1"
    decoded = Decoder().decode(block, raw=True)
    assert isinstance(decoded[2], NeverIndexedHeaderTuple)
    assert not isinstance(decoded[1], NeverIndexedHeaderTuple)


def test_a_new_table_size_from_the_peer_is_answered_once_with_an_update_to_zero() -> None:
    encoder = FieldEncoder()
    encoder.table_size_changed()  # (to 1024)
    first, second = encoder.encode([(b":status", b"200")]), encoder.encode([(b":status", b"200")])
    assert (first, second) == (b"\x20\x88", b"\x88")
    reference = Decoder()
    reference.max_allowed_table_size = 1024
    assert reference.decode(first, raw=True) == [(b":status", b"200")]


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\x80", InvalidTableIndex),  # index 0
        (b"\xbe", InvalidTableIndex),  # index 62 with the dynamic table empty
        (b"\xff\x80\x80\x80\x80\x01", HPACKDecodingError),  # an integer past any index
        (b"\xff", HPACKDecodingError),  # an integer cut at the block's end
        (b"\x0f", HPACKDecodingError),  # a literal cut before its name's index ends
        (b"\x01", HPACKDecodingError),  # a literal with no value
        (b"\x01\x05abc", HPACKDecodingError),  # a string past the block's end
        (b"\x01\x81\xff", HPACKDecodingError),  # Huffman: padding of more than 7 bits
        (b"\x01\x84\xff\xff\xff\xff", HPACKDecodingError),  # Huffman: EOS decoded
        (b"\x88\x20", HPACKDecodingError),  # a table size update after a field
        (b"\x3f\xe2\x1f", InvalidTableSizeError),  # 4097: past SETTINGS_HEADER_TABLE_SIZE
    ],
)
def test_broken_blocks_raise_the_error_h2_turns_into_a_connection_error(
    block: bytes, error: type[HPACKError]
) -> None:
    with pytest.raises(error):
        FieldDecoder().decode(block)


def test_an_hpack_bomb_stops_at_the_list_bound_as_it_is_decoded() -> None:
    """One 4,000-byte entry, then its index again and again: 50 bytes of block would decode
    to 200 KB; decoding stops at the first field past the bound."""
    decoder = FieldDecoder(max_header_list_size=16384)
    entry = b"\x40\x01x" + b"\x7f\x9f\x1e" + b"v" * 3998  # name "x", a 3,998-byte value
    assert decoder.decode(entry) == [(b"x", b"v" * 3998)]
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(b"\xbe" * 50)
    decoder.max_header_list_size = 4 * (1 + 3998 + 32)  # four fields exactly: read
    assert decoder.decode(b"\xbe" * 4) == [(b"x", b"v" * 3998)] * 4
    decoder.max_header_list_size -= 1
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(b"\xbe" * 4)


def test_a_table_size_update_evicts_and_an_oversized_entry_empties_the_table() -> None:
    decoder = FieldDecoder()
    decoder.decode(b"\x40\x01a\x01b" + b"\x40\x01c\x01d")  # two entries, 34 bytes each
    decoder.decode(b"\x20")  # size 0: both out
    with pytest.raises(InvalidTableIndex):
        decoder.decode(b"\xbe")
    decoder.decode(b"\x3f\x13")  # size 50: room for one
    decoder.decode(b"\x40\x01a\x01b" + b"\x40\x01c\x01d")
    assert decoder.decode(b"\xbe") == [(b"c", b"d")]
    with pytest.raises(InvalidTableIndex):
        decoder.decode(b"\xbf")
    decoder.decode(b"\x40\x01e\x7f\x00" + b"v" * 127)  # larger than 50: the table empties
    with pytest.raises(InvalidTableIndex):
        decoder.decode(b"\xbe")


def test_entries_that_fill_the_table_exactly_stay_in_it() -> None:
    decoder = FieldDecoder()
    decoder.decode(b"\x3f\x25")  # size 68: two 34-byte entries exactly
    decoder.decode(b"\x40\x01a\x01b" + b"\x40\x01c\x01d")
    assert decoder.decode(b"\xbe\xbf") == [(b"c", b"d"), (b"a", b"b")]
    decoder.decode(b"\x3f\x03")  # size 34: room for the newest alone
    assert decoder.decode(b"\xbe") == [(b"c", b"d")]
    decoder.decode(b"\x40\x01e\x01f")  # an entry the table's size exactly: it fits
    assert decoder.decode(b"\xbe") == [(b"e", b"f")]


def test_a_value_whose_length_takes_three_continuation_bytes() -> None:
    block = FieldEncoder().encode([(b"x", b"v" * 20000)])
    assert block[:6] == b"\x00\x01x\x7f\xa1\x9b"
    assert FieldDecoder(max_header_list_size=1 << 20).decode(block) == [(b"x", b"v" * 20000)]
