"""Fakes of the kernel and the transport a Leg sits on, shared by the connection path's unit
tests: a `FakeSocket` answers TCP_INFO from its fields and records shutdown(); a
`FakeTransport` records what reaches it, in order, on the socket's timeline; a `Clock` is
moved by hand."""

from __future__ import annotations

import struct
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
