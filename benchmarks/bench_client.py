"""Client CPU per quote: `PricerClient.quote` (clients/python) against plain httpx posting the same request.

Starts the engine (`python -m pricer serve`, embedded defaults, limits far above the load) on a free loopback
port, then in this one process sends the same single-quote POST over one keep-alive connection with:

- `httpx`: `httpx.Client.post(json=...)`, `raise_for_status()`, `response.json()` (floats, no types);
- `httpx+decimal`: the same, the body read with `json.loads(parse_float=Decimal)` (what a caller who wants
  exact money would hand-write);
- `pricer_client`: `PricerClient.quote` (typed msgspec Struct with Decimals, error mapping, limits headers).

Each round runs every variant for `--requests` quotes, in alternating order; the figure is this process's CPU
time (`time.process_time`) per quote, the median over rounds, so that the engine's own CPU and other load on
the machine count as little as possible. Ratios are against plain httpx in the same run.

    .venv/bin/python benchmarks/bench_client.py [--requests 2000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from pricer_client import PricerClient

BODY = {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_engine(directory: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    port = free_port()
    keys_file = directory / "keys.env"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICER_", "DATABASE_URL", "REDIS_URL"))},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": str(keys_file),
        "RATE_LIMIT_PER_MINUTE": "10000000",
        "LOG_LEVEL": "WARNING",
    }
    log = (directory / "engine.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "pricer", "serve"], env=env, stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200 and keys_file.exists():
                keys = dict(line.split("=", 1) for line in keys_file.read_text().splitlines() if "=" in line)
                return process, base_url, keys
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the engine did not start: " + (directory / "engine.log").read_text())


def cpu_per_call(send: Callable[[], Any], requests: int) -> float:
    """Microseconds of this process's CPU per call."""
    started = time.process_time()
    for _ in range(requests):
        send()
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        process, base_url, keys = start_engine(Path(directory))
        try:
            results = measure(base_url, keys["DEMO_CLIENT_KEY"], args.requests, args.rounds)
        finally:
            process.terminate()
            process.wait(timeout=30)
    baseline = results["httpx"]
    print(f"client CPU per quote (median of {args.rounds} rounds of {args.requests}; ratio to plain httpx)")
    for name, micros in results.items():
        print(f"  {name:14s} {micros:8.1f} µs   {micros / baseline:5.2f} x")
    if args.json:
        args.json.write_text(json.dumps({"cpu_us_per_quote": results, "requests": args.requests}, indent=2))


def measure(base_url: str, key: str, requests: int, rounds: int) -> dict[str, float]:
    headers = {"X-API-Key": key}
    with (
        httpx.Client(base_url=base_url, headers=headers) as plain,
        PricerClient(base_url, key) as pricer,
    ):

        def with_httpx() -> Any:
            response = plain.post("/api/v1/calculate-locate", json=BODY)
            response.raise_for_status()
            return response.json()

        def with_httpx_decimal() -> Any:
            response = plain.post("/api/v1/calculate-locate", json=BODY)
            response.raise_for_status()
            return json.loads(response.content, parse_float=Decimal)

        value = Decimal(BODY["position_value"])

        def with_client() -> Any:
            return pricer.quote("AAPL", value, 30, "demo_client")

        variants: dict[str, Callable[[], Any]] = {
            "httpx": with_httpx,
            "httpx+decimal": with_httpx_decimal,
            "pricer_client": with_client,
        }
        # Same answer from each (and a warm-up of connections and caches).
        assert str(with_client().total_fee) == str(with_httpx_decimal()["total_fee"])
        for send in variants.values():
            cpu_per_call(send, 200)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for name in order:
                samples[name].append(cpu_per_call(variants[name], requests))
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    main()
