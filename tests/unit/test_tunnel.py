"""The tunnel flow over a fake session and forwarder: bytes both ways, and the two ends'
order, which says why the connection ended and which side gets a half-close."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from balancer.client.tunnel import Tunnel
from balancer.facts.causes import BACKEND_CLOSED, CLIENT_CLOSED
from tests.fakes import FakeForwarder, FakeSession

# A compiled Tunnel holds a compiled Forwarder: the fakes are for the pure build.
pytestmark = pytest.mark.incompatible_with_mypyc


class Ends:
    """A leg's half-close calls, written down."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.usable = True

    def close_notify(self) -> None:
        self.calls.append("close_notify")

    def shutdown(self) -> bool:
        self.calls.append("shutdown")
        return True


def tunnel(connected: bool = True) -> tuple[Tunnel, FakeSession, FakeForwarder, Ends, Ends]:
    session, fwd = FakeSession(), FakeForwarder()
    client, backend = Ends(), Ends()
    session.client = client  # type: ignore[assignment]
    fwd.backend = SimpleNamespace(leg=backend) if connected else None  # type: ignore[attr-defined]
    fwd.connecting = None if connected else object()  # type: ignore[attr-defined]
    return Tunnel(session, fwd), session, fwd, client, backend  # type: ignore[arg-type]


def test_bytes_pass_both_ways_untouched_and_push_the_idle_deadline() -> None:
    flow, session, fwd, _, _ = tunnel()
    flow.on_client_data(b"\x16\x03\x01 client bytes")
    flow.on_response_data(b"backend bytes")
    assert fwd.sent == b"\x16\x03\x01 client bytes" and session.written == b"backend bytes"
    assert session.calls == ["extend 300.0", "extend 300.0"]


def test_the_client_ending_first_half_closes_the_backend_and_is_why_it_ended() -> None:
    flow, session, _, client, backend = tunnel()
    session.client_eof = True
    flow.on_client_eof()
    assert backend.calls == ["shutdown"] and session.closed is None  # the backend may answer
    session.backend_eof = True
    flow.on_backend_eof()
    assert session.closed == (BACKEND_CLOSED, False)  # the second end closes...
    assert session.record.close_cause == CLIENT_CLOSED  # ...but the first says why
    assert client.calls == []


def test_the_backend_ending_first_half_closes_the_client_and_is_why_it_ended() -> None:
    flow, session, _, client, backend = tunnel()
    session.backend_eof = True
    flow.on_backend_eof()
    assert client.calls == ["close_notify", "shutdown"] and session.closed is None
    session.client_eof = True
    flow.on_client_eof()
    assert session.closed == (CLIENT_CLOSED, False)
    assert session.record.close_cause == BACKEND_CLOSED and backend.calls == []


def test_a_client_end_while_the_backend_connects_waits_for_the_connect() -> None:
    flow, session, _, _, _ = tunnel(connected=False)
    session.client_eof = True
    flow.on_client_eof()
    assert session.closed is None  # the connect's outcome will decide
    assert session.record.close_cause == CLIENT_CLOSED
