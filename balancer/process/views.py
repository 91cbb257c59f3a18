"""The admin listener's views across a supervisor's workers: each worker asked over its
control channel (supervisor.Worker.ask), the answers joined (aggregate.py), the supervisor's
own word added."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import generate_latest

from balancer.observe.aggregate import join_backends, join_connections

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from balancer.backend.health import HealthChecker
    from balancer.backend.pool import BackendTable
    from balancer.config.schema import Config
    from balancer.observe.aggregate import Totals
    from balancer.observe.metrics import HealthMetrics

ASK_TIMEOUT_SECONDS = 3.0  # a worker that does not answer in time is left out (or its last page)


class AskedWorker(Protocol):
    """A worker process as the views ask it (supervisor.Worker)."""

    pid: int
    last_metrics: str | None  # the last page it answered with (set here)

    @property
    def ready(self) -> asyncio.Future[None]: ...

    @property
    def final(self) -> str | None: ...

    @property
    def listening(self) -> asyncio.Task[None]: ...

    @property
    def counted(self) -> str | None: ...

    @property
    def retired(self) -> bool: ...

    def ask(self, what: str) -> Awaitable[Any]: ...


class ServingGeneration(Protocol):
    """The generation that serves now (supervisor.Generation), as /backends reads it."""

    @property
    def config(self) -> Config: ...

    @property
    def checker(self) -> HealthChecker | None: ...

    @property
    def table(self) -> BackendTable: ...


class Supervised(Protocol):
    """What the views read of the supervisor (supervisor.Supervisor)."""

    @property
    def children(self) -> Mapping[int, AskedWorker]: ...

    @property
    def leaving(self) -> Iterable[AskedWorker]: ...

    @property
    def generation(self) -> ServingGeneration: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    @property
    def totals(self) -> Totals: ...

    @property
    def health_metrics(self) -> HealthMetrics: ...

    @property
    def started_unix(self) -> float: ...


class Views:
    """One view across workers, for the admin listener: each worker asked over its control
    channel, the answers joined (aggregate.py), the supervisor's own word added."""

    def __init__(self, supervisor: Supervised) -> None:
        self.supervisor = supervisor

    def _live(self) -> list[AskedWorker]:
        children = self.supervisor.children.values()
        return [w for w in children if w.ready.done() and not w.ready.exception()]

    async def _ask_all(self, what: str) -> list[tuple[AskedWorker, Any]]:
        workers = self._live()
        answers = await asyncio.gather(*(w.ask(what) for w in workers))
        return [(w, a) for w, a in zip(workers, answers, strict=True) if a is not None]

    async def metrics_page(self) -> bytes:
        """Every worker's page summed. A worker too busy to answer in time is counted by its
        last page, one that has exited by its final page until the totals keep it, and one
        that the totals took while we asked only there: no sum goes backwards, counts twice
        or lags an exited worker (tests/e2e/test_workers.py scrapes through ten reloads
        under ab)."""
        workers = self._live()
        pages = await asyncio.gather(*(w.ask("metrics") for w in workers))
        for worker, page in zip(workers, pages, strict=True):
            if page is not None:
                worker.last_metrics = page
        # An exited worker's final page is on its way (its channel read to the end): wait for
        # it, bounded, rather than count it by an older answer.
        reading = [w.listening for w in self.supervisor.leaving if w.final is None]
        if reading:
            await asyncio.wait(reading, timeout=ASK_TIMEOUT_SECONDS)
        counted = [w.counted for w in {*workers, *self.supervisor.leaving} if not w.retired]
        live = [page for page in counted if page is not None]
        own = generate_latest(self.supervisor.registry).decode()
        return self.supervisor.totals.merged(live, own).encode()

    async def connections(self) -> dict[str, Any]:
        return join_connections((w.pid, view) for w, view in await self._ask_all("connections"))

    async def backends(self) -> list[dict[str, Any]]:
        joined = join_backends((w.pid, view) for w, view in await self._ask_all("backends"))
        generation = self.supervisor.generation
        names = [backend.name for backend in generation.config.backends]
        checker = generation.checker
        checks = {entry["name"]: entry for entry in checker.view()} if checker else {}
        for backend in joined:
            if backend["name"] in names:  # the table's word: state and weight
                index = names.index(backend["name"])
                backend["state"] = generation.table.state(index)
                backend["weight"] = generation.table.weight(index)
            # Since when it has been in that state (the active checks' or the operator's last
            # change to it, else the start).
            changed = self.supervisor.health_metrics.changed_at.get(backend["name"])
            backend["state_since"] = round(changed or self.supervisor.started_unix, 1)
            if backend["name"] in checks:
                backend["last_check"] = checks[backend["name"]]["last_check"]
                backend["last_check_seconds"] = checks[backend["name"]]["last_check_seconds"]
        return joined
