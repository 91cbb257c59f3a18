"""The backend pool: the only place a backend's active count changes.

Every `acquire()` that returns a lease is matched by exactly one effective `release()`;
`release()` is idempotent, so the one place a connection ends can always call it.
Least-connections is only as true as this pair.
"""

from __future__ import annotations

import array
import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import ClassVar, Final

from balancer.backend.policies import Policy
from balancer.backend.state import Backend, BackendState


class PeerCounts:
    """Every worker's leases per backend, in one table the workers of a generation share
    (rows: workers, columns: backends; int64 cells in memory the supervisor mapped before it
    forked them). A row is written only by its worker; the others are summed when a policy
    needs them. Pure over the memoryview it is given."""

    __slots__ = ("backends", "me", "table", "workers")

    def __init__(self, table: memoryview, workers: int, backends: int, me: int) -> None:
        if len(table) < workers * backends or not 0 <= me < workers:
            raise ValueError("the table does not fit the workers and backends")
        self.table = table
        self.workers = workers
        self.backends = backends
        self.me = me

    def publish(self, backend: int, active: int) -> None:
        self.table[self.me * self.backends + backend] = active

    def others(self, backend: int) -> int:
        table, stride = self.table, self.backends
        return sum(table[w * stride + backend] for w in range(self.workers) if w != self.me)

    def forget(self, worker: int) -> None:
        """A worker is gone: its leases with it (the supervisor calls this as it reaps)."""
        start = worker * self.backends
        for cell in range(start, start + self.backends):
            self.table[cell] = 0


ENABLED: Final = 0  # the operator's word on a backend
DRAINING: Final = 1
MAINTENANCE: Final = 2
ADMIN_STATES: Final = {"enabled": ENABLED, "draining": DRAINING, "maintenance": MAINTENANCE}
# A backend's membership: a configured backend is always MEMBER; a discovered group's slot
# (config/dns.py) is EMPTY until the resolver gives it an address, and LEAVING once DNS no
# longer names it (no new connections; those it has finish: the drain) until the slot is
# given to another member.
MEMBER: Final = 0
EMPTY: Final = 1
LEAVING: Final = 2
# What a worker sees of a backend, first match: an empty slot, the operator's word
# (maintenance, draining; a leaving member drains too), the active checks' (down), its own
# passive checks' (ejected: skipped for now), else up.
BACKEND_STATES: Final = ("up", "down", "draining", "maintenance", "ejected", "empty")
# A backend's cells in a BackendTable (cell 0: the version): the checks' verdict, the
# operator's state, the weight, its membership, and a discovered member's port and address
# (16 bytes: IPv6, or IPv4 mapped into it).
_UP: Final = 1
_ADMIN: Final = 2
_WEIGHT: Final = 3
_MEMBER: Final = 4
_PORT: Final = 5
_IP: Final = 6


def _packed(host: str) -> list[int]:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    raw = address.packed
    return [int.from_bytes(raw[at : at + 4], "big") for at in range(0, 16, 4)]


def _unpacked(cells: Sequence[int]) -> str:
    address = ipaddress.IPv6Address(b"".join(cell.to_bytes(4, "big") for cell in cells))
    mapped = address.ipv4_mapped
    return str(mapped if mapped is not None else address)


