"""One contract suite for the stores, run against the in-memory and the PostgreSQL implementations.

Every test taking the `stores` fixture runs twice (ids `memory` and `postgres`); the PostgreSQL run gets a
migrated throwaway schema on the shared server (tests/pg.py). The tests after the contract are about the
PostgreSQL backend alone: migrations, bulk loads, atomicity, idempotent audit writes, replicas and errors.
None of them skips: without the server they fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg  # type: ignore[import-untyped]
import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricer.endpoints.views import quote_response
from pricer.errors import BackendError, InvalidParameter, ServiceUnavailable
from pricer.invalidation import LocalBus
from pricer.marketdata.loaders import parse_availability
from pricer.models import (
    ApiKeyRecord,
    AvailabilityEntry,
    AvailabilitySnapshot,
    BorrowStatus,
    Client,
    FeeType,
    MarketEvent,
    RateSource,
    Scope,
    Stock,
    VolatilityReading,
)
from pricer.quotes import (
    PricedBatch,
    PricedQuote,
    TickerRate,
    batch_from_columns,
    batch_to_columns,
    new_batch_id,
)
from pricer.schemas import FeeScheduleView
from pricer.stores.cached import MAX_UNKNOWN_ENTRIES, CachedKeyStore
from pricer.stores.memory import memory_stores
from pricer.stores.migrate import migrate, migration_lock_key, migrations, pending_migrations
from pricer.stores.postgres import audit as postgres_audit
from pricer.stores.postgres.assembly import connect_stores, postgres_stores
from pricer.stores.postgres.audit import PgQuoteStore
from pricer.stores.postgres.copy_rows import is_single_quote
from pricer.stores.postgres.marketdata import PgAvailabilityStore, PgVolatilityStore
from pricer.stores.protocols import Stores
from tests.pg import pg_schema, pg_stores
from tests.shared_data import SHARED_DATA

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 2, 14, 30, 15, 123456, tzinfo=dt.UTC)


@pytest.fixture(params=["memory", "postgres"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        yield memory_stores(max_quote_rows=1_000_000)
    else:
        async with pg_stores() as (pg, _pool, _dsn, _schema):
            yield pg


# ---- builders ------------------------------------------------------------------------------------


def ticker_rate(
    ticker: str,
    *,
    rate_units: int = 5_000_000,
    base_rate: float = 0.05,
    source: RateSource = RateSource.AVAILABILITY_FILE,
    available: int | None = 250_000,
    risk: int = 0,
    status: BorrowStatus = BorrowStatus.EASY,
    as_of: dt.datetime = T0,
) -> TickerRate:
    return TickerRate(
        ticker=ticker,
        rate_units=rate_units,
        base_rate=base_rate,
        volatility_index=23.4567,
        volatility_adjustment=0.034567,
        event_risk_factor=risk,
        event_adjustment=risk / 10 * 0.05,
        min_rate_units=10_000,
        borrow_status=status,
        source=source,
        available_shares=available,
        as_of=as_of,
    )


MIXED_RATES = [
    ticker_rate("AAPL", rate_units=300_000, base_rate=0.0025),
    ticker_rate(
        "GME", rate_units=36_461_880, base_rate=0.303849, risk=7, status=BorrowStatus.HARD, available=None
    ),
    # A float that is no short decimal (0.1 + 0.2) and a rate at the cap: stored and read back bit for bit.
    ticker_rate("BRK.B", rate_units=1_000_000_000, base_rate=0.1 + 0.2, status=BorrowStatus.MEDIUM),
    ticker_rate(
        "ZZZZ",
        rate_units=12_345,
        base_rate=0.0001,
        source=RateSource.FALLBACK,
        available=0,
        as_of=T0 - dt.timedelta(days=3, microseconds=7),
    ),
    ticker_rate("TSLA", rate_units=123_456_789, base_rate=1.23456789, source=RateSource.LENDER_API),
]


def make_batch(
    size: int,
    *,
    rates: Sequence[TickerRate] = MIXED_RATES,
    seed: int = 0,
    key_id: str | None = "k1a2b3c4",
    fee_schedule: FeeScheduleView | None = None,
    calculated_at: dt.datetime = T0,
) -> PricedBatch:
    """A priced batch with synthetic (not re-priced) figures covering each column's domain."""
    rng = np.random.default_rng(seed)
    position = rng.integers(1, 100_000_000_000, size, dtype=np.int64)  # up to $10^9
    cost = rng.integers(0, 10_000_000_000, size, dtype=np.int64)
    markup = rng.integers(0, 1_000_000_000, size, dtype=np.int64)
    fees = rng.integers(0, 100_000_000, size, dtype=np.int64)
    if size:
        position[0], cost[0], markup[0], fees[0] = 100_000_000_000, 1, 0, 2_500
    return PricedBatch(
        batch_id=new_batch_id(),
        calculated_at=calculated_at,
        request_id="req-" + "0123456789abcdef" * 2,
        client_id="client_1",
        key_id=key_id,
        fee_schedule=fee_schedule or FeeScheduleView(5.1234, FeeType.FLAT, 25.0, 365),
        rates=list(rates),
        rate_index=rng.integers(0, len(rates), size, dtype=np.int64),
        input_index=np.arange(size, dtype=np.int64) * 2 + 1,
        position_cents=position,
        loan_days=rng.integers(1, 366, size, dtype=np.int64),
        borrow_cost=cost,
        markup=markup,
        transaction_fees=fees,
        total_fee=cost + markup + fees,
    )


def snapshot(
    as_of: dt.datetime, entries: Sequence[AvailabilityEntry], loaded_at: dt.datetime = T0
) -> AvailabilitySnapshot:
    return AvailabilitySnapshot(
        as_of=as_of, entries={entry.ticker: entry for entry in entries}, loaded_at=loaded_at
    )


def key_record(
    key_id: str, client_id: str, *, created: dt.datetime = T0, secret: bytes = b"\x00h" * 16
) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=key_id,
        client_id=client_id,
        secret_hash=secret,
        scopes=frozenset({Scope.QUOTE, Scope.RATES}),
        created_at=created,
        expires_at=created + dt.timedelta(days=90),
    )


def encoded(quote: PricedQuote | None) -> bytes:
    """The quote's body as the API answers it (a read-back, or the single quote)."""
    return msgspec.json.encode(None if quote is None else quote_response(quote))


# ---- clients -------------------------------------------------------------------------------------


async def test_client_put_creates_then_replaces_whole(stores: Stores) -> None:
    assert await stores.clients.get("client_1") is None
    first = Client(
        client_id="client_1",
        markup_percentage=5.1234,
        transaction_fee_type=FeeType.PERCENTAGE,
        transaction_amount=0.0001,
        day_count=360,
        active=True,
        rate_limit_per_minute=120,
        burst=30,
        updated_at=T0,
    )
    assert await stores.clients.put(first) is True
    assert await stores.clients.get("client_1") == first

    second = Client(
        client_id="client_1",
        markup_percentage=0.0,
        transaction_fee_type=FeeType.FLAT,
        transaction_amount=999_999_999.99,
        active=False,
    )
    assert await stores.clients.put(second) is False
    got = await stores.clients.get("client_1")
    assert got == second
    assert got is not None
    assert got.rate_limit_per_minute is None
    assert got.burst is None
    assert got.day_count == 365
    assert await stores.clients.get("client_2") is None


