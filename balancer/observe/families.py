"""Every metric family the connection path counts into: its name, help and labels (and a
histogram's buckets), in one place. observe/metrics.py counts into them and turns the counts
into Prometheus families at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# From loopback (tens of µs) to a slow WAN (seconds).
HANDSHAKE_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DURATION_BUCKETS: Final = (
    0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip


@dataclass(frozen=True, eq=False)  # a singleton per metric: hashed by identity, cheaply
class Family:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None  # a histogram when set


CLOSED: Final = Family(
    "balancer_connections_closed", "Client connections closed, by why they closed.",
    ("listener", "cause"),
)  # fmt: skip
TCP_RTT: Final = Family(
    "balancer_tcp_handshake_rtt_seconds",
    "Client leg: SYN-ACK to ACK of the three-way handshake (TCP_INFO rtt after accept).",
    ("listener",), HANDSHAKE_BUCKETS,
)  # fmt: skip
TLS_HANDSHAKE: Final = Family(
    "balancer_tls_handshake_seconds",
    "ClientHello's arrival to handshake complete, for handshakes that completed.",
    ("listener", "version", "cipher"), HANDSHAKE_BUCKETS,
)  # fmt: skip
TLS_FAILURES: Final = Family(
    "balancer_tls_handshake_failures", "TLS handshakes that failed, by reason.",
    ("listener", "reason"),
)  # fmt: skip
TLS_RESUMED: Final = Family(
    "balancer_tls_resumptions", "TLS handshakes that resumed an earlier session.",
    ("listener", "version"),
)  # fmt: skip
CONNECT_WAIT: Final = Family(
    "balancer_backend_connect_wait_seconds",
    "Backend leg: connect() until the event loop saw the connection established (the wire's "
    "SYN to SYN-ACK plus the loop's delay; the wire's alone is the handshake RTT).",
    ("backend",), HANDSHAKE_BUCKETS,
)  # fmt: skip
BACKEND_RTT: Final = Family(
    "balancer_backend_tcp_handshake_rtt_seconds",
    "Backend leg: SYN to SYN-ACK of the three-way handshake (TCP_INFO rtt after connect).",
    ("backend",), HANDSHAKE_BUCKETS,
)  # fmt: skip
DURATION: Final = Family("balancer_connection_duration_seconds",
                   "Client connection lifetime, accept to close.", ("listener",),
                   DURATION_BUCKETS)  # fmt: skip
CLOSES: Final = Family(
    "balancer_closes",
    "Leg closes by leg (client, backend), who started it (peer, balancer) and kind "
    "(fin, rst, close_notify).",
    ("listener", "leg", "initiator", "kind"),
)  # fmt: skip
TEARDOWN: Final = Family(
    "balancer_teardown_seconds",
    "A leg's first FIN to its second (either side first); legs ended by RST excluded.",
    ("leg",), HANDSHAKE_BUCKETS,
)  # fmt: skip
BYTES: Final = Family(
    "balancer_bytes", "Bytes at the sockets, by leg and direction (in = received).",
    ("listener", "leg", "direction"),
)  # fmt: skip
REQUESTS: Final = Family("balancer_requests", "HTTP requests forwarded.", ("listener", "backend"))
ERROR_RESPONSES: Final = Family(
    "balancer_error_responses",
    "Responses the balancer wrote itself (400, 408, 431, 502, 503, 504, ...).",
    ("listener", "status"),
)  # fmt: skip
RESPONSES: Final = Family(
    "balancer_responses",
    "Responses relayed to clients, by backend and status class (1xx..5xx); the balancer's own "
    "error responses are balancer_error_responses_total.",
    ("listener", "backend", "class"),
)  # fmt: skip
REQUEST_DURATION: Final = Family(
    "balancer_request_duration_seconds",
    "A request head's arrival to its response's last byte relayed.",
    ("listener", "backend"), DURATION_BUCKETS,
)  # fmt: skip
BACKEND_CONNECTIONS_CLOSED: Final = Family(
    "balancer_backend_connections_closed",
    "Backend connections closed (reuse modes), by backend and why.",
    ("backend", "cause"),
)  # fmt: skip
CLIENT_REQUESTS: Final = Family(
    "balancer_client_requests",
    "Requests received from clients, by protocol (http/1.1, h2: a stream each).",
    ("listener", "protocol"),
)  # fmt: skip
H2_GOAWAY: Final = Family(
    "balancer_h2_goaway",
    "HTTP/2 GOAWAY frames, by direction (sent, received) and error code.",
    ("listener", "direction", "error"),
)  # fmt: skip
H2_RST_STREAM: Final = Family(
    "balancer_h2_rst_stream",
    "HTTP/2 RST_STREAM frames, by direction (sent, received) and error code.",
    ("listener", "direction", "error"),
)  # fmt: skip
H2_CONCURRENT_STREAMS: Final = Family(
    "balancer_h2_max_concurrent_streams",
    "HTTP/2 connections by the most streams they had open at once.",
    ("listener",), (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0),
)  # fmt: skip
FAMILIES: Final = (
    CLOSED, TCP_RTT, TLS_HANDSHAKE, TLS_FAILURES, TLS_RESUMED, CONNECT_WAIT, BACKEND_RTT,
    DURATION, CLOSES, RESPONSES, REQUEST_DURATION, BACKEND_CONNECTIONS_CLOSED,
    TEARDOWN, BYTES, REQUESTS, ERROR_RESPONSES, CLIENT_REQUESTS, H2_GOAWAY, H2_RST_STREAM,
    H2_CONCURRENT_STREAMS,
)  # fmt: skip
