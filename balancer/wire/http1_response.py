"""HTTP/1.x responses at the byte level: the backend's, followed; the balancer's own, written.

- `ResponseFramer`: backend bytes in, the same bytes out. It tracks message boundaries so the
  session knows when a response has started and ended, and rewrites a head to `Connection:
  close` when its request closes the connection or the balancer is draining.
- `error_response(status)`: the small responses the balancer speaks itself, written with h11.

Pure: no sockets, no asyncio, no clock. The request side is http1.py, which re-exports these.
"""

from __future__ import annotations

import re
from functools import cache
from http import HTTPStatus
from typing import Final

import h11

from balancer.wire.errors import BadBackendResponse

# Response framing -----------------------------------------------------------------------

_FRAMING_HEADERS: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE
)
_CONNECTION_WORDS: Final = frozenset((b"close", b"keep-alive"))
MAX_RESPONSE_HEAD_BYTES: Final = 65536

# What a response answers: (a HEAD request, a request that closes, an HTTP/1.0 request that
# keeps the connection: its response must say so), made once.
_EXPECT: Final = {
    (h, c, k): (h, c, k) for h in (False, True) for c in (False, True) for k in (False, True)
}
_NOTHING: Final = (False, False, False)

# Framer states.
_HEAD: Final = 0
_LENGTH: Final = 1
_CHUNK_SIZE: Final = 2
_CHUNK_DATA: Final = 3
_CHUNK_CRLF: Final = 4
_TRAILER: Final = 5
_UNTIL_CLOSE: Final = 6
_TUNNEL: Final = 7


