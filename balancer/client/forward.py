"""The forwarder: how one client session gets its backend connection, and gives it back.

Theory of operation
-------------------
Reuse `never` (and tcp listeners): one backend connection for the whole client connection,
picked and connected with the first request head (tcp: at accept or after the TLS handshake).
Bytes that arrive meanwhile wait in `pending`; client reads pause while connecting.

Dispatch (HTTP listeners whose requests are routed to groups, or whose group reuses backend
connections; `ListenerSettings.dispatch`): each exchange gets a backend connection of its
own, from the group its route names, one exchange at a time.

    head ──► activate(): a lease from the group's pool (the policy's pick) ──► an idle
             connection to that backend (always; safe: after this client's first request)
                                    └─ none idle, or reuse never: connect ──────► use()
    response done ──► hand_back(): the lease is released, the connection goes to the idle
                      pool (or is closed: reuse never, its response said so, or it sent
                      stray bytes)

Either way, a backend connection that ends (FIN or RST) before any byte of the response to
the request it carried, idempotent and kept for replay, gets that request sent again on a new
connection to another backend (retry(); nginx's proxy_next_upstream, HAProxy's retry-on
empty-response with redispatch): a backend that dies under load costs its clients nothing.

The session decides when; the forwarder does the backend side of it. The request bytes of
each exchange are routed by `route()`: straight to the active connection, or kept in the
exchange until one is its.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from balancer.backend.connection import BackendConnection, KeptConnection
from balancer.backend.connector import Connecting
from balancer.backend.pool import Lease
from balancer.backend.state import BackendState
from balancer.client.exchange import REPLAY_MAX_BYTES, Exchange
from balancer.client.listener import TUNNEL_IDLE, ListenerContext
from balancer.facts.causes import (
    CONN_BACKEND_CLOSED,
    CONN_BACKEND_RESET,
    CONN_BACKEND_TIMEOUT,
    CONN_DEAD_ON_REUSE,
    CONN_NOT_REUSABLE,
    CONN_REUSE_NEVER,
)
from balancer.facts.record import failed_on
from balancer.wire.errors import BackendError, NoBackendAvailable
from balancer.wire.http1 import ResponseFramer
from balancer.wire.proxy_protocol import TLSFacts, encode_v1, encode_v2

if TYPE_CHECKING:
    from balancer.backend.groups import Group
    from balancer.client.contract import ForwarderSession

log = logging.getLogger("balancer")


class Forwarder:
    """The backend side of one client session (see the module docstring)."""

    __slots__ = (
        "backend", "chosen", "connecting", "dispatch", "kept", "lease", "pending", "served",
        "session",
    )  # fmt: skip

    def __init__(self, session: ForwarderSession) -> None:
        self.session = session
        # A backend connection per exchange (see the module docstring). Kept, unlike the
        # context below: it is read on every request and about ten times a connection.
        self.dispatch = session.ctx.settings.dispatch
        self.chosen: Group | None = None  # routed (request, SNI); None: the listener's group
        self.lease: Lease | None = None
        self.backend: BackendConnection | None = None
        self.connecting: Connecting | None = None  # a connect under way (connector.py)
        self.pending: list[bytes] | None = None  # never: for the backend, while connecting
        self.served = 0  # requests given a backend connection (safe mode: the first is new)
        # Dispatch, reuse never (a routed listener): the connection of the last exchange, kept
        # for the next request to the same group (see hand_back).
        self.kept: KeptConnection | None = None

    # Read through the session, not kept: every slot is 8 bytes on each idle connection.
    @property
    def ctx(self) -> ListenerContext:
        return self.session.ctx

    @property
    def group(self) -> Group:
        """The group the backend connection is (to be) from."""
        return self.chosen or self.session.ctx.router.default

    # ---- connecting ------------------------------------------------------------------------

    def connect(self, first: Lease | None = None, avoid: BackendState | None = None) -> None:
        """Connect to a backend the policy picks (`first`: this lease's backend first;
        `avoid`: not this one, unless no other is ready); connect_done or connect_failed
        follows."""
        session = self.session
        session.block_reading("connecting")
        loop = self.ctx.services.loop or asyncio.get_running_loop()
        # Connect attempts count on the connection's record, or (reuse modes) the request's.
        attempts = session.exchanges.queue[0].record if self.dispatch else session.record
        group = self.group  # (a retry's: the same; set before the connect began)
        self.connecting = group.connector.start(
            self, session, attempts, loop, first, avoid, hash_key(session, group)
        )

    def connect_failed(self, error: BackendError) -> None:
        self.connecting = None
        if not self.session.closing:
            self.session.fail(error)

    def connect_done(self, lease: Lease, backend: BackendConnection) -> None:
        self.connecting = None
        session, group = self.session, self.group
        if session.closing:  # the client went away while we connected
            lease.release()
            if self.dispatch and group.reuse != "never":
                # fresh and clean: another request may have it
                self.ctx.services.idle.put(backend, lease.state.active)
            else:
                backend.leg.transport.abort()
            return
        if group.send_proxy != "none":  # before any byte of the client's
            backend.leg.write(proxy_header(session, group.send_proxy))
        if self.dispatch:
            self.use(lease, backend, reused=False)
        else:
            self._connected(lease, backend)

    def _connected(self, lease: Lease, backend: BackendConnection) -> None:
        """Reuse never: the connection's one backend connection is up."""
        session = self.session
        self.lease = lease
        self.backend = backend
        record = session.record
        record.backend_connection = backend.record
        backend.record.requests = record.requests
        session.exchanges.forwarded(backend.record, False, False)
        pending, self.pending = self.pending, None
        if pending:
            backend.leg.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if session.client_eof and session.tunnel:  # the client half-closed while we connected
            backend.leg.shutdown()
        if session.closing:
            return
        if session.tunnel:
            session.set_deadline(TUNNEL_IDLE)
        else:
            session.arm_client_deadline()
        session.unblock_reading("connecting")
        if backend.lost_early is not None or backend.leg.facts.peer_fin_at is not None:
            self.took_up(backend)

    def client_full(self, full: bool) -> None:
        """The client's socket buffer filled (drained): the backend is not read meanwhile."""
        backend = self.backend
        if backend is not None:
            if full:
                backend.leg.pause("client_full")
            else:
                backend.leg.resume("client_full")

    def took_up(self, backend: BackendConnection) -> None:
        """What the connection did between its connect and now, it does now: a backend that
        hung up (FIN) or was lost (a killed one's RST) as we connected is handled as if
        it happened after (a retry, or the error), not left to the response deadline."""
        reset = backend.lost_early
        if reset is not None:
            backend.lost_early = None
            self.session.backend_lost(backend, reset)
        elif backend.leg.facts.peer_fin_at is not None and not self.session.backend_eof:
            self.session.on_backend_eof(backend)

    def send_requests(self, data: bytes) -> None:
        """Reuse never: request bytes for the one backend connection. While they are the only
        unanswered request's, a copy is kept for a retry (see retry); pipelined ones are not
        sent again."""
        queue = self.session.exchanges.queue
        if len(queue) == 1:
            exchange = queue[0]
            replay = exchange.replay  # (Exchange.keep_for_replay, inline: once per request)
            if replay is not None:
                too_long = len(replay) + len(data) > REPLAY_MAX_BYTES
                exchange.replay = None if too_long else replay + data
        else:
            for exchange in queue:
                exchange.replay = None
        backend = self.backend
        if backend is not None:
            backend.leg.write(data)
        else:
            self.send(data)  # kept while it connects

    def send(self, data: bytes) -> None:
        """Reuse never, tunnels: to the one backend connection (kept while it connects)."""
        backend = self.backend
        if backend is None:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            return
        backend.leg.write(data)

    def new_heads(self) -> None:
        """Reuse never: new request heads go out on the connection's backend connection, or
        are the first, which picks and connects it."""
        backend = self.backend
        if backend is not None:
            backend_record = backend.record
            self.session.exchanges.forwarded(backend_record, backend_record.requests > 0, False)
            backend_record.requests = self.session.record.requests
        elif self.connecting is None:
            self.connect()

    # ---- reuse modes: one backend connection per exchange ----------------------------------

    def route(self, out: bytes, ends: list[int]) -> None:
        """Hand each request's bytes to its exchange (`ends`: where requests end in `out`),
        straight to the backend connection of the active one."""
        start = 0
        for end in ends:
            self._to_exchange(out[start:end], done=True)
            start = end
        ends.clear()
        if start < len(out):
            self._to_exchange(out[start:] if start else out, done=False)

    def _to_exchange(self, data: bytes, done: bool) -> None:
        exchange = self.session.exchanges.filling()
        if exchange is None:
            return  # (cannot happen: a request's bytes start with its head)
        exchange.keep_for_replay(data)
        if exchange.pending is None and self.backend is not None:
            self.backend.leg.write(data)
        elif exchange.pending is not None:
            exchange.pending.append(data)
        exchange.request_done = done

    def activate(self) -> None:
        """Give the oldest waiting exchange a backend connection: an idle one (always; safe:
        after this client's first request) or a new one."""
        session = self.session
        if self.backend is not None or self.connecting is not None or session.closing:
            return
        if not session.exchanges.queue:
            return
        services = self.ctx.services
        self.chosen = session.exchanges.queue[0].group  # its route's (None: the listener's)
        group = self.group
        kept = self.kept
        if kept is not None:
            self.kept = None
            if kept.lease.pool is group.pool and kept.conn.leg.usable:
                kept.conn.user = session
                self.use(kept.lease, kept.conn, reused=True)  # the same group: the same one
                return
            kept.let_go(CONN_REUSE_NEVER)  # another group: closed, one opened there
        lease = group.pool.acquire(services.clock(), (), hash_key(session, group))
        if lease is None:
            session.fail(NoBackendAvailable(f"no backend of group {group.name} is ready"))
            return
        backend = None
        reuse = group.reuse
        if reuse == "always" or (reuse == "safe" and self.served):
            backend = services.idle.take(lease.state.name, lease.state.backend.address)
        if backend is None:
            self.connect(lease)
            return
        backend.user = session
        self.use(lease, backend, reused=True)

    def use(self, lease: Lease, backend: BackendConnection, reused: bool) -> None:
        """The active exchange's request goes out on `backend`."""
        session = self.session
        self.lease, self.backend = lease, backend
        session.backend_eof = False
        self.served += 1
        backend_record = backend.record
        backend_record.requests += 1
        session.exchanges.forwarded(backend_record, reused, True)
        exchange = session.exchanges.queue[0]
        pending, exchange.pending = exchange.pending, None
        if pending:
            backend.leg.write(pending[0] if len(pending) == 1 else b"".join(pending))
        session.arm_client_deadline()
        session.unblock_reading("connecting")
        if not reused and (
            backend.lost_early is not None or backend.leg.facts.peer_fin_at is not None
        ):
            self.took_up(backend)

    def hand_back(self, reusable: bool, framer: ResponseFramer | None = None) -> None:
        """The active exchange's response is done: its connection goes to the idle pool (or is
        closed, if its response said so), its lease is released."""
        backend, idle = self.backend, self.ctx.services.idle
        if backend is None:
            return
        if framer is not None and framer.drop_held():
            reusable = False  # it sent more than its response: not to be trusted again
        self.backend = None
        lease = self.lease
        if self.group.reuse == "never" and reusable and backend.leg.usable and lease is not None:
            # HAProxy's http-reuse never: the connection stays this session's (with its
            # lease), for its next request if that goes to the same group (activate); until
            # then its events go to the KeptConnection.
            idle = self.ctx.services.idle
            self.kept = KeptConnection(backend, lease, idle, self._forget_kept)
            self.lease = None
            return
        self.release_lease()
        others_busy = 0 if lease is None else lease.state.active
        if self.group.reuse == "never":
            idle.close(backend, CONN_REUSE_NEVER)
        elif reusable and backend.leg.usable:
            idle.put(backend, others_busy)
        else:
            idle.close(backend, CONN_NOT_REUSABLE)

    def drop(self, backend: BackendConnection, reset: bool) -> None:
        """The active connection is gone under the exchange (`reset`: by an RST): its record,
        saying so, is the pool's to publish; the session goes on without it."""
        self.retire(backend, CONN_BACKEND_RESET if reset else CONN_BACKEND_CLOSED)
        self.backend = None
        self.release_lease()

    def retry(self, backend: BackendConnection, timed_out: bool = False) -> bool:
        """`backend` ended (its FIN, or an RST; `timed_out`: stayed silent past
        backend_response_seconds) before any byte of the response to the request it carried:
        send that request again, on a new connection to another backend (this one only if no
        other is ready), if it may go again. It may when the group retries on this
        (`retry_on`), and the request is idempotent and was kept whole (Exchange.replay: at
        most REPLAY_MAX_BYTES), was read to its end, is the only request the connection
        carried (reuse never; the reuse modes carry one at a time), and has gone again fewer
        than the group's `retries` times. True if it goes.

        A fresh connection that died counts against its backend (passive checks); a reused
        one does not (nginx's and HAProxy's keep-alive race); a silent one is counted by the
        caller, as a timeout, and closed (its line says backend_timeout)."""
        session, http = self.session, self.session.http
        queue = session.exchanges.queue
        if session.closing or session.tunnel or http is None or not queue:
            return False
        exchange: Exchange = queue[0]
        record = exchange.record
        if (
            not (self.group.retry_on_timeout if timed_out else self.group.retry_on_empty)
            or exchange.replay is None
            or record.first_byte_at is not None
            or record.retries >= self.group.retries
            or http.pending_error is not None
        ):
            return False
        if self.dispatch:
            if not exchange.request_done:
                return False
        elif len(queue) > 1 or (http.reader is not None and http.reader.in_body):
            return False
        lease = self.lease
        if not record.reused and not timed_out:
            self.failed()  # (before the lease goes)
        record.retries += 1
        session.record.retries += 1
        failed_on(record, backend.record.backend)
        if not self.dispatch:  # (the connection's record counts its attempts)
            failed_on(session.record, backend.record.backend)
        record.forwarded_at = None
        replay = [exchange.replay]
        self.backend = None
        self.release_lease()
        cause = CONN_BACKEND_TIMEOUT if timed_out else CONN_DEAD_ON_REUSE if record.reused else None
        self.retire(backend, cause)
        if self.dispatch:
            exchange.pending = replay
        else:
            self.pending = replay
            session.backend_eof = False
            session.record.backend_connection = None  # the dead one has a line of its own
        self.connect(avoid=None if lease is None else lease.state)
        return True

    def retire(self, backend: BackendConnection, cause: str | None) -> None:
        """A backend connection this session gives up (a retry's dead one, one lost under
        its exchange): the pool's to close and publish (IdlePool.give_up)."""
        self.ctx.services.idle.give_up(backend, cause)

    def _forget_kept(self, kept: KeptConnection) -> None:
        if self.kept is kept:
            self.kept = None

    # ---- passive checks: what the traffic says of the backend ------------------------------

    def answered(self, statuses: list[int]) -> None:
        """Responses completed on the active backend (before their lease is given back)."""
        lease = self.lease
        if lease is None:
            return
        pool = lease.pool
        for status in statuses:
            if status >= 500 and pool.count_5xx:
                _said(lease.state, pool.failed(lease.state, self.ctx.services.clock()), "5xx")
            else:
                pool.succeeded(lease.state)

    def failed(self, timeout: bool = False) -> None:
        """The active backend failed a request: reset, cut, unanswered, or (`timeout`) silent."""
        lease = self.lease
        if lease is not None and (lease.pool.count_timeouts or not timeout):
            seconds = lease.pool.failed(lease.state, self.ctx.services.clock())
            _said(lease.state, seconds, "timeouts" if timeout else "failed requests")

    def hung_up(self) -> None:
        """The active backend's FIN came with a response owed: a failed request for its
        passive checks, and why its connection ends (its own line's close cause)."""
        self.failed()
        if self.backend is not None:
            record = self.backend.record
            record.ended_by(CONN_BACKEND_CLOSED)

    # ---- ending ----------------------------------------------------------------------------

    def close(self) -> None:
        """The session ends: the backend leg closes (FIN and linger), or (reuse modes) goes to
        the pool, which closes it and publishes its record."""
        if self.kept is not None:
            self.kept.let_go(CONN_REUSE_NEVER)
        backend = self.backend
        if backend is None or not backend.leg.usable:
            return
        if self.dispatch:
            self.hand_back(reusable=False)
            return
        backend.leg.read_to_end()  # to see the backend's FIN
        backend.leg.shutdown()

    def cancel(self) -> None:
        """The client is gone: a connect under way is abandoned."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None

    def release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def proxy_header(session: ForwarderSession, version: str) -> bytes:
    """The PROXY header that names this session's client (and, v2, its TLS) to a
    backend: the real client and the address it connected to, as a PROXY header it
    came with said, else as the client leg's socket says."""
    record = session.record
    source = (record.client_ip, record.client_port)
    destination = session.destination
    if destination is None:
        transport = session.client.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        destination = (sockname[0], sockname[1]) if sockname else ("0.0.0.0", 0)
    if version == "v1":
        return encode_v1(source, destination)
    tls = None
    if session.tls_front is not None:
        named = None if record.tls_version is None else f"TLSv{record.tls_version}"
        tls = TLSFacts(named, record.tls_cipher, record.tls_sni, record.tls_alpn)
    return encode_v2(source, destination, tls)


def _said(state: BackendState, seconds: float | None, what: str) -> None:
    """An ejection by the passive checks: one log line (the metric is the pool's count)."""
    if seconds is not None:
        log.warning(
            "backend %s (%s) ejected for %.0f s by this worker (pid %d): %s in a row",
            state.name, state.backend.address, seconds, os.getpid(), what,
        )  # fmt: skip


def hash_key(session: ForwarderSession, group: Group) -> bytes:
    """What policy "hash" hashes for the session's oldest request (its group's hash_key): the
    client's address (as a PROXY header named it), the target, a header's value or a
    cookie's; b"" for other policies, or when the request has none (round robin then)."""
    spec = group.hash_key
    if spec is None:
        return b""
    if spec == "client_ip":
        return session.record.client_ip.encode()
    queue = session.exchanges.queue
    if not queue:  # (tcp mode: no request)
        return b""
    exchange = queue[0]
    if spec == "uri":
        return exchange.record.target
    value = exchange.hashed
    if value is None or not spec.startswith("cookie:"):
        return value or b""
    wanted = spec[7:].encode()
    for pair in value.split(b";"):
        name, _, cookie = pair.strip().partition(b"=")
        if name == wanted:
            return cookie
    return b""
