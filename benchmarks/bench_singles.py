"""Pricing one single quote: the designs compared in one process, on the same rows, interleaved.

    python benchmarks/bench_singles.py [--quotes 20000] [--rounds 5] [--json out.json]

Per single quote (µs, median over the rounds; each round runs every variant once, in turn):

* core_one_row:  `price_locates` on one-row arrays, with the three `np.array`s a quote built to call it
                 (what every single quote paid before `price_locate`);
* price_locate:  the same fee steps on Python ints (what a single quote runs now);
* micro_batch_c1 / micro_batch_c32: the micro-batcher design: each quote's coroutine appends its row and
                 awaits a future; one `loop.call_soon` flush prices every pending row in one `price_locates`
                 call and resolves the futures; c quotes wait at a time (c=1: a lone quote);
* quoter_price / quoter_price_single: the quoter's whole step for one quote on embedded (memory) stores,
                 market data from its cache, spans off: the batch endpoint's steps (`batch_rates`,
                 `pricer.batches.price_decoded`) for a batch of one against `Quoter.price_single`, each with
                 the response body built.

The event loop is uvloop's, as the server runs. CPU time is what is measured (`time.process_time`), so a
busy machine inflates the figures less than wall time would; compare the variants' ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import uvloop

try:
    from pricer.pricing.core import FeeRow, FeeTerms, price_locate, price_locates
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pricer.pricing.core import FeeRow, FeeTerms, price_locate, price_locates
from pricer.batches.decode import ROWS as BATCH_ROWS
from pricer.batches.decode import DecodedBatch
from pricer.batches.price import price_decoded
from pricer.endpoints.views import quote_response
from pricer.marketdata.service import MarketData
from pricer.models import AvailabilityEntry, AvailabilitySnapshot, Client, FeeType
from pricer.observability.metrics import Metrics
from pricer.observability.tracing import build_tracing
from pricer.pricing.core import RatePolicy
from pricer.quotes import new_batch_id
from pricer.quoting import Quoter
from pricer.stores.memory import memory_stores

TERMS = FeeTerms(day_count=365, markup_units=50_000, percentage_fee=False, transaction_units=2_500)
# (position cents, loan days, rate units): the bench_http bodies' kind of rows.
ROWS = (
    (10_000_000, 30, 6_000_000),
    (250_000_050, 7, 36_461_880),
    (100_137, 365, 1_200_000),
    (98_765_432, 90, 3_000_000),
    (5_000_000, 1, 12_000),
    (7, 200, 91_234_567),
)
TICKERS = ("AAPL", "GME", "BRKB", "TSLA", "XYZQ", "AMC")


class MicroBatcher:
    """The micro-batcher design, as small as it gets: rows of one loop turn, one `price_locates` call."""

    def __init__(self, terms: FeeTerms, max_rows: int = 256) -> None:
        self._terms = terms
        self._max_rows = max_rows
        self._pending: list[tuple[int, int, int, asyncio.Future[FeeRow]]] = []

    async def price(self, position: int, days: int, rate: int) -> FeeRow:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FeeRow] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((position, days, rate, future))
        return await future

    def _flush(self) -> None:
        rows, self._pending = self._pending[: self._max_rows], self._pending[self._max_rows :]
        if self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        fees = price_locates(
            np.array([row[0] for row in rows], dtype=np.int64),
            np.array([row[1] for row in rows], dtype=np.int64),
            np.array([row[2] for row in rows], dtype=np.int64),
            self._terms,
        )
        columns = zip(
            fees.borrow_cost.tolist(),
            fees.markup.tolist(),
            fees.transaction_fees.tolist(),
            fees.total_fee.tolist(),
            strict=True,
        )
        for row, values in zip(rows, columns, strict=True):
            if not row[3].cancelled():
                row[3].set_result(FeeRow(*values))


def core_one_row(quotes: int) -> float:
    started = time.process_time()
    for index in range(quotes):
        position, days, rate = ROWS[index % len(ROWS)]
        price_locates(
            np.array([position], dtype=np.int64),
            np.array([days], dtype=np.int64),
            np.array([rate], dtype=np.int64),
            TERMS,
        ).total_fee.item(0)
    return time.process_time() - started


def scalar(quotes: int) -> float:
    started = time.process_time()
    for index in range(quotes):
        position, days, rate = ROWS[index % len(ROWS)]
        price_locate(position, days, rate, TERMS)
    return time.process_time() - started


async def concurrently(quotes: int, concurrency: int, one: Callable[[int], Awaitable[object]]) -> float:
    """`quotes` calls of `one`, `concurrency` of them started in each loop turn."""
    started = time.process_time()
    for first in range(0, quotes, concurrency):
        await asyncio.gather(*(one(index) for index in range(first, min(first + concurrency, quotes))))
    return time.process_time() - started


async def engine_quoter() -> Quoter:
    stores = memory_stores(max_quote_rows=1_000)
    now = dt.datetime.now(dt.UTC)
    entries = {
        ticker: AvailabilityEntry(ticker, 0.05 + index / 100, 1_000) for index, ticker in enumerate(TICKERS)
    }
    await stores.availability.add(AvailabilitySnapshot(as_of=now, entries=entries, loaded_at=now))
    await stores.clients.put(
        Client(
            client_id="c", markup_percentage=5.0, transaction_fee_type=FeeType.FLAT, transaction_amount=25.0
        )
    )
    metrics = Metrics(enabled=True)
    market = MarketData(
        stores,
        policy=RatePolicy(),
        default_volatility_index="20",
        event_window_days=7,
        cache_ttl_seconds=3600,
        metrics=metrics,
    )
    return Quoter(stores, market, metrics=metrics, tracing=build_tracing(None, environ={}))


async def measure(quotes: int, rounds: int) -> dict[str, float]:
    quoter = await engine_quoter()
    terms = await quoter.client_terms("c")
    batcher = MicroBatcher(TERMS)
    now = dt.datetime.now(dt.UTC)

    async def micro(index: int) -> FeeRow:
        position, days, rate = ROWS[index % len(ROWS)]
        return await batcher.price(position, days, rate)

    async def through_price(index: int) -> object:
        # The batch endpoint's steps for a batch of one: market data for its ticker, price_decoded.
        position, days, _ = ROWS[index % len(ROWS)]
        ticker = TICKERS[index % len(TICKERS)]
        decoded = DecodedBatch(
            form=BATCH_ROWS,
            client_id="c",
            count=1,
            tickers=[ticker],
            ticker_index=np.zeros(1, dtype=np.int32),
            cents=np.array([position], dtype=np.int64),
            days=np.array([days], dtype=np.int64),
            errors=[],
        )
        rates, _ = await quoter.batch_rates([ticker], now)
        batch, _ = price_decoded(
            decoded, terms.terms, rates, fee_schedule=terms.view, batch_id=new_batch_id(),
            key_id=None, request_id="r", now=now,
        )  # fmt: skip
        return quote_response(batch)

    async def through_price_single(index: int) -> object:
        position, days, _ = ROWS[index % len(ROWS)]
        batch = await quoter.price_single(
            terms,
            ticker=TICKERS[index % len(TICKERS)],
            position_cents=position,
            loan_days=days,
            key_id=None,
            request_id="r",
            now=now,
        )
        return quote_response(batch)

    variants: dict[str, Callable[[], Awaitable[float]]] = {}

    async def run_core() -> float:
        return core_one_row(quotes)

    async def run_scalar() -> float:
        return scalar(quotes)

    variants["core_one_row"] = run_core
    variants["price_locate"] = run_scalar
    variants["micro_batch_c1"] = lambda: concurrently(quotes, 1, micro)
    variants["micro_batch_c32"] = lambda: concurrently(quotes, 32, micro)
    variants["quoter_price"] = lambda: concurrently(quotes, 1, through_price)
    variants["quoter_price_single"] = lambda: concurrently(quotes, 1, through_price_single)
    for variant in variants.values():  # warm-up
        await variant()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            seconds[name].append(await variant())
    return {name: statistics.median(values) / quotes * 1e6 for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quotes", type=int, default=20_000, help="quotes per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = uvloop.run(measure(args.quotes, args.rounds))
    baseline = results["core_one_row"]
    print(f"{'variant':<22} {'CPU µs/quote':>13} {'vs core_one_row':>16}")
    for name, micros in results.items():
        print(f"{name:<22} {micros:>13.2f} {micros / baseline:>15.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"quotes": args.quotes, "rounds": args.rounds, "us_per_quote": results})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
