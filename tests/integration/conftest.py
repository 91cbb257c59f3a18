"""Integration tests: the balancer in-process on 127.0.0.1:0, real sockets, small backends.

Every test here runs twice, under uvloop and under the stock asyncio loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop

from tests.helpers import Backend


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture
async def farm() -> AsyncIterator[list[Backend]]:
    backends = [await Backend(f"web{i}").start() for i in (1, 2, 3)]
    yield backends
    for backend in backends:
        backend.close()


@pytest.fixture
async def balancer_factory() -> AsyncIterator[Callable[..., Any]]:
    """`await balancer_factory(config)` → (Balancer, Recorder); shut down after the test."""
    from tests.helpers import start_balancer

    started = []

    async def factory(config: Any) -> Any:
        balancer, recorder = await start_balancer(config)
        started.append(balancer)
        return balancer, recorder

    yield factory
    for balancer in started:
        await balancer.shutdown(grace=1.0)
