"""Benchmark the balancer side by side with HAProxy and nginx, and the farm hit directly.

    python bench/run.py              # quick mode (~10 minutes); --record appends to RESULTS.md
    python bench/run.py --full       # longer runs, more rounds, RSA-2048 as well as ECDSA
    python bench/run.py --only S1    # one scenario

Method (the machines are 2-core and noisy): the proxy under test runs pinned to CPU 0, the
farm and the load generator to CPU 1 (taskset), so each proxy has exactly one core. Each
proxy's CPU time is read from /proc before and after every run, giving requests per
proxy-core-second beside raw requests per second. Rounds are interleaved (A B C, A B C, ...);
medians and min..max are reported, and a sample more than 15% from its median is flagged.
Ratios are against HAProxy and against the farm hit directly, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from balancer.demo.certs import make_certs  # noqa: E402

PROXY_CPU, LOAD_CPU = "0", "1"
# S5 reads RSS this long after the last response, with the connections still open: idle, not
# between two requests. (With more than 256 connections open the balancer gives an idle
# connection's request reader back to a shared pool: http_flow.READER_POOL_ABOVE.)
IDLE_SETTLE_SECONDS = 2.0
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: str, command: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu, *command]
    return command


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (nginx master + worker, taskset's child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Target:
    """Something to benchmark: a proxy (or the farm itself) with an HTTP and a TLS port."""

    name: str
    http_port: int
    https_port: int | None
    process: subprocess.Popen[bytes] | None = None

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Sample:
    target: str
    scenario: str
    requests: int
    seconds: float
    cpu_seconds: float
    p99_ms: float | None = None
    errors: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def per_core(self) -> float | None:
        return self.requests / self.cpu_seconds if self.cpu_seconds > 0 else None


class Bench:
    def __init__(self, workdir: Path, full: bool, log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.full = full
        self.log = log
        self.processes: list[subprocess.Popen[bytes]] = []
        self.farm_kind = ""
        self.farm_ports: list[int] = []
        self.logs: dict[int, tuple[list[str], Path]] = {}
        self.compiled: Path | None = None  # a copy of this tree built with mypyc, if built

    def build_compiled(self) -> None:
        """Copy this checkout's files and build the copy in place with BALANCER_MYPYC=1 (the
        README's compiled build, needing mypy: the test extra). Its rows are skipped if the
        build fails, with the reason."""
        tree = self.workdir / "mypyc"
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        for name in files:
            if (ROOT / name).is_file():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, tree / name)
        self.log("building the compiled copy (mypyc, about a minute)")
        built = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=tree, capture_output=True, text=True,
            env={**os.environ, "BALANCER_MYPYC": "1"},
        )  # fmt: skip
        if built.returncode != 0:
            self.log(f"compiled build failed, its rows skipped: {built.stderr[-400:]}")
            return
        self.compiled = tree

    # -- the farm --------------------------------------------------------------------------

    def start_farm(self) -> None:
        self.farm_ports = [free_port(), free_port()]
        if shutil.which("nginx"):
            self.farm_kind = "nginx (2 server blocks, 1 worker, CPU 1)"
            servers = "\n".join(
                f"""server {{ listen 127.0.0.1:{port} backlog=4096;
                    location / {{ add_header X-Backend web{i + 1};
                                  return 200 "hello from web{i + 1}\\n"; }} }}"""
                for i, port in enumerate(self.farm_ports)
            )
            self._nginx("farm", servers, LOAD_CPU)
        else:
            self.farm_kind = "embedded Python backends (nginx not installed)"
            code = (
                "import asyncio, uvloop; from balancer.demo.farm import start_farm\n"
                "async def main():\n"
                f"    await start_farm(['web1','web2'], ports={self.farm_ports})\n"
                "    await asyncio.Event().wait()\n"
                "uvloop.run(main())\n"
            )
            self._spawn(pinned(LOAD_CPU, [sys.executable, "-c", code]))
        for port in self.farm_ports:
            wait_port(port)
        self.log(f"farm: {self.farm_kind} on ports {self.farm_ports}")

    def _spawn(self, command: list[str], cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"process-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        self.processes.append(process)
        self.logs[process.pid] = (command, Path(log.name))
        return process

    def wait_ready(self, port: int, process: subprocess.Popen[bytes] | None) -> None:
        try:
            wait_port(port)
        except RuntimeError:
            if process is not None:
                command, path = self.logs[process.pid]
                raise RuntimeError(
                    f"{command[:6]} did not listen on {port}:\n"
                    f"{path.read_text(errors='replace')[-2000:]}"
                ) from None
            raise

    def _nginx(
        self, name: str, servers: str, cpu: str, extra_http: str = ""
    ) -> subprocess.Popen[bytes]:
        prefix = self.workdir / f"nginx-{name}"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""worker_processes 1; daemon off; pid {prefix}/nginx.pid; error_log stderr crit;
            worker_rlimit_nofile 20000;
            events {{ worker_connections 16000; }}
            http {{ access_log off; client_body_temp_path {prefix}; proxy_temp_path {prefix};
                   fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
                   {extra_http}
                   {servers} }}
            """
        )
        return self._spawn(pinned(cpu, ["nginx", "-p", str(prefix), "-c", str(conf)]))

    # -- the proxies -----------------------------------------------------------------------

    def certificates(self, key_type: str) -> dict[str, Path]:
        directory = self.workdir / f"certs-{key_type}"
        if not directory.exists():
            paths = make_certs(directory, key_type=key_type)
            combined = directory / "combined.pem"
            combined.write_bytes(paths.cert.read_bytes() + paths.key.read_bytes())
        return {
            "cert": directory / "server.crt",
            "key": directory / "server.key",
            "combined": directory / "combined.pem",
            "ca": directory / "ca.crt",
        }

    def start_targets(self, key_type: str) -> list[Target]:
        """The farm hit directly, and each proxy in each of its backend-connection modes:
        the balancer with reuse never and always, HAProxy with http-reuse never and always,
        nginx without and with upstream keepalive."""
        certs = self.certificates(key_type)
        targets = [Target("direct", self.farm_ports[0], None)]
        for reuse in ("never", "always"):
            targets.append(self._balancer(key_type, certs, reuse))
        if self.compiled is not None:  # the same tree, built with mypyc (setup.py)
            for reuse in ("never", "always"):
                targets.append(self._balancer(key_type, certs, reuse, self.compiled))
        targets.append(self._pump())
        if shutil.which("haproxy"):
            for reuse in ("never", "always"):
                targets.append(self._haproxy(key_type, certs, reuse))
        if shutil.which("nginx"):
            for keepalive in (False, True):
                targets.append(self._nginx_proxy(key_type, certs, keepalive))
        for target in targets:
            self.wait_ready(target.http_port, target.process)
            if target.https_port:
                self.wait_ready(target.https_port, target.process)
        return targets

    def _balancer(
        self, key_type: str, certs: dict[str, Path], reuse: str, tree: Path = ROOT
    ) -> Target:
        """`python -m balancer` from `tree`: this checkout, or its compiled copy."""
        build = "" if tree == ROOT else "-mypyc"
        http, https, admin = free_port(), free_port(), free_port()
        log_path = self.workdir / f"access-{key_type}-{reuse}{build}.log"
        config = self.workdir / f"balancer-{reuse}.toml"
        # The https listener offers h2 (S6); --https sets its bind, keeping the rest.
        config.write_text(
            f'[upstream]\nreuse = "{reuse}"\n\n[[listeners]]\nname = "https"\n'
            'bind = "127.0.0.1:1"\ntls = true\nalpn = ["h2", "http/1.1"]\n'
        )
        backends = [arg for port in self.farm_ports for arg in ("--backend", f"127.0.0.1:{port}")]
        balancer = self._spawn(
            pinned(
                PROXY_CPU,
                [
                    sys.executable,
                    "-m",
                    "balancer",
                    "run",
                    "-c",
                    str(config),
                    "--workers",  # one worker on the one proxy core, as HAProxy's nbthread 1
                    "1",
                    "--http",
                    f"127.0.0.1:{http}",
                    "--https",
                    f"127.0.0.1:{https}",
                    "--admin",
                    f"127.0.0.1:{admin}",
                    "--access-log",
                    str(log_path),
                    "--cert",
                    str(certs["cert"]),
                    "--key",
                    str(certs["key"]),
                    *backends,
                ],
            ),
            cwd=tree,  # `-m balancer` imports the tree it is run in
        )
        name = "balancer" + build + ("" if reuse == "never" else f"-{reuse}")
        return Target(name, http, https, balancer)

    def _pump(self) -> Target:
        """bench/pump.py: the floor under the balancer's `never` mode (plain HTTP only)."""
        port = free_port()
        command = [sys.executable, str(ROOT / "bench" / "pump.py"), str(port)]
        process = self._spawn(pinned(PROXY_CPU, command + [str(p) for p in self.farm_ports]))
        return Target("pump", port, None, process)

    def _haproxy(self, key_type: str, certs: dict[str, Path], reuse: str) -> Target:
        hp, hps = free_port(), free_port()
        conf = self.workdir / f"haproxy-{key_type}-{reuse}.cfg"
        servers = "\n".join(
            f"  server web{i + 1} 127.0.0.1:{port}" for i, port in enumerate(self.farm_ports)
        )
        conf.write_text(
            f"""global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  option http-keep-alive
  option forwardfor
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{hp}
  bind 127.0.0.1:{hps} ssl crt {certs["combined"]} alpn h2,http/1.1
  default_backend farm
backend farm
  balance roundrobin
  http-reuse {reuse}
{servers}
"""
        )
        process = self._spawn(pinned(PROXY_CPU, ["haproxy", "-db", "-f", str(conf)]))
        return Target("haproxy" if reuse == "never" else f"haproxy-{reuse}", hp, hps, process)

    def _nginx_proxy(self, key_type: str, certs: dict[str, Path], keepalive: bool) -> Target:
        np_, nps = free_port(), free_port()
        upstream = "\n".join(f"server 127.0.0.1:{port};" for port in self.farm_ports)
        pool = "keepalive 64;" if keepalive else ""
        process = self._nginx(
            f"proxy-{key_type}-{'keepalive' if keepalive else 'close'}",
            f"""server {{ listen 127.0.0.1:{np_} backlog=4096;
                    listen 127.0.0.1:{nps} ssl http2 backlog=4096;
                    ssl_certificate {certs["cert"]}; ssl_certificate_key {certs["key"]};
                    ssl_protocols TLSv1.2 TLSv1.3;
                    location / {{ proxy_pass http://farm; proxy_http_version 1.1;
                                  proxy_set_header Connection "";
                                  proxy_set_header X-Forwarded-For
                                                   $proxy_add_x_forwarded_for; }} }}""",
            PROXY_CPU,
            extra_http=f"upstream farm {{ {upstream} {pool} }}",
        )
        return Target("nginx-keepalive" if keepalive else "nginx", np_, nps, process)

    # -- load ------------------------------------------------------------------------------

    def measure(
        self,
        target: Target,
        scenario: str,
        command: list[str],
        parse: Callable[[str], tuple[int, float, float | None, int]],
    ) -> Sample:
        pids = target.pids()
        cpu_before = cpu_seconds(pids)
        result = subprocess.run(
            pinned(LOAD_CPU, command), capture_output=True, text=True, timeout=600
        )
        cpu = cpu_seconds(pids) - cpu_before
        requests, seconds, p99, errors = parse(result.stdout)
        return Sample(target.name, scenario, requests, seconds, cpu, p99, errors)

    def wrk(self, target: Target, scenario: str, tls: bool) -> Sample | None:
        port = target.https_port if tls else target.http_port
        if port is None or not shutil.which("wrk"):
            return None
        scheme = "https" if tls else "http"
        duration = "10s" if self.full else "5s"
        return self.measure(
            target,
            scenario,
            ["wrk", "-t1", "-c64", f"-d{duration}", "--latency", f"{scheme}://127.0.0.1:{port}/"],
            parse_wrk,
        )

    def ab(self, target: Target, scenario: str, tls: bool, requests: int) -> Sample | None:
        port = target.https_port if tls else target.http_port
        if port is None or not shutil.which("ab"):
            return None
        scheme = "https" if tls else "http"
        extra = ["-f", "TLS1.2"] if tls else []
        return self.measure(
            target,
            scenario,
            ["ab", "-q", "-n", str(requests), "-c", "32", *extra, f"{scheme}://127.0.0.1:{port}/"],
            parse_ab,
        )

    def h2load(self, target: Target, scenario: str, requests: int) -> Sample | None:
        """HTTP/2 over TLS: 16 connections, 10 streams each at once (h2load, nghttp2's)."""
        if target.https_port is None or not shutil.which("h2load"):
            return None
        url = f"https://127.0.0.1:{target.https_port}/"
        return self.measure(
            target, scenario, ["h2load", "-c", "16", "-m", "10", "-n", str(requests), url],
            parse_h2load,
        )  # fmt: skip

    def idle_memory(self, target: Target, count: int) -> Sample | None:
        if target.process is None:
            return None
        pids = target.pids()
        # Warm up first: a forked worker copies the pages of its parent's heap that it touches
        # (reference counts are writes); that one-time cost is not a connection's.
        asyncio.run(hold_connections(target.http_port, 200, lambda: 0, settle=0.2))
        before = rss_kib(pids)
        held, after = asyncio.run(hold_connections(target.http_port, count, lambda: rss_kib(pids)))
        per = (after - before) * 1024 / max(held, 1)
        return Sample(
            target.name,
            "S5",
            held,
            0.0,
            0.0,
            extra={"bytes_per_conn": per, "rss_before_kib": before},
        )

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


