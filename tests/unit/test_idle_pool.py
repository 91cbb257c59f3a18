"""The idle pool of backend connections (reuse modes), over fake transports and a manual
clock: what it keeps, what it hands out, and why it closes each one it closes."""

from __future__ import annotations

import asyncio

import pytest

from balancer.backend.connection import BackendConnection, IdlePool
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
from balancer.net.writebatch import WriteBatch
from tests.fakes import Clock, FakeSocket, FakeTransport

CLOSE_WAIT = 8  # TCP_INFO's state after the peer's FIN


class Pool:
    """An IdlePool with its wheel, clock and published records in reach."""

    def __init__(self, **settings: float) -> None:
        self.clock = Clock()
        self.wheel: DeadlineWheel[Wakeable] = DeadlineWheel(lambda at: None)
        self.published: list[BackendConnectionRecord] = []
        self.later: list[float] = []
        upstream = Upstream(reuse="always", **settings)  # type: ignore[arg-type]
        self.pool = IdlePool(
            upstream, 0.5, self.wheel, self.clock, self.published.append,
            lambda delay, callback: self.later.append(delay),
        )  # fmt: skip
        self.writes = WriteBatch(lambda callback: None)

    def connection(self, backend: str = "web1", address: str = "10.0.0.1:80", requests: int = 1
                   ) -> tuple[BackendConnection, FakeTransport, FakeSocket]:  # fmt: skip
        record = BackendConnectionRecord(backend, address, self.clock())
        record.requests = requests
        conn = BackendConnection(self.pool, record, self.writes, self.clock)
        sock = FakeSocket()
        transport = FakeTransport(sock)
        conn.leg.attach(transport, sock)
        conn.leg.kernel = sock  # as borrowed: TCP_INFO and shutdown reach the fake kernel
        return conn, transport, sock

    def advance(self, seconds: float) -> None:
        """Time passes; the wheel wakes whoever is due, as the loop's timer would."""
        self.clock.now += seconds
        for owner in self.wheel.pop_due(self.clock()):
            owner.on_deadline()


def test_a_clean_connection_waits_idle_and_the_most_recent_is_taken_first() -> None:
    p = Pool()
    older, _, _ = p.connection()
    newer, transport, _ = p.connection()
    p.pool.put(older)
    p.advance(1.0)
    newer.leg.pause("client_full")  # its last client read slowly
    p.pool.put(newer)
    assert p.pool.idle_count() == 2
    assert transport.log[-1] == "resume_reading"  # read while idle: a FIN or stray bytes seen
    assert p.pool.take("web1", "10.0.0.1:80") is newer  # the warmest
    assert newer.record.idle_seconds == 0.0
    assert p.pool.take("web1", "10.0.0.1:80") is older
    assert older.record.idle_seconds == pytest.approx(1.0)  # idle time counted on its record
    assert p.pool.take("web1", "10.0.0.1:80") is None
    assert p.pool.take("web2", "10.0.0.2:80") is None


@pytest.mark.parametrize(
    ("settings", "requests", "cause"),
    [
        ({"max_requests_per_connection": 3}, 3, CONN_MAX_REQUESTS),
        ({"idle_per_backend": 1}, 1, CONN_POOL_FULL),  # (one already idle: see below)
    ],
)
def test_a_connection_that_may_not_stay_is_closed_by_fin_with_its_cause(
    settings: dict[str, float], requests: int, cause: str
) -> None:
    p = Pool(**settings)
    if cause == CONN_POOL_FULL:
        p.pool.put(p.connection()[0])
    conn, transport, sock = p.connection(requests=requests)
    p.pool.put(conn)
    assert conn.record.close_cause == cause
    assert sock.log[-1] == "shutdown"  # our FIN, then linger for theirs
    assert conn in p.pool.closing
    p.advance(0.6)  # the linger is over: closed
    assert transport.log[-1] == "close"


def test_an_idle_connection_closes_at_its_idle_timeout_counted_from_its_last_use() -> None:
    p = Pool(idle_timeout_seconds=4.0)
    conn, _, sock = p.connection()
    p.pool.put(conn)
    p.advance(3.0)
    assert p.pool.take("web1", "10.0.0.1:80") is conn  # used again at 3 s...
    p.pool.put(conn)  # ...and back: its wake-up at 4 s stays filed
    p.advance(1.5)  # 4.5 s: woken, not yet due (idle since 3 s): filed again for 7 s
    assert conn.record.close_cause is None and p.pool.idle_count() == 1
    p.advance(3.0)
    assert conn.record.close_cause == CONN_IDLE_TIMEOUT
    assert "shutdown" in sock.log and p.pool.idle_count() == 0


def test_a_backend_fin_while_idle_closes_it_at_once_and_publishes_it_when_lost() -> None:
    p = Pool()
    conn, _, sock = p.connection()
    p.pool.put(conn)
    sock.state = CLOSE_WAIT
    conn.eof_received()
    assert conn.record.close_cause == CONN_BACKEND_CLOSED
    assert p.pool.idle_count() == 0
    assert sock.log[-1] == "close" and "abort" not in sock.log  # theirs is in: closed at once
    conn.connection_lost(None)
    assert p.published == [conn.record] and conn.record.closed_at == p.clock()
    assert not p.pool.closing


