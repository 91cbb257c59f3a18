"""Records become metrics and log lines here, and only here.

`Observer.publish(record)` is called once per closed connection, `publish_request` per request
and `publish_backend_connection` per pooled backend connection. It counts into the families
families.py names and writes the lines loglines.py renders; nothing else does either. Gauges
that describe the present (open connections, per-backend activity) are read at scrape time by
`StateCollector`, so they cost the connection path nothing.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Final, NamedTuple, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from balancer import __version__, build
from balancer.backend.pool import BACKEND_STATES
from balancer.backend.state import BackendState
from balancer.facts.causes import CLOSE_CAUSES
from balancer.facts.record import (
    BackendConnectionRecord,
    ConnectionRecord,
    H2Facts,
    RequestRecord,
    teardown_seconds,
)
from balancer.observe.families import (
    BACKEND_CONNECTIONS_CLOSED,
    BACKEND_RTT,
    BYTES,
    CLIENT_REQUESTS,
    CLOSED,
    CLOSES,
    CONNECT_WAIT,
    DURATION,
    ERROR_RESPONSES,
    FAMILIES,
    H2_CONCURRENT_STREAMS,
    H2_GOAWAY,
    H2_RST_STREAM,
    REQUEST_DURATION,
    REQUESTS,
    RESPONSES,
    TCP_RTT,
    TEARDOWN,
    TLS_FAILURES,
    TLS_HANDSHAKE,
    TLS_RESUMED,
    Family,
)
from balancer.observe.loglines import backend_connection_json_line, json_line, request_json_line
from balancer.wire.errors import ERRORS

_go_float = cast(Callable[[float], str], floatToGoString)  # how Prometheus spells an `le`
# (Final: docs/ARCHITECTURE.md, "The compiled build".)
_bisect_left: Final = bisect.bisect_left


class _Histogram:
    """Bucket counts (per upper bound, then +Inf), their sum and count: what is exported."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bisect_left(self.bounds, value)] += 1  # the first bound >= value: le
        self.sum += value


class _Cell:
    """One counter's value (a label set of a family), updated in place."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


_Made = TypeVar("_Made")


class _Cells(dict[Any, _Made]):
    """Metric cells (or nested _Cells, or histograms) by one label value, each made on first
    use: after that, counting is a dict hit on a string the record already holds, with no
    label tuple built and no call. Typed by what it holds: the compiled build then updates a
    cell's value as a native attribute, not by name."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[Any], _Made]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> _Made:
        made = self[key] = self.make(key)
        return made


class _ListenerCells:
    """Everything a closed connection or a request of one listener counts into, found by
    one lookup of the listener's name."""

    __slots__ = (
        "backend_bytes",
        "backend_closes",
        "client_bytes",
        "client_closes",
        "client_requests",
        "closed",
        "duration",
        "error_responses",
        "request_durations",
        "requests",
        "responses",
        "tcp_rtt",
    )

    def __init__(self, observer: Observer, listener: str) -> None:
        cell, histogram = observer.cell, observer.histogram
        self.closed = _Cells(lambda cause: cell(CLOSED, (listener, cause or "unknown")))
        self.tcp_rtt = histogram(TCP_RTT, (listener,))
        self.duration = histogram(DURATION, (listener,))
        self.error_responses = _Cells(lambda status: cell(ERROR_RESPONSES, (listener, status)))
        self.client_closes = _closes(cell, listener, "client")
        self.backend_closes = _closes(cell, listener, "backend")
        self.client_bytes = _Cells(lambda way: cell(BYTES, (listener, "client", way)))
        self.backend_bytes = _Cells(lambda way: cell(BYTES, (listener, "backend", way)))
        self.requests = _Cells(lambda backend: cell(REQUESTS, (listener, backend)))
        self.client_requests = _Cells(lambda proto: cell(CLIENT_REQUESTS, (listener, proto)))
        self.responses = _Cells(
            lambda backend: _Cells(lambda kind: cell(RESPONSES, (listener, backend, kind)))
        )
        self.request_durations = _Cells(
            lambda backend: histogram(REQUEST_DURATION, (listener, backend))
        )


def _closes(
    cell: Callable[[Family, tuple[str, ...]], _Cell], listener: str, leg: str
) -> _Cells[_Cells[_Cell]]:
    """CLOSES cells of one leg, by initiator, then kind."""
    return _Cells(
        lambda initiator: _Cells(
            lambda kind: cell(CLOSES, (listener, leg, initiator or "unknown", kind))
        )
    )


