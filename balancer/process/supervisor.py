"""The supervisor: binds the listeners once, forks the workers, keeps them, reloads them.

Theory of operation
-------------------
`balancer run` is this process. It binds every client listener (a port in use is reported
before any worker starts), builds the TLS context once (so a session ticket one worker
issues, another resumes), serves the admin endpoint, and forks `workers` worker processes
(worker.py) that inherit the listening sockets and share their accept queues.

    generation 1: N workers ──► SIGHUP: the file is checked as `balancer check` does
        │   ├─ a problem: logged, counted (result="failure"); generation 1 serves on
        │   └─ fine: generation 2 starts on the same sockets (new listeners bound, the
        │       listeners kept as they were), and once every new worker is ready,
        │       generation 1 gets SIGTERM: it stops accepting and drains. The sockets
        │       never close, so nothing waiting in an accept queue is lost.
    a worker that dies unasked ──► logged, counted, forked again after a backoff
    SIGTERM, SIGINT, SIGQUIT ──► new SYNs dropped, 0.1 s for handshakes under way, then
        every worker takes its share of the accept queue and drains; a second one: SIGKILL
    SIGUSR1 ──► passed to the workers (each reopens the access log)
    SIGUSR2 ──► /healthz fails (503) while everything serves on: leaving an L4 tier

One view across workers: /metrics asks each worker for its page and sums them
(aggregate.py), keeping what exited workers counted, so a counter never goes backwards;
/connections and /backends join the workers' lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import IO, Any

from prometheus_client import CollectorRegistry

from balancer import build
from balancer.backend.discovery import Discovery, discovery_for
from balancer.backend.health import HealthChecker, checker_for
from balancer.backend.pool import BackendTable, PeerCounts
from balancer.config.schema import Config, ConfigError
from balancer.config.values import Address
from balancer.net.accept import bind_sockets, refuse_new_handshakes
from balancer.net.tls import TLSSetupError, certificate_not_after, configured_certificates
from balancer.observe.admin import AdminServer
from balancer.observe.aggregate import Totals
from balancer.observe.metrics import BackendInfo, DnsMetrics, HealthMetrics, SupervisorMetrics
from balancer.process import notify
from balancer.process.control import Control, read_token
from balancer.process.server import (
    BACKLOG,
    HANDSHAKES_SETTLE_SECONDS,
    SSLContexts,
    StartError,
    backends_of,
    bind_failure,
    check_firsts,
    checks_of,
)
from balancer.process.views import ASK_TIMEOUT_SECONDS, Views
from balancer.process.worker import CONTROL_LIMIT_BYTES, WorkerSpec, run_worker

log = logging.getLogger("balancer")

RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_SECONDS = 30.0  # a worker that lived this long starts the backoff over
READY_TIMEOUT_SECONDS = 15.0

Prepare = Callable[[], tuple[Config, SSLContexts]]


def worker_count(config: Config) -> int:
    if config.workers == "auto":
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    assert isinstance(config.workers, int)
    return config.workers


class Worker:
    """The supervisor's side of one worker process."""

    def __init__(
        self,
        index: int,
        generation: int,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.index = index
        self.generation = generation
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.started_at = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.retiring = False
        self.final: str | None = None  # its last metrics page, sent as it exits
        self.last_metrics: str | None = None  # the last page it answered with
        self.retired = False  # its counts are in the supervisor's totals
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.listening = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        with contextlib.suppress(ConnectionError, ValueError):
            while line := await self.reader.readline():
                message = json.loads(line)
                kind = message.get("kind")
                if kind == "ready" and not self.ready.done():
                    self.ready.set_result(None)
                elif kind == "reply":
                    waiter = self._asked.pop(message.get("id"), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message.get("body"))
                elif kind == "final":
                    self.final = message.get("metrics")
                    # Kept: the worker may close now (worker.py waits for this word, so it
                    # never closes with our asks unread, which would reset the channel).
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        self.writer.write(b'{"kind": "kept"}\n')
        for waiter in self._asked.values():
            if not waiter.done():
                waiter.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the worker exited before it was ready"))
            self.ready.exception()  # seen: a restarted worker's readiness has no awaiter

    @property
    def counted(self) -> str | None:
        """What it has counted, as best known: its final page, else its last answer."""
        return self.final if self.final is not None else self.last_metrics

    async def ask(self, what: str) -> Any:
        """A view from the worker (None if it does not answer in time, or has said its last:
        a write to a channel it is closing could reset it before the final page is read)."""
        if self.final is not None:
            return None
        self._next_id += 1
        asked = self._next_id
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asked[asked] = waiter
        try:
            self.writer.write(json.dumps({"id": asked, "ask": what}).encode() + b"\n")
        except (ConnectionError, RuntimeError):
            self._asked.pop(asked, None)
            return None
        try:
            return await asyncio.wait_for(waiter, ASK_TIMEOUT_SECONDS)
        except TimeoutError:
            self._asked.pop(asked, None)
            return None

    def close(self) -> None:
        self.listening.cancel()
        self.writer.close()


class Generation:
    """Workers started together on one configuration."""

    def __init__(self, number: int, config: Config, ssl_contexts: SSLContexts) -> None:
        self.number = number
        self.config = config
        self.ssl_contexts = ssl_contexts
        self.sockets: dict[str, list[socket.socket]] = {}  # listener name → bound sockets
        self.workers: dict[int, Worker] = {}  # by index; a restarted worker takes the slot
        self.size = worker_count(config)
        # Every worker's leases per backend (pool.PeerCounts), so least connections sees them
        # all: shared memory mapped before the fork, one row per worker.
        self.counts: mmap.mmap | None = None
        if self.size > 1:
            self.counts = mmap.mmap(-1, 8 * self.size * len(config.backends))
        # What every worker reads on a pick (pool.BackendTable): the checks' verdicts (run
        # here once for all the workers), the operator's states and weights.
        self.backends = backends_of(config)
        self.table_memory = mmap.mmap(-1, BackendTable.bytes_for(len(self.backends)))
        self.table = BackendTable(memoryview(self.table_memory).cast("I"), self.backends)
        self.checker: HealthChecker | None = None
        self.discovery: Discovery | None = None
        self.token = read_token(config)  # the admin API's, for this configuration

    async def discover(self, metrics: DnsMetrics, old: Generation | None = None) -> None:
        """Before its workers serve: the discovered groups' members, carried from `old`
        where the file kept the group's name, else resolved now (discovery.py)."""
        self.discovery = discovery_for(self.config, self.backends, self.table, metrics)
        if self.discovery is not None:
            if old is not None and old.discovery is not None:
                self.discovery.carry(old.discovery)
            await self.discovery.first()

    def backend_addresses(self) -> Iterator[tuple[str, str, str]]:
        """(name, group, address) of each backend (balancer_backend_info); a discovered
        slot's member's address, or "" while the slot is empty."""
        members = self.discovery.view() if self.discovery is not None else {}
        for group in self.config.groups:
            for backend in group.backends:
                address = str(backend.address)
                if group.discover is not None:
                    address = members.get(backend.name, "")
                yield backend.name, group.name, address

    def check(self, metrics: HealthMetrics) -> None:
        """The generation serves: its checker and resolver start (the metrics now speak of
        its backends)."""
        specs = checks_of(self.config)
        if any(spec.type != "none" for spec in specs) and self.checker is None:
            firsts = check_firsts(self.config)
            self.checker = checker_for(self.backends, specs, self.table, metrics, firsts)
            self.checker.start()
        if self.discovery is not None:
            self.discovery.attach(self.checker)
            self.discovery.start()

    async def stop_checking(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.checker is not None:
            await self.checker.stop()

    def forget(self, index: int) -> None:
        """A worker is gone: its row of leases goes with it."""
        if self.counts is not None:
            table = memoryview(self.counts).cast("q")
            PeerCounts(table, self.size, len(self.config.backends), index).forget(index)
            table.release()


class Supervisor:
    def __init__(
        self,
        config: Config,
        ssl_contexts: SSLContexts,
        *,
        prepare: Prepare,
        open_access_log: Callable[[Config], IO[str] | None],
        run_loop: Callable[[Config, Callable[[], Any]], None],
    ) -> None:
        self.prepare = prepare  # read and check the file again (reload)
        self.open_access_log = open_access_log
        self.run_loop = run_loop
        self.generation = Generation(1, config, ssl_contexts)
        self.retiring: list[Generation] = []
        # By configured address (host, port, and the listener's name if the port is 0).
        self.bound: dict[tuple[str, int, str], list[socket.socket]] = {}
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name → bound address
        self.totals = Totals()
        self.stopping = False
        self._stopped = asyncio.Event()
        self._admin: asyncio.Server | None = None
        self._admin_bind: Address | None = None
        self._restarts: dict[int, int] = {}  # slot → restarts in a row
        self._children: dict[int, Worker] = {}  # pid → worker, until reaped
        # Reaped, but what they counted not yet kept in `totals`: /metrics counts them by
        # their last page meanwhile, so no sum dips while a worker's final page is read.
        self.leaving: set[Worker] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reloading = asyncio.Lock()
        self.registry = CollectorRegistry()
        self.started_unix = time.time()
        self.metrics = SupervisorMetrics(
            self.registry, lambda: len(self._children), self.started_unix
        )
        self.health_metrics = HealthMetrics(self.registry)
        self.dns_metrics = DnsMetrics(self.registry)
        self.registry.register(BackendInfo(lambda: self.generation.backend_addresses()))
        self.control = Control(
            lambda: (self.generation.config, self.generation.table, self.generation.token),
            self.metrics.admin_writes,
            self.health_metrics.state_changed,
            self.metrics.healthz_failing,
        )

    @property
    def children(self) -> Mapping[int, Worker]:
        """Worker processes by pid, until reaped (the admin views ask the live ones)."""
        return self._children

    # ---- running ---------------------------------------------------------------------------

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        loop.add_signal_handler(signal.SIGUSR2, self.control.fail_health, "SIGUSR2")
        generation = self.generation
        self._bind(generation)
        await self._serve_admin(generation.config)
        await generation.discover(self.dns_metrics)
        try:
            await self._start(generation)
        except ConnectionError as error:
            self._close_all_sockets()
            raise StartError(f"the workers did not start: {error}") from None
        generation.check(self.health_metrics)
        for name, (host, port) in self.addresses.items():  # said once served
            log.info("listening: %s on %s:%d", name, host, port)
        if on_started is not None:
            on_started()
        self.metrics.last_reload.set(time.time())
        self.metrics.last_reload_ok.set(1)
        said_certificates(generation.config, self.metrics)
        log.info(
            "supervisor (pid %d, %s): %d worker(s) running: %s",
            os.getpid(),
            build(),
            len(generation.workers),
            " ".join(str(w.pid) for w in generation.workers.values()),
        )
        notify.ready(f"{len(generation.workers)} worker(s) serving")
        await self._stopped.wait()

    def _bind(self, generation: Generation) -> None:
        """Sockets for each of the generation's listeners: those already bound to the same
        address are kept; the rest are bound now (StartError names the first that fails)."""
        fresh: dict[tuple[str, int, str], list[socket.socket]] = {}
        try:
            for listener in generation.config.listeners:
                host, port = listener.bind.host, listener.bind.port
                # Port 0 ("any free port") is a port of the listener's own, kept by name.
                key = (host, port, "" if port else listener.name)
                socks = self.bound.get(key) or fresh.get(key)
                if socks is None:
                    try:
                        socks = fresh[key] = bind_sockets(host, port, BACKLOG)
                    except OSError as error:
                        raise bind_failure(listener.name, host, port, error) from None
                generation.sockets[listener.name] = socks
        except StartError:
            for socks in fresh.values():
                for sock in socks:
                    sock.close()
            raise
        self.bound.update(fresh)
        for name, socks in generation.sockets.items():
            self.addresses[name] = socks[0].getsockname()[:2]

    async def _serve_admin(self, config: Config) -> None:
        """The admin listener where the configuration says (the new one bound before the old
        closes: a reload whose admin address cannot bind keeps the old)."""
        if config.admin == self._admin_bind:
            return
        server: asyncio.Server | None = None
        if config.admin is not None:
            views = Views(self)
            admin = AdminServer(
                views.metrics_page,
                views.connections,
                views.backends,
                self.control.write,
                lambda: self.control.health_failing,
            )
            host, port = config.admin.host, config.admin.port
            try:
                socks = bind_sockets(host, port, BACKLOG)
                server = await asyncio.start_server(admin.handle, sock=socks[0])
            except OSError as error:
                raise bind_failure("admin", host, port, error) from None
        if self._admin is not None:
            self._admin.close()
        self._admin, self._admin_bind = server, config.admin
        self.addresses.pop("admin", None)
        if server is not None:
            self.addresses["admin"] = server.sockets[0].getsockname()[:2]

    async def _start(self, generation: Generation) -> None:
        """Fork the generation's workers and wait until each serves (ConnectionError if one
        exits first or does not say it is ready in time)."""
        for index in range(generation.size):
            await self._spawn(generation, index)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready for w in generation.workers.values())),
                READY_TIMEOUT_SECONDS,
            )
        except (TimeoutError, ConnectionError) as error:
            for worker in generation.workers.values():
                worker.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            raise ConnectionError(str(error) or "not ready in time") from None

    async def _spawn(self, generation: Generation, index: int) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        keep = {theirs.fileno(), *(s.fileno() for socks in generation.sockets.values()
                                     for s in socks)}  # fmt: skip
        spec = WorkerSpec(
            index, generation.number, generation.config, generation.sockets,
            generation.ssl_contexts, theirs, self.open_access_log, self.run_loop,
            generation.size, generation.counts, generation.table_memory,
        )  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                keep.update(_log_descriptors())
                code = run_worker(spec, keep, supervisor)
            except (ConfigError, TLSSetupError, OSError) as error:  # said, not a traceback
                problems = error.problems if isinstance(error, ConfigError) else [str(error)]
                for problem in problems:
                    log.error("worker %d cannot start: %s", index, problem)
            except BaseException:  # a bug: its traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours, limit=CONTROL_LIMIT_BYTES)
        worker = Worker(index, generation.number, pid, reader, writer)
        generation.workers[index] = worker
        self._children[pid] = worker
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._reap, worker, pidfd)

    def _reap(self, worker: Worker, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0
        self._children.pop(worker.pid, None)  # reaped: its pid may be another's from now on
        self.leaving.add(worker)
        self._background(self._gone(worker, status))

    async def _gone(self, worker: Worker, status: int) -> None:
        """A worker exited: keep what it counted, then start it again if nobody asked it to
        stop. (Its last message may still be in the control channel: read to the end.)"""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(worker.listening), ASK_TIMEOUT_SECONDS)
        worker.close()
        if worker.final is None:
            log.warning("worker %d (pid %d): no final metrics page; its counts are kept as of "
                        "its last answer", worker.index, worker.pid)  # fmt: skip
        self.totals.retire(worker.counted)
        worker.retired = True
        self.leaving.discard(worker)
        generation = self._generation_of(worker)
        if generation is not None and generation.workers.get(worker.index) is worker:
            del generation.workers[worker.index]
            generation.forget(worker.index)
        if self.stopping or worker.retiring or worker.generation != self.generation.number:
            retired = generation is not None and generation is not self.generation
            if retired and generation is not None and not generation.workers:
                self._retired(generation)
            if self.stopping and not self._children:
                self._close_all_sockets()
                self._stopped.set()
            return
        # Unasked: start it again, later each time it keeps failing.
        lived = time.monotonic() - worker.started_at
        streak = 0 if lived >= STABLE_SECONDS else self._restarts.get(worker.index, 0)
        delay = RESTART_BACKOFF_SECONDS[min(streak, len(RESTART_BACKOFF_SECONDS) - 1)]
        self._restarts[worker.index] = streak + 1
        self.metrics.restarts.inc()
        log.error(
            "worker %d (pid %d) exited unasked (%s) after %.1f s; starting it again in %.1f s",
            worker.index, worker.pid, _describe(status), lived, delay,
        )  # fmt: skip
        generation_number = worker.generation
        loop.call_later(
            delay, lambda: self._background(self._respawn(worker.index, generation_number))
        )

    async def _respawn(self, index: int, generation_number: int) -> None:
        generation = self.generation
        if self.stopping or generation.number != generation_number or index in generation.workers:
            return  # stopping, reloaded since, or started again already
        await self._spawn(generation, index)

    def _generation_of(self, worker: Worker) -> Generation | None:
        for generation in (self.generation, *self.retiring):
            if generation.number == worker.generation:
                return generation
        return None

    # ---- reload ----------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: check the file as `balancer check` does, then start a new generation.
        One reload at a time: a SIGHUP during one waits for it."""
        async with self._reloading:
            if not self.stopping:
                await self._reload()

    async def _reload(self) -> None:
        log.info("reload: checking the configuration")
        notify.reloading()
        try:
            config, ssl_contexts = self.prepare()
        except ConfigError as error:
            for problem in error.problems:
                log.error("reload: %s", problem)
            return self._reload_failed()
        except Exception as error:
            log.error("reload: %s", error)
            return self._reload_failed()
        old = self.generation
        try:
            new = Generation(old.number + 1, config, ssl_contexts)
        except ConfigError as error:  # (the token file went between the check and now)
            for problem in error.problems:
                log.error("reload: %s", problem)
            return self._reload_failed()
        self.control.carry(config, new.table)  # the operator's word, where the file kept it
        await new.discover(self.dns_metrics, old)
        try:
            self._bind(new)
            await self._start(new)
            await self._serve_admin(config)
        except (StartError, ConnectionError) as error:
            log.error("reload: %s", error)
            for worker in new.workers.values():  # (started, but the admin could not bind)
                worker.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            self._close_unused_sockets(keep=old)
            return self._reload_failed()
        self.generation = new
        self.retiring.append(old)
        await old.stop_checking()  # its workers drain on the verdicts they have
        new.check(self.health_metrics)
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload.set(time.time())
        self.metrics.last_reload_ok.set(1)
        said_certificates(new.config, self.metrics)
        for name, (host, port) in self.addresses.items():
            if name != "admin" and name not in new.sockets:
                continue
            log.info("listening: %s on %s:%d", name, host, port)
        log.info(
            "reload: generation %d serving (pids %s); generation %d draining",
            new.number, " ".join(str(w.pid) for w in new.workers.values()), old.number,
        )  # fmt: skip
        notify.ready(f"{len(new.workers)} worker(s) serving generation {new.number}")
        for worker in old.workers.values():
            worker.retiring = True
        await self._refuse_removed(new)
        for worker in list(old.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        if not old.workers:
            self._retired(old)

    def _reload_failed(self) -> None:
        self.metrics.reloads.labels("failure").inc()
        self.metrics.last_reload_ok.set(0)
        log.error("reload failed: still serving generation %d", self.generation.number)
        notify.ready(f"reload failed (see the log); serving generation {self.generation.number}")

    async def _refuse_removed(self, new: Generation) -> None:
        """Listeners the new configuration dropped: no new handshakes before the old workers
        take their queues and close (see Balancer.shutdown)."""
        kept = {id(s) for socks in new.sockets.values() for s in socks}
        removed = [s for socks in self.bound.values() for s in socks if id(s) not in kept]
        if removed and all(refuse_new_handshakes(sock) for sock in removed):
            await asyncio.sleep(HANDSHAKES_SETTLE_SECONDS)

    def _retired(self, generation: Generation) -> None:
        if generation in self.retiring:
            self.retiring.remove(generation)
        self._close_unused_sockets(keep=self.generation)

    def _close_unused_sockets(self, keep: Generation) -> None:
        generations = (keep, *self.retiring)
        used = {id(s) for g in generations for socks in g.sockets.values() for s in socks}
        for key, socks in list(self.bound.items()):
            if not any(id(s) in used for s in socks):
                for sock in socks:
                    sock.close()
                del self.bound[key]
        for name in list(self.addresses):
            if name != "admin" and name not in keep.sockets:
                del self.addresses[name]

    # ---- stopping, signals -----------------------------------------------------------------

    def _on_stop_signal(self) -> None:
        if self.stopping:  # the second one: now
            log.warning("stopping now: killing %d worker(s)", len(self._children))
            for pid in list(self._children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        self.stopping = True
        self._background(self._stop())

    async def _stop(self) -> None:
        log.info("shutting down: draining %d worker(s)", len(self._children))
        notify.stopping()
        await self.generation.stop_checking()
        if self._admin is not None:
            self._admin.close()
        socks = [s for listening in self.bound.values() for s in listening]
        if socks and all(refuse_new_handshakes(sock) for sock in socks):
            await asyncio.sleep(HANDSHAKES_SETTLE_SECONDS)
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not self._children:
            self._close_all_sockets()
            self._stopped.set()

    def _close_all_sockets(self) -> None:
        for socks in self.bound.values():
            for sock in socks:
                sock.close()
        self.bound.clear()

    def _forward(self, signum: int) -> None:
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)


def said_certificates(config: Config, metrics: SupervisorMetrics) -> None:
    """Each served certificate's notAfter, as the running generation loaded it."""
    gauge = metrics.certificate_not_after
    gauge.clear()
    for _, path in configured_certificates(config):
        with contextlib.suppress(OSError, ValueError):
            gauge.labels(path).set(certificate_not_after(path).timestamp())


def _log_descriptors() -> set[int]:
    """The log handlers' streams (stderr, a file): a worker logs as its supervisor does."""
    descriptors = set()
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        with contextlib.suppress(AttributeError, ValueError, OSError):
            descriptors.add(stream.fileno())  # type: ignore[union-attr]
    return descriptors


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
