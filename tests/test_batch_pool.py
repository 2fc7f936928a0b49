"""Large batches off the event loop (issue 14, DESIGN §1 "Batches never stall a replica"): the batch pool's
worker processes, on real servers over loopback.

- figures priced in a worker equal the figures priced inline, and the Decimal reference;
- single quotes and /health keep answering while a large batch is priced on the same server;
- a worker killed with SIGKILL mid-batch: a clean answer, the worker replaced, the engine goes on;
- SIGTERM while a batch runs: the batch completes, then the process exits (and its workers with it).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from pricer import batch_pool
from pricer.batch_pool import SCRATCH_PREFIX, BatchPool
from pricer.batch_process import WorkerDied, WorkerProcess
from tests.conftest import RunningServer, start_server, stop_server
from tests.decimal_reference import reference_fee

pytestmark = [pytest.mark.e2e]

BATCH = "/api/v1/calculate-locate/batch"
QUOTE = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
TICKERS = ["AAPL", "GME", "TSLA", "AMC", "msft", "brk b", "ZZZZ"]  # ZZZZ: unknown
# A body above this goes to a worker in the servers below (the default threshold is 256 KiB).
SMALL_INLINE_MAX = "4096"
# Rows of the batch that must not stall the server (about 18 MB of JSON; inline it holds the loop ~1.5 s).
LARGE_ROWS = 250_000
# Rows of a batch that keeps a worker busy long enough to be killed or signalled mid-way.
BUSY_ROWS = 120_000


def random_rows(count: int, seed: int, *, invalid: bool = True) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(count):
        row: dict[str, Any] = {
            "ticker": rng.choice(TICKERS),
            "position_value": round(rng.uniform(0.01, 2_000_000), 2),
            "loan_days": rng.randint(1, 365),
        }
        if invalid and rng.random() < 0.03:
            row[rng.choice(["position_value", "loan_days", "ticker"])] = rng.choice([0, -5, 400])
        rows.append(row)
    return rows


def batch_body(rows: list[dict[str, Any]], client_id: str = "demo_client") -> bytes:
    return json.dumps({"client_id": client_id, "positions": rows}).encode()


def headers_of(server: RunningServer) -> dict[str, str]:
    return {"X-API-Key": server.keys["DEMO_CLIENT_KEY"], "Content-Type": "application/json"}


def worker_pids(server: RunningServer) -> set[int]:
    """The server's child processes (its batch workers)."""
    pid = server.process.pid
    children: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children.update(
                int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            )
        except FileNotFoundError:
            continue
    return children


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_busy(pid: int, timeout: float = 30.0) -> None:
    """Until the process has used CPU for a while (it is working on the batch)."""
    start = cpu_ticks(pid)
    deadline = time.monotonic() + timeout
    while cpu_ticks(pid) - start < 5:  # 50 ms of CPU
        if time.monotonic() > deadline:
            raise AssertionError("the batch worker never got busy")
        time.sleep(0.005)


