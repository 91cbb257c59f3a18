"""The PROXY protocol (HAProxy's, versions 1 and 2): pure encoding and parsing.

A header goes first on a TCP connection and says who the connection is really from, for a
server behind a proxy that would otherwise see only the proxy's address.
- Sending (a group's `send_proxy`): v1 is one text line; v2 is binary and may carry TLVs: the
  ALPN and SNI of a TLS session the balancer terminated, and PP2_TYPE_SSL with the TLS
  version and cipher, so the server can trust that the client's link was encrypted
  (HAProxy's `send-proxy-v2-ssl`).
- Accepting (a listener's `accept_proxy`, behind an L4 balancer): either version, read by
  `HeaderReader` before anything else on the connection, from configured sources only.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_BYTES: Final = 107  # the longest v1 line, CRLF included
V2_MAX_BYTES: Final = 16 + 65535
_V2_PROXY: Final = 0x21  # version 2, and the command
_V2_LOCAL: Final = 0x20
_AF_INET_STREAM: Final = 0x11
_AF_INET6_STREAM: Final = 0x21
_UNSPEC: Final = 0x00
# TLV types (section 2.2 of the spec).
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_CLIENT_SSL: Final = 0x01  # the client connected over TLS


class ProxyHeaderError(ValueError):
    """Not a PROXY header, or a malformed one: the connection is closed."""


@dataclass(frozen=True, slots=True)
class TLSFacts:
    """What a v2 header says of a TLS session the balancer terminated."""

    version: str | None  # "TLSv1.3"
    cipher: str | None
    sni: str | None
    alpn: str | None


def _family(host: str) -> int:
    return 6 if ":" in host else 4


def _unmapped(address: tuple[str, int]) -> tuple[str, int]:
    """An IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client) as the IPv4 one."""
    if address[0].startswith("::ffff:"):
        mapped = ipaddress.IPv6Address(address[0]).ipv4_mapped
        if mapped is not None:
            return str(mapped), address[1]
    return address


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """`PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\\r\\n` (TCP6 for IPv6)."""
    source, destination = _unmapped(source), _unmapped(destination)
    family = _family(source[0])
    if family != _family(destination[0]):
        return b"PROXY UNKNOWN\r\n"
    return (
        f"PROXY TCP{family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode()


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def encode_v2(
    source: tuple[str, int], destination: tuple[str, int], tls: TLSFacts | None = None
) -> bytes:
    """A binary v2 PROXY header for a TCP connection; with `tls`, its TLVs."""
    source, destination = _unmapped(source), _unmapped(destination)
    family = _family(source[0])
    if family != _family(destination[0]):
        addresses, kind = b"", _UNSPEC
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        kind = _AF_INET_STREAM if family == 4 else _AF_INET6_STREAM
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    tlvs = b""
    if tls is not None:
        if tls.alpn:
            tlvs += _tlv(PP2_TYPE_ALPN, tls.alpn.encode())
        if tls.sni:
            tlvs += _tlv(PP2_TYPE_AUTHORITY, tls.sni.encode())
        sub = b""
        if tls.version:
            sub += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode())
        if tls.cipher:
            sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode())
        # client: PP2_CLIENT_SSL; verify: 0 (no client certificate was asked for or failed).
        tlvs += _tlv(PP2_TYPE_SSL, struct.pack("!BI", PP2_CLIENT_SSL, 0) + sub)
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, kind, len(body)) + body


def encode_local(version: str) -> bytes:
    """The header of a connection the balancer makes for itself (a health check) to a server
    that expects one on every connection: v1 `PROXY UNKNOWN`, v2's LOCAL command (HAProxy's
    `check-send-proxy`). The server keeps the connection's own addresses."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _UNSPEC, 0)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a received header says. `source` None: a LOCAL (v2) or UNKNOWN (v1) header,
    the connection is the proxy's own (a health check): its own address stands."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: dict[int, bytes]


class HeaderReader:
    """Collects a connection's first bytes until a whole PROXY header is in. `feed` returns
    None while more is needed, or the header and the bytes after it; raises
    ProxyHeaderError for anything that is not a header."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == b"P":
            return self._v1(buffer)
        if buffer[:1] == b"\r":
            return self._v2(buffer)
        raise ProxyHeaderError("the connection does not start with a PROXY header")

    def _v1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not b"PROXY ".startswith(buffer[:6]):
            raise ProxyHeaderError("the connection does not start with a PROXY header")
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) >= V1_MAX_BYTES:
                raise ProxyHeaderError("PROXY v1 line too long")
            return None
        parts = buffer[:end].decode("ascii", "replace").split(" ")
        rest = buffer[end + 2 :]
        if parts[:2] == ["PROXY", "UNKNOWN"]:
            return ProxyHeader(1, None, None, {}), rest
        if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
            raise ProxyHeaderError(f"malformed PROXY v1 line: {buffer[:end]!r}")
        try:
            src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
            ports = int(parts[4]), int(parts[5])
        except ValueError:
            raise ProxyHeaderError(f"malformed PROXY v1 line: {buffer[:end]!r}") from None
        family = int(parts[1][3])
        if (
            src.version != family
            or dst.version != family
            or not all(0 <= p <= 65535 for p in ports)
        ):
            raise ProxyHeaderError(f"malformed PROXY v1 line: {buffer[:end]!r}")
        return ProxyHeader(1, (str(src), ports[0]), (str(dst), ports[1]), {}), rest

    def _v2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V2_SIGNATURE[: len(buffer)]):
            raise ProxyHeaderError("the connection does not start with a PROXY header")
        if len(buffer) < 16:
            return None
        command, kind, length = struct.unpack_from("!BBH", buffer, 12)
        if command not in (_V2_PROXY, _V2_LOCAL):
            raise ProxyHeaderError(f"PROXY v2: unknown version/command 0x{command:02x}")
        if len(buffer) < 16 + length:
            return None
        body, rest = buffer[16 : 16 + length], buffer[16 + length :]
        if command == _V2_LOCAL or kind == _UNSPEC:
            return ProxyHeader(2, None, None, {}), rest
        if kind == _AF_INET_STREAM:
            size, width = 12, 4
        elif kind == _AF_INET6_STREAM:
            size, width = 36, 16
        else:
            raise ProxyHeaderError(f"PROXY v2: unsupported address family 0x{kind:02x}")
        if length < size:
            raise ProxyHeaderError("PROXY v2: addresses cut short")
        src = str(ipaddress.ip_address(body[:width]))
        dst = str(ipaddress.ip_address(body[width : 2 * width]))
        sport, dport = struct.unpack_from("!HH", body, 2 * width)
        return ProxyHeader(2, (src, sport), (dst, dport), _tlvs(body[size:])), rest


def _tlvs(data: bytes) -> dict[int, bytes]:
    tlvs, at = {}, 0
    while at + 3 <= len(data):
        kind, size = struct.unpack_from("!BH", data, at)
        if at + 3 + size > len(data):
            raise ProxyHeaderError("PROXY v2: a TLV runs past the header")
        tlvs[kind] = data[at + 3 : at + 3 + size]
        at += 3 + size
    return tlvs
