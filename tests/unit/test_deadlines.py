"""The deadline wheel: owners woken at or just after their time, never before; one timer."""

from __future__ import annotations

from balancer.net.deadlines import DeadlineWheel


def wheel() -> tuple[DeadlineWheel[str], list[float]]:
    armed: list[float] = []
    return DeadlineWheel(armed.append, resolution=0.01), armed


def test_owners_are_due_from_their_slot_on_and_not_before() -> None:
    w, armed = wheel()
    w.schedule("a", 1.003)
    w.schedule("b", 1.5)
    assert armed == [1.01]  # rounded up to the slot: never early
    assert w.pop_due(1.009) == []
    assert w.next_wake() == 1.01
    assert w.pop_due(1.01) == ["a"]
    assert w.next_wake() == 1.5 and len(w) == 1
    assert w.pop_due(2.0) == ["b"] and w.next_wake() is None and len(w) == 0


def test_the_timer_is_armed_again_only_for_an_earlier_slot() -> None:
    w, armed = wheel()
    w.schedule("a", 5.0)
    w.schedule("b", 7.0)  # later: the armed timer serves
    w.schedule("c", 2.0)  # earlier: arm again
    assert armed == [5.0, 2.0]


def test_rescheduling_moves_an_owner_and_discard_forgets_it() -> None:
    w, _ = wheel()
    w.schedule("a", 1.0)
    w.schedule("a", 3.0)
    w.schedule("b", 1.0)
    w.discard("b")
    assert w.pop_due(2.0) == []
    assert w.next_wake() == 3.0  # emptied slots are skipped
    assert w.pop_due(3.0) == ["a"]


def test_many_owners_in_one_slot_are_all_due_together() -> None:
    w, armed = wheel()
    for i in range(100):
        w.schedule(f"c{i}", 1.0 + i / 10_000)  # all within one 10 ms slot
    assert len(armed) == 1
    assert sorted(w.pop_due(1.01)) == sorted(f"c{i}" for i in range(100))


def test_every_deadline_kind_has_one_row_with_a_real_timeout() -> None:
    """session.DEADLINES is the one table of what a session waits for: each kind listener.py
    names has a row, each row's timeout is a [timeouts] key, resolved per listener."""
    from dataclasses import fields, replace

    from balancer.client import listener
    from balancer.client.session import DEADLINES, deadline_seconds
    from balancer.config.schema import Timeouts

    kinds = {listener.FIRST_BYTES, listener.TLS_HANDSHAKE, listener.HEADER, listener.RESPONSE}
    kinds |= {listener.IDLE, listener.TUNNEL_IDLE, listener.LINGER}
    assert set(DEADLINES) == kinds
    keys = {field.name for field in fields(Timeouts)}
    assert {deadline.timeout for deadline in DEADLINES.values()} <= keys
    timeouts = replace(Timeouts(), keepalive_idle_seconds=7.5, linger_seconds=0.25)
    resolved = deadline_seconds(timeouts)
    assert resolved[listener.IDLE] == 7.5 and resolved[listener.LINGER] == 0.25
    # Only lingering still acts once the session is closing (it closes what is left).
    assert [k for k, d in DEADLINES.items() if d.while_closing] == [listener.LINGER]
