"""The event calendar API (DESIGN §3.1): `GET {EVENT_API_URL}/api/calendar/events?ticker=T` -> `{"events":
[{"type", "date", "risk_factor"?}]}`; the answer replaces the ticker's events (an earnings event without a
risk follows §3's days-to-report rule)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import quote

from pricer.marketdata.providers.calls import Provider, fetch_each
from pricer.marketdata.providers.validation import market_events
from pricer.models import MarketEvent

NAME = "events"


async def fetch_events(provider: Provider, ticker: str, *, lane: asyncio.Semaphore) -> list[MarketEvent]:
    return await provider.get(
        f"/api/calendar/events?ticker={quote(ticker, safe='')}", market_events, lane=lane, what=ticker
    )


async def fetch_all(
    provider: Provider, tickers: Sequence[str], *, lane: asyncio.Semaphore
) -> dict[str, list[MarketEvent]]:
    """The events of every ticker that got a good answer."""
    return dict(await fetch_each(provider, tickers, lambda ticker: fetch_events(provider, ticker, lane=lane)))
