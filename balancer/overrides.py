"""The quick flags of `balancer run` (`--http`, `--backend`, ...), laid over a config file's
table before `config.parse_config` reads it. Pure: a table in, a table out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


def apply_overrides(data: Mapping[str, Any], flags: Overrides) -> dict[str, Any]:
    """A copy of the TOML table with the flags laid over it; `parse_config` validates the result.

    `--http`/`--https` replace the listener of that protocol (or add one); `--backend` replaces
    the whole backend list.
    """
    merged: dict[str, Any] = dict(data)
    for protocol, bind in (("http", flags.http), ("https", flags.https)):
        if bind is None:
            continue
        listeners = [x for x in merged.get("listeners", []) if isinstance(x, dict)]
        kept = [x for x in listeners if x.get("protocol", "http") != protocol]
        mode = next((x.get("mode", "http") for x in listeners
                     if x.get("protocol", "http") == protocol), "http")  # fmt: skip
        merged["listeners"] = [*kept, {"name": protocol, "bind": bind, "protocol": protocol,
                                       "mode": mode}]  # fmt: skip
    if flags.backends:
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
