"""The lender API (DESIGN §3.1): `GET {LENDER_API_URL}/api/borrows/{ticker}` -> `{"rate", "status"}`, 404 for
a ticker the lender does not know."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from functools import partial
from urllib.parse import quote

from pricer.marketdata.providers.calls import Provider, fetch_each
from pricer.marketdata.providers.validation import lender_rate
from pricer.models import LenderRate

NAME = "lender"


async def fetch_rate(
    provider: Provider, ticker: str, *, lane: asyncio.Semaphore, max_rate: Decimal
) -> LenderRate:
    """The lender's answer for one ticker (rate None: it does not know it); ProviderFailure without one."""
    answer = await provider.get(
        f"/api/borrows/{quote(ticker, safe='')}",
        partial(lender_rate, max_rate=max_rate),
        lane=lane,
        what=ticker,
    )
    fetched_at = dt.datetime.now(dt.UTC)
    if answer is None:
        return LenderRate(ticker, None, None, fetched_at)
    return LenderRate(ticker, answer[0], answer[1], fetched_at)


async def fetch_rates(
    provider: Provider, tickers: Sequence[str], *, lane: asyncio.Semaphore, max_rate: Decimal
) -> list[LenderRate]:
    """The answers of every ticker that got a good one (a failed ticker keeps its last good value)."""
    found = await fetch_each(
        provider, tickers, lambda ticker: fetch_rate(provider, ticker, lane=lane, max_rate=max_rate)
    )
    return [answer for _ticker, answer in found]
