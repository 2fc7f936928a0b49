"""Single-quote HTTP benchmark: the engine against a FastAPI + pydantic + Decimal baseline.

Both servers run as real processes (uvicorn, uvloop, httptools, one worker, access log off), pinned to
the same CPU (`taskset -c 0`); wrk drives one of them at a time from another CPU (`taskset -c 1`).
Runs are interleaved (engine, baseline, engine, baseline, ...) with a warm-up before each measured
run, and the medians over the rounds are compared. Before measuring, every request body is sent to
both servers once and their figures must agree, so both do the same work.

    python benchmarks/bench_http.py --duration 10s --connections 32 --rounds 2 --json out.json

Any non-2xx response or socket error makes the run invalid (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pricer.settings import SETTING_NAMES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA_SCRIPT = HERE / "wrk_quote.lua"
BASELINE_SCRIPT = HERE / "baseline_fastapi.py"
RAW_SCRIPT = HERE / "baseline_raw_asgi.py"
QUOTE_PATH = "/api/v1/calculate-locate"
PERCENTILES = (50, 75, 90, 99)
TARGETS = ("engine", "baseline", "raw", "backends")
# `backends`: the same engine in its production shape (PostgreSQL stores and audit trail, Redis rate limiter,
# shared rate cache and invalidation bus), on a throwaway schema; left out with --no-backends.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
CLIENT_ID = "demo_client"
# A generator using more than this share of its CPU may be what limits the measured rate.
GENERATOR_BUSY_PERCENT = 90.0
# A saturated server below this share of its CPU was competing with other processes.
SERVER_STARVED_PERCENT = 90.0

# The request bodies wrk sends in rotation: easy, hard (with an event), a class share, the fallback,
# a percentage-free FLAT client; odd cents and long loans so the rounding paths are exercised.
DEFAULT_BODIES: tuple[dict[str, Any], ...] = (
    {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": CLIENT_ID},
    {"ticker": "GME", "position_value": 2500000.5, "loan_days": 7, "client_id": CLIENT_ID},
    {"ticker": "BRK B", "position_value": 1001.37, "loan_days": 365, "client_id": CLIENT_ID},
    {"ticker": "TSLA", "position_value": 987654.32, "loan_days": 90, "client_id": CLIENT_ID},
    {"ticker": "XYZQ", "position_value": 50000, "loan_days": 1, "client_id": CLIENT_ID},
    {"ticker": "amc", "position_value": 0.07, "loan_days": 200, "client_id": CLIENT_ID},
)
# Response fields that must agree between the engine and the baseline (ids and clocks differ).
COMPARED_FIELDS = (
    "status",
    "ticker",
    "client_id",
    "position_value",
    "loan_days",
    "fee_schedule",
    "total_fee",
    "breakdown",
    "borrow_rate_used",
)
COMPARED_RATE_FIELDS = (
    "base_rate",
    "volatility_index",
    "volatility_adjustment",
    "event_risk_factor",
    "event_adjustment",
    "min_rate",
    "borrow_status",
    "source",
    "is_fallback",
)

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_METRIC_UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h)\s*$")
_METRIC = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kMGT]?)\s*$")
_PERCENTILE_LINE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)%\s+([0-9]*\.?[0-9]+(?:us|ms|s|m|h))\s*$")
_LATENCY_LINE = re.compile(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)%\s*$")
_REQUESTS_PER_SEC = re.compile(r"^\s*Requests/sec:\s+([0-9]*\.?[0-9]+)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"^\s*([0-9]+) requests in ([0-9.]+(?:us|ms|s|m|h)),", re.MULTILINE)
_NON_2XX_3XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+([0-9]+)\s*$", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)"
)
_LUA_LINE = re.compile(r"^wrk_quote:(.*)$", re.MULTILINE)


def parse_time_ms(text: str) -> float:
    """A wrk duration (`850.00us`, `1.23ms`, `1.2s`, `2.00m`) in milliseconds."""
    match = _TIME.match(text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_metric(text: str) -> float:
    """A wrk count with an optional metric suffix (`10.01k`, `1.2M`, `500.00`)."""
    match = _METRIC.match(text)
    if match is None:
        raise ValueError(f"not a wrk count: {text!r}")
    return float(match.group(1)) * _METRIC_UNITS[match.group(2)]


def parse_duration_arg(text: str) -> float:
    """A wrk `-d` argument (`10s`, `2m`, `500ms`, bare seconds) in seconds."""
    stripped = text.strip()
    if re.fullmatch(r"[0-9]*\.?[0-9]+", stripped):
        return float(stripped)
    return parse_time_ms(stripped) / 1000.0


@dataclass
class WrkResult:
    requests_per_sec: float
    total_requests: int
    duration_s: float
    latency_ms: dict[int, float]  # percentile -> milliseconds
    latency_avg_ms: float | None = None
    latency_stdev_ms: float | None = None
    latency_max_ms: float | None = None
    non_2xx_3xx: int = 0  # wrk's own count (status > 399 in wrk 4.x)
    socket_errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    lua: dict[str, int] = field(default_factory=dict)  # the wrk_quote.lua `done` line

    @property
    def non_2xx(self) -> int:
        """Responses outside 2xx: the Lua count when the script reported, else wrk's own."""
        return self.lua.get("non2xx", self.non_2xx_3xx)

    @property
    def unexpected(self) -> int:
        """Responses with another status than the run expected (BENCH_EXPECT_STATUS, else any 2xx)."""
        return self.lua.get("unexpected", self.non_2xx)

    @property
    def errors(self) -> int:
        return self.unexpected + sum(self.socket_errors.values())

    @property
    def valid(self) -> bool:
        return self.errors == 0 and self.total_requests > 0


