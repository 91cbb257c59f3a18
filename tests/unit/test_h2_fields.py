"""wire/h2_fields.py: an HTTP/2 request's field sections checked and split (RFC 9113 §8.2-8.3)."""

from __future__ import annotations

import pytest

from balancer.wire.h2_fields import MalformedFields, request_fields, trailer_fields

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b"),
        (b":authority", b"example.com:443")]  # fmt: skip


def test_a_request_is_split_into_its_pseudo_fields_and_the_rest() -> None:
    fields = request_fields(
        [*BASE, (b"accept", b"*/*"), (b"cookie", b"a=1"), (b"te", b"trailers"),
         (b"cookie", b"b=2"), (b"x-empty", b"")]
    )  # fmt: skip
    assert fields.method == b"GET" and fields.path == b"/a?b"
    assert fields.authority == b"example.com:443"
    # Cookie crumbs joined into one field, last (RFC 9113 §8.2.3); TE: trailers kept.
    assert fields.regular == [
        (b"accept", b"*/*"), (b"te", b"trailers"), (b"x-empty", b""), (b"cookie", b"a=1; b=2")
    ]  # fmt: skip


def test_host_stands_for_a_missing_authority_and_may_repeat_it() -> None:
    without = [field for field in BASE if field[0] != b":authority"]
    assert request_fields([*without, (b"host", b"h.example")]).authority == b"h.example"
    same = request_fields([*BASE, (b"host", b"example.com:443")])
    assert same.authority == b"example.com:443" and same.regular == []
    assert request_fields(without).authority is None  # (answered 400 by the flow)


def test_options_star_and_connect_without_path() -> None:
    star = [(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*"),
            (b":authority", b"x")]  # fmt: skip
    assert request_fields(star).path == b"*"
    connect = request_fields([(b":method", b"CONNECT"), (b":authority", b"x:443")])
    assert connect.method == b"CONNECT" and connect.path == b""


def _with(name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, value if n == name else v) for n, v in BASE]


MALFORMED = {
    "uppercase name": [*BASE, (b"X-A", b"1")],
    "empty name": [*BASE, (b"", b"1")],
    "space in a name": [*BASE, (b"x a", b"1")],
    "colon in a name": [*BASE, (b"x:a", b"1")],
    "NUL in a value": [*BASE, (b"x-a", b"a\x00b")],
    "CR in a value": [*BASE, (b"x-a", b"a\rb")],
    "LF in a value": [*BASE, (b"x-a", b"a\nb")],
    "leading space": [*BASE, (b"x-a", b" a")],
    "trailing tab": [*BASE, (b"x-a", b"a\t")],
    "connection": [*BASE, (b"connection", b"close")],
    "keep-alive": [*BASE, (b"keep-alive", b"5")],
    "proxy-connection": [*BASE, (b"proxy-connection", b"x")],
    "transfer-encoding": [*BASE, (b"transfer-encoding", b"chunked")],
    "upgrade": [*BASE, (b"upgrade", b"websocket")],
    "te gzip": [*BASE, (b"te", b"gzip")],
    "pseudo after regular": [(b"x-a", b"1"), *BASE],
    "pseudo repeated": [*BASE[:3], (b":path", b"/again"), BASE[3]],
    "response pseudo": [(b":status", b"200"), *BASE],
    "unknown pseudo": [(b":protocol", b"websocket"), *BASE],
    "no method": BASE[1:],
    "method not a token": _with(b":method", b"GET /x"),
    "no scheme": [BASE[0], *BASE[2:]],
    "no path": [*BASE[:2], BASE[3]],
    "empty path": _with(b":path", b""),
    "relative path": _with(b":path", b"a/b"),
    "space in path": _with(b":path", b"/a b"),
    "DEL in path": _with(b":path", b"/a\x7f"),
    "userinfo in authority": _with(b":authority", b"user@host"),
    "space in authority": _with(b":authority", b"a b"),
    "host differs": [*BASE, (b"host", b"elsewhere")],
    "two hosts": [*BASE[:3], (b"host", b"x"), (b"host", b"x")],
    "CONNECT with path": [(b":method", b"CONNECT"), (b":authority", b"x"), (b":path", b"/")],
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_section_is_refused(case: str) -> None:
    with pytest.raises(MalformedFields):
        request_fields(MALFORMED[case])


def test_trailers_are_checked_as_fields_and_carry_no_pseudo_field() -> None:
    good = [(b"x-checksum", b"abc"), (b"x-empty", b"")]
    assert trailer_fields(good) == good
    for bad in ([(b":path", b"/")], [(b"x-a", b"a\r\nInjected: 1")], [(b"X-A", b"1")],
                [(b"transfer-encoding", b"chunked")], [(b"x-a", b"a ")]):  # fmt: skip
        with pytest.raises(MalformedFields):
            trailer_fields(bad)
