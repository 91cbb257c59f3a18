"""Which backend gets each client connection, over real sockets."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from balancer.backend.pool import PeerCounts
from balancer.config.schema import parse_config
from balancer.process.server import Balancer
from tests.helpers import Backend, Client, get, make_config, port_of, raw_exchange


async def test_round_robin_spreads_30_connections_10_each(farm, balancer_factory) -> None:
    balancer, _ = await balancer_factory(make_config([b.address for b in farm]))
    port = port_of(balancer)
    seen = Counter()
    for _ in range(30):
        response = await get(port)
        assert response.status == 200
        seen[response.backend] += 1
    assert seen == {"web1": 10, "web2": 10, "web3": 10}


async def test_weights_are_respected(balancer_factory) -> None:
    heavy, light = await Backend("heavy").start(), await Backend("light").start()
    try:
        from balancer.config.schema import parse_config

        config = parse_config(
            {
                "listeners": [{"bind": "127.0.0.1:0"}],
                "backends": [
                    {"name": "heavy", "address": heavy.address, "weight": 3},
                    {"name": "light", "address": light.address, "weight": 1},
                ],
            },
            "test",
        )
        balancer, _ = await balancer_factory(config)
        seen = Counter([(await get(port_of(balancer))).backend for _ in range(8)])
        assert seen == {"heavy": 6, "light": 2}
    finally:
        heavy.close()
        light.close()


async def test_least_connections_steers_new_connections_away_from_a_held_one(
    farm, balancer_factory
) -> None:
    balancer, _ = await balancer_factory(
        make_config([b.address for b in farm], policy="least_connections")
    )
    port = port_of(balancer)
    held = await Client.connect(port)
    held_backend = (await held.request()).backend
    try:
        others = [(await get(port)).backend for _ in range(6)]
        assert held_backend not in others
        assert Counter(others) == {name: 3 for name in {"web1", "web2", "web3"} - {held_backend}}
    finally:
        await held.close()


async def test_keep_alive_connection_stays_on_one_backend(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([b.address for b in farm]))
    client = await Client.connect(port_of(balancer))
    backends = {(await client.request("GET", f"/r{i}")).backend for i in range(100)}
    await client.close()
    assert len(backends) == 1
    served = next(b for b in farm if b.name in backends)
    assert served.connections == 1  # one dedicated backend connection for all 100
    assert len(served.seen) == 100
    (record,) = await recorder.wait_for(1)
    assert record.requests == 100


async def test_pipelined_requests_are_answered_in_order(farm, balancer_factory) -> None:
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    client.send_raw(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    import h11

    for path in ("/a", "/b", "/c"):
        client.h11.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
        client.h11.send(h11.EndOfMessage())
        response = await client.read_response()
        assert response.body == f"web1 GET {path}\n".encode()
    await client.close()


async def test_only_the_request_that_closes_gets_close_and_nothing_after_it_is_served(
    farm, balancer_factory
) -> None:
    """RFC 9112 §9.6: the response to the request that says close says close; the earlier ones
    stay keep-alive, and a request pipelined after it is never forwarded."""
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(
        port_of(balancer),
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    import h11

    parser = h11.Connection(h11.CLIENT)
    parser.receive_data(raw)
    parser.receive_data(b"")
    connection_headers = []
    bodies = []
    for path in ("/a", "/b", "/c"):
        parser.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        response = parser.next_event()
        assert isinstance(response, h11.Response)
        connection_headers.append(dict(response.headers).get(b"connection"))
        body = parser.next_event()
        bodies.append(body.data if isinstance(body, h11.Data) else b"")
        assert isinstance(parser.next_event(), h11.EndOfMessage)
        if path != "/c":
            parser.start_next_cycle()
    assert connection_headers == [None, None, b"close"]
    assert bodies == [b"web1 GET /a\n", b"web1 GET /b\n", b"web1 GET /c\n"]
    assert isinstance(parser.next_event(), h11.ConnectionClosed)  # and no fourth response
    assert [seen.path for seen in farm[0].seen] == ["/a", "/b", "/c"]


async def test_least_connections_counts_the_other_workers_connections(farm) -> None:
    """Two workers (here two Balancers in one process, each on its own port) sharing the
    lease table the supervisor maps: connections held open through worker A send worker B's
    new connections to the backends A is not using."""
    table = memoryview(bytearray(8 * 2 * len(farm))).cast("q")
    config = make_config([b.address for b in farm], policy="least_connections")
    workers = [Balancer(config, peers=PeerCounts(table, 2, len(farm), me)) for me in (0, 1)]
    clients: list[Client] = []
    try:
        for worker in workers:
            await worker.start()
        a, b = (port_of(worker, "http") for worker in workers)
        held = []
        for _ in range(2):  # through A, held open (reuse never: a lease for the connection)
            client = await Client.connect(a)
            clients.append(client)
            held.append((await client.request()).backend)
        assert sorted(held) == ["web1", "web2"]
        client = await Client.connect(b)
        clients.append(client)
        assert (await client.request()).backend == "web3"  # B alone would pick web1
        for client in clients[:2]:
            await client.close()
        async with asyncio.timeout(5):  # A's leases end as its connections close
            while any(table[i] for i in range(len(farm))):
                await asyncio.sleep(0.01)
        seen = {(await get(b)).backend for _ in range(2)}
        assert seen == {"web1", "web2"}  # web3 still holds B's connection
    finally:
        for client in clients:
            await client.close()
        for worker in workers:
            await worker.shutdown(grace=1.0)


def hash_config(addresses: list[str], key: str, reuse: str = "never") -> Any:
    return parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [{"name": f"b{i}", "address": a} for i, a in enumerate(addresses)],
            "policy": "hash",
            "hash_key": key,
            "upstream": {"reuse": reuse},
            "admin": "127.0.0.1:0",
        },
        "test",
    )


@pytest.mark.parametrize("reuse", ["never", "always"])
@pytest.mark.parametrize("key", ["header:X-User", "cookie:session", "uri"])
async def test_hash_sends_each_key_to_one_backend_and_spreads_the_keys(
    farm, balancer_factory, key: str, reuse: str
) -> None:
    """Issue 23, item 2: policy "hash" over real connections (a new one per request, so
    nothing but the key keeps a client on its backend)."""
    balancer, _ = await balancer_factory(hash_config([b.address for b in farm], key, reuse))
    port = port_of(balancer)

    async def backend_for(user: str) -> str | None:
        headers = {
            "header:X-User": [("X-User", user)],
            "cookie:session": [("Cookie", f"lang=en; session={user}")],
        }.get(key, [])
        client = await Client.connect(port)
        try:
            response = await client.request("GET", f"/u/{user}", headers=headers)
        finally:
            await client.close()
        return response.backend

    users = [f"user{i}" for i in range(24)]
    first = {user: await backend_for(user) for user in users}
    again = {user: await backend_for(user) for user in reversed(users)}
    assert first == again  # each key keeps its backend
    assert len(set(first.values())) == 3  # and the keys spread over the farm


async def test_hash_on_the_client_address_keeps_a_client_on_one_backend(
    farm, balancer_factory
) -> None:
    balancer, _ = await balancer_factory(hash_config([b.address for b in farm], "client_ip"))
    seen = {(await get(port_of(balancer))).backend for _ in range(12)}
    assert len(seen) == 1  # one client address: one backend, connection after connection
