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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from balancer.demo.certs import make_certs
from balancer.demo.farm import start_farm

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
    logged: threading.Condition

    def url(self, name: str = "http", path: str = "/") -> str:
        scheme = "https" if name == "https" else "http"
        host = "localhost" if name == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.ports[name]}{path}"

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The first log line holding `text`, waiting for it as the balancer writes it."""
        with self.logged:
            found = self.logged.wait_for(
                lambda: next((line for line in self.log_lines if text in line), None), timeout
            )
        assert found, f"{text!r} not logged within {timeout} s: {self.log_lines}"
        return found


class BalancerProcess:
    """Start `python -m balancer run ...`, learn its ports from the log, stop it by SIGTERM.

    Its stderr is read by a thread as it comes, so a test can wait for a log line. `prefix`
    runs it under another command (e.g. `prlimit`).
    """

    def __init__(
        self, args: list[str], expect: set[str], cwd: Path, prefix: list[str] | None = None
    ) -> None:
        self.args = args
        self.expect = expect
        self.cwd = cwd
        self.prefix = prefix or []
        self.running: Running | None = None
        self.stderr = ""
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Running:
        process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "balancer", "run", *self.args],
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running = self.running = Running(process, {}, [], threading.Condition())
        self._reader = threading.Thread(target=self._read_log, args=(running,), daemon=True)
        self._reader.start()
        with running.logged:
            started = running.logged.wait_for(
                lambda: self.expect <= running.ports.keys() or process.poll() is not None, 10
            )
        if not (started and self.expect <= running.ports.keys()):
            process.kill()
            process.wait(5)
            self._reader.join(5)
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
            raise AssertionError(
                f"balancer did not start ({process.returncode}): {running.log_lines}"
            )
        return running

    @staticmethod
    def _read_log(running: Running) -> None:
        stderr = running.process.stderr
        assert stderr is not None
        for line in stderr:
            with running.logged:
                running.log_lines.append(line)
                match = LISTENING.search(line)
                if match:
                    running.ports[match.group(1)] = int(match.group(2))
                running.logged.notify_all()
        with running.logged:
            running.logged.notify_all()

    def __exit__(self, *exc: object) -> None:
        assert self.running is not None and self._reader is not None
        process = self.running.process
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        self._reader.join(5)
        assert process.stdout is not None and process.stderr is not None
        self.stdout = process.stdout.read()
        process.stdout.close()
        process.stderr.close()
        self.stderr = "".join(self.running.log_lines)
        assert process.returncode == 0, self.stderr
        assert "Traceback" not in self.stderr, self.stderr


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("e2e-certs")
    make_certs(directory)
    return directory


def balancer(
    farm_ports: list[int],
    certs_dir: Path,
    tmp_path: Path,
    *extra: str,
    prefix: list[str] | None = None,
) -> BalancerProcess:
    """The balancer as the e2e tests run it: http, https and admin on ephemeral ports."""
    args = [
        "--http",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--cert",
        str(certs_dir / "server.crt"),
        "--key",
        str(certs_dir / "server.key"),
        "--access-log",
        str(tmp_path / "access.log"),
    ]
    for port in farm_ports:
        args += ["--backend", f"127.0.0.1:{port}"]
    return BalancerProcess([*args, *extra], {"http", "https", "admin"}, tmp_path, prefix)


def run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
