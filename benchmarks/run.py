"""`nox -s bench`: run the benchmarks, then write benchmarks/REPORT.md.

    python benchmarks/run.py                      # everything (about 10 minutes)
    python benchmarks/run.py --quick              # smoke run: short durations, fewer rounds
    python benchmarks/run.py --only limiter,audit # some sections only (or --skip-<section>)

Sections (each runs as its own process and writes JSON, kept in benchmarks/results/<section>.json):

    pricing        bench_pricing.py         exact NumPy core vs Decimal vs naive float64
    http           bench_http.py            single quote: engine vs FastAPI + pydantic baseline vs raw ASGI
    latency        bench_latency.py         open-loop latency at half capacity (C generator), profile
    profile        profile_single.py        where a single quote's µs go, by layer (py-spy), before/after
    limiter        bench_variants.py        Redis rate limiter on vs off (+ latency at half capacity)
    persistence    bench_variants.py        PostgreSQL store + audit vs in-memory
    observability  bench_variants.py        metrics on/off, tracing on/off
    audit          bench_audit.py           10^5-row audit write: PgQuoteStore, AuditTrail, executemany
    batch          bench_batch.py           10^4-position batch round trip; RSS under 10^5 client ids
    million        bench_batch.py --million 10^6-position batches, 4 forms, beside msgspec's own floor
    mixed          bench_mixed.py           single quotes at 100/s during 10^6-position batches, inline vs
                                            batch pool (py-spy of the main process); peak memory per form
    faults         bench_faults.py          Redis/PostgreSQL down, SIGTERM, SIGKILL, slowloris, flood: loss
    sources        bench_sources.py         simulated providers vs files only: req/s, hang, cold, refresher
    roles          bench_roles.py           gateway -> calculation/data services (3 processes) vs ROLE=all

The report quotes machine facts, every figure beside a baseline or variant measured in the same run, the
issues' targets with PASS/MISS, and the exact commands. A missing or failing benchmark is reported as such;
the exit status is non-zero then, or when a run had errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRICING_SCRIPT = HERE / "bench_pricing.py"
HTTP_SCRIPT = HERE / "bench_http.py"
VARIANTS_SCRIPT = HERE / "bench_variants.py"
AUDIT_SCRIPT = HERE / "bench_audit.py"
BATCH_SCRIPT = HERE / "bench_batch.py"
LATENCY_SCRIPT = HERE / "bench_latency.py"
FAULTS_SCRIPT = HERE / "bench_faults.py"
SOURCES_SCRIPT = HERE / "bench_sources.py"
PROFILE_SCRIPT = HERE / "profile_single.py"
ROLES_SCRIPT = HERE / "bench_roles.py"
MIXED_SCRIPT = HERE / "bench_mixed.py"
LATENCY_PLOT = HERE / "REPORT-latency.png"
VARIANT_SECTIONS = ("limiter", "persistence", "observability")
SECTIONS = (
    "pricing",
    "http",
    "latency",
    "profile",
    *VARIANT_SECTIONS,
    "audit",
    "batch",
    "million",
    "mixed",
    "faults",
    "sources",
    "roles",
)
SCRIPTS = {
    "pricing": PRICING_SCRIPT,
    "http": HTTP_SCRIPT,
    "latency": LATENCY_SCRIPT,
    "profile": PROFILE_SCRIPT,
    **{name: VARIANTS_SCRIPT for name in VARIANT_SECTIONS},
    "audit": AUDIT_SCRIPT,
    "batch": BATCH_SCRIPT,
    "million": BATCH_SCRIPT,
    "mixed": MIXED_SCRIPT,
    "faults": FAULTS_SCRIPT,
    "sources": SOURCES_SCRIPT,
    "roles": ROLES_SCRIPT,
}
# What --quick adds to each section's command (the HTTP and pricing ones: see run_http / run_pricing).
QUICK_ARGS = {
    **{
        name: ["--duration", "2s", "--warmup", "1s", "--paced-warmup", "1s", "--rounds", "2"]
        for name in VARIANT_SECTIONS
    },
    "audit": ["--repeat", "3"],
    "latency": ["--capacity-seconds", "4", "--duration", "4", "--warmup", "1", "--rounds", "1"],
    "profile": ["--duration", "4s", "--warmup", "1s", "--rounds", "1"],
    "batch": ["--duration", "2s", "--rounds", "2", "--clients", "20000"],
    "million": ["--million", "100000", "--million-rounds", "1", "--skip-batch", "--skip-rss"],
    "mixed": ["--positions", "100000", "--duration", "5", "--warmup", "1"],
    "faults": ["--quick"],
    "sources": ["--quick"],
    "roles": ["--quick"],
}

# What a full run adds: the persistence target (<= 15 % fewer req/s) lies within what one round varies by
# on a shared 2-CPU VM (its per-round ratios have spread over 0.8-1.1), so its median takes more rounds.
FULL_ARGS = {
    "persistence": ["--rounds", "5"],
    "million": [
        "--million",
        "1000000",
        # The median of five: the first 10^6 batch of a fresh engine also pays the first computation of
        # 5,000 tickers' rates (each round's figure is in the table).
        "--million-rounds",
        "5",
        "--skip-batch",
        "--skip-rss",
        "--million-profile",
        str(HERE / "results" / "million-row-json.txt"),
    ],
}

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


def flatten_numbers(value: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted path, number) for every int/float leaf of a JSON value (bools and text skipped)."""
    rows: list[tuple[str, float]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            rows += flatten_numbers(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            rows += flatten_numbers(item, f"{prefix}[{index}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        rows.append((prefix, value))
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if value is None:
        return "n/a"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A Markdown table of flat records (nested values left out), columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, Mapping | list):
                columns.append(key)
    if not columns:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(column)) for column in columns) + " |")
    return lines


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def signed(value: float | None, unit: str = "") -> str:
    """A difference with its sign (`+12.3 µs`), n/a when missing."""
    if value is None:
        return "n/a"
    return f"{value:+.1f}" + (f" {unit}" if unit else "")


