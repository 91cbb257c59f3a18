"""Shutdown, metrics, admin API and the access log, observed from outside."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from balancer.process.server import Balancer
from tests.helpers import Client, admin_json, get, make_config, port_of, scrape


async def test_graceful_shutdown_finishes_in_flight_and_closes_idle(farm, balancer_factory):
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    port = port_of(balancer)
    idle = await Client.connect(port)
    assert (await idle.request()).status == 200
    busy = await Client.connect(port)
    busy.send_raw(b"GET /delay/300 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):  # the request has reached the backend
        while len(farm[0].seen) < 2:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    shutdown = asyncio.ensure_future(balancer.shutdown(grace=5.0))
    assert await idle.read_until_closed() == b""  # idle keep-alive: closed at once
    await idle.close()  # as real clients do on EOF; the balancer lingers for this FIN
    response = await busy.read_response()
    assert response.status == 200 and response.body == b"web1 delayed\n"
    assert response.headers["connection"] == "close"
    assert await busy.read_until_closed() == b""
    await busy.close()
    await asyncio.wait_for(shutdown, 5)
    assert loop.time() - started < 2.0
    records = await recorder.wait_for(2)
    assert {r.close_cause for r in records} == {"shutdown", "http_close"}
    try:
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        raise AssertionError("the listener still accepts after shutdown")
    except ConnectionRefusedError:
        pass


async def test_shutdown_answers_what_waits_in_the_accept_queue(farm, balancer_factory) -> None:
    """Closing a listening socket resets the connections in its accept queue, requests sent
    and all (ab -c 50 saw ~45 resets per SIGTERM). What reached the machine before shutdown
    began is taken and answered, with `Connection: close`."""
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    port = port_of(balancer)
    waiting = []
    for i in range(20):  # connected by the kernel alone: the balancer's loop has not run since
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(f"GET /queued/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        waiting.append(sock)
    shutdown = asyncio.ensure_future(balancer.shutdown(grace=5.0))
    for i, sock in enumerate(waiting):
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        answer = await asyncio.wait_for(reader.read(), 5)  # to the balancer's FIN
        assert answer.startswith(b"HTTP/1.1 200"), (i, answer[:60])
        assert b"\r\nconnection: close\r\n" in answer.lower()
        writer.close()
    await asyncio.wait_for(shutdown, 5)
    records = await recorder.wait_for(20)
    assert all(r.requests == 1 and r.error_status is None for r in records)


async def test_a_connection_silent_at_shutdown_gets_until_its_header_deadline(
    farm, balancer_factory
) -> None:
    """Its request may be in the kernel, unread: it is not closed as an idle keep-alive one
    is, but served if a request comes (here: after shutdown began)."""
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    fresh = await Client.connect(port_of(balancer))
    async with asyncio.timeout(5):
        while not balancer.contexts[0].connections:
            await asyncio.sleep(0.01)
    shutdown = asyncio.ensure_future(balancer.shutdown(grace=5.0))
    await asyncio.sleep(0)  # shutdown has begun (drain() ran) before the request is sent
    response = await fresh.request(path="/late")
    assert response.status == 200 and response.headers["connection"] == "close"
    assert await fresh.read_until_closed() == b""
    await fresh.close()
    await asyncio.wait_for(shutdown, 5)


async def test_shutdown_grace_bounds_a_request_that_never_ends(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    client.send_raw(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        while not farm[0].seen:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await balancer.shutdown(grace=0.2)
    assert loop.time() - started < 1.5
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "shutdown"
    await client.close()


async def test_metrics_are_scraped_and_parse(farm, balancer_factory, certs) -> None:
    balancer, recorder = await balancer_factory(make_config([b.address for b in farm]))
    for _ in range(3):
        assert (await get(port_of(balancer))).status == 200
    await recorder.wait_for(3)
    families = {f.name: f for f in text_string_to_metric_families(await scrape(balancer))}

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("balancer_connections_accepted", "balancer_connections_accepted_total") == 3
    assert value("balancer_connections_active", "balancer_connections_active") == 0
    assert value("balancer_requests", "balancer_requests_total") == 3
    for backend in ("b0", "b1", "b2"):
        assert (
            value(
                "balancer_backend_connections",
                "balancer_backend_connections_total",
                backend=backend,
            )
            == 1
        )
        for family in ("connect_wait", "tcp_handshake_rtt"):
            name = f"balancer_backend_{family}_seconds"
            assert value(name, f"{name}_count", backend=backend) == 1
    assert (
        value("balancer_tcp_handshake_rtt_seconds", "balancer_tcp_handshake_rtt_seconds_count") == 3
    )
    assert (
        value(
            "balancer_closes", "balancer_closes_total", leg="client", initiator="peer", kind="fin"
        )
        == 3
    )
    assert value("balancer_bytes", "balancer_bytes_total", leg="client", direction="in") > 0


async def test_admin_api_lists_open_and_recent_connections(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    held = await Client.connect(port_of(balancer))
    assert (await held.request()).status == 200
    view = await admin_json(balancer, "/connections")
    (open_conn,) = view["open"]
    assert open_conn["state"] == "idle" and open_conn["backend"] == "b0"
    assert open_conn["requests"] == 1
    await held.close()
    await recorder.wait_for(1)
    view = await admin_json(balancer, "/connections")
    assert view["open"] == []
    assert view["recent_closed"][0]["backend"]["name"] == "b0"
    (backend,) = await admin_json(balancer, "/backends")
    assert backend["name"] == "b0" and backend["active"] == 0
    assert backend["connections_total"] == 1


async def test_access_log_has_one_json_line_per_connection(farm) -> None:
    log = io.StringIO()
    config = replace(make_config([farm[0].address]), request_log=True)
    balancer = Balancer(config, access_log=log)
    await balancer.start()
    try:
        for _ in range(2):
            assert (await get(port_of(balancer, "http"))).status == 200
        async with asyncio.timeout(5):
            while balancer.observer.closed_total < 2:
                await asyncio.sleep(0.01)
    finally:
        await balancer.shutdown(grace=1.0)
    every = [json.loads(line) for line in log.getvalue().splitlines()]
    lines = [line for line in every if line["type"] == "connection"]
    requests = [line for line in every if line["type"] == "request"]
    assert len(lines) == 2 and len(requests) == 2
    assert [r["connection_id"] for r in requests] == [line["id"] for line in lines]
    assert all(r["status"] == 200 and r["backend"] == "b0" for r in requests)
    first = lines[0]
    assert first["listener"] == "http"
    assert first["client"]["ip"] == "127.0.0.1"
    assert first["backend"]["name"] == "b0"
    assert first["requests"] == 1
    assert first["close_cause"] == "client_closed"
    assert first["client_leg"]["initiator"] == "peer"
    assert first["bytes"]["client_in"] > 0 and first["bytes"]["backend_in"] > 0
    assert first["id"] != lines[1]["id"]


async def test_a_scrape_connection_open_when_the_loop_ends_closes_quietly(farm, balancer_factory):
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    reader, writer = await asyncio.open_connection(*balancer.addresses["admin"])
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await reader.readuntil(b"ok\n")  # the handler is running, waiting for the next request
    handlers = [t for t in asyncio.all_tasks() if "AdminServer.handle" in repr(t.get_coro())]
    assert len(handlers) == 1
    handlers[0].cancel()  # what asyncio.run does to tasks left when the loop ends
    async with asyncio.timeout(5):
        assert await reader.read() == b""
        await asyncio.wait(handlers)
    writer.close()
    loop.set_exception_handler(None)
    assert not handlers[0].cancelled() and errors == []
