"""The error tree: every refusal knows its HTTP status and gRPC code.

    SeekgateError                      500 INTERNAL
    ├── BadRequest                     400 INVALID_ARGUMENT
    │   ├── PayloadTooLarge            413 RESOURCE_EXHAUSTED
    │   ├── UnsupportedMediaType       415 INVALID_ARGUMENT   (a Content-Encoding Triton would not apply)
    │   ├── FramingError               400 INVALID_ARGUMENT   (+ connection closed)
    │   └── RequestTimeout             408 DEADLINE_EXCEEDED  (+ connection closed)
    ├── NotFound                       404 NOT_FOUND          (route Triton does not have)
    ├── MethodNotAllowed               405 UNIMPLEMENTED      (a Triton route, a method it does not take; + Allow)
    ├── Unimplemented                  501 UNIMPLEMENTED      (a gRPC method the service does not have)
    ├── Unauthenticated                401 UNAUTHENTICATED    (one body for every reason)
    ├── Forbidden                      403 PERMISSION_DENIED
    ├── RateLimited                    429 RESOURCE_EXHAUSTED (+ Retry-After)
    ├── UpstreamUnavailable            503 UNAVAILABLE        (+ Retry-After)
    │   ├── StoreUnavailable           503 UNAVAILABLE
    │   ├── AuditUnavailable           503 UNAVAILABLE        (strict audit: record not durable)
    │   └── Draining                   503 UNAVAILABLE        (readiness during shutdown)
    └── UpstreamTimeout                504 DEADLINE_EXCEEDED

`public_message` is what the client sees; `reason` goes to the audit record only,
so a refusal never tells a prober why a key was rejected or which rule denied.
"""

from __future__ import annotations

import grpc


class SeekgateError(Exception):
    http_status: int = 500
    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_message: str = "internal error"
    audit_status: str = "error"

    def __init__(self, reason: str = "", public_message: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(reason or self.default_message)
        self.reason = reason or self.default_message
        self.public_message = public_message or self.default_message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(SeekgateError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "bad request"
    audit_status = "denied"


class PayloadTooLarge(BadRequest):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "request body too large"


class UnsupportedMediaType(BadRequest):
    http_status = 415
    default_message = "unsupported content encoding"


class FramingError(BadRequest):
    """A request whose length two parsers could read differently: refused and the connection closed."""


class RequestTimeout(BadRequest):
    """Headers or body not in within server.read_timeout_s: refused and the connection closed."""

    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_message = "request timed out"
    audit_status = "error"   # nothing was decided about the request: it never arrived whole


def closes_connection(err: Exception) -> bool:
    """After these the rest of the connection's bytes cannot be trusted (or never came)."""
    return isinstance(err, (FramingError, RequestTimeout))


class NotFound(SeekgateError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    default_message = "not found"
    audit_status = "denied"


class MethodNotAllowed(SeekgateError):
    """A Triton route asked for with a method Triton does not take there: Triton's own 405 and message."""

    http_status = 405
    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    default_message = "Method Not Allowed"   # Triton's words for it
    audit_status = "denied"

    def __init__(self, reason: str, allowed: frozenset[str]) -> None:
        super().__init__(reason)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(sorted(self.allowed))}


class Unimplemented(SeekgateError):
    """A gRPC method GRPCInferenceService does not have: UNIMPLEMENTED with no message, as Triton answers."""

    http_status = 501
    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    default_message = ""   # Triton's: grpc's own default ("Method not found!") would tell seekgate apart
    audit_status = "denied"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.public_message = ""


class Unauthenticated(SeekgateError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    default_message = "invalid or missing credentials"
    audit_status = "denied"

    def __init__(self, reason: str = "") -> None:
        # The public message is fixed on purpose: same body whatever the reason.
        super().__init__(reason or "missing_credentials")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="seekgate"'}


class Forbidden(SeekgateError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    default_message = "forbidden by policy"
    audit_status = "denied"

    def __init__(self, reason: str = "", public_message: str | None = None) -> None:
        super().__init__(reason or "policy_denied", public_message)


class RateLimited(SeekgateError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "rate limit exceeded"
    audit_status = "denied"


class UpstreamUnavailable(SeekgateError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    default_message = "inference server unavailable"

    def __init__(self, reason: str = "", retry_after: int = 1) -> None:
        super().__init__(reason or "upstream_unavailable", retry_after=retry_after)


class StoreUnavailable(UpstreamUnavailable):
    default_message = "service temporarily unavailable"


class Draining(UpstreamUnavailable):
    """Readiness after SIGTERM: this process is finishing its requests and takes no new traffic."""

    default_message = "shutting down"

    def __init__(self) -> None:
        super().__init__("draining")


class AuditUnavailable(UpstreamUnavailable):
    """Strict audit mode fails closed: no response without a durable audit record."""

    default_message = "service temporarily unavailable"


class UpstreamTimeout(SeekgateError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_message = "inference server timed out"
