"""Runtime control on the admin listener: drain, enable, maintenance, weight, by token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.conftest import BalancerProcess, Running, need, run
from tests.e2e.test_workers import scrape, wait_until, worker_pids

pytestmark = pytest.mark.e2e

TOKEN = "0123456789abcdef0123456789abcdef"


def write_config(path: Path, farm_ports: list[int], token: Path | None, weight2: int = 1) -> None:
    path.write_text(
        'admin = "127.0.0.1:0"\n'
        + (f'admin_token_file = "{token}"\n' if token else "")
        + '[[listeners]]\nname = "http"\nbind = "127.0.0.1:0"\n'
        f'[[backends]]\nname = "web1"\naddress = "127.0.0.1:{farm_ports[0]}"\n'
        f'[[backends]]\nname = "web2"\naddress = "127.0.0.1:{farm_ports[1]}"\n'
        f"weight = {weight2}\n"
    )


def start(
    tmp_path: Path, farm_ports: list[int], *extra: str, token: bool = True
) -> BalancerProcess:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "balancer.toml"
    write_config(config, farm_ports, token_file if token else None)
    args = ["-c", str(config), "--access-log", str(tmp_path / "access.log"), *extra]
    return BalancerProcess(args, {"http", "admin"}, tmp_path)


def post(
    running: Running, path: str, token: str | None = TOKEN, body: str = ""
) -> tuple[int, dict]:
    command = ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST"]
    if token is not None:
        command += ["-H", f"Authorization: Bearer {token}"]
    if body:
        command += ["-H", "Content-Type: application/json", "--data", body]
    out = run(*command, f"http://127.0.0.1:{running.ports['admin']}{path}").stdout
    text, _, status = out.rpartition("\n")
    return int(status), json.loads(text)


def backends(running: Running) -> dict[str, dict]:
    url = f"http://127.0.0.1:{running.ports['admin']}/backends"
    return {b["name"]: b for b in json.loads(run("curl", "-s", url).stdout)}


def served(running: Running, count: int) -> Counter[str]:
    out = [run("curl", "-s", "-D", "-", "-o", "/dev/null", running.url("http")).stdout
           for _ in range(count)]  # fmt: skip
    return Counter(line.split(":")[1].strip() for o in out for line in o.splitlines()
                   if line.lower().startswith("x-backend"))  # fmt: skip


def test_writes_need_the_token_and_every_refusal_is_counted(farm_ports, tmp_path) -> None:
    with start(tmp_path, farm_ports, token=False) as running:
        status, answer = post(running, "/backends/web2/drain")
        assert status == 401 and "admin_token_file" in answer["error"]
    with start(tmp_path, farm_ports) as running:
        assert post(running, "/backends/web2/drain", token=None)[0] == 401
        assert post(running, "/backends/web2/drain", token="x" * 32)[0] == 401
        assert post(running, "/backends/nope/drain")[0] == 404
        assert post(running, "/backends/web2/weight", body='{"weight": 0}')[0] == 400
        metrics = scrape(running)
        assert metrics['balancer_admin_writes_total{result="unauthorized"}'] == 2
        assert metrics['balancer_admin_writes_total{result="not_found"}'] == 1
        assert metrics['balancer_admin_writes_total{result="bad_request"}'] == 1
        assert backends(running)["web2"]["state"] == "up"  # nothing refused changed anything
        admin = f"http://127.0.0.1:{running.ports['admin']}"
        refused = run("curl", "-s", "-i", "-X", "POST", f"{admin}/backends/web2/drain").stdout
        assert "WWW-Authenticate: Bearer" in refused  # RFC 9110: how to authenticate
        running.wait_for_log("admin API: refused POST /backends/web2/drain (401: a bearer token)")
        read = run("curl", "-s", "-i", f"{admin}/backends/web2/drain").stdout  # a GET
        assert read.startswith("HTTP/1.1 405") and "Allow: POST" in read
        posted = run("curl", "-s", "-i", "-X", "POST", f"{admin}/metrics").stdout
        assert posted.startswith("HTTP/1.1 401")  # a write URL or not, a POST needs the token


def test_an_instance_leaves_the_tier_by_its_health_endpoint_and_serves_on(
    farm_ports, tmp_path
) -> None:
    """Issue 23, item 3: SIGUSR2 (or POST /healthz/fail) makes /healthz fail for the L4
    tier's checks while requests are served as before; POST /healthz/ok brings it back."""
    with start(tmp_path, farm_ports, "--workers", "2") as running:
        admin = f"http://127.0.0.1:{running.ports['admin']}"

        def health() -> str:
            return run(
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{admin}/healthz"
            ).stdout

        def served() -> str:
            return run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", running.url()).stdout

        assert health() == "200" and scrape(running)["balancer_healthz_failing"] == 0
        os.kill(running.process.pid, signal.SIGUSR2)
        running.wait_for_log("/healthz fails from now on (SIGUSR2)")
        assert (health(), served()) == ("503", "200")  # out of the tier, still serving
        assert scrape(running)["balancer_healthz_failing"] == 1
        assert post(running, "/healthz/ok", token=None)[0] == 401  # a write: the token
        assert post(running, "/healthz/ok")[0] == 200 and health() == "200"
        assert post(running, "/healthz/fail")[0] == 200 and health() == "503"
        read = run("curl", "-s", "-i", f"{admin}/healthz/fail").stdout  # a GET does nothing
        assert read.startswith("HTTP/1.1 405") and health() == "503"


