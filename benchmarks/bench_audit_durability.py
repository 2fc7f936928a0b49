"""Audit durability: what a SIGKILL loses in the default mode, and what `AUDIT_DURABILITY=disk` costs.

Real `python -m pricer serve` processes on loopback against PostgreSQL (a throwaway schema of
DATABASE_URL, default the local test server), each with its own AUDIT_SPOOL_DIR:

* loss: `--kill-rounds` times, a `memory`-mode server under closed-loop load (`--connections` clients,
  single quotes) is killed with SIGKILL after `--kill-after` seconds; a new process on the same spool
  directory starts (it adopts whatever was spooled); then the quote ids answered 200 are compared with
  the rows in the database. The same is done in `disk` mode (expected: 0 lost), and both again with a
  private PostgreSQL (tests/private_postgres.py) stopped 1 s into the load (the kill lands while spooling).
* cost: `--cost-rounds` interleaved rounds (memory, disk, memory, disk, ...) of `--seconds` of the same
  load; per mode the median of requests per second and of server CPU per request (utime + stime of the
  server process from /proc, so the load generator's own CPU is not counted).

    python benchmarks/bench_audit_durability.py --connections 16 --seconds 8 --cost-rounds 3 --kill-rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_REQUESTS = 200_000  # per load run, whatever the speed


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# With a database the engine refuses the published development secrets: random ones for this run.
RUN_SECRETS = {"API_KEY_PEPPER": secrets.token_urlsafe(32), "JWT_SECRET_KEY": secrets.token_urlsafe(48)}


def env_for(dsn: str, schema: str, spool: Path, durability: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "AUDIT_"))}
    return {
        **inherited,
        **RUN_SECRETS,
        "DATABASE_URL": dsn,
        "DATABASE_SCHEMA": schema,
        "AUDIT_SPOOL_DIR": str(spool),
        "AUDIT_DURABILITY": durability,
        "RATE_LIMIT_PER_MINUTE": "10000000",
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "DEMO_KEYS_FILE": "",
    }


def cli(env: dict[str, str], *command: str) -> None:
    subprocess.run([sys.executable, "-m", "pricer", *command], env=env, check=True, capture_output=True)


def start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pricer", "serve"],
            env={**env, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def load(
    url: str, key: str, seconds: float, connections: int, process: subprocess.Popen[bytes] | None = None
) -> tuple[set[str], int]:
    """Closed-loop single quotes for `seconds` (or until the server dies): (ids answered 200, requests)."""
    answered: set[str] = set()
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:

        async def one(n: int) -> None:
            nonlocal sent
            i = 0
            while time.monotonic() < deadline and sent < MAX_REQUESTS:
                i += 1
                sent += 1
                try:
                    response = await client.post(
                        "/api/v1/calculate-locate",
                        headers={"X-API-Key": key},
                        json={
                            "ticker": "GME",
                            "position_value": 1000 + n * 100_000 + i,
                            "loan_days": 30,
                            "client_id": "demo_client",
                        },
                    )
                except httpx.TransportError:
                    if process is not None and process.poll() is not None:
                        return
                    continue
                if response.status_code == 200:
                    answered.add(response.json()["quote_id"])

        await asyncio.gather(*(one(n) for n in range(connections)))
    return answered, sent


async def stored_ids(dsn: str, schema: str) -> set[str]:
    connection = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        return {str(row[0]) for row in await connection.fetch("SELECT quote_id FROM quotes")}
    finally:
        await connection.close()


async def wait_stored(dsn: str, schema: str, answered: set[str], within: float = 30) -> set[str]:
    deadline = time.monotonic() + within
    while True:
        stored = await stored_ids(dsn, schema)
        if answered <= stored or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.2)


async def kill_round(
    args: argparse.Namespace, durability: str, work: Path, *, outage: bool
) -> dict[str, Any]:
    """One SIGKILL under load; with `outage`, on a private PostgreSQL stopped 1 s into the load and started
    again after the kill."""
    if not outage:
        return await _kill_round(args, args.database_url, durability, work, None)
    sys.path.insert(0, str(ROOT))
    from tests.private_postgres import PrivatePostgres

    with PrivatePostgres() as pg:
        return await _kill_round(args, pg.dsn, durability, work, pg)


async def _kill_round(
    args: argparse.Namespace, dsn: str, durability: str, work: Path, pg: Any
) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex}"
    spool = work / f"spool-{secrets.token_hex(4)}"
    env = env_for(dsn, schema, spool, durability)
    try:
        cli(env, "migrate")
        keys = work / f"keys-{secrets.token_hex(4)}.env"
        cli({**env, "DEMO_KEYS_FILE": str(keys)}, "seed-demo")
        key = dict(line.split("=", 1) for line in keys.read_text().splitlines() if "=" in line)[
            "DEMO_CLIENT_KEY"
        ]
        process, url = start(env, work / "server.log")
        try:

            async def killer() -> None:
                if pg is not None:
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(pg.stop, "fast")
                    await asyncio.sleep(args.kill_after - 1.0)
                else:
                    await asyncio.sleep(args.kill_after)
                process.send_signal(signal.SIGKILL)

            (answered, sent), _ = await asyncio.gather(
                load(url, key, args.kill_after + 5, args.connections, process), killer()
            )
            process.wait(30)
        finally:
            stop(process)
        if pg is not None:
            pg.start()
        restarted, _ = start(env, work / "server.log")  # adopts the dead process's spool / journal
        try:
            stored = await wait_stored(dsn, schema, answered, within=10 if durability == "memory" else 30)
        finally:
            stop(restarted)
        return {
            "mode": durability,
            "database": "stopped at 1 s" if pg is not None else "up",
            "sent": sent,
            "answered": len(answered),
            "lost": len(answered - stored),
        }
    finally:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()


async def cost_rounds(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    schema = f"bench_{uuid.uuid4().hex}"
    results: dict[str, list[tuple[float, float]]] = {"memory": [], "disk": []}
    base = env_for(args.database_url, schema, work / "cost-spool", "memory")
    try:
        cli(base, "migrate")
        keys = work / "cost-keys.env"
        cli({**base, "DEMO_KEYS_FILE": str(keys)}, "seed-demo")
        key = dict(line.split("=", 1) for line in keys.read_text().splitlines() if "=" in line)[
            "DEMO_CLIENT_KEY"
        ]
        for _ in range(args.cost_rounds):
            for mode in ("memory", "disk"):
                env = env_for(args.database_url, schema, work / f"cost-{mode}", mode)
                process, url = start(env, work / "server.log")
                try:
                    await load(url, key, 1.0, args.connections)  # warm-up
                    before, started = cpu_seconds(process.pid), time.monotonic()
                    answered, _ = await load(url, key, args.seconds, args.connections)
                    elapsed, cpu = time.monotonic() - started, cpu_seconds(process.pid) - before
                finally:
                    stop(process)
                rate, per_quote = len(answered) / elapsed, cpu / len(answered) * 1e6
                results[mode].append((rate, per_quote))
                print(f"  {mode}: {rate:.0f} req/s, {per_quote:.0f} µs CPU/quote")
    finally:
        connection = await asyncpg.connect(args.database_url)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()
    return {
        mode: {
            "req_per_s": statistics.median(r for r, _ in runs),
            "cpu_us_per_quote": statistics.median(c for _, c in runs),
        }
        for mode, runs in results.items()
    }


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-audit-durability-") as directory:
        work = Path(directory)
        print("SIGKILL under load:")
        for outage in (False, True):
            for mode in ("memory", "disk"):
                for _ in range(args.kill_rounds):
                    print("  ", await kill_round(args, mode, work, outage=outage), flush=True)
        if args.cost_rounds:
            print("cost (interleaved rounds):")
            summary = await cost_rounds(args, work)
            memory, disk = summary["memory"], summary["disk"]
            print(
                f"median: memory {memory['req_per_s']:.0f} req/s "
                f"{memory['cpu_us_per_quote']:.0f} µs CPU/quote; "
                f"disk {disk['req_per_s']:.0f} req/s {disk['cpu_us_per_quote']:.0f} µs CPU/quote; "
                f"disk/memory req/s {disk['req_per_s'] / memory['req_per_s']:.3f}, "
                f"CPU/quote +{disk['cpu_us_per_quote'] - memory['cpu_us_per_quote']:.0f} µs"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--kill-after", type=float, default=3.0)
    parser.add_argument("--kill-rounds", type=int, default=3)
    parser.add_argument("--cost-rounds", type=int, default=3)
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main(build_parser().parse_args())))
