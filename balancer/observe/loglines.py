"""The log lines, rendered here and only here: one JSON access-log line per closed connection,
per request and per pooled backend connection, and the demo's one compact line per
connection for a person watching. Pure: records in, text out.
"""

from __future__ import annotations

import json
from json import encoder
from typing import Final

from balancer.facts.record import (
    PEER,
    BackendConnectionRecord,
    ConnectionRecord,
    H2Facts,
    LegTeardown,
    RequestRecord,
    rfc3339,
    teardown_seconds,
)

# (Final: docs/ARCHITECTURE.md, "The compiled build".)
_encode: Final = encoder.encode_basestring_ascii
_LEG_PEER: Final = {"client": "client", "backend": "backend"}
_KIND: Final = {"fin": "FIN", "rst": "RST", "close_notify": "close_notify"}


def _leg_words(name: str, leg: LegTeardown) -> str:
    """`client leg: client closed first (FIN)`: who started the close, and how it ended."""
    who = _LEG_PEER[name] if leg.initiator == PEER else leg.initiator or "?"
    return f"{name} leg: {who} closed first ({_KIND[leg.kind]})"


def connection_line(r: ConnectionRecord) -> str:
    """One compact line per closed connection, for a person watching (`balancer demo`)."""
    parts = [f"#{r.id} {r.listener} {r.client_ip}:{r.client_port}"]
    if r.h2 is not None:  # (each stream has a backend of its own: the request lines say which)
        parts[0] += f" -> HTTP/2, {r.h2.streams} stream{'' if r.h2.streams == 1 else 's'}"
    else:
        parts[0] += f" -> {r.backend}" if r.backend is not None else " -> (no backend)"
    if r.tls_failure is not None:
        parts.append(f"TLS failed: {r.tls_failure}")
    elif r.tls_finished_at is not None:
        handshake = (r.tls_handshake_seconds or 0) * 1000
        resumed = "resumed" if r.tls_resumed else "full"
        parts.append(f"TLS {r.tls_version} {handshake:.2f} ms ({resumed})")
    if r.h2 is None:
        parts.append(f"{r.requests} request{'' if r.requests == 1 else 's'}")
    parts.append(_leg_words("client", r.client_leg))
    if r.connected_at is not None:
        parts.append(_leg_words("backend", r.backend_leg))
    parts.append(f"{r.close_cause}, {(r.lifetime_seconds or 0) * 1000:.1f} ms")
    return " | ".join(parts)


# The access-log line: `to_dict()` as compact JSON, written out directly from the records'
# fields (no property calls). json.dumps of the nested dict costs about three times as much,
# per connection; a unit test holds the two equal. No `!r` or format spec inside these
# f-strings: mypyc then builds each from its pieces in one step, where either makes it fall
# back to str.format for every field (28 calls a connection); `repr(x)` costs the pure build
# about 15 ns more than `{x!r}`.


class _JSONNames(dict[str | None, str]):
    """JSON strings of the names every line repeats (listeners, backends, groups, addresses,
    close causes, who closed first), encoded once: a lookup is a dict hit, not a call.
    Only values from the configuration and the vocabularies go through it (a client's
    address or SNI never does); emptied past NAMES_KEPT all the same."""

    def __missing__(self, value: str | None) -> str:
        if len(self) > _NAMES_KEPT:
            self.clear()
            self[None] = "null"
        text = self[value] = "null" if value is None else _encode(value)
        return text


_NAMES_KEPT: Final = 4096
_name: Final = _JSONNames({None: "null"})
_FLAG: Final = {None: "null", True: "true", False: "false"}
_EMPTY_LEG: Final = LegTeardown()  # a backend leg that never connected


def _text(value: str | None) -> str:
    return "null" if value is None else _encode(value)


def _host(value: bytes | None) -> str:
    """A request's Host as sent (cut at 200 characters, as targets are), or null."""
    return "null" if value is None else _encode(value[:200].decode("latin-1"))


def _names(names: list[str] | None) -> str:
    return "[]" if not names else "[" + ",".join(map(_encode, names)) + "]"


def _whole(value: int | None) -> str:
    """An integer or null. Not _number: a compiled build turns an int passed as a float into
    one (`200.0`)."""
    return "null" if value is None else str(value)


def _number(value: float | None) -> str:
    return "null" if value is None else repr(value)


def _leg_json(leg: LegTeardown) -> str:
    return (
        f'{{"initiator":{_name[leg.initiator]},"first_fin":{_name[leg.first_fin]},'
        f'"kind":"{leg.kind}","rst_received":{_FLAG[leg.rst_received]},'
        f'"rst_sent":{_FLAG[leg.rst_sent]},'
        f'"close_notify_received":{_FLAG[leg.close_notify_received]},'
        f'"close_notify_sent":{_FLAG[leg.close_notify_sent]},'
        f'"retransmits":{"null" if leg.retransmits is None else leg.retransmits},'
        f'"teardown_seconds":{_number(teardown_seconds(leg))}}}'
    )


