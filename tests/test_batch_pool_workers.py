"""The batch pool (pricer.batch_pool) in a server of two uvicorn workers (WORKERS=2), each with a pool of its
own (BATCH_WORKERS=1), as production runs it (tests/test_batch_pool.py has one server process):

- batches and single quotes at once on both workers: every answer 200, each worker's batches priced in
  its own pool worker;
- a pool worker SIGKILLed mid-batch: a clean answer, the worker replaced, both server workers go on;
- SIGTERM while batches run on both workers: they answer 200, the parent exits 0, every priced position
  is audited, and no scratch directory nor any process of the server is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from pricer.batch_pool import SCRATCH_PREFIX, _scratch_root
from tests.conftest import RunningServer, stop_server
from tests.pg import PG_DSN, drop_schema, new_schema_name
from tests.test_batch_pool import QUOTE, batch_body, post_raw, random_rows, wait_until_busy
from tests.test_postgres_engine import cli_ok, connect, seed_demo
from tests.test_workers import REDIS_URL, start_workers
from tests.test_workers import worker_pids as server_workers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# A body above this goes to a pool worker (the default threshold is 256 KiB).
SMALL_INLINE_MAX = "4096"
BUSY_ROWS = 60_000
DRAIN_SECONDS = 0.5


def descendants(pid: int) -> set[int]:
    """Every process under `pid` (uvicorn workers, their pool workers, multiprocessing's helpers)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def pool_workers(server: RunningServer) -> dict[int, set[int]]:
    """Each uvicorn worker's pool workers."""
    return {worker: descendants(worker) for worker in server_workers(server.process.pid)}


def scratch_of(pids: set[int]) -> list[Path]:
    """The scratch directories of these server processes (named by their pid)."""
    root = Path(_scratch_root())
    return [path for pid in pids for path in root.glob(f"{SCRATCH_PREFIX}{pid}-*")]


def headers_of(keys: dict[str, str]) -> dict[str, str]:
    return {"X-API-Key": keys["DEMO_CLIENT_KEY"], "Content-Type": "application/json"}


class Server:
    def __init__(self, running: RunningServer, keys: dict[str, str], schema: str) -> None:
        self.running = running
        self.keys = keys
        self.schema = schema

    @property
    def base_url(self) -> str:
        return self.running.base_url

    def headers(self) -> dict[str, str]:
        return headers_of(self.keys)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (each start costs seconds); the SIGTERM test, last, stops it."""
    tmp_path = tmp_path_factory.mktemp("pool-workers")
    schema = new_schema_name()
    env = {"DATABASE_URL": PG_DSN, "DATABASE_SCHEMA": schema, "REDIS_URL": REDIS_URL}
    running: RunningServer | None = None
    try:
        cli_ok(env, "migrate")
        keys = seed_demo(env, tmp_path)
        running = start_workers(
            tmp_path,
            schema,
            BATCH_WORKERS="1",
            BATCH_INLINE_MAX_BYTES=SMALL_INLINE_MAX,
            POSITIONS_LIMIT_PER_MINUTE="100000000",
            SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
            DATABASE_POOL_SIZE="4",
        )
        running.keys = keys  # the demo keys seeded into the database (tests/test_batch_pool.py's helpers)
        yield Server(running, keys, schema)
    finally:
        if running is not None:
            stop_server(running)
        asyncio.run(drop_schema(schema))


def warm_both_pools(server: Server) -> dict[int, set[int]]:
    """Batches until each uvicorn worker has started its pool worker (connections land on either)."""
    deadline = time.monotonic() + 60
    body = batch_body(random_rows(3000, 30))
    while True:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(
                pool.map(
                    lambda _: (
                        httpx.post(
                            server.base_url + "/api/v1/calculate-locate/batch",
                            content=body,
                            headers=server.headers(),
                            timeout=60,
                        ).status_code
                    ),
                    range(4),
                )
            )
        assert set(statuses) == {200}, statuses
        pools = pool_workers(server.running)
        if len(pools) == 2 and all(len(children) == 1 for children in pools.values()):
            return pools
        assert time.monotonic() < deadline, pools


async def audited_count(schema: str, request_ids: list[str]) -> int:
    async with connect(PG_DSN, schema) as connection:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM quotes WHERE request_id = ANY($1::text[])", request_ids
        )
        return count


def test_batches_and_singles_at_once_on_both_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    rows = [random_rows(20_000, seed) for seed in range(6)]
    singles: list[int] = []
    done = threading.Event()

    def send_singles() -> None:
        with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=30) as client:
            while not done.is_set():
                singles.append(client.post("/api/v1/calculate-locate", json=QUOTE).status_code)
                time.sleep(0.01)

    def send_batch(index: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        post_raw(server.running, batch_body(rows[index]), result)
        return result

    sender = threading.Thread(target=send_singles)
    sender.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(send_batch, range(6)))
    finally:
        done.set()
        sender.join()
    for index, result in enumerate(results):
        assert result.get("status") == 200, result
        body = json.loads(result["body"])
        assert body["count"] == len(rows[index])
    assert len(singles) >= 5
    assert set(singles) == {200}
    # No pool worker died nor was added: each server worker priced its batches in its own.
    assert pool_workers(server.running) == pools
    assert "Batch worker died" not in server.running.log()


def test_a_pool_worker_killed_mid_batch_under_two_server_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    victims = {next(iter(children)) for children in pools.values()}
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    senders = [
        threading.Thread(
            target=post_raw,
            args=(server.running, batch_body(random_rows(BUSY_ROWS, 40 + n)), results[n]),
        )
        for n in range(4)
    ]
    for sender in senders:
        sender.start()
    victim = next(iter(victims))
    wait_until_busy(victim)
    os.kill(victim, signal.SIGKILL)
    for sender in senders:
        sender.join(timeout=120)
    statuses = [result.get("status") for result in results]
    assert set(statuses) <= {200, 503}, results
    assert statuses.count(200) >= 2, statuses  # the other server worker's batches are untouched
    for result in results:
        if result["status"] == 503:
            assert json.loads(result["body"])["error_code"] == "SERVICE_UNAVAILABLE"
    deadline = time.monotonic() + 30
    while True:
        now = pool_workers(server.running)
        replaced = all(len(children) == 1 for children in now.values())
        if set(now) == set(pools) and replaced and victim not in set().union(*now.values()):
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert not alive(victim)
    after = [
        httpx.post(
            server.base_url + "/api/v1/calculate-locate/batch",
            content=batch_body(random_rows(3000, 50 + n)),
            headers=server.headers(),
            timeout=60,
        ).status_code
        for n in range(4)
    ]
    assert set(after) == {200}, after
    assert "Batch worker died" in server.running.log()


def test_a_server_worker_killed_mid_batch_leaves_no_pool_worker_nor_scratch(server: Server) -> None:
    """A uvicorn worker SIGKILLed (an OOM kill) while its pool worker prices a batch: the pool worker
    exits too (no orphan pricing for nobody), the worker is replaced, and the killed one's scratch
    directory (tmpfs: memory) is removed by the next pool to start."""
    pools = warm_both_pools(server)
    victim_worker, victim_pool = next((worker, next(iter(pool))) for worker, pool in pools.items())
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    senders = [
        threading.Thread(
            target=post_raw,
            args=(server.running, batch_body(random_rows(BUSY_ROWS, 70 + n)), results[n]),
        )
        for n in range(4)
    ]
    for sender in senders:
        sender.start()
    wait_until_busy(victim_pool)
    assert scratch_of({victim_worker})
    os.kill(victim_worker, signal.SIGKILL)
    for sender in senders:
        sender.join(timeout=120)
    deadline = time.monotonic() + 30
    while alive(victim_pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(victim_pool), "the killed worker's pool worker is still running"
    # The replacement's pool starts with its first large batch and removes what the killed one left.
    assert victim_worker not in warm_both_pools(server)
    assert not scratch_of({victim_worker}), "the killed worker's scratch directory is left"
    assert {result.get("status") for result in results} <= {200, None}, results


def test_sigterm_while_batches_run_on_both_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    everything = descendants(server.running.process.pid) | {server.running.process.pid}
    uvicorn_workers = set(pools)
    request_ids = [f"{n:02d}" * 16 for n in range(4)]
    results: list[dict[str, Any]] = [{} for _ in range(4)]

    def send(n: int) -> None:
        import http.client

        host, port = server.base_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request(
                "POST",
                "/api/v1/calculate-locate/batch",
                body=batch_body(random_rows(BUSY_ROWS, 60 + n, invalid=False)),
                headers={**server.headers(), "X-Request-ID": request_ids[n]},
            )
            response = connection.getresponse()
            results[n]["status"] = response.status
            results[n]["body"] = response.read()
        except OSError as error:
            results[n]["error"] = error
        finally:
            connection.close()

    senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for sender in senders:
        sender.start()
    for children in pools.values():  # both server workers are pricing a batch
        wait_until_busy(next(iter(children)))
    assert scratch_of(uvicorn_workers), "the pools' scratch directories exist while they run"
    server.running.process.send_signal(signal.SIGTERM)
    for sender in senders:
        sender.join(timeout=120)
    returncode = server.running.process.wait(timeout=60)
    log = server.running.log()
    for result in results:
        assert result.get("status") == 200, (result, log[-3000:])
    priced = sum(json.loads(result["body"])["priced"] for result in results)
    assert returncode == 0, log[-3000:]
    assert log.count("Application shutdown complete.") == 2, log[-3000:]
    assert asyncio.run(audited_count(server.schema, request_ids)) == priced
    deadline = time.monotonic() + 10
    while (left := [pid for pid in everything if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the server left after it exited: {left}"
    assert not scratch_of(uvicorn_workers), "scratch directories left after the server exited"
