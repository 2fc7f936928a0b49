"""The live sources' store (`SourceStore`, DESIGN §3.1) against both implementations, the refresher's
election on a real PostgreSQL, and the precedence of the lender's rate in the rate computation
(`MarketData` with a `LenderBook`), all in process."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from pricer.marketdata.providers.book import LenderBook, decode_answers, encode_answers
from pricer.marketdata.providers.election import AdvisoryLockElection
from pricer.marketdata.service import MarketData
from pricer.models import (
    AvailabilityEntry,
    AvailabilitySnapshot,
    BorrowStatus,
    LenderRate,
    RateSource,
    Stock,
)
from pricer.pricing.core import RatePolicy
from pricer.stores.memory import MemorySourceStore, memory_stores
from pricer.stores.postgres.sources import PgSourceStore
from pricer.stores.protocols import SourceStore, Stores
from tests.decimal_reference import reference_rate
from tests.pg import pg_schema, pg_stores

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 12, 4, 14, 30, 15, 123456, tzinfo=dt.UTC)


@pytest.fixture(params=["memory", "postgres"])
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Stores, SourceStore]]:
    if request.param == "memory":
        yield memory_stores(max_quote_rows=1000), MemorySourceStore()
    else:
        async with pg_stores() as (stores, pool, _dsn, _schema):
            yield stores, PgSourceStore(pool)


async def test_lender_answers_round_trip_and_the_newest_wins(backends: tuple[Stores, SourceStore]) -> None:
    _, sources = backends
    first = LenderRate("AAPL", 0.1234567891, BorrowStatus.MEDIUM, T0)
    unknown = LenderRate("ZZZ", None, None, T0)
    await sources.put_lender([first, unknown])
    assert sorted(await sources.lender_rates(), key=lambda r: r.ticker) == [first, unknown]
    older = LenderRate("AAPL", 0.5, BorrowStatus.HARD, T0 - dt.timedelta(seconds=1))
    await sources.put_lender([older])  # an answer older than the kept one changes nothing
    newer = LenderRate("AAPL", 0.07, BorrowStatus.EASY, T0 + dt.timedelta(seconds=1))
    await sources.put_lender([newer])
    assert {r.ticker: r for r in await sources.lender_rates()}["AAPL"] == newer


async def test_quoted_tickers_and_provider_statuses(backends: tuple[Stores, SourceStore]) -> None:
    stores, sources = backends
    await sources.note_quoted(["AAPL", "GME"], T0)
    await sources.note_quoted(["GME"], T0 + dt.timedelta(hours=2))
    assert sorted(await sources.quoted_since(T0 + dt.timedelta(hours=1))) == ["GME"]
    assert sorted(await sources.quoted_since(T0)) == ["AAPL", "GME"]
    await sources.put_status("lender", {"breaker": 2, "last_error": "HTTP 503"})
    await sources.put_status("lender", {"breaker": 0, "last_error": None})
    assert await sources.statuses() == {"lender": {"breaker": 0, "last_error": None}}
    await stores.stocks.put(Stock(ticker="ACME", min_borrow_rate=0.02))
    assert list(await stores.stocks.tickers()) == ["ACME"]


async def elected(election: AdvisoryLockElection) -> None:
    for _ in range(200):  # a functional deadline of 10 s
        if election.is_leader:
            return
        await asyncio.sleep(0.05)


async def test_one_refresher_holds_the_lock_and_another_takes_over_when_it_goes() -> None:
    async with pg_schema() as (dsn, schema):
        first = AdvisoryLockElection(dsn, schema=schema, check_seconds=0.1)
        second = AdvisoryLockElection(dsn, schema=schema, check_seconds=0.1)
        other_schema = AdvisoryLockElection(dsn, schema=schema + "_other", check_seconds=0.1)
        await first.start()
        await elected(first)
        await second.start()
        await other_schema.start()
        await asyncio.sleep(0.5)
        assert first.is_leader
        assert not second.is_leader
        assert other_schema.is_leader  # one refresher per deployment (schema), not per server
        await first.close()  # its session ends: the lock goes with it
        await elected(second)
        assert second.is_leader
        await second.close()
        await other_schema.close()


def test_the_book_keeps_the_newest_answer_and_reports_changes() -> None:
    book = LenderBook(max_age_seconds=900)
    answer = LenderRate("AAPL", 0.15, BorrowStatus.HARD, T0)
    assert book.apply([answer])
    assert not book.apply([LenderRate("AAPL", 0.15, BorrowStatus.HARD, T0 + dt.timedelta(seconds=60))])
    assert not book.apply([LenderRate("AAPL", 0.99, BorrowStatus.HARD, T0)])  # older: ignored
    assert book.answer("AAPL") == LenderRate("AAPL", 0.15, BorrowStatus.HARD, T0 + dt.timedelta(seconds=60))
    assert decode_answers(encode_answers([answer])) == [answer]
    later = T0 + dt.timedelta(seconds=60 + 900)
    assert book.aged_out_between(T0, later)
    assert not book.in_force(book.answer("AAPL"), later)
    # The same rate fetched again after it aged out is a change: quotes go back to the lender's rate.
    assert book.apply([LenderRate("AAPL", 0.15, BorrowStatus.HARD, later)])


POLICY = RatePolicy(
    volatility_factor="0.01",
    volatility_threshold="0",
    event_risk_factor="0.05",
    min_borrow_rate="0.0001",
    max_borrow_rate="10",
)


async def test_precedence_lender_then_the_file_then_the_fallback_and_status_override_then_lender() -> None:
    stores = memory_stores(max_quote_rows=1000)
    book = LenderBook(max_age_seconds=900)
    market = MarketData(
        stores, policy=POLICY, default_volatility_index="20", event_window_days=7, lender_book=book
    )
    now = T0
    entries = {
        "GME": AvailabilityEntry("GME", 0.303849, 250_000, None, "GAMESTOP", "USD"),
        "TSLA": AvailabilityEntry("TSLA", 0.005, 6_000_000, None, "TESLA", "USD"),
    }
    await stores.availability.add(
        AvailabilitySnapshot(as_of=T0 - dt.timedelta(days=1), entries=entries, loaded_at=T0)
    )
    await stores.stocks.put(Stock(ticker="ACME", min_borrow_rate=0.02))
    await stores.stocks.put(Stock(ticker="TSLA", min_borrow_rate=0.0, borrow_status=BorrowStatus.EASY))
    book.apply(
        [
            LenderRate("GME", 0.45, BorrowStatus.MEDIUM, now - dt.timedelta(seconds=10)),  # fresh
            LenderRate(
                "TSLA", 0.5, BorrowStatus.HARD, now - dt.timedelta(seconds=10)
            ),  # fresh, status overridden
            LenderRate("ACME", 0.3, BorrowStatus.HARD, now - dt.timedelta(seconds=901)),  # too old
            LenderRate("ZLND", 0.25, None, now - dt.timedelta(seconds=1)),  # known through the lender alone
            LenderRate("NOPE", None, None, now),  # the lender does not know it
        ]
    )
    gme, tsla, acme, zlnd, nope = await market.ticker_rates(["GME", "TSLA", "ACME", "ZLND", "NOPE"], now)
    assert gme is not None
    assert gme.source is RateSource.LENDER_API
    assert gme.base_rate == 0.45
    assert gme.borrow_status is BorrowStatus.MEDIUM
    assert gme.as_of == now - dt.timedelta(seconds=10)  # when it was fetched
    assert gme.rate_units == int(reference_rate(Decimal("0.45"), Decimal(20), 0, Decimal(0)).scaleb(8))
    assert tsla is not None
    assert tsla.source is RateSource.LENDER_API
    assert tsla.borrow_status is BorrowStatus.EASY  # the stock's stored status wins
    assert acme is not None
    assert acme.source is RateSource.FALLBACK
    assert acme.base_rate == 0.02
    assert zlnd is not None
    assert zlnd.source is RateSource.LENDER_API
    assert zlnd.borrow_status is BorrowStatus.HARD
    assert nope is None
    # Past the max age, GME falls back to the file.
    later = now + dt.timedelta(seconds=900)
    (gme_later,) = await market.ticker_rates(["GME"], later)
    assert gme_later is not None
    assert gme_later.source is RateSource.AVAILABILITY_FILE
    assert gme_later.base_rate == 0.303849
