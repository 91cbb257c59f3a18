"""Runtime control on the admin listener: drain, enable, maintenance and weight, by token.

Theory of operation
-------------------
The supervisor serves the admin listener; a POST there is a write:

    POST /backends/<name>/drain         no new connections or requests; those open finish
    POST /backends/<name>/maintenance   out, as if down (the checks go on, unheeded)
    POST /backends/<name>/enable        back to what the checks say
    POST /backends/<name>/weight        body {"weight": N} (1..256), or ?value=N
    POST /healthz/fail                  /healthz answers 503 while everything else serves on:
                                        the instance leaves an L4 tier whose checks read it
                                        (HAProxy's `monitor fail`, Envoy's /healthcheck/fail);
                                        SIGUSR2 does the same
    POST /healthz/ok                    /healthz answers 200 again

Each needs `Authorization: Bearer <token>` (the file `admin_token_file` names; without it
every write is refused): 401 otherwise, counted with every other outcome in
`balancer_admin_writes_total{result}`. A write lands in the generation's BackendTable (every
worker reads it at its next pick), says one log line, and is kept as an override: a reload
carries it to the new generation unless the file changed that backend (its address or
weight), which then wins.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote

from prometheus_client import Counter, Gauge

from balancer.backend.pool import ADMIN_STATES, DRAINING, ENABLED, MAINTENANCE, BackendTable
from balancer.config.schema import BackendConfig, Config, ConfigError
from balancer.observe.admin import json_answer

log = logging.getLogger("balancer")

ACTIONS = {"drain": DRAINING, "enable": ENABLED, "maintenance": MAINTENANCE}
STATE_NAMES = {value: name for name, value in ADMIN_STATES.items()}
MAX_WEIGHT = 256
Answer = tuple[int, str, bytes]


@dataclass
class Override:
    """An operator's word on a backend, and the backend as configured when it was said."""

    configured: BackendConfig
    admin: int | None = None
    weight: int | None = None


class Control:
    """The writes (see the module docstring). `current` gives the serving generation's
    configuration, table and token."""

    def __init__(
        self,
        current: Callable[[], tuple[Config, BackendTable, str | None]],
        writes: Counter,
        changed: Callable[[str, str], None],
        failing: Gauge | None = None,
    ) -> None:
        self.current = current
        self.writes = writes  # by result (observe.SupervisorMetrics.admin_writes)
        self.changed = changed  # backend name, its new state: a metric
        self.overrides: dict[str, Override] = {}
        self.health_failing: str | None = None  # why /healthz fails on purpose; None: it does not
        self._failing = failing  # its gauge (observe.SupervisorMetrics.healthz_failing)

    def fail_health(self, why: str) -> None:
        """/healthz answers 503 from now on (the instance leaves the tier; it serves on)."""
        self.health_failing = why
        if self._failing is not None:
            self._failing.set(1)
        log.warning("/healthz fails from now on (%s): leaving the tier; serving on", why)

    def health_ok(self, why: str) -> None:
        self.health_failing = None
        if self._failing is not None:
            self._failing.set(0)
        log.info("/healthz answers 200 again (%s)", why)

    async def write(self, target: str, headers: dict[str, str], body: bytes) -> Answer:
        config, table, token = self.current()
        given = headers.get("authorization", "")
        if token is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            self.writes.labels("unauthorized").inc()
            why = "set admin_token_file to allow writes" if token is None else "a bearer token"
            log.warning("admin API: refused POST %s (401: %s)", target[:200], why)
            return json_answer({"error": f"unauthorized: {why}"}, 401)
        path, _, query = target.partition("?")
        if path in ("/healthz/fail", "/healthz/ok"):
            self.writes.labels("ok").inc()
            if path == "/healthz/fail":
                self.fail_health("admin API")
            else:
                self.health_ok("admin API")
            return json_answer({"healthz": "failing" if self.health_failing else "ok"})
        parts = [unquote(part) for part in path.strip("/").split("/")]
        names = [backend.name for backend in config.backends]
        if len(parts) != 3 or parts[0] != "backends" or parts[1] not in names:
            self.writes.labels("not_found").inc()
            return json_answer({"error": f"not found: {path}; backends: {names}"}, 404)
        name, action = parts[1], parts[2]
        index = names.index(name)
        if action not in ACTIONS and action != "weight":
            self.writes.labels("not_found").inc()
            return json_answer({"error": f"no action {action!r}: drain, enable, "
                                         "maintenance, weight"}, 404)  # fmt: skip
        weight = _weight(query, body) if action == "weight" else None
        if action == "weight" and weight is None:
            self.writes.labels("bad_request").inc()
            return json_answer({"error": f"weight: a whole number, 1 to {MAX_WEIGHT}"}, 400)
        override = self.overrides.get(name)
        if override is None or override.configured != config.backends[index]:
            override = self.overrides[name] = Override(config.backends[index])
        if weight is not None:
            override.weight = weight
            table.set(index, weight=weight)
            said = f"weight {weight}"
        else:
            override.admin = ACTIONS[action]
            table.set(index, admin=ACTIONS[action])
            said = STATE_NAMES[ACTIONS[action]]
        self.writes.labels("ok").inc()
        log.info("backend %s (%s): %s (admin API)", name, config.backends[index].address, said)
        if action in ACTIONS:
            self.changed(name, said)
        return json_answer(
            {"name": name, "state": table.state(index), "weight": table.weight(index)}
        )

    def carry(self, config: Config, table: BackendTable) -> None:
        """A new generation: the overrides whose backend the file left as it was apply to it;
        the others are dropped (the file changed that backend: its word wins)."""
        for name, override in list(self.overrides.items()):
            configured = next((b for b in config.backends if b.name == name), None)
            if configured != override.configured:
                log.info("backend %s: the file changed it; its admin override is dropped", name)
                del self.overrides[name]
                continue
            index = config.backends.index(configured)
            table.set(index, admin=override.admin, weight=override.weight)


def read_token(config: Config) -> str | None:
    """The bearer token (admin_token_file), or None; ConfigError if it cannot serve."""
    if config.admin_token_file is None:
        return None
    where = f"{config.source}: admin_token_file = {config.admin_token_file!r}"
    try:
        token = Path(config.admin_token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError([f"{where}: cannot read: {reason}"]) from None
    if len(token) < 16:
        raise ConfigError([f"{where}: the token is under 16 characters; `openssl rand -hex 32`"])
    return token


def _weight(query: str, body: bytes) -> int | None:
    value: object = None
    if query:
        values = parse_qs(query).get("value")
        value = values[0] if values else None
    elif body:
        try:
            value = json.loads(body).get("weight")
        except (ValueError, AttributeError):
            return None
    try:
        weight = int(str(value))
    except ValueError:
        return None
    return weight if 1 <= weight <= MAX_WEIGHT else None
