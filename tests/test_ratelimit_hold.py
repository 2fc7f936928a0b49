"""Limits that hold (issue 16, item 4), end to end: real `python -m pricer serve` replicas on one private
redis-server (tests/redis_server.py), real HTTP on loopback, Redis SIGKILLed and restarted for real.

* Concurrency: 180 concurrent requests of one client over two replicas get at most the burst (+ refill).
* Busy replicas: while another client keeps both replicas' event loops busy (rates of 1,000 tickers, about
  30 ms of CPU each), a 120/min client at 10 req/s gets at most the exact bucket's allowance + 5 %.
* Redis down mid-run: each replica grants at most its share meanwhile, and after the restart Redis does not
  hand out a fresh burst: the total stays within the exact allowance + the replicas' shares of the outage.
* A burst of one client does not move another client's decisions to local ones.

Every client request is decided by the limiter of the replica it reaches; the client of each replica's
demo key is `demo_client` (one shared bucket, `ratelimit:demo_client`), the admin key's is `admin`.
"""

from __future__ import annotations

import asyncio
import random
import re
import string
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server
from tests.redis_server import PrivateRedis

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.slow]

DEGRADED = "Rate limiter degraded"
ROUTE = "/api/v1/rates/AAPL"


@dataclass
class Rig:
    redis: PrivateRedis
    replicas: list[RunningServer]

    def client_headers(self, replica: int) -> dict[str, str]:
        return {"X-API-Key": self.replicas[replica].keys["DEMO_CLIENT_KEY"]}

    def admin_headers(self, replica: int) -> dict[str, str]:
        return {"X-API-Key": self.replicas[replica].keys["DEMO_ADMIN_KEY"]}

    def degraded_lines(self) -> int:
        return sum(server.log().count(DEGRADED) for server in self.replicas)

    def tokens(self, key: str = "ratelimit:demo_client") -> float:
        with self.redis.client() as probe:
            state = probe.get(key)
        assert isinstance(state, bytes), state
        match = re.fullmatch(rb"(\d+\.\d{6}):(\d+)", state)
        assert match is not None, state
        return float(match.group(1))


def start_rig(tmp_path: Path, count: int, **env: str) -> Iterator[Rig]:
    redis_server = PrivateRedis(tmp_path / "redis").start()
    settings = {
        "REDIS_URL": redis_server.url,
        "EXPECTED_REPLICAS": "2",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "LOG_LEVEL": "WARNING",
        "POSITIONS_LIMIT_PER_MINUTE": "10000000",
        **env,
    }
    directories = [tmp_path / f"replica{i}" for i in range(count)]
    for directory in directories:
        directory.mkdir()
    servers: list[RunningServer] = []
    try:
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(start_server, directory, **settings) for directory in directories]
            errors = []
            for future in futures:
                try:
                    servers.append(future.result())
                except RuntimeError as error:
                    errors.append(error)
        if errors:
            raise errors[0]
        yield Rig(redis_server, servers)
    finally:
        for server in servers:
            stop_server(server)
        redis_server.kill()


async def warm(rig: Rig, client: httpx.AsyncClient) -> None:
    """Each replica's limiter connection and script are warm (through the admin's bucket), and the
    measured client's bucket is untouched."""
    for replica, server in enumerate(rig.replicas):
        response = await client.get(f"{server.base_url}{ROUTE}", headers=rig.admin_headers(replica))
        assert response.status_code == 200, response.text
        detailed = (await client.get(f"{server.base_url}/health/detailed")).json()
        assert detailed["dependencies"]["redis"]["status"] == "healthy", detailed


async def redis_detail(client: httpx.AsyncClient, server: RunningServer) -> dict[str, object]:
    """The limiter's counters, once the replica's Redis check answers (right after a load its ping may
    still be queued behind the requests in flight)."""
    deadline = time.monotonic() + 30
    while True:
        redis_health = (await client.get(f"{server.base_url}/health/detailed")).json()["dependencies"][
            "redis"
        ]
        assert isinstance(redis_health, dict)
        if "local_decisions" in redis_health.get("detail", {}):
            detail = dict(redis_health["detail"])
            detail["status"] = redis_health["status"]
            return detail
        assert time.monotonic() < deadline, redis_health
        await asyncio.sleep(0.2)


