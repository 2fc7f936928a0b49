"""The audit trail (DESIGN §4): every priced position recorded, off the request path, nothing accepted lost.

`AuditTrail` runs here against a real `PgQuoteStore` on a throwaway schema of the shared PostgreSQL
(tests/pg.py). A database that is away is a `DeferredPool` not yet opened (every write fails as it does
while the server is down: `ServiceUnavailable`), opened later as the database "returns"; the end-to-end
outage with a real server stopped and started again is in test_postgres_engine.py. Where a write must fail
at one precise point (after the rows were committed, or half-way through a replay) a thin sink in front of
the real store raises there; the store, the pool and the server stay real.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import secrets
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricer.audit import (
    LOCK_FILE,
    REPLAY_CHUNK,
    REPLAY_CHUNK_ROWS,
    AuditTrail,
    QuoteSink,
    Spool,
    encode_record,
    replay_chunks,
    scan,
)
from pricer.audit_sink import WRITE_TIMEOUT_MAX_SECONDS, write_deadline
from pricer.endpoints.views import quote_response
from pricer.errors import ServiceUnavailable
from pricer.logs import FIELDS_ATTR
from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import PricedBatch, PricedQuote, TickerRate, batch_to_columns, new_batch_id
from pricer.schemas import FeeScheduleView
from pricer.settings import AuditDurability as Durability
from pricer.stores.migrate import migrate
from pricer.stores.pool import DeferredPool
from pricer.stores.postgres.audit import PgQuoteStore
from pricer.stores.postgres.common import quote_identifier
from tests.pg import pg_schema

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 2, 14, 30, 15, 123456, tzinfo=dt.UTC)
RATES = [
    TickerRate(
        ticker="AAPL",
        rate_units=300_000,
        base_rate=0.0025,
        volatility_index=20.0,
        volatility_adjustment=0.2,
        event_risk_factor=0,
        event_adjustment=0.0,
        min_rate_units=10_000,
        borrow_status=BorrowStatus.EASY,
        source=RateSource.AVAILABILITY_FILE,
        available_shares=10_000_000,
        as_of=T0,
    ),
    TickerRate(
        ticker="GME",
        rate_units=36_461_880,
        base_rate=0.303849,
        volatility_index=20.0,
        volatility_adjustment=0.2,
        event_risk_factor=6,
        event_adjustment=0.03,
        min_rate_units=10_000,
        borrow_status=BorrowStatus.HARD,
        source=RateSource.AVAILABILITY_FILE,
        available_shares=None,
        as_of=T0 - dt.timedelta(days=1),
    ),
]


def make_batch(size: int, seed: int = 0) -> PricedBatch:
    """A priced batch with synthetic figures (the trail stores what it is given, it does not re-price)."""
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 10_000_000, size, dtype=np.int64)
    markup = cost // 20
    fees = np.full(size, 2_500, dtype=np.int64)
    return PricedBatch(
        batch_id=new_batch_id(),
        calculated_at=T0 + dt.timedelta(seconds=seed),
        request_id=f"req-{seed:08d}",
        client_id="client_1",
        key_id="k1a2b3c4",
        fee_schedule=FeeScheduleView(5.0, FeeType.FLAT, 25.0, 365),
        rates=list(RATES),
        rate_index=rng.integers(0, len(RATES), size, dtype=np.int64),
        input_index=np.arange(size, dtype=np.int64),
        position_cents=rng.integers(1, 100_000_000_000, size, dtype=np.int64),
        loan_days=rng.integers(1, 366, size, dtype=np.int64),
        borrow_cost=cost,
        markup=markup,
        transaction_fees=fees,
        total_fee=cost + markup + fees,
    )


def quote_ids(batches: Sequence[PricedBatch]) -> list[str]:
    return [quote_id for batch in batches for quote_id in batch.quote_ids()]


def encoded(quote: PricedQuote | None) -> bytes:
    """The quote's body as the API answers it (a read-back, or the single quote)."""
    return msgspec.json.encode(None if quote is None else quote_response(quote))


@contextlib.asynccontextmanager
async def quote_database() -> AsyncIterator[tuple[str, str, Any]]:
    """A migrated throwaway schema and a pool on it: (dsn, schema, pool)."""
    async with pg_schema() as (dsn, schema):
        await migrate(dsn, schema=schema)
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=4, server_settings={"search_path": quote_identifier(schema)}
        )
        try:
            yield dsn, schema, pool
        finally:
            await pool.close()


async def stored_ids(pool: Any) -> tuple[int, list[str]]:
    """(row count, quote ids) of the quotes table."""
    rows = await pool.fetch("SELECT quote_id FROM quotes")
    return len(rows), [str(row["quote_id"]) for row in rows]


async def assert_exactly_once(pool: Any, batches: Sequence[PricedBatch]) -> None:
    count, ids = await stored_ids(pool)
    expected = quote_ids(batches)
    assert count == len(expected), f"{count} rows for {len(expected)} positions"
    assert len(set(ids)) == count
    assert set(ids) == set(expected)


