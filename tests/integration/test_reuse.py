"""Backend connection reuse (`[upstream] reuse`), over real sockets: each mode, the pool's
limits, and backends that close idle connections at the worst moment."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from typing import Any

import pytest

from balancer.client import http_flow
from balancer.config.schema import parse_config
from balancer.process.server import Balancer
from tests.helpers import (
    Client,
    Recorder,
    admin_json,
    get,
    port_of,
    raw_exchange,
    scrape,
    start_balancer,
)


def reuse_config(backends: list[str], reuse: str, **upstream: Any) -> Any:
    return parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [{"name": f"b{i}", "address": a} for i, a in enumerate(backends)],
            "upstream": {"reuse": reuse, **upstream},
            "timeouts": {"linger_seconds": 1},
            "request_log": True,
            "admin": "127.0.0.1:0",
        },
        "test",
    )


async def start(config: Any) -> tuple[Balancer, io.StringIO, Recorder]:
    log = io.StringIO()
    balancer, recorder = await start_balancer(config, access_log=log)
    return balancer, log, recorder


def lines(log: io.StringIO, kind: str) -> list[dict[str, Any]]:
    return [x for x in map(json.loads, log.getvalue().splitlines()) if x["type"] == kind]


async def test_always_reuses_idle_connections_across_client_connections(farm) -> None:
    balancer, log, recorder = await start(reuse_config([b.address for b in farm], "always"))
    try:
        seen = Counter([(await get(port_of(balancer, "http"))).backend for _ in range(12)])
        await recorder.wait_for(12)
        views = await admin_json(balancer, "/backends")
        metrics = await scrape(balancer)
    finally:
        await balancer.shutdown(grace=1.0)
    assert seen == {"web1": 4, "web2": 4, "web3": 4}  # balanced per request
    assert sum(b.connections for b in farm) == 3  # one connection per backend, reused
    assert [v["idle_connections"] for v in views] == [1, 1, 1]  # the pool's, per backend
    assert 'balancer_backend_idle_connections{backend="b0"} 1.0' in metrics
    requests = lines(log, "request")
    assert [r["reused"] for r in requests] == [False] * 3 + [True] * 9
    assert all(r["status"] == 200 and r["retries"] == 0 for r in requests)
    # A new connection's request carries its connect time; a reused one's is null, not 0.
    assert all(r["connect_wait_seconds"] > 0 for r in requests[:3])
    assert all(r["connect_wait_seconds"] is None for r in requests[3:])
    by_connection = Counter(r["backend_connection_id"] for r in requests)
    assert sorted(by_connection.values()) == [4, 4, 4]
    # The pool's connections closed at shutdown, each with its own record.
    pooled = lines(log, "backend_connection")
    assert sorted(x["requests"] for x in pooled) == [4, 4, 4]
    assert {x["close_cause"] for x in pooled} == {"shutdown"}


async def test_more_requests_at_once_than_idle_per_backend_reuse_their_connections(
    farm,
) -> None:
    """Six keep-alive clients' requests at once, three rounds, idle_per_backend = 2: the six
    connections the first round opened carry the next two (the pool keeps as many idle as
    were busy at once lately, as HAProxy keeps by recent need), not 6 + 4 + 4 of them."""
    config = reuse_config([farm[0].address], "always", idle_per_backend=2)
    balancer, log, recorder = await start(config)
    clients = [await Client.connect(port_of(balancer)) for _ in range(6)]
    try:
        for _ in range(3):  # each answer in turn while the others are still busy
            answers = await asyncio.gather(
                *(c.request(path=f"/delay/{50 + 25 * i}") for i, c in enumerate(clients))
            )
            assert [a.status for a in answers] == [200] * 6
        for client in clients:
            await client.close()
        await recorder.wait_for(6)
    finally:
        await balancer.shutdown(grace=1.0)
    assert farm[0].connections == 6
    requests = lines(log, "request")
    assert [r["reused"] for r in requests].count(True) == 12
    assert "pool_full" not in {x["close_cause"] for x in lines(log, "backend_connection")}


async def test_in_a_reuse_mode_an_idle_client_holds_neither_reader_nor_framer(
    farm, monkeypatch
) -> None:
    monkeypatch.setattr(http_flow, "READER_POOL_ABOVE", 0)  # as if many connections were open
    balancer, _, recorder = await start(reuse_config([farm[0].address], "always"))
    client = await Client.connect(port_of(balancer))
    try:
        assert (await client.request(path="/one")).status == 200
        (conn,) = balancer.contexts[0].connections
        assert conn.http.reader is None and conn.http.framer is None  # idle: S5's memory
        response = await client.request("POST", "/two", body=b"y" * 100)
        assert response.status == 200 and conn.http.framer is None
        assert [(r.path, r.body_size) for r in farm[0].seen] == [("/one", 0), ("/two", 100)]
        await client.close()
        await recorder.wait_for(1)
    finally:
        await balancer.shutdown(grace=1.0)


async def test_safe_gives_a_new_client_connections_first_request_a_new_connection(farm) -> None:
    balancer, log, recorder = await start(reuse_config([b.address for b in farm], "safe"))
    try:
        for _ in range(3):
            assert (await get(port_of(balancer))).status == 200
        client = await Client.connect(port_of(balancer))
        seen = [(await client.request("GET", f"/k{i}")).backend for i in range(6)]
        await client.close()
        await recorder.wait_for(4)
    finally:
        await balancer.shutdown(grace=1.0)
    requests = lines(log, "request")
    assert [r["reused"] for r in requests[:4]] == [False] * 4  # each client's first: new
    assert all(r["reused"] for r in requests[4:])  # later ones took idle connections
    assert Counter(seen) == {"web1": 2, "web2": 2, "web3": 2}  # per request, not per client
    assert sum(b.connections for b in farm) == 4


async def test_never_keeps_one_dedicated_connection_per_client_connection(farm) -> None:
    balancer, log, recorder = await start(reuse_config([b.address for b in farm], "never"))
    try:
        for _ in range(3):
            assert (await get(port_of(balancer))).status == 200
        await recorder.wait_for(3)
    finally:
        await balancer.shutdown(grace=1.0)
    assert sum(b.connections for b in farm) == 3
    assert lines(log, "backend_connection") == []  # embedded in the connection records
    (first, *_) = lines(log, "connection")
    assert first["backend"]["name"] == "b0" and first["backend_leg"]["first_fin"] is not None


async def test_an_http10_client_is_answered_as_http10_over_a_kept_backend_connection(
    farm,
) -> None:
    balancer, _, recorder = await start(reuse_config([farm[0].address], "always"))
    try:
        answers = [
            await raw_exchange(port_of(balancer), b"GET /old HTTP/1.0\r\n\r\n") for _ in range(3)
        ]
        await recorder.wait_for(3)
    finally:
        await balancer.shutdown(grace=1.0)
    for raw in answers:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
        assert body == b"web1 GET /old\n"
    assert farm[0].connections == 1  # the backend kept its connection for all three
    assert all(seen.header("Connection") == "keep-alive" for seen in farm[0].seen)


async def test_pool_limits_close_connections_with_their_cause(farm) -> None:
    config = reuse_config(
        [farm[0].address], "always", max_requests_per_connection=2, idle_timeout_seconds=0.2
    )
    balancer, log, recorder = await start(config)
    try:
        for _ in range(3):
            assert (await get(port_of(balancer))).status == 200
        await recorder.wait_for(3)
        async with asyncio.timeout(5):  # the third request's connection ages out
            while len(lines(log, "backend_connection")) < 2:
                await asyncio.sleep(0.02)
    finally:
        await balancer.shutdown(grace=1.0)
    closed = lines(log, "backend_connection")
    assert [(x["requests"], x["close_cause"]) for x in closed] == [
        (2, "max_requests"),
        (1, "idle_timeout"),
    ]
    assert closed[1]["idle_seconds"] >= 0.2
    # The balancer closed them: its FIN first, the backend's answer, a teardown time.
    for leg in (x["leg"] for x in closed):
        assert (leg["initiator"], leg["first_fin"], leg["kind"]) == ("balancer", "balancer", "fin")
        assert leg["teardown_seconds"] is not None


class ClosesAfterOneResponse(asyncio.Protocol):
    """A keep-alive backend that closes each connection quietly right after its first
    response (as a backend with a short keep-alive timeout does): the worst moment."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.answered:
            self.transport.close()  # a request on a connection it meant to close: dropped
            return
        self.answered = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        asyncio.get_running_loop().call_later(0.05, self.transport.close)


