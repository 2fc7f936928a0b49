"""Batch round trip over HTTP and the engine's memory under many clients.

    python benchmarks/bench_batch.py [--positions 10000] [--clients 100000] [--json out.json]
    python benchmarks/bench_batch.py --million 1000000 --skip-batch --skip-rss   # 10^6 batches only

1. Batch round trip: `POST /api/v1/calculate-locate/batch` with one 10^4-position batch, as a JSON body and
   as a msgpack body (the response comes in the same format), sent by wrk over one connection (`-c1`: one
   batch at a time, so the latency is the round trip of one batch: upload, decode, pricing, audit store,
   encoding, download). wrk is pinned to CPU 1, the engine (in-memory default, authenticated) to CPU 0;
   JSON and msgpack runs are interleaved, medians over the rounds. Before measuring, both bodies are sent
   once: every position must be priced without error, and both formats must give the same figures.
2. Memory under many clients: a fresh engine with ENABLE_AUTHENTICATION=false (a request acts as the
   client it names) and RATE_LIMIT_PER_MINUTE=1 RATE_LIMIT_BURST=1 (a charged bucket stays in memory for
   the 60 s it takes to refill, the worst case), sent one single quote for each of `--clients` distinct
   client ids that do not exist. The rate limiter charges the named client before the client is looked
   up (`Admission.act_for`), so each request leaves one rate-limit bucket; the answer is 404
   CLIENT_NOT_FOUND (every answer is checked). RSS (VmRSS from /proc) idle, after start-up, and after.
   The load comes from an asyncio HTTP/1.1 client in this process (32 connections, pinned to CPU 1), which
   sends exactly one request per client id.
3. With `--million N`: N-position batches in the four forms (row and columnar, JSON and msgpack) with the
   real 2022 IBKR file loaded: round trip, server CPU and peak RSS beside msgspec's own decode + encode of
   the same bodies (bench_million.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

import bench_http
from bench_http import (
    GENERATOR_BUSY_PERCENT,
    ROOT,
    Driver,
    Run,
    Server,
    cpu_percent,
    format_number,
    machine_facts,
    median_or_none,
    parse_cpu_list,
    start_engine,
    summarize_runs,
)
from bench_million import MILLION_ENV, run_million
from bench_variants import COMMON_ENV, Variant, engine_command, make_target, round_order

BATCH_PATH = "/api/v1/calculate-locate/batch"
FORMATS = {"json": "application/json", "msgpack": "application/msgpack"}
# The demo data's tickers (src/pricer/demo/availability.txt), XYZQ priced at the fallback rate.
DEMO_TICKERS = ("AAPL", "MSFT", "NVDA", "TSLA", "GME", "AMC", "SPCE", "BYND", "BRK B", "XYZQ")
LATENCY_TARGET_MS = 25.0
RSS_TARGET_MB = 150.0
TARGET_POSITIONS = 10_000
TARGET_CLIENTS = 100_000
BATCH_ENV = {"POSITIONS_LIMIT_PER_MINUTE": "1000000000", **COMMON_ENV}
RSS_ENV = {
    "ENABLE_AUTHENTICATION": "false",
    "RATE_LIMIT_PER_MINUTE": "1",
    "RATE_LIMIT_BURST": "1",
    **COMMON_ENV,
}

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


def batch_body(positions: int, seed: int = 0, client_id: str = bench_http.CLIENT_ID) -> dict[str, Any]:
    """A batch request of `positions` rows over the demo tickers, whole and odd cents, 1 to 365 days."""
    import random

    rng = random.Random(seed)
    rows = []
    for index in range(positions):
        cents = rng.randrange(1, 10**11) if index % 3 else rng.randrange(1, 10**7) * 100
        rows.append(
            {
                "ticker": DEMO_TICKERS[index % len(DEMO_TICKERS)],
                "position_value": cents / 100,
                "loan_days": rng.randrange(1, 366),
            }
        )
    return {"client_id": client_id, "positions": rows}


def client_ids(count: int, prefix: str) -> Iterator[str]:
    """`count` distinct client ids (3 to 50 of [A-Za-z0-9_-])."""
    for index in range(count):
        yield f"{prefix}{index:07d}"


def quote_request(client_id: str, path: str = bench_http.QUOTE_PATH) -> bytes:
    body = json.dumps(
        {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": client_id},
        separators=(",", ":"),
    ).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def parse_response_head(head: bytes) -> tuple[int, int | None, bool]:
    """(status, content length or None, whether the body is chunked) from an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
    return status, length, chunked


