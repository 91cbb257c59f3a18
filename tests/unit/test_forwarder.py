"""The forwarder (reuse never) over a fake session: the PROXY header it sends a backend,
what policy "hash" hashes, and when a request whose backend connection died may go again.
No sockets; the one connect a retry starts never completes and is cancelled."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from balancer.backend.connection import BackendConnection
from balancer.client.forward import Forwarder, hash_key, proxy_header
from balancer.facts.record import BackendConnectionRecord
from balancer.net.writebatch import WriteBatch
from balancer.wire.http1 import HeadLimits, RequestReader
from balancer.wire.proxy_protocol import HeaderReader
from tests.fakes import FakeSession, FakeSocket, FakeTransport

# The forwarder reads its group and the worker's services as compiled classes in a compiled
# build: these fakes are for the pure build (the compiled path is the integration tests').
pytestmark = pytest.mark.incompatible_with_mypyc


class Connecting:
    """A connect that never completes (the retry's new attempt: started, not finished)."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Connector:
    def start(self, *args: Any) -> Connecting:
        return Connecting()


def session_with(requests: bytes = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", **group: Any
                 ) -> tuple[FakeSession, Forwarder]:  # fmt: skip
    session = FakeSession()
    settings = {"retry_on_empty": True, "retry_on_timeout": False, "retries": 2,
                "hash_key": None, "send_proxy": "none", "reuse": "never",
                "response_seconds": 30.0, "connector": Connector(), **group}  # fmt: skip
    session.ctx.router.default = SimpleNamespace(name="web", **settings)
    session.ctx.services.idle = SimpleNamespace(  # (what the pool is given up with)
        closed=[], give_up=lambda conn, cause: session.ctx.services.idle.closed.append(cause)
    )
    session.ctx.services.loop = None
    reader = RequestReader("10.0.0.7", "http", 80, HeadLimits())
    reader.feed(requests)
    for head in reader.heads:
        session.exchanges.open(head)
    session.http = SimpleNamespace(pending_error=None, reader=reader)
    return session, Forwarder(session)  # type: ignore[arg-type]


def backend() -> BackendConnection:
    record = BackendConnectionRecord("web1", "10.0.0.1:80", 0.0)
    conn = BackendConnection(None, record, WriteBatch(lambda callback: None), lambda: 0.0)  # type: ignore[arg-type]
    sock = FakeSocket()
    conn.leg.attach(FakeTransport(sock), sock)
    conn.leg.kernel = sock
    return conn


def parsed(header: bytes) -> Any:
    result = HeaderReader().feed(header)
    assert result is not None and result[1] == b""
    return result[0]


def test_the_proxy_header_names_the_client_and_where_it_connected() -> None:
    session, _ = session_with()
    session.destination = ("192.0.2.1", 443)  # as a PROXY header it came with said
    assert proxy_header(session, "v1") == b"PROXY TCP4 10.0.0.7 192.0.2.1 5555 443\r\n"
    session.destination = None  # else the client leg's own socket says
    session.client.transport = SimpleNamespace(get_extra_info=lambda name: ("10.0.0.1", 8443))
    header = parsed(proxy_header(session, "v2"))
    assert header.source == ("10.0.0.7", 5555) and header.destination == ("10.0.0.1", 8443)
    assert not header.tlvs  # no TLS on this listener: no SSL TLV


def test_a_v2_header_tells_the_tls_the_balancer_terminated() -> None:
    session, _ = session_with()
    session.destination = ("192.0.2.1", 443)
    session.tls_front = object()
    record = session.record
    record.tls_version, record.tls_cipher, record.tls_sni = (
        "1.3",
        "TLS_AES_128_GCM_SHA256",
        "a.test",
    )
    header = parsed(proxy_header(session, "v2"))
    ssl_tlv = header.tlvs[0x20]  # PP2_TYPE_SSL
    assert b"TLSv1.3" in ssl_tlv and b"TLS_AES_128_GCM_SHA256" in ssl_tlv
    assert header.tlvs[0x02] == b"a.test"  # PP2_TYPE_AUTHORITY: the SNI


@pytest.mark.parametrize(
    ("spec", "request_head", "key"),
    [
        (None, b"", b""),
        ("client_ip", b"", b"10.0.0.7"),
        ("uri", b"", b"/a?b=1"),
        ("header:X-User", b"X-User: ann\r\n", b"ann"),
        ("cookie:sid", b"X-User: ann\r\n", b"42"),
        ("cookie:other", b"X-User: ann\r\n", b""),
    ],
)
def test_what_policy_hash_hashes(spec: str | None, request_head: bytes, key: bytes) -> None:
    hashed = b"sid=42; theme=dark" if spec and spec.startswith("cookie:") else b"ann"
    session, fwd = session_with(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n" + request_head + b"\r\n",
                                hash_key=spec)  # fmt: skip
    if spec and spec.startswith(("header:", "cookie:")):
        session.exchanges.queue[0].hashed = hashed  # (the reader captures the listener's one)
    assert hash_key(session, fwd.group) == key  # type: ignore[arg-type]


async def test_a_request_whose_connection_died_before_any_response_byte_goes_again() -> None:
    session, fwd = session_with()
    dead = backend()
    fwd.backend = dead
    exchange = session.exchanges.queue[0]
    exchange.replay = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    assert fwd.retry(dead) is True
    assert exchange.record.retries == 1 and session.record.retries == 1
    assert exchange.record.failed_backends == ["web1"] == session.record.failed_backends
    assert session.ctx.services.idle.closed == [None]  # the dead one given up: its FIN or RST
    assert fwd.pending == [exchange.replay] and fwd.backend is None
    attempt = fwd.connecting
    assert "connecting" in session.blocked and isinstance(attempt, Connecting)
    fwd.cancel()  # the client went away
    assert attempt.cancelled and fwd.connecting is None


@pytest.mark.parametrize(
    "why",
    ["not on retry_on", "not idempotent", "a response byte came", "retries spent",
     "an error is pending", "pipelined", "its body still coming", "closing"],
)  # fmt: skip
async def test_a_request_does_not_go_again_when(why: str) -> None:
    requests = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    if why == "pipelined":
        requests += b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    if why in ("not idempotent", "its body still coming"):
        requests = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n1234"
    session, fwd = session_with(requests, retry_on_empty=why != "not on retry_on")
    exchange = session.exchanges.queue[0]
    if why != "not idempotent":
        exchange.replay = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    if why == "a response byte came":
        exchange.record.first_byte_at = 1.0
    if why == "retries spent":
        exchange.record.retries = 2
    if why == "an error is pending":
        session.http.pending_error = object()
    if why == "closing":
        session.closing = True
    dead = backend()
    fwd.backend = dead
    assert fwd.retry(dead) is False
    assert fwd.connecting is None and exchange.record.retries == (
        2 if why == "retries spent" else 0
    )