async def eventually(
    condition: Callable[[], Any], *, within: float = 10.0, interval: float = 0.02, what: str = ""
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(interval)


async def row_count(pool: Any) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM quotes")
    return count


class FaultySink:
    """The real PgQuoteStore, with a failure injected at chosen write calls (1-based):
    `lose_ack_on`: the rows are committed, then the call fails (the acknowledgement was lost);
    `fail_on`: the call fails before writing anything, and the next query (the writer's probe) fails too."""

    def __init__(
        self,
        inner: PgQuoteStore,
        *,
        lose_ack_on: frozenset[int] = frozenset(),
        fail_on: frozenset[int] = frozenset(),
    ) -> None:
        self.inner = inner
        self.lose_ack_on = set(lose_ack_on)
        self.fail_on = set(fail_on)
        self.calls = 0
        self.away = False
        self.batches_per_call: list[int] = []

    async def write(self, batches: Sequence[PricedBatch]) -> None:
        self.calls += 1
        self.batches_per_call.append(len(batches))
        if self.calls in self.fail_on:
            self.away = True
            raise ServiceUnavailable("The database is unavailable")
        await self.inner.write(batches)
        if self.calls in self.lose_ack_on:
            raise ServiceUnavailable("The database is unavailable")

    async def get(self, quote_id: str) -> PricedQuote | None:
        if self.away:  # the database went away with the failed write, for the next query
            self.away = False
            raise ServiceUnavailable("The database is unavailable")
        return await self.inner.get(quote_id)


def trail_on(sink: QuoteSink, spool_dir: Path, **options: Any) -> AuditTrail:
    return AuditTrail(sink, spool=Spool(spool_dir), retry_seconds=0.05, **options)


def dead_spool(root: Path, *appends: Sequence[PricedBatch]) -> Spool:
    """The spool of a process that appended `appends` and died (its lock let go, its files left)."""
    spool = Spool(root)
    spool.open()
    for batches in appends:
        spool.append(batches)
    spool.release(remove=False)
    return spool


# ---- writing ---------------------------------------------------------------------------------------


async def test_added_batches_are_written_and_readable_before_and_after(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        sink = PgQuoteStore(pool)
        trail = trail_on(sink, tmp_path / "spool")
        batches = [make_batch(1, seed=1), make_batch(7, seed=2), make_batch(2_000, seed=3)]
        for batch in batches:
            await trail.add(batch)
        assert trail.queue_depth == 2_008
        # Before the writer ran: nothing in the database, yet every quote is readable here.
        assert await row_count(pool) == 0
        first = batches[0].quote_id(0)
        assert await sink.get(first) is None
        for batch, row in ((batches[0], 0), (batches[1], 6), (batches[2], 1_999)):
            assert encoded(await trail.get(batch.quote_id(row))) == encoded(batch.quote(row))

        trail.start()
        try:
            await eventually(lambda: trail.queue_depth == 0, what="queue drained")
            await assert_exactly_once(pool, batches)
            assert trail.written_rows == 2_008
            assert trail.spooled_rows == 0
            assert trail.database_up
            assert not trail.spool_pending

            # After the write: a trail with nothing in memory (another replica, a restart) finds them
            # in the database, as priced.
            elsewhere = trail_on(sink, tmp_path / "other-spool", recent_rows=1)
            for batch, row in ((batches[0], 0), (batches[1], 3), (batches[2], 1_234)):
                stored = await elsewhere.get(batch.quote_id(row))
                assert encoded(stored) == encoded(batch.quote(row))
            assert await elsewhere.get(batches[2].quote_id(2_000)) is None

            later = make_batch(3, seed=4)
            await trail.add(later)
            await eventually(lambda: trail.queue_depth == 0, what="second write")
            await assert_exactly_once(pool, [*batches, later])
        finally:
            await trail.close()


async def test_close_drains_the_queue(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        trail.start()
        await asyncio.sleep(0)
        batches = [make_batch(1 + i % 5, seed=i) for i in range(300)]
        for batch in batches:
            await trail.add(batch)  # no await yields to the writer: all of it is still queued
        assert trail.queue_depth == sum(batch.size for batch in batches)
        await trail.close()
        assert trail.queue_depth == 0
        await assert_exactly_once(pool, batches)
        assert not trail.spool_pending


async def test_close_without_a_running_writer_still_drains(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        batches = [make_batch(3, seed=i) for i in range(5)]
        for batch in batches:
            await trail.add(batch)
        await trail.close()
        await assert_exactly_once(pool, batches)


# ---- the spool ---------------------------------------------------------------------------------------


async def test_outage_spools_and_replays_each_batch_exactly_once(tmp_path: Path) -> None:
    async with quote_database() as (dsn, schema, pool):
        away = DeferredPool(dsn, schema=schema, max_size=4)  # not open: the database is unreachable
        trail = trail_on(PgQuoteStore(away), tmp_path / "spool")
        trail.start()
        try:
            during = [make_batch(1 + i % 3, seed=i) for i in range(40)]
            for index, batch in enumerate(during):
                await trail.add(batch)
                if index % 10 == 0:
                    await asyncio.sleep(0.01)  # several writer rounds, several appends
            total = sum(batch.size for batch in during)
            await eventually(lambda: trail.spooled_rows == total, what="everything spooled")
            assert not trail.database_up
            assert trail.spool_pending
            assert trail.queue_depth == 0
            assert [batch.batch_id for batch in trail.spool.read()] == [batch.batch_id for batch in during]
            assert await row_count(pool) == 0
            # Readable on this replica all along.
            assert encoded(await trail.get(during[7].quote_id(1))) == encoded(during[7].quote(1))

            await away.open()  # the database is back
            await eventually(lambda: not trail.spool_pending, what="spool replayed")
            await assert_exactly_once(pool, during)
            assert trail.database_up

            after = [make_batch(2, seed=100 + i) for i in range(3)]
            for batch in after:
                await trail.add(batch)
            await eventually(lambda: trail.queue_depth == 0, what="written after recovery")
            await asyncio.sleep(0.1)  # a further replay round, if any, would add duplicates now
            await assert_exactly_once(pool, [*during, *after])
            assert not trail.spool_pending
        finally:
            try:
                await trail.close()
            finally:
                await away.close()


async def test_close_during_an_outage_spools_and_the_next_start_replays(tmp_path: Path) -> None:
    async with quote_database() as (dsn, schema, pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = trail_on(PgQuoteStore(away), tmp_path / "spool")
        trail.start()
        batches = [make_batch(4, seed=i) for i in range(20)]
        for batch in batches:
            await trail.add(batch)
        await trail.close()  # shutdown while the database is away: everything to the spool
        assert trail.queue_depth == 0
        assert trail.spool_pending
        assert await row_count(pool) == 0

        # The next process, with the database back.
        restarted = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        restarted.start()
        try:
            await eventually(lambda: not restarted.spool_pending, what="replayed at start")
            await assert_exactly_once(pool, batches)
        finally:
            await restarted.close()


async def test_batches_written_but_not_acknowledged_are_not_duplicated(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        # The first write commits, then its acknowledgement is lost; the database answers the probe, so
        # the write is done again at once, and adds nothing.
        sink = FaultySink(PgQuoteStore(pool), lose_ack_on=frozenset({1}))
        trail = trail_on(sink, tmp_path / "spool")
        batches = [make_batch(5, seed=i) for i in range(6)]
        for batch in batches:
            await trail.add(batch)
        trail.start()
        try:
            await eventually(lambda: sink.calls >= 2 and trail.queue_depth == 0, what="written again")
            assert trail.spooled_rows == 0
            await assert_exactly_once(pool, batches)
        finally:
            await trail.close()


async def test_replay_repeated_after_a_partial_write_adds_nothing_twice(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        store = PgQuoteStore(pool)
        batches = [make_batch(1 + i % 3, seed=i) for i in range(150)]  # replayed in chunks of 64
        dead_spool(tmp_path / "spool", *(batches[start : start + 50] for start in range(0, len(batches), 50)))
        # Some of them reached the database before the outage (written, never acknowledged).
        await store.write(batches[:10])
        assert await row_count(pool) == sum(batch.size for batch in batches[:10])

        # The first replay writes its first chunk, then loses the connection on the second.
        sink = FaultySink(store, fail_on=frozenset({2}))
        trail = trail_on(sink, tmp_path / "spool")
        trail.start()
        try:
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            await trail.close()
        assert sink.calls >= 5  # 2 calls in the failed replay, 3 in the one that succeeded
        assert sink.batches_per_call[:5] == [64, 64, 64, 64, 22]
        await assert_exactly_once(pool, batches)

        # A crash between the write and the spool's removal: the same spool is replayed once more.
        dead_spool(tmp_path / "spool", batches)
        again = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        again.start()
        try:
            await eventually(lambda: not again.spool_pending, what="replayed again")
        finally:
            await again.close()
        await assert_exactly_once(pool, batches)


def torn(batch: PricedBatch, keep: Callable[[int], int]) -> bytes:
    """The start of `batch`'s spool record: `keep(len(record))` bytes of it (a crash mid-append)."""
    whole = encode_record(batch)
    return whole[: keep(len(whole))]


TORN_TAILS = {
    "inside-the-magic": lambda n: 2,
    "magic-only": lambda n: 4,
    "header-only": lambda n: 12,
    "half-a-record": lambda n: n // 2,
    "all-but-one-byte": lambda n: n - 1,
}


@pytest.mark.parametrize("tail", list(TORN_TAILS))
async def test_a_torn_last_record_is_ignored_and_the_rest_replayed(tmp_path: Path, tail: str) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        good = [make_batch(3, seed=i) for i in range(5)]
        spool = dead_spool(tmp_path / "spool", good[:2], good[2:])
        lost = make_batch(4, seed=99)
        tail_bytes = torn(lost, TORN_TAILS[tail])
        with spool.path.open("ab") as file:
            file.write(tail_bytes)
        assert [batch.batch_id for batch in spool.read()] == [batch.batch_id for batch in good]

        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        trail.start()
        try:
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, good)
        assert await PgQuoteStore(pool).get(lost.quote_id(0)) is None
        # The torn bytes are cut off the replay and kept, exactly, in the quarantine file.
        assert trail.spool.quarantine_path.read_bytes() == tail_bytes
        assert not spool.directory.exists()


# A crash while appending leaves a torn record; the restarted process, with the database still away, appends
# after it. The record's length prefix then spans the new records: when it claims more than follows
# ("swallowed"), Spool.read stops there and the replay clears the spool, silently losing the new batches;
# when it claims less ("garbled"), a slice of two records is decoded, the decoder raises, and every replay
# (and close) fails from then on, so nothing reaches the database again.
TORN_THEN_APPENDED = {"swallowed": 500, "garbled": 50}


@pytest.mark.parametrize("case", list(TORN_THEN_APPENDED))
async def test_batches_spooled_after_a_torn_tail_are_not_lost(tmp_path: Path, case: str) -> None:
    async with quote_database() as (dsn, schema, pool):
        before = [make_batch(2, seed=i) for i in range(3)]
        spool = dead_spool(tmp_path / "spool", before)
        with spool.path.open("ab") as file:  # the crash, half-way through a record
            file.write(torn(make_batch(TORN_THEN_APPENDED[case], seed=50), lambda n: n // 2))

        # The restarted process, the database still away: new batches are spooled after the torn bytes.
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = trail_on(PgQuoteStore(away), tmp_path / "spool")
        trail.start()
        try:
            after = [make_batch(1, seed=10 + i) for i in range(4)]
            for batch in after:
                await trail.add(batch)
            await eventually(lambda: trail.spooled_rows == 4, what="spooled")
            await away.open()
            await eventually(lambda: not trail.spool_pending, within=2, what="replayed")
        finally:
            try:
                await trail.close()
            finally:
                await away.close()
        await assert_exactly_once(pool, [*before, *after])


# ---- framing: damage in the middle, refused records -------------------------------------------------------


def _flip_payload_byte(frames: list[bytes]) -> bytes:
    damaged = bytearray(frames[1])
    damaged[len(damaged) // 2] ^= 0xFF  # the CRC no longer matches
    return bytes(damaged)


def _garbage(frames: list[bytes]) -> bytes:
    return b"\x00garbage\xff" * 7 + b"PRA"  # not a frame; ends in a partial magic


def _bad_length(frames: list[bytes]) -> bytes:
    damaged = bytearray(frames[1])
    damaged[4:8] = (1 << 30).to_bytes(4, "big")  # claims far more than the file holds
    return bytes(damaged)


DAMAGE = {"flipped-byte": _flip_payload_byte, "garbage": _garbage, "bad-length": _bad_length}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_damaged_record_in_the_middle_is_quarantined_and_the_rest_replayed(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        batches = [make_batch(2 + i, seed=i) for i in range(6)]
        frames = [encode_record(batch) for batch in batches]
        bad = DAMAGE[damage](frames)
        if damage == "garbage":  # garbage between records 1 and 2: every record is whole
            kept, data = batches, frames[0] + frames[1] + bad + b"".join(frames[2:])
        else:  # record 1 damaged
            kept, data = [batches[0], *batches[2:]], frames[0] + bad + b"".join(frames[2:])
        spool = dead_spool(tmp_path / "spool")
        spool.path.write_bytes(data)

        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        trail.start()
        try:
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, kept)
        assert trail.spool.quarantine_path.read_bytes() == bad  # exactly the bytes that could not be read
        assert trail.unreadable_bytes == len(bad)
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "quarantined" in r.getMessage()]
        assert len(errors) == 1, caplog.text
        logged = getattr(errors[0], FIELDS_ATTR)
        assert logged["damaged_bytes"] == len(bad), logged
        assert logged["replayed_batches"] == len(kept), logged
        assert not spool.directory.exists()


_FRAMES = [encode_record(make_batch(1 + i % 4, seed=i)) for i in range(8)]


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 8),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
    cut=st.none() | st.floats(0, 1, exclude_max=True),
)
def test_scan_reads_every_frame_the_damage_did_not_touch(
    count: int, flips: list[tuple[float, int]], cut: float | None
) -> None:
    """Random records, random corruption (flipped bytes, a cut tail): every frame the damage did not
    touch is read, in order; the frames read and the ranges reported unreadable account for every byte."""
    frames = _FRAMES[:count]
    offsets = np.cumsum([0, *(len(f) for f in frames)])
    data = bytearray(b"".join(frames))
    damage = {int(at * len(data)): xor for at, xor in flips}  # one flip per byte (two could cancel)
    hits = sorted(damage)
    for at, xor in damage.items():
        data[at] ^= xor
    end = len(data) if cut is None else int(cut * len(data))
    del data[end:]
    found = scan(bytes(data))
    untouched = [
        i
        for i, (start, stop) in enumerate(itertools.pairwise(offsets))
        if stop <= end and not any(start <= hit < stop for hit in hits)
    ]
    expected = [scan(frames[i]).batches[0].batch_id for i in untouched]
    assert [batch.batch_id for batch in found.batches] == expected
    assert sum(len(frames[i]) for i in untouched) + found.unreadable_bytes == len(data)
    if cut is not None and not hits and end < offsets[-1] and end not in offsets:
        assert found.torn is not None  # a cut inside a frame is a torn tail
        assert found.torn[1] == end


async def test_a_record_the_database_refuses_goes_to_the_dead_letter_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        refused = make_batch(3, seed=500)
        refused.position_cents[1] = 10**15  # beyond quote_rows.position_value numeric(14, 2)
        good = [make_batch(2, seed=i) for i in range(5)]
        # Through the spool (a dead process's, replayed) and through the queue (the database up).
        dead_spool(tmp_path / "spool", [good[0], refused, good[1]])
        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        trail.start()
        try:
            await eventually(lambda: not trail.spool_pending, what="replayed past the refused record")
            refused_too = make_batch(1, seed=501)
            refused_too.position_cents[0] = 10**15
            for batch in (good[2], refused_too, good[3], good[4]):
                await trail.add(batch)
            await eventually(lambda: trail.queue_depth == 0, what="written past the refused record")
        finally:
            await trail.close()
        await assert_exactly_once(pool, good)
        letters = scan(trail.spool.dead_letter_path.read_bytes())
        assert [b.batch_id for b in letters.batches] == [refused.batch_id, refused_too.batch_id]
        assert letters.unreadable_bytes == 0
        assert trail.dead_lettered_rows == 4
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "dead-letter" in r.getMessage()]
        assert len(errors) == 2, caplog.text


# ---- one spool per process: workers, adoption --------------------------------------------------------------


async def test_two_processes_spooling_into_one_directory_lose_nothing(tmp_path: Path) -> None:
    """Two workers (or two processes on one host) with the same AUDIT_SPOOL_DIR through an outage."""
    async with quote_database() as (dsn, schema, pool):
        away = [DeferredPool(dsn, schema=schema, max_size=2) for _ in range(2)]
        trails = [trail_on(PgQuoteStore(p), tmp_path / "spool") for p in away]
        for trail in trails:
            trail.start()
        try:
            batches: list[list[PricedBatch]] = [[], []]
            for i in range(60):
                which = i % 2
                batch = make_batch(1 + i % 4, seed=i)
                batches[which].append(batch)
                await trails[which].add(batch)
                if i % 7 == 0:
                    await asyncio.sleep(0.03)  # both writers spool, interleaved
            total = [sum(b.size for b in group) for group in batches]
            await eventually(
                lambda: [t.spooled_rows for t in trails] == total, what="both spooled everything"
            )
            assert trails[0].spool.path != trails[1].spool.path
            for pool_ in away:
                await pool_.open()
            await eventually(lambda: not any(t.spool_pending for t in trails), what="both replayed")
        finally:
            for trail in trails:
                await trail.close()
            for pool_ in away:
                await pool_.close()
        await assert_exactly_once(pool, [*batches[0], *batches[1]])
        assert not list((tmp_path / "spool").iterdir())


async def test_outage_records_reach_the_spool_without_waiting_for_the_retry(tmp_path: Path) -> None:
    async with quote_database() as (dsn, schema, _pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = AuditTrail(PgQuoteStore(away), spool=Spool(tmp_path / "spool"), retry_seconds=30)
        trail.start()
        try:
            await trail.add(make_batch(1, seed=0))
            await eventually(lambda: trail.spooled_rows == 1, what="first record spooled")
            # The database was just found away: the next attempt is 30 s off. New records must not wait
            # in memory for it (a SIGKILL meanwhile would lose them).
            for i in range(1, 20):
                await trail.add(make_batch(1, seed=i))
                await asyncio.sleep(0.01)
            await eventually(lambda: trail.spooled_rows == 20, within=5, what="spooled as they came")
            assert trail.queue_depth == 0
        finally:
            trail._retry_seconds = 0.05
            await trail.close()
            await away.close()


SPOOL_HOLDER = """
import sys, time
from pathlib import Path
from tests.test_audit import make_batch
from pricer.audit import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
spool.append([make_batch(2, seed=int(sys.argv[2]) + i) for i in range(3)])
print(spool.name, flush=True)
time.sleep(120)
"""


async def test_a_dead_process_spool_is_adopted_and_a_live_one_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"

    def holder(seed: int) -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-c", SPOOL_HOLDER, str(root), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert process.stdout is not None
        return process, process.stdout.readline().strip()

    live, live_name = holder(100)
    dead, dead_name = holder(200)
    try:
        dead.kill()  # kill -9: its lock goes with it, its spool stays
        dead.wait(30)
        async with quote_database() as (_dsn, _schema, pool):
            trail = trail_on(PgQuoteStore(pool), root, adopt_seconds=0.1)
            trail.start()
            try:
                await eventually(lambda: not trail.spool_pending, what="dead spool replayed")
                count, _ = await stored_ids(pool)
                assert count == 6
                assert not (root / dead_name).exists()
                (live_spool,) = (root / live_name).glob("spool-*.bin")
                assert live_spool.stat().st_size > 0  # left alone
                await asyncio.sleep(0.3)  # a few more scans: still left alone
                assert live_spool.exists()

                live.kill()  # now it dies too: the next scan adopts it
                live.wait(30)
                await eventually(lambda: not (root / live_name).exists(), what="second spool adopted")
                await eventually(lambda: not trail.spool_pending, what="second spool replayed")
                count, _ = await stored_ids(pool)
                assert count == 12
                assert trail.adopted_spools == 2
            finally:
                await trail.close()
    finally:
        for process in (live, dead):
            if process.poll() is None:
                process.kill()
                process.wait(30)
            if process.stdout is not None:
                process.stdout.close()


# ---- disk durability ------------------------------------------------------------------------------------


async def test_disk_mode_journals_before_add_returns_and_a_crash_loses_nothing(tmp_path: Path) -> None:
    async with quote_database() as (dsn, schema, pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = trail_on(PgQuoteStore(away), tmp_path / "spool", durability=Durability.DISK)
        batches = [make_batch(1 + i % 3, seed=i) for i in range(200)]
        # No writer running: the records are only in memory and in the journal when add returns.
        await asyncio.gather(*(trail.add(batch) for batch in batches))
        assert trail.journal is not None
        assert 1 <= trail.journal.fsyncs < 20, trail.journal.fsyncs  # group commit: not one per record
        journaled = [
            b.batch_id
            for path in sorted(trail.spool.directory.glob("journal-*"))
            for b in scan(path.read_bytes()).batches
        ]
        assert sorted(journaled) == sorted(b.batch_id for b in batches)
        # The process dies here (kill -9): nothing is written, nothing is closed; its lock goes.
        trail.spool.release(remove=False)
        await away.close()

        restarted = trail_on(PgQuoteStore(pool), tmp_path / "spool")
        restarted.start()
        try:
            await eventually(lambda: not restarted.spool_pending, what="journal replayed")
        finally:
            await restarted.close()
        await assert_exactly_once(pool, batches)
        assert not list((tmp_path / "spool").iterdir())


async def test_disk_mode_journal_segments_are_deleted_once_written(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(
            PgQuoteStore(pool), tmp_path / "spool", durability=Durability.DISK, journal_segment_bytes=4096
        )
        trail.start()
        try:
            batches = []
            most = 0
            for i in range(300):
                batch = make_batch(1 + i % 5, seed=i)
                batches.append(batch)
                await trail.add(batch)
                if i % 10 == 0:
                    await eventually(lambda: trail.queue_depth == 0, what="written")
                    most = max(most, len(list(trail.spool.directory.glob("journal-*"))))
            await eventually(lambda: trail.queue_depth == 0, what="written")
            await asyncio.sleep(0.05)
            assert most <= 3, most  # rotated, and the written segments deleted: bounded
        finally:
            await trail.close()
        await assert_exactly_once(pool, batches)
        assert not list((tmp_path / "spool").iterdir())


async def test_an_earlier_versions_spool_file_is_adopted_on_upgrade(tmp_path: Path) -> None:
    """A pod of the previous version stopped during an outage left `audit-spool.bin` (length-prefixed
    records, one file for all): the new version replays it, and quarantines what it cannot read."""
    async with quote_database() as (_dsn, _schema, pool):
        root = tmp_path / "spool"
        root.mkdir()
        batches = [make_batch(2, seed=i) for i in range(4)]
        records = [msgspec.msgpack.encode(batch_to_columns(batch)) for batch in batches]
        tail = struct.pack(">I", 999) + b"\x93torn"
        data = b"".join(struct.pack(">I", len(r)) + r for r in records) + tail
        (root / "audit-spool.bin").write_bytes(data)
        trail = trail_on(PgQuoteStore(pool), root)
        trail.start()
        try:
            await eventually(lambda: not trail.spool_pending, what="legacy spool replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, batches)
        assert not (root / "audit-spool.bin").exists()
        assert trail.spool.quarantine_path.read_bytes() == tail
        assert sorted(p.name for p in root.iterdir()) == [trail.spool.quarantine_path.name]


async def test_a_long_outage_spools_in_segments_replayed_one_at_a_time(tmp_path: Path) -> None:
    async with quote_database() as (dsn, schema, pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        spool = Spool(tmp_path / "spool", segment_bytes=8192)
        trail = AuditTrail(PgQuoteStore(away), spool=spool, retry_seconds=0.05)
        trail.start()
        try:
            batches = [make_batch(1 + i % 7, seed=i) for i in range(120)]
            for index, batch in enumerate(batches):
                await trail.add(batch)
                if index % 6 == 0:
                    await asyncio.sleep(0.03)
            total = sum(batch.size for batch in batches)
            await eventually(lambda: trail.spooled_rows == total, what="spooled")
            assert len(spool.files()) >= 3, spool.files()
            assert sorted(b.batch_id for b in spool.read()) == sorted(b.batch_id for b in batches)
            await away.open()
            await eventually(lambda: not trail.spool_pending, what="replayed")
            assert spool.files() == []
        finally:
            try:
                await trail.close()
            finally:
                await away.close()
        await assert_exactly_once(pool, batches)


# ---- faults of the trail itself (review of issue 16) ---------------------------------------------------


def poisoned(seed: int) -> PricedBatch:
    """A batch PostgreSQL fails on every time with a server error, not a refusal: a client id too long for
    the quote_batches_by_client index (SQLSTATE 54000, a BackendError, like "the database failed")."""
    return dataclasses.replace(make_batch(2, seed=seed), client_id=secrets.token_hex(20_000))


class SlowSink:
    """The real PgQuoteStore, each write call `delay` seconds late (a replay of many chunks takes a while)."""

    def __init__(self, inner: PgQuoteStore, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.calls = 0

    async def write(self, batches: Sequence[PricedBatch]) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        await self.inner.write(batches)

    async def get(self, quote_id: str) -> PricedQuote | None:
        return await self.inner.get(quote_id)


async def test_a_spool_file_that_cannot_be_read_is_set_aside_and_the_queue_still_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replay error must not stop the writer: here a directory where a spool segment belongs (reading
    it fails with EISDIR, as an I/O error would)."""
    root = tmp_path / "spool"
    before = [make_batch(2, seed=i) for i in range(5)]
    dead = dead_spool(root, before)
    (segment,) = dead.files()
    segment.rename(dead.directory / "spool-000000000001.bin")
    unreadable = dead.directory / "spool-000000000000.bin"  # replayed first
    unreadable.mkdir()
    (unreadable / "x").write_bytes(b"x")
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), root)
        trail.start()
        try:
            after = [make_batch(3, seed=100 + i) for i in range(5)]
            for batch in after:
                await trail.add(batch)
            await eventually(lambda: trail.queue_depth == 0, what="new records written")
            await eventually(lambda: not trail.spool_pending, what="the rest of the spool replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, [*before, *after])
    aside = root / f"quarantine-{dead.name}-spool-000000000000.bin"
    assert (aside / "x").read_bytes() == b"x"  # kept whole for the operator
    assert not dead.directory.exists()
    assert any("set aside" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


async def test_a_directory_whose_lock_cannot_be_opened_does_not_stop_adoption(tmp_path: Path) -> None:
    """orphans() meets a lock it cannot open (another uid's 0600 lock, an I/O error; here a directory
    where the lock file belongs): that directory is skipped, the others adopted, the writer runs."""
    root = tmp_path / "spool"
    stuck = root / "proc-0-stuck"
    (stuck / LOCK_FILE).mkdir(parents=True)
    before = [make_batch(2, seed=i) for i in range(4)]
    dead = dead_spool(root, before)
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), root, adopt_seconds=0.05)
        trail.start()
        try:
            await trail.add(later := make_batch(1, seed=50))
            await eventually(lambda: trail.queue_depth == 0, what="written")
            await eventually(lambda: not dead.directory.exists(), what="the dead spool adopted")
            await asyncio.sleep(0.2)  # further scans meet the stuck directory again
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, [*before, later])
    assert stuck.is_dir()  # left in place


async def test_new_records_do_not_wait_in_memory_for_a_long_replay(tmp_path: Path) -> None:
    """Memory mode's loss window: while a large backlog replays, new records reach the database or the
    spool between replay chunks, not after the whole replay."""
    root = tmp_path / "spool"
    backlog = [make_batch(1, seed=i) for i in range(30 * REPLAY_CHUNK)]  # 30 chunks of 0.1 s: 3 s
    dead_spool(root, backlog)
    async with quote_database() as (_dsn, _schema, pool):
        sink = SlowSink(PgQuoteStore(pool), delay=0.1)
        trail = trail_on(sink, root)
        trail.start()
        try:
            await eventually(lambda: sink.calls >= 2, what="the replay under way")
            await trail.add(new := make_batch(2, seed=10_000))
            await eventually(lambda: trail.queue_depth == 0, within=1.5, what="the new record out of memory")
            assert trail.spool_pending  # the replay is still going
            await eventually(lambda: not trail.spool_pending, within=60, what="replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, [*backlog, new])


async def test_the_loop_is_not_held_while_the_writer_spools_and_retries_with_a_large_spool(
    tmp_path: Path,
) -> None:
    """DESIGN §1: no piece of work holds the loop more than ~20 ms. During an outage, with 33 MB already
    in this process's spool and records spooled as they come, the longest gap between 1 ms sleeps stays
    under 100 ms (reading and decoding the segment on the loop at every retry held it ~0.4 s each time)."""
    async with quote_database() as (dsn, schema, _pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = trail_on(PgQuoteStore(away), tmp_path / "spool")
        # The outage so far: the same 3.3 MB batch spooled ten times (a replay of it is idempotent).
        trail.spool.append([make_batch(100_000, seed=1)] * 10)
        gaps: list[float] = []

        async def lag_probe(seconds: float) -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            last = loop.time()
            while (now := loop.time()) < end:
                gaps.append(now - last)
                last = now
                await asyncio.sleep(0.001)

        probe = asyncio.create_task(lag_probe(3.0))
        await asyncio.sleep(0.01)
        trail.start()
        try:
            for i in range(100):  # records spooled as they come, for 2 s
                await trail.add(make_batch(50, seed=100 + i))
                await asyncio.sleep(0.02)
            await probe
            assert trail.spooled_rows >= 5_000
            assert not trail.database_up
            assert max(gaps) < 0.1, f"the loop was held {max(gaps) * 1000:.0f} ms"
        finally:
            await trail.close()
            await away.close()


async def test_records_are_requeued_when_the_dead_letter_file_cannot_be_written(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), root)
        trail.spool.dead_letter_path.mkdir(parents=True)  # a directory where the file belongs
        refused = make_batch(3, seed=500)
        refused.position_cents[1] = 10**15  # beyond quote_rows.position_value numeric(14, 2)
        good = [make_batch(2, seed=i) for i in range(4)]
        for batch in (good[0], refused, good[1], good[2]):
            await trail.add(batch)  # one write
        trail.start()
        try:
            await asyncio.sleep(0.5)  # several failed attempts
            assert trail.queue_depth == 9  # nothing dropped from the queue
            trail.spool.dead_letter_path.rmdir()  # the disk has room again
            await trail.add(good[3])
            await eventually(lambda: trail.queue_depth == 0, what="written past the refused record")
        finally:
            await trail.close()
        await assert_exactly_once(pool, good)
        letters = scan(trail.spool.dead_letter_path.read_bytes())
        assert [b.batch_id for b in letters.batches] == [refused.batch_id]


@pytest.mark.parametrize("path", ["queue", "spool", "alone"])
async def test_a_record_that_fails_with_a_server_error_every_time_is_dead_lettered(
    tmp_path: Path, path: str
) -> None:
    root = tmp_path / "spool"
    poison = poisoned(700)
    good = [make_batch(2, seed=i) for i in range(6)]
    if path == "spool":
        dead_spool(root, [good[0], poison, good[1]])
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), root)
        if path == "queue":
            for batch in (good[0], poison, good[1]):
                await trail.add(batch)
        trail.start()
        try:
            if path == "alone":  # written on its own first: nothing tells it from a database that fails
                await trail.add(poison)
                await eventually(lambda: trail.spool_pending, what="kept (spooled)")
                assert not trail.database_up
                await asyncio.sleep(0.2)  # retried: still kept, not dead-lettered
                assert not trail.spool.dead_letter_path.exists()
                await trail.add(good[0])  # a write that succeeds beside it settles it
                await trail.add(good[1])
            await eventually(
                lambda: trail.queue_depth == 0 and not trail.spool_pending, what="past the poison record"
            )
            for batch in good[2:]:  # the trail goes on
                await trail.add(batch)
            await eventually(lambda: trail.queue_depth == 0 and not trail.spool_pending, what="written")
            assert trail.database_up
        finally:
            await trail.close()
        await assert_exactly_once(pool, good)
        letters = scan(trail.spool.dead_letter_path.read_bytes())
        assert [b.batch_id for b in letters.batches] == [poison.batch_id]


async def test_a_legacy_spool_left_in_a_crashed_adopters_staging_directory_is_replayed(
    tmp_path: Path,
) -> None:
    """_adopt_legacy moves `audit-spool.bin` into `.proc-legacy-*` and then renames that directory: a crash
    between the two renames left the records in a dot directory that nobody scanned."""
    root = tmp_path / "spool"
    staging = root / ".proc-legacy-0123456789ab"
    staging.mkdir(parents=True)
    (staging / LOCK_FILE).touch()
    batches = [make_batch(2, seed=i) for i in range(3)]
    records = [msgspec.msgpack.encode(batch_to_columns(batch)) for batch in batches]
    (staging / "audit-spool.bin").write_bytes(b"".join(struct.pack(">I", len(r)) + r for r in records))
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), root)
        trail.start()
        try:
            await eventually(lambda: not staging.exists(), what="the staging directory adopted")
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            await trail.close()
        await assert_exactly_once(pool, batches)


async def test_disk_mode_a_quote_the_journal_refused_is_not_served(tmp_path: Path) -> None:
    async with quote_database() as (_dsn, _schema, pool):
        trail = trail_on(PgQuoteStore(pool), tmp_path / "spool", durability=Durability.DISK)
        trail.spool.open()
        (trail.spool.directory / "journal-000000000000.bin").mkdir()  # the journal cannot be written
        batch = make_batch(1, seed=1)
        with pytest.raises(ServiceUnavailable):
            await trail.add(batch)
        assert await trail.get(batch.quote_id(0)) is None  # the client got a 503 for it
        await trail.close()


async def test_disk_mode_spools_without_a_second_fsync_and_loses_nothing(tmp_path: Path) -> None:
    """In `disk` mode a spooled record is in the journal (fsynced) already: the spool append does not
    fsync again; the spool is flushed before a journal segment goes."""
    async with quote_database() as (dsn, schema, pool):
        away = DeferredPool(dsn, schema=schema, max_size=2)
        trail = trail_on(
            PgQuoteStore(away), tmp_path / "spool", durability=Durability.DISK, journal_segment_bytes=2048
        )
        trail.start()
        try:
            batches = [make_batch(1 + i % 3, seed=i) for i in range(60)]
            for index, batch in enumerate(batches):
                await trail.add(batch)
                if index % 6 == 0:
                    await asyncio.sleep(0.03)  # several appends, several journal segments
            total = sum(batch.size for batch in batches)
            await eventually(lambda: trail.spooled_rows == total, what="spooled")
            assert trail.spool.syncs == 0
            await away.open()
            await eventually(lambda: not trail.spool_pending, what="replayed")
        finally:
            try:
                await trail.close()
            finally:
                await away.close()
        await assert_exactly_once(pool, batches)
        assert not list((tmp_path / "spool").iterdir())

        still_away = DeferredPool(dsn, schema=schema, max_size=1)
        memory = trail_on(PgQuoteStore(still_away), tmp_path / "memory")
        await memory.add(make_batch(1, seed=1_000))
        await memory.close()  # to the spool, fsynced: its only copy
        await still_away.close()
        assert memory.spool.syncs == 1


def test_replay_chunks_stop_at_their_batch_and_row_counts_and_cover_every_batch_once() -> None:
    big = REPLAY_CHUNK_ROWS
    sizes = [1] * (REPLAY_CHUNK + 3) + [big, big // 2, big // 2, 1, big * 3]
    chunks = replay_chunks(sizes)
    assert [index for start, end in chunks for index in range(start, end)] == list(range(len(sizes)))
    for start, end in chunks:
        assert end - start <= REPLAY_CHUNK
        assert end - start == 1 or sum(sizes[start:end]) <= REPLAY_CHUNK_ROWS
    assert chunks[0] == (0, REPLAY_CHUNK)
    assert (len(sizes) - 1, len(sizes)) in chunks  # a batch bigger than the bound goes alone
    assert replay_chunks([]) == []


def test_a_writes_deadline_grows_with_its_rows_up_to_the_cap() -> None:
    """Capped so that a SIGTERM with the database hung (a write in flight, a replay chunk, the drain)
    ends within the pod's 45 s grace period."""
    assert write_deadline(1) < write_deadline(100_000) < WRITE_TIMEOUT_MAX_SECONDS
    assert write_deadline(10**7) == WRITE_TIMEOUT_MAX_SECONDS
    assert 3 * WRITE_TIMEOUT_MAX_SECONDS + 5 < 45
