"""Every teardown path of a Leg, over a fake transport and a fake kernel: no sockets.

The fake kernel answers TCP_INFO from a `FakeSocket`'s fields and records shutdown(); the fake
transport records what reaches it, in order, so the flush rule (queued bytes before our FIN)
and each path's calls can be read back exactly.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from balancer.facts.record import BALANCER, PEER, LegTeardown
from balancer.net import legs, tcpinfo
from balancer.net.legs import Leg
from balancer.net.writebatch import WriteBatch
from tests.fakes import ESTABLISHED, Clock, FakeSocket, FakeTransport


@pytest.fixture(autouse=True)
def counted_borrows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leg made here is given its FakeSocket as the kernel object it would borrow; a borrow
    after that (a second one) is counted, not made. A compiled build calls tcpinfo.borrow
    directly: the one test that counts borrows is marked for the pure build."""

    def borrow(sock: FakeSocket) -> FakeSocket:
        sock.borrows += 1
        return sock

    monkeypatch.setattr(legs.tcpinfo, "borrow", borrow)


def make_leg() -> tuple[Leg, FakeTransport, FakeSocket, WriteBatch, Clock]:
    sock = FakeSocket()
    transport = FakeTransport(sock)
    batch = WriteBatch(lambda callback: None)  # flushed only by the leg (or the test)
    clock = Clock()
    leg = Leg(LegTeardown(), batch, clock)
    leg.attach(transport, sock)
    leg.kernel = sock  # as borrowed: TCP_INFO, shutdown and SO_LINGER reach the fake kernel
    return leg, transport, sock, batch, clock


def test_balancer_closes_first_flushes_then_fins_and_lingers_for_the_peer() -> None:
    leg, _transport, sock, _, clock = make_leg()
    leg.write(b"tail")
    assert sock.log == []  # queued for the end of the round
    assert leg.shutdown() is True  # lingering
    assert sock.log == ["write tail", "shutdown"]  # the flush rule: bytes, then our FIN
    facts = leg.facts
    assert (facts.initiator, facts.first_fin, facts.fin_sent) == (BALANCER, BALANCER, True)
    assert facts.fin_sent_at == 100.0 and facts.retransmits == 0
    clock.now = 100.25
    calls: list[Any] = []
    leg.peer_fin_while_closing(lambda delay, callback: calls.append((delay, callback)))
    assert calls == [] and sock.log[-1] == "close"  # nothing unacked: closed at once
    assert facts.peer_fin_at == 100.25 and facts.initiator == BALANCER


def test_peer_fin_in_flight_as_we_shut_down_is_first_by_the_kernels_word() -> None:
    leg, _, sock, _, _ = make_leg()
    sock.state = tcpinfo.CLOSE_WAIT  # their FIN arrived, not yet read by us
    assert leg.shutdown() is True
    assert (leg.facts.initiator, leg.facts.first_fin) == (BALANCER, PEER)


def test_peer_closes_first_and_our_fin_then_closes_at_once() -> None:
    leg, _, sock, _, clock = make_leg()
    leg.peer_fin()
    clock.now = 100.5
    assert leg.shutdown() is False
    assert sock.log == ["close"]
    facts = leg.facts
    assert (facts.initiator, facts.first_fin, facts.fin_sent) == (PEER, PEER, True)
    assert facts.peer_fin_at == 100.0 and facts.fin_sent_at == 100.5


def test_a_reset_after_the_peers_fin_is_the_fact_and_no_fin_leaves() -> None:
    """A tcp-mode server hung up (its FIN); the client's last bytes, relayed after it, drew
    its RST: the socket is CLOSE, not CLOSE_WAIT, when we would send our FIN."""
    leg, _, sock, _, _ = make_leg()
    leg.peer_fin()
    sock.state = tcpinfo.CLOSE
    assert leg.shutdown() is False
    assert sock.log == ["close"]  # no shutdown(): nothing can leave a reset socket
    facts = leg.facts
    assert (facts.rst_received, facts.fin_sent, facts.kind) == (True, False, "rst")
    assert (facts.initiator, facts.first_fin) == (PEER, PEER)


