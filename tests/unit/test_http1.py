"""The HTTP seam: request heads re-serialised, response boundaries followed, no sockets."""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.wire.errors import (
    BadBackendResponse,
    BadRequest,
    BodyTooLarge,
    ClientError,
    CodingNotImplemented,
    HeaderTooLarge,
    MethodNotAllowed,
    URITooLong,
    VersionNotSupported,
)
from balancer.wire.http1 import (
    MAX_CHUNK_LINE_BYTES,
    HeadLimits,
    RequestReader,
    ResponseFramer,
    error_response,
)


def reader(**limits: int) -> RequestReader:
    return RequestReader("192.0.2.7", "https", 443, HeadLimits(**limits))


def head_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_head_is_rewritten_with_forwarding_headers_and_without_hop_by_hop() -> None:
    r = reader()
    out = r.feed(
        b"GET /p?q=1 HTTP/1.1\r\nHost: example\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nAccept: */*\r\n\r\n"
    )
    assert head_lines(out) == [
        b"GET /p?q=1 HTTP/1.1",
        b"Host: example",
        b"Accept: */*",
        b"X-Forwarded-For: 10.0.0.1, 192.0.2.7",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Port: 443",
    ]
    assert r.heads[0].method == b"GET" and r.heads[0].keep_alive


def test_connection_intent_is_kept() -> None:
    out = reader().feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Connection: close" in head_lines(out)
    r = reader()
    out = r.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert head_lines(out)[0] == b"GET / HTTP/1.0"
    assert b"Connection: keep-alive" in head_lines(out)
    r = reader()
    out = r.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert not r.heads[0].keep_alive
    assert not any(line.startswith(b"Connection") for line in head_lines(out))


def test_chunked_body_is_rechunked_and_trailers_dropped() -> None:
    r = reader()
    out = r.feed(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert r.messages_completed == 1


def test_content_length_body_streams_through_in_pieces() -> None:
    r = reader()
    out = r.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
    assert out.endswith(b"\r\n\r\nabc") and r.in_body
    assert r.feed(b"def") == b"def"
    assert not r.in_body and r.messages_completed == 1


def test_pipelined_requests_all_come_out_and_an_error_keeps_what_came_before() -> None:
    r = reader()
    out = r.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nBAD\r\n\r\n")
    assert out.count(b"HTTP/1.1\r\n") == 2
    assert [h.method for h in r.heads] == [b"GET", b"GET"]
    assert isinstance(r.error, BadRequest)
    assert r.feed(b"GET / HTTP/1.1\r\n\r\n") == b""  # a dead parser stays dead


def test_a_later_http_1_minor_version_is_read_as_1_1() -> None:
    r = reader()  # RFC 9110 §2.5
    out = r.feed(b"GET /v HTTP/1.2\r\nHost: x\r\n\r\n")
    assert out.startswith(b"GET /v HTTP/1.1\r\n") and r.error is None and r.heads[0].keep_alive


def test_a_request_line_whose_version_is_still_coming_is_waited_for() -> None:
    r = reader()
    assert r.feed(b"GET /slow HTTP/1.1\r\n") == b"" and r.error is None and r.in_head


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET /" + b"u" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n", URITooLong),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 1200 + b"\r\n\r\n", HeaderTooLarge),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 1200, HeaderTooLarge),
        (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", HeaderTooLarge),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", VersionNotSupported),
        (b"GET / HTTP/0.5\r\nHost: x\r\n\r\n", VersionNotSupported),
        (b"GET /\r\n", BadRequest),  # HTTP/0.9: refused at once, not left to the timeout
        (b"GET /\r\n\r\n", BadRequest),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", MethodNotAllowed),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", BadRequest),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            BadRequest,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", BadRequest),
        (b"GET / HTTP/1.1\nHost: a\n\n", BadRequest),
        (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", BadRequest),  # bare CR
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", BadRequest),  # NUL
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", BadRequest),  # space before the colon
    ],
)
def test_requests_that_are_not_forwarded(data: bytes, error: type) -> None:
    r = reader(max_uri_bytes=64, max_header_bytes=1000)
    assert r.feed(data) == b""
    assert type(r.error) is error


