"""DNS discovery's pure parts: slots as answers change, the TTL's bounds, the table's member
cells, the pool reading them, the ring placing members by address, and the [dns] and
`discover` keys."""

from __future__ import annotations

from typing import Any

import pytest

from balancer.backend.discovery import JOIN, LEAVE, WEIGHT, Change, Member, Slots, next_delay
from balancer.backend.policies import ConsistentHash
from balancer.backend.pool import EMPTY, LEAVING, MEMBER, BackendPool, BackendTable
from balancer.backend.state import Backend
from balancer.config.dns import DnsConfig
from balancer.config.schema import ConfigError, parse_config

A, B, C, D, E = (Member(f"10.0.0.{n}", 80) for n in range(1, 6))


def test_members_fill_empty_slots_in_address_order_and_stay_put() -> None:
    slots = Slots(3)
    assert slots.apply([B, A], now=1.0) == [Change(0, JOIN, A), Change(1, JOIN, B)]
    assert slots.apply([A, B], now=2.0) == []  # the same answer: nothing moves
    assert slots.apply([C, B, A], now=3.0) == [Change(2, JOIN, C)]
    assert slots.members == [A, B, C] and slots.serving() == 3


def test_a_member_dns_no_longer_names_leaves_and_its_slot_waits() -> None:
    slots = Slots(3)
    slots.apply([A, B], now=1.0)
    assert slots.apply([B], now=2.0) == [Change(0, LEAVE, A)]
    assert slots.apply([B], now=3.0) == []  # leaving once, not at every answer
    assert slots.leaving == [2.0, None, None] and slots.serving() == 1
    # A new member takes an empty slot before a leaving one: the leaver's connections finish.
    assert slots.apply([B, C], now=4.0) == [Change(2, JOIN, C)]
    # Named again: back in its own slot, as a join (checked again first).
    assert slots.apply([A, B, C], now=5.0) == [Change(0, JOIN, A)]


def test_with_no_empty_slot_the_longest_leaving_slot_is_reused_then_none() -> None:
    slots = Slots(2)
    slots.apply([A, B], now=1.0)
    slots.apply([B], now=2.0)  # A leaving since 2
    slots.apply([], now=3.0)  # B leaving since 3
    assert slots.apply([C], now=4.0) == [Change(0, JOIN, C)]  # A's slot: leaving longest
    assert slots.apply([C, D, E], now=5.0) == [Change(1, JOIN, D)]
    assert slots.dropped == 1  # E found no slot: counted, not placed


def test_a_weight_change_keeps_the_slot() -> None:
    slots = Slots(2)
    slots.apply([Member("10.0.0.1", 80, 1)], now=1.0)
    assert slots.apply([Member("10.0.0.1", 80, 5)], now=2.0) == [
        Change(0, WEIGHT, Member("10.0.0.1", 80, 5))
    ]
    # Another port on the same address is another member.
    assert slots.apply([Member("10.0.0.1", 80, 5), Member("10.0.0.1", 81)], now=3.0) == [
        Change(1, JOIN, Member("10.0.0.1", 81))
    ]


def test_the_ttl_is_kept_within_the_bounds() -> None:
    dns = DnsConfig(ttl_min_seconds=2.0, ttl_max_seconds=30.0)
    assert next_delay(0.0, dns) == 2.0
    assert next_delay(10.0, dns) == 10.0
    assert next_delay(86400.0, dns) == 30.0


def slot_backends(count: int) -> list[Backend]:
    return [Backend(f"web-{n}", "0.0.0.0", 0, slot=True, group="web") for n in range(1, count + 1)]


def test_the_table_holds_a_slots_member_ipv4_and_ipv6() -> None:
    table = BackendTable.of(slot_backends(2))
    assert table.member(0) == EMPTY and table.address(0) is None and table.state(0) == "empty"
    version = table.version
    table.set_member(0, MEMBER, ("10.1.2.3", 8080), weight=3, up=True)
    table.set_member(1, MEMBER, ("2001:db8::7", 443), up=False)
    assert table.version == version + 4 and table.version % 2 == 0  # (odd while writing)
    assert table.address(0) == ("10.1.2.3", 8080) and table.weight(0) == 3
    assert table.address(1) == ("2001:db8::7", 443) and table.state(1) == "down"
    table.set_member(0, LEAVING)
    assert table.state(0) == "draining" and table.draining(0)
    assert table.address(0) == ("10.1.2.3", 8080)  # (its connections still name it)


def picked(pool: BackendPool) -> set[str]:
    """The members 50 keys go to."""
    addresses = set()
    for n in range(50):
        lease = pool.acquire(0.0, key=f"k{n}".encode())
        assert lease is not None
        addresses.add(lease.state.backend.address)
    return addresses


def test_a_pool_serves_only_members_and_follows_a_slots_new_member() -> None:
    backends = slot_backends(3)
    table = BackendTable.of(backends)
    pool = BackendPool(backends, ConsistentHash(), 1.0, table=table)
    assert pool.acquire(0.0) is None  # all empty: nothing to pick
    table.set_member(0, MEMBER, ("10.0.0.1", 80), up=True)
    table.set_member(1, MEMBER, ("10.0.0.2", 80), up=True)
    table.set_member(2, MEMBER, ("10.0.0.3", 80), up=True)
    table.set_member(2, LEAVING)
    assert picked(pool) == {"10.0.0.1:80", "10.0.0.2:80"}
    table.set_member(2, MEMBER, ("10.0.0.9", 81), up=True)  # the slot reused by another
    assert picked(pool) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:81"}


