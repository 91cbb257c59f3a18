"""The `balancer` command: run, check, certs, demo.

Exit codes: 0 success; 2 bad configuration or usage (nothing was bound); 1 a failure at run
time (a port already in use, say).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import resource
import sys
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from balancer import __version__, build
from balancer.backend.discovery import resolver_problems
from balancer.backend.policies import POLICIES
from balancer.config.overrides import Overrides, apply_overrides
from balancer.config.resolve import resolve_backends
from balancer.config.schema import (
    EVENT_LOOPS,
    Config,
    ConfigError,
    parse_config,
)
from balancer.demo.certs import KEY_TYPES, CertsExist, CertsIncomplete, make_certs
from balancer.net.tls import TLSSetupError, certificate_problems, expiry_warnings
from balancer.process.control import read_token
from balancer.process.server import Balancer, SSLContexts, StartError, build_ssl_contexts
from balancer.process.supervisor import Supervisor

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("balancer")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def _workers_flag(value: str) -> int | str:
    """--workers: a count, or "auto" (checked with the file's keys, by config/schema.py)."""
    return value if value == "auto" else int(value) if value.isdigit() else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"balancer {__version__}, {build()}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    def config_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
        sub.add_argument("--http", metavar="ADDR", help="plain HTTP listener, e.g. 0.0.0.0:80")
        sub.add_argument("--https", metavar="ADDR", help="TLS listener, e.g. 0.0.0.0:443")
        sub.add_argument(
            "--backend",
            metavar="HOST:PORT",
            action="append",
            default=[],
            help="a backend of the farm (repeat); replaces the file's backends",
        )
        sub.add_argument(
            "--policy",
            choices=sorted(POLICIES),
            help="how backends are chosen: smooth weighted round robin (default), fewest "
            "active connections per weight, or consistent hashing of the client's address",
        )
        sub.add_argument("--cert", metavar="FILE", help="server certificate (PEM)")
        sub.add_argument("--key", metavar="FILE", help="server private key (PEM)")
        sub.add_argument("--admin", metavar="ADDR", help="admin listener: /metrics and more")
        sub.add_argument("--access-log", metavar="PATH|-", help="one JSON line per connection")
        sub.add_argument(
            "--workers",
            type=_workers_flag,
            metavar="N|auto",
            help="worker processes (auto: one per CPU)",
        )
        sub.add_argument(
            "--event-loop",
            choices=EVENT_LOOPS,
            help="uvloop (default, faster) or the standard library's asyncio loop",
        )

    run = verbs.add_parser("run", help="run the balancer")
    config_flags(run)
    check = verbs.add_parser("check", help="validate a configuration without binding anything")
    config_flags(check)
    certs = verbs.add_parser("certs", help="make a local CA and a server certificate")
    certs.add_argument(
        "--dir",
        default="certs",
        type=Path,
        help="where to write ca.crt, server.crt and server.key (default: certs)",
    )
    certs.add_argument(
        "--host", action="append", default=[], help="an extra name or address (repeat)"
    )
    certs.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default="ecdsa",
        help="ECDSA P-256 (default: far cheaper handshakes) or RSA-2048",
    )
    certs.add_argument(
        "--force", action="store_true", help="replace existing files (clients must re-trust)"
    )
    demo = verbs.add_parser("demo", help="a 3-backend farm behind the balancer on localhost")
    demo.add_argument("--certs-dir", default="certs", type=Path, help="made here if missing")
    demo.add_argument("--http", metavar="ADDR", default="127.0.0.1:8080", help="HTTP listener")
    demo.add_argument("--https", metavar="ADDR", default="127.0.0.1:8443", help="TLS listener")
    demo.add_argument("--admin", metavar="ADDR", default="127.0.0.1:8404", help="admin listener")
    demo.add_argument(
        "--farm-port",
        metavar="PORT",
        type=int,
        default=9001,
        help="the three demo backends listen on PORT, PORT+1, PORT+2 (default 9001)",
    )
    return parser


