"""One HTTP/2 stream (h2_flow.py): a request on a backend connection of its own, and its
response relayed within the client's window.

    connect   an idle backend connection (reuse always; safe, once the client had an
              answer) or a new one (the group's connector); the head, then body bytes as
              they come; the client's window credited back only for bytes written
    response  read by wire/response_reader.py: HEADERS, DATA within the window (held past
              it; past 64 KiB held the backend is not read), END_STREAM or the trailers; the
              connection goes back to the pool after a clean end
    failure   no backend: 503; a refused connect: 502; no response in the group's time: 504;
              cut mid-response: RST_STREAM (never END_STREAM on a cut body); a reused
              connection dead on arrival: the request (without a body) once more, new

The stream sees its flow through `StreamFlow`, the few members it uses.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, Protocol

from balancer.backend.connection import BackendConnection, KeptConnection
from balancer.backend.connector import Connecting
from balancer.backend.groups import Group
from balancer.facts.causes import (
    CONN_BACKEND_CLOSED,
    CONN_BACKEND_RESET,
    CONN_DEAD_ON_REUSE,
    CONN_NOT_REUSABLE,
    CONN_REUSE_NEVER,
)
from balancer.facts.record import RequestRecord
from balancer.wire.errors import (
    BackendClosed,
    BackendError,
    BackendTimeout,
    BadBackendResponse,
    BalancerError,
    NoBackendAvailable,
)
from balancer.wire.h2_connection import H2Connection
from balancer.wire.h2_frames import INTERNAL_ERROR, StreamGone
from balancer.wire.response_reader import ResponseReader

if TYPE_CHECKING:
    from balancer.backend.pool import Lease
    from balancer.client.contract import H2Session

# A stream's response bytes held while the client's window is shut; past this its backend
# connection stops being read until the window opens.
HELD_HIGH_BYTES: Final = 65536


class StreamFlow(Protocol):
    """What a stream uses of its connection's flow (h2_flow.H2Flow)."""

    conn: H2Connection
    session: H2Session
    streams: dict[int, Any]
    answered: int

    def reset(self, stream_id: int, code: int) -> None: ...

    def flush(self) -> None: ...

    def stream_done(self, stream: H2Stream) -> None: ...

    def keep(self, group: str, lease: Lease, conn: BackendConnection) -> None: ...

    def take_kept(self, group: str) -> KeptConnection | None: ...


