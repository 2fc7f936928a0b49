"""Faults under load: what a client sees and what the audit trail keeps when a dependency or a replica fails.

    python benchmarks/bench_faults.py --json benchmarks/results/faults.json          # every scenario
    python benchmarks/bench_faults.py --quick                                         # shorter outages
    python benchmarks/bench_faults.py --only pg_down_10s,sigkill --quick              # some scenarios

Everything runs on loopback against processes this script starts and stops itself: a private PostgreSQL
(tests/private_postgres.py: its own cluster on a free port) and a private redis-server
(tests/redis_server.py), so the faults never touch the shared services; two engine replicas (`python -m
pricer serve`, one worker each unless the scenario says otherwise) on that database and Redis, each with
its own AUDIT_SPOOL_DIR (a pod's).

Each scenario sends open-loop load (request k at t0 + k/rate, whatever the answers; at most --max-in-flight
outstanding, the rest counted as not sent) through an emulated Kubernetes Service: a readiness probe polls
every replica's /health every 0.25 s and takes a replica out of rotation while it does not answer 200; a
new connection goes round-robin to a replica in rotation, and a keep-alive connection stays with its
replica until the replica closes it (`Connection: close`) or it fails, as kube-proxy's connection tracking
does. The main client's requests are spread over KEEP_ALIVE_CLIENTS such connections. Two streams of
single quotes:

- the main client (limits no run reaches) at --rate req/s;
- a limited client (LIMITED_PER_MINUTE/min, burst LIMITED_BURST) at LIMITED_RATE req/s, far over its limit:
  its 200s against an exact token bucket's allowance over the same span (burst + rate x seconds) give the
  rate-limit overshoot.

Before the load, each client quotes on WARM_CONNECTIONS fresh connections to each replica, so that every
worker has its key and client cached (a key a worker first meets during a database outage gets 503: the
engine has no fallback for it); these quotes are not counted.

The fault comes after --before seconds of load and the load goes on --after seconds after the fault ends.
Reported per scenario: requests sent, errors by kind (connection errors and timeouts, 5xx, 429), positions
answered 200 (their quote ids), how many of them the database's audit trail holds once the run is over (waited
for up to --audit-wait seconds), lost = answered - found, the limited client's overshoot, and recovery: from
the fault's end to the last failed main-client request (0 when none failed after it) and to the audit trail
holding every position answered before the fault's end (polled every 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUOTE_PATH = "/api/v1/calculate-locate"
TICKERS = ("AAPL", "GME", "TSLA", "AMC", "MSFT")
LIMITED_PER_MINUTE = 600
LIMITED_BURST = 20
DEFAULT_RATE = 80.0  # req/s: under one replica's capacity on a busy 2-CPU machine (a fault, not overload)
LIMITED_RATE = 20.0  # req/s: twice its limit; one request is under 1 % of a 10 s allowance
HUGE_LIMIT = "10000000"
OVERSHOOT_TARGET_PERCENT = 5.0
KEEP_ALIVE_CLIENTS = 32  # the main client's keep-alive clients, each bound to a replica until it closes
MAX_STREAM_SECONDS = 300.0  # no stream of requests runs longer, whatever happens to a fault
# Warm-up: quotes of each client on this many fresh connections to each replica, so that every worker of a
# replica (WORKERS > 1: the kernel hands each new connection to one of them) has the key and client cached
# before a fault. 16 connections all taken by one of two workers: 2^-15, about 3 in 100,000 per client.
WARM_CONNECTIONS = 16
SCENARIOS = (
    "redis_down",
    "pg_down_short",
    "pg_down_long",
    "sigterm_1_worker",
    "sigterm_2_workers",
    "sigkill",
    "sigkill_disk",
    "slowloris",
    "unauth_flood",
)

# ---- pure helpers (tested in tests/test_bench_tools.py) ------------------------------------------------


def bucket_allowance(per_minute: float, burst: float, seconds: float) -> float:
    """What an exact token bucket (full at the start) grants over `seconds`: its burst, then its rate."""
    return burst + per_minute / 60.0 * max(seconds, 0.0)


def overshoot_percent(granted: int, allowance: float) -> float | None:
    """How far the grants went over the allowance, in % of it (negative: under it); None without one."""
    if allowance <= 0:
        return None
    return (granted / allowance - 1.0) * 100.0


def lost_positions(answered: Sequence[str], stored: set[str]) -> int:
    """Positions answered 200 (by quote id) that the audit trail does not hold."""
    return len(set(answered) - stored)


@dataclass
class Outcome:
    """One request: when it was sent (s since t0), which stream, and its status or error kind."""

    sent_at: float
    stream: str  # main | limited | flood
    replica: int
    status: int | None = None
    error: str | None = None  # connection | timeout
    quote_id: str | None = None
    done_at: float = 0.0


def error_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Errors by kind: connection errors (timeouts included), 5xx and 429 answers."""
    return {
        "connection": sum(1 for o in outcomes if o.error is not None),
        "timeout": sum(1 for o in outcomes if o.error == "timeout"),
        "5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "429": sum(1 for o in outcomes if o.status == 429),
    }


