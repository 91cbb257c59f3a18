"""What a new operator meets in the first hour, as they meet it: the command run, its output and
exit code read. Each test is one defect that was found and fixed (issue #12)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import balancer, need, run

pytestmark = pytest.mark.e2e


def balancer_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@contextmanager
def taken_port() -> Iterator[int]:
    """A port some other process holds (a listening socket of the test's)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def free_port_run(count: int) -> int:
    """A first port P with P .. P+count-1 free now (for the demo's farm)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                # As the demo binds (asyncio's default): a port that only TIME_WAIT
                # connections use is free to listen on. (After ab runs, most are.)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no run of free ports")


# 1. check validates what run would; run never prints a traceback for a config problem.


@pytest.mark.parametrize("verb", ["check", "run"])
def test_an_access_log_in_a_missing_directory_is_a_config_error(verb: str, tmp_path) -> None:
    result = balancer_cli(
        verb, "--http", "127.0.0.1:0", "--backend", "127.0.0.1:9",
        "--access-log", "/nonexistent/dir/a.log",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "access_log = '/nonexistent/dir/a.log'" in result.stderr
    assert "directory '/nonexistent/dir' does not exist" in result.stderr
    assert "listening" not in result.stderr and "config OK" not in result.stdout
    no_traceback(result)


# 2. A missing key is blamed on the key.


def test_a_missing_key_file_is_named_not_the_certificate(certs_dir: Path, tmp_path) -> None:
    missing = tmp_path / "missing.key"
    result = balancer_cli(
        "check", "--https", "127.0.0.1:0", "--backend", "127.0.0.1:9",
        "--cert", str(certs_dir / "server.crt"), "--key", str(missing),
    )  # fmt: skip
    assert result.returncode == 2
    assert f"tls.key = '{missing}': cannot read: no such file or directory" in result.stderr
    assert "server.crt" not in result.stderr
    no_traceback(result)


# 3. Bind failures say which listener and address, with the fix.


def test_a_port_in_use_names_the_listener_and_address(tmp_path) -> None:
    with taken_port() as port:
        result = balancer_cli(
            "run", "--http", "127.0.0.1:0", "--backend", "127.0.0.1:9",
            "--admin", f"127.0.0.1:{port}",
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen: admin listener on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert f"ss -ltnp 'sport = :{port}'" in result.stderr
    # 6. A fatal error comes first: nothing about descriptors is said before (or after) it.
    assert "file descriptors" not in result.stderr
    no_traceback(result)


def test_the_demo_says_which_of_its_ports_is_taken_and_how_to_move_it(tmp_path) -> None:
    farm = free_port_run(3)
    with taken_port() as port:
        listener = balancer_cli(
            "demo", "--certs-dir", str(tmp_path / "certs"), "--http", f"127.0.0.1:{port}",
            "--https", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--farm-port", str(farm),
        )  # fmt: skip
        backend = balancer_cli(
            "demo", "--certs-dir", str(tmp_path / "certs"), "--http", "127.0.0.1:0",
            "--https", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--farm-port", str(port),
        )  # fmt: skip
    assert listener.returncode == 1
    assert f"http listener on 127.0.0.1:{port}: Address already in use" in listener.stderr
    assert "--http, --https and --admin" in listener.stderr
    assert backend.returncode == 1
    assert f"demo backend web1 listener on 127.0.0.1:{port}" in backend.stderr
    assert "--farm-port" in backend.stderr
    no_traceback(listener)
    no_traceback(backend)


# 4. `balancer certs` keeps what exists unless --force.


def test_certs_twice_keeps_the_ca_and_force_replaces_it(tmp_path) -> None:
    first = balancer_cli("certs", "--dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    files = {
        name: (tmp_path / name).read_bytes() for name in ("ca.crt", "server.crt", "server.key")
    }
    again = balancer_cli("certs", "--dir", str(tmp_path))
    assert again.returncode == 0 and again.stdout.startswith("kept "), again.stdout
    assert "--force" in again.stdout
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    forced = balancer_cli("certs", "--dir", str(tmp_path), "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("wrote ")
    assert (tmp_path / "ca.crt").read_bytes() != files["ca.crt"]
    (tmp_path / "server.key").unlink()
    partial = balancer_cli("certs", "--dir", str(tmp_path))
    assert partial.returncode == 2
    assert "server.key do not" in partial.stderr and "--force" in partial.stderr
    assert not (tmp_path / "server.key").exists()  # nothing half-made


# 5. The demo shows each connection live, and says what it served on Ctrl-C.


def test_the_demo_prints_a_line_per_connection_and_a_summary_on_ctrl_c(tmp_path) -> None:
    curl = need("curl")
    farm = free_port_run(3)
    demo = subprocess.Popen(
        [
            sys.executable, "-m", "balancer", "demo", "--certs-dir", str(tmp_path / "certs"),
            "--http", "127.0.0.1:0", "--https", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--farm-port", str(farm),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    seen = threading.Condition()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            with seen:
                lines.append(line)
                seen.notify_all()

    def wait_for(pattern: str) -> re.Match[str]:
        with seen:
            found = seen.wait_for(
                lambda: next((m for line in lines if (m := re.search(pattern, line))), None), 15
            )
        assert found, (pattern, lines)
        return found

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        http = wait_for(r"http://127\.0\.0\.1:(\d+)/ ").group(1)
        admin = wait_for(r"metrics: http://(127\.0\.0\.1:\d+)/metrics").group(1)
        assert run(curl, "-s", f"http://127.0.0.1:{http}/").returncode == 0
        line = wait_for(r"^#1 http 127\.0\.0\.1:\d+ -> web1 \|.*").group(0)
        assert "1 request | client leg: " in line and "backend leg: " in line
        assert re.search(r"closed first \((FIN|RST|close_notify)\)", line)
        assert f"connections: http://{admin}/connections" in "".join(lines)
        assert f"status page: http://{admin}/ " in "".join(lines)  # the page, not only JSON
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(15)
        reader.join(5)
        assert demo.stderr is not None
        stderr = demo.stderr.read()
        for pipe in (demo.stdout, demo.stderr):
            if pipe is not None:
                pipe.close()
    assert demo.returncode == 0, stderr
    assert "stopped: 1 connections, 1 requests (web1 1, web2 0, web3 0)" in "".join(lines)
    assert "Traceback" not in stderr


# 6. A default limit that does not fit the machine is fitted, not warned about.


def test_a_low_descriptor_limit_fits_the_default_calmly(farm_ports, certs_dir, tmp_path) -> None:
    need("prlimit")
    process = balancer(farm_ports, certs_dir, tmp_path, prefix=["prlimit", "--nofile=400:400"])
    with process as running:
        line = running.wait_for_log("file descriptors:")
    assert "INFO" in line and "limits.max_connections is 168" in line, line
    assert "WARNING" not in process.stderr


# 9. The access log has a readable time, and is reopened (after a flush) on SIGUSR1.


def test_access_log_time_field_and_reopen_on_sigusr1(farm_ports, certs_dir, tmp_path) -> None:
    curl = need("curl")
    log, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    with balancer(farm_ports, certs_dir, tmp_path, "--workers", "2") as running:
        assert run(curl, "-s", running.url("http", "/first")).returncode == 0
        closed_one(curl, running.url("admin", "/connections"))  # its record is written
        log.rename(rotated)  # what logrotate does; the balancer still holds the old file
        running.process.send_signal(signal.SIGUSR1)  # passed to every worker
        with running.logged:
            assert running.logged.wait_for(
                lambda: sum("access log reopened" in x for x in running.log_lines) == 2, 10
            )
        assert len(rotated.read_text().splitlines()) == 1  # flushed before the reopen
        assert run(curl, "-s", running.url("http", "/second")).returncode == 0
    (old,) = [
        x for x in map(json.loads, rotated.read_text().splitlines()) if x["type"] != "request"
    ]
    (new,) = [x for x in map(json.loads, log.read_text().splitlines()) if x["type"] != "request"]
    assert old["start"] < new["start"]
    for record in (old, new):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["time"])
        shown = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["start"]))
        assert record["time"].startswith(shown)


def closed_one(curl: str, url: str) -> None:
    """Wait (bounded) until the balancer, another process, lists a closed connection."""
    deadline = time.monotonic() + 10
    while not json.loads(run(curl, "-s", url).stdout)["recent_closed"]:
        assert time.monotonic() < deadline, "no connection closed in 10 s"
        time.sleep(0.02)


# 10. The admin listener's status lines have reason phrases; every flag says what it does.


def test_admin_responses_have_reason_phrases(farm_ports, certs_dir, tmp_path) -> None:
    curl = need("curl")
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        ok = run(curl, "-si", running.url("admin", "/healthz")).stdout
        missing = run(curl, "-si", running.url("admin", "/nope")).stdout
    assert ok.startswith("HTTP/1.1 200 OK\n")  # (text mode reads CRLF as LF)
    assert missing.startswith("HTTP/1.1 404 Not Found\n")


def test_every_flag_has_help() -> None:
    import argparse

    from balancer.cli import _parser

    verbs = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb, sub in verbs.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (verb, action.option_strings)
        assert "--help" in balancer_cli(verb, "--help").stdout


# 11. `ab -k` (HTTP/1.0 keep-alive) ran until its timeout: an HTTP/1.1 backend's response,
#     relayed, did not say keep-alive, so ab waited for a close that never came.


def test_ab_with_keep_alive_reuses_its_connections(farm_ports, certs_dir, tmp_path) -> None:
    ab = need("ab")
    with balancer(farm_ports, certs_dir, tmp_path) as running:
        output = run(ab, "-k", "-s", "5", "-n", "400", "-c", "4", running.url("http"),
                     timeout=30).stdout  # fmt: skip
    assert "Complete requests:      400" in output, output
    assert "Failed requests:        0" in output, output
    assert "Keep-Alive requests:    400" in output, output  # every one over a kept connection
