"""The HTTP/1.1 flow of one client connection: requests in, responses out, errors answered.

Theory of operation
-------------------
`HttpFlow` holds the connection's request reader and response framer (http1.py, pure) and
decides what each event means for HTTP; the session (session.py) owns the legs and the phase,
the forwarder (forward.py) the backend connections.

    client bytes ──► RequestReader: heads parsed and re-serialised, bodies streamed ──► each
                     head opens an Exchange (exchange.py); the bytes go to the forwarder
    backend bytes ─► ResponseFramer: boundaries followed, bytes relayed as they come ──► a
                     response done completes its exchange; in the reuse modes its backend
                     connection is handed back and the next exchange activated
    101 ───────────► the session becomes a tunnel (plain bytes both ways)

Rules kept here:
- An error is answered with a real response only at a response boundary (nothing of the
  response to the current request has reached the client); inside a response the client
  leg is reset, so a truncated response never looks whole. A client error found while
  earlier pipelined responses are still coming waits for them (`pending_error`).
- Reuse modes: one exchange at a time has a backend connection; later pipelined requests
  are held (client reads pause) until it is done.
- A request that says close ends reading: later requests are never forwarded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from balancer.client.listener import HEADER, IDLE, RESPONSE, ListenerContext
from balancer.facts.causes import BACKEND_CLOSED, CLIENT_CLOSED, HTTP_CLOSE, SHUTDOWN
from balancer.wire.errors import BackendClosed, BackendError, BalancerError
from balancer.wire.http1 import RequestReader, ResponseFramer, error_response

if TYPE_CHECKING:
    from balancer.client.contract import FlowSession
    from balancer.client.forward import Forwarder

RETRY_AFTER_SECONDS: Final = 1
# Request readers (each with its httptools parser, ~1.4 KB) kept for reuse per loop. Once a
# listener has more than READER_POOL_ABOVE connections open, a keep-alive connection gives its
# reader back whenever it goes idle and takes one again with its next request, so idle
# connections hold none (nor, in the reuse modes, a response framer); below that, memory is
# no concern and the round trip (~1 µs a request) is saved.
READER_POOL_ABOVE = 256
IDLE_READERS_KEPT: Final = 256


class HttpFlow:
    """The HTTP side of one client session (see the module docstring)."""

    __slots__ = ("framer", "fwd", "pending_error", "reader", "session")

    def __init__(self, session: FlowSession, fwd: Forwarder) -> None:
        self.session = session
        self.fwd = fwd  # the backend side it hands requests to and hears responses from
        self.reader: RequestReader | None = None  # None before the first bytes, or released
        self.framer: ResponseFramer | None = None
        self.pending_error: BalancerError | None = None

    @property
    def ctx(self) -> ListenerContext:
        return self.session.ctx  # not kept: a slot is 8 bytes on each idle connection

    # ---- requests --------------------------------------------------------------------------

    def on_client_data(self, data: bytes) -> None:
        session, fwd = self.session, self.fwd
        reader = self.reader
        if reader is None:
            reader = self._take_reader()
        out = reader.feed(data)
        bodies = reader.bodies  # (requests with a body read whole: rare, and counted apart)
        opened = 0
        if reader.heads:
            opened = len(reader.heads) if bodies else 0
            self.on_heads()
        if bodies:
            session.exchanges.bodies_read(bodies, opened)
        if out:
            if fwd.dispatch:
                fwd.route(out, reader.message_ends)
            else:
                fwd.send_requests(out)
        if reader.error is not None:
            session.fail(reader.error)
            return
        if reader.upgrade_rest is not None:
            session.block_reading("upgrade")
        self.arm_deadline()

    def _take_reader(self) -> RequestReader:
        record, ctx = self.session.record, self.ctx
        proto = "https" if self.session.client.tls is not None else "http"
        idle_readers = ctx.services.idle_readers
        if idle_readers:
            reader = self.reader = idle_readers.pop()
            reader.rebind(record.client_ip, proto, record.local_port)
        else:
            reader = self.reader = RequestReader(
                record.client_ip, proto, record.local_port, ctx.settings.head_limits
            )
        reader.split_messages = reader.backend_keep_alive = ctx.settings.dispatch
        if self.framer is None:
            self.framer = ResponseFramer()
            self.framer.force_close = ctx.state.draining
        return reader

    def on_heads(self) -> None:
        reader, framer, session = self.reader, self.framer, self.session
        assert reader is not None and framer is not None
        record = session.record
        if record.first_request_at is None:
            record.first_request_at = session.ctx.services.clock()
        exchanges, router = session.exchanges, session.ctx.router
        for head in reader.heads:
            record.requests += 1
            framer.expect(head.method == b"HEAD", not head.keep_alive, head.keep_alive_10)
            exchange = exchanges.open(head)
            if router.rules:
                exchange.group = router.for_request(head.host, head.target)
        reader.heads.clear()
        fwd = self.fwd
        if fwd.dispatch:
            if len(exchanges.queue) > 1:
                session.block_reading("queued")  # one exchange at a time: hold the rest
            fwd.activate()
        else:
            fwd.new_heads()

    def arm_deadline(self) -> None:
        """Pick the deadline that fits what the connection is waiting for now."""
        reader, framer, session = self.reader, self.framer, self.session
        assert framer is not None  # (no reader: released while idle; called with a request)
        if reader is not None and reader.in_head:
            if session.deadline_kind != HEADER:  # a total deadline, set when the head began
                session.set_deadline(HEADER)
        elif framer.awaiting and not (reader is not None and reader.in_body):
            session.set_deadline(RESPONSE, self.fwd.group.response_seconds)
        else:
            session.set_deadline(IDLE)
            if reader is not None and len(session.ctx.state.connections) > READER_POOL_ABOVE:
                self._release_reader(reader, framer)

    def _release_reader(self, reader: RequestReader, framer: ResponseFramer) -> None:
        """Between requests, give the reader back (see READER_POOL_ABOVE). Only one at a
        message boundary with nothing pending, after a keep-alive exchange, is reusable."""
        if (
            reader.in_head
            or reader.in_body
            or reader.error is not None
            or reader.upgrade_rest is not None
            or reader.finished
            or framer.awaiting
            or framer.in_message
            or framer.close_after
            or framer.force_close
            or self.pending_error is not None
            or self.session.tunnel
            or self.session.closing
        ):
            return
        self.reader = None
        idle_readers = self.ctx.services.idle_readers
        if len(idle_readers) < IDLE_READERS_KEPT:
            idle_readers.append(reader)
        if self.fwd.dispatch:
            # Reuse modes: no backend connection is held between requests, so nothing can
            # arrive to be framed; the next request makes a new framer (~0.3 KB less idle).
            self.framer = None

    def on_client_eof(self) -> None:
        """The client sends no more: close now, unless a response is still to come (a
        half-close: it comes, then we close)."""
        framer, reader = self.framer, self.reader
        if reader is not None and reader.in_body:
            self.session.close_client(CLIENT_CLOSED)  # the request can never be completed
        elif framer is not None and (framer.awaiting or framer.in_message):
            return
        else:
            self.session.close_client(CLIENT_CLOSED)

    # ---- responses -------------------------------------------------------------------------

    def on_response_data(self, data: bytes) -> None:
        session, framer = self.session, self.framer
        assert framer is not None
        session.exchanges.first_byte()
        completed = framer.completed
        try:
            out = framer.feed(data)
        except BackendError as error:
            session.fail(error)
            return
        if out:
            session.write_client(out)
        if framer.upgraded:
            self._switch_to_tunnel()
            return
        if framer.completed != completed:
            self.fwd.answered(framer.statuses)
            session.exchanges.completed(framer.statuses, framer.sizes)
            self._responses_completed()
        elif framer.awaiting:
            session.extend_deadline(self.fwd.group.response_seconds)

    def _responses_completed(self) -> None:
        framer, reader, session = self.framer, self.reader, self.session
        assert framer is not None
        fwd = self.fwd
        if fwd.dispatch:
            fwd.hand_back(not framer.backend_closes, framer)
            if framer.client_closes:
                session.close_client(HTTP_CLOSE)
                return
            if framer.awaiting:
                fwd.activate()
                if len(session.exchanges.queue) <= 1:
                    session.unblock_reading("queued")
                return
            session.unblock_reading("queued")
        elif framer.close_after and not framer.awaiting:
            # A backend that said it closes is left to send its FIN first (and keep the
            # TIME_WAIT); the linger bounds the wait.
            session.close_client(HTTP_CLOSE, backend_closes=framer.backend_closes)
            return
        if framer.awaiting:
            return
        if self.pending_error is not None:
            session.fail(self.pending_error)
        elif reader is not None and reader.upgrade_rest is not None:  # the Upgrade declined
            out = reader.resume_after_declined_upgrade()
            if reader.heads:
                self.on_heads()
            if out:
                fwd.send(out)
            if reader.error is not None:
                session.fail(reader.error)
                return
            session.unblock_reading("upgrade")
        elif session.client_eof:
            session.close_client(CLIENT_CLOSED)
        elif self.ctx.state.draining:
            session.close_client(SHUTDOWN)
        else:
            self.arm_deadline()

    def _switch_to_tunnel(self) -> None:
        """101 Switching Protocols: from here on both directions are plain byte relays."""
        reader, framer = self.reader, self.framer
        assert reader is not None and framer is not None
        # The responses completed before it, and the 101 (HTTP's last: the rest is a tunnel).
        self.session.exchanges.completed(framer.statuses, framer.sizes)
        rest, reader.upgrade_rest = reader.upgrade_rest or b"", None
        self.session.enter_tunnel(rest)

    def on_backend_eof(self) -> None:
        """The backend's FIN, outside a tunnel: a close-delimited body's end, or a failure."""
        session, framer = self.session, self.framer
        assert framer is not None
        if not framer.eof():
            self.fwd.hung_up()
            session.fail(BackendClosed("backend closed mid-response"))
            return
        self.fwd.answered(framer.statuses)
        session.exchanges.completed(framer.statuses, framer.sizes)
        if self.fwd.dispatch and not framer.awaiting:
            self._responses_completed()  # a close-delimited body ended
        elif framer.awaiting and not session.client_eof:
            # It closed with requests unanswered: they were never processed.
            self.fwd.hung_up()
            session.fail(BackendClosed("backend closed with requests unanswered"))
        else:
            session.close_client(BACKEND_CLOSED)

    # ---- errors, and what the session asks ---------------------------------------------------

    def fail(self, error: BalancerError) -> None:
        """Answer an error: a real response at a response boundary, else reset the client leg
        (the session has recorded the cause)."""
        session, framer, reader = self.session, self.framer, self.reader
        if (
            error.fault == "client"
            and framer is not None
            and reader is not None
            and not reader.in_body  # an error inside this request's body cannot wait for it
            and (framer.awaiting or framer.in_message)
        ):
            # Responses to earlier pipelined requests are still coming: answer after them.
            self.pending_error = error
            session.block_reading("error_pending")
            return
        if framer is not None and framer.in_message:
            session.abort_client()
            return
        status = error.status_hint
        retry_after = RETRY_AFTER_SECONDS if status == 503 else None
        session.record.error_status = status
        response = error_response(status, retry_after)
        session.exchanges.answered_itself(status, len(response))
        session.write_client(response)
        session.close_client(error.reason)

    @property
    def at_response_boundary(self) -> bool:
        """Nothing of a response is owed or under way."""
        framer = self.framer
        return framer is not None and not framer.in_message and not framer.awaiting

    @property
    def in_response(self) -> bool:
        return self.framer is not None and self.framer.in_message

    @property
    def busy(self) -> bool:
        """A request or response is under way (for the admin view and draining)."""
        framer, reader = self.framer, self.reader
        return (framer is not None and bool(framer.awaiting or framer.in_message)) or (
            reader is not None and (reader.in_head or reader.in_body)
        )

    def drain(self) -> None:
        """Shutdown has begun: every response from now on says close."""
        if self.framer is not None:
            self.framer.force_close = True

    def closing_data(self, data: bytes) -> None:
        """Bytes the client sent after the connection began to close: dropped."""

    def close_backends(self) -> None:
        """The client connection ends: so does the backend's (forward.Forwarder.close)."""
        self.fwd.close()

    def client_full(self, full: bool) -> None:
        """The client's socket buffer filled (drained): the backend is not read meanwhile."""
        self.fwd.client_full(full)

    @property
    def head_under_way(self) -> bool:
        return self.reader is not None and self.reader.in_head