async def hold_connections(
    port: int, count: int, measure: Callable[[], int], settle: float = IDLE_SETTLE_SECONDS
) -> tuple[int, int]:
    """Open `count` keep-alive connections, one request each, and hold them idle for `settle`
    seconds; return how many were answered and `measure()` taken while held."""
    writers = []
    ok = 0
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            break
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        writers.append((reader, writer))
    for reader, _ in writers:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            ok += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
    await asyncio.sleep(settle)  # idle, as S5 means: not between two requests
    measured = measure()
    for _, writer in writers:
        writer.close()
    return ok, measured


def parse_wrk(output: str) -> tuple[int, float, float | None, int]:
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if not match:
        return 0, 0.0, None, 1
    requests, value, unit = int(match.group(1)), float(match.group(2)), match.group(3)
    seconds = value * {"s": 1, "ms": 0.001, "m": 60}.get(unit, 1)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    p99_ms = None
    if p99:
        p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return requests, seconds, p99_ms, errors + (int(non2xx.group(1)) if non2xx else 0)


def parse_h2load(output: str) -> tuple[int, float, float | None, int]:
    """h2load's `finished in 1.2s, ...` and `requests: N total, ..., S succeeded, F failed`."""
    finished = re.search(r"finished in ([\d.]+)(m?s)", output)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                     output)  # fmt: skip
    if not finished or not done:
        return 0, 0.0, None, 1
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return int(done.group(1)), seconds, None, int(done.group(2))


