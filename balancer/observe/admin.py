"""The admin listener: the status page at /, /metrics for Prometheus, /connections and
/backends as JSON, /healthz;
POST for runtime control when the supervisor serves it (supervisor.py, control.py).

HTTP the balancer speaks itself, so h11 (not the relay's parser) drives it; it is not a hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from balancer.observe import status_page

T = TypeVar("T")
View = Callable[[], T | Awaitable[T]]  # a worker's views are direct; the supervisor's ask
Route = Callable[[], Awaitable[tuple[int, str, bytes]]]
# POST: the target, the headers (names lowercased) and the body → status, type, body.
Write = Callable[[str, dict[str, str], bytes], Awaitable[tuple[int, str, bytes]]]
MAX_BODY_BYTES = 65536


class AdminServer:
    def __init__(
        self,
        metrics: View[bytes],
        connections: View[dict[str, Any]],
        backends: View[list[dict[str, Any]]],
        write: Write | None = None,
        failing: Callable[[], str | None] = lambda: None,
    ) -> None:
        async def metrics_page() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, await _now(metrics)

        async def connections_page() -> tuple[int, str, bytes]:
            return _json(await _now(connections))

        async def backends_page() -> tuple[int, str, bytes]:
            return _json(await _now(backends))

        async def health() -> tuple[int, str, bytes]:
            why = failing()  # (the operator's: leaving an L4 tier, control.py)
            if why is not None:
                return 503, "text/plain; charset=utf-8", f"failing on purpose ({why})\n".encode()
            return 200, "text/plain; charset=utf-8", b"ok\n"

        rates = status_page.Rates()  # (kept between renders: see status_page)

        async def status() -> tuple[int, str, bytes]:
            now = datetime.now(UTC)
            metrics_page, views = (await _now(metrics)).decode(), await _now(backends)
            page = status_page.render(metrics_page, views, now, rates)
            return 200, "text/html; charset=utf-8", page

        self.routes: dict[str, Route] = {
            "/metrics": metrics_page,
            "/connections": connections_page,
            "/backends": backends_page,
            "/healthz": health,
            "/": status,
        }
        self.write = write  # POST: runtime control (the supervisor's; None: GET only)

    @classmethod
    def of_registry(
        cls,
        registry: CollectorRegistry,
        connections: View[dict[str, Any]],
        backends: View[list[dict[str, Any]]],
    ) -> AdminServer:
        return cls(lambda: generate_latest(registry), connections, backends)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # The loop is ending (shutdown) with a scrape connection open. Ending normally, as
            # Python 3.11's stream callback logs a cancelled handler as an error with a traceback.
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), timeout=30)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body = (body + bytes(event.data))[:MAX_BODY_BYTES]
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    status, kind, payload = await self._answer(request, body)
                    headers = [("Content-Type", kind), ("Content-Length", str(len(payload)))]
                    headers += self._said_with(status, request)
                    reason = HTTPStatus(status).phrase.encode()
                    response = h11.Response(status_code=status, headers=headers, reason=reason)
                    writer.write(conn.send(response))
                    if request.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=payload)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    request = None
                elif isinstance(event, h11.ConnectionClosed):
                    break
                if conn.our_state is h11.MUST_CLOSE:
                    break  # the client asked to close (or spoke HTTP/1.0): answered, done
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                elif event is h11.PAUSED:
                    break  # (cannot happen past the two above; never spin on it)
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, request: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        if request.method in (b"GET", b"HEAD"):
            route = self.routes.get(path)
            if route is not None:
                return await route()
            if self._is_write(path):
                return 405, "text/plain", b"a write: POST, with the bearer token\n"
            return 404, "text/plain", b"not found\n"
        if request.method == b"POST" and self.write is not None:
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            return await self.write(target, headers, body)
        return 405, "text/plain", b"GET, or POST for control\n" if self.write else b"only GET\n"

    def _is_write(self, path: str) -> bool:
        """A runtime-control URL (control.py): /backends/<name>/<action>, /healthz/fail, ok."""
        if self.write is None:
            return False
        return path in ("/healthz/fail", "/healthz/ok") or (
            path.startswith("/backends/") and path.count("/") == 3
        )

    def _said_with(self, status: int, request: h11.Request) -> list[tuple[str, str]]:
        """The headers RFC 9110 asks of a 401 (how to authenticate) and a 405 (what is
        allowed on that URL)."""
        if status == 401:
            return [("WWW-Authenticate", 'Bearer realm="balancer admin"')]
        if status != 405:
            return []
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        return [("Allow", "POST" if self._is_write(path) else "GET, HEAD")]


def _json(value: object, status: int = 200) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(value, indent=1).encode() + b"\n"


json_answer = _json  # for the supervisor's control answers


async def _now(view: View[T]) -> T:
    result = view()
    if inspect.isawaitable(result):
        return await result
    return result
