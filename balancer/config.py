"""Configuration: a TOML document (plus command-line overrides) → frozen dataclasses.

Pure: the caller reads the file; this module turns its parsed table into a `Config` or raises
`ConfigError` listing every problem, each naming the source, the key path, the value and what
was expected. Relative file paths are kept as written (resolved against the working directory
by whoever opens them, like HAProxy).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from balancer.policies import POLICIES

T = TypeVar("T")

PROTOCOLS = ("http", "https")
MODES = ("http", "tcp")
TLS_VERSIONS = ("1.2", "1.3")
EVENT_LOOPS = ("uvloop", "asyncio")
REUSE_MODES = ("never", "safe", "always")
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    protocol: str = "http"
    mode: str = "http"

    @property
    def tls(self) -> bool:
        return self.protocol == "https"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str = "certs/server.crt"
    key: str = "certs/server.key"
    min_version: str = "1.2"
    max_version: str | None = None
    ciphers: str = DEFAULT_CIPHERS
    session_tickets: bool = True


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    address: Address
    weight: int = 1
    backup: bool = False  # used only while no other backend is up


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_seconds: float = 5.0
    client_header_seconds: float = 10.0
    keepalive_idle_seconds: float = 60.0
    backend_response_seconds: float = 60.0
    tls_handshake_seconds: float = 10.0
    shutdown_grace_seconds: float = 10.0
    backend_down_seconds: float = 10.0
    tunnel_idle_seconds: float = 3600.0
    linger_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 10000
    max_header_bytes: int = 16384
    max_uri_bytes: int = 8192
    max_connect_attempts: int = 3
    max_body_bytes: int | None = None  # none: bodies of any size stream through


@dataclass(frozen=True, slots=True)
class Upstream:
    """Backend connections: HAProxy's http-reuse words (see README, "Backend connections")."""

    reuse: str = "never"
    idle_per_backend: int = 32  # idle connections kept per backend
    idle_timeout_seconds: float = 4.0  # below the 5 s of Apache's, Node's, gunicorn's keep-alive
    max_requests_per_connection: int = 1000  # nginx's keepalive_requests


CHECK_TYPES = ("none", "tcp", "http")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active checks of every backend (`[health_check]`; HAProxy's check, inter, rise, fall)."""

    type: str = "none"  # "tcp": a connect; "http": a request and its status; "none": no checks
    interval_seconds: float = 2.0  # between one check's start and the next (jittered)
    timeout_seconds: float = 1.0  # a check not done by then failed
    rise: int = 2  # consecutive successes that bring a down backend up
    fall: int = 3  # consecutive failures that take an up backend down
    method: str = "GET"
    path: str = "/"
    host: str | None = None  # the Host header; the backend's address when not set
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)  # ranges, inclusive
    body_contains: str | None = None  # the response body must hold this text
    # Passive checks: what each worker's traffic says (nginx's max_fails; HAProxy's observe).
    passive_fall: int = 3  # requests failed in a row (reset, cut, unanswered) that eject
    passive_5xx: bool = False  # a 5xx response counts as failed
    passive_timeouts: bool = True  # no response within backend_response_seconds counts
    eject_max_seconds: float = 300.0  # an ejection lasts backend_down_seconds, doubling to this
    slow_start_seconds: float = 0.0  # a backend back in service ramps its weight over this


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    backends: tuple[BackendConfig, ...]
    policy: str = "round_robin"
    tls: TLSConfig | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    upstream: Upstream = field(default_factory=Upstream)
    health_check: HealthCheck = field(default_factory=HealthCheck)
    admin: Address | None = None
    admin_token_file: str | None = None  # a bearer token for the admin API's writes
    access_log: str | None = None
    request_log: bool = False  # one access-log line per request too (with an access log)
    workers: int | str = "auto"  # one per CPU (supervisor.worker_count), or a count
    event_loop: str = "uvloop"
    source: str = "<defaults>"


