"""The request edge: the outermost step of every HTTP request, where its facts are set once and its
response is seen go out.

In order: the request id (a sane `X-Request-ID` echoed, else a new one), CORS (preflights answered), the
route (404/405 before any other work), the body limit, then the next step (admission and the endpoint).
Every response gets `X-Request-ID`, `X-Correlation-ID`, the security headers, the CORS headers and the
request bucket's RateLimit headers. Errors become the envelope of DESIGN §2.3 here, once: a PricerError
its status, anything else a logged 500, never a stack trace; a client gone while its body was read is
recorded as 499 (or as the 408 the server answered a stalled body), nothing sent. The status, seen as the
response starts, feeds the metrics, the slow-request line and the request span.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pricer.context import BODY_TIMED_OUT_KEY, RATE_DECISION_KEY, REQUEST_ID_KEY, UNMATCHED, acting_client
from pricer.errors import MethodNotAllowed, NotFound, PricerError
from pricer.ids import random_hex
from pricer.logs import BODY_TIMED_OUT, CLIENT_DISCONNECTED, SLOW_REQUEST, fields
from pricer.middleware.body_limit import limit_body
from pricer.middleware.cors import CorsPolicy
from pricer.middleware.errors import (
    CLIENT_CLOSED_REQUEST,
    REQUEST_TIMEOUT,
    ErrorLog,
    error_body,
    error_headers,
)
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing
from pricer.ratelimit.limits import rate_limit_headers
from pricer.routing import ApiRoute, RouteTable

_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
errors_log = logging.getLogger("pricer.errors")
requests_log = logging.getLogger("pricer.requests")


class _Response:
    """The response's way out: adds the edge's headers as it starts and records its status (500 stays if
    none ever starts)."""

    __slots__ = ("_headers", "_scope", "_send", "started", "status")

    def __init__(self, scope: Scope, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        self._scope = scope
        self._send = send
        self._headers = headers
        self.status = 500
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            headers = [*message.get("headers", ()), *self._headers]
            decision = self._scope.get(RATE_DECISION_KEY)
            if decision is not None and not (self.status == 429 and _has_rate_limit(headers)):
                # The request bucket's headers, unless a 429 of another bucket carries that bucket's own.
                headers += rate_limit_headers(decision)
            message["headers"] = headers
        await self._send(message)


def _has_rate_limit(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"ratelimit" for name, _ in headers)


class RequestEdge:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: RouteTable,
        cors: CorsPolicy,
        metrics: Metrics,
        tracing: Tracing,
        slow_request_ms: float,
    ) -> None:
        self.app = app
        self._routes = routes
        self._cors = cors
        self._metrics = metrics
        self._tracing = tracing
        self._slow_seconds = slow_request_ms / 1000.0
        self._errors = ErrorLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = b""
        for name, value in scope["headers"]:
            if name in (b"x-request-id", b"x-correlation-id") and _SANE_REQUEST_ID.fullmatch(value):
                request_id = value
                break
        if not request_id:
            request_id = random_hex(16).encode()
        scope[REQUEST_ID_KEY] = request_id.decode()
        headers = [(b"x-request-id", request_id), (b"x-correlation-id", request_id), *_SECURITY_HEADERS]
        preflight = False
        if self._cors.active:
            cors_headers, preflight = self._cors.headers(scope)
            headers += cors_headers
        response = _Response(scope, send, headers)
        template = UNMATCHED
        try:
            # A preflight is answered before the route match (any path): its template stays `unmatched`.
            route, allowed = (None, False) if preflight else self._routes.match(scope)
            if route is not None:
                # A known path with the wrong method is named by its template in logs and metrics too,
                # though no endpoint runs.
                template = route.path
            if self._tracing.enabled:
                method = scope["method"]
                with self._tracing.request_span(
                    method, {"http.request.method": method}, scope["headers"]
                ) as span:
                    await self._run(scope, receive, response, route, allowed, template, preflight)
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                    span.set_attribute("http.response.status_code", response.status)
            else:
                await self._run(scope, receive, response, route, allowed, template, preflight)
        finally:
            self._observe(scope, response.status, template, time.perf_counter() - started)

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        response: _Response,
        route: ApiRoute | None,
        allowed: bool,
        template: str,
        preflight: bool,
    ) -> None:
        """The request past the route match, its errors rendered."""
        if preflight:
            await response.send({"type": "http.response.start", "status": 204, "headers": []})
            await response.send({"type": "http.response.body", "body": b""})
            return
        try:
            if route is None:
                raise NotFound(f"No route for {scope['path']}")
            if not allowed:
                raise MethodNotAllowed(sorted(route.methods or ()))
            await self.app(scope, limit_body(scope, route.body_limit, receive), response.send)
        except PricerError as error:
            if response.started:
                raise
            self._errors.write(
                error, endpoint=template, request_id=scope[REQUEST_ID_KEY], client_id=acting_client(scope)
            )
            await self._send_error(scope, response, error)
        except ClientDisconnect:
            timed_out = bool(scope.get(BODY_TIMED_OUT_KEY))
            if not response.started:
                response.status = REQUEST_TIMEOUT if timed_out else CLIENT_CLOSED_REQUEST
            errors_log.info(
                BODY_TIMED_OUT if timed_out else CLIENT_DISCONNECTED,
                extra=fields(endpoint=template, request_id=scope[REQUEST_ID_KEY]),
            )
        except Exception:
            errors_log.exception(
                "Unhandled error", extra=fields(request_id=scope[REQUEST_ID_KEY], endpoint=template)
            )
            if response.started:
                raise
            await self._send_error(scope, response, PricerError("Internal error"))

    @staticmethod
    async def _send_error(scope: Scope, response: _Response, error: PricerError) -> None:
        body = error_body(error, scope[REQUEST_ID_KEY])
        await response.send(
            {"type": "http.response.start", "status": error.status, "headers": error_headers(error)}
        )
        await response.send({"type": "http.response.body", "body": body})

    def _observe(self, scope: Scope, status: int, template: str, elapsed: float) -> None:
        self._metrics.observe_request(scope["method"], template, status, elapsed)
        if elapsed >= self._slow_seconds:
            requests_log.warning(
                SLOW_REQUEST,
                extra=fields(
                    method=scope["method"],
                    endpoint=template,
                    status_code=status,
                    duration_ms=round(elapsed * 1000, 3),
                    client_id=acting_client(scope),
                    request_id=scope[REQUEST_ID_KEY],
                ),
            )
