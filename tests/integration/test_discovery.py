"""DNS service discovery against a real DNS server (dnsmasq on a loopback port): members
join and leave while running, SRV gives ports and weights, a joining member is checked
first, a failing resolver is held out for hold_seconds."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from balancer.config.schema import parse_config
from balancer.process.server import Balancer
from tests.dnsmasq import Dnsmasq, free_port
from tests.helpers import Backend, admin_json, get, port_of, scrape

FAST_DNS = {"ttl_min_seconds": 0.1, "ttl_max_seconds": 0.2, "timeout_seconds": 0.3,
            "retry_seconds": 0.1}  # fmt: skip
FAST_CHECKS = {"type": "http", "path": "/health", "interval_seconds": 0.1,
               "timeout_seconds": 0.1, "rise": 2, "fall": 2}  # fmt: skip


def discovered(server: Dnsmasq, discover: str, **more: Any) -> Any:
    group: dict[str, Any] = {"name": "web", "discover": discover, "slots": 4}
    group.update(more.pop("group", {}))
    return parse_config({
        "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
        "groups": [group],
        "dns": {"nameservers": [server.nameserver], **FAST_DNS, **more.pop("dns", {})},
        "admin": "127.0.0.1:0",
        **more,
    }, "test")  # fmt: skip


@pytest.fixture
async def members() -> AsyncIterator[list[Backend]]:
    """Four backends on one port at 127.0.0.2 ... 127.0.0.5 (A records share the port)."""
    port = free_port()
    backends = [
        await Backend(f"m{i}", port=port, host=f"127.0.0.{i}").start() for i in (2, 3, 4, 5)
    ]
    yield backends
    for backend in backends:
        backend.close()


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[Dnsmasq]:
    server = Dnsmasq(tmp_path, ["127.0.0.2 web.test", "127.0.0.3 web.test"]).start()
    await server.answers("web.test", "A", {"127.0.0.2", "127.0.0.3"})
    yield server
    server.stop()


async def served(port: int, count: int) -> Counter[str | None]:
    return Counter([(await get(port)).backend for _ in range(count)])


async def until_served(port: int, wanted: set[str], timeout: float = 10) -> None:
    """Until a round of requests reaches exactly `wanted` (bounded); every answer a 200."""
    async with asyncio.timeout(timeout):
        while True:
            responses = [await get(port) for _ in range(8)]
            assert {r.status for r in responses} == {200}
            if {r.backend for r in responses} == wanted:
                return


def states(balancer: Balancer) -> dict[str, tuple[str, str]]:
    return {b["name"]: (b["address"], b["state"]) for b in balancer.backends_view()}


async def test_members_join_and_leave_as_dns_changes_without_a_reload(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    port_number = members[0].port
    balancer, _ = await balancer_factory(discovered(dnsmasq, f"web.test:{port_number}"))
    port = port_of(balancer)
    # The first answer is the farm the balancer starts with: served at once.
    assert set((await served(port, 4)).keys()) == {"m2", "m3"}
    view = states(balancer)
    assert view["web-1"] == (f"127.0.0.2:{port_number}", "up")
    assert view["web-2"] == (f"127.0.0.3:{port_number}", "up")
    assert view["web-3"] == ("", "empty") and view["web-4"] == ("", "empty")

    dnsmasq.set_hosts(["127.0.0.3 web.test", "127.0.0.4 web.test"])  # .2 leaves, .4 joins
    await until_served(port, {"m3", "m4"})
    before = members[0].connections
    assert set((await served(port, 12)).keys()) == {"m3", "m4"}
    assert members[0].connections == before  # the member that left gets nothing new
    view = states(balancer)
    assert view["web-1"] == (f"127.0.0.2:{port_number}", "draining")  # leaving: its drain
    assert view["web-3"] == (f"127.0.0.4:{port_number}", "up")  # the new one, an empty slot

    # Slots full of members and leavers: a new member takes the longest-leaving slot.
    dnsmasq.set_hosts(["127.0.0.4 web.test", "127.0.0.5 web.test", "127.0.0.2 web.test"])
    await until_served(port, {"m2", "m4", "m5"})
    view = states(balancer)
    assert view["web-1"] == (f"127.0.0.2:{port_number}", "up")  # named again: back
    assert view["web-2"] == (f"127.0.0.3:{port_number}", "draining")
    assert view["web-4"] == (f"127.0.0.5:{port_number}", "up")

    page = await scrape(balancer)
    assert 'balancer_dns_members{group="web"} 3.0' in page
    assert 'balancer_dns_resolutions_total{group="web",result="ok"}' in page
    assert 'balancer_dns_resolutions_total{group="web",result="timeout"} 0.0' in page
    backends = {b["name"]: b for b in await admin_json(balancer, "/backends")}
    assert backends["web-4"]["address"] == f"127.0.0.5:{port_number}"


async def test_no_request_fails_while_members_change(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    balancer, _ = await balancer_factory(discovered(dnsmasq, f"web.test:{members[0].port}"))
    port = port_of(balancer)
    statuses: Counter[int] = Counter()
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            statuses[(await get(port)).status] += 1

    clients = [asyncio.create_task(load()) for _ in range(4)]
    for hosts in (["127.0.0.3", "127.0.0.4"], ["127.0.0.4", "127.0.0.5"], ["127.0.0.2"]):
        dnsmasq.set_hosts([f"{host} web.test" for host in hosts])
        await until_served(port, {f"m{host.rsplit('.', 1)[1]}" for host in hosts})
    done.set()
    await asyncio.gather(*clients)
    assert set(statuses) == {200} and sum(statuses.values()) > 50


async def test_a_member_joining_while_running_is_health_checked_first(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    config = discovered(dnsmasq, f"web.test:{members[0].port}", health_check=FAST_CHECKS)
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    members[2].health = "fail"  # 127.0.0.4 answers its checks 500
    dnsmasq.set_hosts(["127.0.0.2 web.test", "127.0.0.3 web.test", "127.0.0.4 web.test"])
    async with asyncio.timeout(5):
        while states(balancer)["web-3"] != (f"127.0.0.4:{members[0].port}", "down"):
            await asyncio.sleep(0.02)
    assert set((await served(port, 9)).keys()) == {"m2", "m3"}  # never the failing one
    assert {seen.path for seen in members[2].seen} == {"/health"}

    members[2].health = "ok"
    await until_served(port, {"m2", "m3", "m4"})
    first_request = next(i for i, seen in enumerate(members[2].seen) if seen.path != "/health")
    checks_before = [seen.path for seen in members[2].seen[:first_request]]
    assert checks_before.count("/health") >= 2 + 1  # rise = 2 passes after the failures


async def test_the_members_a_balancer_starts_with_are_checked_too(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    members[1].health = "fail"  # 127.0.0.3, in the first answer
    config = discovered(dnsmasq, f"web.test:{members[0].port}", health_check=FAST_CHECKS)
    balancer, _ = await balancer_factory(config)
    async with asyncio.timeout(5):  # up at start (as listed backends), then checked down
        while states(balancer)["web-2"] != (f"127.0.0.3:{members[0].port}", "down"):
            await asyncio.sleep(0.02)
    assert set((await served(port_of(balancer), 6)).keys()) == {"m2"}


async def test_a_member_that_leaves_is_no_longer_checked_nor_said_to_be_down(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    """Scale-in: DNS drops a member whose host is going away; its failing checks must not
    leave an alerting `balancer_backend_up 0` behind for a backend that is no longer one."""
    config = discovered(dnsmasq, f"web.test:{members[0].port}", health_check=FAST_CHECKS)
    balancer, _ = await balancer_factory(config)
    members[0].health = "fail"  # 127.0.0.2, web-1
    async with asyncio.timeout(5):
        while states(balancer)["web-1"][1] != "down":
            await asyncio.sleep(0.02)
    dnsmasq.set_hosts(["127.0.0.3 web.test"])
    async with asyncio.timeout(5):
        while states(balancer)["web-1"][1] != "draining":
            await asyncio.sleep(0.02)
    checks_of_left = len(members[0].seen)
    async with asyncio.timeout(5):  # three more checks of the one that stays, at least
        seen = len(members[1].seen)
        while len(members[1].seen) < seen + 3:
            await asyncio.sleep(0.02)
    assert len(members[0].seen) <= checks_of_left + 1  # (one may have been under way)
    assert 'balancer_backend_up{backend="web-1"} 1.0' in await scrape(balancer)


async def test_srv_records_give_each_member_its_port_and_weight(
    tmp_path: Path, balancer_factory: Any
) -> None:
    a, b = [await Backend(name, host=host).start() for name, host in
            (("a", "127.0.0.6"), ("b", "127.0.0.7"))]  # fmt: skip
    server = Dnsmasq(
        tmp_path, ["127.0.0.6 a.web.test", "127.0.0.7 b.web.test"],
        srv=[f"_http._tcp.web.test,a.web.test,{a.port},0,1",
             f"_http._tcp.web.test,b.web.test,{b.port},0,3",
             "_http._tcp.web.test,c.web.test,9,5,100"],  # a higher priority value: unused
    ).start()  # fmt: skip
    try:
        await server.answers("a.web.test", "A", {"127.0.0.6"})
        balancer, _ = await balancer_factory(discovered(server, "_http._tcp.web.test"))
        assert await served(port_of(balancer), 40) == Counter({"a": 10, "b": 30})
        view = {b["name"]: (b["address"], b["weight"]) for b in balancer.backends_view()}
        assert sorted(view.values()) == [
            ("", 1), ("", 1), (f"127.0.0.6:{a.port}", 1), (f"127.0.0.7:{b.port}", 3)
        ]  # fmt: skip
    finally:
        server.stop()
        a.close()
        b.close()


async def test_a_failing_resolver_keeps_the_last_answer_for_hold_seconds(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    config = discovered(dnsmasq, f"web.test:{members[0].port}", dns={"hold_seconds": 1.5})
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    dnsmasq.stop()
    started = asyncio.get_running_loop().time()
    async with asyncio.timeout(3):  # a timed-out resolution counted...
        while 'result="timeout"} 0.0' in await scrape(balancer):
            await asyncio.sleep(0.05)
    assert set((await served(port, 4)).keys()) == {"m2", "m3"}  # ...and the answer held
    async with asyncio.timeout(5):  # past the hold: the members leave
        while (await get(port)).status == 200:
            await asyncio.sleep(0.05)
    assert asyncio.get_running_loop().time() - started >= 1.5
    assert (await get(port)).status == 503
    assert 'balancer_dns_members{group="web"} 0.0' in await scrape(balancer)

    dnsmasq.start()  # the resolver answers again: back, on the same slots
    async with asyncio.timeout(5):
        while (await get(port)).status != 200:
            await asyncio.sleep(0.05)
    await until_served(port, {"m2", "m3"})
    assert states(balancer)["web-1"] == (f"127.0.0.2:{members[0].port}", "up")


async def test_a_name_that_does_not_resolve_at_start_starts_empty_and_fills_in(
    dnsmasq: Dnsmasq, members: list[Backend], balancer_factory: Any
) -> None:
    balancer, _ = await balancer_factory(discovered(dnsmasq, f"later.test:{members[0].port}"))
    port = port_of(balancer)
    assert (await get(port)).status == 503
    assert states(balancer)["web-1"] == ("", "empty")
    dnsmasq.set_hosts(["127.0.0.5 later.test"])
    async with asyncio.timeout(5):
        while (await get(port)).status != 200:
            await asyncio.sleep(0.05)
    await until_served(port, {"m5"})
    assert states(balancer)["web-1"] == (f"127.0.0.5:{members[0].port}", "up")
