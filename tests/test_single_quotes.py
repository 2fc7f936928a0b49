"""Single quotes and batches are priced by one arithmetic: the fee steps of `price_locates`, which a single
quote runs on Python ints (`price_locate`) and a batch on int64 columns. Both against the Decimal reference.

The service-level property prices random rows through the quoter's single path, all at once (concurrent
coroutines, as requests of one event-loop turn), and the same rows as one batch: same figures, both equal to
Decimal, each single quote its own record, and the same metrics per priced position.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricer.batches.decode import ROWS, DecodedBatch
from pricer.batches.price import price_decoded
from pricer.endpoints.views import quote_response
from pricer.errors import TickerNotFound
from pricer.marketdata.service import MarketData
from pricer.models import AvailabilityEntry, AvailabilitySnapshot, Client, FeeType, RateSource, Stock
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import build_tracing
from pricer.pricing.core import FeeRow, RatePolicy, price_locate
from pricer.quotes import PricedBatch, batch_to_columns, fallback_rows, new_batch_id
from pricer.quoting import Quoter
from pricer.stores.memory import memory_stores
from tests.decimal_reference import reference_rate
from tests.test_pricing import (
    PROPERTY_SETTINGS,
    FeeCase,
    Schedule,
    core_fees,
    dec,
    fee_cases,
    fee_rows,
    plain,
    random_base,
    rate_units_of,
)

VOLATILITY_INDEX = "20"
FALLBACK_TICKER = "FALLBK"
FALLBACK_MIN_RATE = Decimal("0.0125")


@PROPERTY_SETTINGS
@given(fee_cases())
def test_price_locate_row_by_row_equals_the_batch_and_decimal(case: FeeCase) -> None:
    terms = case.schedule.terms_from_floats()
    singles = [
        price_locate(position, day, rate, terms)
        for position, day, rate in zip(case.positions, case.days, case.rates, strict=True)
    ]
    expected = [
        case.schedule.reference(position, dec(rate, 8), day)
        for position, day, rate in zip(case.positions, case.days, case.rates, strict=True)
    ]
    assert [tuple(row) for row in singles] == expected
    assert all(type(value) is int for row in singles for value in row)
    assert fee_rows(core_fees(case.positions, case.days, case.rates, case.schedule)) == expected


def test_price_locate_keeps_the_batch_formula_beyond_int64() -> None:
    """The largest products of the domain (3.65e22, where the batch splits the rate in limbs) agree."""
    schedule = Schedule(360, 1_000_000, "PERCENTAGE", 1_000_000)
    positions, days, rates = [100_000_000_000, 99_999_999_999], [365, 363], [1_000_000_000, 999_999_999]
    batch = fee_rows(core_fees(positions, days, rates, schedule))
    singles = [
        tuple(price_locate(p, d, r, schedule.terms_from_floats()))
        for p, d, r in zip(positions, days, rates, strict=True)
    ]
    assert singles == batch
    assert batch[0] == schedule.reference(positions[0], dec(rates[0], 8), days[0])
    assert FeeRow(*batch[0]).total_fee == sum(batch[0][:3])


def client_of(schedule: Schedule) -> Client:
    return Client(
        client_id="prop_client",
        markup_percentage=float(plain(schedule.markup)),
        transaction_fee_type=FeeType(schedule.fee_type),
        transaction_amount=float(plain(schedule.amount)),
        day_count=schedule.day_count,
    )


async def quoter_with(bases: list[Decimal], schedule: Schedule, now: dt.datetime) -> tuple[Quoter, Metrics]:
    stores = memory_stores(max_quote_rows=10_000)
    entries = {
        f"T{index}": AvailabilityEntry(f"T{index}", float(plain(base)), 1_000)
        for index, base in enumerate(bases)
    }
    await stores.availability.add(AvailabilitySnapshot(as_of=now, entries=entries, loaded_at=now))
    await stores.stocks.put(Stock(ticker=FALLBACK_TICKER, min_borrow_rate=float(FALLBACK_MIN_RATE)))
    await stores.clients.put(client_of(schedule))
    metrics = Metrics(enabled=True)
    market = MarketData(
        stores,
        policy=RatePolicy(),
        default_volatility_index=VOLATILITY_INDEX,
        event_window_days=7,
        metrics=metrics,
    )
    return Quoter(stores, market, metrics=metrics, tracing=build_tracing(None)), metrics


def single_fees(batch: PricedBatch) -> tuple[int, int, int, int]:
    values = batch_to_columns(batch)
    return values.borrow_cost[0], values.markup[0], values.transaction_fees[0], values.total_fee[0]


@PROPERTY_SETTINGS
@given(fee_cases(), st.lists(random_base(), min_size=1, max_size=4), st.data())
def test_single_path_and_batch_path_equal_decimal(
    case: FeeCase, bases: list[Decimal], data: st.DataObject
) -> None:
    tickers = [
        data.draw(st.sampled_from([*(f"T{index}" for index in range(len(bases))), FALLBACK_TICKER]))
        for _ in case.positions
    ]
    now = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)

    async def price_both() -> tuple[list[PricedBatch], PricedBatch, Metrics]:
        quoter, metrics = await quoter_with(bases, case.schedule, now)
        terms = await quoter.client_terms("prop_client")
        singles = await asyncio.gather(
            *(
                quoter.price_single(
                    terms,
                    ticker=ticker,
                    position_cents=position,
                    loan_days=day,
                    key_id="k1",
                    request_id=f"req-{index}",
                    now=now,
                )
                for index, (ticker, position, day) in enumerate(
                    zip(tickers, case.positions, case.days, strict=True)
                )
            )
        )
        # The batch endpoint's own steps (pricer.batches): market data once for the distinct tickers, then
        # price_decoded over the decoded columns, then the batch's metrics.
        distinct = sorted(set(tickers))
        decoded = DecodedBatch(
            form=ROWS,
            client_id="prop_client",
            count=len(tickers),
            tickers=distinct,
            ticker_index=np.array([distinct.index(ticker) for ticker in tickers], dtype=np.int32),
            cents=np.array(case.positions, dtype=np.int64),
            days=np.array(case.days, dtype=np.int64),
            errors=[],
        )
        rates, market_seconds = await quoter.batch_rates(distinct, now)
        batch, unknown = price_decoded(
            decoded,
            terms.terms,
            rates,
            fee_schedule=terms.view,
            batch_id=new_batch_id(),
            key_id="k1",
            request_id="req-batch",
            now=now,
        )
        assert unknown == []
        quoter.record_batch(batch, market_seconds, fallback=fallback_rows(batch))
        return list(singles), batch, metrics

    singles, batch, metrics = asyncio.run(price_both())

    def reference_rate_of(ticker: str) -> Decimal:
        if ticker == FALLBACK_TICKER:  # no market rate: the stock's floor is the base
            return reference_rate(FALLBACK_MIN_RATE, Decimal(VOLATILITY_INDEX), 0, FALLBACK_MIN_RATE)
        return reference_rate(bases[int(ticker[1:])], Decimal(VOLATILITY_INDEX), 0, Decimal(0))

    expected = [
        case.schedule.reference(position, reference_rate_of(ticker), day)
        for ticker, position, day in zip(tickers, case.positions, case.days, strict=True)
    ]
    assert [single_fees(single) for single in singles] == expected
    columns = batch_to_columns(batch)
    batch_rows = zip(
        columns.borrow_cost, columns.markup, columns.transaction_fees, columns.total_fee, strict=True
    )
    assert list(batch_rows) == expected
    for single, ticker, position, day, index in zip(
        singles, tickers, case.positions, case.days, range(len(tickers)), strict=True
    ):
        # Each single quote is its own record: its batch id, its request, its rate; row 0 of rate 0.
        assert single.size == 1
        assert single.request_id == f"req-{index}"
        assert [rate.ticker for rate in single.rates] == [ticker]
        assert rate_units_of(reference_rate_of(ticker)) == single.rates[0].rate_units
        values = batch_to_columns(single)
        assert (values.rate_index, values.input_index, values.position_cents, values.loan_days) == (
            [0],
            [0],
            [position],
            [day],
        )
        assert quote_response(single).total_fee == expected[index][3] / 100
    assert len({single.batch_id for single in singles} | {batch.batch_id}) == len(singles) + 1
    assert metrics.calculations == {"single": len(singles), "batch": len(singles)}
    assert metrics.fallback_usage == 2 * tickers.count(FALLBACK_TICKER)
    assert metrics.calculation_duration.series[()].count == len(singles) + 1


def test_unknown_ticker_on_the_single_path_is_ticker_not_found() -> None:
    now = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    schedule = Schedule(365, 50_000, "FLAT", 2_500)

    async def price_unknown() -> Metrics:
        quoter, metrics = await quoter_with([Decimal("0.05")], schedule, now)
        terms = await quoter.client_terms("prop_client")
        with pytest.raises(TickerNotFound):
            await quoter.price_single(
                terms, ticker="NOPE", position_cents=100, loan_days=1, key_id=None, request_id="r", now=now
            )
        known = await quoter.price_single(
            terms, ticker="T0", position_cents=10_000_000, loan_days=30, key_id=None, request_id="r", now=now
        )
        assert known.rates[0].source is RateSource.AVAILABILITY_FILE
        return metrics

    metrics = asyncio.run(price_unknown())
    assert metrics.calculations == {"single": 1}
    assert metrics.calculation_duration.series[()].count == 2  # the unknown ticker's lookup is timed too