def parse_wrk_output(text: str) -> WrkResult:
    """wrk 4.x (`--latency`) output; also accepts wrk2's `50.000%` percentile lines."""
    rps = _REQUESTS_PER_SEC.search(text)
    if rps is None:
        raise ValueError("no `Requests/sec:` line in wrk output")
    latency: dict[int, float] = {}
    avg = stdev = maximum = None
    in_distribution = False
    for line in text.splitlines():
        if line.strip().startswith("Latency Distribution"):
            in_distribution = True
            continue
        percentile = _PERCENTILE_LINE.match(line)
        if in_distribution and percentile is not None:
            value = float(percentile.group(1))
            if value.is_integer():
                latency[int(value)] = parse_time_ms(percentile.group(2))
            continue
        stats = _LATENCY_LINE.match(line)
        if stats is not None and avg is None:
            avg, stdev, maximum = (parse_time_ms(stats.group(i)) for i in (1, 2, 3))
    total = _TOTAL.search(text)
    non = _NON_2XX_3XX.search(text)
    sockets = _SOCKET_ERRORS.search(text)
    lua_line = _LUA_LINE.search(text)
    lua: dict[str, int] = {}
    if lua_line is not None:
        for part in lua_line.group(1).split():
            name, _, value = part.partition("=")
            if value.isdigit():
                lua[name] = int(value)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        total_requests=int(total.group(1)) if total else 0,
        duration_s=parse_time_ms(total.group(2)) / 1000.0 if total else 0.0,
        latency_ms=latency,
        latency_avg_ms=avg,
        latency_stdev_ms=stdev,
        latency_max_ms=maximum,
        non_2xx_3xx=int(non.group(1)) if non else 0,
        socket_errors=(
            dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups()), strict=True))
            if sockets
            else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
        ),
        lua=lua,
    )


def verdict(value: float | None, limit: float, op: str, *, valid: bool = True) -> str:
    """PASS / MISS of `value op limit` (op `<=` or `>=`); n/a without a value, INVALID for a bad run."""
    if not valid:
        return "INVALID"
    if value is None:
        return "n/a"
    if op == "<=":
        return "PASS" if value <= limit else "MISS"
    if op == ">=":
        return "PASS" if value >= limit else "MISS"
    raise ValueError(f"unknown comparison {op!r}")


def make_target(
    name: str, value: float | None, limit: float, op: str, unit: str, *, valid: bool = True, note: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "op": op,
        "unit": unit,
        "verdict": verdict(value, limit, op, valid=valid),
        "note": note,
    }


def http_targets(summary: Mapping[str, Any], valid: bool) -> list[dict[str, Any]]:
    """Issue 6's full-stack targets on the saturated (throughput) load."""
    block = summary.get("loads", {}).get("throughput")
    if block is None:
        return []
    vs_baseline = block["engine_vs_baseline"]["throughput_ratio"]
    vs_raw = (block.get("engine_vs_raw") or {}).get("throughput_ratio")
    backends = (block.get("backends_vs_baseline") or {}).get("throughput_ratio")
    with_backends = [
        make_target(
            "single quote, Redis limiter + PostgreSQL stores and audit: req/s engine / FastAPI baseline",
            backends,
            2.5,
            ">=",
            "x",
            valid=valid,
        )
    ]
    return [
        make_target(
            "single quote, full stack on embedded defaults: req/s engine / FastAPI baseline",
            vs_baseline,
            3,
            ">=",
            "x",
            valid=valid,
            note="stretch >= 4x",
        ),
        make_target(
            "single quote, full stack: req/s engine / raw-ASGI ceiling (stretch)",
            None if vs_raw is None else round(100 * vs_raw, 1),
            55,
            ">=",
            "%",
            valid=valid,
        ),
        *(with_backends if backends is not None else []),
    ]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def cpu_percent(cpu_seconds: float, wall_seconds: float) -> float | None:
    """CPU time over wall time, in percent of one core."""
    return 100.0 * cpu_seconds / wall_seconds if wall_seconds > 0 else None


def cpu_us_per_request(cpu_seconds: float | None, requests: int | None) -> float | None:
    """CPU seconds spent over a run divided by the requests answered in it, in microseconds."""
    if cpu_seconds is None or not requests or requests <= 0:
        return None
    return cpu_seconds / requests * 1e6


def parse_proc_stat_cpu(stat_text: str, clock_ticks: int) -> float:
    """utime + stime in seconds from the text of /proc/<pid>/stat (the command may contain spaces)."""
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    # After the command: state is field 3 of the full line, so utime (14) and stime (15) are at 11, 12.
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def parse_cpu_list(text: str) -> list[int]:
    """A taskset CPU list (`0`, `0,2`, `1-3`) as CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        cpus += list(range(int(low), int(high) + 1)) if sep else [int(low)]
    return cpus


def parse_proc_stat_cpus(stat_text: str) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU from the text of /proc/stat (idle and iowait are not busy)."""
    times: dict[int, tuple[int, int]] = {}
    for line in stat_text.splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        numbers = [int(value) for value in values[:8]]  # user nice system idle iowait irq softirq steal
        total = sum(numbers)
        times[int(name[3:])] = (total - numbers[3] - numbers[4], total)
    return times