# ---- 180 concurrent requests, burst 60 ---------------------------------------------------------------


@pytest.fixture
def burst_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from start_rig(tmp_path, 2, RATE_LIMIT_PER_MINUTE="60", RATE_LIMIT_BURST="60")


async def issue_keys(rig: Rig, client: httpx.AsyncClient, client_id: str) -> list[dict[str, str]]:
    """A key of `client_id` on each replica (each has its own key store); one bucket in Redis."""
    headers = []
    for replica, server in enumerate(rig.replicas):
        response = await client.post(
            f"{server.base_url}/api/v1/admin/keys",
            json={"client_id": client_id, "scopes": ["rates"]},
            headers=rig.admin_headers(replica),
        )
        assert response.status_code == 201, response.text
        headers.append({"X-API-Key": response.json()["api_key"]})
    return headers


async def test_180_concurrent_requests_get_at_most_the_burst(burst_rig: Rig) -> None:
    """Three clients in turn (three rounds, so that a round where the old limiter happened not to trip
    does not hide it), each sending 180 requests at once, half to each replica."""
    rig = burst_rig
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    rounds = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        clients = {"demo_client": [rig.client_headers(0), rig.client_headers(1)]}
        for client_id in ("xyz123", "pct_client"):
            clients[client_id] = await issue_keys(rig, client, client_id)
        await warm(rig, client)
        for client_id, headers in clients.items():
            started = time.monotonic()

            async def one(number: int, headers: list[dict[str, str]] = headers) -> int:
                replica = number % 2
                url = f"{rig.replicas[replica].base_url}{ROUTE}"
                return (await client.get(url, headers=headers[replica])).status_code

            statuses = await asyncio.gather(*(one(n) for n in range(180)))
            elapsed = time.monotonic() - started
            assert set(statuses) <= {200, 429}, sorted(set(statuses))
            rounds.append((client_id, statuses.count(200), elapsed))
    report = "; ".join(
        f"{client_id}: granted {granted} in {elapsed:.2f} s (≤ {60 + elapsed:.1f})"
        for client_id, granted, elapsed in rounds
    )
    print(f"180 concurrent over 2 replicas, burst 60: {report}")
    for _, granted, elapsed in rounds:
        # The burst, and a token a second while the requests were answered.
        assert 60 <= granted <= 60 + 1.0 * elapsed + 1, report


# ---- a 120/min client against two busy replicas ------------------------------------------------------


@pytest.fixture
def busy_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from start_rig(tmp_path, 2, RATE_LIMIT_PER_MINUTE="120", RATE_LIMIT_BURST="120")


RUN_SECONDS = 20.0
SEND_EVERY = 0.1  # 10 requests a second, open loop (a slow answer does not delay the next request)
BUSY_WORKERS = 3  # per replica, each asking for the rates of 1,000 tickers back to back


async def unlimited_admin(rig: Rig, client: httpx.AsyncClient) -> None:
    """The admin client gets a limit the busy load never reaches (in each replica's own store)."""
    body = {
        "markup_percentage": 0,
        "transaction_fee_type": "FLAT",
        "transaction_amount": 0,
        "rate_limit_per_minute": 10_000_000,
        "burst": 10_000_000,
    }
    for replica, server in enumerate(rig.replicas):
        response = await client.put(
            f"{server.base_url}/api/v1/admin/clients/admin", json=body, headers=rig.admin_headers(replica)
        )
        assert response.status_code in (200, 201), response.text


