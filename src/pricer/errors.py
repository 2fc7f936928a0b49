"""The domain's error tree.

Code below the edge raises these; the request edge (`middleware/edge.py`) turns them into the HTTP error
envelope of DESIGN §2.3 in one place. Nothing here knows about HTTP beyond the status each kind maps to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import msgspec


class FieldProblem(msgspec.Struct, frozen=True):
    """One reason a request was rejected: which field, where it was, and the rule it broke."""

    field: str
    location: str
    message: str


class PricerError(Exception):
    """Base of every error the engine answers on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details) if details is not None else None


class InvalidParameter(PricerError):
    status = 400
    code = "INVALID_PARAMETER"

    def __init__(
        self,
        message: str,
        *,
        problems: Sequence[FieldProblem] = (),
        valid_params: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.problems = list(problems)
        self.valid_params = list(valid_params)

    @classmethod
    def for_field(
        cls, field: str, message: str, *, location: str = "body", valid_params: Sequence[str] = ()
    ) -> InvalidParameter:
        return cls(
            f"{field}: {message}",
            problems=[FieldProblem(field, location, message)],
            valid_params=valid_params,
        )


class DataFileError(InvalidParameter):
    """A market-data file that is damaged or not of the expected format; `line` is 1-based."""

    def __init__(self, kind: str, line: int, message: str) -> None:
        super().__init__(
            f"{kind} file rejected at line {line}: {message}",
            problems=[FieldProblem(f"line {line}", "body", message)],
            details={"file_type": kind, "line": line},
        )
        self.kind = kind
        self.line = line


class Unauthorized(PricerError):
    status = 401
    code = "UNAUTHORIZED"

    def __init__(self, reason: str = "invalid_key") -> None:
        # One public message for every kind of bad credential; `reason` is only for metrics and logs.
        super().__init__("Missing or invalid credentials")
        self.reason = reason


class Forbidden(PricerError):
    status = 403
    code = "FORBIDDEN"


class NotFound(PricerError):
    status = 404
    code = "NOT_FOUND"


class TickerNotFound(NotFound):
    code = "TICKER_NOT_FOUND"

    def __init__(self, ticker: str) -> None:
        super().__init__(f"Unknown ticker: {ticker}", details={"ticker": ticker})
        self.ticker = ticker


class ClientNotFound(NotFound):
    code = "CLIENT_NOT_FOUND"

    def __init__(self, client_id: str) -> None:
        super().__init__(f"Unknown client: {client_id}", details={"client_id": client_id})


class MethodNotAllowed(PricerError):
    status = 405
    code = "METHOD_NOT_ALLOWED"

    def __init__(self, allowed: Sequence[str]) -> None:
        super().__init__("Method not allowed", details={"allowed": list(allowed)})
        self.allowed = list(allowed)


class PayloadTooLarge(PricerError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds {limit} bytes", details={"max_bytes": limit})


class UnsupportedMediaType(PricerError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"

    def __init__(self, got: str, allowed: Sequence[str], *, header: str = "Content-Type") -> None:
        # The header is named in the message and as the key of the details (`content_type`, or
        # `content_encoding` for a body sent compressed).
        super().__init__(
            f"Unsupported {header} {got!r}; use one of {', '.join(allowed)}",
            details={header.lower().replace("-", "_"): got, "allowed": list(allowed)},
        )


class RateLimitExceeded(PricerError):
    status = 429
    code = "RATE_LIMIT_EXCEEDED"

    def __init__(
        self,
        retry_after: int,
        bucket: str = "requests",
        limit_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__("Rate limit exceeded", details={"retry_after": retry_after, "bucket": bucket})
        self.retry_after = retry_after
        # The RateLimit headers of the bucket that refused, when it is not the request bucket (whose
        # headers every response carries already).
        self.limit_headers = tuple(limit_headers)


class BackendError(PricerError):
    status = 502
    code = "BACKEND_ERROR"


class BackendTimeout(PricerError):
    status = 504
    code = "BACKEND_TIMEOUT"


class ServiceUnavailable(PricerError):
    status = 503
    code = "SERVICE_UNAVAILABLE"


class BackendServiceFailed(BackendError):
    """A backend service (ROLE=gateway's calculation-service or data-service) could not be reached or
    answered with something that is not HTTP. `cause` is for the operators' log line, not the client."""

    def __init__(self, service: str, cause: str) -> None:
        super().__init__(f"The {service} failed", details={"service": service})
        self.service = service
        self.cause = cause


class BackendServiceTimeout(BackendTimeout):
    def __init__(self, service: str, timeout_seconds: float) -> None:
        super().__init__(
            f"The {service} did not answer within {timeout_seconds:g} s", details={"service": service}
        )
        self.service = service
        self.cause = "timeout"


class BackendServiceUnavailable(ServiceUnavailable):
    """The service's circuit breaker is open: answered at once, with when to try again."""

    def __init__(self, service: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(
            f"The {service} is unavailable", details={"service": service, "retry_after": self.retry_after}
        )
        self.service = service
        self.cause = "circuit_open"


BACKEND_SERVICE_ERRORS = (BackendServiceFailed, BackendServiceTimeout, BackendServiceUnavailable)


class Conflict(PricerError):
    status = 409
    code = "CONFLICT"
