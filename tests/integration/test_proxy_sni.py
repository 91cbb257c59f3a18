"""PROXY protocol sent and accepted, certificates chosen by SNI, and TLS passed through by SNI:
over real sockets, with Python's ssl as the client and small servers as backends."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from balancer.config.schema import parse_config
from balancer.demo.certs import CertPaths, make_certs
from balancer.observe.loglines import json_line
from balancer.wire.proxy_protocol import (
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_SSL,
    HeaderReader,
    ProxyHeaderError,
    _tlvs,
    encode_v1,
)
from tests.helpers import Backend, port_of, raw_exchange


class ProxyReadingServer:
    """A backend that expects a PROXY header, then answers one HTTP request (or, tcp, a
    line) with what the header said, as JSON."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.headers: list[Any] = []  # every header it read, in order
        self.header_read = asyncio.Event()

    async def start(self) -> ProxyReadingServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header_reader, done = HeaderReader(), None
        while done is None:
            data = await reader.read(4096)
            try:
                if not data:
                    raise ProxyHeaderError("closed")
                done = header_reader.feed(data)
            except ProxyHeaderError:  # as nginx's `listen ... proxy_protocol`: no header, no answer
                writer.close()
                return
        header, rest = done
        self.headers.append(header)
        self.header_read.set()
        while b"\n" not in rest:
            rest += await reader.read(4096)
        ssl_tlv = header.tlvs.get(PP2_TYPE_SSL)
        said = {
            "version": header.version,
            "source": header.source,
            "tls_version": None
            if ssl_tlv is None
            else _tlvs(ssl_tlv[5:])[PP2_SUBTYPE_SSL_VERSION].decode(),
            "first_line": rest.split(b"\r\n")[0].decode(),
            "forwarded_for": [
                line.split(b":", 1)[1].strip().decode()
                for line in rest.split(b"\r\n")
                if line.lower().startswith(b"x-forwarded-for:")
            ],
        }
        body = json.dumps(said).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy_reader() -> AsyncIterator[ProxyReadingServer]:
    server = await ProxyReadingServer().start()
    yield server
    server.close()


def config_with(listeners: list[dict[str, Any]], groups: list[dict[str, Any]],
                tls: dict[str, Any] | None = None) -> Any:  # fmt: skip
    table: dict[str, Any] = {"listeners": listeners, "groups": groups, "admin": "127.0.0.1:0"}
    if tls is not None:
        table["tls"] = tls
    return parse_config(table, "test")


async def tls_exchange(port: int, data: bytes, context: ssl.SSLContext, name: str) -> bytes:
    """raw_exchange over TLS: send, read until the other side closes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=name
    )
    writer.write(data)
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    return answer


def said_by(answer: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return result


async def test_the_client_a_proxy_header_names_is_the_one_sent_on(
    balancer_factory: Callable[..., Any], proxy_reader: ProxyReadingServer
) -> None:
    """Behind an L4 balancer (accept) and in front of a server that wants PROXY v1 (send): the
    server sees the client the first header named, not the balancer or the L4 balancer."""
    config = config_with(
        [{"name": "http", "bind": "127.0.0.1:0", "accept_proxy_from": ["127.0.0.0/8"]}],
        [{"name": "app", "send_proxy": "v1",
          "backends": [{"name": "app1", "address": f"127.0.0.1:{proxy_reader.port}"}]}],
    )  # fmt: skip
    balancer, recorder = await balancer_factory(config)
    answer = await raw_exchange(
        port_of(balancer, "http"),
        b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 80\r\n"
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    said = said_by(answer)
    assert said["version"] == 1 and said["source"] == ["203.0.113.7", 50123]
    assert said["first_line"] == "GET /x HTTP/1.1" and said["forwarded_for"] == ["203.0.113.7"]
    (record,) = await recorder.wait_for(1)
    assert (record.client_ip, record.client_port) == ("203.0.113.7", 50123)
    assert record.proxied_by is not None and record.proxied_by.startswith("127.0.0.1:")


async def test_v2_tells_the_server_its_client_came_over_tls(
    balancer_factory: Callable[..., Any], proxy_reader: ProxyReadingServer, certs: CertPaths
) -> None:
    config = config_with(
        [{"name": "xmpps", "bind": "127.0.0.1:0", "tls": True, "mode": "tcp"}],
        [{"name": "app", "send_proxy": "v2",
          "backends": [{"name": "app1", "address": f"127.0.0.1:{proxy_reader.port}"}]}],
        {"cert": str(certs.cert), "key": str(certs.key), "max_version": "1.2"},
    )  # fmt: skip
    balancer, _ = await balancer_factory(config)
    context = ssl.create_default_context(cafile=str(certs.ca))
    answer = await tls_exchange(port_of(balancer, "xmpps"), b"<stream>\r\n", context, "localhost")
    said = said_by(answer)
    assert said["version"] == 2 and said["source"][0] == "127.0.0.1"
    assert said["tls_version"] == "TLSv1.2" and said["first_line"] == "<stream>"


async def test_a_proxy_header_from_elsewhere_or_malformed_is_refused(
    balancer_factory: Callable[..., Any], proxy_reader: ProxyReadingServer
) -> None:
    config = config_with(
        [{"name": "lan", "bind": "127.0.0.1:0", "accept_proxy_from": ["10.0.0.0/8"]},
         {"name": "lo", "bind": "127.0.0.1:0", "accept_proxy_from": ["127.0.0.1"]}],
        [{"name": "app", "backends": [{"address": f"127.0.0.1:{proxy_reader.port}"}]}],
    )  # fmt: skip
    balancer, recorder = await balancer_factory(config)
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert await raw_exchange(port_of(balancer, "lan"), header) == b""
    assert await raw_exchange(port_of(balancer, "lo"), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == b""
    records = await recorder.wait_for(2)
    assert sorted(r.close_cause or "" for r in records) == [
        "proxy_header_invalid", "proxy_refused",
    ]  # fmt: skip
    assert all(r.backend is None for r in records)  # nothing reached a backend


async def test_a_client_that_resets_before_its_header_is_a_reset_not_a_refusal(
    balancer_factory: Callable[..., Any], proxy_reader: ProxyReadingServer
) -> None:
    """HAProxy's checks of a listener that takes PROXY headers connect and reset at once: the
    peer's address is gone before it can be asked, which is no reason to call it refused."""
    config = config_with(
        [{"name": "lo", "bind": "127.0.0.1:0", "accept_proxy_from": ["127.0.0.1"]}],
        [{"name": "app", "backends": [{"address": f"127.0.0.1:{proxy_reader.port}"}]}],
    )  # fmt: skip
    balancer, recorder = await balancer_factory(config)
    probe = socket.create_connection(("127.0.0.1", port_of(balancer, "lo")))
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    probe.close()  # an RST, before any byte
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "client_reset" and record.client_leg.rst_received
    assert record.backend is None


