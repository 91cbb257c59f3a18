"""Who closed, how and in what order, per leg: each case made with real sockets."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

from tests.helpers import Client, client_context, make_config, port_of, raw_exchange

MIB = 1 << 20


def no_resets(record) -> bool:
    legs = (record.client_leg, record.backend_leg)
    return not any(leg.rst_sent or leg.rst_received for leg in legs)


async def test_keep_alive_client_closes_first(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    client = await Client.connect(port_of(balancer))
    assert (await client.request()).status == 200
    await client.close()  # the client's FIN comes first
    (record,) = await recorder.wait_for(1)
    client_leg, backend_leg = record.client_leg, record.backend_leg
    assert (client_leg.initiator, client_leg.first_fin) == ("peer", "peer")
    assert client_leg.fin_sent and record.client_teardown_seconds is not None
    assert record.close_cause == "client_closed"
    # The balancer then closed the backend leg, and the backend answered with its FIN.
    assert (backend_leg.initiator, backend_leg.first_fin) == ("balancer", "balancer")
    assert backend_leg.peer_fin_at is not None
    assert record.backend_teardown_seconds is not None
    assert no_resets(record)


async def test_http10_client_the_balancer_closes_first_and_the_client_follows(
    farm, balancer_factory
) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    (record,) = await recorder.wait_for(1)
    leg = record.client_leg
    assert (leg.initiator, leg.first_fin) == ("balancer", "balancer")
    assert leg.peer_fin_at is not None and leg.peer_fin_at >= leg.fin_sent_at
    assert record.client_teardown_seconds is not None
    assert record.close_cause == "http_close"
    assert no_resets(record)


async def test_client_reset_mid_response(farm, balancer_factory) -> None:
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(balancer))
    writer.write(f"GET /size/{64 * MIB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(65536)  # the response is flowing
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST
    (record,) = await recorder.wait_for(1)
    assert record.client_leg.rst_received and not record.client_leg.rst_sent
    assert record.client_leg.initiator == "peer"
    assert record.client_leg.kind == "rst"
    assert record.close_cause == "client_reset"
    assert record.backend_leg.initiator == "balancer"
    assert all(s.active == 0 for s in balancer.backend_states())


async def test_linger_is_bounded_when_the_client_never_closes(farm, balancer_factory) -> None:
    config = make_config(
        [farm[0].address], timeouts={"keepalive_idle_seconds": 0.1, "linger_seconds": 0.2}
    )
    balancer, recorder = await balancer_factory(config)
    client = await Client.connect(port_of(balancer))
    assert (await client.request()).status == 200
    assert await client.read_until_closed() == b""  # our FIN; the client keeps its side open
    (record,) = await asyncio.wait_for(recorder.wait_for(1), 3)
    leg = record.client_leg
    assert leg.initiator == "balancer" and leg.fin_sent
    assert leg.peer_fin_at is None and record.client_teardown_seconds is None
    assert not leg.rst_sent  # nothing was left unsent: a plain close after the linger
    await client.close()


def _answer_close_notify(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS client that reads until the server's close_notify, answers with its own, then FIN."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while chunk := tls.recv(65536):  # b"" = the server's close_notify arrived
        data += chunk
    tls.unwrap().close()
    return data


async def test_tls_close_notify_both_ways_when_the_balancer_closes(
    farm, balancer_factory, certs
) -> None:
    config = make_config(
        [farm[0].address], https=True, certs=certs, timeouts={"keepalive_idle_seconds": 0.1}
    )
    balancer, recorder = await balancer_factory(config)
    data = await asyncio.to_thread(
        _answer_close_notify, port_of(balancer), client_context(certs.ca)
    )
    assert data.startswith(b"HTTP/1.1 200")
    (record,) = await recorder.wait_for(1)
    leg = record.client_leg
    assert leg.close_notify_sent and leg.close_notify_received
    assert (leg.initiator, leg.kind) == ("balancer", "close_notify")
    # Our close_notify reaches the client before our FIN leaves, so the client's FIN can win:
    # either order is possible, and the record must say which one the kernel saw.
    assert leg.first_fin in ("balancer", "peer")
    assert leg.peer_fin_at is not None
    assert no_resets(record)


async def test_backend_that_closes_first_has_its_teardown_and_retransmits(
    farm, balancer_factory
) -> None:
    """HTTP/1.0 without keep-alive: the backend answers and closes first. The balancer then
    sends its FIN on that leg, so the leg has a teardown time and a retransmit count."""
    balancer, recorder = await balancer_factory(make_config([farm[0].address]))
    raw = await raw_exchange(port_of(balancer), b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    (record,) = await recorder.wait_for(1)
    leg = record.backend_leg
    assert (leg.initiator, leg.first_fin) == ("peer", "peer")
    assert leg.fin_sent and leg.retransmits == 0
    assert record.backend_teardown_seconds is not None
    assert 0 <= record.backend_teardown_seconds < 1
    assert no_resets(record)


async def test_every_connection_ends_when_clients_send_past_their_request_and_go(
    farm, balancer_factory
) -> None:
    """`GET` + a stray byte, one read, close: the client's RST can land between our TCP_INFO
    read and our shutdown. Under asyncio write_eof() then raised ENOTCONN and ~1.5% of such
    connections lingered for ever; every one must end (and be recorded)."""
    count = 1500
    config = make_config([farm[0].address], timeouts={"linger_seconds": 1})
    balancer, recorder = await balancer_factory(config)
    port = port_of(balancer)

    def clients() -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                # Blocking, bounded by the kernel (a Python timeout's poll() hides the race).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nX")
                sock.recv(65536)

    await asyncio.to_thread(clients)
    records = await recorder.wait_for(count, timeout=15)
    assert len(records) == count
    assert not any(ctx.connections for ctx in balancer.contexts)
    assert {r.close_cause for r in records} <= {"bad_request", "client_closed", "client_reset"}
