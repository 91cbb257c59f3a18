"""Backends by name (issue 20, item 2): the address syntax, and resolve.resolve_backends over a
fake resolver; `balancer check` with a name that resolves (this machine's own) and one that
does not."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from balancer import cli
from balancer.config.resolve import resolve_backends
from balancer.config.schema import ConfigError, parse_config
from balancer.config.values import Address, backend_address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("web1.internal:8080", Address("web1.internal", 8080)),
        ("my_service:80", Address("my_service", 80)),  # a compose service name
        ("db.example.com.:5432", Address("db.example.com.", 5432)),
        ("10.0.0.11:8080", Address("10.0.0.11", 8080)),
        ("[::1]:443", Address("::1", 443)),
    ],
)
def test_a_backend_address_may_be_a_host_name(text: str, address: Address) -> None:
    assert backend_address(text) == address


@pytest.mark.parametrize(
    "text", ["web1", "http://web1:80", "web 1:80", "-web:80", "web..x:80", "web:99999", "1.2.3:80"]
)
def test_what_is_not_a_host_name_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        backend_address(text)


def test_a_listener_still_binds_an_address_not_a_name() -> None:
    table = {"listeners": [{"name": "http", "bind": "myhost:80"}], "backends": [{"address": "a:1"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(table, "t.toml")
    (problem,) = caught.value.problems
    assert problem.startswith("t.toml: listeners[0].bind = 'myhost:80': expected an address")


def config_with(*addresses: str, weight: int = 1) -> Any:
    return parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
            "backends": [
                {"name": f"web{i}", "address": a, "weight": weight}
                for i, a in enumerate(addresses, 1)
            ],
        },
        "t.toml",
    )


def fake_lookup(table: dict[str, list[str]]) -> Any:
    asked: list[str] = []

    def lookup(host: str, port: int, type: int = 0) -> list[tuple[Any, ...]]:
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, type, 6, "", (ip, port)) for ip in table[host]]

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


def test_a_name_with_one_address_keeps_its_backend_and_name() -> None:
    lookup = fake_lookup({"web1.internal": ["10.0.0.1"]})
    config = resolve_backends(config_with("web1.internal:8080", "10.0.0.2:80"), lookup)
    assert [(b.name, str(b.address)) for b in config.backends] == [
        ("web1", "10.0.0.1:8080"),
        ("web2", "10.0.0.2:80"),
    ]
    assert lookup.asked == ["web1.internal"]  # an IP address is not looked up


def test_a_name_with_several_addresses_is_one_backend_per_address() -> None:
    lookup = fake_lookup({"farm.internal": ["10.0.0.1", "10.0.0.2", "10.0.0.1"]})
    config = resolve_backends(config_with("farm.internal:8080", weight=3), lookup)
    assert [(b.name, str(b.address), b.weight) for b in config.backends] == [
        ("web1@10.0.0.1", "10.0.0.1:8080", 3),
        ("web1@10.0.0.2", "10.0.0.2:8080", 3),
    ]


def test_every_name_that_does_not_resolve_is_named_at_once() -> None:
    lookup = fake_lookup({})
    with pytest.raises(ConfigError) as caught:
        resolve_backends(config_with("a.internal:80", "b.internal:81"), lookup)
    first, second = caught.value.problems
    assert first.startswith("t.toml: backend 'web1': address = 'a.internal:80': 'a.internal'")
    assert "does not resolve (" in first and "add it to DNS or /etc/hosts" in first
    assert "'b.internal'" in second


def test_check_resolves_a_real_name_and_refuses_one_that_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    own = socket.gethostname()
    try:
        socket.getaddrinfo(own, 80)
    except OSError:
        pytest.skip(f"this machine's name ({own}) does not resolve here")
    config = tmp_path / "balancer.toml"
    config.write_text(
        '[[listeners]]\nname = "http"\nbind = "127.0.0.1:0"\n'
        f'[[backends]]\nname = "self"\naddress = "{own}:8080"\n'
    )
    assert cli.main(["check", "-c", str(config)]) == cli.EXIT_OK
    assert "config OK" in capsys.readouterr().out

    def nothing_resolves(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nothing_resolves)
    assert cli.main(["check", "-c", str(config)]) == cli.EXIT_CONFIG
    said = capsys.readouterr().err
    assert f"backend 'self': address = '{own}:8080': '{own}' does not resolve" in said
    assert "Traceback" not in said