def busy_percent(
    before: Mapping[int, tuple[int, int]], after: Mapping[int, tuple[int, int]], cpus: Iterable[int]
) -> float | None:
    """How busy the CPUs were between two /proc/stat readings, in percent of their capacity."""
    busy = total = 0
    for cpu in cpus:
        if cpu in before and cpu in after:
            busy += after[cpu][0] - before[cpu][0]
            total += after[cpu][1] - before[cpu][1]
    return 100.0 * busy / total if total > 0 else None


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one target at one load: req/s, percentiles, CPU of both sides."""
    return {
        "rounds": len(runs),
        "requests_per_sec": median_or_none(run["requests_per_sec"] for run in runs),
        "latency_ms": {
            f"p{p}": median_or_none(run["latency_ms"].get(f"p{p}") for run in runs) for p in PERCENTILES
        },
        "server_cpu_percent": median_or_none(run.get("server_cpu_percent") for run in runs),
        "wrk_cpu_percent": median_or_none(run.get("wrk_cpu_percent") for run in runs),
        "server_cpus_busy_percent": median_or_none(run.get("server_cpus_busy_percent") for run in runs),
        "max_wrk_cpu_percent": max(
            (run["wrk_cpu_percent"] for run in runs if run.get("wrk_cpu_percent") is not None),
            default=None,
        ),
        "max_server_rss_mb": max(
            (run["server_rss_mb"] for run in runs if run.get("server_rss_mb") is not None), default=None
        ),
        "errors": sum(run["errors"] for run in runs),
    }


def compare(engine: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """engine / baseline for throughput and each latency percentile (latency: lower is better)."""
    return {
        "throughput_ratio": ratio(engine["requests_per_sec"], baseline["requests_per_sec"]),
        "latency_ratio": {
            name: ratio(engine["latency_ms"][name], baseline["latency_ms"][name])
            for name in engine["latency_ms"]
        },
    }


def per_round_ratios(
    engine_runs: Sequence[Mapping[str, Any]], baseline_runs: Sequence[Mapping[str, Any]]
) -> list[float | None]:
    """Throughput ratio of each round (the engine and baseline runs of the same round)."""
    return [
        ratio(e["requests_per_sec"], b["requests_per_sec"])
        for e, b in zip(engine_runs, baseline_runs, strict=False)
    ]


def figures_mismatch(engine: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Fields of two quote responses that should agree but do not."""
    problems = []
    for name in COMPARED_FIELDS:
        if engine.get(name) != baseline.get(name):
            problems.append(f"{name}: engine {engine.get(name)!r} != baseline {baseline.get(name)!r}")
    engine_rate, baseline_rate = engine.get("rate") or {}, baseline.get("rate") or {}
    for name in COMPARED_RATE_FIELDS:
        if engine_rate.get(name) != baseline_rate.get(name):
            problems.append(
                f"rate.{name}: engine {engine_rate.get(name)!r} != baseline {baseline_rate.get(name)!r}"
            )
    return problems


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_number(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


# ---- machine facts ------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def wrk_version(wrk: str) -> str:
    completed = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (completed.stdout + completed.stderr).strip().splitlines()
    return first[0] if first else "unknown"


def machine_facts(wrk: str | None) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "versions": {
            name: _version(name)
            for name in (
                "borrow-rate-engine",
                "uvicorn",
                "uvloop",
                "httptools",
                "starlette",
                "msgspec",
                "numpy",
                "fastapi",
                "pydantic",
                "pydantic-core",
            )
        },
        "wrk": wrk_version(wrk) if wrk else None,
        "generator_priority": f"SCHED_FIFO (chrt -f {GENERATOR_PRIORITY})"
        if realtime_allowed()
        else "normal",
        "cpu_idle": cpu_idle_facts(),
    }


