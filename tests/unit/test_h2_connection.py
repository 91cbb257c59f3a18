"""wire/h2_connection.py, in memory: python-hyper's h2 as the client for what a client does,
hyperframe's frames for what a client must not; each error answered with its code."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from balancer.wire.h2_connection import STREAMS_BACKSTOP, H2Connection
from balancer.wire.h2_frames import (
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    H2ConnectionError,
    PingAckReceived,
    PingReceived,
    RequestReceived,
    ResetSent,
    SettingsReceived,
    StreamEnded,
    StreamGone,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
           (b":authority", b"example.com")]  # fmt: skip
POST = [(b":method", b"POST"), *REQUEST[1:]]


class Pair:
    """Our server and python-hyper's client, bytes carried between them by hand."""

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self.server = H2Connection(100, max_header_list_size)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.to_client()
        self.to_server()
        self.to_client()  # (our ACK of its SETTINGS)

    def to_server(self) -> list[Any]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[Any]:
        return self.client.receive_data(self.server.data_to_send())

    def request(self, headers: list[tuple[bytes, bytes]] = REQUEST, end: bool = True) -> int:
        stream = self.client.get_next_available_stream_id()
        self.client.send_headers(stream, headers, end_stream=end)
        return stream


def frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def fresh() -> H2Connection:
    """A server past the preface and the client's SETTINGS."""
    server = H2Connection(100, 65536)
    assert isinstance(server.receive_data(PREFACE + SettingsFrame(0).serialize())[0],
                      SettingsReceived)  # fmt: skip
    server.data_to_send()
    return server


def test_a_request_and_its_response() -> None:
    pair = Pair()
    stream = pair.request()
    events = pair.to_server()
    assert [type(e) for e in events] == [RequestReceived, StreamEnded]
    assert events[0].headers == REQUEST and events[0].stream_ended
    pair.server.send_headers(stream, [(b":status", b"200"), (b"content-length", b"5")])
    pair.server.send_data(stream, b"hello", end_stream=True)
    got = pair.to_client()
    assert [type(e) for e in got] == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.StreamEnded,
    ]
    assert got[0].headers == [(b":status", b"200"), (b"content-length", b"5")]
    assert got[1].data == b"hello"
    assert pair.server.streams == {}  # closed both ways: forgotten
    with pytest.raises(StreamGone):
        pair.server.send_data(stream, b"more")


def test_a_body_within_the_windows_and_the_credit_given_back() -> None:
    """200 KB of body: the client sends what the windows allow; the server credits what it
    took, by WINDOW_UPDATE once half a window is owed; the whole body arrives."""
    pair = Pair()
    stream = pair.request(POST, end=False)
    pair.to_server()
    body, received = b"x" * 200_000, bytearray()
    sent = 0
    while sent < len(body):
        room = min(pair.client.local_flow_control_window(stream), 16384, len(body) - sent)
        assert room > 0, "the windows shut: the server did not credit what it took"
        pair.client.send_data(stream, body[sent : sent + room], end_stream=sent + room == len(body))
        sent += room
        for event in pair.to_server():
            if isinstance(event, DataReceived):
                received += event.data
                pair.server.acknowledge_received_data(event.flow_controlled_length, stream)
        pair.to_client()
    assert bytes(received) == body


def test_our_data_keeps_within_the_clients_window() -> None:
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    stream = pair.request()
    pair.to_server()
    assert pair.server.local_flow_control_window(stream) == 100
    pair.server.send_headers(stream, [(b":status", b"200")])
    with pytest.raises(ValueError, match="past the window"):
        pair.server.send_data(stream, b"y" * 101)
    pair.server.send_data(stream, b"y" * 100)
    assert pair.server.local_flow_control_window(stream) == 0
    pair.to_client()
    pair.client.increment_flow_control_window(50, stream)
    events = pair.to_server()
    assert [(type(e), e.stream_id, e.delta) for e in events] == [(WindowUpdated, stream, 50)]
    assert pair.server.local_flow_control_window(stream) == 50


def test_a_larger_initial_window_from_settings_reopens_held_streams() -> None:
    """A stream whose window the client shut (SETTINGS_INITIAL_WINDOW_SIZE 0) is told of the
    room a later SETTINGS gives it, as a WINDOW_UPDATE would."""
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream = pair.request()
    pair.to_server()
    assert pair.server.local_flow_control_window(stream) == 0
    pair.to_client()
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    events = pair.to_server()
    assert [(type(e), e.stream_id, e.delta) for e in events if isinstance(e, WindowUpdated)] == [
        (WindowUpdated, 0, 1000)
    ]
    assert pair.server.local_flow_control_window(stream) == 1000


