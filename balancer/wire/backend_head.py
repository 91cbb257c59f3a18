"""The head a backend is sent for a client's request: re-serialised from the parsed fields,
hop-by-hop headers handled (RFC 9110 §7.6.1), forwarding headers added, the Connection
header the backend connection's mode needs. Its one caller per protocol reads the client's
head (http1.RequestReader); the backend always hears HTTP/1.x.

Pure: no sockets, no asyncio, no clock.
"""

from __future__ import annotations

from typing import Final

from balancer.wire.errors import BadRequest, BodyTooLarge, CodingNotImplemented

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the forwarding headers we set ourselves.
_DROPPED: Final = frozenset(
    b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade "
    b"x-forwarded-proto x-forwarded-port".split()
)
# Request headers backend_head looks at; any other is copied as it came.
_NOTED: Final = _DROPPED | {b"x-forwarded-for", b"host", b"content-length"}
_REQUEST_LINE_ENDS: Final = {"1.1": b"HTTP/1.1\r\n", "1.0": b"HTTP/1.0\r\n"}  # versions we accept
_CONNECTION_OPTIONS: Final = frozenset((b"close", b"keep-alive", b"upgrade"))


def backend_head(
    method: bytes,
    version: str,
    upgrade: bool,
    keep_alive: bool,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    client_ip: bytes,
    forwarded: bytes,
    backend_keep_alive: bool,
    max_body_bytes: int | None,
) -> tuple[bytes, bool, bytes | None]:
    """The head the backend is sent, from a request's parsed fields: (head bytes, whether its
    body is chunked, its host). `forwarded` is the X-Forwarded-Proto/-Port lines; with
    `backend_keep_alive` the backend is asked to keep its connection whatever the client said.
    Raises a ClientError for a head no proxy may forward."""
    named_by_connection: set[bytes] | None = None
    chunked = False
    hosts = 0
    upgrade_value = b""
    forwarded_for = b""
    length: bytes | None = None
    target, authority = origin_form(url)
    lines = [b"%b %b %b" % (method, target, _REQUEST_LINE_ENDS[version])]
    host = authority
    if authority is not None:  # RFC 9112 §3.2.2: the target's host replaces Host
        lines.append(b"Host: %b\r\n" % authority)
        hosts = 1
    for name, value in headers:
        lower = name.lower()
        if lower not in _NOTED:
            lines.append(b"%b: %b\r\n" % (name, value))
            continue
        if lower == b"connection":
            named_by_connection = named_by_connection or set()
            named_by_connection.update(t.strip().lower() for t in value.split(b","))
        elif lower == b"transfer-encoding":
            if version == "1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if value.strip().lower() != b"chunked":
                # We re-chunk the body ourselves; any other coding would be lost or wrong.
                raise CodingNotImplemented(f"Transfer-Encoding: {value!r}")
            chunked = True
        elif lower == b"upgrade":
            upgrade_value = value
        elif lower == b"x-forwarded-for":
            forwarded_for = value + b", " if not forwarded_for else forwarded_for + value + b", "
            continue
        elif lower == b"host":
            if authority is not None:
                continue
            hosts += 1
            host = value
        elif lower == b"content-length":
            length = value  # llhttp has checked it is one valid number
        if lower in _DROPPED:
            continue
        lines.append(b"%b: %b\r\n" % (name, value))
    if version == "1.1" and hosts != 1:
        raise BadRequest("HTTP/1.1 request needs exactly one Host header")
    limit = max_body_bytes
    if limit is not None and length is not None and int(length) > limit:
        raise BodyTooLarge(f"Content-Length {int(length)} over {limit} bytes")  # before any byte
    if named_by_connection and not named_by_connection <= _CONNECTION_OPTIONS:
        lines = [
            line
            for line in lines
            if line.split(b":", 1)[0].lower() not in named_by_connection or line is lines[0]
        ]
    lines.append(b"X-Forwarded-For: %b%b\r\n" % (forwarded_for, client_ip))
    lines.append(forwarded)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        lines.append(b"Connection: upgrade\r\nUpgrade: %b\r\n" % upgrade_value)
    elif backend_keep_alive:
        if version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
    elif version == "1.1" and not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif version == "1.0" and keep_alive:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked, host


def origin_form(url: bytes) -> tuple[bytes, bytes | None]:
    """An absolute-form target (`http://host:port/path?q`) as (origin-form, authority); any
    other target as (itself, None). A proxy must take the Host from such a target and ignore
    the Host header (RFC 9112 §3.2.2); the backend gets the origin form, as nginx sends it."""
    if url[:1] == b"/" or b"://" not in url[:9]:
        return url, None  # the common case, decided by two slices
    scheme, _, rest = url.partition(b"://")
    if scheme.lower() not in (b"http", b"https"):
        raise BadRequest(f"absolute-form target with scheme {scheme!r}")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise BadRequest("absolute-form target without a host, or with userinfo")
    if not path.startswith(b"/"):
        path = b"/" + path
    return path, authority
