"""Exhausted resources and hostile clients against `python -m balancer`, as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import Running, balancer, need, run
from tests.helpers import dead_port

pytestmark = pytest.mark.e2e

HELD = 100  # connections held open against a 64-descriptor limit
NOFILE = 64


def _first_eof(clients: list[socket.socket], timeout: float) -> socket.socket | None:
    """The first client the balancer closes, if any does within `timeout`."""
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        for key, _ in selector.select(timeout):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""  # closed (or reset), never written to
            return client
    return None


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_accepting_backs_off_quietly_and_recovers(
    event_loop: str, farm_ports: list[int], certs_dir: Path, tmp_path: Path
) -> None:
    need("prlimit")
    curl = need("curl")
    limits = tmp_path / "limits.toml"  # set, so it is not lowered to fit: run out for real
    limits.write_text("[limits]\nmax_connections = 10000\n")
    process = balancer(
        farm_ports,
        certs_dir,
        tmp_path,
        "-c",
        str(limits),
        "--event-loop",
        event_loop,
        "--workers",  # one process runs out: HELD connections over several would not
        "1",
        prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}"],
    )
    with process as running:
        running.wait_for_log("or raise `ulimit -n`")  # said once bound
        clients = [
            socket.create_connection(("127.0.0.1", running.ports["http"])) for _ in range(HELD)
        ]
        try:
            if event_loop == "uvloop":
                # libuv closes connections it has no descriptor for (its reserve-descriptor trick).
                assert _first_eof(clients, 10) is not None
            else:
                running.wait_for_log("accept failed: Too many open files")
            time.sleep(1.5)  # descriptors stay exhausted a while: the log must not flood meanwhile
        finally:
            for client in clients:
                client.close()
        # The balancer sees the clients' closes a moment later: until then a new connection
        # may still meet the exhausted table. Recovery is bounded, not instant.
        deadline = time.monotonic() + 10
        while True:
            served = run(curl, "-sS", "--max-time", "10", running.url("http"))
            if served.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert served.returncode == 0 and "Served by web" in served.stdout, served.stderr
        metrics = run(curl, "-sS", running.url("admin", "/metrics")).stdout
    accept_lines = [line for line in process.stderr.splitlines() if "accept" in line]
    assert len(accept_lines) <= 2, accept_lines  # one report per 10 s, not one per failure
    if event_loop == "asyncio":
        assert _metric(metrics, "balancer_accept_errors_total") >= 1


IDLE = 10_000


def _metric(text: str, name: str, listener: str = "http") -> float:
    prefix = f'{name}{{listener="{listener}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


def _await_open_counts(running: Running, done: Callable[[float, float], bool]) -> str:
    """Poll /metrics until the http and https open-connection counts satisfy `done` (the
    balancer is another process: no event to await); the last scrape."""
    deadline = time.monotonic() + 30
    while True:
        text = run("curl", "-sS", running.url("admin", "/metrics")).stdout
        counts = [_metric(text, "balancer_connections_active", x) for x in ("http", "https")]
        if done(*counts):
            return text
        assert time.monotonic() < deadline, f"open connections (http, https): {counts}"
        time.sleep(0.1)


def _rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) * 1024


async def _open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that have sent nothing yet (as browsers' preconnects)."""
    gate = asyncio.Semaphore(256)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return (await asyncio.open_connection("127.0.0.1", port))[1]

    async with asyncio.timeout(60):
        return await asyncio.gather(*(one() for _ in range(count)))


def test_ten_thousand_idle_connections_are_held_while_new_requests_are_served(
    farm_ports: list[int], certs_dir: Path, tmp_path: Path
) -> None:
    """Idle before their first request, so each holds one descriptor in the balancer: idle
    keep-alive connections hold two, and 20,000 is the hard limit on the machines this runs on
    (bench S5 measures those, 5,000 of them)."""
    curl = need("curl")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE + 1000
    if hard < needed:
        pytest.skip(f"needs {needed} descriptors; the hard limit is {hard}")
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    config = tmp_path / "timeouts.toml"
    config.write_text(  # room for the new requests; idle ones last the test, not 10 s
        f"[limits]\nmax_connections = {IDLE + 100}\n[timeouts]\nclient_header_seconds = 120\n"
    )
    with balancer(farm_ports, certs_dir, tmp_path, "-c", str(config)) as running:
        port = running.ports["http"]
        pid = running.process.pid

        https_get = [curl, "-sS", "--max-time", "10", "--cacert", str(certs_dir / "ca.crt")]
        https_get.append(running.url("https"))

        async def hold_and_serve() -> tuple[int, int, list[subprocess.CompletedProcess[str]]]:
            for writer in await _open_idle(port, 200):  # one-time allocations out of the way
                writer.close()
            before = _rss_bytes(pid)
            writers = await _open_idle(port, IDLE)
            # Connected is not yet accepted: wait until the balancer counts them all open.
            await asyncio.to_thread(_await_open_counts, running, lambda http, _: http >= IDLE)
            checks = await asyncio.gather(
                asyncio.to_thread(run, curl, "-sS", "--max-time", "10", running.url("http")),
                asyncio.to_thread(run, *https_get),
            )
            held = _rss_bytes(pid)
            for writer in writers:
                writer.close()
            return before, held, list(checks)

        before, held, (http, https) = asyncio.run(hold_and_serve())
        assert "Served by web" in http.stdout, http.stderr
        assert "Served by web" in https.stdout, https.stderr
        per_connection = (held - before) / IDLE
        assert per_connection < 8 * 1024, f"{per_connection:.0f} bytes per idle connection"
        _await_open_counts(running, lambda http, https: http == 0)


