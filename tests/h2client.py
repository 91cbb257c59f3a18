"""A blocking HTTP/2 client over TLS (python-hyper's h2), frame by frame, for the h2 tests:
what curl hides (stream resets, GOAWAY and its error code, windows) is asserted here. Run it
in a thread; every read is bounded by the socket's timeout."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError


class _ReadsOnAfterGoAway(H2Connection):
    """h2 closes its state machine at the first GOAWAY it receives and takes no frame after
    it; a server's graceful close sends two, with a PING between (RFC 9113 §6.8), and
    answers the streams under way: this client keeps reading (and answering PINGs)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        events = super()._receive_goaway_frame(frame)
        self.state_machine.state = ConnectionState.CLIENT_OPEN
        return events


@dataclass
class Answer:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    ended_with_headers: bool = False  # END_STREAM on the HEADERS frame (no DATA frame)
    reset: int | None = None  # the RST_STREAM error code, if the server reset it


@dataclass
class GoAway:
    error_code: int
    last_stream_id: int


class H2Client:
    def __init__(self, port: int, ca: str, timeout: float = 5.0, keylog: str | None = None) -> None:
        context = ssl.create_default_context(cafile=ca)
        context.set_alpn_protocols(["h2"])
        if keylog is not None:  # (the TLS secrets, for a capture to be decrypted with)
            context.keylog_filename = keylog
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.alpn = self.sock.selected_alpn_protocol()
        self.conn = _ReadsOnAfterGoAway(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.goaway: GoAway | None = None  # the first
        self.goaways: list[GoAway] = []  # all of them, in order
        self.closed = False
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def request(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        length: bool = True,
        trailers: list[tuple[str, str]] | None = None,
    ) -> int:
        """Open a stream; the body (if any) is sent as far as the windows allow now, the rest
        by `send_rest`, then `trailers` (if any) end it. `length`: say content-length."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "https"),
                  (":authority", "localhost")]  # fmt: skip
        if body is not None and length:
            fields.append(("content-length", str(len(body))))
        fields += headers or []
        encoded = [(k.encode(), v.encode()) for k, v in fields]
        self.conn.send_headers(stream_id, encoded, end_stream=body is None)
        self.answers[stream_id] = Answer()
        if body is not None:
            if trailers:
                self._trailers[stream_id] = [(k.encode(), v.encode()) for k, v in trailers]
            self._bodies[stream_id] = memoryview(body)
            self.send_rest()
        self.flush()
        return stream_id

    @property
    def _bodies(self) -> dict[int, memoryview]:
        if not hasattr(self, "_pending_bodies"):
            self._pending_bodies: dict[int, memoryview] = {}
        return self._pending_bodies

    @property
    def _trailers(self) -> dict[int, list[tuple[bytes, bytes]]]:
        if not hasattr(self, "_pending_trailers"):
            self._pending_trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        return self._pending_trailers

    def send_rest(self) -> None:
        for stream_id, rest in list(self._bodies.items()):
            while rest:
                room = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                )
                if room <= 0:
                    break
                self.conn.send_data(stream_id, bytes(rest[:room]))
                rest = rest[room:]
            self._bodies[stream_id] = rest
            if not rest:
                del self._bodies[stream_id]
                trailers = self._trailers.pop(stream_id, None)
                if trailers:
                    self.conn.send_headers(stream_id, trailers, end_stream=True)
                else:
                    self.conn.end_stream(stream_id)
        self.flush()

    def reset(self, stream_id: int, code: int = 8) -> None:
        self.conn.reset_stream(stream_id, code)
        self.flush()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, done: object) -> None:
        """Read and act on frames until `done()` is true or the server closes."""
        assert callable(done)
        while not done():
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                return
            try:
                events = self.conn.receive_data(data)
            except ProtocolError:  # (h2 takes no frame after a GOAWAY: the rest is unread)
                if self.goaway is None:
                    raise
                self.closed = True
                return
            for event in events:
                self._event(event)
            self.send_rest()
            self.flush()

    def _event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            answer = self.answers[event.stream_id]
            headers = dict(event.headers)
            answer.status = int(headers.pop(b":status"))
            answer.headers = headers
            answer.ended_with_headers = event.stream_ended is not None
        elif isinstance(event, DataReceived):
            self.answers[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            self.answers[event.stream_id].trailers = dict(event.headers)
        elif isinstance(event, StreamEnded):
            self.answers[event.stream_id].ended = True
        elif isinstance(event, StreamReset):
            self.answers[event.stream_id].reset = int(event.error_code)
        elif isinstance(event, ConnectionTerminated):
            said = GoAway(int(event.error_code), int(event.last_stream_id or 0))
            self.goaway = self.goaway or said
            self.goaways.append(said)

    def all_done(self) -> bool:
        return all(a.ended or a.reset is not None for a in self.answers.values())

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
            self.sock.close()
        except OSError:
            pass
