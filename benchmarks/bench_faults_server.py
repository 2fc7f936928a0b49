"""Connection and shutdown faults against real `python -m pricer serve` processes (issue 16, items 5-6).

    python benchmarks/bench_faults_server.py [--slow-clients 1000] [--database-url URL --redis-url URL]

- slowloris: N connections each sending one byte of a never-ending header a second; how long the server
  holds them (HEADER_READ_TIMEOUT_SECONDS, default 10) and /health's latency meanwhile;
- a 32 MiB header: the answer (431 expected; uvicorn alone accepted it);
- SIGTERM under keep-alive load (8 clients, requests back to back), WORKERS=1 and, with a database and
  Redis, WORKERS=2: requests sent, answered, failed on an existing connection, failed new connections
  before the drain's end, answers during the drain without `Connection: close`, exit status.

Prints one markdown table. Traffic goes to 127.0.0.1 only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

DRAIN_SECONDS = 5.0
CLIENTS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def health_status(port: int, timeout: float = 5.0) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def start(directory: Path, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "WORKERS"))},
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": "",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_MINUTE": "10000000",
        "AUDIT_SPOOL_DIR": str(directory / "spool"),
        **env,
    }
    log = (directory / f"server-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pricer", "serve"], env=environment, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while health_status(port, 1) != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"server did not start: {(directory / f'server-{port}.log').read_text()}")
        time.sleep(0.1)
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def slowloris(directory: Path, clients: int) -> list[str]:
    process, port = start(directory)
    try:
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
        open_: dict[socket.socket, int] = {}
        opened = time.monotonic()
        for _ in range(clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            sock.send(request[:1])
            open_[sock] = 1
        closed: list[float] = []
        latencies: list[float] = []
        failures = 0
        while open_ and time.monotonic() - opened < 60:
            ready, _, _ = select.select(list(open_), [], [], 0)
            for sock in ready:
                closed.append(time.monotonic() - opened)
                del open_[sock]
                sock.close()
            for sock, sent in list(open_.items()):
                try:
                    sock.send(request[sent : sent + 1])
                    open_[sock] = sent + 1
                except OSError:
                    closed.append(time.monotonic() - opened)
                    del open_[sock]
                    sock.close()
            started = time.monotonic()
            if health_status(port) != 200:
                failures += 1
            latencies.append(time.monotonic() - started)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        for sock in open_:
            sock.close()
        held = f"{min(closed):.1f}-{max(closed):.1f} s" if closed else "-"
        return [
            f"| slowloris, {clients} connections, 1 byte/s | {clients} | held {held}; still open after 60 s: "
            f"{len(open_)} | /health: {len(latencies)} probes, {failures} failed, "
            f"max {max(latencies) * 1000:.0f} ms |"
        ]
    finally:
        stop(process)


def huge_header(directory: Path) -> list[str]:
    process, port = start(directory)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sent = 0
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * 65536
                while sent < 32 << 20:
                    sock.sendall(chunk)
                    sent += len(chunk)
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass
            try:
                answer = sock.recv(200).split(b"\r\n", 1)[0].decode()
            except OSError as error:
                answer = type(error).__name__
        return [
            f"| 32 MiB header | 1 | answer `{answer}`; the client had pushed "
            f"{sent >> 10} KiB into the socket when it was closed | - |"
        ]
    finally:
        stop(process)


def keepalive_client(
    port: int,
    stop_at: float,
    stop: threading.Event,
    stats: dict[str, int],
    lock: threading.Lock,
    state: dict[str, float],
) -> None:
    connection: http.client.HTTPConnection | None = None
    while not stop.is_set() and time.monotonic() < stop_at:
        started = time.monotonic()
        reused = connection is not None
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.connect()
            except OSError:
                with lock:
                    stats["refused_new"] += 1
                connection = None
                time.sleep(0.05)
                continue
        try:
            connection.request("GET", "/openapi.json")
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            key = (
                "failed_reused"
                if reused
                else ("failed_new_in_drain" if started < state["drain_end"] else "failed_new_after_drain")
            )
            with lock:
                stats["sent"] += 1
                stats[key] += 1
            connection.close()
            connection = None
            continue
        closes = (response.getheader("connection") or "").lower() == "close"
        with lock:
            stats["sent"] += 1
            stats["answered"] += 1
            if response.status != 200:
                stats["not_200"] += 1
            if state["sigterm"] + 0.3 <= started < state["drain_end"] and not closes:
                stats["kept_open_in_drain"] += 1
        if closes:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def sigterm(directory: Path, workers: int, env: dict[str, str]) -> list[str]:
    process, port = start(directory, WORKERS=str(workers), SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS), **env)
    keys = (
        "sent",
        "answered",
        "not_200",
        "failed_reused",
        "failed_new_in_drain",
        "failed_new_after_drain",
        "refused_new",
        "kept_open_in_drain",
    )
    stats = dict.fromkeys(keys, 0)
    lock = threading.Lock()
    state = {"sigterm": float("inf"), "drain_end": float("inf")}
    stop_event = threading.Event()
    stop_at = time.monotonic() + 60
    threads = [
        threading.Thread(
            target=keepalive_client, args=(port, stop_at, stop_event, stats, lock, state), daemon=True
        )
        for _ in range(CLIENTS)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        state["sigterm"] = time.monotonic()
        state["drain_end"] = state["sigterm"] + DRAIN_SECONDS
        process.send_signal(signal.SIGTERM)
        try:
            code: int | str = process.wait(timeout=50)
        except subprocess.TimeoutExpired:
            code = "no exit in 50 s"
        exited = time.monotonic() - state["sigterm"]
    finally:
        stop_event.set()
        for thread in threads:
            thread.join(timeout=15)
        stop(process)
    return [
        f"| SIGTERM, WORKERS={workers}, {CLIENTS} keep-alive clients, drain {DRAIN_SECONDS:g} s "
        f"| {stats['sent']} | answered {stats['answered']} (not 200: {stats['not_200']}); failed on an "
        f"existing connection: {stats['failed_reused']}; new connection failed before the drain's end: "
        f"{stats['failed_new_in_drain']}, "
        f"after: {stats['failed_new_after_drain']} + refused {stats['refused_new']}; answers in the drain "
        f"without `Connection: close`: {stats['kept_open_in_drain']} | exit {code} after {exited:.1f} s |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slow-clients", type=int, default=1000)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    rows = ["| fault | requests / connections | outcome | service |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="pricer-faults-") as tmp:
        directory = Path(tmp)
        rows += slowloris(directory, args.slow_clients)
        rows += huge_header(directory)
        rows += sigterm(directory, 1, {})
        if args.database_url and args.redis_url:
            schema = f"bench_{uuid.uuid4().hex}"
            env = {
                "DATABASE_URL": args.database_url,
                "DATABASE_SCHEMA": schema,
                "REDIS_URL": args.redis_url,
                "JWT_SECRET_KEY": uuid.uuid4().hex,
                "API_KEY_PEPPER": uuid.uuid4().hex,
            }
            try:
                rows += sigterm(directory, 2, env)
            finally:
                import asyncio

                import asyncpg  # type: ignore[import-untyped]

                async def drop() -> None:
                    connection = await asyncpg.connect(args.database_url)
                    try:
                        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                    finally:
                        await connection.close()

                asyncio.run(drop())
    print("\n".join(rows))


if __name__ == "__main__":
    main()
