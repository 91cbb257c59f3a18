"""Balancing policies and the pool: exact sequences, no sockets."""

from __future__ import annotations

from collections import Counter

import pytest

from balancer.backend.policies import POLICIES, ConsistentHash, LeastConnections, RoundRobin
from balancer.backend.pool import DRAINING, BackendPool, BackendTable, PeerCounts
from balancer.backend.state import Backend, BackendState


def states(*spec: tuple[str, int]) -> list[BackendState]:
    return [
        BackendState(Backend(name, "127.0.0.1", 8000 + i, weight))
        for i, (name, weight) in enumerate(spec)
    ]


def picks(policy, candidates, count: int) -> str:
    return "".join(policy.pick(candidates).name for _ in range(count))


def test_every_policy_the_config_accepts_has_a_class() -> None:
    """config/schema.py validates policy names without importing the policies (it sits below them):
    the two lists are one."""
    from balancer.config.schema import POLICY_NAMES

    assert tuple(POLICIES) == POLICY_NAMES


def test_round_robin_equal_weights_take_turns() -> None:
    assert picks(RoundRobin(), states(("a", 1), ("b", 1), ("c", 1)), 7) == "abcabca"


def test_round_robin_is_smooth_with_weights() -> None:
    # nginx's smooth weighted round robin: 5,1,1 interleaves instead of bursting.
    assert picks(RoundRobin(), states(("a", 5), ("b", 1), ("c", 1)), 7) == "aabacaa"
    assert picks(RoundRobin(), states(("a", 3), ("b", 1)), 8) == "aabaaaba"


def test_round_robin_skips_backends_that_leave_the_candidates() -> None:
    policy = RoundRobin()
    a, b, c = states(("a", 1), ("b", 1), ("c", 1))
    assert picks(policy, [a, b, c], 2) == "ab"
    assert {policy.pick([a, c]).name for _ in range(4)} == {"a", "c"}


def test_policies_return_none_without_candidates() -> None:
    for make in POLICIES.values():
        assert make().pick([]) is None


def test_least_connections_picks_the_least_loaded() -> None:
    a, b, c = states(("a", 1), ("b", 1), ("c", 1))
    a.active, b.active, c.active = 3, 1, 2
    assert LeastConnections().pick([a, b, c]) is b


def test_least_connections_ties_are_taken_in_turn() -> None:
    policy = LeastConnections()
    assert picks(policy, states(("a", 1), ("b", 1), ("c", 1)), 6) == "abcabc"


def test_least_connections_divides_by_weight() -> None:
    a, b = states(("a", 3), ("b", 1))
    a.active, b.active = 2, 1  # 2/3 < 1/1
    assert LeastConnections().pick([a, b]) is a
    a.active = 3  # 3/3 == 1/1: a tie, broken by weight (smooth weighted round robin)
    assert picks(LeastConnections(), [a, b], 4) == "aaba"


def test_least_connections_with_weights_1_and_2_splits_sequential_requests_1_to_2() -> None:
    """nginx's least_conn: one request at a time ties every pick; the tie goes by weight."""
    policy = LeastConnections()
    light, heavy = states(("light", 1), ("heavy", 2))
    names = picks(policy, [light, heavy], 30)
    assert (names.count("light"), names.count("heavy")) == (10, 20)


def test_least_connections_under_load_holds_active_in_proportion_to_weight() -> None:
    pool = BackendPool(
        [s.backend for s in states(("light", 1), ("heavy", 2))], LeastConnections(), 10
    )
    leases = [pool.acquire(now=0) for _ in range(30)]
    light, heavy = pool.states
    assert (light.active, heavy.active) == (10, 20)
    for lease in leases[::3]:
        lease.release()
    assert light.active * 2 - heavy.active in (-2, -1, 0, 1, 2)


def test_least_connections_through_the_pool_counts_and_spreads() -> None:
    pool = BackendPool([s.backend for s in states(("a", 1), ("b", 1))], LeastConnections(), 10)
    first = pool.acquire(now=0)
    second = pool.acquire(now=0)
    assert {first.state.name, second.state.name} == {"a", "b"}
    first.release()
    third = pool.acquire(now=0)
    assert third.state is first.state  # the freed one has fewest


def two_workers(count: int = 3) -> tuple[BackendPool, BackendPool, memoryview]:
    """Two workers' pools over one shared table, as the supervisor maps it."""
    table = memoryview(bytearray(8 * 2 * count)).cast("q")
    backends = [s.backend for s in states(*((f"b{i}", 1) for i in range(count)))]
    pools = [
        BackendPool(backends, LeastConnections(), 10, PeerCounts(table, 2, count, me))
        for me in (0, 1)
    ]
    return pools[0], pools[1], table


def test_least_connections_sees_every_workers_leases() -> None:
    """Connections held through worker A: worker B sends new ones to the other backends."""
    a, b, table = two_workers()
    held = [a.acquire(now=0), a.acquire(now=0)]
    assert {lease.state.name for lease in held} == {"b0", "b1"}
    assert list(table) == [1, 1, 0, 0, 0, 0]  # A's row: written by A alone
    assert b.acquire(now=0).state.name == "b2"  # B alone would have picked b0
    assert b.acquire(now=0).state.name in {"b0", "b1"}
    for lease in held:
        lease.release()
    assert list(table)[:3] == [0, 0, 0]


