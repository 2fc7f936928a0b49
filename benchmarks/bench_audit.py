"""Audit-trail write throughput: a 10^5-position batch into PostgreSQL, three ways, in the same run.

    python benchmarks/bench_audit.py [--size 100000] [--repeat 5] [--tickers 5000] [--json out.json]

On two throwaway schemas of the server at `--database-url` (migrated here, dropped at the end), each
repetition writes the same priced batch (fresh quote ids each time, into emptied tables):

* store:       `PgQuoteStore.write([batch])` into `bench_<random>` (all migrations): the batch and its rates
               by one INSERT, the rows by binary COPY into `quote_rows`, cut in two ranges written at once
               over two connections;
* audit:       `AuditTrail.add(batch)` then `AuditTrail.close()` (the in-process recent store, the queue and
               the background writer, which calls the same `write`), end to end;
* executemany: the baseline, a plain `INSERT INTO quotes (...) VALUES ($1, ..., $30)` through asyncpg's
               `executemany` in one transaction, of the same rows built in Python (Decimal money), into
               `bench_<random>_001`: the one wide table of migration 001, what the obvious design writes.

The methods alternate within each repetition; figures are medians. After the first repetition the stored
records are compared (a digest of every column of the view `quotes`, resp. the 001 table, but the ids and
`stored_at`): they must be equal. Times are wall-clock; the client's CPU (this process) and the PostgreSQL
backends' CPU (the pool's three connections, from /proc/<pid>/stat) are reported beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pricer.audit import AuditTrail, Spool
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pricer.audit import AuditTrail, Spool
from bench_http import parse_proc_stat_cpu
from bench_variants import DEFAULT_DATABASE_URL, make_target
from pricer.models import BorrowStatus, FeeType, RateSource
from pricer.quotes import PricedBatch, TickerRate, new_batch_id
from pricer.schemas import FeeScheduleView
from pricer.stores.migrate import migrate
from pricer.stores.postgres.assembly import connect_stores
from pricer.stores.postgres.audit import PgQuoteStore
from pricer.stores.postgres.common import quote_identifier

METHODS = ("store", "audit", "executemany")
TARGET_ROWS_PER_S = 200_000
T0 = dt.datetime(2026, 3, 2, 14, 30, 15, 123456, tzinfo=dt.UTC)

# The columns the baseline INSERT fills (every column of `quotes` but `stored_at`, which defaults).
PLAIN_COLUMNS = (
    "quote_id",
    "batch_id",
    "row_index",
    "input_index",
    "calculated_at",
    "request_id",
    "client_id",
    "key_id",
    "ticker",
    "position_value",
    "loan_days",
    "markup_percentage",
    "transaction_fee_type",
    "transaction_amount",
    "day_count",
    "borrow_rate",
    "base_rate",
    "volatility_index",
    "volatility_adjustment",
    "event_risk_factor",
    "event_adjustment",
    "min_rate",
    "borrow_status",
    "rate_source",
    "available_shares",
    "rate_as_of",
    "borrow_cost",
    "markup",
    "transaction_fees",
    "total_fee",
)
BASELINE_MIGRATION = "001_initial"
WRITE_CONNECTIONS = 2
PLAIN_INSERT = (
    f"INSERT INTO quotes ({', '.join(PLAIN_COLUMNS)}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(PLAIN_COLUMNS) + 1))})"
)
# Every column but the ids and stored_at, in row order: equal digests mean equal rows. `quotes` is the
# view of the narrow tables in the store's schema and the wide table in the baseline's.
DIGEST = (
    "SELECT count(*), md5(string_agg(row("
    + ", ".join(PLAIN_COLUMNS[2:])
    + ")::text, '|' ORDER BY row_index))"
    " FROM {schema}.quotes"
)

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


def rows_per_second(rows: int, seconds: float | None) -> float | None:
    return rows / seconds if seconds and seconds > 0 else None


def cents(value: int) -> Decimal:
    """Integer cents as the exact Decimal dollars (what a NUMERIC(…, 2) column takes)."""
    return Decimal(value).scaleb(-2)


def rate_decimal(units: int) -> Decimal:
    """A rate in 1e-8 units as its exact Decimal."""
    return Decimal(units).scaleb(-8)


def plain_rows(batch: PricedBatch) -> list[tuple[Any, ...]]:
    """The batch as one tuple per `quotes` row (PLAIN_COLUMNS order), built the plain Python way."""
    schedule = batch.fee_schedule
    per_rate = [
        (
            rate.ticker,
            rate_decimal(rate.rate_units),
            Decimal(repr(float(rate.base_rate))),
            Decimal(repr(float(rate.volatility_index))),
            Decimal(repr(float(rate.volatility_adjustment))),
            rate.event_risk_factor,
            Decimal(repr(float(rate.event_adjustment))),
            rate_decimal(rate.min_rate_units),
            str(rate.borrow_status),
            str(rate.source),
            rate.available_shares,
            rate.as_of,
        )
        for rate in batch.rates
    ]
    fixed = (batch.calculated_at, batch.request_id, batch.client_id, batch.key_id)
    terms = (
        Decimal(repr(float(schedule.markup_percentage))),
        str(schedule.transaction_fee_type),
        Decimal(repr(float(schedule.transaction_amount))),
        schedule.day_count,
    )
    prefix = batch.batch_id
    rows = []
    columns = zip(
        batch.rate_index.tolist(),
        batch.input_index.tolist(),
        batch.position_cents.tolist(),
        batch.loan_days.tolist(),
        batch.borrow_cost.tolist(),
        batch.markup.tolist(),
        batch.transaction_fees.tolist(),
        batch.total_fee.tolist(),
        strict=True,
    )
    for row, (rate_index, input_index, position, days, cost, markup, fees, total) in enumerate(columns):
        rate = per_rate[rate_index]
        rows.append(
            (
                f"{prefix}{row:08x}",
                prefix,
                row,
                input_index,
                *fixed,
                rate[0],
                cents(position),
                days,
                *terms,
                *rate[1:],
                cents(cost),
                cents(markup),
                cents(fees),
                cents(total),
            )
        )
    return rows


def make_batch(size: int, tickers: int, seed: int = 0) -> PricedBatch:
    """A priced batch with synthetic (not re-priced) figures, like tests/test_store_contract.py's, over
    `tickers` distinct rates (a batch of 10^5 positions touches a few thousand tickers)."""
    rng = np.random.default_rng(seed)
    statuses = list(BorrowStatus)
    sources = [RateSource.AVAILABILITY_FILE, RateSource.AVAILABILITY_FILE, RateSource.FALLBACK]
    rates = []
    for index in range(tickers):
        risk = int(rng.integers(0, 11)) if rng.random() < 0.2 else 0
        rates.append(
            TickerRate(
                ticker=f"T{index:05d}",
                rate_units=int(rng.integers(10_000, 1_000_000_000)),
                base_rate=float(rng.integers(25, 3_000_000)) / 1e6,
                volatility_index=23.4567,
                volatility_adjustment=0.034567,
                event_risk_factor=risk,
                event_adjustment=risk / 10 * 0.05,
                min_rate_units=10_000,
                borrow_status=statuses[index % len(statuses)],
                source=sources[index % len(sources)],
                available_shares=int(rng.integers(0, 10_000_000)) if index % 7 else None,
                as_of=T0 - dt.timedelta(hours=index % 48),
            )
        )
    position = rng.integers(1, 100_000_000_000, size, dtype=np.int64)
    cost = rng.integers(0, 10_000_000_000, size, dtype=np.int64)
    markup = rng.integers(0, 1_000_000_000, size, dtype=np.int64)
    fees = rng.integers(0, 100_000_000, size, dtype=np.int64)
    return PricedBatch(
        batch_id=new_batch_id(),
        calculated_at=T0,
        request_id="req-" + "0123456789abcdef" * 2,
        client_id="client_1",
        key_id="k1a2b3c4",
        fee_schedule=FeeScheduleView(5.1234, FeeType.FLAT, 25.0, 365),
        rates=rates,
        rate_index=rng.integers(0, tickers, size, dtype=np.int64),
        input_index=np.arange(size, dtype=np.int64),
        position_cents=position,
        loan_days=rng.integers(1, 366, size, dtype=np.int64),
        borrow_cost=cost,
        markup=markup,
        transaction_fees=fees,
        total_fee=cost + markup + fees,
    )


def method_order(round_number: int) -> list[str]:
    """The methods rotate: each goes first in one repetition out of three."""
    shift = (round_number - 1) % len(METHODS)
    return list(METHODS[shift:] + METHODS[:shift])


def summarize_method(runs: Sequence[dict[str, Any]], size: int) -> dict[str, Any]:
    def median(name: str) -> float | None:
        values = [run[name] for run in runs if run.get(name) is not None]
        return statistics.median(values) if values else None

    seconds = median("seconds")
    return {
        "repeat": len(runs),
        "seconds": seconds,
        "rows_per_s": rows_per_second(size, seconds),
        "per_run_rows_per_s": [rows_per_second(size, run["seconds"]) for run in runs],
        "client_cpu_s": median("client_cpu_s"),
        "db_cpu_s": median("db_cpu_s"),
        **{
            name: median(name)
            for name in ("build_s", "insert_s", "add_s", "close_s")
            if any(run.get(name) is not None for run in runs)
        },
    }


# ---- measuring ----------------------------------------------------------------------------------------


def backend_cpu(pids: Sequence[int] | None) -> float | None:
    """The CPU seconds the backends `pids` have used so far (None: not readable here)."""
    if not pids:
        return None
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text(), ticks) for pid in pids)
    except (OSError, ValueError, IndexError):
        return None  # the server is elsewhere (not this machine) or not readable


async def backend_pids(pool: Any) -> list[int]:
    """The server process of each of the pool's connections (all held at once, so each is another)."""
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        return [int(await connection.fetchval("SELECT pg_backend_pid()")) for connection in connections]
    finally:
        for connection in connections:
            await pool.release(connection)


