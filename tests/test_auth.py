"""Authentication (DESIGN §2.3, §2.4): one 401 for every bad credential, open routes, 404/405 before auth,
the bootstrap admin key and authentication switched off."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from pricer.app import PricerApp, create_app
from pricer.auth.keys import KeyHasher, KeyVerifier, Principal, make_record, new_key
from pricer.auth.tokens import TokenService
from pricer.errors import Unauthorized
from pricer.logs import LineBudget
from pricer.models import ApiKeyRecord, Scope
from pricer.settings import DEV_API_KEY_PEPPER, DEV_JWT_SECRET_KEY, SettingsError
from pricer.stores.memory import MemoryKeyStore
from tests.conftest import Engine, make_settings, start_server, started_app, stop_server

pytestmark = pytest.mark.anyio

QUOTE = "/api/v1/calculate-locate"
RATE = "/api/v1/rates/AAPL"
BOOTSTRAP_KEY = "bre_bootstrap01_" + "Ab1xY9" * 7  # 42-character secret
GOOD_QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}


@contextlib.asynccontextmanager
async def client_of(app: PricerApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://engine.test"
    ) as client:
        yield client


async def issue(engine: Engine, client_id: str, scopes: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"client_id": client_id}
    if scopes is not None:
        body["scopes"] = scopes
    response = await engine.client.post("/api/v1/admin/keys", json=body, headers=engine.as_admin())
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


async def bad_credentials(engine: Engine) -> dict[str, dict[str, str]]:
    """Header sets for every kind of bad credential of DESIGN §2.3's UNAUTHORIZED row."""
    key_id = engine.keys.client_key.split("_")[1]
    other_secret = "Z" * 40
    # An expired key: a record whose expiry is past, written straight into the key store.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired_key = "bre_expired0001_" + "e" * 40
    await engine.app.stores.keys.put(
        make_record(
            KeyHasher(DEV_API_KEY_PEPPER),
            expired_key,
            client_id="demo_client",
            scopes={Scope.QUOTE, Scope.RATES},
            now=past,
            expires_at=past + dt.timedelta(days=1),
        )
    )
    principal = Principal(
        key_id=key_id, client_id="demo_client", scopes=frozenset({Scope.QUOTE, Scope.RATES})
    )

    def token(secret: str, issued: dt.datetime) -> str:
        service = TokenService(
            engine.app.stores.keys,
            secret=secret,
            issuer="borrow-rate-engine",
            audience="borrow-rate-engine-api",
            ttl_seconds=900,
        )
        return service.issue(principal, issued)

    now = dt.datetime.now(dt.UTC)
    expired_token = token(DEV_JWT_SECRET_KEY, now - dt.timedelta(hours=1))
    forged_token = token("not-the-engine-secret-0123456789", now)
    fresh_token = token(DEV_JWT_SECRET_KEY, now)
    # The control: a fresh token made the same way is accepted.
    accepted = await engine.client.get(RATE, headers={"Authorization": f"Bearer {fresh_token}"})
    assert accepted.status_code == 200, accepted.text
    revoked = await issue(engine, "demo_client")
    response = await engine.client.delete(
        f"/api/v1/admin/keys/{revoked['key_id']}", headers=engine.as_admin()
    )
    assert response.status_code == 204
    return {
        "missing": {},
        "empty": {"X-API-Key": ""},
        "malformed": {"X-API-Key": "not-a-key"},
        "malformed-prefix": {"X-API-Key": engine.keys.client_key.replace("bre_", "key_")},
        "short-secret": {"X-API-Key": f"bre_{key_id}_abc"},
        "unknown-key-id": {"X-API-Key": "bre_unknown00001_" + "A" * 40},
        "wrong-secret": {"X-API-Key": f"bre_{key_id}_{other_secret}"},
        "expired": {"X-API-Key": expired_key},
        "revoked": {"X-API-Key": revoked["api_key"]},
        "bad-token": {"Authorization": "Bearer abc.def.ghi"},
        "expired-token": {"Authorization": f"Bearer {expired_token}"},
        "forged-token": {"Authorization": f"Bearer {forged_token}"},
        "empty-bearer": {"Authorization": "Bearer "},
        "basic-auth": {"Authorization": "Basic dXNlcjpwYXNz"},
        "key-as-bearer": {"Authorization": f"Bearer {engine.keys.client_key}"},
    }


