"""`POST /api/v1/auth/token`: a valid API key for a short-lived bearer token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from pricer.auth.tokens import TokenService
from pricer.context import principal
from pricer.endpoints.common import json_response, utc_now
from pricer.errors import Unauthorized
from pricer.observability.metrics import Metrics
from pricer.schemas import TokenResponse


class AuthEndpoints:
    def __init__(self, tokens: TokenService, metrics: Metrics) -> None:
        self._tokens = tokens
        self._metrics = metrics

    async def token(self, request: Request) -> Response:
        if "x-api-key" not in request.headers:
            # Tokens are exchanged for keys only: a token cannot renew itself past its key's revocation.
            raise Unauthorized("missing")
        token = self._tokens.issue(principal(request.scope), utc_now())
        self._metrics.jwt_tokens_issued += 1
        return json_response(TokenResponse(access_token=token, expires_in=self._tokens.ttl_seconds))