async def test_an_idle_connection_the_backend_closes_is_closed_and_recorded() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ClosesAfterOneResponse, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    balancer, log, recorder = await start(reuse_config([address], "always"))
    try:
        assert (await get(port_of(balancer))).status == 200
        async with asyncio.timeout(5):
            while not lines(log, "backend_connection"):
                await asyncio.sleep(0.02)
        assert balancer.idle is not None and balancer.idle.idle_count() == 0
        assert (await get(port_of(balancer))).status == 200  # on a new connection
        await recorder.wait_for(2)
    finally:
        await balancer.shutdown(grace=1.0)
        server.close()
    first = lines(log, "backend_connection")[0]
    assert first["close_cause"] == "backend_closed"
    assert (first["leg"]["initiator"], first["leg"]["first_fin"]) == ("peer", "peer")
    assert first["leg"]["teardown_seconds"] is not None
    assert [r["reused"] for r in lines(log, "request")] == [False, False]


class SaysTooMuch(asyncio.Protocol):
    """Answers keep-alive, then says more: at once in the same write (`/now`), or later."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        if b"/now" in data:
            self.transport.write(answer + b"HTTP/1.1 2")
        else:
            self.transport.write(answer)
            asyncio.get_running_loop().call_later(0.05, self.transport.write, b"junk")


async def test_a_backend_that_says_more_than_its_response_is_not_reused() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SaysTooMuch, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    balancer, log, recorder = await start(reuse_config([address], "always"))
    try:
        assert (await get(port_of(balancer))).body == b"ok"  # junk follows while idle
        async with asyncio.timeout(5):
            while not lines(log, "backend_connection"):
                await asyncio.sleep(0.02)
        first = (await get(port_of(balancer), "/now")).body  # junk in the same read
        second = (await get(port_of(balancer))).body  # must not start with that junk
        await recorder.wait_for(3)
    finally:
        await balancer.shutdown(grace=1.0)
        server.close()
    assert (first, second) == (b"ok", b"ok")
    causes = [x["close_cause"] for x in lines(log, "backend_connection")]
    assert causes[:2] == ["stray_bytes", "not_reusable"]
    assert [r["reused"] for r in lines(log, "request")] == [False, False, False]


class DropsSecondRequest(asyncio.Protocol):
    """Answers one request per connection keep-alive, then drops the connection when the
    next request arrives, before any byte of an answer: a connection dead on reuse."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.answered:
            self.transport.close()
            return
        self.answered = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def test_a_dead_reused_connection_is_retried_once_for_a_get_never_for_a_post() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(DropsSecondRequest, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    balancer, log, recorder = await start(reuse_config([address], "always"))
    try:
        assert (await get(port_of(balancer))).status == 200  # leaves an idle connection
        assert (await get(port_of(balancer))).status == 200  # dead on reuse: retried
        client = await Client.connect(port_of(balancer))
        answer = await client.request("POST", "/p", body=b"x")  # the idle one is dead too
        await client.close()
        await recorder.wait_for(3)
    finally:
        await balancer.shutdown(grace=1.0)
        server.close()
    assert answer.status == 502
    first, retried, post = lines(log, "request")
    assert (first["reused"], first["retries"]) == (False, 0)
    assert (retried["status"], retried["retries"], retried["reused"]) == (200, 1, False)
    assert (post["method"], post["retries"], post["status"]) == ("POST", 0, 502)
    assert "dead_on_reuse" in {x["close_cause"] for x in lines(log, "backend_connection")}
    # A dead idle connection says nothing of the backend's health.
    (state,) = balancer.backend_states()
    assert state.connect_failures_total == 0


async def test_pipelined_requests_are_dispatched_one_at_a_time_and_answered_in_order(
    farm,
) -> None:
    balancer, log, recorder = await start(reuse_config([b.address for b in farm], "always"))
    try:
        raw = await raw_exchange(
            port_of(balancer),
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz"
            b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        await recorder.wait_for(1)
    finally:
        await balancer.shutdown(grace=1.0)
    bodies = [part.split(b"\r\n\r\n", 1)[1][:14] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"web1 GET /a\n", b"xyz", b"web3 GET /c\n"]
    assert [s.path for b in farm for s in b.seen] == ["/a", "/b", "/c"]
    assert [r["target"] for r in lines(log, "request")] == ["/a", "/b", "/c"]
    (connection,) = lines(log, "connection")
    assert connection["requests"] == 3
    assert connection["backend"] is None and connection["backend_leg"] is None  # per request


async def test_an_upgrade_in_always_mode_takes_its_connection_for_good(farm) -> None:
    balancer, log, recorder = await start(reuse_config([farm[0].address], "always"))
    try:
        assert (await get(port_of(balancer))).status == 200  # leaves an idle connection
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nhi"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
        writer.write(b"\x00raw\xff")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"\x00raw\xff"
        writer.close()
        await recorder.wait_for(2)
        assert (await get(port_of(balancer))).status == 200  # not on the tunnel's connection
        await recorder.wait_for(3)
    finally:
        await balancer.shutdown(grace=1.0)
    requests = lines(log, "request")
    assert [(r["target"], r["status"], r["reused"]) for r in requests] == [
        ("/", 200, False),
        ("/ws", 101, True),
        ("/", 200, False),
    ]
    closed = {x["id"]: x["close_cause"] for x in lines(log, "backend_connection")}
    assert closed[requests[1]["backend_connection_id"]] == "not_reusable"


async def test_least_connections_counts_requests_in_flight_per_request(farm) -> None:
    """In the reuse modes a lease is a request in flight: while one slow request holds a
    backend, new requests (from any client connection) go to the other two."""
    config = parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [{"name": b.name, "address": b.address} for b in farm],
            "policy": "least_connections",
            "upstream": {"reuse": "always"},
        },
        "test",
    )
    balancer, _, _ = await start(config)
    try:
        slow = await Client.connect(port_of(balancer))
        pending = asyncio.ensure_future(slow.request("GET", "/delay/500"))
        async with asyncio.timeout(5):  # the slow request is in flight on one backend
            while not any(s.active for s in balancer.backend_states()):
                await asyncio.sleep(0.01)
        (busy,) = [s.name for s in balancer.backend_states() if s.active]
        others = [(await get(port_of(balancer))).backend for _ in range(6)]
        assert (await pending).status == 200
        await slow.close()
    finally:
        await balancer.shutdown(grace=1.0)
    assert busy not in others and Counter(others) == {
        n: 3 for n in {"web1", "web2", "web3"} - {busy}
    }


