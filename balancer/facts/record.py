"""The records: a client connection, a backend connection, a request; what happened on the
wire, filled in by the legs, the session and the pool; rendered by observe/loglines.py and
counted by observe/metrics.py.

Pure data. Timestamps are `*_at` values of the monotonic clock the proxy was given (seconds);
durations are derived `*_seconds` properties, None when either end is unknown. Each field is a
claim a packet capture of the same traffic could check; README.md says how each is measured.
"""

from __future__ import annotations

import datetime
from typing import Any, Final, Protocol

# Who sent something first on a leg.
PEER: Final = "peer"
BALANCER: Final = "balancer"


class Attempted(Protocol):
    """A record that lists the backends that failed it (a connection's, or a request's)."""

    failed_backends: list[str] | None


def failed_on(record: Attempted, backend: str) -> None:
    """`backend` failed the record's connection or request: a connect refused or timed out,
    or a connection that ended (or, retry_on response-timeout, stayed silent) before any byte
    of the response (another backend was tried then, if retry_on allowed it). A name for
    each failure, in order; None (shown as []) until the first, so a request that never
    failed allocates nothing."""
    if record.failed_backends is None:
        record.failed_backends = [backend]
    else:
        record.failed_backends.append(backend)


class LegTeardown:
    """How one leg (client or backend) ended.

    initiator: who started the close (PEER, or BALANCER); `close_cause` says why the balancer did.
    first_fin: whose FIN came first, from the kernel: TCP_INFO read as we send our FIN
      (CLOSE_WAIT: theirs was in), or when their FIN is read if ours waited behind unsent bytes;
      None when a reset ended the leg first. Can differ from `initiator` (we decide to close,
      but the peer's FIN was already in flight).
    rst_received / rst_sent: an RST ended the leg (a reset error from the peer; an abort by us).
    close_notify_received / close_notify_sent: TLS alerts, client leg on a TLS listener only.
    fin_sent / fin_sent_at: the balancer sent its FIN (shutdown); when it left (unknown when it
      waited behind unsent bytes).
    peer_fin_at / closed_at: when the peer's FIN was read; when the leg was fully closed.
    retransmits: segments the kernel retransmitted on this leg (tcpi_total_retrans as it
      closed).
    bytes_in / bytes_out: payload bytes at the socket (TLS records included). Counted as read
      and written while the leg is open; when it closes, replaced by what the kernel says
      arrived and what the peer acknowledged (tcpi_bytes_received, tcpi_bytes_acked), so a
      reset leg does not claim the bytes that sat in its send buffer.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "close_notify_received",
        "close_notify_sent",
        "closed_at",
        "fin_sent",
        "fin_sent_at",
        "first_fin",
        "initiator",
        "peer_fin_at",
        "retransmits",
        "rst_received",
        "rst_sent",
    )

    def __init__(self) -> None:
        self.initiator: str | None = None
        self.first_fin: str | None = None
        self.rst_received = False
        self.rst_sent = False
        self.close_notify_received: bool | None = None
        self.close_notify_sent: bool | None = None
        self.fin_sent = False
        self.fin_sent_at: float | None = None
        self.peer_fin_at: float | None = None
        self.closed_at: float | None = None
        self.retransmits: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def kind(self) -> str:
        """The Prometheus `kind` of the close: rst, close_notify or fin."""
        if self.rst_received or self.rst_sent:
            return "rst"
        if self.close_notify_received or self.close_notify_sent:
            return "close_notify"
        return "fin"

    def to_dict(self) -> dict[str, Any]:
        return {
            "initiator": self.initiator,
            "first_fin": self.first_fin,
            "kind": self.kind,
            "rst_received": self.rst_received,
            "rst_sent": self.rst_sent,
            "close_notify_received": self.close_notify_received,
            "close_notify_sent": self.close_notify_sent,
            "retransmits": self.retransmits,
        }


class H2Facts:
    """An HTTP/2 connection's own facts (ConnectionRecord.h2; None on HTTP/1.x): its streams,
    the most it had open at once, the last GOAWAY each side sent (error code, the last stream
    it named) and who sent the first, and RST_STREAM frames each way by error code. Error
    codes are RFC 9113's names in lower case (`no_error`, `enhance_your_calm`, ...)."""

    __slots__ = (
        "goaway_first",
        "goaway_received",
        "goaway_sent",
        "max_concurrent_streams",
        "rst_received",
        "rst_sent",
        "streams",
    )

    def __init__(self) -> None:
        self.streams = 0
        self.max_concurrent_streams = 0
        self.goaway_sent: tuple[str, int] | None = None  # (error code, last stream id)
        self.goaway_received: tuple[str, int] | None = None
        self.goaway_first: str | None = None  # BALANCER or PEER
        self.rst_sent: dict[str, int] = {}  # by error code
        self.rst_received: dict[str, int] = {}

    def said_goaway(self, by: str, error: str, last_stream: int) -> None:
        """A GOAWAY, sent (`by` BALANCER) or received (PEER). A side may send more than one
        (a graceful close's first names the highest stream id, its last the real one): the
        last one each side sent is kept, and who sent the first."""
        if by == BALANCER:
            self.goaway_sent = (error, last_stream)
        else:
            self.goaway_received = (error, last_stream)
        self.goaway_first = self.goaway_first or by

    def to_dict(self) -> dict[str, Any]:
        sent, received = self.goaway_sent, self.goaway_received
        return {
            "streams": self.streams,
            "max_concurrent_streams": self.max_concurrent_streams,
            "goaway_sent": None if sent is None else {"error": sent[0], "last_stream": sent[1]},
            "goaway_received": None
            if received is None
            else {"error": received[0], "last_stream": received[1]},
            "goaway_first": self.goaway_first,
            "rst_stream_sent": self.rst_sent,
            "rst_stream_received": self.rst_received,
        }