async def test_every_bad_credential_gets_the_same_401(engine: Engine) -> None:
    cases = await bad_credentials(engine)
    bodies = {}
    challenges = set()
    for name, headers in cases.items():
        for method, path, kwargs in (("GET", RATE, {}), ("POST", QUOTE, {"json": GOOD_QUOTE})):
            response = await engine.client.request(method, path, headers=headers, **kwargs)
            assert response.status_code == 401, (name, path, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert response.headers.get("www-authenticate"), name
            challenges.add(response.headers["www-authenticate"])
            body = response.json()
            assert body["error_code"] == "UNAUTHORIZED"
            assert body["request_id"] == response.headers["x-request-id"]
            bodies[(name, path)] = {k: v for k, v in body.items() if k != "request_id"}
    distinct = {repr(sorted(body.items())) for body in bodies.values()}
    assert len(distinct) == 1, bodies
    assert len(challenges) == 1
    # Nothing in the body tells which check failed.
    (only,) = distinct
    for word in ("expired", "revoked", "unknown", "secret"):
        assert word not in only.lower()


async def test_the_same_key_is_accepted_once_valid(engine: Engine) -> None:
    """The control for the 401s above: the demo keys and an issued key pass."""
    assert (await engine.client.get(RATE, headers=engine.as_client())).status_code == 200
    issued = await issue(engine, "demo_client")
    assert (await engine.client.get(RATE, headers={"X-API-Key": issued["api_key"]})).status_code == 200
    padded = {"X-API-Key": f"  {engine.keys.client_key} "}
    assert (await engine.client.get(RATE, headers=padded)).status_code == 200


async def test_authentication_comes_before_validation(engine: Engine) -> None:
    response = await engine.client.post(
        QUOTE, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401, response.text
    wrong_media = await engine.client.post(QUOTE, content=b"x", headers={"Content-Type": "text/plain"})
    assert wrong_media.status_code == 401, wrong_media.text


@pytest.mark.parametrize("path", ["/health", "/health/detailed", "/openapi.json", "/docs"])
async def test_open_routes_need_no_key(engine: Engine, path: str) -> None:
    for headers in ({}, {"X-API-Key": "garbage"}, {"Authorization": "Bearer nonsense"}):
        response = await engine.client.get(path, headers=headers)
        assert response.status_code == 200, (path, headers, response.text)


async def test_health_bodies(engine: Engine) -> None:
    health = await engine.client.get("/health")
    assert health.json()["status"] == "healthy"
    assert isinstance(health.json()["version"], str)
    assert health.json()["version"]
    detailed = (await engine.client.get("/health/detailed")).json()
    assert detailed["status"] in ("healthy", "degraded")
    for name in ("database", "redis", "market_data"):
        dependency = detailed["dependencies"][name]
        assert dependency["status"] in ("healthy", "degraded", "unhealthy")
        assert isinstance(dependency["latency_ms"], int | float)


@pytest.mark.parametrize(
    "path",
    ["/nope", "/api/v1/nope", "/api/v2/rates/AAPL", "/api/v1/rates/AAPL/extra", "/api/v1/admin/nothing", "/"],
)
async def test_unknown_path_is_404_before_authentication(engine: Engine, path: str) -> None:
    for headers in ({}, {"X-API-Key": "garbage"}, engine.as_client()):
        response = await engine.client.get(path, headers=headers)
        assert response.status_code == 404, (path, response.text)
        body = response.json()
        assert body["error_code"] == "NOT_FOUND"
        assert "www-authenticate" not in response.headers


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", QUOTE, {"GET", "POST"}),
        ("PUT", QUOTE, {"GET", "POST"}),
        ("GET", f"{QUOTE}/batch", {"POST"}),
        ("POST", RATE, {"GET"}),
        ("POST", "/health", {"GET"}),
        ("GET", "/api/v1/admin/keys", {"POST"}),
        ("GET", "/api/v1/admin/clients/xyz123", {"PUT"}),
        ("PATCH", "/api/v1/admin/volatility", {"PUT"}),
    ],
)
async def test_wrong_method_is_405_with_allow_before_authentication(
    engine: Engine, method: str, path: str, allowed: set[str]
) -> None:
    for headers in ({}, engine.as_client()):
        response = await engine.client.request(method, path, headers=headers)
        assert response.status_code == 405, (method, path, response.text)
        assert response.json()["error_code"] == "METHOD_NOT_ALLOWED"
        allow = {part.strip() for part in response.headers["allow"].split(",")}
        assert allowed <= allow <= allowed | {"HEAD"}, allow
        assert method not in allow


