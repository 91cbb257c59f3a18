"""`pip install .` ships the whole package: every subpackage and module of the tree, importable
from the installed copy (a subpackage left out of pyproject's package list would be missing
from the wheel while the editable install the other tests use still finds it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import balancer
names = [m.name for m in pkgutil.walk_packages(balancer.__path__, "balancer.")]
for name in names:
    if name != "balancer.__main__":  # (it runs the command line)
        importlib.import_module(name)
print(json.dumps({"file": balancer.__file__, "modules": names}))
"""


@pytest.mark.e2e
def test_pip_install_imports_every_subpackage(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-deps", "--target", str(target), str(ROOT)],
        check=True, timeout=300, env={**os.environ, "BALANCER_MYPYC": "0"},
    )  # fmt: skip
    # Run from elsewhere, the installed copy first on the path (the dependencies come from
    # this interpreter's site-packages, after it).
    shown = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    installed = json.loads(shown.stdout)
    assert installed["file"].startswith(str(target))
    tree = {
        "balancer." + ".".join(path.relative_to(ROOT / "balancer").with_suffix("").parts)
        for path in (ROOT / "balancer").rglob("*.py")
        if path.name != "__init__.py"
    } | {
        "balancer." + ".".join(path.parent.relative_to(ROOT / "balancer").parts)
        for path in (ROOT / "balancer").rglob("*/__init__.py")
    }
    assert set(installed["modules"]) == tree