def test_peer_closing_first_while_we_close_gets_our_fin_and_a_teardown() -> None:
    """The backend said it closes; its FIN arrives while the session is ending: our FIN
    goes then, so the leg has both FIN times and a retransmit count."""
    leg, _, sock, _, _clock = make_leg()
    sock.retransmits = 2
    leg.peer_fin_while_closing(lambda delay, callback: None)
    assert sock.log == ["close"]
    facts = leg.facts
    assert facts.fin_sent and facts.fin_sent_at == 100.0 and facts.retransmits == 2
    assert facts.first_fin == PEER


@pytest.mark.parametrize(
    ("state", "first"), [(tcpinfo.CLOSE_WAIT, PEER), (tcpinfo.CLOSE, BALANCER)]
)
def test_our_fin_behind_unsent_bytes_is_judged_at_the_peers_fin(state: int, first: str) -> None:
    leg, transport, sock, _, _ = make_leg()
    transport.buffer = 4096
    assert leg.shutdown() is True
    assert sock.log == ["write_eof"] and leg.facts.fin_sent and leg.facts.fin_sent_at is None
    sock.state = state
    leg.peer_fin()
    assert leg.facts.first_fin == first


def test_a_reset_before_our_fin_is_the_fact_and_no_fin_leaves() -> None:
    leg, _, sock, _, _ = make_leg()
    sock.state = tcpinfo.CLOSE
    assert leg.shutdown() is True
    assert sock.log == [] and not leg.facts.fin_sent
    assert leg.facts.rst_received and leg.facts.initiator == BALANCER


def test_a_reset_between_tcp_info_and_shutdown_ends_the_leg_without_raising() -> None:
    leg, transport, sock, _, _ = make_leg()
    sock.refuse_shutdown = True
    transport.eof_raises = True
    assert leg.shutdown() is False
    facts = leg.facts
    assert sock.log == ["abort"]
    assert facts.rst_received and not facts.fin_sent and facts.fin_sent_at is None
    assert facts.first_fin is None


def test_reset_flushes_what_was_relayed_then_sends_rst() -> None:
    leg, _, sock, _, _ = make_leg()
    leg.write(b"part")
    leg.reset()
    assert sock.log == ["write part", "abort"]
    assert sock.options and sock.options[-1][2] == legs._LINGER_RST
    assert leg.facts.rst_sent and leg.facts.initiator == BALANCER


@pytest.mark.parametrize(("buffered", "ending"), [(0, "close"), (10, "abort")])
def test_linger_over_closes_or_resets_unsent_bytes(buffered: int, ending: str) -> None:
    leg, transport, sock, _, _ = make_leg()
    transport.buffer = buffered
    leg.linger_over()
    assert sock.log == [ending]
    assert leg.facts.rst_sent is (buffered > 0)


def test_unacked_bytes_at_the_peers_fin_wait_a_few_round_trips_before_close() -> None:
    leg, _transport, sock, _, _ = make_leg()
    leg.shutdown()
    sock.unacked, sock.rtt_seconds = 3, 0.002
    calls: list[tuple[float, Any]] = []
    leg.peer_fin_while_closing(lambda delay, callback: calls.append((delay, callback)))
    ((delay, callback),) = calls
    assert delay == pytest.approx(legs.UNACKED_WAIT_RTTS * sock.rtt_seconds)
    assert "close" not in sock.log
    callback()
    assert sock.log[-1] == "close"


def test_lost_takes_what_left_by_the_kernels_count_not_what_was_queued() -> None:
    """A reset leg: 2 MB were handed to the transport, 131,072 left, 128,000 were acked."""
    leg, _, sock, _, _ = make_leg()
    leg.facts.bytes_out = 2_000_000
    sock.sent, sock.acked, sock.state = 131_072, 128_000, tcpinfo.CLOSE
    leg.lost(ConnectionResetError())
    assert leg.facts.bytes_out == 131_072


@pytest.mark.incompatible_with_mypyc  # counts calls of tcpinfo.borrow (monkeypatched)
def test_the_descriptor_is_borrowed_once_for_the_legs_life_and_given_back_when_lost() -> None:
    """The TCP_INFO reads and the shutdown of a leg, from its handshake to its end, go through
    one socket object of the leg's own (each new one costs a getsockname); it is detached,
    never closed, when the leg is lost."""
    leg, _, sock, _, _ = make_leg()
    leg.kernel = None  # not borrowed yet
    assert leg.tcp_info() is not None  # at accept: the handshake's RTT
    assert sock.borrows == 1 and sock.detached == 0
    leg.shutdown()
    leg.peer_fin_while_closing(lambda delay, callback: None)
    assert sock.borrows == 1 and sock.detached == 0
    leg.lost(None)
    assert sock.borrows == 1 and sock.detached == 1 and leg.kernel is None