# ---- stocks --------------------------------------------------------------------------------------


async def test_stocks_put_and_get_many(stores: Stores) -> None:
    assert await stores.stocks.get_many([]) == {}
    assert await stores.stocks.get_many(["AAPL"]) == {}
    aapl = Stock(ticker="AAPL", min_borrow_rate=0.00012345, borrow_status=BorrowStatus.HARD, updated_at=T0)
    gme = Stock(ticker="GME", min_borrow_rate=10.0)
    assert await stores.stocks.put(aapl) is True
    assert await stores.stocks.put(gme) is True
    found = await stores.stocks.get_many(["GME", "NOPE", "AAPL"])
    assert dict(found) == {"GME": gme, "AAPL": aapl}

    replaced = Stock(ticker="AAPL", min_borrow_rate=0.0)
    assert await stores.stocks.put(replaced) is False
    assert (await stores.stocks.get_many(["AAPL"]))["AAPL"] == replaced


# ---- availability --------------------------------------------------------------------------------

ROWS_A = [
    AvailabilityEntry("AAPL", 0.0025, 10_000_000, -0.1234, "APPLE INC", "USD"),
    AvailabilityEntry("GME", 0.303849, 250_000, 4.2, "GAMESTOP CORP-CLASS A", "USD"),
    AvailabilityEntry("BRK.B", None, None, None, "BERKSHIRE HATHAWAY \u00e9", "USD"),
    AvailabilityEntry("SHOP", 12.3456789012, 0, None, "", "CAD"),
]
ROWS_B = [AvailabilityEntry("AAPL", 0.003, 500, 0.25, "APPLE INC", "USD")]


async def test_availability_newest_as_of_in_force_ties_to_last_added(stores: Stores) -> None:
    store = stores.availability
    assert await store.current() is None

    first = snapshot(T0, ROWS_A)
    await store.add(first)
    assert await store.current() == first

    older = snapshot(T0 - dt.timedelta(days=1), ROWS_B)
    await store.add(older)
    assert await store.current() == first  # an older file changes nothing

    tie = snapshot(T0, ROWS_B, loaded_at=T0 + dt.timedelta(minutes=5))
    await store.add(tie)
    assert await store.current() == tie  # same as_of: the last added wins

    newer = snapshot(T0 + dt.timedelta(microseconds=1), ROWS_A, loaded_at=T0 + dt.timedelta(hours=1))
    await store.add(newer)
    current = await store.current()
    assert current == newer
    assert current is not None
    assert list(current.entries) == [entry.ticker for entry in ROWS_A]


async def test_availability_empty_snapshot(stores: Stores) -> None:
    empty = snapshot(T0, [])
    await stores.availability.add(empty)
    assert await stores.availability.current() == empty


# ---- volatility ----------------------------------------------------------------------------------


async def test_volatility_latest_as_of_ties_to_last_added(stores: Stores) -> None:
    store = stores.volatility
    assert await store.latest() is None
    first = VolatilityReading(23.4567, T0, "admin")
    await store.add(first)
    assert await store.latest() == first
    await store.add(VolatilityReading(99.0, T0 - dt.timedelta(seconds=1), "vix_file"))
    assert await store.latest() == first
    tie = VolatilityReading(0.0, T0, "vix_file")
    await store.add(tie)
    assert await store.latest() == tie
    newer = VolatilityReading(200.0, T0 + dt.timedelta(days=1))
    await store.add(newer)
    assert await store.latest() == newer


# ---- events --------------------------------------------------------------------------------------

D0 = dt.date(2026, 3, 2)


def day(offset: int) -> dt.date:
    return D0 + dt.timedelta(days=offset)


async def test_events_window_is_inclusive_and_sorted(stores: Stores) -> None:
    events = stores.events
    assert await events.between(["AAPL"], D0, day(7)) == {}
    late = MarketEvent(date=day(7), type="earnings", risk_factor=None)
    early = MarketEvent(date=D0, type="dividend", risk_factor=3)
    same_day = MarketEvent(date=D0, type="split", risk_factor=10)
    outside = MarketEvent(date=day(8), type="earnings", risk_factor=9)
    before = MarketEvent(date=day(-1), type="earnings", risk_factor=9)
    await events.replace("AAPL", [late, outside, early, before, same_day])
    await events.replace("GME", [MarketEvent(date=day(3), risk_factor=0)])

    window = await events.between(["AAPL", "GME", "TSLA"], D0, day(7))
    assert {ticker: list(found) for ticker, found in window.items()} == {
        "AAPL": [early, same_day, late],
        "GME": [MarketEvent(date=day(3), type="earnings", risk_factor=0)],
    }
    assert {k: list(v) for k, v in (await events.between(["AAPL"], day(1), day(7))).items()} == {
        "AAPL": [late]
    }
    assert {k: list(v) for k, v in (await events.between(["AAPL"], day(8), day(8))).items()} == {
        "AAPL": [outside]
    }
    assert await events.between(["AAPL", "GME"], day(4), day(6)) == {}
    assert await events.between([], D0, day(7)) == {}


async def test_events_replace_whole_and_with_empty_removes(stores: Stores) -> None:
    events = stores.events
    await events.replace(
        "AAPL", [MarketEvent(date=day(1), risk_factor=5), MarketEvent(date=day(2), risk_factor=6)]
    )
    await events.replace("AAPL", [MarketEvent(date=day(3), risk_factor=1)])
    assert {k: list(v) for k, v in (await events.between(["AAPL"], D0, day(7))).items()} == {
        "AAPL": [MarketEvent(date=day(3), risk_factor=1)]
    }
    await events.replace("AAPL", [])
    assert await events.between(["AAPL"], D0, day(7)) == {}

    await events.replace_many(
        {
            "AAPL": [MarketEvent(date=day(1))],
            "GME": [MarketEvent(date=day(2)), MarketEvent(date=day(1))],
            "TSLA": [MarketEvent(date=day(4), type="fda", risk_factor=2)],
        }
    )
    await events.replace_many({"GME": [], "TSLA": [MarketEvent(date=day(5))], "NEW": []})
    window = await events.between(["AAPL", "GME", "TSLA", "NEW"], D0, day(7))
    assert {k: list(v) for k, v in window.items()} == {
        "AAPL": [MarketEvent(date=day(1))],
        "TSLA": [MarketEvent(date=day(5))],
    }
    await events.replace_many({})


# ---- keys ----------------------------------------------------------------------------------------