def test_a_drain_under_ab_fails_no_request_and_new_work_avoids_the_backend(
    farm_ports, tmp_path
) -> None:
    ab = need("ab")
    with start(tmp_path, farm_ports, "--workers", "2") as running:
        load = subprocess.Popen(
            [ab, "-n", "3000", "-c", "8", running.url("http")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        wait_until(lambda: backends(running)["web2"]["connections_total"] > 300)
        status, answer = post(running, "/backends/web2/drain")
        assert status == 200 and answer["state"] == "draining"
        output, _ = load.communicate(timeout=120)
        assert "Complete requests:      3000" in output and "Failed requests:        0" in output
        before = backends(running)["web2"]["connections_total"]
        assert served(running, 10) == {"web1": 10}
        after = backends(running)["web2"]
        assert after["connections_total"] == before and after["state"] == "draining"
        assert {w["state"] for w in after["workers"]} == {"draining"}  # every worker reads it
        assert post(running, "/backends/web2/maintenance")[1]["state"] == "maintenance"
        assert served(running, 4) == {"web1": 4}
        assert post(running, "/backends/web2/enable")[1]["state"] == "up"
        assert set(served(running, 6)) == {"web1", "web2"}
        metrics = scrape(running)
        assert metrics['balancer_backend_state_changes_total{backend="web2",state="draining"}'] == 1


def test_a_weight_set_at_run_time_takes_effect(farm_ports, tmp_path) -> None:
    with start(tmp_path, farm_ports, "--workers", "1") as running:
        status, answer = post(running, "/backends/web1/weight", body='{"weight": 3}')
        assert status == 200 and answer["weight"] == 3
        assert served(running, 8) == {"web1": 6, "web2": 2}  # smooth weighted round robin
        assert post(running, "/backends/web1/weight?value=1")[1]["weight"] == 1


def test_an_override_survives_a_reload_unless_the_file_changed_that_backend(
    farm_ports, tmp_path
) -> None:
    with start(tmp_path, farm_ports, "--workers", "2") as running:
        post(running, "/backends/web2/drain")
        for generation, weight2 in ((2, 1), (3, 2)):  # the file as it was; then web2 changed
            first = worker_pids(running)
            write_config(tmp_path / "balancer.toml", farm_ports, tmp_path / "token", weight2)
            os.kill(running.process.pid, signal.SIGHUP)
            running.wait_for_log(f"reload: generation {generation} serving")
            wait_until(lambda first=first: not set(worker_pids(running)) & set(first))
            expected = "draining" if generation == 2 else "up"
            assert backends(running)["web2"]["state"] == expected, generation
        running.wait_for_log("backend web2: the file changed it; its admin override is dropped")


def test_check_names_an_unreadable_or_short_token_file(farm_ports, tmp_path) -> None:
    config = tmp_path / "balancer.toml"
    for token, said in ((tmp_path / "missing", "cannot read"), (tmp_path / "short", "under 16")):
        if token.name == "short":
            token.write_text("abc\n")
        write_config(config, farm_ports, token)
        result = run(sys.executable, "-m", "balancer", "check", "-c", str(config))
        assert result.returncode == 2 and "admin_token_file" in result.stderr, result.stderr
        assert said in result.stderr
