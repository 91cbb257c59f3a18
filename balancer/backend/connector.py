"""Connecting to a backend: the policy's pick, the attempts, and no Task per connect.

Theory of operation
-------------------
`Connector.start()` begins a connect for its holder (a client session's forwarder, an HTTP/2
stream) and returns the `Connecting`, which the holder keeps to cancel it. An attempt asks
the pool for a backend (the policy picks; the `Lease` counts it), opens a `BackendConnection`
with the loop's create_connection (each of the backend's addresses in turn), and puts the
connect timeout on the shared deadline wheel (no loop timer per attempt). A refusal or a
timeout ejects that backend and the next one is tried, `max_attempts` at most. The holder is
then told once: `connect_done(lease, backend)` or `connect_failed(error)`; after it cancels,
nothing (the attempt under way is closed and its lease released).

    start ──► attempt: pool.acquire ──► create_connection ··· its future ···► step
                 ▲                                                    │
                 └──── refused / timed out (ejected) ◄────────────────┤
                                                    connected ◄───────┘

create_connection is a coroutine. A Task to run it cost every new connection a task, its
first step through call_soon, a wakeup wrapper and two coroutines of ours around it (about
2 µs warm; bench/RESULTS.md, session 14). `Connecting` steps the coroutine itself, as a Task
would: send(None) once the future it waits on is done; to stop it, that future is cancelled
(so the loop's own callbacks on it run) and CancelledError thrown in at the next step, which
makes the coroutine close its transport. An outcome reached before the coroutine's first wait
(no backend ready, say) is told through call_soon: never from inside the holder's own call
to start().
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from balancer.backend.connection import BackendConnection, BackendUser, ConnectAttempts
from balancer.backend.pool import BackendPool, Lease
from balancer.backend.state import BackendState
from balancer.config.schema import Timeouts
from balancer.facts.record import BackendConnectionRecord, failed_on
from balancer.net.deadlines import DeadlineWheel, Wakeable
from balancer.net.writebatch import WriteBatch
from balancer.wire.errors import BackendError, BackendUnreachable, NoBackendAvailable

log = logging.getLogger("balancer")


class ConnectHolder(Protocol):
    """Who started a connect, told its outcome once (unless it cancelled first)."""

    def connect_done(self, lease: Lease, backend: BackendConnection) -> None: ...

    def connect_failed(self, error: BackendError) -> None: ...


class Connector:
    """A group's way to a connected backend (see the module docstring)."""

    def __init__(
        self,
        pool: BackendPool,
        timeouts: Timeouts,
        max_attempts: int,
        deadlines: DeadlineWheel[Wakeable],
        writes: WriteBatch,
        clock: Callable[[], float],
        next_id: Callable[[], int],
        worker_pid: int,
    ) -> None:
        self.pool = pool
        self.timeouts = timeouts
        self.max_attempts = max_attempts  # backends tried per connect (conn-failure retries)
        self.deadlines = deadlines
        self.writes = writes
        self.clock = clock
        self.next_id = next_id  # backend connection ids, per worker
        self.worker_pid = worker_pid

    def start(
        self,
        holder: ConnectHolder,
        user: BackendUser,
        attempts: ConnectAttempts,
        loop: asyncio.AbstractEventLoop,
        first: Lease | None = None,
        avoid: BackendState | None = None,
        key: bytes = b"",
    ) -> Connecting:
        """Connect for `holder`; the connection's events go to `user`, the attempts are
        counted in `attempts`. `first`, if given, is a lease already taken (the policy's
        pick): tried first. `avoid`, if given, is not picked unless no other backend is ready
        (a retry's). `key`: the hash key (policy "hash"): each attempt takes its next backend.
        The holder hears BackendError (NoBackendAvailable, BackendUnreachable) if every
        backend tried refused or timed out, or none was ready."""
        connecting = Connecting(self, holder, user, attempts, loop, first, avoid, key)
        connecting.next_attempt()
        return connecting


