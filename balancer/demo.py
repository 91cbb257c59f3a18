"""`balancer demo`: three embedded backends behind the balancer, on localhost only.

The configuration is exactly config/demo.toml (a unit test keeps the two equal), so
`balancer run -c config/demo.toml` behaves the same against any farm on ports 9001-9003.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from balancer.config import Config, parse_config
from balancer.farm import start_farm
from balancer.server import Balancer

FARM = [("web1", 9001), ("web2", 9002), ("web3", 9003)]


def demo_table(certs_dir: Path = Path("certs")) -> dict[str, object]:
    return {
        "policy": "round_robin",
        "admin": "127.0.0.1:8404",
        "listeners": [
            {"name": "http", "bind": "127.0.0.1:8080", "protocol": "http"},
            {"name": "https", "bind": "127.0.0.1:8443", "protocol": "https"},
        ],
        "tls": {"cert": str(certs_dir / "server.crt"), "key": str(certs_dir / "server.key")},
        "backends": [{"name": name, "address": f"127.0.0.1:{port}"} for name, port in FARM],
    }


def demo_config(certs_dir: Path = Path("certs")) -> Config:
    return parse_config(demo_table(certs_dir), "balancer demo")


async def run_demo(balancer: Balancer, certs_dir: Path) -> None:
    farm = await start_farm([name for name, _ in FARM], ports=[port for _, port in FARM])
    await balancer.start()
    http = balancer.addresses["http"][1]
    https = balancer.addresses["https"][1]
    ca = certs_dir / "ca.crt"
    print(
        f"""
balancer demo is up: 3 backends (web1..web3 on 127.0.0.1:9001-9003), round robin.

  http://127.0.0.1:{http}/           https://localhost:{https}/ (CA: {ca})
  metrics: http://127.0.0.1:8404/metrics    connections: http://127.0.0.1:8404/connections

Try:
  curl -si http://127.0.0.1:{http}/ | grep X-Backend            # run it 3 times: web1, web2, web3
  curl --cacert {ca} --tlsv1.2 --tls-max 1.2 -si https://localhost:{https}/
  ab -n 3000 -c 32 http://127.0.0.1:{http}/
  ab -n 300 -c 8 -f TLS1.2 https://127.0.0.1:{https}/
  wrk -t1 -c64 -d10s http://127.0.0.1:{http}/

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