def parse_ab(output: str) -> tuple[int, float, float | None, int]:
    complete = re.search(r"Complete requests:\s+(\d+)", output)
    taken = re.search(r"Time taken for tests:\s+([\d.]+)", output)
    failed = re.search(r"Failed requests:\s+(\d+)", output)
    p99 = re.search(r"\n\s+99%\s+(\d+)", output)
    if not complete or not taken:
        return 0, 0.0, None, 1
    return (
        int(complete.group(1)),
        float(taken.group(1)),
        float(p99.group(1)) if p99 else None,
        int(failed.group(1)) if failed else 0,
    )


SCENARIOS = {
    "S1": "HTTP keep-alive: wrk -t1 -c64 --latency",
    "S2": "HTTP, a new connection per request: ab -c 32",
    "S3": "HTTPS, a full TLS 1.2 handshake per request: ab -c 32 -f TLS1.2",
    "S4": "HTTPS keep-alive: wrk -t1 -c64 --latency",
    "S5": "memory: RSS growth per idle keep-alive connection",
    "S6": "HTTP/2 over TLS: h2load -c 16 -m 10 (16 connections, 10 streams each)",
}


def summarise(samples: list[Sample]) -> list[dict[str, object]]:
    rows = []
    keys = sorted({(s.scenario, s.target) for s in samples})
    for scenario, target in keys:
        group = [s for s in samples if s.scenario == scenario and s.target == target]
        if scenario.startswith("S5"):
            values = [s.extra["bytes_per_conn"] for s in group]
            rows.append(
                {
                    "scenario": scenario,
                    "target": target,
                    "bytes_per_conn": statistics.median(values),
                    "held": group[0].requests,
                }
            )
            continue
        rps = [s.rps for s in group]
        per_core = [s.per_core for s in group if s.per_core]
        p99 = [s.p99_ms for s in group if s.p99_ms is not None]
        median = statistics.median(rps)
        rows.append(
            {
                "scenario": scenario,
                "target": target,
                "rounds": len(group),
                "rps_median": median,
                "rps_min": min(rps),
                "rps_max": max(rps),
                "noisy": sum(1 for r in rps if median and abs(r - median) / median > 0.15),
                "per_core_median": statistics.median(per_core) if per_core else None,
                "cpu_us_per_request": 1e6 / statistics.median(per_core) if per_core else None,
                "p99_ms_median": statistics.median(p99) if p99 else None,
                "errors": sum(s.errors for s in group),
            }
        )
    return rows


