"""Priced quotes as the engine keeps them: one columnar record per pricing call.

A quote id is the call's 24-hex-digit batch id followed by the row's 8-hex-digit position among the
priced rows, so that a batch of 10^6 quotes needs no per-row object or index to be stored or found.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import numpy as np

from pricer.ids import random_hex
from pricer.models import BorrowStatus, RateSource
from pricer.pricing.core import RATE_SCALE, Int64Array
from pricer.schemas import (
    BatchQuote,
    Breakdown,
    FeeScheduleView,
    QuoteResponse,
    RateComponents,
    RateResponse,
)

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

    def components(self) -> RateComponents:
        return RateComponents(
            base_rate=self.base_rate,
            volatility_index=self.volatility_index,
            volatility_adjustment=self.volatility_adjustment,
            event_risk_factor=self.event_risk_factor,
            event_adjustment=self.event_adjustment,
            min_rate=self.min_rate_units / RATE_SCALE,
            borrow_status=self.borrow_status,
            source=self.source,
            is_fallback=self.source is RateSource.FALLBACK,
            as_of=self.as_of,
        )

    def response(self) -> RateResponse:
        return RateResponse(
            ticker=self.ticker,
            current_rate=self.rate,
            base_rate=self.base_rate,
            volatility_index=self.volatility_index,
            volatility_adjustment=self.volatility_adjustment,
            event_risk_factor=self.event_risk_factor,
            event_adjustment=self.event_adjustment,
            min_rate=self.min_rate_units / RATE_SCALE,
            borrow_status=self.borrow_status,
            available_shares=self.available_shares,
            source=self.source,
            is_fallback=self.source is RateSource.FALLBACK,
            last_updated=self.as_of,
        )


class RowValues(NamedTuple):
    """One priced row's values as Python ints (money in cents)."""

    rate_index: int
    input_index: int
    loan_days: int
    position_cents: int
    borrow_cost: int
    markup: int
    transaction_fees: int
    total_fee: int


