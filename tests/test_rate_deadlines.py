"""The rates' store deadline (RATES_TIMEOUT_SECONDS) and the back-off after a failure (RATES_RETRY_SECONDS),
on a stock store that can be made to answer nothing, as a hung PostgreSQL does: a priced ticker's stale
rate stands in, a never-priced one fails, both at the deadline and then at once, without asking the stores
again until the back-off ends; and the deadline leaves the gateway's own time to relay a stale rate."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Mapping, Sequence

import pytest

from pricer.errors import ServiceUnavailable
from pricer.marketdata.service import RATES_RETRY_SECONDS, RATES_TIMEOUT_SECONDS, MarketData
from pricer.models import AvailabilityEntry, AvailabilitySnapshot, Stock
from pricer.pricing.core import RatePolicy
from pricer.settings import Settings
from pricer.stores.memory import memory_stores
from pricer.stores.protocols import StockStore

pytestmark = pytest.mark.anyio


class HangingStocks:
    """A stock store that, while `hung`, never answers (the call waits until it is cancelled)."""

    def __init__(self, inner: StockStore) -> None:
        self._inner = inner
        self.hung = False
        self.refusing = False
        self.calls = 0

    async def get_many(self, tickers: Sequence[str]) -> Mapping[str, Stock]:
        self.calls += 1
        if self.refusing:
            raise ServiceUnavailable("refused", details={"operation": "stocks.get_many"})
        if self.hung:
            await asyncio.Event().wait()
        return await self._inner.get_many(tickers)

    async def put(self, stock: Stock) -> bool:
        return await self._inner.put(stock)

    async def tickers(self) -> Sequence[str]:
        return await self._inner.tickers()


def test_the_rates_deadline_leaves_the_gateway_time_to_relay_a_stale_rate() -> None:
    # The calculation service reads the key (up to 1 s), then the rates: both within the gateway's deadline.
    assert Settings().backend_timeout_seconds > RATES_TIMEOUT_SECONDS + 1.0


async def test_a_hung_store_fails_the_rates_at_the_deadline_then_at_once_until_the_back_off_ends() -> None:
    stores = memory_stores(max_quote_rows=1000)
    stocks = HangingStocks(stores.stocks)
    stores = dataclasses.replace(stores, stocks=stocks)
    now = dt.datetime.now(dt.UTC)
    entries = {name: AvailabilityEntry(name, 0.05, 1_000) for name in ("AAPL", "GME")}
    await stores.availability.add(AvailabilitySnapshot(as_of=now, entries=entries, loaded_at=now))
    market = MarketData(
        stores,
        policy=RatePolicy(),
        default_volatility_index="20",
        event_window_days=7,
        cache_ttl_seconds=0.05,
        cache_stale_seconds=60.0,
    )
    [priced] = await market.ticker_rates(["AAPL"], now)
    assert priced is not None

    stocks.hung = True
    await asyncio.sleep(0.1)  # past the cache's TTL: the stores are asked first
    started = time.monotonic()
    [stale] = await market.ticker_rates(["AAPL"], now)
    waited = time.monotonic() - started
    assert stale == priced
    assert RATES_TIMEOUT_SECONDS * 0.9 <= waited < RATES_TIMEOUT_SECONDS + 0.75, waited

    asked = stocks.calls
    assert await market.ticker_rates(["AAPL"], now) == [priced]
    with pytest.raises(ServiceUnavailable):  # never priced here: no stale rate to stand in
        await market.ticker_rates(["GME"], now)
    assert stocks.calls == asked, "the stores were asked again within the back-off"

    await asyncio.sleep(RATES_RETRY_SECONDS)
    stocks.hung = False
    [fresh] = await market.ticker_rates(["GME"], now)
    assert fresh is not None
    assert stocks.calls == asked + 1
    await asyncio.sleep(0.1)
    assert await market.ticker_rates(["AAPL"], now) == [priced]  # asked again, at once: no back-off left
    assert stocks.calls == asked + 2


async def test_a_store_that_refuses_at_once_is_asked_again_at_once() -> None:
    """No back-off after a fast refusal: it costs no deadline and leaves no query behind, and the rates
    come back with the first request after the database does."""
    stores = memory_stores(max_quote_rows=1000)
    stocks = HangingStocks(stores.stocks)
    stores = dataclasses.replace(stores, stocks=stocks)
    now = dt.datetime.now(dt.UTC)
    entries = {"GME": AvailabilityEntry("GME", 0.05, 1_000)}
    await stores.availability.add(AvailabilitySnapshot(as_of=now, entries=entries, loaded_at=now))
    market = MarketData(
        stores, policy=RatePolicy(), default_volatility_index="20", event_window_days=7, cache_ttl_seconds=5
    )
    stocks.refusing = True
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            await market.ticker_rates(["GME"], now)
    assert stocks.calls == 2
    stocks.refusing = False
    [rate] = await market.ticker_rates(["GME"], now)
    assert rate is not None
    assert stocks.calls == 3
