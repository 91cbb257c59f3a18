"""PROXY protocol headers and the ClientHello's SNI: pure encoding and parsing."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.client.prelude import Prelude, trusted
from balancer.config.values import networks
from balancer.wire.proxy_protocol import (
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_SSL,
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeaderError,
    TLSFacts,
    _tlvs,
    encode_local,
    encode_v1,
    encode_v2,
)
from balancer.wire.sni import NOT_TLS, ClientHelloReader, server_name


def read_whole(data: bytes, step: int = 1) -> tuple[object, bytes]:
    """Fed a few bytes at a time, as a slow network would."""
    reader = HeaderReader()
    for at in range(0, len(data), step):
        done = reader.feed(data[at : at + step])
        if done is not None:
            return done
    raise AssertionError("never whole")


def test_v1_round_trip_in_pieces_keeps_what_follows() -> None:
    line = encode_v1(("203.0.113.7", 50123), ("192.0.2.1", 443))
    assert line == b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\r\n"
    reader = HeaderReader()
    for at in range(0, 40, 4):
        assert reader.feed(line[at : at + 4]) is None
    header, rest = reader.feed(line[40:] + b"GET / HTTP/1.1\r\n")  # type: ignore[misc]
    assert header.source == ("203.0.113.7", 50123) and header.destination == ("192.0.2.1", 443)
    assert rest == b"GET / HTTP/1.1\r\n"


def test_v2_carries_addresses_and_the_tls_facts() -> None:
    facts = TLSFacts("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "xmpp.example", None)
    data = encode_v2(("2001:db8::7", 5222), ("2001:db8::1", 5223), facts)
    header, rest = read_whole(data + b"<stream>", step=len(data) + 8)  # type: ignore[misc]
    assert header.version == 2 and rest == b"<stream>"
    assert header.source == ("2001:db8::7", 5222) and header.destination == ("2001:db8::1", 5223)
    assert header.tlvs[PP2_TYPE_AUTHORITY] == b"xmpp.example"
    ssl_tlv = header.tlvs[PP2_TYPE_SSL]
    assert ssl_tlv[0] == 0x01 and ssl_tlv[1:5] == b"\0\0\0\0"  # over TLS; verify 0
    sub = _tlvs(ssl_tlv[5:])
    assert sub[PP2_SUBTYPE_SSL_VERSION] == b"TLSv1.2"
    assert sub[PP2_SUBTYPE_SSL_CIPHER] == b"ECDHE-ECDSA-AES128-GCM-SHA256"


def test_a_dual_stack_listeners_ipv4_clients_are_sent_as_ipv4() -> None:
    mapped = (("::ffff:203.0.113.7", 5000), ("::ffff:192.0.2.1", 443))
    assert encode_v1(*mapped) == b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 443\r\n"
    header, _ = HeaderReader().feed(encode_v2(*mapped))  # type: ignore[misc]
    assert header.source == ("203.0.113.7", 5000)


def test_what_is_not_a_header_is_refused() -> None:
    for bad in (
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
        b"PROXY " + b"x" * 200,
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00",  # version 3
    ):
        with pytest.raises(ProxyHeaderError):
            HeaderReader().feed(bad)
    header, rest = HeaderReader().feed(b"PROXY UNKNOWN\r\nx")  # type: ignore[misc]
    assert header.source is None and rest == b"x"
    for version, number in (("v1", 1), ("v2", 2)):  # what health checks send
        header, rest = HeaderReader().feed(encode_local(version) + b"GET")  # type: ignore[misc]
        assert (header.version, header.source, rest) == (number, None, b"GET")


def client_hello(name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_sni_of_a_real_client_hello_arrives_in_any_pieces() -> None:
    hello = client_hello("Eu.Example.com")
    reader = ClientHelloReader()
    results = [reader.feed(hello[at : at + 7]) for at in range(0, len(hello), 7)]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None and results[-1].server_name == "eu.example.com"
    assert reader.held == hello
    assert ClientHelloReader().feed(client_hello(None)).server_name is None  # type: ignore[union-attr]
    assert ClientHelloReader().feed(b"GET / HTTP/1.1\r\n") is NOT_TLS
    assert server_name(b"\x03\x03") is None  # cut short: no name, no exception


def test_a_prelude_reads_a_proxy_header_then_keeps_the_hello() -> None:
    hello = client_hello("a.test")
    prelude = Prelude(proxy=True, sni=True)
    line = encode_v1(("198.51.100.9", 4000), ("127.0.0.1", 443))
    assert prelude.feed(line) is None
    assert prelude.feed(hello) == hello
    assert prelude.peek is not None and prelude.peek.server_name == "a.test"
    assert trusted("127.0.0.1", networks(["127.0.0.0/8"]))
    assert trusted("::ffff:10.1.2.3", networks(["10.0.0.0/8"]))
    assert not trusted("192.0.2.1", networks(["10.0.0.0/8", "::1"]))


@given(
    st.lists(st.binary(max_size=64), max_size=8), st.sampled_from([b"", b"PROXY ", V2_SIGNATURE])
)
def test_any_first_bytes_give_a_header_a_wait_or_a_refusal(
    chunks: list[bytes], start: bytes
) -> None:
    """Whatever a client sends first, reading it never raises anything but ProxyHeaderError
    (the connection is closed, no traceback)."""
    reader = HeaderReader()
    try:
        for chunk in [start, *chunks]:
            if reader.feed(chunk) is not None:
                break
    except ProxyHeaderError:
        pass


@given(st.binary(max_size=600), st.integers(1, 64))
def test_any_bytes_peeked_for_sni_give_a_name_a_wait_or_not_tls(data: bytes, step: int) -> None:
    reader = ClientHelloReader()
    hello = b"\x16\x03\x01" + data  # looks like a handshake record, then anything
    for at in range(0, len(hello), step):
        if reader.feed(hello[at : at + step]) is not None:
            break
    server_name(data)  # any ClientHello body: a name or None, never an exception


def test_h2c_prior_knowledge_is_told_from_http1_by_the_first_bytes() -> None:
    """A plain listener with h2c holds the first bytes only while they could still be the
    HTTP/2 preface; a request that parts from it early is HTTP/1.x at once."""
    from balancer.client.prelude import H2_PREFACE

    prelude = Prelude(proxy=False, sni=False, h2c=True)
    sent = H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and an empty SETTINGS
    for byte in range(len(H2_PREFACE) - 1):
        assert prelude.feed(sent[byte : byte + 1]) is None
    assert prelude.feed(sent[len(H2_PREFACE) - 1 :]) == sent  # nothing lost
    assert prelude.h2c
    for http1 in (b"GET / HTTP/1.1\r\n", b"PUT /x HTTP/1.1\r\n", b"PRI * HTTP/1.1\r\n"):
        prelude = Prelude(proxy=False, sni=False, h2c=True)
        assert prelude.feed(http1) == http1 and not prelude.h2c
    prelude = Prelude(proxy=False, sni=False, h2c=True)
    assert prelude.feed(b"PR") is None  # (PRI or an HTTP/1 method: not yet known)
    assert prelude.feed(b"OPFIND / HTTP/1.1\r\n") == b"PROPFIND / HTTP/1.1\r\n"
    assert not prelude.h2c
