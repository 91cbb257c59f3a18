"""Writes gathered while the loop handles one round of events, sent together at its end.

Writing as each event is handled wakes the reader on the other end once per write: on loopback
and on a busy host that wake-up (often an interrupt to an idle CPU) costs more than the write.
Gathered, the reader wakes once and finds many ready. HAProxy and nginx send the same way:
after the round's reads, not inside them.

Only small writes wait: once a round's queue holds FLUSH_BYTES it is written at once. A bulk
transfer gains nothing from waiting, and the transport must see its bytes while the round
is still reading: its pause_writing() is what stops the reading (libuv reads up to 32 times
256 KiB from one socket in one round; all of it would be queued first).

Order is kept per transport, and a transport's small writes of one round go as one: an HTTP/2
connection whose streams' responses came in the same round (or HTTP/1.1 pipelined answers)
is written to once, where each transport.write() would have been a syscall of its own.
Whoever ends or inspects a transport (write_eof, close, a look at its buffer, a shutdown on
its descriptor) calls `flush()` first; a transport found closing at flush time was aborted
or lost its peer, and its bytes were going nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol


class Writable(Protocol):
    def write(self, data: Any) -> None: ...

    def is_closing(self) -> bool: ...


FLUSH_BYTES: Final = 65536  # asyncio's and uvloop's default write high-water mark


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
        bulk = self._queued_bytes >= FLUSH_BYTES
        self._queued = []
        self._queued_bytes = 0
        if len(queued) == 1 or bulk:  # (bulk: the pieces as they are, not copied into one)
            for transport, data in queued:
                if not transport.is_closing():
                    transport.write(data)
            return
        # One write per transport, in the order each first wrote (dicts keep insertion order).
        # Keyed by the transport itself (hashed by identity): id() would make an int a write.
        gathered: dict[Writable, list[bytes]] = {}
        for transport, data in queued:
            parts = gathered.get(transport)
            if parts is None:
                gathered[transport] = [data]
            else:
                parts.append(data)
        for transport, parts in gathered.items():
            if not transport.is_closing():
                transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def _end_of_round(self) -> None:
        self._scheduled = False
        self.flush()
