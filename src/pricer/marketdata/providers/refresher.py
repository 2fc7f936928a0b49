"""The live market-data sources of a process (`LiveSources`, DESIGN §3.1): the background refresher, the
cold fetch of a ticker seen for the first time, the lender book kept in step on every replica, and what
operators see (health, gauges).

- Refresher: one per deployment (`election.py`); it refreshes the lender rate and the events of every
  tracked ticker (a stock record, or quoted in the last hour on any replica) every
  LENDER_REFRESH_SECONDS / EVENT_REFRESH_SECONDS, and V every VOLATILITY_REFRESH_SECONDS. A failed call
  keeps the last good value. Answers reach every replica through the invalidation bus within a second
  (`book.py`), and the store (for replicas that start later).
- Cold fetch: a ticker the book has never seen is fetched by the replica that quotes it, once (concurrent
  quotes share the call), and the quote waits at most SOURCE_COLD_FETCH_MS; a late answer is announced as
  a market-data change, so the next quote prices from it. A ticker whose cold fetch failed is not tried
  again on demand for a refresh interval (the refresher picks it up meanwhile).
- Calls at once, per provider, for the deployment: the refresher takes half of SOURCE_MAX_CONCURRENCY
  (at least 1); cold fetches share the rest, split evenly over EXPECTED_REPLICAS x WORKERS processes (a
  share below 1 turns cold fetches off: the ticker then waits for the refresher). So the deployment
  never has more than SOURCE_MAX_CONCURRENCY calls open to one provider, without any coordination on
  the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from decimal import Decimal
from typing import Any, Literal, Protocol

from pricer.invalidation import InvalidationBus
from pricer.logs import fields
from pricer.marketdata.providers.book import LENDER_TOPIC, LenderBook, decode_answers, encode_answers
from pricer.marketdata.providers.calls import Provider, ProviderFailure
from pricer.marketdata.providers.election import Election
from pricer.marketdata.providers.events import NAME as EVENTS
from pricer.marketdata.providers.events import fetch_all as fetch_all_events
from pricer.marketdata.providers.lender import NAME as LENDER
from pricer.marketdata.providers.lender import fetch_rate, fetch_rates
from pricer.marketdata.providers.volatility import NAME as VOLATILITY
from pricer.marketdata.providers.volatility import fetch_reading
from pricer.models import LenderRate, MarketEvent, VolatilityReading
from pricer.outbound.breaker import BreakerState
from pricer.schemas import DependencyHealth
from pricer.settings import Settings
from pricer.stores.protocols import SourceStore, Stores

log = logging.getLogger("pricer.sources")

QUOTED_WINDOW = dt.timedelta(hours=1)
_NOTE_AGAIN_SECONDS = 600.0  # a ticker quoted again is re-noted in the store at most this often
_MESSAGE_ANSWERS = 1000  # lender answers per bus message
_STATUS_SECONDS = 2.0
_TICK_SECONDS = 0.25
COLD_FETCHES_PER_CALL = 32  # tickers fetched on demand for one pricing call


def log_breaker_change(name: str, state: BreakerState) -> None:
    level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
    log.log(level, "Circuit breaker state changed", extra=fields(name=name, state=state.name.lower()))


class MarketWriter(Protocol):
    async def changed(self) -> None: ...

    async def add_volatility(self, reading: VolatilityReading) -> None: ...

    async def replace_events_many(self, events: dict[str, list[MarketEvent]]) -> None: ...


def lane_sizes(settings: Settings) -> tuple[int, int]:
    """(the refresher's calls at once, this process's cold fetches at once) per provider."""
    total = settings.source_max_concurrency
    refresher = max(1, total // 2)
    processes = max(1, settings.expected_replicas * settings.workers)
    return refresher, max(0, total - refresher) // processes


class LiveSources:
    def __init__(
        self,
        settings: Settings,
        *,
        stores: Stores,
        sources: SourceStore,
        writer: MarketWriter,
        bus: InvalidationBus,
        book: LenderBook | None,
        election: Election,
        providers: dict[str, Provider],
        invalidate_local: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._stores = stores
        self._sources = sources
        self._writer = writer
        self._bus = bus
        self._book = book
        self._election = election
        self.providers = providers
        self._invalidate_local = invalidate_local
        self._max_rate = Decimal(settings.max_borrow_rate)
        refresher_lanes, cold_lanes = lane_sizes(settings)
        self._refresher_lane = asyncio.Semaphore(refresher_lanes)
        cold = LENDER in providers and cold_lanes > 0 and settings.source_cold_fetch_ms > 0
        self._cold_lane = asyncio.Semaphore(cold_lanes) if cold else None
        self._cold_wait = settings.source_cold_fetch_ms / 1000
        self._ask_again = dt.timedelta(seconds=settings.lender_refresh_seconds)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._not_before: dict[str, float] = {}  # ticker -> when a cold fetch may be tried again
        self._noted: dict[str, float] = {}
        self._pending_notes: set[str] = set()
        self._last_events: dict[str, list[MarketEvent]] = {}
        self._aged_checked_at = dt.datetime.now(dt.UTC)
        self._remote: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ---- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._reload_book()
        self._bus.subscribe(self._on_message)
        await self._election.start()
        settings = self._settings
        loops: list[Coroutine[Any, Any, None]] = [self._flush_notes(), self._status_loop()]
        if self._book is not None:
            loops.append(
                self._every(max(1.0, settings.lender_refresh_seconds), self._follow_book, leader=False)
            )
        if LENDER in self.providers:
            loops.append(self._every(settings.lender_refresh_seconds, self._refresh_lender))
        if VOLATILITY in self.providers:
            loops.append(self._every(settings.volatility_refresh_seconds, self._refresh_volatility))
        if EVENTS in self.providers:
            loops.append(self._every(settings.event_refresh_seconds, self._refresh_events))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(coroutine) for coroutine in loops]

    async def close(self) -> None:
        for task in [*self._tasks, *self._inflight.values()]:
            task.cancel()
        for task in [*self._tasks, *self._inflight.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._election.close()
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()

    async def _every(
        self, seconds: float, step: Callable[[], Awaitable[None]], *, leader: bool = True
    ) -> None:
        """Run `step` every `seconds` while this process is (leader=True) or is not the refresher."""
        next_at = 0.0
        while True:
            if self._election.is_leader == leader and time.monotonic() >= next_at:
                next_at = time.monotonic() + seconds
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning(
                        "Refresh failed", extra=fields(step=step.__name__, error=type(error).__name__)
                    )
            await asyncio.sleep(min(seconds, _TICK_SECONDS))

    # ---- the lender book on every replica -------------------------------------------------------

    def _on_message(self, topic: str, key: str) -> None:
        book = self._book
        if book is None:
            return
        if topic == LENDER_TOPIC and key:
            try:
                answers = decode_answers(key)
            except Exception:
                log.warning("Lender message unreadable")
                return
            if book.apply(answers):
                self._invalidate_local()
        elif topic == "*":
            # Messages may have been missed while the bus was away: the store has every answer.
            self._tasks = [task for task in self._tasks if not task.done()]
            self._tasks.append(asyncio.get_running_loop().create_task(self._reload_book()))

    async def _reload_book(self) -> None:
        if self._book is None:
            return
        try:
            answers = await self._sources.lender_rates()
        except Exception as error:
            log.warning("Lender rates not loaded", extra=fields(error=type(error).__name__))
            return
        # Merged, the newer answer winning: answers heard on the bus while the store was read are newer.
        if self._book.apply(answers):
            self._invalidate_local()

    async def _follow_book(self) -> None:
        """Not the refresher: catch up with the store now and then (a message lost, no shared bus)."""
        await self._reload_book()

    async def _announce(self, answers: list[LenderRate]) -> None:
        """Answers into this book, to every replica (the bus), then the store; a changed rate or status is a
        market-data change (every rate cache forgets)."""
        if not answers or self._book is None:
            return
        changed = False
        for start in range(0, len(answers), _MESSAGE_ANSWERS):
            changed = self._book.apply(answers[start : start + _MESSAGE_ANSWERS]) or changed
            await asyncio.sleep(0)  # 10^4 answers are work: the quotes on this loop go in between
        await self._share(answers, changed=changed)

    async def _share(self, answers: list[LenderRate], *, changed: bool) -> None:
        """To every replica (the bus), a chunk at a time, then the market-data change, then the store."""
        for start in range(0, len(answers), _MESSAGE_ANSWERS):
            await self._bus.publish(LENDER_TOPIC, encode_answers(answers[start : start + _MESSAGE_ANSWERS]))
            await asyncio.sleep(0)
        if changed:
            await self._writer.changed()
        for start in range(0, len(answers), _MESSAGE_ANSWERS):
            await self._sources.put_lender(answers[start : start + _MESSAGE_ANSWERS])

    # ---- the refresher --------------------------------------------------------------------------

    async def tracked_tickers(self) -> list[str]:
        since = dt.datetime.now(dt.UTC) - QUOTED_WINDOW
        tickers = dict.fromkeys(await self._stores.stocks.tickers())
        tickers.update(dict.fromkeys(await self._sources.quoted_since(since)))
        tickers.update(dict.fromkeys(self._pending_notes))
        return list(tickers)

    async def _refresh_lender(self) -> None:
        tickers = await self.tracked_tickers()
        answers = await fetch_rates(
            self.providers[LENDER], tickers, lane=self._refresher_lane, max_rate=self._max_rate
        )
        await self._announce(answers)
        now = dt.datetime.now(dt.UTC)
        if self._book is not None and self._book.aged_out_between(self._aged_checked_at, now):
            await self._writer.changed()  # a rate past SOURCE_MAX_AGE_SECONDS: its quotes change source
        self._aged_checked_at = now

    async def _refresh_volatility(self) -> None:
        try:
            reading = await fetch_reading(self.providers[VOLATILITY], lane=self._refresher_lane)
        except ProviderFailure:
            return
        latest = await self._stores.volatility.latest()
        if latest is None or reading.as_of > latest.as_of:
            await self._writer.add_volatility(reading)

    async def _refresh_events(self) -> None:
        tickers = await self.tracked_tickers()
        found = await fetch_all_events(self.providers[EVENTS], tickers, lane=self._refresher_lane)
        changes = {
            ticker: found[ticker] for ticker in found if self._last_events.get(ticker) != found[ticker]
        }
        if changes:
            await self._writer.replace_events_many(changes)
            self._last_events.update(changes)

    # ---- the request path: cold fetches and quoted tickers --------------------------------------

    def cold_candidates(self, tickers: Sequence[str]) -> list[str]:
        """Tickers the lender was never asked about, or did not know a refresh interval ago (and not given up
        on lately): a dictionary lookup each."""
        book = self._book
        if self._cold_lane is None or book is None:
            return []
        now = time.monotonic()
        not_before = self._not_before
        # A ticker the lender did not know is asked again once a refresh interval has passed (it may list it).
        unknown_before = dt.datetime.now(dt.UTC) - self._ask_again
        unseen = [
            t
            for t in tickers
            if (
                (answer := book.answer(t)) is None
                or (answer.rate is None and answer.fetched_at < unknown_before)
            )
            and not_before.get(t, 0.0) <= now
        ]
        if len(unseen) > COLD_FETCHES_PER_CALL:
            # A batch of many new tickers: a few are fetched now, the refresher asks about the rest.
            self._pending_notes.update(unseen[COLD_FETCHES_PER_CALL:])
            del unseen[COLD_FETCHES_PER_CALL:]
        return unseen

    async def cold_fetch(self, tickers: Sequence[str]) -> None:
        """Fetch the tickers (one call each, shared by concurrent quotes); wait up to SOURCE_COLD_FETCH_MS."""
        loop = asyncio.get_running_loop()
        retry_at = time.monotonic() + self._settings.lender_refresh_seconds
        if len(self._not_before) > 100_000:
            self._not_before.clear()
        waiting = []
        for ticker in tickers:
            task = self._inflight.get(ticker)
            if task is None:
                self._not_before[ticker] = retry_at
                task = self._inflight[ticker] = loop.create_task(self._cold_one(ticker))
                task.add_done_callback(lambda _done, ticker=ticker: self._inflight.pop(ticker, None))  # type: ignore[misc]
            waiting.append(task)
        await asyncio.wait(waiting, timeout=self._cold_wait)

    async def _cold_one(self, ticker: str) -> None:
        assert self._cold_lane is not None
        assert self._book is not None
        try:
            answer = await fetch_rate(
                self.providers[LENDER], ticker, lane=self._cold_lane, max_rate=self._max_rate
            )
        except ProviderFailure:
            return
        changed = self._book.apply([answer])  # the waiting quotes see it at once
        try:
            await self._share([answer], changed=changed)
        except Exception as error:
            log.warning("Cold fetch not shared", extra=fields(error=type(error).__name__))

    def note_priced(self, tickers: Sequence[str]) -> None:
        """Tickers just priced from the stores: the refresher keeps them fresh for an hour."""
        now = time.monotonic()
        noted = self._noted
        for ticker in tickers:
            if now - noted.get(ticker, -_NOTE_AGAIN_SECONDS) >= _NOTE_AGAIN_SECONDS:
                noted[ticker] = now
                self._pending_notes.add(ticker)
        if len(noted) > 200_000:
            noted.clear()

    async def _flush_notes(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self._pending_notes:
                continue
            pending, self._pending_notes = self._pending_notes, set()
            try:
                await self._sources.note_quoted(sorted(pending), dt.datetime.now(dt.UTC))
            except Exception as error:
                self._pending_notes |= pending
                log.warning("Quoted tickers not stored", extra=fields(error=type(error).__name__))

    # ---- what operators see -----------------------------------------------------------------------

    def _local_status(self, provider: Provider) -> dict[str, Any]:
        return {
            "breaker": int(provider.breaker.state),
            "last_success_at": provider.last_success_at.isoformat() if provider.last_success_at else None,
            "latency_ms": provider.last_latency_ms,
            "last_error": provider.last_error,
        }

    def status(self, name: str) -> dict[str, Any]:
        """The provider's state: this process's when it is the refresher, else the refresher's (store)."""
        provider = self.providers.get(name)
        if provider is not None and self._election.is_leader:
            return self._local_status(provider)
        return self._remote.get(name, {})

    async def _status_loop(self) -> None:
        while True:
            try:
                if self._election.is_leader:
                    for name, provider in self.providers.items():
                        await self._sources.put_status(name, self._local_status(provider))
                else:
                    self._remote = {
                        name: dict(value) for name, value in (await self._sources.statuses()).items()
                    }
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("Provider status not shared", extra=fields(error=type(error).__name__))
            await asyncio.sleep(_STATUS_SECONDS)

    def age_seconds(self, name: str) -> float | None:
        last = self.status(name).get("last_success_at")
        if not isinstance(last, str):
            return None
        return max(0.0, (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(last)).total_seconds())

    def breaker_states(self) -> dict[str, float]:
        states = {name: self.status(name).get("breaker") for name in self.configured}
        return {name: float(state) for name, state in states.items() if isinstance(state, int)}

    def ages(self) -> dict[str, float]:
        ages = {name: self.age_seconds(name) for name in self.configured}
        return {name: age for name, age in ages.items() if age is not None}

    @property
    def configured(self) -> list[str]:
        settings = self._settings
        urls = {
            LENDER: settings.lender_api_url,
            VOLATILITY: settings.volatility_api_url,
            EVENTS: settings.event_api_url,
        }
        return [name for name, url in urls.items() if url is not None]

    def health_check(self, name: str) -> Callable[[], Awaitable[DependencyHealth]]:
        async def check() -> DependencyHealth:
            status = self.status(name)
            breaker = status.get("breaker")
            age = self.age_seconds(name)
            state: Literal["healthy", "degraded"] = "healthy"
            reason = None
            if breaker == int(BreakerState.OPEN):
                state, reason = "degraded", "circuit breaker open: the last good values serve"
            elif age is None:
                state, reason = "degraded", "no good answer yet"
            elif age > self._settings.source_max_age_seconds:
                state, reason = "degraded", "last good answer older than SOURCE_MAX_AGE_SECONDS"
            names = {0: "closed", 1: "half_open", 2: "open"}
            latency = status.get("latency_ms")
            return DependencyHealth(
                status=state,
                latency_ms=float(latency) if isinstance(latency, int | float) else 0.0,
                detail={
                    "breaker": names.get(breaker, "unknown") if isinstance(breaker, int) else "unknown",
                    "age_seconds": None if age is None else round(age, 3),
                    "last_error": status.get("last_error"),
                    "refresher": "this process" if self._election.is_leader else "another process",
                },
                reason=reason,
            )

        return check
