"""Active health checks: is each backend up? HAProxy's rise and fall, over real connections.

Theory of operation
-------------------
With `[health_check] type = "tcp"` or `"http"`, one `HealthChecker` (in the supervisor; in a
lone Balancer, its own) checks every backend every `interval_seconds`, each backend's schedule
offset by a random fraction of the interval so that N backends are not checked in the same
millisecond:

    tcp:  connect within timeout_seconds ──► ok
    http: connect, one request (method, path, Host; h11 writes it and reads the answer) ──►
          ok when the status is in expect_status and the body holds body_contains (if set)
    each result ──► Health (pure): `fall` failures in a row take an up backend down, `rise`
          successes in a row bring a down one up (a flapping backend changes state at
          neither) ──► a change is one log line, a metric, and a byte in the health table
          every worker reads as it picks (pool.BackendPool: a down backend is never picked;
          all down ──► 503 with Retry-After)

Backends start up (HAProxy's default), so a start or a reload never refuses traffic while
the first checks run. A check's own failure (refused, timed out, reset, a bad status) is its
result, never an exception out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import h11

from balancer.backend.pool import BackendTable
from balancer.backend.state import Backend
from balancer.config.schema import HealthCheck

log = logging.getLogger("balancer")

UP, DOWN = "up", "down"
BODY_LIMIT_BYTES = 65536  # of a check response read for body_contains


class Health:
    """One backend's state as the checks say (pure)."""

    __slots__ = ("fall", "rise", "state", "streak")

    def __init__(self, rise: int, fall: int, state: str = UP) -> None:
        self.rise = rise
        self.fall = fall
        self.state = state
        self.streak = 0  # consecutive results against the current state

    def observe(self, ok: bool) -> str | None:
        """One check's result; the new state if it changed the state, else None."""
        if ok == (self.state == UP):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return None
        self.state, self.streak = (UP if ok else DOWN), 0
        return self.state


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    reason: str  # "ok", or why not: "refused", "timeout", "status 500", ...
    seconds: float


