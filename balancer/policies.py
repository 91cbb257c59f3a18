"""Balancing policies: given the eligible backends, pick one. Pure: no sockets, clocks or logs.

A policy only reads `BackendState` (weight, load); the pool does the counting. A new policy is
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
    """Fewest active connections per unit of weight; ties go by smooth weighted round robin.

    nginx's `least_conn`: with weights 1 and 2 and one request at a time (every count 0, a
    tie each pick), the split is 1:2, as round robin's; under load the weight-2 backend
    carries twice the connections before it looks as busy.
    """

    def __init__(self) -> None:
        self._ties = RoundRobin()

    def pick(self, candidates: Sequence[BackendState]) -> BackendState | None:
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


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
}
