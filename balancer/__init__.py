"""balancer: an asyncio HTTP/HTTPS load balancer that shows each connection's handshakes
and teardown."""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"


def build() -> str:
    """Which build runs: the connection path compiled with mypyc (`BALANCER_MYPYC=1 pip
    install .`, setup.py), or pure Python. Found without importing the path's modules."""
    spec = importlib.util.find_spec("balancer.client.session")
    origin = spec.origin if spec is not None else None
    return "pure Python" if origin is None or origin.endswith(".py") else "compiled (mypyc)"
