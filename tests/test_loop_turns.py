"""The main process's event loop gets a turn between the pieces of a large batch's work (issue 14: single
quotes on the replica must not wait behind a 10^6-row batch).

Each test reproduces a stall measured during 10^6-row batches (bench_mixed.py) and checks the loop's turns
by counting them, not by timing: a task that does nothing but `await asyncio.sleep(0)` runs once per turn
the loop gets. The server's `send` and `receive` return without a turn while the socket keeps up (a client
on loopback), so the fakes below do the same.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.requests import Request

from pricer.batch_pool import BatchPool
from pricer.batch_process import RESPONSE_CHUNK_BYTES, StreamedFileResponse
from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import PricedBatch, TickerRate, new_batch_id
from pricer.schemas import FeeScheduleView
from pricer.stores.memory import MemoryQuoteStore

pytestmark = pytest.mark.anyio

CHUNKS = 40


async def turns_during(work: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
    """`work()`'s result and how many loop turns other tasks got while it ran."""
    turns = 0
    done = False

    async def count() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    await asyncio.sleep(0)
    started = turns
    try:
        result = await work()
    finally:
        done = True
        await counter
    return result, turns - started


async def test_a_streamed_response_gives_the_loop_a_turn_per_chunk(tmp_path: Path) -> None:
    data = os.urandom(CHUNKS * RESPONSE_CHUNK_BYTES)
    path = tmp_path / "response"
    path.write_bytes(data)
    response = StreamedFileResponse.of(path, len(data), b"application/json")
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:  # the server's, while the socket takes the data
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    async def receive() -> dict[str, Any]:
        raise AssertionError("not read")

    _, turns = await turns_during(lambda: response({"type": "http"}, receive, send))
    assert b"".join(sent) == data
    # Before: the whole file went in one turn (tens of ms of the loop for a 10^6-row answer).
    assert turns >= CHUNKS - 1


async def test_a_large_body_goes_to_the_scratch_file_a_turn_per_chunk() -> None:
    chunk = os.urandom(64 << 10)
    left = CHUNKS

    async def receive() -> dict[str, Any]:  # the server's, while it has the body buffered
        nonlocal left
        left -= 1
        return {"type": "http.request", "body": chunk, "more_body": left > 0}

    pool = BatchPool(1, inline_max_bytes=len(chunk))
    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    try:
        body, turns = await turns_during(lambda: pool._read_body(request))
        assert isinstance(body, Path)
        assert body.read_bytes() == chunk * CHUNKS
        body.unlink()
    finally:
        await pool.stop()
    # Before: every chunk written to tmpfs in the same turn (10-25 ms of the loop for a 10^6-row body).
    assert turns >= CHUNKS - 2


def big_batch(size: int) -> PricedBatch:
    at = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    rate = TickerRate(
        ticker="AAPL",
        rate_units=1_000_000,
        base_rate=0.01,
        volatility_index=0.0,
        volatility_adjustment=0.0,
        event_risk_factor=0,
        event_adjustment=0.0,
        min_rate_units=10_000,
        borrow_status=BorrowStatus.EASY,
        source=RateSource.AVAILABILITY_FILE,
        available_shares=None,
        as_of=at,
    )
    column = np.arange(size, dtype=np.int64)
    return PricedBatch(
        batch_id=new_batch_id(),
        calculated_at=at,
        request_id="r",
        client_id="demo_client",
        key_id=None,
        fee_schedule=FeeScheduleView(5.0, FeeType.FLAT, 25.0, 360),
        rates=[rate],
        rate_index=np.zeros(size, dtype=np.int64),
        input_index=column,
        position_cents=column + 1,
        loan_days=np.ones(size, dtype=np.int64),
        borrow_cost=column.copy(),
        markup=column.copy(),
        transaction_fees=column.copy(),
        total_fee=column.copy(),
    )


async def test_an_evicted_batch_is_freed_off_the_loop_thread() -> None:
    """A 10^6-row batch from a worker maps the pool's file: freeing it (its last reference) unmaps the
    file and frees its pages, 10-25 ms measured on the loop."""
    size = MemoryQuoteStore.SEGMENT_ROWS
    store = MemoryQuoteStore(max_rows=size)
    old = big_batch(size)
    freed_on: list[str] = []
    freed = threading.Event()

    def note() -> None:
        freed_on.append(threading.current_thread().name)
        freed.set()

    weakref.finalize(old.total_fee, note)
    await store.add(old)
    del old
    await store.add(big_batch(size))  # evicts the first
    assert await asyncio.to_thread(freed.wait, 10), "the evicted batch was never freed"
    assert freed_on != [threading.current_thread().name]
    assert store.rows == size
