"""Draining long-lived connections gradually: a backend an operator drains (admin API) stops
getting new connections at once (pool.py); with its group's `drain_seconds`, the tunnels it
holds (tcp mode, upgraded connections) are also closed, spread evenly over that window, rather
than left to end on their own (HAProxy's default) or cut all at once (`shutdown sessions`).

Each worker watches the shared BackendTable (`watch`, twice a second while any group drains):
when a backend becomes draining, its tunnels in this worker are put on a schedule, the n-th of
N closed at n/N of the window (FIN on both legs, `close_cause: backend_drained`). A backend
enabled again before its turn keeps the rest.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from balancer.backend.groups import Group
from balancer.backend.state import BackendState
from balancer.facts.causes import BACKEND_DRAINED

if TYPE_CHECKING:
    from balancer.client.listener import OpenConnection

log = logging.getLogger("balancer")

WATCH_SECONDS: Final = 0.5


class Drainer:
    """One worker's view of which backends drain, and its schedule of closes."""

    def __init__(
        self,
        groups: list[tuple[Group, float]],  # each group, and its drain_seconds
        sessions: Callable[[], Iterable[OpenConnection]],  # the worker's open sessions
        call_later: Callable[[float, Callable[[], None]], Any],
    ) -> None:
        self.windows = {id(group.pool): seconds for group, seconds in groups if seconds > 0}
        self.groups = [group for group, seconds in groups if seconds > 0]
        self.sessions = sessions
        self.call_later = call_later
        self.draining: set[int] = set()  # table indexes being drained now
        self._seen = -1

    def check(self) -> None:
        """Read the table if it changed: schedule the tunnels of backends newly draining."""
        if not self.groups:
            return
        table = self.groups[0].pool.table
        if table is None or table.version == self._seen:
            return
        self._seen = table.version
        for group in self.groups:
            pool = group.pool
            for index, state in enumerate(pool.states, pool.first):
                if not table.draining(index):
                    self.draining.discard(index)
                    continue
                if index in self.draining:
                    continue
                self.draining.add(index)
                self._schedule(index, state, self.windows[id(pool)], group)

    def _schedule(self, index: int, state: BackendState, window: float, group: Group) -> None:
        tunnels = [
            session
            for session in self.sessions()
            if session.tunnel and session.fwd.lease is not None
            and session.fwd.lease.state is state
        ]  # fmt: skip
        if not tunnels:
            return
        log.info(
            "backend %s (group %s) draining: closing its %d tunnel(s) in this worker over %.0f s",
            state.name, group.name, len(tunnels), window,
        )  # fmt: skip
        step = window / len(tunnels)
        for n, session in enumerate(tunnels, 1):
            self.call_later(n * step, functools.partial(self._close, index, session))

    def _close(self, index: int, session: OpenConnection) -> None:
        if index in self.draining:  # (enabled again meanwhile: it stays)
            session.close_client(BACKEND_DRAINED)


async def watch(drainer: Drainer) -> None:
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        drainer.check()
