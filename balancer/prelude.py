"""What a client connection says before its session begins: a PROXY header (listeners behind
an L4 balancer, `accept_proxy_from`), then, on tcp listeners routing by SNI, the ClientHello's
server name. `Prelude` is pure (bytes in, a verdict out); `awaited` and `read`, at the end,
are the session's side of it.

    accept ──► source trusted? (else refused) ──► PROXY header ──► ClientHello peeked (SNI
               routing only; its bytes kept) ──► the session begins with what is left
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from balancer.proxy_protocol import HeaderReader, ProxyHeader, ProxyHeaderError
from balancer.record import FIRST_BYTES_TIMEOUT, PROXY_INVALID, PROXY_REFUSED, ConnectionRecord
from balancer.sni import ClientHelloReader, Peek

if TYPE_CHECKING:
    from balancer.session import ClientSession

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted(client_ip: str, sources: Sequence[Network]) -> bool:
    """Whether a connection from this address may send a PROXY header."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in sources)


class Prelude:
    """Collects a connection's first bytes until the session can begin (see the module
    docstring). `feed` returns None while waiting, else the bytes the session begins with;
    raises proxy_protocol.ProxyHeaderError for a bad header."""

    __slots__ = ("header", "hello", "peek", "proxy")

    def __init__(self, proxy: bool, sni: bool) -> None:
        self.proxy: HeaderReader | None = HeaderReader() if proxy else None
        self.hello: ClientHelloReader | None = ClientHelloReader() if sni else None
        self.header: ProxyHeader | None = None
        self.peek: Peek | None = None

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


# ---- the session's side: a session waits for its prelude before it begins -----------------


def awaited(session: ClientSession) -> bool:
    """At accept: whether the session waits for a prelude (or was refused one) rather than
    beginning now."""
    settings = session.ctx.settings
    sources, sni = settings.accept_proxy_from, settings.routes_by_sni
    if not sources and not sni:
        return False
    # No address: the client reset the connection as it was accepted (HAProxy's health
    # checks do), before it could be asked. That is no refusal: the reset, coming next as
    # the connection is lost, is what the record says.
    client_ip = session.record.client_ip
    if sources and client_ip and not trusted(client_ip, sources):
        session.close_client(PROXY_REFUSED)
        return True
    session.prelude = Prelude(bool(sources), sni)
    session.set_deadline(FIRST_BYTES_TIMEOUT)
    return True


def read(session: ClientSession, data: bytes) -> bytes | None:
    """The session's first bytes; once the prelude is whole the session begins, and the
    bytes after it (None or empty: nothing yet) are the session's."""
    prelude = session.prelude
    assert prelude is not None
    try:
        rest = prelude.feed(data)
    except ProxyHeaderError:
        session.close_client(PROXY_INVALID)
        return None
    if rest is None:
        return None
    session.prelude = None
    session.destination = prelude.settle(session.record)
    if prelude.peek is not None:  # a tcp listener routing TLS by SNI (passthrough)
        session.fwd.chosen = session.ctx.router.for_server_name(prelude.peek.server_name)
    session.begin(hello_read=bool(rest))
    return rest
