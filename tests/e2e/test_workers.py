"""Several worker processes under one supervisor: one view, reloads, restarts, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from balancer.cli import FD_RESERVE
from balancer.config.schema import Config
from balancer.demo.certs import make_certs
from tests.e2e.conftest import BalancerProcess, Running, balancer, need, run

pytestmark = pytest.mark.e2e


def scrape(running: Running) -> dict[str, float]:
    """The admin page's samples, by name and labels as written."""
    page = run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/metrics").stdout
    samples = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def supervisor_pid(running: Running) -> int:
    return running.process.pid


def worker_pids(running: Running) -> list[int]:
    """The supervisor's child processes, from /proc (procps may not be installed)."""
    parent, children = supervisor_pid(running), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(entry.name))
    return sorted(children)


ACCEPTED = 'balancer_connections_accepted_total{listener="http"}'


def answered(metrics: dict[str, float]) -> float:
    """2xx responses, all backends (ab may open a few connections it sends nothing on)."""
    return sum(
        value
        for name, value in metrics.items()
        if name.startswith("balancer_responses_total{") and 'class="2xx"' in name
    )


def test_two_workers_share_the_load_and_answer_as_one(farm_ports, certs_dir, tmp_path) -> None:
    ab = need("ab")
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        assert len(worker_pids(running)) == 2
        output = run(ab, "-n", "2000", "-c", "32", running.url("http")).stdout
        assert "Failed requests:        0" in output
        wait_until(lambda: answered(scrape(running)) == 2000)  # summed across workers
        metrics = scrape(running)
        assert metrics["balancer_workers"] == 2
        expiry = "balancer_tls_certificate_not_after_timestamp_seconds{"
        (not_after,) = [value for key, value in metrics.items() if key.startswith(expiry)]
        assert not_after > time.time() + 14 * 86400  # `balancer certs` makes long-lived ones
        info = {k: v for k, v in metrics.items() if k.startswith("balancer_backend_info{")}
        assert len(info) == len(farm_ports) and set(info.values()) == {1.0}  # not summed
        assert all('group="default"' in k for k in info)
        backends = json.loads(
            run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/backends").stdout
        )
        assert sum(b["connections_total"] for b in backends) == 2000
        assert {len(b["workers"]) for b in backends} == {2}
        view = json.loads(
            run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/connections").stdout
        )
        assert {r["worker_pid"] for r in view["recent_closed"]} == set(worker_pids(running))
    lines = (tmp_path / "access.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: none interleaved
    by_worker = Counter(r["worker_pid"] for r in records)
    assert len(by_worker) == 2 and sum(r["requests"] for r in records) == 2000
    assert min(by_worker.values()) > 400, by_worker  # both took a fair share of the queue


def test_sighup_reloads_a_changed_file_and_a_broken_one_changes_nothing(
    farm_ports, certs_dir, tmp_path
) -> None:
    config = tmp_path / "balancer.toml"

    def write(backend: int, extra: str = "") -> None:
        config.write_text(
            f'admin = "127.0.0.1:0"\n{extra}\n'
            '[[listeners]]\nname = "http"\nbind = "127.0.0.1:0"\n'
            f'[[backends]]\nname = "web{backend + 1}"\n'
            f'address = "127.0.0.1:{farm_ports[backend]}"\n'
        )

    def served_by(running: Running) -> str:
        return run("curl", "-s", "-D", "-", "-o", "/dev/null", running.url("http")).stdout

    write(0)
    process = BalancerProcess(["-c", str(config), "--workers", "2"], {"http", "admin"}, tmp_path)
    with process as running:
        assert "X-Backend: web1" in served_by(running)
        first = worker_pids(running)
        write(1)
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for_log("reload: generation 2 serving")
        # (The old workers accept until their SIGTERM, just after that line: wait them out.)
        wait_until(lambda: not set(worker_pids(running)) & set(first))  # the old ones drained
        assert "X-Backend: web2" in served_by(running)  # the same port, the new farm
        config.write_text("this is = not [toml")
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for_log("reload failed: still serving generation 2")
        running.wait_for_log("not valid TOML")
        assert "X-Backend: web2" in served_by(running)
        metrics = scrape(running)
        assert metrics['balancer_config_reloads_total{result="success"}'] == 1
        assert metrics['balancer_config_reloads_total{result="failure"}'] == 1
        assert metrics["balancer_config_last_reload_successful"] == 0  # the last one failed
        assert metrics[ACCEPTED] == 3  # generation 1's count kept after it exited


def test_reloads_under_ab_over_http_and_tls_fail_no_request(
    farm_ports, certs_dir, tmp_path
) -> None:
    """Ten reloads while ab runs (a new connection per request), over HTTP and TLS 1.2; and
    /metrics stays exact through them (issue 20, item 7): scraped all along it never goes
    backwards (a worker that has exited is counted until its final page is kept), and at
    the end it agrees with ab and with the access log, line for line."""
    ab = need("ab")
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        loads = [
            subprocess.Popen(
                [ab, "-n", "3000", "-c", "8", *tls, running.url(name)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name, tls in (("http", []), ("https", ["-f", "TLS1.2"]))
        ]
        seen: list[float] = []
        scraping = threading.Event()

        def watch() -> None:  # bounded: until ab is done, or 120 s
            deadline = time.monotonic() + 120
            while not scraping.is_set() and time.monotonic() < deadline:
                seen.append(answered(scrape(running)))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for generation in range(2, 12):
                os.kill(running.process.pid, signal.SIGHUP)
                running.wait_for_log(f"reload: generation {generation} serving", timeout=20)
            outputs = [load.communicate(timeout=120)[0] for load in loads]
        finally:
            scraping.set()
            watcher.join(timeout=130)
        for output in outputs:
            assert "Complete requests:      3000" in output, output[-800:]
            assert "Failed requests:        0" in output, output[-800:]
        wait_until(lambda: len(worker_pids(running)) == 2)  # the old generations are gone
        metrics = scrape(running)
        assert metrics['balancer_config_reloads_total{result="success"}'] == 10
        assert len(seen) >= 3 and seen == sorted(seen), seen  # never backwards
        # Every response ab got, counted once: the count may trail ab's by the records still
        # being published as ab's last connections finish; it must reach 6000 and stop there.
        wait_until(lambda: answered(scrape(running)) >= 6000)
        metrics = scrape(running)
        assert answered(metrics) == 6000
        closed = sum(v for k, v in metrics.items() if k.startswith("balancer_connections_closed"))

        def logged() -> int:  # (the live workers write their lines out once a second)
            lines = (tmp_path / "access.log").read_text().splitlines()
            return sum(json.loads(line)["type"] == "connection" for line in lines)

        wait_until(lambda: logged() == closed)  # one line per connection counted, no more


def test_a_killed_worker_is_started_again_and_counts_never_go_backwards(
    farm_ports, certs_dir, tmp_path
) -> None:
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        for _ in range(20):
            assert run("curl", "-s", "-o", "/dev/null", running.url("http")).returncode == 0
        before = scrape(running)[ACCEPTED]
        assert before == 20
        victim = worker_pids(running)[0]
        os.kill(victim, signal.SIGKILL)
        running.wait_for_log(f"(pid {victim}) exited unasked (killed by SIGKILL)")
        wait_until(lambda: len(worker_pids(running)) == 2 and victim not in worker_pids(running))
        after = scrape(running)
        assert after[ACCEPTED] >= before  # what the dead worker counted is kept
        assert after["balancer_worker_restarts_total"] == 1
        assert run("curl", "-s", "-o", "/dev/null", running.url("http")).returncode == 0


def test_tls_sessions_resume_whichever_worker_answers(farm_ports, certs_dir, tmp_path) -> None:
    """The TLS context is built once, before the workers fork: one ticket key for all."""
    context = ssl.create_default_context(cafile=str(certs_dir / "ca.crt"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        session = None
        resumed = 0
        for _ in range(21):
            raw = socket.create_connection(("127.0.0.1", running.ports["https"]), 5)
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):
                    pass
                resumed += tls.session_reused
                session = tls.session
    assert resumed == 20
    lines = (tmp_path / "access.log").read_text().splitlines()
    pids = Counter(json.loads(line)["worker_pid"] for line in lines)
    assert len(pids) == 2, pids  # both workers answered some


def test_a_second_sigterm_ends_the_drain_at_once(farm_ports, certs_dir, tmp_path) -> None:
    process = balancer(farm_ports, certs_dir, tmp_path, "--workers", "2")
    running = process.__enter__()
    silent = socket.create_connection(("127.0.0.1", running.ports["http"]), 5)
    try:
        wait_until(lambda: scrape(running).get('balancer_connections_active{listener="http"}') == 1)
        running.process.send_signal(signal.SIGTERM)  # the silent one is given its header time
        running.wait_for_log("draining connections")
        with pytest.raises(subprocess.TimeoutExpired):
            running.process.wait(1)
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(5) == 0
        assert time.monotonic() - started < 3
    finally:
        silent.close()
        if running.process.poll() is None:
            running.process.kill()
        process.__exit__(None, None, None)


def hold(port: int) -> socket.socket:
    """A keep-alive connection with one request answered, left open (it keeps its lease)."""
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"</html>\n"):
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    return sock


def test_least_connections_counts_every_workers_connections(
    farm_ports, certs_dir, tmp_path
) -> None:
    """Held connections land on whichever worker the kernel picks; least connections in
    every worker sees them all (the lease table the supervisor shares), so 8 connections
    held one after another end 4 and 4, whatever the workers' share."""
    extra = ("--workers", "2", "--policy", "least_connections")
    with balancer(farm_ports, certs_dir, tmp_path, *extra) as running:
        held = [hold(running.ports["http"]) for _ in range(8)]
        try:
            backends = json.loads(
                run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/backends").stdout
            )
            assert [b["active"] for b in backends] == [4, 4], backends
            by_worker = [sum(w["active"] for w in b["workers"]) for b in backends]
            assert by_worker == [4, 4]
        finally:
            for sock in held:
                sock.close()


def test_round_robin_with_two_workers_stays_within_ten_percent(
    farm_ports, certs_dir, tmp_path
) -> None:
    ab = need("ab")
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        output = run(ab, "-n", "1000", "-c", "16", running.url("http")).stdout
        assert "Failed requests:        0" in output
    lines = (tmp_path / "access.log").read_text().splitlines()
    served = Counter(r["backend"]["name"] for r in map(json.loads, lines) if r["requests"])
    assert sum(served.values()) == 1000
    assert all(450 <= n <= 550 for n in served.values()), served


def test_the_service_manager_hears_ready_reloading_and_stopping(
    farm_ports, certs_dir, tmp_path, monkeypatch
) -> None:
    """systemd's Type=notify protocol, against a real unix datagram socket."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def heard() -> dict[str, str]:
        fields = listener.recv(4096).decode().split("\n")
        return dict(field.split("=", 1) for field in fields)

    try:
        with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
            ready = heard()
            assert ready["READY"] == "1" and ready["MAINPID"] == str(running.process.pid)
            assert "2 worker(s) serving" in ready["STATUS"]
            os.kill(running.process.pid, signal.SIGHUP)
            reloading = heard()
            assert reloading["RELOADING"] == "1"
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert 0 < usec - int(reloading["MONOTONIC_USEC"]) < 15_000_000
            again = heard()
            assert again["READY"] == "1" and "generation 2" in again["STATUS"]
        assert heard()["STOPPING"] == "1"
    finally:
        listener.close()


def test_the_unit_file_runs_unprivileged_notifies_and_reloads_by_sighup() -> None:
    root = Path(__file__).resolve().parents[2]
    unit = (root / "config" / "balancer.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["ExecStartPre"].endswith("balancer check -c /etc/balancer/balancer.toml")
    assert settings["KillSignal"] == "SIGTERM" and settings["KillMode"] == "mixed"
    assert settings["NoNewPrivileges"] == "true"
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["User"] == "balancer" and settings["LimitCORE"] == "0"
    defaults = Config(listeners=(), groups=())
    drain = defaults.timeouts.shutdown_grace_seconds + defaults.timeouts.linger_seconds
    assert int(settings["TimeoutStopSec"]) > drain  # systemd's SIGKILL after the drain
    assert int(settings["LimitNOFILE"]) >= 2 * defaults.limits.max_connections + FD_RESERVE
    # Issue 20, item 9: the header, followed step by step, makes everything the unit uses.
    header = [line[1:].strip() for line in unit.splitlines() if line.startswith("#   ")]
    steps = " && ".join(header)
    binary = settings["ExecStart"].split()[0]  # /opt/balancer/bin/balancer: the venv's
    venv = binary.removesuffix("/bin/balancer")
    assert f"python3 -m venv {venv} && {venv}/bin/pip install ." in steps
    assert f"useradd --system --no-create-home --shell /usr/sbin/nologin {settings['User']}" in (
        steps
    )
    workdir = settings["WorkingDirectory"]
    config_path = settings["ExecStart"].split("-c ", 1)[1]
    assert config_path == f"{workdir}/balancer.toml" and f"{workdir}/" in steps
    shipped = tomllib.loads((root / "config" / "balancer.toml").read_text())["tls"]
    group = settings["Group"]
    assert f"-g {group} -m 0644 your.crt {workdir}/{shipped['cert']}" in steps
    assert f"-g {group} -m 0640 your.key {workdir}/{shipped['key']}" in steps  # group-readable
    for path in settings["ReadWritePaths"].split():
        assert f"install -d -o {settings['User']} -g {group} -m 0750 {path}" in steps
    assert "cp config/balancer.service /etc/systemd/system/" in steps
    assert settings["Documentation"].removeprefix("file://") in steps


def test_renewed_certificate_files_are_served_after_a_reload(farm_ports, tmp_path) -> None:
    certs = tmp_path / "certs"
    make_certs(certs)

    def served_certificate() -> bytes:
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))  # the CA now
        raw = socket.create_connection(("127.0.0.1", running.ports["https"]), 5)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate

    with balancer(farm_ports, certs, tmp_path, "--workers", "2") as running:
        before = served_certificate()
        first = worker_pids(running)
        make_certs(certs, force=True)  # renewed in place, as certbot or an operator does
        os.kill(running.process.pid, signal.SIGHUP)
        running.wait_for_log("reload: generation 2 serving")
        wait_until(lambda: not set(worker_pids(running)) & set(first))
        after = served_certificate()  # verified against the renewed CA
        assert after != before
        assert after == ssl.PEM_cert_to_DER_cert((certs / "server.crt").read_text())


def test_a_reload_adds_and_removes_listeners(farm_ports, certs_dir, tmp_path) -> None:
    config = tmp_path / "balancer.toml"
    ports = []
    for _ in range(2):  # two free ports, named in the file (port 0 would be a new one each time)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])

    def write(*names: str) -> None:
        listeners = "".join(
            f'[[listeners]]\nname = "{name}"\nbind = "127.0.0.1:{ports[i]}"\n'
            for i, name in enumerate(("one", "two"))
            if name in names
        )
        config.write_text(
            f'admin = "127.0.0.1:0"\n{listeners}'
            f'[[backends]]\naddress = "127.0.0.1:{farm_ports[0]}"\n'
        )

    def status(port: int) -> str:
        return run("curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                   f"http://127.0.0.1:{port}/").stdout  # fmt: skip

    write("one")
    process = BalancerProcess(["-c", str(config), "--workers", "2"], {"one", "admin"}, tmp_path)
    with process as running:
        assert (status(ports[0]), status(ports[1])) == ("200", "000")  # 000: refused
        for generation, names in ((2, ("one", "two")), (3, ("two",))):
            first = worker_pids(running)
            write(*names)
            os.kill(running.process.pid, signal.SIGHUP)
            running.wait_for_log(f"reload: generation {generation} serving")
            wait_until(lambda first=first: not set(worker_pids(running)) & set(first))
            expected = tuple("200" if name in names else "000" for name in ("one", "two"))
            # (A removed listener closes once the old generation has taken its queue.)
            wait_until(lambda expected=expected: (status(ports[0]), status(ports[1])) == expected)


def test_sigquit_drains_like_sigterm_and_leaves_no_core(farm_ports, certs_dir, tmp_path) -> None:
    process = balancer(farm_ports, certs_dir, tmp_path, "--workers", "2")
    running = process.__enter__()
    workers = worker_pids(running)
    for pid in workers:  # no core file can be written, whatever ends a worker
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"], core  # soft and hard
    running.process.send_signal(signal.SIGQUIT)
    assert running.process.wait(15) == 0
    running.wait_for_log("shutting down: draining 2 worker(s)")
    process.__exit__(None, None, None)


class CheckedBackend:
    """A backend in a thread that counts the health checks it answers (200, or 500 once
    told to fail) and names itself in every other response."""

    def __init__(self, name: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        backend = self
        self.name, self.failing, self.checks = name, False, 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    backend.checks += 1
                    status = 500 if backend.failing else 200
                else:
                    status = 200
                body = backend.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_health_checks_run_once_per_backend_for_all_workers(tmp_path) -> None:
    """Two workers, one checker (the supervisor's): a backend is checked once per interval,
    not once per worker, and a backend the checks take down gets nothing from any worker."""
    backends = [CheckedBackend("good"), CheckedBackend("bad")]
    config = tmp_path / "balancer.toml"
    config.write_text(
        'admin = "127.0.0.1:0"\nworkers = 2\n'
        '[[listeners]]\nname = "http"\nbind = "127.0.0.1:0"\n'
        '[health_check]\ntype = "http"\npath = "/health"\ninterval_seconds = 0.2\n'
        "timeout_seconds = 0.2\nrise = 2\nfall = 2\n"
        + "".join(
            f'[[backends]]\nname = "{b.name}"\naddress = "127.0.0.1:{b.port}"\n' for b in backends
        )
    )
    process = BalancerProcess(["-c", str(config)], {"http", "admin"}, tmp_path)
    try:
        with process as running:
            first, started = backends[0].checks, time.monotonic()
            wait_until(lambda: backends[0].checks >= first + 10)
            rate = (backends[0].checks - first) / (time.monotonic() - started)
            assert 3 <= rate <= 7, rate  # 5 a second; two checkers would make it 10
            backends[1].failing = True
            wait_until(lambda: scrape(running).get('balancer_backend_up{backend="bad"}') == 0)
            answers = {
                run("curl", "-s", running.url("http")).stdout for _ in range(20)
            }  # over both workers (each connection goes to whichever accepts it)
            assert answers == {"good"}
            view = json.loads(
                run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/backends").stdout
            )
            bad = next(b for b in view if b["name"] == "bad")
            assert bad["state"] == "down" and bad["last_check"] == "status 500"
            assert {w["state"] for w in bad["workers"]} == {"down"}  # what each worker reads
    finally:
        for backend in backends:
            backend.close()


def test_reloads_under_http2_lose_no_stream(farm_ports, certs_dir, tmp_path) -> None:
    """HTTP/2 through reloads (issue #22, item 5): curl sends batches of 100 requests over a
    few h2 connections at once while the balancer reloads five times. Each old worker says GOAWAY
    twice (the highest stream id and a PING, then the last stream taken), finishes its
    streams and closes; curl moves its next requests to a new connection. Every request
    is answered 200: no stream that was taken is reset, none is lost."""
    curl = need("curl")
    config = tmp_path / "h2.toml"
    config.write_text(
        '[[listeners]]\nname = "https"\nbind = "127.0.0.1:0"\ntls = true\n'
        'alpn = ["h2", "http/1.1"]\n'
        f'[tls]\ncert = "{certs_dir / "server.crt"}"\nkey = "{certs_dir / "server.key"}"\n'
        + "".join(f'[[backends]]\naddress = "127.0.0.1:{port}"\n' for port in farm_ports)
    )
    args = ["-c", str(config), "--workers", "2", "--access-log", str(tmp_path / "access.log")]
    answers: list[str] = []
    with BalancerProcess(args, {"https"}, tmp_path) as running:
        port = running.ports["https"]
        reloaded = threading.Event()

        def load() -> None:  # batches of 100 until the reloads are done (bounded: 60 s)
            deadline = time.monotonic() + 60
            while not reloaded.is_set() and time.monotonic() < deadline:
                batch = [
                    arg
                    for n in range(100)
                    for arg in ("-o", "/dev/null", f"https://localhost:{port}/r{n}")
                ]
                done = subprocess.run(
                    [curl, "-s", "--http2", "--parallel", "--parallel-max", "10",
                     "--cacert", str(certs_dir / "ca.crt"),
                     "-w", "%{http_code} %{http_version}\n", *batch],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                answers.extend(done.stdout.split("\n")[:-1])

        loader = threading.Thread(target=load)
        loader.start()
        try:
            for generation in range(2, 7):
                os.kill(running.process.pid, signal.SIGHUP)
                running.wait_for_log(f"reload: generation {generation} serving", timeout=20)
        finally:
            reloaded.set()
            loader.join(90)
    assert answers and len(answers) % 100 == 0
    assert set(answers) == {"200 2"}, Counter(answers)
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    records = [line for line in lines if line["type"] == "connection"]
    assert {r["tls"]["alpn"] for r in records} == {"h2"}
    assert sum(r["h2"]["streams"] for r in records) == len(answers)
    assert len({r["worker_pid"] for r in records}) > 2  # the load crossed reloads
