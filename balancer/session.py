"""The client session: one accepted client connection and the decisions made for it.

Theory of operation
-------------------
Each accepted client connection gets one `ClientSession`. It holds the client `Leg`
(legs.py: teardown facts, kernel counts, the flush rule), the TLS session (TLS listeners),
the HTTP request reader and response framer, and, once a backend is chosen, a lease and a
`BackendConnection` (upstream.py) with its own Leg. It decides; the legs act on the wire.

    accept ──► [handshaking] ──► waiting for a head ──► first head: the connector picks a
           (TLS listeners)         (header deadline)     backend and connects (tcp: at accept)
    relay: client → backend  request heads re-serialised by http1.RequestReader, bodies streamed
           backend → client  bytes as they come; http1.ResponseFramer only follows boundaries
    end:   either side's FIN/RST/close_notify, a deadline, an error, or shutdown ──► each leg
           closes by FIN and linger (legs.py) ──► both closed: `_maybe_finish`

Invariants:
- `_maybe_finish` publishes exactly once, when the client leg and the backend leg (if any)
  are both closed, so the record holds each leg's whole teardown; it releases the lease.
  Every wait on the way is bounded (linger_seconds, the shutdown grace).
- An error response is written only at a response boundary (nothing of a response to the
  current request has reached the client); otherwise the client leg is reset (RST), so a
  truncated response never looks whole.
- Flow control: a full client write buffer pauses backend reads and vice versa; while the backend
  is connecting, or an Upgrade waits for its answer, client reads are paused. Memory per
  connection is bounded by the transports' high-water marks.
- One deadline per connection on the shared wheel (`ctx.deadlines`). Activity only moves
  `_deadline` forward (a float store); a wake-up that finds it later files the session again,
  so the hot path rarely touches the wheel. The kinds are a table (DEADLINE_TIMEOUTS).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from balancer.config import Limits, ListenerConfig, Timeouts
from balancer.deadlines import DeadlineWheel, Wakeable
from balancer.errors import (
    BackendError,
    BackendTimeout,
    BackendUnreachable,
    BalancerError,
    HeaderTimeout,
    NoBackendAvailable,
)
from balancer.exchange import Exchange, Exchanges, ExchangeSettings
from balancer.http1 import HeadLimits, RequestReader, ResponseFramer, error_response
from balancer.legs import Leg
from balancer.pool import BackendPool, Lease
from balancer.record import (
    BACKEND_CLOSED,
    BACKEND_RESET,
    BACKEND_TIMEOUT,
    CLIENT_CLOSED,
    CLIENT_RESET,
    HEADER_TIMEOUT,
    HTTP_CLOSE,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    SHUTDOWN,
    TLS_ERROR,
    TLS_FAILED,
    TUNNEL_IDLE_TIMEOUT,
    ConnectionRecord,
    RequestRecord,
)
from balancer.tls import TLSHandshakeFailed, TLSSession
from balancer.upstream import DEAD_ON_REUSE, NOT_REUSABLE, BackendConnection, Connector, IdlePool
from balancer.writebatch import WriteBatch

RETRY_AFTER_SECONDS = 1

# Deadline kinds: what the session waits for, and the timeout (a `Timeouts` field) bounding
# the wait. A kind that ends the connection when it passes is also its close cause.
TLS_HANDSHAKE = "tls_handshake_timeout"
HEADER = HEADER_TIMEOUT
IDLE = IDLE_TIMEOUT
RESPONSE = BACKEND_TIMEOUT
TUNNEL_IDLE = TUNNEL_IDLE_TIMEOUT
LINGER = "linger"
DEADLINE_TIMEOUTS: dict[str, str] = {
    TLS_HANDSHAKE: "tls_handshake_seconds",
    HEADER: "client_header_seconds",
    IDLE: "keepalive_idle_seconds",
    RESPONSE: "backend_response_seconds",
    TUNNEL_IDLE: "tunnel_idle_seconds",
    LINGER: "linger_seconds",
}
# Request readers (each with its httptools parser, ~1.4 KB) kept for reuse per listener. Once
# a listener has more than READER_POOL_ABOVE connections open, a keep-alive connection gives
# its reader back whenever it goes idle and takes one again with its next request, so idle
# connections hold none; below that, memory is no concern and the round trip (~1 µs a
# request) is saved.
READER_POOL_ABOVE = 256
IDLE_READERS_KEPT = 256


def _ignore_request(record: RequestRecord) -> None:
    pass


@dataclass
class ListenerContext:
    """What every connection of one listener shares. Built by server.py."""

    listener: ListenerConfig
    pool: BackendPool
    timeouts: Timeouts
    limits: Limits
    ssl_context: ssl.SSLContext | None
    publish: Callable[[ConnectionRecord], None]
    connections: set[ClientSession]
    next_id: Callable[[], int]
    worker_pid: int
    deadlines: DeadlineWheel[Wakeable]  # one per event loop, shared by the listeners
    writes: WriteBatch  # likewise: relayed bytes go out when the loop's round ends
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    accepted_total: int = 0
    rejected_total: int = 0
    draining: bool = False
    # Set once bound. Kept here because every get_running_loop() costs a getpid() syscall
    # (Python 3.11), and getsockname() for a port every accepted socket shares is another.
    loop: asyncio.AbstractEventLoop | None = None
    local_port: int | None = None
    idle_readers: list[RequestReader] = field(default_factory=list)  # see READER_POOL_ABOVE
    head_limits: HeadLimits = field(init=False)
    reuse: str = "never"  # [upstream] reuse: never, safe, always
    idle: IdlePool | None = None  # the worker's idle backend connections (reuse modes)
    publish_request: Callable[[RequestRecord], None] = _ignore_request
    next_request_id: Callable[[], int] = itertools.count(1).__next__
    next_backend_id: Callable[[], int] = itertools.count(1).__next__
    deadline_seconds: dict[str, float] = field(init=False)  # DEADLINE_TIMEOUTS, resolved
    connector: Connector = field(init=False)
    exchanges: ExchangeSettings = field(init=False)

    def __post_init__(self) -> None:
        self.head_limits = HeadLimits(
            max_header_bytes=self.limits.max_header_bytes,
            max_uri_bytes=self.limits.max_uri_bytes,
            max_body_bytes=self.limits.max_body_bytes,
        )
        self.deadline_seconds = {
            kind: getattr(self.timeouts, key) for kind, key in DEADLINE_TIMEOUTS.items()
        }
        dispatch = self.reuse != "never" and self.listener.mode == "http"
        self.exchanges = ExchangeSettings(
            self.next_request_id, self.clock, self.publish_request, dispatch
        )
        self.connector = Connector(
            self.pool, self.timeouts, self.limits, self.deadlines, self.writes, self.clock,
            self.next_backend_id, self.worker_pid,
        )  # fmt: skip


class ClientSession(asyncio.Protocol):
    """One client connection and everything that hangs off it (see the module docstring)."""

    __slots__ = (
        "_backend_closes",
        "_backend_eof",
        "_client_eof",
        "_closing",
        "_connect_task",
        "_deadline",
        "_deadline_kind",
        "_dispatch",
        "_exchanges",
        "_finished",
        "_loop",
        "_pending",
        "_pending_error",
        "_served",
        "_tunnel",
        "_wake",
        "backend",
        "client",
        "ctx",
        "framer",
        "lease",
        "reader",
        "record",
    )  # a few hundred bytes less per connection than an instance dict

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self._loop = ctx.loop or asyncio.get_running_loop()
        self.record = ConnectionRecord(ctx.next_id(), ctx.listener.name, ctx.clock(), 0.0)
        self.client = Leg(self.record.client_leg, ctx.writes, ctx.clock)
        self.reader: RequestReader | None = None
        self.framer: ResponseFramer | None = None
        self.lease: Lease | None = None
        self.backend: BackendConnection | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._pending: list[bytes] | None = None  # for the backend, while connecting
        self._tunnel = False
        self._client_eof = False
        self._backend_eof = False
        self._closing = False  # the balancer is ending the connection: no more relaying
        self._backend_closes = False  # the backend said it closes: wait for its FIN
        self._finished = False  # the record is published
        self._deadline = 0.0
        self._deadline_kind = ""
        self._wake: float | None = None  # when ctx.deadlines wakes us (None: it will not)
        self._pending_error: BalancerError | None = None
        # Reuse modes: each request is dispatched on its own (a backend connection per
        # exchange, from the idle pool or new); never: one backend connection for all.
        self._dispatch = ctx.exchanges.dispatch
        self._served = 0  # requests given a backend connection (safe mode: the first is new)
        self._exchanges = Exchanges(self.record, ctx.exchanges)

    # ---- client leg ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx, record = self.ctx, self.record
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client.attach(transport)
        ctx.accepted_total += 1
        record.accepted_unix = ctx.wall_clock()
        record.worker_pid = ctx.worker_pid
        peer = transport.get_extra_info("peername")  # uvloop's and asyncio's: kept, no syscall
        if peer:
            # Interned: connections from one address (a NAT, a CDN, a load test) share it.
            record.client_ip, record.client_port = sys.intern(peer[0]), peer[1]
        if ctx.local_port is not None:
            record.local_port = ctx.local_port
        elif local := transport.get_extra_info("sockname"):
            record.local_port = local[1]
        info = self.client.tcp_info()
        if info is not None:
            record.tcp_handshake_rtt_seconds = info.rtt_seconds
        ctx.connections.add(self)
        if len(ctx.connections) > ctx.limits.max_connections:
            ctx.rejected_total += 1
            record.close_cause = MAX_CONNECTIONS
            self._abort_client()
            return
        if ctx.draining:  # accepted in the moment between shutdown and the listener closing
            self._close_client(SHUTDOWN)
            return
        if ctx.ssl_context is not None:
            self.client.tls = TLSSession(ctx.ssl_context)
            self._set_deadline(TLS_HANDSHAKE)
            # The ClientHello's arrival, from the kernel (see Leg.stamp_first_bytes).
            self.client.stamp_first_bytes(self._loop, ctx.wall_clock, self._hello_arrived)
        elif ctx.listener.mode == "http":
            self._set_deadline(HEADER)
        if ctx.listener.mode == "tcp":
            self._tunnel = True
            if self.client.tls is None:
                self._start_connect()
        if self.client.paused_for:
            self._loop.call_soon(self.client.reassert_pause)  # before the loop polls

    def _hello_arrived(self, at: float) -> None:
        if self.record.tls_started_at is None:  # else the transport read first: keep that
            self.record.tls_started_at = at

    def data_received(self, data: bytes) -> None:
        record = self.record
        record.client_leg.bytes_in += len(data)
        if self._closing:
            self._discard_while_closing(data)
            return
        tls = self.client.tls
        if tls is not None:
            handshaking = not tls.established
            if handshaking and record.tls_started_at is None:
                record.tls_started_at = self.ctx.clock()  # no kernel stamp: our reading
                self.client.stop_stamping()
            try:
                data = tls.receive(data)
            except TLSHandshakeFailed as failure:
                self._handshake_failed(failure.reason)
                return
            except ssl.SSLError:
                record.close_cause = TLS_ERROR
                self._abort_client()
                return
            out = tls.take_output()
            if handshaking and tls.established:
                record.tls_finished_at = self.ctx.clock()  # as our final flight leaves
            if out:
                if handshaking:
                    self.client.write_now(out)
                else:
                    self.client.write(out)
            if handshaking:
                if not tls.established:
                    return
                self._handshake_done()
            if tls.close_notify_received and not record.client_leg.close_notify_received:
                self.client.peer_close_notify()
                if data:
                    self._on_client_data(data)
                self._on_client_eof()
                return
            if not data:
                return
        self._on_client_data(data)

    def _discard_while_closing(self, data: bytes) -> None:
        """After our FIN the client may still send (its close_notify, a request in flight);
        read and drop it, noting a close_notify."""
        tls = self.client.tls
        if tls is None or not tls.established or tls.close_notify_received:
            return
        try:
            tls.receive(data)
        except ssl.SSLError:
            return
        if tls.close_notify_received:
            self.record.client_leg.close_notify_received = True

    def _handshake_failed(self, reason: str) -> None:
        """Send the alert OpenSSL chose, record why, close. No backend was touched."""
        tls, record = self.client.tls, self.record
        assert tls is not None
        record.tls_failure = reason
        record.close_cause = TLS_FAILED
        alert = tls.take_output()
        if alert:
            self.client.write(alert)
        self._close_client(TLS_FAILED)

    def _handshake_done(self) -> None:
        tls, record, ctx = self.client.tls, self.record, self.ctx
        assert tls is not None
        facts = tls.facts()
        record.tls_version = facts.version
        record.tls_cipher = facts.cipher
        record.tls_resumed = facts.resumed
        record.tls_sni = facts.sni
        record.tls_alpn = facts.alpn
        record.client_leg.close_notify_received = False
        record.client_leg.close_notify_sent = False
        if ctx.listener.mode == "tcp":
            self._start_connect()
            self._set_deadline(TUNNEL_IDLE)
        else:
            self._set_deadline(HEADER)

    def _on_client_data(self, data: bytes) -> None:
        if self._tunnel:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.tunnel_idle_seconds
            self._send_backend(data)
            return
        reader = self.reader
        if reader is None:
            record, ctx = self.record, self.ctx
            proto = "https" if self.client.tls is not None else "http"
            if ctx.idle_readers:
                reader = self.reader = ctx.idle_readers.pop()
                reader.rebind(record.client_ip, proto, record.local_port)
            else:
                reader = self.reader = RequestReader(
                    record.client_ip, proto, record.local_port, ctx.head_limits
                )
            reader.split_messages = reader.backend_keep_alive = self._dispatch
            if self.framer is None:
                self.framer = ResponseFramer()
                self.framer.force_close = ctx.draining
        out = reader.feed(data)
        if reader.heads:
            self._on_heads()
        if out:
            if self._dispatch:
                self._route(out, reader.message_ends)
            else:
                self._send_backend(out)
        if reader.error is not None:
            self._fail(reader.error)
            return
        if reader.upgrade_rest is not None:
            self.block_reading("upgrade")
        self._arm_client_deadline()

    def _on_heads(self) -> None:
        reader, framer, record = self.reader, self.framer, self.record
        assert reader is not None and framer is not None
        if record.first_request_at is None:
            record.first_request_at = self.ctx.clock()
        exchanges = self._exchanges
        for head in reader.heads:
            record.requests += 1
            framer.expect(head.method == b"HEAD", not head.keep_alive)
            exchanges.open(head)
        reader.heads.clear()
        if self._dispatch:
            if len(exchanges.queue) > 1:
                self.block_reading("queued")  # one exchange at a time: hold the rest
            self._activate()
        elif self.backend is not None:
            upstream = self.backend.record
            exchanges.forwarded(upstream, upstream.requests > 0, False)
            upstream.requests = record.requests
        elif self._connect_task is None:
            self._start_connect()

    def _arm_client_deadline(self) -> None:
        """Pick the deadline that fits what the connection is waiting for now."""
        reader, framer = self.reader, self.framer  # no reader: released while idle
        assert framer is not None
        if reader is not None and reader.in_head:
            if self._deadline_kind != HEADER:  # a total deadline, set when the head began
                self._set_deadline(HEADER)
        elif framer.awaiting and not (reader is not None and reader.in_body):
            self._set_deadline(RESPONSE)
        else:
            self._set_deadline(IDLE)
            if reader is not None and len(self.ctx.connections) > READER_POOL_ABOVE:
                self._release_reader(reader, framer)

    def _release_reader(self, reader: RequestReader, framer: ResponseFramer) -> None:
        """Between requests, give the reader back (see READER_POOL_ABOVE). Only one at a
        message boundary with nothing pending, after a keep-alive exchange, is reusable."""
        if (
            reader.in_head
            or reader.in_body
            or reader.error is not None
            or reader.upgrade_rest is not None
            or reader.finished
            or framer.awaiting
            or framer.in_message
            or framer.close_after
            or framer.force_close
            or self._pending_error is not None
            or self._tunnel
            or self._closing
        ):
            return
        self.reader = None
        if len(self.ctx.idle_readers) < IDLE_READERS_KEPT:
            self.ctx.idle_readers.append(reader)

    def eof_received(self) -> bool:
        record, client = self.record, self.client
        if self._closing:  # the FIN we lingered for
            client.peer_fin_while_closing(self._loop.call_later)
            return True
        tls = self.client.tls
        if tls is not None and tls.established:
            # A FIN with no close_notify before it: the client truncated the TLS stream.
            record.client_leg.close_notify_received = tls.close_notify_received
        if tls is not None and not tls.established:
            if record.tls_started_at is not None:
                record.tls_failure = "eof"
                record.close_cause = TLS_FAILED
            else:
                record.close_cause = CLIENT_CLOSED
            client.peer_fin()
            self._close_client(record.close_cause)
            return True
        client.peer_fin()
        self._on_client_eof()
        return True

    def _on_client_eof(self) -> None:
        """The client will send no more: its FIN, or its TLS close_notify (not a FIN: whose
        FIN came first is still the kernel's to say)."""
        if self._client_eof:
            return
        self._client_eof = True
        if self._tunnel:
            backend = self.backend
            if backend is not None and backend.leg.usable:
                if self._backend_eof:
                    self._close_client(CLIENT_CLOSED)
                else:  # pass the half-close on
                    backend.leg.shutdown()
            elif self._connect_task is None:
                self._close_client(CLIENT_CLOSED)
            return
        framer, reader = self.framer, self.reader
        if reader is not None and reader.in_body:
            self._close_client(CLIENT_CLOSED)  # the request can never be completed
        elif framer is not None and (framer.awaiting or framer.in_message):
            return  # half-close: the response still comes, then we close
        else:
            self._close_client(CLIENT_CLOSED)

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.leg.pause("client_full")

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.leg.resume("client_full")

    def block_reading(self, why: str) -> None:
        self.client.pause(why)

    def unblock_reading(self, why: str) -> None:
        self.client.resume(why)

    # ---- backend leg -----------------------------------------------------------------------

    def _start_connect(self, first: Lease | None = None) -> None:
        self.block_reading("connecting")
        self._connect_task = self._loop.create_task(self._connect(first))

    async def _connect(self, first: Lease | None) -> None:
        """Connect to a backend the policy picks (upstream.Connector), then relay."""
        task = self._connect_task
        assert task is not None
        ctx = self.ctx
        # Connect attempts count on the connection's record, or (reuse modes) the request's.
        attempts = self._exchanges.queue[0].record if self._dispatch else self.record
        try:
            lease, backend = await ctx.connector.connect(self, attempts, task, self._loop, first)
        except BackendError as error:
            self._connect_task = None
            if not self._closing:
                self._fail(error)
            return
        self._connect_task = None
        if self._closing:  # the client went away while we connected
            lease.release()
            if ctx.idle is not None and self._dispatch:
                ctx.idle.put(backend)  # fresh and clean: another request may have it
            else:
                backend.leg.transport.abort()
            return
        if self._dispatch:
            self._use(lease, backend, reused=False)
        else:
            self._on_backend_connected(lease, backend)

    def _on_backend_connected(self, lease: Lease, backend: BackendConnection) -> None:
        self.lease = lease
        self.backend = backend
        self.record.upstream = backend.record
        backend.record.requests = self.record.requests
        self._exchanges.forwarded(backend.record, False, False)
        pending, self._pending = self._pending, None
        if pending:
            backend.leg.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self._client_eof and self._tunnel:  # the client half-closed while we connected
            backend.leg.shutdown()
        if self._closing:
            return
        if self._tunnel:
            self._set_deadline(TUNNEL_IDLE)
        else:
            self._arm_client_deadline()
        self.unblock_reading("connecting")

    def _send_backend(self, data: bytes) -> None:
        backend = self.backend
        if backend is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(data)
            return
        backend.leg.write(data)

    def on_backend_data(self, backend: BackendConnection, data: bytes) -> None:
        if self._closing:
            return
        if self._tunnel:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.tunnel_idle_seconds
            self._write_client(data)
            return
        framer = self.framer
        assert framer is not None
        self._exchanges.first_byte()
        completed = framer.completed
        try:
            out = framer.feed(data)
        except BackendError as error:
            self._fail(error)
            return
        if out:
            self._write_client(out)
        if framer.upgraded:
            self._switch_to_tunnel()
            return
        if framer.completed != completed:
            self._exchanges.completed(framer.statuses)
            self._on_responses_completed()
        elif framer.awaiting:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.backend_response_seconds

    def _on_responses_completed(self) -> None:
        framer, reader = self.framer, self.reader
        assert framer is not None
        if self._dispatch:
            self._hand_back(reusable=not framer.backend_closes)
            if framer.client_closes:
                self._close_client(HTTP_CLOSE)
                return
            if framer.awaiting:
                self._activate()
                if len(self._exchanges.queue) <= 1:
                    self.unblock_reading("queued")
                return
            self.unblock_reading("queued")
        elif framer.close_after and not framer.awaiting:
            # A backend that said it closes is left to send its FIN first (and keep the
            # TIME_WAIT); the linger bounds the wait.
            self._close_client(HTTP_CLOSE, backend_closes=framer.backend_closes)
            return
        if framer.awaiting:
            return
        if self._pending_error is not None:
            self._fail(self._pending_error)
        elif reader is not None and reader.upgrade_rest is not None:  # the Upgrade declined
            out = reader.resume_after_declined_upgrade()
            if reader.heads:
                self._on_heads()
            if out:
                self._send_backend(out)
            if reader.error is not None:
                self._fail(reader.error)
                return
            self.unblock_reading("upgrade")
        elif self._client_eof:
            self._close_client(CLIENT_CLOSED)
        elif self.ctx.draining:
            self._close_client(SHUTDOWN)
        else:
            self._arm_client_deadline()

    def _switch_to_tunnel(self) -> None:
        """101 Switching Protocols: from here on both directions are plain byte relays."""
        reader = self.reader
        assert reader is not None
        self._tunnel = True
        self._exchanges.completed([101])  # the request's answer; what follows is not HTTP
        rest, reader.upgrade_rest = reader.upgrade_rest or b"", None
        if rest:
            self._send_backend(rest)
        self._set_deadline(TUNNEL_IDLE)
        self.unblock_reading("upgrade")

    def on_backend_eof(self, backend: BackendConnection) -> None:
        self._backend_eof = True
        if self._closing:
            backend.leg.peer_fin_while_closing(self._loop.call_later)
            return
        backend.leg.peer_fin()
        if self._dispatch and self._retry(backend):
            return
        if self._tunnel:
            if self._client_eof:
                self._close_client(BACKEND_CLOSED)
            else:  # pass the half-close on
                self.client.close_notify()
                self.client.shutdown()
            return
        framer = self.framer
        assert framer is not None
        if framer.eof():
            self._exchanges.completed(framer.statuses)
            if self._dispatch and not framer.awaiting:
                self._on_responses_completed()  # a close-delimited body ended
            elif framer.awaiting and not self._client_eof:
                # It closed with requests unanswered: they were never processed.
                self._fail(BackendUnreachable("backend closed with requests unanswered"))
            else:
                self._close_client(BACKEND_CLOSED)
        else:
            self._fail(BackendError("backend closed mid-response"))

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        if backend is not self.backend:
            return  # an attempt that was given up (timed out as it connected)
        reset = backend.leg.lost(exc)
        if self._dispatch:
            if reset and not self._closing and self._retry(backend):
                return
            self._drop_backend(backend)
        if reset:
            if not self._closing:
                framer = self.framer
                if self._tunnel or (framer is not None and not framer.in_message
                                    and not framer.awaiting):  # fmt: skip
                    self._close_client(BACKEND_RESET)
                else:
                    self._fail(BackendError("backend reset the connection"))
        elif not self._backend_eof and not self._closing:
            self.on_backend_eof(backend)
        self._maybe_finish()

    # ---- reuse modes: one backend connection per exchange ------------------------------------

    def _route(self, out: bytes, ends: list[int]) -> None:
        """Reuse modes: hand each request's bytes to its exchange (`ends`: where requests end
        in `out`), straight to the backend connection of the active one."""
        start = 0
        for end in ends:
            self._to_exchange(out[start:end], done=True)
            start = end
        ends.clear()
        if start < len(out):
            self._to_exchange(out[start:] if start else out, done=False)

    def _to_exchange(self, data: bytes, done: bool) -> None:
        exchange = self._exchanges.filling()
        if exchange is None:
            return  # (cannot happen: a request's bytes start with its head)
        exchange.keep_for_replay(data)
        if exchange.pending is None and self.backend is not None:
            self.backend.leg.write(data)
        elif exchange.pending is not None:
            exchange.pending.append(data)
        exchange.request_done = done

    def _activate(self) -> None:
        """Give the oldest waiting exchange a backend connection: an idle one (always; safe:
        after this client's first request) or a new one."""
        if self.backend is not None or self._connect_task is not None or self._closing:
            return
        if not self._exchanges.queue:
            return
        ctx = self.ctx
        lease = ctx.pool.acquire(ctx.clock())
        if lease is None:
            self._fail(NoBackendAvailable("no backend is ready"))
            return
        backend = None
        if ctx.idle is not None and (ctx.reuse == "always" or self._served):
            backend = ctx.idle.take(lease.state.name)
        if backend is None:
            self._start_connect(lease)
            return
        backend.user = self
        self._use(lease, backend, reused=True)

    def _use(self, lease: Lease, backend: BackendConnection, reused: bool) -> None:
        """The active exchange's request goes out on `backend`."""
        self.lease, self.backend = lease, backend
        self._backend_eof = False
        self._served += 1
        upstream = backend.record
        upstream.requests += 1
        self._exchanges.forwarded(upstream, reused, True)
        exchange = self._exchanges.queue[0]
        pending, exchange.pending = exchange.pending, None
        if pending:
            backend.leg.write(pending[0] if len(pending) == 1 else b"".join(pending))
        self._arm_client_deadline()
        self.unblock_reading("connecting")

    def _hand_back(self, reusable: bool) -> None:
        """The active exchange's response is done: its connection goes to the idle pool (or is
        closed, if its response said so), its lease is released."""
        backend, idle = self.backend, self.ctx.idle
        if backend is None or idle is None:
            return
        if self.framer is not None and self.framer.drop_held():
            reusable = False  # it sent more than its response: not to be trusted again
        self.backend = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if reusable and backend.leg.usable:
            idle.put(backend)
        else:
            idle.close(backend, NOT_REUSABLE)

    def _drop_backend(self, backend: BackendConnection) -> None:
        """The active connection is gone under the exchange: its record is the pool's to
        publish; the session goes on without it."""
        if self.ctx.idle is not None:
            self.ctx.idle.retire(backend)
        self.backend = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _retry(self, backend: BackendConnection) -> bool:
        """A reused connection that was dead before any response byte: send an idempotent
        request again, once, on a new connection. Not counted against the backend's health."""
        queue = self._exchanges.queue
        if not queue:
            return False
        exchange: Exchange = queue[0]
        record = exchange.record
        if (
            not record.reused
            or record.retries
            or record.first_byte_at is not None
            or exchange.replay is None
            or not exchange.request_done
            or self._closing
        ):
            return False
        record.retries += 1
        record.forwarded_at = None
        exchange.pending = list(exchange.replay)
        idle = self.ctx.idle
        if idle is not None:
            if backend.leg.usable:
                idle.close(backend, DEAD_ON_REUSE)
            else:
                backend.record.close_cause = backend.record.close_cause or DEAD_ON_REUSE
                idle.retire(backend)
        self.backend = None
        lease, self.lease = self.lease, None
        self._start_connect(lease)  # the same backend first, on a new connection
        return True

    # ---- writing, errors -------------------------------------------------------------------

    def _write_client(self, data: bytes) -> None:
        tls = self.client.tls
        self.client.write(tls.send(data) if tls is not None else data)

    def _fail(self, error: BalancerError) -> None:
        """Answer an error: a real response at a response boundary, else abort the connection."""
        record, framer, reader = self.record, self.framer, self.reader
        if self._closing:
            return
        record.close_cause = error.reason
        if (
            error.fault == "client"
            and framer is not None
            and reader is not None
            and not reader.in_body  # an error inside this request's body cannot wait for it
            and (framer.awaiting or framer.in_message)
        ):
            # Responses to earlier pipelined requests are still coming: answer after them.
            self._pending_error = error
            self.block_reading("error_pending")
            return
        if framer is None and self.ctx.listener.mode == "tcp":
            self._close_client(error.reason)  # nothing HTTP to say on a TCP listener
        elif framer is not None and framer.in_message:
            self._abort_client()
        else:
            status = error.status_hint
            retry_after = RETRY_AFTER_SECONDS if status == 503 else None
            record.error_status = status
            self._write_client(error_response(status, retry_after))
            self._close_client(error.reason)

    # ---- teardown (the wire side of it is legs.py's) ---------------------------------------

    def _close_client(self, cause: str, backend_closes: bool = False) -> None:
        """End the connection: close_notify (TLS), FIN, linger for the client's FIN; the
        backend leg likewise, unless the backend is about to close it itself."""
        if self._closing or not self.client.usable:
            return
        record, client = self.record, self.client
        self._closing = True
        if record.close_cause is None:
            record.close_cause = cause
        self.client.stop_stamping()
        client.close_notify()
        if client.shutdown():
            client.read_to_end()
        self._backend_closes = backend_closes
        if not backend_closes:
            self._close_backend()
        self._arm_linger()

    def _abort_client(self) -> None:
        """Reset the client leg (SO_LINGER 0 → RST) so a cut response is visibly cut."""
        if not self.client.usable:
            return
        self._closing = True
        self.client.reset()
        self._close_backend()
        self._arm_linger()

    def _close_backend(self) -> None:
        backend = self.backend
        if backend is None or not backend.leg.usable:
            return
        if self._dispatch:
            self._hand_back(reusable=False)  # the pool closes it and publishes its record
            return
        backend.leg.read_to_end()  # to see the backend's FIN
        backend.leg.shutdown()

    def _arm_linger(self) -> None:
        if not self._finished:
            self._set_deadline(LINGER)

    def _linger_over(self) -> None:
        """The peers did not answer our FIN in time: close what is left."""
        for leg in (self.client, self.backend.leg if self.backend is not None else None):
            if leg is not None and leg.usable:
                leg.linger_over()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        reset = self.client.lost(exc)
        self.client.stop_stamping()
        if reset:
            tls = self.client.tls
            if tls is not None and not tls.established and record.tls_failure is None:
                record.tls_failure = "reset"  # the client gave up mid-handshake
                record.close_cause = record.close_cause or TLS_FAILED
                if record.tls_started_at is None:
                    record.tls_started_at = self.ctx.clock()
            record.close_cause = record.close_cause or CLIENT_RESET
        self._closing = True
        if self._connect_task is not None:
            self._connect_task.cancel()
        if not self._backend_closes:
            self._close_backend()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Publish once both legs are closed: the record is complete only then."""
        if self._finished or self.record.client_leg.closed_at is None:
            return
        if self.backend is not None and self.backend.leg.usable:
            self._arm_linger()  # bounded wait for the backend leg
            return
        self._finished = True
        ctx, record = self.ctx, self.record
        ctx.deadlines.discard(self)
        if self.lease is not None:
            self.lease.release()
        if self._exchanges.queue:
            self._exchanges.abandoned(record.error_status)
        if record.close_cause is None:
            record.close_cause = CLIENT_CLOSED
        record.closed_at = ctx.clock()
        ctx.connections.discard(self)
        ctx.publish(record)

    # ---- deadlines -------------------------------------------------------------------------

    def _set_deadline(self, kind: str, seconds: float | None = None) -> None:
        """Wait for `kind` (a DEADLINE_TIMEOUTS key) for its timeout, or `seconds`."""
        ctx = self.ctx
        at = ctx.clock() + (ctx.deadline_seconds[kind] if seconds is None else seconds)
        self._deadline_kind = kind
        self._deadline = at
        if self._wake is None or self._wake > at:  # a later deadline: checked when woken
            self._wake = at
            self.ctx.deadlines.schedule(self, at)

    def on_deadline(self) -> None:
        """Woken by ctx.deadlines: the deadline passed, or moved later since we asked."""
        self._wake = None
        if self._finished:
            return
        if self.ctx.clock() < self._deadline:
            self._wake = self._deadline
            self.ctx.deadlines.schedule(self, self._deadline)
            return
        kind = self._deadline_kind
        if kind == LINGER:
            self._linger_over()
        elif not self._closing:
            _ON_DEADLINE[kind](self)

    def _tls_handshake_timed_out(self) -> None:
        record = self.record
        if record.tls_started_at is None:
            record.tls_started_at = self.ctx.clock()  # nothing arrived at all
        record.tls_failure = "timeout"
        record.close_cause = TLS_FAILED
        self._close_client(TLS_FAILED)

    def _header_timed_out(self) -> None:
        reader = self.reader
        if reader is not None and reader.in_head:
            self._fail(HeaderTimeout("request head not complete in time"))
        else:  # connected but silent: nothing to answer, just close (nginx does the same)
            self._close_client(HEADER)

    def _response_timed_out(self) -> None:
        self._fail(BackendTimeout("no response in time"))

    def _idle_timed_out(self) -> None:
        """IDLE, TUNNEL_IDLE: ends the connection, unless a connect (with its own timeout) is
        under way."""
        if self._connect_task is not None:
            self._set_deadline(self._deadline_kind, self.ctx.timeouts.connect_seconds)
        else:
            self._close_client(self._deadline_kind)

    # ---- shutdown, admin -------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown has begun: close now if idle, else after the response in flight."""
        if self._closing:
            return
        framer, reader = self.framer, self.reader
        if framer is not None:
            framer.force_close = True
        busy = (
            self._tunnel
            or self._connect_task is not None
            or (framer is not None and (framer.awaiting or framer.in_message))
            or (reader is not None and (reader.in_head or reader.in_body))
        )
        if not busy and (self.client.tls is None or self.client.tls.established):
            self._close_client(SHUTDOWN)

    def force_close(self) -> None:
        """The shutdown grace is over: whatever is left ends now, lingering legs included."""
        if self.record.close_cause is None:
            self.record.close_cause = SHUTDOWN
        if self.framer is not None and self.framer.in_message and not self._closing:
            self._abort_client()
        else:
            self._close_client(SHUTDOWN)
        self._linger_over()

    @property
    def state(self) -> str:
        if self._closing:
            return "closing"
        if self.client.tls is not None and not self.client.tls.established:
            return "handshaking"
        if self._tunnel or (
            self.framer is not None and (self.framer.awaiting or self.framer.in_message)
        ):
            return "active"
        if self.reader is not None and (self.reader.in_head or self.reader.in_body):
            return "active"
        return "idle"


# What each deadline kind does when it passes (LINGER is handled before: it acts even while
# closing).
_ON_DEADLINE: dict[str, Callable[[ClientSession], None]] = {
    TLS_HANDSHAKE: ClientSession._tls_handshake_timed_out,
    HEADER: ClientSession._header_timed_out,
    RESPONSE: ClientSession._response_timed_out,
    IDLE: ClientSession._idle_timed_out,
    TUNNEL_IDLE: ClientSession._idle_timed_out,
}
