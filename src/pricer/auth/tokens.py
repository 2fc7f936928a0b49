"""JWT access tokens (HS256, algorithm pinned) made and checked with joserfc, authlib's JOSE library.

A token carries the id of the key it was exchanged for; each use looks the key up again, so revoking the
key voids its tokens and the key's current scopes apply.

A correctly signed token is still refused when its lifetime (`exp - iat`) exceeds JWT_TTL_SECONDS, or when
it was issued in the future, beyond CLOCK_LEEWAY_SECONDS either way (replicas' clocks differ a little):
whoever holds the secret (a leak, another service sharing it) cannot mint long-lived tokens.
"""

from __future__ import annotations

import datetime as dt
import secrets

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import OctKey

from pricer.auth.keys import Principal
from pricer.errors import Unauthorized
from pricer.stores.protocols import KeyStore

ALGORITHMS = ["HS256"]
CLOCK_LEEWAY_SECONDS = 30
_MAX_TOKEN_LENGTH = 4096


class TokenService:
    def __init__(self, keys: KeyStore, *, secret: str, issuer: str, audience: str, ttl_seconds: int) -> None:
        self._keys = keys
        self._key = OctKey.import_key(secret.encode())
        self._issuer = issuer
        self._audience = audience
        self.ttl_seconds = ttl_seconds

    def issue(self, principal: Principal, now: dt.datetime) -> str:
        if principal.key_id is None:
            raise Unauthorized("missing")
        issued_at = int(now.timestamp())
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": principal.key_id,
            "client_id": principal.client_id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + self.ttl_seconds,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode({"alg": ALGORITHMS[0], "typ": "JWT"}, claims, self._key, algorithms=ALGORITHMS)

    async def verify(self, token: str, now: dt.datetime) -> Principal:
        if len(token) > _MAX_TOKEN_LENGTH:
            raise Unauthorized("invalid_token")
        try:
            decoded = jwt.decode(token, self._key, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                now=int(now.timestamp()),
                leeway=CLOCK_LEEWAY_SECONDS,
                iss={"essential": True, "value": self._issuer},
                aud={"essential": True, "value": self._audience},
                sub={"essential": True},
                exp={"essential": True},
                iat={"essential": True},
            ).validate(decoded.claims)
        except ExpiredTokenError:
            raise Unauthorized("expired") from None
        except (JoseError, ValueError, TypeError):
            raise Unauthorized("invalid_token") from None
        # Both are finite numbers here: the registry checked them (essential NumericDates).
        lifetime = decoded.claims["exp"] - decoded.claims["iat"]
        if lifetime > self.ttl_seconds + CLOCK_LEEWAY_SECONDS:
            raise Unauthorized("invalid_token")
        key_id = decoded.claims["sub"]
        record = await self._keys.get(key_id) if isinstance(key_id, str) else None
        if record is None:
            raise Unauthorized("invalid_token")
        if record.revoked_at is not None:
            raise Unauthorized("revoked")
        if record.expires_at <= now:
            raise Unauthorized("expired")
        return Principal(key_id=record.key_id, client_id=record.client_id, scopes=record.scopes)
