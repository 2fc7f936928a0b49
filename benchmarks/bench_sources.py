"""Live sources (issue 20, DESIGN §3.1): what pulling the lender, volatility and event providers costs.

    python benchmarks/bench_sources.py --json benchmarks/results/sources.json
    python benchmarks/bench_sources.py --quick          # shorter runs, fewer samples (~4 min; full ~8)

The providers are the simulator (`pricer simulate-sources`, on the wrk CPU), serving the newest IBKR file's
FEERATE, the VIX history's last close and the earnings calendar. Two engines (`python -m pricer serve`, one
worker each, both pinned to the server CPU) get the same three files through the admin endpoints: `files`
prices from them alone; `providers` also has LENDER/VOLATILITY/EVENT_API_URL (+ keys) pointing at the
simulator, with every refresh period at --refresh seconds so that its refresher works during the measured
runs. Since the lender serves the same file's rates, both must quote the same figures (checked first).

1. Throughput, warm: wrk (-c --connections) on each engine in interleaved rounds; median req/s and server CPU
   per quote; goal providers >= 95 % of files-only, judged on quotes per server-CPU second (the wall req/s
   ratio is shown beside it: on a shared 2-core machine it moves with whatever else runs on the CPU).
2. Cold tickers: quotes, one after the other, of tickers neither engine has quoted (lender rates in the
   file), on `files` (baseline), on `providers` healthy and on `providers` with the lender hanging (the first
   cold fetches wait SOURCE_COLD_FETCH_MS, until their failures open the lender's breaker); goal p99 <=
   SOURCE_COLD_FETCH_MS + 20 ms. Run before 3, whose hangs leave the breakers open.
3. Warm p99 while the providers hang: paced load (--light-connections, each connection waiting so that the
   rate is a quarter of the files engine's throughput), --hang-rounds rounds of: `providers` healthy,
   `providers` with all three providers hanging (calls held until the engine's deadline; once the breakers
   open, their half-open probes hang), and `files` (the run's noise floor); goal median p99 hanging within
   1 ms of the median p99 healthy.
4. Refresher CPU: a third engine with the default refresh periods and --hot-tickers tickers quoted (in
   batches), left idle for --refresher-window seconds once its refresher has been round once; its CPU minus
   the idle `files` engine's over the same window, per core, scaled to 10,000 lender calls a minute (the
   calls counted by the simulator); goal <= 5 % of one core.

Every engine's quotes are first checked to answer 200; an engine that never prices from the lender (a
branch without provider support) is reported, and its targets are n/a.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bench_http
from bench_http import (
    DEFAULT_BODIES,
    QUOTE_PATH,
    ROOT,
    Driver,
    Server,
    machine_facts,
    make_target,
    median_or_none,
    pinned,
    ratio,
    read_env_file,
    start_engine,
)

SHARED_DATA = ROOT.parent / "shared" / "data"
IBKR_FILE = "ibkr_usa_2022-08-06.txt"  # the newest #BOF of shared/data: the file the simulator serves
LOADS = (
    ("/api/v1/admin/availability", IBKR_FILE),
    ("/api/v1/admin/vix-history", "VIX_History.csv"),
    ("/api/v1/admin/earnings-calendar", "alphavantage_earnings_calendar_2024-06-21.csv"),
)
COLD_FETCH_MS = 200.0  # SOURCE_COLD_FETCH_MS's default, set explicitly on the engines
HOT_TICKERS_TARGET_PER_MINUTE = 10_000
BATCH_POSITIONS = 1000
SOURCE_SETTINGS = (
    *(f"{provider}_API_{part}" for provider in ("LENDER", "VOLATILITY", "EVENT") for part in ("URL", "KEY")),
    *(f"{provider}_REFRESH_SECONDS" for provider in ("LENDER", "VOLATILITY", "EVENT")),
    "SOURCE_TIMEOUT_SECONDS",
    "SOURCE_MAX_AGE_SECONDS",
    "SOURCE_COLD_FETCH_MS",
    "SOURCE_MAX_CONCURRENCY",
)
# bench_http's bodies, less XYZQ: the demo's fallback ticker has no row in the loaded IBKR file (404 here).
BODIES = tuple(body for body in DEFAULT_BODIES if body["ticker"] != "XYZQ")
NO_PROVIDERS_TEXT = (
    "**The engine never priced from the lender: it has no provider support, so the provider figures "
    "measure nothing.** "
)


# ---- the simulator and the engines ---------------------------------------------------------------------


class Simulator:
    def __init__(self, workdir: Path, cpu: str | None, key: str) -> None:
        self.log_path = workdir / "simulator.log"
        self.process = subprocess.Popen(
            pinned(cpu, [sys.executable, "-m", "pricer", "simulate-sources", "--port", "0"]),
            env={**os.environ, "SIMULATOR_API_KEY": key},
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("simulator listening on "):
            self.process.kill()
            raise RuntimeError(f"the simulator did not start: {line!r} {self.log_path.read_text()}")
        self.url = line.rsplit(" ", 1)[1]

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return bench_http.parse_proc_stat_cpu(stat, os.sysconf("SC_CLK_TCK"))

    def call(self, method: str, path: str, body: object = None) -> Any:
        status, answer = request_json(self.url, method, path, body)
        if status != 200:
            raise RuntimeError(f"simulator {method} {path}: {status} {answer}")
        return answer

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def request_json(
    base_url: str, method: str, path: str, body: object = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    target = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
    try:
        payload = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
        connection.request(
            method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


def load_files(server: Server, admin_key: str) -> None:
    for path, name in LOADS:
        status, answer = request_json(
            server.url,
            "POST",
            path,
            (SHARED_DATA / name).read_bytes(),
            {"X-API-Key": admin_key, "Content-Type": "text/plain"},
        )
        if status >= 300:
            raise RuntimeError(f"{server.name}: loading {name} answered {status} {answer}")


def engine(workdir: Path, cpu: str | None, name: str, env: Mapping[str, str]) -> Server:
    server = start_engine(
        workdir,
        cpu,
        {"SHUTDOWN_DRAIN_SECONDS": "0", "SOURCE_COLD_FETCH_MS": str(COLD_FETCH_MS), **env},
        name=name,
    )
    try:
        load_files(server, read_env_file(workdir / f"{name}-demo-keys.env")["DEMO_ADMIN_KEY"])
    except BaseException:
        server.stop()
        raise
    return server


def provider_env(simulator: Simulator, key: str, refresh: float | None) -> dict[str, str]:
    env = {
        "LENDER_API_URL": simulator.url,
        "VOLATILITY_API_URL": simulator.url,
        "EVENT_API_URL": simulator.url,
        "LENDER_API_KEY": key,
        "VOLATILITY_API_KEY": key,
        "EVENT_API_KEY": key,
    }
    if refresh is not None:
        for name in ("LENDER_REFRESH_SECONDS", "VOLATILITY_REFRESH_SECONDS", "EVENT_REFRESH_SECONDS"):
            env[name] = str(refresh)
    return env


class QuoteClient:
    """Single quotes on one keep-alive connection, timed from the send to the last byte."""

    def __init__(self, server: Server) -> None:
        target = urllib.parse.urlsplit(server.url)
        self.connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
        self.headers = {"Content-Type": "application/json", "X-API-Key": server.key}

    def quote(self, ticker: str) -> tuple[float, int, dict[str, Any]]:
        body = json.dumps(
            {"ticker": ticker, "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
        )
        started = time.perf_counter()
        self.connection.request("POST", QUOTE_PATH, body=body, headers=self.headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed_ms = (time.perf_counter() - started) * 1000
        return elapsed_ms, response.status, json.loads(data) if data else {}

    def close(self) -> None:
        self.connection.close()


def rate_source(answer: Mapping[str, Any]) -> str | None:
    rate = answer.get("rate_details") or answer.get("rate") or {}
    source = rate.get("source") if isinstance(rate, Mapping) else None
    return source if isinstance(source, str) else answer.get("source")


def wait_for_lender(server: Server, tickers: Sequence[str], seconds: float) -> bool:
    """True once a quote of each ticker says it was priced from the lender."""
    client = QuoteClient(server)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sources = {rate_source(client.quote(ticker)[2]) for ticker in tickers}
            if sources == {"lender_api"}:
                return True
            time.sleep(0.5)
        return False
    finally:
        client.close()


def lender_tickers(count: int, exclude: set[str], seed: int = 20) -> list[str]:
    """Tickers of the served IBKR file with a FEERATE (the lender knows them), in a fixed random order."""
    rows = (SHARED_DATA / IBKR_FILE).read_text(errors="replace").splitlines()[2:-1]
    tickers = [
        fields[0]
        for fields in (row.split("|") for row in rows)
        if fields[6] != "NA" and fields[0].isalpha() and fields[0].upper() == fields[0]
    ]
    tickers = sorted(set(tickers) - exclude)
    random.Random(seed).shuffle(tickers)
    return tickers[:count]


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# ---- the measurements ----------------------------------------------------------------------------------


def throughput(
    driver: Driver, servers: Mapping[str, Server], simulator: Simulator, args: argparse.Namespace
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for round_number in range(args.rounds):
        order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
        for name in order:
            common = {"target": name, "round_number": round_number, "connections": args.connections}
            driver.run(servers[name], load="warmup", duration=args.warmup, **common)
            simulator_before = simulator.cpu_seconds()
            run = driver.run(servers[name], load="throughput", duration=args.duration, **common)
            # The simulator shares wrk's CPU: its share shows whether provider traffic took wrk's time.
            run.extra["simulator_cpu_percent"] = (
                (simulator.cpu_seconds() - simulator_before) / run.wall_s * 100
            )
            runs[name].append(run.as_dict())
            print(
                f"  {name:9} round {round_number}: {run.result.requests_per_sec:,.0f} req/s, server CPU "
                f"{run.as_dict()['server_cpu_percent']:.0f} %, wrk CPUs busy {run.wrk_cpus_busy or 0:.0f} %, "
                f"simulator {run.extra['simulator_cpu_percent']:.1f} %",
                flush=True,
            )
    summary = {
        name: {
            "requests_per_sec": median_or_none(run["requests_per_sec"] for run in rows),
            "cpu_us_per_request": median_or_none(run["cpu_us_per_request"] for run in rows),
            "server_cpu_percent": median_or_none(run["server_cpu_percent"] for run in rows),
            "wrk_cpus_busy_percent": median_or_none(run["wrk_cpus_busy_percent"] for run in rows),
            "simulator_cpu_percent": median_or_none(run["simulator_cpu_percent"] for run in rows),
            "errors": sum(run["errors"] for run in rows),
        }
        for name, rows in runs.items()
    }
    summary["ratio"] = ratio(summary["providers"]["requests_per_sec"], summary["files"]["requests_per_sec"])
    summary["per_round_ratios"] = [
        ratio(p["requests_per_sec"], f["requests_per_sec"])
        for p, f in zip(runs["providers"], runs["files"], strict=False)
    ]
    # Quotes per server-CPU second, providers / files: what the machine's noise does not move (the engines
    # share their pinned CPU with whatever else runs there, which changes wall-clock req/s from run to run).
    summary["cpu_ratio"] = ratio(
        summary["files"]["cpu_us_per_request"], summary["providers"]["cpu_us_per_request"]
    )
    summary["runs"] = runs
    return summary


def hang_latency(
    driver: Driver, servers: Mapping[str, Server], simulator: Simulator, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Paced warm quotes on `providers` healthy and hanging, and on `files` as the run's noise floor (the
    p99 of an engine that calls no provider, under the same load, between the same runs)."""
    delay_ms = args.light_connections * 1000 / rate
    states = ("healthy", "hanging", "files")
    runs: dict[str, list[dict[str, Any]]] = {state: [] for state in states}
    for round_number in range(args.hang_rounds):
        shift = round_number % len(states)
        for state in (*states[shift:], *states[:shift]):
            if state == "hanging":
                simulator.call("PUT", "/control/faults/all", {"mode": "hang"})
            else:
                simulator.call("DELETE", "/control/faults")
            run = driver.run(
                servers["files" if state == "files" else "providers"],
                target=state,
                load="paced",
                round_number=round_number,
                connections=args.light_connections,
                duration=args.duration,
                delay_ms=delay_ms,
            )
            runs[state].append(run.as_dict())
            print(f"  {state:8} round {round_number}: p99 {run.result.latency_ms.get(99)} ms", flush=True)
    simulator.call("DELETE", "/control/faults")
    p99 = {state: median_or_none(run["latency_ms"]["p99"] for run in rows) for state, rows in runs.items()}
    difference = None if None in p99.values() else p99["hanging"] - p99["healthy"]
    return {
        "rate": rate,
        "delay_ms": delay_ms,
        "p99_ms": p99,
        "p50_ms": {
            state: median_or_none(run["latency_ms"]["p50"] for run in rows) for state, rows in runs.items()
        },
        "p99_per_round_ms": {
            state: [run["latency_ms"]["p99"] for run in rows] for state, rows in runs.items()
        },
        "difference_ms": difference,
        "errors": sum(run["errors"] for rows in runs.values() for run in rows),
        "runs": runs,
    }


