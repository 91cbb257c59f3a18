"""Exhausted resources and hostile clients against `python -m balancer`, as a user runs it."""

from __future__ import annotations

import contextlib
import selectors
import socket
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
