"""The client session: one accepted client connection, its phase, and how it ends.

Theory of operation
-------------------
Each accepted client connection gets one `ClientSession`. It holds the client `Leg` (legs.py:
teardown facts, kernel counts, the flush rule), the TLS session (TLS listeners), the phase,
the connection's record and its one deadline. What happens in between is delegated: the HTTP
flow (http_flow.py: request reader, response framer, error answers) and the forwarder
(forward.py: the backend connection(s), their leases and the idle pool).

    phase:  HANDSHAKING ──► EXCHANGING ───────────────► CLOSING ──► FINISHED
            (TLS only)  │    │  HTTP requests and         ▲   our FIN/RST; lingering for
                        │    │  responses (http_flow)     │   the legs to close
                        │    └─► TUNNEL ──────────────────┤
                        │        tcp listeners, or after 101: bytes both ways
                        └──► MULTIPLEXING ────────────────┘
                             ALPN h2: streams (h2_flow), each its own backend connection
    end:    either side's FIN/RST/close_notify, a deadline, an error, or shutdown ──► each leg
            closes by FIN and linger (legs.py) ──► both closed: `_maybe_finish` publishes
    before: on listeners behind an L4 balancer, or routing TLS by SNI, the phase begins
            (`begin`) only once the prelude (prelude.py: PROXY header, ClientHello) is in

Invariants:
- The phase only moves forward, and nothing else says what the session is doing; within
  EXCHANGING the reader and framer (pure objects) say whether a request or response is under
  way.
- `_maybe_finish` publishes exactly once, when the client leg and the backend leg (if any)
  are both closed, so the record holds each leg's whole teardown; it releases the lease.
  Every wait on the way is bounded (linger_seconds, the shutdown grace).
- Flow control: a full client write buffer pauses backend reads and vice versa; while the backend
  is connecting, or an Upgrade waits for its answer, client reads are paused (the leg keeps
  the reasons). Memory per connection is bounded by the transports' high-water marks.
- One deadline per session on the shared wheel. Activity only moves `_deadline` forward (a
  float store); a wake-up that finds it later files the session again, so the hot path rarely
  touches the wheel. The kinds are one table (`DEADLINES`: timeout, what passing does).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Final, NamedTuple

from balancer.backend.connection import BackendConnection
from balancer.client.exchange import Exchanges
from balancer.client.forward import Forwarder
from balancer.client.h2_flow import H2Flow
from balancer.client.http_flow import HttpFlow
from balancer.client.listener import (
    FIRST_BYTES,
    HEADER,
    IDLE,
    LINGER,
    RESPONSE,
    TLS_HANDSHAKE,
    TUNNEL_IDLE,
    ListenerContext,
    OpenConnection,
)
from balancer.client.prelude import Prelude, trusted
from balancer.client.tls_front import TLSFront
from balancer.client.tunnel import Tunnel
from balancer.config.schema import Timeouts
from balancer.facts.causes import (
    BACKEND_RESET,
    CLIENT_CLOSED,
    CLIENT_RESET,
    MAX_CONNECTIONS,
    PROXY_INVALID,
    PROXY_REFUSED,
    SHUTDOWN,
)
from balancer.facts.record import ConnectionRecord
from balancer.net.legs import Leg
from balancer.wire.errors import BackendReset, BackendTimeout, BalancerError, HeaderTimeout
from balancer.wire.proxy_protocol import ProxyHeaderError


class Phase(IntEnum):
    """Where a session is; ordered, and a session only moves forward (module docstring)."""

    HANDSHAKING = 0
    EXCHANGING = 1  # HTTP/1.x requests and responses (http_flow)
    MULTIPLEXING = 2  # HTTP/2 streams (h2_flow)
    TUNNEL = 3
    CLOSING = 4
    FINISHED = 5


# By their names here: a module global is read faster than a class attribute.
HANDSHAKING: Final = Phase.HANDSHAKING
EXCHANGING: Final = Phase.EXCHANGING
MULTIPLEXING: Final = Phase.MULTIPLEXING
TUNNEL: Final = Phase.TUNNEL
CLOSING: Final = Phase.CLOSING
FINISHED: Final = Phase.FINISHED
_FLOWING: Final = (MULTIPLEXING, TUNNEL)  # a flow takes every client byte (HTTP/1: from the start)
# What the admin view calls each phase (EXCHANGING: "active" while a request is under way).
PHASE_STATES: Final[dict[int, str]] = {
    HANDSHAKING: "handshaking",
    TUNNEL: "active",
    CLOSING: "closing",
}
PHASE_STATES[MULTIPLEXING] = "active"
PHASE_STATES[FINISHED] = "closing"


class ClientSession(asyncio.Protocol):
    """One client connection and everything that hangs off it (see the module docstring)."""

    __slots__ = (
        "_backend_closes",
        "_deadline",
        "_loop",
        "_wake",
        "backend_eof",
        "client",
        "client_eof",
        "ctx",
        "deadline_kind",
        "destination",
        "exchanges",
        "flow",
        "fwd",
        "http",
        "phase",
        "prelude",
        "record",
        "tls_front",
    )  # a few hundred bytes less per connection than an instance dict
    # Once published (a compiled build asks this of a deleted slot).
    __deletable__ = ("flow", "fwd")

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        services = ctx.services
        self._loop = services.loop or asyncio.get_running_loop()
        self.record = ConnectionRecord(
            services.next_id(), ctx.settings.listener.name, services.clock(), 0.0
        )
        self.client = Leg(self.record.client_leg, services.writes, services.clock)
        self.phase = EXCHANGING
        tcp = ctx.settings.listener.mode == "tcp"
        self.fwd = Forwarder(self)
        self.http: HttpFlow | None = None if tcp else HttpFlow(self, self.fwd)
        # Where the client's and the backend's events go: the HTTP flow, or the tunnel (tcp
        # listeners; an HTTP connection after a 101).
        self.flow: HttpFlow | Tunnel | H2Flow = self.http or Tunnel(self, self.fwd)
        self.tls_front: TLSFront | None = None  # TLS listeners (its TLSSession: client.tls)
        self.exchanges = Exchanges(self.record, ctx.exchange_settings)
        self.client_eof = False
        self.backend_eof = False
        self._backend_closes = False  # the backend said it closes: wait for its FIN
        self._deadline = 0.0
        self.deadline_kind = ""
        self._wake: float | None = None  # when the deadline wheel wakes us (None: it will not)
        self.prelude: Prelude | None = None  # reading a PROXY header or a ClientHello's SNI
        self.destination: tuple[str, int] | None = None  # as a PROXY header said

    @property
    def closing(self) -> bool:
        """The balancer is ending the connection: no more relaying."""
        return self.phase >= CLOSING

    @property
    def tunnel(self) -> bool:
        return self.phase == TUNNEL

    # ---- client leg ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.ctx.state
        self.client.attach(transport)
        state.accepted_total += 1
        _record_the_accept(self, transport)
        state.connections.add(self)
        if len(state.connections) > self.ctx.settings.limits.max_connections:
            state.rejected_total += 1
            self.record.ended_by(MAX_CONNECTIONS)
            self.abort_client()
            return
        if not await_prelude(self):
            self.begin()

    def begin(self, hello_read: bool = False, h2c: bool = False) -> None:
        """The session proper begins: a TLS handshake, a request, or (tcp) the tunnel.
        `hello_read`: bytes of the ClientHello were read already (after a PROXY header);
        `h2c`: the first bytes were HTTP/2's preface (prior knowledge)."""
        services = self.ctx.services
        ssl_context = self.ctx.settings.ssl_context
        if ssl_context is not None:
            self.phase = HANDSHAKING
            tls = self.tls_front = TLSFront(self, ssl_context)
            self.set_deadline(TLS_HANDSHAKE)
            # The ClientHello's arrival, from the kernel (see Leg.stamp_first_bytes); once
            # read, the kernel's next stamp would be a later flight's: reading time stands.
            if not hello_read:
                self.client.stamp_first_bytes(self._loop, services.wall_clock, tls.hello_arrived)
        elif h2c:
            self._multiplex()
        elif self.http is not None:
            self.set_deadline(HEADER)
        else:
            self.phase = TUNNEL
            self.fwd.connect()
        if self.client.paused_for:
            self._loop.call_soon(self.client.reassert_pause)  # before the loop polls

    def data_received(self, data: bytes) -> None:
        self.client.received(len(data))
        if self.prelude is not None:
            rest = read_prelude(self, data)
            if not rest:
                return
            data = rest
        phase, tls = self.phase, self.tls_front
        if phase >= CLOSING:  # (read for what the record keeps: close_notify, GOAWAY)
            self.flow.closing_data(data if tls is None else tls.discard_while_closing(data))
            return
        if tls is not None:
            plaintext = tls.receive(data, phase == HANDSHAKING)
            if plaintext is None:
                return
            data = plaintext
        self._on_client_data(data)

    def _on_client_data(self, data: bytes) -> None:
        if self.phase in _FLOWING or self.http is not None:  # (tcp: once the tunnel is up)
            self.flow.on_client_data(data)

    def handshake_over(self) -> None:
        """TLS is up (tls_front): exchanges begin, or (tcp listeners) the tunnel connects."""
        if self.http is None:
            self.phase = TUNNEL
            self.fwd.connect()
            self.set_deadline(TUNNEL_IDLE)
        elif self.record.tls_alpn == "h2":  # (the listener offers it: `alpn`)
            self._multiplex()
        else:
            self.phase = EXCHANGING
            self.set_deadline(HEADER)

    def _multiplex(self) -> None:
        """HTTP/2 from here: ALPN chose h2, or a plain listener's client sent its preface."""
        self.phase, self.http = MULTIPLEXING, None
        self.flow = H2Flow(self)

    def client_data_ended(self, data: bytes) -> None:
        """The client's TLS close_notify, after `data`: it sends no more."""
        if data:
            self._on_client_data(data)
        self._on_client_eof()

    def eof_received(self) -> bool:
        client = self.client
        if self.phase >= CLOSING:  # the FIN we lingered for
            client.peer_fin_while_closing(self._loop.call_later)
            return True
        tls = self.tls_front
        if self.phase == HANDSHAKING and tls is not None:
            cause = tls.fin_while_handshaking()
            client.peer_fin()
            self.close_client(cause)
            return True
        if tls is not None:
            tls.fin_after_handshake()
        client.peer_fin()
        self._on_client_eof()
        return True

    def _on_client_eof(self) -> None:
        """The client will send no more: its FIN, or its TLS close_notify (not a FIN: whose
        FIN came first is still the kernel's to say)."""
        if self.client_eof:
            return
        self.client_eof = True
        if self.phase in _FLOWING or self.http is not None:  # (tcp: once the tunnel is up)
            self.flow.on_client_eof()

    def pause_writing(self) -> None:
        self.flow.client_full(True)

    def resume_writing(self) -> None:
        self.flow.client_full(False)

    def block_reading(self, why: str) -> None:
        self.client.pause(why)

    def unblock_reading(self, why: str) -> None:
        self.client.resume(why)

    def arm_client_deadline(self) -> None:
        if self.http is not None:
            self.http.arm_deadline()

    def enter_tunnel(self, rest: bytes) -> None:
        """101 Switching Protocols: from here on both directions are plain byte relays."""
        self.phase = TUNNEL
        self.flow = Tunnel(self, self.fwd)
        if rest:
            self.fwd.send(rest)
        self.set_deadline(TUNNEL_IDLE)
        self.unblock_reading("upgrade")

    # ---- backend leg (connection.BackendUser) -----------------------------------------------

    def on_backend_data(self, backend: BackendConnection, data: bytes) -> None:
        if self.phase < CLOSING:
            self.flow.on_response_data(data)

    def on_backend_eof(self, backend: BackendConnection) -> None:
        if backend is not self.fwd.backend:  # not taken up yet (Forwarder.took_up), or given up
            backend.leg.peer_fin()
            return
        self.backend_eof = True
        if self.phase >= CLOSING:
            backend.leg.peer_fin_while_closing(self._loop.call_later)
            return
        backend.leg.peer_fin()
        if self.fwd.retry(backend):
            return
        self.flow.on_backend_eof()

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        if self.phase == FINISHED:
            return  # an attempt abandoned as it connected, lost after the session let go
        if backend is self.fwd.backend:
            self.backend_lost(backend, backend.leg.lost(exc))
        elif backend.connecting is not None:  # not taken up yet (else: given up, timed out)
            backend.lost_early = backend.leg.lost(exc)  # read now: the fd is still its own

    def backend_lost(self, backend: BackendConnection, reset: bool) -> None:
        """The backend connection is gone (`reset`: by an RST we did not send)."""
        fwd = self.fwd
        if reset and fwd.retry(backend):
            return  # sent again, elsewhere
        http = self.http
        # A reset with a response owed or under way (else: between responses, or a tunnel).
        cut = not (self.phase == TUNNEL or (http is not None and http.at_response_boundary))
        if reset and cut and not self.closing:
            fwd.failed()  # passive checks, before the lease goes with the connection
        if fwd.dispatch:
            fwd.drop(backend, reset)
        if reset:
            if cut and not self.closing:
                self.fail(BackendReset("backend reset the connection"))
            elif not self.closing:
                self.close_client(BACKEND_RESET)
        elif not self.backend_eof and not self.closing:
            self.on_backend_eof(backend)
        self._maybe_finish()

    # ---- writing, errors -------------------------------------------------------------------

    def write_client(self, data: bytes) -> None:
        tls = self.client.tls
        self.client.write(tls.send(data) if tls is not None else data)

    def fail(self, error: BalancerError) -> None:
        """Answer an error (http_flow.HttpFlow.fail); on a tcp listener there is nothing HTTP
        to say: close."""
        if self.phase >= CLOSING:
            return
        self.record.ended_by(error.reason)
        if self.http is None:
            self.close_client(error.reason)
        else:
            self.http.fail(error)

    # ---- teardown (the wire side of it is legs.py's) ---------------------------------------

    def close_client(self, cause: str, backend_closes: bool = False) -> None:
        """End the connection: close_notify (TLS), FIN, linger for the client's FIN; the
        backend leg likewise, unless the backend is about to close it itself."""
        if self.phase >= CLOSING or not self.client.usable:
            return
        record, client = self.record, self.client
        self.phase = CLOSING
        record.ended_by(cause)
        client.stop_stamping()
        client.close_notify()
        if client.shutdown():
            client.read_to_end()
        self._backend_closes = backend_closes
        if not backend_closes:
            self.flow.close_backends()
        self._arm_linger()

    def abort_client(self) -> None:
        """Reset the client leg (SO_LINGER 0 → RST) so a cut response is visibly cut."""
        if not self.client.usable:
            return
        self.phase = max(self.phase, CLOSING)
        self.client.reset()
        self.flow.close_backends()
        self._arm_linger()

    def _arm_linger(self) -> None:
        if self.phase != FINISHED:
            self.set_deadline(LINGER)

    def linger_over(self) -> None:
        """The peers did not answer our FIN in time: close what is left."""
        backend = self.fwd.backend
        for leg in (self.client, backend.leg if backend is not None else None):
            if leg is not None and leg.usable:
                leg.linger_over()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        reset = self.client.lost(exc)
        self.client.stop_stamping()
        if reset:
            if self.tls_front is not None:
                self.tls_front.reset()
            record.ended_by(CLIENT_RESET)
        self.phase = max(self.phase, CLOSING)
        self.fwd.cancel()
        if not self._backend_closes:
            self.flow.close_backends()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Publish once both legs are closed: the record is complete only then."""
        if self.phase == FINISHED or self.record.client_leg.closed_at is None:
            return
        backend = self.fwd.backend
        if backend is not None and backend.leg.usable:
            self._arm_linger()  # bounded wait for the backend leg
            return
        self.phase = FINISHED
        services, record = self.ctx.services, self.record
        services.deadlines.discard(self)
        self.fwd.release_lease()
        if self.exchanges.queue:
            self.exchanges.abandoned(record.error_status)
        record.ended_by(CLIENT_CLOSED)
        record.closed_at = services.clock()
        self.ctx.state.connections.discard(self)
        services.publish(record)
        # Published, so never called again: the parts point back at the session (the reader
        # at itself, through its parser); dropped, reference counting frees ~50 objects a
        # connection that the cyclic GC would otherwise have to find (bench/counts.py).
        if self.http is not None and self.http.reader is not None:
            self.http.reader.close()
        self.http = self.tls_front = self.prelude = None
        del self.fwd, self.flow  # (read nowhere once FINISHED)

    # ---- deadlines -------------------------------------------------------------------------

    def set_deadline(self, kind: str, seconds: float | None = None) -> None:
        """Wait for `kind` (a DEADLINES key) for its timeout, or `seconds` (a group's own
        response timeout; a connect's, to let it finish)."""
        services = self.ctx.services
        if seconds is None:
            seconds = self.ctx.settings.deadline_seconds[kind]
        at = services.clock() + seconds
        self.deadline_kind = kind
        self._deadline = at
        if self._wake is None or self._wake > at:  # a later deadline: checked when woken
            self._wake = at
            services.deadlines.schedule(self, at)

    def extend_deadline(self, seconds: float) -> None:
        """Activity: the same wait, from now (a float store; see the module docstring)."""
        self._deadline = self.ctx.services.clock() + seconds

    def on_deadline(self) -> None:
        """Woken by the deadline wheel: the deadline passed, or moved later since we asked."""
        self._wake = None
        if self.phase == FINISHED:
            return
        services = self.ctx.services
        if services.clock() < self._deadline:
            self._wake = self._deadline
            services.deadlines.schedule(self, self._deadline)
            return
        deadline = DEADLINES[self.deadline_kind]
        if self.phase < CLOSING or deadline.while_closing:
            deadline.on_pass(self)

    # ---- shutdown, admin -------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown has begun: close now if idle between requests, else after the response in
        flight. A connection that has sent no request yet is given its first (the bytes may
        be in the kernel, unread; its header deadline bounds the wait): closing it would drop
        a request that reached the machine."""
        if self.phase >= CLOSING:
            return
        http = self.http
        self.flow.drain()
        if self.phase == HANDSHAKING or self.phase in _FLOWING or self.fwd.connecting:
            return
        if http is not None and (http.busy or self.record.requests == 0):
            return
        self.close_client(SHUTDOWN)

    def force_close(self) -> None:
        """The shutdown grace is over: whatever is left ends now, lingering legs included."""
        self.record.ended_by(SHUTDOWN)
        if self.http is not None and self.http.in_response and self.phase < CLOSING:
            self.abort_client()
        else:
            self.close_client(SHUTDOWN)
        self.linger_over()


def _record_the_accept(session: ClientSession, transport: asyncio.BaseTransport) -> None:
    """What the accept tells the record: when (wall clock), which worker, the client's address
    and our port, and the TCP handshake's RTT (the kernel's, read right after the accept)."""
    record, services, state = session.record, session.ctx.services, session.ctx.state
    record.accepted_unix = services.wall_clock()
    record.worker_pid = services.worker_pid
    peer = transport.get_extra_info("peername")  # uvloop's and asyncio's: kept, no syscall
    if peer:
        # Interned: connections from one address (a NAT, a CDN, a load test) share it.
        record.client_ip, record.client_port = sys.intern(peer[0]), peer[1]
    if state.local_port is not None:
        record.local_port = state.local_port
    elif local := transport.get_extra_info("sockname"):
        record.local_port = local[1]
    info = session.client.tcp_info()
    if info is not None:
        record.tcp_handshake_rtt_seconds = info.rtt_seconds


# ---- a session waits for its prelude (prelude.py) before it begins --------------------------


def await_prelude(session: ClientSession) -> bool:
    """At accept: whether the session waits for a prelude (or was refused one) rather than
    beginning now."""
    settings = session.ctx.settings
    sources, sni, h2c = settings.accept_proxy_from, settings.routes_by_sni, settings.h2c
    if not sources and not sni and not h2c:
        return False
    # No address: the client reset the connection as it was accepted (HAProxy's health
    # checks do), before it could be asked. That is no refusal: the reset, coming next as
    # the connection is lost, is what the record says.
    client_ip = session.record.client_ip
    if sources and client_ip and not trusted(client_ip, sources):
        session.close_client(PROXY_REFUSED)
        return True
    session.prelude = Prelude(bool(sources), sni, h2c)
    session.set_deadline(FIRST_BYTES)
    return True


def read_prelude(session: ClientSession, data: bytes) -> bytes | None:
    """The session's first bytes; once the prelude is whole the session begins, and the
    bytes after it (None or empty: nothing yet) are the session's."""
    prelude = session.prelude
    assert prelude is not None
    try:
        rest = prelude.feed(data)
    except ProxyHeaderError:
        session.close_client(PROXY_INVALID)
        return None
    if rest is None:
        return None
    session.prelude = None
    session.destination = prelude.settle(session.record)
    if prelude.peek is not None:  # a tcp listener routing TLS by SNI (passthrough)
        session.fwd.chosen = session.ctx.router.for_server_name(prelude.peek.server_name)
    session.begin(hello_read=bool(rest), h2c=prelude.h2c)
    return rest


