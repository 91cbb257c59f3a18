"""Draining a backend in tcp mode: no new connections, and its open tunnels closed one by one
over the group's drain_seconds, not all at once and not never."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from balancer.backend.pool import DRAINING, ENABLED
from balancer.config.schema import parse_config
from tests.helpers import port_of


async def echo_server(name: bytes) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        while data := await reader.read(4096):
            writer.write(data)
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_a_drained_backends_tunnels_close_gradually(
    balancer_factory: Callable[..., Any],
) -> None:
    servers = [await echo_server(b"A"), await echo_server(b"B")]
    try:
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        config = parse_config(
            {
                "listeners": [{"name": "xmpp", "bind": "127.0.0.1:0", "mode": "tcp"}],
                "groups": [{
                    "name": "chat", "drain_seconds": 1.5,
                    "backends": [{"name": n, "address": f"127.0.0.1:{p}"}
                                 for n, p in zip("AB", ports, strict=True)],
                }],
            },
            "drain.toml",
        )  # fmt: skip
        balancer, recorder = await balancer_factory(config)
        port = port_of(balancer, "xmpp")
        clients = []
        for _ in range(8):  # round robin: A, B, A, B, ...
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            clients.append((await reader.readexactly(1), reader, writer))
        on_a = [c for c in clients if c[0] == b"A"]
        assert len(on_a) == 4
        loop = asyncio.get_running_loop()
        table = balancer.groups["chat"].pool.table
        assert table is not None
        drained_at = loop.time()
        table.set(0, admin=DRAINING)  # as POST /backends/A/drain does

        async def closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()  # our FIN answers the balancer's
            return loop.time() - drained_at

        ends = sorted(await asyncio.gather(*(closed_after(r, w) for _, r, w in on_a)))
        # One every 1.5/4 s from when the worker saw it (within its 0.5 s watch): spread, in
        # order, none at once, all within the window.
        assert ends[-1] - ends[0] >= 0.8, ends
        assert all(b - a >= 0.2 for a, b in itertools.pairwise(ends)), ends
        assert ends[-1] <= 1.5 + 0.5 + 0.5, ends
        # B's are untouched and still relay; new connections go to B only.
        for name, reader, writer in clients:
            if name == b"B":
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"B"
        records = await recorder.wait_for(4)
        assert [r.close_cause for r in records[:4]] == ["backend_drained"] * 4
        assert all(r.backend == "A" for r in records[:4])
        table.set(0, admin=ENABLED)
        writer.close()
        for _, _, w in clients:
            w.close()
    finally:
        for server in servers:
            server.close()