class Bench:
    def __init__(
        self,
        pool: Any,
        store: PgQuoteStore,
        schemas: tuple[str, str],
        pids: list[int] | None,
        spool_dir: Path,
    ) -> None:
        self.pool = pool
        self.store = store
        self.schema, self.baseline_schema = (quote_identifier(name) for name in schemas)
        self.pids = pids
        self.spool_dir = spool_dir

    def _schema_of(self, method: str) -> str:
        return self.baseline_schema if method == "executemany" else self.schema

    async def truncate(self) -> None:
        await self.pool.execute(
            f"TRUNCATE {self.schema}.quote_rows, {self.schema}.quote_batches, {self.schema}.quote_rates, "
            f"{self.baseline_schema}.quotes"
        )

    async def count(self, method: str) -> int:
        return int(await self.pool.fetchval(f"SELECT count(*) FROM {self._schema_of(method)}.quotes"))

    async def digest(self, method: str) -> tuple[int, str]:
        row = await self.pool.fetchrow(DIGEST.format(schema=self._schema_of(method)))
        return int(row[0]), str(row[1])

    async def run(self, method: str, batch: PricedBatch) -> dict[str, Any]:
        await self.truncate()
        db_before = backend_cpu(self.pids)
        cpu_before = time.process_time()
        figures: dict[str, Any] = {}
        started = time.perf_counter()
        if method == "store":
            await self.store.write([batch])
        elif method == "audit":
            audit = AuditTrail(self.store, spool=Spool(self.spool_dir))  # type: ignore[arg-type]
            audit.start()
            await audit.add(batch)
            figures["add_s"] = time.perf_counter() - started
            await audit.close()
            figures["close_s"] = time.perf_counter() - started - figures["add_s"]
            figures["written_rows"] = audit.written_rows
            figures["spooled_rows"] = audit.spooled_rows
        else:
            rows = plain_rows(batch)
            figures["build_s"] = time.perf_counter() - started
            async with self.pool.acquire() as connection, connection.transaction():
                await connection.execute(f"SET LOCAL search_path = {self.baseline_schema}")
                await connection.executemany(PLAIN_INSERT, rows)
            figures["insert_s"] = time.perf_counter() - started - figures["build_s"]
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_before
        db_after = backend_cpu(self.pids)
        return {
            "method": method,
            "seconds": seconds,
            "client_cpu_s": client_cpu,
            "db_cpu_s": None if db_before is None or db_after is None else db_after - db_before,
            "rows_in_table": await self.count(method),
            **figures,
        }


