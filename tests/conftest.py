from __future__ import annotations

from pathlib import Path

import pytest

import balancer.client.session
from balancer.demo.certs import CertPaths, make_certs

# The compiled build (BALANCER_MYPYC=1, setup.py): the connection path's modules are
# extension modules. Its classes refuse stand-ins of other types and subclasses written in
# Python, and its calls between modules are bound at build time (monkeypatching a module's
# function does not reach them): the few tests built on such fakes run in the pure build.
COMPILED = not balancer.client.session.__file__.endswith(".py")


def pytest_report_header() -> str:
    return f"balancer build: {'compiled (mypyc)' if COMPILED else 'pure Python'}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not COMPILED:
        return
    skip = pytest.mark.skip(reason="a fake the compiled build cannot take (pure build only)")
    for item in items:
        if item.get_closest_marker("incompatible_with_mypyc") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """Tests make their own CA and certificate; they never read certs/."""
    return make_certs(Path(tmp_path_factory.mktemp("certs")))
