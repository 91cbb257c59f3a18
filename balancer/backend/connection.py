"""The backend side: a backend TCP connection with a life of its own, and the idle pool.

Theory of operation
-------------------
A `BackendConnection` is the protocol of one backend TCP connection. It owns its `Leg` (the
teardown facts, the kernel's byte counts) and its `BackendConnectionRecord`, and reports every
event to whoever uses it now through the small `BackendUser` protocol: it never reaches into
a client session. In the reuse modes a connection belongs to the worker's `IdlePool` between
exchanges (the pool is then its user): see IdlePool for how it is kept, read and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from balancer.backend.pool import Lease
from balancer.config.schema import Upstream
from balancer.facts.causes import (
    CONN_BACKEND_CLOSED,
    CONN_BACKEND_RESET,
    CONN_IDLE_TIMEOUT,
    CONN_MAX_REQUESTS,
    CONN_MEMBER_LEFT,
    CONN_POOL_FULL,
    CONN_SHUTDOWN,
    CONN_STRAY_BYTES,
)
from balancer.facts.record import BackendConnectionRecord
from balancer.net.deadlines import DeadlineWheel, Wakeable
from balancer.net.legs import Leg
from balancer.net.writebatch import WriteBatch

log = logging.getLogger("balancer")


class ConnectAttempts(Protocol):
    """Where the connector counts its attempts: a connection's record, or a request's."""

    backend: str | None
    backend_address: str | None
    backend_group: str | None
    connect_attempts: int
    connect_failures: int
    failed_backends: list[str] | None


class BackendUser(Protocol):
    """What a backend connection reports to whoever holds it now: the client session it
    serves, the idle pool between exchanges, or (a routed listener's group under reuse
    never) the forwarder that keeps it for its client's next request."""

    def on_backend_data(self, backend: BackendConnection, data: bytes) -> None: ...

    def on_backend_eof(self, backend: BackendConnection) -> None: ...

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None: ...

    def block_reading(self, why: str) -> None: ...

    def unblock_reading(self, why: str) -> None: ...


class Attempt(Protocol):
    """A connect under way (connector.Connecting), as its connection's deadline sees it."""

    def time_out(self) -> None: ...


