"""Fakes of the kernel and the transport a Leg sits on, shared by the connection path's unit
tests: a `FakeSocket` answers TCP_INFO from its fields and records shutdown(); a
`FakeTransport` records what reaches it, in order, on the socket's timeline; a `Clock` is
moved by hand."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

ESTABLISHED = 1


class FakeSocket:
    def __init__(self) -> None:
        self.state = ESTABLISHED
        self.unacked = 0
        self.rtt_seconds = 0.0002
        self.retransmits = 0
        self.acked: int | None = 0
        self.received: int | None = 0
        self.sent: int | None = None
        self.refuse_shutdown = False
        self.closed = False  # the transport closed the descriptor
        self.borrows = 0  # socket objects made on the descriptor (tcpinfo.borrow)
        self.detached = 0
        self.options: list[tuple[int, int, bytes]] = []
        self.log: list[str] = []

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        self.options.append((level, name, value))

    def fileno(self) -> int:
        return -1 if self.closed else 7

    def detach(self) -> int:
        self.detached += 1
        return 7

    def getsockopt(self, level: int, name: int, size: int) -> bytes:
        """TCP_INFO as the kernel lays it out (tcpinfo.info parses it): shorter, as older
        kernels give it, when the later counters are None."""
        raw = bytearray(216 if self.sent is not None else 136 if self.acked is not None else 104)
        struct.pack_into(
            "=B7x16xI40xI28xI", raw, 0,
            self.state, self.unacked, round(self.rtt_seconds * 1e6), self.retransmits,
        )  # fmt: skip
        if self.acked is not None:
            struct.pack_into("=QQ", raw, 120, self.acked, self.received or 0)
        if self.sent is not None:
            struct.pack_into("=QQ", raw, 200, self.sent, 0)
        return bytes(raw)

    def shutdown(self, how: int) -> None:
        if self.refuse_shutdown:
            raise OSError(107, "Transport endpoint is not connected")
        self.log.append("shutdown")


class FakeTransport:
    def __init__(self, sock: FakeSocket) -> None:
        self.sock = sock
        self.log = sock.log  # one timeline for the transport and the kernel
        self.buffer = 0
        self.eof_raises = False
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def write(self, data: bytes) -> None:
        self.log.append(f"write {data.decode()}")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.eof_raises:
            raise OSError(107, "Transport endpoint is not connected")
        self.log.append("write_eof")

    def close(self) -> None:
        self.closing = True
        self.log.append("close")

    def abort(self) -> None:
        self.closing = True
        self.log.append("abort")

    def pause_reading(self) -> None:
        self.log.append("pause_reading")

    def resume_reading(self) -> None:
        self.log.append("resume_reading")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """A client session as its parts see it (client/contract.py): a real record and exchange
    queue, a listener context of plain attributes, and every call the part makes written
    down (`calls`) instead of done. `fail` answers through the flow, as ClientSession's does
    (the flow under test is set as `http`)."""

    def __init__(self, dispatch: bool = False, draining: bool = False) -> None:
        from balancer.client.exchange import Exchanges, ExchangeSettings
        from balancer.facts.record import ConnectionRecord
        from balancer.wire.http1 import HeadLimits

        self.clock = Clock()
        self.published: list[Any] = []
        self.record = ConnectionRecord(1, "http", accepted_at=self.clock(), accepted_unix=1.7e9)
        self.record.client_ip, self.record.client_port, self.record.local_port = (
            "10.0.0.7",
            5555,
            80,
        )
        settings = ExchangeSettings(
            iter(range(1, 1000)).__next__, self.clock, self.published.append, dispatch
        )
        self.exchanges = Exchanges(self.record, settings)
        self.ctx = SimpleNamespace(
            services=SimpleNamespace(idle_readers=[], clock=self.clock),
            settings=SimpleNamespace(
                head_limits=HeadLimits(),
                dispatch=dispatch,
                timeouts=SimpleNamespace(tunnel_idle_seconds=300.0),
            ),
            state=SimpleNamespace(draining=draining, connections=set()),
            router=SimpleNamespace(rules=[]),
        )
        self.client = SimpleNamespace(tls=None)
        self.client_eof = False
        self.backend_eof = False
        self.deadline_kind = ""
        self.destination: tuple[str, int] | None = None
        self.closing = False
        self.tunnel = False
        self.http: Any = None
        self.tls_front: Any = None
        self.written = b""  # to the client
        self.closed: tuple[str, bool] | None = None  # (cause, backend_closes)
        self.aborted = False
        self.blocked: set[str] = set()
        self.tunnel_rest: bytes | None = None
        self.calls: list[str] = []

    def close_client(self, cause: str, backend_closes: bool = False) -> None:
        if not self.closing:
            self.closing = True
            self.closed = (cause, backend_closes)
            self.record.ended_by(cause)

    def abort_client(self) -> None:
        self.closing = self.aborted = True

    def set_deadline(self, kind: str, seconds: float | None = None) -> None:
        self.deadline_kind = kind

    def extend_deadline(self, seconds: float) -> None:
        self.calls.append(f"extend {seconds}")

    def fail(self, error: Any) -> None:
        if self.closing:
            return
        self.record.ended_by(error.reason)
        self.http.fail(error)

    def block_reading(self, why: str) -> None:
        self.blocked.add(why)

    def unblock_reading(self, why: str) -> None:
        self.blocked.discard(why)

    def write_client(self, data: bytes) -> None:
        self.written += data

    def enter_tunnel(self, rest: bytes) -> None:
        self.tunnel, self.tunnel_rest = True, rest


class FakeForwarder:
    """The backend side as the HTTP flow talks to it: what it was given to send, and told."""

    def __init__(self, dispatch: bool = False) -> None:
        self.dispatch = dispatch
        self.group = SimpleNamespace(response_seconds=30.0)
        self.sent = b""
        self.answered_statuses: list[int] = []
        self.calls: list[str] = []

    def send_requests(self, data: bytes) -> None:
        self.sent += data

    def send(self, data: bytes) -> None:
        self.sent += data

    def new_heads(self) -> None:
        self.calls.append("new_heads")

    def answered(self, statuses: list[int]) -> None:
        self.answered_statuses += statuses

    def hung_up(self) -> None:
        self.calls.append("hung_up")
