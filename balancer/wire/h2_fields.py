"""An HTTP/2 request's field sections, checked as RFC 9113 §8.2-8.3 asks, in one pass each.

h2 (python-hyper) can check them itself, but as a chain of generators that walks every name
and value byte by byte in Python: 38 µs of a 105 µs stream on this machine, more than the
rest of its frame handling. Here each field is one dict lookup or one regular expression
match in C, and the same pass splits the section the way the backend's head is built from:
the pseudo-fields, the regular fields (Host folded into :authority, cookie crumbs joined, as
§8.2.3 asks of anything that speaks HTTP/1.1 onwards).

A section that fails is malformed (§8.1.1): its stream is reset with PROTOCOL_ERROR, the
connection goes on. What is checked, beyond what the backend's head needs anyway:

- names: lowercase tokens (§8.2.1, RFC 9110 §5.1); pseudo-fields only the four of a request,
  each once, before any regular field (§8.3);
- values: no NUL, CR or LF, nor any other control character but tab (RFC 9110 §5.5), no
  leading or trailing space or tab (§8.2.1); :method a token, :path visible ASCII without
  spaces ("/..." or "*"), :authority an authority without userinfo (§8.3.1), since they
  become the backend's request line and Host (a property test holds that what is accepted
  is one head llhttp reads as the same request);
- connection-specific fields (Connection, Keep-Alive, Proxy-Connection, Transfer-Encoding,
  Upgrade) and a TE other than "trailers" (§8.2.2); a Host that differs from :authority, or
  two Hosts (§8.3.1);
- trailers: the same characters, no pseudo-field (§8.1).

Pure: no sockets, no asyncio, no clock.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

Fields = list[tuple[bytes, bytes]]

# RFC 9110 §5.6.2's token, in lower case (an upper-case name is malformed in HTTP/2).
_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9113 §8.2.1 names NUL, CR and LF; RFC 9110 §5.5 allows no other control but tab in a
# field value either, and the backend hears HTTP/1.1 (llhttp, for one, refuses them).
# (The edges are looked at apart: one alternation with anchors costs twice the class alone.)
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_EDGE_WHITESPACE: Final = (0x20, 0x09)
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH: Final = re.compile(rb"(?:/[\x21-\x7e]*|\*)")  # (a URI is ASCII: RFC 3986 §2)
_AUTHORITY: Final = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]+")
_PSEUDO: Final = frozenset((b":method", b":scheme", b":path", b":authority"))
# Fields that are HTTP/1's own (RFC 9113 §8.2.2): never in an HTTP/2 field section, either way.
CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


class MalformedFields(Exception):
    """A field section HTTP/2 calls malformed; `args[0]` says why, for the tests and the
    code's reader: the client's reset carries no words, and nothing is logged per stream
    (a client could flood the log); the connection's record counts the resets by code."""


class RequestFields(NamedTuple):
    method: bytes
    path: bytes  # b"" for CONNECT, which carries none
    authority: bytes | None  # :authority, or the Host field in its place
    regular: Fields  # without Host; one cookie field, its crumbs joined


def _bad_value(value: bytes) -> bool:
    """A control character (tab aside), or a space or tab at either end (`value` not empty)."""
    return (
        value[0] in _EDGE_WHITESPACE
        or value[-1] in _EDGE_WHITESPACE
        or _CONTROL.search(value) is not None
    )


def request_fields(fields: Fields) -> RequestFields:
    """A request's header section, checked and split; raises MalformedFields."""
    pseudo: dict[bytes, bytes] = {}
    regular: Fields = []
    cookies: list[bytes] | None = None
    host: bytes | None = None
    for name, value in fields:
        if value and _bad_value(value):
            raise MalformedFields(f"field {name[:40]!r}: a control character or edge whitespace")
        if name[:1] == b":":
            if regular or cookies or host is not None:
                raise MalformedFields(f"pseudo-field {name!r} after a regular field")
            if name not in _PSEUDO or name in pseudo:
                raise MalformedFields(f"pseudo-field {name!r} unknown or repeated")
            pseudo[name] = value
            continue
        if _NAME.fullmatch(name) is None:
            raise MalformedFields(f"field name {name[:40]!r} is not a lowercase token")
        if name in CONNECTION_SPECIFIC:
            raise MalformedFields(f"connection-specific field {name!r}")
        if name == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise MalformedFields("two Host fields")
            host = value
        else:
            if name == b"te" and value.lower() != b"trailers":
                raise MalformedFields("TE other than trailers")
            regular.append((name, value))
    method = pseudo.get(b":method")
    if method is None or _METHOD.fullmatch(method) is None:
        raise MalformedFields("no :method, or not a token")
    authority = pseudo.get(b":authority")
    if authority is None:
        authority = host
    elif host is not None and host != authority:
        raise MalformedFields("Host differs from :authority")
    if authority is not None and _AUTHORITY.fullmatch(authority) is None:
        raise MalformedFields("an :authority that is not host[:port]")
    path = pseudo.get(b":path", b"")
    if method == b"CONNECT":
        if b":scheme" in pseudo or path:
            raise MalformedFields("CONNECT with :scheme or :path")
    elif b":scheme" not in pseudo or _PATH.fullmatch(path) is None:
        raise MalformedFields("no :scheme, or a :path that is empty or not printable")
    if cookies is not None:
        regular.append((b"cookie", b"; ".join(cookies)))
    return RequestFields(method, path, authority, regular)


def trailer_fields(fields: Fields) -> Fields:
    """A request's trailer section, checked (it goes to the backend in the chunked body's
    trailer); raises MalformedFields."""
    for name, value in fields:
        if value and _bad_value(value):
            raise MalformedFields(f"trailer {name[:40]!r}: a control character or edge whitespace")
        if _NAME.fullmatch(name) is None:  # (a pseudo-field too: ':' is not a token's)
            raise MalformedFields(f"trailer name {name[:40]!r} is not a lowercase token")
        if name in CONNECTION_SPECIFIC:
            raise MalformedFields(f"connection-specific trailer {name!r}")
    return fields
