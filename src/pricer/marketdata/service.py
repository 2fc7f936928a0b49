"""Market data for pricing: gathers each ticker's rate inputs from the stores and prices them.

Sources of the base rate, in order (DESIGN §3, §3.1): the lender API's rate when younger than
SOURCE_MAX_AGE_SECONDS (`lender_api`, as of its fetch), the availability snapshot in force (FEERATE / 100),
else the floor (`fallback`). Status: the stock's stored one, else the lender's, else derived from the base.
A ticker is known when it has a stock record, a row in the snapshot or a lender rate. The lender's answers
are read from the in-process `LenderBook` (a dictionary lookup); a ticker it never had is fetched once on
demand (`LiveHooks.cold_fetch`, bounded by SOURCE_COLD_FETCH_MS) before its rate is computed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Final, Protocol, TypeVar, cast

import numpy as np

from pricer.deadline import within
from pricer.errors import ServiceUnavailable
from pricer.invalidation import InvalidationBus
from pricer.logs import fields
from pricer.marketdata.providers.book import LenderBook
from pricer.marketdata.shared_cache import SharedRateCache
from pricer.models import (
    AvailabilitySnapshot,
    BorrowStatus,
    MarketEvent,
    RateSource,
    Stock,
    VolatilityReading,
)
from pricer.observability.metrics import Metrics
from pricer.pricing.core import (
    NO_STATUS,
    RATE_PLACES,
    STATUS_NAMES,
    RatePolicy,
    price_rates,
)
from pricer.quotes import TickerRate
from pricer.stores.protocols import Stores

log = logging.getLogger("pricer.marketdata")

_STATUS_CODES = {BorrowStatus(name): code for code, name in enumerate(STATUS_NAMES)}
_STATUSES = [BorrowStatus(name) for name in STATUS_NAMES]

# Risk of an earnings report with no risk of its own, by days left to it (DESIGN §3).
EARNINGS_RISK_BY_DAYS = ((1, 8), (3, 6), (7, 4))
# The store reads behind the rates a request misses in the cache (one query each for stocks and events,
# the snapshots in force cached): milliseconds on a healthy database, even for thousands of tickers. Well
# under the gateway's BACKEND_TIMEOUT_SECONDS (2 s by default), so that a calculation service behind it
# serves a stale rate, as ROLE=all does, before the gateway gives up on it. After a read that timed out the
# stores are not asked again for RATES_RETRY_SECONDS: requests in between take the fallback at once
# instead of each waiting for the deadline and leaving one more abandoned query on the pool. Short, since
# after a market-data change there is no stale rate to stand in (503 until the stores answer).
RATES_TIMEOUT_SECONDS = 0.75
RATES_RETRY_SECONDS = 0.5
T = TypeVar("T")


def event_risk(events: Sequence[MarketEvent], today: dt.date) -> int:
    """The highest risk among events dated from today on; an earnings report without its own risk
    takes 8 within a day, 6 within three days, 4 within seven."""
    highest = 0
    for event in events:
        if event.risk_factor is not None:
            risk = event.risk_factor
        else:
            days = (event.date - today).days
            risk = next((value for limit, value in EARNINGS_RISK_BY_DAYS if days <= limit), 0)
        highest = max(highest, risk)
    return highest


def rate_units_of(value: float) -> int:
    """A rate with at most 8 decimals (validated upstream) in exact 1e-8 units."""
    return int(Decimal(repr(value)).scaleb(RATE_PLACES))


# Rows of `_compute` per loop turn: a few ms of Python each.
_ROWS_PER_TURN = 500


class LiveHooks(Protocol):
    """What the rate computation asks of the live sources (`providers.refresher.LiveSources`)."""

    def cold_candidates(self, tickers: Sequence[str]) -> list[str]: ...

    async def cold_fetch(self, tickers: Sequence[str]) -> None: ...

    def note_priced(self, tickers: Sequence[str]) -> None: ...


_MISS: Final = object()
MARKET_TOPIC = "market"


class RateCache:
    """Adjusted rates by ticker for the current UTC date (the event window moves with the date).

    Entries expire after `ttl` seconds and all of them at once on `invalidate()` (any market-data write).
    A rate computed while a write happened is not stored (its generation is stale). An expired entry is
    kept: while the database cannot be reached it may stand in for `stale` more seconds (`stale_rates`)."""

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        hears_changes: Callable[[], bool] = lambda: True,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        # While other replicas' writes cannot be heard, entries must not outlive a second.
        self._hears_changes = hears_changes
        self._entries: dict[str, tuple[TickerRate | None, dt.date, float]] = {}
        self.generation = 0

    def invalidate(self) -> None:
        self.generation += 1
        self._entries = {}

    def lookup(self, tickers: Sequence[str], today: dt.date) -> tuple[list[object], list[str]]:
        now = self._clock()
        entries = self._entries
        found: list[object] = []
        missing: list[str] = []
        for ticker in tickers:
            entry = entries.get(ticker)
            if entry is not None and entry[1] == today and entry[2] > now:
                found.append(entry[0])
            else:
                found.append(_MISS)
                missing.append(ticker)
        return found, missing

    def stale_rates(
        self, tickers: Sequence[str], today: dt.date, stale: float
    ) -> dict[str, TickerRate | None] | None:
        """The last rates of `tickers` when every one expired less than `stale` seconds ago (today's), and
        changes are heard (a market-data write elsewhere empties the cache); else None."""
        if stale <= 0 or not self._hears_changes():
            return None
        now = self._clock()
        found: dict[str, TickerRate | None] = {}
        for ticker in tickers:
            entry = self._entries.get(ticker)
            if entry is None or entry[1] != today or now - entry[2] >= stale:
                return None
            found[ticker] = entry[0]
        return found

    def store(
        self, tickers: Sequence[str], rates: Sequence[TickerRate | None], today: dt.date, generation: int
    ) -> None:
        if generation != self.generation:
            return
        expires = self._clock() + (self._ttl if self._hears_changes() else min(self._ttl, 0.5))
        if len(self._entries) > 200_000:
            self._entries = {}
        for ticker, rate in zip(tickers, rates, strict=True):
            self._entries[ticker] = (rate, today, expires)


class MarketData:
    def __init__(
        self,
        stores: Stores,
        *,
        policy: RatePolicy,
        default_volatility_index: str,
        event_window_days: int,
        cache_ttl_seconds: float = 0.0,
        cache_stale_seconds: float = 0.0,
        metrics: Metrics | None = None,
        shared_cache: SharedRateCache | None = None,
        hears_changes: Callable[[], bool] = lambda: True,
        lender_book: LenderBook | None = None,
    ) -> None:
        self._stores = stores
        self._book = lender_book
        self.live: LiveHooks | None = None
        self._policy = policy
        self._cache = (
            RateCache(cache_ttl_seconds, hears_changes=hears_changes) if cache_ttl_seconds > 0 else None
        )
        self._stale = cache_stale_seconds
        self._serving_stale = False
        self._failure: tuple[ServiceUnavailable, float] | None = None  # the last one, and until when it holds
        self._metrics = metrics
        self._shared = shared_cache
        self._default_volatility = VolatilityReading(
            value=float(default_volatility_index),
            as_of=dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            source="default",
        )
        self._event_window = dt.timedelta(days=event_window_days)

    @property
    def policy(self) -> RatePolicy:
        return self._policy

    @property
    def lender_book(self) -> LenderBook | None:
        return self._book

    async def volatility(self) -> VolatilityReading:
        reading = await self._stores.volatility.latest()
        return reading if reading is not None else self._default_volatility

    async def snapshot(self) -> AvailabilitySnapshot | None:
        return await self._stores.availability.current()

    def invalidate(self) -> None:
        """Forget every cached rate: market data changed (here, or on another replica)."""
        if self._cache is not None:
            self._cache.invalidate()

    async def ticker_rates(self, tickers: Sequence[str], now: dt.datetime) -> list[TickerRate | None]:
        """The rate of each (normalised, distinct) ticker at `now`; None for an unknown ticker."""
        cache = self._cache
        if cache is None:
            return await self._compute(tickers, now)
        today = now.date()
        generation = cache.generation
        found, missing = cache.lookup(tickers, today)
        if self._metrics is not None:
            self._metrics.cache_hits += len(tickers) - len(missing)
            self._metrics.cache_misses += len(missing)
        if missing:
            failure = self._recent_failure()
            if failure is None:
                try:
                    by_ticker = await self._shared_or_computed(missing, now)
                except ServiceUnavailable as error:
                    failure = error
            if failure is not None:
                # Stale-if-error: rates this process priced stand in for a while (RATE_CACHE_STALE_SECONDS);
                # a ticker it never priced has no fallback (503).
                stale = cache.stale_rates(missing, today, self._stale)
                if stale is None:
                    raise failure.with_traceback(None)
                if not self._serving_stale:
                    self._serving_stale = True
                    log.warning(
                        "Database unreachable: serving cached rates",
                        extra=fields(cache="rates", stale_seconds=self._stale),
                    )
                by_ticker = stale
            else:
                self._serving_stale = False
                self._failure = None
                cache.store(missing, [by_ticker[ticker] for ticker in missing], today, generation)
            return [
                by_ticker[ticker] if hit is _MISS else cast("TickerRate | None", hit)
                for ticker, hit in zip(tickers, found, strict=True)
            ]
        return cast("list[TickerRate | None]", found)

    def _recent_failure(self) -> ServiceUnavailable | None:
        failure = self._failure
        return failure[0] if failure is not None and time.monotonic() < failure[1] else None

    async def _in_time(self, work: Awaitable[T]) -> T:
        """`work` (store reads) within RATES_TIMEOUT_SECONDS: a database that answers nothing fails the
        rates as one that refuses connections does (a cached rate, else 503), not after the driver's
        timeouts (30 s and more). Only the reads: a live source's cold fetch has its own deadline
        (SOURCE_COLD_FETCH_MS), and building the rates is CPU on a loop that may be busy."""
        try:
            return await within(RATES_TIMEOUT_SECONDS, work)
        except TimeoutError:
            error = ServiceUnavailable(
                "The market data store did not answer in time", details={"operation": "availability.rates"}
            )
            # Only a store that answers nothing is left alone for a while: each try of it costs the
            # deadline and an abandoned query; one that refuses at once is asked again at once.
            self._failure = (error, time.monotonic() + RATES_RETRY_SECONDS)
            raise error from None

    async def _shared_or_computed(
        self, tickers: Sequence[str], now: dt.datetime
    ) -> dict[str, TickerRate | None]:
        today = now.date()
        shared = self._shared
        found: dict[str, TickerRate | None] = {}
        version = shared.version if shared is not None else None
        if shared is not None:
            found = await shared.get_many(tickers, today)
        rest = [ticker for ticker in tickers if ticker not in found]
        if rest:
            computed = dict(zip(rest, await self._compute(rest, now), strict=True))
            if shared is not None:
                await shared.put_many(computed, today, version)
            found.update(computed)
        return found

    async def _read_rows(
        self, tickers: Sequence[str]
    ) -> tuple[AvailabilitySnapshot | None, Mapping[str, Stock]]:
        stores = self._stores
        return await stores.availability.current(), await stores.stocks.get_many(tickers)

    async def _read_risks(
        self, tickers: Sequence[str], today: dt.date
    ) -> tuple[Mapping[str, Sequence[MarketEvent]], VolatilityReading]:
        events = await self._stores.events.between(tickers, today, today + self._event_window)
        return events, await self.volatility()

    async def _compute(self, tickers: Sequence[str], now: dt.datetime) -> list[TickerRate | None]:
        """The rates of `tickers` from one read of the stores. A batch over every ticker of the file (5,000)
        held the loop for 50-70 ms here: the rows are built a few hundred per loop turn (after the reads,
        so that the whole batch still sees one snapshot)."""
        book = self._book
        live = self.live
        if live is not None:
            cold = live.cold_candidates(tickers)
            if cold:
                await live.cold_fetch(cold)
        snapshot, stocks = await self._in_time(self._read_rows(tickers))
        entries = snapshot.entries if snapshot is not None else {}
        answers = {ticker: book.answer(ticker) for ticker in tickers} if book is not None else {}
        known = [
            ticker
            for ticker in tickers
            if ticker in stocks
            or ticker in entries
            or ((answer := answers.get(ticker)) is not None and answer.rate is not None)
        ]
        if not known:
            return [None] * len(tickers)
        if live is not None:
            live.note_priced(known)
        today = now.date()
        events, reading = await self._in_time(self._read_risks(known, today))

        policy_min = self._policy.min_rate_units
        count = len(known)
        base = np.empty(count, dtype=np.float64)
        risk = np.zeros(count, dtype=np.int64)
        stock_min = np.zeros(count, dtype=np.int64)
        stored_status = np.full(count, NO_STATUS, dtype=np.int8)
        sources: list[RateSource] = []
        available: list[int | None] = []
        as_of: list[dt.datetime] = []
        for row, ticker in enumerate(known):
            if row and not row % _ROWS_PER_TURN:
                await asyncio.sleep(0)
            stock: Stock | None = stocks.get(ticker)
            if stock is not None:
                stock_min[row] = rate_units_of(stock.min_borrow_rate)
                if stock.borrow_status is not None:
                    stored_status[row] = _STATUS_CODES[stock.borrow_status]
            entry = entries.get(ticker)
            answer = answers.get(ticker)
            if (
                book is not None
                and answer is not None
                and answer.rate is not None
                and book.in_force(answer, now)
            ):
                base[row] = answer.rate
                sources.append(RateSource.LENDER_API)
                as_of.append(answer.fetched_at)
                if stored_status[row] == NO_STATUS and answer.status is not None:
                    stored_status[row] = _STATUS_CODES[answer.status]
            elif entry is not None and entry.fee_rate is not None:
                base[row] = entry.fee_rate
                sources.append(RateSource.AVAILABILITY_FILE)
                as_of.append(snapshot.as_of if snapshot is not None else now)
            else:
                # No market rate: the floor is the base, adjusted like any other (DESIGN §3).
                base[row] = max(int(stock_min[row]), policy_min) / 10**RATE_PLACES
                sources.append(RateSource.FALLBACK)
                as_of.append(stock.updated_at if stock is not None and stock.updated_at else now)
            available.append(entry.available if entry is not None else None)
            ticker_events = events.get(ticker)
            if ticker_events:
                risk[row] = event_risk(ticker_events, today)

        priced = price_rates(
            base,
            risk,
            stock_min,
            stored_status,
            volatility_index=Decimal(repr(reading.value)),
            policy=self._policy,
        )
        rate_units = priced.rate_units.tolist()
        min_units = priced.min_rate_units.tolist()
        event_adjustment = priced.event_adjustment.tolist()
        statuses = priced.status.tolist()
        bases = base.tolist()
        risks = risk.tolist()
        by_ticker: dict[str, TickerRate] = {}
        for row, ticker in enumerate(known):
            if row and not row % _ROWS_PER_TURN:
                await asyncio.sleep(0)
            by_ticker[ticker] = TickerRate(
                ticker=ticker,
                rate_units=rate_units[row],
                base_rate=bases[row],
                volatility_index=reading.value,
                volatility_adjustment=priced.volatility_adjustment,
                event_risk_factor=risks[row],
                event_adjustment=event_adjustment[row],
                min_rate_units=min_units[row],
                borrow_status=_STATUSES[statuses[row]],
                source=sources[row],
                available_shares=available[row],
                as_of=as_of[row],
            )
        return [by_ticker.get(ticker) for ticker in tickers]


class MarketDataWriter:
    """Every market-data write goes through here (admin endpoints, CLI), so that later layers
    (rate caches, invalidation messages) have one place to hook into."""

    def __init__(
        self,
        stores: Stores,
        bus: InvalidationBus | None = None,
        shared_cache: SharedRateCache | None = None,
    ) -> None:
        self._stores = stores
        self._bus = bus
        self._shared_cache = shared_cache

    async def changed(self) -> None:
        """Market data changed other than through this writer's methods (the live sources' lender book)."""
        await self._changed()

    async def _changed(self) -> None:
        """Market data changed: every replica's rate caches forget (this one before the call returns)."""
        version = await self._shared_cache.bump() if self._shared_cache is not None else None
        if self._bus is not None:
            await self._bus.publish(MARKET_TOPIC, str(version) if version is not None else "*")

    async def add_availability(self, snapshot: AvailabilitySnapshot) -> bool:
        """Keep the snapshot; True when it is now the one in force."""
        await self._stores.availability.add(snapshot)
        await self._changed()
        current = await self._stores.availability.current()
        return (
            current is not None
            and current.as_of == snapshot.as_of
            and current.loaded_at == snapshot.loaded_at
        )

    async def add_volatility(self, reading: VolatilityReading) -> None:
        await self._stores.volatility.add(reading)
        await self._changed()

    async def replace_events(self, ticker: str, events: Sequence[MarketEvent]) -> None:
        await self._stores.events.replace(ticker, events)
        await self._changed()

    async def replace_events_many(self, events: dict[str, list[MarketEvent]]) -> None:
        await self._stores.events.replace_many(events)
        await self._changed()

    async def put_stock(self, stock: Stock) -> bool:
        created = await self._stores.stocks.put(stock)
        await self._changed()
        return created
