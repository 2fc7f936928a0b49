"""Single quotes while 10^6-position batches are priced on the same replica (issue 14, item 7: mixed),
and the replica's peak memory for one 10^6-position batch in each form.

    python benchmarks/bench_mixed.py [--positions 1000000] [--duration 20] [--json out.json]

1. Mixed: the load tester's `singles-during-batches` scenario: single quotes (POST) at a constant open-loop
   rate (100/s, the C generator) while 10^6-position JSON batches arrive back to back on a connection of their
   own, over the real 2022 IBKR file loaded into the engine (about 5,000 tickers; random tickers, values and
   days). Two engines on embedded defaults, one after the other in the same run: `BATCH_WORKERS=0` (every
   batch priced on the event loop: the behaviour before issue 14) and the default pool. Reported: the
   singles' p50/p99/max during the batches, the batches' round trips, the server's CPU (main process and
   its batch workers), and a py-spy profile of the main process during the batches (what is left on the
   loop: the top frames by samples).
2. Memory: one engine with the default pool gets one 10^6-position batch at a time as row JSON, columnar
   JSON and columnar msgpack; the replica's peak RSS (main process + batch workers, sampled every 10 ms) and
   the peak of its scratch files on tmpfs (request body, priced columns, response) are reported.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

import loadtest
import scenarios

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IBKR_FILE = ROOT.parent / "shared" / "data" / "ibkr_usa_2022-08-06.txt"
BATCH_PATH = "/api/v1/calculate-locate/batch"
SCENARIO = "singles-during-batches"
P99_TARGET_MS = 20.0
MAX_TARGET_MS = 100.0
ROW_RSS_TARGET_MB = 600.0
COLUMNAR_RSS_TARGET_MB = 400.0
ENGINE_ENV = {
    # Limits far above the load: the figures are the loop's, not the limiter's.
    "RATE_LIMIT_PER_MINUTE": "10000000",
    "POSITIONS_LIMIT_PER_MINUTE": "1000000000",
    "SHUTDOWN_DRAIN_SECONDS": "0",
    "LOG_LEVEL": "WARNING",
}


@dataclasses.dataclass
class Engine:
    process: subprocess.Popen[bytes]
    url: str
    keys: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_engine(workdir: Path, name: str, **env: str) -> Engine:
    port = free_port()
    keys_file = workdir / f"{name}-keys.env"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICER_", "DATABASE_URL", "REDIS_URL"))},
        **ENGINE_ENV,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DEMO_KEYS_FILE": str(keys_file),
        **env,
    }
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pricer", "serve"], env=environment, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench_mixed: engine {name} exited: {(workdir / f'{name}.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200 and keys_file.exists():
                    break
        except OSError:
            time.sleep(0.1)
    keys = dict(line.split("=", 1) for line in keys_file.read_text().splitlines() if "=" in line)
    engine = Engine(process, url, keys)
    load_ibkr(engine)
    return engine


def load_ibkr(engine: Engine) -> None:
    request = urllib.request.Request(
        engine.url + "/api/v1/admin/availability",
        data=IBKR_FILE.read_bytes(),
        headers={"X-API-Key": engine.keys["DEMO_ADMIN_KEY"], "Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        if response.status not in (200, 201):
            raise SystemExit(f"bench_mixed: availability upload answered {response.status}")


def ibkr_tickers() -> list[str]:
    lines = IBKR_FILE.read_text().splitlines()[2:]
    return [line.split("|", 1)[0] for line in lines if line and not line.startswith("#")]


# ---- the replica's processes ---------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return pids


def rss_mb(pid: int) -> float:
    total = 0
    for process in tree(pid):
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def scratch_mb(pid: int) -> float:
    total = 0
    for directory in Path("/dev/shm").glob(f"pricer-batches-{pid}-*"):
        for path in directory.iterdir():
            try:
                total += path.stat().st_size
            except OSError:
                continue
    return total / (1 << 20)


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


class PeakSampler(threading.Thread):
    """Peak RSS of the replica (main + workers) and of its tmpfs scratch files, every 10 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss = 0.0
        self.scratch = 0.0
        self.total = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss, scratch = rss_mb(self.pid), scratch_mb(self.pid)
            self.rss, self.scratch = max(self.rss, rss), max(self.scratch, scratch)
            self.total = max(self.total, rss + scratch)
            time.sleep(0.01)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        return {
            "rss_mb": round(self.rss, 1),
            "scratch_mb": round(self.scratch, 1),
            "total_mb": round(self.total, 1),
        }


