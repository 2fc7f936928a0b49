"""Several workers behave as one server (DESIGN §1 "Several workers", issue 16 item 6): `/metrics` on any
worker reports the sums over all workers (a worker killed with SIGKILL is replaced and its counts stay),
and SIGTERM drains every worker, then the parent exits 0.

Real processes: `python -m pricer serve` with WORKERS=2 on a throwaway PostgreSQL schema and Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    TEST_SECRETS,
    RunningServer,
    free_port,
    stop_server,
    wait_for_health,
    wait_for_workers,
)
from tests.pg import PG_DSN, drop_schema, new_schema_name
from tests.test_shutdown import check_drain, run_through_sigterm

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/11"
DRAIN_SECONDS = 2.0
REQUESTS = 39
SCRAPES = 8
ENDPOINT = "/openapi.json"  # an open route nothing else here calls


def start_workers(directory: Path, schema: str, **env: str) -> RunningServer:
    port = free_port()
    log_path = directory / f"server-{port}.log"
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PRICER_", "DATABASE_", "REDIS_", "DEMO_", "AUDIT_", "WORKERS", "SHUTDOWN_"))
    }
    environment = {
        **inherited,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "2",
        "DATABASE_URL": PG_DSN,
        "DATABASE_SCHEMA": schema,
        "REDIS_URL": REDIS_URL,
        **TEST_SECRETS,
        "AUDIT_SPOOL_DIR": str(directory / "spool"),
        "DEMO_KEYS_FILE": "",
        "RATE_LIMIT_PER_MINUTE": "10000000",
        "LOG_LEVEL": "INFO",
        **env,
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pricer", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = RunningServer(base_url=f"http://127.0.0.1:{port}", process=process, keys={}, log_path=log_path)
    return wait_for_workers(server, 2)


def worker_pids(parent: int) -> set[int]:
    """The parent's worker processes (multiprocessing spawns them; its resource tracker is not one)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    pids = set()
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command and b"resource_tracker" not in command:
            pids.add(int(child))
    return pids


def requests_counted(text: str, endpoint: str) -> tuple[float, float]:
    """(http_requests_total, http_request_duration_seconds_count) of one route, summed over labels."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("endpoint") != endpoint:
                continue
            if sample.name == "http_requests_total":
                total += sample.value
            elif sample.name == "http_request_duration_seconds_count":
                count += sample.value
    return total, count


def scrape(server: RunningServer) -> tuple[float, float]:
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)  # a fresh connection: any worker
    assert response.status_code == 200
    return requests_counted(response.text, ENDPOINT)


def send(server: RunningServer, count: int) -> None:
    def one(_: int) -> int:
        return httpx.get(f"{server.base_url}{ENDPOINT}", timeout=10).status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(one, range(count))) == {200}


def scrapes_settle_at(
    server: RunningServer, expected: float, within: float = 15.0
) -> list[tuple[float, float]]:
    """Scrape until one shows `expected` (workers publish within a second), then SCRAPES more: all must."""
    deadline = time.monotonic() + within
    seen = []
    while (latest := scrape(server)) != (expected, expected):
        seen.append(latest)
        assert time.monotonic() < deadline, f"never reached {expected}: {seen}"
        assert all(total <= expected for total, _ in seen), seen
        time.sleep(0.2)
    return [scrape(server) for _ in range(SCRAPES)]


@pytest.fixture
def schema() -> Iterator[str]:
    name = new_schema_name()
    try:
        yield name
    finally:
        asyncio.run(drop_schema(name))


def test_metrics_report_the_sums_over_workers_and_keep_a_killed_workers_counts(
    tmp_path: Path, schema: str
) -> None:
    server = start_workers(tmp_path, schema)
    try:
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2, workers
        send(server, REQUESTS)
        scrapes = scrapes_settle_at(server, REQUESTS)
        assert all(one == (REQUESTS, REQUESTS) for one in scrapes), scrapes

        # A worker killed outright is replaced; what it counted stays in the sums (never backwards).
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (now := worker_pids(server.process.pid)) == workers or len(now) != 2 or victim in now:
            assert time.monotonic() < deadline, f"no replacement for {victim}: {now}\n{server.log()}"
            time.sleep(0.2)
        wait_for_health(server, timeout=60)
        assert all(one == (REQUESTS, REQUESTS) for one in [scrape(server) for _ in range(SCRAPES)])
        send(server, 5)
        scrapes = scrapes_settle_at(server, REQUESTS + 5)
        assert all(one == (REQUESTS + 5, REQUESTS + 5) for one in scrapes), scrapes
    finally:
        stop_server(server)
    assert "Worker died, starting another" in server.log()


def test_sigterm_drains_every_worker_then_the_parent_exits_zero(tmp_path: Path, schema: str) -> None:
    server = start_workers(tmp_path, schema, SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS))
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2, workers
    exchanges, polls, sigterm_at, returncode, exited_at = run_through_sigterm(
        server, ("GET", ENDPOINT, None, {}), drain_seconds=DRAIN_SECONDS
    )
    check_drain(exchanges, polls, sigterm_at, DRAIN_SECONDS)
    assert returncode == 0, f"{returncode}\n{server.log()}"
    assert exited_at - sigterm_at >= DRAIN_SECONDS
    log = server.log()
    assert log.count("Draining before shutdown") == 2, log
    assert log.count("Application shutdown complete.") == 2, log
    assert "Traceback" not in log, log
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_sigterm_to_every_process_still_drains_every_worker(tmp_path: Path, schema: str) -> None:
    """An init that signals the whole process group (`tini -g`, dumb-init): each worker gets SIGTERM
    directly and again from the parent's forward. The repeat is ignored: every worker drains in full."""
    server = start_workers(tmp_path, schema, SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS))
    workers = worker_pids(server.process.pid)
    assert len(workers) == 2, workers

    def to_the_group(running: RunningServer) -> None:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        # Apart, so that the kernel does not merge the two deliveries into one pending signal.
        time.sleep(0.2)
        os.kill(running.process.pid, signal.SIGTERM)

    exchanges, polls, sigterm_at, returncode, exited_at = run_through_sigterm(
        server, ("GET", ENDPOINT, None, {}), drain_seconds=DRAIN_SECONDS, stop_with=to_the_group
    )
    log = server.log()
    check_drain(exchanges, polls, sigterm_at, DRAIN_SECONDS)
    assert returncode == 0, f"{returncode}\n{log}"
    assert exited_at - sigterm_at >= DRAIN_SECONDS, log
    assert log.count("Draining before shutdown") == 2, log
    assert log.count("Application shutdown complete.") == 2, log
    assert "Traceback" not in log, log
