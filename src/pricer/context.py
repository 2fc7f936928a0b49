"""Per-request state shared by the middlewares and endpoints, kept in the ASGI scope."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Scope

if TYPE_CHECKING:
    from pricer.auth.keys import Principal
    from pricer.middleware.rate_limit import ClientLimits
    from pricer.ratelimit.buckets import Decision
    from pricer.routing import ApiRoute

STATE_KEY = "pricer.state"
# Set in the scope by the HTTP protocol when it gave up on a stalled request body and answered 408 itself
# (the application only sees the client gone): the error edge then records 408, not 499.
BODY_TIMED_OUT_KEY = "pricer.body_timed_out"


class RequestState:
    __slots__ = (
        "client_id",
        "limits",
        "principal",
        "rate_decision",
        "request_id",
        "response_started",
        "route",
        "route_template",
        "status",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.route: ApiRoute | None = None
        self.route_template = "unmatched"
        self.principal: Principal | None = None
        self.client_id: str | None = None
        self.limits: ClientLimits | None = None  # set on limited routes
        self.rate_decision: Decision | None = None  # the request bucket's decision, for the headers
        # Set by RequestContext as the response starts; 500 stays if none ever does.
        self.status = 500
        self.response_started = False


def request_state(scope: Scope) -> RequestState:
    state: RequestState = scope[STATE_KEY]
    return state