# ---- processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    key: str
    log_path: Path

    def cpu_seconds(self) -> float:
        return parse_proc_stat_cpu(
            Path(f"/proc/{self.process.pid}/stat").read_text(), os.sysconf("SC_CLK_TCK")
        )

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pinned(cpu: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if cpu is not None else command


GENERATOR_PRIORITY = 50  # SCHED_FIFO priority of the load generators (chrt -f)


@functools.cache
def realtime_allowed() -> bool:
    """Whether this user may run a process under SCHED_FIFO (root, or CAP_SYS_NICE); off with
    BENCH_GENERATOR_REALTIME=0."""
    if os.environ.get("BENCH_GENERATOR_REALTIME", "1") == "0" or shutil.which("chrt") is None:
        return False
    probe = subprocess.run(["chrt", "-f", str(GENERATOR_PRIORITY), "true"], capture_output=True, check=False)
    return probe.returncode == 0


def generator(cpu: str | None, command: list[str], *, realtime: bool = True) -> list[str]:
    """A load generator's command line: pinned to its CPU and, where allowed, under SCHED_FIFO. PostgreSQL
    and Redis run on the generator's CPU too (the engine has the other one to itself); in a database's
    burst (an audit write takes ~1.5 ms of its CPU) a generator at normal priority waited for that CPU and
    the engine ran out of requests (idle ~10 % of a closed-loop run, requests late in an open loop): the
    generator's own stall, not the engine's. Real-time priority lets it preempt them at once; it is never
    busy enough (13-55 % of its CPU) to starve them."""
    if realtime and realtime_allowed():
        command = ["chrt", "-f", str(GENERATOR_PRIORITY), *command]
    return pinned(cpu, command)


CPU_LATENCY_DEVICE = Path("/dev/cpu_dma_latency")  # Linux PM QoS: how slowly an idle CPU may wake
CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")


@contextlib.contextmanager
def cpu_latency_qos(enabled: bool = True, device: Path = CPU_LATENCY_DEVICE) -> Iterator[bool]:
    """While open, holds the kernel's CPU latency QoS at 0 µs if `enabled` and allowed (root); yields whether
    it is held. An idle CPU then polls for work instead of halting: the setting of a host tuned for latency
    (tuned's latency-performance and network-latency profiles hold it the same way, through this device).
    The latency benchmarks hold it only when asked (`--latency-qos`). On this VM a request that finds the
    server's vCPU halted (and the client's, for the answer) pays a halt exit and a cross-CPU interrupt,
    which an open loop at half capacity pays on nearly every request: held, the raw-ASGI floor at 7,000
    req/s spent 48 µs of CPU per request instead of 85, the engine ran 74-81 % busy instead of 87-93 %.
    But polling vCPUs cost the host CPU time, and the host then stalled the busy vCPU more often (a
    spinner on CPU 0 saw 17-23 gaps over 0.5 ms in 15 s, up to 16 ms, against 0-2 of at most 0.56 ms),
    so its tails were not better in a full run. The request is dropped when the device is closed, even by
    a kill."""
    try:
        fd = os.open(device, os.O_WRONLY) if enabled else None
    except OSError:
        fd = None
    if fd is None:
        yield False
        return
    try:
        os.write(fd, struct.pack("=i", 0))
        yield True
    finally:
        os.close(fd)


def cpu_idle_facts() -> str:
    """The kernel's idle driver and governor, and CPU 0's idle states with their exit latencies."""
    try:
        driver = (CPUIDLE / "current_driver").read_text().strip()
        governor_file = CPUIDLE / "current_governor_ro"  # older kernels: current_governor only
        if not governor_file.exists():
            governor_file = CPUIDLE / "current_governor"
        governor = governor_file.read_text().strip()
    except OSError:
        return "unknown"
    states = []
    for state in sorted((CPUIDLE.parent / "cpu0" / "cpuidle").glob("state*")):
        try:
            states.append(
                f"{(state / 'name').read_text().strip()} {(state / 'latency').read_text().strip()} µs"
            )
        except OSError:
            continue
    return f"driver {driver}, governor {governor}; CPU 0's states (exit latency): {', '.join(states)}"


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            status: int = response.status
            return status
    except (urllib.error.URLError, OSError):
        return None


def wait_ready(server: Server, ready: Path | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        if _get_status(server.url + "/health") == 200 and (ready is None or ready.exists()):
            return
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} did not become ready in {timeout:.0f}s:\n{server.log_tail()}")


# Inherited variables that would change what a server does: every server starts from the environment
# without them (plus what the benchmark sets). The engine's settings (src/pricer/settings.py), OpenTelemetry's
# and the benchmarks' own.
ENGINE_SETTINGS = SETTING_NAMES
ENGINE_ENV_PREFIXES = ("PRICER_", "BENCH_", "BASELINE_", "OTEL_")


def _clean_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name not in ENGINE_SETTINGS and not name.startswith(ENGINE_ENV_PREFIXES)
    }


