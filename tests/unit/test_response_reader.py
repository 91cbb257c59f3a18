"""wire/response_reader.py: one HTTP/1.x response taken apart for an HTTP/2 stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.wire.errors import BadBackendResponse
from balancer.wire.response_reader import MAX_RESPONSE_HEAD_BYTES, ResponseReader


def read(*parts: bytes, is_head: bool = False, eof: bool = False) -> ResponseReader:
    reader = ResponseReader(is_head)
    for part in parts:
        reader.feed(part)
    if eof:
        reader.eof()
    return reader


def test_a_content_length_response_byte_by_byte() -> None:
    whole = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n\r\nhello"
    reader = read(*(whole[i : i + 1] for i in range(len(whole))))
    assert reader.status == 200 and reader.done and reader.reusable
    assert reader.fields == [(b"server", b"x"), (b"content-length", b"5")]
    assert b"".join(reader.body) == b"hello"


def test_chunked_is_unchunked_and_its_trailers_kept() -> None:
    reader = read(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: v \r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
    )
    # Transfer-Encoding is HTTP/1's alone (RFC 9113 §8.2.2); values lose edge whitespace.
    assert reader.fields == [(b"x-a", b"v")] and reader.trailers == [(b"x-sum", b"1")]
    assert b"".join(reader.body) == b"hello world" and reader.done and reader.reusable


def test_connection_and_the_fields_it_names_are_left_out() -> None:
    reader = read(
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"X-End: 2\r\nContent-Length: 0\r\n\r\n"
    )
    assert reader.fields == [(b"x-end", b"2"), (b"content-length", b"0")]
    assert reader.done and not reader.reusable  # (it said close)


def test_interim_responses_are_skipped() -> None:
    reader = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
                  b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")  # fmt: skip
    assert reader.status == 201 and reader.fields == [(b"content-length", b"0")]
    assert reader.done


def test_bodiless_responses_end_at_their_head() -> None:
    head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", is_head=True)
    assert head.done and head.reusable and head.body == []
    no_content = read(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    assert no_content.done and no_content.reusable


def test_a_body_until_close_ends_with_the_close_and_is_not_reused() -> None:
    reader = read(b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it")
    assert not reader.done
    reader.eof()
    assert reader.done and not reader.reusable and b"".join(reader.body) == b"all of it"


def test_http_1_0_is_reused_only_when_it_says_keep_alive() -> None:
    assert not read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").reusable
    kept = read(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert kept.reusable and kept.fields == [(b"content-length", b"0")]


def test_bytes_after_the_response_make_the_connection_unfit_for_reuse() -> None:
    for extra in (b"junk", b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\nContent-Length: 0\r\n\r\n"):
        reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" + extra)
        assert reader.done and not reader.reusable
        assert reader.fields == [(b"content-length", b"2")] and reader.trailers == []
    late = read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"late")
    assert late.done and not late.reusable
    head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", is_head=True)
    assert head.done and not head.reusable


BROKEN = {
    "cut body": ((b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi",), True),
    "cut head": ((b"HTTP/1.1 200 OK\r\nContent-Le",), True),
    "cut chunk": ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",), True),
    "nothing": ((), True),
    "not HTTP": ((b"SSH-2.0-OpenSSH\r\n\r\n",), False),
    "NUL in a value": ((b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",), False),
    "space before colon": ((b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",), False),
    "folded line": ((b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",), False),
    "length and chunked": (
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",),
        False,
    ),
    "two lengths": ((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",), False),
    "bad chunk size": ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",), False),
    "an upgrade": ((b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",), False),
    "head too large": ((b"HTTP/1.1 200 OK\r\n", b"X: " + b"a" * MAX_RESPONSE_HEAD_BYTES), False),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_response_is_refused(case: str) -> None:
    parts, at_eof = BROKEN[case]
    with pytest.raises(BadBackendResponse):
        read(*parts, eof=at_eof)


WHOLE = [
    b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 11\r\n\r\nhello world",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n"
    b"X-A: 1\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 2\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc",
    b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
]


def _outcome(reader: ResponseReader) -> tuple[object, ...]:
    return (reader.status, reader.fields, b"".join(reader.body), reader.trailers, reader.done,
            reader.reusable)  # fmt: skip


@given(st.sampled_from(WHOLE), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_how_a_response_is_split_across_reads_changes_nothing(
    whole: bytes, cuts: list[int]
) -> None:
    """llhttp is fed each read as it comes: any split of the same bytes reads the same."""
    points = sorted({cut % (len(whole) + 1) for cut in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)], strict=True)]
    assert _outcome(read(*(p for p in pieces if p))) == _outcome(read(whole))
