"""The HTTP flow of one client connection (reuse never), over a fake session and forwarder:
the real request reader, response framer and exchange queue; no sockets, no loop. What a
client gets when requests are pipelined, when an error comes between or inside responses,
when an Upgrade is declined or taken, when either side half-closes."""

from __future__ import annotations

import pytest

from balancer.client.http_flow import HttpFlow
from balancer.client.listener import HEADER, IDLE, RESPONSE
from balancer.facts.causes import BACKEND_CLOSED, CLIENT_CLOSED, HTTP_CLOSE
from balancer.wire.errors import BadRequest
from tests.fakes import FakeForwarder, FakeSession

# A compiled HttpFlow holds a compiled Forwarder (a direct call each request, no Protocol):
# the fake forwarder is for the pure build; the compiled flow is the integration tests'.
pytestmark = pytest.mark.incompatible_with_mypyc

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def flow() -> tuple[HttpFlow, FakeSession, FakeForwarder]:
    session, fwd = FakeSession(), FakeForwarder()
    http = session.http = HttpFlow(session, fwd)  # type: ignore[arg-type]
    return http, session, fwd


def test_pipelined_requests_go_out_in_order_and_their_responses_complete_each_exchange() -> None:
    http, session, fwd = flow()
    http.on_client_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fwd.sent.count(b"GET /") == 2 and fwd.sent.index(b"/a") < fwd.sent.index(b"/b")
    assert len(session.exchanges.queue) == 2 and session.deadline_kind == RESPONSE
    http.on_response_data(OK + OK[:20])  # the first whole, the second's head begun
    assert session.written == OK  # (a head is relayed whole: its start is held)
    assert len(session.exchanges.queue) == 1 and [r.status for r in session.published] == [200]
    http.on_response_data(OK[20:39])  # its head whole and one byte of its body
    assert session.written == OK + OK[:39]
    http.on_response_data(OK[39:])
    assert not session.exchanges.queue and fwd.answered_statuses == [200, 200]
    assert session.deadline_kind == IDLE and session.closed is None  # keep-alive: waits


def test_a_bad_request_behind_one_still_answered_waits_for_that_response_then_gets_400() -> None:
    http, session, _ = flow()
    http.on_client_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    http.on_client_data(b"BROKEN\x00 / HTTP/1.1\r\n\r\n")
    assert isinstance(http.pending_error, BadRequest)
    assert "error_pending" in session.blocked and session.written == b""
    http.on_response_data(OK + OK)  # both answered first, whole
    assert session.written.startswith(OK + OK)
    assert session.written[len(OK + OK) :].startswith(b"HTTP/1.1 400 ")
    assert session.closed == ("bad_request", False) and session.record.error_status == 400


def test_an_error_inside_a_response_resets_the_client_and_writes_no_error_response() -> None:
    http, session, _ = flow()
    http.on_client_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    http.on_response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    http.on_backend_eof()  # 5 of 10 bytes: the body is cut
    assert session.aborted and session.closed is None  # a cut response never looks whole
    assert b"502" not in session.written


def test_a_declined_upgrade_resumes_the_connection_and_sends_what_followed() -> None:
    http, session, fwd = flow()
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    http.on_client_data(upgrade + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "upgrade" in session.blocked and b"/next" not in fwd.sent  # held: maybe a tunnel
    http.on_response_data(OK)  # declined: a plain response
    assert "upgrade" not in session.blocked and b"GET /next" in fwd.sent
    assert not session.tunnel and len(session.exchanges.queue) == 1


def test_a_101_makes_the_connection_a_tunnel_with_the_bytes_after_the_head() -> None:
    http, session, _ = flow()
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    http.on_client_data(upgrade + b"\x81\x05hello")
    http.on_response_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert session.tunnel and session.tunnel_rest == b"\x81\x05hello"
    assert [r.status for r in session.published] == [101]


def test_a_client_half_close_waits_for_the_response_then_closes() -> None:
    http, session, _ = flow()
    http.on_client_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    session.client_eof = True
    http.on_client_eof()
    assert session.closed is None  # the response is still owed
    http.on_response_data(OK)
    assert session.written == OK and session.closed == (CLIENT_CLOSED, False)


def test_a_client_fin_inside_a_request_body_closes_at_once() -> None:
    http, session, _ = flow()
    http.on_client_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n1234")
    http.on_client_eof()
    assert session.closed == (CLIENT_CLOSED, False)


def test_a_backend_fin_with_requests_unanswered_is_a_502_at_the_boundary() -> None:
    http, session, fwd = flow()
    http.on_client_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    http.on_backend_eof()
    assert "hung_up" in fwd.calls
    assert session.written.startswith(b"HTTP/1.1 502 ") and session.closed is not None
    assert session.closed[0] == "backend_closed"


def test_a_close_delimited_body_ends_at_the_backends_fin() -> None:
    http, session, _ = flow()
    http.on_client_data(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    http.on_response_data(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
    http.on_backend_eof()
    assert session.written.endswith(b"until the end") and not session.aborted
    assert session.closed == (BACKEND_CLOSED, False)
    assert [r.status for r in session.published] == [200]


def test_a_request_that_says_close_ends_the_connection_after_its_response() -> None:
    http, session, fwd = flow()
    http.on_client_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    http.on_client_data(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")  # after close: not read
    assert b"/never" not in fwd.sent
    http.on_response_data(OK)
    assert session.closed is not None and session.closed[0] == HTTP_CLOSE
    assert b"Connection: close" in session.written  # the response says so too


def test_an_http10_client_that_keeps_the_connection_is_told_so_and_it_stays() -> None:
    http, session, fwd = flow()
    http.on_client_data(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    assert b"Connection: keep-alive" in fwd.sent  # and the backend is asked to keep it too
    http.on_response_data(OK)  # an HTTP/1.1 backend's: says nothing of keep-alive
    assert b"Connection: keep-alive\r\n" in session.written and session.written.endswith(b"ok")
    assert session.closed is None and session.deadline_kind == IDLE


def test_a_head_begun_is_bounded_by_the_header_deadline() -> None:
    http, session, _ = flow()
    http.on_client_data(b"GET / HTTP/1.1\r\nHo")
    assert session.deadline_kind == HEADER and http.head_under_way
