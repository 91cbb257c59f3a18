"""A backend that dies under load costs its clients nothing (issue 20): `ab -c 20` through the
balancer while one of three backend processes is killed (-9) and another stopped (SIGTERM),
in reuse `never` and `always`; nginx (`proxy_next_upstream error`) and HAProxy (`retries`,
`option redispatch`) lose no request here either."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import BalancerProcess, need

# A small HTTP/1.1 server process: keep-alive, 2 ms per response (so that requests are in
# its hands when it dies), a line on stdout per 100 responses. SIGTERM stops it as nginx and
# gunicorn stop: no new connections, idle keep-alive connections closed, the in-flight ones
# answered, then exit.
BACKEND = r"""
import asyncio, signal, sys
served = 0
idle, busy = set(), set()
class Handler(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
        idle.add(self)
    def data_received(self, data):
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self in idle:
            idle.discard(self); busy.add(self)
            asyncio.get_running_loop().call_later(0.002, self.answer)
    def answer(self):
        global served
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        close = head.split(b"\r\n", 1)[0].endswith(b"1.0") and b"keep-alive" not in head.lower()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                             + (b"Connection: close\r\n" if close else b"") + b"\r\nok\n")
        busy.discard(self); idle.add(self)
        served += 1
        if served % 100 == 0:
            print("served", served, flush=True)
        if close or stopping.is_set():
            self.transport.close()
    def connection_lost(self, exc):
        idle.discard(self); busy.discard(self)
stopping = None
async def main():
    global stopping
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Handler, "127.0.0.1", 0)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await stopping.wait()
    server.close()
    for handler in list(idle):
        handler.transport.close()
    async with asyncio.timeout(5):
        while busy:
            await asyncio.sleep(0.01)
asyncio.run(main())
"""


class BackendProcess:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline().split()
        assert first[:1] == ["port"], first
        self.port = int(first[1])
        self.served = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.served = int(line.split()[1])
                self._changed.notify_all()

    def wait_served(self, count: int, timeout: float = 30) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.served >= count, timeout), self.served

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(10)  # (it reads to the end of the pipe, then the pipe is closed)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.mark.parametrize("reuse", ["never", "always"])
def test_killing_and_stopping_backends_under_ab_fails_no_request(
    reuse: str, tmp_path: Path
) -> None:
    ab = need("ab")
    backends = [BackendProcess() for _ in range(3)]
    config = tmp_path / "balancer.toml"
    config.write_text(f'[upstream]\nreuse = "{reuse}"\n')
    args = ["-c", str(config), "--workers", "1", "--http", "127.0.0.1:0"]
    args += ["--access-log", str(tmp_path / "access.log")]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend.port}"]
    try:
        with BalancerProcess(args, {"http"}, tmp_path) as running:
            load = subprocess.Popen(
                [ab, "-n", "6000", "-c", "20", f"http://127.0.0.1:{running.ports['http']}/"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            backends[0].wait_served(300)
            os.kill(backends[0].process.pid, signal.SIGKILL)
            backends[1].wait_served(800)
            os.kill(backends[1].process.pid, signal.SIGTERM)
            output, errors = load.communicate(timeout=120)
            assert backends[1].process.wait(10) == 0  # it stopped as asked, not killed
        assert load.returncode == 0, errors
        assert "Complete requests:      6000" in output, output
        assert "Failed requests:        0" in output, output
        assert "Non-2xx responses" not in output, output
        records = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
        connections = [r for r in records if r["type"] == "connection"]
        assert sum(r["retries"] for r in connections) >= 1  # the kill caught requests in flight
        assert not [r for r in connections if r["error_status"] is not None]
    finally:
        for backend in backends:
            backend.stop()
