"""What the client sessions of one listener share: settings, the loop's services, state.

Three objects, each with one kind of content, so a reader knows what may change under them:
- `ListenerSettings`: frozen once built from the configuration (timeouts resolved per
  deadline kind, head limits, whether requests are dispatched one by one).
- `LoopServices`: one per event loop (per worker), shared by every listener: the clock, the
  deadline wheel, the write batch, the backend groups (pool and connector each), the idle
  backend connections, the publishers and id counters.
- `ListenerState`: what changes as the listener runs: its open sessions, its counters,
  whether it is draining.
Built by server.py; read by session.py and the objects a session is made of.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from balancer.backend.connection import IdlePool
from balancer.backend.groups import Group, Router
from balancer.client.exchange import ExchangeSettings
from balancer.config.listeners import ListenerConfig
from balancer.config.schema import Limits, Timeouts
from balancer.config.values import Network
from balancer.facts.causes import (
    BACKEND_TIMEOUT,
    FIRST_BYTES_TIMEOUT,
    HEADER_TIMEOUT,
    IDLE_TIMEOUT,
    TUNNEL_IDLE_TIMEOUT,
)
from balancer.facts.record import ConnectionRecord, RequestRecord
from balancer.net.deadlines import DeadlineWheel, Wakeable
from balancer.net.writebatch import WriteBatch
from balancer.wire.http1 import HeadLimits, RequestReader

if TYPE_CHECKING:
    from balancer.backend.pool import Lease
    from balancer.facts.record import ConnectionRecord


class _Leasing(Protocol):
    @property
    def lease(self) -> Lease | None: ...


class _Flowing(Protocol):
    @property
    def busy(self) -> bool: ...


class OpenConnection(Protocol):
    """A listener's open connection (a session.ClientSession), as the worker's shutdown, its
    admin view and the drainer see it."""

    record: ConnectionRecord

    @property
    def phase(self) -> int:
        """session.Phase (an IntEnum): ordered, only forward."""

    @property
    def tunnel(self) -> bool: ...

    @property
    def http(self) -> _Flowing | None: ...

    @property
    def fwd(self) -> _Leasing: ...

    def close_client(self, cause: str, backend_closes: bool = False) -> None: ...

    def drain(self) -> None: ...

    def force_close(self) -> None: ...


# Deadline kinds: what a session can wait for. session.DEADLINES is their table (the timeout
# bounding each, what passing it does); a kind that ends the connection is its close cause.
TLS_HANDSHAKE: Final = "tls_handshake_timeout"
HEADER: Final = HEADER_TIMEOUT
IDLE: Final = IDLE_TIMEOUT
RESPONSE: Final = BACKEND_TIMEOUT
TUNNEL_IDLE: Final = TUNNEL_IDLE_TIMEOUT
LINGER: Final = "linger"
FIRST_BYTES: Final = FIRST_BYTES_TIMEOUT  # a PROXY header, or a ClientHello to route by SNI


def _ignore_request(record: RequestRecord) -> None:
    pass


@dataclass(frozen=True)
class ListenerSettings:
    """One listener's configuration, as the sessions use it."""

    listener: ListenerConfig
    timeouts: Timeouts
    limits: Limits
    ssl_context: ssl.SSLContext | None
    # Each request is given a backend connection of its own (from the idle pool or new): an
    # http listener whose requests are routed, or whose group reuses connections. Otherwise
    # (and in tcp mode) one backend connection serves the whole client connection.
    dispatch: bool = False
    hashed_header: bytes | None = None  # a header its groups' policy hash reads (http1.py)
    # Each deadline kind's timeout, from `timeouts` (session.deadline_seconds).
    deadline_seconds: Mapping[str, float] = field(kw_only=True)
    head_limits: HeadLimits = field(init=False)
    # Read at every accept (session.await_prelude), so resolved once here.
    accept_proxy_from: tuple[Network, ...] = field(init=False)
    routes_by_sni: bool = field(init=False)  # a tcp listener routing TLS by SNI, passed through
    h2c: bool = field(init=False)  # HTTP/2 with prior knowledge on this plain listener

    def __post_init__(self) -> None:
        limits = self.limits
        head_limits = HeadLimits(
            max_header_bytes=limits.max_header_bytes,
            max_uri_bytes=limits.max_uri_bytes,
            max_headers=limits.max_header_fields,
            max_body_bytes=limits.max_body_bytes,
            hashed_header=self.hashed_header,
        )
        object.__setattr__(self, "head_limits", head_limits)
        object.__setattr__(self, "accept_proxy_from", self.listener.accept_proxy_from)
        sni = any(route.sni is not None for route in self.listener.routes)
        object.__setattr__(self, "routes_by_sni", sni)
        object.__setattr__(self, "h2c", self.listener.h2c)


@dataclass
class LoopServices:
    """What one event loop gives every session, whatever its listener."""

    groups: dict[str, Group]  # by name
    deadlines: DeadlineWheel[Wakeable]  # one deadline per session, on one wheel
    writes: WriteBatch  # relayed bytes go out when the loop's round ends
    publish: Callable[[ConnectionRecord], None]
    next_id: Callable[[], int]
    worker_pid: int
    # Backend connections between exchanges (reuse modes), and those being closed and
    # published: the dead ones retries give up, routed reuse-never ones let go.
    idle: IdlePool
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    publish_request: Callable[[RequestRecord], None] = _ignore_request
    next_request_id: Callable[[], int] = itertools.count(1).__next__
    # Kept here because every get_running_loop() costs a getpid() syscall (Python 3.11).
    loop: asyncio.AbstractEventLoop | None = None
    idle_readers: list[RequestReader] = field(default_factory=list)  # see READER_POOL_ABOVE


@dataclass
class ListenerState:
    """What changes as one listener runs."""

    connections: set[OpenConnection] = field(default_factory=set)
    accepted_total: int = 0
    rejected_total: int = 0
    draining: bool = False
    # Set once bound: getsockname() for a port every accepted socket shares is a syscall saved.
    local_port: int | None = None


class ListenerContext:
    """A session's view of its listener: the three objects above, its router over the loop's
    groups, and what is derived from them once per listener rather than per connection."""

    __slots__ = ("exchange_settings", "router", "services", "settings", "state")

    def __init__(
        self, settings: ListenerSettings, services: LoopServices, state: ListenerState | None = None
    ) -> None:
        self.settings = settings
        self.services = services
        self.state = state if state is not None else ListenerState()
        listener, groups = settings.listener, services.groups
        self.router = Router(
            [(route, groups[route.group]) for route in listener.routes], groups[listener.group]
        )
        self.exchange_settings = ExchangeSettings(
            services.next_request_id, services.clock, services.publish_request, settings.dispatch
        )

    @property
    def listener(self) -> ListenerConfig:
        return self.settings.listener

    @property
    def connections(self) -> set[OpenConnection]:
        return self.state.connections