def cold_quotes(server: Server, tickers: Sequence[str]) -> dict[str, Any]:
    client = QuoteClient(server)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sources: dict[str, int] = {}
    try:
        for ticker in tickers:
            elapsed, status, answer = client.quote(ticker)
            latencies.append(elapsed)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            source = str(rate_source(answer))
            sources[source] = sources.get(source, 0) + 1
    finally:
        client.close()
    return {
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=None),
        "statuses": statuses,
        "sources": sources,
    }


def post_batch(server: Server, tickers: Sequence[str]) -> int:
    positions = [{"ticker": ticker, "position_value": 1000, "loan_days": 1} for ticker in tickers]
    status, _ = request_json(
        server.url,
        "POST",
        QUOTE_PATH + "/batch",
        {"client_id": "demo_client", "positions": positions},
        {"X-API-Key": server.key},
    )
    return status


def refresher_cpu(
    workdir: Path,
    cpu: str | None,
    simulator: Simulator,
    key: str,
    idle: Server,
    args: argparse.Namespace,
    exclude: set[str],
) -> dict[str, Any]:
    server = engine(workdir, cpu, "refresher", provider_env(simulator, key, None))
    try:
        tickers = lender_tickers(args.hot_tickers, exclude, seed=7)
        statuses = [
            post_batch(server, tickers[start : start + BATCH_POSITIONS])
            for start in range(0, len(tickers), BATCH_POSITIONS)
        ]
        # One refresh period (LENDER_REFRESH_SECONDS' default, 60 s) for the refresher to take them all up.
        print(
            f"  {len(tickers)} tickers quoted in batches {statuses}; waiting {args.refresher_settle:.0f} s",
            flush=True,
        )
        time.sleep(args.refresher_settle)
        simulator.call("DELETE", "/control/stats")
        cpu_before, idle_before, started = server.cpu_seconds(), idle.cpu_seconds(), time.monotonic()
        time.sleep(args.refresher_window)
        cpu_after, idle_after, wall = server.cpu_seconds(), idle.cpu_seconds(), time.monotonic() - started
        stats = simulator.call("GET", "/control/stats")
    finally:
        server.stop()
    lender_calls = stats["lender"]["calls"]
    calls_per_minute = lender_calls * 60 / wall
    engine_percent = (cpu_after - cpu_before) / wall * 100
    idle_percent = (idle_after - idle_before) / wall * 100
    refresher_percent = engine_percent - idle_percent
    at_target = (
        refresher_percent * HOT_TICKERS_TARGET_PER_MINUTE / calls_per_minute if calls_per_minute > 0 else None
    )
    return {
        "hot_tickers": len(tickers),
        "batch_statuses": statuses,
        "window_s": wall,
        "lender_calls": lender_calls,
        "lender_calls_per_minute": calls_per_minute,
        "distinct_tickers_called": len(stats["lender"].get("by_ticker", {})),
        "volatility_calls": stats["volatility"]["calls"],
        "event_calls": stats["events"]["calls"],
        "engine_cpu_percent": engine_percent,
        "idle_engine_cpu_percent": idle_percent,
        "refresher_cpu_percent": refresher_percent,
        "refresher_cpu_percent_at_10k_per_minute": at_target,
        "cpu_us_per_lender_call": (
            (cpu_after - cpu_before - (idle_after - idle_before)) * 1e6 / lender_calls
            if lender_calls
            else None
        ),
    }


