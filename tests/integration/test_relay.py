"""Bodies, headers and connection semantics through the relay, over HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from tests.helpers import (
    Client,
    client_context,
    make_config,
    parse_status,
    pattern,
    port_of,
    raw_exchange,
)

MIB = 1 << 20


@pytest.fixture(params=["http", "https"])
async def proxied(request, farm, balancer_factory, certs):
    """(port, client ssl context or None, recorder) for a one-backend balancer."""
    https = request.param == "https"
    config = make_config([farm[0].address], https=https, certs=certs)
    balancer, recorder = await balancer_factory(config)
    return port_of(balancer), client_context(certs.ca) if https else None, recorder


async def test_one_mib_download_is_byte_exact(proxied) -> None:
    port, ssl_context, _ = proxied
    client = await Client.connect(port, ssl_context)
    response = await client.request("GET", f"/size/{MIB}")
    assert response.status == 200
    assert response.body == pattern(MIB)
    chunked = await client.request("GET", f"/chunked/{MIB}")
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert chunked.body == pattern(MIB)
    await client.close()


async def test_one_mib_upload_is_byte_exact(proxied) -> None:
    port, ssl_context, _ = proxied
    body = pattern(MIB)
    client = await Client.connect(port, ssl_context)
    response = await client.request("POST", "/upload", body=body)
    assert response.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    chunked = await client.request("POST", "/upload", body=body, chunked=True)
    assert chunked.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert chunked.body == body
    await client.close()


async def test_forwarding_headers_reach_the_backend(farm, balancer_factory, certs) -> None:
    for https in (False, True):
        config = make_config([farm[0].address], https=https, certs=certs)
        balancer, _ = await balancer_factory(config)
        port = port_of(balancer)
        client = await Client.connect(port, client_context(certs.ca) if https else None)
        await client.request(
            headers=[
                ("X-Forwarded-For", "203.0.113.9"),
                ("X-Forwarded-Proto", "gopher"),
                ("Connection", "X-Secret"),
                ("X-Secret", "hop-by-hop"),
                ("Keep-Alive", "timeout=5"),
            ]
        )
        await client.close()
        seen = farm[0].seen[-1]
        assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
        assert seen.header("X-Forwarded-Proto") == ("https" if https else "http")
        assert seen.header("X-Forwarded-Port") == str(port)
        assert seen.header("X-Secret") is None  # named by Connection: dropped
        assert seen.header("Keep-Alive") is None
        assert seen.header("Host") == "localhost"


async def test_http10_request_gets_a_close_and_the_backend_sees_http10(farm, balancer_factory):
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(port_of(balancer), b"GET /x HTTP/1.0\r\n\r\n")
    assert parse_status(raw) == 200
    assert raw.endswith(b"web1 GET /x\n")
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "http_close"
    assert record.client_leg.initiator == "balancer"


async def test_expect_100_continue_is_relayed(farm, balancer_factory) -> None:
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    # Our test backend does not send 100 itself; the request still completes once sent.
    writer.write(b"hello")
    data = await asyncio.wait_for(reader.readuntil(b"hello"), 5)
    assert data.startswith(b"HTTP/1.1 200")
    assert farm[0].seen[-1].header("Expect") == "100-continue"
    writer.close()


async def test_half_closed_client_still_gets_the_whole_response(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
    writer.write(f"GET /size/{MIB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    writer.write_eof()  # shutdown(SHUT_WR)
    data = await asyncio.wait_for(reader.read(-1), 10)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == pattern(MIB)
    writer.close()
    (record,) = await recorder.wait_for(1)
    assert record.client_leg.first_fin == "peer"
    assert record.close_cause == "client_closed"


async def test_upgrade_becomes_a_byte_tunnel(farm, balancer_factory) -> None:
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nearly"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"early"
    writer.write(b"GET / HTTP/1.1\r\n\r\n not http at all \x00\xff")  # tunnelled, unparsed
    echoed = await asyncio.wait_for(reader.readexactly(37), 5)
    assert echoed == b"GET / HTTP/1.1\r\n\r\n not http at all \x00\xff"
    seen = farm[0].seen[-1]
    assert seen.header("Upgrade") == "test"
    writer.close()


async def test_tcp_mode_relays_bytes_and_picks_the_backend_at_accept(balancer_factory) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from the farm\n")  # server speaks first, as XMPP or SMTP do
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        balancer, recorder = await balancer_factory(make_config([address], mode="tcp"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello from the farm\n"
        payload = bytes(range(256)) * 1000
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        (record,) = await recorder.wait_for(1)
        assert record.requests == 0
        assert record.backend_bytes_out == len(payload)
        assert record.client_leg.first_fin == "peer"
    finally:
        server.close()


async def test_slow_reader_holds_bounded_memory(farm, balancer_factory) -> None:
    """A client that does not read a 256 MiB response: the balancer's buffers stay small
    because it stops reading the backend (flow control), not because it buffers it all."""
    balancer, _ = await balancer_factory(make_config([farm[0].address]))
    _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer), limit=65536)
    writer.write(f"GET /size/{256 * MIB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        async with asyncio.timeout(10):  # bounded wait for the pause, polled
            while not any(
                c.fwd.backend is not None and c.fwd.backend.reading_paused
                for c in balancer.contexts[0].connections
            ):
                await asyncio.sleep(0.01)
        (conn,) = balancer.contexts[0].connections
        assert conn.client.transport.get_write_buffer_size() < 4 * MIB
        assert conn.record.backend_bytes_in < 32 * MIB  # the rest waits in the backend
    finally:
        writer.close()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tcp server that says bye and closes (an XMPP logout; its FIN first)."""
    writer.write(b"bye\n")
    writer.close()


async def test_tcp_mode_records_the_backend_closing_first(balancer_factory) -> None:
    """A server that ends the session (an XMPP logout, a killed server's kernel FIN): the
    record says the backend closed, though the client's FIN ends the connection."""
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        balancer, recorder = await balancer_factory(make_config([address], mode="tcp"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
        assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"  # to the passed-on FIN
        writer.close()
        (record,) = await recorder.wait_for(1)
        assert record.close_cause == "backend_closed"
        assert record.backend_leg.initiator == "peer" and record.client_leg.initiator == "balancer"
    finally:
        server.close()


async def test_tcp_mode_records_the_reset_a_closed_server_answers_with(balancer_factory) -> None:
    """The server hung up (FIN); the client sends its last bytes anyway (an XMPP client's
    </stream:stream>): relayed, they reach a closed socket, whose kernel answers RST. The
    backend leg ended by that reset, not by a FIN of ours (issue #14's capture)."""
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        balancer, recorder = await balancer_factory(make_config([address], mode="tcp"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
        assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"
        writer.write(b"</stream:stream>")  # after the server's FIN
        await writer.drain()
        async with asyncio.timeout(5):  # the server's RST is in before the client closes
            while not any(
                c.fwd.backend is not None and (c.fwd.backend.leg.tcp_info() or (0,))[0] == 7
                for c in balancer.contexts[0].connections
            ):
                await asyncio.sleep(0.01)
        writer.close()
        (record,) = await recorder.wait_for(1)
        leg = record.backend_leg
        assert (leg.kind, leg.rst_received, leg.fin_sent) == ("rst", True, False)
        assert record.close_cause == "backend_closed"
    finally:
        server.close()