class H2Stream:
    """One stream: a request to a backend and its response (the backend connection's user)."""

    __slots__ = (
        "backend",
        "blocked",
        "chunked",
        "connecting",
        "ended",
        "flow",
        "group",
        "held",
        "held_end",
        "id",
        "lease",
        "parser",
        "pending",
        "record",
        "replay",
        "responded",
        "reused",
        "trailers",
        "unacked",
    )

    def __init__(self, flow: StreamFlow, stream_id: int, record: RequestRecord) -> None:
        self.flow = flow
        self.id = stream_id
        self.record = record
        self.backend: BackendConnection | None = None
        self.lease: Lease | None = None
        self.connecting: Connecting | None = None  # a connect under way (connector.py)
        self.parser: ResponseReader | None = None
        self.chunked = False
        self.ended = False  # the client's request is whole
        self.responded = False  # our HEADERS went out
        self.pending: list[bytes] = []  # request bytes while connecting
        self.held = bytearray()  # response bytes the client's window has no room for yet
        self.held_end: list[tuple[bytes, bytes]] | None = None  # END_STREAM (trailers) owed
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.unacked = 0  # request body bytes not yet credited back to the client's window
        self.blocked = False  # the backend's socket is full: no credit back meanwhile
        self.group: Group | None = None
        self.reused = False  # on an idle backend connection from the pool
        self.replay: bytes | None = None  # the request again, if it had no body

    # ---- the request ---------------------------------------------------------------------

    def connect(self, group: Group, head: bytes, method: bytes) -> None:
        """Send the request on an idle backend connection (reuse always; safe: once this
        client has had an answer; never: one this client connection keeps), else on a new
        one."""
        self.group = group
        self.record.backend_group = group.name
        self.pending.append(head)
        if self.ended:
            self.replay = head  # (no body: a dead reused connection's request goes again)
            self._request_end_bytes()
        self.parser = ResponseReader(method == b"HEAD")
        services = self.flow.session.ctx.services
        lease = None
        kept = self.flow.take_kept(group.name) if group.reuse == "never" else None
        if kept is not None:
            kept.conn.user = self
            self._use(kept.lease, kept.conn, reused=True)
            return
        if group.reuse == "always" or (group.reuse == "safe" and self.flow.answered):
            lease = group.pool.acquire(services.clock(), (), b"")
            if lease is None:
                self.answer(NoBackendAvailable(f"no backend of group {group.name} is ready"))
                return
            backend = services.idle.take(lease.state.name, lease.state.backend.address)
            if backend is not None:
                backend.user = self
                self._use(lease, backend, reused=True)
                return
        self._connect(group, lease)

    def _connect(self, group: Group, first: Lease | None) -> None:
        loop = self.flow.session.ctx.services.loop or asyncio.get_running_loop()
        self.connecting = group.connector.start(self, self, self.record, loop, first)

    def connect_failed(self, error: BackendError) -> None:
        self.connecting = None
        self.answer(error)

    def connect_done(self, lease: Lease, backend: BackendConnection) -> None:
        self.connecting = None
        self._use(lease, backend, reused=False)

    def _use(self, lease: Lease, backend: BackendConnection, reused: bool) -> None:
        """The request goes out on `backend`."""
        session = self.flow.session
        services = session.ctx.services
        self.lease, self.backend, self.reused = lease, backend, reused
        if self.flow.streams.get(self.id) is not self or session.closing:
            self._let_go(CONN_NOT_REUSABLE)
            return
        record, conn = self.record, backend.record
        conn.requests += 1
        record.backend_connection_id = conn.id
        record.connect_wait_seconds = None if reused else conn.connect_wait_seconds
        record.reused = reused
        record.forwarded_at = now = services.clock()
        assert self.group is not None
        services.deadlines.schedule(self, now + self.group.response_seconds)
        pending, self.pending = self.pending, []
        backend.leg.write(b"".join(pending))
        self._ack()
        self.flow.flush()  # (the window credit, for body bytes that came while connecting)
        if not reused and (
            backend.lost_early is not None or backend.leg.facts.peer_fin_at is not None
        ):
            self.on_backend_eof(backend)

    def body(self, data: bytes, credited: int) -> None:
        self.record.request_body_bytes += len(data)
        self.unacked += credited
        if self.chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._send(data)
        self._ack()

    def request_ended(self) -> None:
        self.ended = True
        self._request_end_bytes()

    def _request_end_bytes(self) -> None:
        if not self.chunked:
            return
        trailers = b"".join(b"%b: %b\r\n" % pair for pair in self.trailers or ())
        self._send(b"0\r\n" + trailers + b"\r\n")

    def _send(self, data: bytes) -> None:
        backend = self.backend
        if backend is None:
            self.pending.append(data)
        elif backend.leg.usable:
            backend.leg.write(data)

    def _ack(self) -> None:
        """Open the client's window again for the body bytes the backend has taken (none
        while the backend's socket is full: see block_reading)."""
        backend = self.backend
        if self.unacked and backend is not None and not self.blocked:
            self.flow.conn.acknowledge_received_data(self.unacked, self.id)
            self.unacked = 0

    def cancel(self) -> None:
        """The client reset the stream (or went away): its backend connection ends."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self._let_go(CONN_NOT_REUSABLE)
        self._finish()

    # ---- the backend's side (connection.BackendUser) ---------------------------------------

    def on_backend_data(self, backend: BackendConnection, data: bytes) -> None:
        parser = self.parser
        if parser is None or backend is not self.backend:
            return
        record = self.record
        if record.first_byte_at is None:
            record.first_byte_at = self.flow.session.ctx.services.clock()
        record.response_bytes = (record.response_bytes or 0) + len(data)
        try:
            parser.feed(data)
        except BadBackendResponse:
            self._broken()
            self.flow.flush()
            return
        self._read_events(parser)

    def on_backend_eof(self, backend: BackendConnection) -> None:
        backend.leg.peer_fin()
        parser = self.parser
        if parser is not None and backend is self.backend:
            try:
                parser.eof()
            except BadBackendResponse:
                self._broken()
                self.flow.flush()
                return
            self._read_events(parser)

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        if backend is not self.backend:
            if backend.connecting is not None:
                backend.lost_early = backend.leg.lost(exc)
            return
        backend.leg.lost(exc)
        if self.parser is not None:
            self._broken()

    def block_reading(self, why: str) -> None:
        """The backend's socket is full: the client's window stays shut (no credit back)."""
        self.blocked = True

    def unblock_reading(self, why: str) -> None:
        self.blocked = False
        self._ack()
        self.flow.flush()

    def on_deadline(self) -> None:
        """The group's response timeout, from the request's forwarding: a stream whose
        response has not begun gets a 504 (one under way is left to the connection's)."""
        if self.flow.streams.get(self.id) is self and self.record.first_byte_at is None:
            self.answer(BackendTimeout("no response in time"))
            self.flow.flush()

    def _read_events(self, parser: ResponseReader) -> None:
        try:
            self._relay(parser)
        except StreamGone:  # (the stream was closed meanwhile)
            self.cancel()
        self.flow.flush()

    def _relay(self, parser: ResponseReader) -> None:
        """What the backend's response has given so far, as HTTP/2 frames."""
        status = parser.status
        if status is None:
            return
        done = parser.done and self.parser is parser
        if not self.responded:
            self.record.status = status
            # A response with no body (HEAD, 204, 304) ends with its HEADERS frame.
            bodiless = done and not parser.body and not parser.trailers
            head = [(b":status", b"%d" % status), *parser.fields]
            self.flow.conn.send_headers(self.id, head, end_stream=bodiless)
            self.responded = True
            if bodiless:
                self._answered()
                self._let_go(None)
                return
        if done:  # (known before the body goes: its last DATA frame can end the stream)
            self.held_end = parser.trailers
        body = parser.body
        if body:
            for chunk in body:
                self.held += chunk
            body.clear()
            self.send_held()
        elif done:
            self.send_held()
        if done:
            self._let_go(None)

    def send_held(self) -> None:
        """Response bytes within the client's window; END_STREAM once they are all out."""
        conn = self.flow.conn
        held = self.held
        try:
            while held:
                room = min(conn.local_flow_control_window(self.id), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = bytes(held[:room])
                del held[:room]
                # The last DATA carries END_STREAM when no trailers follow (not an empty
                # frame of its own: a frame less a response, and the work for it).
                last = not held and self.held_end == []
                conn.send_data(self.id, chunk, end_stream=last)
                if last:
                    self._answered()
                    return
            if not held and self.held_end is not None:
                if self.held_end:
                    conn.send_headers(self.id, self.held_end, end_stream=True)
                else:
                    conn.end_stream(self.id)
                self._answered()
                return
        except StreamGone:  # the client closed the stream (RST_STREAM) meanwhile
            self._finish()
            return
        self.client_full(len(held) > HELD_HIGH_BYTES)

    def _answered(self) -> None:
        """The response went out whole (END_STREAM)."""
        self.held_end = None
        self.flow.answered += 1
        self.record.done_at = self.flow.session.ctx.services.clock()
        self._finish()

    def client_full(self, full: bool) -> None:
        backend = self.backend
        if backend is None or not backend.leg.usable:
            return
        if full:
            backend.leg.pause("h2_window")
        else:
            backend.leg.resume("h2_window")

    # ---- the end of a stream ---------------------------------------------------------------

    def answer(self, error: BalancerError) -> None:
        """The balancer's own response for this stream (or, once the backend's began, a
        reset: a cut response must look cut)."""
        record = self.record
        if record.status is None or not self.responded:
            record.status = error.status_hint
        conn = self.flow.conn
        try:
            if self.responded:
                self.flow.reset(self.id, INTERNAL_ERROR)
            else:
                body = f"{error.status_hint} {error.reason}\n".encode()
                status = (b":status", b"%d" % error.status_hint)
                room = min(conn.local_flow_control_window(self.id), conn.max_outbound_frame_size)
                if len(body) <= room:
                    conn.send_headers(
                        self.id,
                        [status, (b"content-type", b"text/plain"),
                         (b"content-length", b"%d" % len(body))],
                    )  # fmt: skip
                    conn.send_data(self.id, body, end_stream=True)
                    record.response_bytes = len(body)
                else:  # (the client's window has no room for the words: the status alone)
                    conn.send_headers(self.id, [status], end_stream=True)
        except StreamGone:
            pass
        self.responded = True
        self._let_go(CONN_NOT_REUSABLE)
        self._finish()

    def _broken(self) -> None:
        """The backend connection ended (or said something unreadable) with the response
        owed or under way. A reused one that ended before any response byte was dead as it
        was taken (the backend had closed it idle): a request without a body goes once more,
        on a new connection, as the HTTP/1.1 path does."""
        record, group = self.record, self.group
        if self.reused and record.first_byte_at is None and self.replay and group is not None:
            self._let_go(CONN_DEAD_ON_REUSE)
            record.retries += 1
            self.pending, self.replay = [self.replay], None
            self.parser = ResponseReader(record.method == b"HEAD")
            self._connect(group, None)
            return
        backend = self.backend
        if backend is not None:  # what ended it, for its record: the backend's FIN or RST
            facts = backend.leg.facts
            ended = facts.peer_fin_at is not None or not backend.leg.usable
            self._let_go(
                CONN_BACKEND_RESET if facts.rst_received
                else CONN_BACKEND_CLOSED if ended else CONN_NOT_REUSABLE
            )  # fmt: skip
        error: BalancerError = BadBackendResponse("the backend's response was cut or unreadable")
        if self.record.first_byte_at is None:
            error = BackendClosed("the backend closed the connection before responding")
        self.answer(error)

    def _let_go(self, cause: str | None) -> None:
        """The backend connection is done with: after a clean end, kept for another request
        (reuse modes: the worker's pool; never: this client connection's next stream, with
        its lease, as HAProxy's), else closed; the lease released."""
        backend, self.backend = self.backend, None
        parser, self.parser = self.parser, None
        lease, self.lease = self.lease, None
        clean = cause is None and parser is not None and parser.done and parser.reusable
        if parser is not None:
            parser.close()
        group = self.group
        never = group is not None and group.reuse == "never"
        if clean and never and lease is not None and backend is not None and backend.leg.usable:
            assert group is not None
            backend.leg.resume("h2_window")
            self.flow.keep(group.name, lease, backend)
            return
        others_busy = 0
        if lease is not None:
            lease.release()
            others_busy = lease.state.active
        if backend is None:
            return
        idle = self.flow.session.ctx.services.idle
        reuses = group is not None and group.reuse != "never"
        if clean and reuses and backend.leg.usable:
            backend.leg.resume("h2_window")
            idle.put(backend, others_busy)
        else:  # closed, or (lost already) published: the pool's either way
            idle.give_up(backend, cause or (CONN_NOT_REUSABLE if reuses else CONN_REUSE_NEVER))

    def _finish(self) -> None:
        flow = self.flow
        if flow.streams.get(self.id) is not self:
            return
        record = self.record
        if record.done_at is None:
            record.done_at = flow.session.ctx.services.clock()
        flow.session.ctx.exchange_settings.publish(record)
        flow.stream_done(self)
