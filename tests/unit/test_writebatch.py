"""The write batch: bytes go out at the end of the loop's round, in order, once scheduled."""

from __future__ import annotations

from collections.abc import Callable

from balancer.net.writebatch import FLUSH_BYTES, WriteBatch


class Transport:
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.log, self.name, self.closing = log, name, False

    def write(self, data: bytes) -> None:
        self.log.append((self.name, data))

    def is_closing(self) -> bool:
        return self.closing


def batch() -> tuple[WriteBatch, list[Callable[[], None]]]:
    scheduled: list[Callable[[], None]] = []
    return WriteBatch(scheduled.append), scheduled


def test_writes_wait_for_the_end_of_the_round_and_go_as_one_per_transport() -> None:
    b, scheduled = batch()
    log: list[tuple[str, bytes]] = []
    client, backend = Transport(log, "client"), Transport(log, "backend")
    b.write(client, b"1")
    b.write(backend, b"a")
    b.write(client, b"2")
    b.write(client, b"3")
    assert log == [] and len(b) == 4
    assert len(scheduled) == 1  # one callback per round, not per write
    scheduled.pop()()
    # Each transport's bytes in their order, in one write (a syscall each, not per piece);
    # the transports in the order they first wrote.
    assert log == [("client", b"123"), ("backend", b"a")] and len(b) == 0


def test_flush_writes_now_and_the_round_end_after_it_finds_nothing() -> None:
    b, scheduled = batch()
    log: list[tuple[str, bytes]] = []
    client = Transport(log, "client")
    b.write(client, b"head")
    b.flush()  # e.g. before our FIN: it must follow these bytes
    assert log == [("client", b"head")]
    b.write(client, b"more")  # the round's callback is still due: no second one
    assert len(scheduled) == 1
    scheduled.pop()()
    assert log == [("client", b"head"), ("client", b"more")]
    b.write(client, b"next round")
    assert len(scheduled) == 1  # a new round schedules again


def test_a_transport_closing_at_flush_time_is_skipped() -> None:
    b, scheduled = batch()
    log: list[tuple[str, bytes]] = []
    aborted, alive = Transport(log, "aborted"), Transport(log, "alive")
    b.write(aborted, b"lost")
    b.write(alive, b"kept")
    aborted.closing = True  # aborted (RST) or its peer vanished in the same round
    scheduled.pop()()
    assert log == [("alive", b"kept")]


def test_a_round_holding_flush_bytes_is_written_at_once() -> None:
    # Bulk bytes reach the transport while the round still reads, so its pause_writing()
    # can stop the reading before a round's worth of reads piles up here.
    b, _ = batch()
    log: list[tuple[str, bytes]] = []
    client = Transport(log, "client")
    b.write(client, b"x" * (FLUSH_BYTES - 1))
    assert log == []
    b.write(client, b"y")
    assert [data for _, data in log] == [b"x" * (FLUSH_BYTES - 1), b"y"] and len(b) == 0
