"""wire/h2_fields.py: an HTTP/2 request's field sections checked and split (RFC 9113 §8.2-8.3)."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.wire.backend_head import backend_head
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
    "a control character in a value": [*BASE, (b"x-a", b"a\x01b")],
    "DEL in a value": [*BASE, (b"x-a", b"a\x7f")],
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
    "non-ASCII path": _with(b":path", b"/caf\xc3\xa9"),
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


# Values and names from the checks' edges (and from nowhere in particular), beside plain ones.
_EDGE_VALUES = [
    b"GET", b"POST", b"/", b"/a?b=c", b"*", b"https", b"example.com:8443", b"trailers", b"5",
    b"a\r\nX-Injected: 1", b" x", b"x ", b"/a b", b"a\x01b", b"a\x7fb", b"/\xff", b"\xff", b"",
]  # fmt: skip
_EDGE_NAMES = [
    b":method", b":path", b":status", b"host", b"cookie", b"te", b"content-length", b"X-A",
    b"connection", b"upgrade", b"", b"x a", b"x:a",
]  # fmt: skip
_PLAIN_VALUES = st.sampled_from([b"plain"] * 8 + _EDGE_VALUES)
_VALUES = st.one_of(_PLAIN_VALUES, _PLAIN_VALUES, _PLAIN_VALUES, st.binary(max_size=12))
_NAMES = st.sampled_from([b"x-a", b"accept", b"x-b"] * 8 + _EDGE_NAMES)


def _sections() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """A request's four pseudo-fields, each mostly its plain value, then fields of any kind."""
    pseudo = st.tuples(
        *(st.tuples(st.just(n), st.sampled_from([v] * 40 + _EDGE_VALUES)) for n, v in BASE)
    )
    extra = st.lists(st.tuples(_NAMES, _VALUES), max_size=5)
    return st.tuples(pseudo, extra).map(lambda parts: [*parts[0], *parts[1]])


@given(_sections())
@settings(max_examples=600)
def test_an_accepted_section_becomes_exactly_one_well_formed_backend_head(
    fields: list[tuple[bytes, bytes]],
) -> None:
    """Whatever a client sends, what request_fields accepts becomes a head llhttp (strict)
    reads as one request, with the same method, target and Host and nothing smuggled in."""
    try:
        method, path, authority, regular = request_fields(fields)
    except MalformedFields:
        return
    if authority is None or method == b"CONNECT":
        return  # (the flow answers 400)
    if any(n == b"content-length" and not v.isdigit() for n, v in regular):
        return  # (h2 itself refuses a content-length that is not digits)
    if not _llhttp_knows(method):
        return  # (an extension method goes on as it is: the backend's to judge)
    head, _, _ = backend_head(
        method, "1.1", False, True, path, [(b"host", authority), *regular], b"192.0.2.1",
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\n", True, None,
    )  # fmt: skip
    seen: dict[str, object] = {"heads": 0, "headers": []}

    class Sink:
        def on_url(self, url: bytes) -> None:
            seen["url"] = seen.get("url", b"") + url  # type: ignore[operator]

        def on_header(self, name: bytes, value: bytes) -> None:
            seen["headers"].append((name.lower(), value))  # type: ignore[attr-defined]

        def on_headers_complete(self) -> None:
            seen["heads"] += 1  # type: ignore[operator]

    parser = httptools.HttpRequestParser(Sink())
    parser.feed_data(head)  # (raises on anything llhttp finds malformed)
    assert seen["heads"] == 1 and parser.get_method() == method
    assert seen["url"] == path
    hosts = [v for n, v in seen["headers"] if n == b"host"]  # type: ignore[attr-defined]
    assert hosts == [authority]
    names = {n for n, _ in seen["headers"]}  # type: ignore[attr-defined]
    assert b"x-injected" not in names and b"connection" not in {n for n, _ in regular}


def _llhttp_knows(method: bytes) -> bool:
    try:
        httptools.HttpRequestParser(object()).feed_data(method + b" / HTTP/1.1\r\n")
    except httptools.HttpParserError:
        return False
    return True
