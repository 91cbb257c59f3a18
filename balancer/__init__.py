"""balancer: an asyncio HTTP/HTTPS load balancer that shows each connection's handshakes
and teardown."""

__version__ = "0.1.0"
