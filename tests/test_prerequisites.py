"""The test command on a machine that lacks something (issue 17 item 10): pytest, run in a subprocess as a
newcomer runs it, stops at once with one line naming what is missing, before any test runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port
from tests.prerequisites import missing_prerequisites

REPOSITORY = Path(__file__).resolve().parent.parent


def run_pytest(cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    environment = {**os.environ, **env}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_pricing.py", "-q", "-p", "no:cacheprovider"],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, time.monotonic() - started


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 4, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "passed" not in lines[0]
    assert lines[0].startswith("ERROR: pricer tests cannot run, missing: "), lines
    return lines[0]


def test_this_machine_has_every_prerequisite() -> None:
    assert missing_prerequisites() == []


def test_an_unreachable_database_stops_the_run_with_one_line() -> None:
    port = free_port()  # nothing listens there
    result, took = run_pytest(
        REPOSITORY, PRICER_TEST_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/test"
    )
    line = the_one_line(result)
    assert f"PostgreSQL at 127.0.0.1:{port} (PRICER_TEST_DATABASE_URL) is unreachable" in line
    assert "Redis" not in line
    assert took < 60, took


def test_missing_tools_are_all_named_in_the_one_line(tmp_path: Path) -> None:
    result, _ = run_pytest(REPOSITORY, PATH=str(tmp_path), PRICER_TEST_PG_BIN=str(tmp_path / "pg"))
    line = the_one_line(result)
    for tool in ("redis-server on PATH", "promtool on PATH", "prometheus on PATH", "a C compiler (gcc)"):
        assert tool in line, line
    assert f"PostgreSQL 15 server binaries in {tmp_path / 'pg'}" in line
    assert "PostgreSQL at" not in line


def test_a_checkout_without_shared_data_beside_it_stops_with_one_line(tmp_path: Path) -> None:
    """The tests find the market data at ../shared/data from the checkout: a copy elsewhere has none."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPOSITORY / "tests", checkout / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPOSITORY / "pyproject.toml", checkout / "pyproject.toml")
    result, _ = run_pytest(checkout)
    line = the_one_line(result)
    assert f"the market data directory {tmp_path / 'shared' / 'data'}" in line
