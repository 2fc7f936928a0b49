"""The batch pool (pricer.batch_pool) in a server of two uvicorn workers (WORKERS=2), each with a pool of its
own (BATCH_WORKERS=1), as production runs it (tests/test_batch_pool.py has one server process):

- batches and single quotes at once on both workers: every answer 200, each worker's batches priced in
  its own pool worker;
- a pool worker SIGKILLed mid-batch: a clean answer, the worker replaced, both server workers go on;
- a server worker SIGKILLed mid-batch: its pool worker exits, its scratch directory is removed by the next
  pool to start;
- SIGTERM while batches run on both workers: they answer 200, the parent exits 0, every priced position
  is audited, and no scratch directory nor any process of the server is left.

The kernel hands a new connection to whichever worker accepts first, often the same one for many in a row:
the batches are sent on connections known to have been accepted by each worker (`accepted_by`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pricer.batch_pool import SCRATCH_PREFIX, _scratch_root
from tests.conftest import RunningServer, stop_server
from tests.pg import PG_DSN, drop_schema, new_schema_name
from tests.test_batch_pool import QUOTE, batch_body, cpu_ticks, random_rows
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


def busy_now(pids: list[int], window: float = 0.1) -> set[int]:
    """The processes that use CPU now (at least 30 ms of it over the window)."""
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(window)
    return {pid for pid in pids if cpu_ticks(pid) - before[pid] >= 3}


def accepted_by(client_port: int, server_port: int, workers: set[int], timeout: float = 10.0) -> int:
    """The server worker that accepted the connection from `client_port` (the kernel hands each new
    connection to whichever worker accepts first, often the same one: found by the socket's inode)."""
    deadline = time.monotonic() + timeout
    while True:
        inode = None
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = (int(address.split(":")[1], 16) for address in fields[1:3])
            if local_port == server_port and remote_port == client_port:
                inode = f"socket:[{fields[9]}]"
        for worker in workers:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{worker}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{worker}/fd/{fd}") == inode:
                            return worker
        assert time.monotonic() < deadline, f"no worker accepted the connection from port {client_port}"
        time.sleep(0.01)


class Batches:
    """Large batches posted from threads, each on a connection of its own, with a request id each, so many
    on each server worker."""

    def __init__(self, server: Server, rows: int, seed: int) -> None:
        self._server = server
        self._seed = seed
        self._body = batch_body(random_rows(rows, seed))  # one body for all
        self.results: list[dict[str, Any]] = []
        self.request_ids: list[str] = []
        self._threads: list[threading.Thread] = []

    def _connections(self, each: int) -> list[http.client.HTTPConnection]:
        host, port = self._server.base_url.removeprefix("http://").split(":")
        workers = set(server_workers(self._server.running.process.pid))
        chosen: dict[int, list[http.client.HTTPConnection]] = {worker: [] for worker in workers}
        spare: list[http.client.HTTPConnection] = []
        for _ in range(200):
            if all(len(held) >= each for held in chosen.values()):
                break
            connection = http.client.HTTPConnection(host, int(port), timeout=120)
            connection.connect()
            assert connection.sock is not None
            worker = accepted_by(connection.sock.getsockname()[1], int(port), workers)
            (chosen[worker] if len(chosen[worker]) < each else spare).append(connection)
        for connection in spare:
            connection.close()
        assert all(len(held) >= each for held in chosen.values()), "a worker accepted no connection"
        return [connection for held in chosen.values() for connection in held]

    def _send(self, n: int, connection: http.client.HTTPConnection) -> None:
        result = self.results[n]
        try:
            connection.request(
                "POST",
                "/api/v1/calculate-locate/batch",
                body=self._body,
                headers={**self._server.headers(), "X-Request-ID": self.request_ids[n]},
            )
            response = connection.getresponse()
            result["status"] = response.status
            result["body"] = response.read()
        except OSError as error:
            result["error"] = error
        finally:
            connection.close()

    def send(self, each: int = 2) -> None:
        """`each` batches on every server worker, all sent at once."""
        for n, connection in enumerate(self._connections(each)):
            self.results.append({})
            self.request_ids.append(f"{self._seed:04x}{n:04x}" * 4)
            self._threads.append(threading.Thread(target=self._send, args=(n, connection)))
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=120)


