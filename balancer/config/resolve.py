"""Backends named by host names, resolved: at `balancer check`, at start and at each reload.

`resolve_backends(config)` asks the system's resolver (getaddrinfo: /etc/hosts, then DNS, as
nsswitch.conf says) for each backend whose address is a name, and returns the configuration
with addresses only, so nothing downstream (pools, the shared tables, checks, records) ever
resolves. A name with one address keeps its backend's name; a name with several gives one
backend per address, named `<name>@<address>` (nginx's `server name:port` in an upstream does
the same: each address balanced and checked on its own), each with the configured weight.
A name that does not resolve is a configuration error naming it: `check` fails, `run` does
not start, a reload keeps the running generation. Names are not re-resolved while running
(service discovery by DNS is another piece of work).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from balancer.config.schema import BackendConfig, Config, ConfigError
from balancer.config.values import Address, is_ip_address

Lookup = Callable[..., list[tuple[Any, ...]]]


def resolve_backends(config: Config, lookup: Lookup | None = None) -> Config:
    """`config` with every backend host name replaced by its addresses (see the module
    docstring); ConfigError naming each name that does not resolve. `lookup`: getaddrinfo's
    stand-in (tests); the system's resolver by default."""
    lookup = lookup or socket.getaddrinfo
    problems: list[str] = []
    groups = []
    changed = False
    for group in config.groups:
        backends: list[BackendConfig] = []
        for backend in group.backends:
            host, port = backend.address.host, backend.address.port
            # localhost stays one backend whose addresses are tried in turn (server.py): it
            # names ::1 and 127.0.0.1 on most machines, and a server listens on one of them.
            if host == "localhost" or is_ip_address(host):
                backends.append(backend)
                continue
            changed = True
            try:
                infos = lookup(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as error:
                problems.append(
                    f"{config.source}: backend {backend.name!r}: address = "
                    f"{str(backend.address)!r}: {host!r} does not resolve ({error}); add it to "
                    "DNS or /etc/hosts, or give an IP address"
                )
                continue
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if len(addresses) == 1:
                backends.append(replace(backend, address=Address(addresses[0], port)))
            else:
                backends.extend(
                    replace(backend, name=f"{backend.name}@{each}", address=Address(each, port))
                    for each in addresses
                )
        groups.append(replace(group, backends=tuple(backends)))
    if problems:
        raise ConfigError(problems)
    return replace(config, groups=tuple(groups)) if changed else config
