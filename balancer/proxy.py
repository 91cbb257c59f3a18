"""The client and backend protocols: the only code that touches connection transports.

Theory of operation
-------------------
Each accepted client connection gets one `ClientConnection`. It owns the whole life of that
connection: the TLS session (TLS listeners), the HTTP request reader, the backend lease and the
one dedicated backend connection, its deadline, and the `ConnectionRecord`.

    accept ──► [handshaking] ──► waiting for a head ──► first head: acquire a backend, connect
           (TLS listeners)         (header deadline)     (tcp mode: at accept)
    relay: client → backend  request heads re-serialised by http1.RequestReader, bodies streamed
           backend → client  bytes as they come; http1.ResponseFramer only follows boundaries
    end:   either side's FIN/RST/close_notify, a deadline, an error, or shutdown ──► each leg
           closes by FIN and linger (see "teardown") ──► both closed: `_maybe_finish`

Invariants:
- `_maybe_finish` publishes exactly once, when the client leg and the backend leg (if any)
  are both closed, so the record holds each leg's whole teardown; it releases the lease.
  Every wait on the way is bounded (linger_seconds, the shutdown grace).
- What the record says of the wire is read from the kernel where user space would guess:
  the ClientHello's receive timestamp, TCP_INFO at accept and at each shutdown.
- An error response is written only at a response boundary (nothing of a response to the
  current request has reached the client); otherwise the client connection is aborted with an
  RST, so a truncated response never looks whole.
- Flow control: a full client write buffer pauses backend reads and vice versa; while the backend
  is connecting, or an Upgrade waits for its answer, client reads are paused. Memory per
  connection is bounded by the transports' high-water marks.
- Relayed bytes go out at the end of the loop's round (`ctx.writes`, balancer.writebatch), so a
  peer is woken once for many writes; handshake flights go at once. Anything that sends a FIN,
  closes, resets or looks at a transport's buffer flushes the batch first, so the wire order
  and the teardown facts are those of writing at once.
- One deadline per connection on the shared wheel (`ctx.deadlines`). Activity only moves
  `_deadline` forward (a float store); a wake-up that finds it later files the connection again,
  so the hot path rarely touches the wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from balancer import tcpinfo
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
from balancer.http1 import HeadLimits, RequestReader, ResponseFramer, error_response
from balancer.pool import BackendPool, Lease
from balancer.record import BALANCER, PEER, ConnectionRecord, LegTeardown
from balancer.tls import TLSHandshakeFailed, TLSSession
from balancer.writebatch import WriteBatch

_LINGER_RST = struct.pack("ii", 1, 0)
RETRY_AFTER_SECONDS = 1

# Deadline kinds → (the cause recorded when it passes).
TLS_HANDSHAKE = "tls_handshake_timeout"
HEADER = "header_timeout"
IDLE = "idle_timeout"
RESPONSE = "backend_timeout"
TUNNEL_IDLE = "tunnel_idle_timeout"
LINGER = "linger"
# Request readers (each with its httptools parser, ~1.4 KB) kept for reuse per listener. Once
# a listener has more than READER_POOL_ABOVE connections open, a keep-alive connection gives
# its reader back whenever it goes idle and takes one again with its next request, so idle
# connections hold none; below that, memory is no concern and the round trip (~1 µs a
# request) is saved.
READER_POOL_ABOVE = 256
IDLE_READERS_KEPT = 256


@dataclass
class ListenerContext:
    """What every connection of one listener shares. Built by server.py."""

    listener: ListenerConfig
    pool: BackendPool
    timeouts: Timeouts
    limits: Limits
    ssl_context: ssl.SSLContext | None
    publish: Callable[[ConnectionRecord], None]
    connections: set[ClientConnection]
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

    def __post_init__(self) -> None:
        self.head_limits = HeadLimits(
            max_header_bytes=self.limits.max_header_bytes,
            max_uri_bytes=self.limits.max_uri_bytes,
            max_body_bytes=self.limits.max_body_bytes,
        )


class BackendConnection(asyncio.Protocol):
    """The backend leg: hands every event to its client connection."""

    __slots__ = ("client", "connect_timed_out", "transport")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.connect_timed_out = False

    def on_deadline(self) -> None:
        """The connect timeout (see ClientConnection._connect): stop the attempt."""
        task = self.client._connect_task
        if task is not None:
            self.connect_timed_out = True
            task.cancel()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass

    def data_received(self, data: bytes) -> None:
        self.client.on_backend_data(data)

    def eof_received(self) -> bool:
        self.client.on_backend_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.on_backend_lost(self, exc)

    def pause_writing(self) -> None:
        self.client.block_reading("backend_full")

    def resume_writing(self) -> None:
        self.client.unblock_reading("backend_full")


class ClientConnection(asyncio.Protocol):
    """One client connection and everything that hangs off it (see the module docstring)."""

    __slots__ = (
        "_backend_blocked",
        "_backend_closes",
        "_backend_eof",
        "_backend_lost",
        "_blocks",
        "_client_eof",
        "_client_lost",
        "_closing",
        "_connect_task",
        "_deadline",
        "_deadline_kind",
        "_finished",
        "_loop",
        "_pending",
        "_pending_error",
        "_sock",
        "_stamp_watch",
        "_tunnel",
        "_wake",
        "backend",
        "ctx",
        "framer",
        "lease",
        "reader",
        "record",
        "tls",
        "transport",
    )  # a few hundred bytes less per connection than an instance dict

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self._loop = ctx.loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.record: ConnectionRecord | None = None
        self.tls: TLSSession | None = None
        self.reader: RequestReader | None = None
        self.framer: ResponseFramer | None = None
        self.lease: Lease | None = None
        self.backend: BackendConnection | None = None
        self._sock: Any = None
        self._connect_task: asyncio.Task[None] | None = None
        self._pending: list[bytes] | None = None  # for the backend, while connecting
        self._blocks: tuple[str, ...] = ()  # why reading is paused (a tuple: () costs nothing)
        self._backend_blocked = False
        self._tunnel = False
        self._client_eof = False
        self._backend_eof = False
        self._closing = False  # the balancer is ending the connection: no more relaying
        self._client_lost = False
        self._backend_lost = False
        self._backend_closes = False  # the backend said it closes: wait for its FIN
        self._finished = False  # the record is published
        self._deadline = 0.0
        self._deadline_kind = ""
        self._wake: float | None = None  # when ctx.deadlines wakes us (None: it will not)
        self._pending_error: BalancerError | None = None
        self._stamp_watch: int | None = None  # a dup'd fd watched for the ClientHello

    # ---- client leg ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self.ctx
        now = ctx.clock()
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        ctx.accepted_total += 1
        record = self.record = ConnectionRecord(
            ctx.next_id(), ctx.listener.name, now, ctx.wall_clock()
        )
        record.worker_pid = ctx.worker_pid
        peer = transport.get_extra_info("peername")
        if peer:
            # Interned: connections from one address (a NAT, a CDN, a load test) share it.
            record.client_ip, record.client_port = sys.intern(peer[0]), peer[1]
        if ctx.local_port is not None:
            record.local_port = ctx.local_port
        elif local := transport.get_extra_info("sockname"):
            record.local_port = local[1]
        self._sock = transport.get_extra_info("socket")
        info = tcpinfo.read(self._sock)
        if info is not None:
            record.tcp_handshake_rtt_seconds = info.rtt_seconds
        ctx.connections.add(self)
        if len(ctx.connections) > ctx.limits.max_connections:
            ctx.rejected_total += 1
            record.close_cause = "max_connections"
            self._abort_client()
            return
        if ctx.draining:  # accepted in the moment between shutdown and the listener closing
            self._close_client("shutdown")
            return
        timeouts = ctx.timeouts
        if ctx.ssl_context is not None:
            self.tls = TLSSession(ctx.ssl_context)
            self._set_deadline(TLS_HANDSHAKE, now + timeouts.tls_handshake_seconds)
            self._stamp_client_hello()
        elif ctx.listener.mode == "http":
            self._set_deadline(HEADER, now + timeouts.client_header_seconds)
        if ctx.listener.mode == "tcp":
            self._tunnel = True
            if self.tls is None:
                self._start_connect()
        if self._blocks:
            # uvloop starts reading after connection_made returns, whatever it was told
            # there; say it again before the loop polls.
            self._loop.call_soon(self._reassert_pause)

    def _reassert_pause(self) -> None:
        if self._blocks and self.transport is not None and not self._closing:
            self.transport.pause_reading()

    def _stamp_client_hello(self) -> None:
        """Record when the ClientHello's first bytes reached the kernel, not when we read them.

        If they are queued already, peek now; otherwise watch a duplicate descriptor while the
        transport's reading is paused, so the transport reads only after the peek.
        """
        if self._stamp_from_kernel(self._sock.fileno()):
            return
        try:
            watched = os.dup(self._sock.fileno())
            self._loop.add_reader(watched, self._on_first_bytes, watched)
        except (OSError, RuntimeError, AttributeError):
            return  # data_received's clock reading stands in
        self._stamp_watch = watched
        self.block_reading("stamp")

    def _on_first_bytes(self, watched: int) -> None:
        self._stamp_from_kernel(watched)
        self._stop_stamp_watch()

    def _stop_stamp_watch(self) -> None:
        watched, self._stamp_watch = self._stamp_watch, None
        if watched is not None:
            self._loop.remove_reader(watched)
            os.close(watched)
            self.unblock_reading("stamp")

    def _stamp_from_kernel(self, fd: int) -> bool:
        assert self.record is not None
        if self.record.tls_started_at is not None:
            return True  # the transport read first; a later packet's stamp would be wrong
        arrival = tcpinfo.first_byte_arrival(fd)
        if arrival is None:
            return False
        ctx = self.ctx
        self.record.tls_started_at = ctx.clock() - (ctx.wall_clock() - arrival)
        return True

    def data_received(self, data: bytes) -> None:
        record = self.record
        assert record is not None
        record.client_bytes_in += len(data)
        if self._closing:
            self._discard_while_closing(data)
            return
        tls = self.tls
        if tls is not None:
            handshaking = not tls.established
            if handshaking and record.tls_started_at is None:
                record.tls_started_at = self.ctx.clock()  # no kernel stamp: our reading
                self._stop_stamp_watch()
            try:
                data = tls.receive(data)
            except TLSHandshakeFailed as failure:
                self._handshake_failed(failure.reason)
                return
            except ssl.SSLError:
                record.close_cause = "tls_error"
                self._abort_client()
                return
            out = tls.take_output()
            if handshaking and tls.established:
                record.tls_finished_at = self.ctx.clock()  # as our final flight leaves
            if out:
                if handshaking:
                    self._write_now(out)
                else:
                    self._write_raw(out)
            if handshaking:
                if not tls.established:
                    return
                self._handshake_done()
            if tls.close_notify_received and not record.client_leg.close_notify_received:
                record.client_leg.close_notify_received = True
                if data:
                    self._on_client_data(data)
                self._on_client_eof(fin=False)
                return
            if not data:
                return
        self._on_client_data(data)

    def _discard_while_closing(self, data: bytes) -> None:
        """After our FIN the client may still send (its close_notify, a request in flight);
        read and drop it, noting a close_notify."""
        tls = self.tls
        if tls is None or not tls.established or tls.close_notify_received:
            return
        try:
            tls.receive(data)
        except ssl.SSLError:
            return
        if tls.close_notify_received:
            assert self.record is not None
            self.record.client_leg.close_notify_received = True

    def _handshake_failed(self, reason: str) -> None:
        """Send the alert OpenSSL chose, record why, close. No backend was touched."""
        tls, record = self.tls, self.record
        assert tls is not None and record is not None
        record.tls_failure = reason
        record.close_cause = "tls_failed"
        alert = tls.take_output()
        if alert:
            self._write_raw(alert)
        self._close_client("tls_failed")

    def _handshake_done(self) -> None:
        tls, record, ctx = self.tls, self.record, self.ctx
        assert tls is not None and record is not None
        now = ctx.clock()
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
            self._set_deadline(TUNNEL_IDLE, now + ctx.timeouts.tunnel_idle_seconds)
        else:
            self._set_deadline(HEADER, now + ctx.timeouts.client_header_seconds)

    def _on_client_data(self, data: bytes) -> None:
        if self._tunnel:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.tunnel_idle_seconds
            self._send_backend(data)
            return
        reader = self.reader
        if reader is None:
            record = self.record
            assert record is not None
            ctx = self.ctx
            proto = "https" if self.tls is not None else "http"
            if ctx.idle_readers:
                reader = self.reader = ctx.idle_readers.pop()
                reader.rebind(record.client_ip, proto, record.local_port)
            else:
                reader = self.reader = RequestReader(
                    record.client_ip, proto, record.local_port, ctx.head_limits
                )
            if self.framer is None:
                self.framer = ResponseFramer()
                self.framer.force_close = ctx.draining
        out = reader.feed(data)
        if reader.heads:
            self._on_heads()
        if out:
            self._send_backend(out)
        if reader.error is not None:
            self._fail(reader.error)
            return
        if reader.upgrade_rest is not None:
            self.block_reading("upgrade")
        self._arm_client_deadline()

    def _on_heads(self) -> None:
        reader, framer, record = self.reader, self.framer, self.record
        assert reader is not None and framer is not None and record is not None
        if record.first_request_at is None:
            record.first_request_at = self.ctx.clock()
        for head in reader.heads:
            record.requests += 1
            framer.expect(head.method == b"HEAD", not head.keep_alive)
        reader.heads.clear()
        if self.lease is None and self._connect_task is None:
            self._start_connect()

    def _arm_client_deadline(self) -> None:
        """Pick the deadline that fits what the connection is waiting for now."""
        reader, framer = self.reader, self.framer  # no reader: released while idle
        assert framer is not None
        now = self.ctx.clock()
        timeouts = self.ctx.timeouts
        if reader is not None and reader.in_head:
            if self._deadline_kind != HEADER:  # a total deadline, set when the head began
                self._set_deadline(HEADER, now + timeouts.client_header_seconds)
        elif framer.awaiting and not (reader is not None and reader.in_body):
            self._set_deadline(RESPONSE, now + timeouts.backend_response_seconds)
        else:
            self._set_deadline(IDLE, now + timeouts.keepalive_idle_seconds)
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
        record = self.record
        assert record is not None
        if self._closing:  # the FIN we lingered for
            self.ctx.writes.flush()
            self._note_peer_fin(record.client_leg, self._sock)
            info = tcpinfo.read(self._sock)
            if info is not None and info.unacked and self.transport is not None:
                # Our last bytes are in flight to a peer that may have closed its socket: wait
                # a few round trips, so an RST they draw is seen, not hidden by our close.
                wait = max(0.001, 4 * info.rtt_seconds)
                self._loop.call_later(wait, self.transport.close)
            elif self.transport is not None:
                self.transport.close()
            return True
        if self.tls is not None and self.tls.established:
            # A FIN with no close_notify before it: the client truncated the TLS stream.
            record.client_leg.close_notify_received = self.tls.close_notify_received
        if self.tls is not None and not self.tls.established:
            if record.tls_started_at is not None:
                record.tls_failure = "eof"
                record.close_cause = "tls_failed"
            else:
                record.close_cause = "client_closed"
            self._note_peer_fin(record.client_leg, self._sock)
            self._close_client(record.close_cause)
            return True
        self._on_client_eof(fin=True)
        return True

    def _on_client_eof(self, fin: bool) -> None:
        """The client will send no more: its FIN, or its TLS close_notify (not a FIN: whose
        FIN came first is still the kernel's to say)."""
        record = self.record
        assert record is not None
        if fin:
            self._note_peer_fin(record.client_leg, self._sock)
        elif record.client_leg.initiator is None:
            record.client_leg.initiator = PEER
        if self._client_eof:
            return
        self._client_eof = True
        if self._tunnel:
            backend = self.backend
            if backend is not None and backend.transport is not None:
                if self._backend_eof:
                    self._close_client("client_closed")
                else:  # pass the half-close on
                    sock = backend.transport.get_extra_info("socket")
                    self._shutdown_leg(record.backend_leg, backend.transport, sock)
            elif self._connect_task is None:
                self._close_client("client_closed")
            return
        framer, reader = self.framer, self.reader
        if reader is not None and reader.in_body:
            self._close_client("client_closed")  # the request can never be completed
        elif framer is not None and (framer.awaiting or framer.in_message):
            return  # half-close: the response still comes, then we close
        else:
            self._close_client("client_closed")

    def pause_writing(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None:
            self._backend_blocked = True
            backend.transport.pause_reading()

    def resume_writing(self) -> None:
        backend = self.backend
        if backend is not None and backend.transport is not None and self._backend_blocked:
            self._backend_blocked = False
            backend.transport.resume_reading()

    def block_reading(self, why: str) -> None:
        if not self._blocks and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        if why not in self._blocks:
            self._blocks += (why,)

    def unblock_reading(self, why: str) -> None:
        if why in self._blocks:
            self._blocks = tuple(reason for reason in self._blocks if reason != why)
            if not self._blocks and self.transport is not None and not self._closing:
                self.transport.resume_reading()

    # ---- backend leg -----------------------------------------------------------------------

    def _start_connect(self) -> None:
        self.block_reading("connecting")
        self._connect_task = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Connect to a backend the policy picks; on refusal or timeout try the next one."""
        ctx = self.ctx
        record = self.record
        assert record is not None
        tried: list[Any] = []
        error: BalancerError = NoBackendAvailable("no backend is ready")
        for _ in range(ctx.limits.max_connect_attempts):
            lease = ctx.pool.acquire(ctx.clock(), tried)
            if lease is None:
                break
            backend = lease.state.backend
            tried.append(lease.state)
            record.backend = backend.name
            record.backend_address = backend.address
            record.connect_attempts += 1
            record.connect_started_at = ctx.clock()
            protocol = BackendConnection(self)
            # The timeout is a deadline on the shared wheel, not asyncio.timeout(): that one
            # costs a loop timer and three get_running_loop() (each a getpid()) per attempt.
            ctx.deadlines.schedule(
                protocol, record.connect_started_at + ctx.timeouts.connect_seconds
            )
            try:
                try:
                    await self._connect_any(protocol, backend.connect_hosts, backend.port)
                except asyncio.CancelledError:
                    if not protocol.connect_timed_out:
                        raise
                    assert self._connect_task is not None
                    self._connect_task.uncancel()
                    if protocol.transport is not None:  # connected as the deadline passed
                        protocol.transport.abort()
                    raise TimeoutError("connect timed out") from None
                finally:
                    ctx.deadlines.discard(protocol)
            except (OSError, TimeoutError) as failure:
                record.connect_failures += 1
                ctx.pool.connect_failed(lease, ctx.clock())
                error = BackendUnreachable(f"{backend.address}: {failure!r}")
                continue
            except BaseException:
                lease.release()
                if protocol.transport is not None:
                    protocol.transport.abort()
                raise
            self._connect_task = None
            if self._closing:  # the client went away while we connected
                lease.release()
                assert protocol.transport is not None
                protocol.transport.abort()
                return
            self._on_backend_connected(lease, protocol)
            return
        self._connect_task = None
        if not self._closing:
            self._fail(error)

    async def _connect_any(
        self, protocol: BackendConnection, hosts: tuple[str, ...], port: int
    ) -> None:
        """Connect to the first of `hosts` (one backend's addresses) that accepts."""
        for host in hosts[:-1]:
            try:
                await self._loop.create_connection(_factory(protocol), host, port)
                return
            except OSError:
                continue  # the next address, within the same attempt and deadline
        await self._loop.create_connection(_factory(protocol), hosts[-1], port)

    def _on_backend_connected(self, lease: Lease, protocol: BackendConnection) -> None:
        ctx = self.ctx
        record = self.record
        assert record is not None and protocol.transport is not None
        record.connected_at = ctx.clock()
        ctx.pool.connect_succeeded(lease)
        self.lease = lease
        self.backend = protocol
        transport = protocol.transport
        local = transport.get_extra_info("sockname")
        if local:
            record.backend_local_port = local[1]
        info = tcpinfo.read(transport.get_extra_info("socket"))
        if info is not None:
            record.backend_rtt_seconds = info.rtt_seconds
        pending, self._pending = self._pending or (), None
        for chunk in pending:
            record.backend_bytes_out += len(chunk)
            transport.write(chunk)
        if self._client_eof and self._tunnel:  # the client half-closed while we connected
            sock = transport.get_extra_info("socket")
            self._shutdown_leg(record.backend_leg, transport, sock)
        if self._closing:
            return
        if self._tunnel:
            self._set_deadline(TUNNEL_IDLE, ctx.clock() + ctx.timeouts.tunnel_idle_seconds)
        else:
            self._arm_client_deadline()
        self.unblock_reading("connecting")

    def _send_backend(self, data: bytes) -> None:
        backend = self.backend
        if backend is None or backend.transport is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(data)
            return
        assert self.record is not None
        self.record.backend_bytes_out += len(data)
        self.ctx.writes.write(backend.transport, data)

    def on_backend_data(self, data: bytes) -> None:
        record = self.record
        assert record is not None
        record.backend_bytes_in += len(data)
        if self._closing:
            return
        if self._tunnel:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.tunnel_idle_seconds
            self._write_client(data)
            return
        framer = self.framer
        assert framer is not None
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
            self._on_responses_completed()
        elif framer.awaiting:
            self._deadline = self.ctx.clock() + self.ctx.timeouts.backend_response_seconds

    def _on_responses_completed(self) -> None:
        framer, reader = self.framer, self.reader
        assert framer is not None
        if framer.close_after and not framer.awaiting:
            # A backend that said it closes is left to send its FIN first (and keep the
            # TIME_WAIT); the linger bounds the wait.
            self._close_client("http_close", backend_closes=framer.backend_closes)
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
            self._close_client("client_closed")
        elif self.ctx.draining:
            self._close_client("shutdown")
        else:
            self._arm_client_deadline()

    def _switch_to_tunnel(self) -> None:
        """101 Switching Protocols: from here on both directions are plain byte relays."""
        reader = self.reader
        assert reader is not None
        self._tunnel = True
        rest, reader.upgrade_rest = reader.upgrade_rest or b"", None
        if rest:
            self._send_backend(rest)
        self._set_deadline(TUNNEL_IDLE, self.ctx.clock() + self.ctx.timeouts.tunnel_idle_seconds)
        self.unblock_reading("upgrade")

    def on_backend_eof(self) -> None:
        record = self.record
        assert record is not None
        self._backend_eof = True
        transport = self.backend.transport if self.backend is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        self._note_peer_fin(record.backend_leg, sock)
        if self._closing:
            if transport is not None:
                # The FIN we lingered for, or the backend closing first as it said it would:
                # either way our FIN goes now, and the leg's teardown facts are taken with it.
                self._shutdown_leg(record.backend_leg, transport, sock)
            return
        if self._tunnel:
            if self._client_eof:
                self._close_client("backend_closed")
            else:
                self._write_eof_client()
            return
        framer = self.framer
        assert framer is not None
        if framer.eof():
            if framer.awaiting and not self._client_eof:
                # It closed with requests unanswered: they were never processed.
                self._fail(BackendUnreachable("backend closed with requests unanswered"))
            else:
                self._close_client("backend_closed")
        else:
            self._fail(BackendError("backend closed mid-response"))

    def on_backend_lost(self, protocol: BackendConnection, exc: Exception | None) -> None:
        if protocol is not self.backend:
            return
        record = self.record
        assert record is not None
        leg = record.backend_leg
        self._backend_lost = True
        _closed(leg, self.ctx.clock())
        if exc is not None and not leg.rst_sent and isinstance(exc, ConnectionError):
            self._note_peer_reset(leg)
            if not self._closing:
                framer = self.framer
                if self._tunnel or (framer is not None and not framer.in_message
                                    and not framer.awaiting):  # fmt: skip
                    self._close_client("backend_reset")
                else:
                    self._fail(BackendError("backend reset the connection"))
        elif not self._backend_eof and not self._closing:
            self.on_backend_eof()
        self._maybe_finish()

    # ---- writing, closing ------------------------------------------------------------------

    def _write_raw(self, data: bytes) -> None:
        assert self.transport is not None and self.record is not None
        self.record.client_bytes_out += len(data)
        self.ctx.writes.write(self.transport, data)

    def _write_now(self, data: bytes) -> None:
        """Not batched: a handshake flight leaves when the record says it did."""
        assert self.transport is not None and self.record is not None
        self.record.client_bytes_out += len(data)
        self.ctx.writes.flush()
        self.transport.write(data)

    def _write_client(self, data: bytes) -> None:
        tls = self.tls
        self._write_raw(tls.send(data) if tls is not None else data)

    def _fail(self, error: BalancerError) -> None:
        """Answer an error: a real response at a response boundary, else abort the connection."""
        record = self.record
        framer = self.framer
        assert record is not None
        if self._closing:
            return
        record.close_cause = error.reason
        reader = self.reader
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

    # ---- teardown ---------------------------------------------------------------------------
    #
    # Each leg ends by "FIN and linger" (nginx's lingering close): the balancer sends its FIN
    # (after close_notify on TLS) with write_eof(), keeps reading until the peer's FIN, then
    # closes. Closing the socket outright would make the kernel answer the peer's own
    # close_notify or late bytes with an RST the record could not explain, and would hide when
    # the peer's FIN came. The linger is bounded by timeouts.linger_seconds.

    def _note_peer_fin(self, leg: LegTeardown, sock: Any) -> None:
        """The peer's FIN has been read on this leg."""
        if leg.peer_fin_at is None:
            leg.peer_fin_at = self.ctx.clock()
        if leg.initiator is None:
            leg.initiator = PEER
        if leg.first_fin is None:
            leg.first_fin = PEER
            if leg.fin_sent:
                # Ours waited behind unsent bytes. CLOSE_WAIT or LAST_ACK: theirs came before
                # ours left; otherwise ours had left (Linux shows CLOSE either way once ours
                # is acknowledged: then we take ours, sent as the bytes drained, as first).
                info = tcpinfo.read(sock)
                if info is None or info.state not in tcpinfo.PEER_WAS_FIRST:
                    leg.first_fin = BALANCER

    def _note_peer_reset(self, leg: LegTeardown) -> None:
        leg.rst_received = True
        if leg.initiator is None:
            leg.initiator = PEER

    def _shutdown_leg(self, leg: LegTeardown, transport: Any, sock: Any) -> bool:
        """Send our FIN on one leg. Closes at once if the peer's FIN is in already; otherwise
        half-closes and returns True: the leg lingers until the peer's FIN."""
        self.ctx.writes.flush()  # our FIN goes after every byte queued for this leg
        if leg.initiator is None:
            leg.initiator = BALANCER
        if leg.fin_sent:
            if leg.peer_fin_at is not None:
                transport.close()
            return leg.peer_fin_at is None
        info = tcpinfo.read(sock)
        if info is not None:
            leg.retransmits = info.total_retrans
        if leg.peer_fin_at is None and not _buffered(transport) and transport.can_write_eof():
            # Nothing left to send: read the state and send our FIN back to back, so whose
            # FIN came first is exact (write_eof() would send it a loop iteration later).
            if info is not None and info.state == tcpinfo.CLOSE:
                # CLOSE before we sent a FIN: the peer reset the connection (our last bytes
                # reached a socket it had closed). No FIN can leave; the reset is the fact,
                # even if a FIN it sent before is still queued for us to read.
                self._note_peer_reset(leg)
                return True
            leg.fin_sent = True
            if leg.first_fin is None and info is not None:
                leg.first_fin = PEER if info.state == tcpinfo.CLOSE_WAIT else BALANCER
            leg.fin_sent_at = self.ctx.clock()
            if not tcpinfo.shutdown_write(sock) and not _write_eof(transport):
                # The peer's RST landed between the TCP_INFO read and our shutdown: no FIN
                # left. (asyncio's write_eof() raises ENOTCONN here; raised out of a protocol
                # callback it closed the *other* leg and left this one lingering forever.)
                leg.fin_sent, leg.fin_sent_at, leg.first_fin = False, None, None
                self._note_peer_reset(leg)
                transport.abort()
                return False
            return True
        leg.fin_sent = True
        if leg.peer_fin_at is not None or not transport.can_write_eof():
            leg.fin_sent_at = self.ctx.clock()
            transport.close()
            return False
        # Our FIN follows the unsent bytes; judged at the peer's FIN. asyncio shuts down now
        # when its buffer is empty (the batch's bytes went straight out) and may meet a reset.
        if not _write_eof(transport):
            self._note_peer_reset(leg)
            transport.abort()
            return False
        return True

    def _write_eof_client(self) -> None:
        """Half-close the client leg (a tunnel whose backend finished sending)."""
        record = self.record
        assert record is not None and self.transport is not None
        self._send_close_notify()
        self._shutdown_leg(record.client_leg, self.transport, self._sock)

    def _send_close_notify(self) -> None:
        """Our close_notify (also in reply to the client's, which bidirectional shutdowns such
        as OpenSSL's wait for), unless the client's FIN is in: it may have closed its socket
        (curl does, right after its close_notify), and a reply would only draw an RST."""
        tls, record = self.tls, self.record
        assert record is not None
        if record.client_leg.peer_fin_at is not None:
            return
        info = tcpinfo.read(self._sock)
        if info is not None and info.state == tcpinfo.CLOSE_WAIT:
            return
        if tls is not None and tls.established and not tls.close_notify_sent:
            notify = tls.close()
            if notify:
                record.client_leg.close_notify_sent = True
                self._write_raw(notify)

    def _close_client(self, cause: str, backend_closes: bool = False) -> None:
        """End the connection: close_notify (TLS), FIN, linger for the client's FIN; the
        backend leg likewise, unless the backend is about to close it itself."""
        if self._closing or self.transport is None:
            return
        record = self.record
        assert record is not None
        self._closing = True
        if record.close_cause is None:
            record.close_cause = cause
        self._stop_stamp_watch()
        self._send_close_notify()
        lingering = self._shutdown_leg(record.client_leg, self.transport, self._sock)
        if lingering:
            self._blocks = ()  # read on, to see the client's FIN (and close_notify)
            self.transport.resume_reading()
        self._backend_closes = backend_closes
        if not backend_closes:
            self._close_backend()
        self._arm_linger()

    def _abort_client(self) -> None:
        """Reset the client leg (SO_LINGER 0 → RST) so a cut response is visibly cut."""
        if self.transport is None or self._client_lost:
            return
        record = self.record
        assert record is not None
        self._closing = True
        leg = record.client_leg
        if leg.initiator is None:
            leg.initiator = BALANCER
        leg.rst_sent = True
        self.ctx.writes.flush()  # what was relayed reaches the socket, as before the reset
        _reset(self._sock)
        self.transport.abort()
        self._close_backend()
        self._arm_linger()

    def _close_backend(self) -> None:
        backend = self.backend
        if backend is None or backend.transport is None or self._backend_lost:
            return
        record = self.record
        assert record is not None
        transport = backend.transport
        if self._backend_blocked:
            self._backend_blocked = False
            transport.resume_reading()  # read on, to see the backend's FIN
        self._shutdown_leg(record.backend_leg, transport, transport.get_extra_info("socket"))

    def _arm_linger(self) -> None:
        if not self._finished:
            self._set_deadline(LINGER, self.ctx.clock() + self.ctx.timeouts.linger_seconds)

    def _linger_over(self) -> None:
        """The peers did not answer our FIN in time: close what is left (RST if bytes are
        still unsent, since they never will be)."""
        record = self.record
        assert record is not None
        self.ctx.writes.flush()
        for leg, transport, lost in (
            (record.client_leg, self.transport, self._client_lost),
            (record.backend_leg, self.backend.transport if self.backend else None,
             self._backend_lost),
        ):  # fmt: skip
            if transport is None or lost:
                continue
            if _buffered(transport):
                leg.rst_sent = True
                _reset(transport.get_extra_info("socket"))
                transport.abort()
            else:
                transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        assert record is not None
        self._client_lost = True
        _closed(record.client_leg, self.ctx.clock())
        self._stop_stamp_watch()
        reset = isinstance(exc, ConnectionResetError | BrokenPipeError)
        if reset and not record.client_leg.rst_sent:
            self._note_peer_reset(record.client_leg)
            if self.tls is not None and not self.tls.established and record.tls_failure is None:
                record.tls_failure = "reset"  # the client gave up mid-handshake
                record.close_cause = record.close_cause or "tls_failed"
                if record.tls_started_at is None:
                    record.tls_started_at = self.ctx.clock()
            record.close_cause = record.close_cause or "client_reset"
        self._closing = True
        if self._connect_task is not None:
            self._connect_task.cancel()
        if not self._backend_closes:
            self._close_backend()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        """Publish once both legs are closed: the record is complete only then."""
        if self._finished or not self._client_lost:
            return
        if self.backend is not None and not self._backend_lost:
            self._arm_linger()  # bounded wait for the backend leg
            return
        self._finished = True
        ctx = self.ctx
        record = self.record
        assert record is not None
        ctx.deadlines.discard(self)
        if self.lease is not None:
            self.lease.release()
        if record.close_cause is None:
            record.close_cause = "client_closed"
        record.closed_at = ctx.clock()
        ctx.connections.discard(self)
        ctx.publish(record)

    # ---- deadlines -------------------------------------------------------------------------

    def _set_deadline(self, kind: str, at: float) -> None:
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
        self._deadline_passed(self._deadline_kind)

    def _deadline_passed(self, kind: str) -> None:
        record = self.record
        assert record is not None
        if kind == LINGER:
            self._linger_over()
        elif self._closing:
            return
        elif kind == TLS_HANDSHAKE:
            if record.tls_started_at is None:
                record.tls_started_at = self.ctx.clock()  # nothing arrived at all
            record.tls_failure = "timeout"
            record.close_cause = "tls_failed"
            self._close_client("tls_failed")
        elif kind == HEADER:
            reader = self.reader
            if reader is not None and reader.in_head:
                self._fail(HeaderTimeout("request head not complete in time"))
            else:  # connected but silent: nothing to answer, just close (nginx does the same)
                self._close_client(HEADER)
        elif kind == RESPONSE:
            self._fail(BackendTimeout("no response in time"))
        elif self._connect_task is not None:  # IDLE, TUNNEL_IDLE: connect has its own timeout
            self._set_deadline(kind, self.ctx.clock() + self.ctx.timeouts.connect_seconds)
        else:
            self._close_client(kind)

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
        if not busy and (self.tls is None or self.tls.established):
            self._close_client("shutdown")

    def force_close(self) -> None:
        """The shutdown grace is over: whatever is left ends now, lingering legs included."""
        if self.record is not None and self.record.close_cause is None:
            self.record.close_cause = "shutdown"
        if self.framer is not None and self.framer.in_message and not self._closing:
            self._abort_client()
        else:
            self._close_client("shutdown")
        self._linger_over()

    @property
    def state(self) -> str:
        if self._closing:
            return "closing"
        if self.tls is not None and not self.tls.established:
            return "handshaking"
        if self._tunnel or (
            self.framer is not None and (self.framer.awaiting or self.framer.in_message)
        ):
            return "active"
        if self.reader is not None and (self.reader.in_head or self.reader.in_body):
            return "active"
        return "idle"


def _closed(leg: LegTeardown, now: float) -> None:
    leg.closed_at = now
    if leg.first_fin is None and leg.fin_sent:
        leg.first_fin = BALANCER  # ours went; theirs never came (linger over, or an RST)


def _buffered(transport: Any) -> bool:
    return bool(transport.get_write_buffer_size())


def _write_eof(transport: Any) -> bool:
    """transport.write_eof(); False if the connection was reset under it (ENOTCONN)."""
    try:
        transport.write_eof()
    except OSError:
        return False
    return True


def _factory(protocol: BackendConnection) -> Callable[[], BackendConnection]:
    return lambda: protocol


def _reset(sock: Any) -> None:
    """Make the next close send RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
