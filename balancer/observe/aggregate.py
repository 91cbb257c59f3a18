"""One view across workers: Prometheus pages summed, connection lists joined. Pure.

Every metric the balancer exports sums across workers: counters and histogram series (each
bucket, `_sum`, `_count`) and the gauges too (connections open, leases, idle connections are
each a count of things some worker holds). A worker that has exited leaves its counters and
histograms behind (`Totals.retire`): summed with the live workers' they never go backwards
across a restart or a reload; its gauges go with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


class Family:
    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: dict[SampleKey, float] = {}


Families = dict[str, Family]


def parse(page: str, counts_only: bool = False) -> Families:
    """A Prometheus text page as families (`counts_only`: counters and histograms only)."""
    families: Families = {}
    for metric in text_string_to_metric_families(page):
        if metric.name.endswith("_created"):
            continue  # a creation time: not a count, and meaningless summed
        if counts_only and metric.type not in ("counter", "histogram"):
            continue
        family = families[metric.name] = Family(metric.name, metric.type, metric.documentation)
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            family.samples[key] = family.samples.get(key, 0.0) + sample.value
    return families


def add(into: Families, more: Families) -> Families:
    for name, family in more.items():
        mine = into.get(name)
        if mine is None:
            mine = into[name] = Family(name, family.kind, family.help)
        for key, value in family.samples.items():
            mine.samples[key] = mine.samples.get(key, 0.0) + value
    return into


def render(families: Iterable[Family]) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines: list[str] = []
    for family in families:
        help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        # The parser names a counter without its _total; its samples keep it, as the page
        # prometheus_client writes names the family by them.
        name = family.name
        if family.kind == "counter" and not name.endswith("_total"):
            name += "_total"
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {family.kind}")
        for (name, labels), value in family.samples.items():
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            sample = f"{name}{{{shown}}}" if shown else name
            lines.append(f"{sample} {_value(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(int(value)) if value.is_integer() else repr(value)


class Totals:
    """What exited workers counted (see the module docstring)."""

    def __init__(self) -> None:
        self.retired: Families = {}

    def retire(self, page: str | None) -> None:
        if page:
            add(self.retired, parse(page, counts_only=True))

    def merged(self, live_pages: Iterable[str], own_page: str = "") -> str:
        families: Families = {}
        add(families, self.retired)
        for page in live_pages:
            add(families, parse(page))
        if own_page:
            add(families, parse(own_page))
        return render(families.values())


def join_connections(views: Iterable[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Each worker's /connections (by pid) as one: open connections say which worker."""
    open_now: list[dict[str, Any]] = []
    recent: list[dict[str, Any]] = []
    for pid, view in views:
        open_now += [{**conn, "worker_pid": pid} for conn in view.get("open", [])]
        recent += view.get("recent_closed", [])
    recent.sort(key=lambda record: record.get("start") or 0)
    return {"open": open_now, "recent_closed": recent}


def join_backends(views: Iterable[tuple[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each worker's /backends as one list: counts summed, each worker's own line kept."""
    joined: dict[str, dict[str, Any]] = {}
    for pid, backends in views:
        for backend in backends:
            entry = joined.setdefault(
                backend["name"],
                {"name": backend["name"], "group": backend.get("group"),
                 "address": backend["address"],
                 "weight": backend["weight"], "active": 0, "connections_total": 0,
                 "connect_failures_total": 0, "idle_connections": 0,
                 "ejected_by_workers": 0, "workers": []},
            )  # fmt: skip
            for key in ("active", "connections_total", "connect_failures_total",
                        "idle_connections"):  # fmt: skip
                entry[key] += backend.get(key, 0)
            if backend.get("ejected_seconds", 0) > 0:  # a worker's passive checks skip it
                entry["ejected_by_workers"] += 1
            entry["workers"].append({**backend, "worker_pid": pid})
    return list(joined.values())
