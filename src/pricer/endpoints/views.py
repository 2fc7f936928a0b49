"""The HTTP shapes of priced quotes and rates: every conversion from the domain's records (PricedBatch,
PricedQuote, TickerRate) to the response schemas happens here, at the edge."""

from __future__ import annotations

from pricer.models import RateSource
from pricer.pricing.core import RATE_SCALE
from pricer.quotes import PricedBatch, PricedQuote, TickerRate
from pricer.schemas import (
    Breakdown,
    QuoteResponse,
    RateComponents,
    RateResponse,
)

# The rate components of the TickerRates in use, by object: the market data cache hands out one TickerRate
# per ticker for many quotes, and its components are the same in every one of their bodies.
_COMPONENTS: dict[int, tuple[TickerRate, RateComponents]] = {}
_COMPONENTS_KEPT = 4096


def rate_components(rate: TickerRate) -> RateComponents:
    kept = _COMPONENTS.get(id(rate))
    if kept is not None and kept[0] is rate:
        return kept[1]
    if len(_COMPONENTS) >= _COMPONENTS_KEPT:
        _COMPONENTS.clear()
    components = _rate_components(rate)
    _COMPONENTS[id(rate)] = (rate, components)
    return components


def _rate_components(rate: TickerRate) -> RateComponents:
    return RateComponents(
        base_rate=rate.base_rate,
        volatility_index=rate.volatility_index,
        volatility_adjustment=rate.volatility_adjustment,
        event_risk_factor=rate.event_risk_factor,
        event_adjustment=rate.event_adjustment,
        min_rate=rate.min_rate_units / RATE_SCALE,
        borrow_status=rate.borrow_status,
        source=rate.source,
        is_fallback=rate.source is RateSource.FALLBACK,
        as_of=rate.as_of,
    )


def rate_response(rate: TickerRate) -> RateResponse:
    return RateResponse(
        ticker=rate.ticker,
        current_rate=rate.rate,
        base_rate=rate.base_rate,
        volatility_index=rate.volatility_index,
        volatility_adjustment=rate.volatility_adjustment,
        event_risk_factor=rate.event_risk_factor,
        event_adjustment=rate.event_adjustment,
        min_rate=rate.min_rate_units / RATE_SCALE,
        borrow_status=rate.borrow_status,
        available_shares=rate.available_shares,
        source=rate.source,
        is_fallback=rate.source is RateSource.FALLBACK,
        last_updated=rate.as_of,
    )


def quote_response(quote: PricedQuote | PricedBatch) -> QuoteResponse:
    """The single-quote body of a quote: what a single quote returns (its one-row batch), and a read-back of
    any quote (a store's PricedQuote)."""
    if isinstance(quote, PricedBatch):
        batch, row = quote, 0
    else:
        batch, row = quote
    rate = batch.rates[batch.rate_index.item(0)]
    return QuoteResponse(
        quote_id=batch.quote_id(row),
        ticker=rate.ticker,
        client_id=batch.client_id,
        position_value=batch.position_cents.item(0) / 100,
        loan_days=batch.loan_days.item(0),
        fee_schedule=batch.fee_schedule,
        total_fee=batch.total_fee.item(0) / 100,
        breakdown=Breakdown(
            borrow_cost=batch.borrow_cost.item(0) / 100,
            markup=batch.markup.item(0) / 100,
            transaction_fees=batch.transaction_fees.item(0) / 100,
        ),
        borrow_rate_used=rate.rate,
        rate=rate_components(rate),
        calculated_at=batch.calculated_at,
    )
