"""Writes gathered while the loop handles one round of events, sent together at its end.

Writing as each event is handled wakes the reader on the other end once per write: on loopback
and on a busy host that wake-up (often an interrupt to an idle CPU) costs more than the write.
Gathered, the reader wakes once and finds many ready. HAProxy and nginx send the same way:
after the round's reads, not inside them.

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


class WriteBatch:
    __slots__ = ("_call_soon", "_queued", "_scheduled")

    def __init__(self, call_soon: Callable[[Callable[[], None]], object]) -> None:
        self._call_soon = call_soon
        self._queued: list[tuple[Writable, bytes]] = []
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._queued)

    def write(self, transport: Writable, data: bytes) -> None:
        """Queue `data` for `transport`, to be written when the loop's round ends."""
        if not self._scheduled:
            self._scheduled = True
            self._call_soon(self._end_of_round)
        self._queued.append((transport, data))

    def flush(self) -> None:
        """Write everything queued now, in order."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        for transport, data in queued:
            if not transport.is_closing():
                transport.write(data)

    def _end_of_round(self) -> None:
        self._scheduled = False
        self.flush()