def start_engine(
    workdir: Path,
    cpu: str | None,
    extra_env: Mapping[str, str],
    *,
    name: str = "engine",
    key: str | None = None,
    quiet_stdout: bool = False,
) -> Server:
    """Start `python -m pricer serve` and wait until it answers.

    Without `key` the engine seeds its demo data and its demo client key is read from the keys file it
    writes; with `key` (an engine on a database seeded beforehand, which writes no keys file) that key is
    used. `quiet_stdout` sends the server's stdout to /dev/null (a console span exporter), stderr still
    going to the log."""
    port = free_port()
    keys_file = workdir / f"{name}-demo-keys.env"
    log_path = workdir / f"{name}.log"
    env = {
        **_clean_environment(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": str(keys_file),
        "LOG_LEVEL": "WARNING",
        # The baseline has no rate limiter; the engine keeps its limiter on (it pays its cost) with a limit
        # no benchmark reaches.
        "RATE_LIMIT_PER_MINUTE": "10000000",
        "RATE_LIMIT_BURST": "10000000",
        **extra_env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            pinned(cpu, [sys.executable, "-m", "pricer", "serve"]),
            env=env,
            stdout=subprocess.DEVNULL if quiet_stdout else log,
            stderr=log if quiet_stdout else subprocess.STDOUT,
            cwd=workdir,
        )
    server = Server(name, process, f"http://127.0.0.1:{port}", key or "", log_path)
    wait_ready(server, None if key else keys_file)
    if not key:
        server.key = read_env_file(keys_file)["DEMO_CLIENT_KEY"]
    return server


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=VALUE lines (the demo keys file) as a dict."""
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def start_baseline(workdir: Path, cpu: str | None, *, name: str = "baseline") -> Server:
    """The FastAPI baseline, or (name="raw") the bare ASGI ceiling, with a random key of its own."""
    import secrets
    import string

    port = free_port()
    log_path = workdir / f"{name}.log"
    key_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    key = f"bre_{key_id}_{secret}"
    env = {
        **_clean_environment(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "BASELINE_API_KEY": key,
        "BASELINE_CLIENT_ID": CLIENT_ID,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            pinned(cpu, [sys.executable, str(RAW_SCRIPT if name == "raw" else BASELINE_SCRIPT)]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = Server(name, process, f"http://127.0.0.1:{port}", key, log_path)
    wait_ready(server)
    return server


def post_quote(server: Server, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        server.url + QUOTE_PATH,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": server.key},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def check_same_figures(engine: Server, baseline: Server, bodies: Sequence[Mapping[str, Any]]) -> list[str]:
    problems = []
    for body in bodies:
        engine_status, engine_json = post_quote(engine, body)
        baseline_status, baseline_json = post_quote(baseline, body)
        if engine_status != 200 or baseline_status != 200:
            problems.append(f"{body}: engine {engine_status} {engine_json}, baseline {baseline_status}")
            continue
        problems += [
            f"{body['ticker']}: {problem}" for problem in figures_mismatch(engine_json, baseline_json)
        ]
    return problems


# ---- wrk -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    load: str
    round: int
    connections: int
    result: WrkResult
    wall_s: float
    wrk_cpu_s: float
    server_cpu_s: float
    server_rss_mb: float | None
    command: str
    rate: float | None = None
    server_cpus_busy: float | None = None
    wrk_cpus_busy: float | None = None
    delay_ms: float | None = None  # paced mode: each connection's wait between requests
    extra: dict[str, Any] = field(default_factory=dict)  # what a caller measured around the run

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self.result)
        return {
            "target": self.target,
            "load": self.load,
            "round": self.round,
            "connections": self.connections,
            "rate": self.rate,
            "requests_per_sec": self.result.requests_per_sec,
            "total_requests": self.result.total_requests,
            "latency_ms": {f"p{p}": self.result.latency_ms.get(p) for p in PERCENTILES},
            "latency_avg_ms": result["latency_avg_ms"],
            "latency_max_ms": result["latency_max_ms"],
            "non_2xx": self.result.non_2xx,
            "socket_errors": self.result.socket_errors,
            "errors": self.result.errors,
            "valid": self.result.valid,
            "wall_s": self.wall_s,
            "wrk_cpu_percent": cpu_percent(self.wrk_cpu_s, self.wall_s),
            "server_cpu_percent": cpu_percent(self.server_cpu_s, self.wall_s),
            "server_rss_mb": self.server_rss_mb,
            "server_cpu_s": self.server_cpu_s,
            "cpu_us_per_request": cpu_us_per_request(self.server_cpu_s, self.result.total_requests),
            "delay_ms": self.delay_ms,
            **self.extra,
            # Whole-CPU busy share: above the server's own CPU it shows other load on the server's CPU
            # (loopback network work is partly accounted here too).
            "server_cpus_busy_percent": self.server_cpus_busy,
            "wrk_cpus_busy_percent": self.wrk_cpus_busy,
            "command": self.command,
        }


class Driver:
    def __init__(
        self,
        wrk: str,
        wrk_cpu: str | None,
        bodies_file: Path,
        *,
        paced_wrk: str | None,
        server_cpu: str | None,
        path: str = QUOTE_PATH,
    ) -> None:
        self.path = path
        self.wrk = wrk
        self.wrk_cpu = wrk_cpu
        self.server_cpus = parse_cpu_list(server_cpu) if server_cpu is not None else []
        self.wrk_cpus = parse_cpu_list(wrk_cpu) if wrk_cpu is not None else []
        self.bodies_file = bodies_file
        self.paced_wrk = paced_wrk

    def command(
        self, server: Server, connections: int, duration: str, *, rate: float | None = None
    ) -> list[str]:
        binary = self.paced_wrk if rate is not None and self.paced_wrk else self.wrk
        args = [binary, "-t1", f"-c{connections}", f"-d{duration}", "--latency", "-s", str(LUA_SCRIPT)]
        if rate is not None:
            args += ["-R", str(max(1, round(rate)))]
        return generator(self.wrk_cpu, [*args, server.url + self.path])

    def run(
        self,
        server: Server,
        *,
        target: str,
        load: str,
        round_number: int,
        connections: int,
        duration: str,
        rate: float | None = None,
        delay_ms: float | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Run:
        """One wrk run against `server`; `delay_ms` paces each connection (wrk_quote.lua's delay())."""
        command = self.command(server, connections, duration, rate=rate)
        env = {
            **os.environ,
            "BENCH_API_KEY": server.key,
            "BENCH_BODIES_FILE": str(self.bodies_file),
            "BENCH_PATH": self.path,
            **({"BENCH_DELAY_MS": f"{delay_ms:.4f}"} if delay_ms is not None else {}),
            **(extra_env or {}),
        }
        server_before = server.cpu_seconds()
        cpus_before = read_cpu_times()
        started = time.monotonic()
        with tempfile.TemporaryFile() as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            # wait4 gives the generator's own CPU time (taskset execs wrk, so it is the same process).
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.monotonic() - started
            server_after = server.cpu_seconds()
            cpus_after = read_cpu_times()
            out.seek(0)
            text = out.read().decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"wrk failed ({process.returncode}): {' '.join(command)}\n{text}")
        try:
            result = parse_wrk_output(text)
        except ValueError as error:
            raise RuntimeError(f"unreadable wrk output ({error}):\n{text}") from None
        return Run(
            target=target,
            load=load,
            round=round_number,
            connections=connections,
            result=result,
            wall_s=wall,
            wrk_cpu_s=usage.ru_utime + usage.ru_stime,
            server_cpu_s=server_after - server_before,
            server_rss_mb=server.rss_mb(),
            command=display_command(command),
            rate=rate,
            server_cpus_busy=busy_percent(cpus_before, cpus_after, self.server_cpus),
            wrk_cpus_busy=busy_percent(cpus_before, cpus_after, self.wrk_cpus),
            delay_ms=delay_ms,
        )


def read_cpu_times() -> dict[int, tuple[int, int]]:
    try:
        return parse_proc_stat_cpus(Path("/proc/stat").read_text())
    except OSError:
        return {}


def idle_check(cpus: Sequence[int], seconds: float = 2.0) -> float | None:
    """How busy the given CPUs are with nothing of ours running (other load skews the figures)."""
    before = read_cpu_times()
    time.sleep(seconds)
    return busy_percent(before, read_cpu_times(), cpus)


def note_busy_cpus(
    facts: dict[str, Any], server_cpu: str | None, wrk_cpu: str | None, notes: list[str], seconds: float = 2.0
) -> None:
    """Measure how busy the benchmark's CPUs are before it starts; note it when other work competes."""
    measured_cpus = sorted(set(parse_cpu_list(server_cpu or "") + parse_cpu_list(wrk_cpu or ""))) or list(
        range(os.cpu_count() or 1)
    )
    facts["busy_before_start_percent"] = idle_check(measured_cpus, seconds=seconds)
    if (facts["busy_before_start_percent"] or 0) > 10:
        notes.append(
            f"Before starting, CPUs {measured_cpus} were {facts['busy_before_start_percent']:.0f}% busy with "
            "other work: the figures may be depressed and noisy."
        )


def note_run_health(runs: Sequence[Run], notes: list[str], starved_cause: str = "other processes") -> None:
    """Notes on measured runs whose generator was saturated, or whose server was starved of its CPU."""
    busy_generator = [
        r
        for r in runs
        if (cpu_percent(r.wrk_cpu_s, r.wall_s) or 0) > GENERATOR_BUSY_PERCENT and r.load != "warmup"
    ]
    if busy_generator:
        notes.append(
            f"wrk used more than {GENERATOR_BUSY_PERCENT:.0f}% of its CPU in {len(busy_generator)} run(s): "
            "the generator may have limited those figures."
        )
    starved = [
        r
        for r in runs
        if r.load == "throughput" and (cpu_percent(r.server_cpu_s, r.wall_s) or 0) < SERVER_STARVED_PERCENT
    ]
    if starved:
        notes.append(
            f"In {len(starved)} throughput run(s) the server used less than "
            f"{SERVER_STARVED_PERCENT:.0f}% of its CPU although wrk kept it busy: {starved_cause} competed "
            "for that CPU, so those figures are depressed and noisy; rerun on a quiet machine."
        )


def display_command(command: Sequence[str]) -> str:
    """A wrk command as typed from the repository root: bare `wrk`, relative script, no port."""
    shown = []
    for part in command:
        if part in (shutil.which("wrk"), shutil.which("wrk2")):
            part = Path(part).name
        elif part == str(LUA_SCRIPT):
            part = str(LUA_SCRIPT.relative_to(ROOT))
        elif part.startswith("http://127.0.0.1:"):
            part = re.sub(r":[0-9]+/", ":<port>/", part)
        shown.append(part)
    return " ".join(shown)


def find_paced_wrk(wrk: str) -> str | None:
    """A wrk with a constant-rate option (`-R`, wrk2), or None: Debian's wrk 4.1 has none."""
    candidate = shutil.which("wrk2")
    if candidate:
        return candidate
    completed = subprocess.run([wrk, "--help"], capture_output=True, text=True, check=False)
    if re.search(r"^\s*-R,?\s", completed.stdout + completed.stderr, re.MULTILINE):
        return wrk
    return None


# ---- main ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", default="10s", help="measured run length, wrk -d syntax (default 10s)")
    parser.add_argument("--warmup", default="3s", help="warm-up run length before each measured run")
    parser.add_argument("--connections", type=int, default=32, help="connections for throughput (32)")
    parser.add_argument(
        "--light-connections", type=int, default=4, help="connections for the low-concurrency latency (4)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, medians taken (>=2)")
    parser.add_argument("--server-cpu", default="0", help="CPU list for both servers (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="CPU list for wrk (taskset -c)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--engine-env", action="append", default=[], metavar="NAME=VALUE", help="extra engine setting"
    )
    parser.add_argument(
        "--no-backends", action="store_true", help="leave out the engine on PostgreSQL + Redis (`backends`)"
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="for `backends`")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="for `backends`")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def prepare_backends(workdir: Path, database_url: str, redis_url: str) -> tuple[dict[str, str], str, str]:
    """A throwaway schema, migrated and seeded with the demo data (an engine on a database does not seed
    itself): the `backends` engine's settings, its demo client key and the schema (dropped by the caller)."""
    import secrets

    schema = f"bench_http_{secrets.token_hex(4)}"
    settings = {
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": schema,
        "REDIS_URL": redis_url,
        "AUDIT_SPOOL_DIR": str(workdir / "backends-spool"),
        "API_KEY_PEPPER": secrets.token_urlsafe(32),
        "JWT_SECRET_KEY": secrets.token_urlsafe(48),
    }
    keys_file = workdir / "backends-demo-keys.env"
    env = {**_clean_environment(), **settings, "DEMO_KEYS_FILE": str(keys_file), "LOG_LEVEL": "WARNING"}
    for command in ("migrate", "seed-demo"):
        subprocess.run(
            [sys.executable, "-m", "pricer", command], env=env, cwd=workdir, check=True, capture_output=True
        )
    return settings, read_env_file(keys_file)["DEMO_CLIENT_KEY"], schema


