"""Routes that carry what the middlewares need to know before the endpoint runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.models import Scope as AuthScope
from pricer.validation import reject_unknown_query_params

Handler = Callable[[Request], Awaitable[Response]]


class ApiRequest(Request):
    """A Starlette request whose `body()` gathers the messages directly (no async generator per call)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            chunks: list[bytes] = []
            while True:
                message = await self._receive()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
                elif message["type"] == "http.disconnect":
                    raise ClientDisconnect()
            self._stream_consumed = True
            self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body


def asgi_endpoint(handler: Handler, query_params: Callable[[str], frozenset[str]] | None = None) -> ASGIApp:
    """An ASGI app from `handler(request) -> response`; errors propagate to the error edge.

    With `query_params(method)` (which parameters the route defines for the method), any other query
    parameter is a 400 naming it, the same on every route that says so."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = ApiRequest(scope, receive)
        if query_params is not None and scope.get("query_string"):
            reject_unknown_query_params(request.query_params.keys(), query_params(scope["method"]))
        response = await handler(request)
        await response(scope, receive, send)

    return app


class ApiRoute(Route):
    """A route with the scopes that admit a request (None: an open route) and its body size limit."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        methods: Sequence[str],
        scope: AuthScope | frozenset[AuthScope] | None,
        body_limit: int,
        name: str | None = None,
        summary: str = "",
        request_body: Any = None,
        request_media: Sequence[str] = ("application/json",),
        query: Any = None,
        responses: Mapping[int, Any] | None = None,
    ) -> None:
        super().__init__(path, handler, methods=list(methods), name=name or handler.__name__)
        # Any one of these scopes admits a request; None makes an open route.
        self.required_scopes: frozenset[AuthScope] | None = (
            frozenset({scope}) if isinstance(scope, AuthScope) else scope
        )
        # The API's routes refuse a query parameter they do not define; the open routes (health, metrics,
        # docs) ignore the query string, as probes and scrapers may add their own.
        self.app = asgi_endpoint(handler, self.query_params) if scope is not None else asgi_endpoint(handler)
        self.body_limit = body_limit
        # What the OpenAPI document says of this route (types are msgspec Structs).
        self.summary = summary
        self.request_body = request_body
        self.request_media = tuple(request_media)
        self.query = query
        self.responses = dict(responses or {})

    def query_params(self, method: str) -> frozenset[str]:
        """The query parameters defined for `method`: the query Struct's fields; a route whose query and
        body are the same Struct (one request, two forms) reads the query on GET and HEAD only."""
        if self.query is None or (self.query is self.request_body and method not in ("GET", "HEAD")):
            return frozenset()
        return frozenset(self.query.__struct_fields__)