class BackendConnection(asyncio.Protocol):
    """One backend TCP connection: its Leg and record; events go to its user."""

    __slots__ = (
        "connect_timed_out",
        "connecting",
        "idle_since",
        "leg",
        "lost_early",
        "pool",
        "pool_wake",
        "record",
        "user",
    )

    def __init__(
        self,
        user: BackendUser,
        record: BackendConnectionRecord,
        writes: WriteBatch,
        clock: Callable[[], float],
    ) -> None:
        self.user = user
        self.record = record
        self.leg = Leg(record.leg, writes, clock)
        self.connecting: Attempt | None = None  # the connect under way (connector.py)
        self.connect_timed_out = False
        self.idle_since: float | None = None  # in the idle pool since
        self.pool: IdlePool | None = None  # the pool it returns to between exchanges
        self.pool_wake: float | None = None  # when the pool's deadline on the wheel wakes it
        # Lost between its connect and its taking up by the session: whether by a reset (the
        # leg's facts taken as it was lost); the session handles it when it takes it up.
        self.lost_early: bool | None = None

    def __call__(self) -> BackendConnection:
        """Its own protocol factory (create_connection's first argument): no closure made
        per connect."""
        return self

    def on_deadline(self) -> None:
        """The connect timeout (see connector.py) stops the attempt; any other deadline is
        the pool's (idle timeout, linger)."""
        if self.connecting is not None:
            self.connect_timed_out = True
            self.connecting.time_out()
        elif self.pool is not None:
            self.pool.on_backend_deadline(self)

    # ---- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.leg.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.leg.received(len(data))
        self.user.on_backend_data(self, data)

    def eof_received(self) -> bool:
        self.user.on_backend_eof(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.user.on_backend_lost(self, exc)
        self.leg.give_back()  # if the user had no use for the leg's end (an abandoned attempt)

    def pause_writing(self) -> None:
        self.user.block_reading("backend_full")

    def resume_writing(self) -> None:
        self.user.unblock_reading("backend_full")

    @property
    def reading_paused(self) -> bool:
        """Paused because the client's write buffer is full (flow control)."""
        return "client_full" in self.leg.paused_for


class IdlePool:
    """Backend connections between exchanges (reuse modes), and those being closed.

    Theory of operation: a session hands a connection back at a response boundary with
    nothing pending (`put`), or gives up one it cannot reuse (`close`). Idle connections are
    kept per backend, taken most recent first (the warmest; the rest age out), closed after
    `idle_timeout_seconds`, past `max_requests_per_connection`, or beyond what the backend
    may keep idle: `idle_per_backend`, or more while as many were busy at once lately (see
    `put`), as HAProxy keeps idle connections by recent need, so a load past
    `idle_per_backend` requests at once reuses its connections instead of churning them.
    An idle connection is still read: the backend's FIN, an RST or stray bytes close it at
    once, and its record says which. Closing is by FIN and linger, as on every leg; when a
    connection is lost its record is published.
    """

    def __init__(
        self,
        settings: Upstream,
        linger_seconds: float,
        deadlines: DeadlineWheel[Wakeable],
        clock: Callable[[], float],
        publish: Callable[[BackendConnectionRecord], None],
        call_later: Callable[[float, Callable[[], None]], Any],
    ) -> None:
        self.settings = settings
        self.linger_seconds = linger_seconds
        self.deadlines = deadlines
        self.clock = clock
        self.publish = publish
        self.call_later = call_later
        self.idle: dict[str, list[BackendConnection]] = {}
        # Per backend: the most connections busy at once in this window and the one before
        # (each window idle_timeout_seconds long), and when this window began.
        self.busy_peaks: dict[str, list[float]] = {}
        self.closing: set[BackendConnection] = set()
        self.draining = False
        self._all_closed: asyncio.Event | None = None  # set when shutdown's closes are done

    def idle_count(self) -> int:
        return sum(len(conns) for conns in self.idle.values())

    def take(self, backend: str, address: str) -> BackendConnection | None:
        """The most recently idle connection to `backend`, now the caller's; None if none.
        One to another address (a discovered slot whose member changed) is closed: that
        member left."""
        conns = self.idle.get(backend)
        while conns:
            conn = conns.pop()  # its idle deadline stays filed: see on_backend_deadline
            self._idle_ended(conn)
            if conn.record.address != address:
                self.close(conn, CONN_MEMBER_LEFT)
            elif conn.leg.usable:
                return conn
        return None

    def _idle_ended(self, conn: BackendConnection) -> None:
        since, conn.idle_since = conn.idle_since, None
        if since is not None:
            conn.record.idle_seconds += self.clock() - since

    def put(self, conn: BackendConnection, others_busy: int = 0) -> None:
        """Keep a connection whose exchange ended cleanly, or close it if it may not stay.

        `others_busy`: the backend's other connections busy now (its leases this worker,
        this one's released). The backend keeps `idle_per_backend` idle, or as many as were
        busy at once within the last idle timeout or two, whichever is more: idle
        connections never outnumber what the backend lately served at once."""
        conn.user = conn.pool = self
        record, settings = conn.record, self.settings
        conns = self.idle.setdefault(record.backend, [])
        now = self.clock()
        peaks = self.busy_peaks.get(record.backend)
        if peaks is None or now - peaks[0] >= settings.idle_timeout_seconds:
            peaks = self._next_window(record.backend, peaks, now)
        if others_busy >= peaks[1]:
            peaks[1] = others_busy + 1  # (with this one, busy until now)
        if self.draining:
            self.close(conn, CONN_SHUTDOWN)
        elif record.requests >= settings.max_requests_per_connection:
            self.close(conn, CONN_MAX_REQUESTS)
        elif len(conns) >= settings.idle_per_backend and len(conns) >= max(peaks[1], peaks[2]):
            self.close(conn, CONN_POOL_FULL)
        elif conn.leg.usable:
            conn.idle_since = now
            conns.append(conn)
            conn.leg.resume("client_full")  # read while idle: a FIN or stray bytes must be seen
            # Filed once: a connection taken and put back between wake-ups keeps its earlier
            # wake-up, which files it again for the rest of its time (two wheel operations
            # per request saved in the reuse modes' keep-alive traffic).
            if conn.pool_wake is None:
                self._wake(conn, now + settings.idle_timeout_seconds)

    def _next_window(self, backend: str, peaks: list[float] | None, now: float) -> list[float]:
        """A new window of busy counts for `backend`: the one just over becomes the last
        (forgotten if it was not the one just before)."""
        window = self.settings.idle_timeout_seconds
        last = peaks[1] if peaks is not None and now - peaks[0] < 2 * window else 0.0
        peaks = self.busy_peaks[backend] = [now, 0.0, last]
        return peaks

    def close(self, conn: BackendConnection, cause: str) -> None:
        """End a connection by FIN and linger; its record is published when it is lost."""
        conn.user = conn.pool = self
        conn.record.ended_by(cause)
        if not conn.leg.usable:
            return
        self._forget_idle(conn)
        self.closing.add(conn)
        conn.leg.read_to_end()
        if conn.leg.shutdown():
            self._wake(conn, self.clock() + self.linger_seconds)

    def _wake(self, conn: BackendConnection, at: float) -> None:
        conn.pool_wake = at
        self.deadlines.schedule(conn, at)

    async def close_all(self, timeout: float) -> None:
        """Shutdown: every idle connection ends now (later returns are closed too); wait, at
        most `timeout`, until each is closed and its record published."""
        self.draining = True
        for conns in list(self.idle.values()):
            for conn in list(conns):
                self.close(conn, CONN_SHUTDOWN)
        if self.closing:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout)

    def _forget_idle(self, conn: BackendConnection) -> None:
        conns = self.idle.get(conn.record.backend)
        if conns and conn in conns:
            conns.remove(conn)
        self.deadlines.discard(conn)
        conn.pool_wake = None
        self._idle_ended(conn)

    # ---- BackendUser: events of idle and closing connections -----------------------------

    def on_backend_data(self, conn: BackendConnection, data: bytes) -> None:
        if conn not in self.closing:  # a backend may not speak unasked
            self.close(conn, CONN_STRAY_BYTES)

    def on_backend_eof(self, conn: BackendConnection) -> None:
        if conn in self.closing:
            conn.leg.peer_fin_while_closing(self.call_later)
            return
        conn.leg.peer_fin()
        self.close(conn, CONN_BACKEND_CLOSED)  # our FIN goes at once: theirs is in

    def on_backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None:
        if conn.leg.lost(exc):
            conn.record.ended_by(CONN_BACKEND_RESET)
        self.retire(conn)

    def give_up(self, conn: BackendConnection, cause: str | None) -> None:
        """A connection its holder will not use again: closed by FIN and linger (if its leg
        is still there) or, already lost, its record published now; `cause` is why (None:
        the backend's FIN, or its RST if the leg is gone)."""
        if cause is None:
            cause = CONN_BACKEND_CLOSED if conn.leg.usable else CONN_BACKEND_RESET
        if conn.leg.usable:
            self.close(conn, cause)
        else:
            conn.record.ended_by(cause)
            self.retire(conn)

    def retire(self, conn: BackendConnection) -> None:
        """A connection is gone (its leg lost, by whoever held it): publish its record."""
        self._forget_idle(conn)
        self.closing.discard(conn)
        conn.record.closed_at = self.clock()
        self.publish(conn.record)
        if self._all_closed is not None and not self.closing:
            self._all_closed.set()

    def on_backend_deadline(self, conn: BackendConnection) -> None:
        """Woken by the wheel: the linger of a closing connection is over, or an idle one's
        timeout may be (if it was used since, it is filed again for the rest)."""
        conn.pool_wake = None
        if conn in self.closing:
            if conn.leg.usable:
                conn.leg.linger_over()
        elif conn.idle_since is not None:
            due = conn.idle_since + self.settings.idle_timeout_seconds
            if self.clock() >= due:
                self.close(conn, CONN_IDLE_TIMEOUT)
            else:
                self._wake(conn, due)

    def block_reading(self, why: str) -> None:
        pass  # nothing is written to an idle connection

    def unblock_reading(self, why: str) -> None:
        pass


