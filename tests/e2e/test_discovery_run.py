"""DNS discovery through `balancer run`: two workers read the members the supervisor's
resolver writes to their shared table, membership changes apply without a reload, and a
reload carries the members over (no request refused while the new generation starts)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.demo.farm import start_farm
from tests.dnsmasq import Dnsmasq, free_port
from tests.e2e.conftest import BalancerProcess, need, run

pytestmark = pytest.mark.e2e

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@pytest.fixture
def members() -> Iterator[int]:
    """A farm backend on each of HOSTS, one port shared (as A records share it)."""
    loop = asyncio.new_event_loop()
    port = free_port()
    servers: list[asyncio.AbstractServer] = []

    async def main() -> None:
        for host in HOSTS:
            servers.extend(s for s, _ in await start_farm([host], host=host, ports=[port]))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop).result(5)
    yield port
    for server in servers:
        loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def served_by(log: Path, since: float, count: int) -> set[str]:
    """The backend addresses of the access log's connections accepted after `since` (Unix
    time), once `count` of them are written (the log is written in batches)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        after = [x for x in lines if x.get("type") == "connection" and x["start"] > since]
        if len(after) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(after) >= count, f"{len(after)} of {count} connections logged"
    return {x["backend"]["address"].rsplit(":", 1)[0] for x in after if x.get("backend")}


def ab_through(url: str, count: int = 400) -> None:
    output = run(need("ab"), "-n", str(count), "-c", "8", url).stdout
    assert "Failed requests:        0" in output and "Non-2xx responses" not in output, output


def test_members_change_for_every_worker_without_reload_and_a_reload_keeps_them(
    members: int, tmp_path: Path
) -> None:
    dns = Dnsmasq(tmp_path, [f"{HOSTS[0]} web.test", f"{HOSTS[1]} web.test"]).start()
    try:
        asyncio.run(dns.answers("web.test", "A", {HOSTS[0], HOSTS[1]}))
        log = tmp_path / "access.log"
        config = tmp_path / "balancer.toml"
        config.write_text(f"""
workers = 2
access_log = "{log}"
admin = "127.0.0.1:0"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[[groups]]
name = "web"
discover = "web.test:{members}"
slots = 4
[dns]
nameservers = ["{dns.nameserver}"]
ttl_min_seconds = 0.1
ttl_max_seconds = 0.2
""")
        with BalancerProcess(["--config", str(config)], {"http", "admin"}, tmp_path) as running:
            url = running.url("http")
            since = time.time()
            ab_through(url)
            assert served_by(log, since, 400) == {HOSTS[0], HOSTS[1]}

            dns.set_hosts([f"{HOSTS[1]} web.test", f"{HOSTS[2]} web.test"])
            running.wait_for_log(f"{HOSTS[2]}:{members} joins as web-3")
            # The table was written before that line: every worker's next pick reads it.
            since = time.time()
            ab_through(url)
            assert served_by(log, since, 400) == {HOSTS[1], HOSTS[2]}

            since = time.time()
            running.process.send_signal(signal.SIGHUP)
            ab_through(url, 2000)  # through the reload: carried members serve at once
            running.wait_for_log("generation 2 serving")
            assert served_by(log, since, 2000) == {HOSTS[1], HOSTS[2]}
            admin = f"http://127.0.0.1:{running.ports['admin']}"
            backends = {
                b["name"]: (b["address"], b["state"])
                for b in json.loads(run("curl", "-s", f"{admin}/backends").stdout)
            }
            assert backends["web-1"] == (f"{HOSTS[0]}:{members}", "draining")
            assert backends["web-3"] == (f"{HOSTS[2]}:{members}", "up")
            metrics = run("curl", "-s", f"{admin}/metrics").stdout
            # The supervisor's (one resolver for both workers: not summed over them).
            assert re.search(r'^balancer_dns_members\{group="web"\} 2(\.0)?$', metrics, re.M)
            assert f'balancer_backend_info{{address="{HOSTS[2]}:{members}"' in metrics
    finally:
        dns.stop()