class ConnectionRecord:
    """Everything the balancer knows about one client connection, from accept to close."""

    __slots__ = (
        "accepted_at",
        "accepted_unix",
        "backend",
        "backend_address",
        "backend_connection",
        "backend_group",
        "client_ip",
        "client_leg",
        "client_port",
        "close_cause",
        "closed_at",
        "connect_attempts",
        "connect_failures",
        "error_status",
        "failed_backends",
        "first_request_at",
        "h2",
        "id",
        "listener",
        "local_port",
        "proxied_by",
        "requests",
        "retries",
        "tcp_handshake_rtt_seconds",
        "tls_alpn",
        "tls_cipher",
        "tls_failure",
        "tls_finished_at",
        "tls_resumed",
        "tls_sni",
        "tls_started_at",
        "tls_version",
        "worker_pid",
    )

    def __init__(self, id: int, listener: str, accepted_at: float, accepted_unix: float) -> None:
        self.id = id
        self.worker_pid = 0
        self.listener = listener
        self.accepted_at = accepted_at
        self.accepted_unix = accepted_unix
        self.client_ip = ""  # the client's: the TCP peer's, or as a PROXY header named it
        self.client_port = 0
        self.proxied_by: str | None = None  # "ip:port": the TCP peer that sent a PROXY header
        self.local_port = 0
        # TCP, client leg: SYN-ACK → ACK round trip (tcpi_rtt right after accept).
        self.tcp_handshake_rtt_seconds: float | None = None
        # TLS: started = the ClientHello's first bytes arrived; finished = handshake complete.
        self.tls_started_at: float | None = None
        self.tls_finished_at: float | None = None
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.tls_sni: str | None = None
        self.tls_alpn: str | None = None
        self.h2: H2Facts | None = None  # ALPN h2: the HTTP/2 facts
        self.tls_resumed: bool | None = None
        self.tls_failure: str | None = None
        # HTTP.
        self.first_request_at: float | None = None
        self.requests = 0
        self.error_status: int | None = None
        # Backend: the last one tried, the attempts, and the connection that served.
        self.backend: str | None = None
        self.backend_address: str | None = None
        self.backend_group: str | None = None
        self.connect_attempts = 0
        self.connect_failures = 0
        # Requests sent again after a backend connection ended before any byte of the
        # response (each dead connection has its own backend_connection line).
        self.retries = 0
        self.failed_backends: list[str] | None = None  # see failed_on
        self.backend_connection: BackendConnectionRecord | None = None
        # Teardown.
        self.close_cause: str | None = None
        self.closed_at: float | None = None
        self.client_leg = LegTeardown()

    def ended_by(self, cause: str) -> None:
        """Name why it ended. The one writer of `close_cause`: the first decision stands
        (a later event, such as the FIN that answers our close, is a consequence)."""
        if self.close_cause is None:
            self.close_cause = cause

    # The backend connection's facts, as this record shows them (an empty leg: never connected).
    @property
    def backend_leg(self) -> LegTeardown:
        return LegTeardown() if self.backend_connection is None else self.backend_connection.leg

    @property
    def connected_at(self) -> float | None:
        return None if self.backend_connection is None else self.backend_connection.connected_at

    @property
    def backend_local_port(self) -> int | None:
        return None if self.backend_connection is None else self.backend_connection.local_port

    @property
    def backend_tcp_handshake_rtt_seconds(self) -> float | None:
        return (
            None
            if self.backend_connection is None
            else self.backend_connection.tcp_handshake_rtt_seconds
        )

    @property
    def connect_wait_seconds(self) -> float | None:
        return (
            None
            if self.backend_connection is None
            else self.backend_connection.connect_wait_seconds
        )

    # Bytes at the sockets, per leg (see LegTeardown.bytes_in).
    @property
    def client_bytes_in(self) -> int:
        return self.client_leg.bytes_in

    @property
    def client_bytes_out(self) -> int:
        return self.client_leg.bytes_out

    @property
    def backend_bytes_in(self) -> int:
        return self.backend_leg.bytes_in

    @property
    def backend_bytes_out(self) -> int:
        return self.backend_leg.bytes_out

    @staticmethod
    def _span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    @property
    def tls_handshake_seconds(self) -> float | None:
        return self._span(self.tls_started_at, self.tls_finished_at)

    @property
    def first_request_seconds(self) -> float | None:
        """Accept → first request head complete (includes the TLS handshake)."""
        return self._span(self.accepted_at, self.first_request_at)

    @property
    def lifetime_seconds(self) -> float | None:
        return self._span(self.accepted_at, self.closed_at)

    @property
    def client_teardown_seconds(self) -> float | None:
        """The client leg's first FIN (either side's) → the other side's FIN."""
        return teardown_seconds(self.client_leg)

    @property
    def backend_teardown_seconds(self) -> float | None:
        return teardown_seconds(self.backend_leg)

    def to_dict(self) -> dict[str, Any]:
        """The JSON access-log line and the admin API's view: wall-clock start, durations."""
        return {
            "type": "connection",
            "id": self.id,
            "worker_pid": self.worker_pid,
            "listener": self.listener,
            "start": self.accepted_unix,
            "time": rfc3339(self.accepted_unix),
            "client": {
                "ip": self.client_ip,
                "port": self.client_port,
                "proxied_by": self.proxied_by,
            },
            "local_port": self.local_port,
            "tcp_handshake_rtt_seconds": self.tcp_handshake_rtt_seconds,
            "tls": None
            if self.tls_started_at is None and self.tls_sni is None  # SNI alone: passed through
            else {
                "handshake_seconds": self.tls_handshake_seconds,
                "version": self.tls_version,
                "cipher": self.tls_cipher,
                "sni": self.tls_sni,
                "alpn": self.tls_alpn,
                "resumed": self.tls_resumed,
                "failure": self.tls_failure,
            },
            "h2": None if self.h2 is None else self.h2.to_dict(),
            "backend": None
            if self.backend is None
            else {
                "name": self.backend,
                "group": self.backend_group,
                "address": self.backend_address,
                "local_port": self.backend_local_port,
                "connect_wait_seconds": self.connect_wait_seconds,
                "tcp_handshake_rtt_seconds": self.backend_tcp_handshake_rtt_seconds,
            },
            "connect_attempts": self.connect_attempts,
            "connect_failures": self.connect_failures,
            "retries": self.retries,
            "failed_backends": self.failed_backends or [],
            "requests": self.requests,
            "first_request_seconds": self.first_request_seconds,
            "error_status": self.error_status,
            "bytes": {
                "client_in": self.client_bytes_in,
                "client_out": self.client_bytes_out,
                "backend_in": self.backend_bytes_in,
                "backend_out": self.backend_bytes_out,
            },
            "close_cause": self.close_cause,
            "client_leg": self.client_leg.to_dict()
            | {"teardown_seconds": self.client_teardown_seconds},
            "backend_leg": None
            if self.backend is None
            else self.backend_leg.to_dict() | {"teardown_seconds": self.backend_teardown_seconds},
            "lifetime_seconds": self.lifetime_seconds,
        }


