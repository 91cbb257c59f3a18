"""The `balancer` command as a user runs it, with curl, ab and openssl as the clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import COMPILED
from tests.e2e.conftest import BalancerProcess, Running, balancer, need, run

pytestmark = pytest.mark.e2e


def access_log(tmp_path: Path, served_only: bool = True) -> list[dict]:
    """The access log's records; by default only connections that carried a request (ab may
    open a spare connection and close it unused, which is recorded too)."""
    lines = (tmp_path / "access.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    records = [r for r in records if r["type"] == "connection"]
    return [r for r in records if r["requests"] or not served_only]


def ab_counts(output: str) -> tuple[int, int]:
    complete = int(output.split("Complete requests:")[1].split()[0])
    failed = int(output.split("Failed requests:")[1].split()[0])
    return complete, failed


def test_ab_over_http_and_tls12_completes_and_spreads_round_robin(
    farm_ports, certs_dir, tmp_path
) -> None:
    ab = need("ab")
    # One worker: round robin takes turns exactly within a worker (nginx's workers likewise).
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "1") as running:
        http = run(ab, "-n", "3", "-c", "1", running.url("http"))
        assert ab_counts(http.stdout) == (3, 0), http.stdout + http.stderr
        https = run(ab, "-n", "3", "-c", "1", "-f", "TLS1.2", running.url("https"))
        assert ab_counts(https.stdout) == (3, 0), https.stdout + https.stderr
        assert "TLSv1.2" in https.stdout
        spread = run(ab, "-n", "10", "-c", "2", running.url("http"))
        assert ab_counts(spread.stdout) == (10, 0)
    records = access_log(tmp_path)
    assert len(records) == 16
    tls = [r for r in records if r["listener"] == "https"]
    assert [r["tls"]["version"] for r in tls] == ["1.2"] * 3
    last_ten = Counter(r["backend"]["name"] for r in records[-10:])
    assert sorted(last_ten.values()) == [5, 5]


def test_the_process_stays_single_threaded(farm_ports, certs_dir, tmp_path) -> None:
    """No thread pool behind the loop: with one thread the kernel skips a reference count on
    every descriptor syscall (libuv's pool used to start for create_server's lookup)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        pytest.skip("needs /proc")
    curl = need("curl")
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        for url in (running.url("http"), running.url("https"), running.url("admin", "/metrics")):
            result = run(curl, "-sk", "-o", "/dev/null", "-w", "%{http_code}", url)
            assert result.stdout == "200", result
        threads = list(Path(f"/proc/{running.process.pid}/task").iterdir())
        assert len(threads) == 1, [(t / "comm").read_text().strip() for t in threads]


