"""10^6-position batches (issue 14): row JSON, row msgpack, columnar JSON, columnar msgpack.

    python benchmarks/bench_batch.py --million 1000000 --skip-batch --skip-rss [--json out.json]

The engine (embedded defaults, authenticated, pinned to CPU 0) is loaded with the real IBKR availability
file of 2022-08-06 (`../shared/data`, uploaded through the admin API); the batch draws 5,000 of its
tickers, random values (whole and odd cents) and random days. Each body is sent `rounds` times, one at a
time, from this process (pinned to CPU 1) over one HTTP/1.1 connection; per format, medians of:

- round trip: from the first byte sent to the last byte of the answer read (wall clock);
- server CPU: utime + stime over the request (/proc/<pid>/stat) of the engine process and its batch
  worker processes (a large batch is decoded, priced and encoded in a worker), all their threads;
- peak RSS: the largest sum of VmRSS of the engine and its batch workers, sampled every 5 ms during the
  request; each format runs on a fresh engine (with the file loaded), so that an earlier format's
  high-water mark is not counted.

The floor beside them is msgspec's own work on the same bodies, measured in this process (CPU time): the
request decoded (untyped) plus the response encoded (from the objects msgspec decodes it into). The
ratio server CPU / floor is what the server adds over the bare decode and encode (goal for row JSON <= 2).
"""

from __future__ import annotations

import http.client
import random
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from bench_http import ROOT, Server, make_target
from bench_mixed import cpu_seconds, rss_mb, tree

DATA_FILE = ROOT.parent / "shared" / "data" / "ibkr_usa_2022-08-06.txt"
TICKERS = 5_000
FORMS = (
    ("row JSON", "rows", "application/json"),
    ("row msgpack", "rows", "application/msgpack"),
    ("columnar JSON", "columns", "application/json"),
    ("columnar msgpack", "columns", "application/msgpack"),
)
ROW_JSON_FLOOR_RATIO_GOAL = 2.0
COLUMNAR_MSGPACK_SECONDS_GOAL = 0.5
MILLION_ENV = {"MEMORY_QUOTES_MAX_ROWS": "1000000"}


def file_tickers(path: Path, count: int, seed: int = 14) -> list[str]:
    """`count` symbols of an IBKR availability file that are tickers as the engine writes them."""
    import re

    plain = re.compile(r"^[A-Z0-9]{1,10}$")
    symbols = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        symbol = line.split("|", 1)[0]
        if plain.fullmatch(symbol):
            symbols.append(symbol)
    return random.Random(seed).sample(symbols, min(count, len(symbols)))


def million_columns(positions: int, tickers: list[str], seed: int = 14) -> dict[str, list[Any]]:
    rng = random.Random(seed)
    values = [
        (rng.randrange(1, 10**11) if index % 3 else rng.randrange(1, 10**7) * 100) / 100
        for index in range(positions)
    ]
    return {
        "ticker": [rng.choice(tickers) for _ in range(positions)],
        "position_value": values,
        "loan_days": [rng.randrange(1, 366) for _ in range(positions)],
    }


def bodies(client_id: str, columns: Mapping[str, list[Any]]) -> dict[str, bytes]:
    rows = [
        {"ticker": t, "position_value": p, "loan_days": d}
        for t, p, d in zip(columns["ticker"], columns["position_value"], columns["loan_days"], strict=True)
    ]
    out = {}
    for name, form, media in FORMS:
        payload = (
            {"client_id": client_id, "positions": rows}
            if form == "rows"
            else {
                "client_id": client_id,
                "columns": columns,
            }
        )
        encode = msgspec.json.encode if media == "application/json" else msgspec.msgpack.encode
        out[name] = encode(payload)
    return out


def upload_availability(server: Server, admin_key: str) -> dict[str, Any]:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    connection.request(
        "POST",
        "/api/v1/admin/availability",
        body=DATA_FILE.read_bytes(),
        headers={"X-API-Key": admin_key, "Content-Type": "text/plain"},
    )
    response = connection.getresponse()
    text = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"availability upload: {response.status} {text[:300]!r}")
    answer: dict[str, Any] = msgspec.json.decode(text)
    return answer


