"""The opt-in compiled build: `BALANCER_MYPYC=1 pip install .` compiles the connection path
with mypyc (the modules below); without it the package is pure Python and needs no compiler.
The rest of the metadata is pyproject.toml's; _build_backend.py adds mypy to the build's
requirements only when the variable asks for a compiled build."""

from __future__ import annotations

import os

from setuptools import setup

# Every module a connection runs through, from accept to the record's publication. The
# process side (cli, supervisor, worker, admin, control, health checks, certs, demo) runs
# once or rarely and stays interpreted: compiling it buys nothing and costs build time.
COMPILED = [
    "accept", "backends", "deadlines", "drain", "errors", "exchange", "forward", "groups",
    "http1", "http1_response", "http_flow", "legs", "listener", "loglines", "observe", "pool",
    "policies", "prelude", "proxy_protocol", "record", "server", "session", "sni", "tcpinfo",
    "tls", "tls_front", "tunnel", "upstream", "writebatch",
]  # fmt: skip

ext_modules = []
if os.environ.get("BALANCER_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(
        [f"balancer/{name}.py" for name in COMPILED],
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
    )

setup(ext_modules=ext_modules)