def test_a_closed_descriptor_is_never_borrowed() -> None:
    """Once the transport closed the descriptor its number may be another connection's."""
    leg, _, sock, _, _ = make_leg()
    sock.closed = True
    assert leg.tcp_info() is None
    leg.lost(ConnectionResetError())
    assert sock.borrows == 0


def test_before_linux_4_19_lost_takes_what_the_peer_acknowledged() -> None:
    """A reset leg: 2 MB were handed to the transport, the peer acknowledged 128,000."""
    leg, _, sock, _, _ = make_leg()
    leg.facts.bytes_out = 2_000_000
    leg.facts.bytes_in = 75
    sock.acked, sock.received, sock.state = 128_000, 75, tcpinfo.CLOSE
    assert leg.lost(ConnectionResetError()) is True
    facts = leg.facts
    assert (facts.bytes_out, facts.bytes_in) == (128_000, 75)
    assert facts.rst_received and facts.initiator == PEER and facts.closed_at == 100.0


def test_lost_does_not_count_either_fin_as_a_byte() -> None:
    leg, _, sock, _, _ = make_leg()
    leg.facts.bytes_out, leg.facts.bytes_in = 500, 80
    leg.shutdown()
    leg.peer_fin()
    sock.acked, sock.received = 501, 81  # each FIN took a sequence number
    assert leg.lost(None) is False
    assert (leg.facts.bytes_out, leg.facts.bytes_in) == (500, 80)
    assert leg.facts.first_fin == BALANCER


def test_lost_after_our_rst_is_not_a_peer_reset_and_our_unanswered_fin_was_first() -> None:
    leg, _, _sock, _, _ = make_leg()
    leg.shutdown()
    assert leg.lost(None) is False and leg.facts.first_fin == BALANCER
    other, _, _, _, _ = make_leg()
    other.reset()
    assert other.lost(ConnectionResetError()) is False
    assert not other.facts.rst_received and other.facts.rst_sent


class FakeTLS:
    established = True
    close_notify_sent = False

    def close(self) -> bytes:
        self.close_notify_sent = True
        return b"alert"


@pytest.mark.incompatible_with_mypyc  # a FakeTLS where a compiled Leg takes a TLSSession only
@pytest.mark.parametrize(
    ("peer_fin", "state", "sent"),
    [(False, ESTABLISHED, True), (True, ESTABLISHED, False), (False, tcpinfo.CLOSE_WAIT, False)],
)
def test_close_notify_is_not_sent_to_a_peer_whose_fin_is_in(
    peer_fin: bool, state: int, sent: bool
) -> None:
    leg, _, sock, batch, _ = make_leg()
    leg.tls = FakeTLS()  # type: ignore[assignment]
    if peer_fin:
        leg.peer_fin()
    sock.state = state
    leg.close_notify()
    batch.flush()
    assert (sock.log == ["write alert"]) is sent
    assert bool(leg.facts.close_notify_sent) is sent


def test_fake_tls_stands_for_the_real_session_interface() -> None:
    from balancer.net.tls import TLSSession

    for name in ("established", "close_notify_sent", "close"):
        assert hasattr(TLSSession(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)), name)


def test_reading_pauses_for_reasons_and_resumes_when_none_is_left() -> None:
    leg, _, sock, _, _ = make_leg()
    leg.pause("connecting")
    leg.pause("upgrade")
    leg.pause("upgrade")
    leg.resume("connecting")
    assert sock.log == ["pause_reading"] and leg.paused_for == ("upgrade",)
    leg.resume("never_paused_for_this")
    leg.resume("upgrade")
    assert sock.log == ["pause_reading", "resume_reading"] and leg.paused_for == ()


def test_an_ending_leg_reads_to_the_end_whatever_the_reasons() -> None:
    leg, _, sock, _, _ = make_leg()
    leg.pause("error_pending")
    leg.read_to_end()
    leg.pause("backend_full")  # a reason still noted, but reading goes on
    leg.reassert_pause()
    assert sock.log == ["pause_reading", "resume_reading"]
