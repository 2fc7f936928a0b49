"""One exception per error code of the engine's envelope (DESIGN §2.3), each carrying the request id.

`error_for(status, body, headers)` is the one place a non-2xx response becomes an exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec


class ValidationError(msgspec.Struct, frozen=True):
    """One rule a request broke: the field, where it was (body, query, path) and the message."""

    field: str
    location: str
    message: str


class _Envelope(msgspec.Struct):
    error: str
    error_code: str
    details: dict[str, Any] | None = None
    request_id: str | None = None
    validation_errors: list[ValidationError] = []
    valid_params: list[str] = []


class PricerClientError(Exception):
    """Base of everything this library raises."""


class TransportError(PricerClientError):
    """The engine could not be reached or the connection broke (the httpx error is the `__cause__`)."""


class PricerError(PricerClientError):
    """An error answered by the engine. `code` is its `error_code`, `status` the HTTP status."""

    code: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code or self.code}: {message} (request id {request_id})")
        self.message = message
        self.status = status
        self.error_code = code or self.code
        self.request_id = request_id
        self.details: dict[str, Any] = dict(details or {})


class InvalidParameter(PricerError):
    code = "INVALID_PARAMETER"

    def __init__(
        self,
        message: str,
        *,
        validation_errors: list[ValidationError] | None = None,
        valid_params: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.validation_errors = list(validation_errors or [])
        self.valid_params = list(valid_params or [])


class Unauthorized(PricerError):
    code = "UNAUTHORIZED"


class Forbidden(PricerError):
    code = "FORBIDDEN"


class NotFound(PricerError):
    """An unknown quote or path (and the base of the ticker's and client's 404)."""

    code = "NOT_FOUND"


class TickerNotFound(NotFound):
    code = "TICKER_NOT_FOUND"


class ClientNotFound(NotFound):
    code = "CLIENT_NOT_FOUND"


class MethodNotAllowed(PricerError):
    code = "METHOD_NOT_ALLOWED"


class Conflict(PricerError):
    code = "CONFLICT"


class PayloadTooLarge(PricerError):
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(PricerError):
    code = "UNSUPPORTED_MEDIA_TYPE"


class _RetryAfter(PricerError):
    """An error that says when to try again (`retry_after`, whole seconds, from the header)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimited(_RetryAfter):
    code = "RATE_LIMIT_EXCEEDED"


class InternalError(PricerError):
    code = "INTERNAL_ERROR"


class BackendError(PricerError):
    code = "BACKEND_ERROR"


class BackendTimeout(PricerError):
    code = "BACKEND_TIMEOUT"


class ServiceUnavailable(_RetryAfter):
    code = "SERVICE_UNAVAILABLE"


class UnexpectedResponse(PricerError):
    """A response that is not the engine's error envelope (a proxy's page, an unknown code)."""

    code = "UNEXPECTED_RESPONSE"


ERRORS_BY_CODE: dict[str, type[PricerError]] = {
    cls.code: cls
    for cls in (
        InvalidParameter,
        Unauthorized,
        Forbidden,
        NotFound,
        TickerNotFound,
        ClientNotFound,
        MethodNotAllowed,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        RateLimited,
        InternalError,
        BackendError,
        BackendTimeout,
        ServiceUnavailable,
    )
}

_envelope = msgspec.json.Decoder(_Envelope)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds (the engine sends whole seconds; an HTTP date is not used by it)."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def error_for(status: int, body: bytes, headers: Mapping[str, str]) -> PricerError:
    """The exception for a non-2xx response."""
    request_id = headers.get("x-request-id")
    try:
        envelope = _envelope.decode(body)
    except msgspec.DecodeError:
        text = body[:200].decode("utf-8", "replace")
        if status == 429:
            return RateLimited(
                text, status=status, request_id=request_id, retry_after=retry_after_seconds(headers)
            )
        if status == 503:
            return ServiceUnavailable(
                text, status=status, request_id=request_id, retry_after=retry_after_seconds(headers)
            )
        return UnexpectedResponse(text, status=status, request_id=request_id)
    common: dict[str, Any] = {
        "status": status,
        "code": envelope.error_code,
        "request_id": envelope.request_id or request_id,
        "details": envelope.details,
    }
    cls = ERRORS_BY_CODE.get(envelope.error_code, UnexpectedResponse)
    if cls is InvalidParameter:
        return InvalidParameter(
            envelope.error,
            validation_errors=envelope.validation_errors,
            valid_params=envelope.valid_params,
            **common,
        )
    if issubclass(cls, _RetryAfter):
        return cls(envelope.error, retry_after=retry_after_seconds(headers), **common)
    return cls(envelope.error, **common)
