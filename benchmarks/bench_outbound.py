"""Client CPU per outbound call: the engine's `pricer.outbound.http.HttpClient` against httpx and aiohttp.

The gateway pays its HTTP client's CPU on every hop to a backend, and the market-data refresher on every
provider call (issue 15 point 2, issue 20 point 8), so the client is chosen by this figure. A peer (uvicorn
with httptools on uvloop, a raw ASGI app answering a 300-byte JSON body, as a backend's quote is) runs in a
child process; this process, on uvloop as the engine is, sends the same POST with each client over pooled
keep-alive connections, one call at a time and 8 at once, in alternating rounds. The figure is this
process's CPU time (`time.process_time`) per call, median over rounds; ratios are against httpx in the same
run, so the machine's other load counts as little as possible.

    .venv/bin/python benchmarks/bench_outbound.py [--calls 3000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import uvloop

from pricer.outbound.http import HttpClient

try:
    import aiohttp
except ImportError:  # aiohttp is only a comparison point: the bench extra may lack it
    aiohttp = None

REQUEST = json.dumps(
    {"ticker": "AAPL", "position_value": 100000, "loan_days": 30, "client_id": "demo_client"}
).encode()
ANSWER = json.dumps({"status": "success", "total_fee": 456.51, "padding": "x" * 220}).encode()
HEADERS = {"Content-Type": "application/json", "X-Request-ID": "0123456789abcdef0123456789abcdef"}


async def peer_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": ANSWER})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        peer_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error",
        lifespan="off", access_log=False,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Call = Callable[[], Awaitable[None]]


async def make_clients(url: str) -> tuple[dict[str, Call], Callable[[], Awaitable[None]]]:
    ours = HttpClient(url, max_connections=8)
    theirs = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=8))
    calls: dict[str, Call] = {}

    async def call_ours() -> None:
        response = await ours.request("POST", "/quote", headers=HEADERS, body=REQUEST, timeout=2.0)
        assert (response.status, len(response.body)) == (200, len(ANSWER))

    async def call_httpx() -> None:
        response = await theirs.post("/quote", content=REQUEST, headers=HEADERS, timeout=2.0)
        assert (response.status_code, len(response.content)) == (200, len(ANSWER))

    calls["httpx"] = call_httpx
    calls["pricer.outbound"] = call_ours
    session = None
    if aiohttp is not None:
        session = aiohttp.ClientSession(
            base_url=url, connector=aiohttp.TCPConnector(limit=8), timeout=aiohttp.ClientTimeout(total=2.0)
        )

        async def call_aiohttp() -> None:
            assert session is not None
            async with session.post("/quote", data=REQUEST, headers=HEADERS) as response:
                body = await response.read()
                assert (response.status, len(body)) == (200, len(ANSWER))

        calls["aiohttp"] = call_aiohttp

    async def close() -> None:
        await ours.aclose()
        await theirs.aclose()
        if session is not None:
            await session.close()

    return calls, close


async def cpu_per_call(call: Call, calls: int, concurrency: int) -> float:
    async def worker(count: int) -> None:
        for _ in range(count):
            await call()

    await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm the pool
    started = time.process_time()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (calls // concurrency * concurrency)


async def measure(url: str, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    clients, close = await make_clients(url)
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        for round_index in range(rounds):
            names = list(clients)
            if round_index % 2:
                names.reverse()
            for concurrency in (1, 8):
                for name in names:
                    cpu = await cpu_per_call(clients[name], calls, concurrency)
                    samples.setdefault((name, concurrency), []).append(cpu)
    finally:
        await close()
    result: dict[str, dict[str, float]] = {}
    for (name, concurrency), values in samples.items():
        result.setdefault(name, {})[f"cpu_us_c{concurrency}"] = statistics.median(values) * 1e6
    for concurrency in (1, 8):
        base = result["httpx"][f"cpu_us_c{concurrency}"]
        for figures in result.values():
            figures[f"vs_httpx_c{concurrency}"] = figures[f"cpu_us_c{concurrency}"] / base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    peer = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)], env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        result = uvloop.run(measure(f"http://127.0.0.1:{port}", args.calls, args.rounds))
    finally:
        peer.terminate()
        peer.wait(10)
    print(f"client CPU per call (median of {args.rounds} rounds, {args.calls} calls each):")
    for name, figures in result.items():
        print(
            f"  {name:16s} one at a time {figures['cpu_us_c1']:7.1f} µs ({figures['vs_httpx_c1']:.2f}× httpx)"
            f"   8 at once {figures['cpu_us_c8']:7.1f} µs ({figures['vs_httpx_c8']:.2f}× httpx)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