class BackendConnectionRecord:
    """One backend TCP connection, from connect() to close.

    connect_started_at → connected_at is `connect_wait_seconds`: connect() until the event loop
    saw the connection established. It includes the loop's own delay (under load, a hundred
    times the wire's), so the wire's SYN → SYN-ACK is `tcp_handshake_rtt_seconds` (tcpi_rtt
    read right after connect: the active side's first RTT sample).
    """

    __slots__ = (
        "address",
        "backend",
        "close_cause",
        "closed_at",
        "connect_started_at",
        "connected_at",
        "id",
        "idle_seconds",
        "leg",
        "local_port",
        "requests",
        "tcp_handshake_rtt_seconds",
        "worker_pid",
    )

    def __init__(self, backend: str, address: str, connect_started_at: float, id: int = 0) -> None:
        self.id = id  # per worker; requests name it
        self.worker_pid = 0
        self.backend = backend
        self.address = address
        self.connect_started_at = connect_started_at
        self.connected_at: float | None = None
        self.local_port: int | None = None
        self.tcp_handshake_rtt_seconds: float | None = None
        self.requests = 0  # requests it carried
        self.idle_seconds = 0.0  # time spent idle in the pool between requests
        self.close_cause: str | None = None  # reuse modes: why the pool or a session closed it
        self.closed_at: float | None = None
        self.leg = LegTeardown()

    def ended_by(self, cause: str) -> None:
        """Name why it ended. The one writer of `close_cause`: the first decision stands
        (a later event, such as the FIN that answers our close, is a consequence)."""
        if self.close_cause is None:
            self.close_cause = cause

    @property
    def lifetime_seconds(self) -> float | None:
        return None if self.closed_at is None else self.closed_at - self.connect_started_at

    @property
    def connect_wait_seconds(self) -> float | None:
        if self.connected_at is None:
            return None
        return self.connected_at - self.connect_started_at


