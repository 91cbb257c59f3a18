"""setuptools' build backend, asking for mypy (and the runtime dependencies it type-checks the
package against) only when BALANCER_MYPYC=1 asks for the compiled build (setup.py). A plain
`pip install .` stays pure Python and needs no compiler: mypy's, black's and
charset-normalizer's pattern."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F403 (the other hooks, as setuptools has them)

MYPY = "mypy==2.4.1"  # the version the project type-checks with (pyproject's test extra)


def _compiled_requires() -> list[str]:
    if os.environ.get("BALANCER_MYPYC") != "1":
        return []
    project = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["project"]
    return ["wheel", MYPY, *project["dependencies"]]


# setuptools' own hooks run setup.py to find its requirements, which would import mypyc
# before it is installed: a compiled build names its requirements here instead.


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    compiled = _compiled_requires()
    return compiled or build_meta.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    compiled = _compiled_requires()
    return compiled or build_meta.get_requires_for_build_editable(config_settings)
