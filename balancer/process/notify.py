"""The service manager's notification socket (systemd's sd_notify protocol), spoken directly.

With `Type=notify` systemd sets NOTIFY_SOCKET and waits for READY=1 before it calls the
service started; RELOADING=1 (with the monotonic time) and READY=1 bracket a reload, and
STOPPING=1 says a stop has begun. Without NOTIFY_SOCKET every call here does nothing. A lost
notification is not the balancer's failure: errors are logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("balancer")

_warned = False


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") as one datagram; True if it was sent."""
    global _warned
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as error:
        if not _warned:
            _warned = True
            log.warning("cannot notify the service manager at %s: %s", address, error.strerror)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    """Before a reload: systemd (Type=notify-reload, 253+) reads the monotonic stamp."""
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=draining connections")