def test_trailers_end_a_request() -> None:
    pair = Pair()
    stream = pair.request(POST, end=False)
    pair.client.send_data(stream, b"body")
    pair.client.send_headers(stream, [(b"x-sum", b"1")], end_stream=True)
    events = pair.to_server()
    assert [type(e) for e in events] == [
        RequestReceived,
        DataReceived,
        TrailersReceived,
        StreamEnded,
    ]
    assert events[2].headers == [(b"x-sum", b"1")]


def test_trailers_without_end_stream_reset_the_stream_alone() -> None:
    server = fresh()
    block = hpack.Encoder().encode(POST)
    server.receive_data(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
    trailers = hpack.Encoder().encode([(b"x-sum", b"1")])
    events = server.receive_data(HeadersFrame(1, trailers, flags=["END_HEADERS"]).serialize())
    assert [(type(e), e.stream_id, e.error_code) for e in events] == [(ResetSent, 1, 1)]
    assert server.streams == {}
    (reset,) = frames(server.data_to_send())
    assert isinstance(reset, RstStreamFrame) and reset.error_code == 1


def test_the_connections_window_comes_back_as_data_comes_a_streams_only_when_taken() -> None:
    """48,000 bytes on a stream whose backend has taken none: the connection's window is
    opened again at once (other streams' bodies keep coming), the stream's is not."""
    server = fresh()
    block = hpack.Encoder().encode(POST)
    server.receive_data(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
    server.receive_data(DataFrame(1, b"z" * 16000).serialize() * 3)
    (update,) = frames(server.data_to_send())
    assert isinstance(update, WindowUpdateFrame)
    assert (update.stream_id, update.window_increment) == (0, 48000)
    server.acknowledge_received_data(48000, 1)  # (its backend took them)
    (update,) = frames(server.data_to_send())
    assert (update.stream_id, update.window_increment) == (1, 48000)


def test_a_reset_streams_late_data_is_dropped() -> None:
    server = fresh()
    block = hpack.Encoder().encode(POST)
    server.receive_data(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
    server.reset_stream(1, 8)
    server.data_to_send()
    assert server.receive_data(DataFrame(1, b"late").serialize()) == []
    assert server.data_to_send() == b""  # (no second RST_STREAM for a stream we reset)


def test_ping_is_answered_and_a_ping_ack_reported() -> None:
    server = fresh()
    events = server.receive_data(PingFrame(0, opaque_data=b"12345678").serialize())
    assert [type(e) for e in events] == [PingReceived]
    (ack,) = frames(server.data_to_send())
    assert isinstance(ack, PingFrame) and "ACK" in ack.flags and ack.opaque_data == b"12345678"
    events = server.receive_data(PingFrame(0, b"draining", flags=["ACK"]).serialize())
    assert [(type(e), e.ping_data) for e in events] == [(PingAckReceived, b"draining")]


def test_a_header_block_larger_than_a_frame_goes_out_with_continuation() -> None:
    pair = Pair()
    stream = pair.request()
    pair.to_server()
    big = [(b":status", b"200"), (b"x-big", b"v" * 40_000)]
    pair.server.send_headers(stream, big, end_stream=True)
    data = pair.server.data_to_send()
    assert [type(f) for f in frames(data)] == [HeadersFrame, ContinuationFrame, ContinuationFrame]
    got = pair.client.receive_data(data)
    assert got[0].headers == big


def test_a_client_goaway_is_reported_and_read_even_after_closing() -> None:
    server = fresh()
    events = server.receive_data(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    assert [(type(e), e.error_code, e.last_stream_id) for e in events] == [
        (ConnectionTerminated, 0, 0)
    ]
    server.close_reading()
    noise = PingFrame(0, b"12345678").serialize() + GoAwayFrame(0, 0, 2).serialize()
    events = server.receive_data(noise)
    assert [(type(e), e.error_code) for e in events] == [(ConnectionTerminated, 2)]
    assert server.data_to_send() == b""  # (the PING not answered: nothing more is read)


def test_a_client_reset_is_reported() -> None:
    pair = Pair()
    stream = pair.request()
    pair.to_server()
    pair.client.reset_stream(stream, 8)
    assert [(type(e), e.error_code) for e in pair.to_server()] == [(StreamReset, 8)]


def _headers(stream: int, flags: tuple[str, ...] = ("END_HEADERS", "END_STREAM")) -> bytes:
    return HeadersFrame(stream, hpack.Encoder().encode(REQUEST), flags=list(flags)).serialize()


CONNECTION_ERRORS = {
    "not the preface": (b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxx", 1, False),
    "no SETTINGS first": (PingFrame(0, b"12345678").serialize(), 1, False),
    "a frame past 16 KiB": (DataFrame(1, b"x" * 16385).serialize(), 6, True),
    "an even stream id": (_headers(2), 1, True),
    "DATA on an idle stream": (DataFrame(1, b"x").serialize(), 1, True),
    "PING not 8 bytes": (b"\x00\x00\x04\x06\x00\x00\x00\x00\x00abcd", 6, True),
    "WINDOW_UPDATE of 0": (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", 1, True),
    "the window past 2^31-1": (WindowUpdateFrame(0, 2**31 - 1).serialize(), 3, True),
    "ENABLE_PUSH 2": (SettingsFrame(0, settings={2: 2}).serialize(), 1, True),
    "a window setting past 2^31-1": (SettingsFrame(0, settings={4: 2**31}).serialize(), 3, True),
    "PUSH_PROMISE": (PushPromiseFrame(1, promised_stream_id=2).serialize(), 1, True),
    "CONTINUATION alone": (ContinuationFrame(1, b"").serialize(), 1, True),
    "a frame inside a header block": (
        _headers(1, ("END_STREAM",)) + PingFrame(0, b"12345678").serialize(), 1, True
    ),
    "DATA past the connection's window": (
        _headers(1, ("END_HEADERS",)) + DataFrame(1, b"d" * 16384).serialize() * 4
        + DataFrame(1, b"d").serialize(), 3, True,
    ),
    "a header block HPACK cannot read": (HeadersFrame(1, b"\x80", flags=["END_HEADERS"])
                                         .serialize(), 9, True),
    "RST_STREAM on an idle stream": (RstStreamFrame(7, 8).serialize(), 1, True),
}  # fmt: skip


@pytest.mark.parametrize("case", CONNECTION_ERRORS)
def test_connection_errors_end_with_goaway_and_their_code(case: str) -> None:
    data, code, after_preface = CONNECTION_ERRORS[case]
    server = fresh() if after_preface else H2Connection(100, 65536)
    with pytest.raises(H2ConnectionError) as raised:
        server.receive_data(data)
    assert raised.value.error_code == code
    goaway = frames(server.data_to_send())[-1]
    assert isinstance(goaway, GoAwayFrame) and goaway.error_code == code


def test_a_continuation_flood_ends_at_the_bound() -> None:
    server = fresh()
    flood = _headers(1, ("END_STREAM",)) + ContinuationFrame(1, b"\x00").serialize() * 100
    with pytest.raises(H2ConnectionError) as raised:
        server.receive_data(flood)
    assert raised.value.error_code == 11


def test_more_streams_at_once_than_the_backstop_end_the_connection() -> None:
    server = fresh()
    encoder = hpack.Encoder()
    opened = b"".join(
        HeadersFrame(n, encoder.encode(REQUEST), flags=["END_HEADERS"]).serialize()
        for n in range(1, 2 * STREAMS_BACKSTOP + 2, 2)
    )  # (one more than the backstop, none ended)
    with pytest.raises(H2ConnectionError) as raised:
        server.receive_data(opened)
    assert raised.value.error_code == 1 and len(server.streams) == STREAMS_BACKSTOP


def test_a_lower_stream_id_after_a_higher_one_is_refused() -> None:
    server = fresh()
    server.receive_data(_headers(5))
    server.data_to_send()
    server.receive_data(_headers(3))  # (HPACK read all the same: the context stays whole)
    (reset,) = frames(server.data_to_send())
    assert isinstance(reset, RstStreamFrame) and (reset.stream_id, reset.error_code) == (3, 5)


def test_our_settings_announce_the_limits_and_apply_once_acknowledged() -> None:
    server = H2Connection(100, 8192)
    (settings,) = frames(server.data_to_send())
    assert isinstance(settings, SettingsFrame)
    assert settings.settings == {3: 100, 6: 8192, 2: 0}
    server.receive_data(PREFACE + SettingsFrame(0).serialize())
    assert server.decoder.max_header_list_size == 65536  # (the client may not have them yet)
    server.receive_data(SettingsFrame(0, flags=["ACK"]).serialize())
    assert server.decoder.max_header_list_size == 8192


def test_a_new_header_table_size_opens_our_next_block_with_an_update() -> None:
    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    stream = pair.request()
    pair.to_server()
    pair.to_client()  # (the client learns its SETTINGS were acknowledged)
    pair.server.send_headers(stream, [(b":status", b"204")], end_stream=True)
    data = pair.server.data_to_send()
    assert frames(data)[0].data[:1] == b"\x20"
    assert pair.client.receive_data(data)[0].headers == [(b":status", b"204")]
