"""The PostgreSQL audit trail: `PgQuoteStore` (tables `quote_rows`, `quote_batches`, `quote_rates`), its
SQL, the rate digest `rate_id` and `_Write`, one write's parameters and rows (the rows' binary COPY data
comes from `pricer.stores.postgres.copy_rows`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
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
    single_row_values,
)

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
# A write of single quotes only is one statement, so one round trip and atomic without a transaction.
# Its quotes are one JSON array of objects ($20, `_SingleQuote`: batch id, time, request id, the index of
# its client, key and fee schedule in $14-$19, its rate id, then its row's values, cents as integers),
# which `json_to_recordset` turns into typed columns in one pass: PostgreSQL spends about 11 us of CPU
# per quote on the statement, where a jsonb array of arrays taken apart with `->>` and casts cost it
# 12-14 us, on the cores the engine shares (binary COPY of batches and rows costs it ~8 us, but the
# event loop twice as much as this statement: a transaction of seven round trips per write). A
# quote's id is its batch id (row 0). Fee figures go as text (a float's shortest repr), cast to NUMERIC
# as a JSON number would be.
_INSERT_SINGLE_QUOTES = f"""WITH {_NEW_RATES},
single_quotes AS MATERIALIZED (
    SELECT * FROM json_to_recordset($20::json)
        AS q (quote_id uuid, calculated_at timestamptz, request_id text, tail int4, rate_id uuid,
              input_index int8, loan_days int4, position_cents int8, borrow_cost int8, markup int8,
              transaction_fees int8, total_fee int8)
),
new_batches AS (
    INSERT INTO quote_batches (batch_id, calculated_at, request_id, client_id, key_id, markup_percentage,
                               transaction_fee_type, transaction_amount, day_count)
    SELECT quote_id, calculated_at, request_id, ($14::text[])[tail], ($15::text[])[tail],
           ($16::text[])[tail]::numeric, ($17::text[])[tail], ($18::text[])[tail]::numeric,
           ($19::int4[])[tail]
    FROM single_quotes
    ORDER BY 1
    ON CONFLICT (batch_id) DO NOTHING
    RETURNING 1
)
INSERT INTO quote_rows (quote_id, input_index, rate_id, loan_days, position_value, borrow_cost, markup,
                        transaction_fees, total_fee)
SELECT quote_id, input_index, rate_id, loan_days, position_cents * 0.01, borrow_cost * 0.01, markup * 0.01,
       transaction_fees * 0.01, total_fee * 0.01
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


_BATCH_ENCODER: Final = msgspec.json.Encoder()


class _SingleQuote(msgspec.Struct):
    """A single quote's element of `_INSERT_SINGLE_QUOTES`' JSON array (its SQL column names)."""

    quote_id: str
    calculated_at: dt.datetime
    request_id: str
    tail: int
    rate_id: str
    input_index: int
    loan_days: int
    position_cents: int
    borrow_cost: int
    markup: int
    transaction_fees: int
    total_fee: int


class _Write:
    """One write: for up to SINGLE_STATEMENT_QUOTES single quotes and nothing else, everything as the
    parameters of `_INSERT_SINGLE_QUOTES` (`rows` is then None); otherwise its batches as the JSON array
    and its distinct rates as the array parameters of `_INSERT_RATES_AND_BATCHES`, and every row as a
    binary COPY tuple of `quote_rows` (in quote id order)."""

    __slots__ = ("batch_arguments", "rows")

    def __init__(
        self, records: Sequence[AuditRecord], known_rate_ids: dict[int, tuple[TickerRate, bytes]]
    ) -> None:
        rate_columns: list[list[Any]] = [[] for _ in range(13)]
        # A client's fee schedule and key are shared by its batches, a rate by the quotes of a ticker in a
        # cache period: each is converted once per write.
        tail_indexes: dict[tuple[int, str, str | None], int] = {}
        tails: list[tuple[str, str | None, float, str, float, int]] = []
        written_rates: dict[bytes, str] = {}  # digest: its hex
        # Per record: its batch's uuid, time, request id and tail (1-based, as SQL indexes arrays).
        batch_ids: list[str] = []
        times: list[dt.datetime] = []
        request_ids: list[str] = []
        tail_of: list[int] = []
        single_values: list[_SingleQuote] = []
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
            tail = tail_indexes.get(tail_key)
            if tail is None:
                tails.append(
                    (
                        record.client_id,
                        record.key_id,
                        float(schedule.markup_percentage),
                        str(schedule.transaction_fee_type),
                        float(schedule.transaction_amount),
                        int(schedule.day_count),
                    )
                )
                tail = tail_indexes[tail_key] = len(tails)
            calculated_at = record.calculated_at
            # In UTC: msgspec writes an offset in whole minutes (some zones' offsets have seconds).
            # Naive datetimes are UTC here, as asyncpg takes them.
            calculated_at = (
                calculated_at.replace(tzinfo=dt.UTC)
                if calculated_at.tzinfo is None
                else calculated_at.astimezone(dt.UTC)
            )
            batch_ids.append(f"{record.batch_id}00000000")
            times.append(calculated_at)
            request_ids.append(record.request_id)
            tail_of.append(tail)
            if only_single_quotes and isinstance(record, QuoteColumns) and is_single_quote(record):
                digest = digest_of(record.rates[0])
                rate_ids.append(digest)
                rate_counts.append(1)
                single_values.append(
                    _SingleQuote(
                        batch_ids[-1],
                        calculated_at,
                        record.request_id,
                        tail,
                        written_rates[digest],
                        *single_row_values(record)[1:],
                    )
                )
            else:
                # A single quote's rate and count above are also what it has as a batch.
                only_single_quotes = False
                rate_counts.append(len(record.rates))
                rate_ids.extend(map(digest_of, record.rates))
        if len(rate_columns[0]) > 1:
            # In digest order: two writers inserting the same new rates lock them in the same order.
            order = sorted(range(len(rate_columns[0])), key=rate_columns[0].__getitem__)
            rate_columns = [[column[i] for i in order] for column in rate_columns]
        self.rows: np.ndarray[Any, Any] | None = None
        if only_single_quotes and len(records) <= SINGLE_STATEMENT_QUOTES:
            tail_columns = list(zip(*tails, strict=True))
            fees = [[repr(figure) for figure in tail_columns[i]] for i in (2, 4)]
            self.batch_arguments: tuple[Any, ...] = (
                *rate_columns,
                tail_columns[0],
                tail_columns[1],
                fees[0],
                tail_columns[3],
                fees[1],
                tail_columns[5],
                _BATCH_ENCODER.encode(single_values).decode(),
            )
            return
        # Rows in quote id order whatever the path: concurrent writers of the same quotes then lock them
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
        tail_json = [msgspec.Raw(_BATCH_ENCODER.encode(tail)) for tail in tails]
        entries = [
            (batch_id, time, request_id, tail_json[tail - 1])
            for batch_id, time, request_id, tail in zip(batch_ids, times, request_ids, tail_of, strict=True)
        ]
        self.batch_arguments = (*rate_columns, _BATCH_ENCODER.encode(entries).decode())


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
        records = [kept[batch_id] for batch_id in sorted(kept)]
        if sum(record.size for record in records) >= THREAD_FORMAT_ROWS:
            # A large write's COPY data takes seconds of NumPy work (10^6 rows): on a thread, as NumPy lets
            # go of the GIL in its loops, so that the event loop is not held meanwhile (DESIGN §1).
            write = await asyncio.to_thread(_Write, records, self._rate_ids)
        else:
            write = _Write(records, self._rate_ids)
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
