"""Configuration: a TOML document (plus command-line overrides) → frozen dataclasses.

Pure: the caller reads the file; this module turns its parsed table into a `Config` or raises
`ConfigError` listing every problem, each naming the source, the key path, the value and what
was expected. Relative file paths are kept as written (resolved against the working directory
by whoever opens them, like HAProxy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from balancer.config import dns as config_dns
from balancer.config.listeners import (
    DEFAULT_GROUP,
    ListenerConfig,
    certificate_pairs,
    listeners_section,
)
from balancer.config.values import (
    ADDRESS,
    BACKEND_ADDRESS,
    COUNT,
    HASH_KEY,
    MISSING,
    REQUIRED,
    SECONDS,
    Address,
    Reader,
    admin_address,
    backend_address,
    balance_factor,
    boolean,
    check_path,
    choice,
    choices,
    hash_key,
    non_negative_number,
    positive_int,
    positive_number,
    status_ranges,
    text,
    token,
    unique,
    whole_number,
    worker_count_value,
)

T = TypeVar("T")

TLS_VERSIONS = ("1.2", "1.3")
EVENT_LOOPS = ("uvloop", "asyncio")
REUSE_MODES = ("never", "safe", "always")
# The policies by name (policies.POLICIES has a class for each; test_policies holds them one)
POLICY_NAMES = ("round_robin", "least_connections", "hash")
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str = "certs/server.crt"
    key: str = "certs/server.key"
    min_version: str = "1.2"
    max_version: str | None = None
    ciphers: str = DEFAULT_CIPHERS
    session_tickets: bool = True
    # More certificate/key pairs, chosen by the ClientHello's SNI among the names each
    # certificate holds; cert/key above is the default (no SNI, or a name none holds).
    certificates: tuple[tuple[str, str], ...] = ()


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
    max_header_fields: int = 100  # a request head with more is refused: 431
    max_connect_attempts: int = 3
    max_body_bytes: int | None = None  # none: bodies of any size stream through


@dataclass(frozen=True, slots=True)
class Upstream:
    """Backend connections: HAProxy's http-reuse words (see README, "Backend connections")."""

    reuse: str = "never"
    idle_per_backend: int = 32  # idle connections kept per backend
    idle_timeout_seconds: float = 4.0  # below the 5 s of Apache's, Node's, gunicorn's keep-alive
    max_requests_per_connection: int = 1000  # nginx's keepalive_requests
    # Times a request is sent again, to another backend, after its backend connection ended
    # (FIN or RST) before any byte of the response: idempotent and small requests only.
    retries: int = 2
    # When (HAProxy's retry-on words): RETRY_ON says what each means.
    retry_on: tuple[str, ...] = ("conn-failure", "empty-response")


CONN_FAILURE = "conn-failure"
EMPTY_RESPONSE = "empty-response"
RESPONSE_TIMEOUT = "response-timeout"
RETRY_ON = {
    CONN_FAILURE: "a connect refused or timed out: the next backend is tried "
    "(limits.max_connect_attempts); without it, one attempt",
    EMPTY_RESPONSE: "the connection ended (FIN or RST) before any response byte: an idempotent, "
    "replayable request is sent again (retries)",
    RESPONSE_TIMEOUT: "no response byte within backend_response_seconds: likewise (off by "
    "default: a slow request may be slow everywhere, and is then run more than once)",
}


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


