"""Real parts for tests: small asyncio backends on 127.0.0.1:0, a raw HTTP client, a balancer.

Backends name themselves (`X-Backend`) and keep every request head they received, so tests can
assert what the balancer forwarded. Paths choose behaviours:

  /size/N        N bytes of a repeating pattern (Content-Length)
  /chunked/N     N bytes in chunks of 10000 (Transfer-Encoding: chunked)
  /trailers      "hello", chunked, with a trailer section (X-Checksum: abc)
  /close         answers with `Connection: close` and closes
  /slow          never answers (also under a prefix: /static/slow)
  /delay/MS      answers after MS milliseconds
  /die/N         promises N bytes, sends 100, then closes
  /reset         promises 100000 bytes, sends 100, then resets (RST)
  /ws            101 Switching Protocols, then echoes bytes
  POST anything  answers with the body it received (sha256 in X-Body-Sha256 too)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import h11
import httptools

from balancer.config.schema import Config, parse_config
from balancer.facts.record import ConnectionRecord
from balancer.process.server import Balancer

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_size: int = 0
    complete: bool = False  # the whole message arrived, by its own framing

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class BackendProtocol(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.tunnel = False
        self.current: SeenRequest | None = None
        self.body = hashlib.sha256()
        self.body_parts: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.backend.connections += 1
        self.backend.open_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open_connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.tunnel = True
            rest = data[upgrade.args[0] :]
            if rest:
                self.transport.write(rest)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.current = SeenRequest("", "", [])
        self.body = hashlib.sha256()
        self.body_parts = []
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.decode(), value.decode()))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.method = self.parser.get_method().decode()
        self.current.path = self._url.decode()
        self.backend.seen.append(self.current)
        if self.current.path == "/ws":
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n"
            )

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body_size += len(body)
        self.body.update(body)
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        request = self.current
        request.complete = True
        name = self.backend.name
        head = f"HTTP/1.1 {self.backend.status}\r\nX-Backend: {name}\r\n"
        path = request.path
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            head += "Connection: close\r\n"
        if path == "/ws":
            return
        if path.endswith("/slow"):  # (under any prefix: a route may need one)
            return
        if path == "/health":  # what the active checks ask; Backend.health says the answer
            if self.backend.health == "hang":
                return
            checks = sum(1 for seen in self.backend.seen if seen.path == "/health")
            ok = self.backend.health == "ok" or (self.backend.health == "flap" and checks % 2)
            status = "200 OK" if ok else "500 Internal Server Error"
            self.transport.write(
                f"HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
            )
            self.transport.close()
            return
        if path.startswith("/delay/"):  # answer after N milliseconds
            delay = int(path.split("/")[2]) / 1000
            body = f"{name} delayed\n".encode()
            reply = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
            asyncio.get_running_loop().call_later(delay, self.transport.write, reply)
            return
        if request.method == "POST":
            body = b"".join(self.body_parts)
            head += f"X-Body-Sha256: {self.body.hexdigest()}\r\nContent-Length: {len(body)}\r\n"
            self.transport.write(head.encode() + b"\r\n" + body)
        elif path.startswith("/page/"):  # a page of N images (each another request)
            images = "".join(f'<img src="/img/{n}.png">' for n in range(int(path.split("/")[2])))
            body = f"<!doctype html><html><body>{images}</body></html>".encode()
            head += "Content-Type: text/html\r\n"
            self.transport.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        elif path.startswith("/size/"):
            body = pattern(int(path.split("/")[2]))
            self.transport.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        elif path.startswith("/chunked/"):
            body = pattern(int(path.split("/")[2]))
            out = [f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()]
            for start in range(0, len(body), 10000):
                piece = body[start : start + 10000]
                out.append(b"%x\r\n%b\r\n" % (len(piece), piece))
            out.append(b"0\r\n\r\n")
            self.transport.write(b"".join(out))
        elif path == "/trailers":
            self.transport.write(
                f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()
                + b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
            )
        elif path == "/close":
            self.transport.write(f"{head}Connection: close\r\nContent-Length: 2\r\n\r\nok".encode())
            self.transport.close()
            return
        elif path.startswith("/die/"):
            size = int(path.split("/")[2])
            self.transport.write(f"{head}Content-Length: {size}\r\n\r\n".encode() + b"x" * 100)
            self.transport.close()
            return
        elif path == "/reset":
            self.transport.write(f"{head}Content-Length: 100000\r\n\r\n".encode() + b"x" * 100)
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        else:
            body = f"{name} {request.method} {path}\n".encode()
            head += f"Content-Length: {len(body)}\r\n\r\n"
            # (a HEAD's response is its head alone, its length the GET's: RFC 9110 §9.3.2)
            self.transport.write(head.encode() + (b"" if request.method == "HEAD" else body))
        if not keep_alive:
            self.transport.close()


@dataclass
class Backend:
    name: str
    port: int = 0
    server: asyncio.AbstractServer | None = None
    host: str = "127.0.0.1"  # (DNS discovery's tests put members on 127.0.0.2, .3, ...)
    seen: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    open_connections: set[BackendProtocol] = field(default_factory=set)
    # How /health answers: "ok" (200), "fail" (500), "hang" (never), "flap" (500, 200, ...).
    health: str = "ok"
    status: str = "200 OK"  # the status line of every other answer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: BackendProtocol(self), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for protocol in list(self.open_connections):
            protocol.transport.abort()


def dead_port() -> int:
    """A port with nothing listening (bound then closed, so the kernel refuses connects)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return int(port)


