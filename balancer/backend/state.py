"""What the farm is made of: configured backends and their live state."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backend:
    """One server of the farm, as configured."""

    name: str
    host: str
    port: int
    weight: int = 1
    # The addresses `host` resolved to at start-up, in the resolver's order, tried in turn on
    # each connect (as create_connection does with a name). Not given: `host` itself.
    connect_hosts: tuple[str, ...] = ()
    backup: bool = False  # picked only while no other backend is up
    group: str = "default"  # the group it serves in (config.GroupConfig)
    # A slot of a discovered group (config/dns.py): its member, address and weight are the
    # resolver's, in the shared BackendTable; empty until it has one.
    slot: bool = False
    # "host:port" ("[v6]:port"), made once: every connection's record holds it.
    address: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "address", f"{host}:{self.port}")
        if not self.connect_hosts:
            object.__setattr__(self, "connect_hosts", (self.host,))


class BackendState:
    """A backend's live counters. Only `BackendPool` changes `active`; policies only read.

    `down_until` is the passive-failure mark (nginx's `max_fails=1 fail_timeout`): a backend that
    refused or timed out a connect is skipped until then, unless every backend is marked.
    """

    __slots__ = (
        "active",
        "back_at",
        "backend",
        "connect_failures_total",
        "connections_total",
        "down_until",
        "ejections",
        "ejections_total",
        "failures",
        "name",
        "peer_active",
        "ready",
        "weight",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # Its name, kept (not a property): a policy reads it for every candidate of every pick.
        # A discovered slot's member changes `backend`, never the name.
        self.name = backend.name
        self.active = 0  # this worker's leases
        self.peer_active = 0  # the other workers' (pool.PeerCounts), as last read
        self.weight = backend.weight  # as configured, or as an operator set it (BackendTable)
        self.failures = 0  # requests failed on it in a row (passive checks)
        self.ejections = 0  # ejections in a row, each twice as long as the one before
        self.ejections_total = 0
        self.back_at = float("-inf")  # when it came back into service (slow start)
        self.ready = True
        self.down_until = 0.0
        self.connections_total = 0
        self.connect_failures_total = 0

    @property
    def load(self) -> int:
        """Leases on the backend across every worker: what least connections compares."""
        return self.active + self.peer_active

    def __repr__(self) -> str:
        return f"BackendState({self.name!r}, active={self.active}, ready={self.ready})"
