"""The PostgreSQL audit trail: `PgQuoteStore` (tables `quote_rows`, `quote_batches`, `quote_rates`), its
SQL, the rate digest `rate_id` and `_Write`, one write's parameters and rows (the rows' binary COPY data
comes from `pricer.stores.postgres.copy_rows`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final, cast

import asyncpg  # type: ignore[import-untyped]
import msgspec
import numpy as np

from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import (
    AuditRecord,
    PricedBatch,
    PricedQuote,
    QuoteColumns,
    TickerRate,
    batch_from_columns,
    split_quote_id,
)
from pricer.schemas import FeeScheduleView
from pricer.stores.postgres.common import _float, _num, _PgStore, _utc, translate_errors
from pricer.stores.postgres.copy_rows import (
    _ROW_COLUMNS,
    _binary_rows,
    _row_stream,
    _single_rows,
    is_single_quote,
)

# ---- quotes (the audit trail) --------------------------------------------------------------------

# The trail is three tables (migration 002): `quote_rows`, one narrow row per priced position;
# `quote_batches`, one row per priced call; `quote_rates`, one row per rate snapshot, keyed by a digest of
# its contents. A write is one transaction: its few distinct rates by one INSERT (array parameters: floats
# as their shortest decimal text, rates as integer 1e-8 units, scaled in SQL; what is stored already is
# skipped), then its batches and its rows by binary COPY. Rows are fixed-width (uuid, int8, int4, and
# NUMERIC sent with a fixed number of base-10000 digits, which the server normalises), so NumPy builds
# their whole stream as one structured array; batches are asyncpg's records (its binary encoders, in C).
# Most writes are a few hundred single quotes, one batch each: COPY is what costs PostgreSQL least per
# batch and row (an INSERT of the same rows from one JSON parameter took it about 15 us of CPU per single
# quote, on the cores the engine shares), and the round trips of one write (a few per 20 ms linger) cost
# the event loop little beside its rows.
_INSERT_RATES = """INSERT INTO quote_rates (rate_id, ticker, borrow_rate, base_rate, volatility_index,
                         volatility_adjustment, event_risk_factor, event_adjustment, min_rate, borrow_status,
                         rate_source, available_shares, rate_as_of)
SELECT rate_id, ticker, rate_units * 0.00000001, base_rate, volatility_index, volatility_adjustment,
       event_risk_factor, event_adjustment, min_rate_units * 0.00000001, borrow_status, rate_source,
       available_shares, rate_as_of
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::numeric[], $5::numeric[], $6::numeric[], $7::int2[],
            $8::numeric[], $9::int8[], $10::text[], $11::text[], $12::int8[], $13::timestamptz[])
    AS x (rate_id, ticker, rate_units, base_rate, volatility_index, volatility_adjustment,
          event_risk_factor, event_adjustment, min_rate_units, borrow_status, rate_source,
          available_shares, rate_as_of)
ON CONFLICT (rate_id) DO NOTHING"""
_BATCH_COLUMNS: Final = (
    "batch_id",
    "calculated_at",
    "request_id",
    "client_id",
    "key_id",
    "markup_percentage",
    "transaction_fee_type",
    "transaction_amount",
    "day_count",
)
# A plain COPY is about twice as fast as an INSERT with ON CONFLICT (no speculative insertion); a COPY
# fails on an existing id only when it is a replay or another replica wrote the same batch at the same
# time, and then the write is done again through staging tables, skipping what exists.
_STAGE_BATCHES = (
    "CREATE TEMP TABLE IF NOT EXISTS pricer_stage_quote_batches (LIKE quote_batches INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)
_MERGE_BATCHES = (
    "INSERT INTO quote_batches SELECT * FROM pricer_stage_quote_batches ORDER BY batch_id "
    "ON CONFLICT (batch_id) DO NOTHING"
)
_STAGE_ROWS = (
    "CREATE TEMP TABLE IF NOT EXISTS pricer_stage_quote_rows (LIKE quote_rows) ON COMMIT DELETE ROWS"
)
_MERGE_ROWS = (
    "INSERT INTO quote_rows SELECT * FROM pricer_stage_quote_rows ORDER BY quote_id "
    "ON CONFLICT (quote_id) DO NOTHING"
)

# A quote's row, batch and rate: everything its PricedQuote holds (rates in 1e-8 units and money in cents,
# as the columns were written).
_SELECT_QUOTE = """SELECT
    b.calculated_at, b.request_id, b.client_id, b.key_id,
    b.markup_percentage::float8, b.transaction_fee_type, b.transaction_amount::float8, b.day_count,
    r.ticker, (r.borrow_rate * 100000000)::int8, r.base_rate::float8, r.volatility_index::float8,
    r.volatility_adjustment::float8, r.event_risk_factor, r.event_adjustment::float8,
    (r.min_rate * 100000000)::int8, r.borrow_status, r.rate_source, r.available_shares, r.rate_as_of,
    q.input_index, (q.position_value * 100)::int8, q.loan_days, (q.borrow_cost * 100)::int8,
    (q.markup * 100)::int8, (q.transaction_fees * 100)::int8, (q.total_fee * 100)::int8