def drop_schema(database_url: str, schema: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _DROP_SCHEMA, database_url, schema],
        check=False,
        capture_output=True,
        timeout=60,
    )


_DROP_SCHEMA = """
import asyncio, sys, asyncpg
async def main():
    connection = await asyncpg.connect(sys.argv[1])
    try:
        await connection.execute('DROP SCHEMA IF EXISTS "%s" CASCADE' % sys.argv[2])
    finally:
        await connection.close()
asyncio.run(main())
"""


def _facts_lines(facts: Mapping[str, Any]) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if version)
    return [
        f"CPU: {facts['cpu_model']} (nproc {facts['nproc']}, {facts['cpus_available']} available), "
        f"kernel {facts['kernel']}, load average at start "
        + ", ".join(f"{x:.2f}" for x in facts["loadavg_at_start"])
        + f"; measured CPUs {format_number(facts.get('busy_before_start_percent'), '.0f')}% busy "
        "before start",
        f"Python {facts['python']} ({facts['python_implementation']}); {versions}",
        f"Generator: {facts['wrk']}; its priority: {facts['generator_priority']}",
    ]


def describe_run(run: Run) -> str:
    rate = f" at {run.rate:.0f}/s" if run.rate is not None else ""
    return (
        f"round {run.round} {run.load:<10} {run.target:<8} c={run.connections:<3}{rate} "
        f"{run.result.requests_per_sec:>9.0f} req/s  p50 {run.result.latency_ms.get(50, 0):.2f} ms  "
        f"p99 {run.result.latency_ms.get(99, 0):.2f} ms  non-2xx+socket errors {run.result.errors}  "
        f"wrk CPU {cpu_percent(run.wrk_cpu_s, run.wall_s) or 0:.0f}%  "
        f"server CPU {cpu_percent(run.server_cpu_s, run.wall_s) or 0:.0f}%"
    )