def test_two_balancers_hash_keys_alike_whatever_slots_their_members_took() -> None:
    """The ring places a discovered member by its address, not its slot: two instances
    that saw members arrive in other orders still agree on every key."""
    members = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)]
    pools = []
    for order in (members, list(reversed(members))):
        backends = slot_backends(4)
        table = BackendTable.of(backends)
        for slot, address in enumerate(order):
            table.set_member(slot, MEMBER, address, up=True)
        pools.append(BackendPool(backends, ConsistentHash(), 1.0, table=table))

    def owner(pool: BackendPool, key: bytes) -> str:
        lease = pool.acquire(0.0, key=key)
        assert lease is not None
        lease.release()
        return lease.state.backend.address

    keys = [f"user-{n}".encode() for n in range(500)]
    first, second = ([owner(pool, key) for key in keys] for pool in pools)
    assert first == second
    assert len(set(first)) == 4


def config_problems(table: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config({"listeners": [{"bind": "127.0.0.1:80"}], **table}, "lb.toml")
    return error.value.problems


def test_a_discovered_group_has_slots_not_backends() -> None:
    config = parse_config({
        "listeners": [{"bind": "127.0.0.1:80"}],
        "groups": [{"name": "web", "discover": "web.internal:8080", "slots": 3}],
        "dns": {"nameservers": ["10.0.0.2", "127.0.0.1:5353", "[::1]:53"], "hold_seconds": 5},
    }, "lb.toml")  # fmt: skip
    group = config.groups[0]
    assert group.discover is not None and str(group.discover) == "web.internal:8080"
    assert [b.name for b in group.backends] == ["web-1", "web-2", "web-3"]
    assert [str(a) for a in config.dns.nameservers] == ["10.0.0.2:53", "127.0.0.1:5353", "[::1]:53"]
    assert config.dns.hold_seconds == 5.0
    srv = parse_config({
        "listeners": [{"bind": "127.0.0.1:80"}],
        "groups": [{"name": "web", "discover": "_http._tcp.web.internal"}],
    }, "lb.toml")  # fmt: skip
    assert srv.groups[0].discover is not None and srv.groups[0].discover.srv
    assert len(srv.groups[0].backends) == 16


NAME = "web.internal:80"
BAD = [
    ({"discover": "web.internal"}, {}, "groups[0].discover = 'web.internal': expected a name"),
    ({"discover": "10.0.0.1:80"}, {}, "groups[0].discover = '10.0.0.1:80': expected a name"),
    (
        {"discover": NAME, "backends": [{"address": "10.0.0.1:80"}]},
        {},
        "groups[0].backends = [{'address': '10.0.0.1:80'}]: expected no backends beside",
    ),
    ({"discover": NAME, "slots": 5000}, {}, "groups[0].slots = 5000: expected a count"),
    ({"backends": [{"address": "10.0.0.1:80"}], "slots": 4}, {}, "groups[0].slots = 4"),
    ({"discover": NAME}, {"nameservers": ["dns.internal"]}, "dns.nameservers[0] = 'dns.int"),
    (
        {"discover": NAME},
        {"ttl_min_seconds": 10, "ttl_max_seconds": 5},
        "dns.ttl_max_seconds = 5.0: expected >= dns.ttl_min_seconds (10.0)",
    ),
    ({"discover": NAME}, {"hold": 5}, "dns.hold = 5: expected one of the known keys"),
]


@pytest.mark.parametrize(("group", "dns", "says"), BAD)
def test_bad_discovery_keys_are_named(
    group: dict[str, Any], dns: dict[str, Any], says: str
) -> None:
    problems = config_problems({"groups": [{"name": "web", **group}], "dns": dns})
    assert any(problem.startswith(f"lb.toml: {says}") for problem in problems), problems


def test_a_reload_carries_the_members_into_its_slots_even_when_their_count_changed() -> None:
    from prometheus_client import CollectorRegistry

    from balancer.backend.discovery import Discovery
    from balancer.observe.metrics import DnsMetrics
    from balancer.process.server import backends_of

    def generation(slots: int, name: str = "web.internal:80") -> Discovery:
        config = parse_config({
            "listeners": [{"bind": "127.0.0.1:80"}],
            "groups": [{"name": "web", "discover": name, "slots": slots}],
            "dns": {"nameservers": ["127.0.0.1:5353"]},
        }, "lb.toml")  # fmt: skip
        backends = backends_of(config)
        return Discovery(
            config, backends, BackendTable.of(backends), DnsMetrics(CollectorRegistry())
        )

    old = generation(3)
    old.groups[0].slots.apply([A, B, C], now=1.0)
    old.groups[0].slots.apply([A, C], now=2.0)  # B leaving
    old.groups[0].started = True
    fewer = generation(2)
    fewer.carry(old)
    assert fewer.table.address(0) == ("10.0.0.1", 80) and fewer.table.state(0) == "up"
    assert fewer.table.address(1) == ("10.0.0.2", 80) and fewer.table.state(1) == "draining"
    assert fewer.groups[0].slots.members == [A, B] and fewer.groups[0].started
    other = generation(3, name="api.internal:80")  # another name: another farm, resolved anew
    other.carry(old)
    assert other.table.address(0) is None and not other.groups[0].started
