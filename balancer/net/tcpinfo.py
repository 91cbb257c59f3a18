"""What the kernel knows of a connection: `TCP_INFO` (RTT, state, retransmissions) and packet
receive timestamps.

Read once after accept, tcpi_rtt is the SYN-ACK → ACK round trip of the three-way handshake (the
passive side's first RTT sample). Read just before our own shutdown, tcpi_state says whether the
peer's FIN had already arrived (CLOSE_WAIT). Linux shows a socket whose FIN exchange is done
as CLOSE whichever side went first (TIME_WAIT lives in a separate mini-socket).

A user-space clock read in a callback lags the wire by the loop's latency (milliseconds under
load); `first_byte_arrival` peeks the kernel's receive timestamp (SO_TIMESTAMPNS) instead.
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import struct
from typing import Any, Final, NamedTuple, Protocol

try:  # the compiled build's (setup.py); see borrow
    from balancer.net._fdsocket import FdSocket as _FdSocketBuilt
except ImportError:  # the pure build
    _FdSocketBuilt = None  # type: ignore[assignment, misc]
# Final, as every name a connection reads here: docs/ARCHITECTURE.md, "The compiled build".
_FdSocket: Final = _FdSocketBuilt

# struct tcp_info (linux/tcp.h): 8 single bytes, then 32-bit fields, then 64-bit counters.
# state; unacked at 24; rtt at 68; total_retrans at 100; bytes_acked at 120, bytes_received
# at 128 (Linux 4.1+); bytes_sent at 200, bytes_retrans at 208 (Linux 4.19+).
_LAYOUT: Final = struct.Struct("=B7x16xI40xI28xI")
_SIZE: Final = 104
_BYTES: Final = struct.Struct("=QQ")
_ACKED_AT: Final = 120
_SENT_AT: Final = 200
_SIZE_ACKED: Final = 136
_SIZE_SENT: Final = 216
TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", 11)
_IPPROTO_TCP: Final = socket.IPPROTO_TCP
_SHUT_WR: Final = socket.SHUT_WR
_AF_INET: Final = socket.AF_INET
_SOCK_STREAM: Final = socket.SOCK_STREAM

TIME_WAIT: Final = 6
CLOSE: Final = 7
CLOSE_WAIT: Final = 8
LAST_ACK: Final = 9
CLOSING: Final = 11
# Read when the peer's FIN has just been read after our write_eof(): theirs came first.
PEER_WAS_FIRST: Final = frozenset({CLOSE_WAIT, LAST_ACK})
# States a socket is in only once the peer's FIN has arrived.
PEER_FIN_IN: Final = frozenset({CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT})


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class TCPInfo(NamedTuple):
    state: int
    unacked: int  # segments sent and not yet acknowledged
    rtt_seconds: float
    total_retrans: int
    # Sequence space the peer acknowledged / we received, since the handshake: payload bytes,
    # plus one for a FIN (a FIN takes a sequence number). None before Linux 4.1.
    bytes_acked: int | None = None
    bytes_received: int | None = None
    # Payload bytes that left, each once (tcpi_bytes_sent less tcpi_bytes_retrans): what a
    # capture sees sent, acknowledged or not. None before Linux 4.19.
    bytes_sent: int | None = None


# TCPInfo(...) runs a Python-level __new__ (five a connection); this is the same tuple.
_new_info: Final = tuple.__new__
_TCPInfo: Final = TCPInfo  # (a class is a module global too)


def borrow(sock: HasFileno) -> Any:
    """A socket object of our own on `sock`'s descriptor, to be `detach()`ed (never closed).

    The transports' own socket objects refuse shutdown() (uvloop) or build a socket object for
    every call, whose constructor asks the kernel to check the descriptor (a getsockname each,
    even with the family given, in CPython 3.11). A leg borrows once and keeps it until it is
    lost (legs.py), so each TCP_INFO read or shutdown on the way is one syscall. The compiled
    build borrows an FdSocket (_fdsocket.c): the same calls on the bare descriptor, without
    that getsockname, and TCP_INFO parsed in C (see info). Here the family and type are
    named, not asked for, and the C type (`_socket.socket`) skips socket.socket's
    Python-level __init__.
    """
    if _FdSocket is not None:
        return _FdSocket(sock.fileno())
    return _socket.socket(_AF_INET, _SOCK_STREAM, 0, sock.fileno())


def info(kernel: Any) -> TCPInfo | None:
    """TCP_INFO through a borrowed socket object, or None where the platform cannot say."""
    if type(kernel) is _FdSocket:  # the compiled build's: parsed in C, the same answer
        try:
            return kernel.tcp_info(_TCPInfo)
        except OSError:
            return None
    try:
        raw = kernel.getsockopt(_IPPROTO_TCP, TCP_INFO, _SIZE_SENT)
    except OSError:
        return None
    if len(raw) < _SIZE:
        return None
    state, unacked, rtt_us, retrans = _LAYOUT.unpack_from(raw)
    size = len(raw)
    if size < _SIZE_ACKED:
        return _new_info(_TCPInfo, (state, unacked, rtt_us / 1e6, retrans, None, None, None))
    acked, received = _BYTES.unpack_from(raw, _ACKED_AT)
    sent = None
    if size >= _SIZE_SENT:
        sent, resent = _BYTES.unpack_from(raw, _SENT_AT)
        sent -= resent
    return _new_info(_TCPInfo, (state, unacked, rtt_us / 1e6, retrans, acked, received, sent))


def shutdown_write(kernel: Any) -> bool:
    """shutdown(SHUT_WR) now, through a borrowed socket object; False if it failed."""
    try:
        kernel.shutdown(_SHUT_WR)
    except OSError:
        return False
    return True


SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)
_STAMP: Final = struct.Struct("qq")


def enable_receive_timestamps(sock: Any) -> None:
    """Ask the kernel to stamp arriving packets (sockets accepted from `sock` inherit it)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def first_byte_arrival(kernel: Any) -> float | None:
    """The kernel's receive time (Unix seconds) of the first unread byte, peeked through a
    borrowed socket object (see borrow) so the byte stays for whoever reads it; None if
    nothing is queued or no stamp is kept."""
    try:
        _, ancillary, _, _ = kernel.recvmsg(
            1, socket.CMSG_SPACE(_STAMP.size), socket.MSG_PEEK | socket.MSG_DONTWAIT
        )
    except OSError:
        return None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _STAMP.size:
            seconds, nanoseconds = _STAMP.unpack_from(payload)
            return float(seconds + nanoseconds / 1e9)
    return None
