"""End-to-end: `python -m balancer` as a subprocess, driven by curl, ab and openssl.

The farm (two embedded backends) runs on its own event loop in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from balancer.farm import start_farm

LISTENING = re.compile(r"listening: (\S+) on \S+:(\d+)")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def farm_ports() -> Iterator[list[int]]:
    loop = asyncio.new_event_loop()
    servers: list[asyncio.AbstractServer] = []
    started = threading.Event()

    async def main() -> None:
        servers.extend(server for server, _ in await start_farm(["web1", "web2"]))
        started.set()

    async def stop() -> None:
        for server in servers:
            server.close()
            await server.wait_closed()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop)
    assert started.wait(5)
    yield [server.sockets[0].getsockname()[1] for server in servers]
    asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@dataclass
class Running:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    log_lines: list[str]

    def url(self, name: str = "http", path: str = "/") -> str:
        scheme = "https" if name == "https" else "http"
        host = "localhost" if name == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.ports[name]}{path}"


class BalancerProcess:
    """Start `python -m balancer run ...`, learn its ports from the log, stop it by SIGTERM."""

    def __init__(self, args: list[str], expect: set[str], cwd: Path) -> None:
        self.args = args
        self.expect = expect
        self.cwd = cwd
        self.running: Running | None = None
        self.stderr = ""

    def __enter__(self) -> Running:
        process = subprocess.Popen(
            [sys.executable, "-m", "balancer", "run", *self.args],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        ports: dict[str, int] = {}
        lines: list[str] = []
        deadline = time.monotonic() + 10
        assert process.stderr is not None
        while not self.expect <= ports.keys():
            assert time.monotonic() < deadline, f"balancer did not start: {lines}"
            line = process.stderr.readline()
            if not line:
                process.wait(5)
                raise AssertionError(f"balancer exited {process.returncode}: {lines}")
            lines.append(line)
            match = LISTENING.search(line)
            if match:
                ports[match.group(1)] = int(match.group(2))
        self.running = Running(process, ports, lines)
        return self.running

    def __exit__(self, *exc: object) -> None:
        assert self.running is not None
        process = self.running.process
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
        self.stdout = stdout
        self.stderr = "".join(self.running.log_lines) + stderr
        assert process.returncode == 0, self.stderr
        assert "Traceback" not in self.stderr, self.stderr


def run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
