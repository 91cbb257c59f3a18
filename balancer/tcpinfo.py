"""Linux `TCP_INFO`: what the kernel knows of a connection (RTT, state, retransmissions).

Read once after accept, tcpi_rtt is the SYN-ACK → ACK round trip of the three-way handshake (the
passive side's first RTT sample). Read just before our own shutdown, tcpi_state says whether the
peer's FIN had already arrived (CLOSE_WAIT). Linux shows a socket whose FIN exchange is done
as CLOSE whichever side went first (TIME_WAIT lives in a separate mini-socket).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol

# struct tcp_info (linux/tcp.h): 8 single bytes, then 32-bit fields; we read up to total_retrans.
_LAYOUT = struct.Struct("=B7x60xI28xI")  # state; rtt at offset 68; total_retrans at 100
_SIZE = 104
TCP_INFO = getattr(socket, "TCP_INFO", 11)

ESTABLISHED = 1
CLOSE_WAIT = 8
LAST_ACK = 9
# Read when the peer's FIN has just been read after our write_eof(): theirs came first.
PEER_WAS_FIRST = frozenset({CLOSE_WAIT, LAST_ACK})
STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip


class HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class TCPInfo:
    state: int
    rtt_seconds: float
    total_retrans: int

    @property
    def state_name(self) -> str:
        return STATES.get(self.state, str(self.state))


def read(sock: HasSockopt | None) -> TCPInfo | None:
    """TCP_INFO of a socket, or None where the platform or socket cannot say."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _SIZE)
    except (OSError, AttributeError):
        return None
    if len(raw) < _SIZE:
        return None
    state, rtt_us, retrans = _LAYOUT.unpack_from(raw)
    return TCPInfo(state, rtt_us / 1e6, retrans)