async def test_admin_scope_implies_every_scope(engine: Engine) -> None:
    admin = engine.as_admin()
    assert (await engine.client.get(RATE, headers=admin)).status_code == 200
    assert (await engine.client.post(QUOTE, json=GOOD_QUOTE, headers=admin)).status_code == 200
    assert (await engine.client.post("/api/v1/auth/token", headers=admin)).status_code == 200


async def test_bearer_tokens_act_as_their_key_and_die_with_it(engine: Engine) -> None:
    issued = await issue(engine, "demo_client")
    token_response = await engine.client.post("/api/v1/auth/token", headers={"X-API-Key": issued["api_key"]})
    assert token_response.status_code == 200, token_response.text
    token = token_response.json()
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 900
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert (await engine.client.post(QUOTE, json=GOOD_QUOTE, headers=bearer)).status_code == 200
    other = await engine.client.post(QUOTE, json={**GOOD_QUOTE, "client_id": "xyz123"}, headers=bearer)
    assert other.status_code == 403
    revoked = await engine.client.delete(f"/api/v1/admin/keys/{issued['key_id']}", headers=engine.as_admin())
    assert revoked.status_code == 204
    after = await engine.client.post(QUOTE, json=GOOD_QUOTE, headers=bearer)
    assert after.status_code == 401, after.text
    tampered = token["access_token"][:-2] + ("AA" if not token["access_token"].endswith("AA") else "BB")
    bad = await engine.client.get(RATE, headers={"Authorization": f"Bearer {tampered}"})
    assert bad.status_code == 401


# ---- BOOTSTRAP_ADMIN_KEY ----------------------------------------------------------------------------------


async def test_bootstrap_admin_key_is_accepted_for_admin_routes() -> None:
    app = await started_app(make_settings(BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY))
    async with client_of(app) as client:
        key = {"X-API-Key": BOOTSTRAP_KEY}
        response = await client.put("/api/v1/admin/volatility", json={"value": 10}, headers=key)
        assert response.status_code == 200, response.text
        issued = await client.post("/api/v1/admin/keys", json={"client_id": "xyz123"}, headers=key)
        assert issued.status_code == 201, issued.text
        # Exactly that value: the same id with another secret is refused.
        near = BOOTSTRAP_KEY[:-1] + ("c" if not BOOTSTRAP_KEY.endswith("c") else "d")
        refused = await client.put(
            "/api/v1/admin/volatility", json={"value": 10}, headers={"X-API-Key": near}
        )
        assert refused.status_code == 401


async def test_bootstrap_admin_key_without_demo_data() -> None:
    app = await started_app(make_settings(BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY, SEED_DEMO_DATA="false"))
    assert app.demo_keys is None
    async with client_of(app) as client:
        key = {"X-API-Key": BOOTSTRAP_KEY}
        # The `admin` client exists for it, so keys can be issued for that client.
        issued = await client.post("/api/v1/admin/keys", json={"client_id": "admin"}, headers=key)
        assert issued.status_code == 201, issued.text
        put = await client.put(
            "/api/v1/admin/clients/first_client",
            json={"markup_percentage": 1, "transaction_fee_type": "FLAT", "transaction_amount": 2},
            headers=key,
        )
        assert put.status_code == 201, put.text


async def test_bootstrap_admin_key_replaces_the_stored_secret_of_its_id() -> None:
    app = create_app(make_settings(BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY))
    old_key = "bre_bootstrap01_" + "Q" * 40
    now = dt.datetime.now(dt.UTC)
    await app.stores.keys.put(
        make_record(
            KeyHasher(DEV_API_KEY_PEPPER),
            old_key,
            client_id="demo_client",
            scopes={Scope.QUOTE},
            now=now,
            expires_at=now + dt.timedelta(days=1),
        )
    )
    for step in app.lifecycle.startup:
        await step()
    async with client_of(app) as client:
        old = await client.get(RATE, headers={"X-API-Key": old_key})
        assert old.status_code == 401
        new = await client.put(
            "/api/v1/admin/volatility", json={"value": 10}, headers={"X-API-Key": BOOTSTRAP_KEY}
        )
        assert new.status_code == 200, new.text


