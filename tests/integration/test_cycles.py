"""A connection's objects are freed by reference counting as it ends: none of the balancer's
is left for the cyclic GC to find (issue #19: about 50 a connection were, and each collection
pauses every connection of the worker). Counted as bench/counts.py counts them: the collector
off, `gc.DEBUG_SAVEALL`, one collection after the traffic; only the balancer's own objects
and frames are counted, since the test's clients and backends share the process."""

from __future__ import annotations

import gc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import balancer
from balancer.config.schema import parse_config
from balancer.facts.record import LegTeardown
from tests.helpers import (
    Client,
    client_context,
    dead_port,
    get,
    make_config,
    port_of,
    raw_exchange,
)

PACKAGE = str(Path(balancer.__file__).parent)
CONNECTIONS = 12


def ours(thing: Any) -> bool:
    if isinstance(thing, types.FrameType):
        return thing.f_code.co_filename.startswith(PACKAGE)
    if isinstance(thing, types.MethodType):
        return ours(thing.__self__)
    return type(thing).__module__.startswith("balancer")


def describe(thing: Any) -> str:
    if isinstance(thing, types.FrameType):
        return f"frame {thing.f_code.co_name}"
    return type(thing).__qualname__


async def left_for_the_gc(traffic: Callable[[], Awaitable[None]]) -> list[str]:
    """The balancer's objects that only the cyclic GC would free, after `traffic`."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await traffic()
        gc.collect()
        return sorted(describe(thing) for thing in gc.garbage if ours(thing))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def reuse_config(address: str, reuse: str) -> Any:
    return parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [{"name": "b0", "address": address}],
            "upstream": {"reuse": reuse},
        },
        "test",
    )


@pytest.mark.parametrize("reuse", ["never", "always"])
async def test_http_connections_leave_nothing_for_the_cyclic_gc(
    farm, balancer_factory, reuse
) -> None:
    balancer, recorder = await balancer_factory(reuse_config(farm[0].address, reuse))
    port = port_of(balancer)

    async def traffic() -> None:
        for _ in range(CONNECTIONS):  # ab's shape: HTTP/1.0, a new connection each
            answer = await raw_exchange(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            assert b" 200 " in answer.split(b"\r\n", 1)[0]
        client = await Client.connect(port)  # keep-alive, closed by the client
        for _ in range(3):
            assert (await client.request("GET", "/size/100")).status == 200
        await client.close()
        await recorder.wait_for(CONNECTIONS + 1)

    found = await left_for_the_gc(traffic)
    assert found == [], " ".join(f"{k}:{found.count(k)}" for k in sorted(set(found)))


async def test_tls_and_tcp_connections_leave_nothing_for_the_cyclic_gc(
    farm, balancer_factory, certs
) -> None:
    https, https_recorder = await balancer_factory(
        make_config([farm[0].address], https=True, certs=certs)
    )
    tcp, tcp_recorder = await balancer_factory(make_config([farm[0].address], mode="tcp"))
    context = client_context(certs.ca)

    async def traffic() -> None:
        for _ in range(CONNECTIONS // 2):
            assert (await get(port_of(https), "/", context)).status == 200
            answer = await raw_exchange(port_of(tcp), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            assert b" 200 " in answer.split(b"\r\n", 1)[0]
        await https_recorder.wait_for(CONNECTIONS // 2)
        await tcp_recorder.wait_for(CONNECTIONS // 2)

    found = await left_for_the_gc(traffic)
    assert found == [], " ".join(f"{k}:{found.count(k)}" for k in sorted(set(found)))


async def test_the_count_sees_a_cycle_when_there_is_one() -> None:
    """The probe itself can fail: a balancer object held only by a cycle is found."""

    async def traffic() -> None:
        box: list[Any] = [LegTeardown()]
        box.append(box)

    assert await left_for_the_gc(traffic) == ["LegTeardown"]


async def test_error_answers_leave_nothing_for_the_cyclic_gc(balancer_factory) -> None:
    """A refused backend (502 after every attempt) and a malformed request (400): the errors
    raised on the way hold no frame of ours in a cycle."""
    balancer, recorder = await balancer_factory(make_config([f"127.0.0.1:{dead_port()}"]))
    port = port_of(balancer)

    async def traffic() -> None:
        for _ in range(3):
            answer = await raw_exchange(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            assert b" 502 " in answer.split(b"\r\n", 1)[0]
            answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
            assert b" 400 " in answer.split(b"\r\n", 1)[0]
        await recorder.wait_for(6)

    found = await left_for_the_gc(traffic)
    assert found == [], " ".join(f"{k}:{found.count(k)}" for k in sorted(set(found)))


async def test_a_session_that_has_let_go_ignores_a_backend_lost_after_it(
    farm, balancer_factory
) -> None:
    """A connect attempt abandoned just as it connected (the client gone meanwhile) is lost
    after its session has published and dropped its parts: the session has nothing left to
    do with it, and must not fail on the parts it let go."""
    balancer, recorder = await balancer_factory(reuse_config(farm[0].address, "never"))
    client = await Client.connect(port_of(balancer))
    assert (await client.request("GET", "/size/10")).status == 200
    (session,) = balancer.contexts[0].connections
    backend = session.fwd.backend
    assert backend is not None
    await client.close()
    await recorder.wait_for(1)
    assert not hasattr(session, "fwd")  # let go
    session.on_backend_lost(backend, ConnectionResetError())  # no AttributeError
