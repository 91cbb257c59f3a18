"""Why a connection ended: the two vocabularies, one per kind of connection, each a table.

- A client connection's `close_cause` (record.ConnectionRecord; the label `cause` of
  balancer_connections_closed_total), besides the reason of the error it ended in
  (errors.ERRORS: bad_request, backend_connect_failed, ...).
- A backend connection's `close_cause` (record.BackendConnectionRecord, the pool's and a
  session's backend connections; the label `cause` of
  balancer_backend_connections_closed_total): the names start with CONN_, so the two never
  meet under one name one hop apart (both have a "backend_closed", meaning each its own
  connection's end).

The values are what records and metrics say: an interface, kept as they are. Each is written
once per connection by `ended_by` (first decision stands).
"""

from __future__ import annotations

from typing import Final

# Why a client connection ended (`close_cause`), besides the reason of the error it ended in
# (wire/errors.py: bad_request, backend_connect_failed, ...). Listed once; each is a label
# value of balancer_connections_closed_total.
CLIENT_CLOSED: Final = "client_closed"
CLIENT_RESET: Final = "client_reset"
HTTP_CLOSE: Final = "http_close"
BACKEND_CLOSED: Final = "backend_closed"
BACKEND_RESET: Final = "backend_reset"
IDLE_TIMEOUT: Final = "idle_timeout"
HEADER_TIMEOUT: Final = "header_timeout"
BACKEND_TIMEOUT: Final = "backend_timeout"
TUNNEL_IDLE_TIMEOUT: Final = "tunnel_idle_timeout"
TLS_FAILED: Final = "tls_failed"
TLS_ERROR: Final = "tls_error"
SHUTDOWN: Final = "shutdown"
MAX_CONNECTIONS: Final = "max_connections"
FIRST_BYTES_TIMEOUT: Final = "first_bytes_timeout"
PROXY_REFUSED: Final = "proxy_refused"
PROXY_INVALID: Final = "proxy_header_invalid"
BACKEND_DRAINED: Final = "backend_drained"
H2_ERROR: Final = "h2_error"
CLOSE_CAUSES: Final[dict[str, str]] = {
    CLIENT_CLOSED: "the client closed (FIN or close_notify) at a request boundary",
    CLIENT_RESET: "the client reset the connection (RST)",
    HTTP_CLOSE: "a request or response said Connection: close (or HTTP/1.0)",
    BACKEND_CLOSED: "the backend closed (FIN): at a response boundary, or with a response owed "
    "(then error_status 502, or the client leg reset mid-response); tcp mode: it closed",
    BACKEND_RESET: "the backend reset its connection (RST): between responses, or with a response "
    "owed (as above); tcp mode: any time",
    IDLE_TIMEOUT: "no request within keepalive_idle_seconds",
    HEADER_TIMEOUT: "a request head not complete within client_header_seconds (408 if begun)",
    BACKEND_TIMEOUT: "no response byte within backend_response_seconds (504)",
    TUNNEL_IDLE_TIMEOUT: "a tcp-mode or upgraded connection idle past tunnel_idle_seconds",
    TLS_FAILED: "the TLS handshake failed (tls.failure says why)",
    TLS_ERROR: "a TLS record could not be read after the handshake",
    SHUTDOWN: "the balancer is shutting down",
    MAX_CONNECTIONS: "over limits.max_connections: closed at once",
    FIRST_BYTES_TIMEOUT: "no PROXY header (or ClientHello, SNI routing) within "
    "client_header_seconds",
    PROXY_REFUSED: "a listener accepting PROXY headers: a client outside accept_proxy_from",
    PROXY_INVALID: "a listener accepting PROXY headers: the first bytes were not a valid one",
    BACKEND_DRAINED: "its backend was drained, and its group closes tunnels (drain_seconds)",
    H2_ERROR: "HTTP/2: the client broke the protocol, or spent its glitches (h2_flow.py); "
    "GOAWAY said the error code",
}

# Why a backend connection ended (BackendConnectionRecord.close_cause).
CONN_IDLE_TIMEOUT: Final = "idle_timeout"
CONN_POOL_FULL: Final = "pool_full"
CONN_REUSE_NEVER: Final = "reuse_never"
CONN_MAX_REQUESTS: Final = "max_requests"
CONN_BACKEND_CLOSED: Final = "backend_closed"
CONN_BACKEND_RESET: Final = "backend_reset"
CONN_BACKEND_TIMEOUT: Final = "backend_timeout"
CONN_STRAY_BYTES: Final = "stray_bytes"
CONN_NOT_REUSABLE: Final = "not_reusable"
CONN_DEAD_ON_REUSE: Final = "dead_on_reuse"
CONN_SHUTDOWN: Final = "shutdown"
CONN_MEMBER_LEFT: Final = "member_left"
BACKEND_CONNECTION_CLOSE_CAUSES: Final[dict[str, str]] = {
    CONN_IDLE_TIMEOUT: "idle in the pool past idle_timeout_seconds",
    CONN_POOL_FULL: "handed back while idle_per_backend were idle already, and as many as "
    "were lately busy at once",
    CONN_REUSE_NEVER: "its group does not reuse: one request (a routed listener's request for "
    "another group came next)",
    CONN_MAX_REQUESTS: "it carried max_requests_per_connection requests",
    CONN_BACKEND_CLOSED: "the backend closed it (FIN): idle, or with a response owed",
    CONN_BACKEND_RESET: "the backend reset it (RST)",
    CONN_BACKEND_TIMEOUT: "silent past backend_response_seconds with a response owed "
    "(retry_on response-timeout)",
    CONN_STRAY_BYTES: "the backend sent bytes no request asked for",
    CONN_NOT_REUSABLE: "its response said close, or ended the exchange uncleanly",
    CONN_DEAD_ON_REUSE: "a reused connection that ended before any response byte (the request "
    "went again)",
    CONN_SHUTDOWN: "the balancer is shutting down",
    CONN_MEMBER_LEFT: "its DNS-discovered slot holds another member now",
}
