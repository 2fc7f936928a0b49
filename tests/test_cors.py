"""CORS (`CORS_ORIGINS`): an allow-list, echoed origins with credentials, `*` without credentials, and
nothing at all for an origin not on the list."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from pricer.app import PricerApp
from tests.conftest import make_settings, started_app

pytestmark = pytest.mark.anyio

ALLOWED = "https://desk.example.com,https://ops.example.com"
DESK = "https://desk.example.com"
OPS = "https://ops.example.com"


@asynccontextmanager
async def engine(**env: str) -> AsyncIterator[tuple[httpx.AsyncClient, PricerApp]]:
    app = await started_app(make_settings(**env))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
        yield client, app


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def listed(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


def preflight(origin: str, method: str = "POST", headers: str = "X-API-Key, Content-Type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


def client_key(app: PricerApp) -> dict[str, str]:
    assert app.demo_keys is not None
    return {"X-API-Key": app.demo_keys.client_key}


async def test_preflight_from_an_allowed_origin() -> None:
    async with engine(CORS_ORIGINS=ALLOWED) as (client, _):
        for origin in (DESK, OPS):
            response = await client.options("/api/v1/calculate-locate", headers=preflight(origin))
            assert response.status_code == 204
            assert response.content == b""
            h = response.headers
            assert h["access-control-allow-origin"] == origin
            assert h["access-control-allow-credentials"] == "true"
            assert {"get", "post", "put", "delete", "options"} <= listed(h["access-control-allow-methods"])
            assert {"x-api-key", "authorization", "content-type", "x-request-id"} <= listed(
                h["access-control-allow-headers"]
            )
            assert int(h["access-control-max-age"]) > 0
            assert "origin" in listed(h.get("vary", ""))


async def test_actual_request_from_an_allowed_origin() -> None:
    async with engine(CORS_ORIGINS=ALLOWED, RATE_LIMIT_PER_MINUTE="60") as (client, app):
        response = await client.get("/api/v1/rates/AAPL", headers={**client_key(app), "Origin": DESK})
        assert response.status_code == 200
        h = response.headers
        assert h["access-control-allow-origin"] == DESK
        assert h["access-control-allow-credentials"] == "true"
        exposed = listed(h["access-control-expose-headers"])
        assert {"x-request-id", "ratelimit", "ratelimit-policy", "retry-after"} <= exposed
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= exposed
        assert "origin" in listed(h["vary"])
        # Errors carry them too, or the browser could not read them.
        unauthorized = await client.get("/api/v1/rates/AAPL", headers={"Origin": OPS})
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == OPS
        health = await client.get("/health", headers={"Origin": OPS})
        assert health.headers["access-control-allow-origin"] == OPS


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "http://desk.example.com",  # another scheme
        "https://desk.example.com:8443",  # another port
        "https://desk.example.com.evil.com",
        "https://evildesk.example.com",
        "null",
        "https://DESK.example.com/",
    ],
)
async def test_a_disallowed_origin_gets_no_cors_headers(origin: str) -> None:
    async with engine(CORS_ORIGINS=ALLOWED) as (client, app):
        pre = await client.options("/api/v1/calculate-locate", headers=preflight(origin))
        assert cors_headers(pre) == {}
        assert pre.status_code != 204
        actual = await client.get("/api/v1/rates/AAPL", headers={**client_key(app), "Origin": origin})
        assert actual.status_code == 200  # CORS is the browser's business: the answer is just not shared
        assert cors_headers(actual) == {}


async def test_wildcard_allows_any_origin_without_credentials() -> None:
    async with engine(CORS_ORIGINS="*") as (client, app):
        pre = await client.options(
            "/api/v1/rates/AAPL", headers={**preflight("https://anyone.example.org", "GET"), "Cookie": "a=b"}
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in pre.headers
        assert "get" in listed(pre.headers["access-control-allow-methods"])
        actual = await client.get(
            "/api/v1/rates/AAPL", headers={**client_key(app), "Origin": "https://anyone.example.org"}
        )
        assert actual.status_code == 200
        assert actual.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in actual.headers
        assert "x-request-id" in listed(actual.headers["access-control-expose-headers"])


NO_ORIGINS: list[Callable[[], dict[str, str]]] = [dict, lambda: {"CORS_ORIGINS": ""}]


@pytest.mark.parametrize("env", NO_ORIGINS, ids=["unset", "empty"])
async def test_without_cors_origins_there_are_no_cors_headers(env: Callable[[], dict[str, str]]) -> None:
    async with engine(**env()) as (client, app):
        pre = await client.options("/api/v1/calculate-locate", headers=preflight(DESK))
        assert cors_headers(pre) == {}
        actual = await client.get("/api/v1/rates/AAPL", headers={**client_key(app), "Origin": DESK})
        assert actual.status_code == 200
        assert cors_headers(actual) == {}


async def test_requests_without_origin_are_untouched() -> None:
    async with engine(CORS_ORIGINS=ALLOWED) as (client, app):
        response = await client.get("/api/v1/rates/AAPL", headers=client_key(app))
        assert response.status_code == 200
        assert cors_headers(response) == {}
