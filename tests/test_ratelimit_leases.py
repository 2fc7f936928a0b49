"""Leases of the Redis limiter (pricer.ratelimit.leases): a busy client's decisions are granted from tokens
taken out of its shared bucket in advance, and this never admits more than the bucket allows.

Against the real Redis on 127.0.0.1:6379 (unique keys per test); the replicas are real processes.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pricer.ratelimit.buckets import BucketSpec
from pricer.ratelimit.leases import LEASE_SECONDS, MAX_LEASE, lease_size
from pricer.ratelimit.redis import RedisLimiter
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.anyio

SHARED_REDIS = "redis://127.0.0.1:6379/14"

# One replica: decides one bucket as fast as it can for `seconds`, prints what it granted, then closes
# (or is killed with what it holds).
REPLICA = """
import asyncio, os, signal, sys, time
import redis.asyncio as aioredis
from pricer.ratelimit.buckets import BucketSpec
from pricer.ratelimit.redis import RedisLimiter

async def main() -> None:
    url, key, per_minute, capacity, replicas, seconds, end = sys.argv[1:8]
    limiter = RedisLimiter(aioredis.Redis.from_url(url), expected_replicas=int(replicas), budget_seconds=2.0)
    await limiter.warm_up()
    spec = BucketSpec(key, int(per_minute), int(capacity))
    granted = asked = 0
    stop = time.monotonic() + float(seconds)
    while time.monotonic() < stop:
        decision = await limiter.acquire(spec)
        asked += 1
        granted += decision.allowed
    print(granted, asked, limiter.round_trips, limiter.local_decisions, flush=True)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    await limiter.close()

asyncio.run(main())
"""


def replica(
    key: str, per_minute: int, capacity: int, replicas: int, seconds: float, end: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            REPLICA,
            SHARED_REDIS,
            key,
            str(per_minute),
            str(capacity),
            str(replicas),
            str(seconds),
            end,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def counts(process: subprocess.Popen[str]) -> tuple[int, int, int, int]:
    out, _ = process.communicate(timeout=60)
    granted, asked, trips, local = (int(part) for part in out.split())
    return granted, asked, trips, local


@pytest.fixture
async def inspector() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(SHARED_REDIS, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def tokens_in(inspector: aioredis.Redis, key: str) -> float:
    state = await inspector.get(key)
    match = re.fullmatch(r"(\d+\.\d{6}):(\d+)", state or "")
    assert match is not None, state
    return float(match.group(1))


def a_key() -> str:
    return f"ratelimit:lease-{uuid.uuid4().hex}"


def test_lease_size_is_a_small_part_of_the_burst() -> None:
    assert lease_size(BucketSpec("k", 60, 60), 1) == 0  # the default limit is decided call by call
    assert lease_size(BucketSpec("k", 6000, 399), 1) == 0
    assert lease_size(BucketSpec("k", 6000, 400), 1) == 2
    assert lease_size(BucketSpec("k", 6000, 4000), 2) == 10
    assert lease_size(BucketSpec("k", 10**7, 10**7), 4) == MAX_LEASE
    for capacity in (400, 1000, 4000, 12_345, 10**6):
        for deciders in (1, 2, 3, 8):
            # One and a half leases per decider, all deciders together: under 1 % of the burst.
            assert 1.5 * lease_size(BucketSpec("k", 60, capacity), deciders) * deciders < 0.01 * capacity


async def test_two_replicas_never_admit_more_than_the_bucket(inspector: aioredis.Redis) -> None:
    """Two processes drain one bucket of 4,000 (100 tokens a second) for 1.5 s: together they grant what the
    bucket holds plus its refill, never more, and all but the leases' share of it."""
    key = a_key()
    capacity, per_minute = 4000, 6000
    started = time.monotonic()
    processes = [replica(key, per_minute, capacity, 2, 1.5, "close") for _ in range(2)]
    results = [counts(process) for process in processes]
    elapsed = time.monotonic() - started
    granted = sum(result[0] for result in results)
    assert all(result[3] == 0 for result in results), results  # no local decision: all paid in Redis
    assert granted <= capacity + per_minute / 60 * elapsed, (granted, elapsed, results)
    assert granted >= capacity * 0.99, (granted, results)
    # Both closed: nothing leased is left out of the bucket (it holds what refilled since it was drained).
    assert await tokens_in(inspector, key) <= per_minute / 60 * elapsed


