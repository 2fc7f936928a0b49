"""The volatility index API (DESIGN §3.1): `GET {VOLATILITY_API_URL}/api/market/vix` -> `{"value",
"timestamp"}`: a reading of V as of its timestamp (the latest as-of wins against admin PUTs and the VIX
loader, as for any reading)."""

from __future__ import annotations

import asyncio

from pricer.marketdata.providers.calls import Provider
from pricer.marketdata.providers.validation import volatility_reading
from pricer.models import VolatilityReading

NAME = "volatility"
SOURCE = "volatility_api"


async def fetch_reading(provider: Provider, *, lane: asyncio.Semaphore) -> VolatilityReading:
    value, as_of = await provider.get("/api/market/vix", volatility_reading, lane=lane, what="vix")
    return VolatilityReading(value=value, as_of=as_of, source=SOURCE)
