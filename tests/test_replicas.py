"""Three real replicas (`python -m pricer serve`) share one client's limit through the real Redis.

The shared Redis on 127.0.0.1:6379 is used (a database of its own, the client's keys deleted first) and
never stopped. The client is `admin`, whose BOOTSTRAP_ADMIN_KEY every replica accepts.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import string
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = 13
PER_MINUTE = 120
BURST = 10
REPLICAS = 3
HAMMER_SECONDS = 3.0
WORKERS = 3


def bootstrap_key() -> str:
    key_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"bre_{key_id}_{secret}"


@dataclass
class Answer:
    replica: int
    status: int
    headers: httpx.Headers


@pytest.fixture
def replicas(tmp_path: Path) -> list[RunningServer]:
    env = {
        "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "BOOTSTRAP_ADMIN_KEY": bootstrap_key(),
        "RATE_LIMIT_PER_MINUTE": str(PER_MINUTE),
        "RATE_LIMIT_BURST": str(BURST),
        "EXPECTED_REPLICAS": str(REPLICAS),
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "LOG_LEVEL": "WARNING",
    }
    directories = [tmp_path / f"replica{i}" for i in range(REPLICAS)]
    for directory in directories:
        directory.mkdir()
    with ThreadPoolExecutor(REPLICAS) as pool:
        futures = [pool.submit(start_server, directory, **env) for directory in directories]
    servers = []
    errors = []
    for future in futures:
        try:
            servers.append(future.result())
        except RuntimeError as error:
            errors.append(error)
    try:
        if errors:
            raise errors[0]
        for server in servers:
            server.keys["ADMIN"] = env["BOOTSTRAP_ADMIN_KEY"]
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.terminate()
        for server in servers:
            stop_server(server)


def rate_limit_keys() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2)


async def test_three_replicas_share_one_limit(replicas: list[RunningServer]) -> None:
    headers = {"X-API-Key": replicas[0].keys["ADMIN"]}
    async with httpx.AsyncClient(timeout=10) as client:
        # Warm each replica's Redis connection and script (a fresh replica's very first decision is a
        # separate matter, tested in test_ratelimit_redis_faults), then start from a full bucket.
        for server in replicas:
            assert (await client.get(f"{server.base_url}/health/detailed")).status_code == 200
            warm = await client.get(f"{server.base_url}/api/v1/rates/AAPL", headers=headers)
            assert warm.status_code == 200, warm.text
        await asyncio.sleep(0.2)
        for server in replicas:
            detailed = (await client.get(f"{server.base_url}/health/detailed")).json()
            assert detailed["dependencies"]["redis"]["status"] == "healthy", detailed
        with rate_limit_keys() as store:
            store.delete("ratelimit:admin", "ratelimit:admin:positions")
        local_before = [await local_decisions(client, server) for server in replicas]

        answers: list[Answer] = []
        turn = 0
        started = time.monotonic()
        stop = started + HAMMER_SECONDS

        async def worker() -> None:
            nonlocal turn
            while time.monotonic() < stop:
                replica = turn % REPLICAS
                turn += 1
                response = await client.get(
                    f"{replicas[replica].base_url}/api/v1/rates/AAPL", headers=headers
                )
                answers.append(Answer(replica, response.status_code, response.headers))
                await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        elapsed = time.monotonic() - started
        local_after = [await local_decisions(client, server) for server in replicas]

        with rate_limit_keys() as store:
            state = store.get("ratelimit:admin")
            assert state is not None
            assert re.fullmatch(rb"\d+\.\d{6}:\d+", state), state

    statuses = {answer.status for answer in answers}
    assert statuses <= {200, 429}, statuses
    admitted = sum(answer.status == 200 for answer in answers)
    local = [after - before for after, before in zip(local_after, local_before, strict=True)]
    # The shared bucket admits at most its burst plus the refill. A replica whose Redis call overran the
    # 5 ms budget (a CPU-starved machine is enough) decides locally from its own share of the limit
    # (DESIGN §2.5), which can add at most that share's burst and refill, and only when it did so.
    share_capacity = round(BURST / REPLICAS)
    share_rate = round(PER_MINUTE / REPLICAS) / 60
    allowance = sum(min(count, share_capacity + share_rate * elapsed) for count in local)
    bound = BURST + PER_MINUTE / 60 * elapsed + 1 + allowance
    report = (
        f"admitted {admitted} of {len(answers)} in {elapsed:.2f} s (bound {bound:.1f}, of which "
        f"{allowance:.1f} for local decisions {local})"
    )
    print(report)
    assert BURST <= admitted <= bound, report
    # Not one bucket per replica (which would admit about REPLICAS times as much).
    assert admitted < REPLICAS * BURST, report
    for replica in range(REPLICAS):
        mine = [answer for answer in answers if answer.replica == replica]
        assert len(mine) > 20
        assert any(answer.status == 429 for answer in mine), f"replica {replica} never refused"
        for answer in mine:
            check_headers(answer, shared_only=local[replica] == 0)


def check_headers(answer: Answer, *, shared_only: bool) -> None:
    """Headers of the shared limit; or, for a decision taken locally (Redis late), of this replica's share
    (1/REPLICAS of the limit), which is the limit that decision enforced."""
    h = answer.headers
    limits = [(BURST, PER_MINUTE)]
    if not shared_only:
        limits.append((max(1, round(BURST / REPLICAS)), max(1, round(PER_MINUTE / REPLICAS))))
    capacity, per_minute = next(
        (limit for limit in limits if h["x-ratelimit-limit"] == str(limit[1])), (None, None)
    )
    assert capacity is not None, dict(h)
    assert per_minute is not None
    refill_window = math.ceil(capacity * 60 / per_minute)
    assert h["ratelimit-policy"] == f'"default";q={capacity};w={refill_window}'
    match = re.fullmatch(r'"default";r=(\d+);t=(\d+)', h["ratelimit"])
    assert match is not None, h["ratelimit"]
    remaining, reset = int(match.group(1)), int(match.group(2))
    assert h["x-ratelimit-remaining"] == str(remaining)
    assert h["x-ratelimit-reset"] == str(reset)
    assert 0 <= remaining <= capacity - 1
    assert 1 <= reset <= refill_window
    if answer.status == 429:
        assert remaining == 0
        assert 1 <= int(h["retry-after"]) <= 1 + math.ceil(60 / per_minute)
    else:
        assert "retry-after" not in h


async def local_decisions(client: httpx.AsyncClient, server: RunningServer) -> int:
    detailed = (await client.get(f"{server.base_url}/health/detailed")).json()
    value = detailed["dependencies"]["redis"]["detail"].get("local_decisions", 0)
    assert isinstance(value, int)
    return value