async def test_a_client_gets_its_exact_allowance_from_two_busy_replicas(busy_rig: Rig) -> None:
    rig = busy_rig
    rng = random.Random(16)
    tickers = ",".join("".join(rng.choice(string.ascii_uppercase) for _ in range(4)) for _ in range(1000))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await unlimited_admin(rig, client)
        await warm(rig, client)
        before = [await redis_detail(client, server) for server in rig.replicas]
        stop = time.monotonic() + RUN_SECONDS + 2
        busy_answers = 0

        async def busy(replica: int) -> None:
            nonlocal busy_answers
            url = f"{rig.replicas[replica].base_url}/api/v1/rates"
            while time.monotonic() < stop:
                response = await client.get(
                    url, params={"tickers": tickers}, headers=rig.admin_headers(replica)
                )
                assert response.status_code == 200, response.text
                busy_answers += 1

        busy_tasks = [asyncio.create_task(busy(r)) for r in range(2) for _ in range(BUSY_WORKERS)]
        await asyncio.sleep(1.0)  # the loops are busy before the measured client starts

        statuses: list[int] = []
        ends: list[float] = []

        async def one(number: int) -> None:
            replica = number % 2
            url = f"{rig.replicas[replica].base_url}{ROUTE}"
            response = await client.get(url, headers=rig.client_headers(replica))
            statuses.append(response.status_code)
            ends.append(time.monotonic())

        started = time.monotonic()
        sends = []
        for number in range(int(RUN_SECONDS / SEND_EVERY)):
            await asyncio.sleep(max(0.0, started + number * SEND_EVERY - time.monotonic()))
            sends.append(asyncio.create_task(one(number)))
        await asyncio.gather(*sends)
        elapsed = max(ends) - started
        for task in busy_tasks:
            task.cancel()
        await asyncio.gather(*busy_tasks, return_exceptions=True)
        after = [await redis_detail(client, server) for server in rig.replicas]

    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    granted = statuses.count(200)
    exact = 120 + 2.0 * elapsed  # burst 120, 2 tokens a second, over the whole run
    late = [
        int(a["late_watches"]) - int(b.get("late_watches", 0)) for a, b in zip(after, before, strict=True)
    ]
    local = [
        int(a["local_decisions"]) - int(b["local_decisions"]) for a, b in zip(after, before, strict=True)
    ]
    report = (
        f"granted {granted} of {len(statuses)} in {elapsed:.1f} s; exact bucket {exact:.1f} "
        f"(+{100 * (granted / exact - 1):.1f} %); busy answers {busy_answers}; late watches {late}; "
        f"local decisions {local}; overdue calls {[a['overdue_calls'] for a in after]}"
    )
    print(report)
    assert busy_answers > 50, report  # the replicas were busy for real
    assert granted <= exact * 1.05, report
    assert granted >= 120, report


# ---- Redis down mid-run --------------------------------------------------------------------------


@pytest.fixture
def outage_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from start_rig(tmp_path, 2, RATE_LIMIT_PER_MINUTE="60", RATE_LIMIT_BURST="60")


UP_SECONDS = 8.0
DOWN_SECONDS = 5.0
BACK_SECONDS = 7.0


@dataclass
class Sent:
    replica: int
    phase: str
    status: int


