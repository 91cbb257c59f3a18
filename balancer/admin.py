"""The admin listener: /metrics for Prometheus, /connections and /backends as JSON, /healthz.

HTTP the balancer speaks itself, so h11 (not the relay's parser) drives it; it is not a hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

T = TypeVar("T")
View = Callable[[], T | Awaitable[T]]  # a worker's views are direct; the supervisor's ask
Route = Callable[[], Awaitable[tuple[int, str, bytes]]]


class AdminServer:
    def __init__(
        self,
        metrics: View[bytes],
        connections: View[dict[str, Any]],
        backends: View[list[dict[str, Any]]],
    ) -> None:
        async def metrics_page() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, await _now(metrics)

        async def connections_page() -> tuple[int, str, bytes]:
            return _json(await _now(connections))

        async def backends_page() -> tuple[int, str, bytes]:
            return _json(await _now(backends))

        async def health() -> tuple[int, str, bytes]:
            return 200, "text/plain; charset=utf-8", b"ok\n"

        self.routes: dict[str, Route] = {
            "/metrics": metrics_page,
            "/connections": connections_page,
            "/backends": backends_page,
            "/healthz": health,
        }

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
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), timeout=30)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode("ascii", "replace").split("?", 1)[0]
                    route = self.routes.get(target)
                    if event.method not in (b"GET", b"HEAD"):
                        status, kind, body = 405, "text/plain", b"only GET\n"
                    elif route is None:
                        status, kind, body = 404, "text/plain", b"not found\n"
                    else:
                        status, kind, body = await route()
                    headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
                    reason = HTTPStatus(status).phrase.encode()
                    response = h11.Response(status_code=status, headers=headers, reason=reason)
                    writer.write(conn.send(response))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    break
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _json(value: object) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(value, indent=1).encode() + b"\n"


async def _now(view: View[T]) -> T:
    result = view()
    if inspect.isawaitable(result):
        return await result
    return result