def names_in(der: bytes | None) -> list[str]:
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


async def peer_names(port: int, name: str) -> list[str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=name
    )
    names = names_in(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    writer.close()
    return names


async def test_each_name_gets_its_certificate(
    balancer_factory: Callable[..., Any], certs: CertPaths, tmp_path: Path
) -> None:
    a = make_certs(tmp_path / "a", hosts=["a.test"])
    wild = make_certs(tmp_path / "b", hosts=["*.b.test"])
    config = config_with(
        [{"name": "https", "bind": "127.0.0.1:0", "tls": True}],
        [{"name": "web", "backends": [{"address": "127.0.0.1:9"}]}],
        {"cert": str(certs.cert), "key": str(certs.key),
         "certificates": [{"cert": str(a.cert), "key": str(a.key)},
                          {"cert": str(wild.cert), "key": str(wild.key)}]},
    )  # fmt: skip
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer, "https")
    assert "a.test" in await peer_names(port, "A.test")
    assert "*.b.test" in await peer_names(port, "eu.b.test")
    for default in ("localhost", "b.test", "other.test"):  # the default: cert/key
        assert await peer_names(port, default) == ["localhost"]


async def tls_server(name: str, paths: CertPaths) -> asyncio.Server:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(paths.cert), str(paths.key))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)


async def test_tls_passed_through_goes_where_its_sni_says(
    balancer_factory: Callable[..., Any], certs: CertPaths
) -> None:
    servers = {name: await tls_server(name, certs) for name in ("A", "B", "C")}
    try:
        port_of_server = {n: s.sockets[0].getsockname()[1] for n, s in servers.items()}
        config = config_with(
            [{"name": "tls", "bind": "127.0.0.1:0", "mode": "tcp", "group": "c",
              "routes": [{"sni": "a.test", "group": "a"}, {"sni": "*.b.test", "group": "b"}]}],
            [{"name": n.lower(), "backends": [{"address": f"127.0.0.1:{p}"}]}
             for n, p in port_of_server.items()],
        )  # fmt: skip
        balancer, recorder = await balancer_factory(config)
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.check_hostname = False  # the backends' certificate says localhost
        port = port_of(balancer, "tls")
        for name, expected in (("a.test", b"A"), ("x.b.test", b"B"), ("localhost", b"C")):
            assert await tls_exchange(port, b"", context, name) == expected, name
        records = await recorder.wait_for(3)
        assert sorted(r.tls_sni or "" for r in records) == ["a.test", "localhost", "x.b.test"]
        assert all(r.tls_version is None for r in records)  # not terminated here
        line = json.loads(json_line(records[0]))  # the access log says the name too
        assert line["tls"]["sni"] == records[0].tls_sni and line["tls"]["version"] is None
        assert line == json.loads(json.dumps(records[0].to_dict()))
    finally:
        for server in servers.values():
            server.close()


