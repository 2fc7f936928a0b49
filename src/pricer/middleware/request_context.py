"""Request id, correlation id and security headers on every response."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pricer.context import STATE_KEY, RequestState
from pricer.ids import random_hex
from pricer.middleware.rate_limit import rate_limit_headers

_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


class RequestContext:
    """Creates the request's state (and records the response status in it), echoes a sane
    `X-Request-ID` (else makes one) as both `X-Request-ID` and `X-Correlation-ID`, and adds the security
    headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._static_headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for name, value in scope["headers"]:
            if name in (b"x-request-id", b"x-correlation-id") and _SANE_REQUEST_ID.fullmatch(value):
                request_id = value
                break
        if not request_id:
            request_id = random_hex(16).encode()
        state = RequestState(request_id.decode())
        scope[STATE_KEY] = state
        extra = [(b"x-request-id", request_id), (b"x-correlation-id", request_id), *self._static_headers]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The one place that sees the status: telemetry and the error edge read it from the state.
                state.status = message["status"]
                state.response_started = True
                headers = [*message.get("headers", ()), *extra]
                if state.rate_decision is not None:
                    headers += rate_limit_headers(state.rate_decision)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