def render_table(summary: Mapping[str, Any]) -> str:
    header = (
        f"{'load':<22} {'server':<9} {'req/s':>8} {'p50 ms':>8} {'p75 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'srv CPU':>8} {'wrk CPU':>8} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for block in summary["loads"].values():
        for target in TARGETS:
            s = block.get(target)
            if s is None:
                continue
            lat = s["latency_ms"]
            lines.append(
                f"{block['label']:<22} {target:<9} {format_number(s['requests_per_sec']):>8} "
                + " ".join(f"{format_number(lat[f'p{p}'], '.2f'):>8}" for p in PERCENTILES)
                + f" {format_number(s['server_cpu_percent'], '.0f') + '%':>8}"
                f" {format_number(s['wrk_cpu_percent'], '.0f') + '%':>8} {s['errors']:>6}"
            )
        cmp = block["engine_vs_baseline"]
        lines.append(
            f"{'':<22} {'ratio':<9} {format_ratio(cmp['throughput_ratio']):>8} "
            + " ".join(f"{format_ratio(cmp['latency_ratio'][f'p{p}']):>8}" for p in PERCENTILES)
            + "   (engine/baseline; per round: "
            + ", ".join(format_ratio(r) for r in block["per_round_ratio"])
            + ")"
        )
        raw_cmp = block.get("engine_vs_raw")
        if raw_cmp:
            lines.append(
                f"{'':<22} {'ratio':<9} {format_ratio(raw_cmp['throughput_ratio']):>8} "
                + " ".join(f"{format_ratio(raw_cmp['latency_ratio'][f'p{p}']):>8}" for p in PERCENTILES)
                + "   (engine/raw ASGI ceiling; per round: "
                + ", ".join(format_ratio(r) for r in block.get("per_round_ratio_vs_raw", []))
                + ")"
            )
        backends_cmp = block.get("backends_vs_baseline")
        if backends_cmp:
            lines.append(
                f"{'':<22} {'ratio':<9} {format_ratio(backends_cmp['throughput_ratio']):>8} "
                + " ".join(f"{format_ratio(backends_cmp['latency_ratio'][f'p{p}']):>8}" for p in PERCENTILES)
                + "   (backends/baseline; per round: "
                + ", ".join(format_ratio(r) for r in block.get("per_round_ratio_backends", []))
                + ")"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("bench_http: --rounds must be at least 1", file=sys.stderr)
        return 2
    wrk = shutil.which("wrk")
    if wrk is None:
        print("bench_http: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    server_cpu = None if args.no_pin else args.server_cpu
    wrk_cpu = None if args.no_pin else args.wrk_cpu
    if not args.no_pin and shutil.which("taskset") is None:
        print("bench_http: taskset not found; use --no-pin", file=sys.stderr)
        return 2
    notes: list[str] = []
    if not args.no_pin and (os.cpu_count() or 1) < 2:
        notes.append("Fewer than 2 CPUs: the server and wrk share a CPU; figures understate both servers.")
    if args.rounds < 2:
        notes.append("Only one round: no median, a single sample per figure.")
    paced = find_paced_wrk(wrk)
    if paced is None:
        notes.append(
            "Debian's wrk 4.1 is closed-loop (no wrk2 `-R`), so this script does not measure latency at "
            f"half capacity; p99 at -c{args.light_connections} is low concurrency, not low load (a closed "
            "loop still keeps the server busy, and its latencies omit queueing delay). bench_latency.py "
            "measures it open-loop with the project's C generator (benchmarks/loadgen)."
        )
    engine_env = dict(item.split("=", 1) for item in args.engine_env)

    facts = machine_facts(wrk)
    note_busy_cpus(facts, server_cpu, wrk_cpu, notes)
    print("\n".join(_facts_lines(facts)), flush=True)

    runs: list[Run] = []
    warmup_errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        workdir = Path(tmp)
        bodies_file = workdir / "bodies.jsonl"
        bodies_file.write_text(
            "".join(json.dumps(body, separators=(",", ":")) + "\n" for body in DEFAULT_BODIES)
        )
        driver = Driver(wrk, wrk_cpu, bodies_file, paced_wrk=paced, server_cpu=server_cpu)
        servers: dict[str, Server] = {}
        backends_schema: str | None = None
        try:
            servers["engine"] = start_engine(workdir, server_cpu, engine_env)
            servers["baseline"] = start_baseline(workdir, server_cpu)
            servers["raw"] = start_baseline(workdir, server_cpu, name="raw")
            if not args.no_backends:
                try:
                    backends_env, backends_key, backends_schema = prepare_backends(
                        workdir, args.database_url, args.redis_url
                    )
                    servers["backends"] = start_engine(
                        workdir, server_cpu, {**backends_env, **engine_env}, name="backends", key=backends_key
                    )
                except (subprocess.CalledProcessError, OSError, RuntimeError) as error:
                    notes.append(f"The `backends` engine (PostgreSQL + Redis) could not start: {error}")
            problems = check_same_figures(servers["engine"], servers["baseline"], DEFAULT_BODIES)
            if "backends" in servers:
                problems += check_same_figures(servers["backends"], servers["baseline"], DEFAULT_BODIES)
            if problems:
                print("bench_http: the engine and the baseline disagree:\n  " + "\n  ".join(problems))
                return 1
            print(f"Both servers return the same figures for the {len(DEFAULT_BODIES)} request bodies.")

            loads = [("throughput", args.connections), ("light", args.light_connections)]
            for round_number in range(1, args.rounds + 1):
                for load, connections in loads:
                    for target in servers:
                        server = servers[target]
                        warmup = driver.run(
                            server,
                            target=target,
                            load="warmup",
                            round_number=round_number,
                            connections=connections,
                            duration=args.warmup,
                        )
                        run = driver.run(
                            server,
                            target=target,
                            load=load,
                            round_number=round_number,
                            connections=connections,
                            duration=args.duration,
                        )
                        runs.append(run)
                        warmup_errors += warmup.result.errors
                        print(describe_run(run), flush=True)
            if paced is not None:
                engine_rps = median_or_none(
                    r.result.requests_per_sec for r in runs if r.target == "engine" and r.load == "throughput"
                )
                rate = (engine_rps or 0) / 2
                for round_number in range(1, args.rounds + 1):
                    for target in servers:
                        run = driver.run(
                            servers[target],
                            target=target,
                            load="paced",
                            round_number=round_number,
                            connections=args.connections,
                            duration=args.duration,
                            rate=rate,
                        )
                        runs.append(run)
                        print(describe_run(run), flush=True)
        finally:
            for server in servers.values():
                server.stop()
            if backends_schema is not None:
                drop_schema(args.database_url, backends_schema)

    labels = {
        "throughput": f"throughput (c={args.connections})",
        "light": f"low concurrency (c={args.light_connections})",
        "paced": "paced at 1/2 engine cap.",
    }
    summary: dict[str, Any] = {"loads": {}}
    for load in ("throughput", "light", "paced"):
        by_target = {
            target: [r.as_dict() for r in runs if r.load == load and r.target == target] for target in TARGETS
        }
        if not by_target["engine"]:
            continue
        engine_summary = summarize_runs(by_target["engine"])
        baseline_summary = summarize_runs(by_target["baseline"])
        raw_summary = summarize_runs(by_target["raw"]) if by_target["raw"] else None
        backends_summary = summarize_runs(by_target["backends"]) if by_target["backends"] else None
        summary["loads"][load] = {
            "label": labels[load],
            "engine": engine_summary,
            "baseline": baseline_summary,
            "raw": raw_summary,
            "engine_vs_baseline": compare(engine_summary, baseline_summary),
            "per_round_ratio": per_round_ratios(by_target["engine"], by_target["baseline"]),
            "engine_vs_raw": compare(engine_summary, raw_summary) if raw_summary else None,
            "per_round_ratio_vs_raw": per_round_ratios(by_target["engine"], by_target["raw"]),
            "backends": backends_summary,
            "backends_vs_baseline": compare(backends_summary, baseline_summary) if backends_summary else None,
            "per_round_ratio_backends": per_round_ratios(by_target["backends"], by_target["baseline"]),
        }

    invalid = [r for r in runs if not r.result.valid]
    note_run_health(runs, notes)
    if warmup_errors:
        notes.append(f"The warm-up runs had {warmup_errors} non-2xx responses or socket errors.")
    table = render_table(summary)
    print()
    print(table)
    for note in notes:
        print(f"Note: {note}")
    if invalid:
        print(f"INVALID: {len(invalid)} run(s) had non-2xx responses or socket errors:")
        for r in invalid:
            print(f"  {describe_run(r)}; socket errors {r.result.socket_errors}")

    server_pin = f"taskset -c {server_cpu} " if server_cpu is not None else ""
    document = {
        "benchmark": "http-single-quote",
        "valid": not invalid,
        "machine": facts,
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "light_connections": args.light_connections,
            "rounds": args.rounds,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
            "paced_generator": paced,
            "engine_env": {"RATE_LIMIT_PER_MINUTE": "10000000", "RATE_LIMIT_BURST": "10000000", **engine_env},
            "engine_command": (
                "HOST=127.0.0.1 PORT=<free> DEMO_KEYS_FILE=<tmp>/engine-demo-keys.env LOG_LEVEL=WARNING "
                "RATE_LIMIT_PER_MINUTE=10000000 RATE_LIMIT_BURST=10000000"
                + "".join(f" {item}" for item in args.engine_env)
                + f" {server_pin}python -m pricer serve"
            ),
            "baseline_command": (
                "HOST=127.0.0.1 PORT=<free> BASELINE_API_KEY=<random bre_ key> "
                f"BASELINE_CLIENT_ID={CLIENT_ID} {server_pin}python benchmarks/baseline_fastapi.py"
            ),
            "request_bodies": list(DEFAULT_BODIES),
            "lua_script": str(LUA_SCRIPT.relative_to(ROOT)),
            "baseline": str(BASELINE_SCRIPT.relative_to(ROOT)),
            "raw_command": (
                "HOST=127.0.0.1 PORT=<free> BASELINE_API_KEY=<random bre_ key> "
                f"{server_pin}python benchmarks/baseline_raw_asgi.py"
            ),
        },
        "summary": summary,
        "targets": http_targets(summary, not invalid),
        "runs": [r.as_dict() for r in runs],
        "warmup_runs_excluded": True,
        "notes": notes,
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
