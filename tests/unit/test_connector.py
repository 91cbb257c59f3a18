"""The connector steps create_connection's coroutine itself (no Task): the outcomes a holder
hears, once each, over a fake loop whose connects finish when the test says (no sockets)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from balancer.backend.connection import BackendConnection
from balancer.backend.connector import Connector
from balancer.backend.policies import RoundRobin
from balancer.backend.pool import BackendPool, Lease
from balancer.backend.state import Backend
from balancer.facts.record import ConnectionRecord
from balancer.net.deadlines import DeadlineWheel
from balancer.net.writebatch import WriteBatch
from balancer.wire.errors import BackendError, BackendUnreachable, NoBackendAvailable
from tests.fakes import FakeSocket, FakeTransport

# The connector is a compiled class in a compiled build, and these fakes are not its types.
pytestmark = pytest.mark.incompatible_with_mypyc


class Connects:
    """create_connection as a loop's, each connect waiting on a future the test settles."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: list[asyncio.Future[None]] = []
        self.hosts: list[str] = []
        self.closed: list[str] = []  # connects whose coroutine cleaned up (stopped or failed)

    async def create_connection(self, protocol: Any, host: str, port: int) -> Any:
        self.hosts.append(host)
        future = self.loop.create_future()
        self.waiting.append(future)
        transport = FakeTransport(FakeSocket())
        try:
            await future
        except BaseException:
            self.closed.append(host)
            raise
        conn = protocol()
        conn.connection_made(transport)
        return transport, conn

    def call_soon(self, callback: Any, *args: Any) -> Any:
        return self.loop.call_soon(callback, *args)


class Holder:
    def __init__(self) -> None:
        self.told: list[Any] = []

    def connect_done(self, lease: Lease, backend: BackendConnection) -> None:
        self.told.append(("done", lease.state.name, backend))

    def connect_failed(self, error: BackendError) -> None:
        self.told.append(("failed", error))


def setup(
    backends: int = 2, attempts: int = 2
) -> tuple[Connector, Connects, Holder, ConnectionRecord]:
    loop = asyncio.get_running_loop()
    pool = BackendPool(
        [Backend(f"b{i}", "127.0.0.1", 8000 + i) for i in range(backends)], RoundRobin(), 10
    )
    timeouts = SimpleNamespace(connect_seconds=5.0)
    wheel: DeadlineWheel[Any] = DeadlineWheel(lambda at: None)
    connector = Connector(
        pool, timeouts, attempts, wheel, WriteBatch(loop.call_soon),  # type: ignore[arg-type]
        loop.time, iter(range(1, 100)).__next__, 4242,
    )  # fmt: skip
    record = ConnectionRecord(1, "http", accepted_at=loop.time(), accepted_unix=1.7e9)
    return connector, Connects(loop), Holder(), record


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_refusal_ejects_that_backend_and_the_next_is_tried() -> None:
    connector, loop, holder, record = setup()
    attempt = connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    loop.waiting[0].set_exception(ConnectionRefusedError(111, "refused"))
    await turns()
    assert holder.told == [] and len(loop.waiting) == 2  # on to the next, untold
    loop.waiting[1].set_result(None)
    await turns()
    ((what, name, conn),) = holder.told
    assert (what, name) == ("done", "b1") and conn.connecting is None
    assert (record.connect_attempts, record.connect_failures) == (2, 1)
    assert record.failed_backends == ["b0"] and record.backend == "b1"
    states = connector.pool.states
    assert states[0].connect_failures_total == 1 and states[0].active == 0
    assert states[1].active == 1  # the lease the holder now has
    assert len(connector.deadlines) == 0  # each attempt's deadline gone with it
    assert conn.record.connected_at is not None
    attempt.cancel()  # told already: nothing more happens
    await turns()
    assert len(holder.told) == 1 and states[1].active == 1


