"""The status page's HTML, from a metrics page and a backends list (no server)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from balancer.status_page import render

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