def figures_disagree(files: Server, providers: Server) -> list[str]:
    """Bodies whose figures differ between the engines (the lender serves the file's rates: they must not)."""
    problems = []
    for body in BODIES:
        answers = [
            request_json(server.url, "POST", QUOTE_PATH, body, {"X-API-Key": server.key})
            for server in (files, providers)
        ]
        (files_status, files_answer), (providers_status, providers_answer) = answers
        if files_status != 200 or providers_status != 200:
            problems.append(f"{body['ticker']}: files {files_status}, providers {providers_status}")
            continue
        for name in ("total_fee", "borrow_rate_used"):
            if files_answer[name] != providers_answer[name]:
                problems.append(f"{body['ticker']}: {name} {files_answer[name]} vs {providers_answer[name]}")
    return problems


# ---- targets and the report ----------------------------------------------------------------------------


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    live = bool(doc.get("providers_active"))
    note = "" if live else "the engine never priced from the lender: no provider support measured"
    rows = []
    through = doc.get("throughput") or {}
    rows.append(
        make_target(
            "single quotes per server CPU second, providers warm / files only",
            through.get("cpu_ratio"),
            0.95,
            ">=",
            "×",
            valid=live and not through.get("errors_total"),
            note=note or f"wall req/s ratio {_f(through.get('ratio'), '.3f')} (median of interleaved rounds)",
        )
    )
    hang = doc.get("hang") or {}
    rows.append(
        make_target(
            "warm p99 while the providers hang − healthy p99",
            hang.get("difference_ms"),
            1.0,
            "<=",
            "ms",
            valid=live and not hang.get("errors"),
            note=note or f"paced at {hang.get('rate', 0):,.0f} req/s",
        )
    )
    cold = doc.get("cold") or {}
    worst = [
        cold[state]["p99_ms"] for state in ("providers_healthy", "providers_lender_hanging") if state in cold
    ]
    rows.append(
        make_target(
            "cold-ticker p99 (worst of lender healthy / hanging)",
            max(worst) if worst and None not in worst else None,
            COLD_FETCH_MS + 20,
            "<=",
            "ms",
            valid=live,
            note=note or f"files-only baseline p99 {_f(cold.get('files', {}).get('p99_ms'))} ms",
        )
    )
    refresher = doc.get("refresher") or {}
    rows.append(
        make_target(
            "refresher CPU at 10,000 hot tickers a minute",
            refresher.get("refresher_cpu_percent_at_10k_per_minute"),
            5.0,
            "<=",
            "% of a core",
            valid=live,
            note=note or f"{_f(refresher.get('lender_calls_per_minute'), ',.0f')} lender calls/min, scaled",
        )
    )
    return rows


