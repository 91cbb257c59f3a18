"""Exchanges: the requests of one client connection, in order, each with its record.

Pure: no sockets, no asyncio; the clock and the publisher are passed in.

Every request head that arrives opens an `Exchange` (and its `RequestRecord`); responses
complete them in the same order (HTTP/1.1 answers in order). In the reuse modes each exchange
also holds the request's bytes until a backend connection is its (`pending`). A request that
may be sent again (idempotent, and at most REPLAY_MAX_BYTES in all) keeps a copy (`replay`):
should its backend connection end before any byte of the response, the forwarder sends it
again on a new connection (forward.Forwarder.retry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from balancer.facts.record import BackendConnectionRecord, ConnectionRecord, RequestRecord
from balancer.wire.http1 import RequestHead

if TYPE_CHECKING:
    from balancer.backend.groups import Group

# RFC 9110 §9.2.2; CONNECT is refused before it gets here.
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
REPLAY_MAX_BYTES: Final = 16384  # a request larger than this is not kept for a retry


class Exchange:
    """One request and its response: its record, and its bytes while no backend has them."""

    __slots__ = ("group", "hashed", "pending", "record", "replay", "request_done")

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.group: Group | None = None  # routed (dispatch): the group that serves it
        self.hashed: bytes | None = None  # the header policy hash hashes (RequestHead.hashed)
        self.request_done = False  # every byte of the request has been read
        # Reuse modes only (see Exchanges.open): the bytes waiting for a backend connection
        # (None once they go straight to one).
        self.pending: list[bytes] | None = None
        # The request's bytes kept for a retry; None: it may not be sent again. Bytes, not a
        # list: a request in one read is kept as that read's own object (b"" + data is data).
        self.replay: bytes | None = None

    def keep_for_replay(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            if len(replay) + len(data) > REPLAY_MAX_BYTES:
                self.replay = None
            else:
                self.replay = replay + data


class ExchangeSettings:
    """What every connection's Exchanges share (one per listener: nothing per connection)."""

    __slots__ = ("clock", "dispatch", "next_id", "publish")

    def __init__(
        self,
        next_id: Callable[[], int],
        clock: Callable[[], float],
        publish: Callable[[RequestRecord], None],
        dispatch: bool,
    ) -> None:
        self.next_id = next_id  # request ids, per worker
        self.clock = clock
        self.publish = publish
        self.dispatch = dispatch  # reuse modes: keep request bytes per exchange


class Exchanges:
    """The open exchanges of one client connection (see the module docstring)."""

    __slots__ = ("_connection", "_settings", "queue")

    def __init__(self, connection: ConnectionRecord, settings: ExchangeSettings) -> None:
        self._connection = connection  # ids, listener, and the clock's Unix offset
        self._settings = settings
        # A list, not a deque: it holds one or two exchanges, and an empty deque costs ~600
        # bytes per idle keep-alive connection where an empty list costs 56.
        self.queue: list[Exchange] = []

    def open(self, head: RequestHead) -> Exchange:
        """A request head arrived. The record keeps method and target as bytes; they are
        decoded (and the target cut) only if a line is written."""
        settings = self._settings
        record = RequestRecord(
            settings.next_id(), self._connection, head.method, head.target, settings.clock()
        )
        record.host = head.host
        exchange = Exchange(record)
        exchange.hashed = head.hashed
        if settings.dispatch:
            exchange.pending = []
        if head.method in IDEMPOTENT and not head.upgrade:
            exchange.replay = b""
        self.queue.append(exchange)
        return exchange

    def filling(self) -> Exchange | None:
        """The exchange whose request is still being read (the oldest not done)."""
        for exchange in self.queue:
            if not exchange.request_done:
                return exchange
        return None

    def forwarded(self, conn: BackendConnectionRecord, reused: bool, oldest: bool) -> None:
        """Requests not yet forwarded are now on this backend connection: all of them (never
        mode), or only the oldest (`oldest`: reuse modes dispatch one at a time). A request on
        a connection that carried one before made no connect: its connect time is None."""
        now = self._settings.clock()
        connect_wait = None if reused else conn.connect_wait_seconds
        for exchange in self.queue:
            record = exchange.record
            if record.forwarded_at is None:
                record.backend, record.backend_connection_id = (
                    conn.backend,
                    conn.id,
                )
                record.reused, record.forwarded_at = reused, now
                record.connect_wait_seconds = connect_wait
            if oldest:
                break

    def first_byte(self) -> None:
        """A response byte arrived: the oldest exchange's, if it had none yet."""
        if self.queue:
            record = self.queue[0].record
            if record.first_byte_at is None:
                record.first_byte_at = self._settings.clock()

    def completed(self, statuses: list[int], sizes: list[int]) -> None:
        """Responses with these statuses and sizes completed, oldest first: publish their
        records."""
        now = self._settings.clock()
        queue = self.queue
        index = 0  # (into sizes: no zip object and tuples a response)
        for status in statuses:
            if not queue:
                break
            record = queue.pop(0).record
            record.status, record.response_bytes, record.done_at = status, sizes[index], now
            index += 1  # noqa: SIM113 (enumerate is an object a call)
            if record.first_byte_at is None:
                record.first_byte_at = now
            self._settings.publish(record)
        statuses.clear()
        sizes.clear()

    def bodies_read(self, bodies: list[tuple[int, int]], heads_in_read: int) -> None:
        """Request bodies read whole (RequestReader.bodies) in a read that gave
        `heads_in_read` heads, each opened as an exchange already: their sizes, on their
        records (an exchange published before its body ended keeps what it had)."""
        queue = self.queue
        last = len(queue) - 1
        for heads, size in bodies:
            index = last - (heads_in_read - heads)
            if 0 <= index <= last:
                queue[index].record.request_body_bytes = size
        bodies.clear()

    def answered_itself(self, status: int, size: int) -> None:
        """The balancer answered with its own response of `size` bytes: the oldest exchange
        carries it when it is abandoned; with none (a 4xx for a head it could not read or
        would not forward) it is published as a request of its own."""
        queue = self.queue
        if queue:
            queue[0].record.response_bytes = size
            return
        settings = self._settings
        record = RequestRecord(settings.next_id(), self._connection, b"", b"", settings.clock())
        record.status, record.response_bytes = status, size
        settings.publish(record)

    def abandoned(self, error_status: int | None) -> None:
        """The connection ends with these requests unanswered (the first may have got the
        balancer's own error response): publish them as they stand."""
        queue = self.queue
        if queue and error_status is not None:
            queue[0].record.status = error_status
        while queue:
            self._settings.publish(queue.pop(0).record)
