"""TLSSession over memory BIOs: every record in a read comes out, and close_notify is seen."""

from __future__ import annotations

import ssl

import pytest

from balancer.certs import CertPaths
from balancer.config import TLSConfig
from balancer.tls import TLSSession, server_context


@pytest.fixture
def pair(certs: CertPaths) -> tuple[ssl.SSLObject, ssl.MemoryBIO, TLSSession]:
    """A TLS 1.2 client and a server session, handshake done."""
    server = TLSSession(server_context(TLSConfig(cert=str(certs.cert), key=str(certs.key))))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certs.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(4):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            assert server.receive(outgoing.read()) == b""
            incoming.write(server.take_output())
    assert server.established
    return client, outgoing, server


def test_several_records_in_one_read_all_come_out(pair) -> None:
    client, wire, server = pair
    client.write(b"GET /1 HTTP/1.1\r\n\r\n")
    client.write(b"GET /2 HTTP/1.1\r\n\r\n")
    client.write(b"x" * 40000)  # three records
    assert server.receive(wire.read()) == b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n" + (
        b"x" * 40000
    )
    assert not server.close_notify_received


def test_a_record_split_across_reads_comes_out_when_whole(pair) -> None:
    client, wire, server = pair
    client.write(b"hello")
    record = wire.read()
    assert server.receive(record[:7]) == b""
    assert server.receive(record[7:]) == b"hello"


def test_close_notify_after_data_in_the_same_read_is_seen(pair) -> None:
    client, wire, server = pair
    client.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):  # our unwrap() waits for the reply
        client.unwrap()
    assert server.receive(wire.read()) == b"last words"
    assert server.close_notify_received