def _f(value: Any, spec: str = ".1f") -> str:
    return bench_http.format_number(value, spec)


def render_markdown(doc: Mapping[str, Any]) -> list[str]:
    """The "Live sources" section of benchmarks/REPORT.md from this script's JSON (run.py adds the title)."""
    settings = doc.get("settings", {})
    lines = [
        "The engine with the three providers configured (the simulator `pricer simulate-sources` as the "
        f"providers, refresh periods {settings.get('refresh')} s) against the same engine on files only, "
        "the same data loaded in both, same run. "
        + ("" if doc.get("providers_active") else NO_PROVIDERS_TEXT),
        "",
    ]
    through = doc.get("throughput")
    if through:
        lines += [
            "| engine | req/s | server CPU µs/quote | server CPU % | wrk CPU busy % | simulator CPU % "
            "| errors |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {_f(row['requests_per_sec'], ',.0f')} | {_f(row['cpu_us_per_request'])} "
                f"| {_f(row.get('server_cpu_percent'), '.0f')} "
                f"| {_f(row.get('wrk_cpus_busy_percent'), '.0f')} "
                f"| {_f(row.get('simulator_cpu_percent'), '.1f')} | {row['errors']} |"
                for name, row in ((name, through[name]) for name in ("files", "providers"))
            ),
            "",
            f"Quotes per server CPU second, providers / files: {_f(through.get('cpu_ratio'), '.3f')}; "
            f"wall req/s ratio: {_f(through.get('ratio'), '.3f')} (per round: "
            + ", ".join(_f(value, ".3f") for value in through.get("per_round_ratios", []))
            + ").",
            "",
        ]
    hang = doc.get("hang")
    if hang:
        p50, p99, rounds = hang["p50_ms"], hang["p99_ms"], hang.get("p99_per_round_ms", {})
        lines += [
            f"Paced warm quotes ({_f(hang['rate'], ',.0f')} req/s, medians of {len(hang['runs']['healthy'])} "
            f"rounds): p99 on `providers` healthy {_f(p99['healthy'], '.2f')} ms, all providers hanging "
            f"{_f(p99['hanging'], '.2f')} ms (difference {_f(hang['difference_ms'], '+.2f')} ms); on `files` "
            f"(noise floor) {_f(p99.get('files'), '.2f')} ms. p50 {_f(p50['healthy'], '.2f')} / "
            f"{_f(p50['hanging'], '.2f')} / {_f(p50.get('files'), '.2f')} ms; errors {hang['errors']}. "
            "p99 per round: "
            + "; ".join(
                f"{state} " + ", ".join(_f(value, ".2f") for value in values)
                for state, values in rounds.items()
            )
            + ".",
            "",
        ]
    cold = doc.get("cold")
    if cold:
        lines += [
            "| cold tickers | samples | p50 ms | p99 ms | max ms | statuses | sources |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in cold.items():
            lines.append(
                f"| {name} | {row['samples']} | {_f(row['p50_ms'], '.2f')} | {_f(row['p99_ms'], '.2f')} | "
                f"{_f(row['max_ms'], '.2f')} | {row['statuses']} | {row['sources']} |"
            )
        lines.append("")
    refresher = doc.get("refresher")
    if refresher:
        r = refresher
        lines += [
            f"Refresher: {r['hot_tickers']:,} hot tickers, default refresh periods, idle for "
            f"{_f(r['window_s'], '.0f')} s: {r['lender_calls']:,} lender calls "
            f"({_f(r['lender_calls_per_minute'], ',.0f')}/min, {r['distinct_tickers_called']:,} tickers), "
            f"{r['event_calls']:,} event calls; engine CPU {_f(r['engine_cpu_percent'], '.2f')} % of a "
            f"core against {_f(r['idle_engine_cpu_percent'], '.2f')} % for the idle files-only engine: "
            f"{_f(r['refresher_cpu_percent'], '.2f')} % for the refresher, "
            f"{_f(r['cpu_us_per_lender_call'], '.0f')} µs per lender call.",
            "",
        ]
    lines += ["Targets:", "", *target_lines(doc.get("targets", [])), ""]
    notes = doc.get("notes", [])
    if notes:
        lines += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    if doc.get("command"):
        lines += ["```", doc["command"], "```", ""]
    return lines


def target_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| target | measured | goal | verdict | note |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {_f(row['value'], '.3f')} {row['unit']} | {row['op']} {row['limit']} "
            f"{row['unit']} | {row['verdict']} | {row['note']} |"
        )
    return lines