async def test_the_idle_timeout_counts_from_the_last_request_not_the_first(farm) -> None:
    """The pool files an idle connection's wake-up once; a connection used again before it
    fires is filed anew for the rest of its time, not closed early."""
    config = reuse_config([farm[0].address], "always", idle_timeout_seconds=0.3)
    balancer, log, recorder = await start(config)
    try:
        assert (await get(port_of(balancer))).status == 200
        await asyncio.sleep(0.2)  # the gap between two requests: the test's input, not a wait
        assert (await get(port_of(balancer))).status == 200
        async with asyncio.timeout(5):
            while not lines(log, "backend_connection"):
                await asyncio.sleep(0.02)
        await recorder.wait_for(2)
    finally:
        await balancer.shutdown(grace=1.0)
    assert [r["reused"] for r in lines(log, "request")] == [False, True]
    (closed,) = lines(log, "backend_connection")
    assert closed["close_cause"] == "idle_timeout" and closed["requests"] == 2
    assert closed["lifetime_seconds"] >= 0.2 + 0.3
    assert closed["idle_seconds"] >= 0.2 + 0.3 - 0.05  # both idle stints, the second whole


async def test_request_lines_name_the_client_and_host_and_a_refused_request_gets_one(
    farm,
) -> None:
    """Issue 20, item 5: an operator reads who asked and for which site on every request
    line, and a request the balancer answers itself (a 4xx it would not forward) has a line
    too, not only its connection's."""
    balancer, log, recorder = await start(reuse_config([farm[0].address], "never"))
    try:
        assert (await get(port_of(balancer), path="/p")).status == 200
        raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        await recorder.wait_for(2)
    finally:
        await balancer.shutdown(grace=1.0)
    served, refused = lines(log, "request")
    connections = {c["id"]: c for c in lines(log, "connection")}
    assert served["client"]["ip"] == "127.0.0.1" and served["host"] == "localhost"  # as sent
    client = connections[served["connection_id"]]["client"]
    assert served["client"] == {"ip": client["ip"], "port": client["port"]}
    assert (refused["status"], refused["method"], refused["target"]) == (400, "", "")
    assert refused["backend"] is None and refused["client"]["ip"] == "127.0.0.1"


