"""The TLS front of a client session over an in-memory TLS pair: a real server context and
TLSSession, Python's ssl as the client on memory BIOs, a fake session and client leg; no
sockets. What the record says of each handshake, and what the client gets when it fails."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import pytest

from balancer.client.tls_front import TLSFront
from balancer.config.schema import TLSConfig
from balancer.demo.certs import CertPaths
from balancer.facts.causes import TLS_FAILED
from balancer.facts.record import LegTeardown
from balancer.net.tls import NOT_TLS, server_context
from tests.fakes import FakeSession

# A compiled TLSFront reads the session's listener and leg as compiled classes: the fakes
# here are for the pure build (the compiled front is the integration and capture tests').
pytestmark = pytest.mark.incompatible_with_mypyc


class FakeClientLeg:
    """The client leg as the TLS front uses it: what it writes, in order."""

    def __init__(self, facts: LegTeardown) -> None:
        self.facts = facts  # (the record's client_leg, as a real Leg's)
        self.tls: Any = None
        self.out = bytearray()
        self.stamping = True
        self.close_notify_in = False

    def tls_established(self) -> None:
        self.facts.close_notify_received = self.facts.close_notify_sent = False

    def close_notify_seen(self) -> None:
        self.facts.close_notify_received = True

    def stop_stamping(self) -> None:
        self.stamping = False

    def write(self, data: bytes) -> None:
        self.out += data

    def write_now(self, data: bytes) -> None:
        self.out += data

    def peer_close_notify(self) -> None:
        self.close_notify_in = self.facts.close_notify_received = True

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


class TLSSession(FakeSession):
    """The session side: handshake_over and client_data_ended written down."""

    def __init__(self) -> None:
        super().__init__()
        self.client: Any = FakeClientLeg(self.record.client_leg)
        self.over = False
        self.ended_with: bytes | None = None

    def handshake_over(self) -> None:
        self.over = True

    def client_data_ended(self, data: bytes) -> None:
        self.ended_with = data


class Client:
    """Python's ssl as the client, on memory BIOs."""

    def __init__(self, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost", session=session
        )

    def handshake_step(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True


def handshake(front: TLSFront, session: TLSSession, client: Client) -> None:
    """Flights back and forth until both ends are done (bounded)."""
    for _ in range(10):
        done = client.handshake_step()
        flight = client.outgoing.read()
        if flight:
            front.receive(flight, handshaking=not front.tls.established)
        client.incoming.write(session.client.take())
        if done and front.tls.established:
            return
    raise AssertionError("the handshake did not finish in 10 flights")


def server(certs: CertPaths, **tls: Any) -> ssl.SSLContext:
    return server_context(TLSConfig(cert=str(certs.cert), key=str(certs.key), **tls))


def client_context(certs: CertPaths, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def test_a_tls12_handshake_is_recorded_as_a_capture_shows_it(certs: CertPaths) -> None:
    session = TLSSession()
    front = TLSFront(session, server(certs))  # type: ignore[arg-type]
    session.clock.now = 10.0
    client = Client(client_context(certs, tls12=True))
    client.handshake_step()
    session.clock.now = 10.5
    front.receive(client.outgoing.read(), handshaking=True)  # the ClientHello
    assert session.record.tls_started_at == 10.5 and not session.client.stamping
    handshake(front, session, client)
    record = session.record
    assert session.over and record.tls_version == "1.2" and record.tls_resumed is False
    assert record.tls_cipher is not None and record.tls_cipher.startswith("ECDHE-")
    assert record.tls_sni == "localhost" and record.tls_finished_at is not None
    client.obj.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    plain = front.receive(client.outgoing.read(), handshaking=False)
    assert plain == b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_tls13_and_a_resumed_session_are_said(certs: CertPaths) -> None:
    context, tickets = client_context(certs), server(certs)
    first = TLSSession()
    front = TLSFront(first, tickets)  # type: ignore[arg-type]
    client = Client(context)
    handshake(front, first, client)
    client.obj.write(b"x")  # TLS 1.3 tickets arrive after the handshake: read them
    front.receive(client.outgoing.read(), handshaking=False)
    client.incoming.write(first.client.take())
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.read()
    assert first.record.tls_version == "1.3" and first.record.tls_resumed is False
    second = TLSSession()
    front = TLSFront(second, tickets)  # type: ignore[arg-type]
    handshake(front, second, Client(context, session=client.obj.session))
    assert second.record.tls_resumed is True


def test_the_clients_close_notify_ends_its_stream_with_the_bytes_before_it(
    certs: CertPaths,
) -> None:
    session = TLSSession()
    front = TLSFront(session, server(certs))  # type: ignore[arg-type]
    client = Client(client_context(certs))
    handshake(front, session, client)
    client.obj.write(b"last")
    with contextlib.suppress(ssl.SSLWantReadError):  # ours is out, the server's not in yet
        client.obj.unwrap()
    assert front.receive(client.outgoing.read(), handshaking=False) is None
    assert session.client.close_notify_in and session.ended_with == b"last"


def test_plain_http_on_the_tls_port_gets_a_400_that_says_so(certs: CertPaths) -> None:
    session = TLSSession()
    front = TLSFront(session, server(certs))  # type: ignore[arg-type]
    assert front.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", handshaking=True) is None
    written = session.client.take()
    assert written.startswith(b"HTTP/1.1 400 ") and b"This port speaks HTTPS" in written
    assert session.record.tls_failure == NOT_TLS and session.record.error_status == 400
    assert session.closed == (TLS_FAILED, False) and not session.over


def test_a_failed_handshake_sends_the_alert_and_names_why(certs: CertPaths) -> None:
    session = TLSSession()
    front = TLSFront(session, server(certs, min_version="1.3"))  # type: ignore[arg-type]
    client = Client(client_context(certs, tls12=True))  # offers TLS 1.2 at most
    client.handshake_step()
    front.receive(client.outgoing.read(), handshaking=True)
    alert = session.client.take()
    assert alert[:1] == b"\x15"  # a TLS alert record goes back
    assert session.record.tls_failure == "protocol_version"
    assert session.closed == (TLS_FAILED, False) and not session.over
    client.incoming.write(alert)
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        client.handshake_step()


def test_a_reset_or_a_timeout_mid_handshake_is_the_failure_and_stamps_a_start(
    certs: CertPaths,
) -> None:
    session = TLSSession()
    front = TLSFront(session, server(certs))  # type: ignore[arg-type]
    session.clock.now = 42.0  # nothing arrived: the failure's time is the start
    front.reset()
    assert session.record.tls_failure == "reset" and session.record.tls_started_at == 42.0
    assert session.record.close_cause == TLS_FAILED
    other = TLSSession()
    TLSFront(other, server(certs)).timed_out()  # type: ignore[arg-type]
    assert other.record.tls_failure == "timeout" and other.closed == (TLS_FAILED, False)