class Connecting:
    """One connect under way: its attempts, one after another (see the module docstring)."""

    __slots__ = (
        "attempts", "avoid", "cancelled", "conn", "connector", "coro", "first", "holder",
        "host", "key", "lease", "left", "loop", "tried", "unreachable", "user", "waited", "waiting",
    )  # fmt: skip

    def __init__(
        self,
        connector: Connector,
        holder: ConnectHolder,
        user: BackendUser,
        attempts: ConnectAttempts,
        loop: asyncio.AbstractEventLoop,
        first: Lease | None,
        avoid: BackendState | None,
        key: bytes,
    ) -> None:
        self.connector = connector
        self.holder = holder
        self.user = user
        self.attempts = attempts
        self.loop = loop
        self.first = first
        self.avoid = avoid
        self.key = key
        # Not picked again: the backends that failed an attempt (and `avoid`).
        self.tried: tuple[BackendState, ...] = () if avoid is None else (avoid,)
        self.left = connector.max_attempts
        # Why the last attempt failed: kept as text, since an error kept would hold its
        # traceback, which holds the frames that hold this object (a reference cycle).
        self.unreachable: str | None = None
        self.cancelled = False  # by the holder: it hears nothing more
        # The attempt under way: its lease, its connection, its coroutine and the future that
        # waits on (until it is done), which of the backend's addresses.
        self.lease: Lease | None = None
        self.conn: BackendConnection | None = None
        self.coro: Coroutine[Any, Any, Any] | None = None
        self.waiting: Any = None
        self.host = 0
        self.waited = False  # a coroutine waited once: outcomes come from the loop's calls

    def cancel(self) -> None:
        """The holder is gone: the attempt under way is closed and its lease released."""
        self.cancelled = True
        self._stop()

    def time_out(self) -> None:
        """The attempt's connect deadline passed (BackendConnection.on_deadline): a failure
        like a refusal, and the next backend is tried."""
        self._stop()

    def _stop(self) -> None:
        # Cancelled, the future's done callback steps the coroutine, which is then told to
        # stop; done already, that step is due anyway and does the same.
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()

    # ---- the attempts ----------------------------------------------------------------------

    def next_attempt(self) -> None:
        """Ask the pool for a backend and connect to it; with none left to try, tell why."""
        connector = self.connector
        pool, clock = connector.pool, connector.clock
        lease = None
        if self.left > 0:
            self.left -= 1
            lease, self.first = self.first or pool.acquire(clock(), self.tried, self.key), None
            avoid = self.avoid
            if lease is None and avoid is not None:
                # The only one ready: it, after all.
                self.tried = tuple(state for state in self.tried if state is not avoid)
                self.avoid = None
                lease = pool.acquire(clock(), self.tried, self.key)
        if lease is None:
            if self.unreachable is None:
                self._report(NoBackendAvailable("no backend is ready"))
            else:
                self._report(BackendUnreachable(self.unreachable))
            return
        backend, attempts = lease.state.backend, self.attempts
        attempts.backend = backend.name
        attempts.backend_address = backend.address
        attempts.backend_group = backend.group
        attempts.connect_attempts += 1
        started = clock()
        record = BackendConnectionRecord(
            backend.name, backend.address, started, connector.next_id()
        )
        record.worker_pid = connector.worker_pid
        conn = BackendConnection(self.user, record, connector.writes, clock)
        conn.connecting = self
        connector.deadlines.schedule(conn, started + connector.timeouts.connect_seconds)
        self.lease, self.conn, self.host = lease, conn, 0
        self.coro = self.loop.create_connection(conn, backend.connect_hosts[0], backend.port)
        self._step(None)

    def _next_address(self, lease: Lease, conn: BackendConnection) -> None:
        """The backend's next address, within the attempt and its deadline."""
        backend = lease.state.backend
        self.host += 1
        address = backend.connect_hosts[self.host]
        self.coro = self.loop.create_connection(conn, address, backend.port)
        self._step(None)

    def _step(self, done: object) -> None:
        """Run the attempt's coroutine to its next wait, or to its end; then act on how it
        ended outside the `except` (what follows, up to the holder's own work, would
        otherwise run with that exception as the context of any it raises and keeps)."""
        # Held no longer, the future that is done: an exception it holds (a refusal) gets a
        # traceback through this frame, which would hold the future (a reference cycle).
        del done
        self.waiting = None
        coro, conn, lease = self.coro, self.conn, self.lease
        assert coro is not None and conn is not None and lease is not None
        waiting: Any = None
        ended = ""  # "connected", "refused" (why: its repr) or "stopped" (cancel, deadline)
        why = ""
        try:
            if self.cancelled or conn.connect_timed_out:
                waiting = coro.throw(asyncio.CancelledError())
            else:
                waiting = coro.send(None)
        except StopIteration:
            ended = "connected"
        except OSError as failure:
            ended, why = "refused", repr(failure)
        except asyncio.CancelledError:
            ended = "stopped"
        except BaseException:
            self._abandon(lease, conn)
            raise
        if not ended:
            self.waiting, self.waited = waiting, True
            if waiting is None:  # a bare yield (asyncio.sleep(0)): step again at the next turn
                self.loop.call_soon(self._step, None)
            else:
                waiting.add_done_callback(self._step)
        elif ended == "connected":
            self._connected(lease, conn)
        elif self.cancelled:
            self._abandon(lease, conn)
        elif ended == "stopped":
            self._failed(lease, conn, "TimeoutError('connect timed out')", "timed out")
        elif not conn.connect_timed_out and self.host + 1 < len(lease.state.backend.connect_hosts):
            self._next_address(lease, conn)
        else:
            self._failed(lease, conn, why, "refused")

    def _end_attempt(self, conn: BackendConnection) -> None:
        self.connector.deadlines.discard(conn)
        conn.connecting = None

    def _connected(self, lease: Lease, conn: BackendConnection) -> None:
        connector = self.connector
        connector.deadlines.discard(conn)  # (_end_attempt, inline: once a connection)
        conn.connecting = None
        record = conn.record
        record.connected_at = connector.clock()
        connector.pool.connect_succeeded(lease)
        leg = conn.leg
        local = leg.transport.get_extra_info("sockname")
        if local:
            record.local_port = local[1]
        # (Not from a connection lost as it connected: its descriptor may be another's.)
        info = leg.tcp_info() if leg.usable else None
        if info is not None:
            record.tcp_handshake_rtt_seconds = info.rtt_seconds
        if self.waited:  # (stepped by the loop, not cancelled: see _step)
            self.holder.connect_done(lease, conn)
        else:
            self.loop.call_soon(self._tell, None)

    def _failed(self, lease: Lease, conn: BackendConnection, why: str, how: str) -> None:
        """The attempt was refused or timed out: its backend is ejected, the next tried."""
        connector, attempts = self.connector, self.attempts
        self._end_attempt(conn)
        if conn.leg.transport is not None:  # connected as the deadline passed
            conn.leg.transport.abort()
        backend = lease.state.backend
        self.tried += (lease.state,)
        attempts.connect_failures += 1
        failed_on(attempts, backend.name)
        seconds = connector.pool.connect_failed(lease, connector.clock())
        log.warning(
            "backend %s (%s) ejected for %.0f s by this worker (pid %d): connect %s",
            backend.name, backend.address, seconds, connector.worker_pid, how,
        )  # fmt: skip
        self.unreachable = f"{backend.address}: {why}"
        self.next_attempt()

    def _abandon(self, lease: Lease, conn: BackendConnection) -> None:
        """Cancelled (or failed in a way nobody expected): closed, released, no word."""
        self._end_attempt(conn)
        lease.release()
        if conn.leg.transport is not None:
            conn.leg.transport.abort()

    # ---- telling the holder ----------------------------------------------------------------

    def _report(self, error: BackendError) -> None:
        """Tell the holder no connection came: now, from a step the loop called, or (no
        backend was ready, say) at the loop's next turn."""
        if not self.waited:
            self.loop.call_soon(self._tell, error)
        else:
            self._tell(error)

    def _tell(self, error: BackendError | None) -> None:
        """The outcome (connected if `error` is None), unless the holder has cancelled."""
        lease, conn = self.lease, self.conn
        if self.cancelled:
            if error is None and lease is not None and conn is not None:
                self._abandon(lease, conn)  # connected after all, but not wanted
            return
        if error is not None:
            self.holder.connect_failed(error)
        else:
            assert lease is not None and conn is not None
            self.holder.connect_done(lease, conn)
