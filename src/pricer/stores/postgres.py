"""PostgreSQL stores over an asyncpg pool: the shared backend of a scaled-out deployment (DESIGN §1).

Each class mirrors the semantics of its in-memory twin in `pricer.stores.memory` (the contract tests run
one suite against both). The tables come from `stores/migrations/*.sql`, applied by
`pricer.stores.migrate.migrate`.

Numbers: a float is written as the shortest text that round-trips it (`repr`) into a NUMERIC column and
read back through `::float8` (PostgreSQL converts the exact decimal text with a correctly rounded
`strtod`, the same float as `float(Decimal(...))`), so every figure comes back bit for bit.

Errors: every asyncpg or socket error is translated here (`translate_errors`): an unreachable or
overloaded database becomes `ServiceUnavailable`, a rejected value `InvalidParameter`, a duplicate
`Conflict`, anything else `BackendError`. Messages carry the SQLSTATE and the constraint at most, never the
DSN, a host name or a password.

Hot-path caching: `PgAvailabilityStore.current()` and `PgVolatilityStore.latest()` keep the record in force
in process. A write through the store updates it before the call returns; another replica's write is
picked up by a cheap indexed check made at most once per `refresh_seconds` (default 0.5 s, so a change is
in force everywhere within 1 s), or at the next call after `invalidate()` (for an invalidation message).
If that check fails while a record is cached, the cached record keeps serving (`last_refresh_error` tells)
and the check is retried at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import itertools
import operator
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, cast

import asyncpg  # type: ignore[import-untyped]
import msgspec
import numpy as np

from pricer.errors import (
    BackendError,
    Conflict,
    InvalidParameter,
    PricerError,
    ServiceUnavailable,
)
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
from pricer.quotes import AuditRecord, PricedBatch, RowValues, SingleQuote, TickerRate, split_quote_id
from pricer.schemas import Breakdown, FeeScheduleView, QuoteResponse, RateComponents
from pricer.stores.protocols import Stores

__all__ = [
    "DEFAULT_REFRESH_SECONDS",
    "PgAvailabilityStore",
    "PgClientStore",
    "PgEventStore",
    "PgKeyStore",
    "PgQuoteStore",
    "PgStockStore",
    "PgVolatilityStore",
    "connect_stores",
    "postgres_stores",
    "quote_identifier",
    "translate_errors",
    "valid_schema_name",
]

DEFAULT_REFRESH_SECONDS: Final = 0.5

# ---- errors --------------------------------------------------------------------------------------

_UNAVAILABLE = "The database is unavailable"
# SQLSTATE classes / codes meaning "the database cannot serve us right now".
_UNAVAILABLE_CLASSES: Final = ("08", "53", "28", "3D")  # connection, resources, authorization, catalog
_UNAVAILABLE_CODES: Final = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "58000", "58030"})
_SCHEMA_MISSING_CODES: Final = frozenset({"42P01", "42703", "42883", "3F000"})


def _server_error(exc: Any, operation: str) -> PricerError:
    """The PricerError for an error the server reported (an `asyncpg.PostgresError`)."""
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    details: dict[str, Any] = {"operation": operation, "sqlstate": sqlstate}
    constraint = getattr(exc, "constraint_name", None)
    if constraint:
        details["constraint"] = str(constraint)
    if sqlstate.startswith(_UNAVAILABLE_CLASSES) or sqlstate in _UNAVAILABLE_CODES:
        return ServiceUnavailable(_UNAVAILABLE, details=details)
    if sqlstate == "57014":
        return ServiceUnavailable("The database did not answer in time", details=details)
    if sqlstate.startswith("40"):
        return ServiceUnavailable(
            "The database aborted the operation (transient conflict); retry", details=details
        )
    if sqlstate == "23505":
        return Conflict(
            f"{operation}: the record already exists ({constraint or 'unique key'})", details=details
        )
    if sqlstate.startswith("23"):
        return InvalidParameter(
            f"{operation}: the database rejected the record ({constraint or 'integrity constraint'})",
            details=details,
        )
    if sqlstate.startswith("22"):
        return InvalidParameter(
            f"{operation}: the database rejected a value (SQLSTATE {sqlstate})", details=details
        )
    if sqlstate in _SCHEMA_MISSING_CODES:
        return BackendError(
            f"{operation}: the database schema is missing or out of date; run the migrations", details=details
        )
    return BackendError(f"{operation}: database error (SQLSTATE {sqlstate or 'unknown'})", details=details)


@contextlib.contextmanager
def translate_errors(operation: str) -> Iterator[None]:
    """Turn asyncpg and socket errors raised inside into PricerErrors (usable around `await`s).

    Connection-level errors are raised `from None` with only the cause's class name in `details`, since
    their text may name hosts or parts of the DSN; errors the server reported keep their cause.
    """
    try:
        yield
    except PricerError:
        raise
    except asyncpg.PostgresError as exc:
        raise _server_error(exc, operation) from exc
    except asyncpg.exceptions.ClientConfigurationError as exc:
        raise ServiceUnavailable(
            "The database URL or connection options are not valid",
            details={"operation": operation, "cause": type(exc).__name__},
        ) from None
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:
        raise ServiceUnavailable(
            _UNAVAILABLE, details={"operation": operation, "cause": type(exc).__name__}
        ) from None
    except asyncpg.exceptions.InternalClientError as exc:
        raise BackendError(
            f"{operation}: database client error",
            details={"operation": operation, "cause": type(exc).__name__},
        ) from exc


# ---- helpers -------------------------------------------------------------------------------------

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def valid_schema_name(name: str) -> bool:
    return _SCHEMA_NAME.match(name) is not None


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _num(value: float) -> str:
    """A float as the decimal text a NUMERIC column stores exactly (its shortest round-trip repr)."""
    return repr(float(value))


def _float(value: Any) -> float:
    return float(value)


def _utc(value: Any) -> dt.datetime:
    moment: dt.datetime = value
    return moment.astimezone(dt.UTC)


def _opt_utc(value: Any) -> dt.datetime | None:
    return None if value is None else _utc(value)


class _PgStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool


# ---- clients and stocks --------------------------------------------------------------------------

_SELECT_CLIENT = (
    "SELECT client_id, markup_percentage::float8 AS markup_percentage, transaction_fee_type,"
    " transaction_amount::float8 AS transaction_amount, day_count, active, rate_limit_per_minute, burst,"
    " updated_at FROM clients WHERE client_id = $1"
)


def _client(row: Any) -> Client:
    return Client(
        client_id=str(row["client_id"]),
        markup_percentage=_float(row["markup_percentage"]),
        transaction_fee_type=FeeType(row["transaction_fee_type"]),
        transaction_amount=_float(row["transaction_amount"]),
        day_count=int(row["day_count"]),
        active=bool(row["active"]),
        rate_limit_per_minute=row["rate_limit_per_minute"],
        burst=row["burst"],
        updated_at=_opt_utc(row["updated_at"]),
    )


class PgClientStore(_PgStore):
    async def get(self, client_id: str) -> Client | None:
        with translate_errors("clients.get"):
            row = await self._pool.fetchrow(_SELECT_CLIENT, client_id)
        return None if row is None else _client(row)

    async def put(self, client: Client) -> bool:
        """Store the client whole; True when it was created, False when it replaced one."""
        with translate_errors("clients.put"):
            created = await self._pool.fetchval(
                """
                INSERT INTO clients AS c (
                    client_id, markup_percentage, transaction_fee_type, transaction_amount,
                    day_count, active, rate_limit_per_minute, burst, updated_at)
                VALUES ($1, $2::numeric, $3, $4::numeric, $5, $6, $7, $8, $9)
                ON CONFLICT (client_id) DO UPDATE SET
                    markup_percentage = EXCLUDED.markup_percentage,
                    transaction_fee_type = EXCLUDED.transaction_fee_type,
                    transaction_amount = EXCLUDED.transaction_amount,
                    day_count = EXCLUDED.day_count,
                    active = EXCLUDED.active,
                    rate_limit_per_minute = EXCLUDED.rate_limit_per_minute,
                    burst = EXCLUDED.burst,
                    updated_at = EXCLUDED.updated_at,
                    stored_at = now()
                RETURNING (c.xmax = 0) AS created
                """,
                client.client_id,
                _num(client.markup_percentage),
                str(client.transaction_fee_type),
                _num(client.transaction_amount),
                client.day_count,
                client.active,
                client.rate_limit_per_minute,
                client.burst,
                client.updated_at,
            )
        return bool(created)


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


# ---- API keys ------------------------------------------------------------------------------------

_SELECT_KEYS = (
    "SELECT key_id, client_id, secret_hash, scopes, created_at, expires_at, revoked_at FROM api_keys"
)


def _key(row: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=str(row["key_id"]),
        client_id=str(row["client_id"]),
        secret_hash=bytes(row["secret_hash"]),
        scopes=frozenset(Scope(scope) for scope in row["scopes"]),
        created_at=_utc(row["created_at"]),
        expires_at=_utc(row["expires_at"]),
        revoked_at=_opt_utc(row["revoked_at"]),
    )


class PgKeyStore(_PgStore):
    """API keys by id; only the secret's HMAC is stored (the record holds nothing else secret)."""

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        with translate_errors("keys.get"):
            row = await self._pool.fetchrow(_SELECT_KEYS + " WHERE key_id = $1", key_id)
        return None if row is None else _key(row)

    async def put(self, record: ApiKeyRecord) -> None:
        """Insert or replace the key, but a revoked key stays revoked (its first revocation time is kept):
        replacing a key's secret (BOOTSTRAP_ADMIN_KEY at every start) never brings a revoked key back."""
        with translate_errors("keys.put"):
            await self._pool.execute(
                """
                INSERT INTO api_keys (
                    key_id, client_id, secret_hash, scopes, created_at, expires_at, revoked_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (key_id) DO UPDATE SET
                    client_id = EXCLUDED.client_id,
                    secret_hash = EXCLUDED.secret_hash,
                    scopes = EXCLUDED.scopes,
                    created_at = EXCLUDED.created_at,
                    expires_at = EXCLUDED.expires_at,
                    revoked_at = coalesce(api_keys.revoked_at, EXCLUDED.revoked_at)
                """,
                record.key_id,
                record.client_id,
                bytes(record.secret_hash),
                sorted(str(scope) for scope in record.scopes),
                record.created_at,
                record.expires_at,
                record.revoked_at,
            )

    async def revoke(self, key_id: str, at: dt.datetime) -> bool:
        """Mark the key revoked (the first revocation's time stays); False when there is no such key."""
        with translate_errors("keys.revoke"):
            found = await self._pool.fetchval(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE key_id = $1 RETURNING true",
                key_id,
                at,
            )
        return found is not None

    async def list(self, client_id: str | None = None) -> Sequence[ApiKeyRecord]:
        with translate_errors("keys.list"):
            rows = await self._pool.fetch(
                _SELECT_KEYS + " WHERE $1::text IS NULL OR client_id = $1 ORDER BY created_at, key_id",
                client_id,
            )
        return [_key(row) for row in rows]


