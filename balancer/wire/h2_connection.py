"""HTTP/2's connection layer (RFC 9113), the server's side, sans I/O: bytes in, events out;
calls in, bytes out. It replaced python-hyper's h2 (about half of a stream's CPU here, pure
Python built for every role and option) with what a server that answers every stream from
an HTTP/1.1 backend needs, small enough for the compiled build.

    receive_data(bytes) ──► events: RequestReceived, DataReceived, TrailersReceived,
                            StreamEnded, StreamReset, ResetSent (a stream error of the
                            client's, answered), WindowUpdated, PingReceived,
                            PingAckReceived, SettingsReceived, PriorityReceived,
                            ConnectionTerminated (the client's GOAWAY)
    send_headers / send_data / end_stream / reset_stream / acknowledge_received_data /
    ping / goaway ──► frames queued; data_to_send() takes them

What it holds to, and how it answers (RFC 9113 §5.4: a connection error is GOAWAY with its
code, queued here, and H2ConnectionError raised; a stream error is RST_STREAM, queued here):
the preface and a SETTINGS frame first; frame sizes (FRAME_SIZE_ERROR past our 16,384
bytes, or a control frame of the wrong length); stream ids (odd, rising: PROTOCOL_ERROR);
a header block's CONTINUATION frames back to back on its stream, at most
MAX_CONTINUATIONS of them and HEADER_BLOCK_FACTOR times the header list bound in bytes
(ENHANCE_YOUR_CALM past either); every header block decoded, refused stream or not, so the
HPACK context stays whole (wire/hpack_codec.py, the list bounded as it is decoded); the
trailers' END_STREAM; flow control both ways (FLOW_CONTROL_ERROR for a peer past our
window or a window past 2^31-1; the connection's window credited back as DATA comes, a
stream's only as the flow says its backend took the bytes, so a slow backend shuts its own
stream and no other); frames for a stream this side reset are dropped.
At most STREAMS_BACKSTOP streams open at once (PROTOCOL_ERROR past it): the flow refuses
streams past the announced SETTINGS_MAX_CONCURRENT_STREAMS itself, one by one; this bounds
what one read can open before the flow sees any of it.

What is left out, on purpose: server push (ENABLE_PUSH is 0; a client's PUSH_PROMISE is a
PROTOCOL_ERROR), priorities (read and dropped; RFC 9113 deprecates them), the client role,
and h2's field checks (wire/h2_fields.py has the project's own).
"""

from __future__ import annotations

from typing import Final, NoReturn

from hpack.exceptions import HPACKError, OversizedHeaderListError

from balancer.wire.h2_frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_HEADER,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS_SETTING,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    TWO_WORDS,
    WINDOW_UPDATE,
    WORD,
    ConnectionTerminated,
    DataReceived,
    Event,
    H2ConnectionError,
    PingAckReceived,
    PingReceived,
    PriorityReceived,
    RequestReceived,
    ResetSent,
    SettingsReceived,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
    frame,
)
from balancer.wire.hpack_codec import FieldDecoder, FieldEncoder

DEFAULT_HEADER_LIST_SIZE: Final = 65536  # the bound until the client has our SETTINGS
STREAMS_BACKSTOP: Final = 200
MAX_CONTINUATIONS: Final = 64
HEADER_BLOCK_FACTOR: Final = 4  # a block's bytes past this times the list bound: no request
_RESET_KEPT: Final = 1024  # streams we reset whose late frames are dropped quietly

# Stream states (§5.1), as far as a server that never pushes meets them.
_OPEN, _HALF_CLOSED_REMOTE, _HALF_CLOSED_LOCAL = 0, 1, 2


class _Stream:
    __slots__ = ("receive_window", "send_window", "state", "trailers_owed", "unacked")

    def __init__(self, send_window: int) -> None:
        self.state = _OPEN
        self.send_window = send_window  # what we may send on it
        self.receive_window = DEFAULT_WINDOW  # what the client may send, as we last said
        self.unacked = 0  # credited by the flow, not yet sent as WINDOW_UPDATE
        self.trailers_owed = False  # its request's HEADERS came without END_STREAM