def state_of(session: OpenConnection) -> str:
    """What the admin view calls the session now (its phase; while exchanging, whether a
    request is under way)."""
    phase = session.phase
    if phase == EXCHANGING:
        return "active" if session.http is not None and session.http.busy else "idle"
    return PHASE_STATES[phase]


def _tls_handshake_timed_out(session: ClientSession) -> None:
    if session.tls_front is not None:
        session.tls_front.timed_out()


def _header_timed_out(session: ClientSession) -> None:
    if session.http is not None and session.http.head_under_way:
        session.fail(HeaderTimeout("request head not complete in time"))
    else:  # connected but silent: nothing to answer, just close (nginx does the same)
        session.close_client(HEADER)


def _response_timed_out(session: ClientSession) -> None:
    fwd = session.fwd
    fwd.failed(timeout=True)
    backend = fwd.backend
    if backend is not None and fwd.retry(backend, timed_out=True):
        return  # (retry_on response-timeout) sent again, elsewhere
    session.fail(BackendTimeout("no response in time"))


def _first_bytes_timed_out(session: ClientSession) -> None:
    session.close_client(FIRST_BYTES)


def _idle_timed_out(session: ClientSession) -> None:
    """IDLE, TUNNEL_IDLE: ends the connection, unless a connect (with its own timeout) is
    under way."""
    if session.fwd.connecting is not None:
        session.set_deadline(session.deadline_kind, session.ctx.settings.timeouts.connect_seconds)
    else:
        session.close_client(session.deadline_kind)


