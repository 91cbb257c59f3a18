"""`Balancer`: builds everything from a Config, binds the listeners, drains on shutdown.

Everything that can fail on bad configuration (TLS files, policy) is built in `__init__`, so a
bad config fails before anything is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Final, Protocol

from prometheus_client import CollectorRegistry

from balancer.backend.connection import IdlePool
from balancer.backend.discovery import Discovery, discovery_for
from balancer.backend.groups import build_groups
from balancer.backend.health import HealthChecker, checker_for
from balancer.backend.pool import BackendTable, PeerCounts
from balancer.backend.state import Backend, BackendState
from balancer.client.drain import Drainer, watch
from balancer.client.listener import ListenerContext, ListenerSettings, LoopServices
from balancer.client.session import ClientSession, deadline_seconds, state_of
from balancer.config.listeners import ListenerConfig
from balancer.config.schema import Config, ConfigError, HealthCheck
from balancer.facts.record import BackendConnectionRecord, ConnectionRecord
from balancer.net import tcpinfo
from balancer.net.accept import (
    SelectorAcceptor,
    bind_sockets,
    refuse_new_handshakes,
    serve_acceptors,
    take_waiting,
)
from balancer.net.deadlines import DeadlineWheel, Wakeable
from balancer.net.tls import server_context
from balancer.net.writebatch import WriteBatch
from balancer.observe.admin import AdminServer
from balancer.observe.metrics import (
    DnsMetrics,
    HealthMetrics,
    ListenerTotals,
    Observer,
    StateCollector,
)
from balancer.wire.proxy_protocol import encode_local

log = logging.getLogger("balancer")

ACCESS_LOG_FLUSH_SECONDS: Final = 1.0
# uvloop's timers have millisecond granularity; firing a little late keeps a wheel slot from
# being looked at before its time (and re-armed, in a spin, until it is due).
DEADLINE_SLACK_SECONDS: Final = 0.001
BACKLOG: Final = 4096
# At shutdown, after new handshakes are refused: the time given to those under way (their
# client's ACK is one round trip away) before the accept queue is taken and the port closed.
HANDSHAKES_SETTLE_SECONDS: Final = 0.1


class StartError(Exception):
    """A listener could not be bound; the message names it, its address and what to do."""


def bind_failure(name: str, host: str, port: int, error: OSError) -> StartError:
    """The bind error as an operator needs it: which listener, which address, the likely fix."""
    where = f"{name} listener on {host}:{port}"
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        hint = (
            f"another process holds the port (`ss -ltnp 'sport = :{port}'` shows which): "
            "stop it or choose another address"
        )
    elif error.errno == errno.EACCES and 0 < port < 1024:
        hint = (
            "ports below 1024 need privilege: run as root, give the interpreter "
            "`setcap cap_net_bind_service=+ep` (on the real python3 binary), set "
            "`AmbientCapabilities=CAP_NET_BIND_SERVICE` in its systemd unit, or use a port "
            "from 1024 up"
        )
    elif error.errno == errno.EADDRNOTAVAIL:
        hint = "no interface of this machine has that address"
    else:
        hint = "check the address"
    return StartError(f"cannot listen: {where}: {reason}; {hint}")


class Listening(Protocol):
    """What the balancer needs of a bound listener: `asyncio.Server` or a `SelectorAcceptor`."""

    def close(self) -> None: ...


def resolve_once(host: str, port: int) -> tuple[str, ...]:
    """The addresses a backend's host names, resolved at start-up as nginx and HAProxy do.

    Handed a name, the loop would resolve it on every connect, through a thread pool (libuv's,
    or asyncio's executor): a lookup and a thread hand-off per client connection, ~40% more
    CPU per connection for a `localhost` backend, and threads in a process that has none.
    A name that does not resolve now is left to resolve at connect time (and fail there).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        log.warning(
            "backend %s:%d does not resolve (%s); trying at each connect", host, port, error
        )
        return ()
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


class Balancer:
    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        access_log: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_contexts: SSLContexts | None = None,
        peers: PeerCounts | None = None,
        table: BackendTable | None = None,
    ) -> None:
        """`ssl_context`: built from the config unless given (the supervisor builds it once
        for all its workers, so a session ticket one issues the others resume). `peers`: the
        other workers' leases per backend, for least connections (pool.PeerCounts).
        `table`: the supervisor's BackendTable (checks' verdicts, operator states and
        weights); a lone Balancer keeps its own, and runs its own checker if checks are
        configured."""
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.access_log = access_log
        backends = backends_of(config)
        self.checker: HealthChecker | None = None
        self.discovery: Discovery | None = None
        if table is None:
            table = BackendTable.of(backends)
            specs = checks_of(config)
            if any(spec.type != "none" for spec in specs):
                metrics = HealthMetrics(self.registry)
                self.checker = checker_for(backends, specs, table, metrics, check_firsts(config))
            self.discovery = discovery_for(config, backends, table, DnsMetrics(self.registry))
        self.observer = Observer(self.registry, access_log)
        self.observer.request_log = config.request_log
        self.observer.expect(_listeners_and_backends(config, backends))
        self._drained = asyncio.Event()
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.deadlines: DeadlineWheel[Wakeable] = DeadlineWheel(self._arm_deadlines)
        self.writes = WriteBatch(self._call_soon)
        ids = itertools.count(1)
        if ssl_contexts is None:
            ssl_contexts = build_ssl_contexts(config)
        worker_pid = os.getpid()
        self.groups = build_groups(
            config, backends, peers, table, worker_pid, self.deadlines, self.writes, clock
        )
        dispatch = {x.name: dispatches(config, x) for x in config.listeners}
        # Backend connections between exchanges (dispatching listeners), one pool a worker; it
        # also closes and publishes the dead ones a retry leaves behind (any listener).
        self.idle = IdlePool(
            config.upstream, config.timeouts.linger_seconds, self.deadlines, clock,
            self._publish_backend_connection, self._call_later,
        )  # fmt: skip
        self.services = LoopServices(
            groups=self.groups,
            deadlines=self.deadlines,
            writes=self.writes,
            publish=self._publish,
            next_id=ids.__next__,
            worker_pid=worker_pid,
            clock=clock,
            idle=self.idle,
            publish_request=self.observer.publish_request,
            next_request_id=itertools.count(1).__next__,
        )
        self.contexts = [
            ListenerContext(
                ListenerSettings(
                    listener=listener,
                    timeouts=config.timeouts,
                    limits=config.limits,
                    ssl_context=ssl_contexts.get(listener.name),
                    dispatch=dispatch[listener.name],
                    hashed_header=_hashed_header(config, listener),
                    deadline_seconds=deadline_seconds(config.timeouts),
                ),
                self.services,
            )
            for listener in config.listeners
        ]
        self.registry.register(
            StateCollector(
                self._listener_totals, self.backend_states, self._idle_count, self._state_of
            )
        )
        self.servers: list[Listening] = []
        # The client listeners' own sockets and session factories: at shutdown the connections
        # the kernel has accepted for us are taken before a socket closes (see take_waiting).
        self._client_listeners: list[tuple[socket.socket, Callable[[], asyncio.BaseProtocol]]] = []
        self._acceptors: dict[str, list[SelectorAcceptor]] = {}
        self._own_sockets: dict[str, list[socket.socket]] = {}  # by listener, while binding
        self._owns_sockets = True  # bound here, not handed over by a supervisor
        self.addresses: dict[str, tuple[str, int]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.drainer = Drainer(
            [(self.groups[g.name], g.drain_seconds) for g in config.groups],
            lambda: (s for ctx in self.contexts for s in ctx.connections),
            self._call_later,
        )
        self._watcher: asyncio.Task[None] | None = None
        self.draining = False  # shutdown has begun (a flag: _publish reads it per connection)

    def backend_states(self) -> list[BackendState]:
        return [state for group in self.groups.values() for state in group.pool.states]

    def _arm_deadlines(self, at: float) -> None:
        """The one loop timer behind every connection's deadline (see net/deadlines.py)."""
        loop = self._loop or asyncio.get_running_loop()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        delay = at - self._clock() + DEADLINE_SLACK_SECONDS
        self._deadline_timer = loop.call_at(loop.time() + delay, self._deadlines_due)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        (self._loop or asyncio.get_running_loop()).call_soon(callback)

    def _call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return (self._loop or asyncio.get_running_loop()).call_later(delay, callback)

    def _publish_backend_connection(self, record: BackendConnectionRecord) -> None:
        self.observer.publish_backend_connection(record, time.time())

    def _deadlines_due(self) -> None:
        self._deadline_timer = None
        for owner in self.deadlines.pop_due(self._clock()):
            owner.on_deadline()
        at = self.deadlines.next_wake()
        if at is not None:
            self._arm_deadlines(at)

    def _publish(self, record: ConnectionRecord) -> None:
        self.observer.publish(record)
        if self.draining and not any(ctx.connections for ctx in self.contexts):
            self._drained.set()

    def _listener_totals(self) -> list[ListenerTotals]:
        return [
            ListenerTotals(
                c.listener.name,
                c.state.accepted_total,
                c.state.rejected_total,
                len(c.connections),
                sum(a.resource_errors for a in self._acceptors.get(c.listener.name, ())),
            )
            for c in self.contexts
        ]

    async def start(self, inherited: Mapping[str, list[socket.socket]] | None = None) -> None:
        """Listen on every listener (and the admin endpoint); port 0 picks one, logged here.
        A worker is handed its listeners' sockets, bound by the supervisor (`inherited`, by
        listener name); the supervisor serves the admin endpoint then."""
        self._owns_sockets = inherited is None
        if self.discovery is not None:  # the discovered groups' first members, before serving
            await self.discovery.first()
        for ctx in self.contexts:
            bind, name = ctx.listener.bind, ctx.listener.name
            self.services.loop = self._loop = asyncio.get_running_loop()
            factory = functools.partial(ClientSession, ctx)
            sockets = inherited[name] if inherited is not None else None
            servers = await self._listen(name, bind.host, bind.port, factory, sockets)
            self._client_listeners += [(sock, factory) for sock in self._own_sockets.pop(name, [])]
            ports = {
                sock.getsockname()[1]
                for server in servers
                for sock in getattr(server, "sockets", None) or []
            }
            ctx.state.local_port = ports.pop() if len(ports) == 1 else None
            if ctx.settings.ssl_context is not None:  # ClientHello arrival from the kernel's stamps
                for server in servers:
                    for sock in getattr(server, "sockets", None) or []:
                        tcpinfo.enable_receive_timestamps(sock)
        if self.config.admin is not None and inherited is None:
            admin = AdminServer.of_registry(
                self.registry, self.connections_view, self.backends_view
            )

            def admin_protocol() -> asyncio.BaseProtocol:
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(), admin.handle)

            bind = self.config.admin
            await self._listen("admin", bind.host, bind.port, admin_protocol)
        if inherited is None:  # (else the supervisor says where it listens)
            for name, (host, port) in self.addresses.items():
                log.info("listening: %s on %s:%d", name, host, port)
        if self.access_log is not None:
            self._flusher = asyncio.create_task(self._flush_access_log())
        if self.checker is not None:
            self.checker.start()
        if self.discovery is not None:
            self.discovery.attach(self.checker)
            self.discovery.start()
        if self.drainer.groups:
            self._watcher = asyncio.create_task(watch(self.drainer))

    async def _listen(
        self,
        name: str,
        host: str,
        port: int,
        factory: Callable[[], asyncio.BaseProtocol],
        socks: list[socket.socket] | None = None,
    ) -> list[Listening]:
        loop = asyncio.get_running_loop()
        servers: list[Listening]
        try:
            if socks is None:
                socks = bind_sockets(host, port, BACKLOG)
            if isinstance(loop, asyncio.SelectorEventLoop):  # see net/accept.py
                acceptors = serve_acceptors(loop, socks, factory, name)
                self._acceptors[name] = acceptors
                servers = list(acceptors)
            else:
                servers = [
                    await loop.create_server(factory, sock=sock, backlog=BACKLOG) for sock in socks
                ]
            self._own_sockets[name] = socks
        except OSError as error:
            for server in self.servers:  # those bound before this one
                server.close()
            raise bind_failure(name, host, port, error) from None
        self.servers.extend(servers)
        self.addresses[name] = _bound(servers[0])
        return servers

    async def _flush_access_log(self) -> None:
        assert self.access_log is not None
        while True:
            await asyncio.sleep(ACCESS_LOG_FLUSH_SECONDS)
            self.access_log.flush()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting; finish requests in flight (`Connection: close` on their responses);
        close idle connections at once; after `grace` seconds close whatever is left."""
        grace = self.config.timeouts.shutdown_grace_seconds if grace is None else grace
        self.draining = True
        for ctx in self.contexts:
            ctx.state.draining = True  # from here every response says close
            for conn in list(ctx.connections):
                conn.drain()
        # Closing a listening socket resets the connections in its accept queue, requests
        # sent and all (ab -c 50: ~45 per SIGTERM). So: no new handshakes (SYNs dropped),
        # a moment for those under way to complete, then take the queue, then close.
        listeners = self._client_listeners
        # (A worker's sockets are shared with the supervisor and the next generation: refusing
        # handshakes is the supervisor's to do, and only when it stops for good.)
        if (
            self._owns_sockets
            and listeners
            and all(refuse_new_handshakes(sock) for sock, _ in listeners)
        ):
            await asyncio.sleep(min(HANDSHAKES_SETTLE_SECONDS, grace))
        taken = [task for sock, factory in listeners for task in take_waiting(sock, factory)]
        for server in self.servers:
            server.close()
        # A connection the loop accepted before the close meets its session in a callback
        # queued since: let those run, so it is waited for below, not served after the worker
        # has sent its final metrics page (it went missing from /metrics after reloads).
        await asyncio.sleep(0)
        if taken:
            await asyncio.wait(taken, timeout=grace)
        # Until none is left: the event may have been set in a moment with none open, before
        # a connection taken above (or accepted as the listeners closed) met its session.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(ctx.connections for ctx in self.contexts):
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                left = sum(len(ctx.connections) for ctx in self.contexts)
                log.warning("shutdown grace over: closing %d connections", left)
                for ctx in self.contexts:
                    for conn in list(ctx.connections):
                        conn.force_close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), timeout=1.0)
                break
        if self.discovery is not None:
            await self.discovery.stop()
        if self.checker is not None:
            await self.checker.stop()
        # The pooled backend connections, by FIN and linger.
        await self.idle.close_all(self.config.timeouts.linger_seconds + 0.1)
        if self._flusher is not None:
            self._flusher.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if self.access_log is not None:
            self.access_log.flush()

    async def serve(self, on_started: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully. SIGUSR1 reopens the access
        log (after logrotate has moved it), as nginx's USR1 does."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # before binding: no signal is lost
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_access_log)
        await self.start()
        if on_started is not None:
            on_started()
        await stop.wait()
        log.info("shutting down: draining connections")
        await self.shutdown()
        log.info("stopped")

    def reopen_access_log(self) -> None:
        """Flush and close the access log and open its path again; on failure keep the old."""
        path, old = self.config.access_log, self.access_log
        if old is None or path is None or path == "-":
            return
        old.flush()
        try:
            new = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held until the next reopen)
        except OSError as error:
            log.error("access log: cannot reopen %s (%s); still writing to the old file", path,
                      error.strerror)  # fmt: skip
            return
        self.access_log = self.observer.access_log = new
        old.close()
        log.info("access log reopened: %s", path)

    def connections_view(self) -> dict[str, Any]:
        now = time.monotonic()
        open_now = [
            {
                "id": conn.record.id,
                "listener": conn.record.listener,
                "state": state_of(conn),
                "client": f"{conn.record.client_ip}:{conn.record.client_port}",
                "backend": conn.record.backend,
                "age_seconds": now - conn.record.accepted_at,
                "requests": conn.record.requests,
            }
            for ctx in self.contexts
            for conn in ctx.connections
            if conn.record is not None
        ]
        return {
            "open": open_now,
            "recent_closed": [record.to_dict() for record in self.observer.recent],
        }

    def _idle_count(self, backend: str) -> int:
        return len(self.idle.idle.get(backend, ()))

    def _state_of(self, state: BackendState) -> str:
        """What this worker sees of a backend now: one of pool.BACKEND_STATES."""
        for group in self.groups.values():
            pool = group.pool
            if state in pool.states:
                index = pool.first + pool.states.index(state)
                word = pool.table.state(index) if pool.table is not None else "up"
                return "ejected" if word == "up" and state.down_until > self._clock() else word
        return "up"

    def backends_view(self) -> list[dict[str, Any]]:
        view = []
        now = self._clock()
        for group in self.groups.values():
            group.pool.refresh(now)  # (a discovered slot's member, before any pick reads it)
            table = group.pool.table
            for index, s in enumerate(group.pool.states, group.pool.first):
                view.append({
                    "name": s.name,
                    "group": group.name,
                    "address": "" if s.backend.slot and not s.backend.port else s.backend.address,
                    "weight": table.weight(index) if table is not None else s.weight,
                    "active": s.active,
                    "connections_total": s.connections_total,
                    "connect_failures_total": s.connect_failures_total,
                    "idle_connections": self._idle_count(s.name),
                    "state": table.state(index) if table is not None else "up",
                    # Passive checks: this worker skips it for this long (0: it does not).
                    "ejected_seconds": round(max(0.0, s.down_until - now), 1),
                })  # fmt: skip
        return view


def _hashed_header(config: Config, listener: ListenerConfig) -> bytes | None:
    """The header whose value each request head must carry for the listener's groups that
    hash a header or a cookie (policy "hash"); ConfigError if they want two."""
    names = _groups_of(listener)
    wanted = {
        group.hash_key.partition(":")[2].lower() if group.hash_key.startswith("header:")
        else "cookie"
        for group in config.groups
        if group.name in names and group.policy == "hash"
        and group.hash_key.startswith(("header:", "cookie:"))
    }  # fmt: skip
    if len(wanted) > 1:
        raise ConfigError([f"{config.source}: listener {listener.name!r}: its groups hash "
                           f"{len(wanted)} headers ({', '.join(sorted(wanted))}); one a "
                           "listener: give them the same hash_key"])  # fmt: skip
    return wanted.pop().encode() if wanted else None


def _listeners_and_backends(
    config: Config, backends: list[Backend]
) -> list[tuple[str, bool, list[str]]]:
    """Each listener's name, whether it speaks HTTP, and the backends its groups hold."""
    by_group: dict[str, list[str]] = {}
    for backend in backends:
        by_group.setdefault(backend.group, []).append(backend.name)
    return [
        (listener.name, listener.mode == "http",
         [name for group in _groups_of(listener) for name in by_group.get(group, [])])
        for listener in config.listeners
    ]  # fmt: skip