def post_raw(server: RunningServer, body: bytes, result: dict[str, Any]) -> None:
    """POST a batch with http.client (its socket reads release the GIL: the test's other threads go on)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", BATCH, body=body, headers=headers_of(server))
        response = connection.getresponse()
        result["status"] = response.status
        result["body"] = response.read()
    except OSError as error:
        result["error"] = error
    finally:
        connection.close()


@pytest.fixture
def pooled(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path,
        BATCH_WORKERS="1",
        BATCH_INLINE_MAX_BYTES=SMALL_INLINE_MAX,
        POSITIONS_LIMIT_PER_MINUTE="100000000",
    )
    try:
        yield server
    finally:
        stop_server(server)


def _figures(body: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    quotes = [{key: value for key, value in quote.items() if key != "quote_id"} for quote in body["quotes"]]
    return quotes, body["errors"]


def test_figures_from_the_pool_equal_inline_and_the_decimal_reference(
    pooled: RunningServer, tmp_path: Path
) -> None:
    rows = random_rows(3000, seed=14)
    body = batch_body(rows)
    assert len(body) > int(SMALL_INLINE_MAX)
    from_pool = httpx.post(pooled.base_url + BATCH, content=body, headers=headers_of(pooled), timeout=60)
    assert from_pool.status_code == 200, from_pool.text
    assert worker_pids(pooled), "the batch went to a worker process"
    (tmp_path / "inline").mkdir()
    inline_server = start_server(
        tmp_path / "inline", BATCH_WORKERS="0", POSITIONS_LIMIT_PER_MINUTE="100000000"
    )
    try:
        inline = httpx.post(
            inline_server.base_url + BATCH, content=body, headers=headers_of(inline_server), timeout=60
        )
        assert not worker_pids(inline_server)
    finally:
        stop_server(inline_server)
    assert inline.status_code == 200, inline.text
    pooled_body, inline_body = from_pool.json(), inline.json()
    assert _figures(pooled_body) == _figures(inline_body)
    assert pooled_body["count"] == inline_body["count"] == len(rows)
    assert 0 < pooled_body["priced"] < len(rows)  # some rows invalid, some tickers unknown
    schedule = pooled_body["fee_schedule"]
    for quote in pooled_body["quotes"]:
        expected = reference_fee(
            Decimal(str(quote["position_value"])),
            Decimal(str(quote["borrow_rate_used"])),
            quote["loan_days"],
            schedule["day_count"],
            Decimal(str(schedule["markup_percentage"])),
            schedule["transaction_fee_type"],
            Decimal(str(schedule["transaction_amount"])),
        )
        got = quote["breakdown"]
        figures = (got["borrow_cost"], got["markup"], got["transaction_fees"], quote["total_fee"])
        assert tuple(Decimal(str(value)) for value in figures) == expected, quote
    # The columnar form, msgpack in and out, priced in the worker: the same figures row by row.
    columns = {name: [row[name] for row in rows] for name in ("ticker", "position_value", "loan_days")}
    columnar = httpx.post(
        pooled.base_url + BATCH,
        content=msgspec.msgpack.encode({"client_id": "demo_client", "columns": columns}),
        headers={**headers_of(pooled), "Content-Type": "application/msgpack"},
        timeout=60,
    )
    assert columnar.status_code == 200, columnar.text
    got = msgspec.msgpack.decode(columnar.content)["columns"]
    assert got["index"] == [quote["index"] for quote in pooled_body["quotes"]]
    assert got["total_fee"] == [quote["total_fee"] for quote in pooled_body["quotes"]]
    # Read back from the audit record the worker's columns were mapped into.
    quote = pooled_body["quotes"][-1]
    read = httpx.get(f"{pooled.base_url}/api/v1/quotes/{quote['quote_id']}", headers=headers_of(pooled))
    assert read.status_code == 200, read.text
    assert read.json()["total_fee"] == quote["total_fee"]


def test_atomic_batch_and_client_errors_from_the_pool(pooled: RunningServer) -> None:
    body = batch_body(random_rows(3000, seed=15))
    atomic = httpx.post(pooled.base_url + BATCH + "?atomic=true", content=body, headers=headers_of(pooled))
    assert atomic.status_code == 400, atomic.text
    assert atomic.json()["details"]["invalid_rows"] > 0
    unknown_client = batch_body(random_rows(3000, seed=15, invalid=False), client_id="nobody_here")
    refused = httpx.post(pooled.base_url + BATCH, content=unknown_client, headers=headers_of(pooled))
    assert refused.status_code == 403, refused.text
    # The worker dropped what it held for those and serves the next batch.
    valid = httpx.post(
        pooled.base_url + BATCH,
        content=batch_body(random_rows(3000, seed=16, invalid=False)),
        headers=headers_of(pooled),
        timeout=60,
    )
    assert valid.status_code == 200, valid.text
    assert valid.json()["priced"] == sum(
        row["ticker"] != "ZZZZ" for row in random_rows(3000, 16, invalid=False)
    )


def test_single_quotes_and_health_answer_while_a_large_batch_is_priced(tmp_path: Path) -> None:
    """Default pool and threshold. Inline, this batch holds the loop for over a second; here single quotes
    sent every 10 ms keep answering within a generous functional bound."""
    server = start_server(tmp_path, POSITIONS_LIMIT_PER_MINUTE="100000000", RATE_LIMIT_PER_MINUTE="100000")
    try:
        body = batch_body(random_rows(LARGE_ROWS, seed=17, invalid=False))
        warm = httpx.post(
            server.base_url + BATCH,
            content=batch_body(random_rows(20_000, 18)),
            headers=headers_of(server),
            timeout=60,
        )
        assert warm.status_code == 200  # the worker has started
        latencies: list[float] = []
        health: list[int] = []
        done = threading.Event()

        def singles() -> None:
            with httpx.Client(base_url=server.base_url, headers=headers_of(server), timeout=10) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    response = client.post("/api/v1/calculate-locate", json=QUOTE)
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200
                    health.append(client.get("/health").status_code)
                    time.sleep(0.01)

        sender = threading.Thread(target=singles)
        sender.start()
        result: dict[str, Any] = {}
        try:
            time.sleep(0.2)
            count_before = len(latencies)
            post_raw(server, body, result)
            during = latencies[count_before:]
        finally:
            done.set()
            sender.join()
        assert result.get("status") == 200, result
        assert json.loads(result["body"])["priced"] > 0.8 * LARGE_ROWS
        assert max(during) < 0.5, f"a single quote waited {max(during):.3f} s during the batch"
        assert len(during) >= 10, "single quotes were sent while the batch ran"
        assert set(health) == {200}
    finally:
        stop_server(server)


def test_a_worker_killed_mid_batch_gives_a_clean_answer_and_is_replaced(pooled: RunningServer) -> None:
    warm = httpx.post(
        pooled.base_url + BATCH, content=batch_body(random_rows(3000, 19)), headers=headers_of(pooled)
    )
    assert warm.status_code == 200
    (victim,) = worker_pids(pooled)
    result: dict[str, Any] = {}
    sender = threading.Thread(target=post_raw, args=(pooled, batch_body(random_rows(BUSY_ROWS, 20)), result))
    sender.start()
    wait_until_busy(victim)
    os.kill(victim, signal.SIGKILL)
    sender.join(timeout=60)
    # Killed while decoding: decoded again on the new worker (200); while pricing: a clean 503.
    assert result.get("status") in (200, 503), result
    if result["status"] == 503:
        error = json.loads(result["body"])
        assert error["error_code"] == "SERVICE_UNAVAILABLE"
    else:
        assert json.loads(result["body"])["count"] == BUSY_ROWS
    deadline = time.monotonic() + 20
    while not (worker_pids(pooled) - {victim}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker_pids(pooled) - {victim}, "the killed worker was replaced"
    after = httpx.post(
        pooled.base_url + BATCH,
        content=batch_body(random_rows(3000, 21)),
        headers=headers_of(pooled),
        timeout=60,
    )
    assert after.status_code == 200, after.text
    assert (
        httpx.post(
            pooled.base_url + "/api/v1/calculate-locate", json=QUOTE, headers=headers_of(pooled)
        ).status_code
        == 200
    )
    assert "Batch worker died" in pooled.log_path.read_text()


def test_sigterm_while_a_batch_runs_lets_it_complete_then_exits(tmp_path: Path) -> None:
    # A drain period, as in production (without one uvicorn re-raises the signal: exit status -15).
    pooled = start_server(
        tmp_path,
        BATCH_INLINE_MAX_BYTES=SMALL_INLINE_MAX,
        POSITIONS_LIMIT_PER_MINUTE="100000000",
        SHUTDOWN_DRAIN_SECONDS="0.5",
    )
    try:
        _sigterm_during_a_batch(pooled)
    finally:
        stop_server(pooled)


def _sigterm_during_a_batch(pooled: RunningServer) -> None:
    warm = httpx.post(
        pooled.base_url + BATCH, content=batch_body(random_rows(3000, 22)), headers=headers_of(pooled)
    )
    assert warm.status_code == 200
    (worker,) = worker_pids(pooled)
    result: dict[str, Any] = {}
    sender = threading.Thread(target=post_raw, args=(pooled, batch_body(random_rows(BUSY_ROWS, 23)), result))
    sender.start()
    wait_until_busy(worker)
    pooled.process.send_signal(signal.SIGTERM)
    sender.join(timeout=60)
    assert result.get("status") == 200, result
    assert json.loads(result["body"])["count"] == BUSY_ROWS
    assert pooled.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists(), "the batch worker stopped with the server"


def test_a_scratch_directory_of_a_killed_server_goes_though_its_pid_was_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed mid-batch (SIGKILL, OOM) leaves its scratch files; the next server removes them at
    its first batch. In a restarted container the new server has the same pid (and a memory emptyDir at
    /dev/shm outlives the restart, its files counted against the pod's memory): found in review, a
    directory whose pid was alive again was kept for ever. Here the killed process's directory is given
    the pid of a live process (this one) to stand for the reused pid."""
    script = (
        "import sys, time\n"
        "import pricer.batch_pool as bp\n"
        "bp._scratch_root = lambda: sys.argv[1]\n"
        "pool = bp.BatchPool(0)\n"
        "pool._ensure_started()\n"
        "(pool.scratch / 'body-left').write_bytes(bytes(1 << 20))\n"
        "print(pool.scratch, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as killed:
        assert killed.stdout is not None
        left = Path(killed.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
    assert (left / "body-left").exists()
    owner = left.name.removeprefix(SCRATCH_PREFIX)
    reused = left.with_name(f"{SCRATCH_PREFIX}{os.getpid()}-{owner.partition('-')[2]}")
    left.rename(reused)

    monkeypatch.setattr(batch_pool, "_scratch_root", lambda: str(tmp_path))
    pool = BatchPool(0)
    pool._ensure_started()
    assert pool.scratch is not None
    assert pool.scratch.is_dir()
    assert not reused.exists(), "the killed server's scratch files were removed"
    again = BatchPool(0)
    again._ensure_started()  # another live server process's pool (WORKERS > 1) keeps the first one's
    assert pool.scratch.is_dir()
    assert again.scratch is not None
    for live in (pool, again):
        asyncio.run(live.stop())
    assert not any(tmp_path.iterdir())


def test_a_workers_pipes_are_closed_by_the_last_thread_out_of_them_never_under_it() -> None:
    """A request cancelled while a thread waits on the worker's pipe kills and closes the worker: the
    descriptor must stay open until that thread has returned (else its number may be reused by a socket
    or a scratch file, and the rest of a message written into it)."""
    worker = WorkerProcess()
    assert worker.receive()[0] == "ready"
    fd = worker.replies.fileno()
    outcome: list[BaseException | tuple[Any, ...]] = []

    def wait_for_a_reply() -> None:
        try:
            outcome.append(worker.receive())
        except WorkerDied as error:
            outcome.append(error)

    waiting = threading.Thread(target=wait_for_a_reply)
    waiting.start()
    time.sleep(0.2)
    worker.close()
    os.fstat(fd)  # still open: the thread is in it
    worker.kill()  # its wait ends with the process
    waiting.join(10)
    assert not waiting.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], WorkerDied)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert worker.wait(10)
    with pytest.raises(WorkerDied):
        worker.send(None)
