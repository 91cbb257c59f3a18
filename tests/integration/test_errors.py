"""What the client sees when it or the farm misbehaves: real 4xx/5xx answers, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket

from balancer.client import http_flow
from tests.helpers import (
    Client,
    admin_json,
    dead_port,
    get,
    make_config,
    parse_status,
    port_of,
    raw_exchange,
    scrape,
)


async def test_dead_backend_is_skipped(farm, balancer_factory) -> None:
    dead = f"127.0.0.1:{dead_port()}"
    balancer, recorder = await balancer_factory(make_config([dead, farm[0].address]))
    statuses = [(await get(port_of(balancer))).status for _ in range(6)]
    assert statuses == [200] * 6
    records = await recorder.wait_for(6)
    assert sum(r.connect_failures for r in records) == 1  # then marked down, not retried
    assert balancer.backend_states()[0].connect_failures_total == 1


async def test_a_backend_that_never_completes_the_handshake_times_out_to_the_next(
    farm, balancer_factory
) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    fillers = [socket.create_connection(black_hole.getsockname())]  # the queue holds one
    try:
        address = f"127.0.0.1:{black_hole.getsockname()[1]}"
        config = make_config([address, farm[0].address], timeouts={"connect_seconds": 0.2})
        balancer, recorder = await balancer_factory(config)
        started = asyncio.get_running_loop().time()
        assert (await get(port_of(balancer))).status == 200
        assert 0.2 <= asyncio.get_running_loop().time() - started < 2
        (record,) = await recorder.wait_for(1)
        assert (record.connect_attempts, record.connect_failures) == (2, 1)
        assert record.backend == "b1"
    finally:
        for filler in fillers:
            filler.close()
        black_hole.close()


async def test_all_backends_dead_gives_502(balancer_factory) -> None:
    config = make_config([f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"])
    balancer, recorder = await balancer_factory(config)
    raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_status(raw) == 502
    assert b"Connection: close" in raw
    (record,) = await recorder.wait_for(1)
    assert record.connect_attempts == 2
    assert record.close_cause == "backend_connect_failed"
    assert record.error_status == 502
    assert all(s.active == 0 for s in balancer.backend_states())
    # Refused connects eject them (passive checks): the admin view says for how long.
    view = await admin_json(balancer, "/backends")
    assert all(0 < b["ejected_seconds"] <= 10 for b in view), view


async def test_metrics_list_known_series_at_zero_and_each_backends_state(
    farm, balancer_factory
) -> None:
    """Issue 20, item 7: a fresh balancer exports its known label sets at 0 (rate() sees the
    first 502), and every backend's state, active checks or not: up, then ejected once a
    refused connect has the passive checks skip it."""
    dead = f"127.0.0.1:{dead_port()}"
    balancer, recorder = await balancer_factory(make_config([dead, farm[0].address]))
    before = await scrape(balancer)
    for series in (
        'balancer_requests_total{backend="b1",listener="http"} 0.0',
        'balancer_responses_total{backend="b0",class="5xx",listener="http"} 0.0',
        'balancer_error_responses_total{listener="http",status="502"} 0.0',
        'balancer_connections_closed_total{cause="backend_reset",listener="http"} 0.0',
        'balancer_backend_state{backend="b0",state="up"} 1.0',
        'balancer_backend_state{backend="b0",state="ejected"} 0.0',
    ):
        assert series in before, series
    assert (await get(port_of(balancer))).status == 200  # b0 refused, b1 answered
    await recorder.wait_for(1)
    after = await scrape(balancer)
    assert 'balancer_backend_state{backend="b0",state="ejected"} 1.0' in after
    assert 'balancer_backend_state{backend="b0",state="up"} 0.0' in after
    assert 'balancer_backend_state{backend="b1",state="up"} 1.0' in after
    assert 'balancer_requests_total{backend="b1",listener="http"} 1.0' in after


async def test_no_ready_backend_gives_503_with_retry_after(farm, balancer_factory) -> None:
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    assert balancer.groups["default"].pool.table is not None
    balancer.groups["default"].pool.table.set(
        0, up=False
    )  # as the active checks say of a backend down
    raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_status(raw) == 503
    assert b"Retry-After: 1" in raw
    assert farm[0].connections == 0


async def test_silent_backend_gives_504(farm, balancer_factory) -> None:
    config = make_config([farm[0].address], timeouts={"backend_response_seconds": 0.2})
    balancer, recorder = await balancer_factory(config)
    raw = await raw_exchange(port_of(balancer), b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_status(raw) == 504
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "backend_timeout"
    assert record.backend_leg.initiator == "balancer"


async def test_backend_dying_mid_body_aborts_the_client(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    client.send_raw(b"GET /die/100000 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = await client.read_until_closed()
        truncated = True
        assert b"Content-Length: 100000" in data
        assert len(data.split(b"\r\n\r\n", 1)[1]) < 100000
    except ConnectionResetError:
        truncated = True  # the RST arrived before we read anything: also a visible truncation
    assert truncated
    (record,) = await recorder.wait_for(1)
    assert record.client_leg.rst_sent
    assert record.close_cause == "backend_closed"  # its FIN, mid-response: not a vague 502


async def test_backend_reset_mid_body_aborts_the_client(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    client.send_raw(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
    with contextlib.suppress(ConnectionResetError):
        await client.read_until_closed()
    (record,) = await recorder.wait_for(1)
    assert record.backend_leg.rst_received
    assert record.client_leg.rst_sent
    assert record.close_cause == "backend_reset"


async def test_backend_connection_close_closes_the_client(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(port_of(balancer), b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_status(raw) == 200 and raw.endswith(b"ok")
    (record,) = await recorder.wait_for(1)
    assert record.close_cause in ("http_close", "backend_closed")
    # The backend said it closes: the balancer lets it, rather than racing it with a FIN.
    assert (record.backend_leg.initiator, record.backend_leg.first_fin) == ("peer", "peer")


async def test_malformed_requests_get_their_4xx_and_never_reach_a_backend(
    farm, balancer_factory
) -> None:
    config = make_config([farm[0].address], limits={"max_uri_bytes": 100, "max_header_bytes": 2000})
    balancer, recorder = await balancer_factory(config)
    port = port_of(balancer)
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 3000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 3000, 431),  # incomplete head
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /\r\n", 400),  # HTTP/0.9: at once (raw_exchange waits 5 s; the timeout is 10)
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
    ]
    for request, status in cases:
        raw = await raw_exchange(port, request)
        assert parse_status(raw) == status, request[:40]
        assert b"Connection: close" in raw
    assert farm[0].connections == 0
    records = await recorder.wait_for(len(cases))
    assert [r.error_status for r in records] == [s for _, s in cases]
    assert all(r.backend is None for r in records)


async def test_bad_chunk_framing_gets_400_or_431_and_the_body_is_not_passed_off(
    farm, balancer_factory
) -> None:
    config = make_config([farm[0].address], limits={"max_header_bytes": 2000})
    balancer, recorder = await balancer_factory(config)
    port = port_of(balancer)
    head = b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    cases = [
        (head + b"zz\r\nhello\r\n0\r\n\r\n", 400),  # not a hex size
        (head + b"5 ;x\r\nhello\r\n0\r\n\r\n", 400),  # whitespace in the size line
        (head + b"0" * 9000 + b"5\r\nhello\r\n0\r\n\r\n", 400),  # whole, oversized line
        (head + b"5;ext=" + b"e" * 5000, 400),  # oversized line still unfinished
        (head + b"5\r\nhello\r\n0\r\nX-T: " + b"t" * 3000 + b"\r\n\r\n", 431),  # trailers
    ]
    for request, status in cases:
        raw = await raw_exchange(port, request)
        assert parse_status(raw) == status, request[:80]
        assert b"Connection: close" in raw
    ok = await raw_exchange(
        port,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n5;name=value\r\nhello\r\n0\r\nX-T: t\r\n\r\n",
    )
    assert parse_status(ok) == 200
    records = await recorder.wait_for(len(cases) + 1)
    assert [r.error_status for r in records] == [s for _, s in cases] + [None]
    # Whatever head of a bad request went out, its message never reached a backend whole.
    seen = [(r.path, r.body_size, r.complete) for r in farm[0].seen]
    assert ("/ok", 5, True) in seen and not [s for s in seen if s[0] == "/bad" and s[2]]


async def test_incomplete_head_gets_408_at_the_header_deadline(farm, balancer_factory) -> None:
    config = make_config([farm[0].address], timeouts={"client_header_seconds": 0.2})
    balancer, recorder = await balancer_factory(config)
    raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert parse_status(raw) == 408
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "header_timeout"
    assert record.client_leg.initiator == "balancer"


async def test_trickled_head_is_cut_at_a_total_deadline(farm, balancer_factory) -> None:
    """Slowloris: each byte resets no timer; the head must be whole within the deadline."""
    config = make_config([farm[0].address], timeouts={"client_header_seconds": 0.3})
    balancer, _ = await balancer_factory(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed = asyncio.ensure_future(reader.read(-1))
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100:
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.wait({closed}, timeout=0.02)
    raw = await asyncio.wait_for(closed, 5)
    assert parse_status(raw) == 408
    assert loop.time() - started < 1.5
    writer.close()


async def test_idle_keep_alive_connection_is_closed_by_the_balancer(farm, balancer_factory):
    config = make_config([farm[0].address], timeouts={"keepalive_idle_seconds": 0.2})
    balancer, recorder = await balancer_factory(config)
    client = await Client.connect(port_of(balancer))
    assert (await client.request()).status == 200
    assert await client.read_until_closed() == b""
    await client.close()
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "idle_timeout"
    assert record.client_leg.initiator == "balancer"
    assert record.client_leg.first_fin == "balancer"


async def test_pipelined_bad_request_is_answered_after_the_good_one(farm, balancer_factory):
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(
        port_of(balancer),
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nBad Header\r\n\r\n",
    )
    first, second = raw.split(b"HTTP/1.1 ", 2)[1:]
    assert first.startswith(b"200") and b"web1 GET /first" in first
    assert second.startswith(b"400")


async def test_connections_over_the_limit_are_refused_cleanly(farm, balancer_factory) -> None:
    config = make_config([farm[0].address], limits={"max_connections": 2})
    balancer, _recorder = await balancer_factory(config)
    port = port_of(balancer)
    held = [await Client.connect(port) for _ in range(2)]
    for client in held:
        assert (await client.request()).status == 200
    extra = await Client.connect(port)
    with contextlib.suppress(ConnectionResetError):
        assert await extra.read_until_closed() == b""
    assert balancer.contexts[0].state.rejected_total == 1
    for client in held:
        await client.close()
    await extra.close()
    assert (await get(port)).status == 200


async def test_backend_that_accepts_then_closes_gives_502(balancer_factory) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        balancer, _ = await balancer_factory(make_config([address]))
        raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_status(raw) == 502
    finally:
        server.close()


async def test_body_over_the_limit_gets_413_and_never_reaches_a_backend(farm, balancer_factory):
    config = make_config([farm[0].address], limits={"max_body_bytes": 1000})
    balancer, recorder = await balancer_factory(config)
    port = port_of(balancer)
    raw = await raw_exchange(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"b" * 1001
    )
    assert parse_status(raw) == 413
    assert farm[0].connections == 0
    chunk = b"%x\r\n%b\r\n" % (600, b"c" * 600)
    raw = await raw_exchange(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
    )
    assert parse_status(raw) == 413  # found while streaming, before any response byte
    ok = await raw_exchange(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
        + b"d" * 1000,
    )
    assert parse_status(ok) == 200
    records = await recorder.wait_for(3)
    assert [r.error_status for r in records] == [413, 413, None]


async def test_ambiguous_backend_response_framing_gives_502(balancer_factory) -> None:
    """A response with Content-Length and Transfer-Encoding could desynchronise the client:
    it is refused, not relayed."""

    async def smuggler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until the balancer's FIN
        writer.close()

    server = await asyncio.start_server(smuggler, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        balancer, recorder = await balancer_factory(make_config([address]))
        raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_status(raw) == 502
        assert raw.count(b"HTTP/1.1") == 1
        (record,) = await recorder.wait_for(1)
        assert record.close_cause == "bad_backend_response"
    finally:
        server.close()


async def test_idle_keep_alive_connections_hold_no_reader_and_readers_serve_any_client(
    farm, balancer_factory, monkeypatch
) -> None:
    monkeypatch.setattr(http_flow, "READER_POOL_ABOVE", 0)  # as if many connections were open
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    ctx = balancer.contexts[0]
    first = await Client.connect(port_of(balancer))
    assert (await first.request(path="/first")).status == 200
    (conn,) = ctx.connections
    idle_readers = ctx.services.idle_readers
    assert conn.http.reader is None and len(idle_readers) == 1  # given back when idle
    assert conn.http.framer is not None  # reuse never: the backend connection is still held
    pooled = idle_readers[0]
    second = await Client.connect(port_of(balancer), source="127.0.0.2")  # another client
    response = await second.request("POST", "/second", body=b"x" * 1000)
    assert response.status == 200
    assert idle_readers == [pooled]  # taken for /second, given back after it
    assert (await first.request(path="/third")).status == 200  # the first client serves on
    await first.close()
    await second.close()
    await recorder.wait_for(2)
    seen = [(r.path, r.body_size, r.complete, r.header("X-Forwarded-For")) for r in farm[0].seen]
    assert seen == [
        ("/first", 0, True, "127.0.0.1"),
        ("/second", 1000, True, "127.0.0.2"),
        ("/third", 0, True, "127.0.0.1"),
    ]


async def test_with_few_connections_open_an_idle_one_keeps_its_reader(farm, balancer_factory):
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    assert (await client.request()).status == 200
    (conn,) = balancer.contexts[0].connections
    assert conn.http.reader is not None and balancer.services.idle_readers == []
    await client.close()


async def test_a_named_backend_is_resolved_once_at_start(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([f"localhost:{farm[0].port}"]))
    backend = balancer.backend_states()[0].backend
    assert "127.0.0.1" in backend.connect_hosts  # numeric: nothing to look up per connect
    assert [(await get(port_of(balancer))).status for _ in range(3)] == [200] * 3
    records = await recorder.wait_for(3)
    assert {(r.connect_attempts, r.connect_failures) for r in records} == {(1, 0)}
    assert {r.backend_address for r in records} == {f"localhost:{farm[0].port}"}


async def test_each_resolved_address_is_tried_in_turn_within_one_attempt(
    farm, balancer_factory
) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    state = balancer.backend_states()[0]
    # As if the name had resolved to an address that refuses (nothing listens on 127.0.0.2
    # at that port) ahead of the one that serves, as `localhost` does with ::1 first.
    state.backend = dataclasses.replace(state.backend, connect_hosts=("127.0.0.2", "127.0.0.1"))
    assert (await get(port_of(balancer))).status == 200
    (record,) = await recorder.wait_for(1)
    assert (record.connect_attempts, record.connect_failures) == (1, 0)
    assert state.connect_failures_total == 0  # not marked down for its first address


async def test_the_header_field_count_limit_is_configured(farm, balancer_factory) -> None:
    config = make_config([farm[0].address], limits={"max_header_fields": 3})
    balancer, _ = await balancer_factory(config)
    three = b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nConnection: close\r\n\r\n"
    four = b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nConnection: close\r\n\r\n"
    assert parse_status(await raw_exchange(port_of(balancer), three)) == 200
    assert parse_status(await raw_exchange(port_of(balancer), four)) == 431