def test_version_and_the_start_up_log_say_which_build_runs(farm_ports, certs_dir, tmp_path) -> None:
    """An operator can tell a compiled build from a pure one without reading a file listing."""
    expected = "compiled (mypyc)" if COMPILED else "pure Python"
    version = run(sys.executable, "-m", "balancer", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"balancer 0.1.0, {expected}"
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        assert f"(pid {running.process.pid}, {expected}):" in running.wait_for_log("worker(s)")


def test_least_connections_from_the_command_line(farm_ports, certs_dir, tmp_path) -> None:
    ab = need("ab")
    with balancer(farm_ports, certs_dir, tmp_path, "--policy", "least_connections") as running:
        result = run(ab, "-n", "20", "-c", "4", running.url("http"))
        assert ab_counts(result.stdout) == (20, 0)
    counts = Counter(r["backend"]["name"] for r in access_log(tmp_path))
    assert len(counts) == 2 and min(counts.values()) >= 5


def test_curl_pinned_to_tls12_verifies_and_reaches_a_backend(
    farm_ports, certs_dir, tmp_path
) -> None:
    curl = need("curl")
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        result = run(
            curl,
            "-si",
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            "--cacert",
            str(certs_dir / "ca.crt"),
            running.url("https"),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("HTTP/2 200")  # (h2 by ALPN, as curl asks first)
        assert "x-backend: web" in result.stdout
        keep_alive = run(
            curl,
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects}\n",
            running.url("http", "/a"),
            running.url("http", "/b"),
        )
        assert keep_alive.stdout.split() == ["1", "0"]  # the second request reused the connection


def test_openssl_s_client_sees_tls12_ecdhe_aead_and_tls11_is_refused(
    farm_ports, certs_dir, tmp_path
) -> None:
    openssl = need("openssl")
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        target = f"127.0.0.1:{running.ports['https']}"
        ok = subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                target,
                "-tls1_2",
                "-servername",
                "localhost",
                "-CAfile",
                str(certs_dir / "ca.crt"),
            ],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "Protocol  : TLSv1.2" in ok.stdout, ok.stdout
        cipher = ok.stdout.split("Cipher    : ")[1].split()[0]
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
        assert "Verify return code: 0 (ok)" in ok.stdout
        old = subprocess.run(
            [openssl, "s_client", "-connect", target, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
            input="",
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert old.returncode != 0
        assert "alert protocol version" in old.stderr  # the balancer's alert 70 reached it
        plain = run("curl", "-s", "-m", "5", f"http://127.0.0.1:{running.ports['https']}/")
        assert "This port speaks HTTPS" in plain.stdout  # plain HTTP on the TLS port: a 400
    failures = [r["tls"]["failure"] for r in access_log(tmp_path, served_only=False) if r["tls"]]
    assert "protocol_version" in failures
    assert "not_tls" in failures


def check(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancer", "check", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_check_names_the_bad_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listeners]]\nbind = "127.0.0.1:80"\n\n[[backends]]\naddress = "nowhere"\n')
    result = check("-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}: backends[0].address = 'nowhere': expected an address" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_points_at_balancer_certs_when_the_cert_is_missing(tmp_path: Path) -> None:
    result = check("--https", "127.0.0.1:8443", "--backend", "127.0.0.1:9001", cwd=tmp_path)
    assert result.returncode == 2
    assert "balancer certs" in result.stderr


def test_check_accepts_the_shipped_config(certs_dir: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    result = check(
        "-c",
        str(root / "config" / "balancer.toml"),
        "--cert",
        str(certs_dir / "server.crt"),
        "--key",
        str(certs_dir / "server.key"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert "WARNING" not in result.stderr, result.stderr  # (no expiring certificate either)


def test_the_shipped_config_fits_a_box_of_1024_descriptors(certs_dir: Path) -> None:
    """Issue 20, item 9: max_connections is left to fit the machine; one set beyond the
    descriptor limit is warned of by check, as run would."""
    prlimit = need("prlimit")
    root = Path(__file__).resolve().parents[2]
    keys = ["--cert", str(certs_dir / "server.crt"), "--key", str(certs_dir / "server.key")]
    command = [prlimit, "--nofile=1024:1024", sys.executable, "-m", "balancer", "check"]
    shipped = subprocess.run([*command, "-c", str(root / "config" / "balancer.toml"), *keys],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert shipped.returncode == 0 and "WARNING" not in shipped.stderr, shipped.stderr
    tight = root / "config" / "balancer.toml"
    table = tight.read_text().replace("[limits]\n", "[limits]\nmax_connections = 10000\n")
    assert table != tight.read_text()
    set_high = certs_dir.parent / "max.toml"
    set_high.write_text(table)
    result = subprocess.run([*command, "-c", str(set_high), *keys], capture_output=True,
                            text=True, timeout=30, cwd=root)  # fmt: skip
    assert result.returncode == 0 and "lower limits.max_connections to 480" in result.stderr


def test_check_accepts_the_xmpp_config_and_names_a_missing_sni_certificate(
    certs_dir: Path, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parents[2]
    keys = ["--cert", str(certs_dir / "server.crt"), "--key", str(certs_dir / "server.key")]
    result = check("-c", str(root / "config" / "xmpp.toml"), *keys)
    assert result.returncode == 0, result.stderr
    assert "group c2s: 2 backend(s), policy least_connections" in result.stdout
    more = tmp_path / "sni.toml"
    more.write_text(
        (root / "config" / "xmpp.toml").read_text()
        + '\n[[tls.certificates]]\ncert = "missing.crt"\nkey = "missing.key"\n'
    )
    result = check("-c", str(more), *keys, cwd=tmp_path)
    assert result.returncode == 2
    assert "tls.certificates[0].cert = 'missing.crt': cannot read: no such file" in result.stderr
    assert "Traceback" not in result.stderr
    own = tmp_path / "own.toml"
    own.write_text(
        (root / "config" / "xmpp.toml")
        .read_text()
        .replace(
            'group = "c2s"\n\n[[listeners]]\nname = "bosh"',
            'group = "c2s"\ncertificates = [{ cert = "gone.crt", key = "gone.key" }]\n\n'
            '[[listeners]]\nname = "bosh"',
        )
    )
    result = check("-c", str(own), *keys, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "listeners[1].certificates[0].cert = 'gone.crt': cannot read" in result.stderr


def test_check_names_every_file_problem_in_one_run(certs_dir: Path, tmp_path: Path) -> None:
    """Issue 20, item 4: an operator fixing a config learns every file it cannot use from
    one `check`, not one problem per run."""
    config = tmp_path / "files.toml"
    config.write_text(
        'admin = "127.0.0.1:0"\nadmin_token_file = "no-token"\n'
        'access_log = "no-such-dir/access.log"\n'
        '[[listeners]]\nname = "https"\nbind = "127.0.0.1:0"\nprotocol = "https"\n'
        '[tls]\ncert = "gone.crt"\nkey = "gone.key"\n'
        f'[[tls.certificates]]\ncert = "{certs_dir / "server.crt"}"\nkey = "wrong.key"\n'
        '[[backends]]\naddress = "no-such-host.invalid:80"\n'
    )
    result = check("-c", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for problem in (
        "'no-such-host.invalid' does not resolve",
        "access_log = 'no-such-dir/access.log': directory 'no-such-dir' does not exist",
        "admin_token_file = 'no-token': cannot read",
        "tls.cert = 'gone.crt': cannot read",
        "tls.key = 'gone.key': cannot read",
        "tls.certificates[0].key = 'wrong.key': cannot read",
    ):
        assert problem in result.stderr, (problem, result.stderr)


def test_run_refuses_a_bad_config_before_binding(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "balancer", "run", "--http", "127.0.0.1:1", "--policy", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "listening" not in result.stderr


def test_certs_verb_writes_a_ca_and_a_private_key_with_mode_0600(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "balancer",
            "certs",
            "--dir",
            str(tmp_path),
            "--host",
            "lb.test",
            "--key-type",
            "rsa",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    text = run("openssl", "x509", "-in", str(tmp_path / "server.crt"), "-noout", "-text").stdout
    assert "DNS:lb.test" in text and "IP Address:127.0.0.1" in text and "rsaEncryption" in text


def wait_for_load(running: Running, accepted: int) -> None:
    """Bounded wait until the balancer has accepted `accepted` connections (load flows)."""
    deadline = time.monotonic() + 10
    prefix = 'balancer_connections_accepted_total{listener="http"}'
    while time.monotonic() < deadline:
        metrics = run("curl", "-s", f"http://127.0.0.1:{running.ports['admin']}/metrics").stdout
        counts = [x for x in metrics.splitlines() if x.startswith(prefix)]
        if counts and float(counts[0].split()[-1]) > accepted:
            return
        time.sleep(0.05)


def test_sigterm_under_load_loses_no_accepted_request(farm_ports, certs_dir, tmp_path) -> None:
    """Graceful shutdown while ab runs: every connection the balancer accepted is answered in
    full; new ones are refused once the listener closes; the process exits in the grace."""
    ab = need("ab")
    process = balancer(farm_ports, certs_dir, tmp_path)
    with process as running:
        load = subprocess.Popen(
            [ab, "-n", "200000", "-c", "8", "-r", running.url("http")],  # -r: go on after errors
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_load(running, accepted=500)
        started = time.monotonic()
    # Leaving the block sent SIGTERM and waited for exit code 0 with no traceback.
    assert time.monotonic() - started < 10
    load.wait(60)
    assert load.stdout is not None
    load.stdout.close()
    records = access_log(tmp_path, served_only=False)
    assert len(records) > 500
    served = [r for r in records if r["requests"]]
    assert all(r["error_status"] is None for r in served)
    assert not any(r["client_leg"]["rst_sent"] for r in records)
    assert all(r["bytes"]["client_out"] > 0 for r in served)  # each got its response


def test_sigterm_under_ab_ends_in_refusals_not_resets(certs_dir, tmp_path) -> None:
    """ab -c 50 with a SIGTERM part-way saw 42-45 connections reset after sending their
    request: the accept queue, reset as the listener closed. ab stops at its first error;
    that error must be a refused connect (the port closed after every connection the kernel
    completed was answered), never a reset."""
    ab, taskset = need("ab"), need("taskset")
    # The balancer on one core, ab on the other, the farm a process of its own: the balancer
    # is the bottleneck, so its accept queue holds connections, as when the loss was seen.
    farm = subprocess.Popen(
        [sys.executable, "-c", FARM_PROCESS], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert farm.stdout is not None
    ports = [int(port) for port in farm.stdout.readline().split()]
    process = balancer(ports, certs_dir, tmp_path, prefix=[taskset, "-c", "0"])
    try:
        _sigterm_under_ab(process, ab, taskset, tmp_path)
    finally:
        farm.kill()
        farm.wait(5)
        farm.stdout.close()


FARM_PROCESS = """
import asyncio, uvloop
from balancer.demo.farm import start_farm
async def main():
    started = await start_farm(["web1", "web2"])
    print(*(port for _, port in started), flush=True)
    await asyncio.sleep(120)
uvloop.run(main())
"""
ROOT = Path(__file__).resolve().parents[2]


def _sigterm_under_ab(process: BalancerProcess, ab: str, taskset: str, tmp_path: Path) -> None:
    with process as running:
        load = subprocess.Popen(
            [taskset, "-c", "1", ab, "-n", "200000", "-c", "50", running.url("http")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        running.wait_for_log("listening: admin")
        wait_for_load(running, accepted=2000)
    # Leaving the block sent SIGTERM and waited for exit code 0 with no traceback.
    output, _ = load.communicate(timeout=60)
    assert "Connection refused" in output and "reset by peer" not in output, output[-600:]
    records = access_log(tmp_path, served_only=False)
    assert len(records) > 2000
    assert all(r["error_status"] is None for r in records if r["requests"])


@pytest.mark.parametrize("reuse", ["safe", "always"])
def test_ab_through_each_reuse_mode_completes_and_always_reuses(
    farm_ports, certs_dir, tmp_path, reuse: str
) -> None:
    """ab: a new client connection per request. In always mode they share a few backend
    connections; in safe mode each client connection's (only) request gets a new one."""
    ab = need("ab")
    config = tmp_path / "reuse.toml"
    config.write_text(f'request_log = true\n[upstream]\nreuse = "{reuse}"\n')
    extra = ("-c", str(config), "--workers", "2")
    with balancer(farm_ports, certs_dir, tmp_path, *extra) as running:
        result = run(ab, "-n", "400", "-c", "8", running.url("http"))
        assert ab_counts(result.stdout) == (400, 0), result.stdout + result.stderr
    lines = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    requests = [x for x in lines if x["type"] == "request"]
    # A backend connection is named by its worker and its id there.
    opened = {(x["worker_pid"], x["backend_connection_id"]) for x in requests}
    assert len(requests) == 400 and {x["status"] for x in requests} == {200}
    if reuse == "always":
        # About one per concurrent request per backend, in each of the two workers' pools.
        assert len(opened) <= 2 * 2 * 8
        assert sum(x["reused"] for x in requests) >= 400 - 2 * 2 * 8
    else:
        assert len(opened) == 400 and not any(x["reused"] for x in requests)
