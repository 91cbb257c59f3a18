"""The XMPP clients of test_xmpp.py, run in a process of their own: `python -m
tests.e2e.xmpp_clients '<scenario json>'`. Logs users in through the balancer's c2s and
direct-TLS listeners, drains the first server through the admin API and checks its users move,
kills the second (by the PID the test gave) and checks everyone comes back. Exit 0: all held.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import slixmpp

PORTS: dict[str, int] = {}
TOKEN = ""


class Client(slixmpp.ClientXMPP):  # type: ignore[misc]
    """A user that logs in through a listener, and logs in again whenever it is cut off."""

    def __init__(
        self, n: int, port: int, direct_tls: bool, ca: Path, changed: asyncio.Event
    ) -> None:
        super().__init__(f"user{n}@localhost", "secret")
        self.port = port
        self.enable_direct_tls = direct_tls  # TLS at the balancer (5223)
        self.enable_starttls = not direct_tls  # STARTTLS to Prosody, through (5222)
        self.enable_plaintext = False
        self.ssl_context = ssl.create_default_context(cafile=str(ca))
        self.sessions = 0
        self.keep = True
        self.changed = changed  # set at every login, any user's
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("disconnected", self._lost)

    async def _started(self, _: object) -> None:
        await self.get_roster()  # a round trip to the server
        self.send_presence()
        self.sessions += 1
        self.changed.set()

    def _lost(self, _: object) -> None:
        if self.keep:
            self.connect("127.0.0.1", self.port)

    def login(self) -> None:
        self.connect("127.0.0.1", self.port)


def backends() -> dict[str, int]:
    url = f"http://127.0.0.1:{PORTS['admin']}/backends"
    with urllib.request.urlopen(url, timeout=5) as response:
        view = json.loads(response.read())
    return {b["name"]: b["active"] for b in view if b["group"] == "c2s"}


def admin_post(path: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORTS['admin']}{path}", method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


async def until(condition: Any, changed: asyncio.Event, timeout: float, what: str) -> None:
    """Wait for logins (`changed`) until `condition` holds; bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        changed.clear()
        left = deadline - time.monotonic()
        assert left > 0, f"not within {timeout} s: {what}"
        try:
            await asyncio.wait_for(changed.wait(), left)
        except TimeoutError:
            raise AssertionError(f"not within {timeout} s: {what}") from None


async def settled(expected: dict[str, int], timeout: float = 5) -> None:
    """The admin API's count of sessions per server, once the balancer has released the
    ended ones (another process: asked again until it agrees, bounded)."""
    deadline = time.monotonic() + timeout
    while (seen := backends()) != expected:
        assert time.monotonic() < deadline, f"/backends says {seen}, not {expected}"
        await asyncio.sleep(0.05)


async def scenario(users: int, ca: Path, killed_pid: int) -> None:
    changed = asyncio.Event()
    clients = [
        Client(n, PORTS["c2s"] if n < 8 else PORTS["c2s-direct-tls"], n >= 8, ca, changed)
        for n in range(users)
    ]
    try:
        for client in clients:
            client.login()
        await until(lambda: all(c.sessions == 1 for c in clients), changed, 30,
                    "every user logged in")  # fmt: skip
        # STARTTLS negotiated with Prosody through the c2s listener; not on direct TLS.
        assert all("starttls" in c.features for c in clients[:8])
        assert not any("starttls" in c.features for c in clients[8:])
        spread = backends()
        assert sum(spread.values()) == users and max(spread.values()) - min(spread.values()) <= 1
        print("spread after login:", spread)
        # Drain xmpp1: its sessions are closed over the window and log in again on xmpp2.
        on_first = spread["xmpp1"]
        admin_post("/backends/xmpp1/drain")
        await until(lambda: sum(c.sessions for c in clients) == users + on_first, changed, 15,
                    "the drained server's users logged in again")  # fmt: skip
        await settled({"xmpp1": 0, "xmpp2": users})
        admin_post("/backends/xmpp1/enable")
        # Kill xmpp2, where every user is now: all log in again, on xmpp1.
        before = sum(c.sessions for c in clients)
        os.kill(killed_pid, signal.SIGKILL)
        await until(lambda: sum(c.sessions for c in clients) >= before + users, changed, 30,
                    "every user back after the kill")  # fmt: skip
        await settled({"xmpp1": users, "xmpp2": 0})
        print("after the kill:", backends())
    finally:
        for client in clients:
            client.keep = False
        ends = [client.disconnect(wait=1.0) for client in clients]
        await asyncio.wait_for(asyncio.gather(*ends, return_exceptions=True), 10)


def main() -> None:
    global TOKEN
    said = json.loads(sys.argv[1])
    PORTS.update(said["ports"])
    TOKEN = said["token"]
    asyncio.run(scenario(said["users"], Path(said["ca"]), said["killed_pid"]))


if __name__ == "__main__":
    main()