def table(rows: list[dict[str, object]]) -> str:
    def find(scenario: str, target: str) -> dict[str, object] | None:
        return next((r for r in rows if r["scenario"] == scenario and r["target"] == target), None)

    lines = [
        "| scenario | target | req/s median (min..max) | per proxy-core req/s | CPU µs/req "
        "| p99 ms | vs HAProxy, same mode (per core) | vs direct (raw) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        scenario, target = str(row["scenario"]), str(row["target"])
        if scenario.startswith("S5"):
            ref = find(scenario, "haproxy-always" if target.endswith("-always") else "haproxy")
            ratio = (
                f"{row['bytes_per_conn'] / ref['bytes_per_conn']:.2f}×"  # type: ignore[operator]
                if ref and ref["bytes_per_conn"]
                else "–"
            )
            lines.append(
                f"| {scenario} | {target} | {row['bytes_per_conn'] / 1024:.1f} KiB/conn "
                f"({row['held']} held) | | | | {ratio} | | |"
            )
            continue
        # Each proxy against HAProxy in the same backend-connection mode: dedicated
        # connections (never; nginx without keepalive) or reused ones (always; keepalive).
        reused = target.endswith("-always") or target.endswith("-keepalive")
        haproxy = find(scenario, "haproxy-always" if reused else "haproxy")
        direct = find(scenario, "direct")
        per_core = row["per_core_median"]
        vs_haproxy = (
            f"{per_core / haproxy['per_core_median']:.2f}×"  # type: ignore[operator]
            if per_core and haproxy and haproxy["per_core_median"]
            else "–"
        )
        vs_direct = (
            f"{row['rps_median'] / direct['rps_median']:.2f}×"  # type: ignore[operator]
            if direct and direct["rps_median"]
            else "–"
        )
        noisy = f" ({row['noisy']} noisy)" if row["noisy"] else ""
        lines.append(
            f"| {scenario} | {target} | {row['rps_median']:.0f} ({row['rps_min']:.0f}.."
            f"{row['rps_max']:.0f}){noisy} | {per_core or 0:.0f} | "
            f"{row['cpu_us_per_request'] or 0:.0f} | "
            f"{row['p99_ms_median'] if row['p99_ms_median'] is not None else '–'} | "
            f"{vs_haproxy} | {vs_direct} | {row['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="longer runs, 5 rounds, RSA too")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="scenario(s)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (quick 3, full 5)")
    parser.add_argument(
        "--record", action="store_true", help="append the report to bench/RESULTS.md"
    )
    parser.add_argument(
        "--install", action="store_true", help="apt-get install the missing peers and tools first"
    )
    parser.add_argument(
        "--no-compiled", action="store_true", help="skip the mypyc build and its rows"
    )
    args = parser.parse_args(argv)
    if args.install:
        install_tools()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rounds = args.rounds or (5 if args.full else 3)
    scenarios = args.only or sorted(SCENARIOS)
    key_types = ["ecdsa", "rsa"] if args.full else ["ecdsa"]
    missing = [
        tool for tool in ("wrk", "ab", "haproxy", "nginx", "taskset") if not shutil.which(tool)
    ]
    print(f"tools missing (their rows are skipped): {missing or 'none'}", flush=True)
    samples: list[Sample] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="balancer-bench-") as tmp:
        bench = Bench(Path(tmp), args.full, lambda line: print(line, flush=True))
        try:
            bench.start_farm()
            if not args.no_compiled:
                bench.build_compiled()
            for key_type in key_types:
                targets = bench.start_targets(key_type)
                print(f"targets ({key_type}): {[t.name for t in targets]}", flush=True)
                for round_number in range(rounds):
                    for target in targets:  # interleaved: A B C, A B C
                        for scenario in scenarios:
                            name = (
                                f"{scenario}-{key_type}" if scenario in ("S3", "S4") else scenario
                            )
                            if key_type != key_types[0] and scenario not in ("S3", "S4"):
                                continue
                            sample = run_scenario(bench, target, scenario, args.full)
                            if sample is not None:
                                sample.scenario = name
                                samples.append(sample)
                                print(
                                    f"  round {round_number + 1} {name:9} {target.name:9} "
                                    f"{sample.rps:9.0f} req/s  cpu {sample.cpu_seconds:6.2f}s"
                                    f"  errors {sample.errors}",
                                    flush=True,
                                )
                for target in targets:
                    target.stop()
                if "S5" in scenarios and key_type == key_types[0]:
                    # Fresh processes: after the load scenarios every proxy sits at its memory
                    # high-water mark, and idle connections would cost nothing to measure.
                    fresh = bench.start_targets(key_type)
                    for target in fresh:
                        sample = bench.idle_memory(target, 5000 if args.full else 2000)
                        if sample is not None:
                            samples.append(sample)
                        target.stop()
            counted = per_connection_counts(bench.compiled, lambda line: print(line, flush=True))
        finally:
            bench.close()
    rows = summarise(samples)
    machine = (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu_model()}), Linux "
        f"{platform.release()}, Python {platform.python_version()}"
    )
    versions = tool_versions()
    report = (
        f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} — "
        f"{'full' if args.full else 'quick'} mode, {rounds} rounds\n\n"
        f"Commit: {commit()}. Machine: {machine}. Farm: {bench.farm_kind}. {versions}.\n"
        f"Method: bench/run.py (proxy on CPU 0, farm and load on CPU 1; CPU from /proc).\n\n"
        + table(rows)
        + "\n"
        + counted
    )
    print("\n" + report)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    (results / f"{stamp}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "farm": bench.farm_kind,
                "rows": rows,
                "samples": [s.__dict__ | {"rps": s.rps} for s in samples],
            },
            indent=1,
        )
    )
    if args.record:  # (asked for: a run does not dirty the checkout by itself)
        with (ROOT / "bench" / "RESULTS.md").open("a") as out:
            out.write("\n" + report)
    return 0


