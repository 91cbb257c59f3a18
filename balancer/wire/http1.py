"""HTTP/1.x requests at the byte level; with http1_response.py, the only code that slices HTTP.

- `RequestReader`: client bytes in, bytes for the backend out. Request heads are parsed by
  httptools (llhttp, strict) and re-serialised from the parsed fields (backend_head.py:
  forwarding headers added, hop-by-hop headers handled); bodies are streamed, re-chunked
  when chunked.
- `ResponseFramer` and `error_response` (http1_response.py, re-exported here): the backend's
  responses followed, the balancer's own written.

Pure: no sockets, no asyncio, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

import httptools

from balancer.wire.backend_head import backend_head
from balancer.wire.errors import (
    BadRequest,
    BodyTooLarge,
    ClientError,
    HeaderTooLarge,
    MethodNotAllowed,
    URITooLong,
    VersionNotSupported,
)
from balancer.wire.http1_response import ResponseFramer, error_response

MAX_HEADERS: Final = 100
# A chunk-size line is a hex size and optional extensions; real ones are a few bytes. llhttp
# streams them without a bound (5,000 leading zeros parse), so the reader bounds them itself.
MAX_CHUNK_LINE_BYTES: Final = 4096
_CRLF: Final = 2
# Per head in a read, for the chunk-line average (_check_framing).
_HEAD_WHITESPACE_SLACK: Final = 256


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_header_bytes: int = 16384
    max_uri_bytes: int = 8192
    max_headers: int = MAX_HEADERS
    max_body_bytes: int | None = None
    hashed_header: bytes | None = None  # (lower case) its value goes with the head: policy hash


class RequestHead(NamedTuple):
    """What the proxy needs to know of a request it forwarded (a tuple: made per request)."""

    method: bytes
    keep_alive: bool
    upgrade: bool
    target: bytes  # as the client sent it
    host: bytes | None  # the Host header's value, or the absolute-form target's authority
    hashed: bytes | None  # HeadLimits.hashed_header's value (policy hash), if it was sent
    # HTTP/1.0 with Connection: keep-alive: its response must say keep-alive too, or the
    # client takes the connection to end with it (RFC 9112 §9.3; ab -k waits for the close).
    keep_alive_10: bool = False


# RequestHead(...) runs a Python-level __new__; this is the same tuple at half the cost.
# (Final, both: docs/ARCHITECTURE.md, "The compiled build".)
_new_head: Final = tuple.__new__
_RequestHead: Final = RequestHead


class RequestReader:
    """Parses a client's request stream and produces the stream to send to the backend.

    `feed(data)` returns the bytes to forward (possibly empty) and appends a `RequestHead` to
    `heads` for each head completed. Input it will not forward stops the parser and sets `error`
    (a `ClientError`); what was parsed before it is still returned, so pipelined requests ahead
    of a bad one are served. After an `Upgrade` request the parser stops: the unparsed rest waits in
    `upgrade_rest` until the proxy knows whether the backend switched protocols. After a request
    that ends the connection (`Connection: close`, or HTTP/1.0 without keep-alive) nothing more
    is read: `finished` is set and later bytes are dropped (RFC 9112 §9.6).
    """

    __slots__ = (
        "_body_bytes",
        "_chunked",
        "_client_ip",
        "_closing_request",
        "_ends_at_item",
        "_fed_consumed",
        "_forwarded",
        "_framing_allowance",
        "_framing_line_bytes",
        "_head_bytes",
        "_headers",
        "_host",
        "_in_framing",
        "_in_trailers",
        "_limits",
        "_out",
        "_parser",
        "_pending_head_bytes",
        "_read_has_chunking",
        "_trailer_bytes",
        "_url",
        "backend_keep_alive",
        "bodies",
        "error",
        "finished",
        "heads",
        "in_body",
        "in_head",
        "message_ends",
        "messages_completed",
        "split_messages",
        "upgrade_rest",
    )  # no instance dict: ~0.4 KB less per reader
    __deletable__ = ("_parser",)  # by close() (a compiled build asks this of a deleted slot)

    def __init__(self, client_ip: str, proto: str, port: int, limits: HeadLimits) -> None:
        self.rebind(client_ip, proto, port)
        self._limits = limits
        self._parser = _new_parser(self)
        self._out: list[bytes] = []
        self._url = b""
        self._host: bytes | None = None  # the head's, for routing (RequestHead.host)
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._pending_head_bytes = 0
        self._fed_consumed = 0  # bytes of the current read used by complete heads and bodies
        self._chunked = False
        self._body_bytes = 0
        # Chunked-body framing between data: a chunk-size line, or the trailer section.
        self._in_framing = False
        self._in_trailers = False
        self._framing_line_bytes = 0
        self._trailer_bytes = 0
        self._framing_allowance = 0  # chunk framing this read may hold (see _check_framing)
        self._read_has_chunking = False  # this read held chunked framing: check it
        self.in_head = False
        self.in_body = False
        self.heads: list[RequestHead] = []
        self.messages_completed = 0
        # Each request read whole whose body had bytes, as (heads, bytes): how many heads
        # this read has given so far, its own the last (0: its head came in an earlier read),
        # and its body's bytes, chunked framing not counted. The caller drains it.
        self.bodies: list[tuple[int, int]] = []
        self.upgrade_rest: bytes | None = None
        self.error: ClientError | None = None
        self.finished = False  # a request that closes the connection has been read whole
        self._closing_request = False
        # With split_messages set, `message_ends` holds, after each feed(), the offsets in its
        # output where a request ended (for per-request dispatch to different backends).
        self.split_messages = False
        self.message_ends: list[int] = []
        # Ask the backend to keep its connection whatever the client said (reuse modes): the
        # client's own close is the balancer's to honour, on the client leg.
        self.backend_keep_alive = False
        self._ends_at_item: list[int] = []

    def rebind(self, client_ip: str, proto: str, port: int) -> None:
        """Serve another connection's requests. Valid between messages, after a keep-alive
        one: llhttp is then at the start of a message, exactly as new."""
        self._forwarded = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Port: %d\r\n" % (
            proto.encode(),
            port,
        )
        self._client_ip = client_ip.encode()

    def feed(self, data: bytes) -> bytes:
        if self.error is not None or self.finished:
            return b""
        self._fed_consumed = 0
        self._framing_allowance = 0
        self._read_has_chunking = self._chunked  # it begins inside a chunked body
        in_body_before, completed_before = self.in_body, self.messages_completed
        # Gathered in a local, not read back from self.error: a compiled build trusts the
        # narrowing above (self.error is None) through the calls below that may set it.
        error: ClientError | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade_rest = data[upgrade.args[0] :]
        except httptools.HttpParserError as failure:
            # After a request that closes, llhttp refuses what follows ("Data after
            # Connection: close") before any callback: those bytes are dropped, not an error.
            if not self.finished:
                # httptools wraps what our callbacks raise; unwrap our own typed errors.
                cause = failure.__cause__ or failure.__context__
                error = cause if isinstance(cause, ClientError) else BadRequest(str(failure))
        except ClientError as failure:
            error = failure
        if self.in_head:
            # An incomplete head is at most what arrived since it began: this read less what
            # earlier messages in it used (a slight over-estimate), plus later reads.
            self._pending_head_bytes += len(data)
            if self._pending_head_bytes > self._limits.max_header_bytes:
                error = error or HeaderTooLarge("request head incomplete past the limit")
            elif self._pending_head_bytes == len(data) and not self._headers:
                error = error or _http09(data)  # (the head began this read: at its start)
        elif self._read_has_chunking and error is None and not self.finished:
            # (after a closing request the rest of the read is dropped unparsed: not checked)
            error = self._check_framing(data)
            if error is not None:
                # Found after parsing: forward nothing of this read. What had gone out before
                # it decides whether the backend holds part of a request (see in_body).
                self._out = []
                self._ends_at_item = []
                self.heads.clear()
                self.bodies.clear()
                self.in_body, self.messages_completed = in_body_before, completed_before
        if error is not None:
            # Kept with its traceback, the error would hold this frame, which holds it and the
            # reader: a reference cycle. Its type and message are all that is read.
            self.error = error.with_traceback(None)
        out = self._out
        if not out:
            return b""
        self._out = []
        if self._ends_at_item:
            self._mark_ends(out)
        return out[0] if len(out) == 1 else b"".join(out)

    def _mark_ends(self, out: list[bytes]) -> None:
        """Turn the output item counts at each message's end into byte offsets."""
        ends, items = self.message_ends, self._ends_at_item
        self._ends_at_item = []
        offset = index = 0
        for count in items:
            while index < count:
                offset += len(out[index])
                index += 1
            ends.append(offset)

    def _check_framing(self, data: bytes) -> ClientError | None:
        """Bound chunk-size lines and trailers in a read that held chunked-body framing.

        llhttp streams chunk-size lines of any length and reports neither their length nor
        where they lie in a read, so two bounds are taken here. A line the read ends inside of
        is measured exactly: the bytes after the last LF (a framing line holds none), or the
        whole read added to the count so far when it holds no LF. Whole lines are bounded on
        average: the read's bytes that were neither heads nor chunk data may not exceed
        MAX_CHUNK_LINE_BYTES per chunk-size line completed in it, plus its CRLFs and trailers
        (which have their own bound: max_header_bytes, like a head).
        """
        unfinished = 0
        if self._in_framing:
            newline = data.rfind(b"\n")
            unfinished = (
                self._framing_line_bytes + len(data) if newline < 0 else len(data) - newline - 1
            )
            self._framing_line_bytes = unfinished
            if self._in_trailers:
                if self._trailer_bytes + unfinished > self._limits.max_header_bytes:
                    limit = self._limits.max_header_bytes
                    return HeaderTooLarge(f"request trailers over {limit} bytes")
                self._framing_allowance += self._limits.max_header_bytes
            elif unfinished > MAX_CHUNK_LINE_BYTES:
                return BadRequest(f"chunk-size line over {MAX_CHUNK_LINE_BYTES} bytes")
        if len(data) - self._fed_consumed - unfinished > self._framing_allowance:
            return BadRequest(
                f"chunk-size lines over {MAX_CHUNK_LINE_BYTES} bytes on average in one read"
            )
        return None

    def close(self) -> None:
        """The connection is over: let go of the parser, which holds this reader's callbacks
        (a reference cycle the cyclic GC would otherwise have to find)."""
        del self._parser

    def resume_after_declined_upgrade(self) -> bytes:
        """The backend answered an Upgrade request without 101: parse what followed as HTTP."""
        rest, self.upgrade_rest = self.upgrade_rest or b"", None
        self._parser = _new_parser(self)
        return self.feed(rest) if rest else b""

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.in_head = True
        self._pending_head_bytes = -self._fed_consumed
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, piece: bytes) -> None:
        url = self._url = self._url + piece if self._url else piece
        if len(url) > self._limits.max_uri_bytes:
            raise URITooLong(f"request target over {self._limits.max_uri_bytes} bytes")
        self._count(len(piece))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A chunked trailer: dropped (we re-chunk and end the body ourselves), but bounded.
            self._in_trailers = True
            self._trailer_bytes += len(name) + len(value) + 4
            self._framing_allowance += len(name) + len(value) + 4
            if self._trailer_bytes > self._limits.max_header_bytes:
                raise HeaderTooLarge(f"request trailers over {self._limits.max_header_bytes} bytes")
            return
        headers = self._headers
        headers.append((name, value.rstrip(b" \t")))  # llhttp strips only leading OWS
        if len(headers) > self._limits.max_headers:
            raise HeaderTooLarge(f"more than {self._limits.max_headers} header fields")
        self._head_bytes += len(name) + len(value) + 4  # _count, inline: once per header
        if self._head_bytes > self._limits.max_header_bytes:
            raise HeaderTooLarge(f"request head over {self._limits.max_header_bytes} bytes")

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.max_header_bytes:
            raise HeaderTooLarge(f"request head over {self._limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            if version[:2] == "1.":  # RFC 9110 §2.5: a later 1.x minor is read as 1.1
                version = "1.1"
            elif version == "0.9":  # llhttp's name for a request line without a version
                raise BadRequest("an HTTP/0.9 request (no version): not served")
            else:
                raise VersionNotSupported(f"HTTP/{version}")
        method = parser.get_method()
        if method == b"CONNECT":
            raise MethodNotAllowed("CONNECT is not proxied")
        upgrade = parser.should_upgrade()
        keep_alive = parser.should_keep_alive()
        head, self._chunked, self._host = backend_head(
            method, version, upgrade, keep_alive, self._url, self._headers, self._client_ip,
            self._forwarded, self.backend_keep_alive, self._limits.max_body_bytes,
        )  # fmt: skip
        self._body_bytes = 0
        self._fed_consumed += self._head_bytes + len(method) + 14  # request line, final CRLF
        # That count assumes "name: value" lines: whitespace around values is not counted.
        self._framing_allowance += _HEAD_WHITESPACE_SLACK
        self._out.append(head)
        if self._chunked:
            self._enter_framing()
        self.in_head = False
        self.in_body = True
        self._closing_request = not keep_alive and not upgrade
        hashed = None
        wanted = self._limits.hashed_header
        if wanted is not None:  # (only a listener with a group hashing a header or cookie)
            hashed = next((v for n, v in self._headers if n.lower() == wanted), None)
        keeps_10 = keep_alive and version == "1.0"
        self.heads.append(
            _new_head(
                _RequestHead, (method, keep_alive, upgrade, self._url, self._host, hashed, keeps_10)
            )
        )

    def _enter_framing(self) -> None:
        self._read_has_chunking = True
        self._in_framing = True
        self._framing_line_bytes = 0

    def on_chunk_header(self) -> None:
        # The size line is whole. Until a data byte arrives this may be the last chunk, whose
        # trailer section follows: bound what comes as trailer lines.
        self._read_has_chunking = True
        self._in_trailers = True
        self._trailer_bytes = 0
        self._framing_line_bytes = 0
        self._framing_allowance += MAX_CHUNK_LINE_BYTES + _CRLF

    def on_chunk_complete(self) -> None:
        self._enter_framing()
        self._in_trailers = False
        self._framing_allowance += _CRLF  # after the data, or ending the trailers

    def on_body(self, body: bytes) -> None:
        self._fed_consumed += len(body)
        self._body_bytes += len(body)
        limit = self._limits.max_body_bytes
        if limit is not None and self._body_bytes > limit:  # chunked: found while streaming
            raise BodyTooLarge(f"request body over {limit} bytes")
        if self._chunked:
            self._in_framing = self._in_trailers = False
            self._out.append(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
            self._chunked = False
            self._in_framing = self._in_trailers = False
            self._framing_allowance += _CRLF
        self.in_body = False
        self.messages_completed += 1
        if self._body_bytes:
            self.bodies.append((len(self.heads), self._body_bytes))
        if self.split_messages:
            self._ends_at_item.append(len(self._out))
        # A request that closes the connection is the last one read. A flag, not an exception
        # out of the callback: an exception's traceback holds this frame and the caller's,
        # a reference cycle left to the cyclic GC on every HTTP/1.0 connection.
        if self._closing_request:
            self.finished = True


_RequestParser: Final = httptools.HttpRequestParser  # (Final: as _new_head)


def _new_parser(reader: RequestReader) -> httptools.HttpRequestParser:
    parser = _RequestParser(reader)
    parser.set_dangerous_leniencies(lenient_version=True)  # any digits: judged by the reader
    return parser


def _http09(data: bytes) -> BadRequest | None:
    """A read that begins with a whole request line and no version (`GET /`: HTTP/0.9, whose
    client waits for an answer, where llhttp would wait for header lines): 400 at once."""
    end = data.find(b"\n")
    if end < 0:
        return None
    parts = data[:end].rstrip(b"\r").split(b" ")
    if len(parts) == 2 and parts[0].isalpha() and parts[0].isupper() and parts[1]:
        return BadRequest("an HTTP/0.9 request (no version): not served")
    return None


__all__ = [
    "HeadLimits", "RequestHead", "RequestReader", "ResponseFramer", "error_response",
]  # fmt: skip
