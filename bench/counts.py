"""Per new connection, what does not drift with a noisy machine: Python calls, C calls from
Python, object allocations, objects left to the cyclic GC, and syscalls.

    python bench/counts.py                  # reuse never and always, 2000 connections each
    python bench/counts.py --reuse never --connections 5000 --json
    python bench/counts.py --reuse never --functions 40   # where the calls go
    python bench/counts.py --reuse never --allocators 40  # where the allocations are made
    python bench/counts.py --keepalive                    # per keep-alive request (ab -k)
    python bench/counts.py --h2                           # per HTTP/2 stream (h2load)
    python bench/counts.py --tls                          # per full TLS 1.2 handshake (ab -f)

The balancer runs in this process (uvloop, access log on, one worker), a small HTTP/1.1 farm
in another, and `ab -c 8` (a new HTTP/1.0 connection per request; a Python client where ab is
missing) in a third, so what is counted here is the balancer's alone. Each count is its own
pass over the same traffic (a profiler changes timing, so it is not stacked on the others):

- calls: `sys.setprofile` events, Python functions ("call") and C functions called from
  Python ("c_call"), divided by the connections;
- allocations: every allocation of CPython's object domain (bench/alloccount.c, built here
  with the C compiler and Python's headers; "n/a" without them);
- gc_only: objects that only the cyclic GC would free (gc disabled, `gc.DEBUG_SAVEALL`, one
  collection after the traffic: what it finds in `gc.garbage`);
- syscalls: `strace -c` attached to this process (not its children) for the pass ("n/a"
  without strace).

A warm-up of 300 connections precedes every pass (caches, pools, interned strings).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from balancer.config.schema import parse_config  # noqa: E402
from balancer.demo.certs import make_certs  # noqa: E402
from balancer.process.server import Balancer  # noqa: E402

WARMUP = 300
CONCURRENCY = 8

FARM = r"""
import asyncio, sys, uvloop
BODY = b"x" * 100
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n"
class Farm(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            close = head.split(b"\r\n", 1)[0].endswith(b"1.0") and b"keep-alive" not in head.lower()
            self.transport.write(HEAD + (b"Connection: close\r\n\r\n" if close else b"\r\n") + BODY)
            if close:
                self.transport.close()
                return
async def main():
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Farm, "127.0.0.1", 0) for _ in range(2)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""

CLIENT = r"""
import socket, sys
from concurrent.futures import ThreadPoolExecutor
port, count = int(sys.argv[1]), int(sys.argv[2])
def one(_):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        while sock.recv(65536):
            pass
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(count)))
"""


KEEPALIVE = False  # --keepalive: `ab -k`, each of the 8 connections carrying many requests
H2 = False  # --h2: h2load over TLS (ALPN h2), 4 connections of 10 streams at once: per stream
H2_CONNECTIONS, H2_STREAMS = 4, 10
TLS = False  # --tls: `ab -f TLS1.2` over https, a new connection (a full handshake) each


def load_command(port: int, count: int) -> list[str]:
    if H2:
        if not shutil.which("h2load"):
            raise RuntimeError("--h2 needs h2load (nghttp2-client)")
        return ["h2load", "-n", str(count), "-c", str(H2_CONNECTIONS), "-m", str(H2_STREAMS),
                f"https://127.0.0.1:{port}/"]  # fmt: skip
    if shutil.which("ab"):
        keepalive = ["-k"] if KEEPALIVE else []
        tls = ["-f", "TLS1.2"] if TLS else []
        url = f"{'https' if TLS else 'http'}://127.0.0.1:{port}/"
        return ["ab", "-q", *keepalive, *tls, "-n", str(count), "-c", str(CONCURRENCY), url]
    if KEEPALIVE or TLS:
        raise RuntimeError("--keepalive and --tls need ab (apache2-utils)")
    return [sys.executable, "-c", CLIENT, str(port), str(count)]


async def drive(port: int, count: int) -> None:
    process = await asyncio.create_subprocess_exec(
        *load_command(port, count), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-400:]}")


