"""Where a single quote's microseconds go: server CPU per quote, broken down by layer.

The engine is served as bench_http.py serves it (embedded defaults, one uvicorn worker, pinned to CPU 0)
under a steady wrk load of single quotes (wrk pinned to CPU 1). Each round has two measured runs:

1. unprofiled: server CPU seconds / quotes served = the CPU per quote that the table divides up;
2. profiled: py-spy samples the server (on-CPU samples only, Python frames, blocking mode so that every
   stack is whole) while wrk keeps the same load.

Every sample goes to one layer: the frames of a stack are matched, root to leaf, against LAYER_RULES (a
table of file prefixes, function patterns and, for calls into C that py-spy cannot see, patterns of the
calling source line); the deepest matched frame names the layer, and frames no rule matches (NumPy,
msgspec, hmac, ...) count for the layer that called them. So a layer's figure is its own time plus what it
calls, minus the inner layers it hands over to. µs per quote = share of samples × CPU per quote.

    python benchmarks/profile_single.py --json benchmarks/results/profile.json
    python benchmarks/profile_single.py --save-before     # store this run as the "before" column

Frames of src/pricer/middleware that no rule names count as "middleware (other)", so renamed or new
middlewares still show. A before column comes from benchmarks/profile-before.json (--before).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import linecache
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEFORE_FILE = HERE / "profile-before.json"
TOP_HOTSPOTS = 15
# The engine's settings besides bench_http.py's: py-spy stops the server for each sample (and this shared
# machine adds its own stalls), which makes some requests exceed SLOW_REQUEST_MS (100 ms) and write a
# warning line that a server at this load on a quiet machine does not write; the profile would show that
# logging as a per-request cost. 60 s keeps the line out.
PROFILE_ENV = {"SHUTDOWN_DRAIN_SECONDS": "0", "SLOW_REQUEST_MS": "60000"}

# ---- the layer map -------------------------------------------------------------------------------------

EVENT_LOOP = "event loop (uvloop, task steps)"
PROTOCOL = "uvicorn/httptools protocol + socket writes"
RESPONSE_HEADERS = "response start + headers (our send wrappers)"
REQUEST_EDGE = "request edge (fused middlewares)"
HTTP_SHAPES = "HTTP shapes (record -> response)"
JSON_ENCODING = "JSON encoding"
NUMPY_OUTSIDE_CORE = "NumPy one-row arrays (endpoint + quoter)"
MIDDLEWARE_OTHER = "middleware (other)"
ENGINE_OTHER = "engine (other)"
NO_FRAME_OF_OURS = "other (no frame of ours)"


@dataclass(frozen=True)
class LayerRule:
    """A frame belongs to `layer` when its file starts with `file`, its function matches the regular
    expression `function` (re.search; empty: any) and, with `source`, the text of its current line matches
    `source` (a call into C, which py-spy shows as time of the calling line)."""

    layer: str
    file: str
    function: str = ""
    source: str = ""


# First matching rule wins for a frame; the order is specific before general. The request flows top to
# bottom; the table in the report follows LAYER_ORDER.
LAYER_RULES: tuple[LayerRule, ...] = (
    # Calls into C: the calling line says what they are.
    LayerRule(JSON_ENCODING, "pricer/", source=r"\b(_?encoder|json|msgpack)\.encode\("),
    LayerRule(NUMPY_OUTSIDE_CORE, "pricer/endpoints/", source=r"\bnp\."),
    LayerRule(NUMPY_OUTSIDE_CORE, "pricer/quoting.py", source=r"\bnp\."),
    # The process and the loop: every stack starts with these.
    LayerRule(EVENT_LOOP, "<frozen runpy>"),
    LayerRule(EVENT_LOOP, "pricer/__main__.py"),
    LayerRule(EVENT_LOOP, "pricer/cli.py"),
    LayerRule(EVENT_LOOP, "pricer/server.py", function=r"^serve"),
    LayerRule(EVENT_LOOP, "pricer/draining.py"),
    LayerRule(EVENT_LOOP, "asyncio/runners.py"),
    LayerRule(EVENT_LOOP, "asyncio/base_events.py"),
    LayerRule(EVENT_LOOP, "asyncio/events.py"),
    LayerRule(EVENT_LOOP, "uvicorn/server.py"),
    LayerRule(EVENT_LOOP, "uvicorn/_compat.py"),
    LayerRule(EVENT_LOOP, "uvicorn/main.py"),
    LayerRule(PROTOCOL, "uvicorn/"),
    LayerRule(PROTOCOL, "pricer/server.py"),  # the connection guards around uvicorn's protocol
    LayerRule(PROTOCOL, "pricer/protocol.py"),
    LayerRule(PROTOCOL, "pricer/response_cycle.py"),  # uvicorn's response cycle with a leaner response start
    LayerRule("app entry (PricerApp)", "pricer/app.py"),
    # Middlewares: the send wrappers add response headers, whichever middleware defines them.
    LayerRule(RESPONSE_HEADERS, "pricer/middleware/", function=r"<locals>\.send|\.send$|_headers$"),
    LayerRule("request context", "pricer/middleware/request_context.py"),
    LayerRule("request context", "pricer/context.py"),
    LayerRule("telemetry", "pricer/middleware/telemetry.py"),
    LayerRule("CORS", "pricer/middleware/cors.py"),
    LayerRule("error envelope", "pricer/middleware/errors.py"),
    LayerRule(REQUEST_EDGE, "pricer/middleware/edge"),
    LayerRule("dispatch", "pricer/middleware/route_match.py", function=r"^Dispatch"),
    LayerRule("route match", "pricer/middleware/route_match.py"),
    LayerRule("body limit", "pricer/middleware/body_limit.py"),
    LayerRule("admission", "pricer/middleware/admission"),
    LayerRule("authentication", "pricer/middleware/authentication.py"),
    LayerRule("rate limit", "pricer/middleware/rate_limit.py"),
    LayerRule("authorization", "pricer/middleware/authorization.py"),
    LayerRule(MIDDLEWARE_OTHER, "pricer/middleware/"),
    LayerRule("dispatch", "pricer/routing.py"),
    LayerRule("dispatch", "pricer/routes.py"),
    LayerRule("dispatch", "starlette/"),
    # The endpoint and what it calls.
    LayerRule(RESPONSE_HEADERS, "pricer/endpoints/common.py", function=r"^EncodedResponse"),
    LayerRule(JSON_ENCODING, "pricer/endpoints/common.py", function=r"_response$"),
    LayerRule("decode + validation", "pricer/validation.py"),
    LayerRule("decode + validation", "pricer/tickers.py"),
    LayerRule("decode + validation", "pricer/schemas.py"),
    LayerRule(HTTP_SHAPES, "pricer/endpoints/views.py"),
    LayerRule("endpoint handler", "pricer/endpoints/"),
    LayerRule("admission", "pricer/auth/admission"),
    LayerRule("key verification", "pricer/auth/"),
    LayerRule(RESPONSE_HEADERS, "pricer/ratelimit/", function=r"_headers$"),
    LayerRule("rate limit", "pricer/ratelimit/"),
    LayerRule("quoter (orchestration)", "pricer/quoting.py"),
    LayerRule("market data", "pricer/marketdata/"),
    LayerRule("pricing core (NumPy)", "pricer/pricing/"),
    LayerRule("quote id + record", "pricer/quotes.py"),
    LayerRule("quote id + record", "pricer/ids.py"),
    LayerRule("audit / quote store", "pricer/audit"),
    LayerRule("audit / quote store", "pricer/stores/"),
    LayerRule("metrics + tracing", "pricer/observability/"),
    LayerRule("logging", "pricer/logs.py"),
    LayerRule("logging", "logging/"),
    LayerRule(ENGINE_OTHER, "pricer/"),
)

# The table's order: the request's path through the server, then what no rule foresaw.
LAYER_ORDER: tuple[str, ...] = (
    EVENT_LOOP,
    PROTOCOL,
    "app entry (PricerApp)",
    REQUEST_EDGE,
    "request context",
    "telemetry",
    "CORS",
    "error envelope",
    "route match",
    "body limit",
    "admission",
    "authentication",
    "rate limit",
    "authorization",
    MIDDLEWARE_OTHER,
    "dispatch",
    "decode + validation",
    "endpoint handler",
    "key verification",
    "quoter (orchestration)",
    "market data",
    NUMPY_OUTSIDE_CORE,
    "pricing core (NumPy)",
    "quote id + record",
    HTTP_SHAPES,
    "audit / quote store",
    JSON_ENCODING,
    RESPONSE_HEADERS,
    "metrics + tracing",
    "logging",
    ENGINE_OTHER,
    NO_FRAME_OF_OURS,
)

# Frames that name a hotspot: the deepest frame of these packages in a sample (library frames below it,
# NumPy's or hmac's, count for it).
HOTSPOT_PACKAGES = ("pricer/", "uvicorn/", "starlette/")


# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")

Stack = tuple[tuple[Frame, ...], int]
SourceLine = Callable[[str, int], str]


def parse_frame(text: str) -> Frame:
    """One frame of py-spy's raw format: `function (file:line)`; a frame without a location keeps the text
    as its function."""
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "", 0)
    return Frame(match["function"], match["file"], int(match["line"] or 0))


def parse_collapsed(text: str) -> list[Stack]:
    """py-spy `--format raw` (collapsed stacks: `root;...;leaf count` per line) as (frames, count)."""
    stacks: list[Stack] = []
    for line in text.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = tuple(parse_frame(part) for part in stack.split(";") if part.strip())
        if frames:
            stacks.append((frames, int(count_text)))
    return stacks


def _no_source(file: str, line: int) -> str:
    return ""


def frame_layer(frame: Frame, rules: Sequence[LayerRule], source_line: SourceLine = _no_source) -> str | None:
    """The layer of the first rule that matches the frame, None when none does."""
    for rule in rules:
        if not frame.file.startswith(rule.file):
            continue
        if rule.function and re.search(rule.function, frame.function) is None:
            continue
        if rule.source and re.search(rule.source, source_line(frame.file, frame.line)) is None:
            continue
        return rule.layer
    return None


def stack_layer(
    frames: Sequence[Frame], rules: Sequence[LayerRule], source_line: SourceLine = _no_source
) -> str:
    """The layer a sample counts for: that of its deepest matched frame (unmatched frames below count
    for it), NO_FRAME_OF_OURS when no frame matches."""
    layer = NO_FRAME_OF_OURS
    for frame in frames:
        matched = frame_layer(frame, rules, source_line)
        if matched is not None:
            layer = matched
    return layer


def attribute_layers(
    stacks: Iterable[Stack], rules: Sequence[LayerRule] = LAYER_RULES, source_line: SourceLine = _no_source
) -> collections.Counter[str]:
    """Samples per layer."""
    counts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        counts[stack_layer(frames, rules, source_line)] += count
    return counts


EVENT_LOOP_HOTSPOT = "(event loop: uvloop's C code, no Python frame of a request)"


def hotspot_counts(
    stacks: Iterable[Stack],
    packages: Sequence[str] = HOTSPOT_PACKAGES,
    rules: Sequence[LayerRule] = LAYER_RULES,
    *,
    by_line: bool = False,
) -> collections.Counter[str]:
    """Samples per function (`function (file)`), or per line (`function (file:line)`): the deepest frame
    of `packages` in each sample; a sample that is only the event loop's frames is EVENT_LOOP_HOTSPOT."""
    counts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        label = EVENT_LOOP_HOTSPOT
        if stack_layer(frames, rules) != EVENT_LOOP:
            for frame in reversed(frames):
                if frame.file.startswith(tuple(packages)):
                    where = f"{frame.file}:{frame.line}" if by_line else frame.file
                    label = f"{frame.function} ({where})"
                    break
        counts[label] += count
    return counts


def layer_table(
    counts: Mapping[str, int],
    us_per_quote: float,
    *,
    before: Mapping[str, float] | None = None,
    order: Sequence[str] = LAYER_ORDER,
) -> list[dict[str, Any]]:
    """Rows (layer, samples, µs per quote, share %, sampling error µs, before µs, change µs) in `order`,
    then layers not in it by size; layers with no sample now but one before are kept (they went away)."""
    total = sum(counts.values())
    if total <= 0:
        return []
    names = [name for name in order if counts.get(name) or (before and before.get(name))]
    names += sorted(
        (name for name in counts if name not in order and counts[name]), key=lambda name: -counts[name]
    )
    names += sorted(name for name in (before or {}) if name not in names and name not in order)
    rows = []
    for name in names:
        samples = counts.get(name, 0)
        us = us_per_quote * samples / total
        share = samples / total
        row: dict[str, Any] = {
            "layer": name,
            "samples": samples,
            "us_per_quote": round(us, 2),
            "share_percent": round(100 * share, 1),
            # One standard error of the sampled share (binomial), in µs: a change smaller than about
            # twice this is within what sampling alone moves (run-to-run noise of the machine comes on top).
            "sampling_error_us": round(us_per_quote * math.sqrt(share * (1 - share) / total), 2),
        }
        if before is not None:
            previous = before.get(name)
            row["before_us_per_quote"] = previous
            row["change_us"] = None if previous is None else round(us - previous, 2)
        rows.append(row)
    return rows


def hotspot_table(
    counts: Mapping[str, int], us_per_quote: float, top: int = TOP_HOTSPOTS
) -> list[dict[str, Any]]:
    total = sum(counts.values())
    if total <= 0:
        return []
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [
        {
            "function": name,
            "samples": samples,
            "us_per_quote": round(us_per_quote * samples / total, 2),
            "share_percent": round(100 * samples / total, 1),
        }
        for name, samples in ranked
    ]


def before_figures(document: Mapping[str, Any] | None) -> dict[str, float] | None:
    """layer -> µs per quote of a saved run's JSON (None without one)."""
    if not document:
        return None
    return {row["layer"]: float(row["us_per_quote"]) for row in document.get("layers", [])}


# ---- source lines of the profiled process's frames ------------------------------------------------------


@cache
def _package_root(top: str) -> Path | None:
    """The directory that holds the package or module `top` (as py-spy shortens a file: `numpy/x.py`)."""
    try:
        spec = importlib.util.find_spec(top.removesuffix(".py"))
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent.parent if spec.submodule_search_locations else origin.parent


def source_line(file: str, line: int) -> str:
    """The text of `file:line` as py-spy names it, read from this checkout and its environment (the
    profiled server runs from the same), "" when not found."""
    path = Path(file)
    if not path.is_absolute():
        root = _package_root(file.split("/", 1)[0])
        if root is None:
            return ""
        path = root / file
    return linecache.getline(str(path), line)


