"""The backend side: a backend TCP connection with a life of its own, and the connector.

Theory of operation
-------------------
`Connector.connect()` asks the pool for a backend (the policy picks; `Lease` counts it),
connects, and on refusal or timeout marks that backend down and tries the next, at most
`max_connect_attempts` times. The connect timeout is a deadline on the shared wheel that
cancels the connecting task (cheaper than asyncio.timeout: no loop timer per attempt).

A `BackendConnection` is the protocol of one backend TCP connection. It owns its `Leg` (the
teardown facts, the kernel's byte counts) and its `BackendConnectionRecord`, and reports every
event to whoever uses it now through the small `UpstreamUser` protocol: it never reaches into
a client session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from balancer import tcpinfo
from balancer.config import Limits, Timeouts
from balancer.deadlines import DeadlineWheel, Wakeable
from balancer.errors import BackendError, BackendUnreachable, NoBackendAvailable
from balancer.legs import Leg
from balancer.pool import BackendPool, Lease
from balancer.record import BackendConnectionRecord, ConnectionRecord
from balancer.writebatch import WriteBatch


class UpstreamUser(Protocol):
    """What a backend connection reports to the client session it serves."""

    def on_backend_data(self, data: bytes) -> None: ...

    def on_backend_eof(self) -> None: ...

    def on_backend_lost(self, backend: BackendConnection, exc: Exception | None) -> None: ...

    def block_reading(self, why: str) -> None: ...

    def unblock_reading(self, why: str) -> None: ...


class BackendConnection(asyncio.Protocol):
    """One backend TCP connection: its Leg and record; events go to its user."""

    __slots__ = ("connect_task", "connect_timed_out", "leg", "reading_paused", "record", "user")

    def __init__(
        self,
        user: UpstreamUser,
        record: BackendConnectionRecord,
        writes: WriteBatch,
        clock: Callable[[], float],
    ) -> None:
        self.user = user
        self.record = record
        self.leg = Leg(record.leg, writes, clock)
        self.connect_task: asyncio.Task[Any] | None = None
        self.connect_timed_out = False
        self.reading_paused = False  # paused because the client's write buffer is full

    def on_deadline(self) -> None:
        """The connect timeout (see Connector.connect): stop the attempt."""
        if self.connect_task is not None:
            self.connect_timed_out = True
            self.connect_task.cancel()

    # ---- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.leg.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.leg.facts.bytes_in += len(data)
        self.user.on_backend_data(data)

    def eof_received(self) -> bool:
        self.user.on_backend_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.user.on_backend_lost(self, exc)

    def pause_writing(self) -> None:
        self.user.block_reading("backend_full")

    def resume_writing(self) -> None:
        self.user.unblock_reading("backend_full")

    # ---- flow control from the client's side -----------------------------------------------

    def pause_reading(self) -> None:
        if self.leg.usable and not self.reading_paused:
            self.reading_paused = True
            self.leg.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.leg.usable:
            self.reading_paused = False
            self.leg.transport.resume_reading()


class Connector:
    """Pick a backend, connect, and on refusal or timeout try the next one."""

    def __init__(
        self,
        pool: BackendPool,
        timeouts: Timeouts,
        limits: Limits,
        deadlines: DeadlineWheel[Wakeable],
        writes: WriteBatch,
        clock: Callable[[], float],
    ) -> None:
        self.pool = pool
        self.timeouts = timeouts
        self.limits = limits
        self.deadlines = deadlines
        self.writes = writes
        self.clock = clock

    async def connect(
        self,
        user: UpstreamUser,
        attempts: ConnectionRecord,
        task: asyncio.Task[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[Lease, BackendConnection]:
        """A connected backend and its lease; the attempts are counted in `attempts`.

        Raises BackendError (no backend ready, or every one tried refused or timed out).
        `task` is the task running this coroutine: the connect deadline cancels it.
        """
        pool, clock = self.pool, self.clock
        tried: list[Any] = []
        error: BackendError = NoBackendAvailable("no backend is ready")
        for _ in range(self.limits.max_connect_attempts):
            lease = pool.acquire(clock(), tried)
            if lease is None:
                break
            backend = lease.state.backend
            tried.append(lease.state)
            attempts.backend = backend.name
            attempts.backend_address = backend.address
            attempts.connect_attempts += 1
            started = clock()
            record = BackendConnectionRecord(backend.name, backend.address, started)
            conn = BackendConnection(user, record, self.writes, clock)
            conn.connect_task = task
            self.deadlines.schedule(conn, started + self.timeouts.connect_seconds)
            try:
                try:
                    await _connect_any(loop, conn, backend.connect_hosts, backend.port)
                except asyncio.CancelledError:
                    if not conn.connect_timed_out:
                        raise
                    task.uncancel()
                    if conn.leg.transport is not None:  # connected as the deadline passed
                        conn.leg.transport.abort()
                    raise TimeoutError("connect timed out") from None
                finally:
                    self.deadlines.discard(conn)
                    conn.connect_task = None
            except (OSError, TimeoutError) as failure:
                attempts.connect_failures += 1
                pool.connect_failed(lease, clock())
                error = BackendUnreachable(f"{backend.address}: {failure!r}")
                continue
            except BaseException:
                lease.release()
                if conn.leg.transport is not None:
                    conn.leg.transport.abort()
                raise
            record.connected_at = clock()
            pool.connect_succeeded(lease)
            transport = conn.leg.transport
            local = transport.get_extra_info("sockname")
            if local:
                record.local_port = local[1]
            info = tcpinfo.read(conn.leg.sock)
            if info is not None:
                record.tcp_handshake_rtt_seconds = info.rtt_seconds
            return lease, conn
        raise error


async def _connect_any(
    loop: asyncio.AbstractEventLoop, conn: BackendConnection, hosts: tuple[str, ...], port: int
) -> None:
    """Connect to the first of `hosts` (one backend's addresses) that accepts."""

    def factory() -> BackendConnection:
        return conn

    for host in hosts[:-1]:
        try:
            await loop.create_connection(factory, host, port)
            return
        except OSError:
            continue  # the next address, within the same attempt and deadline
    await loop.create_connection(factory, hosts[-1], port)