class Observer(Collector):
    """Turns each closed connection's record into metric updates and one JSON log line.

    The metrics are plain counts kept here and handed to Prometheus at scrape time (this is
    a registered collector): prometheus_client's own Counter and Histogram take a lock and
    check labels on every update, which cost more than the rest of publishing put together.
    Each label set's count is a cell found through the listener's `_ListenerCells`, so a
    connection's updates build no label tuples.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        access_log: IO[str] | None = None,
        recent: int = 200,
    ) -> None:
        self.access_log = access_log
        self.live: Callable[[ConnectionRecord], None] | None = None  # `balancer demo` prints
        self.request_log = False  # request lines in the access log too (config request_log)
        self.recent: deque[ConnectionRecord] = deque(maxlen=recent)
        self.closed_total = 0
        self._counts: dict[Family, dict[tuple[str, ...], _Cell]] = {
            f: {} for f in FAMILIES if f.buckets is None
        }
        self._histograms: dict[Family, dict[tuple[str, ...], _Histogram]] = {
            f: {} for f in FAMILIES if f.buckets is not None
        }
        self._listeners = _Cells(lambda listener: _ListenerCells(self, listener))
        self._backends = _Cells(
            lambda name: (
                self.histogram(CONNECT_WAIT, (name,)),
                self.histogram(BACKEND_RTT, (name,)),
            )
        )
        self._teardown = _Cells(lambda leg: self.histogram(TEARDOWN, (leg,)))
        registry.register(self)

    def cell(self, family: Family, labels: tuple[str, ...]) -> _Cell:
        counts = self._counts[family]
        found = counts.get(labels)
        if found is None:
            found = counts[labels] = _Cell()
        return found

    def histogram(self, family: Family, labels: tuple[str, ...]) -> _Histogram:
        histograms = self._histograms[family]
        found = histograms.get(labels)
        if found is None:
            assert family.buckets is not None
            found = histograms[labels] = _Histogram(family.buckets)
        return found

    def expect(self, listeners: Iterable[tuple[str, bool, Iterable[str]]]) -> None:
        """Each listener (name, HTTP?, the backends its groups hold): its label sets that
        are known in advance are exported from the start, at 0, as Prometheus advises (a
        series that appears at its first event hides that event from rate()): why its
        connections closed, its error statuses, its requests and responses per backend."""
        causes = [*CLOSE_CAUSES, *(error.reason for error in ERRORS)]
        statuses = sorted({str(error.status_hint) for error in ERRORS})
        for name, http, backends in listeners:
            cells: _ListenerCells = self._listeners[name]
            # (A cell made is exported: the list only makes them.)
            made: list[object] = [cells.closed[cause] for cause in causes]
            if http:
                made += [cells.error_responses[status] for status in statuses]
                made += [cells.client_requests[proto] for proto in ("http/1.1", "h2")]
                for backend in backends:
                    made += [cells.requests[backend], cells.request_durations[backend]]
                    made += [cells.responses[backend][kind] for kind in _STATUS_CLASS[1:]]

    def publish(self, record: ConnectionRecord) -> None:
        self.closed_total += 1
        self.recent.append(record)
        cells: _ListenerCells = self._listeners[record.listener]
        cells.closed[record.close_cause].value += 1
        if record.tcp_handshake_rtt_seconds is not None:
            cells.tcp_rtt.observe(record.tcp_handshake_rtt_seconds)
        if record.tls_failure is not None:
            self.cell(TLS_FAILURES, (record.listener, record.tls_failure)).value += 1
        elif record.tls_finished_at is not None and record.tls_started_at is not None:
            version = record.tls_version or ""
            self.histogram(
                TLS_HANDSHAKE, (record.listener, version, record.tls_cipher or "")
            ).observe(record.tls_finished_at - record.tls_started_at)
            if record.tls_resumed:
                self.cell(TLS_RESUMED, (record.listener, version)).value += 1
        if record.error_status is not None:
            cells.error_responses[str(record.error_status)].value += 1
        h2 = record.h2
        if h2 is not None:
            cells.client_requests["h2"].value += h2.streams
            self._publish_h2(record.listener, h2)
        elif record.requests:
            cells.client_requests["http/1.1"].value += record.requests
        if record.closed_at is not None:
            cells.duration.observe(record.closed_at - record.accepted_at)
        leg = record.client_leg
        cells.client_closes[leg.initiator][leg.kind].value += 1
        teardown = teardown_seconds(leg)
        if teardown is not None:
            self._teardown["client"].observe(teardown)
        client_bytes = cells.client_bytes
        client_bytes["in"].value += leg.bytes_in
        client_bytes["out"].value += leg.bytes_out
        conn = record.backend_connection
        if conn is not None:
            connect_wait, rtt = self._backends[conn.backend]
            leg = conn.leg
            if conn.connected_at is not None:
                connect_wait.observe(conn.connected_at - conn.connect_started_at)
                cells.backend_closes[leg.initiator][leg.kind].value += 1
                teardown = teardown_seconds(leg)
                if teardown is not None:
                    self._teardown["backend"].observe(teardown)
            if conn.tcp_handshake_rtt_seconds is not None:
                rtt.observe(conn.tcp_handshake_rtt_seconds)
            if leg.bytes_out or leg.bytes_in:
                backend_bytes = cells.backend_bytes
                backend_bytes["in"].value += leg.bytes_in
                backend_bytes["out"].value += leg.bytes_out
        if self.access_log is not None:
            self.access_log.write(json_line(record))
        if self.live is not None:
            self.live(record)

    def _publish_h2(self, listener: str, h2: H2Facts) -> None:
        self.histogram(H2_CONCURRENT_STREAMS, (listener,)).observe(h2.max_concurrent_streams)
        for direction, goaway in (("sent", h2.goaway_sent), ("received", h2.goaway_received)):
            if goaway is not None:
                self.cell(H2_GOAWAY, (listener, direction, goaway[0])).value += 1
        for direction, counts in (("sent", h2.rst_sent), ("received", h2.rst_received)):
            for error, count in counts.items():
                self.cell(H2_RST_STREAM, (listener, direction, error)).value += count

    def publish_request(self, record: RequestRecord) -> None:
        """A request whose response is done (or that ended without one)."""
        backend = record.backend
        if backend is not None:
            cells: _ListenerCells = self._listeners[record.connection.listener]
            if record.forwarded_at is not None:
                cells.requests[backend].value += 1
            status, done_at = record.status, record.done_at
            if status is not None and done_at:
                cells.responses[backend][_STATUS_CLASS[status // 100]].value += 1
                cells.request_durations[backend].observe(done_at - record.head_at)
        if self.request_log and self.access_log is not None:
            self.access_log.write(request_json_line(record))

    def publish_backend_connection(self, record: BackendConnectionRecord, unix_now: float) -> None:
        """A pooled backend connection closed: its leg, bytes and connect facts."""
        self.cell(
            BACKEND_CONNECTIONS_CLOSED, (record.backend, record.close_cause or "unknown")
        ).value += 1
        cells: _ListenerCells = self._listeners[""]
        leg = record.leg
        cells.backend_closes[leg.initiator][leg.kind].value += 1
        teardown = teardown_seconds(leg)
        if teardown is not None:
            self._teardown["backend"].observe(teardown)
        cells.backend_bytes["in"].value += leg.bytes_in
        cells.backend_bytes["out"].value += leg.bytes_out
        connect_wait, rtt = self._backends[record.backend]
        wait = record.connect_wait_seconds
        if wait is not None:
            connect_wait.observe(wait)
        if record.tcp_handshake_rtt_seconds is not None:
            rtt.observe(record.tcp_handshake_rtt_seconds)
        if self.access_log is not None:
            self.access_log.write(backend_connection_json_line(record, unix_now))

    def summary(self) -> str:
        """One line on what was served, by backend (said when `balancer demo` stops)."""
        by_backend: dict[str, float] = {}
        for (_, backend), count in self._counts[REQUESTS].items():
            by_backend[backend] = by_backend.get(backend, 0) + count.value
        spread = ", ".join(f"{name} {int(count)}" for name, count in sorted(by_backend.items()))
        total = int(sum(by_backend.values()))
        return f"stopped: {self.closed_total} connections, {total} requests ({spread or 'none'})"

    def collect(self) -> Iterator[Metric]:
        for family, counts in self._counts.items():
            counter = CounterMetricFamily(family.name, family.help, labels=family.labels)
            for labels, cell in counts.items():
                counter.add_metric(labels, cell.value)
            yield counter
        for family, histograms in self._histograms.items():
            metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
            assert family.buckets is not None
            bounds = [_go_float(bound) for bound in (*family.buckets, math.inf)]
            for labels, histogram in histograms.items():
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, histogram.counts, strict=True):
                    cumulative += count
                    buckets.append((bound, cumulative))
                metric.add_metric(labels, buckets, histogram.sum)
            yield metric


_STATUS_CLASS: Final = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


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
        idle: Callable[[str], int] = lambda backend: 0,
        state: Callable[[BackendState], str] = lambda backend: "up",
    ) -> None:
        self._listeners = listeners
        self._backends = backends
        self._idle = idle  # idle pooled connections per backend (reuse modes)
        self._state = state  # one of pool.BACKEND_STATES

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
            "Leases on each backend now, what least_connections sees: client connections "
            "(reuse never), requests in flight (safe, always).",
            labels=["backend"],
        )
        backend_idle = GaugeMetricFamily(
            "balancer_backend_idle_connections",
            "Idle backend connections in the pool, per backend (reuse modes).",
            labels=["backend"],
        )
        backend_total = CounterMetricFamily(
            "balancer_backend_connections",
            "Leases given on each backend: client connections (reuse never), requests (safe, "
            "always); a failed connect is counted in balancer_backend_connect_failures_total "
            "only.",
            labels=["backend"],
        )
        backend_failures = CounterMetricFamily(
            "balancer_backend_connect_failures",
            "Backend connects refused or timed out (each one is retried on another backend).",
            labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "balancer_backend_ejections",
            "Backends ejected by the passive checks (a refused or timed-out connect; "
            "passive_fall failed requests in a row), per worker, summed.",
            labels=["backend"],
        )
        states = GaugeMetricFamily(
            "balancer_backend_state",
            "Workers that see the backend in each state (up, down: active checks, draining, "
            "maintenance: the operator, ejected: passive checks skip it): each worker counts 1 "
            "for its state and 0 for the others, so the states of a backend add up to the "
            "workers (HAProxy's haproxy_server_status, per worker).",
            labels=["backend", "state"],
        )
        for state in self._backends():
            now = self._state(state)
            for word in BACKEND_STATES:
                states.add_metric([state.name, word], 1 if word == now else 0)
            ejections.add_metric([state.name], state.ejections_total)
            backend_active.add_metric([state.name], state.active)
            backend_total.add_metric([state.name], state.connections_total)
            backend_failures.add_metric([state.name], state.connect_failures_total)
            backend_idle.add_metric([state.name], self._idle(state.name))
        yield from (backend_active, backend_total, backend_failures, backend_idle, ejections)
        yield states


class SupervisorMetrics:
    """The supervisor's own metrics (supervisor.py), in its registry: reloads, restarts,
    workers. Summed into /metrics with the workers' pages (aggregate.py)."""

    def __init__(
        self, registry: CollectorRegistry, running: Callable[[], int], started_unix: float
    ) -> None:
        self.reloads = Counter(
            "balancer_config_reloads",
            "Reloads asked for (SIGHUP), by result: success, or failure (the file or a "
            "listener had a problem; the running configuration serves on).",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_reload = Gauge(
            "balancer_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded (Unix time).",
            registry=registry,
        )
        self.certificate_not_after = Gauge(
            "balancer_tls_certificate_not_after_timestamp_seconds",
            "When each served certificate expires (its notAfter, Unix time), by file; alert "
            "on it minus time() (check and run warn within 14 days).",
            ["path"],
            registry=registry,
        )
        self.restarts = Counter(
            "balancer_worker_restarts",
            "Worker processes that exited unasked and were started again.",
            registry=registry,
        )
        workers = Gauge("balancer_workers", "Worker processes running now.", registry=registry)
        workers.set_function(running)
        self.last_reload_ok = Gauge(
            "balancer_config_last_reload_successful",
            "1 if the last reload (or the start) loaded its configuration; 0 if it failed and "
            "the configuration before it serves on.",
            registry=registry,
        )
        Gauge(
            "balancer_start_time_seconds", "When the supervisor started (Unix time).",
            registry=registry,
        ).set(started_unix)  # fmt: skip
        Gauge(
            "balancer_build_info", "1, labelled with the version and the build (pure Python, "
            "or compiled with mypyc).", ["version", "build"], registry=registry,
        ).labels(__version__, build()).set(1)  # fmt: skip
        self.healthz_failing = Gauge(
            "balancer_healthz_failing",
            "1 while the admin listener's /healthz answers 503 on purpose (SIGUSR2 or POST "
            "/healthz/fail: leaving an L4 tier), 0 otherwise.",
            registry=registry,
        )
        self.admin_writes = Counter(
            "balancer_admin_writes",
            "Admin API writes (POST), by result: ok, unauthorized (no or a wrong bearer "
            "token, or no admin_token_file), not_found, bad_request.",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "unauthorized", "not_found", "bad_request"):
            self.admin_writes.labels(result)


class BackendInfo(Collector):
    """`balancer_backend_info{backend, group, address} 1` for each configured backend, read
    from the running configuration at scrape time: the join that lets a query sum the
    per-backend families by group (Prometheus's `_info` idiom). Kept by the supervisor, so
    it is not summed across the workers."""

    def __init__(self, backends: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        self._backends = backends  # (name, group, address)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "balancer_backend_info",
            "1 for each configured backend, labelled with its group and address; join on "
            "backend to sum any balancer_backend_* or per-backend family by group.",
            labels=["backend", "group", "address"],
        )
        for name, group, address in self._backends():
            info.add_metric([name, group, address], 1)
        yield info


class DnsMetrics:
    """DNS service discovery's metrics (discovery.py), kept where it runs: the supervisor,
    or a lone Balancer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.resolutions = Counter(
            "balancer_dns_resolutions",
            "Resolutions of a discovered group's name, by result: ok, nxdomain, no_records, "
            "servfail (SERVFAIL or REFUSED from every nameserver), timeout, error.",
            ["group", "result"],
            registry=registry,
        )
        self.serving = Gauge(
            "balancer_dns_members",
            "Members a discovered group's slots hold and DNS names now (leaving ones not counted).",
            ["group"],
            registry=registry,
        )
        self.dropped = Gauge(
            "balancer_dns_members_without_slot",
            "Members DNS named that found no free slot: raise the group's slots.",
            ["group"],
            registry=registry,
        )
        self.last_ok = Gauge(
            "balancer_dns_last_success_timestamp_seconds",
            "When a discovered group's name last resolved (Unix time; 0: not yet).",
            ["group"],
            registry=registry,
        )

    def groups(self, names: Iterable[str], results: Iterable[str]) -> None:
        """The discovered groups, their series made (exported at 0 from the start)."""
        for name in names:
            for result in results:
                self.resolutions.labels(name, result)
            self.serving.labels(name)
            self.dropped.labels(name)
            self.last_ok.labels(name)

    def resolved(self, group: str, result: str) -> None:
        self.resolutions.labels(group, result).inc()
        if result == "ok":
            self.last_ok.labels(group).set(time.time())

    def members(self, group: str, serving: int, dropped: int) -> None:
        self.serving.labels(group).set(serving)
        self.dropped.labels(group).set(dropped)


class HealthMetrics:
    """The active checks' metrics (health.py), kept by whoever runs the checks: the
    supervisor, or a lone Balancer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "balancer_backend_up",
            "1 while the active health checks hold the backend up, 0 while down.",
            ["backend"],
            registry=registry,
        )
        self.checks = Counter(
            "balancer_health_checks",
            "Active health checks, by result: ok, or failed (refused, timeout, a status "
            "outside expect_status, a body without body_contains).",
            ["backend", "result"],
            registry=registry,
        )
        self.changes = Counter(
            "balancer_backend_state_changes",
            "Backends going up or down by the active checks (rise, fall).",
            ["backend", "state"],
            registry=registry,
        )
        self._checked: set[str] = set()
        # When each backend's state last changed (Unix time): by the active checks, or by
        # the operator (admin API); /backends says it as state_since.
        self.changed_at: dict[str, float] = {}

    def backends(self, names: Iterable[str]) -> None:
        """The backends checked now (all up until checked down); others are forgotten."""
        checked = set(names)
        for gone in self._checked - checked:
            self.up.remove(gone)
        self._checked = checked
        for name in checked:
            self.up.labels(name).set(1)
            for result in ("ok", "failed"):  # (made: exported at 0 from the start)
                self.checks.labels(name, result)
            for state in ("up", "down"):
                self.changes.labels(name, state)

    def observed(self, name: str, ok: bool) -> None:
        self.checks.labels(name, "ok" if ok else "failed").inc()

    def changed(self, name: str, up: bool) -> None:
        self.up.labels(name).set(1 if up else 0)
        self.state_changed(name, "up" if up else "down")

    def state_changed(self, name: str, state: str) -> None:
        """A state change (the active checks' up or down, or an operator's drain, enable,
        maintenance): counted, and its time kept."""
        self.changes.labels(name, state).inc()
        self.changed_at[name] = time.time()
