"""Pricing-core throughput: the exact NumPy core vs a pure-Python Decimal loop vs naive float64 NumPy.

    python benchmarks/bench_pricing.py [--sizes 1000,10000,100000,1000000] [--repeat 7] [--json out.json]

For each batch size, in the same run and on the same data:

* core:    what the batch endpoint does after decoding: `to_scaled_int` on the float positions (plus the
           range checks of DESIGN §2.1), rates of the batch's unique tickers (~5,000, or fewer for small
           batches) with `price_rates`, gathered per row, then `price_locates`;
* decimal: the same work as a straightforward pure-Python loop over `decimal.Decimal` (rates per unique
           ticker, then every row); for sizes above `--decimal-max` (default 100,000) it is extrapolated
           linearly from the largest measured size, and marked so;
* naive:   plain float64 NumPy with `np.round` (the approach DESIGN §3 warns about), and how many rows it
           prices differently from the exact core.

Times are the median of `--repeat` runs after a warm-up (the Decimal loop: of 3 runs, 2 above 10,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    from pricer.pricing.core import FeeTerms, RatePolicy, price_locates, price_rates, to_scaled_int
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pricer.pricing.core import FeeTerms, RatePolicy, price_locates, price_rates, to_scaled_int

UNIQUE_TICKERS = 5_000
VOLATILITY_INDEX = Decimal(20)
POLICY = RatePolicy()
# One client's fee schedule: markup 5 %, a PERCENTAGE transaction fee of 0.5 %, ACT/365.
MARKUP_PCT = 5.0
FEE_PCT = 0.5
DAY_COUNT = 365
MAX_POSITION_CENTS = 100_000_000_000

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


class Batch:
    """A batch as the endpoint sees it after decoding: float dollars, int days, ticker ids into a table."""

    def __init__(self, rng: np.random.Generator, size: int, tickers: int) -> None:
        self.size = size
        cents = np.exp(rng.uniform(np.log(100.0), np.log(1e10), size)).astype(np.int64)
        whole = rng.random(size) < 0.3
        cents = np.where(whole, np.maximum(cents // 100, 1) * 100, cents)
        self.positions: Float64Array = cents / 100.0  # what msgspec hands over for a JSON number
        self.days: Int64Array = rng.integers(1, 366, size)
        self.ticker_ids: Int64Array = rng.integers(0, tickers, size)
        # The ticker table (market data): base = FEERATE/100 with FEERATE ≤ 4 decimals, events, stock floors.
        feerate_units = np.exp(rng.uniform(np.log(2_500), np.log(3_000_000), tickers)).astype(np.int64)
        self.base_texts = [str(Decimal(int(units)).scaleb(-6)) for units in feerate_units]
        self.bases: Float64Array = np.array([float(text) for text in self.base_texts])
        self.risks: Int64Array = np.where(rng.random(tickers) < 0.8, 0, rng.integers(1, 11, tickers))
        self.stock_min_units: Int64Array = np.where(
            rng.random(tickers) < 0.9, 0, rng.integers(0, 1_000_000, tickers)
        )
        self.stored_status = np.full(tickers, -1, dtype=np.int8)


# --------------------------------------------------------------------------------------------------------
# The three implementations
# --------------------------------------------------------------------------------------------------------

TERMS = FeeTerms(
    day_count=DAY_COUNT,
    markup_units=int(to_scaled_int(MARKUP_PCT, 4)[0]),
    percentage_fee=True,
    transaction_units=int(to_scaled_int(FEE_PCT, 4)[0]),
)


def run_core(batch: Batch) -> tuple[Int64Array, Int64Array, Int64Array, Int64Array]:
    position_cents, ok = to_scaled_int(batch.positions, 2)
    ok &= (position_cents >= 1) & (position_cents <= MAX_POSITION_CENTS)
    ok &= (batch.days >= 1) & (batch.days <= 365)
    if not ok.all():
        raise ValueError("invalid rows in the benchmark batch")
    unique, inverse = np.unique(batch.ticker_ids, return_inverse=True)
    rates = price_rates(
        batch.bases[unique],
        batch.risks[unique],
        batch.stock_min_units[unique],
        batch.stored_status[unique],
        volatility_index=VOLATILITY_INDEX,
        policy=POLICY,
    )
    fees = price_locates(position_cents, batch.days, rates.rate_units[inverse], TERMS)
    return fees.borrow_cost, fees.markup, fees.transaction_fees, fees.total_fee


def core_phases(batch: Batch, repeat: int) -> dict[str, float]:
    """Median milliseconds of each step of `run_core`, measured separately."""
    position_cents, _ = to_scaled_int(batch.positions, 2)
    unique, inverse = np.unique(batch.ticker_ids, return_inverse=True)

    def rates() -> Any:
        return price_rates(
            batch.bases[unique],
            batch.risks[unique],
            batch.stock_min_units[unique],
            batch.stored_status[unique],
            volatility_index=VOLATILITY_INDEX,
            policy=POLICY,
        )

    rate_units = rates().rate_units
    row_rates = rate_units[inverse]
    steps: dict[str, Callable[[], object]] = {
        "validate": lambda: to_scaled_int(batch.positions, 2),
        "unique_tickers": lambda: np.unique(batch.ticker_ids, return_inverse=True),
        "price_rates": rates,
        "gather": lambda: rate_units[inverse],
        "price_locates": lambda: price_locates(position_cents, batch.days, row_rates, TERMS),
    }
    return {name: median_seconds(step, repeat) * 1e3 for name, step in steps.items()}


def run_naive(batch: Batch) -> tuple[Float64Array, Float64Array, Float64Array, Float64Array]:
    unique, inverse = np.unique(batch.ticker_ids, return_inverse=True)
    vol = float(POLICY.volatility_factor) * max(
        0.0, float(VOLATILITY_INDEX) - float(POLICY.volatility_threshold)
    )
    event = batch.risks[unique] / 10 * float(POLICY.event_risk_factor)
    floor = np.maximum(batch.stock_min_units[unique] / 1e8, float(POLICY.min_borrow_rate))
    ticker_rates = np.minimum(
        np.round(np.maximum(batch.bases[unique] * (1 + vol) * (1 + event), floor), 8),
        float(POLICY.max_borrow_rate),
    )
    rate = ticker_rates[inverse]
    borrow = np.round(batch.positions * rate * batch.days / DAY_COUNT, 2)
    markup = np.round(borrow * MARKUP_PCT / 100, 2)
    transaction = np.round(batch.positions * FEE_PCT / 100, 2)
    return borrow, markup, transaction, borrow + markup + transaction


_CENT = Decimal("0.01")
_RATE_QUANTUM = Decimal("1e-8")
_CONTEXT = Context(prec=60, rounding=ROUND_HALF_UP)


def run_decimal(batch: Batch, rows: int) -> list[tuple[Decimal, Decimal, Decimal, Decimal]]:
    """The straightforward service: Decimal per ticker and per row (validation included)."""
    out = []
    with localcontext(_CONTEXT):
        vol_adj = Decimal(POLICY.volatility_factor) * max(
            Decimal(0), VOLATILITY_INDEX - Decimal(POLICY.volatility_threshold)
        )
        event_factor = Decimal(POLICY.event_risk_factor)
        min_rate = Decimal(POLICY.min_borrow_rate)
        max_rate = Decimal(POLICY.max_borrow_rate)
        markup_pct, fee_pct, day_count = Decimal(repr(MARKUP_PCT)), Decimal(repr(FEE_PCT)), Decimal(DAY_COUNT)
        rate_cache: dict[int, Decimal] = {}
        positions = batch.positions[:rows].tolist()
        days = batch.days[:rows].tolist()
        ticker_ids = batch.ticker_ids[:rows].tolist()
        for position_float, loan_days, ticker in zip(positions, days, ticker_ids, strict=True):
            position = Decimal(repr(position_float))
            exponent = position.as_tuple().exponent
            if (
                not isinstance(exponent, int)
                or exponent < -2
                or not Decimal("0.01") <= position <= Decimal(10**9)
            ):
                raise ValueError("invalid position")
            rate = rate_cache.get(ticker)
            if rate is None:
                base = Decimal(batch.base_texts[ticker])
                adjusted = base * (1 + vol_adj) * (1 + Decimal(int(batch.risks[ticker])) / 10 * event_factor)
                floor = max(Decimal(int(batch.stock_min_units[ticker])).scaleb(-8), min_rate)
                rate = min(max(adjusted, floor).quantize(_RATE_QUANTUM, rounding=ROUND_HALF_UP), max_rate)
                rate_cache[ticker] = rate
            borrow = (position * rate * loan_days / day_count).quantize(_CENT, rounding=ROUND_HALF_UP)
            markup = (borrow * markup_pct / 100).quantize(_CENT, rounding=ROUND_HALF_UP)
            transaction = (position * fee_pct / 100).quantize(_CENT, rounding=ROUND_HALF_UP)
            out.append((borrow, markup, transaction, borrow + markup + transaction))
    return out


# --------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------


def median_seconds(function: Callable[[], object], repeat: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "threadpoolctl": "not installed",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        facts["threadpoolctl"] = [
            {key: pool.get(key) for key in ("user_api", "internal_api", "num_threads", "version")}
            for pool in threadpool_info()
        ]
    return facts


def bench_size(batch: Batch, repeat: int, decimal_max: int, decimal_per_row: float | None) -> dict[str, Any]:
    size = batch.size
    core_s = median_seconds(lambda: run_core(batch), repeat)
    phases = core_phases(batch, repeat)
    naive_s = median_seconds(lambda: run_naive(batch), repeat)

    exact = np.stack(run_core(batch), axis=1)
    naive = np.rint(np.stack(run_naive(batch), axis=1) * 100).astype(np.int64)
    differs = naive != exact
    naive_rows = int(differs.any(axis=1).sum())
    naive_by_column = [int(count) for count in differs.sum(axis=0)]

    if size <= decimal_max:
        decimal_s = median_seconds(lambda: run_decimal(batch, size), 3 if size <= 10_000 else 2)
        decimal_extrapolated = False
        # The Decimal loop must agree with the core exactly (checked on up to 20,000 rows).
        check = min(size, 20_000)
        decimal_cents = np.array(
            [[int(value * 100) for value in row] for row in run_decimal(batch, check)], dtype=np.int64
        )
        if not np.array_equal(decimal_cents, exact[:check]):
            raise AssertionError("the Decimal loop and the exact core disagree")
    else:
        assert decimal_per_row is not None
        decimal_s = decimal_per_row * size
        decimal_extrapolated = True
    return {
        "size": size,
        "core_ms": core_s * 1e3,
        "core_positions_per_s": size / core_s,
        "decimal_ms": decimal_s * 1e3,
        "decimal_positions_per_s": size / decimal_s,
        "decimal_extrapolated": decimal_extrapolated,
        "naive_ms": naive_s * 1e3,
        "naive_positions_per_s": size / naive_s,
        "naive_mismatched_rows": naive_rows,
        "naive_mismatches_by_column": dict(
            zip(("borrow_cost", "markup", "transaction_fees", "total_fee"), naive_by_column, strict=True)
        ),
        "decimal_over_core": decimal_s / core_s,
        "core_over_naive": core_s / naive_s,
        "unique_tickers": int(np.unique(batch.ticker_ids).size),
        "core_phase_ms": phases,
    }


def print_table(facts: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print("machine:", ", ".join(f"{key}={value}" for key, value in facts.items()))
    print(
        f"schedule: markup {MARKUP_PCT} %, PERCENTAGE fee {FEE_PCT} %, day count {DAY_COUNT}; "
        f"V={VOLATILITY_INDEX}, default policy; ≤ {UNIQUE_TICKERS} unique tickers per batch"
    )
    header = (
        f"{'rows':>9} {'tickers':>7} | {'core ms':>9} {'core pos/s':>11} "
        f"| {'Decimal ms':>11} {'Decimal pos/s':>13} "
        f"| {'naive ms':>9} {'naive pos/s':>11} {'naive wrong rows':>17} | {'Dec/core':>8} {'core/naive':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        star = "*" if r["decimal_extrapolated"] else " "
        wrong = f"{r['naive_mismatched_rows']} ({100 * r['naive_mismatched_rows'] / r['size']:.2f} %)"
        print(
            f"{r['size']:>9,} {r['unique_tickers']:>7,} "
            f"| {r['core_ms']:>9.3f} {r['core_positions_per_s']:>11.3g} "
            f"| {r['decimal_ms']:>10.1f}{star} {r['decimal_positions_per_s']:>13.3g} "
            f"| {r['naive_ms']:>9.3f} {r['naive_positions_per_s']:>11.3g} {wrong:>17} "
            f"| {r['decimal_over_core']:>8.1f} {r['core_over_naive']:>10.2f}"
        )
    if any(r["decimal_extrapolated"] for r in results):
        print("* Decimal time extrapolated linearly from the largest measured size (per-row time × rows)")
    for r in results:
        phases = ", ".join(f"{name} {ms:.3f}" for name, ms in r["core_phase_ms"].items())
        print(f"core steps at {r['size']:,} rows (ms, each timed alone): {phases}")
    for r in results:
        print(f"naive mismatches by column at {r['size']:,} rows: {r['naive_mismatches_by_column']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per measurement (median)")
    parser.add_argument("--decimal-max", type=int, default=100_000, help="largest size the Decimal loop runs")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = sorted(int(text.replace("_", "")) for text in args.sizes.split(",") if text.strip())

    rng = np.random.default_rng(args.seed)
    facts = machine_facts()
    results = []
    decimal_per_row: float | None = None
    for size in sizes:
        batch = Batch(rng, size, min(UNIQUE_TICKERS, max(1, size // 2)))
        repeat = args.repeat if size < 1_000_000 else max(3, args.repeat // 2)
        result = bench_size(batch, repeat, args.decimal_max, decimal_per_row)
        if not result["decimal_extrapolated"]:
            decimal_per_row = result["decimal_ms"] / 1e3 / size
        results.append(result)
        print(f"... {size:,} rows done", file=sys.stderr, flush=True)
    print_table(facts, results)
    if args.json:
        args.json.write_text(json.dumps({"machine": facts, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
