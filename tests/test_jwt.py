"""Bearer tokens (DESIGN §2.4): exchanged for an API key, HS256 pinned, claims checked, revocable."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from pricer.auth.keys import parse_key
from pricer.settings import DEV_JWT_SECRET_KEY, Settings
from tests.conftest import Engine, make_settings, started_app

pytestmark = pytest.mark.anyio

DEFAULTS = Settings()
ISSUER = DEFAULTS.jwt_issuer
AUDIENCE = DEFAULTS.jwt_audience
SECRET = OctKey.import_key(DEV_JWT_SECRET_KEY.encode())
QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
UNAUTHORIZED_BODY = {
    "status": "error",
    "error": "Missing or invalid credentials",
    "error_code": "UNAUTHORIZED",
    "details": None,
}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(key_id: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": key_id,
        "client_id": "demo_client",
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": "test",
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign(claims: dict[str, Any], *, alg: str = "HS256", key: OctKey = SECRET) -> str:
    return jwt.encode({"alg": alg, "typ": "JWT"}, claims, key, algorithms=[alg])


def key_id_of(api_key: str) -> str:
    parsed = parse_key(api_key)
    assert parsed is not None
    return parsed[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_token(engine: Engine, api_key: str) -> str:
    response = await engine.client.post("/api/v1/auth/token", headers={"X-API-Key": api_key})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


def assert_unauthorized(response: Any) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert {k: v for k, v in body.items() if k != "request_id"} == UNAUTHORIZED_BODY
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_exchange_a_key_for_a_token(engine: Engine) -> None:
    response = await engine.client.post("/api/v1/auth/token", headers=engine.as_client())
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    decoded = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert decoded.header["alg"] == "HS256"
    claims = decoded.claims
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == key_id_of(engine.keys.client_key)
    assert claims["exp"] - claims["iat"] == 900
    assert abs(claims["iat"] - time.time()) < 60
    assert engine.keys.client_key not in body["access_token"]


async def test_token_works_with_the_keys_scopes(engine: Engine) -> None:
    token = await get_token(engine, engine.keys.client_key)
    rate = await engine.client.get("/api/v1/rates/AAPL", headers=bearer(token))
    assert rate.status_code == 200, rate.text
    quote = await engine.client.post("/api/v1/calculate-locate", json=QUOTE, headers=bearer(token))
    assert quote.status_code == 200, quote.text
    quote_id = quote.json()["quote_id"]
    assert (await engine.client.get(f"/api/v1/quotes/{quote_id}", headers=bearer(token))).status_code == 200
    # The key's limits: not an admin, and acts only for its own client.
    admin = await engine.client.put("/api/v1/admin/volatility", json={"value": 20}, headers=bearer(token))
    assert admin.status_code == 403
    other = await engine.client.post(
        "/api/v1/calculate-locate", json={**QUOTE, "client_id": "xyz123"}, headers=bearer(token)
    )
    assert other.status_code == 403
    # An admin key's token acts as an admin.
    admin_token = await get_token(engine, engine.keys.admin_key)
    put = await engine.client.put("/api/v1/admin/volatility", json={"value": 20}, headers=bearer(admin_token))
    assert put.status_code == 200, put.text


async def test_a_token_cannot_get_a_token(engine: Engine) -> None:
    token = await get_token(engine, engine.keys.client_key)
    assert_unauthorized(await engine.client.post("/api/v1/auth/token", headers=bearer(token)))
    assert_unauthorized(await engine.client.post("/api/v1/auth/token"))


async def test_a_hand_made_token_with_the_right_secret_and_claims_is_accepted(engine: Engine) -> None:
    """The control for the refusals below: each of them breaks exactly one thing of this token."""
    token = sign(claims_for(key_id_of(engine.keys.client_key)))
    assert (await engine.client.get("/api/v1/rates/AAPL", headers=bearer(token))).status_code == 200


async def test_tokens_within_the_ttl_and_the_clock_leeway_are_accepted(engine: Engine) -> None:
    """The controls of the lifetime cap: a shorter lifetime, and a replica's clock a little ahead."""
    kid = key_id_of(engine.keys.client_key)
    now = int(time.time())
    for claims in (
        claims_for(kid, exp=now + 60),
        claims_for(kid, iat=now - 100, exp=now + 900 - 100 + 20),
        claims_for(kid, iat=now + 10, nbf=now + 10, exp=now + 10 + 900),
    ):
        response = await engine.client.get("/api/v1/rates/AAPL", headers=bearer(sign(claims)))
        assert response.status_code == 200, (claims, response.text)


async def test_the_lifetime_cap_follows_jwt_ttl_seconds() -> None:
    """A token of the default 15 minutes is refused by an engine configured for 5 (signed by its secret)."""
    app = await started_app(make_settings(JWT_TTL_SECONDS="300"))
    assert app.demo_keys is not None
    kid = key_id_of(app.demo_keys.client_key)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine.test"
    ) as client:
        issued = await client.post("/api/v1/auth/token", headers={"X-API-Key": app.demo_keys.client_key})
        assert issued.json()["expires_in"] == 300
        fresh = await client.get("/api/v1/rates/AAPL", headers=bearer(issued.json()["access_token"]))
        assert fresh.status_code == 200, fresh.text
        assert_unauthorized(await client.get("/api/v1/rates/AAPL", headers=bearer(sign(claims_for(kid)))))