class SingleQuote(NamedTuple):
    """A one-row PricedBatch as the audit trail queues it until it is written.

    A PricedBatch holds nine NumPy arrays and its response body: queued for the tens of milliseconds
    before a write, hundreds of them crowd the CPU caches the request path runs in (and the writer
    reads the arrays one by one). This record holds what the trail stores and nothing else."""

    batch_id: str
    calculated_at: dt.datetime
    request_id: str
    client_id: str
    key_id: str | None
    fee_schedule: FeeScheduleView
    rate: TickerRate
    values: RowValues

    @property
    def size(self) -> int:
        return 1

    def batch(self) -> PricedBatch:
        """The same quote as a PricedBatch."""
        return PricedBatch.from_columns(
            batch_id=self.batch_id,
            calculated_at=self.calculated_at,
            request_id=self.request_id,
            client_id=self.client_id,
            key_id=self.key_id,
            fee_schedule=self.fee_schedule,
            rates=[self.rate],
            columns={name: [value] for name, value in zip(RowValues._fields, self.values, strict=True)},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PricedBatch:
    """Every priced position of one call (a single quote is a batch of one), columnar.

    Row arrays are aligned: row r came from request row `input_index[r]` and used `rates[rate_index[r]]`.
    Money columns are in cents.
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
    # The single-quote body of a one-row batch and its row's values, made once: the endpoint returns the
    # body, the quote store keeps it, and the audit trail queues the values (`single_quote`).
    _single_response: list[QuoteResponse] = field(default_factory=list, init=False, compare=False, repr=False)
    _single_row: list[RowValues] = field(default_factory=list, init=False, compare=False, repr=False)

    @classmethod
    def from_columns(
        cls,
        *,
        batch_id: str,
        calculated_at: dt.datetime,
        request_id: str,
        client_id: str,
        key_id: str | None,
        fee_schedule: FeeScheduleView,
        rates: list[TickerRate],
        columns: Mapping[str, Sequence[int]],
    ) -> PricedBatch:
        """A batch from its row columns as sequences of ints, by RowValues' field names."""

        def column(name: str) -> Int64Array:
            return np.array(columns[name], dtype=np.int64)

        return cls(
            batch_id=batch_id,
            calculated_at=calculated_at,
            request_id=request_id,
            client_id=client_id,
            key_id=key_id,
            fee_schedule=fee_schedule,
            rates=rates,
            rate_index=column("rate_index"),
            input_index=column("input_index"),
            position_cents=column("position_cents"),
            loan_days=column("loan_days"),
            borrow_cost=column("borrow_cost"),
            markup=column("markup"),
            transaction_fees=column("transaction_fees"),
            total_fee=column("total_fee"),
        )

    @property
    def size(self) -> int:
        return int(self.position_cents.shape[0])

    def quote_id(self, row: int) -> str:
        return f"{self.batch_id}{row:08x}"

    def quote_ids(self) -> list[str]:
        prefix = self.batch_id
        return [f"{prefix}{row:08x}" for row in range(self.size)]

    def quote_response(self, row: int) -> QuoteResponse:
        """The single-quote body of one row: what a single quote returned, or a batch row in that shape."""
        if self._single_response and row == 0:
            return self._single_response[0]
        response = self._build_quote_response(row)
        if row == 0 and self.size == 1:
            self._single_response.append(response)
        return response

    def row_values(self, row: int) -> RowValues:
        if self._single_row and row == 0:
            return self._single_row[0]
        values = RowValues(
            rate_index=self.rate_index.item(row),
            input_index=self.input_index.item(row),
            loan_days=self.loan_days.item(row),
            position_cents=self.position_cents.item(row),
            borrow_cost=self.borrow_cost.item(row),
            markup=self.markup.item(row),
            transaction_fees=self.transaction_fees.item(row),
            total_fee=self.total_fee.item(row),
        )
        if row == 0 and self.size == 1:
            self._single_row.append(values)
        return values

    def single_quote(self) -> SingleQuote | None:
        """This batch as a SingleQuote if it is one row priced at one rate, with every column one value
        long; else None."""
        if len(self.rates) != 1 or not (
            (1,)
            == self.position_cents.shape
            == self.rate_index.shape
            == self.input_index.shape
            == self.loan_days.shape
            == self.borrow_cost.shape
            == self.markup.shape
            == self.transaction_fees.shape
            == self.total_fee.shape
        ):
            return None
        values = self.row_values(0)  # made for the response already
        if values.rate_index != 0:
            return None
        return SingleQuote(
            self.batch_id,
            self.calculated_at,
            self.request_id,
            self.client_id,
            self.key_id,
            self.fee_schedule,
            self.rates[0],
            values,
        )

    def _build_quote_response(self, row: int) -> QuoteResponse:
        values = self.row_values(row)
        rate = self.rates[values.rate_index]
        return QuoteResponse(
            quote_id=self.quote_id(row),
            ticker=rate.ticker,
            client_id=self.client_id,
            position_value=values.position_cents / 100,
            loan_days=values.loan_days,
            fee_schedule=self.fee_schedule,
            total_fee=values.total_fee / 100,
            breakdown=Breakdown(
                borrow_cost=values.borrow_cost / 100,
                markup=values.markup / 100,
                transaction_fees=values.transaction_fees / 100,
            ),
            borrow_rate_used=rate.rate,
            rate=rate.components(),
            calculated_at=self.calculated_at,
        )

    def batch_quotes(self) -> list[BatchQuote]:
        """The `quotes` list of a batch response, built column-wise (no per-row Python arithmetic)."""
        tickers = [rate.ticker for rate in self.rates]
        rates = [rate.rate for rate in self.rates]
        rate_index = self.rate_index.tolist()
        return [
            BatchQuote(
                index=index,
                quote_id=quote_id,
                ticker=tickers[which],
                position_value=position,
                loan_days=days,
                total_fee=total,
                breakdown=Breakdown(borrow_cost=cost, markup=markup, transaction_fees=fees),
                borrow_rate_used=rates[which],
            )
            for index, quote_id, which, position, days, total, cost, markup, fees in zip(
                self.input_index.tolist(),
                self.quote_ids(),
                rate_index,
                (self.position_cents / 100).tolist(),
                self.loan_days.tolist(),
                (self.total_fee / 100).tolist(),
                (self.borrow_cost / 100).tolist(),
                (self.markup / 100).tolist(),
                (self.transaction_fees / 100).tolist(),
                strict=True,
            )
        ]


# What the audit trail queues: a batch, or a single quote in its compact form.
AuditRecord = PricedBatch | SingleQuote


def empty_int_column() -> Int64Array:
    return np.zeros(0, dtype=np.int64)
