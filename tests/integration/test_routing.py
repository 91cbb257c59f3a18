"""Backend groups and routing over real sockets: requests on one client connection go to the
group their Host and path name, each group with its own policy and reuse mode."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from balancer.config.schema import parse_config
from balancer.observe.loglines import json_line
from tests.helpers import Backend, Client, admin_json, dead_port, port_of


def routed_config(web: list[Backend], api: list[Backend], static: list[Backend],
                  api_reuse: str = "never") -> Any:  # fmt: skip
    def group(name: str, farm: list[Backend], **more: Any) -> dict[str, Any]:
        backends = [{"name": b.name, "address": b.address} for b in farm]
        return {"name": name, "backends": backends, **more}

    return parse_config(
        {
            "groups": [
                group("web", web),
                group("api", api, policy="least_connections", reuse=api_reuse),
                group("static", static, timeouts={"backend_response_seconds": 0.5}),
            ],
            "listeners": [
                {
                    "name": "http",
                    "bind": "127.0.0.1:0",
                    "group": "web",
                    "routes": [
                        {"host": "api.example.com", "group": "api"},
                        {"host": "*.example.com", "path_prefix": "/static/", "group": "static"},
                        {"path_prefix": "/assets/", "group": "static"},
                    ],
                },
                {"name": "raw", "bind": "127.0.0.1:0", "mode": "tcp", "group": "api"},
            ],
            "admin": "127.0.0.1:0",
        },
        "routes.toml",
    )


async def start_farms() -> tuple[list[Backend], list[Backend], list[Backend]]:
    web = [await Backend(f"web{i}").start() for i in (1, 2)]
    api = [await Backend(f"api{i}").start() for i in (1, 2)]
    static = [await Backend("static1").start()]
    return web, api, static


async def test_requests_on_one_connection_go_where_their_host_and_path_say(
    balancer_factory: Callable[..., Any],
) -> None:
    web, api, static = await start_farms()
    try:
        balancer, _ = await balancer_factory(routed_config(web, api, static))
        client = await Client.connect(port_of(balancer, "http"))
        asked = [
            ("localhost", "/", "web"),
            ("API.Example.com:8080", "/x", "api"),  # case and port do not matter
            ("www.example.com", "/static/a.css", "static"),
            ("www.example.com", "/other", "web"),  # the host alone is not the rule
            ("example.com", "/static/a.css", "web"),  # *.example.com: subdomains only
            ("elsewhere", "/assets/logo.png", "static"),
            ("api.example.com", "/assets/x", "api"),  # rules in file order: the first wins
            ("localhost", "http://api.example.com/abs", "api"),  # absolute form's authority
        ]
        for host, path, group in asked:
            response = await client.request(path=path, host=host)
            assert response.status == 200, (host, path)
            assert response.backend is not None and response.backend.startswith(group), (
                host, path, response.backend,
            )  # fmt: skip
        await client.close()
        # Each group's own rotation: web1, web2 in turn over the web group's connections.
        spread = Counter()
        for _ in range(4):
            other = await Client.connect(port_of(balancer, "http"))
            spread[(await other.request(path="/")).backend] += 1
            await other.close()
        assert spread == Counter({"web1": 2, "web2": 2})
        view = await admin_json(balancer, "/backends")
        assert {(b["name"], b["group"]) for b in view} == {
            ("web1", "web"), ("web2", "web"), ("api1", "api"), ("api2", "api"),
            ("static1", "static"),
        }  # fmt: skip
    finally:
        for backend in web + api + static:
            backend.close()


async def test_under_reuse_never_a_group_keeps_its_connection_while_requests_stay_in_it(
    balancer_factory: Callable[..., Any],
) -> None:
    """Issue 20, item 3 (HAProxy's http-reuse never): a routed listener opened a backend
    connection per request (a TIME_WAIT each); now consecutive requests for one group share
    the client's connection to it, and a request for another group closes it there."""
    web, api, static = await start_farms()
    try:
        balancer, recorder = await balancer_factory(routed_config(web, api, static))
        client = await Client.connect(port_of(balancer, "http"))
        backends = []
        for host in ("localhost", "localhost", "localhost", "api.example.com", "localhost"):
            response = await client.request(path="/", host=host)
            assert response.status == 200
            backends.append(response.backend)
        await client.close()
        await recorder.wait_for(1)
    finally:
        for backend in web + api + static:
            backend.close()
    first, second, third, to_api, back = backends
    assert first == second == third and to_api.startswith("api") and back.startswith("web")
    # Three web requests on one backend connection, the api's on one, then a new web one.
    assert sum(b.connections for b in web) == 2 and sum(b.connections for b in api) == 1


async def test_a_group_keeps_its_own_reuse_mode_and_timeouts(
    balancer_factory: Callable[..., Any],
) -> None:
    web, api, static = await start_farms()
    try:
        balancer, _ = await balancer_factory(routed_config(web, api, static, api_reuse="safe"))
        client = await Client.connect(port_of(balancer, "http"))
        for _ in range(3):
            assert (await client.request(path="/", host="api.example.com")).status == 200
            assert (await client.request(path="/")).status == 200
        # api reuses its connections (safe: after the client's first request): api1, api2
        # (least connections' tie broken in turn), then api1's again. web does not: a new
        # backend connection per routed request, closed after it, as nginx's default.
        assert [b.connections for b in api] == [1, 1]
        assert sum(b.connections for b in web) == 3
        # static's own response timeout (0.5 s, not the file's 60): a 504 in time.
        response = await client.request(path="/static/slow", host="a.example.com")
        assert response.status == 504
        await client.close()
    finally:
        for backend in web + api + static:
            backend.close()


async def test_a_tcp_listener_sends_to_its_own_group(
    balancer_factory: Callable[..., Any],
) -> None:
    web, api, static = await start_farms()
    try:
        balancer, recorder = await balancer_factory(routed_config(web, api, static))
        seen = Counter()
        for _ in range(4):
            client = await Client.connect(port_of(balancer, "raw"))
            seen[(await client.request(path="/")).backend] += 1
            await client.close()
        assert set(seen) <= {"api1", "api2"} and sum(seen.values()) == 4
        records = await recorder.wait_for(4)
        assert {r.backend_group for r in records} == {"api"}  # the record says the group
        assert json.loads(json_line(records[0]))["backend"]["group"] == "api"
    finally:
        for backend in web + api + static:
            backend.close()


async def test_each_group_checks_its_backends_its_own_way(
    balancer_factory: Callable[..., Any],
) -> None:
    """Checks are a group's: one group's tcp checks take its dead backend down; the other
    group, with checks off, leaves its own dead backend up (passive checks alone judge it)."""

    live = await Backend("live").start()
    try:
        config = parse_config(
            {
                "groups": [
                    {"name": "checked", "health_check": {
                        "type": "tcp", "interval_seconds": 0.05, "timeout_seconds": 0.05,
                        "rise": 1, "fall": 1},
                     "backends": [{"name": "gone", "address": f"127.0.0.1:{dead_port()}"},
                                  {"name": "live", "address": live.address}]},
                    {"name": "unchecked",
                     "backends": [{"name": "gone2", "address": f"127.0.0.1:{dead_port()}"}]},
                ],
                "listeners": [{"name": "http", "bind": "127.0.0.1:0", "group": "checked"}],
            },
            "checks.toml",
        )  # fmt: skip
        balancer, _ = await balancer_factory(config)
        assert balancer.checker is not None
        async with asyncio.timeout(5):
            while {b["name"]: b["state"] for b in balancer.backends_view()}["gone"] != "down":
                await asyncio.sleep(0.01)
        states = {b["name"]: b["state"] for b in balancer.backends_view()}
        assert states == {"gone": "down", "live": "up", "gone2": "up"}
        assert [spec.type for spec in balancer.checker.specs] == ["tcp", "tcp", "none"]
    finally:
        live.close()


class ClosesWhenIdle(asyncio.Protocol):
    """Answers each request, then closes the connection 20 ms later: its keep-alive timeout."""

    connections = 0

    def connection_made(self, transport: Any) -> None:
        type(self).connections += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        asyncio.get_running_loop().call_later(0.02, self.transport.close)


async def test_a_kept_connection_the_backend_closes_while_idle_is_let_go_and_recorded(
    balancer_factory: Callable[..., Any],
) -> None:
    kind = type("Closes", (ClosesWhenIdle,), {"connections": 0})
    server = await asyncio.get_running_loop().create_server(kind, "127.0.0.1", 0)
    try:
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        config = parse_config(
            {
                "backends": [{"name": "b1", "address": address}],
                "listeners": [
                    {"name": "http", "bind": "127.0.0.1:0",
                     "routes": [{"path_prefix": "/", "group": "default"}]},
                ],
            },
            "t.toml",
        )  # fmt: skip
        balancer, _ = await balancer_factory(config)
        closed: list[Any] = []
        published = asyncio.Event()
        publish = balancer.idle.publish

        def publish_and_tell(record: Any) -> None:
            publish(record)
            closed.append(record)
            published.set()

        balancer.idle.publish = publish_and_tell
        client = await Client.connect(port_of(balancer, "http"))
        assert (await client.request(path="/one")).status == 200
        await asyncio.wait_for(published.wait(), 5)  # the kept connection, closed idle
        assert [(r.backend, r.close_cause) for r in closed] == [("b1", "backend_closed")]
        assert (await client.request(path="/two")).status == 200  # on a new connection
        await client.close()
    finally:
        server.close()
    assert kind.connections == 2
