"""The provider simulator (`pricer simulate-sources`) as a real process for the live-sources tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sim:
    url: str
    key: str
    process: subprocess.Popen[bytes]
    client: httpx.Client
    log_path: Path

    def control(self, method: str, path: str, body: object = None) -> Any:
        response = self.client.request(method, path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self) -> Any:
        return self.control("GET", "/control/stats")

    def fault(self, provider: str, **plan: object) -> None:
        self.control("PUT", f"/control/faults/{provider}", plan)

    def healthy(self) -> None:
        self.control("DELETE", "/control/faults")

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def running_simulator(tmp_path: Path, key: str) -> Iterator[Sim]:
    port = free_port()
    log_path = tmp_path / "simulator.log"
    environment = {k: v for k, v in os.environ.items() if k != "SIMULATOR_API_KEY"} | {
        "SIMULATOR_API_KEY": key
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pricer", "simulate-sources", "--port", str(port)],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"simulator exited: {log_path.read_text()}")
            try:
                if client.get("/control/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulator did not start: {log_path.read_text()}")
            time.sleep(0.05)
        yield Sim(url=url, key=key, process=process, client=client, log_path=log_path)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
