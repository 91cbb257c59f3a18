"""[[listeners]]: where the balancer listens, what it speaks there, and where requests go.

Pure, like schema.py, which reads the rest of the file and holds these in its `Config`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from balancer.config.values import (
    ADDRESS,
    MISSING,
    REQUIRED,
    Address,
    Reader,
    boolean,
    check_path,
    choice,
    choices,
    host_pattern,
    networks,
    parse_address,
    text,
    unique,
)

PROTOCOLS = ("http", "https")
MODES = ("http", "tcp")
DEFAULT_GROUP = "default"  # the group top-level [[backends]] (and policy) make
# What a TLS listener in http mode may offer by ALPN, and offers unless told (`alpn`): h2
# first, as browsers, curl and CDNs ask (`alpn = ["http/1.1"]` turns it off).
ALPN_PROTOCOLS = ("h2", "http/1.1")
DEFAULT_ALPN = ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One routing rule of a listener: requests (http mode) whose Host and path match, or
    TLS connections (tcp mode, passthrough) whose SNI matches, go to `group`. A rule without
    a condition is not allowed; with two, both must match. Rules are tried in file order."""

    group: str
    host: str | None = None  # "example.com" or "*.example.com" (any subdomain); no port
    path_prefix: str | None = None  # "/api/": the request target's path starts with it
    sni: str | None = None  # tcp listeners without TLS: the ClientHello's server name


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    bind: Address
    protocol: str = "http"
    mode: str = "http"
    group: str = "default"  # the backend group of every request (connection) no route takes
    routes: tuple[RouteConfig, ...] = ()
    # Behind an L4 balancer: every connection from these networks starts with a PROXY header
    # (v1 or v2) naming the real client; connections from elsewhere are refused.
    accept_proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # A TLS listener's own certificate/key pairs (the first its default, the rest chosen by
    # SNI), in place of [tls] cert/key and [[tls.certificates]]; versions, ciphers as [tls].
    certificates: tuple[tuple[str, str], ...] = ()
    # A TLS http listener's ALPN offer, in preference order: "h2" and/or "http/1.1" (a client
    # that chooses h2 gets h2_flow.py; one that asks for nothing, HTTP/1.1). () elsewhere.
    alpn: tuple[str, ...] = ()
    # A plain http listener: a client that begins with HTTP/2's preface (prior knowledge, as
    # `curl --http2-prior-knowledge`) speaks HTTP/2; others HTTP/1.x. Off unless asked, as
    # nginx's.
    h2c: bool = False

    @property
    def tls(self) -> bool:
        return self.protocol == "https"


LISTENER_KEYS = (
    "name", "bind", "tls", "mode", "protocol", "group", "routes", "accept_proxy_from",
    "certificates", "alpn", "h2c",
)  # fmt: skip


def listeners_section(
    r: Reader, data: Mapping[str, Any], group_names: list[str]
) -> list[ListenerConfig]:
    """[[listeners]]: each a name, an address, TLS or not, a mode, its group and routes."""
    listeners = []
    raw_listeners = data.get("listeners", [])
    for path, item in r.tables(raw_listeners, "listeners", "listeners",
                               "a table with name, bind, tls, mode"):  # fmt: skip
        r.table(item, path, LISTENER_KEYS)
        protocol = r.get(item, "protocol", f"{path}.protocol", choice(PROTOCOLS),
                         "'http' or 'https'", "http")  # fmt: skip
        # TLS and the application protocol said apart: tls = true|false, mode = http|tcp.
        # `protocol = "https"` is the older word for tls = true, read as it.
        tls = r.get(item, "tls", f"{path}.tls", boolean, "true or false", None)
        if tls is not None:
            if "protocol" in item and (protocol == "https") != tls:
                r.problem(f"{path}.protocol", protocol,
                          f"to agree with tls = {str(tls).lower()}, or no protocol key: "
                          "tls says it")  # fmt: skip
            protocol = "https" if tls else "http"
        bind = r.get(item, "bind", f"{path}.bind", parse_address, ADDRESS, REQUIRED)
        name = r.get(item, "name", f"{path}.name", text, "a non-empty string", protocol)
        mode = r.get(item, "mode", f"{path}.mode", choice(MODES), "'http' or 'tcp'", "http")
        group = _listener_group(r, item, path, group_names)
        routes = _routes(r, item, path, group_names, mode or "http", protocol == "https")
        proxy_from = r.get(item, "accept_proxy_from", f"{path}.accept_proxy_from", networks,
                           "a list of addresses or networks ('10.0.0.0/8', '127.0.0.1') of "
                           "the L4 balancers that send PROXY headers", ())  # fmt: skip
        certificates = certificate_pairs(
            r, item.get("certificates", []), f"{path}.certificates", "listeners.certificates"
        )
        if certificates and protocol != "https":
            r.problem(f"{path}.certificates", item["certificates"], "tls = true on this "
                      "listener: certificates are for a listener that terminates TLS")  # fmt: skip
        alpn = _alpn(r, item, path, protocol == "https" and mode == "http")
        h2c = r.get(item, "h2c", f"{path}.h2c", boolean, "true or false", False)
        if h2c and (protocol == "https" or mode != "http"):
            r.problem(f"{path}.h2c", h2c, "h2c on a plain (tls = false) listener in mode "
                      "'http': over TLS, alpn = ['h2', 'http/1.1'] offers HTTP/2")  # fmt: skip
        if isinstance(bind, Address):
            listeners.append(ListenerConfig(
                name, bind, protocol or "http", mode or "http", group, routes, proxy_from,
                certificates, alpn, bool(h2c),
            ))  # fmt: skip
    if not listeners and not r.problems:
        r.problem("listeners", MISSING, "at least one [[listeners]] table (or --http / --https)")
    unique(r, "listeners", [x.name for x in listeners])
    return listeners