async def database_facts(pool: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"server_version": await pool.fetchval("SHOW server_version")}
    for name in ("synchronous_commit", "fsync", "shared_buffers", "wal_level", "max_wal_size", "work_mem"):
        facts[name] = await pool.fetchval(f"SHOW {name}")
    return facts


async def measure(args: argparse.Namespace, schemas: tuple[str, str], notes: list[str]) -> dict[str, Any]:
    schema, baseline_schema = schemas
    await migrate(args.database_url, schema=schema)
    await migrate(args.database_url, schema=baseline_schema, through=BASELINE_MIGRATION)
    # A fixed pool (the store writes over WRITE_CONNECTIONS at once, plus one): every method runs on
    # these backends, whose CPU is read from /proc.
    size = WRITE_CONNECTIONS + 1
    _stores, pool = await connect_stores(args.database_url, schema=schema, min_size=size, max_size=size)
    try:
        store = PgQuoteStore(pool, write_connections=WRITE_CONNECTIONS)
        pids: list[int] | None = await backend_pids(pool)
        if backend_cpu(pids) is None:
            notes.append("The PostgreSQL backends' CPU is not readable here (server on another machine?).")
            pids = None
        facts = await database_facts(pool)
        with tempfile.TemporaryDirectory(prefix="bench-audit-spool-") as spool:
            bench = Bench(pool, store, schemas, pids, Path(spool))
            base = make_batch(args.size, min(args.tickers, args.size), seed=args.seed)
            # Warm-up: statements prepared, caches and the staging table made, with a small batch.
            small = make_batch(1000, min(args.tickers, 1000), seed=args.seed + 1)
            for method in METHODS:
                await bench.run(method, dataclasses.replace(small, batch_id=new_batch_id()))
            runs: list[dict[str, Any]] = []
            digests: dict[str, tuple[int, str]] = {}
            for round_number in range(1, args.repeat + 1):
                for method in method_order(round_number):
                    batch = dataclasses.replace(base, batch_id=new_batch_id())  # fresh quote ids
                    run = await bench.run(method, batch)
                    run["round"] = round_number
                    if round_number == 1:
                        digests[method] = await bench.digest(method)
                    runs.append(run)
                    print(
                        f"round {round_number} {method:<12} {run['seconds'] * 1000:8.1f} ms  "
                        f"{rows_per_second(args.size, run['seconds']) or 0:>10,.0f} rows/s  client CPU "
                        f"{run['client_cpu_s'] * 1000:.0f} ms  database CPU "
                        + (f"{run['db_cpu_s'] * 1000:.0f} ms" if run["db_cpu_s"] is not None else "n/a"),
                        flush=True,
                    )
            await bench.truncate()
        return {"runs": runs, "digests": digests, "database": facts, "backend_pids": pids}
    finally:
        await pool.close()