def wait_until_all_busy(pids: list[int], timeout: float = 30.0) -> None:
    """Until the processes all use CPU at once (each pricing a batch)."""
    deadline = time.monotonic() + timeout
    while busy_now(pids) != set(pids):
        assert time.monotonic() < deadline, f"the pool workers {pids} were never all busy at once"


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
    """A batch on each uvicorn worker, so that each has started its pool worker."""
    deadline = time.monotonic() + 60
    while True:
        warm = Batches(server, 3000, seed=30)
        warm.send(each=1)
        warm.join()
        assert {result.get("status") for result in warm.results} == {200}, warm.results
        pools = pool_workers(server.running)
        if len(pools) == 2 and all(len(children) == 1 for children in pools.values()):
            return pools
        assert time.monotonic() < deadline, pools  # a pool worker still starting


async def audited_count(schema: str, request_ids: list[str]) -> int:
    async with connect(PG_DSN, schema) as connection:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM quotes WHERE request_id = ANY($1::text[])", request_ids
        )
        return count


def test_batches_and_singles_at_once_on_both_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    singles: list[int] = []
    done = threading.Event()

    def send_singles() -> None:
        with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=30) as client:
            while not done.is_set():
                singles.append(client.post("/api/v1/calculate-locate", json=QUOTE).status_code)
                time.sleep(0.01)

    sender = threading.Thread(target=send_singles)
    sender.start()
    batches = Batches(server, 20_000, seed=31)
    try:
        batches.send(each=3)
        batches.join()
    finally:
        done.set()
        sender.join()
    for result in batches.results:
        assert result.get("status") == 200, result
        assert json.loads(result["body"])["count"] == 20_000
    assert len(singles) >= 5
    assert set(singles) == {200}
    # No pool worker died nor was added: each server worker priced its batches in its own.
    assert pool_workers(server.running) == pools
    assert "Batch worker died" not in server.running.log()


def test_a_pool_worker_killed_mid_batch_under_two_server_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    victims = sorted(next(iter(children)) for children in pools.values())
    batches = Batches(server, BUSY_ROWS, seed=40)
    batches.send()
    wait_until_all_busy(victims)
    victim = victims[0]
    os.kill(victim, signal.SIGKILL)
    batches.join()
    statuses = [result.get("status") for result in batches.results]
    assert set(statuses) <= {200, 503}, batches.results
    assert statuses.count(200) >= 1, statuses  # the other server worker's batches are untouched
    for result in batches.results:
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
    batches = Batches(server, BUSY_ROWS, seed=70)
    batches.send()
    wait_until_all_busy([next(iter(pool)) for pool in pools.values()])
    assert scratch_of({victim_worker})
    os.kill(victim_worker, signal.SIGKILL)
    batches.join()
    deadline = time.monotonic() + 30
    while alive(victim_pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(victim_pool), "the killed worker's pool worker is still running"
    # The replacement's pool starts with its first large batch and removes what the killed one left.
    assert victim_worker not in warm_both_pools(server)
    assert not scratch_of({victim_worker}), "the killed worker's scratch directory is left"
    # The killed worker's clients lose their connection; the other worker's get their answers.
    assert {result.get("status") for result in batches.results} <= {200, None}, batches.results


def test_sigterm_while_batches_run_on_both_workers(server: Server) -> None:
    pools = warm_both_pools(server)
    everything = descendants(server.running.process.pid) | {server.running.process.pid}
    uvicorn_workers = set(pools)
    batches = Batches(server, 2 * BUSY_ROWS, seed=60)
    batches.send()
    wait_until_all_busy([next(iter(children)) for children in pools.values()])
    assert scratch_of(uvicorn_workers), "the pools' scratch directories exist while they run"
    server.running.process.send_signal(signal.SIGTERM)
    batches.join()
    returncode = server.running.process.wait(timeout=60)
    log = server.running.log()
    for result in batches.results:
        assert result.get("status") == 200, (result, log[-3000:])
    priced = sum(json.loads(result["body"])["priced"] for result in batches.results)
    assert returncode == 0, log[-3000:]
    assert log.count("Application shutdown complete.") == 2, log[-3000:]
    assert asyncio.run(audited_count(server.schema, batches.request_ids)) == priced
    deadline = time.monotonic() + 10
    while (left := [pid for pid in everything if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of the server left after it exited: {left}"
    assert not scratch_of(uvicorn_workers), "scratch directories left after the server exited"