def test_bytes_an_idle_backend_sends_unasked_close_it() -> None:
    p = Pool()
    conn, _, _ = p.connection()
    p.pool.put(conn)
    stray = b"HTTP/1.1 408 Request Timeout\r\n\r\n"
    conn.data_received(stray)
    assert conn.record.close_cause == CONN_STRAY_BYTES
    assert conn.record.leg.bytes_in == len(stray)


def test_a_reset_while_idle_is_the_records_cause_and_its_record_is_published() -> None:
    p = Pool()
    conn, _, _ = p.connection()
    p.pool.put(conn)
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert conn.record.close_cause == CONN_BACKEND_RESET
    assert p.published == [conn.record] and p.pool.idle_count() == 0


def test_a_connection_given_up_is_closed_or_if_lost_published_with_its_cause() -> None:
    """IdlePool.give_up, for whoever held it (a forwarder, a kept connection, an HTTP/2
    stream): still open, closed by FIN; already lost under its holder, published now (it
    would otherwise never be: its loss was its holder's event, not the pool's)."""
    p = Pool()
    open_conn, transport, _ = p.connection()
    p.pool.give_up(open_conn, None)
    assert open_conn.record.close_cause == "backend_closed" and open_conn.user is p.pool
    assert "shutdown" in transport.sock.log and not p.published  # our FIN; published when lost
    lost, _, _ = p.connection()
    lost.leg.lost(ConnectionResetError())
    p.pool.give_up(lost, "backend_reset")
    assert p.published == [lost.record] and lost.record.close_cause == "backend_reset"


def test_a_connection_to_a_member_that_left_its_slot_is_closed_not_handed_out() -> None:
    """A DNS-discovered slot (web-1) whose member changed: its idle connection to the old
    address is closed as member_left; the caller connects to the new member."""
    p = Pool()
    old, _, _ = p.connection("web-1", "10.0.0.1:80")
    p.pool.put(old)
    assert p.pool.take("web-1", "10.0.0.9:80") is None
    assert old.record.close_cause == CONN_MEMBER_LEFT and old in p.pool.closing


async def test_shutdown_closes_every_idle_connection_and_every_later_return() -> None:
    p = Pool()
    idle, _, _ = p.connection()
    p.pool.put(idle)
    busy, _, _ = p.connection()
    closing = asyncio.ensure_future(p.pool.close_all(timeout=1.0))
    await asyncio.sleep(0)
    assert idle.record.close_cause == CONN_SHUTDOWN
    p.pool.put(busy)  # its exchange ended during the shutdown: closed, not kept
    assert busy.record.close_cause == CONN_SHUTDOWN and p.pool.idle_count() == 0
    idle.connection_lost(None)
    busy.connection_lost(None)
    await closing  # every closing connection lost: close_all returns before its timeout
    assert {r.backend for r in p.published} == {"web1"} and len(p.published) == 2


def test_past_idle_per_backend_it_keeps_as_many_as_were_busy_at_once_lately() -> None:
    """A load of five requests at once with idle_per_backend = 2: the five connections stay
    (no churn); once the load has been gone for two idle timeouts, two do again."""
    p = Pool(idle_per_backend=2, idle_timeout_seconds=4.0)
    conns = [p.connection()[0] for _ in range(7)]
    for busy_after, conn in zip((4, 3, 2, 1, 0), conns[:5], strict=True):  # one by one
        p.pool.put(conn, others_busy=busy_after)
    assert p.pool.idle_count() == 5  # as many as were busy at once
    assert conns[5].record.close_cause is None
    p.pool.put(conns[5], others_busy=0)  # a sixth: more than were ever busy at once
    assert conns[5].record.close_cause == CONN_POOL_FULL
    taken = [p.pool.take("web1", "10.0.0.1:80") for _ in range(5)]
    p.advance(4.5)  # the next window: the last one's peak still counts
    for conn in taken:
        p.pool.put(conn, others_busy=0)
    assert p.pool.idle_count() == 5
    for _ in range(5):
        p.pool.take("web1", "10.0.0.1:80")
    p.advance(8.5)  # two windows without a burst: back to idle_per_backend
    for conn in taken[:3]:
        p.pool.put(conn, others_busy=0)
    assert p.pool.idle_count() == 2
    assert taken[2].record.close_cause == CONN_POOL_FULL
    p.pool.put(conns[6], others_busy=0)
    assert conns[6].record.close_cause == CONN_POOL_FULL


def test_a_burst_on_one_backend_keeps_nothing_more_idle_for_another() -> None:
    p = Pool(idle_per_backend=1)
    for busy_after in (2, 1, 0):
        p.pool.put(p.connection()[0], others_busy=busy_after)
    other = [p.connection(backend="web2", address="10.0.0.2:80")[0] for _ in range(2)]
    p.pool.put(other[0])
    p.pool.put(other[1])
    assert (len(p.pool.idle["web1"]), len(p.pool.idle["web2"])) == (3, 1)
    assert other[1].record.close_cause == CONN_POOL_FULL
