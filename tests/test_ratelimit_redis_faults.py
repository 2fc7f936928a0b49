"""Redis dies under traffic and comes back (DESIGN §2.5): a private redis-server is SIGKILLed for real.

Every request is still answered (200 or 429, never 5xx) promptly, limits are enforced locally at this
replica's share, /health/detailed reports Redis unhealthy and the engine degraded (HTTP 200), and after a
restart on the same port decisions are shared again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pricer.app import PricerApp
from pricer.backends import build_limiter, redis_client
from pricer.ratelimit.buckets import BucketSpec, Decision
from pricer.ratelimit.redis import BUCKET_SCRIPT, EPOCH_KEY, RedisLimiter
from tests.conftest import TEST_SECRETS, free_port, make_settings, started_app
from tests.redis_server import DelayProxy, PrivateRedis

pytestmark = pytest.mark.anyio

PER_MINUTE = 60
BURST = 30
REPLICAS = 3
DEADLINE = 1.0  # a functional deadline for each answer, not a speed measurement


@dataclass
class Rig:
    server: PrivateRedis
    app: PricerApp
    limiter: RedisLimiter
    client: httpx.AsyncClient
    headers: dict[str, str]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        app = await started_app(
            make_settings(
                REDIS_URL=server.url,
                RATE_LIMIT_PER_MINUTE=str(PER_MINUTE),
                RATE_LIMIT_BURST=str(BURST),
                EXPECTED_REPLICAS=str(REPLICAS),
            )
        )
        assert app.backends is not None
        limiter = app.backends.limiter
        assert isinstance(limiter, RedisLimiter)
        # Open the pooled connection first, as /health/detailed would: the first decision of a cold
        # client is tested on its own below.
        await limiter.ping()
        assert app.demo_keys is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
            yield Rig(server, app, limiter, client, {"X-API-Key": app.demo_keys.client_key})
        for step in reversed(app.lifecycle.shutdown):
            await step()
    finally:
        server.kill()


@dataclass
class Traffic:
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    missing_headers: int = 0


async def send_traffic(rig: Rig, seconds: float, workers: int = 4, pause: float = 0.02) -> Traffic:
    traffic = Traffic()
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            started = time.monotonic()
            response = await rig.client.get("/api/v1/rates/AAPL", headers=rig.headers)
            traffic.latencies.append(time.monotonic() - started)
            traffic.statuses.append(response.status_code)
            if "ratelimit" not in response.headers or "x-ratelimit-limit" not in response.headers:
                traffic.missing_headers += 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return traffic


def state_of(server: PrivateRedis, key: str) -> str | None:
    with server.client() as probe:
        value = probe.get(key)
    return value.decode() if isinstance(value, bytes) else None


async def test_redis_killed_under_traffic_then_restarted(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    limiter = rig.limiter

    # Shared decisions while Redis is up: the state is in Redis. (A single decision may still go local
    # on a CPU-starved machine, within the 5 ms budget's rules: counted, not forbidden, here.)
    for _ in range(3):
        response = await rig.client.get("/api/v1/rates/AAPL", headers=rig.headers)
        assert response.status_code == 200
        assert int(response.headers["x-ratelimit-remaining"]) < BURST
    assert limiter.shared_decisions >= 1
    state = state_of(rig.server, "ratelimit:demo_client")
    assert state is not None
    assert re.fullmatch(r"\d+\.\d{6}:\d+", state)

    # Crash Redis (SIGKILL) and keep the traffic coming.
    warnings_before = degraded_warnings(caplog)
    rig.server.kill()
    started = time.monotonic()
    outage = await send_traffic(rig, seconds=2.0)
    elapsed = time.monotonic() - started

    assert set(outage.statuses) <= {200, 429}, sorted(set(outage.statuses))
    assert max(outage.latencies) < DEADLINE, max(outage.latencies)
    assert outage.missing_headers == 0
    admitted = outage.statuses.count(200)
    share_burst = round(BURST / REPLICAS)
    share_rate = round(PER_MINUTE / REPLICAS) / 60
    assert 1 <= admitted <= share_burst + share_rate * elapsed + 1, (admitted, len(outage.statuses))
    assert outage.statuses.count(429) >= len(outage.statuses) - admitted > 0
    assert limiter.local_decisions >= len(outage.statuses)
    # The breaker logs when it opens, not for every request.
    assert 1 <= degraded_warnings(caplog) - warnings_before <= math.ceil(elapsed) + 2

    # Health: Redis unhealthy, the engine degraded (limits enforced locally), still HTTP 200.
    health_started = time.monotonic()
    detailed = await rig.client.get("/health/detailed")
    assert time.monotonic() - health_started < 5
    assert detailed.status_code == 200, detailed.text
    body = detailed.json()
    assert body["status"] == "degraded"
    assert body["dependencies"]["redis"]["status"] == "unhealthy"
    assert (await rig.client.get("/health")).status_code == 200

    # Redis comes back on the same port: after the cool-down, decisions are shared again.
    rig.server.start()
    assert state_of(rig.server, "ratelimit:demo_client") is None  # a new, empty server
    recovery_deadline = time.monotonic() + 15
    while True:
        shared_before = limiter.shared_decisions
        response = await rig.client.get("/api/v1/rates/AAPL", headers=rig.headers)
        assert response.status_code in (200, 429)
        if limiter.shared_decisions > shared_before and not limiter.degraded:
            break
        assert time.monotonic() < recovery_deadline, "decisions never became shared again"
        await asyncio.sleep(0.1)
    state = state_of(rig.server, "ratelimit:demo_client")
    assert state is not None
    assert re.fullmatch(r"\d+\.\d{6}:\d+", state), state

    recovered = await rig.client.get("/health/detailed")
    assert recovered.status_code == 200
    assert recovered.json()["dependencies"]["redis"]["status"] == "healthy"
    assert recovered.json()["status"] != "unhealthy"


# ---- a Redis a network hop away, or slow ----------------------------------------------------------


async def settle_calls(limiter: RedisLimiter) -> None:
    """Wait for the call in flight, if any."""
    for _ in range(500):
        if not limiter._flushing:
            break
        await asyncio.sleep(0.01)


async def settle(limiter: RedisLimiter) -> None:
    """Let the call in flight finish before the client closes, so no task outlives the test."""
    await settle_calls(limiter)
    await limiter.close()


def degraded_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage() == "Rate limiter degraded: deciding locally" for r in caplog.records)


async def test_a_warm_decision_is_one_round_trip(tmp_path: Path) -> None:
    """Once connected and with the script loaded, each call is a single round trip (one write to the
    server, whatever it decides), so a Redis ~2 ms away fits the 5 ms budget; the next test is about the
    calls before that."""
    with PrivateRedis(tmp_path / "redis") as server:
        with server.client() as direct:
            direct.script_load(BUCKET_SCRIPT)
        async with DelayProxy(server.port, delay=0.002) as proxy:
            limiter = build_limiter(make_settings(REDIS_URL=proxy.url, EXPECTED_REPLICAS="3"))
            assert isinstance(limiter, RedisLimiter)
            try:
                await limiter.ping()
                spec = BucketSpec("ratelimit:near", per_minute=600, capacity=100)
                chunks, trips = proxy.chunks, limiter.round_trips
                for _ in range(20):
                    await limiter.acquire(spec)
                    await asyncio.sleep(0.005)
                await settle_calls(limiter)
                assert limiter.round_trips - trips >= 1
                assert proxy.chunks - chunks == limiter.round_trips - trips
            finally:
                await settle(limiter)


async def test_fresh_engine_first_decision_is_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    with PrivateRedis(tmp_path / "redis") as server:
        async with DelayProxy(server.port, delay=0.002) as proxy:
            app = await started_app(
                make_settings(
                    REDIS_URL=proxy.url,
                    RATE_LIMIT_PER_MINUTE="60",
                    RATE_LIMIT_BURST="30",
                    EXPECTED_REPLICAS="3",
                )
            )
            assert app.backends is not None
            limiter = app.backends.limiter
            assert isinstance(limiter, RedisLimiter)
            assert app.demo_keys is not None
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
                    response = await client.get(
                        "/api/v1/rates/AAPL", headers={"X-API-Key": app.demo_keys.client_key}
                    )
                assert response.status_code == 200
                # The shared bucket of 30 (a local decision reports its third of it: 27).
                assert response.headers["x-ratelimit-remaining"] == "29"
                assert limiter.local_decisions == 0
                assert degraded_warnings(caplog) == 0
            finally:
                await settle_calls(limiter)
                for step in reversed(app.lifecycle.shutdown):
                    await step()


async def test_slow_redis_keeps_the_breaker_open_for_the_cooldown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    with PrivateRedis(tmp_path / "redis") as server:
        with server.client() as direct:
            direct.script_load(BUCKET_SCRIPT)
        async with DelayProxy(server.port, delay=0.03) as proxy:
            # Every round trip now takes ~30 ms; the budget is 5 ms and the cool-down 1 s.
            limiter = build_limiter(make_settings(REDIS_URL=proxy.url, EXPECTED_REPLICAS="3"))
            assert isinstance(limiter, RedisLimiter)
            try:
                await limiter.ping()
                spec = BucketSpec("ratelimit:slow", per_minute=600, capacity=100)
                # One slow call is not yet an outage (its decisions are local, the replica not degraded);
                # two in a row (each still unanswered after 4 budgets) open the breaker.
                first = await limiter.acquire(spec)
                assert first.local
                await settle_calls(limiter)  # its reply, ~30 ms late
                assert not limiter.degraded
                second = await limiter.acquire(spec)
                assert second.local
                await settle_calls(limiter)
                assert limiter.degraded
                assert limiter.overdue_calls == 2
                opened = time.monotonic()
                states, waits = [], []
                while time.monotonic() < opened + 0.5:  # well inside the cool-down
                    states.append(limiter.degraded)
                    started = time.monotonic()
                    decision = await limiter.acquire(spec)
                    waits.append(time.monotonic() - started)
                    assert decision.local
                    await asyncio.sleep(0.01)
                assert all(states), f"breaker closed {states.count(False)} times in 0.5 s"
                # A decision that waited for Redis takes its ~30 ms round trip; a local one returns at once
                # (20 ms leaves room for a loaded machine's scheduling).
                assert sum(wait >= 0.02 for wait in waits) == 0, "decisions waited for a slow Redis"
                assert degraded_warnings(caplog) == 1
            finally:
                await settle(limiter)


# ---- local decisions that start from what is known (issue 16) ------------------------------------


class FakeClock:
    """The limiter's clock (breaker and local buckets); Redis and the event loop keep real time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def quick_client(url: str, **options: float) -> aioredis.Redis:
    """No retries, so that a dead Redis answers each call with an error at once."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0), **options)


async def shared_until_empty(limiter: RedisLimiter, spec: BucketSpec, grants: int) -> None:
    decisions = [await limiter.acquire(spec) for _ in range(grants)]
    assert not any(d.local for d in decisions)
    assert all(d.allowed for d in decisions)


def tokens_in(server: PrivateRedis, key: str) -> float:
    state = state_of(server, key)
    assert state is not None
    match = re.fullmatch(r"(\d+\.\d{6}):(\d+)", state)
    assert match is not None, state
    return float(match.group(1))


async def test_local_decisions_start_from_what_redis_said(tmp_path: Path) -> None:
    """Redis dies right after a client emptied its bucket: the replica's local bucket starts from that
    empty bucket (scaled to its share), not full, and refills at the share's rate."""
    clock = FakeClock()
    server = PrivateRedis(tmp_path / "redis").start()
    limiter = RedisLimiter(quick_client(server.url), expected_replicas=2, budget_seconds=2.0, clock=clock)
    try:
        spec = BucketSpec("ratelimit:emptied", per_minute=60, capacity=60)  # share: 30 a minute, 30 burst
        await shared_until_empty(limiter, spec, 60)
        server.kill()
        during = [await limiter.acquire(spec) for _ in range(10)]
        assert all(d.local for d in during)
        assert limiter.degraded
        assert sum(d.allowed for d in during) == 0, "the local bucket started full"
        clock.advance(4.0)  # half a token a second at the share's rate
        later = [await limiter.acquire(spec) for _ in range(5)]
        assert all(d.local for d in later)
        assert sum(d.allowed for d in later) == 2
    finally:
        server.kill()
        await limiter.close()