class _Sending:
    """A connection's streams as this side sends on them: frames queued, the windows both
    ways (ours to send within, the client's credited back), streams ended and reset."""

    __slots__ = (
        "_conn_unacked", "_out", "_receive_window", "_reset", "encoder",
        "max_outbound_frame_size", "remote_initial_window", "send_window", "streams",
    )  # fmt: skip

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self.encoder = FieldEncoder()
        self.streams: dict[int, _Stream] = {}
        self.send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self.remote_initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        self._receive_window = DEFAULT_WINDOW  # the connection's, as we last said
        self._conn_unacked = 0  # credited by the flow, not yet sent as WINDOW_UPDATE
        self._reset: dict[int, None] = {}  # streams we reset, oldest first

    def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False
    ) -> None:
        """A response's HEADERS (or its trailers, with `end_stream`), CONTINUATION frames
        after it if the block is larger than the client's frame size."""
        stream = self._sendable(stream_id)
        block = self.encoder.encode(headers)
        size = self.max_outbound_frame_size
        flags = END_STREAM if end_stream else 0
        if len(block) <= size:
            self._out.append(frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            pieces = [block[i : i + size] for i in range(0, len(block), size)]
            self._out.append(frame(HEADERS, flags, stream_id, pieces[0]))
            for piece in pieces[1:-1]:
                self._out.append(frame(CONTINUATION, 0, stream_id, piece))
            self._out.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
        if end_stream:
            self._local_ended(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """DATA within the windows and the client's frame size (the caller sizes it:
        local_flow_control_window, max_outbound_frame_size)."""
        stream = self._sendable(stream_id)
        size = len(data)
        if size and size > min(self.send_window, stream.send_window, self.max_outbound_frame_size):
            raise ValueError(f"{size} bytes of DATA past the window or the frame size")
        self.send_window -= size
        stream.send_window -= size
        self._out.append(frame(DATA, END_STREAM if end_stream else 0, stream_id, data))
        if end_stream:
            self._local_ended(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.state == _HALF_CLOSED_LOCAL:
            raise StreamGone(f"stream {stream_id} has ended")
        return stream

    def _local_ended(self, stream_id: int, stream: _Stream) -> None:
        if stream.state == _HALF_CLOSED_REMOTE:
            self._forget(stream_id)
        else:
            stream.state = _HALF_CLOSED_LOCAL

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM: the stream ends here; its late frames are dropped."""
        self.streams.pop(stream_id, None)
        reset = self._reset
        reset[stream_id] = None
        if len(reset) > _RESET_KEPT:
            del reset[next(iter(reset))]
        self._out.append(frame(RST_STREAM, 0, stream_id, WORD.pack(error_code)))

    def _credit_connection(self) -> None:
        """After a read: the connection's window is opened again for the DATA it carried (by
        WINDOW_UPDATE once half a window is owed), as nginx does: a stream whose backend is
        slow holds its own window shut, never the connection's, so the other streams' bodies
        keep coming. What the balancer buffers stays bounded by the streams' windows."""
        if self._conn_unacked >= DEFAULT_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, WORD.pack(self._conn_unacked)))
            self._receive_window += self._conn_unacked
            self._conn_unacked = 0

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """`size` bytes of the stream's DATA were taken (written to its backend): its window
        is opened again, by WINDOW_UPDATE once half a window is owed (not a frame a read)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state == _HALF_CLOSED_REMOTE:
            return  # (no more DATA comes on it)
        stream.unacked += size
        if stream.unacked >= DEFAULT_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, stream_id, WORD.pack(stream.unacked)))
            stream.receive_window += stream.unacked
            stream.unacked = 0

    def local_flow_control_window(self, stream_id: int) -> int:
        """What may be sent on the stream now: its window and the connection's."""
        return min(self.send_window, self._sendable(stream_id).send_window)

    def ping(self, opaque_data: bytes) -> None:
        self._out.append(frame(PING, 0, 0, opaque_data))

    def goaway(self, error_code: int, last_stream_id: int) -> None:
        """GOAWAY (streams after `last_stream_id` were not acted on); frames still go out:
        a graceful close's streams finish."""
        self._out.append(frame(GOAWAY, 0, 0, TWO_WORDS.pack(last_stream_id, error_code)))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data


