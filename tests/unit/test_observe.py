"""Records → metrics and log lines, with a fresh registry and hand-made records."""

from __future__ import annotations

import io
import json

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from balancer.facts.causes import BACKEND_RESET, CLIENT_CLOSED, CLIENT_RESET
from balancer.facts.record import (
    BALANCER,
    PEER,
    BackendConnectionRecord,
    ConnectionRecord,
    H2Facts,
)
from balancer.observe.loglines import connection_line, json_line
from balancer.observe.metrics import Observer


def tls_record() -> ConnectionRecord:
    record = ConnectionRecord(7, "https", accepted_at=100.0, accepted_unix=1.7e9)
    record.client_ip, record.client_port = "198.51.100.4", 50000
    record.tcp_handshake_rtt_seconds = 0.00005
    record.tls_started_at, record.tls_finished_at = 100.001, 100.004
    record.tls_version, record.tls_cipher, record.tls_resumed = (
        "1.2",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        True,
    )
    record.backend, record.backend_address = "web1", "10.0.0.1:80"
    record.backend_connection = BackendConnectionRecord(
        "web1", "10.0.0.1:80", connect_started_at=100.005
    )
    record.backend_connection.connected_at = 100.0052
    record.backend_connection.tcp_handshake_rtt_seconds = 0.00003
    record.requests = 3
    record.client_leg.bytes_in, record.client_leg.bytes_out = 900, 5000
    record.backend_leg.bytes_in, record.backend_leg.bytes_out = 4000, 800
    record.client_leg.initiator = PEER
    record.client_leg.first_fin = PEER
    record.client_leg.close_notify_received = True
    record.client_leg.peer_fin_at, record.client_leg.closed_at = 101.0, 101.0001
    record.client_leg.fin_sent_at = 101.00005
    record.backend_leg.initiator = BALANCER
    record.backend_leg.first_fin = BALANCER
    record.close_cause = "client_closed"
    record.closed_at = 101.0002
    return record


def test_the_first_decision_names_why_a_connection_ended() -> None:
    client = ConnectionRecord(1, "http", accepted_at=1.0, accepted_unix=1.7e9)
    backend = BackendConnectionRecord("web1", "10.0.0.1:80", connect_started_at=1.0)
    client.ended_by(CLIENT_RESET)
    client.ended_by(CLIENT_CLOSED)  # the close that follows a reset is its consequence
    backend.ended_by(BACKEND_RESET)
    backend.ended_by("reuse_never")
    assert (client.close_cause, backend.close_cause) == (CLIENT_RESET, BACKEND_RESET)


