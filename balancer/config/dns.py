"""Configuration of DNS service discovery: the file's [dns] table and a group's `discover`.

A group with `discover` has no [[groups.backends]] of its own: it has `slots` backends,
named `<group>-1` … `<group>-<slots>`, whose addresses the resolver fills in while running
(HAProxy's `server-template`). The slots are what every per-backend table, metric and admin
path sees, so they stay put while members come and go (discovery.py).

- `discover = "web.internal:8080"`: the name's A and AAAA records, each address a member on
  that port (a Kubernetes headless service, Consul's `web.service.consul`);
- `discover = "_http._tcp.web.internal"`: its SRV records, each target's addresses a member
  on the record's port with the record's weight (targets of the lowest priority value only,
  as RFC 2782 orders them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.config.values import (
    MISSING,
    SECONDS,
    Address,
    Reader,
    is_host_name,
    parse_address,
    positive_int,
    positive_number,
)

MAX_SLOTS = 1024
DEFAULT_SLOTS = 16  # HAProxy's server-template takes a count; ours has a default
# RFC 2782's service name: `_service._proto.name`.
_SRV_NAME = re.compile(r"_[A-Za-z0-9-]{1,62}\._(?:tcp|udp)\.(?:[A-Za-z0-9_-]{1,63}\.?)+")
DISCOVER = (
    "a name and port such as 'web.internal:8080' (its A and AAAA records), or an SRV name such "
    "as '_http._tcp.web.internal'"
)


@dataclass(frozen=True, slots=True)
class Discover:
    """What a group's members are found by: `name` (A/AAAA on `port`) or an SRV name."""

    name: str
    port: int = 0  # 0: an SRV name (ports come from the records)
    slots: int = DEFAULT_SLOTS

    @property
    def srv(self) -> bool:
        return self.port == 0

    def __str__(self) -> str:
        return self.name if self.srv else f"{self.name}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns]: how discovered groups are resolved (HAProxy's `resolvers` section)."""

    # "ip" or "ip:port" ("[v6]:port"); none: the system's, from /etc/resolv.conf.
    nameservers: tuple[Address, ...] = ()
    timeout_seconds: float = 2.0  # one resolution, every nameserver and retry included
    # The records' TTL says when to ask again, kept between these (nginx's `valid=` overrides
    # the TTL; HAProxy's `hold valid` paces re-resolution).
    ttl_min_seconds: float = 1.0
    ttl_max_seconds: float = 300.0
    # A failing resolution (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last good
    # answer this long (HAProxy's `hold valid`/`hold nx`); then the members leave.
    hold_seconds: float = 60.0
    retry_seconds: float = 2.0  # after a failed resolution, the next try


DNS_KEYS = tuple(DnsConfig.__dataclass_fields__)


def discover_value(value: object) -> Discover:
    if not isinstance(value, str):
        raise TypeError(value)
    if _SRV_NAME.fullmatch(value):
        return Discover(value.rstrip(".") or value)
    name, _, port = value.rpartition(":")
    if not name or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(value)
    if not is_host_name(name):
        raise ValueError(value)  # (an address is a backend, not a name to discover)
    return Discover(name.rstrip("."), int(port))


def nameserver(value: object) -> Address:
    """`10.0.0.2`, `10.0.0.2:5353`, `[fd00::2]:53` or `fd00::2`: port 53 unless given."""
    if not isinstance(value, str):
        raise TypeError(value)
    try:
        return Address(str(ipaddress.ip_address(value)), 53)
    except ValueError:
        pass
    address = parse_address(value)  # "ip:port" or "[v6]:port"
    if address.host == "localhost" or not address.port:
        raise ValueError(value)
    return address


def dns_section(r: Reader, data: Mapping[str, Any]) -> DnsConfig:
    raw = data.get("dns", {})
    d = DnsConfig()
    if not isinstance(raw, dict):
        r.problem("dns", raw, "a [dns] table")
        return d
    r.table(raw, "dns", DNS_KEYS)
    servers = raw.get("nameservers", MISSING)
    addresses: list[Address] = []
    if servers is not MISSING:
        if not isinstance(servers, list) or not servers:
            r.problem("dns.nameservers", servers, "a list of nameserver addresses such as "
                      "['10.0.0.2', '127.0.0.1:5353'] (or no key: /etc/resolv.conf's)")  # fmt: skip
            servers = []
        for at, item in enumerate(servers):
            try:
                addresses.append(nameserver(item))
            except (TypeError, ValueError):
                expected = "an IP address, with ':port' if not 53 ('[v6]:port' for IPv6)"
                r.problem(f"dns.nameservers[{at}]", item, expected)

    def seconds(key: str, default: float) -> float:
        value = r.get(raw, key, f"dns.{key}", positive_number, SECONDS, default)
        return float(value) if value is not None else default

    config = DnsConfig(
        tuple(addresses),
        seconds("timeout_seconds", d.timeout_seconds),
        seconds("ttl_min_seconds", d.ttl_min_seconds),
        seconds("ttl_max_seconds", d.ttl_max_seconds),
        seconds("hold_seconds", d.hold_seconds),
        seconds("retry_seconds", d.retry_seconds),
    )
    if config.ttl_max_seconds < config.ttl_min_seconds:
        r.problem("dns.ttl_max_seconds", config.ttl_max_seconds,
                  f">= dns.ttl_min_seconds ({config.ttl_min_seconds})")  # fmt: skip
    return config


def discovered_group(r: Reader, item: Mapping[str, Any], path: str) -> Discover | None:
    """A group's `discover` and `slots`; None: not a discovered group (then `slots` alone is a
    problem). Its backends are `slot_names`, at SLOT_ADDRESS."""
    if "discover" not in item:
        if "slots" in item:
            r.problem(f"{path}.slots", item["slots"], "discover = '<name>:<port>' beside it "
                      "(slots hold the members DNS discovery finds), or no slots")  # fmt: skip
        return None
    found = r.get(item, "discover", f"{path}.discover", discover_value, DISCOVER)
    slots = r.get(item, "slots", f"{path}.slots", positive_int,
                  f"a count of members from 1 to {MAX_SLOTS}", DEFAULT_SLOTS)  # fmt: skip
    if isinstance(slots, int) and slots > MAX_SLOTS:
        r.problem(f"{path}.slots", slots, f"a count of members from 1 to {MAX_SLOTS}")
        slots = MAX_SLOTS
    if "backends" in item:
        r.problem(f"{path}.backends", item["backends"], "no backends beside discover: the "
                  "group's members come from DNS (or remove discover and list them)")  # fmt: skip
    if not isinstance(found, Discover):
        return None
    return Discover(found.name, found.port, slots or DEFAULT_SLOTS)


def slot_names(group: str, discover: Discover) -> list[str]:
    return [f"{group}-{n}" for n in range(1, discover.slots + 1)]


# A slot's address until the resolver gives it one: never connected to (pool.py reads the
# slot's member state first), shown as the member's address once there is one.
SLOT_ADDRESS = Address("0.0.0.0", 0)