class H2Connection(_Sending):
    """One client connection's HTTP/2 state (see the module docstring): what it reads here,
    what it sends in _Sending."""

    __slots__ = (
        "_block", "_block_flags", "_block_frames", "_block_refused", "_block_stream", "_buffer",
        "_closed",
        "_preface", "_settings_seen", "decoder", "header_list_bound",
        "highest_inbound_stream_id", "local_settings_acked",
    )  # fmt: skip

    def __init__(self, max_concurrent_streams: int, max_header_list_size: int) -> None:
        super().__init__()
        self._out.append(
            frame(
                SETTINGS, 0, 0,
                SETTING.pack(MAX_CONCURRENT_STREAMS_SETTING, max_concurrent_streams)
                + SETTING.pack(MAX_HEADER_LIST_SIZE, max_header_list_size)
                + SETTING.pack(ENABLE_PUSH, 0),
            )
        )  # fmt: skip
        self.header_list_bound = max_header_list_size  # ours, once the client has it (ACK)
        self.local_settings_acked = False
        self.decoder = FieldDecoder(DEFAULT_HEADER_LIST_SIZE)
        self.highest_inbound_stream_id = 0
        self._buffer = b""
        self._preface = False  # the client's preface is in
        self._settings_seen = False  # and its SETTINGS after it
        self._closed = False  # GOAWAY for an error went out: frames read for GOAWAY alone
        # An open header block: its stream, the HEADERS frame's flags, its bytes so far.
        self._block_stream = 0
        self._block_flags = 0
        self._block_refused = 0  # the stream error its stream gets once decoded (0: none)
        self._block: list[bytes] = []
        self._block_frames = 0

    # ---- in ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events in `data` (and what came before it unread). Raises H2ConnectionError
        for a connection error, its GOAWAY queued; after it, only a client's GOAWAY is read."""
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        pos = 0
        if not self._preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    self._fail(PROTOCOL_ERROR, "no HTTP/2 preface")
                self._buffer = buffer
                return events
            if not buffer.startswith(PREFACE):
                self._fail(PROTOCOL_ERROR, "no HTTP/2 preface")
            self._preface = True
            pos = len(PREFACE)
        end = len(buffer)
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, pos)
                length = (high << 8) | low
                if length > DEFAULT_FRAME_SIZE:
                    self._buffer = b""
                    if self._closed:
                        return events
                    self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                start = pos + 9
                if end - start < length:
                    break
                pos = start + length
                payload = buffer[start:pos]
                stream_id &= 0x7FFFFFFF
                if self._closed:
                    if kind == GOAWAY and length >= 8:
                        self._goaway_in(payload, events)
                    continue
                self._frame_in(kind, flags, stream_id, payload, events)
        except H2ConnectionError:
            self._buffer = buffer[pos:]
            raise
        self._buffer = buffer[pos:]
        self._credit_connection()
        return events

    def _frame_in(
        self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._block_stream:
            if kind != CONTINUATION or stream_id != self._block_stream:
                self._fail(PROTOCOL_ERROR, "a frame inside a header block")
            self._continuation(flags, payload, events)
            return
        if not self._settings_seen:
            if kind != SETTINGS or flags & ACK:
                self._fail(PROTOCOL_ERROR, "the preface's SETTINGS missing")
            self._settings_seen = True
        if kind == HEADERS:
            self._headers_in(flags, stream_id, payload, events)
        elif kind == DATA:
            self._data_in(flags, stream_id, payload, events)
        elif kind == WINDOW_UPDATE:
            self._window_update_in(stream_id, payload, events)
        elif kind == RST_STREAM:
            self._rst_in(stream_id, payload, events)
        elif kind == SETTINGS:
            self._settings_in(flags, stream_id, payload, events)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                self._fail(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "a bad PING")
            if flags & ACK:
                events.append(PingAckReceived(payload))
            else:
                self._out.append(frame(PING, ACK, 0, payload))
                events.append(PingReceived())
        elif kind == PRIORITY:
            if not stream_id:
                self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(stream_id, FRAME_SIZE_ERROR, events)
            elif WORD.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                self._stream_error(stream_id, PROTOCOL_ERROR, events)
            events.append(PriorityReceived())
        elif kind == GOAWAY:
            if stream_id or len(payload) < 8:
                self._fail(PROTOCOL_ERROR, "a bad GOAWAY")
            self._goaway_in(payload, events)
        elif kind == CONTINUATION:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        elif kind == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # (other types: extensions, ignored as §5.5 asks)

    def _headers_in(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "HEADERS on stream 0")
        payload = self._unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            depends_on = WORD.unpack_from(payload)[0] & 0x7FFFFFFF
            payload = payload[5:]
            if depends_on == stream_id:
                self._block_start(stream_id, flags, payload, events, refused=PROTOCOL_ERROR)
                return
        self._block_start(stream_id, flags, payload, events, refused=0)

    def _block_start(
        self, stream_id: int, flags: int, payload: bytes, events: list[Event], refused: int
    ) -> None:
        if flags & END_HEADERS:
            self._block_done(stream_id, flags, payload, events, refused)
            return
        self._block_stream, self._block_flags, self._block_refused = stream_id, flags, refused
        self._block, self._block_frames = [payload], 0

    def _continuation(self, flags: int, payload: bytes, events: list[Event]) -> None:
        self._block_frames += 1
        self._block.append(payload)
        if self._block_frames > MAX_CONTINUATIONS or sum(map(len, self._block)) > (
            HEADER_BLOCK_FACTOR * self.header_list_bound
        ):
            self._fail(ENHANCE_YOUR_CALM, "a header block without end")
        if flags & END_HEADERS:
            stream_id, block = self._block_stream, b"".join(self._block)
            self._block_stream, self._block = 0, []
            self._block_done(stream_id, self._block_flags, block, events, self._block_refused)

    def _block_done(
        self, stream_id: int, flags: int, block: bytes, events: list[Event], refused: int
    ) -> None:
        try:  # (decoded whatever becomes of it: the HPACK context is the connection's)
            fields = self.decoder.decode(block)
        except HPACKError as error:
            oversized = isinstance(error, OversizedHeaderListError)
            code = ENHANCE_YOUR_CALM if oversized else COMPRESSION_ERROR
            self._fail(code, f"a header block that could not be decoded: {error}")
        ended = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self.highest_inbound_stream_id:
                if stream_id not in self._reset:
                    self._stream_error(stream_id, STREAM_CLOSED, events)
                return
            if not stream_id & 1:
                self._fail(PROTOCOL_ERROR, f"an even stream id {stream_id} from a client")
            self.highest_inbound_stream_id = stream_id
            if refused:
                self._stream_error(stream_id, refused, events)
                return
            if len(self.streams) >= STREAMS_BACKSTOP:
                self._fail(PROTOCOL_ERROR, "too many streams open at once")
            stream = self.streams[stream_id] = _Stream(self.remote_initial_window)
            stream.trailers_owed = not ended
            events.append(RequestReceived(stream_id, fields, ended))
            if ended:
                self._remote_ended(stream_id, stream, events)
            return
        if stream.state == _HALF_CLOSED_REMOTE or not stream.trailers_owed:
            self._stream_error(stream_id, STREAM_CLOSED, events)
            return
        if not ended:  # (trailers end the stream: RFC 9113 §8.1)
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        stream.trailers_owed = False
        events.append(TrailersReceived(stream_id, fields))
        self._remote_ended(stream_id, stream, events)

    def _remote_ended(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        events.append(StreamEnded(stream_id))
        if stream.state == _HALF_CLOSED_LOCAL:
            self._forget(stream_id)
        else:
            stream.state = _HALF_CLOSED_REMOTE

    def _data_in(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._receive_window -= length
        if self._receive_window < 0:
            self._fail(FLOW_CONTROL_ERROR, "DATA past the connection's window")
        self._conn_unacked += length  # (credited back after the read: _credit_connection)
        data = self._unpadded(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.state == _HALF_CLOSED_REMOTE:
            if stream_id > self.highest_inbound_stream_id:
                self._fail(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            if stream is not None or stream_id not in self._reset:
                self._stream_error(stream_id, STREAM_CLOSED, events)
            return
        stream.receive_window -= length
        if stream.receive_window < 0:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return
        ended = bool(flags & END_STREAM)
        if ended:
            stream.trailers_owed = False
        events.append(DataReceived(stream_id, data, length, ended))
        if ended:
            self._remote_ended(stream_id, stream, events)

    def _window_update_in(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "a WINDOW_UPDATE not 4 bytes")
        delta = WORD.unpack_from(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not delta:
                self._fail(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += delta
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "the connection's window past 2^31-1")
            events.append(WindowUpdated(0, delta))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_inbound_stream_id:
                self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # (a closed stream's: allowed a while, and nothing to do)
        if not delta:
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        stream.send_window += delta
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id, delta))

    def _rst_in(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "an RST_STREAM not 4 bytes")
        if stream_id > self.highest_inbound_stream_id:
            self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        if self.streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, WORD.unpack_from(payload)[0]))

    def _settings_in(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            if not self.local_settings_acked:
                self.local_settings_acked = True
                self.decoder.max_header_list_size = self.header_list_bound
            return
        if len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR, "a SETTINGS frame not whole settings")
        opened = 0  # what a larger SETTINGS_INITIAL_WINDOW_SIZE gave every stream
        for offset in range(0, len(payload), 6):
            setting, value = SETTING.unpack_from(payload, offset)
            if setting == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE past 2^31-1")
                delta = value - self.remote_initial_window
                self.remote_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        self._fail(FLOW_CONTROL_ERROR, "a stream's window past 2^31-1")
                opened += delta
            elif setting == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    self._fail(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.max_outbound_frame_size = value
            elif setting == ENABLE_PUSH:
                if value > 1:
                    self._fail(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            elif setting == HEADER_TABLE_SIZE:
                self.encoder.table_size_changed()
        self._out.append(frame(SETTINGS, ACK, 0))
        events.append(SettingsReceived())
        if opened > 0 and self.streams:  # (held responses may go on: as a WINDOW_UPDATE)
            events.append(WindowUpdated(0, opened))

    def _goaway_in(self, payload: bytes, events: list[Event]) -> None:
        last, code = TWO_WORDS.unpack_from(payload)
        events.append(ConnectionTerminated(code, last & 0x7FFFFFFF))

    def _unpadded(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            self._fail(PROTOCOL_ERROR, "padding as long as the frame")
        return payload[1 : len(payload) - payload[0]]

    def _fail(self, code: int, reason: str) -> NoReturn:
        """A connection error: GOAWAY naming the last stream seen, then H2ConnectionError."""
        self.goaway(code, self.highest_inbound_stream_id)
        self._closed = True
        raise H2ConnectionError(code, reason)

    def _stream_error(self, stream_id: int, code: int, events: list[Event]) -> None:
        """RST_STREAM with `code` (RFC 9113 §5.4.2), told to the flow: the stream is over."""
        self.reset_stream(stream_id, code)
        events.append(ResetSent(stream_id, code))

    def close_connection(self, error_code: int, last_stream_id: int) -> None:
        """GOAWAY for an error of ours to name: nothing more is read but a GOAWAY."""
        self.goaway(error_code, last_stream_id)
        self._closed = True

    def close_reading(self) -> None:
        """The connection is closing: from now on only a client's GOAWAY is read."""
        self._closed = True