class KeptConnection:
    """A backend connection a client connection keeps between its requests (reuse never:
    its own, as HAProxy's http-reuse never keeps it), with its lease, for its next request
    to the same group. Meanwhile its events come here (BackendUser): bytes unasked, the
    backend's FIN or RST end it, and `forget` tells its holder."""

    __slots__ = ("conn", "forget", "idle", "lease")

    def __init__(
        self,
        conn: BackendConnection,
        lease: Lease,
        idle: IdlePool,
        forget: Callable[[KeptConnection], None],
    ) -> None:
        self.conn = conn
        self.lease = lease
        self.idle = idle
        self.forget = forget
        conn.user = self

    def let_go(self, cause: str) -> None:
        """Not used again: its lease is released; the pool closes it and publishes its record
        with `cause`."""
        self.forget(self)
        self.lease.release()
        self.idle.give_up(self.conn, cause)

    def on_backend_data(self, backend: BackendConnection, data: bytes) -> None:
        self.let_go(CONN_STRAY_BYTES)  # bytes with no request out: not to be trusted again

    def on_backend_eof(self, backend: BackendConnection) -> None:
        backend.leg.peer_fin()
        self.let_go(CONN_BACKEND_CLOSED)  # the backend closed it idle

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None:
        reset = backend.leg.lost(exc)  # (read now: the descriptor is still its own)
        self.let_go(CONN_BACKEND_RESET if reset else CONN_BACKEND_CLOSED)

    def block_reading(self, why: str) -> None:
        pass  # nothing is written to a kept connection between requests

    def unblock_reading(self, why: str) -> None:
        pass
