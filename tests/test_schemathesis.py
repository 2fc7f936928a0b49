"""Schemathesis over /openapi.json against a real server on loopback (issue 17): every operation, with the
demo client's key and the admin key, every check, zero failures; embedded, and with PostgreSQL + Redis.

The CLI runs in a subprocess (schemathesis's own process, as a user runs it) with a fixed seed and a bounded
number of examples per operation, so the run is repeatable and takes well under a minute; the settings
that JSON Schema cannot state are in tests/schemathesis.toml, with their reasons.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RunningServer, start_server, stop_server
from tests.pg import PG_DSN, drop_schema, new_schema_name
from tests.test_postgres_engine import cli_ok, seed_demo, start_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")
# Per operation: enough for the coverage phase's boundary cases and some fuzzing (18 operations).
EXAMPLES = 10
EXAMPLES_POSTGRES = 5
# A Redis database of this module's own on the shared server (its rate-cache keys are cleared first).
REDIS_DB = 9
PRICED = [
    "GET /api/v1/calculate-locate",
    "POST /api/v1/calculate-locate",
    "POST /api/v1/calculate-locate/batch",
]
# Operations that must have answered some generated requests with success, for each key: a run that only
# met 401, 403 or 404 would pass without testing the API.
ACCEPTED = {
    "DEMO_CLIENT_KEY": [*PRICED, "GET /api/v1/rates", "GET /api/v1/rates/{ticker}"],
    "DEMO_ADMIN_KEY": [
        *PRICED,
        "PUT /api/v1/admin/clients/{client_id}",
        "PUT /api/v1/admin/stocks/{ticker}",
        "PUT /api/v1/admin/events/{ticker}",
        "POST /api/v1/admin/keys",
    ],
}


def schemathesis_cli() -> str:
    beside = Path(sys.executable).with_name("schemathesis")
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    assert found is not None, "schemathesis is not installed: pip install -e '.[test]'"
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The embedded default: in-memory stores and demo data, as `make serve` runs it."""
    # The rate limit far above what the run sends: a 429 would be a conforming answer that tests nothing.
    running = start_server(tmp_path_factory.mktemp("schemathesis"), RATE_LIMIT_PER_MINUTE="10000000")
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def server_with_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """PostgreSQL (a throwaway schema, seeded by `pricer seed-demo`) and Redis (a database of its own)."""
    directory = tmp_path_factory.mktemp("schemathesis-pg")
    schema = new_schema_name()
    with redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=5) as store:
        # Rates cached by earlier runs (other schemas, other data) must not be served here.
        for pattern in ("ratecache:*", "ratelimit:*"):
            for name in store.scan_iter(match=pattern, count=1000):
                store.delete(name)
    env = {
        "DATABASE_URL": PG_DSN,
        "DATABASE_SCHEMA": schema,
        "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "AUDIT_SPOOL_DIR": str(directory / "spool"),
        "SHUTDOWN_DRAIN_SECONDS": "0",
    }
    running: RunningServer | None = None
    try:
        cli_ok(env, "migrate")
        keys = seed_demo(env, directory)
        running = start_engine(directory, env)
        running.keys.update(keys)
        yield running
    finally:
        if running is not None:
            stop_server(running)
        asyncio.run(drop_schema(schema))


def run_schemathesis(base_url: str, key: str, examples: int, directory: Path) -> dict[str, Any]:
    """The CLI over the server's /openapi.json with every check; its JSON report, asserted clean."""
    report = directory / "report.json"
    command = [
        schemathesis_cli(),
        "--config-file",
        str(CONFIG),
        "run",
        f"{base_url}/openapi.json",
        "--header",
        f"X-API-Key: {key}",
        "--checks",
        "all",
        "--max-examples",
        str(examples),
        "--seed",
        "17",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    # Run from the test's directory: schemathesis keeps a cache directory where it runs.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=directory)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20_000:]
    summary: dict[str, Any] = json.loads(report.read_text())
    assert summary["failures"] == [], output[-20_000:]
    assert summary["errors"] == [], output[-20_000:]
    operations = summary["operations"]
    assert operations["tested"] == operations["total"] >= 18, operations
    return summary


def assert_accepted(summary: dict[str, Any], expected: list[str]) -> None:
    accepted = {
        operation: sum(phase["accepted"] for phase in rates.values())
        for operation, rates in summary["valid_rates"].items()
    }
    assert all(accepted.get(operation, 0) > 0 for operation in expected), accepted


@pytest.mark.parametrize("key_name", sorted(ACCEPTED))
def test_schemathesis_finds_nothing(server: RunningServer, key_name: str, tmp_path: Path) -> None:
    summary = run_schemathesis(server.base_url, server.keys[key_name], EXAMPLES, tmp_path)
    assert_accepted(summary, ACCEPTED[key_name])
    assert server.process.poll() is None, server.log()[-5_000:]


def test_schemathesis_finds_nothing_with_postgres_and_redis(
    server_with_postgres: RunningServer, tmp_path: Path
) -> None:
    """The same with the stores a production replica has (the admin key reaches every operation); fewer
    examples, the embedded runs above having covered the generation."""
    server = server_with_postgres
    summary = run_schemathesis(server.base_url, server.keys["DEMO_ADMIN_KEY"], EXAMPLES_POSTGRES, tmp_path)
    assert_accepted(summary, ACCEPTED["DEMO_ADMIN_KEY"])
    assert server.process.poll() is None, server.log()[-5_000:]
