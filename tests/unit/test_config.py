"""Configuration: every bad key is named with its value and what was expected."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from balancer.config.overrides import Overrides, apply_overrides
from balancer.config.schema import ConfigError, parse_config
from balancer.config.values import Address, parse_address
from balancer.demo.run import demo_config
from balancer.process.server import Balancer

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"listeners": [{"bind": "127.0.0.1:8080"}], "backends": [{"address": "127.0.0.1:9001"}]}


def problems(table: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(table, "bad.toml")
    return caught.value.problems


def test_minimal_config_gets_production_defaults() -> None:
    config = parse_config(MINIMAL, "ok.toml")
    assert config.listeners[0].bind == Address("127.0.0.1", 8080)
    assert config.listeners[0].protocol == "http" and config.listeners[0].mode == "http"
    assert config.backends[0].name == "127.0.0.1:9001"
    assert config.groups[0].policy == "round_robin"
    assert config.tls is None
    assert config.timeouts.client_header_seconds == 10
    assert config.timeouts.tls_handshake_seconds == 10
    assert config.event_loop == "uvloop" and config.workers == "auto"


def test_workers_is_a_count_or_auto() -> None:
    assert parse_config({**MINIMAL, "workers": 4}, "ok.toml").workers == 4
    assert parse_config({**MINIMAL, "workers": "auto"}, "ok.toml").workers == "auto"


def test_https_listener_gets_tls_defaults() -> None:
    table = {**MINIMAL, "listeners": [{"bind": "0.0.0.0:443", "protocol": "https"}]}
    tls = parse_config(table, "ok.toml").tls
    assert tls is not None
    assert (tls.cert, tls.key) == ("certs/server.crt", "certs/server.key")
    assert tls.min_version == "1.2" and tls.max_version is None
    assert tls.ciphers == "ECDHE+AESGCM:ECDHE+CHACHA20"


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        ({"bogus": 1}, "bogus", "known keys"),
        ({"policy": "random"}, "policy", "'round_robin' or 'least_connections'"),
        ({"listeners": [{"bind": "nowhere"}]}, "listeners[0].bind", "an address"),
        ({"listeners": [{"bind": "1.2.3.4:99999"}]}, "listeners[0].bind", "an address"),
        (
            {"listeners": [{"bind": "127.0.0.1:80", "protocol": "ftp"}]},
            "listeners[0].protocol",
            "'http' or 'https'",
        ),
        ({"listeners": [{"bind": "127.0.0.1:80", "mode": "udp"}]}, "listeners[0].mode", "tcp"),
        ({"listeners": [{"bind": "127.0.0.1:80", "hue": 1}]}, "listeners[0].hue", "known"),
        ({"backends": [{"address": "127.0.0.1:0"}]}, "backends[0].address", "1 to 65535"),
        ({"backends": [{"address": "127.0.0.1:1", "weight": 0}]}, "backends[0].weight", "positive"),
        ({"backends": [{"address": "127.0.0.1:1", "weight": "2"}]}, "backends[0].weight", "whole"),
        ({"backends": []}, "backends", "at least one"),
        ({"listeners": []}, "listeners", "at least one"),
        ({"timeouts": {"connect_seconds": -1}}, "timeouts.connect_seconds", "positive number"),
        ({"timeouts": {"connect": 5}}, "timeouts.connect", "known keys"),
        ({"timeouts": {"linger_seconds": 0}}, "timeouts.linger_seconds", "positive number"),
        ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes", "whole number"),
        ({"limits": {"max_connections": 1.5}}, "limits.max_connections", "whole number"),
        ({"tls": {"min_version": "1.0"}}, "tls.min_version", "'1.2' or '1.3'"),
        ({"tls": {"min_version": "1.3", "max_version": "1.2"}}, "tls.max_version", ">="),
        ({"tls": {"session_tickets": "yes"}}, "tls.session_tickets", "true or false"),
        ({"workers": 0}, "workers", "or 'auto'"),
        ({"workers": 1000}, "workers", "up to 256"),
        ({"workers": "many"}, "workers", "or 'auto'"),
        ({"event_loop": "trio"}, "event_loop", "'uvloop' or 'asyncio'"),
        ({"admin": "localhost"}, "admin", "an address"),
        ({"upstream": {"reuse": "sometimes"}}, "upstream.reuse", "'never' or 'safe' or 'always'"),
        ({"upstream": {"idle": 3}}, "upstream.idle", "known keys"),
        ({"upstream": {"idle_per_backend": 0}}, "upstream.idle_per_backend", "whole number"),
        ({"upstream": {"idle_timeout_seconds": 0}}, "upstream.idle_timeout_seconds", "seconds"),
        (
            {"upstream": {"max_requests_per_connection": 1.5}},
            "upstream.max_requests_per_connection",
            "whole number",
        ),
        ({"upstream": "always"}, "upstream", "an [upstream] table"),
        ({"upstream": {"retries": -1}}, "upstream.retries", "a whole number (0: never)"),
        ({"upstream": {"retries": True}}, "upstream.retries", "a whole number (0: never)"),
        ({"request_log": "yes"}, "request_log", "true or false"),
        (
            {
                "backends": [
                    {"name": "x", "address": "127.0.0.1:1"},
                    {"name": "x", "address": "127.0.0.1:2"},
                ]
            },
            "backends.name",
            "differ",
        ),
    ],
)
def test_each_bad_key_is_named_with_what_was_expected(change, key, expected) -> None:
    found = problems({**MINIMAL, **change})
    assert any(p.startswith(f"bad.toml: {key} = ") and expected in p for p in found), found


def test_two_listeners_or_the_admin_on_one_address_are_refused_by_check() -> None:
    backends = [{"address": "127.0.0.1:1"}]

    def found(listeners: list[dict], **more: object) -> list[str]:
        try:
            parse_config({"listeners": listeners, "backends": backends, **more}, "bad.toml")
        except ConfigError as error:
            return error.problems
        return []

    same = found([{"name": "a", "bind": "127.0.0.1:80"}, {"name": "b", "bind": "127.0.0.1:80"}])
    assert same == ["bad.toml: listeners.b.bind = '127.0.0.1:80': expected an address no other "
                    "listener binds (a does)"]  # fmt: skip
    wildcard = found([{"name": "a", "bind": "0.0.0.0:80"}, {"name": "b", "bind": "10.0.0.1:80"}])
    assert len(wildcard) == 1 and "(a does)" in wildcard[0]
    admin = found([{"name": "a", "bind": "127.0.0.1:8404"}], admin=8404)
    assert admin == ["bad.toml: admin = 8404: expected an address no listener binds (a does)"]
    apart = [{"name": "a", "bind": "[::]:80"}, {"name": "b", "bind": "127.0.0.1:80"}]
    assert not found(apart)  # v6-only wildcard, v4 address: both bind
    assert not found([{"name": "a", "bind": "127.0.0.1:0"}, {"name": "b", "bind": "127.0.0.1:0"}])


def test_a_group_with_no_backends_is_refused() -> None:
    table = {
        "listeners": [{"name": "http", "bind": "127.0.0.1:0", "group": "g"}],
        "groups": [{"name": "g", "backends": []}],
    }
    (problem,) = problems(table)
    assert problem.startswith("bad.toml: groups[0].backends = []: expected at least one backend")


def test_a_near_miss_key_gets_a_did_you_mean() -> None:
    (problem,) = problems({**MINIMAL, "healthcheck": {"type": "tcp"}})
    assert problem.startswith("bad.toml: healthcheck = ")
    assert problem.endswith("; did you mean 'health_check'?")
    (far,) = problems({**MINIMAL, "colour": "blue"})
    assert "did you mean" not in far


def test_retries_may_be_turned_off() -> None:
    assert parse_config({**MINIMAL, "upstream": {"retries": 0}}, "t.toml").upstream.retries == 0
    assert parse_config(MINIMAL, "t.toml").upstream.retries == 2


def test_all_problems_are_reported_at_once() -> None:
    found = problems({**MINIMAL, "policy": "x", "workers": 0, "admin": "nowhere"})
    assert len(found) == 3


def test_addresses() -> None:
    assert parse_address("[::1]:443") == Address("::1", 443)
    assert parse_address("localhost:80") == Address("localhost", 80)
    assert str(Address("::1", 443)) == "[::1]:443"
    for bad in ("example.com:80", "127.0.0.1", ":80", "[::1]", 80):
        with pytest.raises((ValueError, TypeError)):
            parse_address(bad)


def test_flags_override_the_file() -> None:
    table = {
        "listeners": [{"name": "web", "bind": "0.0.0.0:80", "mode": "tcp"}],
        "backends": [{"address": "10.0.0.1:80"}],
        "policy": "round_robin",
    }
    merged = apply_overrides(
        table,
        Overrides(
            http="127.0.0.1:0",
            https="127.0.0.1:8443",
            backends=("127.0.0.1:9001", "127.0.0.1:9002"),
            policy="least_connections",
            cert="c.pem",
        ),
    )
    config = parse_config(merged, "f.toml")
    assert [(x.name, str(x.bind), x.protocol, x.mode) for x in config.listeners] == [
        ("web", "127.0.0.1:0", "http", "tcp"),  # the file's listener, with the bind given
        ("https", "127.0.0.1:8443", "https", "http"),
    ]
    assert [str(b.address) for b in config.backends] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert config.groups[0].policy == "least_connections"
    assert config.tls is not None and config.tls.cert == "c.pem"
    assert table["policy"] == "round_robin"  # the file's table is not modified


GROUPED = {
    "listeners": [
        {"name": "front", "bind": "0.0.0.0:80", "group": "api",
         "routes": [{"host": "static.example", "group": "static"}]},
        {"name": "secure", "bind": "0.0.0.0:443", "tls": True, "group": "api"},
    ],
    "groups": [
        {"name": "api", "backends": [{"name": "a1", "address": "10.0.0.1:80"}]},
        {"name": "static", "backends": [{"name": "s1", "address": "10.0.0.2:80"}]},
    ],
    "tls": {"cert": "c.pem", "key": "k.pem"},
}  # fmt: skip


def test_quick_listener_flags_on_a_file_with_groups_keep_the_listeners_group_and_routes() -> None:
    merged = apply_overrides(GROUPED, Overrides(http="127.0.0.1:8080", https="127.0.0.1:8443"))
    config = parse_config(merged, "f.toml")
    front, secure = config.listeners  # (tls = true is the https one: not replaced by --http)
    assert (front.name, str(front.bind), front.group) == ("front", "127.0.0.1:8080", "api")
    assert [route.group for route in front.routes] == ["static"]
    assert (secure.name, str(secure.bind), secure.tls) == ("secure", "127.0.0.1:8443", True)


def test_quick_flags_that_would_do_nothing_or_guess_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"--backend: the file's backends are in \[\[groups\]\]"):
        apply_overrides(GROUPED, Overrides(backends=("127.0.0.1:9001",)), "f.toml")
    two = {**GROUPED, "listeners": [*GROUPED["listeners"], {"name": "alt", "bind": ":81"}]}
    with pytest.raises(ConfigError, match=re.escape("f.toml: --http 127.0.0.1:1: the file has 2")):
        apply_overrides(two, Overrides(http="127.0.0.1:1"), "f.toml")


def test_shipped_config_files_are_valid() -> None:
    for name in ("balancer.toml", "demo.toml"):
        table = tomllib.loads((ROOT / "config" / name).read_text())
        parse_config(table, name)


def test_demo_toml_is_what_balancer_demo_runs() -> None:
    table = tomllib.loads((ROOT / "config" / "demo.toml").read_text())
    assert parse_config(table, "demo") == replace(demo_config(), source="demo")


def test_an_admin_port_alone_listens_on_loopback() -> None:
    for value in (8404, ":8404"):
        config = parse_config({**MINIMAL, "admin": value}, "ok.toml")
        assert config.admin == Address("127.0.0.1", 8404)


def test_a_backend_may_be_a_backup() -> None:
    table = {**MINIMAL, "backends": [{"address": "127.0.0.1:1"},
                                     {"address": "127.0.0.1:2", "backup": True}]}  # fmt: skip
    assert [b.backup for b in parse_config(table, "ok.toml").backends] == [False, True]


def test_a_listener_says_tls_and_mode_apart_and_protocol_still_reads() -> None:
    def listener(**keys: object) -> object:
        table = {**MINIMAL, "listeners": [{"bind": "127.0.0.1:5223", **keys}],
                 "tls": {"cert": "c.pem", "key": "k.pem"}}  # fmt: skip
        return parse_config(table, "ok.toml").listeners[0]

    direct_tls = listener(tls=True, mode="tcp")  # XMPP's 5223: TLS, then a TCP relay
    assert (direct_tls.tls, direct_tls.mode) == (True, "tcp")
    assert listener(mode="tcp").tls is False  # a plain TCP listener says nothing of http
    assert listener(protocol="https").tls is True  # the older word
    with pytest.raises(ConfigError) as caught:
        listener(tls=False, protocol="https")
    assert "listeners[0].protocol" in caught.value.problems[0]


def test_hash_keys_are_checked_and_need_policy_hash() -> None:
    config = parse_config({**MINIMAL, "policy": "hash", "hash_key": "cookie:sid",
                           "hash_balance_factor": 1.25}, "ok.toml")  # fmt: skip
    assert (config.groups[0].hash_key, config.groups[0].hash_balance_factor) == ("cookie:sid", 1.25)
    assert parse_config({**MINIMAL, "policy": "hash"}, "ok.toml").groups[0].hash_key == "client_ip"
    found = problems(
        {**MINIMAL, "policy": "hash", "hash_key": "header:", "hash_balance_factor": 0.5}
    )
    assert any("hash_key = 'header:': expected 'client_ip', 'uri'" in p for p in found), found
    assert any("hash_balance_factor = 0.5" in p and "at least 1" in p for p in found), found
    (said,) = problems({**MINIMAL, "hash_key": "uri"})  # round robin would ignore it
    assert "hash_key = 'uri': expected policy = 'hash' beside it" in said


def test_a_listener_whose_groups_hash_two_headers_is_refused() -> None:
    table = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "group": "a",
                       "routes": [{"path_prefix": "/b", "group": "b"}]}],
        "groups": [
            {"name": "a", "policy": "hash", "hash_key": "header:X-User",
             "backends": [{"name": "a1", "address": "127.0.0.1:9001"}]},
            {"name": "b", "policy": "hash", "hash_key": "cookie:sid",
             "backends": [{"name": "b1", "address": "127.0.0.1:9002"}]},
        ],
    }  # fmt: skip
    config = parse_config(table, "two.toml")
    with pytest.raises(ConfigError, match="its groups hash 2 headers"):
        Balancer(config)