async def test_redis_down_mid_run_each_replica_grants_its_share(outage_rig: Rig) -> None:
    rig = outage_rig
    per_second, burst, share_rate, share_burst = 1.0, 60, 0.5, 30
    async with httpx.AsyncClient(timeout=30) as client:
        await warm(rig, client)
        answers: list[Sent] = []
        phase = "up"

        async def one(number: int) -> None:
            replica = number % 2
            sent_in = phase
            url = f"{rig.replicas[replica].base_url}{ROUTE}"
            response = await client.get(url, headers=rig.client_headers(replica))
            answers.append(Sent(replica, sent_in, response.status_code))

        started = time.monotonic()
        sends = []
        down_at = started + UP_SECONDS
        up_at = down_at + DOWN_SECONDS
        end = up_at + BACK_SECONDS
        number = 0
        outage, outage_started = 0.0, 0.0
        while (due := started + number * SEND_EVERY) < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if phase == "up" and time.monotonic() >= down_at:
                await asyncio.gather(*sends)  # answers before the kill are counted as before it
                rig.redis.kill()
                phase, outage_started = "down", time.monotonic()
            elif phase == "down" and time.monotonic() >= up_at:
                await asyncio.gather(*sends)
                outage = time.monotonic() - outage_started
                rig.redis.start()
                phase = "back"
            sends.append(asyncio.create_task(one(number)))
            number += 1
        await asyncio.gather(*sends)
        elapsed = time.monotonic() - started
        details = [await redis_detail(client, server) for server in rig.replicas]
        tokens_after = rig.tokens()

    assert {a.status for a in answers} <= {200, 429}, sorted({a.status for a in answers})
    granted = {p: sum(a.status == 200 for a in answers if a.phase == p) for p in ("up", "down", "back")}
    during = [sum(a.status == 200 for a in answers if a.phase == "down" and a.replica == r) for r in (0, 1)]
    share_allowance = share_burst + share_rate * outage
    exact = burst + per_second * elapsed
    bound = burst + per_second * elapsed * 1.05 + 2 * share_allowance
    total = sum(granted.values())
    report = (
        f"granted {granted} (total {total}) of {len(answers)} in {elapsed:.1f} s, outage {outage:.1f} s; "
        f"per replica during the outage {during} (share ≤ {share_allowance:.1f}); exact bucket {exact:.1f}, "
        f"bound {bound:.1f}; tokens in Redis after {tokens_after:.2f}"
    )
    print(report)
    for count in during:
        assert count <= share_allowance + 1, report
    assert total <= bound, report
    # After the restart Redis went on from what the replicas knew, not from a full bucket: the client,
    # sending 10 a second, keeps it about empty.
    assert granted["back"] <= per_second * BACK_SECONDS + 10, report
    assert tokens_after < 10, report
    for detail in details:
        assert detail["status"] == "healthy", detail
    assert rig.degraded_lines() >= 2  # each replica said so when it went local


# ---- one client's burst, another client's decisions ---------------------------------------------------


@pytest.fixture
def neighbour_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from start_rig(tmp_path, 1, RATE_LIMIT_PER_MINUTE="6000", RATE_LIMIT_BURST="6000")


async def test_one_clients_burst_leaves_others_on_shared_decisions(neighbour_rig: Rig) -> None:
    rig = neighbour_rig
    server = rig.replicas[0]
    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await warm(rig, client)
        before = await redis_detail(client, server)
        burst_done = False
        neighbour: list[httpx.Response] = []

        async def steady() -> None:
            while not burst_done:
                neighbour.append(await client.get(f"{server.base_url}{ROUTE}", headers=rig.client_headers(0)))
                await asyncio.sleep(0.01)

        async def burst() -> None:
            url = f"{server.base_url}{ROUTE}"
            for _ in range(3):  # three waves of 200 concurrent requests from the admin client
                await asyncio.gather(*(client.get(url, headers=rig.admin_headers(0)) for _ in range(200)))

        watcher = asyncio.create_task(steady())
        try:
            await burst()
        finally:
            burst_done = True
            await watcher
        after = await redis_detail(client, server)

    local = int(after["local_decisions"]) - int(before["local_decisions"])
    shares = [r for r in neighbour if r.headers.get("x-ratelimit-limit") != "6000"]
    report = (
        f"neighbour: {len(neighbour)} requests, {len(shares)} decided locally; replica local decisions "
        f"{local}, late watches {after['late_watches']}, overdue calls {after['overdue_calls']}"
    )
    print(report)
    assert all(r.status_code == 200 for r in neighbour), report
    assert len(neighbour) >= 5, report
    # The burst never opened the breaker (before issue 16 it did, and then decided nearly all of the
    # neighbour's requests locally for a second). A call Redis itself answers late (the burst's own CPU
    # load starves it on this shared machine) may still put the decisions it carries local, the
    # neighbour's included: a few, not most.
    assert rig.degraded_lines() == 0, report
    assert len(shares) <= len(neighbour) // 3, report