@pytest.mark.parametrize("reuse", ["never", "always"])
async def test_request_lines_count_each_requests_body_and_its_responses_bytes(
    farm, reuse: str
) -> None:
    """Issue 20, item 5: bytes in and out per request, as a capture would count them: the
    body read (chunked framing aside) and the response relayed, head included; the
    responses' sizes add up to every byte the client got."""
    balancer, log, recorder = await start(reuse_config([farm[0].address], reuse))
    pipelined = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\npayload"
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    try:
        raw = await raw_exchange(port_of(balancer), pipelined)
        refused = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\n\r\n")  # no Host
        await recorder.wait_for(2)  # (connections)
    finally:
        await balancer.shutdown(grace=1.0)
    requests = {r["target"]: r for r in lines(log, "request")}
    assert raw.count(b"HTTP/1.1 200 ") == 3 and refused.startswith(b"HTTP/1.1 400 ")
    assert [requests[t]["bytes"]["request_body"] for t in ("/a", "/b", "/c")] == [7, 8, 0]
    sizes = [requests[t]["bytes"]["response"] for t in ("/a", "/b", "/c")]
    assert sum(sizes) == len(raw) and all(size > 60 for size in sizes)
    assert raw[sizes[0] :].startswith(b"HTTP/1.1 200 ")  # each begins where one ended
    assert raw[sizes[0] + sizes[1] :].startswith(b"HTTP/1.1 200 ")
    assert requests[""]["bytes"] == {"request_body": 0, "response": len(refused)}