def _linger_over(session: ClientSession) -> None:
    session.linger_over()


class DeadlineKind(NamedTuple):
    """What a session can wait for, bounded: the `[timeouts]` key that bounds the wait, what
    the session does when it passes, and whether it still applies once the session is
    closing. A kind that ends the connection names its close cause (causes.py)."""

    timeout: str
    on_pass: Callable[[ClientSession], None]
    while_closing: bool = False


DEADLINES: Final[dict[str, DeadlineKind]] = {
    FIRST_BYTES: DeadlineKind("client_header_seconds", _first_bytes_timed_out),
    TLS_HANDSHAKE: DeadlineKind("tls_handshake_seconds", _tls_handshake_timed_out),
    HEADER: DeadlineKind("client_header_seconds", _header_timed_out),
    RESPONSE: DeadlineKind("backend_response_seconds", _response_timed_out),  # or the group's
    IDLE: DeadlineKind("keepalive_idle_seconds", _idle_timed_out),
    TUNNEL_IDLE: DeadlineKind("tunnel_idle_seconds", _idle_timed_out),
    LINGER: DeadlineKind("linger_seconds", _linger_over, while_closing=True),
}


def deadline_seconds(timeouts: Timeouts) -> dict[str, float]:
    """Each kind's timeout, resolved once per listener (ListenerSettings.deadline_seconds)."""
    return {kind: getattr(timeouts, deadline.timeout) for kind, deadline in DEADLINES.items()}
