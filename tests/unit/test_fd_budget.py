"""The start-up descriptor budget: two per connection plus a reserve; a default that does not
fit the machine is lowered to what fits, an explicit one is warned about by key."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from balancer.cli import FD_RESERVE, budget_file_descriptors
from balancer.config.schema import parse_config


def config(max_connections: int | None = None):
    table = {"listeners": [{"bind": "127.0.0.1:0"}], "backends": [{"address": "127.0.0.1:1"}]}
    if max_connections is not None:
        table["limits"] = {"max_connections": max_connections}
    return parse_config(table, "test")


@pytest.fixture
def hard_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard descriptor limit here")
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_limit_that_fits_raises_the_soft_limit(hard_limit: int) -> None:
    fits = (min(hard_limit, 100000) - FD_RESERVE) // 2
    chosen, message, level = budget_file_descriptors(config(fits), True)
    assert chosen.limits.max_connections == fits and level == logging.INFO
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2 * fits + FD_RESERVE
    assert f"limits.max_connections = {fits}" in message


def test_an_explicit_limit_that_cannot_fit_is_warned_about_by_key(hard_limit: int) -> None:
    chosen, message, level = budget_file_descriptors(config(hard_limit), True)
    assert chosen.limits.max_connections == hard_limit  # the operator's choice stands
    assert level == logging.WARNING
    assert "limits.max_connections" in message and "ulimit -n" in message


def test_the_default_that_cannot_fit_is_lowered_to_fit_calmly(monkeypatch) -> None:
    # A machine whose hard limit is 1,000 (lowering the real one could not be undone).
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1000, 1000))
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: None)
    chosen, message, level = budget_file_descriptors(config(), False)
    assert chosen.limits.max_connections == (1000 - FD_RESERVE) // 2
    assert level == logging.INFO and "limits.max_connections is 468" in message
