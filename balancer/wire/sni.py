"""The server name (SNI) of a TLS ClientHello, read without terminating TLS (passthrough).

Pure. `ClientHelloReader.feed` takes a connection's first bytes as they come and returns
None while more are needed, or a `Peek`: whether they are TLS at all, and the server name if
the ClientHello carries one. The bytes are not consumed: the caller passes them on untouched.
A ClientHello may span several TLS records and TCP segments; at most MAX_HELLO_BYTES are held.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

MAX_HELLO_BYTES: Final = 65536
_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_SERVER_NAME: Final = 0x0000
_HOST_NAME: Final = 0x00


@dataclass(frozen=True, slots=True)
class Peek:
    tls: bool  # the bytes are a TLS handshake (else: route by default, pass them on)
    server_name: str | None  # lower case; None: no SNI sent (or not TLS)


NOT_TLS: Final = Peek(False, None)


class ClientHelloReader:
    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""  # every byte fed so far (passed on untouched)

    def feed(self, data: bytes) -> Peek | None:
        buffer = self.held = self.held + data
        if buffer[:1] != bytes((_HANDSHAKE,)):
            return NOT_TLS
        # The handshake messages, from as many records as have fully arrived.
        message, at = b"", 0
        while at + 5 <= len(buffer):
            kind, _version, length = struct.unpack_from("!BHH", buffer, at)
            if kind != _HANDSHAKE:
                return NOT_TLS
            if at + 5 + length > len(buffer):
                break
            message += buffer[at + 5 : at + 5 + length]
            at += 5 + length
            if len(message) >= 4:
                if message[0] != _CLIENT_HELLO:
                    return NOT_TLS
                whole = 4 + int.from_bytes(message[1:4], "big")
                if len(message) >= whole:
                    return Peek(True, server_name(message[4:whole]))
        if len(buffer) >= MAX_HELLO_BYTES:
            return Peek(True, None)  # too long to be read whole: routed by default
        return None


def server_name(hello: bytes) -> str | None:
    """The host_name of the server_name extension of a ClientHello body, or None."""
    try:
        at = 2 + 32  # legacy_version, random
        at += 1 + hello[at]  # session id
        at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
        at += 1 + hello[at]  # compression methods
        end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
        at += 2
        while at + 4 <= end:
            kind, size = struct.unpack_from("!HH", hello, at)
            at += 4
            if kind == _SERVER_NAME:
                names_end = at + 2 + int.from_bytes(hello[at : at + 2], "big")
                at += 2
                while at + 3 <= names_end:
                    name_type, name_size = struct.unpack_from("!BH", hello, at)
                    at += 3
                    if name_type == _HOST_NAME:
                        return hello[at : at + name_size].decode("ascii").lower()
                    at += name_size
                return None
            at += size
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None