# ---- py-spy -------------------------------------------------------------------------------------------


def profile_main(pid: int, seconds: float, out: Path, rate: int = 250) -> dict[str, Any] | None:
    """py-spy (raw, idle excluded) of the main process only: its top leaf frames by samples."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    command = [str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw"]
    completed = subprocess.run(
        [*command, "-o", str(out), "--nonblocking"], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0 or not out.exists():
        return {"error": completed.stderr.strip()[-300:]}
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaves[frames[-1]] += int(count)
        total += int(count)
    expected = rate * int(seconds)
    return {
        "command": " ".join([*command, "-o", out.name, "--nonblocking"]),
        "samples": total,
        "busy_share": round(total / expected, 3) if expected else None,
        "top": [
            {"frame": frame, "samples": n, "share": round(n / total, 3)} for frame, n in leaves.most_common(5)
        ]
        if total
        else [],
    }


# ---- the runs ------------------------------------------------------------------------------------------


def mixed_run(
    workdir: Path, name: str, args: argparse.Namespace, tickers: list[str], **env: str
) -> dict[str, Any]:
    engine = start_engine(workdir, name, **env)
    try:
        scenario = dataclasses.replace(
            scenarios.load_scenario(SCENARIO),
            tickers=tuple(tickers),
            background=dataclasses.replace(
                scenarios.load_scenario(SCENARIO).background,  # type: ignore[arg-type]
                positions=args.positions,
            ),
        )
        keys = [scenarios.ApiKey("demo_client", engine.keys["DEMO_CLIENT_KEY"])]
        host = engine.url.removeprefix("http://")
        requests_file = workdir / f"{name}-requests.bin"
        scenarios.write_requests_file(scenarios.build_requests(scenario, keys, host), requests_file)
        background = scenarios.build_background(scenario, keys, host)
        config = loadtest.RunConfig(
            engine.url, scenario.name, "open", args.rate, 4, args.duration, args.warmup, timeout=30
        )
        pids = tree(engine.pid)
        cpu_before = cpu_seconds(pids)
        sampler = PeakSampler(engine.pid)
        sampler.start()
        profile: dict[str, Any] = {}

        def spy() -> None:
            time.sleep(args.warmup + 1.0)
            seconds = max(1.0, min(8.0, args.duration - 2.0))
            where = args.profile_dir or workdir
            profile.update(profile_main(engine.pid, seconds, where / f"{name}-profile.txt") or {})

        profiler = threading.Thread(target=spy, daemon=True)
        profiler.start()
        result, behind = loadtest.run_with_background(config, requests_file, background, progress=False)
        profiler.join()
        memory = sampler.stop()
        cpu_used = cpu_seconds(tree(engine.pid)) - cpu_before
        summary = loadtest.summarize(result, scenario)
        return {
            "engine": name,
            "env": env,
            "singles": {
                "rate": args.rate,
                "completed": summary["completed"],
                "latency_ms": summary["latency_ms"],
                "status_counts": summary["status_counts"],
                "valid": summary["valid"],
                "problems": summary["problems"],
            },
            "batches": behind,
            "server_cpu_s": round(cpu_used, 2),
            "wall_s": result.get("wall_s"),
            "peak": memory,
            "profile_main": profile,
        }
    finally:
        engine.stop()


def batch_documents(positions: int, tickers: list[str], seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    picked = [rng.choice(tickers) for _ in range(positions)]
    values = [round(rng.uniform(1000.0, 5_000_000.0), 2) for _ in range(positions)]
    days = [rng.randint(1, 365) for _ in range(positions)]
    rows = [
        {"ticker": t, "position_value": v, "loan_days": d}
        for t, v, d in zip(picked, values, days, strict=True)
    ]
    columns = {"ticker": picked, "position_value": values, "loan_days": days}
    return {
        "row JSON": (
            "application/json",
            json.dumps({"client_id": "demo_client", "positions": rows}).encode(),
        ),
        "columnar JSON": (
            "application/json",
            json.dumps({"client_id": "demo_client", "columns": columns}).encode(),
        ),
        "columnar msgpack": (
            "application/msgpack",
            msgspec.msgpack.encode({"client_id": "demo_client", "columns": columns}),
        ),
    }


def memory_run(workdir: Path, args: argparse.Namespace, tickers: list[str]) -> dict[str, Any]:
    bodies = batch_documents(args.positions, tickers)
    out: dict[str, Any] = {}
    for form, (media, body) in bodies.items():
        # A fresh engine per form: each peak is that form's alone.
        engine = start_engine(workdir, f"memory-{form.replace(' ', '-')}")
        try:
            warm = _post(engine, media, _small(media), timeout=60)
            idle = rss_mb(engine.pid)
            sampler = PeakSampler(engine.pid)
            sampler.start()
            started = time.perf_counter()
            status, size = _post(engine, media, body)
            seconds = time.perf_counter() - started
            peak = sampler.stop()
            out[form] = {
                "request_bytes": len(body),
                "response_bytes": size,
                "status": status,
                "warm_status": warm[0],
                "round_trip_s": round(seconds, 3),
                "rss_idle_mb": round(idle, 1),
                **peak,
            }
        finally:
            engine.stop()
    return out


def _small(media: str) -> bytes:
    # A batch over the inline threshold, so that the worker has started before the measured one.
    rows = [{"ticker": "AAPL", "position_value": 1000.0, "loan_days": 30}] * 6000
    document = {"client_id": "demo_client", "positions": rows}
    return (
        msgspec.msgpack.encode(document) if media == "application/msgpack" else json.dumps(document).encode()
    )


def _post(engine: Engine, media: str, body: bytes, timeout: float = 300) -> tuple[int, int]:
    request = urllib.request.Request(
        engine.url + BATCH_PATH,
        data=body,
        headers={"X-API-Key": engine.keys["DEMO_CLIENT_KEY"], "Content-Type": media, "Accept": media},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, len(response.read())


def targets(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pool = doc["mixed"].get("pool")
    if pool:
        latency = pool["singles"]["latency_ms"]
        yield _target("singles p99 during 10^6 batches (default pool)", latency["p99"], P99_TARGET_MS, "ms")
        yield _target("singles max during 10^6 batches (default pool)", latency["max"], MAX_TARGET_MS, "ms")
    for form, figures in doc.get("memory", {}).items():
        limit = ROW_RSS_TARGET_MB if form.startswith("row") else COLUMNAR_RSS_TARGET_MB
        yield _target(f"peak RSS + tmpfs, one 10^6 {form} batch", figures["total_mb"], limit, "MB")


def _target(name: str, value: float, limit: float, unit: str) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "unit": unit,
        "verdict": "PASS" if value <= limit else "MISS",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100.0, help="single quotes per second (open loop)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile-dir", type=Path, help="keep the raw py-spy profiles there")
    args = parser.parse_args(argv)
    tickers = ibkr_tickers()
    doc: dict[str, Any] = {
        "settings": {
            **vars(args),
            "json": str(args.json) if args.json else None,
            "profile_dir": str(args.profile_dir) if args.profile_dir else None,
            "tickers": len(tickers),
        },
        "started_at": dt.datetime.now(dt.UTC).isoformat(),
        "machine": loadtest.machine_facts(),
        "mixed": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as directory:
        workdir = Path(directory)
        for name, env in () if args.skip_mixed else (("inline", {"BATCH_WORKERS": "0"}), ("pool", {})):
            print(
                f"bench_mixed: {name}: singles at {args.rate:g}/s during {args.positions:,}-position batches",
                file=sys.stderr,
            )
            doc["mixed"][name] = mixed_run(workdir, name, args, tickers, **env)
            print(json.dumps(doc["mixed"][name]["singles"]["latency_ms"]), file=sys.stderr)
        if not args.skip_memory:
            doc["memory"] = memory_run(workdir, args, tickers)
    doc["targets"] = list(targets(doc))
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
