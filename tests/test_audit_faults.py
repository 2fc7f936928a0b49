"""Audit durability under faults, with real processes (issue 16, items 1 and 2).

* two workers (`WORKERS=2`) on one AUDIT_SPOOL_DIR through a PostgreSQL outage under load: every quote
  answered 200 is in the database afterwards (the old single spool file, written by both workers at
  their own offsets, lost about every spooled row);
* `kill -9` of a server in `AUDIT_DURABILITY=disk` under load, with PostgreSQL up and with it stopped:
  a new process on the same AUDIT_SPOOL_DIR adopts the dead one's journal and spool, and every quote
  answered 200 is in the database.

PostgreSQL is a private cluster (tests/private_postgres.py) that the tests stop; Redis (needed by
WORKERS > 1) a private redis-server (tests/redis_server.py). Traffic goes to 127.0.0.1 only, bounded in
time and count.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, stop_server
from tests.private_postgres import PrivatePostgres
from tests.redis_server import PrivateRedis
from tests.test_postgres_engine import (
    Answer,
    audited,
    cli_ok,
    quote_ids_of,
    seed_demo,
    start_engine,
    wait_for_rows,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

MAX_REQUESTS = 20_000  # per run, whatever the speed: the load loops stop at this count or their deadline


class Load:
    """`concurrency` clients sending single quotes and small batches back to back until `seconds` pass,
    the server stops answering, or MAX_REQUESTS; keeps the quote ids answered 200."""

    def __init__(self, server: RunningServer, key: str, *, new_connections: bool = False) -> None:
        self.server = server
        # A connection per request: the kernel hands the accepts to every worker of WORKERS > 1.
        self.headers = {"X-API-Key": key, **({"Connection": "close"} if new_connections else {})}
        self.answers: list[Answer] = []
        self.failures = 0
        self.sent = 0
        self.stopped = False

    async def run(self, seconds: float, concurrency: int = 8) -> None:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.server.base_url, timeout=10, limits=limits) as client:

            async def one(n: int) -> None:
                i = 0
                while time.monotonic() < deadline and not self.stopped and self.sent < MAX_REQUESTS:
                    i += 1
                    self.sent += 1
                    try:
                        if i % 5 == 0:
                            response = await client.post(
                                "/api/v1/calculate-locate/batch",
                                headers=self.headers,
                                json={
                                    "client_id": "demo_client",
                                    "positions": [
                                        {"ticker": t, "position_value": 1000 + n * 100 + i, "loan_days": 9}
                                        for t in ("AAPL", "GME", "TSLA")
                                    ],
                                },
                            )
                        else:
                            response = await client.post(
                                "/api/v1/calculate-locate",
                                headers=self.headers,
                                json={
                                    "ticker": "GME",
                                    "position_value": 5000 + n * 1000 + i,
                                    "loan_days": 30,
                                    "client_id": "demo_client",
                                },
                            )
                    except httpx.TransportError:
                        self.failures += 1
                        if self.server.process.poll() is not None:
                            return  # killed: whatever was in flight was never answered
                        await asyncio.sleep(0.01)
                        continue
                    self.answers.append(Answer(response.status_code, quote_ids_of(response)))

            await asyncio.gather(*(one(n) for n in range(concurrency)))

    @property
    def answered(self) -> set[str]:
        return {quote_id for answer in self.answers for quote_id in answer.quote_ids}


async def warm(server: RunningServer, key: str, requests: int = 40) -> None:
    """Quotes over several connections, so that every worker has the key and the client cached."""
    for _ in range(requests // 8):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            responses = await asyncio.gather(
                *(
                    client.get("/api/v1/rates/GME", headers={"X-API-Key": key, "Connection": "close"})
                    for _ in range(8)
                )
            )
        assert {r.status_code for r in responses} == {200}, [r.text for r in responses]


async def settle(dsn: str, answered: set[str], within: float = 60) -> list[str]:
    await wait_for_rows(dsn, None, len(answered), within=within)
    await asyncio.sleep(0.5)  # a late duplicate would show now
    return await audited(dsn)


def assert_nothing_lost(answered: set[str], stored: list[str], what: str) -> None:
    assert len(set(stored)) == len(stored), "a quote id is stored twice"
    lost = answered - set(stored)
    assert not lost, f"{what}: {len(lost)} of {len(answered)} quotes answered 200 are not in the database"


# ---- two workers, one spool directory, PostgreSQL down ------------------------------------------------


async def test_two_workers_through_a_database_outage_lose_nothing(tmp_path: Path) -> None:
    with PrivatePostgres() as pg, PrivateRedis(tmp_path / "redis") as redis_server:
        env = {
            "DATABASE_URL": pg.dsn,
            "REDIS_URL": redis_server.url,
            "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
            "SHUTDOWN_DRAIN_SECONDS": "0",
        }
        cli_ok(env, "migrate")
        key = seed_demo(env, tmp_path)["DEMO_CLIENT_KEY"]
        server = start_engine(tmp_path, {**env, "WORKERS": "2"})
        try:
            await warm(server, key)
            load = Load(server, key, new_connections=True)

            async def outage() -> None:
                await asyncio.sleep(1.5)
                await asyncio.to_thread(pg.stop, "fast")
                await asyncio.sleep(4.0)
                await asyncio.to_thread(pg.start)

            await asyncio.gather(load.run(8.0), outage())
            answered = load.answered
            assert len(answered) > 200, f"too little traffic to mean anything: {len(answered)}"
            stored = await settle(pg.dsn, answered)
            spools = [p for p in (tmp_path / "spool").iterdir() if p.name.startswith("proc-")]
        finally:
            stop_server(server)
        print(f"{load.sent} requests, {len(answered)} positions answered 200, {len(stored)} stored")
        assert_nothing_lost(answered, stored, "WORKERS=2 through a PostgreSQL outage")
        assert len(spools) == 2, f"one spool directory per worker: {spools}"


# ---- kill -9 in disk mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["up", "down"])
async def test_kill_9_in_disk_mode_loses_no_answered_quote(tmp_path: Path, database: str) -> None:
    with PrivatePostgres() as pg:
        env = {
            "DATABASE_URL": pg.dsn,
            "AUDIT_SPOOL_DIR": str(tmp_path / "spool"),
            "AUDIT_DURABILITY": "disk",
            "SHUTDOWN_DRAIN_SECONDS": "0",
        }
        cli_ok(env, "migrate")
        key = seed_demo(env, tmp_path)["DEMO_CLIENT_KEY"]
        server = start_engine(tmp_path, env)
        restarted: RunningServer | None = None
        try:
            await warm(server, key, requests=8)
            load = Load(server, key)

            async def fault() -> None:
                if database == "down":
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(pg.stop, "fast")
                await asyncio.sleep(2.0)
                server.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(server.process.wait, 30)

            await asyncio.gather(load.run(20.0), fault())
            answered = load.answered
            assert len(answered) > 100, f"too little traffic to mean anything: {len(answered)}"
            assert server.process.returncode == -signal.SIGKILL
            if database == "down":
                await asyncio.to_thread(pg.start)
            # A new process on the same directory adopts the dead one's journal (and spool).
            restarted = start_engine(tmp_path, env)
            stored = await settle(pg.dsn, answered)
            left = [p.name for p in (tmp_path / "spool").iterdir() if p.name.startswith("proc-")]
        finally:
            stop_server(server)
            if restarted is not None:
                stop_server(restarted)
        print(f"{load.sent} requests, {len(answered)} positions answered 200, {len(stored)} stored")
        assert_nothing_lost(answered, stored, f"kill -9 with the database {database}")
        # Stored and never answered: at most what was journaled while its response was on its way.
        assert len(set(stored) - answered) <= 8 * 3, len(set(stored) - answered)
        assert len(left) == 1, f"the dead process's directory is adopted and removed: {left}"