def test_sslyze_finds_only_tls12_and_up_aead_ecdhe_no_compression_no_client_renegotiation(
    farm_ports: list[int], certs_dir: Path, tmp_path: Path
) -> None:
    sslyze = need("sslyze")
    report = tmp_path / "sslyze.json"
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        scan = run(
            sslyze, "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
            "--compression", "--reneg", "--mozilla_config", "disable", "--json_out", str(report),
            f"127.0.0.1:{running.ports['https']}", timeout=120,
        )  # fmt: skip
        assert scan.returncode == 0, scan.stdout + scan.stderr
    result = json.loads(report.read_text())["server_scan_results"][0]["scan_result"]
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert result[f"{old}_cipher_suites"]["status"] == "COMPLETED"
        assert not result[f"{old}_cipher_suites"]["result"]["is_tls_version_supported"], old
    tls12 = result["tls_1_2_cipher_suites"]["result"]
    names = [s["cipher_suite"]["name"] for s in tls12["accepted_cipher_suites"]]
    assert tls12["is_tls_version_supported"] and names
    for name in names:
        assert name.startswith("TLS_ECDHE_"), name
        assert name.endswith(("_GCM_SHA256", "_GCM_SHA384", "_CHACHA20_POLY1305_SHA256")), name
    assert result["tls_compression"]["result"]["supports_compression"] is False
    renegotiation = result["session_renegotiation"]["result"]
    assert renegotiation["client_renegotiations_success_count"] == 0
    assert renegotiation["is_vulnerable_to_client_renegotiation_dos"] is False


def _exchange(port: int, data: bytes, *, reset: bool = False, timeout: float = 10) -> bytes:
    """Send `data`, read until the balancer closes (or reset at once when `reset`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def _client_hello() -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
HOSTILE_REQUESTS = [
    (_CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n") + b"0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),  # obs-fold
    (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /\r\n", 400),  # HTTP/0.9: at once, not 408 at the header deadline
    (b"GET / HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n", 200),  # as 1.1 (RFC 9110)
    (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 20000 + b"\r\n\r\n", 431),
    (_CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    (_CHUNKED + b"0" * 9000 + b"5\r\nhello\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", 408),  # incomplete head: cut at the header deadline
    (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
]


def test_after_the_hostile_suite_both_listeners_serve_counts_are_zero_and_no_traceback(
    farm_ports: list[int], certs_dir: Path, tmp_path: Path
) -> None:
    curl = need("curl")
    config = tmp_path / "short.toml"
    config.write_text("[timeouts]\nclient_header_seconds = 1\ntls_handshake_seconds = 1\n")
    dead = ["--backend", f"127.0.0.1:{dead_port()}"]  # refused: the next backend serves
    with balancer(farm_ports, certs_dir, tmp_path, "-c", str(config), *dead) as running:
        http, https = running.ports["http"], running.ports["https"]

        def hostile_http(case: tuple[bytes, int]) -> None:
            request, status = case
            answer = _exchange(http, request)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (request[:60], answer[:80])

        def hostile_tls(data: bytes, reset: bool) -> None:
            answer = _exchange(https, data, reset=reset)
            assert b"HTTP/1.1 200" not in answer

        hello = _client_hello()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(hostile_http, HOSTILE_REQUESTS))
            tls_cases = [
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),  # plain HTTP on the TLS port
                (os.urandom(2000), False),
                (hello[: len(hello) // 2], False),  # a ClientHello cut in half: the deadline
                (hello[: len(hello) // 2], True),  # ... then a reset
                (b"", False),  # connect and say nothing
            ]
            list(pool.map(lambda case: hostile_tls(*case), tls_cases))
            # Clients that vanish: mid-head, mid-body, and reset mid-response.
            _exchange(http, b"GET / HTTP/1.1\r\nHo", reset=True)
            _exchange(
                http, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", reset=True
            )
            _exchange(http, b"GET /?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n", reset=True)
            tls_old = run("openssl", "s_client", "-connect", f"127.0.0.1:{https}", "-tls1_1")
            assert tls_old.returncode != 0
        served_http = run(curl, "-sS", "--max-time", "10", running.url("http"))
        served_https = run(curl, "-sS", "--max-time", "10", "--cacert",
                           str(certs_dir / "ca.crt"), running.url("https"))  # fmt: skip
        assert "Served by web" in served_http.stdout, served_http.stderr
        assert "Served by web" in served_https.stdout, served_https.stderr
        text = _await_open_counts(running, lambda http, https: http == https == 0)
        failures = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("balancer_tls_handshake_failures_total{")
        )
        assert failures >= len(tls_cases) + 1, text  # each hostile handshake, and TLS 1.1
    # Leaving the block stopped the balancer by SIGTERM, checked it exited 0 and that its
    # output holds no traceback.