async def test_keys_put_get_revoke_list(stores: Stores) -> None:
    keys = stores.keys
    assert await keys.get("k1a2b3c4") is None
    assert await keys.revoke("k1a2b3c4", T0) is False
    assert list(await keys.list()) == []

    one = key_record("k1a2b3c4", "client_1")
    two = key_record("k2b3c4d5", "client_1", created=T0 + dt.timedelta(seconds=1))
    admin = ApiKeyRecord(
        key_id="admin0001",
        client_id="admin",
        secret_hash=bytes(range(32)),
        scopes=frozenset(Scope),
        created_at=T0,
        expires_at=T0 + dt.timedelta(days=3650),
    )
    for record in (one, two, admin):
        await keys.put(record)
    assert await keys.get("k1a2b3c4") == one
    assert await keys.get("admin0001") == admin

    assert await keys.revoke("k1a2b3c4", T0 + dt.timedelta(hours=1)) is True
    revoked = await keys.get("k1a2b3c4")
    assert revoked is not None
    assert revoked.revoked_at == T0 + dt.timedelta(hours=1)
    assert revoked.secret_hash == one.secret_hash
    assert revoked.scopes == one.scopes
    # Revoking again keeps the first revocation time.
    assert await keys.revoke("k1a2b3c4", T0 + dt.timedelta(hours=2)) is True
    again = await keys.get("k1a2b3c4")
    assert again is not None
    assert again.revoked_at == T0 + dt.timedelta(hours=1)

    def ids(records: Sequence[ApiKeyRecord]) -> list[str]:
        return sorted(record.key_id for record in records)

    assert ids(await keys.list()) == ["admin0001", "k1a2b3c4", "k2b3c4d5"]
    assert ids(await keys.list("client_1")) == ["k1a2b3c4", "k2b3c4d5"]
    assert ids(await keys.list("admin")) == ["admin0001"]
    assert list(await keys.list("nobody")) == []

    # put replaces the record whole (e.g. BOOTSTRAP_ADMIN_KEY resetting a secret).
    reset = key_record("admin0001", "admin", secret=b"\xff" * 32)
    await keys.put(reset)
    assert await keys.get("admin0001") == reset

    # ... except a revocation: a revoked key is never brought back by a put (issue 16: a revoked
    # BOOTSTRAP_ADMIN_KEY came back at every restart).
    replaced = key_record("k1a2b3c4", "client_1", secret=b"\xee" * 32)
    await keys.put(replaced)
    stored = await keys.get("k1a2b3c4")
    assert stored is not None
    assert stored.revoked_at == T0 + dt.timedelta(hours=1)
    assert stored.secret_hash == replaced.secret_hash


# ---- quotes --------------------------------------------------------------------------------------


async def test_quote_single_row_round_trip(stores: Stores) -> None:
    batch = make_batch(1, rates=[MIXED_RATES[1]], key_id=None)
    await stores.quotes.add(batch)
    got = await stores.quotes.get(batch.quote_id(0))
    assert got == batch.quote(0)
    assert encoded(got) == encoded(batch.quote(0))


async def test_quote_multi_row_round_trip_every_row(stores: Stores) -> None:
    batch = make_batch(64, seed=3, fee_schedule=FeeScheduleView(0.0001, FeeType.PERCENTAGE, 99.9999, 366))
    other = make_batch(5, seed=4)
    await stores.quotes.add(batch)
    await stores.quotes.add(other)
    for row in range(batch.size):
        got = await stores.quotes.get(batch.quote_id(row))
        assert got is not None
        assert encoded(got) == encoded(batch.quote(row)), row
    assert await stores.quotes.get(other.quote_id(4)) == other.quote(4)


async def test_quote_unknown_and_malformed_ids(stores: Stores) -> None:
    batch = make_batch(3)
    await stores.quotes.add(batch)
    assert await stores.quotes.get(batch.quote_id(3)) is None  # past the batch's last row
    assert await stores.quotes.get(new_batch_id() + "00000000") is None
    assert await stores.quotes.get("not-a-quote-id") is None
    assert await stores.quotes.get(batch.quote_id(0).upper()) is None
    assert await stores.quotes.get("") is None


# ==================================================================================================
# PostgreSQL only
# ==================================================================================================


async def _table_count(pool: Any, sql: str, *args: object) -> int:
    value = await pool.fetchval(sql, *args)
    return int(value)


async def test_migrations_are_idempotent() -> None:
    versions = [migration.version for migration in migrations()]
    assert versions
    assert versions[0] == "001_initial"
    async with pg_schema() as (dsn, schema):
        assert await migrate(dsn, schema=schema) == versions
        assert await migrate(dsn, schema=schema) == []
        connection = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            recorded = await connection.fetch(
                "SELECT version, applied_at FROM schema_migrations ORDER BY version"
            )
            assert [row["version"] for row in recorded] == versions
            assert all(row["applied_at"] is not None for row in recorded)
            tables = {
                row["table_name"]
                for row in await connection.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
                )
            }
        finally:
            await connection.close()
        assert {
            "schema_migrations",
            "clients",
            "stocks",
            "availability_snapshots",
            "availability_rows",
            "volatility_readings",
            "market_events",
            "api_keys",
            "quote_batches",
            "quote_rates",
            "quote_rows",
            "quotes",  # a view since 002
        } <= tables


_MIGRATE_SCRIPT = (
    "import asyncio, json, sys\n"
    "from pricer.stores.migrate import migrate\n"
    "print(json.dumps(asyncio.run(migrate(sys.argv[1], schema=sys.argv[2]))))\n"
)


async def test_two_processes_migrating_at_once() -> None:
    """Both processes queue on the advisory lock (held here until both wait), then run: one applies
    everything, the other nothing; the schema is created once and each version recorded once."""
    versions = [migration.version for migration in migrations()]
    async with pg_schema(create=False) as (dsn, schema):
        key = migration_lock_key(schema)
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        holder = await asyncpg.connect(dsn)
        processes: list[asyncio.subprocess.Process] = []
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", key)
            for _ in range(2):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-c",
                        _MIGRATE_SCRIPT,
                        dsn,
                        schema,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.PIPE,
                    )
                )
            deadline = time.monotonic() + 30
            while True:
                waiting = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid::int8 = $1 AND objid::int8 = $2",
                    unsigned >> 32,
                    unsigned & 0xFFFF_FFFF,
                )
                if waiting == 2:
                    break
                assert time.monotonic() < deadline, "the two migrate processes never both waited on the lock"
                assert all(process.returncode is None for process in processes)
                await asyncio.sleep(0.05)
            await holder.execute("SELECT pg_advisory_unlock($1)", key)
            outputs = [await process.communicate() for process in processes]
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await holder.close()
        assert [process.returncode for process in processes] == [0, 0], outputs
        assert all(stderr == b"" for _, stderr in outputs), outputs
        results = sorted((json.loads(stdout) for stdout, _ in outputs), key=len)
        assert results == [[], versions]

        connection = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            rows = await connection.fetch(
                "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version"
            )
        finally:
            await connection.close()
        assert sorted((row["version"], row["n"]) for row in rows) == [(version, 1) for version in versions]