# ---- quotes (the audit trail) --------------------------------------------------------------------

# The trail is three tables (migration 002): `quote_rows`, one narrow row per priced position;
# `quote_batches`, one row per priced call; `quote_rates`, one row per rate snapshot, keyed by a digest of
# its contents. Rows go by binary COPY straight into `quote_rows`: all their fields are fixed-width (uuid,
# int8, int4, and NUMERIC sent with a fixed number of base-10000 digits, which the server normalises), so
# NumPy builds the whole stream as one structured array. A write's batches and its few distinct rates go
# before, in one statement: a round trip costs the event loop ~100 µs whatever it carries, and most
# writes are a few hundred single quotes, so statements, not bytes, are what a write pays for. The
# batches are one JSON array parameter, [id, time, request id, [client, key, fee schedule...]] each,
# the last part encoded once per client and key (msgspec encodes it in C; as array parameters,
# asyncpg's per-element checks cost a few microseconds a batch), the rates array parameters (floats as their
# shortest decimal text, rates as integer 1e-8 units, scaled in SQL). Both skip what is already stored.
_NEW_RATES = """new_rates AS (
    INSERT INTO quote_rates (rate_id, ticker, borrow_rate, base_rate, volatility_index, volatility_adjustment,
                             event_risk_factor, event_adjustment, min_rate, borrow_status, rate_source,
                             available_shares, rate_as_of)
    SELECT rate_id, ticker, rate_units * 0.00000001, base_rate, volatility_index, volatility_adjustment,
           event_risk_factor, event_adjustment, min_rate_units * 0.00000001, borrow_status, rate_source,
           available_shares, rate_as_of
    FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::numeric[], $5::numeric[], $6::numeric[], $7::int2[],
                $8::numeric[], $9::int8[], $10::text[], $11::text[], $12::int8[], $13::timestamptz[])
        AS x (rate_id, ticker, rate_units, base_rate, volatility_index, volatility_adjustment,
              event_risk_factor, event_adjustment, min_rate_units, borrow_status, rate_source,
              available_shares, rate_as_of)
    ON CONFLICT (rate_id) DO NOTHING
)"""
_BATCHES_FROM = """INSERT INTO quote_batches (batch_id, calculated_at, request_id, client_id, key_id,
                           markup_percentage, transaction_fee_type, transaction_amount, day_count)
SELECT (b->>0)::uuid, (b->>1)::timestamptz, b->>2, b->3->>0, b->3->>1, (b->3->>2)::numeric, b->3->>3,
       (b->3->>4)::numeric, (b->3->>5)::integer
FROM {source}
ORDER BY 1
ON CONFLICT (batch_id) DO NOTHING"""
_INSERT_RATES_AND_BATCHES = (
    f"WITH {_NEW_RATES}\n{_BATCHES_FROM.format(source='jsonb_array_elements($14::text::jsonb) AS b')}"
)
# A write of single quotes only is one statement, so one round trip and atomic without a transaction:
# each JSON element also carries its rate id and its row's values (RowValues: cents as integers), and
# its row's quote id is its batch id (row 0). (Composed of the constants above, no value.)
_INSERT_SINGLE_QUOTES = f"""WITH {_NEW_RATES},
single_quotes (b) AS MATERIALIZED (SELECT jsonb_array_elements($14::text::jsonb)),
new_batches AS (
{_BATCHES_FROM.format(source="single_quotes")}
RETURNING 1
)
INSERT INTO quote_rows (quote_id, input_index, rate_id, loan_days, position_value, borrow_cost, markup,
                        transaction_fees, total_fee)
SELECT (b->>0)::uuid, (b->5->>1)::bigint, (b->>4)::uuid, (b->5->>2)::integer, (b->5->>3)::numeric * 0.01,
       (b->5->>4)::numeric * 0.01, (b->5->>5)::numeric * 0.01, (b->5->>6)::numeric * 0.01,
       (b->5->>7)::numeric * 0.01
FROM single_quotes
WHERE (SELECT count(*) FROM new_batches) >= 0  -- the batches first, as the COPY path does
ORDER BY 1
ON CONFLICT (quote_id) DO NOTHING
"""  # noqa: S608
# Up to this many single quotes (and no larger batch) go as one statement; more go by COPY.
SINGLE_STATEMENT_QUOTES: Final = 5_000
# A plain COPY is about twice as fast as an INSERT with ON CONFLICT (no speculative insertion); a COPY of
# rows fails on an existing id only when it is a replay or another replica wrote the same batch at the
# same time, and then it is done again through a staging table, skipping what exists.
_STAGE_ROWS = (
    "CREATE TEMP TABLE IF NOT EXISTS pricer_stage_quote_rows (LIKE quote_rows) ON COMMIT DELETE ROWS"
)
_MERGE_ROWS = (
    "INSERT INTO quote_rows SELECT * FROM pricer_stage_quote_rows ORDER BY quote_id "
    "ON CONFLICT (quote_id) DO NOTHING"
)

