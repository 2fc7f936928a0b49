"""The one place where domain errors become HTTP: the error envelope of DESIGN §2.3."""

from __future__ import annotations

import logging

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.context import request_state
from pricer.errors import (
    InvalidParameter,
    MethodNotAllowed,
    PricerError,
    RateLimitExceeded,
    Unauthorized,
)
from pricer.logs import AUTHENTICATION_ERROR, VALIDATION_ERROR, fields
from pricer.schemas import ErrorBody, ValidationProblem

log = logging.getLogger("pricer.errors")
_encoder = msgspec.json.Encoder()


def error_body(error: PricerError, request_id: str) -> bytes:
    body = ErrorBody(
        error=error.message,
        error_code=error.code,
        details=error.details,
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
    return headers


class ErrorEnvelope:
    """Renders a PricerError raised below as its status and envelope, and any other exception as a
    logged 500 INTERNAL_ERROR; never a stack trace to the client."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except PricerError as error:
            if request_state(scope).response_started:
                raise
            self._log(scope, error)
            await self._send_error(scope, send, error)
        except Exception:
            state = request_state(scope)
            log.exception(
                "Unhandled error",
                extra=fields(request_id=state.request_id, endpoint=state.route_template),
            )
            if state.response_started:
                raise
            await self._send_error(scope, send, PricerError("Internal error"))

    @staticmethod
    def _log(scope: Scope, error: PricerError) -> None:
        state = request_state(scope)
        if isinstance(error, InvalidParameter):
            log.warning(
                VALIDATION_ERROR,
                extra=fields(
                    client_id=state.client_id,
                    endpoint=state.route_template,
                    request_id=state.request_id,
                    error=error.message,
                ),
            )
        elif isinstance(error, Unauthorized):
            log.error(
                AUTHENTICATION_ERROR,
                extra=fields(
                    reason=error.reason,
                    endpoint=state.route_template,
                    request_id=state.request_id,
                ),
            )

    @staticmethod
    async def _send_error(scope: Scope, send: Send, error: PricerError) -> None:
        body = error_body(error, request_state(scope).request_id)
        await send({"type": "http.response.start", "status": error.status, "headers": error_headers(error)})
        await send({"type": "http.response.body", "body": body})
