"""A batch's priced rows as columns, and those columns as NumPy arrays (the optional `numpy` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from pricer_client.models import BatchQuote, QuoteColumns

_CENT = Decimal("0.01")


def quote_columns(quotes: Sequence[BatchQuote]) -> QuoteColumns:
    return QuoteColumns(
        index=[q.index for q in quotes],
        quote_id=[q.quote_id for q in quotes],
        ticker=[q.ticker for q in quotes],
        position_value=[q.position_value for q in quotes],
        loan_days=[q.loan_days for q in quotes],
        total_fee=[q.total_fee for q in quotes],
        borrow_cost=[q.breakdown.borrow_cost for q in quotes],
        markup=[q.breakdown.markup for q in quotes],
        transaction_fees=[q.breakdown.transaction_fees for q in quotes],
        borrow_rate_used=[q.borrow_rate_used for q in quotes],
    )


def _cents(values: Sequence[Decimal]) -> list[int]:
    # The engine sends money with at most two decimals, so this is exact; a value with more would be a
    # broken engine, and is refused rather than rounded.
    cents = [value.scaleb(2) for value in values]
    for value, scaled in zip(values, cents, strict=True):
        if scaled != scaled.to_integral_value():
            raise ValueError(f"money with more than two decimals: {value}")
    return [int(scaled) for scaled in cents]


def columns_to_numpy(columns: QuoteColumns) -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError as missing:  # pragma: no cover - depends on the installation
        raise ImportError("columns as arrays need NumPy: pip install 'pricer-client[numpy]'") from missing
    return {
        "index": np.array(columns.index, dtype=np.int64),
        "quote_id": np.array(columns.quote_id, dtype=object),
        "ticker": np.array(columns.ticker, dtype=object),
        "position_value_cents": np.array(_cents(columns.position_value), dtype=np.int64),
        "loan_days": np.array(columns.loan_days, dtype=np.int64),
        "total_fee_cents": np.array(_cents(columns.total_fee), dtype=np.int64),
        "borrow_cost_cents": np.array(_cents(columns.borrow_cost), dtype=np.int64),
        "markup_cents": np.array(_cents(columns.markup), dtype=np.int64),
        "transaction_fees_cents": np.array(_cents(columns.transaction_fees), dtype=np.int64),
        "borrow_rate_used": np.array([float(rate) for rate in columns.borrow_rate_used], dtype=np.float64),
    }