def _alpn(r: Reader, item: Mapping[str, Any], path: str, offers: bool) -> tuple[str, ...]:
    """The listener's ALPN offer: a TLS http listener's, as given or DEFAULT_ALPN."""
    if not offers:
        if "alpn" in item:
            r.problem(f"{path}.alpn", item["alpn"], "no alpn here: it is offered by a "
                      "listener with tls = true in mode 'http'")  # fmt: skip
        return ()
    alpn = r.get(item, "alpn", f"{path}.alpn", choices(ALPN_PROTOCOLS),
                 "a list of 'h2' and 'http/1.1', most preferred first", DEFAULT_ALPN)  # fmt: skip
    if alpn == ():
        r.problem(f"{path}.alpn", item["alpn"], "at least one of 'h2' and 'http/1.1'")
    return alpn or DEFAULT_ALPN


def certificate_pairs(
    r: Reader, raw: object, where: str = "tls.certificates", shape: str = "tls.certificates"
) -> tuple[tuple[str, str], ...]:
    """[[tls.certificates]] (or a listener's `certificates`, at `where`): cert and key, each
    pair served to the names its certificate holds (tls.py reads them)."""
    pairs = []
    for path, item in r.tables(raw, where, shape, "a table with cert and key"):
        r.table(item, path, ("cert", "key"))
        cert = r.get(item, "cert", f"{path}.cert", text, "a certificate file path", REQUIRED)
        key = r.get(item, "key", f"{path}.key", text, "a private key file path", REQUIRED)
        if isinstance(cert, str) and isinstance(key, str):
            pairs.append((cert, key))
    return tuple(pairs)


def _listener_group(r: Reader, item: Mapping[str, Any], path: str, names: list[str]) -> str:
    """The listener's default group: as named; else "default" (top-level [[backends]]), or
    the only group there is."""
    known = ", ".join(names) or "none"
    if "group" in item:
        group = item["group"]
        if group not in names:
            r.problem(f"{path}.group", group, f"the name of a group ({known})")
        return str(group)
    if DEFAULT_GROUP in names or len(names) != 1:
        if DEFAULT_GROUP not in names and names:
            r.problem(f"{path}.group", MISSING,
                      f"the group it sends to, one of {known}: with several groups each "
                      "listener names its own")  # fmt: skip
        return DEFAULT_GROUP
    return names[0]


ROUTE_KEYS = ("group", "host", "path_prefix", "sni")


def _routes(
    r: Reader, item: Mapping[str, Any], path: str, names: list[str], mode: str, tls: bool
) -> tuple[RouteConfig, ...]:
    raw = item.get("routes", [])
    routes = []
    for at, rule in r.tables(raw, f"{path}.routes", "listeners.routes",
                             "a table with group and host, path_prefix or sni"):  # fmt: skip
        r.table(rule, at, ROUTE_KEYS)
        group = rule.get("group", MISSING)
        if group not in names:
            r.problem(f"{at}.group", group, f"the name of a group ({', '.join(names)})")
        host = r.get(rule, "host", f"{at}.host", host_pattern,
                     "a host name like 'example.com' or '*.example.com', no port")  # fmt: skip
        prefix = r.get(rule, "path_prefix", f"{at}.path_prefix", check_path,
                       "a path starting with '/'")  # fmt: skip
        sni = r.get(rule, "sni", f"{at}.sni", host_pattern,
                    "a server name like 'example.com' or '*.example.com'")  # fmt: skip
        if mode == "http" and sni is not None:
            r.problem(f"{at}.sni", sni, "host (and path_prefix) in an http listener: sni "
                      "routes TLS passed through a tcp listener")  # fmt: skip
        elif mode == "tcp" and (host is not None or prefix is not None):
            r.problem(f"{at}.host", host or prefix, "sni in a tcp listener (it sees no HTTP "
                      "request): or mode = 'http'")  # fmt: skip
        elif mode == "tcp" and tls:
            r.problem(f"{at}.sni", sni, "a tcp listener without tls: routing by SNI passes "
                      "TLS through; with tls = true the balancer terminates it")  # fmt: skip
        elif host is None and prefix is None and sni is None:
            r.problem(at, rule, "a condition: host, path_prefix (http) or sni (tcp)")
        routes.append(RouteConfig(str(group), host, prefix, sni))
    return tuple(routes)