def selected_sections(only: str | None, skipped: Sequence[str]) -> list[str]:
    """The sections to run, in the standard order: `--only a,b` (else all) minus the skipped ones."""
    chosen = list(SECTIONS)
    if only:
        wanted = [part.strip() for part in only.split(",") if part.strip()]
        unknown = [name for name in wanted if name not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown section(s): {', '.join(unknown)} (sections: {', '.join(SECTIONS)})")
        chosen = [name for name in SECTIONS if name in wanted]
    return [name for name in chosen if name not in skipped]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def target_row(section: str, target: Mapping[str, Any]) -> str:
    """A Markdown table row for one target: section, target, figure, limit, verdict, note."""
    value = target.get("value")
    unit = target.get("unit", "")
    limit = target.get("limit")
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    verdict_text = str(target.get("verdict", "n/a"))
    shown = "**" + verdict_text + "**" if verdict_text in ("PASS", "MISS", "INVALID") else verdict_text
    return (
        f"| {section} | {target.get('name', '')} | {format_value(value)} {unit} | "
        f"{target.get('op', '')} {format_value(limit)} {unit} | {shown} | {target.get('note') or ''} |"
    )


def targets_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    if not rows:
        return []
    return [
        "| section | target | measured | target | verdict | note |",
        "|---|---|---|---|---|---|",
        *(target_row(section, target) for section, target in rows),
    ]


# Where the time goes, and what would close the gap, for each target this design is known to miss on
# these 2-core machines (from the profiles in the latency section and the measurements behind them). Shown
# only for targets that the run at hand reports as MISS.
MISS_ANALYSIS: dict[str, str] = {
    # The production shape first: its row's name also holds "req/s engine / FastAPI baseline".
    "Redis limiter + PostgreSQL": (
        "The production shape adds to the embedded engine's CPU per quote its Redis and PostgreSQL "
        "clients' work and the database's own. Measured per quote (server and PostgreSQL backend CPU "
        "from /proc): the engine process spends about 10-15 µs more than embedded (the audit writer: "
        "3.5-4.5 µs to build and send each write of a few hundred single quotes, the rest in the "
        "recent-quotes store and the queue), and PostgreSQL about 11 µs to insert each quote's batch "
        "and row (12-14 µs before the single quotes' JSON went to json_to_recordset), part of it on the "
        "engine's core. The Redis limiter costs under 2 µs per quote: a lease of 256 tokens, refilled "
        "at half, takes one script call per 128 decisions. Tried and measured: batches and rows by COPY "
        "cut PostgreSQL to ~8 µs but doubled the engine's share (seven round trips per write). What "
        "would close it: the audit writer in a process of its own on a core the engine does not use."
    ),
    "req/s engine / FastAPI baseline": (
        "The engine spends about 70-100 µs of server CPU per quote where the raw-ASGI ceiling spends "
        "about 31 µs and the FastAPI baseline about 240-265 µs (issue 13's work: one admission step, one "
        "request edge, single quotes on Python ints, responses held to the end of their event-loop turn "
        "and written together, uvicorn's response checks done in C). The profile section shows where the "
        "rest goes: uvicorn's protocol and socket writes ~29 %, uvloop ~15 %, the engine's own steps a "
        "few µs each. More worker processes (WORKERS) add throughput but not throughput per core, which "
        "is what this ratio measures."
    ),
    "raw-ASGI ceiling": (
        "The engine spends about 70-100 µs of server CPU per quote against the ceiling's ~31 µs: the "
        "ceiling does no authentication, limiting, pricing, auditing or metrics. The profile section "
        "shows the rest spread over a few µs per step (admission, rate limit, decode, JSON, the quoter)."
    ),
    "p99 at half capacity": (
        "At half of its capacity in requests per second the engine is 84-92 % busy, not 50 %: every "
        "request pays a fixed wake-up cost W that a saturated process does not (at capacity it never "
        "sleeps and one turn serves many requests), so its busy share at half capacity is 0.5 + W / 2C, "
        "with C its CPU per request at capacity. W is about 55-60 µs here for the engine and the raw-ASGI "
        "floor alike (the floor: 85-89 µs per request at 7,000 req/s against 31 at capacity), so a leaner "
        "engine (smaller C) is busier at its own half-capacity rate, not less. W is this VM's: holding the "
        "kernel's CPU latency QoS at 0 µs (idle vCPUs poll instead of halting: no halt exit, no "
        "cross-CPU interrupt) cut the floor to 48 µs per request and the engine to 74-81 % busy in the "
        "same process, but polling vCPUs made the host stall the busy one more often, and a full run's "
        "Redis p99 stayed at 3.9-4.7 ms (bench_latency.py --latency-qos). The tail is queueing behind "
        "stalls of the engine's core that are not the engine's: traced (sched_switch on CPU 0 against "
        "each request's latency), the stalls of 1.5-7 ms coincided with the sandbox agent's "
        "tokio-rt-worker (3.4-5.8 ms, about once a second) and the kernel's kdamond.0 (1-3.7 ms every "
        "512 ms) on that core, and at 90 % busy a 1 ms stall takes 10 ms to drain. With Redis the limiter "
        "adds no round trip per request (leases of 256 tokens, one script call per 128 decisions). What "
        "would close it: a core the engine does not share, on a host whose idle cores wake without a "
        "halt exit."
    ),
    "PostgreSQL store + audit": (
        "The PostgreSQL engine spends 5-25 µs more of its own CPU per quote than the in-memory one (the "
        "spread is this VM's run-to-run noise): the audit writer runs on the event loop (its write of a few "
        "hundred queued single quotes is one statement with one JSON parameter, a few µs per quote), "
        "plus the cached stores, and PostgreSQL's backends (~10-15 µs per "
        "quote) share the same two cores. What would close it: the writer in a process of its own (its "
        "work is off the request path but not off the core), or single quotes priced together per "
        "event-loop turn (one batch, one set of columns)."
    ),
    "msgspec floor": (
        "Traced step by step (process CPU at each step of one 10^6-row JSON batch): the worker decodes in "
        "about 0.43 s against the floor's untyped 0.22-0.30 s (the check for literals long enough to hide "
        "decimals reads the whole body once, 0.09 s; indexing 10^6 ticker texts, one dict operation per "
        "row, about 0.1 s), prices and encodes in about 0.5 s (the floor's encode alone is 0.5-0.65 s), "
        "and writes the 250 MB answer to tmpfs in 0.1 s; the main process spends about 0.05 s taking the "
        "body to tmpfs and 0.08 s sending the answer from it. Without the 1 MiB mmap threshold the worker "
        "had (every NumPy temporary a fresh mapping) the batch costs 15-20 % less worker CPU. What would "
        "close the rest: the answer streamed to the main process through a pipe as it is encoded (no "
        "250 MB file to allocate, write and read back), and the decimals check folded into the decode."
    ),
    "columnar msgpack batch: round trip": (
        "The floor is 0.13 s. Traced step by step, the worker decodes in 0.20-0.25 s of CPU (msgspec's "
        "own decode about 0.1 s; one dict operation per row to index the 10^6 ticker texts, about 0.08 "
        "s; lists of floats to arrays 0.03 s), prices and encodes in 0.07-0.08 s, and writes the priced "
        "columns and the answer (55 MB each) to tmpfs in about 0.02 s each; the main process streams the "
        "answer in 0.03-0.05 s, and each hand-off to the worker (nice 10) costs a wake-up. Pricing it "
        "inline would hold the event loop for over 100 ms, so that is no way out. What would close it: "
        "the answer streamed back through a pipe while it is encoded, and the ticker texts indexed "
        "without a Python string per row (msgspec gives no interning for values)."
    ),
    "during 10^6 batches": (
        "Every event-loop wake-up of the main process was timed during this benchmark (a probe thread "
        "scheduling a callback into the loop every few ms and sampling the loop thread's stack while it "
        "waited). The stalls over 10 ms it found were: the answer streamed from the worker's file in one "
        "turn (50-120 ms: the server's send does not yield while the socket keeps up), the price request "
        "written to a 64 KiB pipe from the loop (10-18 ms), the memory quote store freeing an evicted "
        "10^6-row batch (its mapped file's pages, 10-25 ms), the fallback-rows count over the mapped "
        "columns (10-16 ms), the body's chunks written to tmpfs many per turn (10-25 ms) and the first "
        "rates of 5,000 tickers (50-70 ms once per market-data change); each now runs off the loop or a "
        "piece per turn. Left over 10 ms: full collections of what the market data made after start-up "
        "(12-20 ms, about one every 10 s) and the loop waiting for a core when other processes share the "
        "two (no Python frame on the loop's stack then). What would close it: gc.freeze after each "
        "market-data load, and a core the loop does not share."
    ),
    "p99 added by the hop": (
        "The hop's own latency is under the target where nothing else competes: one request at a time "
        "the split adds about 0.44 ms at p50 and 0.55-0.6 ms at p99 (two more socket reads and writes and "
        "wake-ups, the credential, the relay). The half-capacity figure measures something else on this "
        "2-CPU machine: the split's three processes share all's one core (the generator has the other), "
        "and at half of its own capacity the split's core ran about 70 % busy where all's ran about 30 % "
        "(the previous report's measurement), because every request that wakes an idle process pays this "
        "VM's wake-up cost (about 55-60 µs of CPU: see the latency target's miss) and a split request "
        "wakes three processes where all's wakes one. Making the gateway or the service cheaper "
        "raises the split's capacity and so the rate it is measured at, not how busy its core is then. "
        "Moving the backends to the generator's core (run under SCHED_FIFO) read 3.8-4.1 ms in the previous "
        "report. What would "
        "close it: a core per process (as deployed: each pod has its own), which this machine does not "
        "have."
    ),
    "providers warm / files only": (
        "Rounds vary: in one run three of five rounds read 0.91-0.93 while the files-only engine stayed "
        "within 4 %; a second run of 7 rounds read 0.981 (REPORT's hand-written part). The throughput "
        "phase quotes three tickers, so the refresher's work is small; the slow rounds are not explained."
    ),
    "10^5-position batch": (
        "PostgreSQL-bound: the rows go by binary COPY into the narrow `quote_rows` table (migration 002), "
        "cut in two parts on two connections; what is left is the heap insert, one uuid B-tree and WAL. "
        "What would close it: more database cores (the parts scale with them)."
    ),
}


def miss_analysis(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    lines: list[str] = []
    shown: set[str] = set()
    for _section, target in rows:
        if target.get("verdict") != "MISS":
            continue
        for key, text in MISS_ANALYSIS.items():
            if key in str(target.get("name", "")):
                # The first key a target's name holds is its analysis (the dict is ordered for that).
                if key not in shown:
                    shown.add(key)
                    lines.append(f"- **{target['name']}**: {text}")
                break
    if not lines:
        return []
    return ["## Misses: where the time goes and what would close them", "", *lines, ""]


def verdict_counts(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, target in rows:
        key = str(target.get("verdict", "n/a")).split(" ", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- running -------------------------------------------------------------------------------------------


def run_pricing(json_path: Path, quick: bool) -> tuple[list[str], str | None]:
    """Run bench_pricing.py; (its command, an error message or None)."""
    if not PRICING_SCRIPT.exists():
        return [], f"{PRICING_SCRIPT.relative_to(ROOT)} is missing: the pricing-core benchmark was not run"
    command = [sys.executable, str(PRICING_SCRIPT), "--json", str(json_path)]
    if quick:
        help_text = subprocess.run(
            [sys.executable, str(PRICING_SCRIPT), "--help"], capture_output=True, text=True, check=False
        ).stdout
        if "--quick" in help_text:
            command.append("--quick")
        else:
            if "--sizes" in help_text:
                command += ["--sizes", "1000,10000,100000"]
            if "--repeat" in help_text:
                command += ["--repeat", "3"]
    print("$ " + display_command(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if completed.returncode != 0:
        return command, f"bench_pricing.py exited with status {completed.returncode}"
    if not json_path.exists():
        return command, "bench_pricing.py wrote no JSON"
    return command, None


def run_http(json_path: Path, quick: bool, extra: Sequence[str]) -> tuple[list[str], str | None]:
    command = [sys.executable, str(HTTP_SCRIPT), "--json", str(json_path)]
    if quick:
        command += ["--duration", "2s", "--warmup", "1s", "--rounds", "2"]
    command += list(extra)
    print("$ " + display_command(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if not json_path.exists():
        return command, f"bench_http.py exited with status {completed.returncode} and wrote no JSON"
    if completed.returncode != 0:
        return command, f"bench_http.py exited with status {completed.returncode} (see the notes below)"
    return command, None


def section_command(name: str, json_path: Path, quick: bool) -> list[str]:
    """The command of a section run by `run_script` (every section but pricing and http)."""
    command = [sys.executable, str(SCRIPTS[name])]
    if name in VARIANT_SECTIONS:
        command.append(name)
    command += ["--json", str(json_path)]
    if name == "latency":
        command += ["--quiet", "--plot", str(LATENCY_PLOT)]
    command += QUICK_ARGS.get(name, []) if quick else FULL_ARGS.get(name, [])
    return command


def run_script(name: str, command: list[str], json_path: Path) -> tuple[list[str], str | None]:
    script = SCRIPTS[name]
    if not script.exists():
        return [], f"{script.relative_to(ROOT)} is missing: the {name} benchmark was not run"
    print("$ " + display_command(command), flush=True)
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if not json_path.exists():
        return command, f"{script.name} exited with status {completed.returncode} and wrote no JSON"
    if completed.returncode != 0:
        return command, f"{script.name} exited with status {completed.returncode} (see the notes below)"
    return command, None


def display_command(command: Sequence[str]) -> str:
    """The command as someone would type it from the repository root."""
    shown = []
    for index, part in enumerate(command):
        if index == 0 and part == sys.executable:
            shown.append("python")
            continue
        path = Path(part)
        if path.is_absolute() and path.is_relative_to(ROOT):
            shown.append(str(path.relative_to(ROOT)))
        else:
            shown.append(part)
    return shlex.join(shown)


# ---- report --------------------------------------------------------------------------------------------


def machine_section(
    http: Mapping[str, Any] | None,
    pricing: Mapping[str, Any] | None,
    fallback: Mapping[str, Any] | None = None,
) -> list[str]:
    """Machine facts from the HTTP benchmark's JSON (else from another load benchmark's, `fallback`)."""
    lines = ["## Machine", ""]
    source = http if http is not None else fallback
    if source is not None and isinstance(source.get("machine"), Mapping) and "versions" in source["machine"]:
        facts = source["machine"]
        versions = ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if version)
        load = ", ".join(f"{value:.2f}" for value in facts["loadavg_at_start"])
        lines += [
            f"- CPU: {facts['cpu_model']}; nproc {facts['nproc']} ({facts['cpus_available']} available)",
            f"- Kernel {facts['kernel']}; load average when the {source.get('benchmark', 'HTTP')} benchmark "
            f"started: {load}; the "
            f"benchmark's CPUs were {format_value(facts.get('busy_before_start_percent'))} % busy with other "
            "work just before it started",
            f"- Python {facts['python']} ({facts['python_implementation']})",
            f"- Packages: {versions}",
            f"- Load generator: {facts['wrk']}; priority of the load generators: "
            f"{facts.get('generator_priority', 'normal')}",
        ]
        if facts.get("cpu_idle"):
            lines.append(f"- CPU idle: {facts['cpu_idle']}")
    if pricing is not None and isinstance(pricing.get("machine"), Mapping):
        facts_text = ", ".join(f"{key} {value}" for key, value in pricing["machine"].items())
        lines.append(f"- Pricing benchmark: {facts_text}")
    return [*lines, ""]


def pricing_section(
    pricing: Mapping[str, Any] | None, command: Sequence[str], error: str | None
) -> list[str]:
    lines = ["## Pricing core (bench_pricing.py)", ""]
    if error is not None:
        lines += [f"**Not available:** {error}.", ""]
    if pricing is None:
        return lines
    results = pricing.get("results")
    if isinstance(results, list) and results and all(isinstance(row, Mapping) for row in results):
        lines += [
            "Each row is one batch size; `*_over_*` columns are ratios measured in the same run "
            "(`decimal_over_core`: how many times longer the pure-Python Decimal loop takes than the exact "
            "NumPy core; `core_over_naive`: the cost of exactness over plain float64 NumPy).",
            "",
            *markdown_table(results),
            "",
        ]
        ratios = [
            (row.get("size"), key, value)
            for row in results
            for key, value in row.items()
            if ("_over_" in key or "ratio" in key or "speedup" in key) and isinstance(value, int | float)
        ]
        if ratios:
            lines += ["Ratios:", ""]
            lines += [
                f"- size {format_value(size)}: {key} = {ratio_text(value)}" for size, key, value in ratios
            ]
            lines.append("")
    else:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {name} | {format_value(value)} |" for name, value in flatten_numbers(pricing)]
        lines.append("")
    if command:
        lines += ["Command:", "", "```", display_command(command), "```", ""]
    return lines


def http_section(http: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    lines = ["## HTTP single quote (bench_http.py): engine vs FastAPI + pydantic + Decimal", ""]
    if error is not None:
        lines += [f"**Problem:** {error}.", ""]
    if http is None:
        return lines
    settings = http["settings"]
    lines += [
        "`POST /api/v1/calculate-locate`, one quote per request, X-API-Key authenticated, request bodies "
        f"rotating over {len(settings['request_bodies'])} quotes (both servers checked to return the same "
        "figures for each before measuring). Each server is one uvicorn worker (uvloop, httptools, access "
        f"log off) pinned to CPU {settings['server_cpu']}; wrk (1 thread) is pinned to CPU "
        f"{settings['wrk_cpu']}, at real-time priority where allowed (see Machine: PostgreSQL and Redis "
        "share its CPU, and must not delay it). Rounds are interleaved (engine, baseline, engine, "
        "baseline, ...), each "
        f"measured run of {settings['duration']} preceded by a {settings['warmup']} warm-up; figures are "
        f"medians over {settings['rounds']} rounds.",
        "",
        "**Valid run**: every measured response was 2xx, no socket errors."
        if http["valid"]
        else "**INVALID RUN**: some responses were not 2xx or there were socket errors; do not quote it.",
        "",
        "| load | server | req/s | p50 ms | p75 ms | p90 ms | p99 ms | server CPU | wrk CPU | server RSS MB "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio_lines = []
    labels = {
        "throughput": f"throughput (c={settings.get('connections', '?')})",
        "light": f"low concurrency (c={settings.get('light_connections', '?')})",
    }
    for load, stored in http["summary"]["loads"].items():
        block = {**stored, "label": labels.get(load, stored["label"])}
        for target in ("engine", "baseline", "raw", "backends"):
            s = block.get(target)
            if s is None:
                continue
            lat = s["latency_ms"]
            lines.append(
                f"| {block['label']} | {target} | {format_value(s['requests_per_sec'])} | "
                + " | ".join(format_value(lat[name]) for name in ("p50", "p75", "p90", "p99"))
                + f" | {format_value(s['server_cpu_percent'])} % | {format_value(s['wrk_cpu_percent'])} % "
                f"| {format_value(s.get('max_server_rss_mb'))} | {s['errors']} |"
            )
        cmp = block["engine_vs_baseline"]
        per_round = ", ".join(ratio_text(value) for value in block["per_round_ratio"])
        lat_ratio = cmp["latency_ratio"]
        ratio_lines.append(
            f"- {block['label']}: throughput engine/baseline **{ratio_text(cmp['throughput_ratio'])}** "
            f"(per round: {per_round}); latency engine/baseline p50 {ratio_text(lat_ratio['p50'])}, "
            f"p99 {ratio_text(lat_ratio['p99'])} (below 1 means the engine is faster)"
        )
        raw_cmp = block.get("engine_vs_raw")
        if raw_cmp:
            raw_rounds = ", ".join(ratio_text(v) for v in block.get("per_round_ratio_vs_raw", []))
            ratio_lines.append(
                f"- {block['label']}: throughput engine/raw-ASGI ceiling "
                f"**{ratio_text(raw_cmp['throughput_ratio'])}** "
                f"(per round: {raw_rounds}); the ceiling reads the body, checks the key, decodes the "
                "JSON and answers a fixed document (benchmarks/baseline_raw_asgi.py)"
            )
        backends_cmp = block.get("backends_vs_baseline")
        if backends_cmp:
            backends_rounds = ", ".join(ratio_text(v) for v in block.get("per_round_ratio_backends", []))
            ratio_lines.append(
                f"- {block['label']}: throughput backends/baseline "
                f"**{ratio_text(backends_cmp['throughput_ratio'])}** (per round: {backends_rounds}); "
                "`backends` is the engine in its production shape: PostgreSQL stores and audit trail, Redis "
                "rate limiter, shared rate cache and invalidation bus"
            )
    lines += ["", "Ratios (engine / baseline, same run):", "", *ratio_lines, ""]
    lines += [
        "CPU columns are percent of one core over the measured run (server from /proc/<pid>/stat, wrk from "
        "its own rusage); a wrk well below 100 % means the generator was not the bottleneck. Server RSS is "
        "the largest resident size seen after a run (the engine keeps every quote in its in-memory audit "
        "store, so its RSS grows over the benchmark).",
        "",
    ]
    if http.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in http["notes"]], ""]
    commands = [display_command(command)] if command else []
    commands += [
        f"# engine:   {settings.get('engine_command', '')}",
        f"# baseline: {settings.get('baseline_command', '')}",
        f"# raw:      {settings.get('raw_command', '')}",
    ]
    seen = set()
    for run in http["runs"]:
        if run["load"] not in seen:
            seen.add(run["load"])
            commands.append(
                f"# {run['load']}: BENCH_API_KEY=<key> BENCH_BODIES_FILE=<bodies.jsonl> {run['command']}"
            )
    lines += ["Commands:", "", "```", *commands, "```", ""]
    return lines


VARIANT_COLUMNS = (
    ("requests_per_sec", "req/s"),
    ("p50", "p50 ms"),
    ("p99", "p99 ms"),
    ("cpu_us_per_request", "server CPU µs/req"),
    ("server_cpu_percent", "server CPU"),
    ("wrk_cpu_percent", "wrk CPU"),
    ("rate", "paced target req/s"),
    ("delay_ms", "wait per connection ms"),
    ("redis_cpu_us_per_request", "Redis CPU µs/req"),
    ("pg_cpu_us_per_request", "PostgreSQL backends CPU µs/req"),
    ("local_decision_percent", "limiter decided locally %"),
    ("audit_queue_depth_after", "audit queue after run"),
    ("errors", "errors"),
)


def _cell(summary: Mapping[str, Any], key: str) -> str:
    if key in ("p50", "p99"):
        return format_value(summary["latency_ms"].get(key))
    value = summary.get(key)
    text = format_value(value)
    return (
        text + " %"
        if key.endswith("_percent") and key != "local_decision_percent" and value is not None
        else text
    )


def _commands_block(commands: Sequence[str]) -> list[str]:
    return ["Commands:", "", "```", *commands, "```", ""] if commands else []


def _problem_lines(error: str | None, title: str) -> list[str]:
    lines = [f"## {title}", ""]
    if error is not None:
        lines += [f"**Problem:** {error}.", ""]
    return lines


def variants_section(
    doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None, name: str
) -> list[str]:
    """An engine-vs-engine section (bench_variants.py): description, figures, pairs, targets, commands."""
    title = doc["title"] if doc is not None else name
    lines = _problem_lines(error, f"{title} (bench_variants.py {name})")
    if doc is None:
        return lines
    settings = doc["settings"]
    lines += [
        doc["description"],
        "",
        f"Each variant is one engine process (uvicorn, uvloop, httptools, one worker) pinned to CPU "
        f"{settings['server_cpu']}; wrk (1 thread, {settings['connections']} connections for every run) is "
        f"pinned to CPU {settings['wrk_cpu']}. {settings['rounds']} interleaved rounds (the variants' order "
        f"alternates), each measured run of {settings['duration']} preceded by a {settings['warmup']} "
        "warm-up; medians. "
        "Server CPU per request = the server's CPU seconds over the measured run (/proc/<pid>/stat) / the "
        "requests answered in it.",
        "",
        "**Valid run**: every measured response was 2xx, no socket errors."
        if doc["valid"]
        else "**INVALID RUN**: some responses were not 2xx or there were socket errors; do not quote it.",
        "",
    ]
    summaries = doc["summary"]
    present = [
        (key, label)
        for key, label in VARIANT_COLUMNS
        if any(
            key in ("p50", "p99") or s.get(key) is not None for by in summaries.values() for s in by.values()
        )
    ]
    lines += [
        "| load | variant | " + " | ".join(label for _, label in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    labels = {v["name"]: v["label"] for v in doc["variants"]}
    for load, by_variant in summaries.items():
        for variant, summary in by_variant.items():
            lines.append(
                f"| {load} | {variant} ({labels.get(variant, '')}) | "
                + " | ".join(_cell(summary, key) for key, _ in present)
                + " |"
            )
    lines += ["", "Same-run comparisons (variant with the feature against the one without):", ""]
    for pair in doc["pairs"]:
        for load, cmp in pair["loads"].items():
            per_round = ", ".join(ratio_text(value) for value in cmp["per_round_ratio"])
            per_round_cpu = ", ".join(signed(value) for value in cmp["per_round_cpu_us_diff"])
            lat = cmp["latency_ratio"]
            lines.append(
                f"- {pair['label']}, {load}: throughput {pair['variant']}/{pair['reference']} "
                f"**{ratio_text(cmp['throughput_ratio'])}** (per round: {per_round}); server CPU per request "
                f"**{signed(cmp['cpu_us_per_request_diff'], 'µs')}** (per round: {per_round_cpu}); latency "
                f"p50 {ratio_text(lat['p50'])}, p99 {ratio_text(lat['p99'])}"
            )
    lines.append("")
    rows = [(name, target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    extra = doc.get("extra") or {}
    if "postgres_quote_rows" in extra:
        lines += [
            f"Audit check: after the `postgres` engine stopped, its schema held "
            f"{extra['postgres_quote_rows']:,} quote rows for {extra['postgres_quotes_answered']:,} quotes "
            "answered to clients (warm-ups included; a few more rows than answers are requests in flight "
            "when wrk stopped).",
            "",
        ]
    if doc.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in doc["notes"]], ""]
    lines += _commands_block([*([display_command(command)] if command else []), *doc.get("commands", [])])
    return lines


def audit_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    lines = _problem_lines(error, "Audit write throughput (bench_audit.py)")
    if doc is None:
        return lines
    settings = doc["settings"]
    db = doc.get("database") or {}
    lines += [
        f"One priced batch of {settings['size']:,} positions ({settings['tickers']:,} distinct rates) "
        f"written to PostgreSQL {db.get('server_version', '?')} (synchronous_commit "
        f"{db.get('synchronous_commit', '?')}, fsync {db.get('fsync', '?')}, shared_buffers "
        f"{db.get('shared_buffers', '?')}) on throwaway schemas, into emptied tables, fresh quote ids each "
        f"time; {settings['repeat']} repetitions, the three methods rotating; medians. "
        "`store` = `PgQuoteStore.write([batch])` (migration 002's narrow tables: the batch and its rates "
        "once, the rows by binary COPY into `quote_rows`, in two parts over two connections); `audit` = "
        "`AuditTrail.add` + `close` (end to end through the background writer); `executemany` = the "
        "baseline, a plain 30-parameter INSERT through asyncpg's executemany in one transaction, of rows "
        "built in Python, into migration 001's wide `quotes` table (a schema of its own). The records "
        "stored (the view `quotes` against the 001 table) were compared after the first repetition: "
        + ("**equal**." if doc.get("digests_equal") else "**DIFFERENT** (the comparison is void)."),
        "",
        "| method | median ms | rows/s | per repetition rows/s | client CPU ms | database backends CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in doc["summary"].items():
        per_run = ", ".join(format_value(value) for value in s["per_run_rows_per_s"])
        db_cpu = None if s.get("db_cpu_s") is None else s["db_cpu_s"] * 1000
        lines.append(
            f"| {method} | {format_value(s['seconds'] * 1000)} | {format_value(s['rows_per_s'])} | "
            f"{per_run} | {format_value(s['client_cpu_s'] * 1000)} | {format_value(db_cpu)} |"
        )
    plain = doc["summary"].get("executemany", {})
    ratios = doc["ratios"]
    lines += [
        "",
        f"- `store` / `executemany`: **{ratio_text(ratios['store_over_executemany'])}** (against the "
        f"INSERT alone, rows built beforehand in {format_value((plain.get('build_s') or 0) * 1000)} ms: "
        f"{ratio_text(ratios['store_over_executemany_insert_only'])})",
        f"- `audit` / `executemany`: {ratio_text(ratios['audit_over_executemany'])}; `audit` / `store`: "
        f"{ratio_text(ratios['audit_over_store'])}; `AuditTrail.add` itself (what a request waits for) "
        f"returned in {format_value((doc['summary'].get('audit', {}).get('add_s') or 0) * 1000)} ms, the "
        "rest is `close` draining the queue to PostgreSQL",
        "",
    ]
    rows = [("audit", target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    notes = [*doc.get("notes", []), *(f"INVALID: {problem}" for problem in doc.get("problems", []))]
    if notes:
        lines += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    lines += _commands_block(
        [
            *([display_command(command)] if command else []),
            "# on schemas bench_<random> and bench_<random>_001 (migrated through 001_initial), "
            "dropped at the end",
            *doc.get("commands", [])[1:],
        ]
    )
    return lines


def _latency_row(name: str, label: str, summary: Mapping[str, Any]) -> str:
    lat = summary["latency_ms"]
    return (
        f"| {name} | {label} | {format_value(summary['throughput_rps'])} | "
        + " | ".join(format_value(lat[key]) for key in ("p50", "p90", "p99", "p99.9", "max"))
        + f" | {format_value(summary['service_ms']['p99'])} "
        f"| {format_value(summary['generator_cpu_percent'])} % "
        f"| {format_value(summary['server_cpu_percent'])} % | {summary['bottleneck']} |"
    )


def _open_rows(name: str, entry: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """The open-loop row of a variant or of the floor, and its run without the latency QoS if it had one."""
    label = f"open at {entry['offered_rps']:.0f}/s"
    rows = [_latency_row(name, label, summary)]
    if entry.get("untuned"):
        rows.append(_latency_row(name, f"{label}, no latency QoS", entry["untuned"]["summary"]))
    return rows


def _latency_qos_text(doc: Mapping[str, Any]) -> str:
    if not any(variant.get("latency_qos") for variant in doc["variants"].values()):
        return (
            "Idle CPUs halted between requests, as this machine is set up (`--latency-qos` holds the "
            "kernel's CPU latency QoS at 0 µs instead and adds one run without it: see bench_http's "
            "`cpu_latency_qos` for what it did here)."
        )
    return (
        "These runs hold the kernel's CPU latency QoS at 0 µs (/dev/cpu_dma_latency, as a host tuned for "
        "latency does: tuned's latency-performance profile): an idle CPU polls for work instead of "
        "halting. On this VM a request that finds the server's vCPU halted, and its answer the client's, "
        "pays a halt exit and a cross-CPU interrupt, and an open loop at half capacity pays them on "
        'nearly every request (at capacity the process never sleeps). The rows marked "no latency QoS" '
        "are one more run at the same rate with the CPUs halting as this machine is set up."
    )


def latency_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    lines = _problem_lines(error, "Latency at half capacity, open loop (bench_latency.py), and the profile")
    if doc is None:
        return lines
    lines += [
        "Each variant is one engine process pinned to CPU 0, driven by the project's C generator "
        "(benchmarks/loadgen/openloop.c through benchmarks/loadtest.py) pinned to CPU 1 (at real-time "
        "priority where allowed, see Machine): first a closed loop "
        "at 32 connections measures capacity, then an open loop offers half of it at a constant rate, "
        "in several runs (`--rounds`): the row is the run with the median p99, the target's note lists "
        "every run's p99. "
        "Open-loop latency runs from each request's scheduled send time, so a stall of the server shows in "
        "every request it delayed (no coordinated omission); service time runs from the actual "
        "send. " + _latency_qos_text(doc),
        "",
        "| variant | load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | service p99 ms "
        "| generator CPU | server CPU | bottleneck |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, variant in doc["variants"].items():
        lines.append(_latency_row(name, "capacity (closed, c=32)", variant["capacity"]["summary"]))
        lines += _open_rows(name, variant, variant["half"]["summary"])
    floor = doc.get("floor")
    if floor:
        lines += _open_rows("raw-ASGI floor", floor, floor["summary"])
        lines += [
            "",
            "The raw-ASGI floor is benchmarks/baseline_raw_asgi.py (no middleware, no pricing) offered the "
            "engine's half-capacity rate on the same CPUs: its tail is what this machine adds to any server "
            "(scheduler and timer wake-ups of the VM, loopback networking), not the engine's own.",
        ]
    lines.append("")
    if LATENCY_PLOT.exists():
        lines += [f"![latency by percentile at half capacity]({LATENCY_PLOT.name})", ""]
    rows = [("latency", target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    for name, variant in doc["variants"].items():
        profile = variant.get("profile")
        if not profile or not profile.get("self"):
            continue
        lines += [
            f"Where the time goes ({name}, py-spy at capacity, share of samples; uvicorn's `send` self "
            "time is mostly the socket write system call):",
            "",
            "| self % | function | | inclusive % | function |",
            "|---|---|---|---|---|",
        ]
        inclusive = [
            entry for entry in profile["inclusive"] if "pricer/" in entry[0] or "starlette" in entry[0]
        ]
        for index, (frame, share) in enumerate(profile["self"][:12]):
            other = inclusive[index] if index < len(inclusive) else ("", "")
            lines.append(f"| {share} | `{frame}` | | {other[1]} | `{other[0]}` |")
        lines.append("")
    lines += _commands_block([display_command(command)] if command else [])
    return lines


def _us(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.1f}"


def profile_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    """Where a single quote's microseconds go: layer | before | µs per quote | share (profile_single.py)."""
    lines = _problem_lines(error, "Where a single quote's microseconds go (profile_single.py)")
    if doc is None:
        return lines
    settings = doc["settings"]
    before = doc.get("before")
    lines += [
        "Server CPU per quote (CPU seconds / quotes, in an unprofiled run of the engine on embedded "
        f"defaults, one uvicorn worker pinned to CPU {settings['server_cpu']}, wrk at "
        f"{settings['connections']} connections on CPU {settings['wrk_cpu']}; median over "
        f"{settings['rounds']} round(s)), divided by the share of py-spy samples ({doc['samples']:,} at "
        f"{settings['py_spy_rate_hz']} Hz in the profiled runs of the same rounds) that fall in each layer. "
        "A layer is its own frames plus the library code they call (NumPy, msgspec, hmac, ...), minus "
        "the inner layers it hands over to; calls into C count for the calling line (so JSON encoding "
        "and the NumPy calls outside the core are matched by their source line). The layer map is the "
        "table LAYER_RULES in benchmarks/profile_single.py. ± is one standard error of the sampled share "
        "(sampling alone; the machine's run-to-run noise comes on top).",
        "",
        "**Valid run**."
        if doc.get("valid")
        else "**INVALID RUN**: errors in the measured runs or no samples; do not quote it.",
        "",
    ]
    if before is not None:
        lines += [
            f"The before column is benchmarks/profile-before.json (commit {before.get('git_commit') or '?'}, "
            f"{before.get('generated') or '?'}): {_us(before.get('cpu_us_per_quote'))} µs per quote then, "
            f"{_us(doc['cpu_us_per_quote'])} µs now. Both are absolute figures from different runs (the "
            "machine's load moves them); the shares are comparable."
            + (f" About the before run: {before['note']}" if before.get("note") else ""),
            "",
            "| layer | before µs per quote | µs per quote | share | change µs |",
            "|---|---|---|---|---|",
        ]
    else:
        lines += ["| layer | µs per quote | share |", "|---|---|---|"]
    for row in doc["layers"]:
        cells = [row["layer"]]
        if before is not None:
            cells.append(_us(row.get("before_us_per_quote")))
        error_us = row.get("sampling_error_us")
        cells += [
            _us(row["us_per_quote"]) + ("" if error_us is None else f" ± {error_us:.1f}"),
            f"{row['share_percent']:.1f} %",
        ]
        if before is not None:
            cells.append(signed(row.get("change_us")))
        lines.append("| " + " | ".join(cells) + " |")
    total = ["**total (server CPU per quote)**"]
    if before is not None:
        total.append(f"**{_us(before.get('cpu_us_per_quote'))}**")
    total += [f"**{_us(doc['cpu_us_per_quote'])}**", "100 %"]
    if before is not None and before.get("cpu_us_per_quote") is not None:
        total.append(signed(doc["cpu_us_per_quote"] - before["cpu_us_per_quote"]))
    elif before is not None:
        total.append("n/a")
    lines += ["| " + " | ".join(total) + " |", ""]
    hotspots = doc.get("hotspots") or []
    if hotspots:
        lines += [
            "Hottest functions (the deepest frame of pricer, uvicorn or starlette in each sample; the "
            "library code below it included):",
            "",
            "| µs per quote | share | function |",
            "|---|---|---|",
            *(
                f"| {_us(row['us_per_quote'])} | {row['share_percent']:.1f} % | `{row['function']}` |"
                for row in hotspots[:12]
            ),
            "",
        ]
    lines += _commands_block([display_command(command)] if command else [])
    return lines


def full_stack_lines(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """engine/baseline with PostgreSQL + Redis, derived from two sections of this run (see the note)."""
    http = (results.get("http") or {}).get("data")
    persistence = (results.get("persistence") or {}).get("data")
    if not isinstance(http, Mapping) or not isinstance(persistence, Mapping):
        return []
    block = http["summary"]["loads"].get("throughput")
    pairs = {pair["name"]: pair["loads"] for pair in persistence.get("pairs") or []}
    if block is None:
        return []
    lines = [
        "## Full stack with PostgreSQL and Redis against the baselines (derived)",
        "",
        "The HTTP section measures the engine on embedded defaults against FastAPI and the raw-ASGI ceiling; "
        "the persistence section measures, in its own run, PostgreSQL (+ Redis) against the embedded "
        "engine. Their product is the production-shaped engine against the baselines:",
        "",
    ]
    engine_vs_baseline = block["engine_vs_baseline"]["throughput_ratio"]
    engine_vs_raw = (block.get("engine_vs_raw") or {}).get("throughput_ratio")
    for name, label in (("postgres", "PostgreSQL + audit"), ("postgres_redis", "PostgreSQL + audit + Redis")):
        pair = (pairs.get(name) or {}).get("throughput") or {}
        factor = pair.get("throughput_ratio")
        if factor is None or engine_vs_baseline is None:
            continue
        raw_text = f", {ratio_text(factor * engine_vs_raw)} of the raw-ASGI ceiling" if engine_vs_raw else ""
        lines.append(
            f"- {label}: {ratio_text(factor)} of the embedded engine, so "
            f"**{ratio_text(factor * engine_vs_baseline)} the FastAPI baseline**{raw_text}"
        )
    lines.append("")
    return lines


def faults_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    """The "Faults" section: bench_faults.py renders its own table (one place for its arithmetic)."""
    lines = _problem_lines(error, "Faults (bench_faults.py)")
    if doc is None:
        return lines
    import bench_faults

    return (
        lines
        + bench_faults.render_markdown({**doc, "command": None})
        + _commands_block([display_command(command)] if command else [])
    )


def sources_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    """The "Live sources" section: bench_sources.py renders its own (one place for its arithmetic)."""
    lines = _problem_lines(error, "Live sources (bench_sources.py)")
    if doc is None:
        return lines
    import bench_sources

    return (
        lines
        + bench_sources.render_markdown({**doc, "command": None})
        + _commands_block([display_command(command)] if command else [])
    )


def roles_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    """The "Roles" section: the split deployment against ROLE=all (bench_roles.py renders its table)."""
    lines = _problem_lines(error, "Roles: gateway -> calculation and data services (bench_roles.py)")
    if doc is None:
        return lines
    lines += [
        "Three processes (gateway, calculation service, data service) against ROLE=all, same run, same "
        "database and Redis, single quotes; medians over alternating rounds. The gateway's CPU per request "
        "against all's is the split's throughput per gateway core as a share of all's. The capacity phase "
        "runs the three on one core. The hop's p99 target compares all's engine on one core with the split's "
        "three processes on that same core; the other latency row runs the calculation and data services "
        "on the second core, which the load generator also uses on this 2-core machine.",
        "",
        str(doc.get("table", "")),
        "",
    ]
    return lines + _commands_block([display_command(command)] if command else [])


def batch_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    lines = _problem_lines(error, "Batch round trip and memory under many clients (bench_batch.py)")
    if doc is None:
        return lines
    settings = doc["settings"]
    if doc.get("batch"):
        lines += [
            f"`POST /api/v1/calculate-locate/batch` with one {settings['positions']:,}-position batch over "
            "the demo tickers, one batch at a time (wrk -c1; the latency is one batch's whole round trip), "
            f"JSON and msgpack bodies interleaved over {settings['rounds']} rounds of "
            f"{settings['duration']}; engine pinned to CPU {settings['server_cpu']}, wrk to CPU "
            f"{settings['wrk_cpu']}. Both formats were first checked to price every position with the "
            "same figures (and no row error).",
            "",
            "| body | request bytes | batches | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/batch "
            "| errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in doc["batch"].items():
            lat = s["latency_ms"]
            lines.append(
                f"| {name} | {format_value(s['request_bytes'])} | {format_value(s['batches'])} | "
                f"{format_value(lat['p50'])} | {format_value(lat['p90'])} | {format_value(lat['p99'])} | "
                f"{format_value(s.get('latency_max_ms'))} | "
                f"{format_value(s.get('server_cpu_ms_per_batch'))} | {s['errors']} |"
            )
        lines.append("")
    rss = doc.get("rss")
    if rss:
        lines += [
            f"Memory: a fresh engine with ENABLE_AUTHENTICATION=false and RATE_LIMIT_PER_MINUTE=1 "
            f"RATE_LIMIT_BURST=1 got one quote request for each of {rss['clients']:,} distinct, unknown "
            "client ids (each request charges a rate-limit bucket of the client it names, kept 60 s, "
            f"before the client lookup answers 404 CLIENT_NOT_FOUND): answers {rss['statuses']} at "
            f"{format_value(rss.get('requests_per_sec'))} req/s, server CPU "
            f"{format_value(rss.get('server_cpu_us_per_request'))} µs/request.",
            "",
            "| RSS idle MB | RSS after MB | RSS 1 s later MB | peak (VmHWM) MB | growth MB |",
            "|---|---|---|---|---|",
            f"| {format_value(rss['rss_idle_mb'])} | {format_value(rss['rss_after_mb'])} | "
            f"{format_value(rss['rss_after_settle_mb'])} | {format_value(rss['rss_peak_mb'])} | "
            f"{format_value(rss['rss_growth_mb'])} |",
            "",
        ]
    rows = [("batch", target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    notes = [*doc.get("notes", []), *(f"INVALID: {problem}" for problem in doc.get("problems", []))]
    if notes:
        lines += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    lines += _commands_block([*([display_command(command)] if command else []), *doc.get("commands", [])])
    return lines


def mixed_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    """Single quotes during 10^6-position batches, inline vs the batch pool (bench_mixed.py)."""
    lines = _problem_lines(error, "Single quotes during 10^6-position batches (bench_mixed.py)")
    if doc is None:
        return lines
    settings = doc["settings"]
    lines += [
        f"Single quotes (POST) at {format_value(settings['rate'])}/s open loop (C generator) for "
        f"{format_value(settings['duration'])} s after a {format_value(settings['warmup'])} s warm-up, while "
        f"{settings['positions']:,}-position JSON batches arrive back to back on a connection of their own, "
        f"over the 2022 IBKR file ({settings['tickers']:,} tickers). The same run, one engine after the "
        "other: batches priced on the event loop (BATCH_WORKERS=0, before issue 14) and in the default batch "
        "pool. Server CPU: main process and batch workers over the run.",
        "",
        "| engine | singles | p50 ms | p99 ms | max ms | batches | batch round trip s (median) "
        "| server CPU s | peak RSS MB | peak tmpfs MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in doc["mixed"].items():
        latency, batches, peak = run["singles"]["latency_ms"], run["batches"] or {}, run["peak"]
        lines.append(
            f"| {name} | {run['singles']['completed']} | {format_value(latency['p50'])} | "
            f"{format_value(latency['p99'])} | {format_value(latency['max'])} | {batches.get('requests')} | "
            f"{format_value((batches.get('round_trip_s') or {}).get('median'))} | "
            f"{format_value(run['server_cpu_s'])} | {format_value(peak['rss_mb'])} | "
            f"{format_value(peak['scratch_mb'])} |"
        )
    lines.append("")
    inline, pool = doc["mixed"].get("inline"), doc["mixed"].get("pool")
    if inline and pool:
        ratio = {
            key: inline["singles"]["latency_ms"][key] / max(pool["singles"]["latency_ms"][key], 1e-9)
            for key in ("p99", "max")
        }
        lines += [
            f"Inline / pool: singles p99 {ratio_text(ratio['p99'])}, max {ratio_text(ratio['max'])}.",
            "",
        ]
    for name, run in doc["mixed"].items():
        profile = run.get("profile_main") or {}
        if profile.get("top"):
            top = "; ".join(f"{entry['frame']} {entry['share']:.0%}" for entry in profile["top"])
            lines += [
                f"py-spy of the {name} engine's main process during the batches: busy "
                f"{format_value(profile['busy_share'])} of the time; top frames: {top}.",
                "",
            ]
    memory = doc.get("memory")
    if memory:
        lines += [
            "Memory: a fresh engine (default pool) per form, one batch: peak RSS of the main process and its "
            "batch workers, peak of its tmpfs scratch files, and the peak of their sum.",
            "",
            "| form | request MB | response MB | round trip s | RSS idle MB | peak RSS MB | peak tmpfs MB "
            "| peak sum MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for form, m in memory.items():
            sizes = f"{format_value(m['request_bytes'] / 1e6)} | {format_value(m['response_bytes'] / 1e6)}"
            lines.append(
                f"| {form} | {sizes} | {format_value(m['round_trip_s'])} | "
                f"{format_value(m['rss_idle_mb'])} | {format_value(m['rss_mb'])} | "
                f"{format_value(m['scratch_mb'])} | {format_value(m['total_mb'])} |"
            )
        lines.append("")
    rows = [("mixed", target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    lines += _commands_block([display_command(command)] if command else [])
    return lines


def million_section(doc: Mapping[str, Any] | None, command: Sequence[str], error: str | None) -> list[str]:
    lines = _problem_lines(error, "10^6-position batches in four forms (bench_batch.py --million)")
    million = (doc or {}).get("million")
    if doc is None or not million:
        return lines
    import bench_million

    lines += bench_million.render_markdown(million)
    rows = [("million", target) for target in doc.get("targets", [])]
    if rows:
        lines += ["Targets:", "", *targets_table(rows), ""]
    problems = [f"INVALID: {problem}" for problem in doc.get("problems", [])]
    if problems:
        lines += ["Notes:", "", *[f"- {problem}" for problem in problems], ""]
    return lines + _commands_block(
        [*([display_command(command)] if command else []), *million.get("commands", [])]
    )


def collect_targets(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(section, target) of every section's JSON, in the standard order."""
    rows = []
    for name in SECTIONS:
        data = (results.get(name) or {}).get("data")
        if isinstance(data, Mapping):
            rows += [(name, target) for target in data.get("targets", [])]
            if name == "pricing":
                rows += [(name, target) for target in pricing_targets(data)]
    return rows


def pricing_targets(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 6: 10^6 positions priced exactly within 100 ms (validation, ticker de-duplication, rates
    and fees: the `core` column)."""
    for row in data.get("results") or []:
        if row.get("size") == 1_000_000 and row.get("core_ms") is not None:
            value = round(float(row["core_ms"]), 1)
            return [
                {
                    "name": "10^6 positions priced exactly (exact NumPy core)",
                    "value": value,
                    "limit": 100,
                    "op": "<=",
                    "unit": "ms",
                    "verdict": "PASS" if value <= 100 else "MISS",
                    "note": f"Decimal loop {row.get('decimal_over_core', 0):.0f}x slower",
                }
            ]
    return []


# Sections below this line in REPORT.md are written by hand (figures from scripts run.py does not run, or
# from an earlier commit); a regenerated report keeps them as they are.
KEPT_MARKER = "<!-- Hand-written sections below: run.py keeps them as they are. -->"


def kept_sections(path: Path) -> str:
    """The hand-written tail of the report at `path` (from KEPT_MARKER on), or ''."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    index = text.find(KEPT_MARKER)
    return "" if index < 0 else "\n" + text[index:].rstrip() + "\n"


def write_report(
    path: Path, *, quick: bool, results: Mapping[str, Mapping[str, Any]], rewritten: bool = False
) -> None:
    """`results`: section -> {"data": its JSON or None, "command": [...], "error": str | None, "seconds"}."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def part(name: str) -> tuple[Any, list[str], str | None]:
        result = results.get(name) or {}
        return result.get("data"), result.get("command") or [], result.get("error")

    timings = ", ".join(
        f"{name} {format_duration(result.get('seconds'))}"
        for name, result in results.items()
        if result.get("seconds")
    )
    lines = [
        "# Benchmark report",
        "",
        (
            f"Generated {now} from the JSON results (benchmarks/results/) of the last "
            f"`python benchmarks/run.py{' --quick' if quick else ''}` run (`--report-only`)."
            if rewritten
            else f"Generated {now} by `python benchmarks/run.py{' --quick' if quick else ''}` "
            "(`nox -s bench`)."
        )
        + (" **Quick smoke run: short durations, figures are indicative only.**" if quick else ""),
        "Every figure is compared with a baseline or a variant measured in the same run on the same machine; "
        "absolute numbers depend on the machine, the ratios and differences much less.",
        "",
    ]
    if timings:
        lines += [f"Wall time per section: {timings}.", ""]
    rows = collect_targets(results)
    if rows:
        counts = verdict_counts(rows)
        lines += [
            "## Targets",
            "",
            ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
            + ". Details in each section.",
            "",
            *targets_table(rows),
            "",
            *miss_analysis(rows),
        ]
    fallback = next(
        (
            results[name]["data"]
            for name in (*VARIANT_SECTIONS, "batch")
            if name in results and isinstance(results[name].get("data"), Mapping)
        ),
        None,
    )
    lines += machine_section(part("http")[0], part("pricing")[0], fallback)
    for name in SECTIONS:
        if name not in results:
            continue
        data, command, error = part(name)
        if name == "pricing":
            lines += pricing_section(data, command, error)
        elif name == "http":
            lines += http_section(data, command, error)
        elif name == "latency":
            lines += latency_section(data, command, error)
        elif name == "profile":
            lines += profile_section(data, command, error)
        elif name in VARIANT_SECTIONS:
            lines += variants_section(data, command, error, name)
        elif name == "audit":
            lines += audit_section(data, command, error)
        elif name == "faults":
            lines += faults_section(data, command, error)
        elif name == "million":
            lines += million_section(data, command, error)
        elif name == "sources":
            lines += sources_section(data, command, error)
        elif name == "roles":
            lines += roles_section(data, command, error)
        elif name == "mixed":
            lines += mixed_section(data, command, error)
        else:
            lines += batch_section(data, command, error)
        if name == "persistence":
            lines += full_stack_lines(results)
    path.write_text("\n".join(lines).rstrip() + "\n" + kept_sections(path))


def report_from_last_run(report: Path, results_dir: Path, *, quick: bool) -> int:
    """Rewrite the report from the JSON of the last run (its commands are the standard ones)."""
    results: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        json_path = results_dir / f"{name}.json"
        data = _read_json(json_path)
        if data is None:
            continue
        command = (
            [sys.executable, str(SCRIPTS[name]), "--json", str(json_path)]
            if name in ("pricing", "http")
            else section_command(name, json_path, quick=False)
        )
        results[name] = {"data": data, "command": command, "error": None}
    write_report(report, quick=quick, results=results, rewritten=True)
    print(f"Report rewritten from {results_dir} to {report} ({', '.join(results) or 'no results'})")
    return 0 if results else 1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks and write benchmarks/REPORT.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: short durations, fewer rounds")
    parser.add_argument("--only", help=f"comma-separated sections to run ({', '.join(SECTIONS)})")
    for name in SECTIONS:
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"do not run the {name} section")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON goes")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the JSON of the last run"
    )
    args, http_extra = parser.parse_known_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report_from_last_run(args.report, args.results_dir, quick=args.quick)
    try:
        chosen = selected_sections(args.only, [name for name in SECTIONS if getattr(args, f"skip_{name}")])
    except ValueError as error:
        parser.error(str(error))
    if http_extra and "http" not in chosen:
        parser.error(f"unrecognized arguments: {' '.join(http_extra)}")

    results: dict[str, dict[str, Any]] = {}
    failed = False
    for name in chosen:
        json_path = args.results_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)
        started = time.monotonic()
        if name == "pricing":
            command, error = run_pricing(json_path, args.quick)
        elif name == "http":
            command, error = run_http(json_path, args.quick, http_extra)
        else:
            command, error = run_script(name, section_command(name, json_path, args.quick), json_path)
        seconds = time.monotonic() - started
        if error:
            failed = True
            print(f"run.py: {error}", file=sys.stderr)
        print(f"run.py: {name} took {format_duration(seconds)}", flush=True)
        results[name] = {
            "data": _read_json(json_path),
            "command": command,
            "error": error,
            "seconds": seconds,
        }

    write_report(args.report, quick=args.quick, results=results)
    print(f"Report written to {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
