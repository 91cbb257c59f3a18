"""A worker process: one `Balancer` on the sockets the supervisor bound, and a control channel.

Theory of operation
-------------------
The supervisor (supervisor.py) forks each worker from its own running event loop. The child
first sheds what it inherited but must not touch: the parent's running loop and its signal
wake-up descriptor (a signal to the child would otherwise reach the parent's handlers), its
signal handlers, and every descriptor that is not its own. It then runs a fresh loop:

    start: serve the inherited listening sockets ──► say {"kind": "ready"}
    control channel (a socketpair, JSON lines): {"id", "ask": "metrics" | "connections" |
           "backends"} ──► {"kind": "reply", "id", "body"}
    SIGTERM: stop accepting (take what waits in the accept queue), drain as `run` does ──►
           {"kind": "final", "metrics": ...} (the supervisor keeps the counts) ──► exit 0
    SIGUSR1: reopen the access log. SIGINT, SIGHUP: ignored (the supervisor's to act on;
           a terminal's Ctrl-C reaches the whole process group).

A worker that loses its supervisor gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import io
import json
import logging
import mmap
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from prometheus_client import generate_latest

from balancer.backend.pool import BackendTable, PeerCounts
from balancer.config.schema import Config
from balancer.process.server import Balancer, SSLContexts, backends_of

log = logging.getLogger("balancer")

_PR_SET_PDEATHSIG = 1
FINAL_KEPT_SECONDS = 5.0  # how long an exiting worker waits for the supervisor to keep its page
CONTROL_LIMIT_BYTES = 64 * 1024 * 1024  # a control message (a metrics page, a connections list)


@dataclass
class WorkerSpec:
    """What a worker is given at fork."""

    index: int
    generation: int
    config: Config
    sockets: dict[str, list[socket.socket]]  # listener name → bound listening sockets
    ssl_contexts: SSLContexts  # by listener name
    control: socket.socket  # the worker's end of the control channel
    open_access_log: Callable[[Config], IO[str] | None]
    run_loop: Callable[[Config, Callable[[], Any]], None]
    workers: int = 1  # in the generation
    counts: mmap.mmap | None = None  # every worker's leases per backend (pool.PeerCounts)
    table: mmap.mmap | None = None  # the generation's pool.BackendTable

    def peers(self) -> PeerCounts | None:
        if self.counts is None:
            return None
        table = memoryview(self.counts).cast("q")
        return PeerCounts(table, self.workers, len(self.config.backends), self.index)


def run_worker(spec: WorkerSpec, keep: set[int], supervisor: int) -> int:
    """The child's whole life after fork (`keep`: the descriptors it may hold; `supervisor`:
    its parent's pid); its exit code."""
    _shed_parent(keep, supervisor)
    access_log = spec.open_access_log(spec.config)
    if access_log is sys.stdout and isinstance(sys.stdout, io.TextIOWrapper):
        # A pipe, shared with the other workers: a write per line (under PIPE_BUF) is whole.
        sys.stdout.reconfigure(line_buffering=True)
    table = None
    if spec.table is not None:
        cells = memoryview(spec.table).cast("I")
        table = BackendTable(cells, backends_of(spec.config), fresh=False)
    balancer = Balancer(
        spec.config, access_log=access_log, ssl_contexts=spec.ssl_contexts, peers=spec.peers(),
        table=table,
    )  # fmt: skip
    spec.run_loop(spec.config, lambda: _serve(balancer, spec))
    if access_log is not None and access_log is not sys.stdout:
        access_log.close()
    return 0


def _shed_parent(keep: set[int], supervisor: int) -> None:
    """Forget what the supervisor's process state would make the child do."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    asyncio.events._set_running_loop(None)  # the parent's loop is not ours to run or close
    asyncio.set_event_loop(None)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above (pid 1 may be the
        os._exit(0)  # supervisor itself, in a container)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file holding a key
    for fd in _open_descriptors():
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_descriptors() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []


async def _serve(balancer: Balancer, spec: WorkerSpec) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, balancer.reopen_access_log)
    reader, writer = await asyncio.open_connection(sock=spec.control, limit=CONTROL_LIMIT_BYTES)

    def send(message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")

    await balancer.start(spec.sockets)
    # What the worker holds for its life from here (modules, the configuration, metric
    # families, TLS contexts: some 40,000 objects) leaves the cyclic GC's passes. They
    # still run, as allocations trigger them, but over what connections make, not the
    # whole heap: S2 (a new connection each) 2.5% less CPU, paired (bench/RESULTS.md).
    gc.collect()
    gc.freeze()
    send({"kind": "ready", "pid": os.getpid()})
    answering = loop.create_task(_answer(balancer, reader, send))
    await stop.wait()
    log.info("worker %d (pid %d): draining connections", spec.index, os.getpid())
    await balancer.shutdown()
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering  # (gone before this reads the channel itself)
    send({"kind": "final", "metrics": generate_latest(balancer.registry).decode()})
    # Closed only once the supervisor says it has the page (bounded): a channel closed with
    # the supervisor's asks unread resets, and a reset there could cost it the page (it then
    # kept an older one of this worker's counts: /metrics undercounted after reloads). What
    # it asked meanwhile is read and left unanswered.
    with contextlib.suppress(TimeoutError, ConnectionError, ValueError):
        async with asyncio.timeout(FINAL_KEPT_SECONDS):
            while line := await reader.readline():
                if json.loads(line).get("kind") == "kept":
                    break
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _answer(
    balancer: Balancer, reader: asyncio.StreamReader, send: Callable[[dict[str, Any]], None]
) -> None:
    views: dict[str, Callable[[], Any]] = {
        "metrics": lambda: generate_latest(balancer.registry).decode(),
        "connections": balancer.connections_view,
        "backends": balancer.backends_view,
    }
    while line := await reader.readline():
        request = json.loads(line)
        view = views.get(request.get("ask"))
        send({"kind": "reply", "id": request.get("id"), "body": view() if view else None})