_SELECT_QUOTE = """SELECT
    r.ticker, b.client_id, q.position_value::float8, q.loan_days,
    b.markup_percentage::float8, b.transaction_fee_type, b.transaction_amount::float8, b.day_count,
    q.total_fee::float8, q.borrow_cost::float8, q.markup::float8, q.transaction_fees::float8,
    r.borrow_rate::float8, r.base_rate::float8, r.volatility_index::float8, r.volatility_adjustment::float8,
    r.event_risk_factor, r.event_adjustment::float8, r.min_rate::float8, r.borrow_status, r.rate_source,
    r.rate_as_of, b.calculated_at
FROM quote_rows q
JOIN quote_batches b ON b.batch_id = $2::uuid
JOIN quote_rates r ON r.rate_id = q.rate_id
WHERE q.quote_id = $1::uuid
"""

_ROW_COLUMNS: Final = (
    "quote_id",
    "input_index",
    "rate_id",
    "loan_days",
    "position_value",
    "borrow_cost",
    "markup",
    "transaction_fees",
    "total_fee",
)
# quote_rows' money columns and the PricedBatch columns (cents) they hold.
_MONEY_COLUMNS: Final = (
    ("position_value", "position_cents"),
    ("borrow_cost", "borrow_cost"),
    ("markup", "markup"),
    ("transaction_fees", "transaction_fees"),
    ("total_fee", "total_fee"),
)

