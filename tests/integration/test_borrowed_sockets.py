"""A leg's borrowed socket object (tcpinfo.borrow) answers the same from either build: the
pure build's socket object on the descriptor, the compiled build's FdSocket (_fdsocket.c,
which skips the getsockname a socket object's constructor makes). Real sockets on
127.0.0.1; the FdSocket half runs where the compiled build is (CI's second leg)."""

from __future__ import annotations

import _socket
import select
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from balancer.net import tcpinfo
from tests.helpers import until_bytes_are_stamped

try:
    from balancer.net._fdsocket import FdSocket
except ImportError:  # the pure build
    FdSocket = None  # type: ignore[assignment, misc]


FIN_WAITS = (4, 5)  # Linux's TCP_FIN_WAIT1, TCP_FIN_WAIT2: our FIN sent


def socket_object(fd: int) -> Any:
    return _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)


def fd_socket(fd: int) -> Any:
    if FdSocket is None:
        pytest.skip("the compiled build's FdSocket is not built here (pure build)")
    return FdSocket(fd)


@pytest.fixture(params=[socket_object, fd_socket], ids=["socket_object", "FdSocket"])
def borrow(request: Any) -> Callable[[int], Any]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server): a TCP connection over loopback, receive timestamps on."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    tcpinfo.enable_receive_timestamps(listener)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    until_bytes_are_stamped(client, server)
    yield client, server
    client.close()
    server.close()


def test_tcp_info_a_peek_and_a_half_close_through_the_borrowed_descriptor(
    borrow: Callable[[int], Any], pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    kernel = borrow(server.fileno())
    try:
        assert kernel.fileno() == server.fileno()
        info = tcpinfo.info(kernel)
        assert info is not None and info.state == 1 and info.rtt_seconds > 0  # ESTABLISHED
        probes = info.bytes_received or 0  # (until_bytes_are_stamped's)
        assert tcpinfo.first_byte_arrival(kernel) is None  # nothing queued: EAGAIN, no stamp
        client.sendall(b"hello")
        assert select.select([server], [], [], 5)[0]
        arrival = tcpinfo.first_byte_arrival(kernel)
        assert arrival is not None and arrival > 1.6e9  # a wall-clock stamp of the kernel's
        assert server.recv(16) == b"hello"  # peeked, not taken
        assert tcpinfo.shutdown_write(kernel)
        assert client.recv(16) == b""  # our FIN reached the peer
        info = tcpinfo.info(kernel)
        assert info is not None and info.state in FIN_WAITS
        assert info.bytes_received == probes + 5
    finally:
        assert kernel.detach() == server.fileno()
    assert server.fileno() >= 0  # detached, never closed: the descriptor is still the owner's


def test_linger_zero_through_the_borrowed_descriptor_makes_the_close_an_rst(
    borrow: Callable[[int], Any], pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    kernel = borrow(server.fileno())
    kernel.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    kernel.detach()
    server.close()
    with pytest.raises(ConnectionResetError):
        client.recv(16)


def test_a_reset_or_a_closed_descriptor_raises_as_a_socket_object_would(
    borrow: Callable[[int], Any], pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # an RST
    kernel = borrow(server.fileno())
    assert select.select([server], [], [], 5)[0]
    with pytest.raises(ConnectionResetError):
        kernel.recvmsg(1, 64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    kernel.detach()
    assert tcpinfo.info(kernel) is None  # detached: EBADF, taken as "cannot say"
    assert not tcpinfo.shutdown_write(kernel)


def test_fdsockets_tcp_info_is_the_python_parse_of_the_same_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """FdSocket.tcp_info parses TCP_INFO in C: field for field what tcpinfo.info makes of a
    socket object's getsockopt, on a connection at rest (nothing in flight between the two
    reads), after bytes each way."""
    client, server = pair
    client.sendall(b"x" * 3000)
    server.sendall(b"y" * 700)
    assert len(client.recv(700, socket.MSG_WAITALL)) == 700
    assert len(server.recv(3000, socket.MSG_WAITALL)) == 3000
    fd = fd_socket(server.fileno())
    plain = socket_object(server.fileno())
    try:
        parsed_in_c, parsed_here = tcpinfo.info(fd), tcpinfo.info(plain)
        assert type(parsed_in_c) is tcpinfo.TCPInfo and parsed_in_c == parsed_here
        assert parsed_here is not None and parsed_here.bytes_received > 3000  # (and probes)
        assert parsed_here.bytes_sent == 700
    finally:
        fd.detach()
        plain.detach()


def test_the_build_borrows_its_own_kind() -> None:
    """The compiled build borrows an FdSocket, the pure build a socket object."""
    listener = socket.socket()
    try:
        kernel = tcpinfo.borrow(listener)
        expected = FdSocket if FdSocket is not None else _socket.socket
        assert type(kernel) is expected
        kernel.detach()
    finally:
        listener.close()
