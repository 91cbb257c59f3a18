"""Typed errors of the core, each knowing whose fault it is and the HTTP status it maps to.

The core raises these; the edge (http_flow.py) translates them to a response once, like h11's
`error_status_hint`. `reason` is the short token that lands in the connection record.
"""

from __future__ import annotations

from typing import ClassVar, Final


class BalancerError(Exception):
    # Class attributes, read on the class too (ClassVar: a compiled build would otherwise make
    # them instance attributes with defaults).
    status_hint: ClassVar[int] = 500
    reason: ClassVar[str] = "internal_error"
    fault: ClassVar[str] = "balancer"


class ClientError(BalancerError):
    """The client sent something we will not forward. One log line, never a traceback."""

    status_hint = 400
    reason = "bad_request"
    fault = "client"


class BadRequest(ClientError):
    pass


class HeaderTooLarge(ClientError):
    status_hint = 431
    reason = "header_too_large"


class BodyTooLarge(ClientError):
    status_hint = 413
    reason = "body_too_large"


class URITooLong(ClientError):
    status_hint = 414
    reason = "uri_too_long"


class MethodNotAllowed(ClientError):
    status_hint = 405
    reason = "method_not_allowed"


class VersionNotSupported(ClientError):
    status_hint = 505
    reason = "http_version_not_supported"


class CodingNotImplemented(ClientError):
    """A transfer coding other than chunked: relaying it re-chunked would change the body."""

    status_hint = 501
    reason = "transfer_coding_not_implemented"


class HeaderTimeout(ClientError):
    status_hint = 408
    reason = "header_timeout"


class BackendError(BalancerError):
    """The farm failed the request: the client gets a 5xx, or an abort once bytes have flowed."""

    status_hint = 502
    reason = "bad_gateway"
    fault = "backend"


class BackendUnreachable(BackendError):
    """No connect succeeded: refused or timed out on every backend tried."""

    reason = "backend_connect_failed"


class BackendClosed(BackendError):
    """The backend's FIN came with a response owed: none yet (and no retry), or part of one."""

    reason = "backend_closed"


class BackendReset(BackendError):
    """The backend's RST came with a response owed."""

    reason = "backend_reset"


class NoBackendAvailable(BackendError):
    status_hint = 503
    reason = "no_backend"


class BackendTimeout(BackendError):
    status_hint = 504
    reason = "backend_timeout"


class BadBackendResponse(BackendError):
    reason = "bad_backend_response"


# Every error the balancer answers: its status and the close cause it names (metrics list
# each listener's with a 0 from the start).
ERRORS: Final[tuple[type[BalancerError], ...]] = (
    BadRequest, HeaderTooLarge, BodyTooLarge, URITooLong, MethodNotAllowed, VersionNotSupported,
    CodingNotImplemented, HeaderTimeout, BackendUnreachable, BackendClosed, BackendReset,
    NoBackendAvailable, BackendTimeout, BadBackendResponse,
)  # fmt: skip