def _groups_of(listener: ListenerConfig) -> list[str]:
    """The groups a listener sends to: its own, then its routes', each once."""
    return list(dict.fromkeys([listener.group, *(route.group for route in listener.routes)]))


def backends_of(config: Config) -> list[Backend]:
    """The configured backends, their names resolved once (see resolve_once)."""
    return [
        Backend(b.name, host, port, b.weight, (host,), b.backup, group.name, slot=True)
        if group.discover is not None
        else Backend(b.name, host, port, b.weight, resolve_once(host, port), b.backup, group.name)
        for group in config.groups
        for b in group.backends
        for host, port in [(b.address.host, b.address.port)]
    ]


def checks_of(config: Config) -> list[HealthCheck]:
    """Each backend's active check (its group's), in the order of `backends_of`."""
    return [group.health_check for group in config.groups for _ in group.backends]


def check_firsts(config: Config) -> list[bytes]:
    """What each backend's checks send first: a group that sends PROXY headers sends its
    servers one on checks too (v1 UNKNOWN, v2 LOCAL), or a server that requires them on every
    connection would fail every check."""
    return [
        encode_local(group.send_proxy) if group.send_proxy != "none" else b""
        for group in config.groups
        for _ in group.backends
    ]


def dispatches(config: Config, listener: ListenerConfig) -> bool:
    """Whether the listener gives each request a backend connection of its own: an http
    listener that routes requests (each may go to another group), or whose group reuses
    connections. Otherwise one backend connection serves a whole client connection."""
    if listener.mode != "http":
        return False
    group = next(group for group in config.groups if group.name == listener.group)
    return bool(listener.routes) or group.reuse != "never"


