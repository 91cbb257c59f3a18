"""The TLS listener: versions, ciphers, failures, resumption and close_notify, per record."""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import struct
import time
import warnings

import pytest

from balancer.facts.record import LegTeardown
from balancer.net import tcpinfo
from balancer.net.legs import Leg
from balancer.net.writebatch import WriteBatch
from tests.fakes import FakeSocket, FakeTransport
from tests.helpers import (
    Client,
    client_context,
    make_config,
    port_of,
    raw_exchange,
    until_bytes_are_stamped,
)


def _tls_get(
    port: int,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    close_notify: bool = True,
) -> tuple[bytes, ssl.SSLSession | None, str | None, tuple[str, str, int] | None]:
    """A blocking TLS client (run in a thread): one request, then close as told."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
    except ssl.SSLError:
        raw.close()
        raise
    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"\n" not in data.split(b"\r\n\r\n", 1)[-1]:
        data += tls.recv(65536)
    facts = tls.session, tls.version(), tls.cipher()
    if close_notify:
        tls.unwrap().close()  # close_notify, then FIN
    else:
        tls.close()  # Python sends no close_notify on close(): FIN alone, a truncation
    return data, *facts


@pytest.fixture
async def tls_balancer(farm, balancer_factory, certs):
    async def start(**tls):
        config = make_config(
            [farm[0].address],
            https=True,
            certs=certs,
            tls=tls,
            timeouts={"tls_handshake_seconds": 0.3},
        )
        balancer, recorder = await balancer_factory(config)
        return port_of(balancer), recorder

    return start


async def test_tls12_pinned_client_negotiates_an_ecdhe_aead_suite(tls_balancer, certs) -> None:
    port, recorder = await tls_balancer()
    context = client_context(certs.ca, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    data, _, version, cipher = await asyncio.to_thread(_tls_get, port, context)
    assert data.startswith(b"HTTP/1.1 200")
    assert version == "TLSv1.2"
    assert cipher is not None and cipher[0].startswith("ECDHE-") and "GCM" in cipher[0]
    (record,) = await recorder.wait_for(1)
    assert record.tls_version == "1.2"
    assert record.tls_cipher == cipher[0]
    assert record.tls_resumed is False
    assert record.tls_sni == "localhost"
    assert 0 < record.tls_handshake_seconds < 1
    assert record.tls_failure is None


async def test_tls13_is_offered_unless_pinned_off(tls_balancer, certs) -> None:
    port, _ = await tls_balancer()
    _, _, version, _ = await asyncio.to_thread(_tls_get, port, client_context(certs.ca))
    assert version == "TLSv1.3"
    port, _ = await tls_balancer(max_version="1.2")
    _, _, version, _ = await asyncio.to_thread(_tls_get, port, client_context(certs.ca))
    assert version == "TLSv1.2"


def _tls11_only_client() -> ssl.SSLContext:
    """A client that offers TLS 1.1 and nothing newer (Python deprecates even asking)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


async def test_tls11_client_is_refused_with_protocol_version(tls_balancer, farm, certs) -> None:
    port, recorder = await tls_balancer()
    context = _tls11_only_client()
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"):
        await asyncio.to_thread(_tls_get, port, context)
    (record,) = await recorder.wait_for(1)
    assert record.tls_failure == "protocol_version"
    assert record.close_cause == "tls_failed"
    assert record.backend is None and farm[0].connections == 0


async def test_plain_http_on_the_tls_port_is_not_tls(tls_balancer, farm) -> None:
    port, recorder = await tls_balancer()
    answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
    # A plain 400 that says why (nginx's 497 idea), not a TLS alert the client reads as junk.
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(
        b"This port speaks HTTPS: a plain HTTP request was sent to it. Use https://.\n"
    )
    (record,) = await recorder.wait_for(1)
    assert (record.tls_failure, record.error_status) == ("not_tls", 400)
    assert farm[0].connections == 0
    junk = await raw_exchange(port, b"\x00\x01 not a request, not TLS\r\n\r\n", timeout=2)
    assert not junk.startswith(b"HTTP/")  # junk gets OpenSSL's alert, as before


