"""The HTTP/2 flow's own decisions, in memory: an h2 client's frames in, the flow's frames out,
over a fake session (tests/fakes.py) and a group with no backend ready (every stream gets
its 503 at once, no socket anywhere). The glitch budget, GOAWAY (once, with the right code
and last stream), the graceful close's two GOAWAYs and its PING, a client's GOAWAY read after
ours."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import ConnectionTerminated, PingReceived, ResponseReceived, StreamReset
from hyperframe.frame import GoAwayFrame, PingFrame

from balancer.client.h2_flow import GLITCHES_FREE, H2Flow
from balancer.client.listener import IDLE
from tests.fakes import FakeSession

# The fake session's context is plain namespaces, where a compiled flow checks for the real
# (ListenerContext) types: pure build only, as test_http_flow.py; the integration tests run
# the compiled flow over real sockets.
pytestmark = pytest.mark.incompatible_with_mypyc

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
           (b":authority", b"example.test")]  # fmt: skip


class Client(H2Connection):
    """The client side, reading on after a GOAWAY (h2 would not: see tests/h2client.py)."""

    def __init__(self) -> None:
        super().__init__(H2Configuration(client_side=True, header_encoding=None))
        self.initiate_connection()

    def _receive_goaway_frame(self, frame: Any) -> Any:
        events = super()._receive_goaway_frame(frame)
        self.state_machine.state = ConnectionState.CLIENT_OPEN
        return events


def never(*args: Any) -> Any:
    """A backend connect that does not finish (the stream waits, as a slow backend's would)."""
    return SimpleNamespace(cancel=lambda: None)


def h2_session(backend: str = "none") -> FakeSession:
    """`backend`: "none" (no backend ready: a 503 at once) or "slow" (connecting forever)."""
    session = FakeSession()
    group = SimpleNamespace(
        name="web",
        reuse="always" if backend == "none" else "never",
        pool=SimpleNamespace(acquire=lambda *args: None),
        connector=SimpleNamespace(start=never),
    )
    session.ctx.router = SimpleNamespace(for_request=lambda host, target: group)
    session.ctx.settings.limits = SimpleNamespace(max_header_bytes=16384, max_body_bytes=None)
    session.ctx.settings.timeouts.keepalive_idle_seconds = 60.0
    session.ctx.settings.listener = SimpleNamespace(bind=SimpleNamespace(port=443))
    session.ctx.settings.ssl_context = object()
    session.ctx.services.loop = None  # (the running one)
    session.ctx.exchange_settings = session.exchanges._settings
    return session


def connected(backend: str = "none") -> tuple[FakeSession, H2Flow, Client]:
    session = h2_session(backend)
    flow = H2Flow(session)  # type: ignore[arg-type]
    client = Client()
    flow.on_client_data(client.data_to_send())
    return session, flow, client


def read(session: FakeSession, client: Client) -> list[Any]:
    """What the flow wrote since the last read, as the client's events."""
    out, session.written = session.written, b""
    return client.receive_data(out) if out else []


def goaways(events: list[Any]) -> list[tuple[int, int]]:
    return [(int(e.error_code), e.last_stream_id) for e in events
            if isinstance(e, ConnectionTerminated)]  # fmt: skip


def test_a_stream_without_a_backend_gets_its_503_and_the_connection_goes_on() -> None:
    session, flow, client = connected()
    read(session, client)
    assert session.deadline_kind == IDLE
    client.send_headers(1, REQUEST, end_stream=True)
    flow.on_client_data(client.data_to_send())
    (answer,) = [e for e in read(session, client) if isinstance(e, ResponseReceived)]
    assert dict(answer.headers)[b":status"] == b"503"
    assert not flow.streams and not session.closing
    (published,) = session.published
    assert (published.stream_id, published.status) == (1, 503)
    assert session.record.h2 is not None and session.record.h2.streams == 1


async def test_rapid_reset_spends_the_budget_and_ends_with_enhance_your_calm() -> None:
    session, flow, client = connected("slow")
    read(session, client)
    for _ in range(GLITCHES_FREE + 100):
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, REQUEST, end_stream=False)
        client.reset_stream(stream)
    flow.on_client_data(client.data_to_send())
    said = goaways(read(session, client))
    assert len(said) == 1 and said[0][0] == 11  # ENHANCE_YOUR_CALM, once
    assert said[0][1] == 2 * GLITCHES_FREE + 1  # the last stream it acted on, not h2's last
    assert session.closed == ("h2_error", False)
    h2 = session.record.h2
    assert h2 is not None and h2.goaway_sent == ("enhance_your_calm", said[0][1])
    assert h2.goaway_first == "balancer" and h2.rst_received == {"no_error": GLITCHES_FREE + 1}
    assert not flow.streams  # each reset stream let go (its connect cancelled)