async def test_the_share_is_never_more_than_its_fraction() -> None:
    """20 a minute over 3 replicas: 6 each (6.67 rounded down), never 7."""
    client = quick_client(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RedisLimiter(client, expected_replicas=3)
    try:
        spec = BucketSpec("ratelimit:thirds", per_minute=20, capacity=20)
        decisions = [await limiter.acquire(spec) for _ in range(10)]
        assert all(d.local for d in decisions)
        assert decisions[0].spec == BucketSpec("ratelimit:thirds", per_minute=6, capacity=6)
        assert sum(d.allowed for d in decisions) == 6
    finally:
        await limiter.close()


async def test_each_worker_decides_locally_on_its_part_of_the_replica_share() -> None:
    """With WORKERS=2 each worker has its own limiter and decides locally on its own: each enforces
    1 / (EXPECTED_REPLICAS x WORKERS) of a limit, so the replica as a whole stays within its share."""
    settings = make_settings(
        **TEST_SECRETS,
        DATABASE_URL="postgresql://postgres@127.0.0.1:5432/test",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: every decision is local
        EXPECTED_REPLICAS="3",
        WORKERS="2",
    )
    limiter = build_limiter(settings, quick_client(settings.redis_url or ""))
    assert isinstance(limiter, RedisLimiter)
    try:
        spec = BucketSpec("ratelimit:workers", per_minute=120, capacity=60)
        decisions = [await limiter.acquire(spec) for _ in range(30)]
        assert all(d.local for d in decisions)
        # A sixth of the limit per worker; two workers grant 20, a third of the burst.
        assert decisions[0].spec == BucketSpec("ratelimit:workers", per_minute=20, capacity=10)
        assert sum(d.allowed for d in decisions) == 10
    finally:
        await limiter.close()


async def test_a_debt_is_charged_to_a_bucket_that_expired_meanwhile(tmp_path: Path) -> None:
    """Redis is away for a while and comes back with its data (the epoch is old) but without the
    client's bucket, which expired meanwhile: what this replica granted locally is still charged, so
    the bucket does not start full and the outage adds no grants beyond the share."""
    clock = FakeClock()
    server = PrivateRedis(tmp_path / "redis").start()
    limiter = RedisLimiter(quick_client(server.url), expected_replicas=1, budget_seconds=2.0, clock=clock)
    try:
        spec = BucketSpec("ratelimit:expired", per_minute=60, capacity=10)

        def old_epoch() -> None:
            with server.client() as direct:
                seconds, micros = direct.time()
                direct.set(EPOCH_KEY, str((seconds - 3600) * 1_000_000 + micros))

        old_epoch()
        await shared_until_empty(limiter, spec, 2)  # 8 tokens left
        server.kill()
        during = [await limiter.acquire(spec) for _ in range(5)]
        assert all(d.local for d in during)
        assert all(d.allowed for d in during)  # 5 granted locally: owed to Redis
        server.start()
        old_epoch()  # as a Redis that kept its data would: the epoch survived, the bucket expired
        assert state_of(server, spec.key) is None
        clock.advance(2.0)  # past the cool-down
        after = await limiter.acquire(spec)
        assert not after.local
        assert after.allowed
        # A full bucket (10) less the 5 owed, less this decision; the old script charged nothing: 9.
        assert tokens_in(server, spec.key) == pytest.approx(4.0, abs=0.01)
    finally:
        server.kill()
        await limiter.close()


async def test_a_restarted_redis_does_not_hand_out_a_fresh_burst(tmp_path: Path) -> None:
    """Redis restarts empty: the first shared decision of a bucket starts from this replica's estimate of
    it (its local bucket scaled back up), not from a full bucket."""
    clock = FakeClock()
    server = PrivateRedis(tmp_path / "redis").start()
    limiter = RedisLimiter(quick_client(server.url), expected_replicas=2, budget_seconds=2.0, clock=clock)
    try:
        spec = BucketSpec("ratelimit:restarted", per_minute=60, capacity=60)
        with server.client() as direct:
            # Redis has held its data for an hour: no estimates go with the calls until it fails.
            seconds, micros = direct.time()
            direct.set(EPOCH_KEY, str((seconds - 3600) * 1_000_000 + micros))
        await shared_until_empty(limiter, spec, 60)
        assert not limiter._seeding
        server.kill()
        assert not any([(await limiter.acquire(spec)).allowed for _ in range(5)])
        assert limiter.degraded
        server.start()
        assert state_of(server, spec.key) is None  # a new, empty server
        clock.advance(2.0)  # past the cool-down; the local share got one token back (0.5 a second)
        after = [await limiter.acquire(spec) for _ in range(5)]
        assert not any(d.local for d in after)
        assert not limiter.degraded
        # The estimate: one share token is two of the shared bucket's, plus what Redis's own clock refilled
        # in the meantime (a second's worth at most on a loaded machine).
        assert sum(d.allowed for d in after) <= 3, [d.tokens for d in after]
        assert tokens_in(server, spec.key) < 2.0
    finally:
        server.kill()
        await limiter.close()


async def test_a_deleted_bucket_is_full_again(tmp_path: Path) -> None:
    """The estimate only stands in for a bucket Redis lost with its data: once Redis has held its data
    for longer than the bucket takes to refill, a missing bucket (expired, or deleted by an operator to
    reset a client) is full, whatever this replica last knew of it."""
    clock = FakeClock()
    with PrivateRedis(tmp_path / "redis") as server:
        limiter = RedisLimiter(quick_client(server.url), expected_replicas=2, budget_seconds=2.0, clock=clock)
        try:
            spec = BucketSpec("ratelimit:reset", per_minute=600, capacity=5)  # refills in 0.5 s
            await shared_until_empty(limiter, spec, 5)
            with server.client() as direct:
                assert direct.get(EPOCH_KEY) is not None
            await asyncio.sleep(1.6)  # the data is older than the refill time and a second
            with server.client() as direct:
                direct.delete(spec.key)
            reset = await limiter.acquire(spec)
            assert not reset.local
            assert reset.remaining == 4
        finally:
            await limiter.close()


async def test_tokens_granted_locally_are_charged_to_redis_on_recovery(tmp_path: Path) -> None:
    """A hung Redis (SIGSTOP, connections open): decisions go local within the budget from what Redis last
    said, the call that never answers opens the breaker, and once Redis answers again what was granted
    locally is charged to the shared bucket: no extra grants across the outage."""
    clock = FakeClock()
    server = PrivateRedis(tmp_path / "redis").start()
    limiter = RedisLimiter(quick_client(server.url), expected_replicas=1, budget_seconds=0.05, clock=clock)
    try:
        spec = BucketSpec("ratelimit:owed", per_minute=1, capacity=10)  # Redis refills ~nothing meanwhile
        await shared_until_empty(limiter, spec, 5)
        server.pause()
        try:
            started = time.monotonic()
            during = [await limiter.acquire(spec) for _ in range(7)]
            assert time.monotonic() - started < 2.0  # the budget (50 ms), not the hung call
            assert all(d.local for d in during)
            assert sum(d.allowed for d in during) == 5, "local decisions ignored what Redis said"
            await asyncio.sleep(0.5)  # past the stall limit (0.25 s): the breaker is open
            assert limiter.degraded
        finally:
            server.resume()
        await settle_calls(limiter)  # the hung call is answered now (Redis charged its decision)
        clock.advance(2.0)  # past the cool-down
        after = await limiter.acquire(spec)
        assert not after.local
        assert not after.allowed, f"{after.tokens} tokens left after 5 + 5 of 10 were granted"
        assert tokens_in(server, spec.key) < 0.1
    finally:
        server.kill()
        await limiter.close()


async def test_a_busy_event_loop_is_not_a_slow_redis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The event loop is blocked for up to 30 ms at a time (a CPU-bound request, CPU contention) while 20
    clients' decisions go to a healthy Redis: the budget (10 ms here) watches Redis, not the loop, so no
    decision is taken locally and the breaker never opens."""
    caplog.set_level(logging.WARNING, logger="pricer.ratelimit")
    with PrivateRedis(tmp_path / "redis") as server:
        limiter = RedisLimiter(
            redis_client(server.url), expected_replicas=2, budget_seconds=0.01, stall_limit_seconds=1.0
        )
        await limiter.warm_up()
        await limiter.ping()
        loop = asyncio.get_running_loop()
        rng = random.Random(16)
        busy = True

        def block() -> None:
            if busy:
                time.sleep(rng.uniform(0, 0.03))
                loop.call_later(rng.uniform(0, 0.004), block)

        async def client(number: int) -> list[Decision]:
            # A burst too small to lease from: every decision goes to Redis.
            spec = BucketSpec(f"ratelimit:busy{number}", per_minute=60_000, capacity=300)
            decisions = []
            for _ in range(25):
                decisions.append(await limiter.acquire(spec))
                await asyncio.sleep(rng.uniform(0, 0.005))
            return decisions

        loop.call_soon(block)
        try:
            decisions = [d for batch in await asyncio.gather(*(client(n) for n in range(20))) for d in batch]
        finally:
            busy = False
        try:
            assert limiter.late_watches > 0  # the loop was late, and that was seen
            assert degraded_warnings(caplog) == 0
            # An isolated late reply from Redis itself (this machine is shared) may still put one call's
            # decisions local; a late loop must not.
            assert limiter.overdue_calls <= 1, (limiter.overdue_calls, limiter.local_decisions)
            assert sum(d.local for d in decisions) <= 20
        finally:
            await settle(limiter)