def server_errors_by_stream(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """5xx answers by stream and replica ("main@0"): which client and which replica got them."""
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.status is not None and o.status >= 500:
            label = f"{o.stream}@{o.replica}"
            counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def recovery_seconds(outcomes: Sequence[Outcome], fault_end: float | None) -> float | None:
    """From the fault's end to the last failed main-client request sent after it (0.0: none failed)."""
    if fault_end is None:
        return None
    failed = [
        o.sent_at
        for o in outcomes
        if o.stream == "main" and o.sent_at >= fault_end and (o.error is not None or (o.status or 0) >= 500)
    ]
    return max(failed) - fault_end if failed else 0.0


def limited_figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The limited client's grants against the exact bucket's allowance over the span of its requests."""
    sent = [o for o in outcomes if o.stream == "limited"]
    if not sent:
        return {"granted": 0, "allowance": None, "overshoot_percent": None}
    span = max(o.sent_at for o in sent) - min(o.sent_at for o in sent)
    granted = sum(1 for o in sent if o.status == 200)
    allowance = bucket_allowance(LIMITED_PER_MINUTE, LIMITED_BURST, span)
    return {
        "sent": len(sent),
        "granted": granted,
        "allowance": round(allowance, 1),
        "span_s": round(span, 2),
        "overshoot_percent": overshoot_percent(granted, allowance),
    }


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (fraction 0-1) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def slow_answers(outcomes: Sequence[Outcome], threshold: float = 1.0) -> dict[str, Any] | None:
    """Main-client answers slower than `threshold` s: how many per replica, and when they were sent."""
    slow = [
        o
        for o in outcomes
        if o.stream == "main" and o.status is not None and o.done_at - o.sent_at > threshold
    ]
    if not slow:
        return None
    by_replica: dict[str, int] = {}
    for o in slow:
        by_replica[str(o.replica)] = by_replica.get(str(o.replica), 0) + 1
    return {
        "count": len(slow),
        "by_replica": dict(sorted(by_replica.items())),
        "first_sent_s": round(min(o.sent_at for o in slow), 2),
        "last_sent_s": round(max(o.sent_at for o in slow), 2),
    }


def summarize(
    outcomes: Sequence[Outcome], stored: set[str], fault_end: float | None, not_sent: int = 0
) -> dict[str, Any]:
    """A scenario's row: what the clients saw and what the audit trail holds."""
    load = [o for o in outcomes if o.stream in ("main", "limited")]
    answered = [o.quote_id for o in load if o.status == 200 and o.quote_id]
    found = len(set(answered) & stored)
    # How long the main client waited for an answer, whatever it was (a stalled request is no error).
    answered_latencies = [o.done_at - o.sent_at for o in load if o.stream == "main" and o.status is not None]
    return {
        "requests": len(load),
        "not_sent": not_sent,
        "errors": error_counts(load),
        "5xx_by_stream": server_errors_by_stream(load),
        "answered_positions": len(answered),
        "audit_rows": found,
        "lost": lost_positions(answered, stored),
        "limited": limited_figures(outcomes),
        "recovery_s": recovery_seconds(outcomes, fault_end),
        "latency_p99_s": percentile(answered_latencies, 0.99),
        "latency_max_s": max(answered_latencies, default=None),
    }


def _num(value: Any, spec: str = ",.0f") -> str:
    if value is None:
        return "–"
    return format(value, spec)


def _overshoot_cell(limited: Mapping[str, Any]) -> str:
    value = limited.get("overshoot_percent")
    if value is None:
        return "–"
    return f"{limited['granted']}/{limited['allowance']:.0f} ({value:+.0f} %)"


def _recovery_cell(row: Mapping[str, Any]) -> str:
    quote = row.get("recovery_s")
    audit = row.get("audit_complete_s")
    audit_text = "never" if audit is None else _num(audit, ".1f")
    return f"{_num(quote, '.1f')} / {audit_text}"


def table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The markdown table of the scenarios (a row per scenario; n/a rows say why)."""
    lines = [
        "| fault | requests (not sent) | conn. errors | 5xx | 429 | answered positions | audit rows | lost "
        "| limited client: granted/allowance (overshoot) | latency s: p99 / max "
        "| recovery s: quotes / audit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['label']} | n/a: {row['skipped']} |" + "  |" * 9)
            continue
        errors = row["errors"]
        lost = row["lost"]
        not_sent = f" ({row['not_sent']:,})" if row.get("not_sent") else ""
        lines.append(
            f"| {row['label']} | {_num(row['requests'])}{not_sent} | {_num(errors['connection'])} "
            f"| {_num(errors['5xx'])} | {_num(errors['429'])} | {_num(row['answered_positions'])} "
            f"| {_num(row['audit_rows'])} "
            f"| {'**' + _num(lost) + '**' if lost else '0'} | {_overshoot_cell(row['limited'])} "
            f"| {_num(row.get('latency_p99_s'), '.2f')} / {_num(row.get('latency_max_s'), '.2f')} "
            f"| {_recovery_cell(row)} |"
        )
    return lines


def render_markdown(doc: Mapping[str, Any]) -> list[str]:
    """The "Faults" section of benchmarks/REPORT.md from this script's JSON."""
    settings = doc.get("settings", {})
    rows = doc.get("scenarios", [])
    lines = [
        (
            f"Open-loop single quotes at {settings.get('rate')} req/s (main client) plus a limited client "
            f"({LIMITED_PER_MINUTE}/min, burst {LIMITED_BURST}) at {LIMITED_RATE:g} req/s, to "
            f"{settings.get('replicas')} replicas through an emulated Service (readiness probe on /health "
            "every 0.25 s; new connections round-robin over the ready replicas, a keep-alive connection "
            f"stays with its replica until closed; the main client uses {KEEP_ALIVE_CLIENTS}), against a "
            "private PostgreSQL and a private redis-server on loopback; "
            f"{settings.get('before')} s of load before each fault, {settings.get('after')} s after it."
            + (f" Engine at commit {settings['commit']}." if settings.get("commit") else "")
            + (" **Quick run: shorter outages.**" if settings.get("quick") else "")
        ),
        "",
        "- *lost* = positions answered 200 whose quote id is not in the audit trail "
        f"(`quote_rows`) {settings.get('audit_wait')} s after the load ended; the target is 0 (in the "
        "durable audit mode for SIGKILL).",
        "- *overshoot*: the limited client's 200s against an exact token bucket's allowance over the span "
        f"of its requests (burst + rate x seconds); target <= {OVERSHOOT_TARGET_PERCENT:g} % with Redis "
        "healthy, within the replicas' shares during an outage.",
        "- *requests*: sent by the two streams; (not sent): requests the generator did not send because "
        f"{settings.get('max_in_flight', 'the cap of')} requests were outstanding already (answers stalled).",
        "- *latency*: of the main client's answers, whatever their status, from sending to the answer.",
        "- *recovery*: seconds from the fault's end to the last failed main-client request (0: none failed "
        "after it) / to the audit trail holding every position answered before the fault's end (polled "
        "every 0.5 s; never: not within the wait).",
        "",
        *table_lines(rows),
        "",
    ]
    notes = [f"{row['label']}: {note}" for row in rows for note in row.get("notes", [])]
    notes += list(doc.get("notes", []))
    if notes:
        lines += ["Notes:", "", *[f"- {note}" for note in notes], ""]
    if doc.get("command"):
        lines += ["Command:", "", "```", doc["command"], "```", ""]
    return lines


def random_key() -> str:
    """A well-formed API key of an id no one issued (the flood's)."""
    alphabet = string.ascii_lowercase + string.digits
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"bre_{key_id}_{secret}"


# ---- processes -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    before: float
    outage_short: float
    outage_long: float
    after: float
    audit_wait: float
    slowloris_connections: int
    flood_rate: float


@dataclass
class Rig:
    """The private services, the run's secrets and keys, and where the replicas keep their files."""

    workdir: Path
    pg: Any  # tests.private_postgres.PrivatePostgres
    redis: Any  # tests.redis_server.PrivateRedis
    secrets_env: dict[str, str]
    admin_key: str = ""

    def engine_env(self, **extra: str) -> dict[str, str]:
        return {
            "DATABASE_URL": self.pg.dsn,
            "REDIS_URL": self.redis.url,
            "EXPECTED_REPLICAS": "2",
            "SHUTDOWN_DRAIN_SECONDS": "2",
            "RATE_LIMIT_PER_MINUTE": HUGE_LIMIT,
            "RATE_LIMIT_BURST": HUGE_LIMIT,
            **self.secrets_env,
            **extra,
        }


def pricer_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    from bench_http import _clean_environment

    return subprocess.run(
        [sys.executable, "-m", "pricer", *args],
        env={**_clean_environment(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def audit_durability_supported() -> bool:
    """Whether this engine knows AUDIT_DURABILITY: a bad value must stop it naming the variable."""
    from pricer.settings import SettingsError, load_settings

    try:
        load_settings({"AUDIT_DURABILITY": "no-such-mode"})
    except SettingsError as error:
        return "AUDIT_DURABILITY" in str(error)
    return False


@dataclass
class Replica:
    index: int
    env: dict[str, str]
    directory: Path
    server: Any = None  # bench_http.Server
    starts: int = 0

    def start(self, key: str) -> None:
        from bench_http import start_engine

        self.starts += 1
        self.server = start_engine(
            self.directory, None, self.env, name=f"replica{self.index}-{self.starts}", key=key
        )

    @property
    def url(self) -> str:
        return str(self.server.url)

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def log_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.glob("replica*.log"))


# ---- load ----------------------------------------------------------------------------------------------


@dataclass
class Load:
    """Open-loop streams over the replicas in rotation, a readiness probe and an audit poller."""

    replicas: list[Replica]
    main_key: str
    limited_key: str
    limited_client: str
    rate: float
    max_in_flight: int
    dsn: str
    outcomes: list[Outcome] = field(default_factory=list)
    in_rotation: set[int] = field(default_factory=set)
    not_sent: int = 0
    in_flight: int = 0
    max_lag: float = 0.0
    stored: set[str] = field(default_factory=set)
    audit_complete_at: float | None = None
    fault_end: float | None = None
    t0: float = 0.0
    bindings: dict[str, int] = field(default_factory=dict)  # keep-alive client -> its replica
    _turn: int = 0
    _clients: dict[int, Any] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def pick(self) -> int | None:
        live = sorted(self.in_rotation)
        if not live:
            return None
        self._turn += 1
        return live[self._turn % len(live)]

    def client(self, index: int) -> Any:
        import httpx

        if index not in self._clients:
            self._clients[index] = httpx.AsyncClient(
                timeout=10.0, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
            )
        return self._clients[index]

    async def close(self) -> None:
        for http in self._clients.values():
            await http.aclose()

    async def request(
        self, stream: str, key: str, body: bytes | None, slot: str | None = None, replica: int | None = None
    ) -> None:
        """One request, on the replica its client's connection is bound to (`slot`: a keep-alive client of
        the Service; None: a fresh connection), else (`replica`) on that replica."""
        import httpx

        index = replica if replica is not None else self.bindings.get(slot) if slot else None
        if index is None:
            index = self.pick()
            if slot is not None and index is not None:
                self.bindings[slot] = index
        outcome = Outcome(self.now(), stream, -1 if index is None else index)
        self.outcomes.append(outcome)
        if index is None:
            outcome.error = "connection"
            outcome.done_at = outcome.sent_at
            return
        replica = self.replicas[index]
        headers = {"X-API-Key": key}
        self.in_flight += 1
        try:
            if body is None:
                response = await self.client(index).get(f"{replica.url}/api/v1/rates/AAPL", headers=headers)
            else:
                headers["Content-Type"] = "application/json"
                response = await self.client(index).post(
                    f"{replica.url}{QUOTE_PATH}", headers=headers, content=body
                )
            outcome.status = response.status_code
            if response.status_code == 200 and body is not None:
                outcome.quote_id = response.json().get("quote_id")
            if response.headers.get("connection", "").lower() == "close" and slot is not None:
                self.bindings.pop(slot, None)  # the server closed it: reconnect through the Service
        except httpx.TimeoutException:
            outcome.error = "timeout"
            self.bindings.pop(slot or "", None)
        except httpx.HTTPError:
            outcome.error = "connection"
            self.bindings.pop(slot or "", None)
        finally:
            self.in_flight -= 1
            outcome.done_at = self.now()

    async def stream(
        self,
        name: str,
        rate: float,
        start: float,
        stop: Callable[[], float],
        make: Callable[[int], tuple[str, bytes | None, str | None]],
    ) -> None:
        """Request k at t0 + start + k/rate while that is before `stop()` (read at each request: a fault's
        end is known only once it has ended); bounded by MAX_STREAM_SECONDS."""
        tasks: set[asyncio.Task[None]] = set()
        for k in range(int(MAX_STREAM_SECONDS * rate)):
            due = start + k / rate
            if due >= stop():
                break
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            if self.in_flight >= self.max_in_flight:
                self.not_sent += 1
                continue
            key, body, slot = make(k)
            task = asyncio.create_task(self.request(name, key, body, slot))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    def quote_body(self, client_id: str, k: int) -> bytes:
        cents = 100_000_00 + k
        return (
            f'{{"ticker":"{TICKERS[k % len(TICKERS)]}","position_value":{cents // 100}.{cents % 100:02d},'
            f'"loan_days":{1 + k % 365},"client_id":"{client_id}"}}'
        ).encode()

    async def probe(self, stop: asyncio.Event) -> None:
        """Readiness: a replica is in rotation while its /health answers 200 within a second."""
        import httpx

        async with httpx.AsyncClient(timeout=1.0) as http:
            while not stop.is_set():
                for replica in self.replicas:
                    ready = False
                    if replica.alive:
                        with contextlib.suppress(httpx.HTTPError):
                            ready = (await http.get(f"{replica.url}/health")).status_code == 200
                    if ready:
                        self.in_rotation.add(replica.index)
                    else:
                        self.in_rotation.discard(replica.index)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

    async def fetch_stored(self) -> set[str]:
        import asyncpg

        connection = await asyncpg.connect(self.dsn, timeout=2)
        try:
            rows = await connection.fetch("SELECT encode(uuid_send(quote_id), 'hex') FROM quote_rows")
        finally:
            await connection.close()
        return {row[0] for row in rows}

    async def audit_poller(self, stop: asyncio.Event) -> None:
        """Every 0.5 s: once the fault has ended, does the audit trail hold every position answered before
        its end? The first poll that finds them all is when the audit recovered (a spool replayed, a queue
        drained); positions answered later are the writer's ordinary lag, not the fault's."""
        while not stop.is_set():
            started = self.now()
            try:
                self.stored = await self.fetch_stored()
            except Exception:  # the database is down: not complete, try again
                pass
            else:
                end = self.fault_end
                if end is not None and self.audit_complete_at is None:
                    before = {o.quote_id for o in self.outcomes if o.quote_id and o.done_at <= end}
                    if before <= self.stored:
                        self.audit_complete_at = max(started, end)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# ---- faults --------------------------------------------------------------------------------------------


@dataclass
class Context:
    rig: Rig
    load: Load
    replicas: list[Replica]
    timing: Timing
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def mark_end(self) -> None:
        self.load.fault_end = self.load.now()


async def redis_down(ctx: Context, seconds: float) -> None:
    ctx.rig.redis.kill()
    await asyncio.sleep(seconds)
    await asyncio.to_thread(ctx.rig.redis.start)
    ctx.mark_end()


async def pg_down(ctx: Context, seconds: float) -> None:
    await asyncio.to_thread(ctx.rig.pg.stop, "fast")
    await asyncio.sleep(seconds)
    await asyncio.to_thread(ctx.rig.pg.start)
    ctx.mark_end()


async def wait_exit(replica: Replica, within: float) -> float:
    started = time.monotonic()
    process = replica.server.process
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(process.wait, within)
    if process.poll() is None:
        process.kill()
        await asyncio.to_thread(process.wait)
    return time.monotonic() - started


async def sigterm(ctx: Context) -> None:
    victim = ctx.replicas[0]
    victim.server.process.send_signal(signal.SIGTERM)
    took = await wait_exit(victim, 60.0)
    ctx.notes.append(f"replica 0 exited {took:.1f} s after SIGTERM (code {victim.server.process.returncode})")
    ctx.mark_end()


async def sigkill(ctx: Context) -> None:
    victim = ctx.replicas[0]
    victim.server.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(victim.server.process.wait)
    await asyncio.sleep(1.0)
    # The pod comes back with the same spool volume: what was spooled is replayed from it.
    await asyncio.to_thread(victim.start, ctx.load.main_key)
    ctx.mark_end()


async def slowloris(ctx: Context, seconds: float) -> None:
    """N connections that send a request's headers one byte a second; how many does the engine hold?"""
    count = ctx.timing.slowloris_connections

    async def connect(n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        host, port = ctx.replicas[n % len(ctx.replicas)].url.removeprefix("http://").split(":")
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
        except (OSError, TimeoutError):
            return None  # not accepted within 5 s (a full accept backlog): counted as not opened

    connected = await asyncio.gather(*(connect(n) for n in range(count)))
    opened = [pair for pair in connected if pair is not None]
    ctx.extra["slowloris_opened"] = len(opened)
    head = b"POST /api/v1/calculate-locate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096
    closed_at: dict[int, float] = {}
    started = time.monotonic()

    async def watch(n: int, reader: asyncio.StreamReader) -> None:
        """Until the engine closes the connection (whatever it answers first)."""
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        closed_at.setdefault(n, time.monotonic() - started)

    watchers = [asyncio.create_task(watch(n, reader)) for n, (reader, _writer) in enumerate(opened)]
    for second in range(int(seconds)):
        for n, (_reader, writer) in enumerate(opened):
            if n in closed_at:
                continue
            try:
                writer.write(head[second : second + 1])
                await writer.drain()
            except OSError:
                closed_at.setdefault(n, time.monotonic() - started)
        await asyncio.sleep(max(0.0, second + 1 - (time.monotonic() - started)))
    held = len(opened) - len(closed_at)
    for _reader, writer in opened:
        writer.close()
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    ctx.extra["slowloris_held"] = held
    ctx.notes.append(
        f"slowloris: {len(opened)} of {count} connections opened within 5 s, sending a byte a second for "
        f"{seconds:.0f} s; {held} still held open by the engine at the end"
        + (
            f", the others closed after {min(closed_at.values()):.0f}-{max(closed_at.values()):.0f} s"
            if closed_at
            else ""
        )
    )
    ctx.mark_end()


async def unauth_flood(ctx: Context, seconds: float) -> None:
    """Random key ids at the flood rate: 401s; what do they cost in database transactions and log bytes?"""
    load = ctx.load
    before_xact = await database_transactions(ctx.rig.pg.dsn)
    before_log = sum(r.log_bytes() for r in ctx.replicas)
    start = load.now()
    flood_task = asyncio.create_task(
        load.stream(
            "flood",
            ctx.timing.flood_rate,
            start,
            lambda: start + seconds,
            lambda _k: (random_key(), None, None),
        )
    )
    await asyncio.sleep(seconds)
    ctx.mark_end()  # the flood stops sending now; its answers may come later
    await flood_task
    after_xact = await database_transactions(ctx.rig.pg.dsn)
    after_log = sum(r.log_bytes() for r in ctx.replicas)
    flood = [o for o in load.outcomes if o.stream == "flood"]
    statuses: dict[str, int] = {}
    for o in flood:
        kind = str(o.status) if o.status is not None else str(o.error)
        statuses[kind] = statuses.get(kind, 0) + 1
    transactions = None if before_xact is None or after_xact is None else after_xact - before_xact
    ctx.extra.update(
        {
            "flood_requests": len(flood),
            "flood_statuses": statuses,
            "flood_db_transactions": transactions,
            "flood_log_bytes": after_log - before_log,
        }
    )
    ctx.notes.append(
        f"flood: {len(flood):,} requests with random key ids ({statuses}); the database committed "
        f"{_num(transactions)} transactions meanwhile (all clients, pg_stat_database); the replicas' logs "
        f"grew by {after_log - before_log:,} bytes"
    )


async def database_transactions(dsn: str) -> int | None:
    import asyncpg

    try:
        connection = await asyncpg.connect(dsn, timeout=2)
        try:
            value = await connection.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
        finally:
            await connection.close()
    except Exception:
        return None
    return int(value)


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    fault: Callable[[Context], Awaitable[None]]
    replica_env: tuple[dict[str, str], dict[str, str]] = ({}, {})
    needs: str | None = None  # a feature the engine must have, else n/a


def scenarios(timing: Timing) -> list[Scenario]:
    short, long = timing.outage_short, timing.outage_long
    return [
        Scenario("redis_down", f"Redis down {short:g} s", lambda c: redis_down(c, short)),
        # Replica 0 runs two workers here: both spool while the database is down (issue 16's first finding).
        Scenario(
            "pg_down_short",
            f"PostgreSQL down {short:g} s (replica 0: WORKERS=2)",
            lambda c: pg_down(c, short),
            ({"WORKERS": "2"}, {}),
        ),
        Scenario(
            "pg_down_long",
            f"PostgreSQL down {long:g} s (replica 0: WORKERS=2)",
            lambda c: pg_down(c, long),
            ({"WORKERS": "2"}, {}),
        ),
        Scenario("sigterm_1_worker", "SIGTERM, 1 worker", sigterm),
        Scenario("sigterm_2_workers", "SIGTERM, WORKERS=2", sigterm, ({"WORKERS": "2"}, {})),
        Scenario("sigkill", "SIGKILL (default audit mode)", sigkill),
        Scenario(
            "sigkill_disk",
            "SIGKILL, AUDIT_DURABILITY=disk",
            sigkill,
            ({"AUDIT_DURABILITY": "disk"}, {"AUDIT_DURABILITY": "disk"}),
            needs="AUDIT_DURABILITY",
        ),
        Scenario(
            "slowloris",
            f"slowloris ({timing.slowloris_connections} conn., {short:g} s)",
            lambda c: slowloris(c, short),
        ),
        Scenario(
            "unauth_flood",
            f"unauthenticated flood ({timing.flood_rate:g} req/s, {short:g} s)",
            lambda c: unauth_flood(c, short),
        ),
    ]


async def admin_call(url: str, admin_key: str, method: str, path: str, body: Mapping[str, Any]) -> Any:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.request(method, f"{url}{path}", json=body, headers={"X-API-Key": admin_key})
    if response.status_code not in (200, 201):
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
    return response.json()


async def provision(url: str, admin_key: str, client_id: str, per_minute: int, burst: int) -> str:
    """A client with its own limits and a key for it (through the admin API)."""
    await admin_call(
        url,
        admin_key,
        "PUT",
        f"/api/v1/admin/clients/{client_id}",
        {
            "markup_percentage": 1,
            "transaction_fee_type": "FLAT",
            "transaction_amount": 1,
            "rate_limit_per_minute": per_minute,
            "burst": burst,
        },
    )
    issued = await admin_call(url, admin_key, "POST", "/api/v1/admin/keys", {"client_id": client_id})
    return str(issued["api_key"])


async def warm_workers(url: str, key: str, body: bytes, connections: int = WARM_CONNECTIONS) -> list[int]:
    """Quotes on `connections` fresh connections at once (each closed after its answer), so that every worker
    of the replica at `url` is likely to read the key and the client while the database is up. One keep-alive
    connection reaches one worker only: with WORKERS=2 the other worker met the key for the first time during
    the outage, whenever a new connection landed on it, and answered 503. Best effort: the kernel, not this
    function, picks the worker that accepts a connection (an idle one often takes them all when they come one
    after another, so they come together). The statuses (a 429 of the limited client is fine: authentication
    and the client's limits came first)."""
    import httpx

    headers = {"X-API-Key": key, "Content-Type": "application/json", "Connection": "close"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=connections)) as http:
        responses = await asyncio.gather(
            *(http.post(f"{url}{QUOTE_PATH}", headers=headers, content=body) for _ in range(connections))
        )
    return [response.status_code for response in responses]


async def run_scenario(
    rig: Rig, scenario: Scenario, timing: Timing, args: argparse.Namespace
) -> dict[str, Any]:
    directory = rig.workdir / scenario.name
    replicas = [
        Replica(
            i,
            rig.engine_env(
                AUDIT_SPOOL_DIR=str(directory / f"replica{i}" / "spool"), **scenario.replica_env[i]
            ),
            directory / f"replica{i}",
        )
        for i in range(2)
    ]
    for replica in replicas:
        replica.directory.mkdir(parents=True, exist_ok=True)
    await asyncio.gather(*(asyncio.to_thread(r.start, rig.admin_key) for r in replicas))
    suffix = secrets.token_hex(3)
    main_client, limited_client = f"fault_main_{suffix}", f"fault_lim_{suffix}"
    try:
        main_key = await provision(replicas[0].url, rig.admin_key, main_client, 10_000_000, 10_000_000)
        limited_key = await provision(
            replicas[0].url, rig.admin_key, limited_client, LIMITED_PER_MINUTE, LIMITED_BURST
        )
        load = Load(
            replicas, main_key, limited_key, limited_client, args.rate, args.max_in_flight, rig.pg.dsn
        )
        ctx = Context(rig, load, replicas, timing)
        # Warm every worker's key and client caches (a key first used during a database outage gets 503:
        # no fallback exists), then let the limited client's bucket refill: the warm-up is not counted.
        for replica in replicas:
            await warm_workers(replica.url, main_key, load.quote_body(main_client, 0))
            await warm_workers(replica.url, limited_key, load.quote_body(limited_client, 0))
        await asyncio.sleep(LIMITED_BURST / (LIMITED_PER_MINUTE / 60) + 1.0)
        load.t0 = time.monotonic()
        stop = asyncio.Event()
        load.in_rotation = {r.index for r in replicas}
        probe = asyncio.create_task(load.probe(stop))
        poller = asyncio.create_task(load.audit_poller(stop))
        start = load.now()

        stop_at = start + MAX_STREAM_SECONDS

        async def fault_then_after() -> None:
            nonlocal stop_at
            await asyncio.sleep(timing.before)
            await scenario.fault(ctx)
            if load.fault_end is None:
                load.fault_end = load.now()
            stop_at = load.fault_end + timing.after

        def main_body(k: int) -> tuple[str, bytes, str]:
            return main_key, load.quote_body(main_client, k), f"main{k % KEEP_ALIVE_CLIENTS}"

        def limited_body(k: int) -> tuple[str, bytes, str]:
            return limited_key, load.quote_body(limited_client, k), "limited"

        # Both streams run until `after` seconds past the fault's end.
        await asyncio.gather(
            fault_then_after(),
            load.stream("main", args.rate, start, lambda: stop_at, main_body),
            load.stream("limited", LIMITED_RATE, start, lambda: stop_at, limited_body),
        )
        load_end = load.now()
        # The audit trail, once the load is over: wait until it holds every answered position, or give up.
        answered = {o.quote_id for o in load.outcomes if o.quote_id}
        for _ in range(int(timing.audit_wait * 2)):
            if answered <= load.stored:
                break
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(probe, poller)
        with contextlib.suppress(Exception):
            load.stored = await load.fetch_stored()
        await load.close()
        row = summarize(load.outcomes, load.stored, load.fault_end, load.not_sent)
        complete_at = load.audit_complete_at
        row.update(
            {
                "name": scenario.name,
                "label": scenario.label,
                "fault_end_s": round(load.fault_end or 0.0, 2),
                "load_s": round(load_end - start, 2),
                "audit_complete_s": None
                if complete_at is None or load.fault_end is None
                else round(max(0.0, complete_at - load.fault_end), 2),
                "generator_max_lag_s": round(load.max_lag, 3),
                "notes": ctx.notes,
                **ctx.extra,
            }
        )
        loadavg = os.getloadavg()[0]
        row["load_average_1m"] = loadavg
        if loadavg > (os.cpu_count() or 1):
            row["notes"].append(
                f"the machine's 1-minute load average was {loadavg:.1f} on {os.cpu_count()} CPUs at the "
                "end (other work): latencies and lags reflect that as much as the fault"
            )
        if row["5xx_by_stream"]:
            row["notes"].append(f"5xx by stream@replica: {row['5xx_by_stream']}")
        slow = slow_answers(load.outcomes)
        if slow is not None:
            row["slow_answers"] = slow
            row["notes"].append(
                f"{slow['count']:,} answers took over 1 s (by replica: {slow['by_replica']}), sent between "
                f"{slow['first_sent_s']} s and {slow['last_sent_s']} s (fault end: {row['fault_end_s']} s)"
            )
        if load.max_lag > 0.5:
            row["notes"].append(
                f"the load generator ran up to {load.max_lag:.1f} s late (CPU contention): a lower rate then"
            )
        return row
    finally:
        for replica in replicas:
            if replica.server is not None:
                await asyncio.to_thread(replica.server.stop)


async def run_all(args: argparse.Namespace, timing: Timing, chosen: Sequence[str]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.private_postgres import PrivatePostgres
    from tests.redis_server import PrivateRedis

    workdir = Path(tempfile.mkdtemp(prefix="pricer-faults-"))
    secrets_env = {
        "JWT_SECRET_KEY": "bench-jwt-" + secrets.token_hex(32),
        "API_KEY_PEPPER": "bench-pepper-" + secrets.token_hex(32),
    }
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    pg = PrivatePostgres()
    redis = PrivateRedis(workdir / "redis")
    try:
        await asyncio.to_thread(pg.start)
        await asyncio.to_thread(redis.start)
        rig = Rig(workdir, pg, redis, secrets_env)
        env = rig.engine_env()
        for step in (("migrate",), ("seed-demo",)):
            keys_file = workdir / "demo-keys.env"
            done = await asyncio.to_thread(pricer_cli, {**env, "DEMO_KEYS_FILE": str(keys_file)}, *step)
            if done.returncode != 0:
                raise RuntimeError(f"pricer {' '.join(step)}: {done.returncode}\n{done.stderr}")
        from bench_http import read_env_file

        rig.admin_key = read_env_file(workdir / "demo-keys.env")["DEMO_ADMIN_KEY"]
        durability = audit_durability_supported()
        for scenario in scenarios(timing):
            if scenario.name not in chosen:
                continue
            if scenario.needs == "AUDIT_DURABILITY" and not durability:
                rows.append(
                    {
                        "name": scenario.name,
                        "label": scenario.label,
                        "skipped": "this engine has no AUDIT_DURABILITY",
                    }
                )
                continue
            print(f"bench_faults: {scenario.label} ...", file=sys.stderr, flush=True)
            for service in (pg, redis):  # a fault of the last scenario must not carry over
                if service is pg and not pg.running:
                    await asyncio.to_thread(pg.start)
                if service is redis and (redis.process is None or redis.process.poll() is not None):
                    await asyncio.to_thread(redis.start)
            try:
                row = await run_scenario(rig, scenario, timing, args)
            except Exception as error:
                row = {"name": scenario.name, "label": scenario.label, "skipped": f"failed: {error}"[:300]}
                notes.append(f"{scenario.label} failed: {error!r}"[:500])
            rows.append(row)
            print(f"bench_faults: {json.dumps(row, default=str)[:600]}", file=sys.stderr, flush=True)
    finally:
        redis.kill()
        pg.destroy()
        if not args.keep:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        else:
            notes.append(f"logs kept in {workdir}")
    return {
        "title": "Faults under load",
        "settings": {
            "rate": args.rate,
            "replicas": 2,
            "before": timing.before,
            "after": timing.after,
            "audit_wait": timing.audit_wait,
            "outage_short": timing.outage_short,
            "outage_long": timing.outage_long,
            "quick": args.quick,
            "max_in_flight": args.max_in_flight,
            "commit": git_commit(),
            "audit_durability": durability if rows else None,
        },
        "scenarios": rows,
        "notes": notes,
    }


def git_commit() -> str | None:
    """The checked-out commit (short), with `+changes` when the work tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty.strip() else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=HERE / "results" / "faults.json")
    parser.add_argument(
        "--quick", action="store_true", help="outages of 3 s and 10 s instead of 10 s and 90 s"
    )
    parser.add_argument("--only", help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="main client's req/s (open loop)")
    parser.add_argument("--max-in-flight", type=int, default=512)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        build_parser().error(f"unknown scenario(s): {', '.join(unknown)}")
    timing = (
        Timing(
            before=3,
            outage_short=3,
            outage_long=10,
            after=5,
            audit_wait=20,
            slowloris_connections=300,
            flood_rate=300,
        )
        if args.quick
        else Timing(
            before=5,
            outage_short=10,
            outage_long=90,
            after=10,
            audit_wait=60,
            slowloris_connections=1000,
            flood_rate=300,
        )
    )
    doc = asyncio.run(run_all(args, timing, chosen))
    doc["command"] = "python benchmarks/bench_faults.py" + "".join(
        [
            " --quick" if args.quick else "",
            f" --only {args.only}" if args.only else "",
            f" --rate {args.rate:g}" if args.rate != DEFAULT_RATE else "",
        ]
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print("\n".join(render_markdown(doc)))
    return 0 if not any("failed" in str(row.get("skipped", "")) for row in doc["scenarios"]) else 1


if __name__ == "__main__":
    sys.exit(main())
