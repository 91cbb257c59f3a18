"""Workers: how evenly the kernel spreads connections over them, and what they cost.

    python bench/workers.py [--workers 1 --workers auto] [--rounds 3]

For each worker count the balancer runs (`--workers N`: every worker accepting from the one
socket the supervisor bound; nothing pinned) against the bench farm, driven by ab (a new
connection per request, -c 32) and wrk (64 keep-alive connections). Reported per run:
requests per second, CPU per request summed over the supervisor and every worker (from
/proc), and each worker's share of connections and requests (from the access log, whose
lines name their worker). On a 2-core machine the farm and the load generator share the
cores with the workers: the scaling shown is what is left of one core for a second worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    LOAD_CPU,
    Bench,
    cpu_seconds,
    free_port,
    parse_ab,
    parse_wrk,
    pinned,
    process_tree,
    wait_port,
)


def shares(log: Path) -> tuple[list[float], list[float]]:
    """Per worker: the share of connections, and of requests, largest first."""
    connections: Counter[int] = Counter()
    requests: Counter[int] = Counter()
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("type", "connection") == "connection" and record["requests"]:
            connections[record["worker_pid"]] += 1
            requests[record["worker_pid"]] += record["requests"]
    total_c, total_r = sum(connections.values()) or 1, sum(requests.values()) or 1
    return (
        sorted((n / total_c for n in connections.values()), reverse=True),
        sorted((n / total_r for n in requests.values()), reverse=True),
    )


def run_once(bench: Bench, workers: str, tool: str, prefix: Path) -> str:
    log = prefix.with_name(f"{prefix.name}-{workers}-{tool}.log")
    port = free_port()
    farm = bench.farm_ports
    backends = [a for p in farm for a in ("--backend", f"127.0.0.1:{p}")]
    process = subprocess.Popen(
        [sys.executable, "-m", "balancer", "run", "--http", f"127.0.0.1:{port}",
         "--workers", workers, "--access-log", str(log), *backends],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        time.sleep(0.5)  # the workers are forked before the supervisor says it listens
        url = f"http://127.0.0.1:{port}/"
        command = (
            ["ab", "-q", "-n", "20000", "-c", "32", url]
            if tool == "ab"
            else ["wrk", "-t1", "-c64", "-d5s", url]
        )
        pids = process_tree(process.pid)
        before = cpu_seconds(pids)
        result = subprocess.run(
            pinned(LOAD_CPU, command), capture_output=True, text=True, timeout=120
        )
        cpu = cpu_seconds(pids) - before
    finally:
        process.terminate()
        process.wait(30)
    requests, seconds, _, errors = (parse_ab if tool == "ab" else parse_wrk)(result.stdout)
    by_connection, by_request = shares(log)
    return (
        f"{requests / seconds:7.0f} req/s, {1e6 * cpu / max(requests, 1):4.0f} µs CPU/req, "
        f"{errors} errors; connections {' / '.join(f'{s:.0%}' for s in by_connection)}, "
        f"requests {' / '.join(f'{s:.0%}' for s in by_request)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", action="append", help="a worker count, or auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="balancer-spread-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, full=False, log=print)
        try:
            bench.start_farm()
            for round_number in range(args.rounds):
                for workers in args.workers or ["1", "auto"]:
                    for tool in ("ab", "wrk"):
                        if shutil.which(tool):
                            print(
                                f"round {round_number + 1} workers {workers:4} {tool:3}: "
                                + run_once(bench, workers, tool, workdir / f"{round_number}"),
                                flush=True,
                            )
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
