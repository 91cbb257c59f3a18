"""Micro-benchmarks of the pure hot paths, so regressions show before an end-to-end run.

    python bench/micro.py

Each line is the median of 5 timeit repeats, in µs per operation, on this machine; compare
runs on the same machine only.
"""

from __future__ import annotations

import io
import itertools
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from balancer.backend.policies import LeastConnections, RoundRobin
from balancer.backend.pool import BackendPool
from balancer.backend.state import Backend
from balancer.client.exchange import Exchanges, ExchangeSettings
from balancer.facts.record import BackendConnectionRecord, ConnectionRecord
from balancer.observe.metrics import Observer
from balancer.wire.http1 import HeadLimits, RequestHead, RequestReader, ResponseFramer

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: wrk/4.1\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 03:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n"
)


def per_op(statement, number: int) -> float:
    times = timeit.repeat(statement, number=number, repeat=5)
    return statistics.median(times) / number * 1e6


def record() -> ConnectionRecord:
    r = ConnectionRecord(1, "http", 0.0, 1.7e9)
    r.client_ip, r.client_port, r.backend, r.backend_address = "127.0.0.1", 5000, "b0", "x:1"
    r.tcp_handshake_rtt_seconds = 5e-5
    r.backend_connection = BackendConnectionRecord("b0", "x:1", 0.001, 1)
    r.backend_connection.connected_at, r.backend_connection.tcp_handshake_rtt_seconds = 0.0012, 3e-5
    r.requests, r.closed_at, r.close_cause = 1, 0.002, "client_closed"
    r.client_leg.initiator = r.client_leg.first_fin = "peer"
    return r


def main() -> None:
    backends = [Backend(f"b{i}", "127.0.0.1", 9000 + i) for i in range(3)]
    rr = BackendPool(backends, RoundRobin(), 10)
    lc = BackendPool(backends, LeastConnections(), 10)
    reader = RequestReader("127.0.0.1", "http", 80, HeadLimits())
    framer = ResponseFramer()
    quiet = Observer(CollectorRegistry())
    logged = Observer(CollectorRegistry(), access_log=io.StringIO())
    rec = record()

    def keep_alive_request() -> None:
        reader.feed(REQUEST)
        reader.heads.clear()
        framer.expect(False)
        framer.feed(RESPONSE)
        framer.statuses.clear()

    request_head = RequestHead(b"GET", True, False, b"/index.html", b"localhost", None)
    conn = BackendConnectionRecord("b0", "x:1", 0.0, 1)
    exchanges = Exchanges(
        rec,
        ExchangeSettings(itertools.count().__next__, time.monotonic, quiet.publish_request, False),
    )

    def request_records() -> None:
        exchanges.open(request_head)
        exchanges.forwarded(conn, True, False)
        exchanges.first_byte()
        exchanges.completed([200], [512])

    rows = [
        (
            "pool.acquire+release, round_robin, 3 backends",
            lambda: rr.acquire(0.0).release(),
            100000,
        ),
        ("pool.acquire+release, least_connections", lambda: lc.acquire(0.0).release(), 100000),
        ("request head parse+rewrite (RequestReader.feed)", lambda: reader.feed(REQUEST), 50000),
        ("request head + response framing (a keep-alive exchange)", keep_alive_request, 50000),
        (
            "new RequestReader + ResponseFramer",
            lambda: (RequestReader("1.2.3.4", "http", 80, HeadLimits()), ResponseFramer()),
            50000,
        ),
        ("ConnectionRecord()", lambda: ConnectionRecord(1, "http", 0.0, 0.0), 100000),
        ("publish(record), no access log", lambda: quiet.publish(rec), 20000),
        ("publish(record) with JSON access log", lambda: logged.publish(rec), 20000),
        ("a request's record and metrics (Exchanges, publish_request)", request_records, 50000),
    ]
    for name, statement, number in rows:
        print(f"{per_op(statement, number):8.2f} µs  {name}")


if __name__ == "__main__":
    main()