SSLContexts = dict[str, ssl.SSLContext]  # TLS listeners' contexts, by listener name


def build_ssl_contexts(config: Config) -> SSLContexts:
    """Each TLS listener's context: [tls]'s, shared, or (a listener with certificates of its
    own) one of its own. Raises what loading the certificates and keys does."""
    tls = config.tls
    listeners = [x for x in config.listeners if x.tls]
    if tls is None or not listeners:
        return {}
    contexts: SSLContexts = {}
    shared: dict[tuple[str, ...], ssl.SSLContext] = {}  # [tls]'s, one a distinct ALPN offer
    for index, listener in enumerate(config.listeners):
        if not listener.tls:
            continue
        alpn = list(listener.alpn) or None
        if listener.certificates:
            where = f"listeners[{index}].certificates"
            pairs = [(f"{where}[{i}]", *pair) for i, pair in enumerate(listener.certificates)]
            contexts[listener.name] = server_context(tls, alpn, pairs)
        else:
            if listener.alpn not in shared:
                shared[listener.alpn] = server_context(tls, alpn)
            contexts[listener.name] = shared[listener.alpn]
    return contexts


def _bound(server: Listening) -> tuple[str, int]:
    sockets = getattr(server, "sockets", None) or []
    host, port = sockets[0].getsockname()[:2]
    return host, port