async def test_a_busy_client_costs_a_round_trip_per_lease(inspector: aioredis.Redis) -> None:
    limiter = RedisLimiter(aioredis.Redis.from_url(SHARED_REDIS), expected_replicas=1, budget_seconds=2.0)
    try:
        spec = BucketSpec(a_key(), per_minute=1, capacity=100_000)  # no refill to speak of
        decisions = [await limiter.acquire(spec) for _ in range(2000)]
        assert all(d.allowed and not d.local for d in decisions)
        # One process, so its headers count down one by one as one exact bucket's would.
        assert [d.remaining for d in decisions] == list(range(99_999, 97_999, -1))
        assert limiter.round_trips <= 2 * 2000 // MAX_LEASE + 2, limiter.round_trips
        # Redis holds the bucket less what was granted and what this process holds.
        held = 100_000 - 2000 - await tokens_in(inspector, spec.key)
        assert 0 < held <= 1.5 * MAX_LEASE
    finally:
        await limiter.close()
    # Closed: the unused tokens are back.
    assert await tokens_in(inspector, spec.key) == pytest.approx(100_000 - 2000, abs=1)


async def test_an_idle_lease_goes_back_to_the_bucket(inspector: aioredis.Redis) -> None:
    limiter = RedisLimiter(aioredis.Redis.from_url(SHARED_REDIS), expected_replicas=1, budget_seconds=2.0)
    try:
        spec = BucketSpec(a_key(), per_minute=1, capacity=100_000)
        assert (await limiter.acquire(spec)).allowed
        assert await tokens_in(inspector, spec.key) < 100_000 - 1 - 1  # a lease was taken
        for _ in range(int(LEASE_SECONDS * 50)):  # the sweep runs every LEASE_SECONDS
            if await tokens_in(inspector, spec.key) >= 100_000 - 1 - 0.5:
                break
            await asyncio.sleep(0.1)
        assert await tokens_in(inspector, spec.key) == pytest.approx(100_000 - 1, abs=0.5)
        assert not limiter._leases.held
        assert not limiter._leases.refunds
    finally:
        await limiter.close()


async def test_a_killed_replica_loses_at_most_its_leases(inspector: aioredis.Redis) -> None:
    """SIGKILL gives nothing back: the bucket is short of what the process held, at most one and a half
    leases, which the bucket's refill brings back."""
    key = a_key()
    capacity = 10_000_000  # more than 0.3 s of decisions from leases on a fast machine (~400,000 a second)
    granted, asked, _, local = counts(replica(key, 1, capacity, 1, 0.3, "kill"))
    assert local == 0
    assert granted == asked
    lost = capacity - granted - await tokens_in(inspector, key)
    assert 0 < lost <= 1.5 * MAX_LEASE + 1, lost


async def test_small_buckets_are_decided_call_by_call(inspector: aioredis.Redis) -> None:
    limiter = RedisLimiter(aioredis.Redis.from_url(SHARED_REDIS), expected_replicas=1, budget_seconds=2.0)
    try:
        spec = BucketSpec(a_key(), per_minute=60, capacity=60)
        for count in range(1, 11):
            assert (await limiter.acquire(spec)).allowed
            assert await tokens_in(inspector, spec.key) == pytest.approx(60 - count, abs=0.2)
        assert limiter.round_trips == 10
    finally:
        await limiter.close()


async def test_a_lease_is_spent_while_redis_is_away(tmp_path: Path) -> None:
    """Redis dies while a replica holds a lease: its tokens are paid for, so they are granted as shared
    decisions; then the replica decides locally (its share), as without leases."""
    with PrivateRedis(tmp_path / "redis") as server:
        limiter = RedisLimiter(aioredis.Redis.from_url(server.url), expected_replicas=2, budget_seconds=0.05)
        try:
            spec = BucketSpec("ratelimit:away", per_minute=1, capacity=200_000)
            size = lease_size(spec, 2)
            assert (await limiter.acquire(spec)).allowed
            server.kill()
            decisions = []
            for _ in range(size + 20):
                decisions.append(await limiter.acquire(spec))
                await asyncio.sleep(0)  # a refill at half the lease finds Redis gone
            assert all(d.allowed for d in decisions)
            assert [d.local for d in decisions] == [False] * size + [True] * 20
            assert limiter.degraded
        finally:
            await limiter.close()
