"""Writes gathered while the loop handles one round of events, sent together at its end.

Writing as each event is handled wakes the reader on the other end once per write: on loopback
and on a busy host that wake-up (often an interrupt to an idle CPU) costs more than the write.
Gathered, the reader wakes once and finds many ready. HAProxy and nginx send the same way:
after the round's reads, not inside them.

Only small writes wait: once a round's queue holds FLUSH_BYTES it is written at once. A bulk
transfer gains nothing from waiting, and the transport must see its bytes while the round
is still reading: its pause_writing() is what stops the reading (libuv reads up to 32 times
256 KiB from one socket in one round; all of it would be queued first).

Order is kept per transport. Whoever ends or inspects a transport (write_eof, close, a look
at its buffer, a shutdown on its descriptor) calls `flush()` first; a transport found closing
at flush time was aborted or lost its peer, and its bytes were going nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Writable(Protocol):
    def write(self, data: Any) -> None: ...

    def is_closing(self) -> bool: ...


FLUSH_BYTES = 65536  # asyncio's and uvloop's default write high-water mark


class WriteBatch:
    __slots__ = ("_call_soon", "_queued", "_queued_bytes", "_scheduled")

    def __init__(self, call_soon: Callable[[Callable[[], None]], object]) -> None:
        self._call_soon = call_soon
        self._queued: list[tuple[Writable, bytes]] = []
        self._queued_bytes = 0
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._queued)

    def write(self, transport: Writable, data: bytes) -> None:
        """Queue `data` for `transport`, to be written when the loop's round ends."""
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._end_of_round)
        self._queued.append((transport, data))
        self._queued_bytes += len(data)
        if self._queued_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write everything queued now, in order."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        self._queued_bytes = 0
        for transport, data in queued:
            if not transport.is_closing():
                transport.write(data)

    def _end_of_round(self) -> None:
        self._scheduled = False
        self.flush()
