"""The Grafana dashboard and the Prometheus rules in config/ query only what a real scrape has."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import BalancerProcess, run

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).resolve().parents[2] / "config"
NAME = re.compile(r"\bbalancer_[a-z0-9_]+\b")


def queried() -> set[str]:
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = (CONFIG / "prometheus-alerts.yml").read_text()
    return set(NAME.findall("\n".join(exprs))) | set(NAME.findall(rules))


def scraped(page: str) -> set[str]:
    """Every sample name the page's families can have (a histogram's _bucket, _sum, _count)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_metric_a_panel_or_rule_queries_is_in_a_real_scrape(farm_ports, tmp_path) -> None:
    config = tmp_path / "balancer.toml"
    config.write_text(
        'admin = "127.0.0.1:0"\nworkers = 2\n'
        '[[listeners]]\nname = "http"\nbind = "127.0.0.1:0"\n'
        '[health_check]\ntype = "tcp"\ninterval_seconds = 0.5\ntimeout_seconds = 0.5\n'
        f'[[backends]]\nname = "web1"\naddress = "127.0.0.1:{farm_ports[0]}"\n'
        # A discovered group (its DNS families): no server answers, its resolutions fail.
        '[[groups]]\nname = "found"\ndiscover = "web.test:80"\nslots = 2\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout_seconds = 0.2\n'
    )
    with BalancerProcess(["-c", str(config)], {"http", "admin"}, tmp_path) as running:
        run("curl", "-s", "-o", "/dev/null", running.url("http"))
        page = run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/metrics").stdout
    names = queried()
    assert len(names) >= 10
    missing = sorted(names - scraped(page))
    assert not missing, missing


def test_the_alerting_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    result = run(promtool, "check", "rules", str(CONFIG / "prometheus-alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout
