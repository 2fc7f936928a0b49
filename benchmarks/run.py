"""`nox -s bench`: run the pricing-core and HTTP benchmarks, then write benchmarks/REPORT.md.

    python benchmarks/run.py            # full run (about 3 minutes of HTTP load plus the pricing core)
    python benchmarks/run.py --quick    # smoke run: short durations, small batches

Each benchmark runs as its own process and writes JSON (kept in benchmarks/results/); the report quotes
machine facts, every figure as a ratio to the baseline measured in the same run, and the exact commands.
A missing or failing benchmark is reported as such; the exit status is non-zero then, or when an HTTP run
had errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRICING_SCRIPT = HERE / "bench_pricing.py"
HTTP_SCRIPT = HERE / "bench_http.py"

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


def machine_section(http: Mapping[str, Any] | None, pricing: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Machine", ""]
    if http is not None:
        facts = http["machine"]
        versions = ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if version)
        load = ", ".join(f"{value:.2f}" for value in facts["loadavg_at_start"])
        lines += [
            f"- CPU: {facts['cpu_model']}; nproc {facts['nproc']} ({facts['cpus_available']} available)",
            f"- Kernel {facts['kernel']}; load average when the HTTP benchmark started: {load}; the "
            f"benchmark's CPUs were {format_value(facts.get('busy_before_start_percent'))} % busy with other "
            "work just before it started",
            f"- Python {facts['python']} ({facts['python_implementation']})",
            f"- Packages: {versions}",
            f"- Load generator: {facts['wrk']}",
        ]
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
        f"{settings['wrk_cpu']}. Rounds are interleaved (engine, baseline, engine, baseline, ...), each "
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
        for target in ("engine", "baseline"):
            s = block[target]
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


def write_report(
    path: Path,
    *,
    quick: bool,
    pricing: Mapping[str, Any] | None,
    pricing_command: Sequence[str],
    pricing_error: str | None,
    http: Mapping[str, Any] | None,
    http_command: Sequence[str],
    http_error: str | None,
) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark report",
        "",
        f"Generated {now} by `python benchmarks/run.py{' --quick' if quick else ''}` (`nox -s bench`)."
        + (" **Quick smoke run: short durations, figures are indicative only.**" if quick else ""),
        "Every figure is compared with a baseline measured in the same run on the same machine; absolute "
        "numbers depend on the machine, the ratios much less.",
        "",
    ]
    lines += machine_section(http, pricing)
    lines += pricing_section(pricing, pricing_command, pricing_error)
    lines += http_section(http, http_command, http_error)
    path.write_text("\n".join(lines).rstrip() + "\n")


def report_from_last_run(report: Path, results_dir: Path, *, quick: bool) -> int:
    """Rewrite the report from the JSON of the last run (its commands are the standard ones)."""
    pricing = _read_json(results_dir / "pricing.json")
    http = _read_json(results_dir / "http.json")
    write_report(
        report,
        quick=quick,
        pricing=pricing,
        pricing_command=[sys.executable, str(PRICING_SCRIPT), "--json", str(results_dir / "pricing.json")],
        pricing_error=None if pricing is not None else "no pricing.json from a previous run",
        http=http,
        http_command=[sys.executable, str(HTTP_SCRIPT), "--json", str(results_dir / "http.json")],
        http_error=None if http is not None else "no http.json from a previous run",
    )
    print(f"Report rewritten from {results_dir} to {report}")
    return 0 if pricing is not None and http is not None else 1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks and write benchmarks/REPORT.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: short durations, small batches")
    parser.add_argument("--skip-pricing", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the JSON goes")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the JSON of the last run"
    )
    args, http_extra = parser.parse_known_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)

    pricing_json = args.results_dir / "pricing.json"
    http_json = args.results_dir / "http.json"
    if args.report_only:
        return report_from_last_run(args.report, args.results_dir, quick=args.quick)
    for stale in (pricing_json, http_json):
        stale.unlink(missing_ok=True)

    pricing_command: list[str] = []
    pricing_error: str | None = "skipped (--skip-pricing)" if args.skip_pricing else None
    if not args.skip_pricing:
        pricing_command, pricing_error = run_pricing(pricing_json, args.quick)
        if pricing_error:
            print(f"run.py: {pricing_error}", file=sys.stderr)
    http_command: list[str] = []
    http_error: str | None = "skipped (--skip-http)" if args.skip_http else None
    if not args.skip_http:
        http_command, http_error = run_http(http_json, args.quick, http_extra)
        if http_error:
            print(f"run.py: {http_error}", file=sys.stderr)

    write_report(
        args.report,
        quick=args.quick,
        pricing=_read_json(pricing_json),
        pricing_command=pricing_command,
        pricing_error=pricing_error,
        http=_read_json(http_json),
        http_command=http_command,
        http_error=http_error,
    )
    print(f"Report written to {args.report}")
    failed = (pricing_error and not args.skip_pricing) or (http_error and not args.skip_http)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
