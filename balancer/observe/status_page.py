"""The status page at the admin root: the farm at a glance, one HTML page. Pure.

Built from what the admin API already serves: the /metrics page (summed over the workers)
and the /backends list. No external assets, no script: it refreshes itself every
REFRESH_SECONDS (a meta refresh) and reads on a phone (a viewport, tables that scroll).
Shown: the version and build, workers, uptime and the last reload's result; listeners
(accepted, open); backends (state and for how long, weight, in flight, requests and 5xx a
second, totals, the last check and its time); the TLS handshake-duration distribution; and
how connections ended on each leg (who closed first; FIN, RST or close_notify).

Rates are differences between the pages this admin listener rendered (`Rates`, the one
thing kept between renders): over the last RATE_WINDOW_SECONDS, shown once two renders are
a second apart.
"""

from __future__ import annotations

import html
from collections import defaultdict, deque
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from balancer.observe.aggregate import Family, parse

REFRESH_SECONDS = 2
RATE_WINDOW_SECONDS = 30.0
_STATE_COLOURS = {"up": "#1a7f37", "down": "#cf222e", "draining": "#9a6700",
                  "maintenance": "#6e7781", "ejected": "#bc4c00"}  # fmt: skip
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#1f2328}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}
.scroll{overflow-x:auto}table{border-collapse:collapse;min-width:60%}
th,td{padding:.25em .6em;border-bottom:1px solid #d0d7de;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
.state{font-weight:600}.bar{background:#0969da;height:.8em;display:inline-block}
.muted{color:#656d76}
"""


class Rates:
    """Per backend, responses and 5xx responses a second, from the counters of successive
    renders (balancer_responses_total, summed over listeners)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()

    def update(self, now: float, families: dict[str, Family]) -> dict[str, tuple[float, float]]:
        """Counts as of `now` (Unix seconds) in; (responses/s, 5xx/s) per backend out, over
        the oldest render kept (at most RATE_WINDOW_SECONDS old); empty until one is a second
        old."""
        totals: dict[str, tuple[float, float]] = {}
        family = families.get("balancer_responses")
        for (_, labels), value in family.samples.items() if family is not None else ():
            found = dict(labels)
            name = found.get("backend", "")
            responses, errors = totals.get(name, (0.0, 0.0))
            totals[name] = (responses + value, errors + value * (found.get("class") == "5xx"))
        samples = self._samples
        while len(samples) > 1 and now - samples[1][0] >= RATE_WINDOW_SECONDS:
            samples.popleft()  # (one older than the window stays: the window's start)
        rates: dict[str, tuple[float, float]] = {}
        if samples and now - samples[0][0] >= 1.0:
            then, before = samples[0]
            for name, (responses, errors) in totals.items():
                was = before.get(name, (0.0, 0.0))
                rates[name] = (
                    (responses - was[0]) / (now - then),
                    (errors - was[1]) / (now - then),
                )
        samples.append((now, totals))
        return rates


def render(
    metrics_page: str, backends: list[dict[str, Any]], now: datetime, rates: Rates | None = None
) -> bytes:
    families = parse(metrics_page)
    per_second = (rates or Rates()).update(now.timestamp(), families)
    shown = now.strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f'<meta http-equiv=refresh content="{REFRESH_SECONDS}">',
        f"<title>balancer status</title><style>{_STYLE}</style></head><body>",
        f"<h1>balancer</h1><p class=muted>{shown}; refreshes every {REFRESH_SECONDS} s</p>",
        _summary(families, now.timestamp()),
        _listeners(families),
        _backends(backends, per_second, now.timestamp()),
        _handshakes(families),
        _closes(families),
        "</body></html>\n",
    ]
    return "".join(parts).encode()


def _table(caption: str, ident: str, head: Iterable[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"<h2>{caption}</h2><p class=muted id={ident}>none yet</p>"
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f"<h2>{caption}</h2><div class=scroll><table id={ident}>"
        f"<thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _by(family: Family | None, label: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    if family is not None:
        for (_, labels), value in family.samples.items():
            totals[dict(labels).get(label, "")] += value
    return totals


def _listeners(families: dict[str, Family]) -> str:
    accepted = _by(families.get("balancer_connections_accepted"), "listener")
    active = _by(families.get("balancer_connections_active"), "listener")
    by_protocol: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    requests = families.get("balancer_client_requests")
    for (_, labels), value in requests.samples.items() if requests is not None else ():
        found = dict(labels)
        by_protocol[found.get("listener", "")][found.get("protocol", "")] += value
    rows = [
        [html.escape(name), f"{accepted[name]:.0f}", f"{active.get(name, 0):.0f}",
         _share(by_protocol[name].get("h2", 0.0), sum(by_protocol[name].values()))]
        for name in sorted(accepted)
    ]  # fmt: skip
    head = ("listener", "accepted", "open now", "HTTP/2 share of requests")
    return _table("Listeners", "listeners", head, rows)


def _share(part: float, whole: float) -> str:
    return "none" if not whole else f"{100 * part / whole:.0f}%"


def _value(families: dict[str, Family], name: str) -> float | None:
    family = families.get(name)
    return None if family is None or not family.samples else sum(family.samples.values())


def _duration(seconds: float) -> str:
    """5 s, 3 min, 2 h 5 min, 4 d 3 h: how long, to the unit that matters."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _summary(families: dict[str, Family], now: float) -> str:
    """The version, workers, uptime and last reload: what the supervisor exports of itself
    (a lone balancer's page has none of it, and shows nothing here)."""
    items = []
    info = families.get("balancer_build_info")
    for _, labels in info.samples if info is not None else ():
        found = dict(labels)
        items.append(f"version {html.escape(found.get('version', '?'))} "
                     f"({html.escape(found.get('build', '?'))})")  # fmt: skip
    workers = _value(families, "balancer_workers")
    if workers is not None:
        items.append(f"{workers:.0f} worker(s)")
    started = _value(families, "balancer_start_time_seconds")
    if started is not None:
        items.append(f"up {_duration(now - started)}")
    loaded = _value(families, "balancer_config_last_reload_success_timestamp_seconds")
    ok = _value(families, "balancer_config_last_reload_successful")
    if loaded is not None and ok is not None:
        failed = _by(families.get("balancer_config_reloads"), "result").get("failure", 0)
        verdict = "ok" if ok else "<strong>failed</strong> (the configuration before it serves)"
        items.append(f"configuration loaded {_duration(now - loaded)} ago; last reload: "
                     f"{verdict}; {failed:.0f} failed reload(s) in all")  # fmt: skip
    return f"<p id=summary>{'; '.join(items)}</p>" if items else ""


def _backends(
    backends: list[dict[str, Any]], rates: dict[str, tuple[float, float]], now: float
) -> str:
    rows = []
    empty: dict[str, int] = {}  # a discovered group's slots without a member, counted apart
    for backend in backends:
        state = str(backend.get("state", "up"))
        if state == "empty":
            group = str(backend.get("group", ""))
            empty[group] = empty.get(group, 0) + 1
            continue
        if state == "up" and backend.get("ejected_by_workers"):  # passive checks skip it
            state = "ejected"
        colour = _STATE_COLOURS.get(state, "#1f2328")
        seconds = backend.get("last_check_seconds")
        check = backend.get("last_check")
        since = backend.get("state_since")
        rate = rates.get(str(backend["name"]))
        rows.append([
            html.escape(str(backend["name"])),
            html.escape(str(backend.get("group", ""))),
            html.escape(str(backend.get("address", ""))),
            f'<span class=state style="color:{colour}" data-state="{html.escape(state)}">'
            f"{html.escape(state)}</span>",
            "&ndash;" if since is None else _duration(now - float(since)),
            str(backend.get("weight", "")),
            str(backend.get("active", 0)),
            "&ndash;" if rate is None else f"{rate[0]:.1f}",
            "&ndash;" if rate is None else f"{rate[1]:.1f}",
            str(backend.get("connections_total", 0)),
            str(backend.get("connect_failures_total", 0)),
            "&ndash;" if check is None else html.escape(str(check)),
            "&ndash;" if seconds is None else f"{1000 * float(seconds):.1f} ms",
        ])  # fmt: skip
    head = ("backend", "group", "address", "state", "for", "weight", "in flight", "responses/s",
            "5xx/s", "total", "connect failures", "last check", "check time")  # fmt: skip
    table = _table("Backends", "backends", head, rows)
    if empty:
        said = "; ".join(f"group {html.escape(g)}: {n} empty slot(s)" for g, n in empty.items())
        table += f"<p id=empty-slots>DNS discovery: {said} (members DNS may name next)</p>"
    return table


def _handshakes(families: dict[str, Family]) -> str:
    """The TLS handshake-duration histogram, summed over listeners, versions and ciphers."""
    family = families.get("balancer_tls_handshake_seconds")
    cumulative: dict[float, float] = defaultdict(float)
    if family is not None:
        for (name, labels), value in family.samples.items():
            if name.endswith("_bucket"):
                cumulative[float(dict(labels)["le"])] += value
    bounds, below = sorted(cumulative), 0.0
    counts = []
    for bound in bounds:
        counts.append(cumulative[bound] - below)
        below = cumulative[bound]
    seen = [i for i, count in enumerate(counts) if count]
    total = sum(counts)
    rows = []
    for i in range(seen[0], seen[-1] + 1) if seen else ():  # the buckets that hold any
        width = int(200 * counts[i] / total)
        shown = "more" if bounds[i] == float("inf") else f"&le; {1000 * bounds[i]:g} ms"
        bar = f'<span class=bar style="width:{width}px"></span>'
        rows.append([shown, f"{counts[i]:.0f}", bar])
    return _table("TLS handshake durations", "handshakes", ("duration", "handshakes", ""), rows)


def _closes(families: dict[str, Family]) -> str:
    """Who closed first and how, per leg (balancer_closes_total)."""
    family = families.get("balancer_closes")
    counts: dict[tuple[str, str, str], float] = defaultdict(float)
    if family is not None:
        for (_, labels), value in family.samples.items():
            found = dict(labels)
            counts[(found["leg"], found["initiator"], found["kind"])] += value
    rows = [
        [html.escape(leg), html.escape(initiator), html.escape(kind), f"{count:.0f}"]
        for (leg, initiator, kind), count in sorted(counts.items())
    ]
    head = ("leg", "closed first by", "how", "count")
    return _table("How connections ended", "closes", head, rows)
