"""Balancing policies: given the eligible backends, pick one. Pure: no sockets, clocks or logs.

A policy only reads `BackendState` (weight, load); the pool does the counting. A new policy is
one class and one row in `POLICIES`.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from balancer.backend.state import Backend, BackendState


class Policy(Protocol):
    def pick(self, candidates: Sequence[BackendState], key: bytes = b"") -> BackendState | None:
        """One of `candidates` (the eligible backends), or None; `key` is the request's or
        connection's hash key (policy "hash"), b"" for the others."""
        ...

    def members(self, backends: Sequence[Backend]) -> None:
        """The group's backends, at start and whenever DNS discovery changed a slot's member
        (pool.BackendPool.refresh): a policy that places backends (the ring) places them."""
        ...


def ring_name(backend: Backend) -> str:
    """What places a backend on a hash ring: its name, or a discovered member's address (a
    slot's number depends on the order members came in; the address is the same on every
    balancer that resolves the name)."""
    return backend.address if backend.slot else backend.name


class RoundRobin:
    """Smooth weighted round robin (nginx's): weights 5,1,1 give a a b a c a a, not a a a a a b c.

    Each pick adds every candidate's weight to its running score, takes the highest score (the
    first one on ties, in candidate order) and subtracts the total weight from the winner.
    """

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}

    def members(self, backends: Sequence[Backend]) -> None:
        pass  # (scores are by name: a slot keeps its own)

    def pick(self, candidates: Sequence[BackendState], key: bytes = b"") -> BackendState | None:
        best: BackendState | None = None
        best_score = 0
        total = 0
        scores = self._scores
        for state in candidates:
            score = scores.get(state.name, 0) + state.weight
            scores[state.name] = score
            total += state.weight
            if best is None or score > best_score:
                best, best_score = state, score
        if best is not None:
            scores[best.name] = best_score - total
        return best


class LeastConnections:
    """Fewest active connections per unit of weight; ties go by smooth weighted round robin.

    nginx's `least_conn`: with weights 1 and 2 and one request at a time (every count 0, a
    tie each pick), the split is 1:2, as round robin's; under load the weight-2 backend
    carries twice the connections before it looks as busy.
    """

    def __init__(self) -> None:
        self._ties = RoundRobin()

    def members(self, backends: Sequence[Backend]) -> None:
        pass  # (it compares loads: nothing placed)

    def pick(self, candidates: Sequence[BackendState], key: bytes = b"") -> BackendState | None:
        best: BackendState | None = None
        tied: list[BackendState] | None = None
        for state in candidates:
            if best is None:
                best = state
                continue
            # load/weight against best's, without floats (load: every worker's leases).
            mine, theirs = state.load * best.weight, best.load * state.weight
            if mine < theirs:
                best, tied = state, None
            elif mine == theirs:
                if tied is None:
                    tied = [best]
                tied.append(state)
        if tied is None:
            return best
        return self._ties.pick(tied)


POINTS_PER_WEIGHT: Final = 160  # ketama's: 40 MD5 digests of 4 points each per unit of weight


def _points(data: bytes) -> list[int]:
    """An MD5 digest as four little-endian points on the ring (ketama's); a key takes the
    first."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return [int.from_bytes(digest[at : at + 4], "little") for at in (0, 4, 8, 12)]


class ConsistentHash:
    """A ketama ring (libketama's, as nginx's `hash ... consistent` and HAProxy's `hash-type
    consistent` work): each backend owns POINTS_PER_WEIGHT points a unit of weight, at the
    MD5 of its name and a counter; a key's MD5 names a point and the first backend clockwise
    from it serves the key. Only names and weights place the points, so two balancers with
    the same backends map every key alike, with nothing shared; removing one of N backends
    moves its keys (about 1/N) and no others.

    A key whose backend is not among the candidates (down, ejected, draining) goes to the next
    one clockwise that is, and back when it returns. With `balance_factor` c > 0 (Mirrokni,
    Thorup and Zadimoghaddam's consistent hashing with bounded loads; HAProxy's
    `hash-balance-factor` / 100), a backend whose load would pass c times its weight's share
    of the candidates' load is passed over too: a hot key cannot overload one backend.
    Without a key (none sent), the pick is round robin's.
    """

    def __init__(self, balance_factor: float = 0.0) -> None:
        self.balance_factor = balance_factor
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members = 0
        self._fallback = RoundRobin()

    def members(self, backends: Sequence[Backend]) -> None:
        """The ring over every configured backend, or every discovered member (an empty
        slot has none), by ring_name."""
        self.build([(ring_name(b), b.weight) for b in backends if not b.slot or b.port])

    def build(self, members: Sequence[tuple[str, int]]) -> None:
        """The ring over (name, weight) pairs."""
        ring: list[tuple[int, str]] = []
        for name, weight in members:
            for index in range(POINTS_PER_WEIGHT // 4 * max(1, weight)):
                ring += [(point, name) for point in _points(f"{name}-{index}".encode())]
        ring.sort()
        self._points = [point for point, _ in ring]
        self._owners = [name for _, name in ring]
        self._members = len(members)

    def pick(self, candidates: Sequence[BackendState], key: bytes = b"") -> BackendState | None:
        if not key or not self._points:
            return self._fallback.pick(candidates)
        by_name = {ring_name(state.backend): state for state in candidates}
        if not by_name:
            return None
        capacity = self._capacity(candidates) if self.balance_factor > 0 else None
        owners, count = self._owners, len(self._owners)
        digest = hashlib.md5(key, usedforsecurity=False).digest()
        start = bisect.bisect_left(self._points, int.from_bytes(digest[:4], "little")) % count
        seen: set[str] = set()
        for step in range(count):
            name = owners[(start + step) % count]
            if name in seen:
                continue
            seen.add(name)
            state = by_name.get(name)
            if state is not None and (capacity is None or state.load < capacity(state)):
                return state
            if len(seen) == self._members:
                break
        # Every candidate at its bound (or none on the ring): the key's first candidate.
        for step in range(count):
            state = by_name.get(owners[(start + step) % count])
            if state is not None:
                return state
        return next(iter(by_name.values()))

    def _capacity(self, candidates: Sequence[BackendState]) -> Callable[[BackendState], float]:
        """A backend's bound: c times its weight's share of the load with this pick, rounded
        up (the paper's ceil(c * (m + 1) / n), weighted)."""
        total = sum(state.load for state in candidates) + 1
        weights = sum(state.weight for state in candidates) or 1
        factor = self.balance_factor
        return lambda state: math.ceil(factor * total * state.weight / weights)


POLICIES: Final[dict[str, Callable[[], Policy]]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "hash": ConsistentHash,
}
