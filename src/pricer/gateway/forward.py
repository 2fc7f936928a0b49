"""An admitted request passed on to the backend service that answers it, and its answer passed back.

The gateway has done what it owns (request id, CORS, route match, body limit, authentication, the request
bucket, the route's scopes); the backend does the rest (decoding, validation, the key's right to act for
the body's client_id, the positions bucket, pricing, audit) with the same code as ROLE=all, so every body,
status and figure is the same. Bodies cross the hop as the client sent them and come back as the service
wrote them (JSON or msgpack, whichever the client chose): the gateway neither decodes nor re-encodes them,
which is cheaper than any re-encoding on the hop (benchmarks/bench_roles.py measures the hop's cost).

The call carries the request id (`X-Request-ID`), the trace (`traceparent`, one trace across the
services) and the gateway's signed internal credential stating the principal it admitted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import msgspec
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from pricer.auth.internal import HEADER as CREDENTIAL_HEADER
from pricer.auth.internal import InternalCredentials
from pricer.context import PRINCIPAL_KEY, acting_client, request_id, route_template
from pricer.endpoints.common import EncodedResponse
from pricer.gateway.service import ServiceClient
from pricer.logs import RATE_LIMIT_EXCEEDED, VALIDATION_ERROR, fields
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing

Handler = Callable[[Request], Awaitable[Response]]

# What of the client's request the service needs to answer as ROLE=all would.
_FORWARDED = frozenset({b"content-type", b"content-encoding", b"accept"})
# What of the service's answer the client gets; the gateway's own edge adds the request id, the security
# and CORS headers and, when it charged the request bucket, the RateLimit headers.
_RELAYED = frozenset(
    {
        b"content-type",
        b"retry-after",
        b"www-authenticate",
        b"allow",
        b"ratelimit",
        b"ratelimit-policy",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
    }
)
errors_log = logging.getLogger("pricer.errors")
limits_log = logging.getLogger("pricer.ratelimit")
_TRACE_CONTEXT = frozenset({b"traceparent", b"tracestate"})
_propagator = TraceContextTextMapPropagator()


class RelayedResponse(EncodedResponse):
    """The service's answer as the client gets it: its body and the headers relayed, already encoded (no
    header handling of Starlette's `Response` on every forwarded call)."""

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.body = body
        self.background = None
        self.raw_headers = raw_headers


class Forwarder:
    def __init__(
        self, service: ServiceClient, credentials: InternalCredentials, tracing: Tracing, metrics: Metrics
    ) -> None:
        self._service = service
        self._credentials = credentials
        self._tracing = tracing
        self._metrics = metrics

    def handler(self, seconds: float, *, reads_repeatable: bool = True) -> Handler:
        """The endpoint of a forwarded route, with the deadline of its calls. `reads_repeatable` False: a
        GET of this route is not sent again after a broken answer (it prices: a quote would be recorded
        twice)."""

        async def forward(request: Request) -> Response:
            return await self.forward(request, seconds, reads_repeatable=reads_repeatable)

        forward.__name__ = f"forward_to_{self._service.name.replace('-', '_')}"
        return forward

    async def forward(self, request: Request, seconds: float, *, reads_repeatable: bool = True) -> Response:
        scope = request.scope
        method = scope["method"]
        # HEAD is GET without the body: the server leaves the body out, as for the routes it answers itself.
        outbound_method = "GET" if method == "HEAD" else method
        body = b"" if outbound_method == "GET" else await request.body()
        retry_sent = outbound_method == "GET" and reads_repeatable
        rid = request_id(scope)
        headers: dict[str, str] = {
            "x-request-id": rid,
            CREDENTIAL_HEADER: self._credentials.sign(scope.get(PRINCIPAL_KEY), rid),
        }
        tracing = self._tracing.enabled
        for name, value in scope["headers"]:
            # Without tracing here, the client's trace context goes on to the service untouched.
            if name in _FORWARDED or (not tracing and name in _TRACE_CONTEXT):
                # The first of a repeated header, as ROLE=all reads it (Content-Type, Accept).
                headers.setdefault(name.decode(), value.decode("latin-1"))
        raw_path: bytes | None = scope.get("raw_path")
        target = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
        if scope.get("query_string"):
            target = f"{target}?{scope['query_string'].decode('latin-1')}"
        if tracing:
            with self._tracing.span(
                f"{outbound_method} {self._service.name}", {"peer.service": self._service.name}
            ):
                _propagator.inject(headers)
                answer = await self._service.call(
                    outbound_method,
                    target,
                    headers=headers,
                    body=body,
                    seconds=seconds,
                    retry_sent=retry_sent,
                )
        else:
            answer = await self._service.call(
                outbound_method, target, headers=headers, body=body, seconds=seconds, retry_sent=retry_sent
            )
        if answer.status in (400, 429):
            self._log_refusal(scope, answer.status, answer.body)
        status = answer.status
        relayed = [(name, value) for name, value in answer.raw_headers if name in _RELAYED]
        if not (status < 200 or status in (204, 304)):  # the statuses with a body, as Starlette's Response
            relayed.append((b"content-length", str(len(answer.body)).encode()))
        return RelayedResponse(answer.body, status, relayed)

    def _log_refusal(self, scope: Scope, status: int, body: bytes) -> None:
        """The runbook greps the gateway's log for `Validation error` and `Rate limit exceeded` and reads
        `rate_limit_exceeded_total` from its metrics: a refusal the service decided (a bad body, the
        positions bucket) is written and counted here too, as ROLE=all would."""
        try:
            error = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(error, dict):
            return
        endpoint, rid = route_template(scope), request_id(scope)
        if status == 400:
            errors_log.warning(
                VALIDATION_ERROR,
                extra=fields(
                    client_id=acting_client(scope),
                    endpoint=endpoint,
                    request_id=rid,
                    error=error.get("error"),
                ),
            )
        elif error.get("error_code") == "RATE_LIMIT_EXCEEDED":
            self._metrics.rate_limit_exceeded += 1
            details = error.get("details") or {}
            limits_log.warning(
                RATE_LIMIT_EXCEEDED,
                extra=fields(
                    client_id=acting_client(scope),
                    endpoint=endpoint,
                    request_id=rid,
                    bucket=details.get("bucket"),
                    retry_after=details.get("retry_after"),
                ),
            )
