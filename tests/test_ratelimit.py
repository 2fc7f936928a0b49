"""Rate limits (DESIGN §2.5): the limiter contract over both implementations, then the HTTP behaviour.

The Redis limiter runs against the real Redis on 127.0.0.1:6379 (unique keys per test) and, for the
script-cache test, against a private redis-server; Redis is never mocked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pricer.app import PricerApp
from pricer.logs import LogfmtFormatter
from pricer.ratelimit.buckets import BucketSpec, Decision
from pricer.ratelimit.memory import MemoryLimiter
from pricer.ratelimit.redis import RedisLimiter
from tests.conftest import make_settings, started_app
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.anyio

SHARED_REDIS = "redis://127.0.0.1:6379/14"
STATE = re.compile(r"(\d+\.\d{6}):(\d+)")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Subject:
    """A limiter under test and how to let time pass for it."""

    kind: str
    limiter: MemoryLimiter | RedisLimiter
    clock: FakeClock | None
    redis: aioredis.Redis | None

    def key(self, name: str = "") -> str:
        return f"ratelimit:test-{uuid.uuid4().hex}{name}"

    async def wait(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "memory":
        clock = FakeClock()
        yield Subject("memory", MemoryLimiter(clock=clock), clock, None)
        return
    # A generous budget: these tests are about the shared decisions, not about the fallback.
    limiter = RedisLimiter(aioredis.Redis.from_url(SHARED_REDIS), expected_replicas=3, budget_seconds=2.0)
    inspector = aioredis.Redis.from_url(SHARED_REDIS, decode_responses=True)
    try:
        yield Subject("redis", limiter, None, inspector)
        assert limiter.local_decisions == 0, "the Redis limiter fell back to local decisions"
    finally:
        await limiter.close()
        await inspector.aclose()


# ---- the contract, for both limiters ---------------------------------------------------------


async def test_burst_admitted_then_refused(subject: Subject) -> None:
    spec = BucketSpec(subject.key(), per_minute=1, capacity=5)
    decisions = [await subject.limiter.acquire(spec) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert all(not d.local for d in decisions)


async def test_continuous_refill(subject: Subject) -> None:
    rate = 10.0  # tokens per second
    spec = BucketSpec(subject.key(), per_minute=600, capacity=5)
    before_drain = time.monotonic()
    for _ in range(5):
        assert (await subject.limiter.acquire(spec)).allowed
    drained = time.monotonic()
    refused = await subject.limiter.acquire(spec)
    assert not refused.allowed
    assert refused.tokens < 1

    await subject.wait(0.25)
    started = time.monotonic()
    decision = await subject.limiter.acquire(spec)
    finished = time.monotonic()
    assert decision.allowed
    if subject.clock is not None:
        assert decision.tokens == pytest.approx(1.5)
        assert (await subject.limiter.acquire(spec)).allowed
        assert not (await subject.limiter.acquire(spec)).allowed
    else:
        # Refilled by rate × the time between the stamps, which lies between these two intervals.
        low = rate * (started - drained) - 1
        high = min(5.0, rate * (finished - before_drain)) - 1
        assert low - 0.2 <= decision.tokens <= high + 0.2, (low, decision.tokens, high)

    # A bucket never holds more than its capacity, however long it waits.
    await subject.wait(1.0)
    full = await subject.limiter.acquire(spec)
    assert full.allowed
    assert full.tokens == pytest.approx(4.0, abs=0.05)


async def test_cost_above_one(subject: Subject) -> None:
    spec = BucketSpec(subject.key(), per_minute=1, capacity=10)
    first = await subject.limiter.acquire(spec, 4)
    assert first.allowed
    assert first.cost == 4
    assert first.tokens == pytest.approx(6, abs=0.01)
    assert (await subject.limiter.acquire(spec, 4)).allowed
    refused = await subject.limiter.acquire(spec, 4)
    assert not refused.allowed
    # A refused decision takes nothing: the two tokens are still there for a smaller cost.
    assert refused.tokens == pytest.approx(2, abs=0.01)
    assert refused.retry_after == 120  # two missing tokens at one a minute
    assert (await subject.limiter.acquire(spec, 2)).allowed
    assert not (await subject.limiter.acquire(spec, 1)).allowed


async def test_keys_are_independent(subject: Subject) -> None:
    spec_a = BucketSpec(subject.key("-a"), per_minute=1, capacity=2)
    spec_b = BucketSpec(subject.key("-b"), per_minute=1, capacity=2)
    assert (await subject.limiter.acquire(spec_a)).allowed
    assert (await subject.limiter.acquire(spec_a)).allowed
    assert not (await subject.limiter.acquire(spec_a)).allowed
    b = await subject.limiter.acquire(spec_b)
    assert b.allowed
    assert b.remaining == 1
    assert not (await subject.limiter.acquire(spec_a)).allowed


async def test_concurrent_acquires_admit_exactly_capacity(subject: Subject) -> None:
    spec = BucketSpec(subject.key(), per_minute=1, capacity=20)
    decisions = await asyncio.gather(*(subject.limiter.acquire(spec) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 20
    remaining = sorted((d.remaining for d in decisions if d.allowed), reverse=True)
    assert remaining == list(range(19, -1, -1))


async def test_decision_fields(subject: Subject) -> None:
    spec = BucketSpec(subject.key(), per_minute=60, capacity=10)  # one token a second
    first = await subject.limiter.acquire(spec)
    assert first.allowed
    assert first.spec == spec
    assert first.cost == 1
    assert not first.local
    assert first.remaining == 9
    assert first.reset_after == 1
    assert first.retry_after == 1  # at least 1, even when allowed
    assert first.refill_window == 10
    for _ in range(9):
        await subject.limiter.acquire(spec)
    refused = await subject.limiter.acquire(spec)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == 1
    assert refused.reset_after == 10
    assert refused.refill_window == 10


def test_decision_arithmetic() -> None:
    spec = BucketSpec("ratelimit:x", per_minute=30, capacity=7)  # 0.5 tokens a second
    assert spec.rate == 0.5
    decision = Decision(allowed=False, tokens=0.2, spec=spec, cost=3)
    assert decision.remaining == 0
    assert decision.retry_after == 6  # (3 - 0.2) / 0.5 = 5.6
    assert decision.reset_after == 14  # (7 - 0.2) / 0.5 = 13.6
    assert decision.refill_window == 14
    # A cost above the capacity waits for a full bucket, not forever.
    assert Decision(allowed=False, tokens=7.0, spec=spec, cost=50).retry_after == 1
    assert Decision(allowed=True, tokens=7.0, spec=spec, cost=1).reset_after == 0


# ---- the memory limiter ----------------------------------------------------------------------


async def test_memory_limiter_is_bounded_lru() -> None:
    limiter = MemoryLimiter(max_buckets=100, clock=FakeClock())
    specs = [BucketSpec(f"ratelimit:c{i}", per_minute=1, capacity=1) for i in range(100)]
    for spec in specs:
        assert (await limiter.acquire(spec)).allowed
    assert len(limiter) == 100
    assert not (await limiter.acquire(specs[0])).allowed  # c0 is now the most recently used
    assert (await limiter.acquire(BucketSpec("ratelimit:new", per_minute=1, capacity=1))).allowed
    assert len(limiter) == 100
    # c1 was the least recently used and was evicted (an absent bucket is full); c0 was kept.
    assert (await limiter.acquire(specs[1])).allowed
    assert not (await limiter.acquire(specs[0])).allowed
    for i in range(1000):
        await limiter.acquire(BucketSpec(f"ratelimit:flood{i}", per_minute=1, capacity=1))
    assert len(limiter) == 100


async def test_memory_limiter_sweeps_idle_buckets() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    for i in range(50):
        await limiter.acquire(BucketSpec(f"ratelimit:idle{i}", per_minute=60, capacity=60))
    clock.advance(590)
    for i in range(5):
        await limiter.acquire(BucketSpec(f"ratelimit:recent{i}", per_minute=60, capacity=60))
    clock.advance(11)
    hot = BucketSpec("ratelimit:hot", per_minute=10_000_000, capacity=10_000_000)
    for _ in range(10_000):
        await limiter.acquire(hot)
    # Buckets full again are gone (an absent bucket is full): the idle and the recent ones (one token
    # drawn 11 s ago at one token a second); the hot one, far from full, stays.
    assert len(limiter) == 1


async def test_memory_sweep_never_grants_tokens_the_refill_has_not() -> None:
    clock = FakeClock()
    limiter = MemoryLimiter(clock=clock)
    slow = BucketSpec("ratelimit:slow", per_minute=1, capacity=100)  # 100 minutes to refill
    assert (await limiter.acquire(slow, 100)).allowed
    clock.advance(601)
    other = BucketSpec("ratelimit:other", per_minute=10_000_000, capacity=10_000_000)
    for _ in range(10_000):
        await limiter.acquire(other)
    decision = await limiter.acquire(slow, 50)
    # About 10 tokens came back in 601 s at one a minute: 50 must be refused.
    assert not decision.allowed
    assert decision.tokens == pytest.approx(601 / 60, abs=0.01)


# ---- the Redis limiter -----------------------------------------------------------------------


@pytest.fixture
async def redis_limiter() -> AsyncIterator[tuple[RedisLimiter, aioredis.Redis]]:
    limiter = RedisLimiter(aioredis.Redis.from_url(SHARED_REDIS), expected_replicas=3, budget_seconds=2.0)
    inspector = aioredis.Redis.from_url(SHARED_REDIS, decode_responses=True)
    try:
        yield limiter, inspector
    finally:
        await limiter.close()
        await inspector.aclose()


async def test_redis_state_is_a_plain_string(redis_limiter: tuple[RedisLimiter, aioredis.Redis]) -> None:
    limiter, inspector = redis_limiter
    client = f"client-{uuid.uuid4().hex}"
    spec = BucketSpec(f"ratelimit:{client}", per_minute=60, capacity=10)
    decision = await limiter.acquire(spec, 3)
    seconds, micros = await inspector.time()
    state = await inspector.get(f"ratelimit:{client}")
    assert isinstance(state, str)
    match = STATE.fullmatch(state)
    assert match is not None, state
    assert float(match.group(1)) == pytest.approx(decision.tokens, abs=1e-6)
    assert float(match.group(1)) == pytest.approx(7.0, abs=0.01)
    stamp = int(match.group(2))
    assert 0 <= seconds * 1_000_000 + micros - stamp < 2_000_000  # Redis's own clock, in microseconds
    # The key expires once the bucket would be full again (3 s at one token a second), plus a second.
    ttl = await inspector.pttl(f"ratelimit:{client}")
    assert 0 < ttl <= 4000
    positions = BucketSpec(f"ratelimit:{client}:positions", per_minute=600, capacity=600)
    await limiter.acquire(positions, 250)
    assert STATE.fullmatch(await inspector.get(f"ratelimit:{client}:positions") or "")
    await inspector.delete(f"ratelimit:{client}", f"ratelimit:{client}:positions")


async def test_redis_decisions_survive_script_flush(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "redis") as server:
        limiter = RedisLimiter(aioredis.Redis.from_url(server.url), expected_replicas=1, budget_seconds=2.0)
        try:
            spec = BucketSpec("ratelimit:flushed", per_minute=1, capacity=3)
            assert (await limiter.acquire(spec)).allowed
            with server.client() as admin:
                admin.script_flush()
                assert admin.script_exists(limiter._script.sha) == [False]
            second = await limiter.acquire(spec)
            assert second.allowed
            assert not second.local
            assert second.remaining == 1
            assert (await limiter.acquire(spec)).allowed
            assert not (await limiter.acquire(spec)).allowed
            assert limiter.local_decisions == 0
            assert not limiter.degraded
        finally:
            await limiter.close()


async def test_redis_coalesces_concurrent_decisions(
    redis_limiter: tuple[RedisLimiter, aioredis.Redis],
) -> None:
    limiter, inspector = redis_limiter
    keys = [f"ratelimit:test-{uuid.uuid4().hex}" for _ in range(10)]
    specs = [BucketSpec(key, per_minute=1, capacity=15) for key in keys]
    before = limiter.round_trips
    decisions = await asyncio.gather(*(limiter.acquire(specs[i % 10]) for i in range(200)))
    trips = limiter.round_trips - before
    assert limiter.shared_decisions == 200
    assert all(not d.local for d in decisions)
    assert 1 <= trips <= 10, trips
    # Coalesced, yet each bucket decided exactly: 15 of each key's 20 requests admitted.
    for spec in specs:
        assert sum(d.allowed for d in decisions if d.spec.key == spec.key) == 15
    await inspector.delete(*keys)


async def test_redis_decisions_under_steady_traffic_share_a_round_trip() -> None:
    """Right after a call, a decision waits a moment (the linger) for others: requests arriving 5 ms apart,
    never concurrent, still go to Redis together; after a pause the next one goes at once."""
    client = aioredis.Redis.from_url(SHARED_REDIS)
    limiter = RedisLimiter(client, expected_replicas=3, budget_seconds=2.0, linger_seconds=0.1)
    spec = BucketSpec(f"ratelimit:test-{uuid.uuid4().hex}", per_minute=60, capacity=100)
    try:
        await limiter.acquire(spec)  # idle: a call of its own
        before = limiter.round_trips

        async def later(delay: float) -> bool:
            await asyncio.sleep(delay)
            return (await limiter.acquire(spec)).allowed

        assert all(await asyncio.gather(*(later(0.005 * n) for n in range(3))))
        assert limiter.round_trips - before == 1
        await asyncio.sleep(1.05)  # longer than 10 lingers: idle again
        before = limiter.round_trips
        started = time.monotonic()
        assert (await limiter.acquire(spec)).allowed
        assert limiter.round_trips - before == 1
        assert time.monotonic() - started < 0.08  # called at once, not after the 100 ms linger
    finally:
        await client.delete(spec.key)
        await limiter.close()


async def test_redis_limiter_falls_back_locally_with_its_share(tmp_path: Path) -> None:
    """Nothing listening: every decision is local, at 1/EXPECTED_REPLICAS of the limit, promptly."""
    with PrivateRedis(tmp_path / "redis") as server:
        url = server.url
    # No retries, so that no call outlives the test (the fallback itself does not depend on them).
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0))
    limiter = RedisLimiter(client, expected_replicas=3)
    try:
        spec = BucketSpec("ratelimit:lonely", per_minute=60, capacity=30)
        started = time.monotonic()
        decisions = [await limiter.acquire(spec) for _ in range(15)]
        assert time.monotonic() - started < 5
        assert all(d.local for d in decisions)
        assert limiter.degraded
        assert sum(d.allowed for d in decisions) == 10  # a third of the burst of 30
        # Reported against the share this replica enforces, so the headers tell the limit in force.
        assert decisions[0].spec == BucketSpec("ratelimit:lonely", per_minute=20, capacity=10)
        assert decisions[0].remaining == 9
    finally:
        await limiter.close()


async def test_local_refusal_reports_nothing_remaining(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "redis") as server:
        url = server.url
    clock = FakeClock()
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0))
    limiter = RedisLimiter(client, expected_replicas=3, clock=clock)
    try:
        spec = BucketSpec("ratelimit:share", per_minute=60, capacity=10)  # share: 3 tokens, 20 a minute
        assert [(await limiter.acquire(spec)).allowed for _ in range(4)] == [True, True, True, False]
        clock.advance(2.0)  # 2/3 of a local token back: still refused
        refused = await limiter.acquire(spec)
        assert refused.local
        assert not refused.allowed
        assert refused.remaining == 0, f"refused, yet reports {refused.remaining} remaining"
        assert refused.retry_after == 1
    finally:
        await limiter.close()


# ---- HTTP --------------------------------------------------------------------------------------


@dataclass
class Http:
    app: PricerApp
    client: httpx.AsyncClient

    @property
    def client_key(self) -> dict[str, str]:
        assert self.app.demo_keys is not None
        return {"X-API-Key": self.app.demo_keys.client_key}

    @property
    def admin_key(self) -> dict[str, str]:
        assert self.app.demo_keys is not None
        return {"X-API-Key": self.app.demo_keys.admin_key}


async def http_app(**env: str) -> Http:
    app = await started_app(make_settings(**env))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine.test")
    return Http(app, client)


@pytest.fixture
async def limited() -> AsyncIterator[Http]:
    """6 a minute (one token per 10 s), burst 5: nothing refills noticeably during a test."""
    http = await http_app(RATE_LIMIT_PER_MINUTE="6", RATE_LIMIT_BURST="5")
    async with http.client:
        yield http
    for step in reversed(http.app.lifecycle.shutdown):
        await step()


def limit_headers(response: httpx.Response) -> dict[str, str]:
    names = (
        "ratelimit-policy",
        "ratelimit",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    )
    return {name: response.headers[name] for name in names if name in response.headers}


_LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line: str) -> dict[str, str]:
    """name -> raw value (quotes kept, to check which values are quoted)."""
    return dict(_LOGFMT_PAIR.findall(line))


QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}


async def test_headers_on_authenticated_responses(limited: Http) -> None:
    client = limited.client
    first = await client.get("/api/v1/rates/AAPL", headers=limited.client_key)
    assert first.status_code == 200
    assert limit_headers(first) == {
        "ratelimit-policy": '"default";q=5;w=50',
        "ratelimit": '"default";r=4;t=10',
        "x-ratelimit-limit": "6",
        "x-ratelimit-remaining": "4",
        "x-ratelimit-reset": "10",
    }
    # Errors of authenticated requests carry them too, and every one costs a token.
    unknown = await client.get("/api/v1/rates/ZZZZQ", headers=limited.client_key)
    assert unknown.status_code == 404
    assert limit_headers(unknown)["ratelimit"] == '"default";r=3;t=20'
    invalid = await client.post(
        "/api/v1/calculate-locate", json={**QUOTE, "loan_days": 0}, headers=limited.client_key
    )
    assert invalid.status_code == 400
    assert invalid.headers["x-ratelimit-remaining"] == "2"
    quote = await client.post("/api/v1/calculate-locate", json=QUOTE, headers=limited.client_key)
    assert quote.status_code == 200
    assert quote.headers["x-ratelimit-remaining"] == "1"
    assert quote.headers["x-ratelimit-reset"] == "40"
    # Admin routes are charged to the admin client's own bucket.
    admin = await client.put("/api/v1/admin/volatility", json={"value": 20}, headers=limited.admin_key)
    assert admin.status_code == 200
    assert admin.headers["x-ratelimit-remaining"] == "4"


async def test_authenticated_requests_without_the_scope_are_charged(limited: Http) -> None:
    statuses = []
    for _ in range(6):
        response = await limited.client.put(
            "/api/v1/admin/volatility", json={"value": 20}, headers=limited.client_key
        )
        statuses.append(response.status_code)
        assert "x-ratelimit-remaining" in response.headers
    assert statuses == [403] * 5 + [429]


async def test_no_headers_on_open_routes(limited: Http) -> None:
    for path in ("/health", "/health/detailed", "/openapi.json"):
        response = await limited.client.get(path)
        assert response.status_code == 200
        assert limit_headers(response) == {}, path
    missing = await limited.client.get("/api/v1/rates/AAPL")
    assert missing.status_code == 401
    assert limit_headers(missing) == {}
    # Neither the open routes nor the refused credentials drained the client's bucket.
    ok = await limited.client.get("/api/v1/rates/AAPL", headers=limited.client_key)
    assert ok.headers["x-ratelimit-remaining"] == "4"


async def test_429_envelope_headers_and_log(limited: Http, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    for expected in range(4, -1, -1):
        response = await limited.client.get("/api/v1/rates/AAPL", headers=limited.client_key)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining"] == str(expected)
    refused = await limited.client.get(
        "/api/v1/rates/AAPL", headers={**limited.client_key, "X-Request-ID": "req-429"}
    )
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert retry_after == 10  # one token every 10 s
    assert refused.headers["content-type"].startswith("application/json")
    body = refused.json()
    assert body["status"] == "error"
    assert body["error_code"] == "RATE_LIMIT_EXCEEDED"
    assert body["request_id"] == "req-429" == refused.headers["x-request-id"]
    assert body["details"]["retry_after"] == retry_after
    assert limit_headers(refused) == {
        "ratelimit-policy": '"default";q=5;w=50',
        "ratelimit": '"default";r=0;t=50',
        "x-ratelimit-limit": "6",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "50",
    }
    records = [r for r in caplog.records if r.getMessage() == "Rate limit exceeded"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    line = LogfmtFormatter().format(record)
    parsed = parse_logfmt(line)
    assert parsed["level"] == "WARNING"
    assert parsed["msg"] == '"Rate limit exceeded"'
    assert parsed["client_id"] == '"demo_client"'
    assert parsed["endpoint"] == '"/api/v1/rates/{ticker}"'
    assert parsed["request_id"] == "req-429"
    assert limited.client_key["X-API-Key"] not in line
    # The other client is unaffected.
    admin = await limited.client.get("/api/v1/rates/AAPL", headers=limited.admin_key)
    assert admin.status_code == 200


async def test_429_log_line_matches_the_runbook_pattern(
    limited: Http, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    for _ in range(6):
        await limited.client.get("/api/v1/rates/AAPL", headers=limited.client_key)
    lines = [LogfmtFormatter().format(r) for r in caplog.records if r.name == "pricer.ratelimit"]
    assert len(lines) == 1
    assert 'level=WARNING msg="Rate limit exceeded"' in lines[0]


async def test_client_record_overrides_the_defaults() -> None:
    http = await http_app(RATE_LIMIT_PER_MINUTE="6", RATE_LIMIT_BURST="20")
    client, admin = http.client, http.admin_key
    fees = {"markup_percentage": 5, "transaction_fee_type": "FLAT", "transaction_amount": 25}
    async with client:
        # Both limits set.
        put = await client.put(
            "/api/v1/admin/clients/demo_client",
            json={**fees, "rate_limit_per_minute": 120, "burst": 3},
            headers=admin,
        )
        assert put.status_code == 200, put.text
        statuses = []
        for _ in range(4):
            response = await client.get("/api/v1/rates/AAPL", headers=http.client_key)
            statuses.append(response.status_code)
            assert response.headers["ratelimit-policy"] == '"default";q=3;w=2'
            assert response.headers["x-ratelimit-limit"] == "120"
        assert statuses == [200, 200, 200, 429]

        # Only the rate: the burst follows it. Only the burst: the default rate with that burst.
        for client_id, limits, policy, limit in (
            ("rate_only", {"rate_limit_per_minute": 4}, '"default";q=4;w=60', "4"),
            ("burst_only", {"burst": 2}, '"default";q=2;w=20', "6"),
        ):
            created = await client.put(
                f"/api/v1/admin/clients/{client_id}", json={**fees, **limits}, headers=admin
            )
            assert created.status_code == 201, created.text
            issued = await client.post("/api/v1/admin/keys", json={"client_id": client_id}, headers=admin)
            assert issued.status_code == 201, issued.text
            key = {"X-API-Key": issued.json()["api_key"]}
            burst = int(policy.split("q=")[1].split(";")[0])
            statuses = []
            for _ in range(burst + 1):
                response = await client.get("/api/v1/rates/AAPL", headers=key)
                statuses.append(response.status_code)
                assert response.headers["ratelimit-policy"] == policy
                assert response.headers["x-ratelimit-limit"] == limit
            assert statuses == [200] * burst + [429]


async def test_rate_limiting_disabled() -> None:
    http = await http_app(ENABLE_RATE_LIMITING="false", RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1")
    async with http.client:
        for _ in range(20):
            response = await http.client.get("/api/v1/rates/AAPL", headers=http.client_key)
            assert response.status_code == 200
            assert limit_headers(response) == {}
            assert "retry-after" not in response.headers


def batch(tickers: list[str]) -> dict[str, object]:
    return {
        "client_id": "demo_client",
        "positions": [{"ticker": t, "position_value": 1000, "loan_days": 10} for t in tickers],
    }


async def test_positions_bucket() -> None:
    http = await http_app(POSITIONS_LIMIT_PER_MINUTE="10")
    async with http.client:
        post = http.client.post
        url = "/api/v1/calculate-locate/batch"
        # More positions than the bucket can ever hold: no wait would admit it, so it is a 400.
        too_big = await post(url, json=batch(["AAPL"] * 11), headers=http.client_key)
        assert too_big.status_code == 400, too_big.text
        assert too_big.json()["validation_errors"][0]["field"] == "positions"

        # Nine rows, one unknown ticker and one invalid: seven priced, yet all nine drawn (every decoded
        # row costs work, priced or not: DESIGN §2.5).
        mixed = await post(url, json=batch(["AAPL"] * 7 + ["ZZZZQ", "!!"]), headers=http.client_key)
        assert mixed.status_code == 200, mixed.text
        assert mixed.json()["priced"] == 7
        assert len(mixed.json()["errors"]) == 2

        # One position left.
        two = await post(url, json=batch(["MSFT", "NVDA"]), headers=http.client_key)
        assert two.status_code == 429, two.text
        assert two.json()["error_code"] == "RATE_LIMIT_EXCEEDED"
        assert two.json()["details"]["bucket"] == "positions"
        # The headers describe the bucket that refused it, the positions bucket (10 a minute, one left,
        # a token every 6 s), not the request bucket that admitted the request.
        assert two.headers["x-ratelimit-limit"] == "10"
        assert two.headers["x-ratelimit-remaining"] == "1"
        assert two.headers["ratelimit-policy"].startswith('"positions";q=10;')
        assert two.headers["ratelimit"].startswith('"positions";r=1;')
        # One set of headers: the request bucket's must not ride along.
        for name in ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining"):
            assert len(two.headers.get_list(name)) == 1, name
        assert 1 <= int(two.headers["retry-after"]) <= 6
        assert 1 <= int(two.headers["x-ratelimit-reset"]) <= 60
        one = await post(url, json=batch(["MSFT"]), headers=http.client_key)
        assert one.status_code == 200
        assert (await post(url, json=batch(["MSFT"]), headers=http.client_key)).status_code == 429
        # Single quotes are not drawn from the positions bucket.
        single = await post("/api/v1/calculate-locate", json=QUOTE, headers=http.client_key)
        assert single.status_code == 200


async def test_invalid_rows_drain_the_positions_bucket() -> None:
    """A batch of nothing but invalid rows is not free: its rows are drawn as priced ones would be."""
    http = await http_app(POSITIONS_LIMIT_PER_MINUTE="10")
    async with http.client:
        url = "/api/v1/calculate-locate/batch"
        # 1e999 as written (beyond float range): a row error like the others.
        invalid = (
            b'{"client_id": "demo_client", "columns": {"ticker": ["!!", "AAPL", "AAPL"],'
            b' "position_value": [1, -5, 1e999], "loan_days": [1, 1, 1]}}'
        )
        headers = {**http.client_key, "content-type": "application/json"}
        for _ in range(3):  # 9 of 10 positions
            response = await http.client.post(url, content=invalid, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["priced"] == 0
            assert [error["field"] for error in response.json()["errors"]] == [
                "ticker",
                *["position_value"] * 2,
            ]
        rows = [{"ticker": "AAPL", "position_value": 1000, "loan_days": 0}] * 2
        refused = await http.client.post(
            url, json={"client_id": "demo_client", "positions": rows}, headers=http.client_key
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["details"]["bucket"] == "positions"
        assert refused.headers["x-ratelimit-remaining"] == "1"


async def test_without_authentication_the_named_client_is_charged() -> None:
    http = await http_app(ENABLE_AUTHENTICATION="false", RATE_LIMIT_PER_MINUTE="6", RATE_LIMIT_BURST="2")
    async with http.client:
        post = http.client.post
        first = await post("/api/v1/calculate-locate", json=QUOTE)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-remaining"] == "1"
        second = await http.client.get("/api/v1/calculate-locate", params=QUOTE)
        assert second.status_code == 200, second.text
        assert second.headers["x-ratelimit-remaining"] == "0"
        third = await post("/api/v1/calculate-locate", json=QUOTE)
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) >= 1
        batch_refused = await post("/api/v1/calculate-locate/batch", json=batch(["AAPL"]))
        assert batch_refused.status_code == 429
        # Another client named in the body has its own bucket.
        other = await post("/api/v1/calculate-locate", json={**QUOTE, "client_id": "xyz123"})
        assert other.status_code == 200
        assert other.headers["x-ratelimit-remaining"] == "1"