class BackendTable:
    """What the workers of a generation read on every pick and only the supervisor writes:
    per backend, the active checks' verdict (up or not), the operator's state (enabled,
    draining, maintenance), weight, and for a discovered group's slot its member (state,
    address, port). Nine uint32 cells a backend after one version cell, in memory mapped
    before the fork (a lone Balancer keeps its own). The version is a sequence lock: every
    write makes it odd before its cells and even after them, so a reader that saw the same
    even version before and after reading saw no write half done (a slot's address and port
    change together), and a pool reads the backends' cells again only when it moved, not on
    every pick. Pure over the memoryview it is given."""

    __slots__ = ("cells", "count")

    CELLS: ClassVar[int] = 9

    def __init__(self, cells: memoryview, backends: Sequence[Backend], fresh: bool = True) -> None:
        if len(cells) < 1 + self.CELLS * len(backends):
            raise ValueError("the table does not fit the backends")
        self.cells = cells
        self.count = len(backends)
        if fresh:  # up (until checked down), enabled, as configured; slots empty
            for index, backend in enumerate(backends):
                self.set(index, up=True, admin=ENABLED, weight=backend.weight)
                self.cells[index * self.CELLS + _MEMBER] = EMPTY if backend.slot else MEMBER

    @classmethod
    def bytes_for(cls, count: int) -> int:
        return 4 * (1 + cls.CELLS * count)

    @classmethod
    def of(cls, backends: Sequence[Backend]) -> BackendTable:
        return cls(memoryview(bytearray(cls.bytes_for(len(backends)))).cast("I"), backends)

    @property
    def version(self) -> int:
        return int(self.cells[0])

    def set(
        self, index: int, *, up: bool | None = None, admin: int | None = None,
        weight: int | None = None,
    ) -> None:  # fmt: skip
        base = index * self.CELLS
        self._bump()  # odd: a write under way (see refresh)
        if up is not None:
            self.cells[base + _UP] = 1 if up else 0
        if admin is not None:
            self.cells[base + _ADMIN] = admin
        if weight is not None:
            self.cells[base + _WEIGHT] = weight
        self._bump()

    def set_member(
        self, index: int, member: int, address: tuple[str, int] | None = None,
        weight: int | None = None, up: bool | None = None,
    ) -> None:  # fmt: skip
        """A slot's member, written whole before the version moves: its state, and with
        `address` (host, port) a new member (`up`: whether it serves before its checks)."""
        base = index * self.CELLS
        self._bump()  # odd: a write under way (see refresh)
        self.cells[base + _MEMBER] = member
        if address is not None:
            host, port = address
            self.cells[base + _IP : base + _IP + 4] = memoryview(array.array("I", _packed(host)))
            self.cells[base + _PORT] = port
        if weight is not None:
            self.cells[base + _WEIGHT] = weight
        if up is not None:
            self.cells[base + _UP] = 1 if up else 0
        self._bump()

    def _bump(self) -> None:
        self.cells[0] = (self.cells[0] + 1) & 0xFFFFFFFF

    def up(self, index: int) -> bool:
        return self.cells[index * self.CELLS + _UP] != 0

    def admin(self, index: int) -> int:
        return int(self.cells[index * self.CELLS + _ADMIN])

    def weight(self, index: int) -> int:
        return int(self.cells[index * self.CELLS + _WEIGHT])

    def member(self, index: int) -> int:
        return int(self.cells[index * self.CELLS + _MEMBER])

    def address(self, index: int) -> tuple[str, int] | None:
        """A slot's member's (host, port) as the resolver last wrote it; None: never one."""
        base = index * self.CELLS
        port = int(self.cells[base + _PORT])
        if not port:
            return None
        return _unpacked(self.cells[base + _IP : base + _IP + 4].tolist()), port

    def draining(self, index: int) -> bool:
        """No new connections, and those it has close over the group's drain_seconds."""
        return self.admin(index) == DRAINING or self.member(index) == LEAVING

    def state(self, index: int) -> str:
        """What the admin view calls it: empty, maintenance, draining, down or up."""
        member = self.member(index)
        if member == EMPTY:
            return "empty"
        admin = self.admin(index)
        if admin == MAINTENANCE:
            return "maintenance"
        if admin == DRAINING or member == LEAVING:
            return "draining"
        return "up" if self.up(index) else "down"


class Lease:
    """A counted claim on one backend for one client connection."""

    __slots__ = ("pool", "released", "state")

    def __init__(self, state: BackendState, pool: BackendPool) -> None:
        self.state = state
        self.pool = pool
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.active -= 1
            if self.pool.peers is not None:
                self.pool.publish(self.state)


# Weights are scaled by this while slow start is on: a ramp needs steps.
SLOW_START_SCALE: Final = 64