def test_a_gone_workers_leases_are_forgotten() -> None:
    a, b, table = two_workers()
    for _ in range(3):
        a.acquire(now=0)  # one on each backend, never released: A is killed
    PeerCounts(table, 2, 3, 1).forget(0)  # the supervisor, reaping A
    assert list(table) == [0] * 6
    assert {b.acquire(now=0).state.name for _ in range(3)} == {"b0", "b1", "b2"}


def test_a_table_too_small_for_its_workers_is_refused() -> None:
    with pytest.raises(ValueError):
        PeerCounts(memoryview(bytearray(8 * 3)).cast("q"), 2, 3, 0)


def test_lease_release_is_idempotent() -> None:
    pool = BackendPool([Backend("a", "127.0.0.1", 1)], RoundRobin(), 10)
    lease = pool.acquire(now=0)
    assert pool.states[0].active == 1
    lease.release()
    lease.release()
    assert pool.states[0].active == 0
    assert pool.states[0].connections_total == 1


def test_pool_excludes_tried_backends_and_marks_failures_down() -> None:
    pool = BackendPool(
        [Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)], RoundRobin(), 10
    )
    lease = pool.acquire(now=100)
    assert lease.state.name == "a"
    pool.connect_failed(lease, now=100)
    assert pool.states[0].active == 0 and pool.states[0].connect_failures_total == 1
    retry = pool.acquire(now=100, exclude=[lease.state])
    assert retry.state.name == "b"
    # While a is down, new connections skip it ...
    assert {pool.acquire(now=105).state.name for _ in range(3)} == {"b"}
    # ... until the down time is over.
    assert {pool.acquire(now=111).state.name for _ in range(2)} == {"a", "b"}


def test_pool_tries_marked_backends_when_all_are_marked() -> None:
    pool = BackendPool([Backend("a", "127.0.0.1", 1)], RoundRobin(), 10)
    pool.connect_failed(pool.acquire(now=0), now=0)
    assert pool.acquire(now=1).state.name == "a"


def test_pool_returns_none_when_nothing_is_ready() -> None:
    pool = BackendPool([Backend("a", "127.0.0.1", 1)], RoundRobin(), 10)
    pool.states[0].ready = False
    assert pool.acquire(now=0) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_only_picks_candidates(name: str) -> None:
    candidates = states(("a", 2), ("b", 1), ("c", 3))
    policy = POLICIES[name]()
    for _ in range(50):
        assert policy.pick(candidates) in candidates


def test_a_backend_connects_to_its_host_unless_given_resolved_addresses() -> None:
    assert Backend("a", "127.0.0.1", 1).connect_hosts == ("127.0.0.1",)
    named = Backend("b", "localhost", 2, connect_hosts=("::1", "127.0.0.1"))
    assert named.connect_hosts == ("::1", "127.0.0.1") and named.address == "localhost:2"


def test_passive_failures_in_a_row_eject_and_ejections_double_until_a_success() -> None:
    pool = BackendPool([s.backend for s in states(("a", 1), ("b", 1))], RoundRobin(), 10,
                       fall=2, max_down_seconds=35)  # fmt: skip
    a = pool.states[0]
    pool.failed(a, now=0)
    pool.succeeded(a)  # a success between: the streak starts over
    pool.failed(a, now=1)
    assert a.down_until == 0.0
    pool.failed(a, now=2)
    assert a.down_until == 12  # ejected: down_seconds
    for now, until in ((20, 40), (50, 85), (90, 125)):  # failing again as it comes back
        pool.failed(a, now)
        pool.failed(a, now)
        assert a.down_until == until  # 20 s, 35 s (the cap), 35 s
    pool.succeeded(a)
    pool.failed(a, 200)
    pool.failed(a, 200)
    assert a.down_until == 210  # a success ended the doubling
    assert {pool.acquire(now=205).state.name for _ in range(3)} == {"b"}


def test_a_refused_connect_ejects_at_once() -> None:
    pool = BackendPool([s.backend for s in states(("a", 1), ("b", 1))], RoundRobin(), 10)
    lease = pool.acquire(now=0)
    pool.connect_failed(lease, now=0)
    assert lease.state.down_until == 10 and lease.state.active == 0


def test_slow_start_ramps_a_returning_backends_share() -> None:
    pool = BackendPool([s.backend for s in states(("a", 1), ("b", 1))], RoundRobin(), 10,
                       slow_start_seconds=10)  # fmt: skip
    b = pool.states[1]
    b.back_at = 100.0  # back in service at 100 s (an ejection over, or checks up)
    picks = Counter(pool.acquire(now=101).state.name for _ in range(70))
    assert picks == {"a": 64, "b": 6}  # a tenth of its weight (scaled by 64) after a tenth
    picks = Counter(pool.acquire(now=110).state.name for _ in range(100))
    assert picks == {"a": 50, "b": 50}


