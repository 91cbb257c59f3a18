"""The start-up descriptor budget: two per connection plus a reserve, warned about by key."""

from __future__ import annotations

import logging
import resource

import pytest

from balancer.cli import FD_RESERVE, budget_file_descriptors


def test_budget_raises_the_soft_limit_or_warns_naming_the_key(caplog) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        caplog.set_level(logging.INFO, "balancer")
        fits = (min(hard, 100000) - FD_RESERVE) // 2
        assert budget_file_descriptors(fits) >= 2 * fits + FD_RESERVE
        caplog.clear()
        too_many = hard  # needs 2 * hard: cannot fit under the hard limit
        if hard == resource.RLIM_INFINITY:
            pytest.skip("no hard descriptor limit here")
        budget_file_descriptors(too_many)
        assert "limits.max_connections" in caplog.text and "ulimit -n" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