async def test_real_ibkr_file_loads_and_reads_back_equal() -> None:
    text = (SHARED_DATA / "ibkr_usa_2022-08-06.txt").read_bytes()
    parsed = parse_availability(text, loaded_at=dt.datetime.now(dt.UTC))
    assert len(parsed.entries) > 17_000
    async with pg_stores() as (stores, pool, _dsn, _schema):
        started = time.perf_counter()
        await stores.availability.add(parsed)
        elapsed = time.perf_counter() - started
        assert elapsed < 10, f"loading {len(parsed.entries)} rows took {elapsed:.2f} s"
        fresh = PgAvailabilityStore(pool)  # no cache: reads the rows back from the database
        current = await fresh.current()
        assert current == parsed
        assert current is not None
        assert list(current.entries) == list(parsed.entries)
        assert await _table_count(pool, "SELECT count(*) FROM availability_rows") == len(parsed.entries)
        assert await _table_count(pool, "SELECT row_count FROM availability_snapshots") == len(parsed.entries)


async def test_failed_availability_load_changes_nothing() -> None:
    async with pg_stores() as (stores, pool, _dsn, _schema):
        good = snapshot(T0, ROWS_A)
        await stores.availability.add(good)
        rows = [AvailabilityEntry(f"T{i}", 0.01, 100, None, "", "USD") for i in range(5_000)]
        rows[2_500] = AvailabilityEntry("BAD", 0.01, -1, None, "", "USD")  # violates available >= 0 mid-COPY
        damaged = snapshot(T0 + dt.timedelta(days=1), rows)
        with pytest.raises(InvalidParameter) as caught:
            await stores.availability.add(damaged)
        assert "availability_rows_available_check" in caught.value.message
        assert await stores.availability.current() == good
        assert await PgAvailabilityStore(pool).current() == good
        assert await _table_count(pool, "SELECT count(*) FROM availability_snapshots") == 1
        assert await _table_count(pool, "SELECT count(*) FROM availability_rows") == len(ROWS_A)


async def test_memory_quote_store_evicts_whole_old_segments() -> None:
    from pricer.stores.memory import MemoryQuoteStore

    store = MemoryQuoteStore(max_rows=3 * MemoryQuoteStore.SEGMENT_ROWS)
    singles = [make_batch(1, seed=n) for n in range(4 * MemoryQuoteStore.SEGMENT_ROWS + 10)]
    for batch in singles:
        await store.add(batch)
        assert store.rows <= 3 * MemoryQuoteStore.SEGMENT_ROWS
    assert store.rows >= 2 * MemoryQuoteStore.SEGMENT_ROWS
    assert await store.get(singles[0].quote_id(0)) is None  # the oldest segments went first
    newest = singles[-1]
    assert await store.get(newest.quote_id(0)) == newest.quote(0)
    kept = singles[-2 * MemoryQuoteStore.SEGMENT_ROWS]
    assert await store.get(kept.quote_id(0)) == kept.quote(0)
    # A batch larger than the whole retention stays readable to its last row, with (at most) the
    # segment it joined; everything older goes.
    big = make_batch(4 * MemoryQuoteStore.SEGMENT_ROWS, seed=99)
    await store.add(big)
    assert await store.get(big.quote_id(big.size - 1)) == big.quote(big.size - 1)
    assert await store.get(kept.quote_id(0)) is None
    assert big.size <= store.rows <= big.size + MemoryQuoteStore.SEGMENT_ROWS


async def test_quotes_written_twice_keep_one_row_each() -> None:
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        quotes = PgQuoteStore(pool)
        batch, other, empty = make_batch(300, seed=1), make_batch(7, seed=2), make_batch(0)
        await quotes.add(batch)
        await quotes.add(batch)
        assert await quotes.add_many([batch, other, empty, other]) == other.size
        assert await quotes.add_many([batch, other]) == 0
        assert await quotes.add_many([]) == 0
        await quotes.write([other, batch])  # the audit writer's sink interface
        assert await _table_count(pool, "SELECT count(*) FROM quotes") == batch.size + other.size
        assert (
            await _table_count(
                pool,
                "SELECT count(DISTINCT quote_id) FROM quotes WHERE quote_id LIKE $1 || '%'",
                batch.batch_id,
            )
            == batch.size
        )
        assert await quotes.get(other.quote_id(6)) == other.quote(6)


async def test_many_small_batches_in_one_write() -> None:
    async with pg_stores() as (stores, pool, _dsn, _schema):
        batches = [make_batch(1, rates=[MIXED_RATES[i % len(MIXED_RATES)]], seed=i) for i in range(200)]
        assert await PgQuoteStore(pool).add_many(batches) == 200
        for batch in batches[::37]:
            assert await stores.quotes.get(batch.quote_id(0)) == batch.quote(0)


async def test_single_quotes_and_batches_in_one_write_read_back_as_priced() -> None:
    """The audit trail queues single quotes as their columns (QuoteColumns) beside whole batches:
    one write of both stores every row with its exact figures, and once only."""
    singles = [make_batch(1, rates=[MIXED_RATES[i % len(MIXED_RATES)]], seed=i) for i in range(40)]
    batches = [make_batch(5, seed=100), make_batch(1, seed=101), make_batch(17, seed=102)]
    compact = [batch_to_columns(batch) for batch in singles]
    assert all(map(is_single_quote, compact))
    records = [*compact, *batches]
    async with pg_stores() as (stores, pool, _dsn, _schema):
        store = PgQuoteStore(pool)
        assert await store.add_many(records) == 40 + 5 + 1 + 17
        assert await store.add_many(records[::-1]) == 0
        for batch in [*singles, *batches]:
            for row in range(batch.size):
                assert await stores.quotes.get(batch.quote_id(row)) == batch.quote(row)
        await _assert_input_indexes(pool, [*singles, *batches])


async def _assert_input_indexes(pool: Any, batches: Sequence[PricedBatch]) -> None:
    """`input_index` is not part of a quote's response: read it from `quote_rows` itself."""
    async with pool.acquire() as connection:
        stored = dict(await connection.fetch("SELECT quote_id::text, input_index FROM quote_rows"))
    expected = {
        str(uuid.UUID(batch.quote_id(row))): int(batch.input_index[row])
        for batch in batches
        for row in range(batch.size)
    }
    assert stored == expected