def alg_none(claims: dict[str, Any]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    return f"{header}.{payload}."


def tamper_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64(bytes(raw))}"


def tamper_payload(token: str) -> str:
    header, _, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    claims["client_id"] = "xyz123"
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


BAD_TOKENS = {
    "tampered signature": lambda kid: tamper_signature(sign(claims_for(kid))),
    "tampered payload": lambda kid: tamper_payload(sign(claims_for(kid))),
    "alg none": lambda kid: alg_none(claims_for(kid)),
    "alg none, empty signature stripped": lambda kid: alg_none(claims_for(kid))[:-1],
    "HS384 with the same secret": lambda kid: sign(claims_for(kid), alg="HS384"),
    "HS512 with the same secret": lambda kid: sign(claims_for(kid), alg="HS512"),
    "another secret": lambda kid: sign(
        claims_for(kid), key=OctKey.import_key(b"another-secret-of-a-decent-length-0123456789")
    ),
    "wrong issuer": lambda kid: sign(claims_for(kid, iss="someone-else")),
    "wrong audience": lambda kid: sign(claims_for(kid, aud="another-api")),
    "no issuer": lambda kid: sign(claims_for(kid, iss=None)),
    "no audience": lambda kid: sign(claims_for(kid, aud=None)),
    "no expiry": lambda kid: sign(claims_for(kid, exp=None)),
    "no subject": lambda kid: sign(claims_for(kid, sub=None)),
    "expired": lambda kid: sign(
        claims_for(kid, iat=int(time.time()) - 2000, nbf=int(time.time()) - 2000, exp=int(time.time()) - 1000)
    ),
    "not yet valid": lambda kid: sign(claims_for(kid, nbf=int(time.time()) + 600)),
    # Issue 16: a correctly signed token living longer than JWT_TTL_SECONDS (900) was accepted.
    "lifetime of a day": lambda kid: sign(claims_for(kid, exp=int(time.time()) + 86_400)),
    "lifetime over the TTL and leeway": lambda kid: sign(
        claims_for(kid, iat=int(time.time()) - 100, exp=int(time.time()) + 900 - 100 + 31)
    ),
    "issued in the future": lambda kid: sign(
        claims_for(kid, iat=int(time.time()) + 120, nbf=None, exp=int(time.time()) + 600)
    ),
    "unknown key id": lambda kid: sign(claims_for("zzzzzzzzzzzz")),
    "garbage": lambda kid: "not.a.jwt",
    "one segment": lambda kid: "eyJhbGciOiJIUzI1NiJ9",
    "oversized": lambda kid: sign(claims_for(kid, pad="x" * 5000)),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_refused(engine: Engine, case: str) -> None:
    token = BAD_TOKENS[case](key_id_of(engine.keys.client_key))
    assert_unauthorized(await engine.client.get("/api/v1/rates/AAPL", headers=bearer(token)))
    assert_unauthorized(
        await engine.client.post("/api/v1/calculate-locate", json=QUOTE, headers=bearer(token))
    )


@pytest.mark.parametrize(
    "authorization",
    ["Basic xxx", "Basic ZGVtbzpkZW1v", "Bearer", "Bearer ", "bearer", "Token abc", "garbage"],
)
async def test_other_authorization_schemes_are_refused(engine: Engine, authorization: str) -> None:
    response = await engine.client.get("/api/v1/rates/AAPL", headers={"Authorization": authorization})
    assert_unauthorized(response)


async def test_revoking_the_key_voids_its_tokens(engine: Engine) -> None:
    issued = await engine.client.post(
        "/api/v1/admin/keys", json={"client_id": "demo_client"}, headers=engine.as_admin()
    )
    assert issued.status_code == 201, issued.text
    api_key, key_id = issued.json()["api_key"], issued.json()["key_id"]
    token = await get_token(engine, api_key)
    assert (await engine.client.get("/api/v1/rates/AAPL", headers=bearer(token))).status_code == 200

    revoked = await engine.client.delete(f"/api/v1/admin/keys/{key_id}", headers=engine.as_admin())
    assert revoked.status_code == 204
    assert_unauthorized(await engine.client.get("/api/v1/rates/AAPL", headers=bearer(token)))
    assert_unauthorized(await engine.client.get("/api/v1/rates/AAPL", headers={"X-API-Key": api_key}))
    assert_unauthorized(await engine.client.post("/api/v1/auth/token", headers={"X-API-Key": api_key}))
    # Other keys of the same client, and their tokens, are untouched.
    other = await get_token(engine, engine.keys.client_key)
    assert (await engine.client.get("/api/v1/rates/AAPL", headers=bearer(other))).status_code == 200
