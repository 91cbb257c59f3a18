"""The HTTP/2 flow of one client connection (ALPN h2): streams in, HTTP/1.1 to the backends.

A TLS listener that offers h2 (`alpn`) hands a connection whose client chose it to an
`H2Flow` once the handshake is over, in place of the HTTP/1 flow (a plain listener with
`h2c`, one that began with the preface). Frames go through the connection layer of
wire/h2_connection.py (sans I/O: frames, stream states, flow control, HPACK); the flow acts
on its events, each stream an `H2Stream` (h2_stream.py):

    HEADERS ──► a stream: routed by :authority and path (the listener's rules), its head made
                for the backend by wire/backend_head.py as an HTTP/1.1 request's is, sent on
                a backend connection of its own (the group's connector and policy)
    DATA    ──► the backend, as it comes (chunked when the client gave no content-length);
                the client's window is opened again only once the bytes are written, so a
                slow backend holds the client back rather than the balancer buffering
    backend ──► the response read (wire/response_reader.py) ──► HEADERS, DATA within the
                client's window (a stream whose window is shut holds its bytes and, past a
                bound, pauses its backend), END_STREAM (or the trailers)
    RST_STREAM from the client ──► its backend connection is closed; the other streams go on

Each stream publishes a request record (`stream` its id) linked to the connection's record.
A broken stream gets its own answer (502/503/504, or RST_STREAM once its response began); a
malformed request (wire/h2_fields.py) is reset with PROTOCOL_ERROR, the connection going on
(RFC 9113 §8.1.1); a protocol error ends the connection with GOAWAY, its error code and the
last stream seen.

Field sections are checked by wire/h2_fields.py as they come in; what goes out is the
balancer's own fields or a response's as llhttp read them, lowercased and without
connection-specific fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from balancer.backend.connection import BackendConnection, KeptConnection
from balancer.client.h2_stream import H2Stream
from balancer.client.listener import IDLE
from balancer.facts.causes import (
    CLIENT_CLOSED,
    CONN_BACKEND_CLOSED,
    CONN_REUSE_NEVER,
    H2_ERROR,
    SHUTDOWN,
)
from balancer.facts.record import BALANCER, PEER, H2Facts, RequestRecord
from balancer.wire.backend_head import backend_head
from balancer.wire.errors import (
    BadRequest,
    BalancerError,
)
from balancer.wire.h2_connection import H2Connection
from balancer.wire.h2_fields import MalformedFields, request_fields, trailer_fields
from balancer.wire.h2_frames import (
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ConnectionTerminated,
    DataReceived,
    H2ConnectionError,
    PingAckReceived,
    PingReceived,
    PriorityReceived,
    RequestReceived,
    ResetSent,
    SettingsReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
    error_name,
)

if TYPE_CHECKING:
    from balancer.backend.pool import Lease
    from balancer.client.contract import H2Session

MAX_CONCURRENT_STREAMS: Final = 100  # as nginx's http2_max_concurrent_streams and HAProxy's
# A stream opened past it is refused alone (RST_STREAM REFUSED_STREAM, a glitch: RFC 9113
# §5.1.2 asks a stream error, as nginx and HAProxy answer). Refusals over many reads run out
# of glitches (ENHANCE_YOUR_CALM); a flood within one read (the connection layer makes every
# stream of a read before the flow sees the first) meets its STREAMS_BACKSTOP (200) and
# PROTOCOL_ERROR: the streams held for one read stay bounded either way.
# Frames that cost work and carry no request (HAProxy's "glitches"): PING, SETTINGS, PRIORITY,
# an empty DATA, a tiny WINDOW_UPDATE while a response waits on it, a stream error of the
# client's, a stream the client resets before its answer (Rapid Reset, CVE-2023-44487). A
# connection has GLITCHES_FREE of them, and GLITCHES_PER_ANSWER more for each response it
# took; past that, GOAWAY ENHANCE_YOUR_CALM and the connection ends (`h2_error`).
GLITCHES_FREE: Final = 200
GLITCHES_PER_ANSWER: Final = 2
TINY_WINDOW_UPDATE: Final = 1024
_HIGHEST_STREAM_ID: Final = 2**31 - 1  # a draining GOAWAY's first: no stream refused yet
_DRAIN_PING: Final = b"draining"  # its PING's opaque data (8 bytes)


class H2Flow:
    """One HTTP/2 connection's streams (see the module docstring)."""

    __slots__ = (
        "answered", "conn", "glitches", "goaway_by", "goaway_final", "h2", "kept",
        "last_stream", "session", "streams",
    )  # fmt: skip

    def __init__(self, session: H2Session) -> None:
        self.session = session
        self.streams: dict[int, H2Stream] = {}
        # Reuse never: backend connections this client connection keeps between its streams,
        # by group, the most recent last.
        self.kept: dict[str, list[KeptConnection]] = {}
        # Who sent GOAWAY first (SHUTDOWN: we did, draining; CLIENT_CLOSED: the client): the
        # connection closes once its last stream ends.
        self.goaway_by: str | None = None
        self.goaway_final = False  # our last GOAWAY is out: later streams are refused
        self.glitches = -1  # see GLITCHES_FREE (the client's preface SETTINGS is free)
        self.answered = 0  # responses relayed whole
        self.last_stream = 0  # the highest stream acted on: what a GOAWAY names
        self.h2 = session.record.h2 = H2Facts()
        limits = session.ctx.settings.limits
        # (our SETTINGS queued: the concurrent streams and the header list size announced)
        self.conn = H2Connection(MAX_CONCURRENT_STREAMS, limits.max_header_bytes)
        session.set_deadline(IDLE)
        self.flush()

    # ---- the client's side -----------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        session = self.session
        session.extend_deadline(session.ctx.settings.timeouts.keepalive_idle_seconds)
        try:
            events = self.conn.receive_data(data)
        except H2ConnectionError as error:  # (its limits too: CONTINUATION, HPACK sizes)
            self._refuse(error.error_code, queued=True)
            return
        for event in events:
            if isinstance(event, RequestReceived):
                if self.goaway_final:  # (opened as our last GOAWAY was on its way)
                    self.reset(event.stream_id, REFUSED_STREAM)
                    continue
                self._request(event.stream_id, event.headers, event.stream_ended)
            elif isinstance(event, DataReceived):
                if not event.data and not event.stream_ended:
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
                    try:
                        stream.trailers = trailer_fields(event.headers)
                    except MalformedFields:
                        self._malformed(event.stream_id)
                        stream.cancel()
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.request_ended()
            elif isinstance(event, ResetSent):  # (a stream error of the client's: a glitch)
                _count(self.h2.rst_sent, event.error_code)
                self.glitches += 1
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.cancel()
            elif isinstance(event, StreamReset):
                _count(self.h2.rst_received, event.error_code)
                stream = self.streams.get(event.stream_id)
                if stream is not None:  # (not answered yet)
                    self.glitches += 1
                    stream.cancel()
            elif isinstance(event, PingReceived | SettingsReceived | PriorityReceived):
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
                code = error_name(event.error_code)
                self.h2.said_goaway(PEER, code, event.last_stream_id)
                self.goaway_by = self.goaway_by or CLIENT_CLOSED
            if self.glitches > GLITCHES_FREE + GLITCHES_PER_ANSWER * self.answered:
                self._refuse(ENHANCE_YOUR_CALM)  # (the rest of the read unread)
                return
        self.flush()
        self._maybe_done()

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM from us, counted."""
        self.conn.reset_stream(stream_id, code)
        _count(self.h2.rst_sent, code)

    def _refuse(self, code: int, queued: bool = False) -> None:
        """The client broke the protocol, or went past its glitches: GOAWAY with `code` and the
        last stream acted on, then the connection ends (its streams' backends with it).
        `queued`: the connection layer has queued that GOAWAY itself (a protocol error it
        found), naming the highest stream it saw."""
        last = self.conn.highest_inbound_stream_id if queued else self.last_stream
        if not queued:
            self.conn.close_connection(error_code=code, last_stream_id=last)
        self.h2.said_goaway(BALANCER, error_name(code), last)
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
            self.conn.goaway(NO_ERROR, _HIGHEST_STREAM_ID)  # (the streams' frames still go)
            self.h2.said_goaway(BALANCER, "no_error", _HIGHEST_STREAM_ID)
            self.conn.ping(_DRAIN_PING)
            self.flush()
        self._maybe_done()

    def _last_goaway(self) -> None:
        if self.goaway_by == SHUTDOWN and not self.goaway_final:
            self.goaway_final = True
            self.conn.goaway(NO_ERROR, self.last_stream)
            self.flush()
            self.h2.said_goaway(BALANCER, "no_error", self.last_stream)

    def closing_data(self, data: bytes) -> None:
        """Bytes after the connection began to close: read for a GOAWAY only (how the client
        left is a fact the record keeps), the rest skipped frame by frame."""
        conn = self.conn
        conn.close_reading()
        try:
            events = conn.receive_data(data)
        except H2ConnectionError:  # (no preface yet: nothing to read)
            return
        for event in events:
            if isinstance(event, ConnectionTerminated):
                self.h2.said_goaway(PEER, error_name(event.error_code), event.last_stream_id)

    def close_backends(self) -> None:
        """The client connection ends: every stream's backend connection ends with it, and
        the ones it kept."""
        for stream in list(self.streams.values()):
            stream.cancel()
        for kept in [kept for group in self.kept.values() for kept in group]:
            kept.let_go(CONN_REUSE_NEVER)

    def keep(self, group: str, lease: Lease, conn: BackendConnection) -> None:
        """A backend connection kept for this connection's next stream to `group` (reuse
        never), its events the KeptConnection's meanwhile."""
        idle = self.session.ctx.services.idle
        self.kept.setdefault(group, []).append(KeptConnection(conn, lease, idle, self._forget))

    def take_kept(self, group: str) -> KeptConnection | None:
        """The most recently kept backend connection to `group` that is still open."""
        kept = self.kept.get(group)
        while kept:
            taken = kept.pop()
            if taken.conn.leg.usable:
                return taken
            taken.let_go(CONN_BACKEND_CLOSED)
        return None

    def _forget(self, kept: KeptConnection) -> None:
        for group in self.kept.values():
            if kept in group:
                group.remove(kept)

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

    def _malformed(self, stream_id: int) -> None:
        """A malformed request (RFC 9113 §8.1.1): its stream reset, a glitch counted."""
        self.reset(stream_id, PROTOCOL_ERROR)
        self.glitches += 1

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:  # (not acted on: no last_stream)
            self.reset(stream_id, REFUSED_STREAM)
            self.glitches += 1
            return
        session = self.session
        services = session.ctx.services
        self.last_stream = stream_id
        try:
            method, target, authority, regular = request_fields(headers)
        except MalformedFields:
            self._malformed(stream_id)
            return
        record = RequestRecord(
            session.ctx.exchange_settings.next_id(), session.record, method, target,
            services.clock(),
        )  # fmt: skip
        record.stream_id = stream_id
        session.record.requests += 1
        stream = H2Stream(self, stream_id, record)
        self.streams[stream_id] = stream
        h2 = self.h2
        h2.streams += 1
        h2.max_concurrent_streams = max(h2.max_concurrent_streams, len(self.streams))
        record.host = authority
        if authority is None or method == b"CONNECT":
            stream.answer(BadRequest("an HTTP/2 request without :authority, or CONNECT"))
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
        try:  # (kept open: for the pool, or under never for this connection's next stream)
            head, chunked, _host = backend_head(
                method, "1.1", False, True, target, regular, client_ip, forwarded, True,
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


def _count(counts: dict[str, int], code: int) -> None:
    name = error_name(code)
    counts[name] = counts.get(name, 0) + 1