class ConfigError(Exception):
    """Every problem found, one per line: `source: key = value: expected ...`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Reader:
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, key: str, value: object, expected: str) -> None:
        shown = "(missing)" if value is _MISSING else repr(value)
        self.problems.append(f"{self.source}: {key} = {shown}: expected {expected}")

    def table(self, data: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in data:
            if name not in allowed:
                path = f"{key}.{name}" if key else name
                self.problem(path, data[name], f"one of the known keys ({', '.join(allowed)})")

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[object], T],
        expected: str,
        default: T | object = None,
    ) -> Any:
        value = data.get(key, _MISSING)
        if value is _MISSING:
            if default is _REQUIRED:
                self.problem(path, value, expected)
            return default
        try:
            return convert(value)
        except (TypeError, ValueError):
            self.problem(path, value, expected)
            return default


_MISSING = object()
_REQUIRED = object()


def parse_address(value: object) -> Address:
    """`host:port` or `[v6]:port`; the host must be an IP address or `localhost`; port 0..65535."""
    if not isinstance(value, str):
        raise TypeError(value)
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(value)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif host != "localhost":
        ipaddress.IPv4Address(host)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(value)
    return Address(host, port)


def _admin_address(value: object) -> Address:
    """The admin listener: an address, or a port alone (8404, ":8404"): loopback."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if isinstance(value, str) and value.startswith(":"):
        value = "127.0.0.1" + value
    return parse_address(value)


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in options:
            raise ValueError(value)
        return str(value)

    return convert


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(value)
    return float(value)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(value)
    return value


MAX_WORKERS = 256


def _workers(value: object) -> int | str:
    """A worker count, or "auto" (one per CPU: resolved where the machine is known)."""
    if value == "auto":
        return "auto"
    count = _positive_int(value)
    if count > MAX_WORKERS:
        raise ValueError(value)
    return count


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


ADDRESS = "an address like '127.0.0.1:8080', '[::1]:443' or 'localhost:80'"
SECONDS = "a positive number of seconds"
COUNT = "a positive whole number"

