"""The backend pool: the only place a backend's active count changes.

Every `acquire()` that returns a lease is matched by exactly one effective `release()`;
`release()` is idempotent, so the one place a connection ends can always call it.
Least-connections is only as true as this pair.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from balancer.backends import Backend, BackendState
from balancer.policies import Policy


class Lease:
    """A counted claim on one backend for one client connection."""

    __slots__ = ("released", "state")

    def __init__(self, state: BackendState) -> None:
        self.state = state
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.active -= 1


class BackendPool:
    """Backends, their states and a policy. `now` is passed in, so this stays pure."""

    def __init__(self, backends: Sequence[Backend], policy: Policy, down_seconds: float) -> None:
        self.states = [BackendState(backend) for backend in backends]
        self.policy = policy
        self.down_seconds = down_seconds

    def acquire(self, now: float, exclude: Collection[BackendState] = ()) -> Lease | None:
        """Pick a backend and count a connection on it; None when none is eligible.

        Backends marked down by a recent connect failure are skipped, unless every ready backend
        is marked: then all are tried again (nginx does the same) rather than refusing everyone.
        """
        ready = [s for s in self.states if s.ready and s not in exclude]
        up = [s for s in ready if s.down_until <= now]
        state = self.policy.pick(up or ready)
        if state is None:
            return None
        state.active += 1
        state.connections_total += 1
        return Lease(state)

    def connect_failed(self, lease: Lease, now: float) -> None:
        """The lease's backend refused or timed out a connect: mark it down and release."""
        lease.state.connect_failures_total += 1
        lease.state.down_until = now + self.down_seconds
        lease.release()

    def connect_succeeded(self, lease: Lease) -> None:
        lease.state.down_until = 0.0