async def drop(database_url: str, schemas: Sequence[str]) -> None:
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(database_url)
    try:
        for schema in schemas:
            await connection.execute(f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE")
    finally:
        await connection.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=100_000, help="positions in the batch (100000)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions, medians taken (5)")
    parser.add_argument("--tickers", type=int, default=5_000, help="distinct rates in the batch (5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.size < 1:
        print("bench_audit: --repeat and --size must be positive", file=sys.stderr)
        return 2
    schema = f"bench_{secrets.token_hex(6)}"
    schemas = (schema, f"{schema}_001")
    notes: list[str] = []
    print(
        f"Schemas {', '.join(schemas)} on {args.database_url}; batch of {args.size:,} positions, "
        f"{args.repeat} repetitions"
    )
    try:
        result = asyncio.run(measure(args, schemas, notes))
    except Exception as error:
        print(f"bench_audit: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    finally:
        asyncio.run(drop(args.database_url, schemas))
    runs = result["runs"]

    problems = []
    for run in runs:
        if run["rows_in_table"] != args.size:
            problems.append(f"{run['method']} round {run['round']}: {run['rows_in_table']} rows in the table")
        if run["method"] == "audit" and (run["written_rows"] != args.size or run["spooled_rows"]):
            problems.append(
                f"audit round {run['round']}: written {run['written_rows']}, spooled {run['spooled_rows']}"
            )
    digests = result["digests"]
    if len({digest for digest in digests.values()}) != 1:
        problems.append(f"the three methods stored different rows: {digests}")
    valid = not problems

    summary = {
        method: summarize_method([r for r in runs if r["method"] == method], args.size) for method in METHODS
    }
    plain = summary["executemany"]
    insert_only = args.size / plain["insert_s"] if plain.get("insert_s") else None
    ratios = {
        "store_over_executemany": _ratio(summary["store"]["rows_per_s"], plain["rows_per_s"]),
        "store_over_executemany_insert_only": _ratio(summary["store"]["rows_per_s"], insert_only),
        "audit_over_executemany": _ratio(summary["audit"]["rows_per_s"], plain["rows_per_s"]),
        "audit_over_store": _ratio(summary["audit"]["rows_per_s"], summary["store"]["rows_per_s"]),
    }
    plain["rows_per_s_insert_only"] = insert_only
    full_size = args.size == 100_000
    condition = "" if full_size else f"measured at {args.size:,} positions, the target is for 100,000"
    targets = [
        make_target(
            "PgQuoteStore.write, 10^5-position batch",
            summary["store"]["rows_per_s"],
            TARGET_ROWS_PER_S,
            ">=",
            "rows/s",
            valid=valid,
            note=condition,
        ),
        make_target(
            "AuditTrail add + close, end to end (same target)",
            summary["audit"]["rows_per_s"],
            TARGET_ROWS_PER_S,
            ">=",
            "rows/s",
            valid=valid,
            note=condition,
        ),
    ]
    if not full_size:
        for target in targets:
            target["verdict"] = f"n/a (other size: {target['verdict']})"

    print()
    for method in METHODS:
        s = summary[method]
        print(
            f"{method:<12} {s['seconds'] * 1000:8.1f} ms  {s['rows_per_s']:>10,.0f} rows/s  "
            f"(per run: {', '.join(f'{v:,.0f}' for v in s['per_run_rows_per_s'])})"
        )
    print(
        f"executemany INSERT alone (rows built beforehand): {insert_only or 0:,.0f} rows/s; "
        f"build {plain.get('build_s', 0) * 1000:.0f} ms"
    )
    for name, value in ratios.items():
        print(f"{name}: {_ratio_text(value)}")
    for target in targets:
        print(
            f"Target: {target['name']} = {target['value'] or 0:,.0f} rows/s "
            f"(target >= {TARGET_ROWS_PER_S:,}): {target['verdict']}"
        )
    for problem in problems:
        print(f"INVALID: {problem}")

    document = {
        "benchmark": "audit",
        "valid": valid,
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "loadavg_at_start": os.getloadavg(),
        },
        "database": result["database"],
        "settings": {
            "size": args.size,
            "repeat": args.repeat,
            "tickers": min(args.tickers, args.size),
            "schema": "bench_<random>",
            "baseline_schema": f"bench_<random>_001 (migrated through {BASELINE_MIGRATION})",
            "write_connections": WRITE_CONNECTIONS,
            "database_url": args.database_url,
        },
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "digests_equal": len(set(digests.values())) == 1,
        "runs": runs,
        "problems": problems,
        "notes": notes,
        "commands": [
            "python benchmarks/bench_audit.py"
            + ("" if args.size == 100_000 else f" --size {args.size}")
            + ("" if args.repeat == 5 else f" --repeat {args.repeat}")
            + (f" --database-url {args.database_url}" if args.database_url != DEFAULT_DATABASE_URL else ""),
            "# baseline, asyncpg Connection.executemany in one transaction into migration "
            f"{BASELINE_MIGRATION}'s table: {PLAIN_INSERT}",
        ],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        print(f"Results written to {args.json}")
    return 0 if valid else 1


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
