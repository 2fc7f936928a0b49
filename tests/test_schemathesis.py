"""Schemathesis over /openapi.json against a real server on loopback (issue 17): every operation, with the
demo client's key and the admin key, every check, zero failures.

The CLI runs in a subprocess (schemathesis's own process, as a user runs it) with a fixed seed and a bounded
number of examples per operation, so the run is repeatable and takes well under a minute; the settings
that JSON Schema cannot state are in tests/schemathesis.toml, with their reasons.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")
# Per operation: enough for the coverage phase's boundary cases and some fuzzing (18 operations).
EXAMPLES = 12
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
    # The rate limit far above what the run sends: a 429 would be a conforming answer that tests nothing.
    running = start_server(tmp_path_factory.mktemp("schemathesis"), RATE_LIMIT_PER_MINUTE="10000000")
    try:
        yield running
    finally:
        stop_server(running)


@pytest.mark.parametrize("key_name", sorted(ACCEPTED))
def test_schemathesis_finds_nothing(server: RunningServer, key_name: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [
        schemathesis_cli(),
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.base_url}/openapi.json",
        "--header",
        f"X-API-Key: {server.keys[key_name]}",
        "--checks",
        "all",
        "--max-examples",
        str(EXAMPLES),
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
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20_000:]
    summary = json.loads(report.read_text())
    assert summary["failures"] == [], output[-20_000:]
    assert summary["errors"] == [], output[-20_000:]
    operations = summary["operations"]
    assert operations["tested"] == operations["total"] >= 18, operations
    accepted = {
        operation: sum(phase["accepted"] for phase in rates.values())
        for operation, rates in summary["valid_rates"].items()
    }
    assert all(accepted.get(operation, 0) > 0 for operation in ACCEPTED[key_name]), accepted
    assert server.process.poll() is None, server.log()[-5_000:]
