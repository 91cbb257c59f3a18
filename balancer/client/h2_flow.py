"""The HTTP/2 flow of one client connection (ALPN h2): streams in, HTTP/1.1 to the backends.

A TLS listener that offers h2 (`alpn`) hands a connection whose client chose it to an
`H2Flow` once the handshake is over, in place of the HTTP/1 flow. Frames go through h2's
state machine (python-hyper's sans-I/O HTTP/2, h11's sibling); the flow acts on its events:

    HEADERS ──► a stream: routed by :authority and path (the listener's rules), its head made
                for the backend by wire/backend_head.py as an HTTP/1.1 request's is, sent on
                a backend connection of its own (the group's connector and policy)
    DATA    ──► the backend, as it comes (chunked when the client gave no content-length);
                the client's window is opened again only once the bytes are written, so a
                slow backend holds the client back rather than the balancer buffering
    backend ──► h11 reads the response ──► HEADERS, DATA within the client's window (a stream
                whose window is shut holds its bytes and, past a bound, pauses its backend),
                END_STREAM (or the trailers)
    RST_STREAM from the client ──► its backend connection is closed; the other streams go on

Each stream publishes a request record (`stream` its id) linked to the connection's record.
A broken stream gets its own answer (502/503/504, or RST_STREAM once its response began);
a protocol error ends the connection with GOAWAY, its error code and the last stream seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from balancer.backend.connection import BackendConnection
from balancer.backend.groups import Group
from balancer.client.listener import IDLE
from balancer.facts.causes import (
    CLIENT_CLOSED,
    CONN_DEAD_ON_REUSE,
    CONN_NOT_REUSABLE,
    CONN_REUSE_NEVER,
    H2_ERROR,
    SHUTDOWN,
)
from balancer.facts.record import BALANCER, PEER, H2Facts, RequestRecord
from balancer.wire.backend_head import backend_head
from balancer.wire.errors import (
    BackendClosed,
    BackendError,
    BackendTimeout,
    BadBackendResponse,
    BadRequest,
    BalancerError,
    NoBackendAvailable,
)

if TYPE_CHECKING:
    from balancer.backend.pool import Lease
    from balancer.client.contract import H2Session

MAX_CONCURRENT_STREAMS = 100  # as nginx's http2_max_concurrent_streams and HAProxy's
# Frames that cost work and carry no request (HAProxy's "glitches"): PING, SETTINGS, PRIORITY,
# an empty DATA, a tiny WINDOW_UPDATE while a response waits on it, a stream the client
# resets before its answer (Rapid Reset, CVE-2023-44487). A connection has GLITCHES_FREE of
# them, and GLITCHES_PER_ANSWER more for each response it took; past that, GOAWAY
# ENHANCE_YOUR_CALM and the connection ends (`h2_error`).
GLITCHES_FREE = 200
GLITCHES_PER_ANSWER = 2
TINY_WINDOW_UPDATE = 1024
_FRAME_HEADER_BYTES, _GOAWAY = 9, 0x7  # RFC 9113 §4.1, §6.8
_HIGHEST_STREAM_ID = 2**31 - 1  # a draining GOAWAY's first: no stream refused yet
_DRAIN_PING = b"draining"  # its PING's opaque data (8 bytes)
# A stream's response bytes held while the client's window is shut; past this its backend
# connection stops being read until the window opens.
HELD_HIGH_BYTES = 65536
# Response headers HTTP/2 forbids (connection-specific, RFC 9113 §8.2.2).
_HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


class H2Flow:
    """One HTTP/2 connection's streams (see the module docstring)."""

    __slots__ = (
        "answered", "conn", "glitches", "goaway_by", "goaway_final", "h2", "last_stream",
        "session", "streams",
    )  # fmt: skip

    def __init__(self, session: H2Session) -> None:
        self.session = session
        self.streams: dict[int, H2Stream] = {}
        # Who sent GOAWAY first (SHUTDOWN: we did, draining; CLIENT_CLOSED: the client): the
        # connection closes once its last stream ends.
        self.goaway_by: str | None = None
        self.goaway_final = False  # our last GOAWAY is out: later streams are refused
        self.glitches = -1  # see GLITCHES_FREE (the client's preface SETTINGS is free)
        self.answered = 0  # responses relayed whole
        self.last_stream = 0  # the highest stream acted on: what a GOAWAY names
        self.h2 = session.record.h2 = H2Facts()
        limits = session.ctx.settings.limits
        conn = self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings.update(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
                SettingCodes.ENABLE_PUSH: 0,
            }
        )
        conn.initiate_connection()
        session.set_deadline(IDLE)
        self.flush()

    # ---- the client's side -----------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        session = self.session
        session.extend_deadline(session.ctx.settings.timeouts.keepalive_idle_seconds)
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as error:  # (h2's own limits too: CONTINUATION, HPACK sizes)
            code = getattr(error, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
            self._refuse(code, queued=True)
            return
        for event in events:
            if isinstance(event, RequestReceived):
                if self.goaway_final:  # (opened as our last GOAWAY was on its way)
                    self.reset(event.stream_id, ErrorCodes.REFUSED_STREAM)
                    continue
                self._request(event.stream_id, event.headers, event.stream_ended is not None)
            elif isinstance(event, DataReceived):
                if not event.data and event.stream_ended is None:
                    self.glitches += 1
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.body(event.data, event.flow_controlled_length)
                else:  # (a stream we answered early): its window is the connection's too
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = event.headers
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.request_ended()
            elif isinstance(event, StreamReset):
                _count(self.h2.rst_received, event.error_code or 0)
                stream = self.streams.get(event.stream_id)
                if stream is not None:  # (not answered yet)
                    self.glitches += 1
                    stream.cancel()
            elif isinstance(event, PingReceived | RemoteSettingsChanged | PriorityUpdated):
                self.glitches += 1
            elif isinstance(event, PingAckReceived) and event.ping_data == _DRAIN_PING:
                self._last_goaway()
            elif isinstance(event, WindowUpdated):
                if event.delta < TINY_WINDOW_UPDATE and self.streams:
                    self.glitches += 1
                for stream in list(self.streams.values()):
                    if event.stream_id in (0, stream.id):
                        stream.send_held()
            elif isinstance(event, ConnectionTerminated):
                code = _error_name(event.error_code or 0)
                self.h2.said_goaway(PEER, code, event.last_stream_id or 0)
                self.goaway_by = self.goaway_by or CLIENT_CLOSED
            if self.glitches > GLITCHES_FREE + GLITCHES_PER_ANSWER * self.answered:
                self._refuse(ErrorCodes.ENHANCE_YOUR_CALM)  # (the rest of the read unread)
                return
        self.flush()
        self._maybe_done()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM from us, counted."""
        self.conn.reset_stream(stream_id, code)
        _count(self.h2.rst_sent, code)

    def _refuse(self, code: int, queued: bool = False) -> None:
        """The client broke the protocol, or went past its glitches: GOAWAY with `code` and the
        last stream acted on, then the connection ends (its streams' backends with it).
        `queued`: h2 has queued that GOAWAY itself (a protocol error it found), naming the
        highest stream it saw."""
        last = self.conn.highest_inbound_stream_id if queued else self.last_stream
        if not queued:
            self.conn.close_connection(error_code=code, last_stream_id=last)
        self.h2.said_goaway(BALANCER, _error_name(code), last)
        self.flush()
        self.session.close_client(H2_ERROR)

    def on_client_eof(self) -> None:
        """The client sends no more: streams under way are abandoned (it cannot read them
        out: an HTTP/2 client closes only when it is done)."""
        self.session.close_client(CLIENT_CLOSED)

    def on_response_data(self, data: bytes) -> None:
        """(The session's own backend connection: an h2 connection has none.)"""

    def on_backend_eof(self) -> None:
        """(Likewise.)"""

    def drain(self) -> None:
        """Shutdown or reload, as RFC 9113 §6.8 advises: a GOAWAY naming the highest stream
        id and a PING; once the PING comes back (a round trip: every stream the client
        opened meanwhile is in), the last GOAWAY names the last stream taken and later ones
        are refused. Streams under way finish (within the shutdown grace), then the
        connection closes."""
        if self.goaway_by is None:
            self.goaway_by = SHUTDOWN
            # By hand: h2's close_connection() would refuse every frame after it, the
            # answers of the streams under way included.
            self.flush()
            goaway = GoAwayFrame(0, _HIGHEST_STREAM_ID, ErrorCodes.NO_ERROR)
            self.session.write_client(goaway.serialize())
            self.h2.said_goaway(BALANCER, "no_error", _HIGHEST_STREAM_ID)
            self.conn.ping(_DRAIN_PING)
            self.flush()
        self._maybe_done()

    def _last_goaway(self) -> None:
        if self.goaway_by == SHUTDOWN and not self.goaway_final:
            self.goaway_final = True
            self.flush()
            goaway = GoAwayFrame(0, self.last_stream, ErrorCodes.NO_ERROR)
            self.session.write_client(goaway.serialize())
            self.h2.said_goaway(BALANCER, "no_error", self.last_stream)

    def closing_data(self, data: bytes) -> None:
        """Bytes after the connection began to close: read for a GOAWAY only (how the client
        left is a fact the record keeps), the rest skipped frame by frame. h2 takes no frame
        once it has said GOAWAY itself, and holds the one it refused, so the frames are
        walked here from where its buffer stopped: by their headers alone."""
        # (h2's FrameBuffer keeps what it has not made a frame of in `_data`: h2 4.x, tested)
        buffer = self.conn.incoming_buffer
        pending, offset = getattr(buffer, "_data", b"") + data, 0
        while len(pending) - offset >= _FRAME_HEADER_BYTES:
            length = int.from_bytes(pending[offset : offset + 3], "big")
            end = offset + _FRAME_HEADER_BYTES + length
            if end > len(pending):
                break
            if pending[offset + 3] == _GOAWAY and length >= 8:
                payload = pending[offset + _FRAME_HEADER_BYTES : end]
                last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
                error = _error_name(int.from_bytes(payload[4:8], "big"))
                self.h2.said_goaway(PEER, error, last)
            offset = end
        setattr(buffer, "_data", pending[offset:])  # noqa: B010 (a private attribute)

    def close_backends(self) -> None:
        """The client connection ends: every stream's backend connection ends with it."""
        for stream in list(self.streams.values()):
            stream.cancel()

    def client_full(self, full: bool) -> None:
        """The client's socket buffer filled (or drained): each stream's backend is paused
        (resumed) like a window that shut."""
        for stream in self.streams.values():
            stream.client_full(full)

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.session.write_client(out)

    # ---- streams ---------------------------------------------------------------------------

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        session = self.session
        services = session.ctx.services
        fields: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        for name, value in headers:
            if name[:1] == b":":
                fields[name] = value
            elif name == b"cookie":  # split for compression; one field to HTTP/1.1
                cookies.append(value)
            elif name != b"host":
                regular.append((name, value))
            else:
                fields.setdefault(b":authority", value)
        if cookies:
            regular.append((b"cookie", b"; ".join(cookies)))
        method, target = fields.get(b":method", b""), fields.get(b":path", b"")
        record = RequestRecord(
            session.ctx.exchange_settings.next_id(), session.record, method, target,
            services.clock(),
        )  # fmt: skip
        record.stream_id = stream_id
        self.last_stream = stream_id
        session.record.requests += 1
        stream = H2Stream(self, stream_id, record)
        self.streams[stream_id] = stream
        h2 = self.h2
        h2.streams += 1
        h2.max_concurrent_streams = max(h2.max_concurrent_streams, len(self.streams))
        authority = fields.get(b":authority")
        record.host = authority
        if authority is None or not target or method == b"CONNECT":
            stream.answer(BadRequest("an HTTP/2 request without :authority or :path, or CONNECT"))
            return
        if not ended and not any(name == b"content-length" for name, _ in regular):
            regular.append((b"transfer-encoding", b"chunked"))
        regular.insert(0, (b"host", authority))
        settings, connection = session.ctx.settings, session.record
        client_ip = (connection.client_ip or "").encode()
        port = connection.local_port or settings.listener.bind.port
        proto = b"https" if settings.ssl_context is not None else b"http"  # (h2c: plain)
        forwarded = b"X-Forwarded-Proto: %b\r\nX-Forwarded-Port: %d\r\n" % (proto, port)
        group = session.ctx.router.for_request(authority, target)
        keeps = group.reuse != "never"  # else the backend is asked to close after it
        try:
            head, chunked, _host = backend_head(
                method, "1.1", False, keeps, target, regular, client_ip, forwarded, keeps,
                settings.limits.max_body_bytes,
            )  # fmt: skip
        except BalancerError as error:
            stream.answer(error)
            return
        stream.chunked = chunked
        stream.ended = ended
        stream.connect(group, head, method)

    def stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)
        self.flush()
        self._maybe_done()

    def _maybe_done(self) -> None:
        session = self.session
        if self.goaway_by is None or self.streams or session.closing:
            return
        if self.goaway_by != SHUTDOWN or self.goaway_final:  # (ours: once its PING is back)
            session.close_client(self.goaway_by)


class H2Stream:
    """One stream: a request to a backend and its response (the backend connection's user)."""

    __slots__ = (
        "backend",
        "blocked",
        "chunked",
        "connect_task",
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

    def __init__(self, flow: H2Flow, stream_id: int, record: RequestRecord) -> None:
        self.flow = flow
        self.id = stream_id
        self.record = record
        self.backend: BackendConnection | None = None
        self.lease: Lease | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.parser: h11.Connection | None = None
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
        client has had an answer), else on a new one."""
        self.group = group
        self.record.backend_group = group.name
        self.pending.append(head)
        if self.ended:
            self.replay = head  # (no body: a dead reused connection's request goes again)
            self._request_end_bytes()
        self.parser = _response_reader(method)
        services = self.flow.session.ctx.services
        lease = None
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
        loop = services.loop or asyncio.get_running_loop()
        self.connect_task = loop.create_task(self._connect(group, lease))

    async def _connect(self, group: Group, first: Lease | None) -> None:
        task = self.connect_task
        assert task is not None
        loop = self.flow.session.ctx.services.loop or asyncio.get_running_loop()
        try:
            lease, backend = await group.connector.connect(self, self.record, task, loop, first)
        except BackendError as error:
            self.connect_task = None
            self.answer(error)
            return
        self.connect_task = None
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
            conn = self.flow.conn
            with contextlib.suppress(ProtocolError):  # (the stream closed meanwhile)
                conn.acknowledge_received_data(self.unacked, self.id)
            self.unacked = 0

    def cancel(self) -> None:
        """The client reset the stream (or went away): its backend connection ends."""
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
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
        parser.receive_data(data)
        self._read_events(parser)

    def on_backend_eof(self, backend: BackendConnection) -> None:
        backend.leg.peer_fin()
        parser = self.parser
        if parser is not None and backend is self.backend:
            parser.receive_data(b"")
            self._read_events(parser)

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        if backend is not self.backend:
            if backend.connect_task is not None:
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

    def _read_events(self, parser: h11.Connection) -> None:
        try:
            self._relay(parser)
        except ProtocolError:  # (h2 refused a frame for the stream: it was closed meanwhile)
            self.cancel()
        self.flow.flush()

    def _relay(self, parser: h11.Connection) -> None:
        """The backend's response events, as HTTP/2 frames."""
        flow = self.flow
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                self._broken()
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Response):
                self.record.status = event.status_code
                headers = [(b":status", b"%d" % event.status_code)]
                headers += [(n, v) for n, v in event.headers if n not in _HOP_BY_HOP]
                flow.conn.send_headers(self.id, headers)
                self.responded = True
            elif isinstance(event, h11.Data):
                self.held += event.data
                self.send_held()
            elif isinstance(event, h11.EndOfMessage):
                self.held_end = list(event.headers)
                self.send_held()
                self._let_go(None)
                break
            elif isinstance(event, h11.ConnectionClosed):
                self._broken()
                break

    def send_held(self) -> None:
        """Response bytes within the client's window; END_STREAM once they are all out."""
        conn = self.flow.conn
        held = self.held
        try:
            while held:
                room = min(conn.local_flow_control_window(self.id), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                conn.send_data(self.id, bytes(held[:room]))
                del held[:room]
            if not held and self.held_end is not None:
                if self.held_end:
                    conn.send_headers(self.id, self.held_end, end_stream=True)
                else:
                    conn.end_stream(self.id)
                self.held_end = None
                self.flow.answered += 1
                self.record.done_at = self.flow.session.ctx.services.clock()
                self._finish()
                return
        except ProtocolError:  # the client closed the stream (RST_STREAM) meanwhile
            self._finish()
            return
        self.client_full(len(held) > HELD_HIGH_BYTES)

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
                self.flow.reset(self.id, ErrorCodes.INTERNAL_ERROR)
            else:
                body = f"{error.status_hint} {error.reason}\n".encode()
                conn.send_headers(
                    self.id,
                    [(b":status", b"%d" % error.status_hint),
                     (b"content-type", b"text/plain"),
                     (b"content-length", b"%d" % len(body))],
                )  # fmt: skip
                conn.send_data(self.id, body, end_stream=True)
                record.response_bytes = len(body)
        except ProtocolError:
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
            self.parser = _response_reader(record.method)
            loop = self.flow.session.ctx.services.loop or asyncio.get_running_loop()
            self.connect_task = loop.create_task(self._connect(group, None))
            return
        error: BalancerError = BadBackendResponse("the backend's response was cut or unreadable")
        if self.record.first_byte_at is None:
            error = BackendClosed("the backend closed the connection before responding")
        self.answer(error)

    def _let_go(self, cause: str | None) -> None:
        """The backend connection is done with: kept for another request (reuse modes, a
        clean end), or closed; the lease released."""
        backend, self.backend = self.backend, None
        parser, self.parser = self.parser, None
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()
        if backend is None:
            return
        idle = self.flow.session.ctx.services.idle
        clean = (
            cause is None
            and parser is not None
            and parser.our_state is h11.DONE
            and parser.their_state is h11.DONE
        )
        reuses = self.group is not None and self.group.reuse != "never"
        if clean and reuses and backend.leg.usable:
            backend.leg.resume("h2_window")
            idle.put(backend)
        elif backend.leg.usable:  # (a clean end in a group that does not reuse: reuse_never)
            idle.close(backend, cause or (CONN_NOT_REUSABLE if reuses else CONN_REUSE_NEVER))
        else:
            backend.user = idle

    def _finish(self) -> None:
        flow = self.flow
        if flow.streams.get(self.id) is not self:
            return
        record = self.record
        if record.done_at is None:
            record.done_at = flow.session.ctx.services.clock()
        flow.session.ctx.exchange_settings.publish(record)
        flow.stream_done(self)


def _error_name(code: int) -> str:
    """An HTTP/2 error code as RFC 9113 names it, in lower case (an unknown one by number)."""
    try:
        return ErrorCodes(code).name.lower()
    except ValueError:
        return str(code)


def _count(counts: dict[str, int], code: int) -> None:
    name = _error_name(code)
    counts[name] = counts.get(name, 0) + 1


def _response_reader(method: bytes) -> h11.Connection:
    """h11, to read one response: told of a request with no body, whatever was sent (the
    method alone matters: a HEAD's response has none)."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    return parser
