"""Domain errors as HTTP: the error envelope of DESIGN §2.3 (its body, headers and log lines), rendered
in one place, the request edge (middleware/edge.py)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from pricer.errors import (
    BACKEND_SERVICE_ERRORS,
    BackendServiceUnavailable,
    InvalidParameter,
    MethodNotAllowed,
    PricerError,
    RateLimitExceeded,
    ServiceUnavailable,
    Unauthorized,
)
from pricer.logs import (
    AUTHENTICATION_ERROR,
    BACKEND_SERVICE_ERROR,
    VALIDATION_ERROR,
    LineBudget,
    fields,
)
from pricer.schemas import ErrorBody, ValidationProblem

log = logging.getLogger("pricer.errors")

# The runbook's `Authentication error` line: at most this many a second per process.
AUTH_ERROR_LINES_PER_SECOND = 10
_encoder = msgspec.json.Encoder()

# nginx's "client closed request": the status recorded (metrics, logs) for a request whose client went away
# before it was answered. It is not a server error, so the runbook's 5xx alerts do not count it; no response
# is sent (there is no one to read it).
CLIENT_CLOSED_REQUEST = 499
# What the server itself answered a request whose body stalled (the protocol wrote it; see server.py).
REQUEST_TIMEOUT = 408

# What a 503 names: the dependency, never the operation or the exception class that failed (those are
# internals, and tell an attacker which query a request reached). The stores mark their errors with the
# operation (`keys.get`, `quotes.add`, ...); its first word says which store of the database it was.
_STORES = {
    "keys": "The key store (database)",
    "clients": "The client store (database)",
    "quotes": "The quote store (database)",
    "availability": "The market data store (database)",
    "volatility": "The market data store (database)",
    "events": "The market data store (database)",
    "stocks": "The market data store (database)",
}


def _store_operation(error: PricerError) -> str | None:
    """The store operation a server-side error came from (`keys.get`), None for other errors."""
    if error.status < 500 or not error.details or "operation" not in error.details:
        return None
    return str(error.details["operation"])


def public_view(error: PricerError) -> tuple[str, dict[str, Any] | None]:
    """The message and details the client is answered: for a dependency's failure (503, or a store's 502 /
    504), which dependency and nothing else; for every other error, its own."""
    if isinstance(error, BACKEND_SERVICE_ERRORS):
        return error.message, error.details  # names the service (no host, no cause)
    operation = _store_operation(error)
    if isinstance(error, ServiceUnavailable) or operation is not None:
        store = _STORES.get((operation or "").partition(".")[0], "The database")
        state = "is unavailable" if isinstance(error, ServiceUnavailable) else "failed"
        return f"{store} {state}", {"dependency": "database"}
    return error.message, error.details


def error_body(error: PricerError, request_id: str) -> bytes:
    message, details = public_view(error)
    body = ErrorBody(
        error=message,
        error_code=error.code,
        details=details,
        request_id=request_id,
    )
    if isinstance(error, InvalidParameter):
        body.validation_errors = [
            ValidationProblem(field=problem.field, location=problem.location, message=problem.message)
            for problem in error.problems
        ]
        body.valid_params = error.valid_params
    return _encoder.encode(body)


def error_headers(error: PricerError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json")]
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="borrow-rate-engine", ApiKey header="X-API-Key"'))
    elif isinstance(error, MethodNotAllowed):
        headers.append((b"allow", ", ".join(error.allowed).encode()))
    elif isinstance(error, RateLimitExceeded):
        headers.append((b"retry-after", str(error.retry_after).encode()))
        headers += error.limit_headers
    elif isinstance(error, BackendServiceUnavailable):
        headers.append((b"retry-after", str(error.retry_after).encode()))
    elif isinstance(error, ServiceUnavailable):
        headers.append((b"retry-after", b"1"))
    return headers


class ErrorLog:
    """The lines of errors answered on purpose, each kind within its budget of lines a second (the request
    edge, which renders the errors, calls it)."""

    def __init__(self) -> None:
        self._backend_lines = LineBudget(per_second=1)
        self._auth_lines = LineBudget(per_second=AUTH_ERROR_LINES_PER_SECOND)

    def write(self, error: PricerError, *, endpoint: str, request_id: str, client_id: str | None) -> None:
        operation = _store_operation(error)
        if isinstance(error, BACKEND_SERVICE_ERRORS):
            # Every failed call is counted (backend_requests_total{status="error"}); the line is written
            # within its budget per service and code, so an outage does not flood the log.
            skipped = self._backend_lines.take((error.code, error.service))
            if skipped is not None:
                log.error(
                    BACKEND_SERVICE_ERROR,
                    extra=fields(
                        service=error.service,
                        error_code=error.code,
                        status_code=error.status,
                        cause=error.cause,
                        endpoint=endpoint,
                        request_id=request_id,
                        client_id=client_id,
                        suppressed=skipped or None,
                    ),
                )
        elif operation is not None:
            # What the client's body no longer says (which operation, which cause) is for operators.
            details = error.details or {}
            skipped = self._backend_lines.take((error.code, operation))
            if skipped is not None:
                log.error(
                    BACKEND_SERVICE_ERROR,
                    extra=fields(
                        service="database",
                        error_code=error.code,
                        operation=operation,
                        cause=details.get("cause"),
                        sqlstate=details.get("sqlstate") or None,
                        error=error.message,
                        endpoint=endpoint,
                        request_id=request_id,
                        suppressed=skipped or None,
                    ),
                )
        elif isinstance(error, InvalidParameter):
            log.warning(
                VALIDATION_ERROR,
                extra=fields(
                    client_id=client_id,
                    endpoint=endpoint,
                    request_id=request_id,
                    error=error.message,
                ),
            )
        elif isinstance(error, Unauthorized):
            # Every attempt is counted (authentication_attempts_total); an unauthenticated flood must not
            # write an ERROR line each (27 MB of log per 150k requests before this budget).
            skipped = self._auth_lines.take()
            if skipped is not None:
                log.error(
                    AUTHENTICATION_ERROR,
                    extra=fields(
                        reason=error.reason,
                        endpoint=endpoint,
                        request_id=request_id,
                        suppressed=skipped or None,
                    ),
                )
