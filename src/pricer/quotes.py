"""Priced quotes as the engine keeps them: one columnar record per pricing call (`PricedBatch`), and its
columns as plain lists (`QuoteColumns`: what the spool, the journal and the memory store hold, what the
PostgreSQL read-back builds), turned into one another by `batch_to_columns` and `batch_from_columns`.
The HTTP shapes of a quote are made at the edge, in `pricer.endpoints.views`.

A quote id is the call's 24-hex-digit batch id followed by the row's 8-hex-digit position among the
priced rows, so that a batch of 10^6 quotes needs no per-row object or index to be stored or found.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Final, NamedTuple

import msgspec
import numpy as np

from pricer.ids import random_hex
from pricer.models import BorrowStatus, RateSource
from pricer.pricing.core import RATE_SCALE, Int64Array
from pricer.schemas import FeeScheduleView

BATCH_ID_HEX = 24
ROW_HEX = 8
QUOTE_ID_LENGTH = BATCH_ID_HEX + ROW_HEX
_HEX = frozenset("0123456789abcdef")


def new_batch_id() -> str:
    return random_hex(BATCH_ID_HEX // 2)


def split_quote_id(quote_id: str) -> tuple[str, int] | None:
    """(batch id, row) of a well-formed quote id, else None."""
    if len(quote_id) != QUOTE_ID_LENGTH or not _HEX.issuperset(quote_id):
        return None
    return quote_id[:BATCH_ID_HEX], int(quote_id[BATCH_ID_HEX:], 16)


class TickerRate(msgspec.Struct, frozen=True, kw_only=True):
    """One ticker's borrow rate with every component, as priced at one instant."""

    ticker: str
    rate_units: int
    base_rate: float
    volatility_index: float
    volatility_adjustment: float
    event_risk_factor: int
    event_adjustment: float
    min_rate_units: int
    borrow_status: BorrowStatus
    source: RateSource
    available_shares: int | None
    as_of: dt.datetime

    @property
    def rate(self) -> float:
        return self.rate_units / RATE_SCALE


# The row columns of a PricedBatch (and of QuoteColumns), all int64, money in cents.
ROW_COLUMNS: Final = (
    "rate_index",
    "input_index",
    "position_cents",
    "loan_days",
    "borrow_cost",
    "markup",
    "transaction_fees",
    "total_fee",
)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PricedBatch:
    """Every priced position of one call (a single quote is a batch of one), columnar.

    Row arrays are aligned: row r came from request row `input_index[r]` and used `rates[rate_index[r]]`.
    Money columns are in cents. Two batches are equal when their columns are.
    """

    batch_id: str
    calculated_at: dt.datetime
    request_id: str
    client_id: str
    key_id: str | None
    fee_schedule: FeeScheduleView
    rates: list[TickerRate]
    rate_index: Int64Array
    input_index: Int64Array
    position_cents: Int64Array
    loan_days: Int64Array
    borrow_cost: Int64Array
    markup: Int64Array
    transaction_fees: Int64Array
    total_fee: Int64Array

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PricedBatch):
            return NotImplemented
        return batch_to_columns(self) == batch_to_columns(other)

    @property
    def size(self) -> int:
        return int(self.position_cents.shape[0])

    def quote_id(self, row: int) -> str:
        if row == 0:  # every single quote's: a concatenation costs less than the format below
            return self.batch_id + "00000000"
        return f"{self.batch_id}{row:08x}"

    def quote_ids(self) -> list[str]:
        prefix = self.batch_id
        return [f"{prefix}{row:08x}" for row in range(self.size)]

    def quote(self, row: int) -> PricedQuote:
        """Row `row` as a quote of its own: a one-row batch priced at its one rate (the batch itself when it
        is one already), as a store reads it back."""
        if self.size == 1 and len(self.rates) == 1 and row == 0:
            return PricedQuote(self, 0)
        picked = slice(row, row + 1)
        rows = {name: getattr(self, name)[picked].copy() for name in ROW_COLUMNS if name != "rate_index"}
        rates = [self.rates[self.rate_index.item(row)]]
        return PricedQuote(replace(self, rates=rates, rate_index=np.zeros(1, dtype=np.int64), **rows), row)


