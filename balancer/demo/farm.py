"""A tiny embedded web farm for `balancer demo` and the benchmarks when nginx is absent.

Each backend names itself in an `X-Backend` header and in its page. `GET /?size=N` answers N
bytes; a POST is answered with what it sent. Keep-alive and pipelining work; nothing else does.
"""

from __future__ import annotations

import asyncio
import functools
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

PAGE = """<!doctype html>
<html><head><title>{name}</title></head>
<body><h1>Served by {name}</h1><p>{method} {path} from {client}</p></body></html>
"""


class FarmBackend(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        self.client = ""

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.client = ""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-forwarded-for":
            self.client = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method().decode()
        url = urlsplit(self.url.decode("latin-1"))
        if method == "POST":
            body = b"".join(self.body)
        elif "size" in (query := parse_qs(url.query)):
            body = b"x" * min(int(query["size"][0]), 1 << 30)
        else:
            body = PAGE.format(name=self.name, method=method, path=url.path,
                               client=self.client or "?").encode()  # fmt: skip
        keep_alive = self.parser.should_keep_alive()
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Backend: {self.name}\r\n"
            f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n"
        ).encode()
        self.transport.write(head + (b"" if method == "HEAD" else body))
        if not keep_alive:
            self.transport.close()


async def start_farm(
    names: list[str], host: str = "127.0.0.1", ports: list[int] | None = None
) -> list[tuple[asyncio.AbstractServer, int]]:
    """Start one backend per name; port 0 (the default) picks free ports."""
    loop = asyncio.get_running_loop()
    started: list[tuple[asyncio.AbstractServer, int]] = []
    for index, name in enumerate(names):
        port = ports[index] if ports else 0
        server = await loop.create_server(
            functools.partial(FarmBackend, name), host, port, reuse_address=True
        )
        started.append((server, server.sockets[0].getsockname()[1]))
    return started