SEND_PROXY = ("none", "v1", "v2")
# A group's own timeouts: the [timeouts] keys that speak of its backends (the rest are the
# listener's). Unset in a group, they are [timeouts]'s.
GROUP_TIMEOUTS = ("connect_seconds", "backend_response_seconds", "backend_down_seconds")


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A named set of backends with its own policy, reuse mode, timeouts and checks (HAProxy's
    `backend` section, nginx's `upstream`). What a group leaves unset is the file's top level:
    [upstream] reuse, [timeouts], [health_check]."""

    name: str
    backends: tuple[BackendConfig, ...]
    policy: str = "round_robin"
    reuse: str = "never"
    timeouts: Timeouts = field(default_factory=lambda: Timeouts())
    health_check: HealthCheck = field(default_factory=lambda: HealthCheck())
    send_proxy: str = "none"  # a PROXY header (v1, v2) first on every backend connection
    drain_seconds: float = 0.0  # a drained backend's tunnels are closed over this; 0: left
    # Policy "hash": what is hashed (config_values.hash_key), and bounded loads' factor (0: off).
    hash_key: str = "client_ip"
    hash_balance_factor: float = 0.0
    discover: config_dns.Discover | None = None  # members from DNS, in slots (config/dns.py)


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    groups: tuple[GroupConfig, ...]
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
    dns: config_dns.DnsConfig = field(default_factory=config_dns.DnsConfig)  # [dns]
    source: str = "<defaults>"

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        """Every group's backends, group after group: the order of the shared tables."""
        return tuple(backend for group in self.groups for backend in group.backends)


class ConfigError(Exception):
    """Every problem found, one per line: `source: key = value: expected ...`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_TOP_KEYS = (
    "listeners", "backends", "policy", "groups", "tls", "timeouts", "limits", "upstream",
    "health_check", "admin", "admin_token_file", "access_log", "request_log", "workers",
    "event_loop", "hash_key", "hash_balance_factor", "dns",
)  # fmt: skip


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a parsed TOML table; raise ConfigError naming every bad key."""
    r = Reader(source)
    r.table(data, "", _TOP_KEYS)

    upstream = _upstream(r, data)
    timeouts = _section(r, data, "timeouts", Timeouts(), positive_number, SECONDS)
    health_check = _health_check(r, data.get("health_check", {}), "health_check")
    groups = _groups(r, data, upstream, timeouts, health_check)
    group_names = [group.name for group in groups]
    listeners = listeners_section(r, data, group_names)

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
            cert=r.get(raw_tls, "cert", "tls.cert", text, "a certificate file path", d.cert),
            key=r.get(raw_tls, "key", "tls.key", text, "a private key file path", d.key),
            min_version=r.get(
                raw_tls,
                "min_version",
                "tls.min_version",
                choice(TLS_VERSIONS),
                versions,
                d.min_version,
            ),
            max_version=r.get(
                raw_tls, "max_version", "tls.max_version", choice(TLS_VERSIONS), versions, None
            ),
            ciphers=r.get(
                raw_tls, "ciphers", "tls.ciphers", text, "an OpenSSL cipher list", d.ciphers
            ),
            session_tickets=r.get(
                raw_tls, "session_tickets", "tls.session_tickets", boolean, "true or false", True
            ),
            certificates=certificate_pairs(r, raw_tls.get("certificates", [])),
        )
        if tls.max_version and tls.min_version and tls.max_version < tls.min_version:
            r.problem("tls.max_version", tls.max_version, f">= tls.min_version ({tls.min_version})")

    limits = _section(r, data, "limits", Limits(), positive_int, COUNT)

    admin = r.get(
        data, "admin", "admin", admin_address, f"{ADDRESS}, or a port alone (loopback)", None
    )
    _one_listener_per_address(r, listeners, admin, data.get("admin"))
    admin_token_file = r.get(
        data, "admin_token_file", "admin_token_file", text, "a file holding the token"
    )
    access_log = r.get(data, "access_log", "access_log", text, "a file path or '-' (stdout)")
    request_log = r.get(data, "request_log", "request_log", boolean, "true or false", False)
    workers = r.get(
        data, "workers", "workers", worker_count_value, f"{COUNT} up to 256, or 'auto'", "auto"
    )
    event_loop = r.get(data, "event_loop", "event_loop", choice(EVENT_LOOPS),
                       "'uvloop' or 'asyncio'", "uvloop")  # fmt: skip

    dns = config_dns.dns_section(r, data)
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        listeners=tuple(listeners),
        groups=tuple(groups),
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
        dns=dns,
        source=source,
    )


