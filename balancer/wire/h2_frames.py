"""HTTP/2's vocabulary (RFC 9113 §4-§7), for wire/h2_connection.py and its callers: frame
types and flags, error codes and their names, settings, the events a connection reports and
its two errors, and one frame serialized. Pure.
"""

from __future__ import annotations

import struct
from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (§6) and flags.
DATA: Final = 0
HEADERS: Final = 1
PRIORITY: Final = 2
RST_STREAM: Final = 3
SETTINGS: Final = 4
PUSH_PROMISE: Final = 5
PING: Final = 6
GOAWAY: Final = 7
WINDOW_UPDATE: Final = 8
CONTINUATION: Final = 9
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

# Error codes (§7), by name as records and metrics say them.
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
SETTINGS_TIMEOUT: Final = 0x4
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
CONNECT_ERROR: Final = 0xA
ENHANCE_YOUR_CALM: Final = 0xB
INADEQUATE_SECURITY: Final = 0xC
HTTP_1_1_REQUIRED: Final = 0xD
ERROR_NAMES: Final[dict[int, str]] = {
    NO_ERROR: "no_error", PROTOCOL_ERROR: "protocol_error", INTERNAL_ERROR: "internal_error",
    FLOW_CONTROL_ERROR: "flow_control_error", SETTINGS_TIMEOUT: "settings_timeout",
    STREAM_CLOSED: "stream_closed", FRAME_SIZE_ERROR: "frame_size_error",
    REFUSED_STREAM: "refused_stream", CANCEL: "cancel", COMPRESSION_ERROR: "compression_error",
    CONNECT_ERROR: "connect_error", ENHANCE_YOUR_CALM: "enhance_your_calm",
    INADEQUATE_SECURITY: "inadequate_security", HTTP_1_1_REQUIRED: "http_1_1_required",
}  # fmt: skip

# Settings (§6.5.2).
HEADER_TABLE_SIZE: Final = 0x1
ENABLE_PUSH: Final = 0x2
MAX_CONCURRENT_STREAMS_SETTING: Final = 0x3
INITIAL_WINDOW_SIZE: Final = 0x4
MAX_FRAME_SIZE: Final = 0x5
MAX_HEADER_LIST_SIZE: Final = 0x6

DEFAULT_WINDOW: Final = 65535
DEFAULT_FRAME_SIZE: Final = 16384
MAX_WINDOW: Final = 2**31 - 1
FRAME_HEADER: Final = struct.Struct(">HBBBL")  # (length's high 16 bits, low 8, type, flags, id)
SETTING: Final = struct.Struct(">HL")
TWO_WORDS: Final = struct.Struct(">LL")
WORD: Final = struct.Struct(">L")


class H2ConnectionError(Exception):
    """The client broke the protocol: GOAWAY with `error_code` is queued; the connection
    ends."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code


class StreamGone(Exception):
    """A frame for a stream that has ended (reset by either side, or done): not sent."""


# ---- events ----------------------------------------------------------------------------------


class RequestReceived:
    __slots__ = ("headers", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = ended


class DataReceived:
    __slots__ = ("data", "flow_controlled_length", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, data: bytes, length: int, ended: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = length  # (padding included: what the window lost)
        self.stream_ended = ended


class TrailersReceived:
    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class StreamEnded:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset:
    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class ResetSent:
    """This side reset the stream for a stream error of the client's (RST_STREAM queued)."""

    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class WindowUpdated:
    __slots__ = ("delta", "stream_id")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id  # 0: the connection's window
        self.delta = delta


class PingReceived:
    __slots__ = ()


class PingAckReceived:
    __slots__ = ("ping_data",)

    def __init__(self, ping_data: bytes) -> None:
        self.ping_data = ping_data


class SettingsReceived:
    __slots__ = ()


class PriorityReceived:
    __slots__ = ()


class ConnectionTerminated:
    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


Event = (
    RequestReceived | DataReceived | TrailersReceived | StreamEnded | StreamReset | ResetSent
    | WindowUpdated | PingReceived | PingAckReceived | SettingsReceived | PriorityReceived
    | ConnectionTerminated
)  # fmt: skip


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def error_name(code: int) -> str:
    """An HTTP/2 error code as RFC 9113 names it, in lower case (an unknown one by number)."""
    return ERROR_NAMES.get(code) or str(code)