async def test_handshake_that_never_completes_times_out(tls_balancer, farm) -> None:
    port, recorder = await tls_balancer()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01\x00\xff\x01")  # the start of a ClientHello, then silence
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    (record,) = await recorder.wait_for(1)
    assert record.tls_failure == "timeout"
    assert record.close_cause == "tls_failed"
    assert farm[0].connections == 0


async def test_second_connection_resumes_the_tls12_session(tls_balancer, certs) -> None:
    port, recorder = await tls_balancer()
    context = client_context(certs.ca, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    _, session, _, _ = await asyncio.to_thread(_tls_get, port, context)
    await asyncio.to_thread(_tls_get, port, context, session)
    first, second = await recorder.wait_for(2)
    assert first.tls_resumed is False
    assert second.tls_resumed is True


async def test_close_notify_from_the_client_is_recorded(tls_balancer, certs) -> None:
    port, recorder = await tls_balancer()
    context = client_context(certs.ca, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    await asyncio.to_thread(_tls_get, port, context, None, True)
    await asyncio.to_thread(_tls_get, port, context, None, False)
    clean, truncated = await recorder.wait_for(2)
    assert clean.client_leg.close_notify_received is True
    assert clean.client_leg.initiator == "peer"
    assert clean.client_leg.kind == "close_notify"
    assert truncated.client_leg.close_notify_received is False
    assert truncated.client_leg.first_fin == "peer"


async def test_balancer_sends_close_notify_when_it_closes(farm, balancer_factory, certs):
    config = make_config(
        [farm[0].address], https=True, certs=certs, timeouts={"keepalive_idle_seconds": 0.2}
    )
    balancer, recorder = await balancer_factory(config)
    client = await Client.connect(port_of(balancer), client_context(certs.ca))
    assert (await client.request()).status == 200
    assert await client.read_until_closed() == b""  # a clean TLS EOF: close_notify arrived
    await client.close()
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "idle_timeout"
    assert record.client_leg.close_notify_sent is True
    assert record.client_leg.initiator == "balancer"


async def test_client_without_a_shared_suite_is_refused(tls_balancer, farm) -> None:
    port, recorder = await tls_balancer(max_version="1.2")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-GCM-SHA256")  # RSA key exchange: no forward secrecy, not offered
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(_tls_get, port, context)
    (record,) = await recorder.wait_for(1)
    assert record.tls_failure == "no_shared_cipher"
    assert farm[0].connections == 0


async def test_client_reset_mid_handshake_is_a_reset(tls_balancer, farm) -> None:
    port, recorder = await tls_balancer()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x16\x03\x01\x00\xff\x01\x00")  # the start of a ClientHello
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    (record,) = await recorder.wait_for(1)
    assert record.tls_failure == "reset"
    assert record.client_leg.rst_received
    assert farm[0].connections == 0


async def test_the_first_bytes_arrival_is_the_kernels_stamp_queued_or_awaited() -> None:
    """The ClientHello's arrival (Leg.stamp_first_bytes) is the packet's receive timestamp,
    peeked through the leg's own socket object: for bytes already queued, and for bytes that
    come while the leg watches for them (reading paused meanwhile)."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    tcpinfo.enable_receive_timestamps(listener)  # (accepted sockets inherit it)
    legs, sockets = [], [listener]
    try:
        for queued in (True, False):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            sockets += [client, server]
            until_bytes_are_stamped(client, server)
            leg = Leg(LegTeardown(), WriteBatch(loop.call_soon), time.time)
            leg.attach(FakeTransport(FakeSocket()), server)
            legs.append(leg)
            stamped: asyncio.Future[float] = loop.create_future()
            if queued:
                before = time.time()
                client.send(b"\x16")
                after = time.time()
                await loop.run_in_executor(None, select.select, [server], [], [], 5)
                leg.stamp_first_bytes(loop, time.time, stamped.set_result)
                assert stamped.done() and leg.paused_for == ()
            else:
                leg.stamp_first_bytes(loop, time.time, stamped.set_result)
                assert not stamped.done() and leg.paused_for == ("stamp",)
                before = time.time()
                client.send(b"\x16")
                after = time.time()
            arrival = await asyncio.wait_for(stamped, 5)
            assert before <= arrival <= after  # not when it was peeked
            assert leg.paused_for == () and leg.watched is None
            assert server.recv(1) == b"\x16"  # peeked, not taken
    finally:
        for leg in legs:
            leg.give_back()
        for sock in sockets:
            sock.close()
