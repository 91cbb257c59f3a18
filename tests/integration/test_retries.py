"""Retries: a request whose backend connection ends before any byte of the response goes
again, to another backend, when it may (idempotent, kept whole, within `upstream.retries`);
never a POST whose bytes reached a backend. Over real sockets, with backends that die on
the request: by FIN or by RST."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from typing import Any, ClassVar

import pytest

from balancer.config.schema import parse_config
from tests.helpers import Backend, Client, dead_port, port_of
from tests.integration.test_reuse import lines, start


class DiesOnRequest(asyncio.Protocol):
    """Accepts, reads a request's first bytes, and hangs up without a byte of answer: by FIN,
    or by RST (SO_LINGER 0), as a backend killed with the request in its hands."""

    reset = False
    requests: list[bytes]

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        type(self).requests.append(data.split(b"\r\n", 1)[0])
        if self.reset:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.close()


async def dying_backend(reset: bool) -> tuple[asyncio.AbstractServer, type[DiesOnRequest], str]:
    kind = type("Dies", (DiesOnRequest,), {"reset": reset, "requests": []})
    server = await asyncio.get_running_loop().create_server(kind, "127.0.0.1", 0)
    return server, kind, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def config(
    addresses: list[str],
    reuse: str = "never",
    retries: int | None = None,
    retry_on: list[str] | None = None,
    response_seconds: float = 60.0,
) -> Any:
    upstream: dict[str, Any] = {"reuse": reuse}
    if retries is not None:
        upstream["retries"] = retries
    if retry_on is not None:
        upstream["retry_on"] = retry_on
    return parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [{"name": f"b{i}", "address": a} for i, a in enumerate(addresses)],
            "upstream": upstream,
            "request_log": True,
            "timeouts": {"linger_seconds": 1, "backend_response_seconds": response_seconds},
            "admin": "127.0.0.1:0",
        },
        "test",
    )


async def one_request(port: int, method: str = "GET", body: bytes | None = None) -> int:
    client = await Client.connect(port)
    try:
        return (await client.request(method, "/r", body=body)).status
    finally:
        await client.close()


async def answered(
    cfg: Any, servers: list[asyncio.AbstractServer], method: str = "GET", body: bytes | None = None
) -> tuple[int, io.StringIO]:
    """One request through a balancer on `cfg`: its status, and the access log once the
    balancer and `servers` have stopped."""
    balancer, log, recorder = await start(cfg)
    try:
        status = await one_request(port_of(balancer), method, body)
        await recorder.wait_for(1)
    finally:
        await balancer.shutdown(grace=1.0)
        for server in servers:
            server.close()
    return status, log


@pytest.mark.parametrize("reuse", ["never", "always"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_get_whose_backend_hangs_up_goes_to_another_and_is_answered(
    reuse: str, reset: bool
) -> None:
    server, dies, dead = await dying_backend(reset)
    good = await Backend("good").start()
    balancer, log, recorder = await start(config([dead, good.address], reuse))
    try:
        statuses = [await one_request(port_of(balancer)) for _ in range(4)]
        await recorder.wait_for(4)
        states = {s.name: s for s in balancer.backend_states()}
    finally:
        await balancer.shutdown(grace=1.0)
        server.close()
        good.close()
    assert statuses == [200] * 4  # round robin sent two of them to the dead one first
    assert len(dies.requests) == 2 and len(good.seen) == 4
    requests = lines(log, "request")
    assert sorted(r["retries"] for r in requests) == [0, 0, 1, 1]
    assert {r["backend"] for r in requests} == {"b1"}
    assert sorted(r["failed_backends"] for r in requests) == [[], [], ["b0"], ["b0"]]
    connections = lines(log, "connection")
    assert sorted(c["retries"] for c in connections) == [0, 0, 1, 1]
    if reuse == "never":  # (in the reuse modes the connection line names no backend)
        assert all(c["backend"]["name"] == "b1" for c in connections)
    # Each dead connection has its own line, saying how it ended.
    dead_lines = [x for x in lines(log, "backend_connection") if x["backend"] == "b0"]
    assert len(dead_lines) == 2
    cause = "backend_reset" if reset else "backend_closed"
    assert {x["close_cause"] for x in dead_lines} == {cause}
    kind = {x["leg"]["kind"] for x in dead_lines}
    assert kind == ({"rst"} if reset else {"fin"})
    assert states["b0"].failures == 2  # a fresh connection that died: the backend's failure


async def test_a_post_that_reached_a_backend_is_never_sent_again() -> None:
    server, dies, dead = await dying_backend(reset=False)
    good = await Backend("good").start()
    try:  # b0 first
        status, log = await answered(config([dead, good.address]), [server], "POST", b"pay once")
    finally:
        good.close()
    assert status == 502 and dies.requests == [b"POST /r HTTP/1.1"] and good.seen == []
    ((request,), (connection,)) = lines(log, "request"), lines(log, "connection")
    assert (request["status"], request["retries"]) == (502, 0)
    assert connection["retries"] == 0


@pytest.mark.parametrize("retries", [0, 2])
async def test_retries_stop_at_the_limit_with_a_502(retries: int) -> None:
    first, dies_first, one = await dying_backend(reset=False)
    second, dies_second, two = await dying_backend(reset=True)
    status, log = await answered(config([one, two], retries=retries), [first, second])
    assert status == 502
    assert len(dies_first.requests) + len(dies_second.requests) == 1 + retries
    if retries:  # never the same backend twice in a row while another is ready
        assert len(dies_first.requests) == 2 and len(dies_second.requests) == 1
    (request,) = lines(log, "request")
    assert (request["status"], request["retries"]) == (502, retries)


async def test_with_one_backend_the_retry_goes_to_it_again() -> None:
    server, dies, dead = await dying_backend(reset=False)
    status, log = await answered(config([dead], retries=1), [server])
    assert status == 502 and len(dies.requests) == 2
    assert lines(log, "request")[0]["retries"] == 1


class HangsUpAtOnce(asyncio.Protocol):
    """Accepts and hangs up before reading anything (a backend going down): its FIN or RST
    may reach the balancer before the connect is even taken up."""

    reset = False

    def connection_made(self, transport: Any) -> None:
        if self.reset:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()


@pytest.mark.parametrize("reuse", ["never", "always"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_backend_that_hangs_up_as_it_is_connected_to_costs_no_request(
    reuse: str, reset: bool
) -> None:
    kind = type("HangsUp", (HangsUpAtOnce,), {"reset": reset})
    server = await asyncio.get_running_loop().create_server(kind, "127.0.0.1", 0)
    good = await Backend("good").start()
    hangs_up = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    balancer, log, recorder = await start(config([hangs_up, good.address], reuse))
    try:
        statuses = [await one_request(port_of(balancer)) for _ in range(4)]
        await recorder.wait_for(4)
    finally:
        await balancer.shutdown(grace=1.0)
        server.close()
        good.close()
    assert statuses == [200] * 4 and len(good.seen) == 4
    assert sorted(r["retries"] for r in lines(log, "request")) == [0, 0, 1, 1]


@pytest.mark.parametrize("reuse", ["never", "always"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_502_for_a_backend_that_hung_up_says_how_it_did(reuse: str, reset: bool) -> None:
    # Not backend_connect_failed (the connect succeeded), not a vague bad_gateway.
    server, _, dead = await dying_backend(reset)
    status, log = await answered(config([dead], reuse, retries=0), [server])
    cause, kind = ("backend_reset", "rst") if reset else ("backend_closed", "fin")
    (connection,) = lines(log, "connection")
    assert status == 502 and connection["error_status"] == 502
    assert connection["close_cause"] == cause
    if reuse == "never":
        assert (connection["connect_attempts"], connection["connect_failures"]) == (1, 0)
        assert connection["backend_leg"]["kind"] == kind
    else:  # the backend connection has its own line
        (request,) = lines(log, "request")
        assert (request["connect_attempts"], request["connect_failures"]) == (1, 0)
        (pooled,) = lines(log, "backend_connection")
        assert (pooled["close_cause"], pooled["leg"]["kind"]) == (cause, kind)


async def test_without_empty_response_in_retry_on_a_hang_up_is_a_502() -> None:
    server, dies, dead = await dying_backend(reset=False)
    good = await Backend("good").start()
    try:
        status, log = await answered(config([dead, good.address], retry_on=[]), [server])
    finally:
        good.close()
    assert status == 502 and len(dies.requests) == 1 and good.seen == []
    assert lines(log, "request")[0]["failed_backends"] == []


@pytest.mark.parametrize("retry_on", [["conn-failure"], []])
async def test_conn_failure_in_retry_on_decides_whether_a_refused_connect_tries_the_next(
    retry_on: list[str],
) -> None:
    good = await Backend("good").start()
    try:  # b0 (nothing listens) first
        status, log = await answered(config([f"127.0.0.1:{dead_port()}", good.address],
                                            retry_on=retry_on), [])  # fmt: skip
    finally:
        good.close()
    (connection,) = lines(log, "connection")
    if retry_on:
        assert status == 200 and connection["failed_backends"] == ["b0"]
        assert (connection["connect_attempts"], connection["connect_failures"]) == (2, 1)
    else:
        assert status == 502 and connection["failed_backends"] == ["b0"]
        assert (connection["connect_attempts"], connection["connect_failures"]) == (1, 1)


class Silent(asyncio.Protocol):
    """Reads the request and never answers (a backend stuck on it)."""

    requests: ClassVar[list[bytes]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        Silent.requests.append(data.split(b"\r\n", 1)[0])


@pytest.mark.parametrize("reuse", ["never", "always"])
@pytest.mark.parametrize("retry_on", [["response-timeout"], ["empty-response"]])
async def test_response_timeout_in_retry_on_sends_a_get_past_a_silent_backend(
    reuse: str, retry_on: list[str]
) -> None:
    Silent.requests = []
    server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    silent = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    good = await Backend("good").start()
    cfg = config([silent, good.address], reuse, retry_on=retry_on, response_seconds=0.3)
    try:
        status, log = await answered(cfg, [server])
    finally:
        good.close()
    assert Silent.requests == [b"GET /r HTTP/1.1"]
    (request,) = lines(log, "request")
    if retry_on == ["response-timeout"]:
        assert status == 200 and len(good.seen) == 1
        assert (request["retries"], request["failed_backends"]) == (1, ["b0"])
        (silent_line,) = [x for x in lines(log, "backend_connection") if x["backend"] == "b0"]
        assert silent_line["close_cause"] == "backend_timeout"
        assert silent_line["leg"]["initiator"] == "balancer"
    else:  # the default: a slow request is not run twice
        assert status == 504 and good.seen == []
        assert (request["retries"], request["failed_backends"]) == (0, [])