def _upstream(r: Reader, data: Mapping[str, Any]) -> Upstream:
    raw = data.get("upstream", {})
    if not isinstance(raw, dict):
        r.problem("upstream", raw, "an [upstream] table")
        return Upstream()
    r.table(raw, "upstream", tuple(Upstream.__dataclass_fields__))
    d = Upstream()
    modes = " or ".join(repr(m) for m in REUSE_MODES)
    return Upstream(
        reuse=r.get(raw, "reuse", "upstream.reuse", choice(REUSE_MODES), modes, d.reuse),
        idle_per_backend=r.get(
            raw, "idle_per_backend", "upstream.idle_per_backend", positive_int, COUNT,
            d.idle_per_backend,
        ),
        idle_timeout_seconds=r.get(
            raw, "idle_timeout_seconds", "upstream.idle_timeout_seconds", positive_number,
            SECONDS, d.idle_timeout_seconds,
        ),
        max_requests_per_connection=r.get(
            raw, "max_requests_per_connection", "upstream.max_requests_per_connection",
            positive_int, COUNT, d.max_requests_per_connection,
        ),
        retries=r.get(
            raw, "retries", "upstream.retries", whole_number, "a whole number (0: never)",
            d.retries,
        ),
        retry_on=r.get(
            raw, "retry_on", "upstream.retry_on", choices(tuple(RETRY_ON)),
            f"a list of {', '.join(repr(name) for name in RETRY_ON)} (each once; [] for none)",
            d.retry_on,
        ),
    )  # fmt: skip


def _health_check(r: Reader, raw: object, path: str, d: HealthCheck | None = None) -> HealthCheck:
    """[health_check] (path "health_check"), or a group's (over the file's, `d`)."""
    d = d or HealthCheck()
    if not isinstance(raw, dict):
        r.problem(path, raw, f"a [{path}] table")
        return d
    r.table(raw, path, tuple(HealthCheck.__dataclass_fields__))

    def get(key: str, convert: Callable[[object], Any], expected: str, default: Any) -> Any:
        return r.get(raw, key, f"{path}.{key}", convert, expected, default)

    kinds = " or ".join(repr(k) for k in CHECK_TYPES)
    check = HealthCheck(
        type=get("type", choice(CHECK_TYPES), kinds, d.type),
        interval_seconds=get("interval_seconds", positive_number, SECONDS, d.interval_seconds),
        timeout_seconds=get("timeout_seconds", positive_number, SECONDS, d.timeout_seconds),
        rise=get("rise", positive_int, COUNT, d.rise),
        fall=get("fall", positive_int, COUNT, d.fall),
        method=get("method", token, "an HTTP method such as 'GET' or 'HEAD'", d.method),
        path=get("path", check_path, "a path starting with '/'", d.path),
        host=get("host", text, "a host name for the Host header", d.host),
        expect_status=get(
            "expect_status", status_ranges, "status codes and ranges: '200-399' or '200,204'",
            d.expect_status,
        ),
        body_contains=get("body_contains", text, "a text the body must hold", d.body_contains),
        passive_fall=get("passive_fall", positive_int, COUNT, d.passive_fall),
        passive_5xx=get("passive_5xx", boolean, "true or false", d.passive_5xx),
        passive_timeouts=get("passive_timeouts", boolean, "true or false", d.passive_timeouts),
        eject_max_seconds=get("eject_max_seconds", positive_number, SECONDS,
                              d.eject_max_seconds),
        slow_start_seconds=get("slow_start_seconds", non_negative_number,
                               "a number of seconds, 0 for none", d.slow_start_seconds),
    )  # fmt: skip
    if check.timeout_seconds > check.interval_seconds:
        r.problem(
            f"{path}.timeout_seconds", check.timeout_seconds,
            f"at most health_check.interval_seconds ({check.interval_seconds})",
        )  # fmt: skip
    return check


GROUP_KEYS = (
    "name", "backends", "policy", "reuse", "timeouts", "health_check", "send_proxy",
    "drain_seconds", "hash_key", "hash_balance_factor", "discover", "slots",
)  # fmt: skip