class BackendPool:
    """Backends, their states and a policy. `now` is passed in, so this stays pure.

    Passive checks (per worker, nginx's max_fails): a refused or timed-out connect ejects a
    backend at once; `fall` failed requests in a row (reset, cut, unanswered; 5xx and
    timeouts as configured) eject it too. An ejection lasts `down_seconds`, doubling (to
    `max_down_seconds`) while the backend keeps failing as it comes back; a success ends the
    streak. With `slow_start_seconds`, a backend back in service (ejection over, checks up,
    enabled again) ramps its weight from almost nothing to whole over that time.

    One pool per backend group; its backends' cells in the shared tables start at `first`
    (groups sit one after another there).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        policy: Policy,
        down_seconds: float,
        peers: PeerCounts | None = None,
        table: BackendTable | None = None,
        fall: int = 3,
        max_down_seconds: float = 300.0,
        slow_start_seconds: float = 0.0,
        first: int = 0,
    ) -> None:
        self.states = [BackendState(backend) for backend in backends]
        self.policy = policy
        self.down_seconds = down_seconds
        self.fall = fall
        self.max_down_seconds = max(max_down_seconds, down_seconds)
        self.slow_start_seconds = slow_start_seconds
        self.count_5xx = False  # a 5xx response is a failed request ([health_check])
        self.count_timeouts = True  # so is no response in time
        self.peers = peers  # several workers: least connections counts theirs too
        # The checks' verdicts, the operator's states and weights (BackendTable), if any.
        self.table = table
        self.first = first  # the place of its first backend in the shared tables
        self._index = {id(state): first + i for i, state in enumerate(self.states)}
        self._backups = any(backend.backup for backend in backends)
        self._seen = -1  # the table's version last read into the states

    def publish(self, state: BackendState) -> None:
        assert self.peers is not None
        self.peers.publish(self._index[id(state)], state.active)

    def acquire(
        self, now: float, exclude: Collection[BackendState] = (), key: bytes = b""
    ) -> Lease | None:
        """Pick a backend and count a connection on it; None when none is eligible. `key`:
        the hash key, for policy "hash" (forward.Forwarder.hash_key).

        Backends marked down by a recent connect failure are skipped, unless every ready backend
        is marked: then all are tried again (nginx does the same) rather than refusing everyone.
        """
        table = self.table
        if table is not None and table.version != self._seen:
            self.refresh(now)
        if self.slow_start_seconds:
            self._slow_start(now)
        ready = [s for s in self.states if s.ready and s not in exclude]
        up = [s for s in ready if s.down_until <= now]
        candidates = up or ready
        if self._backups:  # backups only while no other is up; all marked: others first
            candidates = (
                [s for s in up if not s.backend.backup]
                or up
                or [s for s in ready if not s.backend.backup]
                or ready
            )
        peers = self.peers
        if peers is not None:
            for candidate in candidates:
                candidate.peer_active = peers.others(self._index[id(candidate)])
        state = self.policy.pick(candidates, key)
        if state is None:
            return None
        state.active += 1
        state.connections_total += 1
        if peers is not None:
            self.publish(state)
        return Lease(state, self)

    def refresh(self, now: float) -> None:
        """Read the shared table into the states: who serves, at what weight, and a
        discovered slot's member (a new one starts with no passive-check history)."""
        table = self.table
        if table is None:
            return
        version = table.version
        if version & 1:
            return  # a write under way: the states as they were, read again next pick
        joined = False
        for index, candidate in enumerate(self.states, self.first):
            serving = table.up(index) and table.admin(index) == ENABLED
            backend = candidate.backend
            if backend.slot:
                serving = serving and table.member(index) == MEMBER
                address = table.address(index)
                if address is not None and address != (backend.host, backend.port):
                    host, port = address
                    candidate.backend = replace(
                        backend, host=host, port=port, weight=table.weight(index), connect_hosts=()
                    )
                    candidate.failures = candidate.ejections = 0
                    candidate.down_until = 0.0
                    joined = True
            if serving and not candidate.ready:
                candidate.back_at = now  # back in service: slow start from here
            candidate.ready = serving
            candidate.weight = table.weight(index)
        # Seen only if no write began meanwhile; else read again at the next pick.
        self._seen = version if table.version == version else -1
        if joined:
            self.policy.members([s.backend for s in self.states])

    def connect_failed(self, lease: Lease, now: float) -> float:
        """The lease's backend refused or timed out a connect: eject it and release. Returns
        the ejection's seconds."""
        lease.state.connect_failures_total += 1
        lease.state.connections_total -= 1  # a failure, not a connection (counted above)
        seconds = self._eject(lease.state, now)
        lease.release()
        return seconds

    def failed(self, state: BackendState, now: float) -> float | None:
        """A request failed on the backend (passive checks): `fall` in a row eject it. Returns
        the ejection's seconds if this one ejected it."""
        state.failures += 1
        if state.failures >= self.fall:
            return self._eject(state, now)
        return None

    def succeeded(self, state: BackendState) -> None:
        """A response came whole: the failure streak and the ejection streak end."""
        state.failures = 0
        state.ejections = 0

    def _eject(self, state: BackendState, now: float) -> float:
        seconds = min(self.down_seconds * 2.0**state.ejections, self.max_down_seconds)
        state.ejections += 1
        state.ejections_total += 1
        state.failures = 0
        state.down_until = now + seconds
        state.back_at = state.down_until
        return seconds

    def _slow_start(self, now: float) -> None:
        """Weights, scaled; a backend back in service for less than slow_start_seconds gets
        its share of that time (never nothing)."""
        ramp, table = self.slow_start_seconds, self.table
        for index, state in enumerate(self.states, self.first):
            whole = table.weight(index) if table is not None else state.backend.weight
            since = now - state.back_at
            share = 1.0 if since >= ramp else max(0.0, since) / ramp
            state.weight = max(1, int(whole * SLOW_START_SCALE * share))

    def connect_succeeded(self, lease: Lease) -> None:
        lease.state.down_until = 0.0
