"""Engine-vs-engine A/B benchmarks: what one feature costs, measured in the same run.

    python benchmarks/bench_variants.py limiter       --json out.json   # Redis rate limiter on vs off
    python benchmarks/bench_variants.py persistence   --json out.json   # PostgreSQL store + audit vs memory
    python benchmarks/bench_variants.py observability --json out.json   # metrics on/off, tracing on/off

Every variant is the engine (`python -m pricer serve`, one uvicorn worker) with a few settings changed;
all of a section's variants run at once, idle but for the one being measured, each pinned to the same CPU
(`taskset -c 0`), wrk pinned to another (`taskset -c 1`), all at the same connection count. Rounds are
interleaved (the order of the variants alternates from one round to the next), each measured run preceded
by a warm-up, and the medians over the rounds are compared. Before measuring, every request body is sent to
every variant and the figures must agree with the reference variant's.

Reported per variant: req/s, p50/p99, and the server's CPU per request (its CPU seconds over the measured
run, from /proc/<pid>/stat, divided by the requests answered in it); per pair: the throughput ratio and the
CPU-per-request difference (what the feature costs per request). The `limiter` section also measures each
variant paced at half its own measured throughput (wrk's `delay()` hook, see wrk_quote.lua).

Any response that is not 2xx, or a socket error, makes the run invalid (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_http
from bench_http import (
    DEFAULT_BODIES,
    LUA_SCRIPT,
    QUOTE_PATH,
    ROOT,
    Driver,
    Run,
    Server,
    check_same_figures,
    cpu_percent,
    format_number,
    machine_facts,
    make_target,
    median_or_none,
    parse_proc_stat_cpu,
    ratio,
    start_engine,
    summarize_runs,
)

HERE = Path(__file__).resolve().parent
SECTIONS = ("limiter", "persistence", "observability")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
HUGE_LIMIT = "10000000"
# What every variant of these benchmarks sets besides its own settings (see bench_http.start_engine, which
# also sets RATE_LIMIT_PER_MINUTE / RATE_LIMIT_BURST to 10000000): no drain period at shutdown (it only
# delays the stop; the lifespan shutdown, audit flush included, still runs).
COMMON_ENV = {"SHUTDOWN_DRAIN_SECONDS": "0"}
# Per-run figures measured around a run (extras), summarised as medians.
EXTRA_FIGURES = (
    "redis_cpu_us_per_request",
    "pg_cpu_us_per_request",
    "local_decisions",
    "local_decision_percent",
    "audit_queue_depth_after",
    "audit_spooled_rows",
)

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    env: dict[str, str]
    quiet_stdout: bool = False  # server stdout to /dev/null (a console span exporter)


@dataclass(frozen=True)
class Pair:
    name: str
    label: str
    reference: str  # variant without the feature
    variant: str  # variant with it


def paced_delay_ms(connections: int, target_rate: float) -> float:
    """The wait of each connection between requests so that `connections` of them offer `target_rate`/s."""
    if target_rate <= 0:
        raise ValueError("target rate must be positive")
    return 1000.0 * connections / target_rate


def round_order(names: Sequence[str], round_number: int) -> list[str]:
    """The variants' order in a round: as given in odd rounds, reversed in even ones."""
    return list(names) if round_number % 2 == 1 else list(reversed(names))


def summarize_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summarize_runs plus the medians of CPU per request, the paced settings and the extras."""
    summary = summarize_runs(runs)
    summary["cpu_us_per_request"] = median_or_none(run.get("cpu_us_per_request") for run in runs)
    summary["per_round_requests_per_sec"] = [run["requests_per_sec"] for run in runs]
    summary["per_round_cpu_us_per_request"] = [run.get("cpu_us_per_request") for run in runs]
    summary["total_requests"] = sum(run.get("total_requests", 0) for run in runs)
    for name in ("delay_ms", "rate", *EXTRA_FIGURES):
        values = [run.get(name) for run in runs]
        if any(value is not None for value in values):
            summary[name] = median_or_none(values)
    return summary


def _by_round(runs: Iterable[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    return {run["round"]: run for run in runs}


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compare_variants(
    reference: Mapping[str, Any],
    variant: Mapping[str, Any],
    reference_runs: Sequence[Mapping[str, Any]],
    variant_runs: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """variant against reference: throughput ratio, CPU per request difference, latency ratios; the
    per-round figures pair the two variants' runs of the same round."""
    throughput_ratio = ratio(variant["requests_per_sec"], reference["requests_per_sec"])
    ref_rounds, var_rounds = _by_round(reference_runs), _by_round(variant_runs)
    rounds = sorted(set(ref_rounds) & set(var_rounds))
    return {
        "throughput_ratio": throughput_ratio,
        "throughput_change_percent": None if throughput_ratio is None else (throughput_ratio - 1) * 100,
        "per_round_ratio": [
            ratio(var_rounds[r]["requests_per_sec"], ref_rounds[r]["requests_per_sec"]) for r in rounds
        ],
        "cpu_us_per_request_diff": difference(
            variant.get("cpu_us_per_request"), reference.get("cpu_us_per_request")
        ),
        "per_round_cpu_us_diff": [
            difference(var_rounds[r].get("cpu_us_per_request"), ref_rounds[r].get("cpu_us_per_request"))
            for r in rounds
        ],
        "latency_ratio": {
            name: ratio(variant["latency_ms"][name], reference["latency_ms"][name]) for name in ("p50", "p99")
        },
    }