def _groups(
    r: Reader,
    data: Mapping[str, Any],
    upstream: Upstream,
    timeouts: Timeouts,
    check: HealthCheck,
) -> list[GroupConfig]:
    """[[groups]], and the group "default" that top-level [[backends]] and policy make (the
    single-farm files of before groups). Backend names are unique across groups: the admin
    API and the metrics name a backend alone."""
    groups = []
    policies = " or ".join(repr(p) for p in POLICY_NAMES)
    if "backends" in data or "groups" not in data:
        backends = _backends(r, data.get("backends", []), "backends", "backends")
        policy = r.get(data, "policy", "policy", choice(POLICY_NAMES), policies,
                       "round_robin")  # fmt: skip
        if not backends and not r.problems:
            r.problem("backends", MISSING, "at least one [[backends]] table (or --backend), "
                      "or [[groups]] with their backends")  # fmt: skip
        key, factor = _hashing(r, data, "", policy)
        groups.append(GroupConfig(
            DEFAULT_GROUP, tuple(backends), policy, upstream.reuse, timeouts, check,
            hash_key=key, hash_balance_factor=factor,
        ))  # fmt: skip
    else:
        for key in ("policy", "hash_key", "hash_balance_factor"):
            if key in data:
                r.problem(key, data[key], f"no top-level {key} beside [[groups]]: each group "
                          f"says its own (groups[n].{key})")  # fmt: skip
    modes = " or ".join(repr(m) for m in REUSE_MODES)
    raw_groups = data.get("groups", [])
    for path, item in r.tables(raw_groups, "groups", "groups", "a table with name and backends"):
        r.table(item, path, GROUP_KEYS)
        name = r.get(item, "name", f"{path}.name", text, "a non-empty string", REQUIRED)
        discover = config_dns.discovered_group(r, item, path)
        if discover is None and "discover" not in item:
            backends = _backends(r, item.get("backends", MISSING), f"{path}.backends",
                                 "groups.backends")  # fmt: skip
        else:  # its slots (config/dns.py)
            slots = config_dns.slot_names(str(name), discover) if discover else []
            backends = [BackendConfig(slot, config_dns.SLOT_ADDRESS) for slot in slots]
        policy = r.get(item, "policy", f"{path}.policy", choice(POLICY_NAMES), policies,
                       "round_robin")  # fmt: skip
        reuse = r.get(item, "reuse", f"{path}.reuse", choice(REUSE_MODES), modes,
                      upstream.reuse)  # fmt: skip
        raw_timeouts = item.get("timeouts", {})
        if isinstance(raw_timeouts, dict):
            r.table(raw_timeouts, f"{path}.timeouts", GROUP_TIMEOUTS)
        group_timeouts = _section(r, item, "timeouts", timeouts, positive_number, SECONDS,
                                  path=f"{path}.timeouts")  # fmt: skip
        group_check = check
        if "health_check" in item:
            group_check = _health_check(r, item["health_check"], f"{path}.health_check", check)
        send_proxy = r.get(item, "send_proxy", f"{path}.send_proxy", choice(SEND_PROXY),
                           "'none', 'v1' or 'v2'", "none")  # fmt: skip
        if send_proxy != "none" and reuse not in (None, "never"):
            r.problem(f"{path}.reuse", reuse, "'never' with send_proxy: a PROXY header names "
                      "one client, so its connection cannot serve another")  # fmt: skip
        drain = r.get(item, "drain_seconds", f"{path}.drain_seconds", non_negative_number,
                      "seconds, 0 to leave a drained backend's tunnels", 0.0)  # fmt: skip
        key, factor = _hashing(r, item, f"{path}.", policy)
        if isinstance(name, str):
            groups.append(GroupConfig(
                name, tuple(backends), policy or "round_robin", reuse or upstream.reuse,
                group_timeouts, group_check, send_proxy or "none", drain or 0.0, key, factor,
                discover,
            ))  # fmt: skip
    unique(r, "groups", [group.name for group in groups])
    unique(r, "backends", [b.name for group in groups for b in group.backends])
    return groups


