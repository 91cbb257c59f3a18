"""TLSSession over memory BIOs: every record in a read comes out, and close_notify is seen."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from balancer.config.schema import TLSConfig
from balancer.demo.certs import CertPaths, make_certs
from balancer.net.tls import TLSSession, TLSSetupError, certificate_names, server_context


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


def ip_only_pair(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 alone: no DNS name at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir()
    cert, key_path = directory / "ip.crt", directory / "ip.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return str(cert), str(key_path)


def test_sni_certificates_need_names_but_the_default_does_not(tmp_path: Path) -> None:
    """A pair chosen by SNI must hold a DNS name to be chosen by; the default (cert/key) is
    served to whatever none holds, so an IP-only default is fine."""
    ip_cert, ip_key = ip_only_pair(tmp_path / "ip")
    named = make_certs(tmp_path / "named", hosts=["chat.example.org"])
    assert certificate_names(ip_cert) == []
    assert "chat.example.org" in certificate_names(str(named.cert))
    with_default = TLSConfig(cert=ip_cert, key=ip_key,
                             certificates=((str(named.cert), str(named.key)),))  # fmt: skip
    assert server_context(with_default) is not None
    nameless = TLSConfig(cert=str(named.cert), key=str(named.key),
                         certificates=((ip_cert, ip_key),))  # fmt: skip
    with pytest.raises(TLSSetupError, match=r"tls.certificates\[0\].cert = .*holds no DNS name"):
        server_context(nameless)