_TOP_KEYS = (
    "listeners", "backends", "policy", "tls", "timeouts", "limits", "upstream", "health_check",
    "admin", "admin_token_file", "access_log", "request_log", "workers", "event_loop",
)  # fmt: skip


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a parsed TOML table; raise ConfigError naming every bad key."""
    r = _Reader(source)
    r.table(data, "", _TOP_KEYS)

    listeners = []
    raw_listeners = data.get("listeners", [])
    if not isinstance(raw_listeners, list):
        r.problem("listeners", raw_listeners, "an array of tables: [[listeners]]")
        raw_listeners = []
    for i, item in enumerate(raw_listeners):
        path = f"listeners[{i}]"
        if not isinstance(item, dict):
            r.problem(path, item, "a table with bind, protocol, mode")
            continue
        r.table(item, path, ("name", "bind", "tls", "mode", "protocol"))
        protocol = r.get(item, "protocol", f"{path}.protocol", _choice(PROTOCOLS),
                         "'http' or 'https'", "http")  # fmt: skip
        # TLS and the application protocol said apart: tls = true|false, mode = http|tcp.
        # `protocol = "https"` is the older word for tls = true, read as it.
        tls = r.get(item, "tls", f"{path}.tls", _boolean, "true or false", None)
        if tls is not None:
            if "protocol" in item and (protocol == "https") != tls:
                r.problem(f"{path}.protocol", protocol,
                          f"to agree with tls = {str(tls).lower()}, or no protocol key: "
                          "tls says it")  # fmt: skip
            protocol = "https" if tls else "http"
        bind = r.get(item, "bind", f"{path}.bind", parse_address, ADDRESS, _REQUIRED)
        name = r.get(item, "name", f"{path}.name", _text, "a non-empty string", protocol)
        mode = r.get(item, "mode", f"{path}.mode", _choice(MODES), "'http' or 'tcp'", "http")
        if isinstance(bind, Address):
            listeners.append(ListenerConfig(name, bind, protocol or "http", mode or "http"))
    if not listeners and not r.problems:
        r.problem("listeners", _MISSING, "at least one [[listeners]] table (or --http / --https)")
    _unique(r, "listeners", [x.name for x in listeners])

    backends = []
    raw_backends = data.get("backends", [])
    if not isinstance(raw_backends, list):
        r.problem("backends", raw_backends, "an array of tables: [[backends]]")
        raw_backends = []
    for i, item in enumerate(raw_backends):
        path = f"backends[{i}]"
        if not isinstance(item, dict):
            r.problem(path, item, "a table with address (and name, weight)")
            continue
        r.table(item, path, ("name", "address", "weight", "backup"))
        address = r.get(item, "address", f"{path}.address", parse_address, ADDRESS, _REQUIRED)
        weight = r.get(item, "weight", f"{path}.weight", _positive_int, COUNT, 1)
        name = r.get(item, "name", f"{path}.name", _text, "a non-empty string", str(address))
        backup = r.get(item, "backup", f"{path}.backup", _boolean, "true or false", False)
        if isinstance(address, Address):
            if address.port == 0:
                r.problem(f"{path}.address", str(address), "a backend port from 1 to 65535")
            backends.append(BackendConfig(name, address, weight or 1, bool(backup)))
    if not backends and not r.problems:
        r.problem("backends", _MISSING, "at least one [[backends]] table (or --backend)")
    _unique(r, "backends", [b.name for b in backends])

    policy = r.get(data, "policy", "policy", _choice(tuple(POLICIES)),
                   " or ".join(repr(p) for p in POLICIES), "round_robin")  # fmt: skip

    tls = None
    raw_tls = data.get("tls")
    if raw_tls is not None or any(x.tls for x in listeners):
        raw_tls = raw_tls if isinstance(raw_tls, dict) else {}
        if not isinstance(data.get("tls", {}), dict):
            r.problem("tls", data["tls"], "a [tls] table")
        r.table(raw_tls, "tls", tuple(TLSConfig.__dataclass_fields__))
        d = TLSConfig()
        versions = " or ".join(repr(v) for v in TLS_VERSIONS)
        tls = TLSConfig(
            cert=r.get(raw_tls, "cert", "tls.cert", _text, "a certificate file path", d.cert),
            key=r.get(raw_tls, "key", "tls.key", _text, "a private key file path", d.key),
            min_version=r.get(
                raw_tls,
                "min_version",
                "tls.min_version",
                _choice(TLS_VERSIONS),
                versions,
                d.min_version,
            ),
            max_version=r.get(
                raw_tls, "max_version", "tls.max_version", _choice(TLS_VERSIONS), versions, None
            ),
            ciphers=r.get(
                raw_tls, "ciphers", "tls.ciphers", _text, "an OpenSSL cipher list", d.ciphers
            ),
            session_tickets=r.get(
                raw_tls, "session_tickets", "tls.session_tickets", _boolean, "true or false", True
            ),
        )
        if tls.max_version and tls.min_version and tls.max_version < tls.min_version:
            r.problem("tls.max_version", tls.max_version, f">= tls.min_version ({tls.min_version})")

    timeouts = _section(r, data, "timeouts", Timeouts(), _positive_number, SECONDS)
    limits = _section(r, data, "limits", Limits(), _positive_int, COUNT)
    upstream = _upstream(r, data)
    health_check = _health_check(r, data)

    admin = r.get(
        data, "admin", "admin", _admin_address, f"{ADDRESS}, or a port alone (loopback)", None
    )
    admin_token_file = r.get(
        data, "admin_token_file", "admin_token_file", _text, "a file holding the token"
    )
    access_log = r.get(data, "access_log", "access_log", _text, "a file path or '-' (stdout)")
    request_log = r.get(data, "request_log", "request_log", _boolean, "true or false", False)
    workers = r.get(data, "workers", "workers", _workers, f"{COUNT} up to 256, or 'auto'", "auto")
    event_loop = r.get(data, "event_loop", "event_loop", _choice(EVENT_LOOPS),
                       "'uvloop' or 'asyncio'", "uvloop")  # fmt: skip

    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        listeners=tuple(listeners),
        backends=tuple(backends),
        policy=policy,
        tls=tls,
        timeouts=timeouts,
        limits=limits,
        upstream=upstream,
        health_check=health_check,
        admin=admin,
        admin_token_file=admin_token_file,
        access_log=access_log,
        request_log=request_log,
        workers=workers,
        event_loop=event_loop,
        source=source,
    )


def _upstream(r: _Reader, data: Mapping[str, Any]) -> Upstream:
    raw = data.get("upstream", {})
    if not isinstance(raw, dict):
        r.problem("upstream", raw, "an [upstream] table")
        return Upstream()
    r.table(raw, "upstream", tuple(Upstream.__dataclass_fields__))
    d = Upstream()
    modes = " or ".join(repr(m) for m in REUSE_MODES)
    return Upstream(
        reuse=r.get(raw, "reuse", "upstream.reuse", _choice(REUSE_MODES), modes, d.reuse),
        idle_per_backend=r.get(
            raw, "idle_per_backend", "upstream.idle_per_backend", _positive_int, COUNT,
            d.idle_per_backend,
        ),
        idle_timeout_seconds=r.get(
            raw, "idle_timeout_seconds", "upstream.idle_timeout_seconds", _positive_number,
            SECONDS, d.idle_timeout_seconds,
        ),
        max_requests_per_connection=r.get(
            raw, "max_requests_per_connection", "upstream.max_requests_per_connection",
            _positive_int, COUNT, d.max_requests_per_connection,
        ),
    )  # fmt: skip


def _health_check(r: _Reader, data: Mapping[str, Any]) -> HealthCheck:
    raw = data.get("health_check", {})
    if not isinstance(raw, dict):
        r.problem("health_check", raw, "a [health_check] table")
        return HealthCheck()
    r.table(raw, "health_check", tuple(HealthCheck.__dataclass_fields__))
    d = HealthCheck()

    def get(key: str, convert: Callable[[object], Any], expected: str, default: Any) -> Any:
        return r.get(raw, key, f"health_check.{key}", convert, expected, default)

    kinds = " or ".join(repr(k) for k in CHECK_TYPES)
    check = HealthCheck(
        type=get("type", _choice(CHECK_TYPES), kinds, d.type),
        interval_seconds=get("interval_seconds", _positive_number, SECONDS, d.interval_seconds),
        timeout_seconds=get("timeout_seconds", _positive_number, SECONDS, d.timeout_seconds),
        rise=get("rise", _positive_int, COUNT, d.rise),
        fall=get("fall", _positive_int, COUNT, d.fall),
        method=get("method", _token, "an HTTP method such as 'GET' or 'HEAD'", d.method),
        path=get("path", _check_path, "a path starting with '/'", d.path),
        host=get("host", _text, "a host name for the Host header", d.host),
        expect_status=get(
            "expect_status", _status_ranges, "status codes and ranges: '200-399' or '200,204'",
            d.expect_status,
        ),
        body_contains=get("body_contains", _text, "a text the body must hold", d.body_contains),
        passive_fall=get("passive_fall", _positive_int, COUNT, d.passive_fall),
        passive_5xx=get("passive_5xx", _boolean, "true or false", d.passive_5xx),
        passive_timeouts=get("passive_timeouts", _boolean, "true or false", d.passive_timeouts),
        eject_max_seconds=get("eject_max_seconds", _positive_number, SECONDS,
                              d.eject_max_seconds),
        slow_start_seconds=get("slow_start_seconds", _non_negative_number,
                               "a number of seconds, 0 for none", d.slow_start_seconds),
    )  # fmt: skip
    if check.timeout_seconds > check.interval_seconds:
        r.problem(
            "health_check.timeout_seconds", check.timeout_seconds,
            f"at most health_check.interval_seconds ({check.interval_seconds})",
        )  # fmt: skip
    return check


def _non_negative_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(value)
    return float(value)


def _token(value: object) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isalpha():
        raise ValueError(value)
    return value.upper()


def _check_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " \r\n"):
        raise ValueError(value)
    return value


def _status_ranges(value: object) -> tuple[tuple[int, int], ...]:
    """'200-399', '200,204', '2xx' (a class): inclusive ranges of status codes."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    ranges = []
    for part in value.replace(" ", "").split(","):
        if len(part) == 3 and part[0].isdigit() and part[1:].lower() == "xx":
            low, high = int(part[0]) * 100, int(part[0]) * 100 + 99
        elif "-" in part:
            first, _, last = part.partition("-")
            low, high = int(first), int(last)
        else:
            low = high = int(part)
        if not 100 <= low <= high <= 599:
            raise ValueError(value)
        ranges.append((low, high))
    return tuple(ranges)


S = TypeVar("S", Timeouts, Limits)


def _section(
    r: _Reader,
    data: Mapping[str, Any],
    name: str,
    defaults: S,
    convert: Callable[[object], object],
    expected: str,
) -> S:
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        r.problem(name, raw, f"a [{name}] table")
        return defaults
    keys = tuple(defaults.__dataclass_fields__)
    r.table(raw, name, keys)
    values = {}
    for key in keys:
        value = r.get(raw, key, f"{name}.{key}", convert, expected, _MISSING)
        if value is not _MISSING and value is not None:
            values[key] = value
    return replace(defaults, **values)


def _unique(r: _Reader, key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            r.problem(f"{key}.name", name, "names that differ from each other")
        seen.add(name)


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
