"""The health state machine (rise, fall) and the [health_check] table."""

from __future__ import annotations

import pytest

from balancer.backend.health import DOWN, UP, Health
from balancer.config.schema import ConfigError, parse_config

MINIMAL = {"listeners": [{"bind": "127.0.0.1:80"}], "backends": [{"address": "127.0.0.1:1"}]}


def run(health: Health, results: str) -> list[str | None]:
    return [health.observe(r == "+") for r in results]


def test_fall_failures_in_a_row_take_it_down_and_rise_successes_bring_it_up() -> None:
    health = Health(rise=2, fall=3)
    assert run(health, "+--") == [None, None, None] and health.state == UP
    assert run(health, "-") == [DOWN]
    assert run(health, "+-+") == [None, None, None] and health.state == DOWN
    assert run(health, "+") == [UP]  # the last two in a row


def test_alternating_results_never_change_the_state() -> None:
    health = Health(rise=2, fall=2)
    assert run(health, "-+" * 10) == [None] * 20 and health.state == UP


def test_rise_and_fall_of_one_change_at_each_result() -> None:
    health = Health(rise=1, fall=1)
    assert run(health, "-+-") == [DOWN, UP, DOWN]


def test_the_health_check_table_and_its_status_ranges() -> None:
    check = parse_config(
        {**MINIMAL, "health_check": {"type": "http", "expect_status": "2xx, 301-302, 404",
                                     "method": "head", "body_contains": "ok"}},
        "x.toml",
    ).health_check  # fmt: skip
    assert check.expect_status == ((200, 299), (301, 302), (404, 404))
    assert (check.method, check.rise, check.fall, check.body_contains) == ("HEAD", 2, 3, "ok")
    assert parse_config(MINIMAL, "x.toml").health_check.type == "none"  # off unless asked


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"type": "icmp"}, "health_check.type"),
        ({"expect_status": "600"}, "health_check.expect_status"),
        ({"expect_status": "300-200"}, "health_check.expect_status"),
        ({"path": "health"}, "health_check.path"),
        ({"method": "GET /"}, "health_check.method"),
        ({"rise": 0}, "health_check.rise"),
        ({"interval_seconds": 1, "timeout_seconds": 2}, "health_check.timeout_seconds"),
        ({"every": 1}, "health_check.every"),
    ],
)
def test_a_bad_health_check_key_is_named(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**MINIMAL, "health_check": table}, "x.toml")
    assert any(problem.startswith(f"x.toml: {key}") for problem in caught.value.problems), (
        caught.value.problems
    )
