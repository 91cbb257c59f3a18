"""One view across workers: pages summed, exited workers' counts kept, lists joined."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer.observe.aggregate import Totals, join_backends, join_connections
from balancer.process.views import Views


def page(accepted: int, open_now: int, seconds: list[float]) -> str:
    """A worker's page as prometheus_client writes it: a counter, a gauge, a histogram."""
    registry = CollectorRegistry()
    Counter("balancer_connections_accepted", "Accepted.", ["listener"], registry=registry).labels(
        "http"
    ).inc(accepted)
    Gauge("balancer_connections_active", "Open now.", ["listener"], registry=registry).labels(
        "http"
    ).set(open_now)
    histogram = Histogram(
        "balancer_connection_duration_seconds", "Lifetime.", buckets=(0.1,), registry=registry
    )
    for value in seconds:
        histogram.observe(value)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def test_live_pages_sum_and_the_result_parses_as_prometheus_text() -> None:
    merged = samples(Totals().merged([page(3, 1, [0.05]), page(4, 2, [0.05, 0.5])]))
    assert merged["balancer_connections_accepted_total{listener=http}"] == 7
    assert merged["balancer_connections_active{listener=http}"] == 3
    assert merged["balancer_connection_duration_seconds_bucket{le=0.1}"] == 2
    assert merged["balancer_connection_duration_seconds_bucket{le=+Inf}"] == 3
    assert merged["balancer_connection_duration_seconds_count{}"] == 3
    assert not any("_created" in name for name in merged)  # a time, not a count


def test_an_exited_workers_counts_stay_and_its_gauges_go() -> None:
    totals = Totals()
    before = samples(totals.merged([page(5, 2, [0.05]), page(1, 1, [])]))
    totals.retire(page(5, 2, [0.05]))  # the first worker exits; a new one starts at zero
    after = samples(totals.merged([page(1, 1, []), page(0, 0, [])]))
    accepted = "balancer_connections_accepted_total{listener=http}"
    assert after[accepted] == before[accepted] == 6  # never backwards
    assert after["balancer_connections_active{listener=http}"] == 1  # what is open now
    assert after["balancer_connection_duration_seconds_count{}"] == 1


def test_connection_lists_join_and_say_which_worker() -> None:
    joined = join_connections(
        [
            (11, {"open": [{"id": 1}], "recent_closed": [{"id": 1, "start": 2.0}]}),
            (12, {"open": [{"id": 1}], "recent_closed": [{"id": 1, "start": 1.0}]}),
        ]
    )
    assert [c["worker_pid"] for c in joined["open"]] == [11, 12]
    assert [r["start"] for r in joined["recent_closed"]] == [1.0, 2.0]


def test_backend_lists_sum_their_counts_and_keep_each_workers_line() -> None:
    line = {"name": "web1", "address": "a:1", "weight": 1, "active": 2,
            "connections_total": 10, "connect_failures_total": 1,
            "idle_connections": 0}  # fmt: skip
    (web1,) = join_backends([(11, [line]), (12, [{**line, "active": 1}])])
    counts = (web1["active"], web1["connections_total"], web1["connect_failures_total"])
    assert counts == (3, 20, 2)
    assert [w["worker_pid"] for w in web1["workers"]] == [11, 12]


def test_a_backend_ejected_by_some_workers_passive_checks_says_by_how_many() -> None:
    line = {"name": "web1", "address": "a:1", "weight": 1, "ejected_seconds": 0.0}
    (web1,) = join_backends([(11, [line]), (12, [{**line, "ejected_seconds": 8.5}])])
    assert web1["ejected_by_workers"] == 1
    assert [w["ejected_seconds"] for w in web1["workers"]] == [0.0, 8.5]


class _Worker:
    """What Views reads of a worker: readiness, an answer, and what it counted."""

    def __init__(self, page: str, final: str | None = None) -> None:
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.set_result(None)
        self.page, self.final, self.last_metrics, self.retired = page, final, None, False

    @property
    def counted(self) -> str | None:
        return self.final if self.final is not None else self.last_metrics

    async def ask(self, what: str) -> str:
        return self.page


def _requests(page: bytes) -> float:
    line = next(x for x in page.decode().splitlines() if x.startswith("balancer_requests_total"))
    return float(line.rsplit(" ", 1)[1])


async def test_a_worker_between_its_exit_and_its_retirement_is_counted_once() -> None:
    """/metrics never dips while an exited worker's final page is being kept, nor counts it
    twice once the totals hold it (the window between reaping and retiring)."""
    page = "# TYPE balancer_requests_total counter\nbalancer_requests_total {}\n"
    live = _Worker(page.format(5))
    gone = _Worker(page.format(0), final=page.format(7))
    supervisor = SimpleNamespace(
        children={1: live}, leaving={gone}, totals=Totals(), registry=CollectorRegistry()
    )
    views = Views(supervisor)  # type: ignore[arg-type]  (a stand-in: what Views reads)
    assert _requests(await views.metrics_page()) == 12  # reaped, not yet retired: counted
    supervisor.totals.retire(gone.counted)
    gone.retired = True  # retired while still in `leaving`: counted by the totals alone
    assert _requests(await views.metrics_page()) == 12
