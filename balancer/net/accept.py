"""Accepting under asyncio's own event loop, with a back-off when descriptors run out.

Under uvloop the loop accepts (libuv): when accept() fails with EMFILE, libuv closes a spare
descriptor, accepts the waiting connections and closes them at once, silently. asyncio's
selector loop instead retries a failing accept() `backlog` times per wake-up, logging a
traceback and scheduling a retry each time (CPython gh-151615): thousands of lines a second.
So under asyncio the balancer accepts itself: on a resource error it stops accepting for
`ACCEPT_PAUSE_SECONDS` (nginx pauses 500 ms) and logs one line per pause, with the count of
errors since the last one; connections wait in the kernel backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("balancer")

ACCEPT_PAUSE_SECONDS: Final = 0.5
ACCEPT_BATCH: Final = 64  # connections taken per wake-up, so one listener cannot starve the loop
RESOURCE_ERRORS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
LOG_EVERY_SECONDS: Final = 10.0


class SelectorAcceptor:
    """A listening socket served by `loop.add_reader`; has the `asyncio.Server` parts the
    balancer uses (`sockets`, `close`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        name: str,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._name = name
        self._serving = False
        self._resume: asyncio.TimerHandle | None = None
        self._last_log: float | None = None
        self.sockets = [sock]
        self.resource_errors = 0
        self._errors_unlogged = 0

    def start(self) -> None:
        self._sock.setblocking(False)
        self._serving = True
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno not in RESOURCE_ERRORS:
                    raise
                self._pause(error)
                return
            conn.setblocking(False)
            self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))

    def _pause(self, error: OSError) -> None:
        self.resource_errors += 1
        self._errors_unlogged += 1
        now = self._loop.time()
        if self._last_log is None or now - self._last_log >= LOG_EVERY_SECONDS:
            log.warning(
                "listener %s: accept failed: %s; pausing accepts %.1f s at a time "
                "(failures since the last report: %d)",
                self._name,
                error.strerror,
                ACCEPT_PAUSE_SECONDS,
                self._errors_unlogged,
            )
            self._last_log, self._errors_unlogged = now, 0
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_PAUSE_SECONDS, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


# A classic BPF socket filter (Linux) that drops a TCP segment whose flags are SYN without
# ACK, and keeps every other: on a listening socket a socket filter sees the TCP header at
# offset 0 (flags at byte 13).
_SO_ATTACH_FILTER: Final = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_SYN: Final = b"".join(
    struct.pack("HBBI", code, jump_true, jump_false, k)
    for code, jump_true, jump_false, k in (
        (0x30, 0, 0, 13),  # ldb [13]          the flags byte
        (0x54, 0, 0, 0x12),  # and #0x12         SYN | ACK
        (0x15, 0, 1, 0x02),  # jeq #0x02         SYN alone?
        (0x06, 0, 0, 0),  # ret #0             drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1            keep
    )
)
_DROP_SYN_BUFFER: Final = ctypes.create_string_buffer(_DROP_SYN)  # lives as long as the process


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Stop a listening socket from starting handshakes: SYNs are dropped, so handshakes under
    way complete into the accept queue and new clients see no answer (they retry a second
    later and meet a closed port: refused, never reset). False where the kernel will not."""
    program = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(_DROP_SYN_BUFFER))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


def take_waiting(
    sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol]
) -> list[asyncio.Task[Any]]:
    """Accept every connection waiting in `sock`'s accept queue, each to a new protocol."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []
    while True:
        try:
            conn, _address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return tasks
        except OSError:  # out of descriptors, or the socket is gone: the rest cannot be had
            return tasks
        conn.setblocking(False)
        tasks.append(loop.create_task(loop.connect_accepted_socket(factory, conn)))


def bind_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets, one per address `host` resolves to, as `loop.create_server` binds.

    Resolved here, in the calling thread, at start-up: uvloop's own create_server resolves
    through libuv's thread pool, and those four threads would stay for the process's life,
    making every descriptor syscall take the kernel's shared-file-table path (a reference
    count per read and write instead of none).
    """
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    sockets: list[socket.socket] = []
    for family, kind, proto, _canonical, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
        except OSError:
            sock.close()
            for bound in sockets:
                bound.close()
            raise
        sockets.append(sock)
    return sockets


def serve_acceptors(
    loop: asyncio.AbstractEventLoop,
    socks: list[socket.socket],
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    name: str,
) -> list[SelectorAcceptor]:
    """A started SelectorAcceptor on each listening socket."""
    acceptors = [SelectorAcceptor(loop, sock, protocol_factory, name) for sock in socks]
    for acceptor in acceptors:
        acceptor.start()
    return acceptors
