"""Legs: one object per TCP connection side, and everything about it a capture could check.

Theory of operation
-------------------
A connection through the balancer has two legs, client and backend, each one TCP connection
seen from our side. A `Leg` owns that side's transport and socket and fills its `LegTeardown`
(record.py) with what the wire shows: who started the close, whose FIN came first, RSTs each
way, TLS close_notify each way, the FIN → FIN teardown time, retransmissions, and the bytes
that crossed it as the kernel counted them.

    open ──► shutdown(): [close_notify], our FIN ──► lingering ──► peer_fin_while_closing()
      │         (reads on for the peer's FIN,                         closes (after our last
      │          bounded by the owner's linger deadline)              bytes are acked)
      ├──► peer_fin(): the peer's FIN read first; the owner decides what follows
      ├──► reset(): our RST (SO_LINGER 0), a cut response must look cut
      └──► linger_over(): the peer never answered our FIN: close (RST if bytes are unsent)
    any ──► lost(exc): the transport is gone; kernel facts read one last time

Rules this module keeps, so the owner (a client session, a backend connection) need not:
- The write batch (writebatch.py) is flushed before anything that sends a FIN, closes,
  resets or looks at the transport's buffer, so the wire order is that of writing at once.
- Whose FIN came first is read from the kernel: TCP_INFO's state read back to back with our
  shutdown(SHUT_WR) (CLOSE_WAIT: theirs was in), or at their FIN if ours waited behind unsent
  bytes (CLOSE_WAIT/LAST_ACK: theirs came first).
- Bytes: counted as written and read while open; when the leg is lost they are replaced by
  what the kernel says left (tcpi_bytes_sent less retransmissions; before Linux 4.19, what
  the peer acknowledged) and arrived (tcpi_bytes_received), read in connection_lost (the
  transports still hold the socket open then, under asyncio and uvloop alike). So a reset
  leg does not claim what sat unsent in its buffers.
- A refusal by the kernel (a reset landing between our TCP_INFO read and our shutdown) ends
  the leg as a reset; nothing raises out of here into a protocol callback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

from balancer.facts.record import BALANCER, PEER, LegTeardown
from balancer.net import tcpinfo
from balancer.net.tls import TLSSession
from balancer.net.writebatch import WriteBatch

_LINGER_RST: Final = struct.pack("ii", 1, 0)
# After the peer's FIN, if our last bytes are still unacknowledged, wait this many of the
# leg's round trips before closing: a peer that closed its socket answers them with an RST,
# which the record should show rather than our close hide.
UNACKED_WAIT_RTTS: Final = 4
UNACKED_WAIT_MIN_SECONDS: Final = 0.001
# What a lost transport's error says when the peer reset the leg. A tuple kept here: `A | B`
# in isinstance() builds a union object at each call.
_RESET_BY_PEER: Final = (ConnectionResetError, BrokenPipeError)


class Leg:
    """One TCP connection side (see the module docstring). `facts` is the record it fills."""

    __slots__ = (
        "clock",
        "counted",
        "facts",
        "kernel",
        "paused_for",
        "reading_to_end",
        "sock",
        "tls",
        "transport",
        "watched",
        "writes",
    )

    def __init__(self, facts: LegTeardown, writes: WriteBatch, clock: Callable[[], float]) -> None:
        self.facts = facts
        self.writes = writes
        self.clock = clock
        self.transport: Any = None
        self.sock: Any = None
        self.kernel: Any = None  # our socket object on the descriptor (see `_kernel`)
        self.tls: TLSSession | None = None  # the client leg of a TLS listener
        self.counted = False  # the kernel's final counts are in `facts` (see _final_counts)
        self.paused_for: tuple[str, ...] = ()  # why reading is paused (a tuple: () is free)
        self.reading_to_end = False  # ending: read all that comes, whatever the reasons
        self.watched: tuple[Any, int] | None = None  # (loop, dup'd fd) while awaiting bytes

    def attach(self, transport: Any, sock: Any = None) -> None:
        self.transport = transport
        self.sock = sock if sock is not None else transport.get_extra_info("socket")

    def _kernel(self) -> Any:
        """A socket object of our own on the transport's descriptor (tcpinfo.borrow), made
        once and kept for the leg's life (48 bytes, not tracked by the GC): every call on the
        transport's own builds one anew, and so would borrowing again, at a getsockname each
        (about 3 µs a syscall on these machines). None once the transport has closed the
        descriptor; detached when the leg is lost."""
        sock = self.sock
        if sock is None or sock.fileno() < 0:
            return None
        kernel = self.kernel
        if kernel is None:
            try:
                kernel = self.kernel = tcpinfo.borrow(sock)
            except (OSError, ValueError):
                return None
        return kernel

    def tcp_info(self) -> tcpinfo.TCPInfo | None:
        """TCP_INFO now (None where the platform cannot say, or the descriptor is closed)."""
        kernel = self._kernel()
        return tcpinfo.info(kernel) if kernel is not None else None

    @property
    def usable(self) -> bool:
        """Attached and not yet lost: a transport to write to or close."""
        return self.transport is not None and self.facts.closed_at is None

    # ---- reading, paused for reasons -------------------------------------------------------

    def pause(self, why: str) -> None:
        """Stop reading for `why`; reading resumes when no reason is left."""
        if not self.paused_for and self.usable and not self.reading_to_end:
            self.transport.pause_reading()
        if why not in self.paused_for:
            self.paused_for += (why,)

    def resume(self, why: str) -> None:
        if why in self.paused_for:
            self.paused_for = tuple(reason for reason in self.paused_for if reason != why)
            if not self.paused_for and self.usable and not self.reading_to_end:
                self.transport.resume_reading()

    def reassert_pause(self) -> None:
        """Pause again if paused: uvloop starts reading after connection_made returns,
        whatever it was told there."""
        if self.paused_for and self.usable and not self.reading_to_end:
            self.transport.pause_reading()

    def read_to_end(self) -> None:
        """The leg is ending: read on whatever the reasons, to see the peer's FIN (and its
        close_notify) rather than leave it unread."""
        self.reading_to_end = True
        if self.usable:
            self.transport.resume_reading()

    # ---- when the first bytes arrived ------------------------------------------------------

    def stamp_first_bytes(
        self, loop: Any, wall_clock: Callable[[], float], stamped: Callable[[float], None]
    ) -> None:
        """Report (on the leg's clock) when the connection's first bytes reached the kernel,
        from the packet's receive timestamp (SO_TIMESTAMPNS, peeked so the bytes stay), not
        when they are read. If none is queued yet, watch a duplicate descriptor while reading
        is paused, so the transport reads only after the peek. Without a stamp, nothing is
        reported: the caller's own reading time stands in."""
        if self._peek_stamp(wall_clock, stamped):
            return
        try:
            watched = os.dup(self.sock.fileno())
            loop.add_reader(watched, self._first_bytes_in, wall_clock, stamped)
        except (OSError, RuntimeError, AttributeError):
            return
        self.watched = (loop, watched)
        self.pause("stamp")

    def _first_bytes_in(
        self, wall_clock: Callable[[], float], stamped: Callable[[float], None]
    ) -> None:
        self._peek_stamp(wall_clock, stamped)
        self.stop_stamping()

    def _peek_stamp(
        self, wall_clock: Callable[[], float], stamped: Callable[[float], None]
    ) -> bool:
        # Through the leg's own socket object (one borrow a leg): the watched duplicate is
        # only for the loop to watch, the same socket underneath.
        kernel = self._kernel()
        arrival = None if kernel is None else tcpinfo.first_byte_arrival(kernel)
        if arrival is None:
            return False
        stamped(self.clock() - (wall_clock() - arrival))
        return True

    def stop_stamping(self) -> None:
        """Stop watching for the first bytes (they were read, or the leg is ending)."""
        watched, self.watched = self.watched, None
        if watched is not None:
            loop, fd = watched
            loop.remove_reader(fd)
            os.close(fd)
            self.resume("stamp")

    # ---- writing ---------------------------------------------------------------------------

    def received(self, size: int) -> None:
        """`size` bytes arrived (counted as read; the kernel's count replaces it at close)."""
        self.facts.bytes_in += size

    def write(self, data: bytes) -> None:
        """Queue bytes for the end of the loop's round (see writebatch)."""
        self.facts.bytes_out += len(data)
        self.writes.write(self.transport, data)

    def write_now(self, data: bytes) -> None:
        """Write at once, after whatever is queued: a handshake flight leaves when the record
        says it did."""
        self.facts.bytes_out += len(data)
        self.writes.flush()
        self.transport.write(data)

    def buffered(self) -> bool:
        self.writes.flush()
        return bool(self.transport.get_write_buffer_size())

    # ---- what the peer did -----------------------------------------------------------------

    def peer_fin(self) -> None:
        """The peer's FIN has been read on this leg."""
        facts = self.facts
        if facts.peer_fin_at is None:
            facts.peer_fin_at = self.clock()
        if facts.initiator is None:
            facts.initiator = PEER
        if facts.first_fin is None:
            facts.first_fin = PEER
            if facts.fin_sent:
                # Ours waited behind unsent bytes. CLOSE_WAIT or LAST_ACK: theirs came before
                # ours left; otherwise ours had left (Linux shows CLOSE either way once ours
                # is acknowledged: then we take ours, sent as the bytes drained, as first).
                info = self.tcp_info()
                if info is None or info.state not in tcpinfo.PEER_WAS_FIRST:
                    facts.first_fin = BALANCER

    def peer_close_notify(self) -> None:
        """The peer's TLS close_notify: it will send no more, though its FIN may not be in."""
        facts = self.facts
        facts.close_notify_received = True
        if facts.initiator is None:
            facts.initiator = PEER

    def tls_established(self) -> None:
        """The side speaks TLS now: whether each close_notify was sent is a fact from here on
        (false until one is), where a plain connection has none (None)."""
        self.facts.close_notify_received = self.facts.close_notify_sent = False

    def close_notify_seen(self) -> None:
        """The peer's close_notify, found by the TLS session after the fact (read while we
        were closing, or before its FIN): noted, and no claim about who began the close."""
        self.facts.close_notify_received = True

    def peer_reset(self) -> None:
        self.facts.rst_received = True
        if self.facts.initiator is None:
            self.facts.initiator = PEER

    # ---- ending it -------------------------------------------------------------------------

    def close_notify(self) -> None:
        """Our TLS close_notify (also in reply to the peer's, which bidirectional shutdowns such
        as OpenSSL's wait for), unless the peer's FIN is in: it may have closed its socket
        (curl does, right after its close_notify), and a reply would only draw an RST."""
        tls = self.tls
        if tls is None or not tls.established or tls.close_notify_sent:
            return
        if self.facts.peer_fin_at is not None:
            return
        info = self.tcp_info()
        if info is not None and info.state == tcpinfo.CLOSE_WAIT:
            return
        notify = tls.close()
        if notify:
            self.facts.close_notify_sent = True
            self.write(notify)

    def shutdown(self) -> bool:
        """Send our FIN. Closes at once if the peer's FIN is in already; otherwise half-closes
        and returns True: the leg lingers until the peer's FIN (or the owner's deadline)."""
        facts, transport = self.facts, self.transport
        self.writes.flush()  # our FIN goes after every byte queued for this leg
        if facts.initiator is None:
            facts.initiator = BALANCER
        if facts.fin_sent:
            if facts.peer_fin_at is not None:
                transport.close()
            return facts.peer_fin_at is None
        info = self.tcp_info()
        if info is not None:
            facts.retransmits = info.total_retrans
        buffered = bool(transport.get_write_buffer_size())
        if facts.peer_fin_at is not None and info is not None and info.state == tcpinfo.CLOSE:
            # Its FIN, then its RST (not CLOSE_WAIT): bytes relayed after its FIN reached a
            # socket it had closed (a tcp-mode server that hung up). No FIN can leave.
            self.peer_reset()
            transport.close()
            return False
        if facts.peer_fin_at is None and not buffered and transport.can_write_eof():
            # Nothing left to send: read the state and send our FIN back to back, so whose
            # FIN came first is exact (write_eof() would send it a loop iteration later).
            if info is not None and info.state == tcpinfo.CLOSE:
                # CLOSE before we sent a FIN: the peer reset the connection (our last bytes
                # reached a socket it had closed). No FIN can leave; the reset is the fact,
                # even if a FIN it sent before is still queued for us to read.
                self.peer_reset()
                return True
            facts.fin_sent = True
            if facts.first_fin is None and info is not None:
                facts.first_fin = PEER if info.state == tcpinfo.CLOSE_WAIT else BALANCER
            facts.fin_sent_at = self.clock()
            kernel = self._kernel()
            if not (kernel is not None and tcpinfo.shutdown_write(kernel)) and not _write_eof(
                transport
            ):
                # The peer's RST landed between the TCP_INFO read and our shutdown: no FIN
                # left. (asyncio's write_eof() raises ENOTCONN here; raised out of a protocol
                # callback it closed the *other* leg and left this one lingering for ever.)
                facts.fin_sent, facts.fin_sent_at, facts.first_fin = False, None, None
                self.peer_reset()
                transport.abort()
                return False
            return True
        facts.fin_sent = True
        if facts.peer_fin_at is not None or not transport.can_write_eof():
            facts.fin_sent_at = self.clock()
            if info is not None and not buffered:
                self._final_counts(info)
            transport.close()
            return False
        # Our FIN follows the unsent bytes; judged at the peer's FIN. asyncio shuts down now
        # when its buffer is empty (the batch's bytes went straight out) and may meet a reset.
        if not _write_eof(transport):
            self.peer_reset()
            transport.abort()
            return False
        return True

    def peer_fin_while_closing(
        self, call_later: Callable[[float, Callable[[], None]], Any]
    ) -> None:
        """The peer's FIN arrived while we are ending the leg: the FIN we lingered for, or the
        peer closing first as it said it would. Send ours if we have not, then close; if our
        last bytes are still in flight to a peer that may have closed its socket, wait a few
        round trips, so an RST they draw is seen, not hidden by our close."""
        self.writes.flush()
        self.peer_fin()
        if not self.facts.fin_sent:
            self.shutdown()  # closes: the peer's FIN is in
            return
        info = self.tcp_info()
        if info is not None and info.unacked:
            wait = max(UNACKED_WAIT_MIN_SECONDS, UNACKED_WAIT_RTTS * info.rtt_seconds)
            call_later(wait, self.transport.close)
        else:
            if info is not None and not self.transport.get_write_buffer_size():
                self._final_counts(info)
            self.transport.close()

    def reset(self) -> None:
        """End the leg with an RST (SO_LINGER 0), after what was relayed reaches the socket."""
        facts = self.facts
        if facts.initiator is None:
            facts.initiator = BALANCER
        facts.rst_sent = True
        self.writes.flush()
        _set_reset(self._kernel())
        self.transport.abort()

    def linger_over(self) -> None:
        """The peer did not answer our FIN in time: close (RST if bytes are still unsent, since
        they never will be)."""
        if self.buffered():
            self.facts.rst_sent = True
            _set_reset(self._kernel())
            self.transport.abort()
        else:
            self.transport.close()

    def lost(self, exc: Exception | None) -> bool:
        """The transport is gone (connection_lost). Takes the kernel's last facts; returns True
        when the peer reset the leg (an RST we did not send)."""
        facts = self.facts
        facts.closed_at = self.clock()
        if facts.first_fin is None and facts.fin_sent:
            facts.first_fin = BALANCER  # ours went; theirs never came (linger over, or an RST)
        if not self.counted:
            info = self.tcp_info()
            if info is not None:
                self._final_counts(info)
        self.give_back()
        reset = isinstance(exc, _RESET_BY_PEER) and not facts.rst_sent
        if reset:
            self.peer_reset()
        return reset

    def give_back(self) -> None:
        """Detach our socket object: the descriptor is the transport's to close (and its
        number soon another connection's)."""
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            kernel.detach()

    def _final_counts(self, info: tcpinfo.TCPInfo) -> None:
        """Bytes and retransmissions as the kernel counted them. Final once the peer's FIN is
        in and every byte of ours is acknowledged (then read as we close, which saves
        connection_lost a TCP_INFO read); otherwise connection_lost reads them again."""
        facts = self.facts
        facts.retransmits = info.total_retrans
        if info.bytes_sent is not None:
            facts.bytes_out = info.bytes_sent
        elif info.bytes_acked is not None:
            # An acknowledged FIN of ours takes a sequence number: never more than written.
            facts.bytes_out = min(info.bytes_acked, facts.bytes_out)
        if info.bytes_received is not None:
            # The peer's FIN takes a sequence number too.
            peer_fin = facts.peer_fin_at is not None or info.state in tcpinfo.PEER_FIN_IN
            facts.bytes_in = max(0, info.bytes_received - (1 if peer_fin else 0))
        self.counted = info.unacked == 0 and facts.peer_fin_at is not None


def _write_eof(transport: Any) -> bool:
    """transport.write_eof(); False if the connection was reset under it (ENOTCONN)."""
    try:
        transport.write_eof()
    except OSError:
        return False
    return True


def _set_reset(sock: Any) -> None:
    """Make the next close send RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
