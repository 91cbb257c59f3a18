"""The `balancer` command: run, check, certs, demo.

Exit codes: 0 success; 2 bad configuration or usage (nothing was bound); 1 a failure at run
time (a port already in use, say).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import sys
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any

from balancer import __version__
from balancer.certs import KEY_TYPES, make_certs
from balancer.config import (
    EVENT_LOOPS,
    Config,
    ConfigError,
    Overrides,
    apply_overrides,
    parse_config,
)
from balancer.policies import POLICIES
from balancer.server import Balancer
from balancer.tls import TLSSetupError

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("balancer")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"balancer {__version__}")
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
        sub.add_argument("--policy", choices=sorted(POLICIES))
        sub.add_argument("--cert", metavar="FILE", help="server certificate (PEM)")
        sub.add_argument("--key", metavar="FILE", help="server private key (PEM)")
        sub.add_argument("--admin", metavar="ADDR", help="admin listener: /metrics and more")
        sub.add_argument("--access-log", metavar="PATH|-", help="one JSON line per connection")
        sub.add_argument("--workers", type=int, metavar="N", help="worker processes (1 for now)")
        sub.add_argument("--event-loop", choices=EVENT_LOOPS)

    run = verbs.add_parser("run", help="run the balancer")
    config_flags(run)
    check = verbs.add_parser("check", help="validate a configuration without binding anything")
    config_flags(check)
    certs = verbs.add_parser("certs", help="make a local CA and a server certificate")
    certs.add_argument("--dir", default="certs", type=Path)
    certs.add_argument("--host", action="append", default=[], help="extra SAN (repeat)")
    certs.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa")
    demo = verbs.add_parser("demo", help="a 3-backend farm behind the balancer on localhost")
    demo.add_argument("--certs-dir", default="certs", type=Path)
    return parser


def load(args: argparse.Namespace) -> Config:
    """The file (if any) with the flags laid over it; raises ConfigError."""
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
    merged = apply_overrides(data, flags)
    if merged != data and args.config:
        source += " (with command-line flags)"
    return parse_config(merged, source)


def run_loop(config: Config, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if config.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        with asyncio.Runner() as runner:
            runner.run(main())


def _open_access_log(target: str | None) -> IO[str] | None:
    if target is None:
        return None
    if target == "-":
        return sys.stdout
    return open(target, "a", encoding="utf-8")


def cmd_check(args: argparse.Namespace) -> int:
    config = load(args)
    Balancer(config)  # builds the TLS context: cert and key load and match
    tls = sum(1 for x in config.listeners if x.tls)
    print(
        f"config OK: {len(config.listeners)} listener(s) ({tls} TLS), "
        f"{len(config.backends)} backend(s), policy {config.policy}"
    )
    return EXIT_OK


FD_RESERVE = 64  # listeners, admin, log files, a margin


def budget_file_descriptors(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard limit so each connection's two
    descriptors (client, backend) fit; warn when they cannot. Returns the limit in force."""
    needed = 2 * max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < needed:
        log.warning(
            "file descriptors: limit %d < %d needed for limits.max_connections = %d (two each, "
            "plus %d); lower limits.max_connections or raise `ulimit -n`",
            soft, needed, max_connections, FD_RESERVE,
        )  # fmt: skip
    else:
        log.info("file descriptors: limit %d (limits.max_connections = %d)", soft, max_connections)
    return soft


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args)
    budget_file_descriptors(config.limits.max_connections)
    access_log = _open_access_log(config.access_log)
    balancer = Balancer(config, access_log=access_log)
    try:
        run_loop(config, balancer.serve)
    except OSError as error:
        log.error("cannot start: %s", error)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_certs(args: argparse.Namespace) -> int:
    paths = make_certs(args.dir, args.host, args.key_type)
    print(f"wrote {paths.ca}, {paths.cert}, {paths.key} ({args.key_type})")
    print(f"clients trust it with: curl --cacert {paths.ca} https://localhost:8443/")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from balancer.demo import demo_config, run_demo

    certs_dir: Path = args.certs_dir
    if not (certs_dir / "server.crt").exists() or not (certs_dir / "server.key").exists():
        paths = make_certs(certs_dir)
        print(f"made a local CA and certificate in {certs_dir}/ ({paths.ca.name} to trust)")
    config = demo_config(certs_dir)
    balancer = Balancer(config, access_log=None)
    try:
        run_loop(config, lambda: run_demo(balancer, certs_dir))
    except OSError as error:
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