def test_a_backup_is_picked_only_while_no_other_backend_is_up() -> None:
    primary = Backend("a", "127.0.0.1", 1)
    backup = Backend("spare", "127.0.0.1", 2, backup=True)
    pool = BackendPool([primary, backup], RoundRobin(), 10)
    assert {pool.acquire(now=0).state.name for _ in range(4)} == {"a"}
    a = pool.states[0]
    a.down_until = 5.0  # ejected (a refused connect, or failed requests)
    assert {pool.acquire(now=1).state.name for _ in range(4)} == {"spare"}
    assert pool.acquire(now=1, exclude=[pool.states[1]]).state.name == "a"  # all else tried
    a.ready = False  # down by the checks, or drained: the backup carries on
    assert pool.acquire(now=6).state.name == "spare"
    a.ready = True
    assert pool.acquire(now=6).state.name == "a"  # back: the backup rests again


def test_a_failed_connect_is_a_failure_not_a_connection() -> None:
    pool = BackendPool([Backend("a", "127.0.0.1", 1)], RoundRobin(), 10)
    pool.connect_failed(pool.acquire(now=0), now=0)
    state = pool.states[0]
    assert (state.connections_total, state.connect_failures_total) == (0, 1)


class CountingTable(BackendTable):
    __slots__ = ()
    reads = 0

    def up(self, index: int) -> bool:
        CountingTable.reads += 1
        return super().up(index)


@pytest.mark.incompatible_with_mypyc  # CountingTable subclasses the (compiled) BackendTable
def test_the_pool_reads_the_backend_table_again_only_when_it_changed() -> None:
    """Every pick on every connection: the shared table is read whole only after a write."""
    backends = [s.backend for s in states(("a", 1), ("b", 1))]
    table = CountingTable(memoryview(bytearray(BackendTable.bytes_for(2))).cast("I"), backends)
    pool = BackendPool(backends, RoundRobin(), 10, table=table)
    CountingTable.reads = 0
    pool.acquire(now=0)
    pool.acquire(now=0)
    assert CountingTable.reads == 2  # the first pick read both backends; the second, nothing
    table.set(1, admin=DRAINING)  # the supervisor's write (from another process as well)
    assert {pool.acquire(now=0).state.name for _ in range(3)} == {"a"}
    assert CountingTable.reads == 4


# ---- policy "hash": a ketama ring ------------------------------------------------------------

KEYS = [f"client-{i}".encode() for i in range(20000)]


def ring(backends: list[BackendState], factor: float = 0.0) -> ConsistentHash:
    policy = ConsistentHash(factor)
    policy.build([(state.name, state.weight) for state in backends])
    return policy


def mapping(policy: ConsistentHash, candidates: list[BackendState]) -> dict[bytes, str]:
    found = {}
    for key in KEYS:
        state = policy.pick(candidates, key)
        assert state is not None
        found[key] = state.name
    return found


def test_removing_one_of_n_backends_moves_its_keys_and_no_others() -> None:
    backends = states(*((f"web{i}", 1) for i in range(10)))
    before = mapping(ring(backends), backends)
    smaller = [state for state in backends if state.name != "web3"]
    after = mapping(ring(smaller), smaller)  # the ring rebuilt without it (a reload)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[key] == "web3" for key in moved)  # only the removed backend's keys
    assert 0.07 < len(moved) / len(KEYS) < 0.13  # about 1/N
    share = Counter(before.values())
    assert all(0.07 < share[name] / len(KEYS) < 0.13 for name in share)  # spread evenly


def test_two_instances_with_the_same_backends_map_every_key_alike() -> None:
    first, second = states(("a", 1), ("b", 2), ("c", 1)), states(("c", 1), ("a", 1), ("b", 2))
    assert mapping(ring(first), first) == mapping(ring(second), second)  # order aside
    share = Counter(mapping(ring(first), first).values())
    assert 1.7 < share["b"] / share["a"] < 2.3  # weight 2: about twice the keys


def test_a_down_backends_keys_go_to_their_next_choice_and_come_back() -> None:
    backends = states(*((f"web{i}", 1) for i in range(5)))
    policy = ring(backends)  # the ring keeps every member; the candidates are who is up
    before = mapping(policy, backends)
    up = [state for state in backends if state.name != "web1"]
    during = mapping(policy, up)
    assert all(during[key] == before[key] for key in KEYS if before[key] != "web1")
    assert {during[key] for key in KEYS if before[key] == "web1"} <= {s.name for s in up}
    assert mapping(policy, backends) == before  # back: every key where it was


def test_bounded_loads_pass_a_full_backend_over_and_no_key_means_round_robin() -> None:
    backends = states(("a", 1), ("b", 1), ("c", 1))
    policy = ring(backends, factor=1.25)
    hot = KEYS[0]
    first = policy.pick(backends, hot)
    assert first is not None
    first.active = 5  # the hot key's backend is busy: 5 of 6 leases with this pick
    other = policy.pick(backends, hot)
    assert other is not None and other is not first  # ceil(1.25 * 6 / 3) = 3 <= 5
    assert ring(backends).pick(backends, hot) is first  # unbounded: affinity kept
    assert picks(policy, backends, 3) == "abc"  # no key: round robin's turns