def parse_redis_info(text: str) -> dict[str, str]:
    """`INFO` output (`name:value` lines, `# Section` headers) as a dict."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, sep, value = line.partition(":")
            if sep:
                values[name.strip()] = value.strip()
    return values


def redis_cpu_seconds(info: Mapping[str, str]) -> float | None:
    """The Redis server's own CPU time (user + system, all its threads) from `INFO cpu`."""
    try:
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except (KeyError, ValueError):
        return None


def parse_proc_net_tcp(text: str) -> dict[int, tuple[int, int]]:
    """socket inode -> (local port, remote port) from /proc/net/tcp or /proc/net/tcp6."""
    sockets = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        sockets[int(fields[9])] = (local_port, remote_port)
    return sockets


# An engine with a database refuses the development secrets: one random pair per run, shared by
# `seed-demo` (which hashes the demo keys with the pepper) and the servers; shown as <random>.
RUN_SECRETS = {"API_KEY_PEPPER": secrets.token_urlsafe(32), "JWT_SECRET_KEY": secrets.token_urlsafe(48)}


def display_env(env: Mapping[str, str], workdir: Path | None = None) -> str:
    """NAME=VALUE words as typed in a shell, the temporary directory shown as <tmp>, secrets as <random>."""
    words = []
    for name, value in env.items():
        if name in RUN_SECRETS:
            value = "<random>"
        if workdir is not None:
            value = value.replace(str(workdir), "<tmp>")
        words.append(f"{name}={shlex.quote(value) if value and not value.startswith('<') else value}")
    return " ".join(words)


def engine_command(
    variant: Variant,
    server_cpu: str | None,
    extra: Mapping[str, str] | None = None,
    workdir: Path | None = None,
) -> str:
    """The shell command that starts the variant's server, as run here (ports and paths as placeholders)."""
    env = {
        "HOST": "127.0.0.1",
        "PORT": "<free>",
        **(extra or {}),
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_MINUTE": HUGE_LIMIT,
        "RATE_LIMIT_BURST": HUGE_LIMIT,
        **COMMON_ENV,
        **variant.env,
    }
    pin = f"taskset -c {server_cpu} " if server_cpu is not None else ""
    tail = " >/dev/null" if variant.quiet_stdout else ""
    return f"{display_env(env, workdir)} {pin}python -m pricer serve{tail}"


# ---- sections ------------------------------------------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str
    description: str
    variants: list[Variant]
    pairs: list[Pair]
    paced: bool = False
    keys: dict[str, str] = field(default_factory=dict)  # variant -> API key given (seeded beforehand)
    setup_commands: list[str] = field(default_factory=list)
    teardown_commands: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def limiter_section(redis_url: str) -> Section:
    return Section(
        name="limiter",
        title='Rate limiter (issue "gateway"): Redis token buckets on vs off',
        description=(
            f"Both variants use Redis at `{redis_url}` (shared rate cache and invalidation bus alike); "
            "`limiter_on` charges every request to the client's Redis token bucket (limits of "
            f"{int(HUGE_LIMIT):,}/min and burst {int(HUGE_LIMIT):,}, so nothing is refused), `limiter_off` "
            "has ENABLE_RATE_LIMITING=false. The CPU difference per request is the limiter's cost in the "
            "engine process; Redis's own CPU (from `INFO cpu`, all its clients) is shown apart. Latency at "
            "about half capacity: each variant paced at half of its own measured throughput."
        ),
        variants=[
            Variant(
                "limiter_off",
                "rate limiting off",
                {"REDIS_URL": redis_url, "ENABLE_RATE_LIMITING": "false"},
            ),
            Variant(
                "limiter_on",
                "rate limiting on (Redis)",
                {
                    "REDIS_URL": redis_url,
                    "ENABLE_RATE_LIMITING": "true",
                    "RATE_LIMIT_PER_MINUTE": HUGE_LIMIT,
                    "RATE_LIMIT_BURST": HUGE_LIMIT,
                },
            ),
        ],
        pairs=[Pair("limiter", "rate limiter (Redis), on vs off", "limiter_off", "limiter_on")],
        paced=True,
    )


