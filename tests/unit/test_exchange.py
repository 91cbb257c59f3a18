"""Exchanges (pure): which record each response, body and balancer answer lands on, with a
manual clock and a list for a publisher. The reader and framer are driven for real."""

from __future__ import annotations

import itertools

from balancer.client.exchange import Exchanges, ExchangeSettings
from balancer.facts.record import ConnectionRecord, RequestRecord
from balancer.wire.http1 import HeadLimits, RequestReader, ResponseFramer


def exchanges(dispatch: bool = False) -> tuple[Exchanges, list[RequestRecord]]:
    published: list[RequestRecord] = []
    settings = ExchangeSettings(itertools.count(1).__next__, lambda: 5.0, published.append,
                                dispatch)  # fmt: skip
    connection = ConnectionRecord(1, "http", accepted_at=1.0, accepted_unix=1.7e9)
    return Exchanges(connection, settings), published


def read(reader: RequestReader, found: Exchanges, data: bytes) -> None:
    """What HttpFlow.on_client_data does with a read: open each head, then place the bodies."""
    reader.feed(data)
    opened = len(reader.heads)
    for head in reader.heads:
        found.open(head)
    reader.heads.clear()
    if reader.bodies:
        found.bodies_read(reader.bodies, opened)


def test_each_pipelined_request_gets_its_own_body_size_across_reads() -> None:
    found, published = exchanges()
    reader = RequestReader("127.0.0.1", "http", 80, HeadLimits())
    post = b"POST /%b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    read(reader, found, post % (b"a", 5) + b"12345" + post % (b"b", 3) + b"ab")
    read(reader, found, b"c" + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")  # b's body ends here
    assert [e.record.request_body_bytes for e in found.queue] == [5, 3, 0]
    assert published == []


def test_responses_complete_in_order_with_their_sizes_and_a_refusal_has_its_own_line() -> None:
    found, published = exchanges()
    reader = RequestReader("127.0.0.1", "http", 80, HeadLimits())
    read(reader, found, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    framer = ResponseFramer()
    framer.expect(False)
    framer.expect(False)
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 No\r\n")
    found.completed(framer.statuses, framer.sizes)
    assert [(r.target, r.status, r.response_bytes) for r in published] == [(b"/1", 200, 40)]
    framer.feed(b"Content-Length: 0\r\n\r\n")
    found.completed(framer.statuses, framer.sizes)
    assert [(r.status, r.response_bytes) for r in published[1:]] == [(404, 38)]
    assert framer.statuses == [] and framer.sizes == []  # drained
    found.answered_itself(400, 120)  # no exchange open: a line of its own
    assert (published[-1].method, published[-1].status, published[-1].response_bytes) == (
        b"", 400, 120,
    )  # fmt: skip


def test_the_balancers_own_answer_lands_on_the_oldest_open_request() -> None:
    found, published = exchanges()
    reader = RequestReader("127.0.0.1", "http", 80, HeadLimits())
    read(reader, found, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    found.answered_itself(504, 99)
    found.abandoned(504)
    ((record,),) = [published]
    assert (record.target, record.status, record.response_bytes) == (b"/slow", 504, 99)
