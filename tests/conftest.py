"""Shared fixtures: an in-process engine on embedded defaults, and a real one on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from pricer.app import PricerApp, create_app
from pricer.demo import DemoKeys
from pricer.settings import Settings, load_settings
from tests.prerequisites import missing_prerequisites, prerequisites_line

# Property tests run on busy 2-core CI machines, where one example can exceed hypothesis's default 200 ms
# deadline for reasons unrelated to the code under test (a flaky failure, not a finding). The "ci" profile
# drops the deadline and the too-slow health check for every test; each test keeps its own max_examples (an
# @settings inherits the fields it does not set from the loaded profile). HYPOTHESIS_PROFILE=default restores
# hypothesis's own defaults, e.g. to look for a slow example on purpose.
hypothesis_settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, with one line naming what is missing, on a machine without the suite's prerequisites
    (tests/prerequisites.py) instead of failing test after test with connection errors."""
    missing = missing_prerequisites()
    if missing:
        raise pytest.UsageError(prerequisites_line(missing))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Test values of the secrets an engine with a database needs (it refuses the development values there):
# every test or helper that starts one with DATABASE_URL takes them from here.
TEST_SECRETS = {
    "API_KEY_PEPPER": "test-only-pepper-4f1c9a7e2b5d8c3a",
    "JWT_SECRET_KEY": "test-only-jwt-secret-9d2e7b4a1c6f3e8b",
}


def make_settings(**overrides: str) -> Settings:
    """Settings as the engine would read them from an environment holding only these variables.

    Tests of logic run with limits far above what they send; rate-limit tests set their own."""
    return load_settings({"DEMO_KEYS_FILE": "", "RATE_LIMIT_PER_MINUTE": "1000000", **overrides})


async def started_app(settings: Settings) -> PricerApp:
    app = create_app(settings)
    for step in app.lifecycle.startup:
        await step()
    return app


@dataclass
class Engine:
    app: PricerApp
    client: httpx.AsyncClient
    keys: DemoKeys

    def as_client(self) -> dict[str, str]:
        return {"X-API-Key": self.keys.client_key}

    def as_admin(self) -> dict[str, str]:
        return {"X-API-Key": self.keys.admin_key}


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    """The engine on embedded defaults, seeded with demo data, called in-process over ASGI."""
    app = await started_app(make_settings())
    assert app.demo_keys is not None
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine.test") as client:
        yield Engine(app=app, client=client, keys=app.demo_keys)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen[str]
    keys: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def start_server(tmp_path: Path, **env: str) -> RunningServer:
    """`python -m pricer serve` as a real process on a free loopback port; waits for /health."""
    port = free_port()
    keys_file = tmp_path / "demo-keys.env"
    log_path = tmp_path / f"server-{port}.log"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICER_", "DATABASE_URL", "REDIS_URL"))},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": str(keys_file),
        # No 5 s drain at each stop (tests/test_shutdown.py sets its own to test the drain).
        "SHUTDOWN_DRAIN_SECONDS": "0",
        **(TEST_SECRETS if "DATABASE_URL" in env else {}),
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
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200 and keys_file.exists():
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
    keys = dict(line.split("=", 1) for line in keys_file.read_text().splitlines() if "=" in line)
    return RunningServer(base_url=base_url, process=process, keys=keys, log_path=log_path)


def wait_for_health(server: RunningServer, timeout: float = 30) -> RunningServer:
    """Wait until the server answers /health; stop it and raise with its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_server(server)
    raise RuntimeError(f"server did not start:\n{server.log()}")


def wait_for_workers(server: RunningServer, workers: int, timeout: float = 60) -> RunningServer:
    """Wait until `workers` uvicorn workers of a WORKERS > 1 server have started (not only the first to
    answer /health); stop it and raise with its log if they do not. The server logs at INFO or finer."""
    wait_for_health(server, timeout=timeout)
    deadline = time.monotonic() + timeout
    while server.log().count("Application startup complete.") < workers:
        if time.monotonic() > deadline or server.process.poll() is not None:
            stop_server(server)
            raise RuntimeError(f"the workers did not start:\n{server.log()}")
        time.sleep(0.1)
    return server


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_server(tmp_path)
    try:
        yield server
    finally:
        stop_server(server)