def test_limit_counts_a_trickled_head() -> None:
    r = reader(max_header_bytes=100)
    r.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(20):
        r.feed(b"X-Slow: 12345\r\n"[:8])
    assert isinstance(r.error, HeaderTooLarge)


def test_body_before_a_pipelined_partial_head_does_not_count_against_the_limit() -> None:
    r = reader(max_header_bytes=200)
    body = b"b" * 5000
    r.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body + b"GET / HT")
    assert r.error is None and r.in_head


def test_upgrade_stops_parsing_until_the_backend_answers() -> None:
    r = reader()
    out = r.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\nraw")
    assert b"Connection: upgrade\r\nUpgrade: ws" in out
    assert r.upgrade_rest == b"raw" and r.heads[0].upgrade
    declined = reader()
    declined.feed(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    declined.heads.clear()
    again = declined.resume_after_declined_upgrade()
    assert again.startswith(b"GET /next HTTP/1.1\r\n") and len(declined.heads) == 1


# Response framing ------------------------------------------------------------------------

RESPONSES = [
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (False, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    (
        False,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"1;x=y\r\nz\r\n0\r\nT: 1\r\n\r\n",
    ),
    (True, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),  # HEAD: no body
    (False, b"HTTP/1.1 204 No Content\r\n\r\n"),
    (False, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    (False, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    (False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
]


def feed_all(framer: ResponseFramer, pieces: list[bytes]) -> bytes:
    return b"".join(framer.feed(piece) for piece in pieces)


# Correctness properties, not timings: no per-example deadline on a loaded CI machine.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_framer_finds_the_same_boundaries_however_the_bytes_are_split(cuts: list[int]) -> None:
    stream = b"".join(data for _, data in RESPONSES)
    framer = ResponseFramer()
    for is_head, _ in RESPONSES:
        framer.expect(is_head)
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert feed_all(framer, pieces) == stream
    assert framer.completed == len(RESPONSES)
    assert framer.awaiting == 0 and not framer.in_message and not framer.close_after
    assert framer.sizes == [len(data) for _, data in RESPONSES]  # each response's own bytes


def test_framer_sizes_are_the_bytes_relayed_rewrites_and_close_delimited_bodies_included() -> None:
    framer = ResponseFramer()
    framer.expect(False, closes=True)  # the response gets Connection: close added
    out = framer.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    framer.expect(False)
    out2 = framer.feed(b"HTTP/1.1 200 OK\r\n\r\nabc") + framer.feed(b"defg")
    assert framer.eof()  # the close ends the second body
    assert b"connection: close" in out.lower()
    assert framer.sizes == [len(out), len(out2)] and len(out2) == 26


def test_an_http10_keep_alive_request_gets_a_response_that_says_keep_alive() -> None:
    """RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only if the response says
    keep-alive; an HTTP/1.1 backend's response need not (ab -k waited for a close)."""
    framer = ResponseFramer()
    framer.expect(False, keeps_10=True)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\n"
    out = framer.feed(head + b"ok")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    assert framer.sizes == [len(out)] and not framer.close_after
    said = b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
    framer.expect(False, keeps_10=True)
    assert framer.feed(said) == said  # said already: relayed untouched
    closes = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    framer.expect(False, keeps_10=True)
    assert framer.feed(closes) == closes and framer.close_after  # it closes: as it says
    plain = ResponseFramer()
    plain.expect(False)  # an HTTP/1.1 request: nothing to add
    assert plain.feed(head + b"ok") == head + b"ok"


def test_framer_tracks_keep_alive_and_close_delimited_bodies() -> None:
    framer = ResponseFramer()
    framer.expect(False)
    framer.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert framer.completed == 1 and framer.close_after
    old = ResponseFramer()
    old.expect(False)
    old.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    assert old.in_message and old.completed == 0
    assert old.eof() is True and old.completed == 1 and old.close_after


def test_framer_eof_mid_body_is_a_truncation() -> None:
    framer = ResponseFramer()
    framer.expect(False)
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert framer.eof() is False


def test_framer_101_turns_into_a_tunnel() -> None:
    framer = ResponseFramer()
    framer.expect(False)
    out = framer.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n\x81\x00")
    assert framer.upgraded and out.endswith(b"\x81\x00")
    assert framer.feed(b"anything") == b"anything"
    assert (framer.statuses, framer.sizes) == ([101], [len(out) - 2])  # the tunnel's are not


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 099 Nothing\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_framer_refuses_ambiguous_responses(head: bytes) -> None:
    framer = ResponseFramer()
    framer.expect(False)
    with pytest.raises(BadBackendResponse):
        framer.feed(head)


def test_framer_takes_a_repeated_equal_content_length_as_one() -> None:
    framer = ResponseFramer()
    framer.expect(False)
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3 \r\nConnection: x, close\r\n\r\nabc")
    assert framer.completed == 1 and framer.close_after


def test_framer_adds_connection_close_while_draining() -> None:
    framer = ResponseFramer()
    framer.force_close = True
    framer.expect(False)
    out = framer.feed(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert framer.close_after


def test_error_responses_are_complete_http_with_connection_close() -> None:
    for status in (400, 408, 414, 431, 502, 503, 504, 505):
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.receive_data(error_response(status))
        response = client.next_event()
        assert isinstance(response, h11.Response) and response.status_code == status
        headers = dict(response.headers)
        assert headers[b"connection"] == b"close"
        assert isinstance(client.next_event(), h11.Data)
        assert isinstance(client.next_event(), h11.EndOfMessage)
    assert b"Retry-After: 1" in error_response(503, 1)


def test_body_limit_by_content_length_refuses_before_forwarding() -> None:
    r = reader(max_body_bytes=10)
    out = r.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert out == b"" and type(r.error) is BodyTooLarge


def test_body_limit_on_a_chunked_body_is_found_while_streaming() -> None:
    r = reader(max_body_bytes=10)
    out = r.feed(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n"
    )
    assert out.endswith(b"8\r\n12345678\r\n") and r.error is None
    r.feed(b"8\r\n12345678\r\n")
    assert type(r.error) is BodyTooLarge


_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("split", [None, 1, 700])
def test_an_unfinished_chunk_size_line_is_refused_past_the_limit_however_it_arrives(split) -> None:
    r = reader()
    line = b"5;ext=" + b"e" * MAX_CHUNK_LINE_BYTES
    forwarded = r.feed(_CHUNKED_HEAD)
    parts = [line] if split is None else [line[i : i + split] for i in range(0, len(line), split)]
    for part in parts:
        forwarded += r.feed(part)
    assert type(r.error) is BadRequest and "chunk-size line" in str(r.error)
    assert forwarded.endswith(b"\r\n\r\n")  # the head went out, nothing of the line did
    assert r.in_body  # so the proxy answers now instead of after a response


def test_a_whole_oversized_chunk_size_line_withholds_the_read() -> None:
    r = reader()
    out = r.feed(_CHUNKED_HEAD + b"0" * 9000 + b"5\r\nhello\r\n0\r\n\r\n")
    assert out == b"" and r.heads == [] and not r.in_body and r.messages_completed == 0
    assert type(r.error) is BadRequest and "chunk-size lines" in str(r.error)


def test_chunk_extensions_under_the_limit_pass_and_are_dropped() -> None:
    r = reader()
    body = b"5;name=" + b"v" * 3000 + b"\r\nhello\r\n" + b"1;a=b\r\n!\r\n0\r\n\r\n"
    out = r.feed(_CHUNKED_HEAD + body)  # whole, then in 1000-byte reads
    out += r.feed(_CHUNKED_HEAD)
    out += b"".join(r.feed(body[i : i + 1000]) for i in range(0, len(body), 1000))
    assert r.error is None and r.messages_completed == 2
    assert out.count(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n") == 2 and b"name=" not in out


def test_whitespace_in_many_pipelined_heads_is_not_taken_for_chunk_framing() -> None:
    # The average bound counts a head as "name: value" lines; padded values must not tip it.
    r = reader()
    chunked = _CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n"
    padded = b"GET / HTTP/1.1\r\nHost:   a   \r\nX-A:     b     \r\n\r\n"
    r.feed(chunked + padded * 3000 + chunked[:-5])  # one read, ending inside a chunked body
    assert r.error is None and r.messages_completed == 3001


def test_whitespace_around_values_in_a_plain_request_is_not_chunk_framing() -> None:
    # The chunk-line average applies only to reads that hold chunked framing; optional
    # whitespace (RFC 9110 section 5.6.3) in a plain request was refused as if it were.
    r = reader()
    out = r.feed(
        b"GET / HTTP/1.1\r\nHost: x" + b" " * 300 + b"\r\nX-A:" + b" " * 300 + b"y\r\n\r\n"
    )
    assert r.error is None and r.messages_completed == 1
    assert b"\r\nHost: x\r\nX-A: y\r\n" in out


@pytest.mark.parametrize("split", [None, 1000])
def test_trailers_are_bounded_like_a_head(split) -> None:
    r = reader(max_header_bytes=2000)
    rest = b"5\r\nhello\r\n0\r\n" + b"X-T: t\r\n" * 300 + b"\r\n"
    parts = [rest] if split is None else [rest[i : i + split] for i in range(0, len(rest), split)]
    r.feed(_CHUNKED_HEAD)
    for part in parts:
        r.feed(part)
    assert type(r.error) is HeaderTooLarge and "trailers" in str(r.error)
    one_long = reader(max_header_bytes=2000)
    one_long.feed(_CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-T: " + b"t" * 2500)  # unfinished
    assert type(one_long.error) is HeaderTooLarge


# Fuzzing (issue 5): arbitrary input never escapes as an exception, and what is accepted means
# the same when parsed again.

_TOKENS = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"HEAD",
        b" ",
        b"/",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"\r\n",
        b"\n",
        b":",
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"chunked",
        b"Connection",
        b"close",
        b"keep-alive",
        b"0",
        b"5",
        b"hello",
        b"\t",
        b"X-A",
        b"upgrade",
        b"Upgrade",
        b"\x00",
    ]
)


@PROPERTY
@given(st.lists(_TOKENS, max_size=40).map(b"".join) | st.binary(max_size=300))
def test_reader_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    r = reader()
    r.feed(data)
    assert r.error is None or isinstance(r.error, ClientError)


@PROPERTY
@given(
    method=st.sampled_from([b"GET", b"POST", b"DELETE"]),
    path=st.from_regex(rb"\A/[a-z0-9/._~%-]{0,30}\Z"),
    headers=st.lists(
        st.tuples(st.from_regex(rb"\AX-[A-Za-z0-9-]{1,10}\Z"), st.from_regex(rb"\A[ -~]{0,20}\Z")),
        max_size=5,
    ),
    body=st.binary(max_size=50),
    chunked=st.booleans(),
)
def test_accepted_requests_reserialise_to_the_same_meaning(method, path, headers, body, chunked):
    lines = [b"%b %b HTTP/1.1" % (method, path), b"Host: h"]
    lines += [b"%b: %b" % (name, value.strip()) for name, value in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        framed = (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        framed = body
    first = reader()
    out = first.feed(b"\r\n".join(lines) + b"\r\n\r\n" + framed)
    assert first.error is None and first.messages_completed == 1
    again = RequestReader("192.0.2.7", "https", 443, HeadLimits())
    again.feed(out)
    assert again.error is None and again.messages_completed == 1
    assert again.heads[0].method == method
    seen = _parse_all(out)
    assert seen["path"] == path and seen["body"] == body
    for name, value in headers:
        if name.lower() not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port"):
            assert (name, value.strip()) in seen["headers"]


def _parse_all(data: bytes) -> dict:
    import httptools

    seen: dict = {"headers": [], "body": b"", "path": b""}

    class Sink:
        def on_url(self, url: bytes) -> None:
            seen["path"] += url

        def on_header(self, name: bytes, value: bytes) -> None:
            seen["headers"].append((name, value))

        def on_body(self, body: bytes) -> None:
            seen["body"] += body

    httptools.HttpRequestParser(Sink()).feed_data(data)
    return seen


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", BadRequest),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", CodingNotImplemented),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
            CodingNotImplemented,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            CodingNotImplemented,
        ),
    ],
)
def test_transfer_codings_other_than_chunked_are_refused_before_forwarding(data, error) -> None:
    r = reader()
    assert r.feed(data) == b""  # nothing reaches the backend
    assert type(r.error) is error


def test_nothing_after_a_request_that_closes_is_read() -> None:
    r = reader()
    out = r.feed(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert [h.method for h in r.heads] == [b"GET", b"POST"]
    assert out.endswith(b"\r\n\r\nok") and b"/c" not in out
    assert r.finished and r.error is None and not r.in_head
    assert r.feed(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n") == b"" and len(r.heads) == 2


def test_framer_says_close_only_on_the_response_to_the_request_that_closes() -> None:
    framer = ResponseFramer()
    framer.expect(False, False)
    framer.expect(False, True)
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    out = framer.feed(one + one)
    assert out == one + b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\na"
    assert framer.completed == 2 and framer.close_after and not framer.backend_closes


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na",  # 1.0 without keep-alive closes
        b"HTTP/1.1 200 OK\r\n\r\nuntil the close",  # close-delimited
    ],
)
def test_a_response_that_already_closes_is_relayed_untouched_to_a_closing_request(
    response: bytes,
) -> None:
    # An HTTP/1.0 client's every response (ab's case): nothing to rewrite, not even a copy.
    framer = ResponseFramer()
    framer.expect(False, True)
    assert framer.feed(response) is response
    assert framer.eof() and framer.close_after


@pytest.mark.parametrize(
    ("target", "line", "host"),
    [
        (b"http://a.example/p?q=1", b"GET /p?q=1 HTTP/1.1", b"Host: a.example"),
        (b"HTTP://a.example:8080", b"GET / HTTP/1.1", b"Host: a.example:8080"),
        (b"https://a.example?x", b"GET /?x HTTP/1.1", b"Host: a.example"),
    ],
)
def test_an_absolute_form_target_gives_the_host_and_goes_out_in_origin_form(
    target: bytes, line: bytes, host: bytes
) -> None:
    out = reader().feed(b"GET %b HTTP/1.1\r\nHost: b.example\r\n\r\n" % target)
    lines = head_lines(out)
    assert lines[:2] == [line, host]
    assert b"Host: b.example" not in lines


def test_an_absolute_form_target_without_a_host_header_on_http10_gets_one() -> None:
    lines = head_lines(reader().feed(b"GET http://a.example/ HTTP/1.0\r\n\r\n"))
    assert lines[:2] == [b"GET / HTTP/1.0", b"Host: a.example"]


@pytest.mark.parametrize("target", [b"ftp://a.example/", b"http:///p", b"http://u@a.example/"])
def test_odd_absolute_form_targets_are_400(target: bytes) -> None:
    r = reader()
    r.feed(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    assert isinstance(r.error, BadRequest)


def test_the_backend_head_is_rewritten_from_fields_alone() -> None:
    """backend_head is the one place a head for the backend is made (an HTTP/2 stream's
    fields will take the same path): hop-by-hop headers out, forwarding headers in, the
    client's X-Forwarded-For extended, Host from an absolute-form target."""
    from balancer.wire.backend_head import backend_head

    head, chunked, host = backend_head(
        b"POST", "1.1", False, True, b"http://example.test:8080/a?b",
        [(b"Host", b"ignored"), (b"Keep-Alive", b"timeout=5"), (b"X-Forwarded-For", b"10.0.0.1"),
         (b"Transfer-Encoding", b"chunked"), (b"Accept", b"*/*")],
        b"192.0.2.7", b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\n", True, None,
    )  # fmt: skip
    assert (chunked, host) == (True, b"example.test:8080")
    assert head == (
        b"POST /a?b HTTP/1.1\r\nHost: example.test:8080\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with pytest.raises(BadRequest):  # HTTP/1.1 needs exactly one Host
        backend_head(b"GET", "1.1", False, True, b"/", [], b"1.2.3.4", b"", False, None)
