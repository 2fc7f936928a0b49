"""The PostgreSQL stores of market data: stocks (`PgStockStore`), availability snapshots
(`PgAvailabilityStore`), volatility readings (`PgVolatilityStore`) and market events (`PgEventStore`), with
`_InForce`, the bookkeeping of the records in force cached in process.

Hot-path caching: `PgAvailabilityStore.current()` and `PgVolatilityStore.latest()` keep the record in force
in process. A write through the store updates it before the call returns; another replica's write is
picked up by a cheap indexed check made at most once per `refresh_seconds` (default 0.5 s, so a change is
in force everywhere within 1 s), or at the next call after `invalidate()` (for an invalidation message).
If that check fails while a record is cached, the cached record keeps serving (`last_refresh_error` tells)
and the check is retried at the next interval.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from pricer.errors import PricerError, ServiceUnavailable
from pricer.models import (
    AvailabilityEntry,
    AvailabilitySnapshot,
    BorrowStatus,
    MarketEvent,
    Stock,
    VolatilityReading,
)
from pricer.stores.postgres.common import _float, _num, _opt_utc, _PgStore, _utc, translate_errors

DEFAULT_REFRESH_SECONDS: Final = 0.5

# ---- stocks --------------------------------------------------------------------------------------


def _stock(row: Any) -> Stock:
    status = row["borrow_status"]
    return Stock(
        ticker=str(row["ticker"]),
        min_borrow_rate=_float(row["min_borrow_rate"]),
        borrow_status=None if status is None else BorrowStatus(status),
        updated_at=_opt_utc(row["updated_at"]),
    )


class PgStockStore(_PgStore):
    async def get_many(self, tickers: Sequence[str]) -> Mapping[str, Stock]:
        if not tickers:
            return {}
        with translate_errors("stocks.get_many"):
            rows = await self._pool.fetch(
                "SELECT ticker, min_borrow_rate::float8 AS min_borrow_rate, borrow_status, updated_at"
                " FROM stocks WHERE ticker = ANY($1::text[])",
                list(tickers),
            )
        found = {str(row["ticker"]): _stock(row) for row in rows}
        return {ticker: found[ticker] for ticker in tickers if ticker in found}

    async def put(self, stock: Stock) -> bool:
        with translate_errors("stocks.put"):
            created = await self._pool.fetchval(
                """
                INSERT INTO stocks AS s (ticker, min_borrow_rate, borrow_status, updated_at)
                VALUES ($1, $2::numeric, $3, $4)
                ON CONFLICT (ticker) DO UPDATE SET
                    min_borrow_rate = EXCLUDED.min_borrow_rate,
                    borrow_status = EXCLUDED.borrow_status,
                    updated_at = EXCLUDED.updated_at,
                    stored_at = now()
                RETURNING (s.xmax = 0) AS created
                """,
                stock.ticker,
                _num(stock.min_borrow_rate),
                None if stock.borrow_status is None else str(stock.borrow_status),
                stock.updated_at,
            )
        return bool(created)

    async def tickers(self) -> Sequence[str]:
        with translate_errors("stocks.tickers"):
            rows = await self._pool.fetch("SELECT ticker FROM stocks")
        return [str(row[0]) for row in rows]


# ---- records in force, cached in process ---------------------------------------------------------


class _InForce:
    """When the record in force was last checked, and a lock so that one caller checks at a time."""

    def __init__(self, refresh_seconds: float) -> None:
        self.refresh_seconds = refresh_seconds
        self.next_check = 0.0  # time.monotonic() at which the database is asked again
        self.lock = asyncio.Lock()
        self.key: tuple[dt.datetime, int] | None = None  # (as_of, id) of the cached record
        self.last_refresh_error: PricerError | None = None
        self.loaded = False  # whether the cache holds what the database had at some point

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def checked(self, started: float) -> None:
        self.next_check = started + self.refresh_seconds
        self.last_refresh_error = None
        self.loaded = True

    def failed(self, error: PricerError) -> None:
        self.next_check = time.monotonic() + self.refresh_seconds
        self.last_refresh_error = error

    def newer_or_same(self, key: tuple[dt.datetime, int]) -> bool:
        return self.key is None or key >= self.key


class PgAvailabilityStore(_PgStore):
    """Every loaded file is kept (`availability_snapshots` + `availability_rows`); the one with the newest
    `as_of` is in force, ties going to the last added. The snapshot in force is cached in process (see the
    module's doc): `current()` costs nothing between checks."""

    def __init__(self, pool: Any, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        super().__init__(pool)
        self._in_force = _InForce(refresh_seconds)
        self._snapshot: AvailabilitySnapshot | None = None

    @property
    def last_refresh_error(self) -> PricerError | None:
        """Why the last check for a newer snapshot failed (the cached one kept serving), or None."""
        return self._in_force.last_refresh_error

    def invalidate(self) -> None:
        """Make the next `current()` ask the database (e.g. on an invalidation message)."""
        self._in_force.next_check = 0.0

    async def add(self, snapshot: AvailabilitySnapshot) -> None:
        """Keep the snapshot, atomically: its rows are COPYed in the transaction that records it."""
        fee_texts: dict[float, str] = {}
        rebate_texts: dict[float, str] = {}

        def text(cache: dict[float, str], value: float | None) -> str | None:
            if value is None:
                return None
            try:
                return cache[value]
            except KeyError:
                cache[value] = repr(float(value))
                return cache[value]

        records = [
            (
                seq,
                entry.ticker,
                text(fee_texts, entry.fee_rate),
                entry.available,
                text(rebate_texts, entry.rebate_rate),
                entry.name,
                entry.currency,
            )
            for seq, entry in enumerate(snapshot.entries.values())
        ]
        with translate_errors("availability.add"):
            async with self._pool.acquire() as connection, connection.transaction():
                snapshot_id = await connection.fetchval(
                    "INSERT INTO availability_snapshots (as_of, loaded_at, row_count)"
                    " VALUES ($1, $2, $3) RETURNING id",
                    snapshot.as_of,
                    snapshot.loaded_at,
                    len(records),
                )
                await connection.copy_records_to_table(
                    "availability_rows",
                    records=[(snapshot_id, *record) for record in records],
                    columns=(
                        "snapshot_id",
                        "seq",
                        "ticker",
                        "fee_rate",
                        "available",
                        "rebate_rate",
                        "name",
                        "currency",
                    ),
                )
        key = (snapshot.as_of, int(snapshot_id))
        async with self._in_force.lock:
            if self._in_force.newer_or_same(key):
                self._in_force.key = key
                self._in_force.loaded = True
                self._snapshot = snapshot

    async def current(self) -> AvailabilitySnapshot | None:
        in_force = self._in_force
        if not in_force.due() or (in_force.lock.locked() and in_force.loaded):
            return self._snapshot  # fresh enough, or being refreshed by another caller meanwhile
        async with in_force.lock:
            if in_force.due():
                await self._refresh()
        return self._snapshot

    async def _refresh(self) -> None:
        started = time.monotonic()
        try:
            with translate_errors("availability.current"):
                head = await self._pool.fetchrow(
                    "SELECT id, as_of, loaded_at FROM availability_snapshots"
                    " ORDER BY as_of DESC, id DESC LIMIT 1"
                )
                if head is None:
                    self._snapshot, self._in_force.key = None, None
                elif self._in_force.key is None or int(head["id"]) != self._in_force.key[1]:
                    rows = await self._pool.fetch(
                        "SELECT ticker, fee_rate::float8 AS fee_rate, available,"
                        " rebate_rate::float8 AS rebate_rate, name, currency"
                        " FROM availability_rows WHERE snapshot_id = $1 ORDER BY seq",
                        head["id"],
                    )
                    entry = AvailabilityEntry
                    entries = {row[0]: entry(row[0], row[1], row[2], row[3], row[4], row[5]) for row in rows}
                    self._snapshot = AvailabilitySnapshot(
                        as_of=_utc(head["as_of"]), entries=entries, loaded_at=_utc(head["loaded_at"])
                    )
                    self._in_force.key = (self._snapshot.as_of, int(head["id"]))
        except ServiceUnavailable as error:
            if not self._in_force.loaded:
                raise  # nothing cached to fall back on
            self._in_force.failed(error)
            return
        self._in_force.checked(started)


class PgVolatilityStore(_PgStore):
    """Readings are kept; the latest `as_of` is in force (ties: the last added), cached like availability."""

    def __init__(self, pool: Any, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        super().__init__(pool)
        self._in_force = _InForce(refresh_seconds)
        self._latest: VolatilityReading | None = None

    @property
    def last_refresh_error(self) -> PricerError | None:
        return self._in_force.last_refresh_error

    def invalidate(self) -> None:
        """Make the next `latest()` ask the database."""
        self._in_force.next_check = 0.0

    async def add(self, reading: VolatilityReading) -> None:
        with translate_errors("volatility.add"):
            reading_id = await self._pool.fetchval(
                "INSERT INTO volatility_readings (value, as_of, source)"
                " VALUES ($1::numeric, $2, $3) RETURNING id",
                _num(reading.value),
                reading.as_of,
                reading.source,
            )
        key = (reading.as_of, int(reading_id))
        async with self._in_force.lock:
            if self._in_force.newer_or_same(key):
                self._in_force.key = key
                self._in_force.loaded = True
                self._latest = reading

    async def latest(self) -> VolatilityReading | None:
        """The reading with the latest `as_of` (ties: the last added)."""
        in_force = self._in_force
        if not in_force.due() or (in_force.lock.locked() and in_force.loaded):
            return self._latest  # fresh enough, or being refreshed by another caller meanwhile
        async with in_force.lock:
            if in_force.due():
                await self._refresh()
        return self._latest

    async def _refresh(self) -> None:
        started = time.monotonic()
        try:
            with translate_errors("volatility.latest"):
                row = await self._pool.fetchrow(
                    "SELECT id, value::float8 AS value, as_of, source FROM volatility_readings"
                    " ORDER BY as_of DESC, id DESC LIMIT 1"
                )
        except ServiceUnavailable as error:
            if not self._in_force.loaded:
                raise  # nothing cached to fall back on
            self._in_force.failed(error)
            return
        if row is None:
            self._latest, self._in_force.key = None, None
        elif self._in_force.key is None or int(row["id"]) != self._in_force.key[1]:
            self._latest = VolatilityReading(
                value=_float(row["value"]), as_of=_utc(row["as_of"]), source=row["source"]
            )
            self._in_force.key = (self._latest.as_of, int(row["id"]))
        self._in_force.checked(started)


# ---- events --------------------------------------------------------------------------------------


class PgEventStore(_PgStore):
    """A ticker's events are replaced whole; an empty list removes them."""

    async def replace(self, ticker: str, events: Sequence[MarketEvent]) -> None:
        await self.replace_many({ticker: events})

    async def replace_many(self, events: Mapping[str, Sequence[MarketEvent]]) -> None:
        if not events:
            return
        tickers: list[str] = []
        seqs: list[int] = []
        dates: list[dt.date] = []
        types: list[str] = []
        risks: list[int | None] = []
        for ticker, ticker_events in events.items():
            for seq, event in enumerate(sorted(ticker_events, key=lambda event: event.date)):
                tickers.append(ticker)
                seqs.append(seq)
                dates.append(event.date)
                types.append(event.type)
                risks.append(event.risk_factor)
        with translate_errors("events.replace"):
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    "DELETE FROM market_events WHERE ticker = ANY($1::text[])", list(events)
                )
                if tickers:
                    await connection.execute(
                        "INSERT INTO market_events (ticker, seq, date, type, risk_factor)"
                        " SELECT * FROM unnest($1::text[], $2::int4[], $3::date[], $4::text[], $5::int2[])",
                        tickers,
                        seqs,
                        dates,
                        types,
                        risks,
                    )

    async def between(
        self, tickers: Iterable[str], first: dt.date, last: dt.date
    ) -> Mapping[str, Sequence[MarketEvent]]:
        """Events dated from `first` through `last` (inclusive) of the given tickers."""
        wanted = list(dict.fromkeys(tickers))
        if not wanted or first > last:
            return {}
        with translate_errors("events.between"):
            rows = await self._pool.fetch(
                "SELECT ticker, date, type, risk_factor FROM market_events"
                " WHERE ticker = ANY($1::text[]) AND date BETWEEN $2 AND $3 ORDER BY ticker, seq",
                wanted,
                first,
                last,
            )
        found: dict[str, list[MarketEvent]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(MarketEvent(date=row[1], type=row[2], risk_factor=row[3]))
        return {ticker: found[ticker] for ticker in wanted if ticker in found}