def persistence_section(database_url: str, schema: str, workdir: Path, redis_url: str) -> Section:
    return Section(
        name="persistence",
        title='PostgreSQL store + audit trail (issue "persistence") vs the in-memory default',
        description=(
            f"`postgres`: DATABASE_URL={database_url} on a throwaway schema `{schema}` (migrated and seeded "
            "with `python -m pricer seed-demo` before the start, dropped at the end): clients and keys from "
            "PostgreSQL behind the in-process caches, every quote queued to the audit trail's background "
            "writer (COPY into PostgreSQL). `memory`: the in-memory default (quotes kept in process). The "
            "engine's CPU per request excludes PostgreSQL's; the CPU of the PostgreSQL backends serving the "
            "engine's connections is shown apart (they are not pinned: on a 2-CPU machine they share the "
            "engine's or wrk's CPU). `postgres_redis` is the production shape: the same PostgreSQL stores "
            f"and audit plus Redis at `{redis_url}` (rate limiter, shared rate cache, invalidation bus)."
        ),
        variants=[
            Variant("memory", "in-memory stores", {}),
            Variant(
                "postgres",
                "PostgreSQL stores + audit",
                {
                    "DATABASE_URL": database_url,
                    "DATABASE_SCHEMA": schema,
                    "AUDIT_SPOOL_DIR": str(workdir / "audit-spool"),
                    **RUN_SECRETS,
                },
            ),
            Variant(
                "postgres_redis",
                "PostgreSQL stores + audit + Redis",
                {
                    "DATABASE_URL": database_url,
                    "DATABASE_SCHEMA": schema,
                    "AUDIT_SPOOL_DIR": str(workdir / "audit-spool-redis"),
                    "REDIS_URL": redis_url,
                    **RUN_SECRETS,
                },
            ),
        ],
        pairs=[
            Pair("postgres", "PostgreSQL store + audit vs in-memory", "memory", "postgres"),
            Pair("postgres_redis", "PostgreSQL + audit + Redis vs in-memory", "memory", "postgres_redis"),
        ],
    )


def observability_section() -> Section:
    tracing_env = {
        "ENABLE_METRICS": "true",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    return Section(
        name="observability",
        title='Observability (issue "observability"): metrics on/off, tracing on/off',
        description=(
            "`default`: Prometheus metrics on, tracing off (OTEL_TRACES_EXPORTER=none). `metrics_off`: "
            "ENABLE_METRICS=false. `tracing`: metrics on and OpenTelemetry traces with the console exporter, "
            "sampling 10 % of traces (traceidratio 0.1), the server's stdout to /dev/null. The CPU of the "
            "span exporter's thread is counted (process-wide /proc/<pid>/stat)."
        ),
        variants=[
            Variant(
                "default",
                "metrics on, tracing off",
                {"ENABLE_METRICS": "true", "OTEL_TRACES_EXPORTER": "none"},
            ),
            Variant(
                "metrics_off", "metrics off", {"ENABLE_METRICS": "false", "OTEL_TRACES_EXPORTER": "none"}
            ),
            Variant("tracing", "metrics on, tracing 10 % to console", tracing_env, quiet_stdout=True),
        ],
        pairs=[
            Pair("metrics", "Prometheus metrics, on vs off", "metrics_off", "default"),
            Pair("tracing", "tracing (console, 10 % sampled), on vs off", "default", "tracing"),
        ],
    )


def section_targets(
    section: Section, summary: Mapping[str, Any], pairs: Mapping[str, Any], valid: bool
) -> list[dict[str, Any]]:
    """The issues' targets for a section, with their verdicts."""
    targets = []
    if section.name == "limiter":
        for load, label in (("throughput", "saturated"), ("paced", "paced at about half capacity")):
            cmp = pairs["limiter"].get(load)
            if cmp is None:
                continue
            on = summary[load]["limiter_on"]
            local = on.get("local_decision_percent")
            note = (
                f"limiter_on decided {local:.0f} % of its requests locally (Redis path degraded), so this "
                "is not the cost of the Redis path alone"
                if local
                else "every limiter_on decision went through Redis"
                if local is not None
                else ""
            )
            targets.append(
                make_target(
                    f"rate limiter: server CPU per request, on minus off ({label})",
                    cmp["cpu_us_per_request_diff"],
                    60,
                    "<=",
                    "µs",
                    valid=valid,
                    note=note,
                )
            )
        paced = summary.get("paced", {}).get("limiter_on")
        if paced is not None:
            targets.append(
                make_target(
                    "rate limiter on: p99 at about half capacity (paced)",
                    paced["latency_ms"]["p99"],
                    2,
                    "<=",
                    "ms",
                    valid=valid,
                    note=f"achieved {format_number(paced['requests_per_sec'])} req/s of "
                    f"{format_number(paced.get('rate'))} targeted",
                )
            )
    elif section.name == "persistence":
        cmp = pairs["postgres"]["throughput"]
        change = cmp["throughput_change_percent"]
        targets.append(
            make_target(
                "PostgreSQL store + audit: req/s lost against in-memory",
                None if change is None else -change,
                15,
                "<=",
                "%",
                valid=valid,
            )
        )
    elif section.name == "observability":
        cmp = pairs["metrics"]["throughput"]
        targets.append(
            make_target(
                "metrics: server CPU per request, on minus off",
                cmp["cpu_us_per_request_diff"],
                15,
                "<=",
                "µs",
                valid=valid,
            )
        )
    return targets


# ---- probes around a run -------------------------------------------------------------------------------


def redis_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def redis_command(url: str, *words: str, timeout: float = 2.0) -> bytes:
    """One Redis command over a plain socket (RESP); the raw reply."""
    payload = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(word.encode())}\r\n".encode() + word.encode() + b"\r\n" for word in words
    )
    with socket.create_connection(redis_address(url), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]) + 2:
                    return rest[: int(header[1:])]
            elif data.endswith(b"\r\n"):
                return data
    return data