# PostgreSQL's binary COPY format (https://www.postgresql.org/docs/current/sql-copy.html): a signature,
# flags and header-extension length, then per tuple an int16 field count and, per field, an int32 length
# followed by the value (big-endian), and an int16 -1 trailer. A NUMERIC value is int16 ndigits, weight,
# sign and display scale, then ndigits base-10000 digits, most significant first; leading and trailing
# zero digits are allowed. Money is sent as 4 integer digits and 1 fractional one (cents * 100): up to
# 10^16 - 1 units, beyond what the columns accept (the server rejects a value over their precision).
_COPY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"
_MONEY_DIGITS: Final = 5
_MONEY_LIMIT_CENTS: Final = 10 ** (4 * (_MONEY_DIGITS - 1)) * 100
_NUMERIC_NEGATIVE: Final = 0x4000


def _field(name: str, dtype: Any) -> list[tuple[Any, ...]]:
    return [(f"{name}_length", ">i4"), (name, dtype)]


# A NUMERIC money field of a tuple: its length, then the value's header and digits.
_MONEY_DTYPE: Final = np.dtype(
    [
        ("length", ">i4"),
        ("ndigits", ">i2"),
        ("weight", ">i2"),
        ("sign", ">u2"),
        ("dscale", ">i2"),
        ("digits", ">i2", (_MONEY_DIGITS,)),
    ]
)
_ROW_DTYPE: Final = np.dtype(
    [
        ("fields", ">i2"),
        *_field("quote_id", "V16"),
        *_field("input_index", ">i8"),
        *_field("rate_id", "V16"),
        *_field("loan_days", ">i4"),
        # The money columns are the tuple's last fields, one after the other: one sub-array holds them.
        ("money", _MONEY_DTYPE, (len(_MONEY_COLUMNS),)),
    ]
)


def _row_template() -> np.ndarray[Any, Any]:
    """One tuple with every field that is the same in all tuples filled in."""
    template = np.zeros(1, dtype=_ROW_DTYPE)
    template["fields"] = len(_ROW_COLUMNS)
    template["quote_id_length"] = 16
    template["input_index_length"] = 8
    template["rate_id_length"] = 16
    template["loan_days_length"] = 4
    money = template["money"]
    money["length"] = 8 + 2 * _MONEY_DIGITS
    money["ndigits"] = _MONEY_DIGITS
    money["weight"] = _MONEY_DIGITS - 2
    money["dscale"] = 2
    return template.view(np.uint8)


_ROW_TEMPLATE: Final = _row_template()