class PricedQuote(NamedTuple):
    """One priced position, as a store returns it: `batch` holds it in its row 0 (the batch is the call's own
    when that priced only this position), and `row` is its place among the call's priced rows."""

    batch: PricedBatch
    row: int

    @property
    def quote_id(self) -> str:
        return self.batch.quote_id(self.row)

    @property
    def client_id(self) -> str:
        return self.batch.client_id


class QuoteColumns(msgspec.Struct, array_like=True):
    """A PricedBatch's columns as lists of ints: the spool's and the journal's msgpack record (its field
    order is their format: do not change it), and how the memory store and the audit queue hold a single
    quote (no NumPy arrays to keep alive, a few small objects)."""

    batch_id: str
    calculated_at: dt.datetime
    request_id: str
    client_id: str
    key_id: str | None
    fee_schedule: FeeScheduleView
    rates: list[TickerRate]
    rate_index: list[int]
    input_index: list[int]
    position_cents: list[int]
    loan_days: list[int]
    borrow_cost: list[int]
    markup: list[int]
    transaction_fees: list[int]
    total_fee: list[int]

    @property
    def size(self) -> int:
        return len(self.position_cents)


def batch_to_columns(batch: PricedBatch) -> QuoteColumns:
    return QuoteColumns(
        batch.batch_id,
        batch.calculated_at,
        batch.request_id,
        batch.client_id,
        batch.key_id,
        batch.fee_schedule,
        batch.rates,
        batch.rate_index.tolist(),
        batch.input_index.tolist(),
        batch.position_cents.tolist(),
        batch.loan_days.tolist(),
        batch.borrow_cost.tolist(),
        batch.markup.tolist(),
        batch.transaction_fees.tolist(),
        batch.total_fee.tolist(),
    )


def batch_from_columns(columns: QuoteColumns) -> PricedBatch:
    """The PricedBatch of `columns`; raises ValueError or OverflowError for a value beyond int64."""
    return PricedBatch(
        batch_id=columns.batch_id,
        calculated_at=columns.calculated_at,
        request_id=columns.request_id,
        client_id=columns.client_id,
        key_id=columns.key_id,
        fee_schedule=columns.fee_schedule,
        rates=columns.rates,
        rate_index=np.array(columns.rate_index, dtype=np.int64),
        input_index=np.array(columns.input_index, dtype=np.int64),
        position_cents=np.array(columns.position_cents, dtype=np.int64),
        loan_days=np.array(columns.loan_days, dtype=np.int64),
        borrow_cost=np.array(columns.borrow_cost, dtype=np.int64),
        markup=np.array(columns.markup, dtype=np.int64),
        transaction_fees=np.array(columns.transaction_fees, dtype=np.int64),
        total_fee=np.array(columns.total_fee, dtype=np.int64),
    )


# What the audit trail queues: a batch, or a single quote as its columns (a compact record: a batch's
# nine NumPy arrays, queued for the tens of milliseconds before a write, hundreds of them crowd the CPU
# caches the request path runs in).
AuditRecord = PricedBatch | QuoteColumns


def fallback_rows(batch: PricedBatch) -> int:
    """How many of `batch`'s rows were priced at a fallback rate (a few ms for 10^6 rows: a batch worker
    counts them for its batch, so that the main process does not touch the columns)."""
    slots = [slot for slot, rate in enumerate(batch.rates) if rate.source is RateSource.FALLBACK]
    if not slots:
        return 0
    # Rows per rate by counting (np.isin sorted them: 50 ms for 10^6 rows).
    per_rate = np.bincount(batch.rate_index, minlength=len(batch.rates))
    return int(per_rate[slots].sum())


def audit_record(batch: PricedBatch) -> AuditRecord:
    """How the audit trail queues `batch`: a single quote as its columns, a larger batch as it is."""
    return batch_to_columns(batch) if batch.size == 1 else batch
