"""The admission step: a request of a route with scopes is authenticated, charged and authorized (one
call of the Admission object) before its endpoint runs; open routes make no authentication attempt."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from pricer.auth.admission import Admission
from pricer.routing import ApiRoute


class Admit:
    """The innermost step: admission, then the matched route's endpoint."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: ApiRoute = scope["route"]
        if route.required_scopes is not None:
            await self._admission.admit(scope, route.required_scopes)
        await route.app(scope, receive, send)
