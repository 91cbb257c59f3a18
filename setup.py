"""The opt-in compiled build: `BALANCER_MYPYC=1 pip install .` compiles the connection path
with mypyc (the modules below) and builds one small C module (net/_fdsocket.c); without it
the package is pure Python and needs no compiler.
The rest of the metadata is pyproject.toml's; _build_backend.py adds mypy to the build's
requirements only when the variable asks for a compiled build."""

from __future__ import annotations

import os

from setuptools import Extension, setup

# Every module a connection runs through, from accept to the record's publication. The
# process side (cli, supervisor, worker, admin, control, health checks, certs, demo) runs
# once or rarely and stays interpreted: compiling it buys nothing and costs build time.
COMPILED = [
    "backend/connection", "backend/connector", "backend/groups", "backend/policies",
    "backend/pool", "backend/state",
    "client/drain", "client/exchange", "client/forward", "client/h2_flow", "client/h2_stream",
    "client/http_flow", "client/listener", "client/prelude", "client/session",
    "client/tls_front", "client/tunnel", "facts/record",
    "net/accept", "net/deadlines", "net/legs", "net/tcpinfo", "net/tls", "net/writebatch",
    "observe/families", "observe/loglines", "observe/metrics", "process/server",
    "wire/backend_head", "wire/errors", "wire/h2_connection", "wire/h2_fields",
    "wire/h2_frames", "wire/hpack_codec", "wire/http1", "wire/http1_response",
    "wire/proxy_protocol", "wire/response_reader", "wire/sni",
]  # fmt: skip

ext_modules = []
if os.environ.get("BALANCER_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(
        [f"balancer/{path}.py" for path in COMPILED],
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
    )
    # Socket calls on a borrowed descriptor without a socket object, whose constructor
    # costs a getsockname (net/tcpinfo.py: borrow): two syscalls fewer a connection.
    ext_modules.append(Extension("balancer.net._fdsocket", ["balancer/net/_fdsocket.c"]))

setup(ext_modules=ext_modules)
