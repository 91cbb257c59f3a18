"""The status page's HTML, from a metrics page and a backends list (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from balancer.observe.status_page import Rates, render

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_backends_show_their_state_and_names_are_escaped() -> None:
    backends = [
        {"name": "web1", "group": "api", "address": "10.0.0.1:80", "state": "up", "weight": 2,
         "active": 3,
         "connections_total": 40, "connect_failures_total": 1, "last_check": "ok",
         "last_check_seconds": 0.0042},
        {"name": "<web2>", "state": "draining"},
    ]  # fmt: skip
    page = render("", backends, NOW).decode()
    assert 'data-state="up">up</span>' in page and 'data-state="draining"' in page
    assert "&lt;web2&gt;" in page and "<web2>" not in page
    assert "<th>group</th>" in page and "<td>web1</td><td>api</td>" in page
    assert "4.2 ms" in page and "2026-11-30 12:00:00 UTC" in page
    assert page.count("none yet") == 3  # listeners, handshakes, closes: nothing counted yet


def test_handshakes_and_closes_are_summed_from_the_metrics_page() -> None:
    registry = CollectorRegistry()
    closes = Counter("balancer_closes", "c", ["listener", "leg", "initiator", "kind"],
                     registry=registry)  # fmt: skip
    closes.labels("http", "client", "balancer", "fin").inc(7)
    closes.labels("https", "client", "balancer", "fin").inc(3)
    handshakes = Histogram("balancer_tls_handshake_seconds", "h", ["listener"],
                           buckets=(0.001, 0.005, 0.01), registry=registry)  # fmt: skip
    for seconds in (0.002, 0.003, 0.004, 0.02):
        handshakes.labels("https").observe(seconds)
    page = render(generate_latest(registry).decode(), [], NOW).decode()
    assert "<td>client</td><td>balancer</td><td>fin</td><td>10</td>" in page
    assert "&le; 5 ms</td><td>3</td>" in page and "more</td><td>1</td>" in page
    assert "&le; 1 ms" not in page  # empty buckets before the first are left out


def test_an_up_backend_that_passive_checks_eject_shows_as_ejected() -> None:
    backends = [
        {"name": "web1", "state": "up", "ejected_by_workers": 2},
        {"name": "web2", "state": "up", "ejected_by_workers": 0},
        {"name": "web3", "state": "maintenance", "ejected_by_workers": 1},  # the operator's word
    ]
    page = render("", backends, NOW).decode()
    assert 'data-state="ejected">ejected</span>' in page
    assert 'data-state="up">up</span>' in page and 'data-state="maintenance"' in page


def _responses(ok: float, errors: float) -> str:
    registry = CollectorRegistry()
    responses = Counter("balancer_responses", "r", ["listener", "backend", "class"],
                        registry=registry)  # fmt: skip
    responses.labels("http", "web1", "2xx").inc(ok)
    responses.labels("https", "web1", "5xx").inc(errors)
    return generate_latest(registry).decode()


def test_rates_are_the_counters_difference_over_the_time_between_renders() -> None:
    rates = Rates()
    backends = [{"name": "web1", "state": "up"}]
    first = render(_responses(100, 10), backends, NOW, rates).decode()
    assert "<td>&ndash;</td><td>&ndash;</td>" in first  # no rate from one render
    later = NOW + timedelta(seconds=4)
    page = render(_responses(140, 12), backends, later, rates).decode()
    assert "<td>10.5</td><td>0.5</td>" in page  # (42 responses, 2 of them 5xx) / 4 s


def test_the_summary_says_version_workers_uptime_and_the_last_reload() -> None:
    registry = CollectorRegistry()
    Gauge("balancer_build_info", "b", ["version", "build"], registry=registry).labels(
        "0.1.0", "pure Python"
    ).set(1)
    Gauge("balancer_workers", "w", registry=registry).set(2)
    Gauge("balancer_start_time_seconds", "s", registry=registry).set(NOW.timestamp() - 7500)
    loaded = Gauge("balancer_config_last_reload_success_timestamp_seconds", "l",
                   registry=registry)  # fmt: skip
    loaded.set(NOW.timestamp() - 30)
    ok = Gauge("balancer_config_last_reload_successful", "o", registry=registry)
    reloads = Counter("balancer_config_reloads", "r", ["result"], registry=registry)
    reloads.labels("failure").inc()
    backends = [{"name": "web1", "state": "down", "state_since": NOW.timestamp() - 125}]
    page = render(generate_latest(registry).decode(), backends, NOW).decode()
    assert "version 0.1.0 (pure Python); 2 worker(s); up 2 h 5 min" in page
    assert "loaded 30 s ago; last reload: <strong>failed</strong>" in page  # ok is 0
    assert "1 failed reload(s)" in page
    assert 'data-state="down">down</span></td><td>2 min</td>' in page
    ok.set(1)
    assert "last reload: ok" in render(generate_latest(registry).decode(), [], NOW).decode()


def test_empty_dns_slots_are_counted_in_a_line_not_listed() -> None:
    backends = [
        {"name": "web-1", "group": "web", "address": "10.0.0.1:80", "state": "up"},
        {"name": "web-2", "group": "web", "address": "", "state": "empty"},
        {"name": "web-3", "group": "web", "address": "", "state": "empty"},
    ]
    page = render("", backends, NOW).decode()
    assert "<td>web-1</td>" in page and "web-2" not in page and "web-3" not in page
    assert "DNS discovery: group web: 2 empty slot(s)" in page


def test_each_listener_shows_its_http2_share_of_requests() -> None:
    registry = CollectorRegistry()
    accepted = Counter("balancer_connections_accepted", "a", ["listener"], registry=registry)
    requests = Counter("balancer_client_requests", "r", ["listener", "protocol"],
                       registry=registry)  # fmt: skip
    accepted.labels("https").inc(5)
    accepted.labels("http").inc(2)
    requests.labels("https", "h2").inc(30)
    requests.labels("https", "http/1.1").inc(10)
    page = render(generate_latest(registry).decode(), [], NOW).decode()
    assert "<th>HTTP/2 share of requests</th>" in page
    assert "<td>https</td><td>5</td><td>0</td><td>75%</td>" in page
    assert "<td>http</td><td>2</td><td>0</td><td>none</td>" in page  # no request counted