def _money_digits(cents: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(sign, base-10000 digits) of amounts in cents (any shape; the digits along a last axis more), as
    NUMERICs with 2 decimals."""
    magnitude = np.abs(cents)
    if magnitude.size and int(magnitude.max()) >= _MONEY_LIMIT_CENTS:
        raise ValueError(
            f"an amount of {int(magnitude.max()) / 100:.2f} is beyond what the audit trail holds"
        )
    digits = np.empty((*cents.shape, _MONEY_DIGITS), dtype=np.int64)
    digits[..., -1] = magnitude % 100 * 100
    whole = magnitude // 100
    for place in range(_MONEY_DIGITS - 2, -1, -1):
        digits[..., place] = whole % 10_000
        whole //= 10_000
    return np.where(cents < 0, _NUMERIC_NEGATIVE, 0), digits


def _append_row(columns: Sequence[list[Any]], values: Sequence[Any]) -> None:
    """One value onto each column (the array parameters of the INSERT)."""
    for column, value in zip(columns, values, strict=True):
        column.append(value)


def _check_batch(batch: PricedBatch) -> None:
    shape = batch.position_cents.shape
    if (
        not (
            batch.rate_index.shape
            == batch.input_index.shape
            == batch.loan_days.shape
            == batch.borrow_cost.shape
            == batch.markup.shape
            == batch.transaction_fees.shape
            == batch.total_fee.shape
            == shape
        )
        or len(shape) != 1
    ):
        raise ValueError(f"batch {batch.batch_id}: its columns differ in length")


# The PricedBatch columns a `quote_rows` tuple is built from, besides its ids.
_ROW_SOURCES: Final = (
    "rate_index",
    "input_index",
    "loan_days",
    *(attribute for _, attribute in _MONEY_COLUMNS),
)


_POSITION_CENTS: Final = operator.attrgetter("position_cents")
_ROW_SOURCE_GETTERS: Final = tuple((name, operator.attrgetter(name)) for name in _ROW_SOURCES)


def _joined_columns(batches: Sequence[PricedBatch]) -> tuple[list[int], dict[str, np.ndarray[Any, Any]]]:
    """(rows per batch, each source column of all batches end to end). Raises ValueError naming the first
    batch whose columns are not one-dimensional and of one length."""
    sizes = list(map(len, map(_POSITION_CENTS, batches)))
    joined: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for attribute, column_of in _ROW_SOURCE_GETTERS:
            arrays = list(map(column_of, batches))
            if list(map(len, arrays)) != sizes:
                raise ValueError
            joined[attribute] = np.concatenate(arrays)
            if joined[attribute].ndim != 1:
                raise ValueError
    except (ValueError, TypeError):
        for batch in batches:
            _check_batch(batch)
        raise  # not reached: some batch fails its check
    return sizes, joined


def _tuples(
    quote_ids: np.ndarray[Any, Any],
    rate_ids: np.ndarray[Any, Any],
    input_index: np.ndarray[Any, Any],
    loan_days: np.ndarray[Any, Any],
    money_cents: np.ndarray[Any, Any],
) -> np.ndarray[Any, Any]:
    """Binary COPY tuples of `quote_rows` (without the framing) from their columns: 16-byte ids (uint8,
    one row each), integers, and money in cents, one column per `_MONEY_COLUMNS`."""
    total = quote_ids.shape[0]
    # The template's bytes repeated (a structured assignment of the template to every element costs
    # ~0.3 µs a row).
    tuples = np.tile(_ROW_TEMPLATE, total).view(_ROW_DTYPE)
    tuples["quote_id"] = quote_ids.view("V16").reshape(total)
    tuples["rate_id"] = rate_ids
    tuples["input_index"] = input_index
    tuples["loan_days"] = loan_days
    money = tuples["money"]  # a view: (rows, money columns)
    money["sign"], money["digits"] = _money_digits(money_cents)
    return tuples


def _batch_id_bytes(batch_ids: Sequence[str]) -> np.ndarray[Any, Any]:
    """The 12 bytes of each 24-hex-digit batch id, one row each."""
    return np.frombuffer(bytes.fromhex("".join(batch_ids)), dtype=np.uint8).reshape(len(batch_ids), 12)


def _single_rows(quotes: Sequence[SingleQuote], rate_ids: bytes) -> np.ndarray[Any, Any]:
    """The tuples of single quotes (row 0 of their batch); `rate_ids` holds each one's rate id."""
    # RowValues' order, one row each (from one flat sequence: NumPy converts nested sequences row by row).
    table = np.fromiter(
        itertools.chain.from_iterable([quote.values for quote in quotes]),
        dtype=np.int64,
        count=len(quotes) * len(RowValues._fields),
    ).reshape(len(quotes), len(RowValues._fields))
    quote_ids = np.zeros((len(quotes), 16), dtype=np.uint8)
    quote_ids[:, :12] = _batch_id_bytes([quote.batch_id for quote in quotes])
    return _tuples(
        quote_ids,
        np.frombuffer(rate_ids, dtype="V16"),
        table[:, 1],
        table[:, 2],
        table[:, 3:],  # position, borrow cost, markup, transaction fees, total: _MONEY_COLUMNS' order
    )


def _binary_rows(
    batches: Sequence[PricedBatch], rate_ids: bytes, rate_counts: Sequence[int]
) -> np.ndarray[Any, Any]:
    """Every row of the batches, in order, as binary COPY tuples of `quote_rows`, built column-wise in
    one structured array (a part of a write is a slice of it). `rate_ids` are the 16-byte ids of each
    batch's rates, end to end, and `rate_counts` how many each batch has. Raises ValueError (naming the
    batch) if a batch's columns differ in length or a row's rate index is outside its batch's rates."""
    sizes, columns = _joined_columns(batches)
    total = sum(sizes)
    rate_index = columns["rate_index"]
    counts = np.array(rate_counts, dtype=np.int64)
    bad = np.flatnonzero((rate_index < 0) | (rate_index >= np.repeat(counts, sizes)))
    if bad.size:
        which = int(np.searchsorted(np.cumsum(sizes), int(bad[0]), side="right"))
        raise ValueError(f"batch {batches[which].batch_id}: a rate_index points outside its rates")
    first_rate = np.cumsum(counts) - counts
    first_row = np.cumsum(sizes) - sizes
    # quote_id = the batch's 12 bytes || the row's index in its batch (4 bytes, big-endian).
    quote_ids = np.zeros((total, 16), dtype=np.uint8)
    quote_ids[:, :12] = np.repeat(_batch_id_bytes([batch.batch_id for batch in batches]), sizes, axis=0)
    row_index = (np.arange(total, dtype=np.int64) - np.repeat(first_row, sizes)).astype(">u4")
    quote_ids[:, 12:] = row_index.view(np.uint8).reshape(total, 4)
    rate_rows = rate_index + np.repeat(first_rate, sizes)
    return _tuples(
        quote_ids,
        np.frombuffer(rate_ids, dtype="V16")[rate_rows],
        columns["input_index"],
        columns["loan_days"],
        np.stack([columns[attribute] for _, attribute in _MONEY_COLUMNS], axis=1),
    )


async def _row_stream(rows: np.ndarray[Any, Any]) -> AsyncIterator[bytes]:
    """A binary COPY's data of `rows` (from `_binary_rows`), for `copy_to_table(source=...)`: one chunk,
    as asyncpg sends each chunk on its own (a send costs tens of microseconds, a copy of the bytes less)."""
    yield b"".join((_COPY_SIGNATURE, rows.data, _COPY_TRAILER))


_RATE_ENCODER: Final = msgspec.msgpack.Encoder()


def rate_id(rate: TickerRate) -> bytes:
    """The `quote_rates` key of a rate snapshot: a 128-bit digest of everything it holds."""
    return hashlib.blake2b(_RATE_ENCODER.encode(rate), digest_size=16).digest()


_BATCH_ENCODER: Final = msgspec.json.Encoder()


class _Write:
    """One write: its batches as the JSON array and its distinct rates as the array parameters of
    `_INSERT_RATES_AND_BATCHES`, and every row as a binary COPY tuple of `quote_rows` (in quote id
    order); or, for up to SINGLE_STATEMENT_QUOTES single quotes and nothing else, everything as the
    parameters of `_INSERT_SINGLE_QUOTES` (`rows` is then None)."""

    __slots__ = ("batch_arguments", "rows")

    def __init__(
        self, records: Sequence[AuditRecord], known_rate_ids: dict[int, tuple[TickerRate, bytes]]
    ) -> None:
        rate_columns: list[list[Any]] = [[] for _ in range(13)]
        # A client's fee schedule and key are shared by its batches, a rate by the quotes of a ticker in a
        # cache period: each is converted once per write.
        batch_tails: dict[tuple[int, str, str | None], msgspec.Raw] = {}
        written_rates: dict[bytes, str] = {}  # digest: its hex
        entries: list[list[Any]] = []
        only_single_quotes = True
        rate_ids: list[bytes] = []  # every record's, in order
        rate_counts: list[int] = []

        def digest_of(rate: TickerRate) -> bytes:
            known = known_rate_ids.get(id(rate))
            if known is None or known[0] is not rate:
                known = known_rate_ids[id(rate)] = (rate, rate_id(rate))
            digest = known[1]
            if digest not in written_rates:
                written_rates[digest] = digest.hex()
                _append_row(
                    rate_columns,
                    (
                        written_rates[digest],
                        rate.ticker,
                        rate.rate_units,
                        _num(rate.base_rate),
                        _num(rate.volatility_index),
                        _num(rate.volatility_adjustment),
                        rate.event_risk_factor,
                        _num(rate.event_adjustment),
                        rate.min_rate_units,
                        str(rate.borrow_status),
                        str(rate.source),
                        rate.available_shares,
                        rate.as_of,
                    ),
                )
            return digest

        for record in records:
            schedule = record.fee_schedule
            tail_key = (id(schedule), record.client_id, record.key_id)
            tail = batch_tails.get(tail_key)
            if tail is None:
                tail = batch_tails[tail_key] = msgspec.Raw(
                    _BATCH_ENCODER.encode(
                        (
                            record.client_id,
                            record.key_id,
                            float(schedule.markup_percentage),
                            str(schedule.transaction_fee_type),
                            float(schedule.transaction_amount),
                            int(schedule.day_count),
                        )
                    )
                )
            calculated_at = record.calculated_at
            # In UTC: msgspec writes an offset in whole minutes (some zones' offsets have seconds).
            # Naive datetimes are UTC here, as asyncpg takes them.
            calculated_at = (
                calculated_at.replace(tzinfo=dt.UTC)
                if calculated_at.tzinfo is None
                else calculated_at.astimezone(dt.UTC)
            )
            if isinstance(record, SingleQuote):
                digest = digest_of(record.rate)
                rate_ids.append(digest)
                rate_counts.append(1)
                entries.append(
                    [
                        f"{record.batch_id}00000000",
                        calculated_at,
                        record.request_id,
                        tail,
                        written_rates[digest],
                        record.values,
                    ]
                )
            else:
                entries.append([f"{record.batch_id}00000000", calculated_at, record.request_id, tail])
                only_single_quotes = False
                rate_counts.append(len(record.rates))
                rate_ids.extend(map(digest_of, record.rates))
        # Rows in quote id order whatever the path: concurrent writers of the same quotes then lock them
        # in the same order (a write mixing single quotes and batches, rare, turns its single quotes
        # back into batches for that).
        self.rows: np.ndarray[Any, Any] | None = None
        if not only_single_quotes:
            self.rows = _binary_rows(
                [record.batch() if isinstance(record, SingleQuote) else record for record in records],
                b"".join(rate_ids),
                rate_counts,
            )
        elif len(records) > SINGLE_STATEMENT_QUOTES:
            self.rows = _single_rows(cast(Sequence[SingleQuote], records), b"".join(rate_ids))
        if len(rate_columns[0]) > 1:
            # In digest order: two writers inserting the same new rates lock them in the same order.
            order = sorted(range(len(rate_columns[0])), key=rate_columns[0].__getitem__)
            rate_columns = [[column[i] for i in order] for column in rate_columns]
        self.batch_arguments = (*rate_columns, _BATCH_ENCODER.encode(entries).decode())


# A write of fewer rows per connection than this stays on one connection (one transaction).
PARALLEL_WRITE_ROWS: Final = 20_000


class PgQuoteStore(_PgStore):
    """The audit trail: one `quote_rows` row per priced position, its batch in `quote_batches` and its rate
    in `quote_rates` (migration 002; the view `quotes` joins them). Rows are COPYed straight into
    `quote_rows`; writing a batch again (a replay after an outage) adds nothing: a write that meets an
    existing id is done again with `ON CONFLICT DO NOTHING` (rows through a staging table)."""

    def __init__(self, pool: Any, *, write_connections: int = 2) -> None:
        super().__init__(pool)
        self._write_connections = max(1, write_connections)
        # Rate digests by rate object: the rate cache hands out the same TickerRate for many quotes.
        self._rate_ids: dict[int, tuple[TickerRate, bytes]] = {}

    async def add(self, batch: PricedBatch) -> None:
        """Record every position of the batch; readable through `get` (on every replica) once this returns."""
        await self.add_many([batch])

    async def write(self, batches: Sequence[AuditRecord]) -> None:
        """`add_many` in the shape of `pricer.audit.QuoteSink` (the background writer's sink)."""
        await self.add_many(batches)

    async def add_many(self, batches: Iterable[AuditRecord]) -> int:
        """Record every position of the batches; the number of rows that were new.

        Up to `PARALLEL_WRITE_ROWS` rows per connection go in one transaction: the batches and rates in
        one statement, then the rows in one COPY. A larger write records its batches and rates first,
        then its rows, cut into ranges written at once over `write_connections` connections (each its
        own transaction): PostgreSQL's side of a write is CPU-bound, so a 10^5-row batch spreads over the
        database's cores. If one part fails, the caller writes everything again (the audit trail's spool
        does) and what is already in is skipped. A batch whose columns are inconsistent (lengths, a rate
        index out of range) raises ValueError before anything is written. Up to SINGLE_STATEMENT_QUOTES
        single quotes and nothing else go as one statement."""
        kept: dict[str, AuditRecord] = {}
        for batch in batches:
            if batch.size:
                kept.setdefault(batch.batch_id, batch)
        if not kept:
            return 0
        if len(self._rate_ids) > 65_536:
            self._rate_ids.clear()
        # In id order: two writers of the same batches (replicas replaying at once) then take the row
        # locks in the same order, and one waits for the other instead of both deadlocking.
        write = _Write([kept[batch_id] for batch_id in sorted(kept)], self._rate_ids)
        if write.rows is None:
            with translate_errors("quotes.add"):
                async with self._pool.acquire() as connection:
                    status = await connection.execute(_INSERT_SINGLE_QUOTES, *write.batch_arguments)
            return int(str(status).rsplit(" ", 1)[-1])
        parts = min(self._write_connections, len(write.rows) // PARALLEL_WRITE_ROWS)
        if parts <= 1:
            return await self._write(write, write.rows, batches=True)
        await self._write(write, None, batches=True)
        outcomes = await asyncio.gather(
            *(self._write(write, rows, batches=False) for rows in np.array_split(write.rows, parts)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(outcome for outcome in outcomes if isinstance(outcome, int))

    async def _write(self, write: _Write, rows: np.ndarray[Any, Any] | None, *, batches: bool) -> int:
        """The write's batches and rates (when `batches`) and `rows`, in one transaction; the number of
        rows that were new."""
        with translate_errors("quotes.add"):
            async with self._pool.acquire() as connection:
                try:
                    async with connection.transaction():
                        return await self._send(connection, write, rows, batches=batches, merge=False)
                except asyncpg.UniqueViolationError:
                    async with connection.transaction():
                        return await self._send(connection, write, rows, batches=batches, merge=True)

    @staticmethod
    async def _send(
        connection: Any, write: _Write, rows: np.ndarray[Any, Any] | None, *, batches: bool, merge: bool
    ) -> int:
        if batches:
            await connection.execute(_INSERT_RATES_AND_BATCHES, *write.batch_arguments)
        if rows is None:
            return 0
        if not merge:
            status = await connection.copy_to_table(
                "quote_rows", source=_row_stream(rows), columns=_ROW_COLUMNS, format="binary"
            )
        else:
            await connection.execute(_STAGE_ROWS)
            await connection.copy_to_table(
                "pricer_stage_quote_rows", source=_row_stream(rows), columns=_ROW_COLUMNS, format="binary"
            )
            status = await connection.execute(_MERGE_ROWS)
        return int(str(status).rsplit(" ", 1)[-1])

    async def get(self, quote_id: str) -> QuoteResponse | None:
        """The quote as priced (a batch row in the single-quote shape), or None."""
        parts = split_quote_id(quote_id)
        if parts is None:
            return None
        with translate_errors("quotes.get"):
            row = await self._pool.fetchrow(_SELECT_QUOTE, quote_id, parts[0] + "00000000")
        if row is None:
            return None
        (
            ticker,
            client_id,
            position_value,
            loan_days,
            markup_percentage,
            fee_type,
            transaction_amount,
            day_count,
            total_fee,
            borrow_cost,
            markup,
            transaction_fees,
            borrow_rate,
            base_rate,
            volatility_index,
            volatility_adjustment,
            event_risk_factor,
            event_adjustment,
            min_rate,
            borrow_status,
            rate_source,
            rate_as_of,
            calculated_at,
        ) = row
        source = RateSource(rate_source)
        return QuoteResponse(
            quote_id=quote_id,
            ticker=str(ticker),
            client_id=str(client_id),
            position_value=_float(position_value),
            loan_days=int(loan_days),
            fee_schedule=FeeScheduleView(
                markup_percentage=_float(markup_percentage),
                transaction_fee_type=FeeType(fee_type),
                transaction_amount=_float(transaction_amount),
                day_count=int(day_count),
            ),
            total_fee=_float(total_fee),
            breakdown=Breakdown(
                borrow_cost=_float(borrow_cost),
                markup=_float(markup),
                transaction_fees=_float(transaction_fees),
            ),
            borrow_rate_used=_float(borrow_rate),
            rate=RateComponents(
                base_rate=_float(base_rate),
                volatility_index=_float(volatility_index),
                volatility_adjustment=_float(volatility_adjustment),
                event_risk_factor=int(event_risk_factor),
                event_adjustment=_float(event_adjustment),
                min_rate=_float(min_rate),
                borrow_status=BorrowStatus(borrow_status),
                source=source,
                is_fallback=source is RateSource.FALLBACK,
                as_of=_utc(rate_as_of),
            ),
            calculated_at=_utc(calculated_at),
        )


# ---- assembly ------------------------------------------------------------------------------------


async def keep_session(connection: Any) -> None:
    """The pools' reset: nothing beyond what asyncpg always does on release (roll back a transaction left
    open). asyncpg's default also runs `RESET ALL; CLOSE ALL; UNLISTEN *` and releases advisory locks: a
    round trip per release, for session state the stores never create (migrations hold their advisory
    lock on a connection of their own)."""


def postgres_stores(pool: Any, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> Stores:
    """The PostgreSQL stores over an existing pool (whose connections' search path holds the tables)."""
    return Stores(
        clients=PgClientStore(pool),
        stocks=PgStockStore(pool),
        availability=PgAvailabilityStore(pool, refresh_seconds=refresh_seconds),
        volatility=PgVolatilityStore(pool, refresh_seconds=refresh_seconds),
        events=PgEventStore(pool),
        keys=PgKeyStore(pool),
        quotes=PgQuoteStore(pool),
    )


async def connect_stores(
    dsn: str,
    *,
    schema: str | None = None,
    min_size: int = 2,
    max_size: int = 10,
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
) -> tuple[Stores, asyncpg.Pool]:
    """Open a pool on `dsn` (tables in `schema`, default: the server's search path) and build the stores
    on it. The caller closes the pool (`await pool.close()`). Raises ServiceUnavailable when the database
    cannot be reached. Migrations are not run here: see `pricer.stores.migrate.migrate`."""
    if schema is not None and not valid_schema_name(schema):
        raise PricerError(f"Schema name {schema!r} is not a plain identifier")
    server_settings = {"application_name": "pricer", "jit": "off"}
    if schema is not None:
        server_settings["search_path"] = quote_identifier(schema)
    with translate_errors("connect"):
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, server_settings=server_settings, reset=keep_session
        )
    return postgres_stores(pool, refresh_seconds=refresh_seconds), pool
