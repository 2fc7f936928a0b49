"""What the test suite needs from the machine, checked once before any test runs (conftest.py).

Without one of these, dozens of tests would fail one by one with raw connection errors; instead the test
command stops at once with one line naming everything that is missing and how to get it (README, "Running
the tests"). Each check is a few milliseconds: a TCP connection or a file lookup.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from tests.shared_data import SHARED_DATA

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
# The shared Redis the tests use (database numbers vary by test); private ones are started from redis-server.
REDIS_ADDRESS = ("127.0.0.1", 6379)


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def missing_prerequisites(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One short phrase per missing prerequisite (empty when the machine has everything)."""
    missing: list[str] = []
    if not SHARED_DATA.is_dir():
        missing.append(f"the market data directory {SHARED_DATA} (../shared/data beside the checkout)")
    database_url = environ.get("PRICER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    database = urlsplit(database_url)
    host, port = database.hostname or "127.0.0.1", database.port or 5432
    if not _reachable(host, port):
        missing.append(f"PostgreSQL at {host}:{port} (PRICER_TEST_DATABASE_URL) is unreachable")
    if not _reachable(*REDIS_ADDRESS):
        missing.append("Redis at {}:{} is unreachable".format(*REDIS_ADDRESS))
    pg_bin = Path(environ.get("PRICER_TEST_PG_BIN", DEFAULT_PG_BIN))
    if not all((pg_bin / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
        missing.append(f"PostgreSQL 15 server binaries in {pg_bin} (PRICER_TEST_PG_BIN)")
    path = environ.get("PATH", os.defpath)
    for tool in ("redis-server", "promtool", "prometheus"):
        if shutil.which(tool, path=path) is None:
            missing.append(f"{tool} on PATH")
    if shutil.which("gcc", path=path) is None and shutil.which("cc", path=path) is None:
        missing.append("a C compiler (gcc) on PATH")
    return missing


def prerequisites_line(missing: list[str]) -> str:
    return (
        "pricer tests cannot run, missing: "
        + "; ".join(missing)
        + " (README: Running the tests; Debian: apt-get install -y postgresql-15 redis-server prometheus gcc)"
    )
