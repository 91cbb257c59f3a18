"""Balancing policies: given the eligible backends, pick one. Pure: no sockets, clocks or logs.

A policy only reads `BackendState` (weight, active); the pool does the counting. A new policy is
one class and one row in `POLICIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from balancer.backends import BackendState


class Policy(Protocol):
    def pick(self, candidates: Sequence[BackendState]) -> BackendState | None: ...


class RoundRobin:
    """Smooth weighted round robin (nginx's): weights 5,1,1 give a a b a c a a, not a a a a a b c.

    Each pick adds every candidate's weight to its running score, takes the highest score (the
    first one on ties, in candidate order) and subtracts the total weight from the winner.
    """

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}

    def pick(self, candidates: Sequence[BackendState]) -> BackendState | None:
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
    """Fewest active connections per unit of weight; ties are taken in turn so equals share.

    The scan starts just after the previous winner, and only a strictly lower load displaces the
    first candidate found, so idle equal backends are picked a, b, c, a, ... like round robin.
    """

    def __init__(self) -> None:
        self._start = 0

    def pick(self, candidates: Sequence[BackendState]) -> BackendState | None:
        count = len(candidates)
        if count == 0:
            return None
        best_index = -1
        best: BackendState | None = None
        for offset in range(count):
            index = (self._start + offset) % count
            state = candidates[index]
            # active/weight < best.active/best.weight, without floats.
            if best is None or state.active * best.weight < best.active * state.weight:
                best, best_index = state, index
        self._start = best_index + 1
        return best


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
}
