"""Matches the route before any other work: unknown paths are 404 (and wrong methods 405) before
authentication, and the route template is known to every later step (logs, metrics)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette._utils import get_route_path
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.context import request_state
from pricer.errors import MethodNotAllowed, NotFound
from pricer.routing import ApiRoute


class RouteMatch:
    def __init__(self, app: ASGIApp, routes: Sequence[ApiRoute]) -> None:
        self.app = app
        self._routes = tuple(routes)
        # Paths without parameters are looked up in one step, where the ordered scan would find the same
        # route first (no earlier route's pattern matches that path).
        self._static: dict[str, ApiRoute] = {}
        for index, route in enumerate(self._routes):
            if route.param_convertors or route.path in self._static:
                continue
            if not any(earlier.path_regex.match(route.path) for earlier in self._routes[:index]):
                self._static[route.path] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = self._static.get(get_route_path(scope))
        if static is not None:
            scope["endpoint"] = static.endpoint
            scope["path_params"] = {}
            if static.methods and scope["method"] not in static.methods:
                request_state(scope).route_template = static.path
                raise MethodNotAllowed(sorted(static.methods))
            self._select(scope, static)
            await self.app(scope, receive, send)
            return
        partial: ApiRoute | None = None
        for route in self._routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope.update(child_scope)
                self._select(scope, route)
                await self.app(scope, receive, send)
                return
            if match is Match.PARTIAL and partial is None:
                partial = route
        if partial is not None:
            # The path is known: logs and metrics name its template, though no endpoint runs.
            request_state(scope).route_template = partial.path
            raise MethodNotAllowed(sorted(partial.methods or ()))
        raise NotFound(f"No route for {scope['path']}")

    @staticmethod
    def _select(scope: Scope, route: ApiRoute) -> None:
        state = request_state(scope)
        state.route = route
        state.route_template = route.path
        scope["route"] = route


class Dispatch:
    """The innermost app: runs the matched route's endpoint."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = request_state(scope).route
        assert route is not None, "RouteMatch runs before Dispatch"
        await route.app(scope, receive, send)