class RssSampler:
    """The largest VmRSS of the server and its batch workers together (the replica), sampled every 5 ms in
    a thread while it runs."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, int(rss_mb(self._pid) * 1024))
            self._stop.wait(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def send(server: Server, body: bytes, media: str) -> tuple[float, float, float, bytes, int]:
    """(round trip s, server CPU s, peak RSS MB, response body, status) of one batch."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    connection.connect()
    # The replica's CPU: the server and its batch worker processes (large batches are priced there).
    cpu_before = cpu_seconds(tree(server.process.pid))
    with RssSampler(server.process.pid) as sampler:
        started = time.perf_counter()
        connection.request(
            "POST",
            "/api/v1/calculate-locate/batch",
            body=body,
            headers={"X-API-Key": server.key, "Content-Type": media},
        )
        response = connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - started
    cpu = cpu_seconds(tree(server.process.pid)) - cpu_before
    connection.close()
    return elapsed, cpu, sampler.peak_kb / 1024, answer, response.status


def floor_seconds(request: bytes, response: bytes, media: str, repeat: int = 2) -> dict[str, float]:
    """msgspec's own decode of the request and encode of the response (CPU seconds, best of `repeat`)."""
    module: Any = msgspec.json if media == "application/json" else msgspec.msgpack
    decode_s, encode_s = [], []
    decoded_response = module.decode(response)
    for _ in range(repeat):
        started = time.process_time()
        decoded = module.decode(request)
        decode_s.append(time.process_time() - started)
        del decoded
        started = time.process_time()
        module.encode(decoded_response)
        encode_s.append(time.process_time() - started)
    return {"decode_s": min(decode_s), "encode_s": min(encode_s), "floor_s": min(decode_s) + min(encode_s)}


def check_answer(name: str, answer: Mapping[str, Any], positions: int) -> list[str]:
    problems = []
    if answer.get("count") != positions or answer.get("priced") != positions or answer.get("errors"):
        problems.append(
            f"{name}: count {answer.get('count')}, priced {answer.get('priced')}, "
            f"{len(answer.get('errors') or [])} errors (expected every position priced)"
        )
    return problems


def top_lines(raw: str, count: int = 5) -> list[dict[str, Any]]:
    """The `count` lines of code with the most samples of their own in a py-spy raw profile
    (`frame;frame;...;leaf count` per line), as {"line", "share"} (share of all samples)."""
    own: dict[str, int] = {}
    total = 0
    for text in raw.splitlines():
        stack, _, samples = text.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        total += int(samples)
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(samples)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:count]
    return [{"line": line, "share": samples / total} for line, samples in ranked] if total else []