def _hashing(
    r: Reader, table: Mapping[str, Any], path: str, policy: str | None
) -> tuple[str, float]:
    """hash_key and hash_balance_factor (policy "hash") of the file's top level or a group."""
    for name in ("hash_key", "hash_balance_factor"):
        if name in table and policy != "hash":
            r.problem(f"{path}{name}", table[name], f"policy = 'hash' beside it (the policy is "
                      f"{policy!r}), or no {name}")  # fmt: skip
    key = r.get(table, "hash_key", f"{path}hash_key", hash_key, HASH_KEY, "client_ip")
    factor = r.get(table, "hash_balance_factor", f"{path}hash_balance_factor", balance_factor,
                   "0 (no bound), or a factor of at least 1 such as 1.25", 0.0)  # fmt: skip
    return key or "client_ip", factor if factor is not None else 0.0


def _one_listener_per_address(
    r: Reader, listeners: list[ListenerConfig], admin: Address | None, admin_raw: object
) -> None:
    """Two listeners (or a listener and the admin) on one address cannot both bind: `run`
    would stop at the second with EADDRINUSE; `check` says so first. A wildcard (0.0.0.0,
    ::) takes its port on every address of its family; port 0 (any free port) never
    collides."""
    taken: list[tuple[Address, str]] = []

    def owner(address: Address) -> str | None:
        family = ":" in address.host
        for other, name in taken:
            same_family = (":" in other.host) == family
            wildcard = {address.host, other.host} & {"0.0.0.0", "::"}
            if (
                address.port
                and other.port == address.port
                and (other.host == address.host or (same_family and wildcard))
            ):
                return name
        return None

    for listener in listeners:
        if (name := owner(listener.bind)) is not None:
            r.problem(
                f"listeners.{listener.name}.bind", str(listener.bind),
                f"an address no other listener binds ({name} does)",
            )  # fmt: skip
        taken.append((listener.bind, listener.name))
    if admin is not None and (name := owner(admin)) is not None:
        r.problem("admin", admin_raw, f"an address no listener binds ({name} does)")


def _backends(r: Reader, raw: object, path: str, shape: str) -> list[BackendConfig]:
    """[[backends]] (shape "backends") or a group's ("groups.backends")."""
    if raw is MISSING or raw == []:  # an empty group could only ever answer 503
        r.problem(path, raw, f"at least one backend: [[{shape}]] with an address")
        return []
    backends = []
    for at, item in r.tables(raw, path, shape, "a table with address (and name, weight)"):
        r.table(item, at, ("name", "address", "weight", "backup"))
        address = r.get(
            item, "address", f"{at}.address", backend_address, BACKEND_ADDRESS, REQUIRED
        )
        weight = r.get(item, "weight", f"{at}.weight", positive_int, COUNT, 1)
        name = r.get(item, "name", f"{at}.name", text, "a non-empty string", str(address))
        backup = r.get(item, "backup", f"{at}.backup", boolean, "true or false", False)
        if isinstance(address, Address):
            if address.port == 0:
                r.problem(f"{at}.address", str(address), "a backend port from 1 to 65535")
            backends.append(BackendConfig(name, address, weight or 1, bool(backup)))
    return backends


S = TypeVar("S", Timeouts, Limits)


def _section(
    r: Reader,
    data: Mapping[str, Any],
    name: str,
    defaults: S,
    convert: Callable[[object], object],
    expected: str,
    path: str | None = None,
) -> S:
    """A table of like values over `defaults`; `path` says where it is (a group's)."""
    path = path or name
    raw = data.get(name, {})
    if not isinstance(raw, dict):
        r.problem(path, raw, f"a [{path}] table")
        return defaults
    keys = tuple(defaults.__dataclass_fields__)
    if path == name:
        r.table(raw, name, keys)
    values = {}
    for key in keys:
        value = r.get(raw, key, f"{path}.{key}", convert, expected, MISSING)
        if value is not MISSING and value is not None:
            values[key] = value
    return replace(defaults, **values)