@pytest.mark.parametrize("statement_limit", [5_000, 7], ids=["one statement", "by COPY"])
async def test_a_write_of_single_quotes_only(statement_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Single quotes alone go as one statement (up to SINGLE_STATEMENT_QUOTES), more of them by COPY:
    either way each is stored once, with its exact figures, and concurrent writers of the same quotes
    (replicas replaying one spool) add nothing twice."""
    monkeypatch.setattr(postgres_audit, "SINGLE_STATEMENT_QUOTES", statement_limit)
    singles = [make_batch(1, rates=[MIXED_RATES[i % len(MIXED_RATES)]], seed=i) for i in range(30)]
    records = [batch_to_columns(batch) for batch in singles]
    async with pg_stores() as (stores, pool, _dsn, _schema):
        store = PgQuoteStore(pool)
        assert await store.add_many(records[:10]) == 10
        added = await asyncio.gather(
            store.add_many(records),
            store.add_many(records[::-1]),
            store.add_many(records[5:]),
        )
        assert sum(added) == 20
        assert await _table_count(pool, "SELECT count(*) FROM quote_rows") == 30
        assert await _table_count(pool, "SELECT count(*) FROM quote_batches") == 30
        for batch in singles:
            assert await stores.quotes.get(batch.quote_id(0)) == batch.quote(0)
        await _assert_input_indexes(pool, singles)


async def test_odd_batch_fields_are_stored_as_given_by_either_path() -> None:
    """Single quotes (array parameters) and a batch (JSON and COPY) with a tab, line break, backslash or a
    literal `\\N` in an id, no key, a time with an offset of seconds and fee figures at the columns' scale
    and precision come back exactly, written once and replayed."""
    odd = [
        dataclasses.replace(
            make_batch(size, rates=MIXED_RATES[:1], seed=size, key_id=key_id, fee_schedule=schedule),
            request_id=request_id,
            client_id=client_id,
            calculated_at=calculated_at,
        )
        for size, key_id, schedule, request_id, client_id, calculated_at in (
            (1, "\\N", FeeScheduleView(0.1, FeeType.FLAT, 0.0001, 360), "a\tb\nc\\d\re", "c\\1", T0),
            (1, None, FeeScheduleView(0.0001, FeeType.PERCENTAGE, 0.5, 365), "\\N", "tab\there", T0),
            (
                3,
                "k\n",
                FeeScheduleView(99.9999, FeeType.FLAT, 123456789012.5, 365),
                "r",
                "c2",
                T0.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30, seconds=17))),
            ),
        )
    ]
    records = [batch_to_columns(batch) if batch.size == 1 else batch for batch in odd]
    async with pg_stores() as (stores, pool, _dsn, _schema):
        store = PgQuoteStore(pool)
        assert await store.add_many(records[:2]) == 2  # single quotes only: one statement
        assert await store.add_many(records) == 3
        assert await store.add_many(records) == 0
        for batch in odd:
            for row in range(batch.size):
                assert await stores.quotes.get(batch.quote_id(row)) == batch.quote(row)


async def test_single_quotes_and_the_same_quotes_as_batches_written_at_once() -> None:
    """A replica replaying its spool writes PricedBatches by COPY while another writes the same quotes
    as QuoteColumns in one statement: both take the batches' locks first, so neither deadlocks."""
    singles = [make_batch(1, rates=[MIXED_RATES[i % len(MIXED_RATES)]], seed=i) for i in range(60)]
    compact = [batch_to_columns(batch) for batch in singles]
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        store = PgQuoteStore(pool)
        for _ in range(5):
            async with pool.acquire() as connection:
                await connection.execute("TRUNCATE quote_rows, quote_batches")
            added = await asyncio.gather(
                store.add_many(compact),
                store.add_many(singles[::-1]),
                store.add_many(compact[::-1]),
                store.add_many(singles),
            )
            assert sum(added) == 60
        await _assert_input_indexes(pool, singles)


async def test_a_single_quote_beyond_the_columns_writes_nothing_of_its_write() -> None:
    good = make_batch(1, rates=MIXED_RATES[:1], seed=1)
    bad = make_batch(1, rates=MIXED_RATES[:1], seed=2)
    bad.total_fee[0] = 10**18 - 1
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        with pytest.raises(InvalidParameter):
            await PgQuoteStore(pool).add_many([batch_to_columns(good), batch_to_columns(bad)])
        assert await _table_count(pool, "SELECT count(*) FROM quote_rows") == 0
        assert await _table_count(pool, "SELECT count(*) FROM quote_batches") == 0


def test_only_a_consistent_one_row_batch_is_written_as_a_single_quote() -> None:
    one = make_batch(1, rates=MIXED_RATES[:1], seed=3)
    assert is_single_quote(batch_to_columns(one))
    assert batch_from_columns(batch_to_columns(one)) == one
    assert not is_single_quote(batch_to_columns(make_batch(2, rates=MIXED_RATES[:1])))
    assert not is_single_quote(batch_to_columns(make_batch(1, rates=MIXED_RATES[:2])))
    for column in ("total_fee", "input_index", "rate_index"):
        for bad in (
            np.zeros(2, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            np.zeros((1, 1), dtype=np.int64),
        ):
            assert not is_single_quote(batch_to_columns(dataclasses.replace(one, **{column: bad})))


async def test_hundred_thousand_row_batch_round_trips() -> None:
    size = 100_000
    rates = [ticker_rate(f"T{i}", rate_units=1_000 + i, base_rate=(i + 1) / 10_000) for i in range(500)]
    batch = make_batch(size, rates=rates, seed=7)
    async with pg_stores() as (stores, pool, _dsn, _schema):
        started = time.perf_counter()
        await stores.quotes.add(batch)
        elapsed = time.perf_counter() - started
        print(f"quotes.add of {size} rows: {elapsed:.3f} s ({size / elapsed:,.0f} rows/s)")
        assert await _table_count(pool, "SELECT count(*) FROM quotes") == size
        rng = np.random.default_rng(11)
        # 49,999 / 50,000: where the write is cut in two parts written over two connections.
        for row in [0, 1, 255, 49_999, 50_000, 65_535, 65_536, size - 1, *rng.integers(0, size, 20).tolist()]:
            got = await stores.quotes.get(batch.quote_id(row))
            assert got is not None, row
            assert encoded(got) == encoded(batch.quote(row)), row
        assert await stores.quotes.get(batch.quote_id(size)) is None


async def test_a_large_write_is_split_over_connections_exactly_once() -> None:
    batches = [make_batch(size, seed=size) for size in (1, 30_000, 7, 25_000, 1)]
    total = sum(batch.size for batch in batches)
    async with pg_stores() as (stores, pool, _dsn, _schema):
        store = PgQuoteStore(pool, write_connections=3)
        assert await store.add_many(batches) == total
        assert await _table_count(pool, "SELECT count(*) FROM quotes") == total
        # Written again (a replay): every part merges, nothing new.
        assert await store.add_many(batches) == 0
        assert await _table_count(pool, "SELECT count(DISTINCT quote_id) FROM quotes") == total
        for batch in batches:
            for row in {0, batch.size // 2, batch.size - 1}:
                got = await stores.quotes.get(batch.quote_id(row))
                assert got is not None
                assert encoded(got) == encoded(batch.quote(row))


async def test_concurrent_writes_of_the_same_batches_record_each_row_once() -> None:
    """Two replicas replaying the same spool at once: both meet the other's rows, neither fails, and
    together they report every row new exactly once."""
    batches = [make_batch(size, seed=size) for size in (1, 3, 250, 1, 40)]
    total = sum(batch.size for batch in batches)
    async with pg_stores(max_size=6) as (stores, pool, _dsn, _schema):
        first, second = PgQuoteStore(pool), PgQuoteStore(pool)
        for _ in range(5):
            counts = await asyncio.gather(
                first.add_many(batches), second.add_many(list(reversed(batches))), first.add_many(batches)
            )
            assert sum(counts) in (total, 0)
        assert await _table_count(pool, "SELECT count(*) FROM quote_rows") == total
        assert await _table_count(pool, "SELECT count(*) FROM quote_batches") == len(batches)
        for batch in batches:
            assert await stores.quotes.get(batch.quote_id(batch.size - 1)) == batch.quote(batch.size - 1)


async def test_a_rate_snapshot_is_stored_once_however_many_quotes_use_it() -> None:
    async with pg_stores() as (stores, pool, _dsn, _schema):
        one_replica, another = PgQuoteStore(pool), PgQuoteStore(pool)
        # Equal snapshots that are different objects (two replicas, or a replay from the spool).
        copies = [msgspec.structs.replace(rate) for rate in MIXED_RATES]
        await one_replica.add_many([make_batch(50, seed=n) for n in range(3)])
        await another.add_many([make_batch(1, rates=[copies[n % 5]], seed=n) for n in range(20)])
        assert await _table_count(pool, "SELECT count(*) FROM quote_rates") == len(MIXED_RATES)
        # A snapshot differing in any field is another row; every quote reads back its own.
        later = msgspec.structs.replace(MIXED_RATES[0], as_of=T0 + dt.timedelta(microseconds=1))
        riskier = msgspec.structs.replace(MIXED_RATES[0], event_risk_factor=1)
        batches = [make_batch(2, rates=[rate], seed=9) for rate in (MIXED_RATES[0], later, riskier)]
        await one_replica.add_many(batches)
        assert await _table_count(pool, "SELECT count(*) FROM quote_rates") == len(MIXED_RATES) + 2
        for batch in batches:
            assert await stores.quotes.get(batch.quote_id(1)) == batch.quote(1)


async def test_batch_text_fields_are_stored_verbatim() -> None:
    """Batches travel as one JSON parameter: quotes, backslashes, tabs, newlines, non-ASCII and a missing
    key read back exactly as given."""
    odd = ['"quoted"', "back\\slash", "tab\there", "line\nbreak\r", "ünï\u2013côdé", '{"json": [1]}']
    batches = [
        dataclasses.replace(
            make_batch(1, seed=n, key_id=None if n == 0 else text), request_id=text, client_id=text
        )
        for n, text in enumerate(odd)
    ]
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        await PgQuoteStore(pool).add_many(batches)
        for batch, text in zip(batches, odd, strict=True):
            async with pool.acquire() as connection:
                row = await connection.fetchrow(
                    "SELECT request_id, client_id, key_id FROM quote_batches WHERE batch_id = $1::uuid",
                    batch.quote_id(0),
                )
            assert (row["request_id"], row["client_id"], row["key_id"]) == (text, text, batch.key_id)


async def test_a_connection_released_inside_a_transaction_is_rolled_back() -> None:
    """The pools skip asyncpg's reset query (a round trip per release); what they must still do is roll
    back a transaction its user left open."""
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        async with pool.acquire() as connection:
            await connection.execute("CREATE TABLE leftover (n integer)")
            transaction = connection.transaction()
            await transaction.start()
            await connection.execute("INSERT INTO leftover VALUES (1)")
            pid = connection.get_server_pid()
        connections = [await pool.acquire() for _ in range(pool.get_size())]
        try:
            released = [c for c in connections if c.get_server_pid() == pid]
            assert len(released) == 1
            assert not released[0].is_in_transaction()
            assert await released[0].fetchval("SELECT count(*) FROM leftover") == 0
        finally:
            for connection in connections:
                await pool.release(connection)


async def test_batch_times_are_stored_to_the_microsecond() -> None:
    """Batch lines carry their time as text: every offset, the second's edges and times before 1970
    read back as the same instant (a naive time is UTC)."""
    plus_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
    times = [
        T0,
        T0.replace(microsecond=0),
        T0.replace(microsecond=999_999),
        dt.datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=plus_0530),
        dt.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 2, 14, 30, 15, 5),  # naive
        dt.datetime(2100, 2, 28, 1, 2, 3, 400_000, tzinfo=dt.timezone(-dt.timedelta(hours=11))),
        dt.datetime(
            2026, 3, 2, 14, 30, 15, 5, tzinfo=dt.timezone(dt.timedelta(hours=1, seconds=15, microseconds=7))
        ),
        dt.datetime(1930, 6, 1, 12, 0, 0, 250, tzinfo=ZoneInfo("Europe/Amsterdam")),  # +01:19:32 (LMT era)
    ]
    batches = [make_batch(2, calculated_at=moment, seed=n) for n, moment in enumerate(times)]
    singles = [
        make_batch(1, rates=MIXED_RATES[:1], calculated_at=moment, seed=n) for n, moment in enumerate(times)
    ]
    async with pg_stores() as (stores, pool, _dsn, _schema):
        await PgQuoteStore(pool).add_many(batches)  # by COPY
        await PgQuoteStore(pool).add_many([batch_to_columns(batch) for batch in singles])
        for batch, single, moment in zip(batches, singles, times, strict=True):
            expected = moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
            for quote_id in (batch.quote_id(1), single.quote_id(0)):
                got = await stores.quotes.get(quote_id)
                assert got is not None
                assert got.batch.calculated_at == expected, (moment, got.batch.calculated_at)


def _numeric_value(sign: int, digits: Sequence[int]) -> Decimal:
    """A NUMERIC's value from its binary fields, as the server reads them (weight 3, 5 digits)."""
    magnitude = sum(Decimal(digit) * Decimal(10_000) ** (3 - place) for place, digit in enumerate(digits))
    return -magnitude if sign == 0x4000 else magnitude


@given(st.lists(st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1), min_size=1, max_size=20))
def test_money_goes_to_copy_as_its_exact_numeric(cents: list[int]) -> None:
    from pricer.stores.postgres.copy_rows import _money_digits

    signs, digits = _money_digits(np.array(cents, dtype=np.int64))
    for amount, sign, row in zip(cents, signs.tolist(), digits.tolist(), strict=True):
        assert all(0 <= digit < 10_000 for digit in row)
        assert _numeric_value(sign, row) == Decimal(amount) / 100