def test_publish_turns_a_record_into_metrics() -> None:
    registry = CollectorRegistry()
    Observer(registry).publish(tls_record())

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (
        get(
            "balancer_tls_handshake_seconds_count",
            listener="https",
            version="1.2",
            cipher="ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        == 1
    )
    assert (
        get(
            "balancer_tls_handshake_seconds_bucket",
            listener="https",
            version="1.2",
            cipher="ECDHE-ECDSA-AES128-GCM-SHA256",
            le="0.005",
        )
        == 1
    )
    assert get("balancer_tls_resumptions_total", listener="https", version="1.2") == 1
    assert get("balancer_tcp_handshake_rtt_seconds_bucket", listener="https", le="0.0001") == 1
    assert get("balancer_backend_connect_wait_seconds_count", backend="web1") == 1
    assert get("balancer_backend_tcp_handshake_rtt_seconds_bucket", backend="web1", le="5e-05") == 1
    assert (
        get(
            "balancer_closes_total",
            listener="https",
            leg="client",
            initiator="peer",
            kind="close_notify",
        )
        == 1
    )
    assert (
        get(
            "balancer_closes_total",
            listener="https",
            leg="backend",
            initiator="balancer",
            kind="fin",
        )
        == 1
    )
    assert get("balancer_bytes_total", listener="https", leg="client", direction="out") == 5000
    assert get("balancer_connections_closed_total", listener="https", cause="client_closed") == 1
    assert get("balancer_teardown_seconds_count", leg="client") == 1


def test_failed_handshake_counts_a_failure_and_no_duration() -> None:
    registry = CollectorRegistry()
    record = ConnectionRecord(1, "https", 0.0, 0.0)
    record.tls_started_at, record.tls_failure = 0.001, "protocol_version"
    record.close_cause, record.closed_at = "tls_failed", 0.002
    Observer(registry).publish(record)
    assert (
        registry.get_sample_value(
            "balancer_tls_handshake_failures_total",
            {"listener": "https", "reason": "protocol_version"},
        )
        == 1
    )
    assert (
        registry.get_sample_value("balancer_backend_connect_seconds_count", {"backend": "web1"})
        is None
    )


def test_access_log_line_is_one_json_object_with_the_facts() -> None:
    log = io.StringIO()
    Observer(CollectorRegistry(), access_log=log).publish(tls_record())
    (line,) = log.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["id"] == 7 and entry["listener"] == "https"
    assert entry["client"] == {"ip": "198.51.100.4", "port": 50000, "proxied_by": None}
    assert entry["tls"]["version"] == "1.2" and entry["tls"]["resumed"] is True
    assert abs(entry["tls"]["handshake_seconds"] - 0.003) < 1e-9
    assert abs(entry["backend"]["connect_wait_seconds"] - 0.0002) < 1e-9
    assert entry["backend"]["tcp_handshake_rtt_seconds"] == 0.00003
    assert entry["client_leg"]["kind"] == "close_notify"
    assert entry["backend_leg"]["initiator"] == "balancer"
    assert abs(entry["lifetime_seconds"] - 1.0002) < 1e-9


def test_no_log_work_without_an_access_log() -> None:
    observer = Observer(CollectorRegistry())
    observer.publish(tls_record())
    assert observer.closed_total == 1 and observer.access_log is None


_maybe_seconds = st.none() | st.floats(0, 1e6, allow_nan=False)
_maybe_text = st.none() | st.text(max_size=20)  # quotes, backslashes, control and non-ASCII
_maybe_flag = st.none() | st.booleans()


@st.composite
def records(draw: st.DrawFn) -> ConnectionRecord:
    record = ConnectionRecord(
        draw(st.integers(1, 2**40)), draw(st.text(max_size=10)), 100.0, draw(st.floats(0, 2e9))
    )
    record.client_ip, record.client_port = draw(st.text(max_size=40)), draw(st.integers(0, 65535))
    record.tcp_handshake_rtt_seconds = draw(_maybe_seconds)
    record.tls_started_at, record.tls_finished_at = draw(_maybe_seconds), draw(_maybe_seconds)
    record.tls_version, record.tls_cipher = draw(_maybe_text), draw(_maybe_text)
    record.tls_sni, record.tls_alpn = draw(_maybe_text), draw(_maybe_text)
    record.tls_resumed, record.tls_failure = draw(_maybe_flag), draw(_maybe_text)
    record.backend, record.backend_address = draw(_maybe_text), draw(_maybe_text)
    record.backend_group = draw(_maybe_text)
    if draw(st.booleans()):
        backend_record = record.backend_connection = BackendConnectionRecord(
            draw(st.text()), draw(st.text()), draw(st.floats(0, 1e6))
        )
        backend_record.local_port = draw(st.none() | st.integers(0, 65535))
        backend_record.connected_at = draw(_maybe_seconds)
        backend_record.tcp_handshake_rtt_seconds = draw(_maybe_seconds)
    record.first_request_at, record.closed_at = draw(_maybe_seconds), draw(_maybe_seconds)
    record.requests, record.error_status = (
        draw(st.integers(0, 10**6)),
        draw(st.none() | st.integers(100, 599)),
    )
    record.client_leg.bytes_in = draw(st.integers(0, 2**50))
    record.close_cause = draw(_maybe_text)
    for leg in (
        record.client_leg,
        *([record.backend_connection.leg] if record.backend_connection else []),
    ):
        leg.bytes_out = draw(st.integers(0, 2**50))
        leg.initiator, leg.first_fin = (
            draw(st.sampled_from([None, PEER, BALANCER])),
            draw(_maybe_text),
        )
        leg.rst_received, leg.rst_sent = draw(st.booleans()), draw(st.booleans())
        leg.close_notify_received, leg.close_notify_sent = draw(_maybe_flag), draw(_maybe_flag)
        leg.fin_sent_at, leg.peer_fin_at = draw(_maybe_seconds), draw(_maybe_seconds)
        leg.retransmits = draw(st.none() | st.integers(0, 1000))
    return record


@given(records())
def test_the_access_log_line_is_exactly_the_records_dict_as_json(record: ConnectionRecord) -> None:
    line = json_line(record)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == record.to_dict()


def test_a_privileged_port_refused_says_how_to_get_the_privilege() -> None:
    import errno

    from balancer.process.server import bind_failure

    error = bind_failure("http", "0.0.0.0", 80, PermissionError(errno.EACCES, "Permission denied"))
    text = str(error)
    assert text.startswith("cannot listen: http listener on 0.0.0.0:80: Permission denied; ")
    assert "run as root" in text and "cap_net_bind_service" in text
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text


def test_publish_request_counts_responses_by_class_and_times_them() -> None:
    from balancer.facts.record import RequestRecord
    from balancer.observe.loglines import request_json_line

    registry, log = CollectorRegistry(), io.StringIO()
    observer = Observer(registry, access_log=log)
    observer.request_log = True
    connection = ConnectionRecord(7, "http", accepted_at=9.0, accepted_unix=1.7e9)
    request = RequestRecord(3, connection, b"GET", b"/p" + b"x" * 300, head_at=10.0)
    request.backend, request.backend_connection_id, request.reused = "web1", 12, True
    request.backend_group = "web"
    request.forwarded_at, request.first_byte_at, request.done_at = 10.001, 10.004, 10.02
    request.status, request.response_bytes = 503, 120
    observer.publish_request(request)

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert get("balancer_requests_total", listener="http", backend="web1") == 1
    assert get("balancer_responses_total", listener="http", backend="web1", **{"class": "5xx"}) == 1
    assert get("balancer_request_duration_seconds_bucket", listener="http", backend="web1",
               le="0.05") == 1  # fmt: skip
    line = json.loads(log.getvalue())
    assert line == json.loads(request_json_line(request))
    wholes = (line["status"], line["backend_connection_id"], line["bytes"]["response"])
    assert [type(value) for value in wholes] == [int, int, int]  # not 503.0 (a compiled build)
    assert (line["type"], line["connection_id"], line["backend_connection_id"]) == (
        "request", 7, 12,
    )  # fmt: skip
    assert abs(line["first_byte_seconds"] - 0.004) < 1e-9 and line["reused"] is True
    assert (line["backend"], line["group"]) == ("web1", "web")
    assert line["target"] == "/p" + "x" * 195 + "..." and line["method"] == "GET"
    assert line["time"] == "2023-11-14T22:13:21.000000Z"  # accepted_unix + 1 s
    observer.request_log = False
    observer.publish_request(request)
    assert len(log.getvalue().splitlines()) == 1  # request lines off: metrics only
    assert get("balancer_requests_total", listener="http", backend="web1") == 2


def test_the_demos_line_says_what_a_connection_carried() -> None:
    """`balancer demo` prints one line a connection: HTTP/1.x's backend and requests; an
    HTTP/2 connection's streams (each went to a backend of its own)."""
    record = tls_record()
    assert connection_line(record).startswith("#7 https 198.51.100.4:50000 -> web1 | TLS 1.2")
    assert "| 3 requests |" in connection_line(record)
    record.h2 = H2Facts()
    record.h2.streams = 2
    line = connection_line(record)
    assert line.startswith("#7 https 198.51.100.4:50000 -> HTTP/2, 2 streams | TLS 1.2")
    assert "request" not in line