def start_profile(py_spy: str, pid: int, path: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the engine (200 Hz, non-blocking: wall-clock samples of the running thread)."""
    command = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw"]
    return subprocess.Popen([*command, "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_million(
    start_engine: Callable[[str], tuple[Server, str]],
    positions: int,
    rounds: int,
    *,
    py_spy: str | None = None,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    """The section's results (see the module docstring). Each format gets a fresh engine from
    `start_engine(name) -> (server, admin key)`, so that its peak RSS is its own, not the high-water mark
    an earlier format left in the allocator."""
    tickers = file_tickers(DATA_FILE, TICKERS)
    sent = bodies("demo_client", million_columns(positions, tickers))
    warm_up = bodies("demo_client", million_columns(1000, tickers, seed=1))  # first-request costs aside
    results: dict[str, Any] = {}
    problems: list[str] = []
    figures: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    profile: list[dict[str, Any]] = []
    for name, form, media in FORMS:
        body = sent[name]
        runs = []
        last = b""
        server, admin_key = start_engine(name)
        try:
            loaded = upload_availability(server, admin_key)
            send(server, warm_up[name], media)
            idle_mb = rss_mb(server.process.pid)
            spy = None
            if py_spy is not None and profile_path is not None and name == "row JSON":
                spy = start_profile(py_spy, server.process.pid, profile_path)
                time.sleep(1.5)  # py-spy attached before the first request
            for _ in range(rounds):
                elapsed, cpu, peak_mb, answer, status = send(server, body, media)
                if status != 200:
                    problems.append(f"{name}: HTTP {status}: {answer[:300]!r}")
                    break
                runs.append((elapsed, cpu, peak_mb))
                last = answer
            if spy is not None and profile_path is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                profile = top_lines(profile_path.read_text()) if profile_path.exists() else []
        finally:
            server.stop()
        if not runs:
            continue
        decoded = (msgspec.json if media == "application/json" else msgspec.msgpack).decode(last)
        problems += check_answer(name, decoded, positions)
        figures[name] = (
            decoded["columns"]["total_fee"]
            if form == "columns"
            else [q["total_fee"] for q in decoded["quotes"]]
        )
        del decoded
        floor = floor_seconds(body, last, media)
        server_cpu = statistics.median(run[1] for run in runs)
        results[name] = {
            "request_bytes": len(body),
            "response_bytes": len(last),
            "round_trip_s": statistics.median(run[0] for run in runs),
            # Each round, in order: the first 10^6 batch of a fresh engine also computes the rates of
            # the file's 5,000 tickers (the warm-up batch touched a few) and grows the worker's heap.
            "round_trips_s": [round(run[0], 3) for run in runs],
            "server_cpu_s": server_cpu,
            "peak_rss_mb": max(run[2] for run in runs),
            "idle_rss_mb": idle_mb,
            **floor,
            "server_cpu_over_floor": server_cpu / floor["floor_s"] if floor["floor_s"] else None,
            "rounds": len(runs),
        }
        row = results[name]
        print(
            f"{name:<17} round trip {row['round_trip_s']:.2f} s  server CPU {server_cpu:.2f} s  "
            f"floor {floor['floor_s']:.2f} s (decode {floor['decode_s']:.2f} + "
            f"encode {floor['encode_s']:.2f})  ratio {row['server_cpu_over_floor']:.2f}  "
            f"peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        del last
    reference = figures.get("row JSON")
    for name, totals in figures.items():
        if totals != reference:
            problems.append(f"{name}: total fees differ from the row JSON answer's")
    valid = not problems
    targets = []
    row_json = results.get("row JSON")
    if row_json is not None:
        targets.append(
            make_target(
                f"{positions:,}-position row-JSON batch: server CPU / msgspec floor of the same bodies",
                round(row_json["server_cpu_over_floor"], 2),
                ROW_JSON_FLOOR_RATIO_GOAL,
                "<=",
                "x",
                valid=valid,
                note=f"server {row_json['server_cpu_s']:.2f} s, floor {row_json['floor_s']:.2f} s",
            )
        )
    columnar = results.get("columnar msgpack")
    if columnar is not None:
        targets.append(
            make_target(
                f"{positions:,}-position columnar msgpack batch: round trip",
                round(columnar["round_trip_s"], 3),
                COLUMNAR_MSGPACK_SECONDS_GOAL,
                "<=",
                "s",
                valid=valid,
            )
        )
    for name, s in results.items():
        limit = 400.0 if name.startswith("columnar") else 600.0
        targets.append(
            make_target(
                f"{positions:,}-position {name} batch: peak RSS",
                round(s["peak_rss_mb"]),
                limit,
                "<=",
                "MB",
                valid=valid,
            )
        )
    return {
        "positions": positions,
        "tickers": len(tickers),
        "data_file": DATA_FILE.name,
        "availability": loaded,
        "formats": results,
        "targets": targets,
        "problems": problems,
        "row_json_profile": profile,
    }


def render_markdown(doc: Mapping[str, Any]) -> list[str]:
    """The section's table, for benchmarks/REPORT.md."""
    lines = [
        f"One {doc['positions']:,}-position batch at a time over {doc['tickers']:,} tickers of "
        f"`{doc['data_file']}` (uploaded through the admin API), each format sent "
        "(median of its rounds); the floor is msgspec's own untyped decode of the request plus encode of "
        "the response, in the benchmark's process.",
        "",
        "| body | request MB | response MB | round trip s | each round s | server CPU s "
        "| floor s (decode + encode) | server / floor | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in doc["formats"].items():
        each = ", ".join(f"{value:.2f}" for value in s.get("round_trips_s", []))
        lines.append(
            f"| {name} | {s['request_bytes'] / 1e6:.0f} | {s['response_bytes'] / 1e6:.0f} | "
            f"{s['round_trip_s']:.2f} | {each} | {s['server_cpu_s']:.2f} | {s['floor_s']:.2f} "
            f"({s['decode_s']:.2f} + {s['encode_s']:.2f}) | {s['server_cpu_over_floor']:.2f} | "
            f"{s['peak_rss_mb']:.0f} |"
        )
    if doc.get("row_json_profile"):
        lines += [
            "",
            "Where the row-JSON batch's time goes (py-spy, lines with the most samples of their own):",
            "",
        ]
        lines += [f"- {entry['share']:.1%} `{entry['line']}`" for entry in doc["row_json_profile"]]
    lines += [
        "",
        "Each format ran on a fresh engine (its peak RSS is its own); idle RSS with the file loaded: "
        + ", ".join(f"{name} {s.get('idle_rss_mb', 0):.0f} MB" for name, s in doc["formats"].items())
        + ".",
        "",
    ]
    return lines
