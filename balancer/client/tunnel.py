"""The tunnel flow of one client connection: bytes both ways, untouched.

A tcp listener's connection is a tunnel from its start (after TLS, if the listener
terminates it); an HTTP connection becomes one when its backend answers 101 Switching
Protocols (WebSocket). `Tunnel` has the HTTP flow's entry points (http_flow.HttpFlow), so the
session hands every client and backend event to whichever flow it holds, in one line:

    client bytes ──► the backend, as they come      backend bytes ──► the client
    either side's end (FIN, or close_notify) ──► passed on as a half-close; the second
    end closes the connection, and the first to end is why it ended (client_closed or
    backend_closed)

Each byte either way pushes the tunnel-idle deadline on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from balancer.facts.causes import BACKEND_CLOSED, CLIENT_CLOSED

if TYPE_CHECKING:
    from balancer.client.contract import TunnelSession
    from balancer.client.forward import Forwarder


class Tunnel:
    """The tunnel of one client session (see the module docstring)."""

    __slots__ = ("fwd", "session")

    def __init__(self, session: TunnelSession, fwd: Forwarder) -> None:
        self.session = session
        self.fwd = fwd

    def on_client_data(self, data: bytes) -> None:
        session = self.session
        session.extend_deadline(session.ctx.settings.timeouts.tunnel_idle_seconds)
        self.fwd.send(data)

    def on_client_eof(self) -> None:
        """The client sends no more: passed on to the backend as a half-close, or the end."""
        session, fwd = self.session, self.fwd
        if not session.backend_eof:  # the client's end came first: why it ended
            session.record.ended_by(CLIENT_CLOSED)
        backend = fwd.backend
        if backend is not None and backend.leg.usable:
            if session.backend_eof:
                session.close_client(CLIENT_CLOSED)
            else:  # pass the half-close on
                backend.leg.shutdown()
        elif fwd.connecting is None:
            session.close_client(CLIENT_CLOSED)

    def on_response_data(self, data: bytes) -> None:
        """Backend bytes (the HTTP flow's name for them: a response's)."""
        session = self.session
        session.extend_deadline(session.ctx.settings.timeouts.tunnel_idle_seconds)
        session.write_client(data)

    def close_backends(self) -> None:
        """The client connection ends: so does the backend's (forward.Forwarder.close)."""
        self.fwd.close()

    def closing_data(self, data: bytes) -> None:
        """Bytes the client sent after the connection began to close: dropped."""

    def drain(self) -> None:
        """Shutdown leaves a tunnel be: drain.py closes a drained backend's tunnels, and the
        shutdown grace ends the rest."""

    def client_full(self, full: bool) -> None:
        """The client's socket buffer filled (drained): the backend is not read meanwhile."""
        self.fwd.client_full(full)

    def on_backend_eof(self) -> None:
        """The backend sends no more: passed on to the client as a half-close, or the end."""
        session = self.session
        if session.client_eof:
            session.close_client(BACKEND_CLOSED)
        else:  # the backend's end came first (why it ended): pass the half-close on
            session.record.ended_by(BACKEND_CLOSED)
            session.client.close_notify()
            session.client.shutdown()