def test_money_beyond_the_audit_columns_is_refused_before_writing() -> None:
    from pricer.stores.postgres.copy_rows import _money_digits

    for cents in (10**18, -(10**18), np.iinfo(np.int64).max):
        with pytest.raises(ValueError, match="beyond what the audit trail holds"):
            _money_digits(np.array([0, cents], dtype=np.int64))


async def test_an_amount_the_column_cannot_hold_is_rejected_and_nothing_is_written() -> None:
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        good, bad = make_batch(5, seed=1), make_batch(5, seed=2)
        bad.total_fee[3] = 10**18 - 1  # fits the wire format, not numeric(16, 2)
        with pytest.raises(InvalidParameter):
            await PgQuoteStore(pool).add_many([good, bad])
        assert await _table_count(pool, "SELECT count(*) FROM quote_rows") == 0
        assert await _table_count(pool, "SELECT count(*) FROM quote_batches") == 0


_OLD_LAYOUT_INSERT = """
INSERT INTO quotes (quote_id, batch_id, row_index, input_index, calculated_at, request_id, client_id, key_id,
    ticker, position_value, loan_days, markup_percentage, transaction_fee_type, transaction_amount,
    day_count, borrow_rate, base_rate, volatility_index, volatility_adjustment, event_risk_factor,
    event_adjustment, min_rate, borrow_status, rate_source, available_shares, rate_as_of, borrow_cost,
    markup, transaction_fees, total_fee, stored_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::numeric, $11, $12::numeric, $13, $14::numeric, $15,
    $16::numeric, $17::numeric, $18::numeric, $19::numeric, $20, $21::numeric, $22::numeric, $23, $24, $25,
    $26, $27::numeric, $28::numeric, $29::numeric, $30::numeric, $31)
"""


