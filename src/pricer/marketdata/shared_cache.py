"""Adjusted rates cached in Redis, shared by the replicas (RATE_CACHE_TTL_SECONDS, default 300 s).

Entries live under the market-data version: `ratecache:v<version>:<date>:<ticker>`. A market-data write
bumps `ratecache:version` and announces the new version on the invalidation bus, so every replica moves
to fresh keys at once (old ones just expire). A replica that cannot hear the bus does not know the
version and does not use the shared cache until it hears again. Redis trouble is a miss, never an error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, Sequence

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pricer.invalidation import InvalidationBus
from pricer.quotes import TickerRate

log = logging.getLogger("pricer.ratecache")

VERSION_KEY = "ratecache:version"
_UNKNOWN = b"-"  # a ticker known not to exist (cached too: unknown tickers are asked about as well)


class SharedRateCache:
    def __init__(
        self,
        client: aioredis.Redis,
        bus: InvalidationBus,
        *,
        ttl_seconds: float,
        market_topic: str,
        budget_seconds: float = 0.05,
    ) -> None:
        self._redis = client
        self._bus = bus
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._topic = market_topic
        self._budget = budget_seconds
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(TickerRate)
        self.version: int | None = None
        self._reload: asyncio.Task[None] | None = None
        bus.subscribe(self._on_message)

    def _on_message(self, topic: str, key: str) -> None:
        if topic == self._topic and key.isdigit():
            self.version = int(key)
        elif topic in (self._topic, "*"):
            # A change whose version we do not know, or the bus just (re)connected: ask Redis.
            self.version = None
            self._reload = asyncio.get_running_loop().create_task(self.load_version())

    async def load_version(self) -> None:
        try:
            raw = await asyncio.wait_for(self._redis.get(VERSION_KEY), self._budget * 10)
            self.version = int(raw) if raw is not None else 0
        except (RedisError, OSError, TimeoutError, ValueError):
            self.version = None

    async def bump(self) -> int | None:
        """A market-data write: the next version (announced by the writer), None when Redis is away."""
        try:
            version = int(await asyncio.wait_for(self._redis.incr(VERSION_KEY), self._budget * 10))
        except (RedisError, OSError, TimeoutError):
            return None
        self.version = version
        return version

    def _key(self, version: int, today: dt.date, ticker: str) -> str:
        return f"ratecache:v{version}:{today.isoformat()}:{ticker}"

    async def get_many(self, tickers: Sequence[str], today: dt.date) -> dict[str, TickerRate | None]:
        version = self.version
        if version is None or not self._bus.connected or not tickers:
            return {}
        try:
            values = await asyncio.wait_for(
                self._redis.mget([self._key(version, today, ticker) for ticker in tickers]), self._budget
            )
        except (RedisError, OSError, TimeoutError):
            return {}
        found: dict[str, TickerRate | None] = {}
        for ticker, value in zip(tickers, values, strict=True):
            if value == _UNKNOWN:
                found[ticker] = None
            elif isinstance(value, bytes):
                try:
                    found[ticker] = self._decoder.decode(value)
                except msgspec.DecodeError:
                    continue
        return found

    async def put_many(
        self, rates: Mapping[str, TickerRate | None], today: dt.date, version: int | None
    ) -> None:
        if version is None or version != self.version or not rates:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for ticker, rate in rates.items():
                    value = _UNKNOWN if rate is None else self._encoder.encode(rate)
                    pipe.set(self._key(version, today, ticker), value, px=self._ttl_ms)
                await asyncio.wait_for(pipe.execute(), self._budget * 4)
        except (RedisError, OSError, TimeoutError):
            log.debug("Shared rate cache write skipped")
