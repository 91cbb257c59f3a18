"""A real DNS server for the discovery tests: Debian's dnsmasq on a loopback port.

It answers only what the test gives it (no upstream, no /etc/hosts): A/AAAA records from a
hosts file (rewritten and re-read on SIGHUP: records changed mid-test), SRV records from its
command line (a restart on the same port changes them), every record with a 1 s TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.nameserver
import pytest

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class Dnsmasq:
    """dnsmasq serving `hosts` (lines of "address name") and `srv` records
    ("_service._tcp.name,target,port,priority,weight") on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, hosts: list[str], srv: list[str] | None = None) -> None:
        if not os.path.exists(DNSMASQ):
            pytest.skip("dnsmasq is not installed (Debian: dnsmasq-base)")
        self.directory = directory
        self.hosts_file = directory / "hosts"
        self.hosts_file.write_text("".join(f"{line}\n" for line in hosts))
        self.srv = list(srv or [])
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Dnsmasq:
        command = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={self.port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
            f"--addn-hosts={self.hosts_file}", "--local-ttl=1", "--user=root",
            f"--pid-file={self.directory / 'pid'}", f"--log-facility={self.directory / 'log'}",
            *(f"--srv-host={record}" for record in self.srv),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        return self

    def set_hosts(self, hosts: list[str]) -> None:
        """New A/AAAA records: the file rewritten, dnsmasq told to read it again."""
        self.hosts_file.write_text("".join(f"{line}\n" for line in hosts))
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    async def answers(self, name: str, kind: str, expected: set[str], timeout: float = 5) -> None:
        """Until dnsmasq answers `name` with exactly `expected` (bounded): it is up, or it
        has read its new records."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        resolver.lifetime = 0.5
        resolver.cache = None
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(dns.exception.DNSException, OSError):
                    answer = await resolver.resolve(name, kind, raise_on_no_answer=False)
                    if {str(record) for record in answer.rrset or ()} == expected:
                        return
                await asyncio.sleep(0.05)