async def read_body(reader: asyncio.StreamReader, length: int | None, chunked: bool) -> bytes:
    if not chunked:
        return await reader.readexactly(length or 0)
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the empty line
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


def same_batch_figures(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Differences between two batch responses' figures (ids and clocks aside)."""
    problems = []
    for name in ("client_id", "count", "priced", "fee_schedule", "errors"):
        if a.get(name) != b.get(name):
            problems.append(f"{name}: {a.get(name)!r} != {b.get(name)!r}")
    fields = ("index", "ticker", "position_value", "loan_days", "total_fee", "breakdown", "borrow_rate_used")
    quotes_a, quotes_b = a.get("quotes") or [], b.get("quotes") or []
    if len(quotes_a) != len(quotes_b):
        problems.append(f"quotes: {len(quotes_a)} != {len(quotes_b)}")
    for qa, qb in zip(quotes_a, quotes_b, strict=False):
        differing = [name for name in fields if qa.get(name) != qb.get(name)]
        if differing:
            problems.append(f"quote {qa.get('index')}: {', '.join(differing)} differ")
            break
    return problems


def rss_mb(status_text: str, field: str = "VmRSS") -> float | None:
    """A /proc/<pid>/status size field in MB."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


# ---- batch round trip ----------------------------------------------------------------------------------


def post(server: Server, body: bytes, media: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        server.url + BATCH_PATH,
        data=body,
        method="POST",
        headers={"Content-Type": media, "X-API-Key": server.key},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    return status, (msgspec.msgpack.decode(raw) if media == FORMATS["msgpack"] else json.loads(raw))


def check_batch(server: Server, bodies: Mapping[str, bytes], positions: int) -> list[str]:
    answers = {}
    problems = []
    for name, body in bodies.items():
        status, answer = post(server, body, FORMATS[name])
        if status != 200:
            problems.append(f"{name}: status {status}: {answer!r:.300}")
            continue
        if answer.get("priced") != positions or answer.get("errors"):
            problems.append(
                f"{name}: priced {answer.get('priced')} of {positions}, errors {answer.get('errors')!r:.300}"
            )
        answers[name] = answer
    if len(answers) == 2:
        problems += [f"json vs msgpack: {p}" for p in same_batch_figures(answers["json"], answers["msgpack"])]
    return problems


# ---- memory under many clients -------------------------------------------------------------------------


async def distinct_client_load(port: int, count: int, prefix: str, connections: int) -> dict[str, Any]:
    """One quote request per distinct client id over `connections` keep-alive connections."""
    ids = client_ids(count, prefix)
    statuses: dict[int, int] = {}
    not_client_not_found = 0

    async def worker() -> None:
        nonlocal not_client_not_found
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for client_id in ids:
                writer.write(quote_request(client_id))
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, chunked = parse_response_head(head)
                body = await read_body(reader, length, chunked)
                statuses[status] = statuses.get(status, 0) + 1
                if b"CLIENT_NOT_FOUND" not in body:
                    not_client_not_found += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    wall = time.monotonic() - started
    return {
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "not_client_not_found": not_client_not_found,
        "wall_s": wall,
        "requests_per_sec": sum(statuses.values()) / wall if wall > 0 else None,
    }


def proc_status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


def measure_rss(
    workdir: Path, server_cpu: str | None, wrk_cpu: str | None, clients: int, connections: int, settle: float
) -> dict[str, Any]:
    server = start_engine(workdir, server_cpu, RSS_ENV, name="rss")
    try:
        time.sleep(settle)
        pid = server.process.pid
        idle = rss_mb(proc_status(pid))
        cpu_before = server.cpu_seconds()
        affinity = os.sched_getaffinity(0)
        if wrk_cpu is not None:
            os.sched_setaffinity(0, set(parse_cpu_list(wrk_cpu)))
        try:
            port = int(server.url.rsplit(":", 1)[1])
            load = asyncio.run(
                distinct_client_load(port, clients, f"rss{secrets.token_hex(3)}_", connections)
            )
        finally:
            os.sched_setaffinity(0, affinity)
        cpu_used = server.cpu_seconds() - cpu_before
        status = proc_status(pid)
        after = rss_mb(status)
        time.sleep(settle)
        later = rss_mb(proc_status(pid))
        return {
            "clients": clients,
            "connections": connections,
            "rss_idle_mb": idle,
            "rss_after_mb": after,
            "rss_after_settle_mb": later,
            "rss_peak_mb": rss_mb(status, "VmHWM"),
            "rss_growth_mb": None if idle is None or after is None else after - idle,
            "server_cpu_us_per_request": bench_http.cpu_us_per_request(cpu_used, load["requests"]),
            **load,
        }
    finally:
        server.stop()


def measure_million(
    workdir: Path,
    server_cpu: str | None,
    client_cpu: str | None,
    positions: int,
    rounds: int,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    """bench_million's section, a fresh engine per format (the client in this process, pinned)."""
    env = {**BATCH_ENV, **MILLION_ENV}

    def start(name: str) -> tuple[Server, str]:
        label = "million-" + name.replace(" ", "-").lower()
        server = start_engine(workdir, server_cpu, env, name=label)
        return server, bench_http.read_env_file(workdir / f"{label}-demo-keys.env")["DEMO_ADMIN_KEY"]

    affinity = os.sched_getaffinity(0)
    try:
        if client_cpu is not None:
            os.sched_setaffinity(0, set(parse_cpu_list(client_cpu)))
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        result = run_million(
            start, positions, rounds, py_spy=py_spy if profile_path else None, profile_path=profile_path
        )
    finally:
        os.sched_setaffinity(0, affinity)
    result["commands"] = [
        "# large-batch engine (one per format): "
        + engine_command(Variant("million", "", env), server_cpu, {"DEMO_KEYS_FILE": "<tmp>/million.env"})
    ]
    return result


# ---- main ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--positions", type=int, default=TARGET_POSITIONS, help="positions per batch (10000)")
    parser.add_argument("--duration", default="5s", help="measured run length per format and round (5s)")
    parser.add_argument("--warmup", default="1s", help="warm-up run before each measured run (1s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians taken (3)")
    parser.add_argument(
        "--clients", type=int, default=TARGET_CLIENTS, help="distinct client ids for the RSS test (100000)"
    )
    parser.add_argument(
        "--client-connections", type=int, default=32, help="connections for the RSS load (32)"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before reading the RSS (1)")
    parser.add_argument("--skip-rss", action="store_true", help="only the batch round trip")
    parser.add_argument("--skip-batch", action="store_true", help="only the RSS test")
    parser.add_argument(
        "--million",
        type=int,
        default=0,
        help="also the large-batch section (bench_million.py) at this many positions (0: not run)",
    )
    parser.add_argument("--million-rounds", type=int, default=2, help="requests per format there (2)")
    parser.add_argument(
        "--million-profile",
        type=Path,
        help="py-spy the row-JSON requests of the large-batch section into this raw profile",
    )
    parser.add_argument("--server-cpu", default="0", help="CPU list for the engine (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="CPU list for wrk and the client (taskset -c)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def describe(run: Run) -> str:
    cpu_ms = (run.server_cpu_s / run.result.total_requests * 1000) if run.result.total_requests else 0
    return (
        f"round {run.round} {run.target:<8} {run.result.total_requests:>4} batches  "
        f"p50 {run.result.latency_ms.get(50, 0):.1f} ms  p90 {run.result.latency_ms.get(90, 0):.1f} ms  "
        f"p99 {run.result.latency_ms.get(99, 0):.1f} ms  server CPU {cpu_ms:.1f} ms/batch "
        f"({cpu_percent(run.server_cpu_s, run.wall_s) or 0:.0f}%)  wrk CPU "
        f"{cpu_percent(run.wrk_cpu_s, run.wall_s) or 0:.0f}%  "
        f"RSS {format_number(run.server_rss_mb, '.0f')} MB  "
        f"errors {run.result.errors}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wrk = bench_http.shutil.which("wrk")
    if wrk is None and not args.skip_batch:
        print("bench_batch: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    server_cpu = None if args.no_pin else args.server_cpu
    wrk_cpu = None if args.no_pin else args.wrk_cpu
    notes: list[str] = []
    facts = machine_facts(wrk)
    bench_http.note_busy_cpus(facts, server_cpu, wrk_cpu, notes, seconds=1.0)
    print("\n".join(bench_http._facts_lines(facts)), flush=True)

    runs: list[Run] = []
    problems: list[str] = []
    batch_summary: dict[str, Any] = {}
    rss: dict[str, Any] | None = None
    million: dict[str, Any] | None = None
    body_sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        workdir = Path(tmp)
        if not args.skip_batch:
            assert wrk is not None
            request = batch_body(args.positions)
            bodies = {
                "json": json.dumps(request, separators=(",", ":")).encode(),
                "msgpack": msgspec.msgpack.encode(request),
            }
            files = {}
            for name, body in bodies.items():
                files[name] = workdir / f"batch.{name}"
                files[name].write_bytes(body)
                body_sizes[name] = len(body)
            server = start_engine(workdir, server_cpu, BATCH_ENV, name="batch")
            try:
                problems += check_batch(server, bodies, args.positions)
                if problems:
                    print("bench_batch: the batch answers are not right:\n  " + "\n  ".join(problems))
                    return 1
                print(f"Both formats priced all {args.positions:,} positions with the same figures.")
                driver = Driver(
                    wrk,
                    wrk_cpu,
                    workdir / "unused.jsonl",
                    paced_wrk=None,
                    server_cpu=server_cpu,
                    path=BATCH_PATH,
                )
                for round_number in range(1, args.rounds + 1):
                    for name in round_order(list(FORMATS), round_number):
                        extra_env = {"BENCH_BODY_FILE": str(files[name]), "BENCH_CONTENT_TYPE": FORMATS[name]}
                        warmup = driver.run(
                            server,
                            target=name,
                            load="warmup",
                            round_number=round_number,
                            connections=1,
                            duration=args.warmup,
                            extra_env=extra_env,
                        )
                        if warmup.result.errors:
                            problems.append(f"warm-up {name}: {warmup.result.errors} errors")
                        run = driver.run(
                            server,
                            target=name,
                            load="batch",
                            round_number=round_number,
                            connections=1,
                            duration=args.duration,
                            extra_env=extra_env,
                        )
                        runs.append(run)
                        print(describe(run), flush=True)
            finally:
                server.stop()
            for name in FORMATS:
                chosen = [r.as_dict() for r in runs if r.target == name]
                summary = summarize_runs(chosen)
                summary["server_cpu_ms_per_batch"] = median_or_none(
                    (r["cpu_us_per_request"] or 0) / 1000 for r in chosen
                )
                summary["latency_max_ms"] = max((r["latency_max_ms"] or 0 for r in chosen), default=None)
                summary["batches"] = sum(r["total_requests"] for r in chosen)
                summary["request_bytes"] = body_sizes[name]
                summary["per_round_p50_ms"] = [r["latency_ms"]["p50"] for r in chosen]
                batch_summary[name] = summary
        if args.million:
            million = measure_million(
                workdir, server_cpu, wrk_cpu, args.million, args.million_rounds, args.million_profile
            )
            problems += million["problems"]
        if not args.skip_rss:
            print(f"RSS test: {args.clients:,} distinct client ids ...", flush=True)
            rss = measure_rss(
                workdir, server_cpu, wrk_cpu, args.clients, args.client_connections, args.settle
            )
            mb = {name: format_number(rss[name], ".1f") for name in rss if name.startswith("rss_")}
            print(
                f"RSS idle {mb['rss_idle_mb']} MB; after {rss['requests']:,} requests "
                f"({rss['requests_per_sec'] or 0:,.0f}/s, statuses {rss['statuses']}): "
                f"{mb['rss_after_mb']} MB "
                f"(peak {mb['rss_peak_mb']} MB, {args.settle:g} s later {mb['rss_after_settle_mb']} MB)",
                flush=True,
            )
            if rss["requests"] != args.clients or rss["statuses"] != {"404": args.clients}:
                problems.append(f"RSS test: expected {args.clients} answers 404, got {rss['statuses']}")
            if rss["not_client_not_found"]:
                problems.append(f"RSS test: {rss['not_client_not_found']} answers were not CLIENT_NOT_FOUND")

    invalid = [r for r in runs if not r.result.valid]
    problems += [f"{r.target} round {r.round}: {r.result.errors} errors" for r in invalid]
    valid = not problems
    if any((cpu_percent(r.wrk_cpu_s, r.wall_s) or 0) > GENERATOR_BUSY_PERCENT for r in runs):
        notes.append("wrk used more than 90 % of its CPU in some runs: the generator may have limited them.")

    targets = []
    for name in batch_summary:
        condition = "" if args.positions == TARGET_POSITIONS else f"measured at {args.positions:,} positions"
        target = make_target(
            f"{args.positions:,}-position batch, {name} body: median round trip",
            batch_summary[name]["latency_ms"]["p50"],
            LATENCY_TARGET_MS,
            "<=",
            "ms",
            valid=valid,
            note=condition,
        )
        if condition:
            target["verdict"] = f"n/a (other size: {target['verdict']})"
        targets.append(target)
    if rss is not None:
        condition = (
            "" if args.clients >= TARGET_CLIENTS else f"after {args.clients:,} client ids, not 100,000"
        )
        target = make_target(
            f"engine RSS after {args.clients:,} distinct client ids",
            rss["rss_after_mb"],
            RSS_TARGET_MB,
            "<=",
            "MB",
            valid=valid,
            note=f"idle {format_number(rss['rss_idle_mb'], '.1f')} MB"
            + (f"; {condition}" if condition else ""),
        )
        if condition:
            target["verdict"] = f"n/a (other size: {target['verdict']})"
        targets.append(target)

    if million is not None:
        targets += million["targets"]

    print()
    for name, s in batch_summary.items():
        lat = {name: format_number(value, ".1f") for name, value in s["latency_ms"].items()}
        print(
            f"{name:<8} {s['batches']:>4} batches of {args.positions:,} ({s['request_bytes'] / 1e6:.2f} MB "
            f"body): p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, server CPU "
            f"{format_number(s['server_cpu_ms_per_batch'], '.1f')} ms/batch"
        )
    for target in targets:
        print(
            f"Target: {target['name']} = {format_number(target['value'], '.1f')} {target['unit']} "
            f"(target {target['op']} {target['limit']:g} {target['unit']}): {target['verdict']}"
        )
    for note in notes:
        print(f"Note: {note}")
    for problem in problems:
        print(f"INVALID: {problem}")

    commands = []
    if runs:
        commands.append(
            "# batch engine: "
            + engine_command(
                Variant("batch", "", BATCH_ENV), server_cpu, {"DEMO_KEYS_FILE": "<tmp>/batch.env"}
            )
        )
    seen = set()
    for run in runs:
        if run.target not in seen:
            seen.add(run.target)
            commands.append(
                f"# {run.target}: BENCH_API_KEY=<key> BENCH_BODY_FILE=<batch.{run.target}> "
                f"BENCH_CONTENT_TYPE={FORMATS[run.target]} BENCH_PATH={BATCH_PATH} {run.command}"
            )
    if rss is not None:
        commands.append(
            "# RSS engine: "
            + engine_command(Variant("rss", "", RSS_ENV), server_cpu, {"DEMO_KEYS_FILE": "<tmp>/rss.env"})
            + f"  # then {args.clients:,} x POST {bench_http.QUOTE_PATH} naming distinct unknown client ids"
        )
    document = {
        "benchmark": "batch",
        "valid": valid,
        "machine": facts,
        "settings": {
            "positions": args.positions,
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "clients": args.clients,
            "client_connections": args.client_connections,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
            "lua_script": str(bench_http.LUA_SCRIPT.relative_to(ROOT)),
        },
        "batch": batch_summary,
        "rss": rss,
        "million": million,
        "targets": targets,
        "runs": [r.as_dict() for r in runs],
        "problems": problems,
        "notes": notes,
        "commands": commands,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
