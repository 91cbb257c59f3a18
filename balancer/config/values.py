"""Reading configuration values: the converters each key uses, and the reader that collects
every problem with its source, key path, value and what was expected.

Pure, like schema.py, which uses it: a converter raises ValueError or TypeError for a value it
does not take, and the reader turns that into one line of `ConfigError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Reader:
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, key: str, value: object, expected: str) -> None:
        shown = "(missing)" if value is MISSING else repr(value)
        self.problems.append(f"{self.source}: {key} = {shown}: expected {expected}")

    def table(self, data: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in data:
            if name not in allowed:
                path = f"{key}.{name}" if key else name
                near = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.75)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                known = ", ".join(allowed)
                self.problem(path, data[name], f"one of the known keys ({known}){hint}")

    def tables(
        self, raw: object, path: str, shape: str, what: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each table of an array of tables (`[[shape]]` in the file) with its key path; a
        value that is not one (`what` says what an item should be) is a problem."""
        if not isinstance(raw, list):
            self.problem(path, raw, f"an array of tables: [[{shape}]]")
            return
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                yield f"{path}[{i}]", item
            else:
                self.problem(f"{path}[{i}]", item, what)

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[object], T],
        expected: str,
        default: T | object = None,
    ) -> Any:
        value = data.get(key, MISSING)
        if value is MISSING:
            if default is REQUIRED:
                self.problem(path, value, expected)
            return default
        try:
            return convert(value)
        except (TypeError, ValueError):
            self.problem(path, value, expected)
            return default


MISSING = object()


REQUIRED = object()


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


# A host name as DNS and /etc/hosts have them: dot-separated labels of letters, digits and
# hyphens (and underscores, which container platforms' service names carry), 253 at most.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")  # fmt: skip


def backend_address(value: object) -> Address:
    """A backend's `host:port`: an IP address, `[v6]`, or a host name (resolved later, by
    resolve.py: at `check`, at start and at each reload)."""
    try:
        return parse_address(value)
    except ValueError:
        if not isinstance(value, str):
            raise
    host, _, port_text = value.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(value)
    if not is_host_name(host):
        raise ValueError(value)
    return Address(host, int(port_text))


def is_host_name(name: str) -> bool:
    """A name as DNS and /etc/hosts have them (see _HOST_NAME), not a dotted number."""
    return _HOST_NAME.fullmatch(name) is not None and not name.replace(".", "").isdigit()


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def admin_address(value: object) -> Address:
    """The admin listener: an address, or a port alone (8404, ":8404"): loopback."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if isinstance(value, str) and value.startswith(":"):
        value = "127.0.0.1" + value
    return parse_address(value)


def choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in options:
            raise ValueError(value)
        return str(value)

    return convert


def choices(options: tuple[str, ...]) -> Callable[[object], tuple[str, ...]]:
    """A list of some of `options`, each at most once; empty: none of them."""

    def convert(value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or any(item not in options for item in value):
            raise ValueError(value)
        if len(set(value)) != len(value):
            raise ValueError(value)
        return tuple(value)

    return convert


def positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(value)
    return float(value)


def positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(value)
    return value


def whole_number(value: object) -> int:
    """0, 1, 2, ...: a count where none is a choice (`upstream.retries = 0`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


MAX_WORKERS = 256


def worker_count_value(value: object) -> int | str:
    """A worker count, or "auto" (one per CPU: resolved where the machine is known)."""
    if value == "auto":
        return "auto"
    count = positive_int(value)
    if count > MAX_WORKERS:
        raise ValueError(value)
    return count


def text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


ADDRESS = "an address like '127.0.0.1:8080', '[::1]:443' or 'localhost:80'"
BACKEND_ADDRESS = (
    "an address like '10.0.0.11:8080', '[::1]:443' or 'web1.internal:8080' (a name in DNS or "
    "/etc/hosts)"
)


SECONDS = "a positive number of seconds"


COUNT = "a positive whole number"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(value: object) -> tuple[Network, ...]:
    """A list of addresses or networks: '10.0.0.0/8', '127.0.0.1', '::1'."""
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    return tuple(ipaddress.ip_network(item, strict=False) for item in value)


def host_pattern(value: object) -> str:
    """A host name, or '*.' and a domain (its subdomains); lower case, no port."""
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    name = value.lower().removeprefix("*.")
    labels = name.split(".")
    if not all(label and all(c.isalnum() or c == "-" for c in label) for label in labels):
        raise ValueError(value)
    return value.lower()


def non_negative_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(value)
    return float(value)


def token(value: object) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isalpha():
        raise ValueError(value)
    return value.upper()


HASH_KEY = "'client_ip', 'uri', 'header:<Name>' or 'cookie:<name>'"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


def hash_key(value: object) -> str:
    """What policy "hash" hashes: the client's address, the target, a header, a cookie."""
    if value in ("client_ip", "uri"):
        return str(value)
    if isinstance(value, str):
        kind, _, name = value.partition(":")
        if kind in ("header", "cookie") and _HEADER_NAME.fullmatch(name):
            return f"{kind}:{name}"
    raise ValueError(value)


def balance_factor(value: object) -> float:
    """Bounded loads' c: 0 for none, else at least 1 (1.25 is the paper's suggestion)."""
    number = non_negative_number(value)
    if 0 < number < 1:
        raise ValueError(value)
    return number


def check_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " \r\n"):
        raise ValueError(value)
    return value


def status_ranges(value: object) -> tuple[tuple[int, int], ...]:
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


def unique(r: Reader, key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            r.problem(f"{key}.name", name, "names that differ from each other")
        seen.add(name)
