"""The facts of one request, kept in its ASGI scope. Each is set once, by the step that knows it, and
never changed: the request id (the request edge), the route (route match, under Starlette's own `route`
key), the principal (admission), the request bucket's decision (admission) and the client a request
acts for (admission, when the endpoint names it). The response status is not a fact of the scope: the
request edge, which sees the response start, keeps it."""

from __future__ import annotations

from starlette.types import Scope

from pricer.auth.keys import Principal
from pricer.models import Scope as AuthScope

REQUEST_ID_KEY = "pricer.request_id"
# Starlette's own key for the request's credentials (`request.auth`): a frozen Principal.
PRINCIPAL_KEY = "auth"
ACTING_FOR_KEY = "pricer.acting_for"
# The request bucket's Decision, whose RateLimit headers go on whatever response goes out (429 included).
RATE_DECISION_KEY = "pricer.rate_decision"
# Set in the scope by the HTTP protocol when it gave up on a stalled request body and answered 408 itself
# (the application only sees the client gone): the error edge then records 408, not 499.
BODY_TIMED_OUT_KEY = "pricer.body_timed_out"

UNMATCHED = "unmatched"
EVERY_SCOPE = frozenset(AuthScope)


def request_id(scope: Scope) -> str:
    value: str = scope[REQUEST_ID_KEY]
    return value


def route_template(scope: Scope) -> str:
    """The matched route's template (`unmatched` before, or without, a match)."""
    route = scope.get("route")
    return UNMATCHED if route is None else str(route.path)


def principal(scope: Scope) -> Principal:
    """Who an authenticated route's request acts as.

    With authentication disabled (local development) it is a key-less principal with every scope that
    acts as the client the request names (DESIGN §2.4)."""
    admitted: Principal | None = scope.get(PRINCIPAL_KEY)
    if admitted is not None:
        return admitted
    return Principal(key_id=None, client_id=scope.get(ACTING_FOR_KEY) or "anonymous", scopes=EVERY_SCOPE)


def acting_client(scope: Scope) -> str | None:
    """The client a request acts for, for the logs: the one it named, else its key's, else None."""
    named: str | None = scope.get(ACTING_FOR_KEY)
    if named is not None:
        return named
    admitted: Principal | None = scope.get(PRINCIPAL_KEY)
    return admitted.client_id if admitted is not None else None
