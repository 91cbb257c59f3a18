"""Pure protocol code: HTTP/1.1 request heads and response framing, the HTTP errors the
balancer answers with, the PROXY protocol and the TLS ClientHello peek. No sockets, no clocks;
imports config/ at most."""
