"""Records become metrics and log lines here, and only here.

`Observer.publish(record)` is called once per closed connection. It knows every metric name and
the access-log format; nothing else does. Gauges that describe the present (open connections,
per-backend activity) are read at scrape time by `StateCollector`, so they cost the connection
path nothing.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from balancer.backends import BackendState
from balancer.record import ConnectionRecord

# From loopback (tens of µs) to a slow WAN (seconds).
HANDSHAKE_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DURATION_BUCKETS = (
    0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip


class Observer:
    """Turns each closed connection's record into metric updates and one JSON log line."""

    def __init__(
        self,
        registry: CollectorRegistry,
        access_log: IO[str] | None = None,
        recent: int = 200,
    ) -> None:
        self.access_log = access_log
        self.recent: deque[ConnectionRecord] = deque(maxlen=recent)
        self.closed_total = 0
        r = registry
        self.closed = Counter(
            "balancer_connections_closed", "Client connections closed, by why they closed.",
            ["listener", "cause"], registry=r,
        )  # fmt: skip
        self.tcp_rtt = Histogram(
            "balancer_tcp_handshake_rtt_seconds",
            "Client leg: SYN-ACK to ACK of the three-way handshake (TCP_INFO rtt after accept).",
            ["listener"], buckets=HANDSHAKE_BUCKETS, registry=r,
        )  # fmt: skip
        self.tls_handshake = Histogram(
            "balancer_tls_handshake_seconds",
            "ClientHello's arrival to handshake complete, for handshakes that completed.",
            ["listener", "version", "cipher"], buckets=HANDSHAKE_BUCKETS, registry=r,
        )  # fmt: skip
        self.tls_failures = Counter(
            "balancer_tls_handshake_failures", "TLS handshakes that failed, by reason.",
            ["listener", "reason"], registry=r,
        )  # fmt: skip
        self.tls_resumed = Counter(
            "balancer_tls_resumptions", "TLS handshakes that resumed an earlier session.",
            ["listener", "version"], registry=r,
        )  # fmt: skip
        self.connect = Histogram(
            "balancer_backend_connect_seconds",
            "Backend leg: connect() to established (SYN to SYN-ACK, as the balancer saw it).",
            ["backend"], buckets=HANDSHAKE_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "balancer_connection_duration_seconds", "Client connection lifetime, accept to close.",
            ["listener"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.closes = Counter(
            "balancer_closes",
            "Leg closes by leg (client, backend), who started it (peer, balancer) and kind "
            "(fin, rst, close_notify).",
            ["listener", "leg", "initiator", "kind"], registry=r,
        )  # fmt: skip
        self.teardown = Histogram(
            "balancer_teardown_seconds",
            "A leg's first FIN to its second (either side first); legs ended by RST excluded.",
            ["leg"], buckets=HANDSHAKE_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "balancer_bytes", "Bytes at the sockets, by leg and direction (in = received).",
            ["listener", "leg", "direction"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "balancer_requests", "HTTP requests forwarded.", ["listener", "backend"], registry=r
        )
        self.error_responses = Counter(
            "balancer_error_responses",
            "Responses the balancer wrote itself (400, 408, 431, 502, 503, 504, ...).",
            ["listener", "status"], registry=r,
        )  # fmt: skip
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """Cached labelled child: the per-connection path skips prometheus' label lookup."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def publish(self, record: ConnectionRecord) -> None:
        self.closed_total += 1
        self.recent.append(record)
        c = self._child
        listener = record.listener
        c(self.closed, listener, record.close_cause or "unknown").inc()
        if record.tcp_handshake_rtt_seconds is not None:
            c(self.tcp_rtt, listener).observe(record.tcp_handshake_rtt_seconds)
        if record.tls_failure is not None:
            c(self.tls_failures, listener, record.tls_failure).inc()
        elif record.tls_finished_at is not None:
            version = record.tls_version or ""
            handshake = record.tls_handshake_seconds
            assert handshake is not None
            c(self.tls_handshake, listener, version, record.tls_cipher or "").observe(handshake)
            if record.tls_resumed:
                c(self.tls_resumed, listener, version).inc()
        if record.connected_at is not None and record.backend is not None:
            connect = record.connect_seconds
            assert connect is not None
            c(self.connect, record.backend).observe(connect)
        if record.requests:
            c(self.requests, listener, record.backend or "").inc(record.requests)
        if record.error_status is not None:
            c(self.error_responses, listener, str(record.error_status)).inc()
        lifetime = record.lifetime_seconds
        if lifetime is not None:
            c(self.duration, listener).observe(lifetime)
        legs = [("client", record.client_leg, record.client_teardown_seconds)]
        if record.connected_at is not None:
            legs.append(("backend", record.backend_leg, record.backend_teardown_seconds))
        for leg_name, leg, teardown in legs:
            c(self.closes, listener, leg_name, leg.initiator or "unknown", leg.kind).inc()
            if teardown is not None:
                c(self.teardown, leg_name).observe(teardown)
        c(self.bytes, listener, "client", "in").inc(record.client_bytes_in)
        c(self.bytes, listener, "client", "out").inc(record.client_bytes_out)
        if record.backend_bytes_out or record.backend_bytes_in:
            c(self.bytes, listener, "backend", "in").inc(record.backend_bytes_in)
            c(self.bytes, listener, "backend", "out").inc(record.backend_bytes_out)
        if self.access_log is not None:
            self.access_log.write(json.dumps(record.to_dict(), separators=(",", ":")) + "\n")


class ListenerTotals(NamedTuple):
    name: str
    accepted: int
    rejected: int
    open_now: int
    accept_errors: int  # asyncio loop only: under uvloop, libuv handles them unseen


class StateCollector(Collector):
    """Gauges and totals read from live state at scrape time (zero cost per connection)."""

    def __init__(
        self,
        listeners: Callable[[], Iterable[ListenerTotals]],
        backends: Callable[[], Iterable[BackendState]],
    ) -> None:
        self._listeners = listeners
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        accepted = CounterMetricFamily(
            "balancer_connections_accepted", "Client connections accepted.", labels=["listener"]
        )
        rejected = CounterMetricFamily(
            "balancer_connections_rejected",
            "Client connections closed at once because limits.max_connections was reached.",
            labels=["listener"],
        )
        active = GaugeMetricFamily(
            "balancer_connections_active", "Client connections open now.", labels=["listener"]
        )
        accept_errors = CounterMetricFamily(
            "balancer_accept_errors",
            "accept() failures for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, "
            "ENOMEM); accepting pauses after each. Counted under the asyncio event loop only.",
            labels=["listener"],
        )
        for totals in self._listeners():
            accepted.add_metric([totals.name], totals.accepted)
            rejected.add_metric([totals.name], totals.rejected)
            active.add_metric([totals.name], totals.open_now)
            accept_errors.add_metric([totals.name], totals.accept_errors)
        yield from (accepted, rejected, active, accept_errors)
        backend_active = GaugeMetricFamily(
            "balancer_backend_active_connections",
            "Client connections assigned to each backend now (what least_connections sees).",
            labels=["backend"],
        )
        backend_total = CounterMetricFamily(
            "balancer_backend_connections", "Connections assigned to each backend.",
            labels=["backend"],
        )  # fmt: skip
        backend_failures = CounterMetricFamily(
            "balancer_backend_connect_failures",
            "Backend connects refused or timed out (each one is retried on another backend).",
            labels=["backend"],
        )
        for state in self._backends():
            backend_active.add_metric([state.name], state.active)
            backend_total.add_metric([state.name], state.connections_total)
            backend_failures.add_metric([state.name], state.connect_failures_total)
        yield from (backend_active, backend_total, backend_failures)
