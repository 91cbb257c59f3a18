"""The contract between a client session (session.py) and its parts.

A `ClientSession` is one client connection; three parts do its work: the TLS front
(tls_front.py: the handshake and close_notify), the HTTP flow (http_flow.py: requests,
responses, pipelining, error answers) and the forwarder (forward.py: the backend side). Each
part sees the session through the Protocol below that names what it needs, and nothing
else: no part imports session.py, so each can be read (and tested, over a fake session) on
its own, and a new kind of flow is a new implementation of the same few members (tunnel.py's
`Tunnel` is one; an HTTP/2 stream would be another). `tests/unit/test_structure.py` keeps it
so: only the module that builds sessions imports session.py, and no import cycle exists at
any level.

Type-level only: nothing here is called (the Protocols are erased in a compiled build), and
no module imports it but for annotations; it imports cleanly all the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from balancer.backend.connection import BackendUser  # (a base class: needed at run time)

if TYPE_CHECKING:
    from balancer.backend.connection import BackendConnection
    from balancer.client.exchange import Exchanges
    from balancer.client.listener import ListenerContext
    from balancer.facts.record import ConnectionRecord
    from balancer.net.legs import Leg
    from balancer.wire.errors import BalancerError
    from balancer.wire.http1 import RequestReader


class Session(Protocol):
    """What every part sees: the connection's record, its listener, its client leg, and how
    it ends."""

    record: ConnectionRecord
    ctx: ListenerContext
    client: Leg

    @property
    def closing(self) -> bool:
        """The balancer is ending the connection: no more relaying."""
        ...

    @property
    def tunnel(self) -> bool:
        """Bytes pass both ways untouched (tcp mode, or after a 101)."""
        ...

    def close_client(self, cause: str, backend_closes: bool = False) -> None:
        """End the client connection by FIN (close_notify first over TLS), for `cause`."""
        ...

    def abort_client(self) -> None:
        """End it by RST."""
        ...

    def set_deadline(self, kind: str, seconds: float | None = None) -> None:
        """The connection's one deadline, of a kind (listener.py's table)."""
        ...


class TLSFrontSession(Session, Protocol):
    """The TLS front's session: told when the handshake is over and when the client's
    close_notify came."""

    def handshake_over(self) -> None: ...

    def client_data_ended(self, data: bytes) -> None: ...


class FlowSession(Session, Protocol):
    """The HTTP flow's session: its exchanges, the client's reading and writing, errors."""

    exchanges: Exchanges
    client_eof: bool
    deadline_kind: str

    def fail(self, error: BalancerError) -> None:
        """Answer the error (or reset, mid-response) and close."""
        ...

    def block_reading(self, why: str) -> None: ...

    def unblock_reading(self, why: str) -> None: ...

    def write_client(self, data: bytes) -> None: ...

    def extend_deadline(self, seconds: float) -> None: ...

    def enter_tunnel(self, rest: bytes) -> None:
        """A 101 was relayed: everything after is a tunnel, `rest` its first bytes."""
        ...


class FlowState(Protocol):
    """What the forwarder reads of the HTTP flow (whether a request may be sent again)."""

    @property
    def pending_error(self) -> BalancerError | None: ...

    @property
    def reader(self) -> RequestReader | None: ...


class ForwarderSession(Session, BackendUser, Protocol):
    """The forwarder's session: its exchanges; the user of its backend connections (their
    events come to it: connection.BackendUser)."""

    exchanges: Exchanges
    backend_eof: bool
    client_eof: bool
    destination: tuple[str, int] | None  # the address a PROXY header named, if one did

    @property
    def http(self) -> FlowState | None: ...

    @property
    def tls_front(self) -> object | None:
        """Not None on a TLS listener (a PROXY v2 header then says so)."""
        ...

    def fail(self, error: BalancerError) -> None: ...

    def arm_client_deadline(self) -> None: ...

    def backend_lost(self, backend: BackendConnection, reset: bool) -> None: ...


class TunnelSession(Session, Protocol):
    """The tunnel's session: which side has ended, and the client's writes and deadline."""

    client_eof: bool
    backend_eof: bool

    def write_client(self, data: bytes) -> None: ...

    def extend_deadline(self, seconds: float) -> None: ...


class H2Session(Session, Protocol):
    """The HTTP/2 flow's session: the client's writes, its deadline; each stream is a
    backend connection's user itself (h2_flow.H2Stream), so no backend events pass here."""

    def write_client(self, data: bytes) -> None: ...

    def extend_deadline(self, seconds: float) -> None: ...