async def tls_over_proxy(port: int, header: bytes, ca: str, together: bool) -> bytes:
    """A PROXY header, then a TLS handshake and one request, by hand over memory BIOs:
    `together` sends the header and the ClientHello in one write (one segment)."""
    context = ssl.create_default_context(cafile=ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if not together:
        writer.write(header)
        await writer.drain()
        header = b""
    async with asyncio.timeout(5):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(header + outgoing.read())
                header = b""
                incoming.write(await reader.read(65536))
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        writer.write(outgoing.read())
        answer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    answer += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    writer.close()
    return answer


async def test_tls_behind_an_l4_balancer_whether_or_not_the_hello_came_with_the_header(
    balancer_factory: Callable[..., Any], certs: CertPaths
) -> None:
    backend = await Backend("web1").start()
    try:
        config = config_with(
            [{"name": "https", "bind": "127.0.0.1:0", "tls": True,
              "accept_proxy_from": ["127.0.0.1"]}],
            [{"name": "web", "backends": [{"address": backend.address}]}],
            {"cert": str(certs.cert), "key": str(certs.key)},
        )  # fmt: skip
        balancer, recorder = await balancer_factory(config)
        port = port_of(balancer, "https")
        for n, together in enumerate((False, True), 1):
            header = encode_v1((f"198.51.100.{n}", 40000 + n), ("127.0.0.1", port))
            answer = await tls_over_proxy(port, header, str(certs.ca), together)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            assert backend.seen[-1].header("x-forwarded-for") == f"198.51.100.{n}"
        records = await recorder.wait_for(2)
        assert [r.client_ip for r in records] == ["198.51.100.1", "198.51.100.2"]
        for record in records:
            assert record.tls_version is not None and record.tls_handshake_seconds is not None
            assert 0 <= record.tls_handshake_seconds < 1
    finally:
        backend.close()


async def test_a_group_that_sends_proxy_headers_sends_them_on_its_checks(
    balancer_factory: Callable[..., Any], proxy_reader: ProxyReadingServer
) -> None:
    """Servers that want a PROXY header on every connection (nginx's `proxy_protocol`, Prosody's
    mod_net_proxy) answer the checks too: v2's LOCAL command (HAProxy's check-send-proxy)."""
    config = config_with(
        [{"name": "http", "bind": "127.0.0.1:0"}],
        [{"name": "app", "send_proxy": "v2",
          "health_check": {"type": "http", "interval_seconds": 0.05, "timeout_seconds": 0.05,
                           "rise": 1, "fall": 1},
          "backends": [{"name": "app1", "address": f"127.0.0.1:{proxy_reader.port}"}]}],
    )  # fmt: skip
    balancer, _ = await balancer_factory(config)
    checker = balancer.checker
    assert checker is not None
    async with asyncio.timeout(5):
        while len(proxy_reader.headers) < 3:  # three checks
            proxy_reader.header_read.clear()
            await proxy_reader.header_read.wait()
    assert all(h.version == 2 and h.source is None for h in proxy_reader.headers)  # LOCAL
    assert checker.last[0] is not None and checker.last[0].ok
    assert balancer.backends_view()[0]["state"] == "up"


async def test_a_listener_with_certificates_of_its_own_serves_them_and_its_default(
    balancer_factory: Callable[..., Any], certs: CertPaths, tmp_path: Path
) -> None:
    """The XMPP port with the XMPP domain's certificates, the web port with [tls]'s: each
    listener's own default for clients that send no name it knows."""
    chat = make_certs(tmp_path / "chat", hosts=["chat.example.org"])
    conference = make_certs(tmp_path / "conference", hosts=["conference.example.org"])
    config = config_with(
        [{"name": "https", "bind": "127.0.0.1:0", "tls": True},
         {"name": "xmpps", "bind": "127.0.0.1:0", "tls": True, "mode": "tcp",
          "certificates": [{"cert": str(chat.cert), "key": str(chat.key)},
                           {"cert": str(conference.cert), "key": str(conference.key)}]}],
        [{"name": "web", "backends": [{"address": "127.0.0.1:9"}]}],
        {"cert": str(certs.cert), "key": str(certs.key)},
    )  # fmt: skip
    balancer, _ = await balancer_factory(config)
    web, xmpp = port_of(balancer, "https"), port_of(balancer, "xmpps")
    assert "chat.example.org" in await peer_names(xmpp, "other.test")  # its own default
    assert "conference.example.org" in await peer_names(xmpp, "conference.example.org")
    assert await peer_names(web, "chat.example.org") == ["localhost"]  # [tls]'s, the web's