class RequestRecord:
    """One request and its response: what a user asks for when a request is slow.

    Timings from the head's arrival (complete) on the client leg: `forwarded` (handed to a
    backend connection), `first_byte` (the first response byte read), `done` (the response's
    last byte relayed). None where a step never happened.
    """

    __slots__ = (
        "backend",
        "backend_address",
        "backend_connection_id",
        "backend_group",
        "connect_attempts",
        "connect_failures",
        "connect_wait_seconds",
        "connection",
        "done_at",
        "failed_backends",
        "first_byte_at",
        "forwarded_at",
        "head_at",
        "host",
        "id",
        "method",
        "request_body_bytes",
        "response_bytes",
        "retries",
        "reused",
        "status",
        "stream_id",
        "target",
    )

    def __init__(
        self, id: int, connection: ConnectionRecord, method: bytes, target: bytes, head_at: float
    ) -> None:
        self.id = id
        self.connection = connection  # its id, worker, listener and clock offset
        self.method = method  # as the client sent them (empty: a request refused unread)
        self.target = target
        self.host: bytes | None = None  # the Host header's value, or the target's authority
        self.head_at = head_at
        self.status: int | None = None  # the response's, or the balancer's own error status
        self.stream_id: int | None = None  # HTTP/2: the request's stream (HTTP/1.x: None)
        # Bytes: the request's body as read (chunked framing not counted), and the response
        # as relayed to the client, head included (the balancer's own, if it answered; None:
        # no response was completed).
        self.request_body_bytes = 0
        self.response_bytes: int | None = None
        self.backend: str | None = None
        self.backend_address: str | None = None
        self.backend_group: str | None = None
        self.connect_attempts = 0  # reuse modes: connects made for this request
        self.connect_failures = 0
        # Its backend connection's connect wait, if that connection was made for it; None on
        # a reused connection (no connect happened for this request).
        self.connect_wait_seconds: float | None = None
        self.backend_connection_id: int | None = None
        self.reused: bool | None = None  # on a connection that carried a request before
        self.retries = 0
        self.failed_backends: list[str] | None = None  # see failed_on
        self.forwarded_at: float | None = None
        self.first_byte_at: float | None = None
        self.done_at: float | None = None

    @property
    def head_unix(self) -> float:
        connection = self.connection
        return connection.accepted_unix + (self.head_at - connection.accepted_at)

    @property
    def target_shown(self) -> str:
        """The target as text, cut at TARGET_SHOWN_CHARS ("..." marks the cut)."""
        target = self.target.decode("latin-1")
        if len(target) > TARGET_SHOWN_CHARS:
            target = target[: TARGET_SHOWN_CHARS - 3] + "..."
        return target

    def _since_head(self, at: float | None) -> float | None:
        return None if at is None else at - self.head_at

    @property
    def forward_seconds(self) -> float | None:
        return self._since_head(self.forwarded_at)

    @property
    def first_byte_seconds(self) -> float | None:
        return self._since_head(self.first_byte_at)

    @property
    def total_seconds(self) -> float | None:
        return self._since_head(self.done_at)


TARGET_SHOWN_CHARS: Final = 200  # request targets in records are cut here ("..." marks the cut)


def teardown_seconds(leg: LegTeardown) -> float | None:
    """First FIN → second FIN on the leg; None unless both were seen (an RST ended it, say)."""
    if leg.peer_fin_at is None or leg.fin_sent_at is None:
        return None
    return abs(leg.peer_fin_at - leg.fin_sent_at)


# The last second formatted, and its text.
_second_shown: Final[list[tuple[int, str]]] = [(-1, "")]


def rfc3339(unix: float) -> str:
    """`2026-11-30T08:57:02.123456Z` (UTC, microseconds): a time to read beside other logs.

    Records close in bursts within a second; the date and time of day are formatted once a
    second (strftime costs a few µs), the microseconds each time."""
    second = int(unix)
    cached_second, text = _second_shown[0]
    if second != cached_second:
        text = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_shown[0] = (second, text)
    return f"{text}.{str(int((unix - second) * 1e6)).zfill(6)}Z"  # (no format spec: see loglines)
