"""TEMPORARY adapter (branch batchpool): the three batch steps with the signatures the `batches` helper
publishes, built from the current endpoint's helpers, so that the pool can be built and tested before
their package lands. Replaced whole by the `batches` branch's package at merge."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from pricer.errors import InvalidParameter
from pricer.pricing.core import FeeTerms, Int64Array, price_locates
from pricer.quotes import PricedBatch, TickerRate
from pricer.schemas import FeeScheduleView, RowError
from pricer.tickers import normalize_ticker


@dataclass(slots=True)
class DecodedBatch:
    form: str
    client_id: str
    count: int
    tickers: list[str]
    ticker_index: np.ndarray[Any, np.dtype[np.int32]]
    cents: Int64Array
    days: Int64Array
    errors: list[RowError]


def decode_batch(body: bytes, media: str, *, max_batch_size: int) -> DecodedBatch:
    from pricer.endpoints import quotes as legacy  # temporary adapter only
    from pricer.schemas import BatchRequest, LenientBatchRequest
    from pricer.validation import JSON, Decoder, may_hide_places

    strict: Decoder[BatchRequest] = Decoder(BatchRequest, accept_msgpack=True)
    lenient_decoder: Decoder[LenientBatchRequest] = Decoder(LenientBatchRequest, accept_msgpack=True)
    try:
        parsed = strict.decode(body, media)
        client_id, rows = parsed.client_id, parsed.positions
        tickers_raw: list[Any] = [row.ticker for row in rows]
        values = np.fromiter((row.position_value for row in rows), dtype=np.float64, count=len(rows))
        days = np.fromiter((row.loan_days for row in rows), dtype=np.float64, count=len(rows))
        errors: list[RowError] = []
    except InvalidParameter:
        lenient = lenient_decoder.decode(body, media)
        client_id = lenient.client_id
        tickers_raw, values, days, errors = legacy._lenient_rows(lenient.positions)
    if media == JSON and may_hide_places(body):
        legacy._add_written_places_errors(body, errors)
    count = len(tickers_raw)
    if count > max_batch_size:
        raise InvalidParameter.for_field(
            "positions", f"at most {max_batch_size} positions per batch (got {count})"
        )
    normal = [normalize_ticker(raw) or "" if isinstance(raw, str) else "" for raw in tickers_raw]
    cents, errors = legacy._check_rows(normal, values, days, errors)
    slot: dict[str, int] = {}
    index = np.fromiter(
        (slot.setdefault(t, len(slot)) if t else -1 for t in normal), dtype=np.int32, count=count
    )
    bad = np.zeros(count, dtype=bool)
    for error in errors:
        bad[error.index] = True
    index[bad] = -1
    errors.sort(key=lambda error: error.index)
    return DecodedBatch(
        form="rows",
        client_id=client_id,
        count=count,
        tickers=list(slot),
        ticker_index=index,
        cents=np.where(bad, 0, cents),
        days=np.where(bad, 0, np.nan_to_num(days)).astype(np.int64),
        errors=errors,
    )


def price_decoded(
    decoded: DecodedBatch,
    terms: FeeTerms,
    rates: Sequence[TickerRate | None],
    *,
    batch_id: str,
    key_id: str | None,
    request_id: str,
    now: dt.datetime,
    fee_schedule: FeeScheduleView,
) -> tuple[PricedBatch, list[RowError]]:
    known = [rate for rate in rates if rate is not None]
    remap = np.full(len(rates) + 1, -1, dtype=np.int64)
    position = 0
    for slot, rate in enumerate(rates):
        if rate is not None:
            remap[slot] = position
            position += 1
    rate_of_row = remap[decoded.ticker_index]  # -1 (invalid row) maps to the trailing -1
    errors = list(decoded.errors)
    unknown = np.flatnonzero((decoded.ticker_index >= 0) & (rate_of_row < 0))
    for row in unknown.tolist():
        ticker = decoded.tickers[decoded.ticker_index[row]]
        errors.append(
            RowError(
                index=row, error_code="TICKER_NOT_FOUND", error=f"Unknown ticker: {ticker}", field="ticker"
            )
        )
    errors.sort(key=lambda error: error.index)
    good = np.flatnonzero(rate_of_row >= 0)
    rate_index = rate_of_row[good]
    units = np.array([rate.rate_units for rate in known], dtype=np.int64)
    fees = price_locates(decoded.cents[good], decoded.days[good], units[rate_index], terms)
    batch = PricedBatch(
        batch_id=batch_id,
        calculated_at=now,
        request_id=request_id,
        client_id=decoded.client_id,
        key_id=key_id,
        fee_schedule=fee_schedule,
        rates=known,
        rate_index=rate_index,
        input_index=good.astype(np.int64),
        position_cents=decoded.cents[good],
        loan_days=decoded.days[good],
        borrow_cost=fees.borrow_cost,
        markup=fees.markup,
        transaction_fees=fees.transaction_fees,
        total_fee=fees.total_fee,
    )
    return batch, errors


def encode_batch_response(
    decoded: DecodedBatch,
    batch: PricedBatch,
    errors: list[RowError],
    fee_schedule: FeeScheduleView,
    *,
    msgpack: bool,
) -> bytes:
    from pricer.endpoints.views import batch_response

    body = batch_response(batch, fee_schedule=fee_schedule, count=decoded.count, errors=errors)
    return msgspec.msgpack.encode(body) if msgpack else msgspec.json.encode(body)
