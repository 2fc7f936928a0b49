"""From validated positions to priced, recorded quotes: market data, then the pricing core.

Batches are priced column-wise (`price_locates`); a single quote runs the same fee steps on Python ints
(`price_locate`), since a one-row NumPy call costs a dozen fixed-cost operations for one figure. Both
return the same record, a PricedBatch (a single quote is a batch of one).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pricer.errors import ClientNotFound, Forbidden, TickerNotFound
from pricer.marketdata.service import MarketData
from pricer.models import Client, FeeType, RateSource
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import Tracing
from pricer.pricing.core import (
    PERCENT_PLACES,
    FeeTerms,
    price_locate,
    to_scaled_int,
)
from pricer.quotes import PricedBatch, TickerRate, new_batch_id
from pricer.schemas import FeeScheduleView
from pricer.stores.protocols import Stores


@dataclass(frozen=True, slots=True)
class ClientTerms:
    client: Client
    terms: FeeTerms
    view: FeeScheduleView


def fee_terms(client: Client) -> FeeTerms:
    """The client's schedule in exact units (its values were checked for places when stored)."""
    markup, _ = to_scaled_int([client.markup_percentage], PERCENT_PLACES)
    percentage = client.transaction_fee_type is FeeType.PERCENTAGE
    amount, _ = to_scaled_int([client.transaction_amount], PERCENT_PLACES if percentage else 2)
    return FeeTerms(
        day_count=client.day_count,
        markup_units=int(markup[0]),
        percentage_fee=percentage,
        transaction_units=int(amount[0]),
    )


def fee_schedule_view(client: Client) -> FeeScheduleView:
    return FeeScheduleView(
        markup_percentage=client.markup_percentage,
        transaction_fee_type=client.transaction_fee_type,
        transaction_amount=client.transaction_amount,
        day_count=client.day_count,
    )


# The rate and request row of every single quote: row 0, rate 0. Shared and read-only, so that no
# holder of one batch can change another's.
_ROW_ZERO = np.zeros(1, dtype=np.int64)
_ROW_ZERO.flags.writeable = False


class Quoter:
    def __init__(self, stores: Stores, market: MarketData, *, metrics: Metrics, tracing: Tracing) -> None:
        self._stores = stores
        self._market = market
        self._metrics = metrics
        self._tracing = tracing
        self._terms: dict[str, ClientTerms] = {}

    @property
    def tracing(self) -> Tracing:
        return self._tracing

    async def client_terms(self, client_id: str) -> ClientTerms:
        client = await self._stores.clients.get(client_id)
        if client is None:
            raise ClientNotFound(client_id)
        if not client.active:
            raise Forbidden("Client is inactive", details={"client_id": client_id})
        cached = self._terms.get(client_id)
        if cached is None or cached.client is not client:
            # Records are immutable and replaced whole on change: the same object has the same terms.
            if len(self._terms) > 100_000:
                self._terms.clear()
            cached = self._terms[client_id] = ClientTerms(
                client=client, terms=fee_terms(client), view=fee_schedule_view(client)
            )
        return cached

    async def batch_rates(
        self, tickers: Sequence[str], now: dt.datetime
    ) -> tuple[list[TickerRate | None], float]:
        """The rates of a batch's distinct tickers, asked once (None: unknown), and the seconds it took."""
        started = time.perf_counter()
        with self._tracing.span("market_data", {"tickers": len(tickers)}):
            found = await self._market.ticker_rates(tickers, now)
        return list(found), time.perf_counter() - started

    def record_batch(self, batch: PricedBatch, seconds: float, *, fallback: int) -> None:
        """A priced batch in the metrics: its rows, its calculation time, its `fallback` rows at a fallback
        rate (`quotes.fallback_rows`, counted where the batch was priced: a batch worker, for its batch)."""
        metrics = self._metrics
        metrics.calculations["batch"] += batch.size
        metrics.observe_calculation(seconds)
        metrics.fallback_usage += fallback

    async def price_single(
        self,
        terms: ClientTerms,
        *,
        ticker: str,
        position_cents: int,
        loan_days: int,
        key_id: str | None,
        request_id: str,
        now: dt.datetime,
    ) -> PricedBatch:
        """One position of a normalised ticker priced as a batch of one; TickerNotFound if it is unknown.

        The same spans and metrics as a batch of one through `price`, without its NumPy bookkeeping."""
        tracing = self._tracing
        started = time.perf_counter()
        if tracing.enabled:
            with tracing.span("market_data", {"tickers": 1}):
                (rate,) = await self._market.ticker_rates((ticker,), now)
        else:  # no span to enter and leave when tracing is off
            (rate,) = await self._market.ticker_rates((ticker,), now)
        if rate is None:
            # As `price` does for a batch whose every ticker is unknown: an empty pricing step, timed.
            with tracing.span("pricing", {"positions": 0}):
                pass
            self._metrics.observe_calculation(time.perf_counter() - started)
            raise TickerNotFound(ticker)
        if tracing.enabled:
            with tracing.span("pricing", {"positions": 1}):
                fees = price_locate(position_cents, loan_days, rate.rate_units, terms.terms)
        else:
            fees = price_locate(position_cents, loan_days, rate.rate_units, terms.terms)
        finished = time.perf_counter()
        metrics = self._metrics
        metrics.observe_calculation(finished - started)  # market data and pricing, nothing between
        metrics.calculations["single"] += 1
        if rate.source is RateSource.FALLBACK:
            metrics.fallback_usage += 1
        # The six one-row columns are slices of one array: one NumPy allocation instead of six.
        row = np.array(
            (position_cents, loan_days, fees.borrow_cost, fees.markup, fees.transaction_fees, fees.total_fee),
            dtype=np.int64,
        )
        return PricedBatch(
            batch_id=new_batch_id(),
            calculated_at=now,
            request_id=request_id,
            client_id=terms.client.client_id,
            key_id=key_id,
            fee_schedule=terms.view,
            rates=[rate],
            rate_index=_ROW_ZERO,
            input_index=_ROW_ZERO,
            position_cents=row[0:1],
            loan_days=row[1:2],
            borrow_cost=row[2:3],
            markup=row[3:4],
            transaction_fees=row[4:5],
            total_fee=row[5:6],
        )