RATE_CACHE_VERSION_KEY = "ratecache:version"  # pricer.marketdata.shared_cache.VERSION_KEY


def new_rate_cache_version(url: str, timeout: float = 2.0) -> int:
    """INCR the shared rate cache's version in the Redis database of `url` (SELECT first); the new one."""
    database = urllib.parse.urlsplit(url).path.strip("/") or "0"
    payload = b"".join(
        f"*{len(words)}\r\n".encode() + b"".join(f"${len(w)}\r\n{w}\r\n".encode() for w in words)
        for words in (("SELECT", database), ("INCR", RATE_CACHE_VERSION_KEY))
    )
    with socket.create_connection(redis_address(url), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    selected, _, incremented = data.partition(b"\r\n")
    if selected != b"+OK" or not incremented.startswith(b":"):
        raise OSError(f"unexpected Redis reply {data!r}")
    return int(incremented[1:].split(b"\r\n", 1)[0])


def redis_cpu(url: str) -> float | None:
    try:
        return redis_cpu_seconds(parse_redis_info(redis_command(url, "INFO", "cpu").decode()))
    except OSError:
        return None


def get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data
    except urllib.error.HTTPError as error:
        try:
            data = json.loads(error.read())
            return data
        except ValueError:
            return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def dependency_detail(server: Server, name: str) -> dict[str, Any]:
    health = get_json(server.url + "/health/detailed") or {}
    detail = ((health.get("dependencies") or {}).get(name) or {}).get("detail") or {}
    return detail if isinstance(detail, dict) else {}


def socket_ports(pid: int) -> list[tuple[int, int]]:
    """(local, remote) ports of the TCP sockets the process holds."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        return []
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            sockets = parse_proc_net_tcp(Path(f"/proc/{pid}/net/{table}").read_text())
        except OSError:
            continue
        ports += [sockets[inode] for inode in inodes if inode in sockets]
    return ports


def process_cpu(pid: int) -> float | None:
    try:
        return parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Probe:
    """Measures what a variant costs outside its own process, around each run."""

    def before(self, variant: str, server: Server) -> Any:
        return None

    def after(self, variant: str, server: Server, state: Any, run: Run) -> dict[str, Any]:
        return {}


class RedisProbe(Probe):
    def __init__(self, url: str) -> None:
        self.url = url

    def before(self, variant: str, server: Server) -> Any:
        return redis_cpu(self.url), dependency_detail(server, "redis").get("local_decisions")

    def after(self, variant: str, server: Server, state: Any, run: Run) -> dict[str, Any]:
        cpu_before, decisions_before = state
        cpu_after = redis_cpu(self.url)
        decisions_after = dependency_detail(server, "redis").get("local_decisions")
        extra: dict[str, Any] = {
            "redis_cpu_us_per_request": bench_http.cpu_us_per_request(
                difference(cpu_after, cpu_before), run.result.total_requests
            )
        }
        if isinstance(decisions_before, int) and isinstance(decisions_after, int):
            extra["local_decisions"] = decisions_after - decisions_before
            extra["local_decision_percent"] = (
                100.0 * extra["local_decisions"] / run.result.total_requests
                if run.result.total_requests
                else None
            )
        return extra


class PostgresProbe(Probe):
    """CPU of the PostgreSQL backends serving the engine's connections (found by their client ports),
    the audit queue after the run and whether anything was spooled."""

    def __init__(self, dsn: str, variant: str) -> None:
        self.dsn = dsn
        self.variant = variant

    def backends(self, server: Server) -> dict[int, int]:
        ports = {local for local, remote in socket_ports(server.process.pid) if remote == 5432}
        if not ports:
            return {}
        rows = asyncio.run(
            _pg_fetch(self.dsn, "SELECT pid, client_port FROM pg_stat_activity WHERE client_port IS NOT NULL")
        )
        return {int(row[0]): int(row[1]) for row in rows if int(row[1]) in ports}

    def before(self, variant: str, server: Server) -> Any:
        if variant != self.variant:
            return None
        try:
            pids = self.backends(server)
        except Exception:
            return None
        return {pid: process_cpu(pid) for pid in pids}

    def after(self, variant: str, server: Server, state: Any, run: Run) -> dict[str, Any]:
        if variant != self.variant:
            return {}
        extra: dict[str, Any] = {}
        if state is not None:
            try:
                pids = set(state) | set(self.backends(server))
            except Exception:
                pids = set(state)
            used = 0.0
            for pid in pids:
                now, then = process_cpu(pid), state.get(pid) or 0.0
                if now is not None:
                    used += now - then
            extra["pg_cpu_us_per_request"] = bench_http.cpu_us_per_request(used, run.result.total_requests)
        detail = dependency_detail(server, "audit")
        if "queue_depth" in detail:
            extra["audit_queue_depth_after"] = detail["queue_depth"]
            extra["audit_spooled_rows"] = detail.get("spooled_rows")
        return extra


async def _pg_fetch(dsn: str, query: str) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(dsn)
    try:
        rows: list[Any] = await connection.fetch(query)
        return rows
    finally:
        await connection.close()


async def _pg_execute(dsn: str, query: str) -> Any:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


# ---- main ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--duration", default="8s", help="measured run length, wrk -d syntax (default 8s)")
    parser.add_argument("--warmup", default="2s", help="warm-up run length before each measured run (2s)")
    parser.add_argument("--paced-warmup", default="1s", help="warm-up before each paced run (1s)")
    parser.add_argument("--connections", type=int, default=32, help="connections for every run (32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, medians taken (3)")
    parser.add_argument("--no-paced", action="store_true", help="limiter: skip the half-capacity runs")
    parser.add_argument("--server-cpu", default="0", help="CPU list for the servers (taskset -c)")
    parser.add_argument("--wrk-cpu", default="1", help="CPU list for wrk (taskset -c)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"limiter (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument(
        "--database-url", default=DEFAULT_DATABASE_URL, help=f"persistence (default {DEFAULT_DATABASE_URL})"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def prepare_persistence(section: Section, database_url: str, schema: str, workdir: Path) -> str | None:
    """Migrate and seed the throwaway schema (the engine does not seed a database); an error or None."""
    env = {
        **bench_http._clean_environment(),
        "DATABASE_URL": database_url,
        "DATABASE_SCHEMA": schema,
        "DEMO_KEYS_FILE": str(workdir / "pg-demo-keys.env"),
        "LOG_LEVEL": "WARNING",
        **RUN_SECRETS,
    }
    shown = {"DATABASE_URL": database_url, "DATABASE_SCHEMA": schema, **RUN_SECRETS}
    for command in (["migrate"], ["seed-demo"]):
        extra = {"DEMO_KEYS_FILE": "<tmp>/pg-demo-keys.env"} if command == ["seed-demo"] else {}
        section.setup_commands.append(f"{display_env({**shown, **extra})} python -m pricer {command[0]}")
        completed = subprocess.run(
            [sys.executable, "-m", "pricer", *command],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            return (
                f"`python -m pricer {command[0]}` failed ({completed.returncode}): {completed.stderr.strip()}"
            )
    key = bench_http.read_env_file(workdir / "pg-demo-keys.env")["DEMO_CLIENT_KEY"]
    section.keys["postgres"] = section.keys["postgres_redis"] = key
    return None


def finish_persistence(section: Section, database_url: str, schema: str, answered: int) -> None:
    """After the engine stopped (its audit trail flushed): rows in the schema, then drop it."""
    quoted = '"' + schema + '"'
    try:
        rows = asyncio.run(_pg_execute(database_url, f"SELECT count(*) FROM {quoted}.quotes"))
        section.extra["postgres_quote_rows"] = int(rows)
        section.extra["postgres_quotes_answered"] = answered
        if rows < answered:
            section.notes.append(
                f"PostgreSQL holds {rows:,} quote rows but the PostgreSQL variants answered {answered:,} "
                "quotes: answered quotes are missing from the audit trail."
            )
    except Exception as error:
        section.notes.append(f"Could not count the audit rows: {type(error).__name__}: {error}")
    finally:
        drop = f"DROP SCHEMA IF EXISTS {quoted} CASCADE"
        section.teardown_commands.append(f"psql {database_url} -c '{drop}'")
        try:
            asyncio.run(_pg_execute(database_url, drop))
        except Exception as error:
            section.notes.append(f"Dropping schema {schema} failed: {type(error).__name__}: {error}")


def describe(run: Run) -> str:
    paced = f" delay {run.delay_ms:.2f} ms" if run.delay_ms is not None else ""
    cpu_us = bench_http.cpu_us_per_request(run.server_cpu_s, run.result.total_requests)
    return (
        f"round {run.round} {run.load:<10} {run.target:<12} c={run.connections:<3}{paced} "
        f"{run.result.requests_per_sec:>8.0f} req/s  p50 {run.result.latency_ms.get(50, 0):.2f} ms  "
        f"p99 {run.result.latency_ms.get(99, 0):.2f} ms  server CPU {format_number(cpu_us, '.0f')} µs/req "
        f"({cpu_percent(run.server_cpu_s, run.wall_s) or 0:.0f}%)  wrk CPU "
        f"{cpu_percent(run.wrk_cpu_s, run.wall_s) or 0:.0f}%  errors {run.result.errors}"
        + "".join(f"  {k} {_figure(v)}" for k, v in run.extra.items() if v is not None)
    )


def _figure(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else format_number(value, ".1f")


def render_table(section: Section, summary: Mapping[str, Any], pairs: Mapping[str, Any]) -> str:
    header = (
        f"{'load':<11} {'variant':<13} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'µs/req':>7} "
        f"{'srv CPU':>7} {'wrk CPU':>7} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for load, by_variant in summary.items():
        for variant in section.variants:
            s = by_variant.get(variant.name)
            if s is None:
                continue
            lines.append(
                f"{load:<11} {variant.name:<13} {format_number(s['requests_per_sec']):>8} "
                f"{format_number(s['latency_ms']['p50'], '.2f'):>7} "
                f"{format_number(s['latency_ms']['p99'], '.2f'):>7} "
                f"{format_number(s['cpu_us_per_request'], '.0f'):>7} "
                f"{format_number(s['server_cpu_percent'], '.0f') + '%':>7} "
                f"{format_number(s['wrk_cpu_percent'], '.0f') + '%':>7} {s['errors']:>6}"
            )
    for pair in section.pairs:
        for load, cmp in pairs[pair.name].items():
            lines.append(
                f"{pair.name} ({load}): {pair.variant}/{pair.reference} throughput "
                f"{bench_http.format_ratio(cmp['throughput_ratio'])} (per round "
                + ", ".join(bench_http.format_ratio(r) for r in cmp["per_round_ratio"])
                + f"), CPU per request {format_number(cmp['cpu_us_per_request_diff'], '+.1f')} µs (per round "
                + ", ".join(format_number(d, "+.1f") for d in cmp["per_round_cpu_us_diff"])
                + ")"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        print("bench_variants: --rounds must be at least 1", file=sys.stderr)
        return 2
    wrk = bench_http.shutil.which("wrk")
    if wrk is None:
        print("bench_variants: wrk not found (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    server_cpu = None if args.no_pin else args.server_cpu
    wrk_cpu = None if args.no_pin else args.wrk_cpu
    notes: list[str] = []
    if args.rounds < 2:
        notes.append("Only one round: no median, a single sample per figure.")
    facts = machine_facts(wrk)
    bench_http.note_busy_cpus(facts, server_cpu, wrk_cpu, notes, seconds=1.0)

    schema = f"bench_{secrets.token_hex(6)}"
    probe: Probe = Probe()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.section}-") as tmp:
        workdir = Path(tmp)
        if args.section == "limiter":
            section = limiter_section(args.redis_url)
            section.paced = not args.no_paced
            try:
                if not redis_command(args.redis_url, "PING").startswith(b"+PONG"):
                    raise OSError("no PONG")
            except OSError as error:
                print(f"bench_variants: Redis at {args.redis_url} does not answer: {error}", file=sys.stderr)
                return 2
            probe = RedisProbe(args.redis_url)
        elif args.section == "persistence":
            section = persistence_section(args.database_url, schema, workdir, args.redis_url)
            probe = PostgresProbe(args.database_url, "postgres")
        else:
            section = observability_section()
        notes += section.notes
        section.notes = notes
        print("\n".join(bench_http._facts_lines(facts)), flush=True)

        bodies_file = workdir / "bodies.jsonl"
        bodies_file.write_text(
            "".join(json.dumps(body, separators=(",", ":")) + "\n" for body in DEFAULT_BODIES)
        )
        driver = Driver(wrk, wrk_cpu, bodies_file, paced_wrk=None, server_cpu=server_cpu)
        servers: dict[str, Server] = {}
        runs: list[Run] = []
        answered: dict[str, int] = {variant.name: 0 for variant in section.variants}
        warmup_errors = 0
        prepared = False
        try:
            if args.section == "persistence":
                prepared = True  # from here on the schema may exist: dropped in `finally`
                problem = prepare_persistence(section, args.database_url, schema, workdir)
                if problem:
                    print(f"bench_variants: {problem}", file=sys.stderr)
                    return 2
                for command in section.setup_commands:
                    print(f"$ {command}", flush=True)
            for redis_url in sorted({v.env["REDIS_URL"] for v in section.variants if "REDIS_URL" in v.env}):
                # Rates another run cached in this Redis database were computed from other data (another
                # schema, another seeding time): a new version makes the engines start from an empty cache.
                section.setup_commands.append(f"redis-cli -u {redis_url} INCR {RATE_CACHE_VERSION_KEY}")
                print(f"$ {section.setup_commands[-1]}", flush=True)
                new_rate_cache_version(redis_url)
            for variant in section.variants:
                servers[variant.name] = start_engine(
                    workdir,
                    server_cpu,
                    {**COMMON_ENV, **variant.env},
                    name=variant.name,
                    key=section.keys.get(variant.name),
                    quiet_stdout=variant.quiet_stdout,
                )
            reference = section.variants[0].name
            for variant in section.variants[1:]:
                problems = check_same_figures(servers[reference], servers[variant.name], DEFAULT_BODIES)
                answered[reference] += len(DEFAULT_BODIES)
                answered[variant.name] += len(DEFAULT_BODIES)
                if problems:
                    print(
                        f"bench_variants: {variant.name} and {reference} disagree:\n  "
                        + "\n  ".join(problems)
                    )
                    return 1
            print(f"All variants return the same figures for the {len(DEFAULT_BODIES)} request bodies.")

            def measure(
                variant: str, load: str, round_number: int, delay: float | None, rate: float | None
            ) -> None:
                nonlocal warmup_errors
                server = servers[variant]
                warmup = driver.run(
                    server,
                    target=variant,
                    load="warmup",
                    round_number=round_number,
                    connections=args.connections,
                    duration=args.paced_warmup if delay is not None else args.warmup,
                    delay_ms=delay,
                )
                warmup_errors += warmup.result.errors
                answered[variant] += warmup.result.lua.get("responses", warmup.result.total_requests)
                state = probe.before(variant, server)
                run = driver.run(
                    server,
                    target=variant,
                    load=load,
                    round_number=round_number,
                    connections=args.connections,
                    duration=args.duration,
                    delay_ms=delay,
                )
                run.rate = rate  # the paced target (wrk_quote.lua's delay(), not a wrk2 -R)
                run.extra.update(probe.after(variant, server, state, run))
                answered[variant] += run.result.lua.get("responses", run.result.total_requests)
                runs.append(run)
                print(describe(run), flush=True)

            names = [variant.name for variant in section.variants]
            for round_number in range(1, args.rounds + 1):
                for name in round_order(names, round_number):
                    measure(name, "throughput", round_number, None, None)
            if section.paced:
                plans = {}
                for name in names:
                    capacity = median_or_none(
                        r.result.requests_per_sec for r in runs if r.target == name and r.load == "throughput"
                    )
                    rate = (capacity or 0) / 2
                    if rate > 0:
                        plans[name] = (paced_delay_ms(args.connections, rate), rate)
                for round_number in range(1, args.rounds + 1):
                    for name in round_order(names, round_number):
                        if name in plans:
                            delay, rate = plans[name]
                            measure(name, "paced", round_number, delay, rate)
        finally:
            for server in servers.values():
                server.stop()
            if args.section == "persistence" and prepared:
                finish_persistence(
                    section, args.database_url, schema, answered["postgres"] + answered["postgres_redis"]
                )

    summary: dict[str, dict[str, Any]] = {}
    for load in ("throughput", "paced"):
        for variant in section.variants:
            chosen = [r.as_dict() for r in runs if r.load == load and r.target == variant.name]
            if chosen:
                summary.setdefault(load, {})[variant.name] = summarize_variant(chosen)
    pairs: dict[str, dict[str, Any]] = {}
    for pair in section.pairs:
        pairs[pair.name] = {}
        for load, by_variant in summary.items():
            if pair.reference in by_variant and pair.variant in by_variant:
                pairs[pair.name][load] = compare_variants(
                    by_variant[pair.reference],
                    by_variant[pair.variant],
                    [r.as_dict() for r in runs if r.load == load and r.target == pair.reference],
                    [r.as_dict() for r in runs if r.load == load and r.target == pair.variant],
                )

    invalid = [r for r in runs if not r.result.valid]
    valid = not invalid
    bench_http.note_run_health(
        runs, notes, starved_cause="other processes (here possibly PostgreSQL or Redis, not pinned)"
    )
    for load in ("throughput", "paced"):
        chosen = [r for r in runs if r.load == load and r.extra.get("local_decisions") is not None]
        local = sum(r.extra["local_decisions"] for r in chosen)
        if local:
            total = sum(r.result.total_requests for r in chosen)
            notes.append(
                f"{load}: the Redis limiter decided {local:,} of {total:,} requests locally "
                f"({100 * local / total:.0f} %): a decision not answered within its 5 ms budget (twice "
                "extended when the event loop lags) trips the limiter to local decisions for 1 s. Those "
                "requests paid no Redis round trip, so the CPU difference understates the Redis path's cost."
            )
    spooled = max((r.extra.get("audit_spooled_rows") or 0 for r in runs), default=0)
    if spooled:
        notes.append(f"The audit trail spooled {spooled:,} rows to disk (PostgreSQL was unavailable).")
    if warmup_errors:
        notes.append(f"The warm-up runs had {warmup_errors} non-2xx responses or socket errors.")
    if section.paced:
        notes.append(
            "Paced runs are a paced closed loop (wrk's delay() hook: each of the connections waits "
            "1000 × connections / target rate ms after each response before sending the next request; the "
            "target rate is half of that variant's median measured throughput). Latency is measured from "
            "each send, so coordinated omission applies only when a response takes longer than the pacing "
            "interval; the achieved rate is a little below the target (the response time adds to the wait)."
        )

    targets = section_targets(section, summary, pairs, valid)
    table = render_table(section, summary, pairs)
    print()
    print(table)
    for target in targets:
        print(
            f"Target: {target['name']} = {format_number(target['value'], '.1f')} {target['unit']} "
            f"(target {target['op']} {target['limit']} {target['unit']}): {target['verdict']}"
        )
    for note in notes:
        print(f"Note: {note}")
    if invalid:
        print(f"INVALID: {len(invalid)} run(s) had unexpected responses or socket errors:")
        for r in invalid:
            print(f"  {describe(r)}; socket errors {r.result.socket_errors}")

    commands = [
        *section.setup_commands,
        *(
            f"# {v.name}: {engine_command(v, server_cpu, _engine_file_env(v, section), workdir)}"
            for v in section.variants
        ),
    ]
    seen = set()
    for run in runs:
        if run.load not in seen:
            seen.add(run.load)
            paced_env = (
                "BENCH_DELAY_MS=<1000*c/(half the variant's req/s)> " if run.delay_ms is not None else ""
            )
            commands.append(
                f"# {run.load}: BENCH_API_KEY=<key> BENCH_BODIES_FILE=<bodies.jsonl> {paced_env}{run.command}"
            )
    commands += section.teardown_commands
    document = {
        "benchmark": "variants",
        "section": section.name,
        "title": section.title,
        "description": section.description,
        "valid": valid,
        "machine": facts,
        "settings": {
            "duration": args.duration,
            "warmup": args.warmup,
            "paced_warmup": args.paced_warmup,
            "connections": args.connections,
            "rounds": args.rounds,
            "server_cpu": server_cpu,
            "wrk_cpu": wrk_cpu,
            "request_bodies": list(DEFAULT_BODIES),
            "lua_script": str(LUA_SCRIPT.relative_to(ROOT)),
            "path": QUOTE_PATH,
        },
        "variants": [
            {
                "name": v.name,
                "label": v.label,
                "env": v.env,
                "command": engine_command(v, server_cpu, _engine_file_env(v, section), workdir),
            }
            for v in section.variants
        ],
        "summary": summary,
        "pairs": [
            {
                "name": p.name,
                "label": p.label,
                "reference": p.reference,
                "variant": p.variant,
                "loads": pairs[p.name],
            }
            for p in section.pairs
        ],
        "targets": targets,
        "extra": section.extra,
        "runs": [r.as_dict() for r in runs],
        "warmup_runs_excluded": True,
        "notes": notes,
        "commands": commands,
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")
        print(f"Results written to {args.json}")
    return 1 if invalid else 0


def _engine_file_env(variant: Variant, section: Section) -> dict[str, str]:
    if variant.name in section.keys:
        return {}  # seeded beforehand: the engine writes no keys file
    return {"DEMO_KEYS_FILE": f"<tmp>/{variant.name}-demo-keys.env"}


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
