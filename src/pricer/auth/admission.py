"""Admission: who a request is (X-API-Key or Bearer JWT), whether it may use its route (the route's
scopes) and act for the client it names, and the request bucket's charge, in one object.

The admission middleware calls `admit` once per request of a route with scopes; it sets the frozen
Principal and the request bucket's decision in the scope, once. The quote endpoints call `act_for` with
the `client_id` of their body: the key's right to act for it (403), and, with authentication disabled,
the charge to that client (DESIGN §2.4).

Every authentication failure is counted here (`authentication_attempts_total`); the runbook's
`Authentication error` line is written, within a budget of lines a second, by the error edge.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from starlette.types import Scope

from pricer.auth.internal import HEADER_BYTES as INTERNAL_CREDENTIAL_HEADER
from pricer.auth.internal import InternalCredentials
from pricer.auth.keys import KeyVerifier, Principal
from pricer.context import ACTING_FOR_KEY, EVERY_SCOPE, PRINCIPAL_KEY, RATE_DECISION_KEY, REQUEST_ID_KEY
from pricer.errors import Forbidden, Unauthorized
from pricer.models import Scope as AuthScope
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing
from pricer.ratelimit.limits import ClientLimits


class TokenVerifier(Protocol):
    async def verify(self, token: str, now: dt.datetime) -> Principal: ...


class Admission:
    def __init__(
        self,
        *,
        keys: KeyVerifier,
        tokens: TokenVerifier | None,
        authenticate: bool,
        limits: ClientLimits | None,
        metrics: Metrics,
        tracing: Tracing,
        internal: InternalCredentials | None = None,
    ) -> None:
        self._keys = keys
        # A backend (ROLE=calculation or data) admits only the gateway's signed credential: the gateway
        # authenticated the client and charged its request bucket; the principal comes with the call.
        self._internal = internal
        self._tokens = tokens
        self._authenticate = authenticate
        self._limits = limits
        self._attempts = metrics.auth_attempts
        self._tracing = tracing

    async def admit(self, scope: Scope, needed: frozenset[AuthScope]) -> None:
        """Authenticate, charge the key's client and check the route's scopes, in this order: a refused
        scope is charged too (every authenticated request costs a token, DESIGN §2.5)."""
        if self._internal is not None:
            self._admit_internal(scope, needed)
            return
        if not self._authenticate:
            return  # local development: the endpoint names the client to charge (act_for)
        try:
            if self._tracing.enabled:
                with self._tracing.span("authenticate"):
                    admitted = await self._principal(scope)
            else:  # no span to enter and leave on the hot path when tracing is off
                admitted = await self._principal(scope)
        except Unauthorized as error:
            self._attempts[error.reason] += 1
            raise
        self._attempts["success"] += 1
        scope[PRINCIPAL_KEY] = admitted
        if self._limits is not None:
            await self._charge(scope, admitted.client_id)
        if not any(map(admitted.allows, needed)):
            _refuse_scope(needed)

    def _admit_internal(self, scope: Scope, needed: frozenset[AuthScope]) -> None:
        assert self._internal is not None
        header = None
        for name, value in scope["headers"]:
            if name == INTERNAL_CREDENTIAL_HEADER:
                header = value
                break
        try:
            admitted = self._internal.verify(header, scope[REQUEST_ID_KEY])
        except Unauthorized as error:
            self._attempts[error.reason] += 1
            raise
        if admitted is None:
            return  # the gateway authenticates no one: act_for charges the client the request names
        scope[PRINCIPAL_KEY] = admitted
        if not any(map(admitted.allows, needed)):  # the gateway checked it; a second look costs nothing
            _refuse_scope(needed)

    async def act_for(self, scope: Scope, client_id: str) -> Principal:
        """The principal of an admitted request that acts for `client_id` (403 when its key may not).

        Without authentication the request acts as, and is charged to, the client it names (DESIGN §2.4)."""
        admitted: Principal | None = scope.get(PRINCIPAL_KEY)
        if admitted is None:
            if self._limits is not None:
                await self._charge(scope, client_id)
            scope[ACTING_FOR_KEY] = client_id
            return Principal(key_id=None, client_id=client_id, scopes=EVERY_SCOPE)
        if not admitted.may_act_for(client_id):
            raise Forbidden("This key may not act for that client_id", details={"client_id": client_id})
        scope[ACTING_FOR_KEY] = client_id
        return admitted

    async def _charge(self, scope: Scope, client_id: str) -> None:
        assert self._limits is not None
        decision = await self._limits.charge_request(client_id)
        scope[RATE_DECISION_KEY] = decision  # the RateLimit headers of whatever response goes out
        if not decision.allowed:
            self._limits.refuse(scope, client_id, decision, "requests")

    async def _principal(self, scope: Scope) -> Principal:
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


def _refuse_scope(needed: frozenset[AuthScope]) -> None:
    names = sorted(scope.value for scope in needed)
    raise Forbidden(
        f"This key lacks the scope this route needs ({' or '.join(names)})",
        details={"required_scopes": names},
    )