def make_config(
    backends: list[str],
    *,
    policy: str = "round_robin",
    https: bool = False,
    mode: str = "http",
    certs: Any = None,
    timeouts: dict[str, float] | None = None,
    limits: dict[str, int] | None = None,
    tls: dict[str, Any] | None = None,
    health_check: dict[str, Any] | None = None,
) -> Config:
    table: dict[str, Any] = {
        "policy": policy,
        "listeners": [
            {
                "name": "https" if https else "http",
                "bind": "127.0.0.1:0",
                "protocol": "https" if https else "http",
                "mode": mode,
            }
        ],
        "backends": [{"name": f"b{i}", "address": a} for i, a in enumerate(backends)],
        "timeouts": timeouts or {},
        "limits": limits or {},
        "admin": "127.0.0.1:0",
    }
    if https:
        table["tls"] = {"cert": str(certs.cert), "key": str(certs.key), **(tls or {})}
    if health_check is not None:
        table["health_check"] = health_check
    return parse_config(table, "test")


class Recorder:
    """Collects published records; `wait_for(n)` awaits the n-th without sleeping."""

    def __init__(self) -> None:
        self.records: list[ConnectionRecord] = []
        self._changed = asyncio.Event()

    def __call__(self, record: ConnectionRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ConnectionRecord]:
        async with asyncio.timeout(timeout):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.records


async def start_balancer(
    config: Config, access_log: IO[str] | None = None
) -> tuple[Balancer, Recorder]:
    balancer = Balancer(config, access_log=access_log)
    recorder = Recorder()
    # Told of every record as it is published, after its metrics and log line (the hook
    # `balancer demo` prints from; a compiled Observer cannot have `publish` replaced).
    balancer.observer.live = recorder
    await balancer.start()
    return balancer, recorder


def port_of(balancer: Balancer, name: str | None = None) -> int:
    name = name or next(iter(balancer.addresses))
    return balancer.addresses[name][1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-backend")


class Client:
    """A raw HTTP/1.1 client on one connection, with h11 parsing the responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(
        cls,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        source: str | None = None,  # the client's own address, e.g. another of 127.0.0.0/8
    ) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=ssl_context,
                server_hostname="localhost" if ssl_context else None,
                local_addr=(source, 0) if source else None,
            ),
            5,
        )
        return cls(reader, writer)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        chunked: bool = False,
        host: str = "localhost",
    ) -> Response:
        hdrs = [("Host", host), *(headers or [])]
        if body is not None and not chunked:
            hdrs.append(("Content-Length", str(len(body))))
        if chunked:
            hdrs.append(("Transfer-Encoding", "chunked"))
        self.writer.write(self.h11.send(h11.Request(method=method, target=path, headers=hdrs)))
        if body is not None:
            step = 65536
            for start in range(0, len(body), step):
                self.writer.write(self.h11.send(h11.Data(data=body[start : start + step])))
                await self.writer.drain()
        self.writer.write(self.h11.send(h11.EndOfMessage()))
        return await self.read_response()

    async def read_response(self, timeout: float = 5.0) -> Response:
        async with asyncio.timeout(timeout):
            status: int | None = None
            headers: dict[str, str] = {}
            body = bytearray()
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self.reader.read(262144)
                    self.h11.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before a response")
        assert status is not None
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return Response(status, headers, bytes(body))

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            chunks = []
            while chunk := await self.reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the balancer closes; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(timeout):
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        writer.close()
    return b"".join(chunks)


def parse_status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def client_context(
    ca: Any, min_version: ssl.TLSVersion | None = None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if min_version is not None:
        context.minimum_version = min_version
    if max_version is not None:
        context.maximum_version = max_version
    return context


async def get(port: int, path: str = "/", ssl_context: ssl.SSLContext | None = None) -> Response:
    client = await Client.connect(port, ssl_context)
    try:
        return await client.request("GET", path)
    finally:
        await client.close()


async def scrape(balancer: Balancer) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.addresses["admin"][1])
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


async def admin_json(balancer: Balancer, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.addresses["admin"][1])
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


Cleanup = Callable[[], None]


def until_bytes_are_stamped(client: socket.socket, server: socket.socket) -> None:
    """Wait (bounded) until bytes from `client` reach `server` with a receive timestamp.

    Linux stamps arriving packets only once some socket asks (SO_TIMESTAMPNS), and turns that
    on through a deferred work item: a process's first stamped socket may see its first
    bytes unstamped (the balancer then falls back to its reading time). Probe bytes are sent
    and read until one comes stamped; none is left queued."""
    import select
    import time

    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        client.sendall(b"p")
        assert select.select([server], [], [], 5)[0]
        _, ancillary, _, _ = server.recvmsg(1, socket.CMSG_SPACE(16))
        if ancillary:
            return
    raise AssertionError("receive timestamps never came on")