# ---- measuring -----------------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(path) for path in (Path(sys.executable).parent / "py-spy",) if path.exists()), None
    )


def measure(args: argparse.Namespace, py_spy: str, workdir: Path) -> dict[str, Any]:
    import bench_http

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("profile_single: wrk not found (Debian: apt-get install -y wrk)")
    server_cpu = None if args.no_pin else args.server_cpu
    wrk_cpu = None if args.no_pin else args.wrk_cpu
    bodies = workdir / "bodies.jsonl"
    bodies.write_text(
        "".join(json.dumps(body, separators=(",", ":")) + "\n" for body in bench_http.DEFAULT_BODIES)
    )
    engine_env = dict(item.split("=", 1) for item in args.engine_env)
    driver = bench_http.Driver(wrk, wrk_cpu, bodies, paced_wrk=None, server_cpu=server_cpu)
    duration_s = bench_http.parse_duration_arg(args.duration)
    plain: list[dict[str, Any]] = []
    profiled: list[dict[str, Any]] = []
    raw_profiles: list[str] = []
    server = bench_http.start_engine(workdir, server_cpu, {**PROFILE_ENV, **engine_env})
    try:
        for round_number in range(1, args.rounds + 1):
            common = {"target": "engine", "round_number": round_number, "connections": args.connections}
            driver.run(server, load="warmup", duration=args.warmup, **common)
            run = driver.run(server, load="unprofiled", duration=args.duration, **common)
            plain.append(run.as_dict())
            print(bench_http.describe_run(run), flush=True)
            raw_path = workdir / f"profile-{round_number}.txt"
            # Blocking mode (py-spy stops the process for each sample): without it a coroutine stack is
            # often read half-way through a change and loses its outer frames. The pauses cost wall time,
            # not the server's CPU, and the CPU per quote is taken from the unprofiled run anyway.
            command = [py_spy, "record", "--pid", str(server.process.pid), "--rate", str(args.rate)]
            command += [
                "--duration",
                str(max(1, int(duration_s) - 1)),
                "--format",
                "raw",
                "-o",
                str(raw_path),
            ]
            spy = subprocess.Popen(
                bench_http.pinned(wrk_cpu, command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            run = driver.run(server, load="profiled", duration=args.duration, **common)
            _, spy_errors = spy.communicate(timeout=120)
            if spy.returncode != 0 or not raw_path.exists():
                raise SystemExit(
                    f"profile_single: py-spy failed ({spy.returncode}): {spy_errors.decode()[-2000:]}"
                )
            profiled.append(run.as_dict())
            raw_profiles.append(raw_path.read_text())
            print(bench_http.describe_run(run) + "  (py-spy sampling)", flush=True)
    finally:
        server.stop()
    if args.raw_out:
        args.raw_out.write_text("".join(raw_profiles))
    return {
        "plain": plain,
        "profiled": profiled,
        "raw": raw_profiles,
        "server_cpu": server_cpu,
        "wrk_cpu": wrk_cpu,
    }


def build_document(
    measured: Mapping[str, Any], args: argparse.Namespace, before: Mapping[str, Any] | None
) -> dict[str, Any]:
    stacks = [stack for raw in measured["raw"] for stack in parse_collapsed(raw)]
    us_per_quote = statistics.median(run["cpu_us_per_request"] for run in measured["plain"])
    layers = layer_table(
        attribute_layers(stacks, LAYER_RULES, source_line), us_per_quote, before=before_figures(before)
    )
    # The CPU per quote comes from the unprofiled runs: any error there makes the run invalid. In the
    # profiled runs only wrong statuses do (a wrong path would be profiled); a socket timeout there is
    # py-spy's pauses, noted.
    errors = sum(run["errors"] for run in measured["plain"]) + sum(
        run["non_2xx"] for run in measured["profiled"]
    )
    profiled_socket_errors = sum(sum(run["socket_errors"].values()) for run in measured["profiled"])
    return {
        "benchmark": "profile-single-quote",
        "valid": errors == 0 and bool(stacks),
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "rounds": args.rounds,
            "py_spy_rate_hz": args.rate,
            "server_cpu": measured["server_cpu"],
            "wrk_cpu": measured["wrk_cpu"],
            "engine_env": {**PROFILE_ENV, **dict(item.split("=", 1) for item in args.engine_env)},
        },
        "cpu_us_per_quote": round(us_per_quote, 2),
        "requests_per_sec": statistics.median(run["requests_per_sec"] for run in measured["plain"]),
        "profiled_cpu_us_per_quote": round(
            statistics.median(run["cpu_us_per_request"] for run in measured["profiled"]), 2
        ),
        "profiled_requests_per_sec": statistics.median(
            run["requests_per_sec"] for run in measured["profiled"]
        ),
        "samples": sum(count for _, count in stacks),
        "errors": errors,
        "profiled_socket_errors": profiled_socket_errors,
        "layers": layers,
        "hotspots": hotspot_table(hotspot_counts(stacks), us_per_quote),
        "hot_lines": [
            {**row, "source": _line_text(row["function"])}
            for row in hotspot_table(hotspot_counts(stacks, by_line=True), us_per_quote, top=25)
        ],
        "before": None
        if before is None
        else {
            "cpu_us_per_quote": before.get("cpu_us_per_quote"),
            "requests_per_sec": before.get("requests_per_sec"),
            "git_commit": before.get("git_commit"),
            "generated": before.get("generated"),
            "note": before.get("note"),
        },
        "runs": [*measured["plain"], *measured["profiled"]],
        "git_commit": _git_commit(),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _line_text(label: str) -> str:
    """The source text of a `function (file:line)` hot-line label."""
    match = re.search(r"\((?P<file>[^()]*):(?P<line>\d+)\)$", label)
    return "" if match is None else source_line(match["file"], int(match["line"])).strip()


def _git_commit() -> str | None:
    completed = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return completed.stdout.strip() or None


def render(document: Mapping[str, Any]) -> str:
    has_before = document.get("before") is not None
    header = f"{'layer':<46} {'µs/quote':>9} {'share':>7}" + (
        f" {'before':>9} {'change':>8}" if has_before else ""
    )
    lines = [header, "-" * len(header)]
    for row in document["layers"]:
        line = f"{row['layer']:<46} {row['us_per_quote']:>9.1f} {row['share_percent']:>6.1f}%"
        if has_before:
            before = row.get("before_us_per_quote")
            change = row.get("change_us")
            before_text = "-" if before is None else f"{before:.1f}"
            change_text = "-" if change is None else f"{change:+.1f}"
            line += f" {before_text:>9} {change_text:>8}"
        lines.append(line)
    lines.append(f"{'total (server CPU per quote)':<46} {document['cpu_us_per_quote']:>9.1f} {100:>6.1f}%")
    lines += [
        "",
        "Top functions (deepest frame of pricer/uvicorn/starlette, library frames below it included):",
    ]
    for row in document["hotspots"]:
        lines.append(f"  {row['us_per_quote']:>7.1f} µs  {row['share_percent']:>5.1f}%  {row['function']}")
    lines += ["", "Top lines:"]
    for row in document.get("hot_lines", []):
        lines.append(
            f"  {row['us_per_quote']:>7.1f} µs  {row['share_percent']:>5.1f}%  {row['function']}"
            f"  {row['source']}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", default="12s", help="each measured run, wrk -d syntax (12s)")
    parser.add_argument("--warmup", default="3s", help="warm-up before each round (3s)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of unprofiled + profiled runs (2)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (100)")
    parser.add_argument("--server-cpu", default="0", help="CPU list for the engine (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="CPU list for wrk and py-spy (taskset -c)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--engine-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--before", type=Path, default=BEFORE_FILE, help="the saved run of the before column")
    parser.add_argument("--save-before", action="store_true", help="write this run to --before as well")
    parser.add_argument("--raw-out", type=Path, help="write py-spy's collapsed stacks here")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("profile_single: --rounds must be at least 1", file=sys.stderr)
        return 2
    py_spy = find_py_spy()
    if py_spy is None:
        print("profile_single: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    before = None
    if not args.save_before and args.before.exists():
        before = json.loads(args.before.read_text())
    with tempfile.TemporaryDirectory(prefix="profile-single-") as tmp:
        measured = measure(args, py_spy, Path(tmp))
    document = build_document(measured, args, before)
    print()
    print(render(document))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"Results written to {args.json}")
    if args.save_before:
        saved = {key: value for key, value in document.items() if key != "runs"}
        args.before.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"Saved as the before run: {args.before}")
    return 0 if document["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