# ---- main ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", default="10s", help="measured wrk run length (10s)")
    parser.add_argument("--warmup", default="3s", help="warm-up before each throughput run (3s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--hang-rounds", type=int, default=4, help="healthy/hanging round pairs (4)")
    parser.add_argument("--connections", type=int, default=32, help="connections for throughput (32)")
    parser.add_argument("--light-connections", type=int, default=4, help="connections of the paced load (4)")
    parser.add_argument("--refresh", type=float, default=5.0, help="refresh periods of `providers`, s (5)")
    parser.add_argument(
        "--cold-samples", type=int, default=100, help="cold quotes per engine and state (100)"
    )
    parser.add_argument("--hot-tickers", type=int, default=10_000, help="tickers the refresher keeps (10000)")
    parser.add_argument("--refresher-settle", type=float, default=70.0, help="wait before the window, s (70)")
    parser.add_argument("--refresher-window", type=float, default=120.0, help="CPU window, s (120)")
    parser.add_argument("--skip-refresher", action="store_true", help="leave out the refresher CPU measure")
    parser.add_argument("--quick", action="store_true", help="shorter runs and windows, fewer samples")
    parser.add_argument("--server-cpu", default="0", help="CPU list of the engines (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="CPU list of wrk and the simulator (taskset -c)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.hang_rounds = "4s", "1s", 2, 2
        args.cold_samples, args.refresher_window = 30, 60.0
    wrk = bench_http.shutil.which("wrk")
    if wrk is None:
        print("bench_sources: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    # The engines inherit this environment (less bench_http's ENGINE_SETTINGS): a provider setting of the
    # shell must not reach the files-only engine, nor change the providers engine's.
    for name in SOURCE_SETTINGS:
        os.environ.pop(name, None)
    server_cpu = None if args.no_pin else args.server_cpu
    wrk_cpu = None if args.no_pin else args.wrk_cpu
    key = secrets.token_urlsafe(24)
    notes: list[str] = []
    doc: dict[str, Any] = {
        "benchmark": "sources",
        "machine": machine_facts(wrk),
        "settings": {
            "duration": args.duration,
            "rounds": args.rounds,
            "connections": args.connections,
            "refresh": args.refresh,
            "cold_fetch_ms": COLD_FETCH_MS,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
        },
        "command": "python benchmarks/bench_sources.py " + shlex.join(sys.argv[1:]),
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        workdir = Path(tmp)
        bodies_file = workdir / "bodies.jsonl"
        bodies_file.write_text("".join(json.dumps(body, separators=(",", ":")) + "\n" for body in BODIES))
        driver = Driver(wrk, wrk_cpu, bodies_file, paced_wrk=None, server_cpu=server_cpu)
        simulator = Simulator(workdir, wrk_cpu, key)
        servers: dict[str, Server] = {}
        try:
            servers["files"] = engine(workdir, server_cpu, "files", {})
            servers["providers"] = engine(
                workdir, server_cpu, "providers", provider_env(simulator, key, args.refresh)
            )
            body_tickers = ["AAPL", "GME", "TSLA"]
            doc["providers_active"] = wait_for_lender(servers["providers"], body_tickers, 15.0)
            if not doc["providers_active"]:
                notes.append(
                    "`providers` never answered `source: lender_api` for AAPL, GME, TSLA within 15 s."
                )
            problems = figures_disagree(servers["files"], servers["providers"])
            notes += [f"figures differ: {problem}" for problem in problems]
            print("throughput (warm):", flush=True)
            doc["throughput"] = throughput(driver, servers, simulator, args)
            doc["throughput"]["errors_total"] = sum(doc["throughput"][name]["errors"] for name in servers)
            files_rate = doc["throughput"]["files"]["requests_per_sec"] or 400.0
            # Cold tickers before the hang runs: a hang opens the providers' breakers, and a cold quote with
            # the lender's breaker open does not wait at all. With the lender hanging, the first cold fetches
            # wait SOURCE_COLD_FETCH_MS until their failures open the breaker: the bound the goal is about.
            exclude = {str(body["ticker"]).upper() for body in BODIES}
            cold = lender_tickers(2 * args.cold_samples, exclude)
            healthy, hanging = cold[: args.cold_samples], cold[args.cold_samples :]
            print("cold tickers:", flush=True)
            doc["cold"] = {"files": cold_quotes(servers["files"], healthy)}
            doc["cold"]["providers_healthy"] = cold_quotes(servers["providers"], healthy)
            simulator.call("PUT", "/control/faults/lender", {"mode": "hang"})
            doc["cold"]["providers_lender_hanging"] = cold_quotes(servers["providers"], hanging)
            simulator.call("DELETE", "/control/faults")
            print("p99 healthy vs hanging providers:", flush=True)
            doc["hang"] = hang_latency(driver, servers, simulator, files_rate / 4, args)
            servers.pop("providers").stop()
            if not args.skip_refresher:
                print("refresher CPU:", flush=True)
                exclude |= set(cold)
                doc["refresher"] = refresher_cpu(
                    workdir, server_cpu, simulator, key, servers["files"], args, exclude
                )
        finally:
            for server in servers.values():
                server.stop()
            simulator.stop()
    doc["targets"] = targets(doc)
    print("\n".join(["## Live sources (bench_sources.py)", "", *render_markdown(doc)]))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