FROM quote_rows q
JOIN quote_batches b ON b.batch_id = $2::uuid
JOIN quote_rates r ON r.rate_id = q.rate_id
WHERE q.quote_id = $1::uuid
"""


def _append_row(columns: Sequence[list[Any]], values: Sequence[Any]) -> None:
    """One value onto each column (the array parameters of the INSERT)."""
    for column, value in zip(columns, values, strict=True):
        column.append(value)


_RATE_ENCODER: Final = msgspec.msgpack.Encoder()


def rate_id(rate: TickerRate) -> bytes:
    """The `quote_rates` key of a rate snapshot: a 128-bit digest of everything it holds."""
    return hashlib.blake2b(_RATE_ENCODER.encode(rate), digest_size=16).digest()


# Text COPY escapes (https://www.postgresql.org/docs/current/sql-copy.html): a value's backslashes and
# the characters that end a field or a line.
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_NEEDS_ESCAPE: Final = re.compile(r"[\\\t\n\r]")


def _copy_text(value: object) -> str:
    """`value` as a field of text COPY data; None as NULL (which a NOT NULL column refuses, as it
    refuses a record missing a field)."""
    if value is None:
        return "\\N"
    text = value if type(value) is str else str(value)
    return text.translate(_COPY_ESCAPES) if _NEEDS_ESCAPE.search(text) else text


async def _chunk(data: bytes) -> AsyncIterator[bytes]:
    """`data` as one chunk of a COPY's source."""
    yield data


