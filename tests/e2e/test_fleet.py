"""A fleet: two balancer instances behind HAProxy in `mode tcp` (the L4 tier), as an operator
runs one: PROXY v2 from the tier, the tier's checks on /healthz, each instance taken out by
SIGUSR2, stopped, started again and brought back, one at a time, under load (issue 23, item 4).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BalancerProcess, Running, need
from tests.helpers import dead_port

pytestmark = pytest.mark.e2e

TOKEN = "fleet-token-0123456789abcdef"
ROUNDS_MAX, SECONDS_MAX = 200, 90  # the load loop's bounds


def instance_config(path: Path, http: int, admin: int, farm_ports: list[int]) -> None:
    backends = "".join(
        f'[[backends]]\nname = "web{i + 1}"\naddress = "127.0.0.1:{port}"\n'
        for i, port in enumerate(farm_ports)
    )
    path.write_text(
        f'admin = "127.0.0.1:{admin}"\nadmin_token_file = "{path.parent / "token"}"\n'
        f'access_log = "{path.parent / "access.log"}"\nworkers = 1\n'
        'policy = "hash"\nhash_key = "client_ip"\n'
        f'[[listeners]]\nname = "http"\nbind = "127.0.0.1:{http}"\n'
        'accept_proxy_from = ["127.0.0.1"]\n' + backends
    )
    (path.parent / "token").write_text(TOKEN + "\n")


def haproxy_config(path: Path, front: int, stats: Path, instances: list[tuple[int, int]]) -> None:
    servers = "".join(
        f"    server i{n} 127.0.0.1:{http} send-proxy-v2 check port {admin} inter 100ms"
        " fall 1 rise 1\n"
        for n, (http, admin) in enumerate(instances)
    )
    path.write_text(
        "global\n"
        f"    stats socket {stats} level admin\n"
        "defaults\n"
        "    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
        "    retries 3\n    option redispatch\n"
        f"frontend tier\n    bind 127.0.0.1:{front}\n    default_backend balancers\n"
        "backend balancers\n    balance roundrobin\n"
        "    option httpchk GET /healthz\n    http-check expect status 200\n" + servers
    )


def server_states(stats: Path) -> dict[str, str]:
    """The tier's view of each instance (HAProxy's stats socket: `show stat`)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header, *rows = data.decode().splitlines()
    names = header.lstrip("# ").split(",")
    states = {}
    for row in rows:
        fields = dict(zip(names, row.split(","), strict=False))
        if fields.get("pxname") == "balancers" and fields.get("svname", "").startswith("i"):
            states[fields["svname"]] = fields.get("status", "")
    return states


def wait_for(predicate, what: str, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_two_instances_behind_an_l4_tier_leave_and_rejoin_one_at_a_time_losing_nothing(
    farm_ports: list[int], tmp_path: Path
) -> None:
    ab, haproxy = need("ab"), need("haproxy")
    ports = [(dead_port(), dead_port()) for _ in range(2)]  # (http, admin) per instance
    front, stats = dead_port(), tmp_path / "haproxy.sock"
    dirs = [tmp_path / f"i{n}" for n in range(2)]
    for directory, (http, admin) in zip(dirs, ports, strict=True):
        directory.mkdir()
        instance_config(directory / "balancer.toml", http, admin, farm_ports)
    haproxy_config(tmp_path / "haproxy.cfg", front, stats, ports)

    def start(n: int) -> tuple[BalancerProcess, Running]:
        process = BalancerProcess(
            ["-c", str(dirs[n] / "balancer.toml")], {"http", "admin"}, dirs[n]
        )
        return process, process.__enter__()

    instances = [start(0), start(1)]
    tier_log = (tmp_path / "haproxy.log").open("w")
    tier = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg"), "-db"],
                            stdout=tier_log, stderr=subprocess.STDOUT)  # fmt: skip
    failures: list[str] = []
    completed = [0]
    done = threading.Event()

    def load() -> None:  # bounded: ROUNDS_MAX batches, SECONDS_MAX seconds
        deadline = time.monotonic() + SECONDS_MAX
        for _ in range(ROUNDS_MAX):
            if done.is_set() or time.monotonic() > deadline:
                return
            out = subprocess.run([ab, "-n", "400", "-c", "8", f"http://127.0.0.1:{front}/"],
                                 capture_output=True, text=True, timeout=60).stdout  # fmt: skip
            if "Failed requests:        0" not in out or "Complete requests:      400" not in out:
                failures.append(out[-600:])
            completed[0] += 400

    try:
        wait_for(lambda: stats.exists() and set(server_states(stats).values()) == {"UP"},
                 "the tier sees both instances up")  # fmt: skip
        loader = threading.Thread(target=load)
        loader.start()
        for n in (0, 1):  # one at a time: out of the tier, stopped, started, back
            process, running = instances[n]
            wait_for(lambda: completed[0] >= 800, "load through the tier")
            os.kill(running.process.pid, signal.SIGUSR2)
            name = f"i{n}"
            wait_for(lambda name=name: server_states(stats)[name].startswith("DOWN"), "out")
            process.__exit__(None, None, None)  # SIGTERM: drains, exits 0, no traceback
            instances[n] = start(n)
            wait_for(lambda name=name: server_states(stats)[name] == "UP", "back in")
        at_end = completed[0]
        wait_for(lambda: completed[0] >= at_end + 800, "load through both again")
    finally:
        done.set()
        if "loader" in locals():
            loader.join(SECONDS_MAX + 30)
        tier.terminate()
        tier.wait(10)
        tier_log.close()
        for process, _ in instances:
            process.__exit__(None, None, None)
    assert failures == [], failures[:2]
    lines = [
        json.loads(line)
        for directory in dirs
        for line in (directory / "access.log").read_text().splitlines()
    ]
    served = [x for x in lines if x["type"] == "connection" and x["requests"]]
    assert len(served) >= completed[0]  # (the tier's health checks go to /healthz, not here)
    assert {x["client"]["ip"] for x in served} == {"127.0.0.1"}
    assert all(x["client"]["proxied_by"] for x in served)  # PROXY v2: the tier named them
    assert len({x["worker_pid"] for x in served}) == 4  # two instances, each started twice
    assert len({x["backend"]["name"] for x in served}) == 1  # one client: one backend, anywhere
