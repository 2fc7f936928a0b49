"""A load tester for the engine: open loop (constant arrival rate, no coordinated omission) or closed loop,
HDR latency percentiles, scenarios from `benchmarks/scenarios/*.toml`, progress, a final table, JSON
results and a latency-percentile plot (PNG) of one run or an A/B comparison.

The requests are sent by a small C generator (loadgen/openloop.c, compiled with gcc on first use into
benchmarks/.build/): a Python generator saturates long before this service does. Each run reports the
generator's and (with --server-pid) the server's CPU, and says which one was the bottleneck.

    # serve the engine (make serve) and take its demo key from the keys file it writes
    .venv/bin/python benchmarks/loadtest.py run --url http://127.0.0.1:8000 --keys-file .demo-keys.env \\
        --scenario single-post --mode open --rate 3000 --duration 20 --warmup 5 --json a.json --plot a.png
    .venv/bin/python benchmarks/loadtest.py run ... --mode closed --connections 32   # capacity
    .venv/bin/python benchmarks/loadtest.py run ... --rate half              # capacity, then 50 % of it
    .venv/bin/python benchmarks/loadtest.py plot a.json b.json --out ab.png          # A/B percentile plot
    .venv/bin/python benchmarks/loadtest.py provision --url ... --clients 50 --out keys.txt  # admin key:
    #   PRICER_ADMIN_KEY
    .venv/bin/python benchmarks/loadtest.py scenarios                                # what there is

Keys come from --keys-file (lines `client_id key`, or the engine's demo keys file) or PRICER_API_KEY and
PRICER_CLIENT_ID, never from code. Exit status: 0 valid run, 1 invalid (unexpected statuses, socket
errors, a required status never seen), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_http
import hdr
import scenarios
from background import BackgroundRequests

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "loadgen" / "openloop.c"
BUILD_DIR = HERE / ".build"
# A generator busier than this share of one CPU may be what limits the measured rate.
GENERATOR_BUSY_PERCENT = 90.0
SERVER_BUSY_PERCENT = 90.0
# An open-loop run that completes less than this share of what it scheduled did not keep up.
KEPT_UP_SHARE = 0.97


# ---- the generator ----------------------------------------------------------------------------------


def generator_path() -> Path:
    """The compiled generator, rebuilt when its source is newer."""
    binary = BUILD_DIR / "openloop"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("loadtest: a C compiler (gcc) is needed to build the generator")
    BUILD_DIR.mkdir(exist_ok=True)
    command = [compiler, "-O2", "-Wall", "-Wextra", "-std=c11", "-D_GNU_SOURCE"]
    subprocess.run([*command, "-o", str(binary), str(SOURCE), "-lm"], check=True)
    return binary


@dataclass
class RunConfig:
    url: str
    scenario: str
    mode: str  # open | closed
    rate: float  # requests per second (open loop)
    connections: int
    duration: float
    warmup: float
    timeout: float = 10.0
    cpu: str | None = None  # taskset CPU list for the generator
    label: str | None = None
    # SCHED_FIFO where allowed (bench_http.generator): the benchmarks' default; a load test by hand, or a
    # test, runs at normal priority unless asked (--realtime).
    realtime: bool = True

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"loadtest: --url must be http://host:port (got {self.url})")
        return parts.hostname, parts.port or 80


def run_generator(
    config: RunConfig, requests_file: Path, *, progress: bool = True, server_pid: int | None = None
) -> dict[str, Any]:
    host, port = config.host_port
    with tempfile.TemporaryDirectory(prefix="loadtest-") as workdir:
        out = Path(workdir) / "result.json"
        command = [
            str(generator_path()),
            "--host",
            host,
            "--port",
            str(port),
            "--requests",
            str(requests_file),
            "--connections",
            str(config.connections),
            "--rate",
            str(config.rate if config.mode == "open" else 0),
            "--duration",
            str(config.duration),
            "--warmup",
            str(config.warmup),
            "--timeout",
            str(config.timeout),
            "--out",
            str(out),
            "--progress",
        ]
        command = bench_http.generator(config.cpu or None, command, realtime=config.realtime)
        server_before = process_cpu_seconds(server_pid) if server_pid else None
        started = time.monotonic()
        lines = []
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line)
                if progress and line.startswith("progress"):
                    print("  " + line.rstrip(), file=sys.stderr, flush=True)
                elif not line.startswith("progress"):
                    print(line.rstrip(), file=sys.stderr)
            code = process.wait()
        wall = time.monotonic() - started
        if code != 0 or not out.exists():
            raise SystemExit(f"loadtest: generator failed (exit {code}): {''.join(lines[-5:])}")
        result: dict[str, Any] = json.loads(out.read_text())
    if server_pid:
        after = process_cpu_seconds(server_pid)
        if server_before is not None and after is not None:
            # The server's CPU over the whole run (warm-up included) against the same wall time.
            result["server_cpu_percent"] = round(100.0 * (after - server_before) / wall, 1)
    result["wall_s"] = round(wall, 3)
    return result


def process_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# ---- judging a run --------------------------------------------------------------------------------------


def summarize(result: Mapping[str, Any], scenario: scenarios.Scenario) -> dict[str, Any]:
    latency = hdr.histogram_from_result(result, "latency_us")
    service = hdr.histogram_from_result(result, "service_us")
    duration = float(result.get("duration_s") or 0.0)
    completed = int(result.get("completed", 0))
    statuses = {int(code): int(count) for code, count in (result.get("status_counts") or {}).items()}
    errors = {name: int(count) for name, count in (result.get("errors") or {}).items()}
    unexpected = {code: n for code, n in statuses.items() if code not in scenario.expect_status}
    missing = sorted(code for code in scenario.require_status if not statuses.get(code))
    problems = []
    if unexpected:
        problems.append(f"unexpected statuses {unexpected}")
    if any(errors.values()):
        problems.append(f"socket errors { ({k: v for k, v in errors.items() if v}) }")
    if missing:
        problems.append(f"never saw required status {missing}")
    if completed == 0:
        problems.append("no response completed")
    cpu = float(result.get("cpu_user_s", 0.0)) + float(result.get("cpu_sys_s", 0.0))
    wall = float(result.get("wall_s") or duration or 1.0)
    generator_cpu = round(100.0 * cpu / wall, 1) if wall else None
    throughput = completed / duration if duration else 0.0
    summary: dict[str, Any] = {
        "throughput_rps": round(throughput, 1),
        "scheduled": result.get("scheduled"),
        "completed": completed,
        "latency_ms": latency.summary_ms(),
        "service_ms": service.summary_ms(),
        "status_counts": {str(code): n for code, n in sorted(statuses.items())},
        "errors": errors,
        "max_backlog": result.get("max_backlog"),
        "generator_cpu_percent": generator_cpu,
        "server_cpu_percent": result.get("server_cpu_percent"),
        "valid": not problems,
        "problems": problems,
    }
    summary["bottleneck"] = bottleneck(result, summary)
    return summary


def bottleneck(result: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    generator = summary.get("generator_cpu_percent")
    server = summary.get("server_cpu_percent")
    if generator is not None and generator >= GENERATOR_BUSY_PERCENT:
        return f"generator (its CPU at {generator:.0f} %): the server may be faster than measured"
    if server is not None and server >= SERVER_BUSY_PERCENT:
        return f"server (its CPU at {server:.0f} %, generator at {generator:.0f} %)"
    if result.get("mode") == "open":
        scheduled = int(result.get("scheduled") or 0)
        if scheduled and summary["completed"] < KEPT_UP_SHARE * scheduled:
            return "server (it completed less than it was offered)"
        return "neither: the offered rate was served"
    return "unknown (pass --server-pid to measure the server's CPU)"


# ---- output ---------------------------------------------------------------------------------------------


def table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    head = (
        f"{'run':<28} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
        f"{'max ms':>8} {'gen CPU':>8} {'srv CPU':>8}  statuses"
    )
    lines = [head, "-" * len(head)]
    for label, summary in rows:
        lat = summary["latency_ms"]
        lines.append(
            f"{label[:28]:<28} {summary['throughput_rps']:>9.0f} {lat['p50']:>8.3f} {lat['p90']:>8.3f} "
            f"{lat['p99']:>8.3f} {lat['p99.9']:>9.3f} {lat['max']:>8.3f} "
            f"{_percent(summary.get('generator_cpu_percent')):>8} "
            f"{_percent(summary.get('server_cpu_percent')):>8}"
            f"  {summary['status_counts']}"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def plot(documents: Sequence[Mapping[str, Any]], out: Path, title: str | None = None) -> None:
    """Latency by percentile (x: 0 to 99.999 % on a 1/(1-p) scale) for each run, corrected latency solid
    and, for open-loop runs, service time dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=110)
    for document in documents:
        label = document.get("label") or document.get("scenario", "run")
        result = document["result"]
        for key, style, suffix in (("latency_us", "-", ""), ("service_us", "--", " (service time)")):
            if key == "service_us" and result.get("mode") != "open":
                continue
            histogram = hdr.histogram_from_result(result, key)
            points = histogram.spectrum()
            if not points:
                continue
            xs = [1.0 / max(1e-5, 1.0 - p / 100.0) for p, _ in points]
            axes.plot(xs, [ms for _, ms in points], style, label=f"{label}{suffix}")
    axes.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    axes.set_xticks(ticks)
    axes.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    axes.set_xlabel("percentile")
    axes.set_ylabel("latency (ms)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title or "Latency by percentile")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


# ---- commands -------------------------------------------------------------------------------------------


def prepare_requests(args: argparse.Namespace, workdir: Path) -> tuple[scenarios.Scenario, Path, int]:
    scenario = scenarios.load_scenario(args.scenario)
    keys = scenarios.load_keys(args.keys_file)
    parts = urllib.parse.urlsplit(args.url)
    requests = scenarios.build_requests(scenario, keys, parts.netloc)
    path = workdir / "requests.bin"
    scenarios.write_requests_file(requests, path)
    background = scenarios.build_background(scenario, keys, parts.netloc)
    if background is not None:
        (workdir / "background.bin").write_bytes(background)
    return scenario, path, len(keys)


def run_with_background(
    config: RunConfig, requests_file: Path, background: bytes | None, **options: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The generator's run, with the scenario's background request sent back to back meanwhile (from before
    the warm-up to the end): the generator's figures are those of its requests during the background ones."""
    if background is None:
        return run_generator(config, requests_file, **options), None
    host, port = config.host_port
    sender = BackgroundRequests(host, port, background)
    sender.start()
    try:
        result = run_generator(config, requests_file, **options)
    finally:
        sender.stop()
    return result, sender.summary()


def command_run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="loadtest-") as workdir:
        scenario, requests_file, key_count = prepare_requests(args, Path(workdir))
        mode, rate = args.mode, 0.0
        capacity = None
        if args.rate is not None and args.rate.startswith("half"):
            mode = "open"
        elif args.rate is not None:
            rate = float(args.rate)
            if rate <= 0:
                raise SystemExit("loadtest: --rate must be positive")
        if mode == "open" and args.rate is None:
            raise SystemExit("loadtest: open loop needs --rate N (requests per second) or --rate half")
        if args.rate is not None and args.rate.startswith("half"):
            probe = RunConfig(
                args.url,
                scenario.name,
                "closed",
                0,
                args.connections,
                args.probe,
                args.warmup,
                cpu=args.cpu,
                realtime=args.realtime,
            )
            print(
                f"probing capacity: closed loop, {args.connections} connections, {args.probe:g} s",
                file=sys.stderr,
            )
            probed = run_generator(probe, requests_file, progress=not args.quiet)
            capacity = int(probed["completed"]) / float(probed["duration_s"])
            rate = round(capacity / 2, 1)
            print(f"capacity {capacity:.0f} req/s: open loop at {rate:.0f} req/s", file=sys.stderr)
        config = RunConfig(
            args.url,
            scenario.name,
            mode,
            rate,
            args.connections,
            args.duration,
            args.warmup,
            timeout=args.timeout,
            cpu=args.cpu,
            label=args.label,
            realtime=args.realtime,
        )
        print(
            f"{scenario.name}: {scenario.description}\n{mode} loop"
            + (f" at {rate:g} req/s" if mode == "open" else "")
            + f", {args.connections} connections, {args.warmup:g} s warm-up + {args.duration:g} s, "
            f"{key_count} key(s)",
            file=sys.stderr,
        )
        background_file = Path(workdir) / "background.bin"
        background = background_file.read_bytes() if background_file.exists() else None
        result, behind = run_with_background(
            config, requests_file, background, progress=not args.quiet, server_pid=args.server_pid
        )
    summary = summarize(result, scenario)
    if behind is not None:
        summary["background"] = behind
    label = args.label or f"{scenario.name} {mode}" + (f" {rate:g}/s" if mode == "open" else "")
    print(table([(label, summary)]))
    print(f"bottleneck: {summary['bottleneck']}")
    if mode == "open":
        print(
            f"offered {rate:g} req/s, completed {summary['throughput_rps']:.0f} req/s, "
            f"largest backlog {summary['max_backlog']} request(s); service time p99 "
            f"{summary['service_ms']['p99']:.3f} ms"
        )
    if behind is not None:
        positions = scenario.background.positions if scenario.background else 0
        print(
            f"background: {behind['requests']} request(s) of {positions} positions, round trip median "
            f"{behind['round_trip_s']['median']} s, statuses {behind['statuses']}; meanwhile p99 "
            f"{summary['latency_ms']['p99']:.3f} ms, max {summary['latency_ms']['max']:.3f} ms"
        )
    for problem in summary["problems"]:
        print(f"INVALID: {problem}")
    document = {
        "tool": "benchmarks/loadtest.py",
        "label": label,
        "scenario": scenario.name,
        "config": {
            "url": args.url,
            "mode": mode,
            "rate": rate,
            "capacity_probe_rps": capacity,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "keys": key_count,
        },
        "machine": machine_facts(),
        "summary": summary,
        "result": result,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    if args.plot:
        plot([document], Path(args.plot))
        print(f"plot: {args.plot}")
    return 0 if summary["valid"] else 1


def command_plot(args: argparse.Namespace) -> int:
    documents = [json.loads(Path(path).read_text()) for path in args.results]
    plot(documents, Path(args.out), args.title)
    rows = [(str(d.get("label") or d.get("scenario")), d["summary"]) for d in documents]
    print(table(rows))
    print(f"plot: {args.out}")
    return 0


def command_provision(args: argparse.Namespace) -> int:
    """Create clients and one quote key each through the admin API; write `client_id key` lines."""
    admin_key = os.environ.get(args.admin_key_env)
    if not admin_key:
        raise SystemExit(f"loadtest: set {args.admin_key_env} to an admin API key")
    lines = []
    for number in range(args.clients):
        client_id = f"{args.prefix}{number:05d}"
        body = {
            "markup_percentage": [0.0, 5.0, 12.5, 25.0][number % 4],
            "transaction_fee_type": "FLAT" if number % 2 else "PERCENTAGE",
            "transaction_amount": 1.5 if number % 2 else 0.05,
        }
        if args.rate_limit:
            body["rate_limit_per_minute"] = args.rate_limit
        _admin(args.url, "PUT", f"/api/v1/admin/clients/{client_id}", admin_key, body)
        issued = _admin(args.url, "POST", "/api/v1/admin/keys", admin_key, {"client_id": client_id})
        lines.append(f"{client_id} {issued['api_key']}")
    Path(args.out).write_text("# client_id key (made by loadtest.py provision)\n" + "\n".join(lines) + "\n")
    os.chmod(args.out, 0o600)
    print(f"{len(lines)} clients and keys written to {args.out}")
    return 0


def _admin(url: str, method: str, path: str, key: str, body: Mapping[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "X-API-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            loaded: dict[str, Any] = json.loads(response.read() or b"{}")
            return loaded
    except urllib.error.HTTPError as error:
        raise SystemExit(f"loadtest: {method} {path} -> {error.code}: {error.read()[:300]!r}") from None


def command_scenarios(_args: argparse.Namespace) -> int:
    for name in scenarios.available():
        scenario = scenarios.load_scenario(name)
        print(f"{name:<20} {scenario.description}")
    return 0


def machine_facts() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "cpu_model": bench_http.cpu_model(),
        "python": sys.version.split()[0],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="one load test")
    run.add_argument("--url", default=os.environ.get("PRICER_URL", "http://127.0.0.1:8000"))
    run.add_argument("--scenario", default="single-post", help="a name from `scenarios` or a .toml path")
    run.add_argument("--mode", choices=("open", "closed"), default="open")
    run.add_argument("--rate", help="open loop: requests per second, or `half` (probe capacity, then 50 %%)")
    run.add_argument("--connections", type=int, default=32)
    run.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    run.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    run.add_argument("--probe", type=float, default=8.0, help="capacity probe seconds (--rate half)")
    run.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the last responses")
    run.add_argument("--keys-file", help="`client_id key` lines, or the engine's demo keys file")
    run.add_argument("--server-pid", type=int, help="the server's pid, to report its CPU")
    run.add_argument("--cpu", help="pin the generator (taskset -c LIST)")
    run.add_argument(
        "--realtime",
        action="store_true",
        help="run the generator under SCHED_FIFO (chrt -f; root or CAP_SYS_NICE), so that other processes on "
        "its CPU (a database, Redis) cannot delay its sends",
    )
    run.add_argument("--label", help="name of this run in tables and plots")
    run.add_argument("--json", help="write the results here")
    run.add_argument("--plot", help="write a latency-percentile PNG here")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.set_defaults(handler=command_run)

    plot_cmd = commands.add_parser("plot", help="latency-percentile PNG of one or more JSON results (A/B)")
    plot_cmd.add_argument("results", nargs="+")
    plot_cmd.add_argument("--out", required=True)
    plot_cmd.add_argument("--title")
    plot_cmd.set_defaults(handler=command_plot)

    provision = commands.add_parser("provision", help="create clients and keys for the mixed scenario")
    provision.add_argument("--url", default=os.environ.get("PRICER_URL", "http://127.0.0.1:8000"))
    provision.add_argument("--admin-key-env", default="PRICER_ADMIN_KEY")
    provision.add_argument("--clients", type=int, default=50)
    provision.add_argument("--prefix", default="load_client_")
    provision.add_argument("--rate-limit", type=int, help="each client's requests per minute")
    provision.add_argument("--out", required=True)
    provision.set_defaults(handler=command_provision)

    listing = commands.add_parser("scenarios", help="list the scenario files")
    listing.set_defaults(handler=command_scenarios)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except scenarios.ScenarioError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