class ResponseFramer:
    """Follows response boundaries in the backend's byte stream, passing the bytes through.

    Call `expect(is_head, closes)` for each request forwarded, in order, so a HEAD response is
    known to have no body and the response to a request that ends the connection says so.
    `feed(data)` returns the bytes to send to the client: `data` itself unless a head is split
    across reads (held back until whole), or a head that would keep the connection is rewritten
    to `Connection: close` because its request closes or `force_close` (shutdown) is set. It
    raises `BadBackendResponse` for framing that cannot be relayed safely.

    Counters and flags the proxy reads: `started` (final response heads seen), `completed`
    (responses ended), `statuses` and `sizes` (of each response ended: its status, and its
    bytes as relayed, head and any interim responses included; the caller drains both),
    `close_after` (the last completed response ends the connection),
    `backend_closes` (it ends it because the backend said so: the backend will close),
    `upgraded` (a 101 arrived: everything after is a tunnel).
    """

    __slots__ = (
        "_carried",
        "_expect_head",
        "_held",
        "_message_keep_alive",
        "_remaining",
        "_request_closes",
        "_request_keeps_10",
        "_said_keep_alive",
        "_start",
        "_state",
        "_status",
        "backend_closes",
        "client_closes",
        "close_after",
        "completed",
        "force_close",
        "sizes",
        "started",
        "statuses",
        "upgraded",
    )

    def __init__(self) -> None:
        self._state = _HEAD
        self._held = b""
        self._remaining = 0
        # (HEAD request, request closes, HTTP/1.0 request keeping the connection)
        self._expect_head: list[tuple[bool, bool, bool]] = []
        self._request_closes = False  # the response under way answers a request that closes
        self._request_keeps_10 = False  # ... an HTTP/1.0 one that keeps it (see expect)
        self._said_keep_alive = False  # its head says Connection: keep-alive
        self._message_keep_alive = True
        self.force_close = False
        self.started = 0
        self.completed = 0
        self.statuses: list[int] = []  # of responses completed, in order (the caller drains)
        self.sizes: list[int] = []  # their bytes as relayed (likewise)
        # The response under way's bytes relayed before this read, and where in this read
        # its bytes begin (0, or where the one before it ended).
        self._carried = 0
        self._start = 0
        self._status = 0
        self.close_after = False
        self.backend_closes = False
        self.client_closes = False
        self.upgraded = False

    def expect(self, is_head: bool, closes: bool = False, keeps_10: bool = False) -> None:
        """A request was forwarded: a HEAD's response has no body; a request that closes gets
        a response that says close; an HTTP/1.0 request that keeps the connection
        (`keeps_10`) gets one that says keep-alive, whatever the backend's says."""
        self._expect_head.append(_EXPECT[is_head, closes, keeps_10])

    @property
    def awaiting(self) -> int:
        """Requests forwarded whose response has not completed."""
        return len(self._expect_head)

    @property
    def in_message(self) -> bool:
        """A response has started (head or interim bytes seen) and not ended."""
        return self._state not in (_HEAD, _TUNNEL) or bool(self._held)

    def feed(self, data: bytes) -> bytes:
        state = self._state
        if state in (_TUNNEL, _UNTIL_CLOSE):
            self._carried += len(data)
            return data
        if state == _LENGTH and len(data) < self._remaining:
            self._remaining -= len(data)
            self._carried += len(data)
            return data
        if self._held:
            data = self._held + data
            self._held = b""
        out: list[bytes] | None = None
        pos = self._start = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == _HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if size - pos > MAX_RESPONSE_HEAD_BYTES:
                        raise BadBackendResponse("response head too large")
                    self._held = data[pos:]
                    self._carried += pos - self._start
                    return _joined(out, data, 0, pos)
                end += 4
                head = data[pos:end]
                rewritten = None
                if self._on_head(head, end) and self._message_keep_alive:
                    # (A response that says it closes stays as it is.)
                    if self.force_close or self._request_closes:
                        rewritten = _with_close(head)
                    elif self._request_keeps_10 and not self._said_keep_alive:
                        rewritten = _with_keep_alive(head)
                if rewritten is not None:
                    if out is None:
                        out = [data[:pos]]
                    out.append(rewritten)
                    if self._state == _HEAD:  # a response with no body: ended with its head
                        self.sizes[-1] += len(rewritten) - len(head)
                    else:
                        self._carried += len(rewritten) - len(head)
                elif out is not None:
                    out.append(head)
                pos = end
            elif state == _LENGTH:
                take = min(self._remaining, size - pos)
                self._remaining -= take
                if out is not None:
                    out.append(data[pos : pos + take])
                pos += take
                if self._remaining == 0:
                    self._message_done(pos)
            elif state in (_UNTIL_CLOSE, _TUNNEL):
                if out is not None:
                    out.append(data[pos:])
                pos = size
            elif state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                self._remaining -= take
                if out is not None:
                    out.append(data[pos : pos + take])
                pos += take
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            else:  # a line: chunk size, chunk's CRLF, or trailer
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > 4096:
                        raise BadBackendResponse("chunk framing line too long")
                    self._held = data[pos:]
                    self._carried += pos - self._start
                    return _joined(out, data, 0, pos)
                line = data[pos:end]
                if out is not None:
                    out.append(data[pos : end + 2])
                pos = end + 2
                self._on_line(line, pos)
        self._carried += size - self._start
        return _joined(out, data, 0, size)

    def _on_head(self, head: bytes, end: int) -> bool:
        """Set up framing for the body after `head` (which ends at `end` in this read); True
        for a final (non-1xx) response."""
        # "HTTP/1.x NNN" by slices: a regex match cost a third of a short response's framing.
        minor, digits = head[7:8], head[9:12]
        if (
            head[:7] != b"HTTP/1."
            or minor not in (b"0", b"1")
            or head[8:9] != b" "
            or len(digits) != 3
            or not digits.isdigit()
            or digits[:1] == b"0"  # 000-099: no class to relay it as (RFC 9110 §15)
        ):
            raise BadBackendResponse("malformed status line")
        status = self._status = int(digits)
        if status < 200:
            if status == 101:
                self.upgraded = True
                self._state = _TUNNEL
                self._expect_head.clear()
                self.started += 1
                # The request's answer, as far as HTTP goes: what follows is the tunnel's.
                self.statuses.append(101)
                self.sizes.append(self._carried + end - self._start)
                self._carried, self._start = 0, end
            return False  # interim (100 Continue, 103): the final response follows
        self.started += 1
        is_head, self._request_closes, self._request_keeps_10 = (
            self._expect_head[0] if self._expect_head else _NOTHING
        )
        said_keep_alive = False
        length: bytes | None = None
        chunked = False
        keep_alive = minor == b"1"  # the default of the version; Connection may change it
        for name, value in _FRAMING_HEADERS.findall(head):
            name = name.lower()
            if name == b"content-length":
                if not value.isdigit():
                    value = _one_length(value)
                if length is not None and value != length:
                    raise BadBackendResponse("conflicting Content-Length values")
                length = value
            elif name == b"transfer-encoding":
                if value.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                    raise BadBackendResponse("transfer-encoding without final chunked")
                chunked = True
            else:
                value = value.lower()
                tokens = (value,) if value in _CONNECTION_WORDS else value.split(b",")
                for token in tokens:
                    token = token.strip()
                    if token == b"close":
                        keep_alive = False
                    elif token == b"keep-alive":
                        said_keep_alive = True
                        if minor == b"0":
                            keep_alive = True
        if chunked and length is not None:
            raise BadBackendResponse("both Content-Length and Transfer-Encoding")
        self._message_keep_alive = keep_alive
        self._said_keep_alive = said_keep_alive
        if is_head or status in (204, 304):
            self._message_done(end)
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = int(length)
            if self._remaining == 0:
                self._message_done(end)
            else:
                self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self._message_keep_alive = False
        return True

    def _on_line(self, line: bytes, end: int) -> None:
        state = self._state
        if state == _CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadBackendResponse("invalid chunk size") from None
            if size < 0 or not size_text.isalnum():
                raise BadBackendResponse("invalid chunk size")
            if size == 0:
                self._state = _TRAILER
            else:
                self._remaining = size
                self._state = _CHUNK_DATA
        elif state == _CHUNK_CRLF:
            if line:
                raise BadBackendResponse("chunk data longer than its size")
            self._state = _CHUNK_SIZE
        elif not line:  # the empty line that ends the trailer section
            self._message_done(end)

    def _message_done(self, end: int) -> None:
        """The response under way ended at `end` in this read."""
        self.completed += 1
        self.statuses.append(self._status)
        self.sizes.append(self._carried + end - self._start)
        self._carried, self._start = 0, end
        if self._expect_head:
            self._expect_head.pop(0)
        self.backend_closes = not self._message_keep_alive
        self.client_closes = self.force_close or self._request_closes
        self.close_after = self.backend_closes or self.client_closes
        self._state = _HEAD

    def drop_held(self) -> bool:
        """Forget bytes held after the last complete response (reuse modes: they came from a
        connection that is being given up); True if there were any."""
        held, self._held = self._held, b""
        return bool(held)

    def eof(self) -> bool:
        """The backend closed. True when that ends the stream cleanly (at a message boundary, or
        the end of a close-delimited body); False means a response was cut short."""
        if self._state == _UNTIL_CLOSE:
            self._message_done(self._start)  # (its bytes were all carried)
            self.close_after = self.client_closes = True  # the body's end was the close
            return True
        return self._state in (_HEAD, _TUNNEL) and not self._held


