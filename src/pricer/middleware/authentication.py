"""Authentication: `X-API-Key` (and, with a token verifier, `Authorization: Bearer <jwt>`) to a
Principal, and the route's scope check. Open routes (no scope) make no authentication attempt.

Every failure is counted (`authentication_attempts_total`), but an unauthenticated flood must not write
one ERROR line per request (27 MB of log per 150k requests in issue 16): the runbook's `Authentication
error` line, written by the error edge, is let through at most AUTH_ERROR_LINES_PER_SECOND times a second
per app (one per process), and the next line let through says how many were left out (`suppressed=N`).
The decision is made here, per request, and handed to a filter on the error edge's logger through a
context variable (the request's task context), so that every app keeps its own budget.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.auth.keys import KeyVerifier, Principal
from pricer.context import request_state
from pricer.errors import Forbidden, Unauthorized
from pricer.logs import AUTHENTICATION_ERROR, FIELDS_ATTR
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing

AUTH_ERROR_LINES_PER_SECOND = 10
# The logger of the error edge (middleware/errors.py), which writes the `Authentication error` line.
ERROR_EDGE_LOGGER = "pricer.errors"
_SUPPRESS = -1
# This request's decision about its `Authentication error` line: _SUPPRESS, or the number of lines left
# out before it (0 when none). Unset outside a failed authentication.
_line_decision: contextvars.ContextVar[int] = contextvars.ContextVar("auth_error_line")


class AuthErrorLineBudget:
    """At most `per_second` lines in each second of the clock; counts the lines it refuses."""

    def __init__(
        self, per_second: int = AUTH_ERROR_LINES_PER_SECOND, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_second = per_second
        self._clock = clock
        self._second = -1
        self._used = 0
        self._suppressed = 0

    def take(self) -> int:
        """_SUPPRESS, or how many lines were left out since the last one let through."""
        second = int(self._clock())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self._per_second:
            self._suppressed += 1
            return _SUPPRESS
        self._used += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class _AuthErrorLineFilter(logging.Filter):
    """Applies the request's decision to its `Authentication error` record; other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != AUTHENTICATION_ERROR:
            return True
        decision = _line_decision.get(0)
        _line_decision.set(0)  # used once: a later line of this context (in-process callers) is its own
        if decision == _SUPPRESS:
            return False
        if decision > 0:
            fields = dict(getattr(record, FIELDS_ATTR, None) or {})
            fields["suppressed"] = decision
            setattr(record, FIELDS_ATTR, fields)
        return True


_LINE_FILTER = _AuthErrorLineFilter()


class TokenVerifier(Protocol):
    async def verify(self, token: str, now: dt.datetime) -> Principal: ...


class Authentication:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyVerifier,
        tokens: TokenVerifier | None = None,
        enabled: bool = True,
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self.app = app
        self._keys = keys
        self._tokens = tokens
        self._enabled = enabled
        self._attempts = metrics.auth_attempts
        self._tracing = tracing
        self._error_lines = AuthErrorLineBudget()
        logging.getLogger(ERROR_EDGE_LOGGER).addFilter(_LINE_FILTER)  # once: the same filter object

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = request_state(scope) if scope["type"] == "http" else None
        route = state.route if state is not None else None
        if state is None or route is None or route.required_scopes is None:
            await self.app(scope, receive, send)
            return
        if self._enabled:
            with self._tracing.span("authenticate"):
                try:
                    principal = await self._authenticate(scope)
                except Unauthorized as error:
                    self._attempts[error.reason] += 1
                    _line_decision.set(self._error_lines.take())
                    raise
            self._attempts["success"] += 1
            state.principal = principal
            state.client_id = principal.client_id
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        api_key: bytes | None = None
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value
            elif name == b"authorization":
                authorization = value
        now = dt.datetime.now(dt.UTC)
        if api_key is not None:
            return await self._keys.verify(api_key.decode("latin-1").strip(), now)
        if authorization is not None:
            scheme, _, credentials = authorization.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and self._tokens is not None and credentials.strip():
                return await self._tokens.verify(credentials.strip(), now)
            raise Unauthorized("invalid_token")
        raise Unauthorized("missing")


def current_principal(scope: Scope, *, acting_for: str | None = None) -> Principal:
    """The principal of an authenticated route's request.

    With authentication disabled (local development) it is a key-less principal with every scope that
    acts as the client the request names (DESIGN §2.4)."""
    state = request_state(scope)
    principal = state.principal
    if principal is None:
        return Principal(key_id=None, client_id=acting_for or "anonymous", scopes=frozenset(AuthScope))
    return principal


async def acting_principal(scope: Scope, client_id: str) -> Principal:
    """The principal a request acts as for `client_id` (403 when its key may not act for it).

    Without authentication the request is charged here, to the client it names (DESIGN §2.4)."""
    state = request_state(scope)
    if state.principal is None and state.limits is not None and state.rate_decision is None:
        await state.limits.charge_request(state, client_id)
    principal = current_principal(scope, acting_for=client_id)
    if not principal.may_act_for(client_id):
        raise Forbidden(
            "This key may not act for that client_id",
            details={"client_id": client_id},
        )
    request_state(scope).client_id = client_id
    return principal
