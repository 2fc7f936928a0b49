"""Routes that carry what the middlewares need to know before the endpoint runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette._utils import get_route_path
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
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

    def forget_body(self) -> None:
        """Let go of the body read: a batch's (up to MAX_BATCH_BODY_BYTES) is not needed once decoded, while
        the batch is priced and answered. `body()` must not be called again."""
        self.__dict__.pop("_body", None)


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


class RouteTable:
    """The routes in order, matched before any other work: unknown paths are 404 (and wrong methods 405)
    before authentication, and the route template is known to every later step (logs, metrics)."""

    def __init__(self, routes: Sequence[ApiRoute]) -> None:
        self.routes = tuple(routes)
        # Paths without parameters are looked up in one step, where the ordered scan would find the same
        # route first (no earlier route's pattern matches that path).
        self._static: dict[str, ApiRoute] = {}
        for index, route in enumerate(self.routes):
            if route.param_convertors or route.path in self._static:
                continue
            if not any(earlier.path_regex.match(route.path) for earlier in self.routes[:index]):
                self._static[route.path] = route

    def match(self, scope: Scope) -> tuple[ApiRoute | None, bool]:
        """(the route of the request's path or None, whether it allows the method). A full match is set
        in the scope (`route`, `endpoint`, `path_params`), once."""
        static = self._static.get(get_route_path(scope))
        if static is not None:
            if static.methods and scope["method"] not in static.methods:
                return static, False
            scope["endpoint"] = static.endpoint
            scope["path_params"] = {}
            scope["route"] = static
            return static, True
        partial: ApiRoute | None = None
        for route in self.routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                scope["route"] = route
                return route, True
            if match is Match.PARTIAL and partial is None:
                partial = route
        return partial, False