async def test_a_revoked_bootstrap_admin_key_is_not_brought_back(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16: start-up used to store the bootstrap key whole, clearing a revocation. Here a store kept
    across two apps (a restart on the same database; the real processes are in test_postgres_engine)."""
    settings = make_settings(BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY, SEED_DEMO_DATA="false")
    first = await started_app(settings)
    key_id = BOOTSTRAP_KEY.split("_")[1]
    async with client_of(first) as client:
        revoked = await client.delete(f"/api/v1/admin/keys/{key_id}", headers={"X-API-Key": BOOTSTRAP_KEY})
        assert revoked.status_code == 204, revoked.text
    second = create_app(settings, stores=first.stores)
    with caplog.at_level("WARNING", logger="pricer.app"):
        for step in second.lifecycle.startup:
            await step()
    async with client_of(second) as client:
        refused = await client.get(RATE, headers={"X-API-Key": BOOTSTRAP_KEY})
        assert refused.status_code == 401
    said = [
        record
        for record in caplog.records
        if record.getMessage() == "Bootstrap admin key revoked: not restored"
    ]
    assert len(said) == 1
    assert said[0].levelname == "WARNING"
    assert BOOTSTRAP_KEY.split("_")[2] not in caplog.text


@pytest.mark.parametrize("value", ["not-a-key", "bre_UPPER001_" + "a" * 40, "bre_abcdefgh_short"])
async def test_malformed_bootstrap_admin_key_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        await started_app(make_settings(BOOTSTRAP_ADMIN_KEY=value))
    assert str(raised.value).startswith("BOOTSTRAP_ADMIN_KEY")
    assert value not in str(raised.value)  # never printed


# ---- ENABLE_AUTHENTICATION=false ----------------------------------------------------------------------


async def test_without_authentication_requests_act_as_the_client_they_name() -> None:
    app = await started_app(make_settings(ENABLE_AUTHENTICATION="false"))
    async with client_of(app) as client:
        for client_id in ("xyz123", "pct_client"):
            response = await client.post(QUOTE, json={**GOOD_QUOTE, "client_id": client_id})
            assert response.status_code == 200, response.text
            assert response.json()["client_id"] == client_id
        got = await client.get(QUOTE, params={**GOOD_QUOTE, "client_id": "xyz123"})
        assert got.status_code == 200, got.text
        batch = await client.post(
            f"{QUOTE}/batch",
            json={
                "client_id": "xyz123",
                "positions": [{"ticker": "GME", "position_value": 10, "loan_days": 1}],
            },
        )
        assert batch.status_code == 200, batch.text
        assert batch.json()["client_id"] == "xyz123"
        assert (await client.get(RATE)).status_code == 200
        missing = await client.post(QUOTE, json={**GOOD_QUOTE, "client_id": "no_such_client"})
        assert missing.status_code == 404
        assert missing.json()["error_code"] == "CLIENT_NOT_FOUND"
        invalid = await client.post(QUOTE, json={**GOOD_QUOTE, "loan_days": 0})
        assert invalid.status_code == 400
        quote_id = (await client.post(QUOTE, json=GOOD_QUOTE)).json()["quote_id"]
        assert (await client.get(f"/api/v1/quotes/{quote_id}")).status_code == 200


# ---- authentication failures logged without flooding (issue 16 item 8) ------------------------------------

AUTH_LINE = 'level=ERROR msg="Authentication error"'


def invalid_key_attempts(metrics_text: str) -> float:
    found = re.search(
        r'^authentication_attempts_total\{status="invalid_key"\} (\S+)$', metrics_text, re.MULTILINE
    )
    assert found is not None, "authentication_attempts_total{status=invalid_key} is not exported"
    return float(found.group(1))


async def test_a_flood_of_bad_keys_writes_a_bounded_log_whose_counts_add_up(tmp_path: Path) -> None:
    """2,000 requests with unknown keys against a real server: at most 10 `Authentication error` lines a
    second, each line let through after a suppression says how many were left out (`suppressed=N`), the
    lines and their counts add up to every failure, and the metric still counts every attempt. (The old
    code wrote one ERROR line per request.)"""
    server = start_server(tmp_path, RATE_LIMIT_PER_MINUTE="1000000", SLOW_REQUEST_MS="60000")
    flood, sent = 2000, 0
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            started = time.monotonic()

            async def one(index: int) -> int:
                key = f"bre_{secrets.token_hex(6)}_{secrets.token_hex(20)}"  # well formed, unknown id
                response = await client.get(RATE, headers={"X-API-Key": key})
                return response.status_code

            statuses: list[int] = []
            for first in range(0, flood, 50):  # bounded: 2,000 requests, 50 at a time
                statuses += await asyncio.gather(*(one(i) for i in range(first, first + 50)))
                assert time.monotonic() - started < 300, "the flood took too long"
            sent = len(statuses)
            elapsed = time.monotonic() - started
            assert statuses == [401] * flood
            await asyncio.sleep(1.2)  # a new second: the next failure's line carries the count
            last = await client.get(RATE, headers={"X-API-Key": "bre_lastone1_" + "x" * 40})
            assert last.status_code == 401
            attempts = invalid_key_attempts((await client.get("/metrics")).text)
    finally:
        stop_server(server)
    lines = [line for line in server.log().splitlines() if line.startswith(AUTH_LINE)]
    assert attempts == sent + 1
    assert len(lines) <= 10 * (int(elapsed) + 3), (len(lines), elapsed)
    assert len(lines) < 500, len(lines)
    suppressed = [int(m.group(1)) for line in lines if (m := re.search(r" suppressed=(\d+)", line))]
    assert suppressed, "no line reports the lines left out"
    assert len(lines) + sum(suppressed) == sent + 1


async def test_the_error_line_budget_is_per_second() -> None:
    now = [100.0]
    budget = LineBudget(per_second=3, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] = 100.99
    assert budget.take() is None
    assert budget.take("other kind") == 0
    now[0] = 101.0
    assert [budget.take() for _ in range(4)] == [3, 0, 0, None]
    now[0] = 105.5
    assert budget.take() == 1


async def test_a_key_verified_before_is_checked_against_its_current_record() -> None:
    """KeyVerifier keeps the keys it verified lately (no HMAC for a key presented again): a record
    replaced since (new secret, revoked, expired) is verified anew or refused, never served from memory."""
    hasher = KeyHasher("pepper-for-this-test")
    store = MemoryKeyStore()
    verifier = KeyVerifier(store, hasher)
    now = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    key_id, key = new_key()
    record = make_record(
        hasher, key, client_id="acme", scopes={Scope.QUOTE}, now=now, expires_at=now + dt.timedelta(days=1)
    )
    await store.put(record)
    first = await verifier.verify(key, now)
    assert await verifier.verify(key, now) is first  # from memory
    assert first == Principal(key_id=key_id, client_id="acme", scopes=frozenset({Scope.QUOTE}))

    with pytest.raises(Unauthorized) as expired:
        await verifier.verify(key, now + dt.timedelta(days=2))
    assert expired.value.reason == "expired"

    # The same key id, another secret: the old key no longer matches.
    other_secret = key.rsplit("_", 1)[0] + "_" + secrets.token_hex(20)
    await store.put(
        make_record(
            hasher, other_secret, client_id="acme", scopes={Scope.QUOTE}, now=now,
            expires_at=now + dt.timedelta(days=1),
        )
    )  # fmt: skip
    with pytest.raises(Unauthorized) as replaced:
        await verifier.verify(key, now)
    assert replaced.value.reason == "invalid_key"
    assert (await verifier.verify(other_secret, now)).client_id == "acme"

    await store.revoke(key_id, now)
    with pytest.raises(Unauthorized) as revoked:
        await verifier.verify(other_secret, now)
    assert revoked.value.reason == "revoked"


class RefreshingKeyStore(MemoryKeyStore):
    """Reads return a fresh copy of the stored record after a pause, as the cached PostgreSQL key store
    does when its entry expires (concurrent requests then share one read and one new object)."""

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        record = await super().get(key_id)
        await asyncio.sleep(0.01)
        return None if record is None else msgspec.structs.replace(record)


async def test_concurrent_checks_of_a_key_whose_record_was_reread_all_succeed() -> None:
    hasher = KeyHasher("pepper-for-this-test")
    store = RefreshingKeyStore()
    verifier = KeyVerifier(store, hasher)
    now = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
    _, key = new_key()
    await store.put(
        make_record(
            hasher,
            key,
            client_id="acme",
            scopes={Scope.QUOTE},
            now=now,
            expires_at=now + dt.timedelta(days=1),
        )
    )
    await verifier.verify(key, now)
    answers = await asyncio.gather(*(verifier.verify(key, now) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(answer, Principal) for answer in answers), answers