def load(args: argparse.Namespace) -> tuple[Config, bool]:
    """The file (if any) with the flags laid over it, and whether limits.max_connections was
    set (or left to fit the machine); raises ConfigError."""
    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        path = Path(args.config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError([f"{path}: not valid TOML: {error}"]) from None
        source = str(path)
    flags = Overrides(
        http=args.http,
        https=args.https,
        backends=tuple(args.backend),
        policy=args.policy,
        cert=args.cert,
        key=args.key,
        admin=args.admin,
        access_log=args.access_log,
        workers=args.workers,
        event_loop=args.event_loop,
    )
    merged = apply_overrides(data, flags, source)
    if merged != data and args.config:
        source += " (with command-line flags)"
    limits = merged.get("limits")
    max_connections_set = isinstance(limits, dict) and "max_connections" in limits
    return parse_config(merged, source), max_connections_set


def run_loop(config: Config, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if config.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        with asyncio.Runner() as runner:
            runner.run(main())


def access_log_problem(config: Config) -> str | None:
    """Why `run` could not append to the configured access log, or None (checked by `check`
    too, so a path `run` would fail on never passes as `config OK`)."""
    target = config.access_log
    if target is None or target == "-":
        return None
    path = Path(target)
    where = f"{config.source}: access_log = {target!r}"
    if path.is_dir():
        return f"{where}: is a directory; expected a file path"
    if not path.parent.is_dir():
        directory = str(path.parent)
        return f"{where}: directory {directory!r} does not exist; create it or choose another path"
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK)
    if not writable:
        return f"{where}: not writable by this user; fix its permissions or choose another path"
    return None


def open_access_log(config: Config) -> IO[str] | None:
    """The access log, opened for appending; ConfigError naming the key if it cannot be."""
    problem = access_log_problem(config)
    if problem is not None:
        raise ConfigError([problem])
    if config.access_log is None:
        return None
    if config.access_log == "-":
        return sys.stdout
    try:
        return open(config.access_log, "a", encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            [f"{config.source}: access_log = {config.access_log!r}: cannot open: {error.strerror}"]
        ) from None


def cmd_check(args: argparse.Namespace) -> int:
    config, _, descriptors, level = prepare(args)  # what run and every reload check, unbound
    if level >= logging.WARNING:  # what run would warn of: too few descriptors
        log.warning("%s", descriptors)
    tls = sum(1 for x in config.listeners if x.tls)
    print(
        f"config OK: {len(config.listeners)} listener(s) ({tls} TLS), "
        + ", ".join(
            ("" if len(config.groups) == 1 else f"group {g.name}: ")
            + (
                f"{len(g.backends)} backend(s)"
                if g.discover is None
                else f"members of {g.discover} (DNS, {g.discover.slots} slots)"
            )
            + f", policy {g.policy}"
            for g in config.groups
        )
    )
    return EXIT_OK


FD_RESERVE = 64  # listeners, admin, log files, a margin


def budget_file_descriptors(config: Config, max_connections_set: bool) -> tuple[Config, str, int]:
    """Raise the soft RLIMIT_NOFILE toward the hard limit so each connection's two descriptors
    (client, backend) fit. When limits.max_connections was left at its default and the hard
    limit cannot hold it, it is lowered to what fits (nginx and HAProxy size to the machine
    likewise). Returns the config to run, and the log line (and level) to say once started."""
    max_connections = config.limits.max_connections
    needed = 2 * max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft >= needed:
        return (
            config,
            f"file descriptors: limit {soft} (limits.max_connections = {max_connections})",
            logging.INFO,
        )
    fits = max(1, (soft - FD_RESERVE) // 2)
    if not max_connections_set:
        limits = replace(config.limits, max_connections=fits)
        message = (
            f"file descriptors: limit {soft} holds {fits} connections (two descriptors each, "
            f"plus {FD_RESERVE}): limits.max_connections is {fits}; set it, and raise "
            "`ulimit -n`, for more"
        )
        return replace(config, limits=limits), message, logging.INFO
    message = (
        f"file descriptors: limit {soft} < {needed} needed for limits.max_connections = "
        f"{max_connections} (two each, plus {FD_RESERVE}); lower limits.max_connections "
        f"to {fits} or raise `ulimit -n`"
    )
    return config, message, logging.WARNING


def prepare(args: argparse.Namespace) -> tuple[Config, SSLContexts, str, int]:
    """Everything `check` checks, for `run` and for each reload: the configuration to run,
    the TLS context (built once, for every worker), and the descriptor budget's log line and
    level. Raises ConfigError or TLSSetupError."""
    config, max_connections_set = load(args)
    # What the file names outside itself, every problem in one run: backend names (resolved
    # now: an unresolvable one fails check and run), the access log, the token (readable and
    # long enough), the certificates and keys.
    problems: list[str] = []
    try:
        config = resolve_backends(config)
    except ConfigError as error:
        problems += error.problems
    problems += filter(None, [access_log_problem(config)])
    try:
        read_token(config)
    except ConfigError as error:
        problems += error.problems
    problems += certificate_problems(config)
    problems += resolver_problems(config)
    if problems:
        raise ConfigError(problems)
    config, descriptors, level = budget_file_descriptors(config, max_connections_set)
    ssl_contexts = build_ssl_contexts(config)
    for warning in expiry_warnings(config, datetime.datetime.now(datetime.UTC)):
        log.warning("%s", warning)
    Balancer(config, ssl_contexts=ssl_contexts)  # backends resolve; nothing is bound
    return config, ssl_contexts, descriptors, level


def cmd_run(args: argparse.Namespace) -> int:
    config, ssl_contexts, descriptors, level = prepare(args)
    supervisor = Supervisor(
        config,
        ssl_contexts,
        prepare=lambda: prepare(args)[:2],
        open_access_log=open_access_log,
        run_loop=run_loop,
    )
    try:
        # The supervisor's own loop is asyncio's: it forks, and a child must not inherit a
        # libuv loop's state. Said once bound: a port in use is the first thing to read.
        with asyncio.Runner() as runner:
            runner.run(supervisor.run(lambda: log.log(level, descriptors)))
    except StartError as error:
        log.error("cannot start: %s", error)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    try:
        paths = make_certs(directory, args.host, args.key_type, force=args.force)
    except CertsExist as kept:
        print(
            f"kept {kept}: {', '.join(str(p) for p in kept.paths)} exist already; "
            "`balancer certs --force` replaces them (clients must then trust the new CA)"
        )
        return EXIT_OK
    except CertsIncomplete as error:
        print(f"certs: {error}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {paths.ca}, {paths.cert}, {paths.key} ({args.key_type})")
    print(f"clients trust it with: curl --cacert {paths.ca} https://localhost:8443/")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from balancer.demo.run import demo_config, run_demo

    certs_dir: Path = args.certs_dir
    try:
        paths = make_certs(certs_dir)
        print(f"made a local CA and certificate in {certs_dir}/ ({paths.ca.name} to trust)")
    except CertsExist:
        pass  # the demo uses them as they are
    except CertsIncomplete as error:
        print(f"certs: {error}", file=sys.stderr)
        return EXIT_CONFIG
    config = demo_config(certs_dir, http=args.http, https=args.https, admin=args.admin,
                         farm_port=args.farm_port)  # fmt: skip
    balancer = Balancer(config, access_log=None)
    try:
        run_loop(config, lambda: run_demo(balancer, certs_dir))
    except StartError as error:
        log.error("cannot start the demo: %s", error)
        return EXIT_RUNTIME
    return EXIT_OK


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check": cmd_check,
    "certs": cmd_certs,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    args = _parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except ConfigError as error:
        print("configuration error:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except TLSSetupError as error:
        print(f"configuration error:\n  {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
