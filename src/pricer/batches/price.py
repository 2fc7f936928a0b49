"""Step 2 of a batch: decoded columns and their tickers' rates into the priced record (`PricedBatch`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np

from pricer.batches.decode import DecodedBatch
from pricer.pricing.core import FeeTerms, price_locates
from pricer.quotes import PricedBatch, TickerRate
from pricer.schemas import FeeScheduleView, RowError


def price_decoded(
    decoded: DecodedBatch,
    terms: FeeTerms,
    rates: Sequence[TickerRate | None],
    *,
    fee_schedule: FeeScheduleView,
    batch_id: str,
    key_id: str | None,
    request_id: str,
    now: dt.datetime,
) -> tuple[PricedBatch, list[RowError]]:
    """Every valid row of `decoded` priced at its ticker's rate; `rates[i]` is `decoded.tickers[i]`'s (None:
    unknown ticker). Rows of unknown tickers are left out and returned as row errors, sorted by index."""
    known: list[TickerRate] = []
    # Slot len(rates) is -1, so that a row in error (ticker_index -1) maps to -1 too.
    slot_of = np.full(len(rates) + 1, -1, dtype=np.int64)
    for position, rate in enumerate(rates):
        if rate is not None:
            slot_of[position] = len(known)
            known.append(rate)
    row_slot = slot_of[decoded.ticker_index]
    unknown_errors: list[RowError] = []
    if len(known) < len(rates):
        tickers = decoded.tickers
        unknown = np.flatnonzero((row_slot < 0) & (decoded.ticker_index >= 0))
        unknown_errors = [
            RowError(
                index=index,
                error_code="TICKER_NOT_FOUND",
                error=f"Unknown ticker: {tickers[which]}",
                field="ticker",
            )
            for index, which in zip(unknown.tolist(), decoded.ticker_index[unknown].tolist(), strict=True)
        ]
    input_index = np.flatnonzero(row_slot >= 0).astype(np.int64)
    if input_index.shape[0] == decoded.count:
        rate_index, position_cents, loan_days = row_slot, decoded.cents, decoded.days
    else:
        rate_index = row_slot[input_index]
        position_cents = decoded.cents[input_index]
        loan_days = decoded.days[input_index]
    rate_units = np.array([rate.rate_units for rate in known], dtype=np.int64)
    fees = price_locates(position_cents, loan_days, rate_units[rate_index], terms)
    batch = PricedBatch(
        batch_id=batch_id,
        calculated_at=now,
        request_id=request_id,
        client_id=decoded.client_id,
        key_id=key_id,
        fee_schedule=fee_schedule,
        rates=known,
        rate_index=rate_index,
        input_index=input_index,
        position_cents=position_cents,
        loan_days=loan_days,
        borrow_cost=fees.borrow_cost,
        markup=fees.markup,
        transaction_fees=fees.transaction_fees,
        total_fee=fees.total_fee,
    )
    return batch, unknown_errors


def merge_errors(first: list[RowError], second: list[RowError]) -> list[RowError]:
    """Two lists of row errors, each sorted by index, as one sorted list."""
    if not second:
        return first
    if not first:
        return second
    return sorted([*first, *second], key=lambda error: error.index)
