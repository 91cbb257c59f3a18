"""The quick flags of `balancer run` (`--http`, `--backend`, ...), laid over a config file's
table before `config.parse_config` reads it. Pure: a table in, a table out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.config.schema import ConfigError


@dataclass(frozen=True, slots=True)
class Overrides:
    """Quick flags of `balancer run`; each replaces its part of the file (or the defaults)."""

    http: str | None = None
    https: str | None = None
    backends: tuple[str, ...] = ()
    policy: str | None = None
    cert: str | None = None
    key: str | None = None
    admin: str | None = None
    access_log: str | None = None
    workers: int | str | None = None
    event_loop: str | None = None


def apply_overrides(
    data: Mapping[str, Any], flags: Overrides, source: str = "command line"
) -> dict[str, Any]:
    """A copy of the TOML table with the flags laid over it; `parse_config` validates the result.

    `--http`/`--https` set the bind of the file's one listener of that protocol, which keeps
    everything else it says (its name, group, routes, PROXY and certificates); with none, they
    add one; with several, they are refused (which one is meant is the file's to say).
    `--backend` replaces the top-level [[backends]] (the default group's); a file whose
    backends are all in [[groups]] refuses it, rather than add a group nothing routes to.
    Raises ConfigError naming the flag and the fix.
    """
    merged: dict[str, Any] = dict(data)
    for protocol, bind in (("http", flags.http), ("https", flags.https)):
        if bind is None:
            continue
        listeners = [x for x in merged.get("listeners", []) if isinstance(x, dict)]
        mine = [x for x in listeners if _protocol(x) == protocol]
        if len(mine) > 1:
            names = ", ".join(repr(x.get("name", protocol)) for x in mine)
            raise ConfigError([f"{source}: --{protocol} {bind}: the file has {len(mine)} "
                               f"{protocol} listeners ({names}); --{protocol} sets the bind "
                               "of one: set each one's bind in the file instead"])  # fmt: skip
        if mine:
            merged["listeners"] = [{**x, "bind": bind} if x is mine[0] else x for x in listeners]
        else:
            added = {"name": protocol, "bind": bind, "protocol": protocol}
            merged["listeners"] = [*listeners, added]
    if flags.backends:
        if "groups" in merged and "backends" not in merged:
            raise ConfigError([f"{source}: --backend: the file's backends are in [[groups]]; "
                               "--backend replaces the top-level [[backends]] (the default "
                               "group), which it has none of: set the groups' backends in the "
                               "file instead"])  # fmt: skip
        merged["backends"] = [{"address": address} for address in flags.backends]
    if flags.cert is not None or flags.key is not None:
        tls = dict(merged.get("tls", {}))
        if flags.cert is not None:
            tls["cert"] = flags.cert
        if flags.key is not None:
            tls["key"] = flags.key
        merged["tls"] = tls
    for key in ("policy", "admin", "access_log", "workers", "event_loop"):
        value = getattr(flags, key)
        if value is not None:
            merged[key] = value
    return merged


def _protocol(listener: Mapping[str, Any]) -> str:
    """A listener table's protocol as schema.py reads it: `tls = true`, or `protocol`."""
    tls = listener.get("tls")
    if isinstance(tls, bool):
        return "https" if tls else "http"
    return "https" if listener.get("protocol") == "https" else "http"
