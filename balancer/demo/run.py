"""`balancer demo`: three embedded backends behind the balancer, on localhost only.

With its default ports the configuration is exactly config/demo.toml (a unit test keeps the
two equal), so `balancer run -c config/demo.toml` behaves the same against any farm on ports
9001-9003. While it runs, each closed connection is printed as one line: what it did on the
wire, the headline of the access log.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from balancer.config.schema import Config, parse_config
from balancer.demo.farm import start_farm
from balancer.observe.loglines import connection_line
from balancer.process.server import Balancer, StartError, bind_failure

FARM = ("web1", "web2", "web3")


def demo_table(
    certs_dir: Path = Path("certs"),
    *,
    http: str = "127.0.0.1:8080",
    https: str = "127.0.0.1:8443",
    admin: str = "127.0.0.1:8404",
    farm_port: int = 9001,
) -> dict[str, object]:
    return {
        "policy": "round_robin",
        "admin": admin,
        "listeners": [
            {"name": "http", "bind": http, "protocol": "http"},
            {"name": "https", "bind": https, "protocol": "https"},
        ],
        "tls": {"cert": str(certs_dir / "server.crt"), "key": str(certs_dir / "server.key")},
        "backends": [
            {"name": name, "address": f"127.0.0.1:{farm_port + i}"} for i, name in enumerate(FARM)
        ],
    }


def demo_config(certs_dir: Path = Path("certs"), **ports: Any) -> Config:
    """demo_table's configuration, checked (`ports`: demo_table's keywords)."""
    return parse_config(demo_table(certs_dir, **ports), "balancer demo")


async def run_demo(balancer: Balancer, certs_dir: Path) -> None:
    ports = [backend.address.port for backend in balancer.config.backends]
    farm: list[tuple[asyncio.AbstractServer, int]] = []
    for name, port in zip(FARM, ports, strict=True):
        try:
            farm += await start_farm([name], ports=[port])
        except OSError as error:
            for server, _ in farm:
                server.close()
            failure = bind_failure(f"demo backend {name}", "127.0.0.1", port, error)
            raise StartError(f"{failure} (--farm-port moves the three demo backends)") from None
    balancer.observer.live = lambda record: print(connection_line(record), flush=True)
    try:
        await balancer.start()
    except StartError as error:
        for server, _ in farm:
            server.close()
        raise StartError(f"{error} (--http, --https and --admin choose the demo's)") from None
    http = balancer.addresses["http"][1]
    https = balancer.addresses["https"][1]
    admin = "{}:{}".format(*balancer.addresses["admin"])
    ca = certs_dir / "ca.crt"
    print(
        f"""
balancer demo is up: 3 backends (web1..web3 on 127.0.0.1:{ports[0]}-{ports[-1]}), round robin.

  http://127.0.0.1:{http}/           https://localhost:{https}/ (CA: {ca})
  status page: http://{admin}/       metrics: http://{admin}/metrics
  connections: http://{admin}/connections

Try:
  curl -si http://127.0.0.1:{http}/ | grep X-Backend            # run it 3 times: web1, web2, web3
  curl --cacert {ca} --tlsv1.2 --tls-max 1.2 -si https://localhost:{https}/
  ab -n 3000 -c 32 http://127.0.0.1:{http}/
  ab -n 300 -c 8 -f TLS1.2 https://127.0.0.1:{https}/
  wrk -t1 -c64 -d10s http://127.0.0.1:{http}/

Each connection prints one line as it closes: client, backend, TLS, who closed each leg first
and how (FIN, RST, close_notify). The full record of each is at /connections.
Ctrl-C stops it.
""",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await balancer.shutdown(grace=2.0)
    for server, _ in farm:
        server.close()
    print(balancer.observer.summary(), flush=True)