async def check(backend: Backend, spec: HealthCheck, first: bytes = b"") -> CheckResult:
    """One check of `backend`, bounded by spec.timeout_seconds. `first`: bytes sent before
    anything else (a PROXY header, for a group whose servers expect one on every
    connection)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(spec.timeout_seconds):
            if spec.type == "http":
                reason = await _http(backend, spec, first)
            else:
                reason = await _tcp(backend, first)
    except TimeoutError:
        reason = "timeout"
    except ConnectionRefusedError:
        reason = "refused"
    except (OSError, h11.ProtocolError) as error:
        reason = type(error).__name__
    return CheckResult(reason == "ok", reason, time.monotonic() - started)


async def _tcp(backend: Backend, first: bytes) -> str:
    _, writer = await asyncio.open_connection(backend.connect_hosts[0], backend.port)
    writer.write(first)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "ok"


async def _http(backend: Backend, spec: HealthCheck, first: bytes) -> str:
    reader, writer = await asyncio.open_connection(backend.connect_hosts[0], backend.port)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", spec.host or backend.address),
            ("User-Agent", "balancer-health-check"),
            ("Connection", "close"),
        ]
        request = h11.Request(method=spec.method, target=spec.path, headers=headers)
        writer.write(first + conn.send(request) + conn.send(h11.EndOfMessage()))
        status: int | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                if spec.body_contains is None:
                    break
            elif isinstance(event, h11.Data):
                body = (body + bytes(event.data))[-BODY_LIMIT_BYTES:]
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status is None:
            return "no response"
        if not any(low <= status <= high for low, high in spec.expect_status):
            return f"status {status}"
        if spec.body_contains is not None and spec.body_contains.encode() not in body:
            return "body without the expected text"
        return "ok"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


Observed = Callable[[int, CheckResult], None]  # backend index, result
Changed = Callable[[int, str, CheckResult], None]  # backend index, new state, last result


class HealthChecker:
    """Checks every backend on its own jittered schedule (see the module docstring)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        specs: Sequence[HealthCheck],
        changed: Changed,
        observed: Observed = lambda index, result: None,
        rng: random.Random | None = None,
        firsts: Sequence[bytes] = (),
    ) -> None:
        self.backends = list(backends)
        self.configured = list(backends)  # (a discovered slot's: its empty placeholder)
        self.specs = list(specs)  # each backend's (its group's); type "none": not checked
        # What each backend's checks send first (its group's PROXY header for checks, or b"").
        self.firsts = list(firsts) or [b""] * len(self.backends)
        self.changed = changed
        self.observed = observed
        self.rng = rng or random.Random()
        self.health = [Health(spec.rise, spec.fall) for spec in self.specs]
        self.last: list[CheckResult | None] = [None] * len(self.backends)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for index, spec in enumerate(self.specs):
            if spec.type != "none":
                self._start(index, self.rng.uniform(0, spec.interval_seconds))

    def _start(self, index: int, delay: float) -> None:
        self._tasks[index] = asyncio.get_running_loop().create_task(self._run(index, delay))

    async def stop(self) -> None:
        self._started = False
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def member(self, index: int, backend: Backend, up: bool = False) -> None:
        """A discovered slot's member (discovery.py), checked from now on, the first check at
        once. Joining while running it is down until `rise` checks in a row pass (checked
        before it serves); `up`: a member the generation started with, up until checked
        down, as configured backends are."""
        self.backends[index] = backend
        spec = self.specs[index]
        self.health[index] = Health(spec.rise, spec.fall, UP if up else DOWN)
        self.last[index] = None
        if self._started and spec.type != "none":
            task = self._tasks.pop(index, None)
            if task is not None:
                task.cancel()
            self._start(index, 0.0)

    def left(self, index: int) -> None:
        """A discovered slot's member left (DNS no longer names it): no more checks of it
        (its host is likely going away: failing checks would say a backend is down that no
        longer is one), and if they had it down, it is no longer said to be."""
        self.backends[index] = self.configured[index]
        spec, health = self.specs[index], self.health[index]
        self.last[index] = None
        if health.state == DOWN:
            self.health[index] = Health(spec.rise, spec.fall, UP)
            self.changed(index, UP, CheckResult(True, "left", 0.0))

    async def _run(self, index: int, delay: float) -> None:
        spec = self.specs[index]
        loop = asyncio.get_running_loop()
        next_at = loop.time() + delay
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += spec.interval_seconds
            backend = self.backends[index]
            if backend.slot and not backend.port:
                continue  # an empty slot: nothing to check
            result = await check(backend, spec, self.firsts[index])
            if self.backends[index] is not backend:
                continue  # (the slot's member changed meanwhile: a verdict on the old one)
            self.last[index] = result
            self.observed(index, result)
            health = self.health[index]
            state = health.observe(result.ok)
            if state is not None:
                count = spec.rise if state == UP else spec.fall
                log.log(
                    logging.INFO if state == UP else logging.WARNING,
                    "backend %s (%s) is %s: %d check(s) in a row %s (last: %s, %.3f s)",
                    backend.name, backend.address, state, count,
                    "passed" if state == UP else "failed", result.reason, result.seconds,
                )  # fmt: skip
                self.changed(index, state, result)

    def view(self) -> list[dict[str, object]]:
        """Each backend's state and last check (for /backends)."""
        return [
            {
                "name": backend.name,
                "state": health.state,
                "last_check": None if last is None else last.reason,
                "last_check_seconds": None if last is None else last.seconds,
            }
            for backend, health, last in zip(self.backends, self.health, self.last, strict=True)
        ]


class HealthReport(Protocol):
    """Where the checks' verdicts are published (observe.HealthMetrics): health.py reports to
    it and does not know the metrics."""

    def backends(self, names: Iterable[str]) -> None: ...

    def changed(self, name: str, up: bool) -> None: ...

    def observed(self, name: str, ok: bool) -> None: ...


def checker_for(
    backends: Sequence[Backend],
    specs: Sequence[HealthCheck],
    table: BackendTable,
    metrics: HealthReport,
    firsts: Sequence[bytes] = (),
) -> HealthChecker:
    """A checker that keeps the verdicts in `table` (what every worker's pool reads) and the
    metrics."""
    names = [backend.name for backend in backends]
    for index in range(len(names)):
        table.set(index, up=True)
    metrics.backends(names)

    def changed(index: int, state: str, result: CheckResult) -> None:
        table.set(index, up=state == UP)
        metrics.changed(names[index], state == UP)

    def observed(index: int, result: CheckResult) -> None:
        metrics.observed(names[index], result.ok)

    return HealthChecker(backends, specs, changed, observed, firsts=firsts)
