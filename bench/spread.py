"""How evenly new connections spread over the workers of one shared listening socket.

    python bench/spread.py [--workers 2] [--rounds 3]

The balancer runs with `--workers N` (every worker accepting from the one socket the
supervisor bound) against the bench farm; ab (a new connection per request) and wrk (64
keep-alive connections) drive it; each access-log line names its worker, so the share of
connections (and of requests) each worker took is counted from the log.
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

from bench.run import LOAD_CPU, Bench, free_port, pinned, wait_port  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="balancer-spread-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, full=False, log=print)
        try:
            bench.start_farm()
            for round_number in range(args.rounds):
                for tool in ("ab", "wrk"):
                    if not shutil.which(tool):
                        continue
                    log = workdir / f"access-{tool}-{round_number}.log"
                    port = free_port()
                    farm = bench.farm_ports
                    backends = [a for p in farm for a in ("--backend", f"127.0.0.1:{p}")]
                    process = subprocess.Popen(
                        [sys.executable, "-m", "balancer", "run", "--http", f"127.0.0.1:{port}",
                         "--workers", str(args.workers), "--access-log", str(log), *backends],
                        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    try:
                        wait_port(port)
                        time.sleep(0.5)  # every worker has started (they log after the bind)
                        url = f"http://127.0.0.1:{port}/"
                        command = (
                            ["ab", "-q", "-n", "20000", "-c", "32", url]
                            if tool == "ab"
                            else ["wrk", "-t1", "-c64", "-d5s", url]
                        )
                        subprocess.run(pinned(LOAD_CPU, command), capture_output=True, timeout=120)
                    finally:
                        process.terminate()
                        process.wait(30)
                    by_connection, by_request = shares(log)
                    print(
                        f"round {round_number + 1} {tool:3}: connections "
                        f"{' / '.join(f'{s:.1%}' for s in by_connection)}; requests "
                        f"{' / '.join(f'{s:.1%}' for s in by_request)}",
                        flush=True,
                    )
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