def _old_layout_rows(batch: PricedBatch) -> list[tuple[Any, ...]]:
    """The batch's rows as migration 001's `quotes` table held them (money as exact decimal text)."""
    rows = []
    for row in range(batch.size):
        rate = batch.rates[int(batch.rate_index[row])]

        def money(column: np.ndarray[Any, Any], row: int = row) -> str:
            return str(Decimal(int(column[row])) / 100)

        rows.append(
            (
                batch.quote_id(row),
                batch.batch_id,
                row,
                int(batch.input_index[row]),
                batch.calculated_at,
                batch.request_id,
                batch.client_id,
                batch.key_id,
                rate.ticker,
                money(batch.position_cents),
                int(batch.loan_days[row]),
                repr(batch.fee_schedule.markup_percentage),
                str(batch.fee_schedule.transaction_fee_type),
                repr(batch.fee_schedule.transaction_amount),
                batch.fee_schedule.day_count,
                str(Decimal(rate.rate_units) / 10**8),
                repr(rate.base_rate),
                repr(rate.volatility_index),
                repr(rate.volatility_adjustment),
                rate.event_risk_factor,
                repr(rate.event_adjustment),
                str(Decimal(rate.min_rate_units) / 10**8),
                str(rate.borrow_status),
                str(rate.source),
                rate.available_shares,
                rate.as_of,
                money(batch.borrow_cost),
                money(batch.markup),
                money(batch.transaction_fees),
                money(batch.total_fee),
                T0,  # now() of the transaction that wrote the batch
            )
        )
    return rows


async def test_quotes_recorded_before_002_move_over_unchanged() -> None:
    """A schema as release 001 left it, with quotes in its wide table, migrated to the narrow tables:
    every quote reads back as before, through the store and through the `quotes` view, column for
    column; and the store then writes on top of them."""
    old = [
        make_batch(40, seed=1),
        make_batch(1, rates=[MIXED_RATES[1]], seed=2, key_id=None),
        make_batch(3, rates=MIXED_RATES[2:], seed=3),
    ]
    async with pg_schema() as (dsn, schema):
        assert await migrate(dsn, schema=schema, through="001_initial") == ["001_initial"]
        connection = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            for batch in old:
                await connection.executemany(_OLD_LAYOUT_INSERT, _old_layout_rows(batch))
            before = await connection.fetch("SELECT * FROM quotes ORDER BY quote_id")
            assert len(before) == 44
            assert await migrate(dsn, schema=schema) == [m.version for m in migrations()][1:]
            after = await connection.fetch("SELECT * FROM quotes ORDER BY quote_id")
            for old_row, new_row in zip(before, after, strict=True):
                assert dict(new_row) == dict(old_row)
            assert await connection.fetchval("SELECT count(*) FROM quote_rates") == len(MIXED_RATES)
            assert await connection.fetchval("SELECT count(*) FROM quote_batches") == len(old)
        finally:
            await connection.close()
        stores, pool = await connect_stores(dsn, schema=schema, min_size=1, max_size=2)
        try:
            for batch in old:
                for row in range(batch.size):
                    got = await stores.quotes.get(batch.quote_id(row))
                    assert got is not None
                    assert encoded(got) == encoded(batch.quote(row)), (batch.batch_id, row)
            newer = make_batch(10, seed=4)
            assert await PgQuoteStore(pool).add_many([*old, newer]) == newer.size
            assert await stores.quotes.get(newer.quote_id(9)) == newer.quote(9)
            # The migrated rates are keyed differently from the writer's digests: a quote priced with an
            # equal snapshot after the upgrade adds one row for it, and reads back the same.
            assert await _table_count(pool, "SELECT count(*) FROM quote_rates") <= 2 * len(MIXED_RATES)
        finally:
            await pool.close()


async def test_a_write_on_one_replica_is_seen_by_another() -> None:
    async with pg_stores() as (writer, pool, _dsn, _schema):
        reader_availability = PgAvailabilityStore(pool, refresh_seconds=3600)
        reader_volatility = PgVolatilityStore(pool, refresh_seconds=3600)
        polling = PgAvailabilityStore(pool, refresh_seconds=0.05)
        assert await reader_availability.current() is None
        assert await reader_volatility.latest() is None
        assert await polling.current() is None

        first = snapshot(T0, ROWS_A)
        await writer.availability.add(first)
        await writer.volatility.add(VolatilityReading(30.5, T0))
        assert await reader_availability.current() is None  # cached until invalidated or the interval ends
        reader_availability.invalidate()
        reader_volatility.invalidate()
        assert await reader_availability.current() == first
        assert await reader_volatility.latest() == VolatilityReading(30.5, T0)
        await asyncio.sleep(0.1)
        assert await polling.current() == first

        second = snapshot(T0 + dt.timedelta(hours=1), ROWS_B)
        await writer.availability.add(second)
        await asyncio.sleep(0.1)
        assert await polling.current() == second
        assert reader_availability.last_refresh_error is None


async def test_cached_snapshot_keeps_serving_when_the_database_goes_away() -> None:
    async with pg_stores() as (stores, pool, _dsn, _schema):
        first = snapshot(T0, ROWS_A)
        await stores.availability.add(first)
        replica = PgAvailabilityStore(pool, refresh_seconds=0.0)
        assert await replica.current() == first
        await pool.close()
        assert await replica.current() == first
        assert isinstance(replica.last_refresh_error, ServiceUnavailable)
        with pytest.raises(ServiceUnavailable):
            await PgAvailabilityStore(pool).current()  # nothing cached: no fallback