async def test_a_connect_past_its_deadline_fails_like_a_refusal() -> None:
    connector, loop, holder, record = setup()
    connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    (conn,) = connector.deadlines.pop_due(1e9)  # the deadline comes
    conn.on_deadline()
    await turns()
    assert loop.closed == ["127.0.0.1"] and loop.waiting[0].cancelled()
    assert record.connect_failures == 1 and len(loop.waiting) == 2
    loop.waiting[1].set_exception(ConnectionRefusedError(111, "refused"))
    await turns()
    ((what, error),) = holder.told  # both tried: the last one's failure told
    assert what == "failed" and isinstance(error, BackendUnreachable)
    assert "ConnectionRefusedError" in str(error)
    assert all(state.active == 0 for state in connector.pool.states)


async def test_a_cancelled_connect_is_closed_released_and_never_told() -> None:
    connector, loop, holder, record = setup()
    attempt = connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    attempt.cancel()
    await turns()
    assert loop.closed == ["127.0.0.1"] and holder.told == []
    assert connector.pool.states[0].active == 0 and len(connector.deadlines) == 0
    # Not a failure of the backend's: not ejected, no other tried.
    assert record.connect_failures == 0 and len(loop.hosts) == 1
    assert all(state.connect_failures_total == 0 for state in connector.pool.states)
    # Cancelled once its connect is done but before its step ran: closed all the same.
    attempt = connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    loop.waiting[1].set_result(None)
    attempt.cancel()
    await turns()
    assert holder.told == [] and all(state.active == 0 for state in connector.pool.states)
    assert loop.closed == ["127.0.0.1", "127.0.0.1"]


async def test_no_backend_ready_is_told_at_the_next_turn_not_inside_start() -> None:
    connector, loop, holder, record = setup(backends=1)
    connector.pool.states[0].ready = False
    connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    assert holder.told == []  # the holder is still in its own call
    await turns()
    ((what, error),) = holder.told
    assert what == "failed" and isinstance(error, NoBackendAvailable)
    assert record.connect_attempts == 0


async def test_each_address_of_a_backend_is_tried_within_one_attempt() -> None:
    connector, loop, holder, record = setup(backends=1, attempts=1)
    state = connector.pool.states[0]
    state.backend = Backend("b0", "db.test", 8000, connect_hosts=("10.0.0.1", "10.0.0.2"))
    connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    loop.waiting[0].set_exception(ConnectionRefusedError(111, "refused"))
    await turns()
    loop.waiting[1].set_result(None)
    await turns()
    assert loop.hosts == ["10.0.0.1", "10.0.0.2"] and holder.told[0][:2] == ("done", "b0")
    assert (record.connect_attempts, record.connect_failures) == (1, 0)


async def test_a_deadline_that_passes_as_the_connect_completes_still_ends_the_attempt() -> None:
    connector, loop, holder, record = setup()
    connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    loop.waiting[0].set_result(None)  # connected; the step that would say so not yet run
    (conn,) = connector.deadlines.pop_due(1e9)
    conn.on_deadline()
    await turns()
    assert loop.closed == ["127.0.0.1"] and record.connect_failures == 1
    assert len(loop.waiting) == 2 and holder.told == []  # the next backend's attempt


async def test_a_connect_done_before_any_wait_is_told_later_or_closed_if_cancelled() -> None:
    connector, loop, holder, record = setup()
    transports: list[FakeTransport] = []

    async def at_once(protocol: Any, host: str, port: int) -> Any:
        transports.append(FakeTransport(FakeSocket()))
        protocol().connection_made(transports[-1])
        return transports[-1], protocol

    loop.create_connection = at_once  # type: ignore[method-assign]
    connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    assert holder.told == []  # not inside start()
    await turns()
    assert holder.told[0][:2] == ("done", "b0")
    attempt = connector.start(holder, None, record, loop)  # type: ignore[arg-type]
    attempt.cancel()
    await turns()
    assert len(holder.told) == 1 and transports[1].closing
    assert [state.active for state in connector.pool.states] == [1, 0]  # only the first's
