"""Authorization: the route's scope, checked after the rate limit so that refused requests are charged
too (every authenticated request costs a token, DESIGN §2.5)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.context import request_state
from pricer.errors import Forbidden


class Authorization:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = request_state(scope)
            route = state.route
            principal = state.principal
            needed = route.required_scopes if route is not None else None
            if needed is not None and principal is not None and not any(map(principal.allows, needed)):
                names = sorted(scope.value for scope in needed)
                raise Forbidden(
                    f"This key lacks the scope this route needs ({' or '.join(names)})",
                    details={"required_scopes": names},
                )
        await self.app(scope, receive, send)
