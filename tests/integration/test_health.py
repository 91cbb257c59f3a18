"""Active health checks over real sockets: a backend that fails, hangs, flaps, recovers."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from balancer.process.server import Balancer
from tests.helpers import Backend, get, make_config, port_of, raw_exchange, scrape

# Fast checks: a verdict in a few tenths of a second.
FAST = {"type": "http", "path": "/health", "interval_seconds": 0.05, "timeout_seconds": 0.05,
        "rise": 2, "fall": 2}  # fmt: skip


def states(balancer: Balancer) -> dict[str, str]:
    return {b["name"]: b["state"] for b in balancer.backends_view()}


async def until(predicate: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):  # bounded: the checks run every 0.05 s
        while not predicate():
            await asyncio.sleep(0.01)


async def served(port: int, count: int) -> Counter[str | None]:
    return Counter([(await get(port)).backend for _ in range(count)])


async def test_a_backend_answering_500_is_taken_out_and_brought_back(
    farm: list[Backend], balancer_factory
) -> None:
    config = make_config([b.address for b in farm], health_check=FAST)
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    assert set((await served(port, 6)).keys()) == {"web1", "web2", "web3"}
    farm[1].health = "fail"
    await until(lambda: states(balancer)["b1"] == "down")
    assert set((await served(port, 6)).keys()) == {"web1", "web3"}
    metrics = await scrape(balancer)
    assert 'balancer_backend_up{backend="b1"} 0.0' in metrics
    assert 'balancer_backend_state_changes_total{backend="b1",state="down"} 1.0' in metrics
    farm[1].health = "ok"
    await until(lambda: states(balancer)["b1"] == "up")
    assert set((await served(port, 6)).keys()) == {"web1", "web2", "web3"}


async def test_a_backend_that_accepts_and_hangs_fails_the_http_check(
    farm: list[Backend], balancer_factory
) -> None:
    """A connect succeeds (a TCP check would pass); the request is never answered."""
    farm[0].health = "hang"
    config = make_config([b.address for b in farm], health_check=FAST)
    balancer, _ = await balancer_factory(config)
    await until(lambda: states(balancer)["b0"] == "down")
    assert set((await served(port_of(balancer), 4)).keys()) == {"web2", "web3"}
    (b0,) = [b for b in balancer.checker.view() if b["name"] == "b0"]  # type: ignore[union-attr]
    assert b0["last_check"] == "timeout"


async def test_a_flapping_backend_changes_state_at_neither(
    farm: list[Backend], balancer_factory
) -> None:
    """rise 2, fall 2: failures and successes taking turns never reach either count."""
    farm[2].health = "flap"
    config = make_config([b.address for b in farm], health_check=FAST)
    balancer, _ = await balancer_factory(config)
    await until(lambda: sum(seen.path == "/health" for seen in farm[2].seen) >= 10)
    metrics = await scrape(balancer)
    assert 'balancer_health_checks_total{backend="b2",result="failed"}' in metrics
    for state in ("up", "down"):  # no state change, either way (listed from the start at 0)
        assert (
            f'balancer_backend_state_changes_total{{backend="b2",state="{state}"}} 0.0' in metrics
        )
    assert states(balancer)["b2"] == "up"


async def test_every_backend_down_is_503_with_retry_after(
    farm: list[Backend], balancer_factory
) -> None:
    for backend in farm:
        backend.health = "fail"
    config = make_config([b.address for b in farm], health_check=FAST)
    balancer, _ = await balancer_factory(config)
    await until(lambda: set(states(balancer).values()) == {"down"})
    response = await get(port_of(balancer))
    assert response.status == 503 and response.headers["retry-after"] == "1"
    for backend in farm:
        backend.health = "ok"
    await until(lambda: set(states(balancer).values()) == {"up"})
    assert (await get(port_of(balancer))).status == 200


async def test_tcp_checks_take_out_a_backend_that_refuses(
    farm: list[Backend], balancer_factory
) -> None:
    config = make_config([b.address for b in farm], health_check={**FAST, "type": "tcp"})
    balancer, _ = await balancer_factory(config)
    farm[0].close()  # refuses from now on
    await until(lambda: states(balancer)["b0"] == "down")
    assert states(balancer) == {"b0": "down", "b1": "up", "b2": "up"}


async def test_passive_5xx_responses_eject_a_backend_for_a_while(
    farm: list[Backend], balancer_factory
) -> None:
    """Counting 5xx as failures (passive_5xx): two in a row take web1 out of rotation for
    backend_down_seconds, in this worker, without any active check."""
    farm[0].status = "500 Internal Server Error"
    config = make_config(
        [b.address for b in farm],
        timeouts={"backend_down_seconds": 30},
        health_check={"passive_5xx": True, "passive_fall": 2},
    )
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    first = [await get(port) for _ in range(6)]  # round robin: web1 answers 500 twice
    assert [r.status for r in first if r.backend == "web1"] == [500, 500]
    assert set((await served(port, 6)).keys()) == {"web2", "web3"}
    (web1,) = [s for s in balancer.backend_states() if s.name == "b0"]
    assert web1.down_until > 0 and web1.ejections == 1
    assert 'balancer_backend_ejections_total{backend="b0"} 1.0' in await scrape(balancer)


async def test_a_reset_mid_response_ejects_the_backend(
    farm: list[Backend], balancer_factory
) -> None:
    config = make_config(
        [farm[0].address, farm[1].address],
        timeouts={"backend_down_seconds": 30},
        health_check={"passive_fall": 1},
    )
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    with contextlib.suppress(ConnectionError):  # web1 resets mid-response: so is the client
        await raw_exchange(port, b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
    assert set((await served(port, 4)).keys()) == {"web2"}
    (web1,) = [s for s in balancer.backend_states() if s.name == "b0"]
    assert web1.down_until > 0


async def test_a_backup_serves_only_while_no_primary_is_up(
    farm: list[Backend], balancer_factory
) -> None:
    from balancer.config.schema import parse_config

    config = parse_config(
        {
            "listeners": [{"bind": "127.0.0.1:0"}],
            "admin": "127.0.0.1:0",
            "backends": [
                {"name": "b0", "address": farm[0].address},
                {"name": "b1", "address": farm[1].address, "backup": True},
            ],
            "health_check": FAST,
        },
        "test",
    )
    balancer, _ = await balancer_factory(config)
    port = port_of(balancer)
    assert set((await served(port, 4)).keys()) == {"web1"}
    farm[0].health = "fail"
    await until(lambda: states(balancer)["b0"] == "down")
    assert set((await served(port, 4)).keys()) == {"web2"}
    farm[0].health = "ok"
    await until(lambda: states(balancer)["b0"] == "up")
    assert set((await served(port, 4)).keys()) == {"web1"}