def json_line(r: ConnectionRecord) -> str:
    """One line of JSON (with its newline): the record as `to_dict()` has it."""
    if r.tls_started_at is None and r.tls_sni is None:  # (SNI alone: passed through)
        tls = "null"
    else:
        started, finished = r.tls_started_at, r.tls_finished_at
        handshake = None if started is None or finished is None else finished - started
        tls = (
            f'{{"handshake_seconds":{_number(handshake)},'
            f'"version":{_name[r.tls_version]},"cipher":{_name[r.tls_cipher]},'
            f'"sni":{_text(r.tls_sni)},"alpn":{_text(r.tls_alpn)},'
            f'"resumed":{_FLAG[r.tls_resumed]},"failure":{_text(r.tls_failure)}}}'
        )
    backend_record = r.backend_connection
    backend_leg = _EMPTY_LEG if backend_record is None else backend_record.leg
    if r.backend is None:
        backend = leg = "null"
    else:
        if backend_record is None:
            local_port = connect_wait = rtt = None
        else:
            connected_at, local_port = backend_record.connected_at, backend_record.local_port
            connect_wait = (
                None if connected_at is None else connected_at - backend_record.connect_started_at
            )
            rtt = backend_record.tcp_handshake_rtt_seconds
        backend = (
            f'{{"name":{_name[r.backend]},"group":{_name[r.backend_group]},'
            f'"address":{_name[r.backend_address]},'
            f'"local_port":{"null" if local_port is None else local_port},'
            f'"connect_wait_seconds":{_number(connect_wait)},'
            f'"tcp_handshake_rtt_seconds":{_number(rtt)}}}'
        )
        leg = _leg_json(backend_leg)
    first_request_at, closed_at = r.first_request_at, r.closed_at
    client_leg = r.client_leg
    return (
        f'{{"type":"connection","id":{r.id},"worker_pid":{r.worker_pid},'
        f'"listener":{_name[r.listener]},'
        f'"start":{repr(r.accepted_unix)},"time":"{rfc3339(r.accepted_unix)}",'  # noqa: RUF010
        f'"client":{{"ip":{_text(r.client_ip)},"port":{r.client_port},'
        f'"proxied_by":{_text(r.proxied_by)}}},'
        f'"local_port":{r.local_port},'
        f'"tcp_handshake_rtt_seconds":{_number(r.tcp_handshake_rtt_seconds)},'
        f'"tls":{tls},"h2":{"null" if r.h2 is None else _h2_json(r.h2)},'
        f'"backend":{backend},'
        f'"connect_attempts":{r.connect_attempts},"connect_failures":{r.connect_failures},'
        f'"retries":{r.retries},"failed_backends":{_names(r.failed_backends)},'
        f'"requests":{r.requests},"first_request_seconds":'
        f"{'null' if first_request_at is None else repr(first_request_at - r.accepted_at)},"
        f'"error_status":{"null" if r.error_status is None else r.error_status},'
        f'"bytes":{{"client_in":{client_leg.bytes_in},"client_out":{client_leg.bytes_out},'
        f'"backend_in":{backend_leg.bytes_in},"backend_out":{backend_leg.bytes_out}}},'
        f'"close_cause":{_name[r.close_cause]},'
        f'"client_leg":{_leg_json(client_leg)},"backend_leg":{leg},"lifetime_seconds":'
        f"{'null' if closed_at is None else repr(closed_at - r.accepted_at)}}}\n"
    )


def _h2_json(h2: H2Facts) -> str:
    """(HTTP/2 connections only: the general encoder is fine there.)"""
    return json.dumps(h2.to_dict(), separators=(",", ":"))


def request_json_line(r: RequestRecord) -> str:
    """One access-log line (with its newline) for a request: `"type":"request"`."""
    connection = r.connection
    return (
        f'{{"type":"request","id":{r.id},"connection_id":{connection.id},'
        f'"worker_pid":{connection.worker_pid},"listener":{_text(connection.listener)},'
        f'"time":"{rfc3339(r.head_unix)}",'
        f'"client":{{"ip":{_text(connection.client_ip)},"port":{connection.client_port}}},'
        f'"method":{_text(r.method.decode("latin-1"))},"target":{_text(r.target_shown)},'
        f'"host":{_host(r.host)},"stream":{_whole(r.stream_id)},"status":{_whole(r.status)},'
        f'"bytes":{{"request_body":{r.request_body_bytes},'
        f'"response":{_whole(r.response_bytes)}}},'
        f'"backend":{_text(r.backend)},"group":{_text(r.backend_group)},'
        f'"backend_connection_id":{_whole(r.backend_connection_id)},'
        f'"reused":{_FLAG[r.reused]},"retries":{r.retries},'
        f'"failed_backends":{_names(r.failed_backends)},'
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
        f'"address":{_text(r.address)},"local_port":{_whole(r.local_port)},'
        f'"connect_wait_seconds":{_number(r.connect_wait_seconds)},'
        f'"tcp_handshake_rtt_seconds":{_number(r.tcp_handshake_rtt_seconds)},'
        f'"requests":{r.requests},"idle_seconds":{repr(r.idle_seconds)},'  # noqa: RUF010
        f'"bytes":{{"in":{r.leg.bytes_in},"out":{r.leg.bytes_out}}},'
        f'"close_cause":{_text(r.close_cause)},'
        f'"leg":{_leg_json(r.leg)},'
        f'"lifetime_seconds":{_number(r.lifetime_seconds)}}}\n'
    )
