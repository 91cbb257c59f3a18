"""What a client connection says before its session begins: a PROXY header (listeners behind
an L4 balancer, `accept_proxy_from`), then, on tcp listeners routing by SNI, the ClientHello's
server name. Pure: `Prelude` takes bytes and gives a verdict; the session's side of waiting
for it is session.py's (`await_prelude`, `read_prelude`).

    accept ──► source trusted? (else refused) ──► PROXY header ──► ClientHello peeked (SNI
               routing only; its bytes kept) ──► the session begins with what is left

On a plain listener with `h2c`, the first bytes are held until they show the HTTP/2
connection preface (prior knowledge: the session begins as HTTP/2) or not (HTTP/1.x).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from balancer.config.values import Network
from balancer.facts.record import ConnectionRecord
from balancer.wire.proxy_protocol import HeaderReader, ProxyHeader
from balancer.wire.sni import ClientHelloReader, Peek


def trusted(client_ip: str, sources: Sequence[Network]) -> bool:
    """Whether a connection from this address may send a PROXY header."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in sources)


H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Prelude:
    """Collects a connection's first bytes until the session can begin (see the module
    docstring). `feed` returns None while waiting, else the bytes the session begins with;
    raises proxy_protocol.ProxyHeaderError for a bad header."""

    __slots__ = ("h2c", "h2c_held", "header", "hello", "peek", "proxy")

    def __init__(self, proxy: bool, sni: bool, h2c: bool = False) -> None:
        self.proxy: HeaderReader | None = HeaderReader() if proxy else None
        self.hello: ClientHelloReader | None = ClientHelloReader() if sni else None
        self.header: ProxyHeader | None = None
        self.peek: Peek | None = None
        # h2c: bytes held until they show the preface or not; then whether they did.
        self.h2c_held: bytes | None = b"" if h2c else None
        self.h2c = False

    def feed(self, data: bytes) -> bytes | None:
        if self.proxy is not None:
            parsed = self.proxy.feed(data)
            if parsed is None:
                return None
            self.header, data = parsed
            self.proxy = None
            if self.hello is not None and not data:
                return None
        if self.hello is not None:
            peek = self.hello.feed(data)
            if peek is None:
                return None
            self.peek = peek
            data = self.hello.held
            self.hello = None
        if self.h2c_held is not None:
            held = self.h2c_held + data
            if len(held) < len(H2_PREFACE) and H2_PREFACE.startswith(held):
                self.h2c_held = held
                return None  # (so far, the preface or an HTTP/1 request alike)
            self.h2c, self.h2c_held = held.startswith(H2_PREFACE), None
            data = held
        return data

    def settle(self, record: ConnectionRecord) -> tuple[str, int] | None:
        """What the prelude said, on the connection's record: the client a PROXY header
        named (its sender kept as `proxied_by`), the SNI peeked. Returns the destination
        the header named (None: the socket's own address stands)."""
        header, peek = self.header, self.peek
        if peek is not None:
            record.tls_sni = peek.server_name
        if header is None or header.source is None:
            return None
        record.proxied_by = f"{record.client_ip}:{record.client_port}"
        record.client_ip, record.client_port = header.source
        return header.destination
