"""Backend groups in the configuration, and the router's rules (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from balancer.backend.groups import Group, Router, host_of
from balancer.config.listeners import RouteConfig
from balancer.config.schema import ConfigError, parse_config
from balancer.process.server import checks_of

LISTENER = {"name": "http", "bind": "127.0.0.1:8080"}


def group(name: str, *ports: int, **more: Any) -> dict[str, Any]:
    backends = [{"name": f"{name}{p}", "address": f"127.0.0.1:{p}"} for p in ports]
    return {"name": name, "backends": backends, **more}


def problems(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(table, "g.toml")
    return str(caught.value)


def test_a_single_farm_file_is_the_group_default() -> None:
    config = parse_config(
        {"listeners": [LISTENER], "backends": [{"address": "127.0.0.1:9001"}],
         "policy": "least_connections", "upstream": {"reuse": "safe"}},
        "old.toml",
    )  # fmt: skip
    (only,) = config.groups
    assert (only.name, only.policy, only.reuse) == ("default", "least_connections", "safe")
    assert config.listeners[0].group == "default"


def test_groups_take_the_files_defaults_and_override_them() -> None:
    config = parse_config(
        {
            "listeners": [{**LISTENER, "group": "api"}],
            "groups": [
                group("web", 9001, 9002),
                group("api", 9003, reuse="always", policy="least_connections",
                      timeouts={"connect_seconds": 0.5},
                      health_check={"type": "tcp", "rise": 1}),
            ],
            "upstream": {"reuse": "safe"},
            "timeouts": {"connect_seconds": 2, "backend_response_seconds": 30},
            "health_check": {"type": "http", "path": "/health", "fall": 5},
        },
        "g.toml",
    )  # fmt: skip
    web, api = config.groups
    assert web.reuse == "safe" and web.timeouts.connect_seconds == 2
    assert web.health_check.type == "http" and web.health_check.path == "/health"
    assert api.reuse == "always" and api.policy == "least_connections"
    assert api.timeouts.connect_seconds == 0.5 and api.timeouts.backend_response_seconds == 30
    check = api.health_check
    assert (check.type, check.rise, check.fall, check.path) == ("tcp", 1, 5, "/health")
    assert [b.name for b in config.backends] == ["web9001", "web9002", "api9003"]
    assert [spec.type for spec in checks_of(config)] == ["http", "http", "tcp"]  # per backend


def test_group_mistakes_are_named_with_their_fix() -> None:
    said = problems({
        "listeners": [LISTENER, {"name": "b", "bind": "127.0.0.1:81", "group": "nope"}],
        "groups": [group("web", 9001), group("api", 9001, policy="fastest"),
                   {"name": "web", "backends": []},
                   {"name": "x", "timeouts": {"client_header_seconds": 3}},
                   {"name": "y", "backends": [{"name": "web9001", "address": "127.0.0.1:1"}]}],
    })  # fmt: skip
    assert "g.toml: listeners[0].group = (missing): expected the group it sends to" in said
    assert "listeners[1].group = 'nope': expected the name of a group (web, api, web, x, y)" in said
    assert "groups[1].policy = 'fastest'" in said
    assert "groups.name = 'web': expected names that differ" in said
    assert "backends.name = 'web9001': expected names that differ" in said  # across groups
    assert "groups[3].backends = (missing): expected at least one backend" in said
    assert "groups[3].timeouts.client_header_seconds = 3: expected one of the known keys" in said
    said = problems({"listeners": [LISTENER], "groups": [group("web", 9001)], "policy": "x"})
    assert "policy = 'x': expected no top-level policy beside [[groups]]" in said


def test_route_mistakes_are_named() -> None:
    said = problems({
        "listeners": [
            {**LISTENER, "routes": [{"sni": "a.example", "group": "default"},
                                    {"group": "default"},
                                    {"host": "a b", "group": "other"}]},
            {"name": "t", "bind": "127.0.0.1:81", "mode": "tcp",
             "routes": [{"host": "a.example", "group": "default"}]},
            {"name": "s", "bind": "127.0.0.1:82", "mode": "tcp", "tls": True,
             "routes": [{"sni": "a.example", "group": "default"}]},
        ],
        "backends": [{"address": "127.0.0.1:9001"}],
        "tls": {"cert": "c", "key": "k"},
    })  # fmt: skip
    assert "listeners[0].routes[0].sni = 'a.example': expected host (and path_prefix)" in said
    assert "listeners[0].routes[1] = {'group': 'default'}: expected a condition" in said
    assert "listeners[0].routes[2].group = 'other': expected the name of a group" in said
    assert "listeners[0].routes[2].host = 'a b'" in said
    assert "listeners[1].routes[0].host = 'a.example': expected sni in a tcp listener" in said
    assert "listeners[2].routes[0].sni = 'a.example': expected a tcp listener without tls" in said


def test_the_host_of_what_a_client_sends() -> None:
    assert host_of(b"Example.COM:8080") == b"example.com"
    assert host_of(b"[::1]:80") == b"[::1]" and host_of(b"[::1]") == b"[::1]"
    assert host_of(b"example.com") == b"example.com"


@pytest.mark.incompatible_with_mypyc  # Groups without a pool or connector (None)
def test_the_first_matching_rule_wins_else_the_default() -> None:
    web, api, static = (Group(n, None, None, "never", 1.0) for n in ("web", "api", "static"))  # type: ignore[arg-type]
    router = Router(
        [
            (RouteConfig("api", host="api.example.com"), api),
            (RouteConfig("static", host="*.example.com", path_prefix="/s/"), static),
            (RouteConfig("static", path_prefix="/assets/"), static),
        ],
        web,
    )
    assert router.for_request(b"api.example.com", b"/s/x") is api
    assert router.for_request(b"www.EXAMPLE.com:80", b"/s/x") is static
    assert router.for_request(b"www.example.com", b"/t/x") is web
    assert router.for_request(b"example.com", b"/s/x") is web  # the wildcard: subdomains
    assert router.for_request(None, b"/assets/a") is static  # HTTP/1.0 without Host
    assert router.for_request(b"x", b"http://api.example.com/assets/a") is static
    sni = Router([(RouteConfig("api", sni="*.api.test"), api)], web)
    assert sni.for_server_name("eu.API.test") is api
    assert sni.for_server_name("api.test") is web and sni.for_server_name(None) is web


def test_arrays_of_tables_that_are_not_say_their_shape() -> None:
    said = problems({
        "listeners": [LISTENER, "x"],
        "groups": [{"name": "web", "backends": {"address": "127.0.0.1:1"}},
                   {"name": "api", "backends": ["127.0.0.1:2"]}],
        "tls": {"certificates": {"cert": "c"}},
    })  # fmt: skip
    assert "listeners[1] = 'x': expected a table with name, bind, tls, mode" in said
    assert "groups[0].backends = {'address': '127.0.0.1:1'}: expected an array of tables: " \
        "[[groups.backends]]" in said  # fmt: skip
    assert "groups[1].backends[0] = '127.0.0.1:2': expected a table with address" in said
    assert "tls.certificates = {'cert': 'c'}: expected an array of tables: " \
        "[[tls.certificates]]" in said  # fmt: skip


def test_a_listeners_own_certificates_are_for_a_tls_listener() -> None:
    said = problems({
        "listeners": [{**LISTENER, "certificates": [{"cert": "c.pem", "key": "k.pem"}]},
                      {"name": "s", "bind": "127.0.0.1:81", "tls": True,
                       "certificates": {"cert": "c.pem"}}],
        "backends": [{"address": "127.0.0.1:9001"}],
    })  # fmt: skip
    assert "listeners[0].certificates = [{'cert': 'c.pem', 'key': 'k.pem'}]: expected " \
        "tls = true on this listener" in said  # fmt: skip
    assert "listeners[1].certificates = {'cert': 'c.pem'}: expected an array of tables: " \
        "[[listeners.certificates]]" in said  # fmt: skip
    config = parse_config({
        "listeners": [{**LISTENER, "tls": True,
                       "certificates": [{"cert": "a.pem", "key": "a.key"}]}],
        "backends": [{"address": "127.0.0.1:9001"}],
    }, "ok.toml")  # fmt: skip
    assert config.listeners[0].certificates == (("a.pem", "a.key"),)
