"""Exhausted resources and hostile clients against `python -m balancer`, as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import selectors
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import balancer, need, run

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
                if client.recv(1) == b"":
                    return client
            return client
    return None


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_accepting_backs_off_quietly_and_recovers(
    event_loop: str, farm_ports: list[int], certs_dir: Path, tmp_path: Path
) -> None:
    need("prlimit")
    curl = need("curl")
    process = balancer(
        farm_ports,
        certs_dir,
        tmp_path,
        "--event-loop",
        event_loop,
        prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}"],
    )
    with process as running:
        running.wait_for_log("lower limits.max_connections or raise `ulimit -n`")  # said at start
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
        served = run(curl, "-sS", "--max-time", "10", running.url("http"))
        assert served.returncode == 0 and "Served by web" in served.stdout, served.stderr
        metrics = run(curl, "-sS", running.url("admin", "/metrics")).stdout
    accept_lines = [line for line in process.stderr.splitlines() if "accept" in line]
    assert len(accept_lines) <= 2, accept_lines  # one report per 10 s, not one per failure
    if event_loop == "asyncio":
        errors = [
            line for line in metrics.splitlines() if line.startswith("balancer_accept_errors")
        ]
        assert errors and float(errors[0].split()[-1]) >= 1, errors


IDLE = 10_000


def _metric(text: str, name: str, listener: str = "http") -> float:
    prefix = f'{name}{{listener="{listener}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


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
            checks = await asyncio.gather(
                asyncio.to_thread(run, curl, "-sS", "--max-time", "10", running.url("http")),
                asyncio.to_thread(run, *https_get),
                asyncio.to_thread(run, curl, "-sS", running.url("admin", "/metrics")),
            )
            held = _rss_bytes(pid)
            for writer in writers:
                writer.close()
            return before, held, list(checks)

        before, held, (http, https, metrics) = asyncio.run(hold_and_serve())
        assert "Served by web" in http.stdout, http.stderr
        assert "Served by web" in https.stdout, https.stderr
        assert _metric(metrics.stdout, "balancer_connections_active") >= IDLE
        per_connection = (held - before) / IDLE
        assert per_connection < 8 * 1024, f"{per_connection:.0f} bytes per idle connection"
        deadline = time.monotonic() + 20  # the balancer is another process: poll its metrics
        while True:
            text = run(curl, "-sS", running.url("admin", "/metrics")).stdout
            if _metric(text, "balancer_connections_active") == 0:
                break
            assert time.monotonic() < deadline, "connections still counted open"
            time.sleep(0.1)
