"""Every connection's next deadline on one loop timer: a timing wheel.

A pending uvloop timer costs ~600 bytes and ~1.5 µs to arm and cancel; with one per connection
that was the largest single item of an idle keep-alive connection after the two transports.
Here each owner is filed under a slot of `resolution` seconds (rounded up: never woken early)
and one loop timer, armed by the caller through `arm`, serves the earliest slot.

Pure: no loop, no clock. `arm(at)` is called whenever the earliest wake-up moves earlier; the
caller calls `pop_due(now)` when its timer fires and arms again at `next_wake()`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

Owner = TypeVar("Owner", bound=Hashable)


class Wakeable(Protocol):
    """What the balancer files on its wheel: woken when its time comes."""

    def __hash__(self) -> int: ...

    def on_deadline(self) -> None: ...


class DeadlineWheel(Generic[Owner]):
    def __init__(self, arm: Callable[[float], None], resolution: float = 0.01) -> None:
        self._arm = arm
        self._resolution = resolution
        self._slots: dict[int, set[Owner]] = {}
        self._slot_of: dict[Owner, int] = {}
        self._heap: list[int] = []  # slot numbers; an emptied slot is dropped when reached
        self._armed: int | None = None  # the slot the caller's timer is set for

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, owner: Owner, at: float) -> None:
        """Wake `owner` at `at` (or up to `resolution` later), instead of any earlier request."""
        slot = math.ceil(at / self._resolution)
        old = self._slot_of.get(owner)
        if old == slot:
            return
        if old is not None:
            self._slots[old].discard(owner)
        self._slot_of[owner] = slot
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = set()
            heapq.heappush(self._heap, slot)
        owners.add(owner)
        if self._armed is None or slot < self._armed:
            self._armed = slot
            self._arm(slot * self._resolution)

    def discard(self, owner: Owner) -> None:
        slot = self._slot_of.pop(owner, None)
        if slot is not None:
            self._slots[slot].discard(owner)

    def pop_due(self, now: float) -> list[Owner]:
        """The owners whose slot has come, each forgotten (schedule again to be woken again)."""
        self._armed = None
        limit = math.floor(now / self._resolution)
        heap = self._heap
        due: list[Owner] = []
        while heap and heap[0] <= limit:
            owners = self._slots.pop(heapq.heappop(heap))
            for owner in owners:
                del self._slot_of[owner]
            due.extend(owners)
        return due

    def next_wake(self) -> float | None:
        """When the earliest owner left is due; the caller's timer is taken to be armed for it."""
        heap = self._heap
        while heap and not self._slots[heap[0]]:
            del self._slots[heapq.heappop(heap)]
        if not heap:
            return None
        self._armed = heap[0]
        return heap[0] * self._resolution
