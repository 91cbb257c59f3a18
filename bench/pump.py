"""The floor: a uvloop byte pump with a dedicated backend connection per client connection.

    python bench/pump.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]

No parsing, no records, no deadlines, no flow control: accept, connect to the next backend
(round robin), relay bytes both ways, and close each side when the other has closed. What
Python and uvloop cost per proxied connection before a load balancer does anything of its
own; bench/run.py runs it as the `pump` target beside the balancer in reuse `never` mode.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop


class Backend(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.transport.close()  # after what it sent: close() flushes first
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    ports: itertools.cycle[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.backend: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self.connect(next(self.ports)))

    async def connect(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend, _ = await loop.create_connection(lambda: Backend(self), "127.0.0.1", port)
        except OSError:
            self.transport.close()
            return
        self.backend = backend
        if self.pending:
            backend.write(b"".join(self.pending))
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.backend is None:
            self.pending.append(data)
        else:
            self.backend.write(data)

    def eof_received(self) -> bool:
        if self.backend is not None:
            self.backend.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.close()


async def main(port: int, backends: list[int]) -> None:
    Client.ports = itertools.cycle(backends)
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), [int(arg) for arg in sys.argv[2:]]))