def build_alloc_counter(workdir: Path) -> Any:
    """bench/alloccount.c as a shared library, loaded; None without a compiler or headers."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    include = sysconfig.get_paths().get("include")
    if compiler is None or include is None or not (Path(include) / "Python.h").exists():
        return None
    library = workdir / "alloccount.so"
    built = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(library),
         str(ROOT / "bench" / "alloccount.c")],
        capture_output=True,
    )  # fmt: skip
    if built.returncode != 0:
        return None
    counter = ctypes.PyDLL(str(library))
    counter.alloccount_total.restype = ctypes.c_ulonglong
    counter.alloccount_install()
    return counter


class Profile:
    def __init__(self, by_function: bool = False) -> None:
        self.calls = 0
        self.c_calls = 0
        self.by_function = by_function
        self.functions: dict[str, int] = {}  # "module.py:function" (or C's name) → calls

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls += 1
            if self.by_function:
                code = frame.f_code
                name = f"{Path(code.co_filename).name}:{code.co_qualname}"
                self.functions[name] = self.functions.get(name, 0) + 1
        elif event == "c_call":
            self.c_calls += 1
            if self.by_function:
                name = f"C:{getattr(arg, '__qualname__', None) or arg.__name__}"
                self.functions[name] = self.functions.get(name, 0) + 1


def _bound_for_the_event(function: Any) -> bool:
    owner = getattr(function, "__self__", None)
    return owner is not None and not isinstance(owner, type(sys))


class AllocationProfile:
    """Allocations by the function that made them (self, not inclusive): a `sys.setprofile`
    hook that reads the allocation counter at every call and return and charges the
    difference to the function on top of its stack (Python or C; "(uvloop)" when none of
    ours runs: the loop's own C code). The hook's own reading costs a fixed number of
    allocations (the ctypes result), measured once and taken off each interval. What
    profiling itself makes is not charged: a Python call's frame object, and the bound
    method object CPython 3.11 builds to name a C method it calls (a method kept bound in a
    variable is then charged one too few)."""

    def __init__(self, counter: Any) -> None:
        self.read = counter.alloccount_total
        first = self.read()
        self.own = self.read() - first  # what one reading allocates
        self.stack: list[str] = []
        self.functions: dict[str, int] = {}
        self.last = self.read()

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        made = self.read() - self.last - self.own
        if event == "call" or (event == "c_call" and _bound_for_the_event(arg)):
            made -= 1
        top = self.stack[-1] if self.stack else "(uvloop)"
        self.functions[top] = self.functions.get(top, 0) + made
        if event == "call":
            code = frame.f_code
            self.stack.append(f"{Path(code.co_filename).name}:{code.co_qualname}")
        elif event == "c_call":
            self.stack.append(f"C:{getattr(arg, '__qualname__', None) or arg.__name__}")
        elif self.stack:  # return, c_return, c_exception
            self.stack.pop()
        self.last = self.read()


async def count_syscalls(
    pass_: Callable[[], Awaitable[None]], workdir: Path
) -> tuple[float, dict[str, int]] | None:
    """Syscalls of this process during `pass_` (strace -c): the total and each one's count,
    or None without strace."""
    if shutil.which("strace") is None:
        return None
    out = workdir / "strace.txt"
    strace = subprocess.Popen(
        ["strace", "-c", "-o", str(out), "-p", str(os.getpid())],
        stderr=subprocess.PIPE,
    )
    assert strace.stderr is not None
    # strace says on stderr when it is attached; wait for that (bounded) before the traffic.
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, strace.stderr.readline), 10)
    if b"attached" not in line:
        strace.kill()
        return None
    await pass_()
    strace.send_signal(2)
    strace.wait(10)
    table = out.read_text()
    total = re.search(r"^-+.*\n\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total", table, re.M)
    row = r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$"  # calls, then the name
    each = {name: int(calls) for calls, name in re.findall(row, table, re.M) if name != "total"}
    return (float(total.group(1)), each) if total else None


async def measure(
    reuse: str,
    connections: int,
    workdir: Path,
    counter: Any,
    functions: int = 0,
    allocators: int = 0,
) -> dict[str, Any]:
    farm = subprocess.Popen(
        [sys.executable, "-c", FARM], stdout=subprocess.PIPE, text=True
    )  # fmt: skip
    try:
        assert farm.stdout is not None
        ports = farm.stdout.readline().split()
        log = open(workdir / f"access-{reuse}.log", "w")  # noqa: SIM115 (closed below)
        listener: dict[str, Any] = {"name": "http", "bind": "127.0.0.1:0"}
        tls: dict[str, Any] = {}
        if H2 or TLS:  # an https listener (offering h2 for --h2), on a certificate made here
            certs = workdir / "certs"
            if not (certs / "server.crt").exists():
                make_certs(certs)
            listener.update(tls=True, alpn=["h2", "http/1.1"] if H2 else ["http/1.1"])
            tls = {"tls": {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}}
        config = parse_config(
            {
                "listeners": [listener],
                **tls,
                "backends": [
                    {"name": f"web{i}", "address": f"127.0.0.1:{port}"}
                    for i, port in enumerate(ports)
                ],
                "upstream": {"reuse": reuse},
                "workers": 1,
            },
            "bench",
        )
        balancer = Balancer(config, access_log=log)
        await balancer.start()
        port = balancer.addresses["http"][1]
        await drive(port, WARMUP)
        result: dict[str, Any] = {"reuse": reuse, "connections": connections}

        profile = Profile(by_function=functions > 0)
        sys.setprofile(profile)
        try:
            await drive(port, connections)
        finally:
            sys.setprofile(None)
        result["python_calls"] = round(profile.calls / connections, 1)
        result["c_calls"] = round(profile.c_calls / connections, 1)
        if functions:  # the most called, per connection
            top = sorted(profile.functions.items(), key=lambda kv: -kv[1])[:functions]
            result["functions"] = {name: round(n / connections, 2) for name, n in top}

        if counter is not None and allocators:
            allocation_profile = AllocationProfile(counter)
            sys.setprofile(allocation_profile)
            try:
                await drive(port, connections)
            finally:
                sys.setprofile(None)
            top = sorted(allocation_profile.functions.items(), key=lambda kv: -kv[1])
            result["allocators_total"] = round(sum(n for _, n in top) / connections, 1)
            result["allocators"] = {name: round(n / connections, 2) for name, n in top[:allocators]}

        if counter is not None:
            before = counter.alloccount_total()
            await drive(port, connections)
            result["allocations"] = round((counter.alloccount_total() - before) / connections, 1)
        else:
            result["allocations"] = "n/a"

        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await drive(port, connections)
            gc.collect()
            result["gc_only"] = round(len(gc.garbage) / connections, 2)
            kinds: dict[str, int] = {}
            for thing in gc.garbage:
                kinds[type(thing).__name__] = kinds.get(type(thing).__name__, 0) + 1
            result["gc_only_kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:8])
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()

        syscalls = await count_syscalls(lambda: drive(port, connections), workdir)
        result["syscalls"] = "n/a" if syscalls is None else round(syscalls[0] / connections, 1)
        if syscalls is not None:  # per connection, most first
            each = sorted(syscalls[1].items(), key=lambda kv: -kv[1])
            result["syscall_kinds"] = {name: round(n / connections, 2) for name, n in each}

        await balancer.shutdown(1.0)
        log.close()
        lines = (workdir / f"access-{reuse}.log").read_text().count('"type":"connection"')
        result["access_log_lines"] = lines
        return result
    finally:
        farm.kill()
        farm.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="append", choices=["never", "safe", "always"])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="one JSON object per mode")
    parser.add_argument("--syscalls", action="store_true", help="each syscall's count too")
    parser.add_argument(
        "--functions", type=int, default=0, metavar="N",
        help="the N most called functions (Python and C), per connection",
    )  # fmt: skip
    parser.add_argument(
        "--allocators", type=int, default=0, metavar="N",
        help="the N functions that allocate most (self), per connection",
    )  # fmt: skip
    parser.add_argument(
        "--h2", action="store_true",
        help="HTTP/2 streams (h2load over TLS): the counts are per stream",
    )  # fmt: skip
    parser.add_argument(
        "--tls", action="store_true",
        help="a full TLS 1.2 handshake per connection (ab -f TLS1.2 over https)",
    )  # fmt: skip
    parser.add_argument(
        "--keepalive", action="store_true",
        help="keep-alive requests (ab -k): the counts are per request, not per connection",
    )  # fmt: skip
    args = parser.parse_args(argv)
    global KEEPALIVE, H2, TLS
    KEEPALIVE, H2, TLS = args.keepalive, args.h2, args.tls
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        counter = build_alloc_counter(workdir)
        rows = []
        for reuse in args.reuse or ["never", "always"]:
            started = time.monotonic()
            row = uvloop.run(
                measure(reuse, args.connections, workdir, counter, args.functions, args.allocators)
            )
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(json.dumps(row) if args.json else _line(row), flush=True)
            if args.syscalls and not args.json:
                print(f"  syscalls per {_unit()}:", row.get("syscall_kinds", "n/a"), flush=True)
            if args.functions and not args.json:
                for name, calls in row.get("functions", {}).items():
                    print(f"  {calls:6.2f}  {name}", flush=True)
            if args.allocators and not args.json:
                print(
                    f"  allocations per {_unit()}, {row.get('allocators_total')} under the "
                    "hook, by the function that made them:"
                )
                for name, made in row.get("allocators", {}).items():
                    print(f"  {made:6.2f}  {name}", flush=True)
    return 0


def _line(row: dict[str, Any]) -> str:
    return (
        f"reuse {row['reuse']}: per {_unit()} "
        f"{row['python_calls']} Python calls, "
        f"{row['c_calls']} C calls, {row['allocations']} allocations, "
        f"{row['gc_only']} GC-only objects {row['gc_only_kinds']}, {row['syscalls']} syscalls "
        f"({row['connections']} {_pass_words()} a pass, {row['seconds']} s)"
    )


def _unit() -> str:
    return "stream" if H2 else "request" if KEEPALIVE else "connection"


def _pass_words() -> str:
    if H2:
        return f"streams over {H2_CONNECTIONS} connections of {H2_STREAMS} at once"
    return "requests over 8 connections" if KEEPALIVE else "connections"


if __name__ == "__main__":
    sys.exit(main())