class _Write:
    """One write: its distinct rates as the array parameters of `_INSERT_RATES` (in digest order), its
    batches as text COPY data of `_BATCH_COLUMNS` (a line each) and every row as a binary COPY tuple of
    `quote_rows`, both in quote id order."""

    __slots__ = ("batches", "rate_arguments", "rows")

    def __init__(
        self, records: Sequence[AuditRecord], known_rate_ids: dict[int, tuple[TickerRate, bytes]]
    ) -> None:
        rate_columns: list[list[Any]] = [[] for _ in range(13)]
        # A client's fee schedule and key are shared by its batches, a rate by the quotes of a ticker in a
        # cache period: each is converted once per write.
        batch_tails: dict[tuple[int, str, str | None], str] = {}
        written_rates: set[bytes] = set()
        batches: list[str] = []
        only_single_quotes = True
        rate_ids: list[bytes] = []  # every record's, in order
        rate_counts: list[int] = []

        def digest_of(rate: TickerRate) -> bytes:
            known = known_rate_ids.get(id(rate))
            if known is None or known[0] is not rate:
                known = known_rate_ids[id(rate)] = (rate, rate_id(rate))
            digest = known[1]
            if digest not in written_rates:
                written_rates.add(digest)
                _append_row(
                    rate_columns,
                    (
                        digest.hex(),
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
                # Money as the float's shortest decimal text (what a JSON parameter carried), which the
                # NUMERIC column rounds to its scale; never the float's binary expansion.
                tail = batch_tails[tail_key] = "\t".join(
                    (
                        _copy_text(record.client_id),
                        _copy_text(record.key_id),
                        repr(float(schedule.markup_percentage)),
                        _copy_text(str(schedule.transaction_fee_type)),
                        repr(float(schedule.transaction_amount)),
                        str(int(schedule.day_count)),
                    )
                )
            calculated_at = record.calculated_at
            # In UTC, with its offset (naive datetimes are UTC here).
            calculated_at = (
                calculated_at.replace(tzinfo=dt.UTC)
                if calculated_at.tzinfo is None
                else calculated_at.astimezone(dt.UTC)
            )
            batches.append(
                f"{record.batch_id}00000000\t{calculated_at.isoformat()}\t{_copy_text(record.request_id)}\t{tail}\n"
            )
            if isinstance(record, QuoteColumns) and is_single_quote(record):
                rate_ids.append(digest_of(record.rates[0]))
                rate_counts.append(1)
            else:
                only_single_quotes = False
                rate_counts.append(len(record.rates))
                rate_ids.extend(map(digest_of, record.rates))
        # Rows in quote id order whatever the records: concurrent writers of the same quotes then lock them
        # in the same order (a write mixing single quotes and batches, rare, turns its single quotes
        # back into batches for that).
        if only_single_quotes:
            self.rows = _single_rows(cast(Sequence[QuoteColumns], records), b"".join(rate_ids))
        else:
            self.rows = _binary_rows(
                [
                    batch_from_columns(record) if isinstance(record, QuoteColumns) else record
                    for record in records
                ],
                b"".join(rate_ids),
                rate_counts,
            )
        if len(rate_columns[0]) > 1:
            # In digest order: two writers inserting the same new rates lock them in the same order.
            order = sorted(range(len(rate_columns[0])), key=rate_columns[0].__getitem__)
            rate_columns = [[column[i] for i in order] for column in rate_columns]
        self.rate_arguments = rate_columns
        self.batches = "".join(batches).encode()


# A write of fewer rows per connection than this stays on one connection (one transaction).
PARALLEL_WRITE_ROWS: Final = 20_000
# From this many rows a write's COPY data is formatted on a thread (about 10 ms of NumPy at 20,000 rows).
THREAD_FORMAT_ROWS: Final = 20_000


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

        Up to `PARALLEL_WRITE_ROWS` rows per connection go in one transaction: the rates in one
        statement, then the batches and the rows by COPY. A larger write records its batches and rates first,
        then its rows, cut into ranges written at once over `write_connections` connections (each its
        own transaction): PostgreSQL's side of a write is CPU-bound, so a 10^5-row batch spreads over the
        database's cores. If one part fails, the caller writes everything again (the audit trail's spool
        does) and what is already in is skipped. A batch whose columns are inconsistent (lengths, a rate
        index out of range) raises ValueError before anything is written."""
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
        records = [kept[batch_id] for batch_id in sorted(kept)]
        if sum(record.size for record in records) >= THREAD_FORMAT_ROWS:
            # A large write's COPY data takes seconds of NumPy work (10^6 rows): on a thread, as NumPy lets
            # go of the GIL in its loops, so that the event loop is not held meanwhile (DESIGN §1).
            write = await asyncio.to_thread(_Write, records, self._rate_ids)
        else:
            write = _Write(records, self._rate_ids)
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
            await connection.execute(_INSERT_RATES, *write.rate_arguments)
            if not merge:
                await connection.copy_to_table(
                    "quote_batches", source=_chunk(write.batches), columns=_BATCH_COLUMNS
                )
            else:
                await connection.execute(_STAGE_BATCHES)
                await connection.copy_to_table(
                    "pricer_stage_quote_batches", source=_chunk(write.batches), columns=_BATCH_COLUMNS
                )
                await connection.execute(_MERGE_BATCHES)
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

    async def get(self, quote_id: str) -> PricedQuote | None:
        """The quote as priced (its row as a one-row batch, with its place in the call), or None."""
        parts = split_quote_id(quote_id)
        if parts is None:
            return None
        batch_id, row = parts
        with translate_errors("quotes.get"):
            found = await self._pool.fetchrow(_SELECT_QUOTE, quote_id, batch_id + "00000000")
        if found is None:
            return None
        (
            calculated_at,
            request_id,
            client_id,
            key_id,
            markup_percentage,
            fee_type,
            transaction_amount,
            day_count,
            ticker,
            rate_units,
            base_rate,
            volatility_index,
            volatility_adjustment,
            event_risk_factor,
            event_adjustment,
            min_rate_units,
            borrow_status,
            rate_source,
            available_shares,
            rate_as_of,
            *values,
        ) = found
        input_index, position_cents, loan_days, borrow_cost, markup, transaction_fees, total_fee = map(
            int, values
        )
        rate = TickerRate(
            ticker=str(ticker),
            rate_units=int(rate_units),
            base_rate=_float(base_rate),
            volatility_index=_float(volatility_index),
            volatility_adjustment=_float(volatility_adjustment),
            event_risk_factor=int(event_risk_factor),
            event_adjustment=_float(event_adjustment),
            min_rate_units=int(min_rate_units),
            borrow_status=BorrowStatus(borrow_status),
            source=RateSource(rate_source),
            available_shares=None if available_shares is None else int(available_shares),
            as_of=_utc(rate_as_of),
        )
        columns = QuoteColumns(
            batch_id,
            _utc(calculated_at),
            str(request_id),
            str(client_id),
            None if key_id is None else str(key_id),
            FeeScheduleView(
                markup_percentage=_float(markup_percentage),
                transaction_fee_type=FeeType(fee_type),
                transaction_amount=_float(transaction_amount),
                day_count=int(day_count),
            ),
            [rate],
            [0],
            [input_index],
            [position_cents],
            [loan_days],
            [borrow_cost],
            [markup],
            [transaction_fees],
            [total_fee],
        )
        return PricedQuote(batch_from_columns(columns), row)
