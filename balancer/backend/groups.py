"""Backend groups as a worker runs them, and the routing rules that choose one.

A `Group` is one named set of backends (config.GroupConfig): its pool (policy, leases,
passive checks), its connector (connect timeout, attempts) and its reuse mode. Every group's
backends sit in the worker's shared tables (pool.PeerCounts, pool.BackendTable) one group
after another, so a backend has one place whatever group it is in.

A `Router` is one listener's rules, tried in file order, first match wins, and the
listener's default group otherwise (HAProxy's `use_backend ... if` and `default_backend`;
nginx's `server_name` and `location` prefixes). Pure: it sees bytes and names, never sockets.
- http listeners route each request by its Host (the authority of an absolute-form target,
  or the Host header; port dropped, case folded) and its target's path prefix;
- tcp listeners without TLS route each connection by the SNI of its ClientHello
  (passthrough: the bytes go on untouched; see sni.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from balancer.backend.connector import Connector
from balancer.backend.policies import POLICIES, ConsistentHash
from balancer.backend.pool import BackendPool, BackendTable, PeerCounts
from balancer.backend.state import Backend
from balancer.config.listeners import RouteConfig
from balancer.config.schema import (
    CONN_FAILURE,
    EMPTY_RESPONSE,
    RESPONSE_TIMEOUT,
    Config,
)
from balancer.net.deadlines import DeadlineWheel, Wakeable
from balancer.net.writebatch import WriteBatch
from balancer.wire.backend_head import origin_form


class Group:
    """One backend group in one worker."""

    __slots__ = (
        "connector", "hash_key", "name", "pool", "response_seconds", "retries", "retry_on_empty",
        "retry_on_timeout", "reuse", "send_proxy",
    )  # fmt: skip

    def __init__(
        self, name: str, pool: BackendPool, connector: Connector, reuse: str,
        response_seconds: float, send_proxy: str = "none", retries: int = 0,
        retry_on: tuple[str, ...] = (), hash_key: str | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.send_proxy = send_proxy  # none, v1, v2: a PROXY header on each connection
        self.pool = pool
        self.connector = connector
        self.reuse = reuse  # never, safe, always (HAProxy's http-reuse)
        self.response_seconds = response_seconds  # backend silence while a response is due
        self.retries = retries  # re-sends of a request that got no response byte (forward.py)
        self.retry_on_empty = EMPTY_RESPONSE in retry_on  # its connection ended (FIN or RST)
        self.retry_on_timeout = RESPONSE_TIMEOUT in retry_on  # backend_response_seconds passed
        self.hash_key = hash_key  # policy "hash": what it hashes (forward.hash_key); else None

    def __repr__(self) -> str:
        return f"Group({self.name!r}, reuse={self.reuse!r})"


def build_groups(
    config: Config,
    backends: Sequence[Backend],
    peers: PeerCounts | None,
    table: BackendTable,
    worker_pid: int,
    deadlines: DeadlineWheel[Wakeable],
    writes: WriteBatch,
    clock: Callable[[], float],
) -> dict[str, Group]:
    """Each configured group's pool and connector, in one worker; their backends sit one
    group after another in `backends` and the shared tables."""
    groups: dict[str, Group] = {}
    first = 0
    next_id = itertools.count(1).__next__  # backend connection ids, one series a worker
    retries, attempts = config.upstream, config.limits.max_connect_attempts  # ([upstream])
    for group in config.groups:
        mine = backends[first : first + len(group.backends)]
        check, timeouts = group.health_check, group.timeouts
        policy = POLICIES[group.policy]()
        if isinstance(policy, ConsistentHash):
            policy.balance_factor = group.hash_balance_factor
        policy.members(mine)  # (the ring: every backend, as configured)
        pool = BackendPool(
            mine, policy, timeouts.backend_down_seconds, peers, table,
            check.passive_fall, check.eject_max_seconds, check.slow_start_seconds, first,
        )  # fmt: skip
        pool.count_5xx = check.passive_5xx
        pool.count_timeouts = check.passive_timeouts
        connector = Connector(
            pool, timeouts, attempts if CONN_FAILURE in retries.retry_on else 1,
            deadlines, writes, clock, next_id, worker_pid,
        )  # fmt: skip
        groups[group.name] = Group(
            group.name, pool, connector, group.reuse, timeouts.backend_response_seconds,
            group.send_proxy, retries.retries, retries.retry_on,
            group.hash_key if group.policy == "hash" else None,
        )  # fmt: skip
        first += len(mine)
    return groups


def host_of(host_header: bytes) -> bytes:
    """The host part of a Host header value (or an authority), lower case, without the port:
    `Example.COM:8080` → `example.com`, `[::1]:80` → `[::1]`."""
    host = host_header.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end >= 0 else host
    name, colon, port = host.rpartition(b":")
    return name if colon and port.isdigit() else host


def name_matches(pattern: str, name: str) -> bool:
    """`example.com` matches itself; `*.example.com` any name under it (not itself)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


class Router:
    """One listener's routing rules over its groups (see the module docstring)."""

    __slots__ = ("default", "rules")

    def __init__(self, rules: Sequence[tuple[RouteConfig, Group]], default: Group) -> None:
        self.default = default
        self.rules = [
            (
                rule.host,
                None if rule.path_prefix is None else rule.path_prefix.encode(),
                rule.sni,
                group,
            )
            for rule, group in rules
        ]

    def for_request(self, host_header: bytes | None, target: bytes) -> Group:
        if not self.rules:
            return self.default
        host = None
        path = origin_form(target)[0]  # (the head was read: a bad target never gets here)
        for pattern, prefix, _sni, group in self.rules:
            if prefix is not None and not path.startswith(prefix):
                continue
            if pattern is not None:
                if host is None:
                    host = host_of(host_header or b"").decode("latin-1")
                if not name_matches(pattern, host):
                    continue
            return group
        return self.default

    def for_server_name(self, server_name: str | None) -> Group:
        """A tcp connection's group by the SNI of its ClientHello (None: none sent)."""
        name = (server_name or "").lower()
        for _host, _prefix, pattern, group in self.rules:
            if pattern is not None and server_name is not None and name_matches(pattern, name):
                return group
        return self.default