async def test_unreachable_database_is_service_unavailable_without_secrets() -> None:
    password = "s3cr3t-Pa55word"
    dsn = f"postgresql://postgres:{password}@127.0.0.1:1/test"
    with pytest.raises(ServiceUnavailable) as caught:
        await connect_stores(dsn, min_size=1, max_size=1)
    error = caught.value
    # Raised `from None`: the socket error (which names the host) is neither the cause nor shown.
    assert error.__cause__ is None
    assert error.__suppress_context__
    shown = f"{error.message} {error.details} {error!r} " + "".join(traceback.format_exception(error))
    assert password not in shown
    assert "127.0.0.1" not in shown
    with pytest.raises(ServiceUnavailable) as caught_migrate:
        await migrate(dsn, schema="test_never")
    assert password not in f"{caught_migrate.value.message} {caught_migrate.value.details}"


async def test_pending_migrations() -> None:
    versions = [migration.version for migration in migrations()]
    async with pg_schema() as (dsn, schema):
        stores, pool = await connect_stores(dsn, schema=schema, min_size=1, max_size=1)
        try:
            assert await pending_migrations(pool) == versions
            await migrate(dsn, schema=schema)
            assert await pending_migrations(pool) == []
            assert await stores.clients.get("client_1") is None
        finally:
            await pool.close()


async def test_inconsistent_batch_is_rejected_before_writing() -> None:
    async with pg_stores() as (_stores, pool, _dsn, _schema):
        good = make_batch(3)
        bad = make_batch(3, seed=1)
        bad.rate_index[1] = len(bad.rates)
        with pytest.raises(ValueError, match=f"batch {bad.batch_id}: a rate_index"):
            await PgQuoteStore(pool).add_many([good, bad])
        bad.rate_index[1] = -1
        with pytest.raises(ValueError, match=f"batch {bad.batch_id}: a rate_index"):
            await PgQuoteStore(pool).add_many([bad, good])
        short = dataclasses.replace(make_batch(3, seed=2), markup=np.zeros(2, dtype=np.int64))
        with pytest.raises(ValueError, match=f"batch {short.batch_id}: its columns differ in length"):
            await PgQuoteStore(pool).add_many([good, short])
        # One row too many in one batch and one too few in the next: the totals agree, the rows would not.
        long = dataclasses.replace(make_batch(3, seed=3), loan_days=np.ones(4, dtype=np.int64))
        shorter = dataclasses.replace(make_batch(3, seed=4), loan_days=np.ones(2, dtype=np.int64))
        with pytest.raises(ValueError, match="its columns differ in length"):
            await PgQuoteStore(pool).add_many([long, shorter])
        flat = dataclasses.replace(make_batch(4, seed=5), total_fee=np.zeros((4, 1), dtype=np.int64))
        with pytest.raises(ValueError, match=f"batch {flat.batch_id}: its columns differ in length"):
            await PgQuoteStore(pool).add_many([good, flat])
        assert await _table_count(pool, "SELECT count(*) FROM quotes") == 0


async def test_failed_quote_write_leaves_nothing_and_the_connection_works() -> None:
    async with pg_stores(max_size=1) as (stores, pool, _dsn, _schema):
        good = make_batch(10, seed=5)
        broken = dataclasses.replace(make_batch(10, seed=6), request_id=None)  # type: ignore[arg-type]
        for _ in range(2):  # the first time on a fresh connection, then with its staging tables in place
            with pytest.raises(InvalidParameter) as caught:
                await PgQuoteStore(pool).add_many([good, broken])
            assert caught.value.details is not None
            assert caught.value.details["sqlstate"] == "23502"  # NOT NULL
            assert await _table_count(pool, "SELECT count(*) FROM quotes") == 0
        await stores.quotes.add(good)
        assert await _table_count(pool, "SELECT count(*) FROM quotes") == good.size
        assert await stores.quotes.get(good.quote_id(9)) == good.quote(9)


async def test_closed_pool_and_missing_schema_are_translated() -> None:
    async with pg_schema() as (dsn, schema):
        stores, pool = await connect_stores(dsn, schema=schema, min_size=1, max_size=1)
        try:
            with pytest.raises(BackendError) as caught:
                await stores.clients.get("client_1")  # the schema was never migrated
            assert "migrations" in caught.value.message
            assert caught.value.details is not None
            assert caught.value.details["sqlstate"] == "42P01"
        finally:
            await pool.close()
        with pytest.raises(ServiceUnavailable):
            await stores.keys.get("k1a2b3c4")
        with pytest.raises(ServiceUnavailable):
            await postgres_stores(pool).quotes.add(make_batch(1))


# ---- the key cache in front of the store (issue 16: floods of unknown key ids) ----------------------------


class CountingKeys:
    """A key store that counts the reads reaching it, per key id."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: dict[str, int] = {}

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        self.reads[key_id] = self.reads.get(key_id, 0) + 1
        record: ApiKeyRecord | None = await self.inner.get(key_id)
        return record

    async def put(self, record: ApiKeyRecord) -> None:
        await self.inner.put(record)

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        revoked: bool = await self.inner.revoke(key_id, at)
        return revoked

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]:
        records: Sequence[ApiKeyRecord] = await self.inner.list(client_id)
        return records


async def test_a_flood_of_a_few_unknown_key_ids_reads_postgresql_once_per_id() -> None:
    """2,000 look-ups of 5 unknown ids, 50 at a time, against real PostgreSQL: one read per id (the old
    cache let every concurrent miss through: 50 reads in the first wave)."""
    async with pg_stores() as (pg, _pool, _dsn, _schema):
        counting = CountingKeys(pg.keys)
        cached = CachedKeyStore(counting, LocalBus())
        ids = [f"unknown{n:04d}" for n in range(5)]
        for first in range(0, 2000, 50):
            found = await asyncio.gather(*(cached.get(ids[n % 5]) for n in range(first, first + 50)))
            assert found == [None] * 50
        assert counting.reads == dict.fromkeys(ids, 1)
        # A key created with one of those ids is found at once (the write is announced on the bus).
        record = key_record(ids[0], "client_1")
        await cached.put(record)
        assert await cached.get(ids[0]) == record
        assert counting.reads[ids[0]] == 2


async def test_a_flood_of_random_key_ids_never_evicts_the_known_keys() -> None:
    """120,000 distinct unknown ids (more than the cache holds) between two reads of a known key: the
    second is still served from the cache (the old cache emptied itself when full), and the unknown ids
    held stay bounded."""
    counting = CountingKeys(memory_stores(max_quote_rows=10).keys)
    cached = CachedKeyStore(counting, LocalBus())
    known = key_record("knownkey01", "client_1")
    await counting.put(known)
    assert await cached.get("knownkey01") == known
    for n in range(120_000):
        assert await cached.get(f"r{n:09d}") is None
    assert await cached.get("knownkey01") == known
    assert counting.reads["knownkey01"] == 1
    assert len(cached._cache._unknown) <= MAX_UNKNOWN_ENTRIES
