"""The TLS front of a client session: the handshake and close_notify, as the record tells them.

Theory of operation
-------------------
On a TLS listener the client leg carries TLS records. `TLSFront` sits between the leg's bytes
and the session: it feeds them to the `TLSSession` (tls.py, memory BIOs), writes what OpenSSL
answers, and hands the plaintext on. It records the handshake as a capture would show it:

    ClientHello in (the kernel's receive stamp; else our first read) ──► our last flight
    out (`tls_finished_at`) ──► version, cipher, SNI, ALPN, resumed ──► the session's phase
    moves on (EXCHANGING, or TUNNEL on a tcp listener, which connects now)
    failure: OpenSSL's alert is sent and its reason kept (`tls_failure`: the alert's reason,
    "eof", "reset" or "timeout"); no backend is touched

After the handshake a peer's close_notify is its end of the stream (not its FIN: whose FIN came
first is still the kernel's to say); a FIN without one is a truncated stream.
"""

from __future__ import annotations

import re
import ssl
from typing import TYPE_CHECKING, Final

from balancer.facts.causes import CLIENT_CLOSED, TLS_ERROR, TLS_FAILED
from balancer.net.tls import NOT_TLS, TLSHandshakeFailed, TLSSession
from balancer.wire.http1 import error_response

if TYPE_CHECKING:
    from balancer.client.contract import TLSFrontSession

# A request line's start (a method token, a space) where a ClientHello was due.
_HTTP_REQUEST_LINE: Final = re.compile(rb"[A-Z]{3,12} ")
PLAIN_HTTP_ON_TLS_PORT: Final = error_response(
    400, explained="This port speaks HTTPS: a plain HTTP request was sent to it. Use https://.\n"
)


class TLSFront:
    """The client leg's TLS, for one session (see the module docstring)."""

    __slots__ = ("session", "tls")

    def __init__(self, session: TLSFrontSession, ssl_context: ssl.SSLContext) -> None:
        self.session = session
        self.tls = session.client.tls = TLSSession(ssl_context)  # the leg sends close_notify

    def hello_arrived(self, at: float) -> None:
        """The kernel's receive time of the ClientHello (Leg.stamp_first_bytes)."""
        record = self.session.record
        if record.tls_started_at is None:  # else the transport read first: keep that
            record.tls_started_at = at

    def receive(self, data: bytes, handshaking: bool) -> bytes | None:
        """Bytes from the client leg: the plaintext for the session, or None when there is
        nothing more to do with them (handshake under way, failed, or the stream ended)."""
        session, tls = self.session, self.tls
        record, client = session.record, session.client
        if handshaking and record.tls_started_at is None:
            record.tls_started_at = session.ctx.services.clock()  # no kernel stamp: ours
            client.stop_stamping()
        received = data
        try:
            data = tls.receive(data)
        except TLSHandshakeFailed as failure:
            self._failed(failure.reason, received)
            return None
        except ssl.SSLError:
            record.ended_by(TLS_ERROR)
            session.abort_client()
            return None
        out = tls.take_output()
        if handshaking and tls.established:
            record.tls_finished_at = session.ctx.services.clock()  # as our last flight leaves
        if out:
            if handshaking:
                client.write_now(out)
            else:
                client.write(out)
        if handshaking:
            if not tls.established:
                return None
            self._done()
        if tls.close_notify_received and not record.client_leg.close_notify_received:
            client.peer_close_notify()
            session.client_data_ended(data)
            return None
        return data or None

    def discard_while_closing(self, data: bytes) -> bytes:
        """After our FIN the client may still send (its close_notify, a request in flight):
        read, noting a close_notify; the plaintext is returned for the flow to look at."""
        tls = self.tls
        if not tls.established or tls.close_notify_received:
            return b""
        try:
            plaintext = tls.receive(data)
        except ssl.SSLError:
            return b""
        if tls.close_notify_received:
            self.session.client.close_notify_seen()
        return plaintext

    def _failed(self, reason: str, received: bytes) -> None:
        """Send the alert OpenSSL chose, record why, close. No backend was touched. A plain
        HTTP request gets a plain 400 saying so instead (nginx's 497 idea): an alert would
        reach it as junk, and the person behind the client would not learn why."""
        session = self.session
        record = session.record
        record.tls_failure = reason
        record.ended_by(TLS_FAILED)
        alert = self.tls.take_output()
        if reason == NOT_TLS and _HTTP_REQUEST_LINE.match(received):
            record.error_status = 400
            session.client.write(PLAIN_HTTP_ON_TLS_PORT)
        elif alert:
            session.client.write(alert)
        session.close_client(TLS_FAILED)

    def _done(self) -> None:
        session = self.session
        record = session.record
        facts = self.tls.facts()
        record.tls_version = facts.version
        record.tls_cipher = facts.cipher
        record.tls_resumed = facts.resumed
        record.tls_sni = facts.sni
        record.tls_alpn = facts.alpn
        session.client.tls_established()
        session.handshake_over()

    def fin_while_handshaking(self) -> str:
        """The client's FIN before the handshake completed: the close cause."""
        record = self.session.record
        if record.tls_started_at is not None:
            record.tls_failure = "eof"
            return TLS_FAILED
        return CLIENT_CLOSED

    def fin_after_handshake(self) -> None:
        # A FIN with no close_notify before it: the client truncated the TLS stream (the leg
        # says false from the handshake on).
        if self.tls.close_notify_received:
            self.session.client.close_notify_seen()

    def reset(self) -> None:
        """The client reset the leg; mid-handshake, that is how the handshake failed."""
        record = self.session.record
        if not self.tls.established and record.tls_failure is None:
            record.tls_failure = "reset"  # the client gave up mid-handshake
            record.ended_by(TLS_FAILED)
            if record.tls_started_at is None:
                record.tls_started_at = self.session.ctx.services.clock()

    def timed_out(self) -> None:
        record = self.session.record
        if record.tls_started_at is None:
            record.tls_started_at = self.session.ctx.services.clock()  # nothing arrived at all
        record.tls_failure = "timeout"
        record.ended_by(TLS_FAILED)
        self.session.close_client(TLS_FAILED)