def _one_length(value: bytes) -> bytes:
    """A Content-Length value that is a list ("5, 5" is one length; "5, 6" is two)."""
    length: bytes | None = None
    for part in value.split(b","):
        part = part.strip()
        if not part.isdigit() or (length is not None and part != length):
            raise BadBackendResponse("conflicting or invalid Content-Length")
        length = part
    assert length is not None  # split() gives at least one part
    return length


def _joined(out: list[bytes] | None, data: bytes, start: int, end: int) -> bytes:
    if out is None:
        return data if start == 0 and end == len(data) else data[start:end]
    return b"".join(out)


_CONNECTION_LINE: Final = re.compile(
    rb"\r\n(?:connection|keep-alive)[ \t]*:[^\r\n]*", re.IGNORECASE
)


def _with_close(head: bytes) -> bytes:
    """The same response head, ending the connection: used while draining for shutdown."""
    return _CONNECTION_LINE.sub(b"", head[:-2]) + b"Connection: close\r\n\r\n"


def _with_keep_alive(head: bytes) -> bytes:
    """The same response head, keeping an HTTP/1.0 client's connection (it asked, and the
    connection stays): its other Connection options are the backend's hop, not the client's."""
    return _CONNECTION_LINE.sub(b"", head[:-2]) + b"Connection: keep-alive\r\n\r\n"


# Responses the balancer writes itself -------------------------------------------------------


@cache
def error_response(
    status: int, retry_after: int | None = None, explained: str | None = None
) -> bytes:
    """A complete small `text/plain` response with `Connection: close`, rendered once by h11;
    its body is the status line's words, or `explained`."""
    phrase = HTTPStatus(status).phrase
    body = (explained or f"{status} {phrase}\n").encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    # h11 speaks only after it has seen a request; give it a stand-in one.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: balancer\r\n\r\n")
    conn.next_event()
    head = conn.send(h11.Response(status_code=status, headers=headers, reason=phrase))
    data = conn.send(h11.Data(data=body))
    assert head is not None and data is not None
    return head + data
