from __future__ import annotations

from pathlib import Path

import pytest

from balancer.certs import CertPaths, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """Tests make their own CA and certificate; they never read certs/."""
    return make_certs(Path(tmp_path_factory.mktemp("certs")))
