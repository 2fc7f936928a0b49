"""Authentication: `X-API-Key` (and, with a token verifier, `Authorization: Bearer <jwt>`) to a
Principal, and the route's scope check. Open routes (no scope) make no authentication attempt.

Every failure is counted here (`authentication_attempts_total`); the runbook's `Authentication error`
line is written, within a budget of lines a second, by the error edge (middleware/errors.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from pricer.auth.keys import KeyVerifier, Principal
from pricer.context import request_state
from pricer.errors import Forbidden, Unauthorized
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing


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