def per_connection_counts(compiled: Path | None, log: Callable[[str], None]) -> str:
    """bench/counts.py for each build: what does not drift with noise, per new connection."""
    lines = [
        "Per new connection (bench/counts.py: 2,000 `ab -c 8` connections a pass, access log "
        "on; counted, not timed; a compiled build's own functions are not Python calls):\n",
        "| build | reuse | Python calls | C calls | allocations | GC-only objects | syscalls |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for build, tree in (("pure", ROOT), ("mypyc", compiled)):
        if tree is None:
            continue
        done = subprocess.run(
            [sys.executable, str(tree / "bench" / "counts.py"), "--json"],
            cwd=tree, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            log(f"bench/counts.py ({build}) failed: {done.stderr[-400:]}")
            continue
        for row in map(json.loads, done.stdout.splitlines()):
            lines.append(
                f"| {build} | {row['reuse']} | {row['python_calls']} | {row['c_calls']} | "
                f"{row['allocations']} | {row['gc_only']} | {row['syscalls']} |"
            )
    return "\n".join(lines) + "\n"


def run_scenario(bench: Bench, target: Target, scenario: str, full: bool) -> Sample | None:
    if scenario == "S1":
        return bench.wrk(target, "S1", tls=False)
    if scenario == "S2":
        return bench.ab(target, "S2", tls=False, requests=20000 if full else 10000)
    if scenario == "S3":
        return bench.ab(target, "S3", tls=True, requests=3000 if full else 1500)
    if scenario == "S4":
        return bench.wrk(target, "S4", tls=True)
    if scenario == "S6":
        return bench.h2load(target, "S6", requests=20000 if full else 10000)
    return None  # S5 runs once per target after the rounds


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "balancer")
    return head + (" (with uncommitted changes)" if dirty else "")


DEBIAN_PACKAGES = {
    "wrk": "wrk",
    "ab": "apache2-utils",
    "haproxy": "haproxy",
    "nginx": "nginx-light",
    "taskset": "util-linux",
}


def install_tools() -> None:
    """apt-get install whatever of wrk, ab, HAProxy, nginx and taskset is missing."""
    missing = [pkg for tool, pkg in DEBIAN_PACKAGES.items() if not shutil.which(tool)]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def tool_versions() -> str:
    found = []
    for tool, flag in (("haproxy", "-v"), ("nginx", "-v"), ("wrk", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True)
            text = (out.stdout + out.stderr).strip().splitlines()
            found.append(text[0] if text else tool)
    return "; ".join(found) or "no peers installed"


if __name__ == "__main__":
    raise SystemExit(main())
