"""Per-request metrics, the slow-request log and the request span (status read from the request state,
which RequestContext, outside this, fills as the response starts)."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.context import request_state
from pricer.logs import SLOW_REQUEST, fields
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing

log = logging.getLogger("pricer.requests")


class RequestTelemetry:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, tracing: Tracing, slow_request_ms: float) -> None:
        self.app = app
        self._metrics = metrics
        self._tracing = tracing
        self._slow_seconds = slow_request_ms / 1000.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = request_state(scope)
        try:
            if self._tracing.enabled:
                with self._tracing.span(scope["method"], {"http.request.method": scope["method"]}) as span:
                    await self.app(scope, receive, send)
                    span.update_name(f"{scope['method']} {state.route_template}")
                    span.set_attribute("http.route", state.route_template)
                    span.set_attribute("http.response.status_code", state.status)
            else:
                await self.app(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - started
            status = state.status
            self._metrics.observe_request(scope["method"], state.route_template, status, elapsed)
            if elapsed >= self._slow_seconds:
                log.warning(
                    SLOW_REQUEST,
                    extra=fields(
                        method=scope["method"],
                        endpoint=state.route_template,
                        status_code=status,
                        duration_ms=round(elapsed * 1000, 3),
                        client_id=state.client_id,
                        request_id=state.request_id,
                    ),
                )
