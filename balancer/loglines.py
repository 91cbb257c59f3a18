"""The log lines, rendered here and only here: one JSON access-log line per closed connection,
per request and per pooled backend connection, and the demo's one compact line per
connection for a person watching. Pure: records in, text out.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii

from balancer.record import (
    PEER,
    BackendConnectionRecord,
    ConnectionRecord,
    LegTeardown,
    RequestRecord,
    rfc3339,
    teardown_seconds,
)

_LEG_PEER = {"client": "client", "backend": "backend"}
_KIND = {"fin": "FIN", "rst": "RST", "close_notify": "close_notify"}


def _leg_words(name: str, leg: LegTeardown) -> str:
    """`client leg: client closed first (FIN)`: who started the close, and how it ended."""
    who = _LEG_PEER[name] if leg.initiator == PEER else leg.initiator or "?"
    return f"{name} leg: {who} closed first ({_KIND[leg.kind]})"


def connection_line(r: ConnectionRecord) -> str:
    """One compact line per closed connection, for a person watching (`balancer demo`)."""
    parts = [f"#{r.id} {r.listener} {r.client_ip}:{r.client_port}"]
    parts[0] += f" -> {r.backend}" if r.backend is not None else " -> (no backend)"
    if r.tls_failure is not None:
        parts.append(f"TLS failed: {r.tls_failure}")
    elif r.tls_finished_at is not None:
        handshake = (r.tls_handshake_seconds or 0) * 1000
        resumed = "resumed" if r.tls_resumed else "full"
        parts.append(f"TLS {r.tls_version} {handshake:.2f} ms ({resumed})")
    parts.append(f"{r.requests} request{'' if r.requests == 1 else 's'}")
    parts.append(_leg_words("client", r.client_leg))
    if r.connected_at is not None:
        parts.append(_leg_words("backend", r.backend_leg))
    parts.append(f"{r.close_cause}, {(r.lifetime_seconds or 0) * 1000:.1f} ms")
    return " | ".join(parts)


# The access-log line: `to_dict()` as compact JSON, written out directly. json.dumps of the
# nested dict costs about three times as much, per connection; a unit test holds the two equal.


def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def _number(value: float | None) -> str:
    return "null" if value is None else repr(value)


def _flag(value: bool | None) -> str:
    return "null" if value is None else "true" if value else "false"


def _leg_json(leg: LegTeardown, teardown: float | None) -> str:
    return (
        f'{{"initiator":{_text(leg.initiator)},"first_fin":{_text(leg.first_fin)},'
        f'"kind":"{leg.kind}","rst_received":{_flag(leg.rst_received)},'
        f'"rst_sent":{_flag(leg.rst_sent)},'
        f'"close_notify_received":{_flag(leg.close_notify_received)},'
        f'"close_notify_sent":{_flag(leg.close_notify_sent)},'
        f'"retransmits":{_number(leg.retransmits)},"teardown_seconds":{_number(teardown)}}}'
    )


def json_line(r: ConnectionRecord) -> str:
    """One line of JSON (with its newline): the record as `to_dict()` has it."""
    tls = (
        "null"
        if r.tls_started_at is None and r.tls_sni is None  # (SNI alone: passed through)
        else f'{{"handshake_seconds":{_number(r.tls_handshake_seconds)},'
        f'"version":{_text(r.tls_version)},"cipher":{_text(r.tls_cipher)},'
        f'"sni":{_text(r.tls_sni)},"alpn":{_text(r.tls_alpn)},'
        f'"resumed":{_flag(r.tls_resumed)},"failure":{_text(r.tls_failure)}}}'
    )
    backend = (
        "null"
        if r.backend is None
        else f'{{"name":{_text(r.backend)},"group":{_text(r.backend_group)},'
        f'"address":{_text(r.backend_address)},'
        f'"local_port":{_number(r.backend_local_port)},'
        f'"connect_wait_seconds":{_number(r.connect_wait_seconds)},'
        f'"tcp_handshake_rtt_seconds":{_number(r.backend_tcp_handshake_rtt_seconds)}}}'
    )
    backend_leg = (
        "null" if r.backend is None else _leg_json(r.backend_leg, r.backend_teardown_seconds)
    )
    return (
        f'{{"type":"connection","id":{r.id},"worker_pid":{r.worker_pid},'
        f'"listener":{_text(r.listener)},'
        f'"start":{r.accepted_unix!r},"time":"{rfc3339(r.accepted_unix)}",'
        f'"client":{{"ip":{_text(r.client_ip)},"port":{r.client_port},'
        f'"proxied_by":{_text(r.proxied_by)}}},'
        f'"local_port":{r.local_port},'
        f'"tcp_handshake_rtt_seconds":{_number(r.tcp_handshake_rtt_seconds)},'
        f'"tls":{tls},"backend":{backend},'
        f'"connect_attempts":{r.connect_attempts},"connect_failures":{r.connect_failures},'
        f'"requests":{r.requests},"first_request_seconds":{_number(r.first_request_seconds)},'
        f'"error_status":{_number(r.error_status)},'
        f'"bytes":{{"client_in":{r.client_bytes_in},"client_out":{r.client_bytes_out},'
        f'"backend_in":{r.backend_bytes_in},"backend_out":{r.backend_bytes_out}}},'
        f'"close_cause":{_text(r.close_cause)},'
        f'"client_leg":{_leg_json(r.client_leg, r.client_teardown_seconds)},'
        f'"backend_leg":{backend_leg},"lifetime_seconds":{_number(r.lifetime_seconds)}}}\n'
    )


def request_json_line(r: RequestRecord) -> str:
    """One access-log line (with its newline) for a request: `"type":"request"`."""
    connection = r.connection
    return (
        f'{{"type":"request","id":{r.id},"connection_id":{connection.id},'
        f'"worker_pid":{connection.worker_pid},"listener":{_text(connection.listener)},'
        f'"time":"{rfc3339(r.head_unix)}","method":{_text(r.method.decode("latin-1"))},'
        f'"target":{_text(r.target_shown)},"status":{_number(r.status)},'
        f'"backend":{_text(r.backend)},"group":{_text(r.backend_group)},'
        f'"backend_connection_id":{_number(r.backend_connection_id)},'
        f'"reused":{_flag(r.reused)},"retries":{r.retries},'
        f'"connect_attempts":{r.connect_attempts},"connect_failures":{r.connect_failures},'
        f'"connect_wait_seconds":{_number(r.connect_wait_seconds)},'
        f'"forward_seconds":{_number(r.forward_seconds)},'
        f'"first_byte_seconds":{_number(r.first_byte_seconds)},'
        f'"total_seconds":{_number(r.total_seconds)}}}\n'
    )


def backend_connection_json_line(r: BackendConnectionRecord, unix_now: float) -> str:
    """One access-log line for a backend connection that closed (backend reuse modes)."""
    return (
        f'{{"type":"backend_connection","id":{r.id},"worker_pid":{r.worker_pid},'
        f'"time":"{rfc3339(unix_now)}","backend":{_text(r.backend)},'
        f'"address":{_text(r.address)},"local_port":{_number(r.local_port)},'
        f'"connect_wait_seconds":{_number(r.connect_wait_seconds)},'
        f'"tcp_handshake_rtt_seconds":{_number(r.tcp_handshake_rtt_seconds)},'
        f'"requests":{r.requests},"idle_seconds":{r.idle_seconds!r},'
        f'"bytes":{{"in":{r.leg.bytes_in},"out":{r.leg.bytes_out}}},'
        f'"close_cause":{_text(r.close_cause)},'
        f'"leg":{_leg_json(r.leg, teardown_seconds(r.leg))},'
        f'"lifetime_seconds":{_number(r.lifetime_seconds)}}}\n'
    )