def test_a_ping_flood_ends_the_same_way_and_pings_within_it_are_answered() -> None:
    session, flow, client = connected()
    read(session, client)
    flow.on_client_data(b"".join(PingFrame(0, opaque_data=b"%08d" % n).serialize()
                                 for n in range(GLITCHES_FREE + 50)))  # fmt: skip
    events = read(session, client)
    assert goaways(events) == [(11, 0)]
    assert session.closed == ("h2_error", False)


def test_a_protocol_error_says_goaway_once_with_its_code() -> None:
    session, flow, client = connected()
    read(session, client)
    flow.on_client_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
    assert goaways(read(session, client)) == [(1, 0)]  # h2's own, not a second of ours
    h2 = session.record.h2
    assert h2 is not None and h2.goaway_sent == ("protocol_error", 0)
    # The client's GOAWAY after ours is read all the same (the connection is closing).
    flow.closing_data(GoAwayFrame(0, 0, 0).serialize()[:7])  # in pieces
    flow.closing_data(GoAwayFrame(0, 0, 0).serialize()[7:])
    assert h2.goaway_received == ("no_error", 0) and h2.goaway_first == "balancer"


def test_a_drain_says_goaway_twice_around_a_ping_and_refuses_only_after() -> None:
    session, flow, client = connected()
    read(session, client)
    client.send_headers(1, REQUEST, end_stream=True)
    flow.on_client_data(client.data_to_send())
    read(session, client)
    flow.drain()
    assert not session.closing  # not before the round trip
    client.send_headers(3, REQUEST, end_stream=True)  # sent as the GOAWAY travelled: taken
    flow.on_client_data(client.data_to_send())
    events = read(session, client)  # the client's h2 answers the PING as it reads it
    assert goaways(events) == [(0, 2**31 - 1)]  # no stream refused yet
    (ping,) = [e for e in events if isinstance(e, PingReceived)]
    assert ping.ping_data == b"draining"
    assert len([e for e in events if isinstance(e, ResponseReceived)]) == 1  # stream 3's
    flow.on_client_data(client.data_to_send())  # the PING's ack
    assert goaways(read(session, client)) == [(0, 3)]  # the last stream taken
    assert session.closed == ("shutdown", False)  # no stream left: closed
    h2 = session.record.h2
    assert h2 is not None and h2.goaway_sent == ("no_error", 3)


def test_a_stream_opened_after_the_last_goaway_is_refused() -> None:
    session, flow, client = connected()
    read(session, client)
    client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]], end_stream=False)
    flow.on_client_data(client.data_to_send())
    flow.drain()
    read(session, client)
    flow.on_client_data(client.data_to_send())  # the PING's ack: the last GOAWAY goes out
    flow.on_client_data(b"")
    assert goaways(read(session, client)) == [(0, 1)]
    client.send_headers(5, REQUEST, end_stream=True)
    flow.on_client_data(client.data_to_send())
    resets = [e for e in read(session, client) if isinstance(e, StreamReset)]
    assert [(e.stream_id, int(e.error_code)) for e in resets] == [(5, 7)]  # REFUSED_STREAM
