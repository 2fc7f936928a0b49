"""The load tester's own logic: HDR histogram maths, scenario files, keys, the requests file, run judging,
the plot, and the C generator's pacing against a real loopback server (counts, never timings)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import hdr  # noqa: E402
import loadtest  # noqa: E402
import scenarios  # noqa: E402
from tests.conftest import free_port  # noqa: E402

# ---- histogram maths ------------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=hdr.MAX_VALUE_US))
def test_bucket_holds_its_value_within_a_thousandth(value: int) -> None:
    floor, ceiling = hdr.bucket_floor(value), hdr.bucket_ceiling(value)
    assert floor <= value <= ceiling
    assert ceiling - floor + 1 <= max(1, value / 1024)
    # Every value of a bucket maps to the same bucket.
    assert hdr.bucket_floor(floor) == floor == hdr.bucket_floor(ceiling)


def test_small_values_have_a_bucket_each_and_large_ones_are_clamped() -> None:
    assert [hdr.bucket_floor(v) for v in (0, 1, 2047)] == [0, 1, 2047]
    assert hdr.bucket_floor(2049) == 2048
    assert hdr.bucket_floor(4097) == 4096  # 4096-8191: buckets of 4 µs
    assert hdr.bucket_ceiling(4097) == 4099
    assert hdr.bucket_floor(10**12) == hdr.bucket_floor(hdr.MAX_VALUE_US)


def _exact_percentile(values: list[int], percent: float) -> int:
    ordered = sorted(values)
    rank = max(1, -(-round(percent * 1000) * len(ordered) // 100_000))
    return ordered[rank - 1]


@settings(max_examples=200)
@given(
    st.lists(st.integers(min_value=1, max_value=5_000_000), min_size=1, max_size=400),
    st.sampled_from([0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0]),
)
def test_percentile_is_the_exact_one_to_bucket_precision(values: list[int], percent: float) -> None:
    histogram = hdr.LatencyHistogram()
    for value in values:
        histogram.record(value)
    exact = _exact_percentile(values, percent)
    got = histogram.percentile(percent)
    assert hdr.bucket_floor(exact) <= got <= hdr.bucket_ceiling(exact)
    assert got <= max(values)
    assert histogram.percentile(100) == max(values)


@given(st.lists(st.integers(min_value=0, max_value=10**7), max_size=200), st.integers(0, 200))
def test_merge_and_pairs_round_trip(values: list[int], split: int) -> None:
    left, right, whole = hdr.LatencyHistogram(), hdr.LatencyHistogram(), hdr.LatencyHistogram()
    for index, value in enumerate(values):
        (left if index < split else right).record(value)
        whole.record(value)
    left.merge(right)
    assert left.pairs() == whole.pairs()
    assert left.total == len(values)
    again = hdr.LatencyHistogram.from_pairs(whole.pairs(), whole.max_us)
    assert again.pairs() == whole.pairs()
    assert again.summary_ms() == whole.summary_ms()


def test_percentile_rejects_nonsense_and_empty_is_zero() -> None:
    histogram = hdr.LatencyHistogram()
    assert histogram.percentile(99) == 0
    assert histogram.mean() == 0.0
    with pytest.raises(ValueError, match="0-100"):
        histogram.percentile(101)


def test_spectrum_is_monotonic_and_ends_at_the_maximum() -> None:
    histogram = hdr.LatencyHistogram()
    rng = random.Random(7)
    for _ in range(20_000):
        histogram.record(int(rng.lognormvariate(6, 0.6)))
    points = histogram.spectrum()
    percents = [p for p, _ in points]
    latencies = [ms for _, ms in points]
    assert percents == sorted(percents)
    assert latencies == sorted(latencies)
    assert points[-1] == (100.0, histogram.max_us / 1000)
    # 20,000 values resolve 99.99 % but not 99.999 %.
    assert any(p > 99.98 for p in percents[:-1])
    assert not any(99.999 <= p < 100 for p in percents)


# ---- scenario files --------------------------------------------------------------------------------------


def test_every_shipped_scenario_parses_and_builds_well_formed_requests() -> None:
    names = scenarios.available()
    for needed in ("single-post", "single-get", "rates", "batch-json", "batch-msgpack", "mixed-trading-day"):
        assert needed in names
    assert "rate-limit" in names
    keys = [scenarios.ApiKey("client_a", "bre_aaaaaaaa_" + "a" * 32), scenarios.ApiKey("client_b", "bre_b_x")]
    for name in names:
        scenario = scenarios.load_scenario(name)
        built = scenarios.build_requests(scenario, keys, "127.0.0.1:8000")
        assert built
        for raw in built[:50]:
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            assert re.fullmatch(r"(GET|POST) /api/v1/\S+ HTTP/1\.1", lines[0])
            headers = dict(line.split(": ", 1) for line in lines[1:])
            assert headers["Host"] == "127.0.0.1:8000"
            assert headers["X-API-Key"] in {key.key for key in keys}
            assert int(headers.get("Content-Length", "0")) == len(body)


def test_rate_limit_scenario_requires_429s() -> None:
    scenario = scenarios.load_scenario("rate-limit")
    assert scenario.require_status == {429}
    assert scenario.expect_status == {200, 429}


def test_quotes_name_the_client_of_their_key() -> None:
    scenario = scenarios.load_scenario("single-post")
    keys = [scenarios.ApiKey(f"client_{n}", f"bre_key{n}_{'x' * 32}") for n in range(3)]
    for raw in scenarios.build_requests(scenario, keys, "h")[:30]:
        head, _, body = raw.partition(b"\r\n\r\n")
        key = re.search(rb"X-API-Key: (\S+)", head)
        assert key is not None
        owner = next(k.client_id for k in keys if k.key.encode() == key.group(1))
        assert json.loads(body)["client_id"] == owner


@given(
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=5),
    st.integers(min_value=1, max_value=3000),
)
def test_kind_sequence_keeps_the_proportions(weights: list[int], count: int) -> None:
    kinds = tuple(scenarios.RequestKind(kind="rate", weight=w, positions=i) for i, w in enumerate(weights))
    scenario = scenarios.Scenario(name="t", description="", requests=kinds)
    sequence = scenarios.kind_sequence(scenario, count)
    assert len(sequence) == count
    total = sum(weights)
    for kind in kinds:
        share = sequence.count(kind)
        assert abs(share - kind.weight * count / total) < 1 + 1e-9


def test_mixed_scenario_mixes_kinds_in_its_weights() -> None:
    scenario = scenarios.load_scenario("mixed-trading-day")
    built = scenarios.build_requests(scenario, [scenarios.ApiKey("c", "bre_c_" + "c" * 32)], "h")
    first_lines = [raw.split(b"\r\n", 1)[0] for raw in built]
    batches = sum(1 for line in first_lines if line.startswith(b"POST /api/v1/calculate-locate/batch "))
    posts = sum(1 for line in first_lines if line.startswith(b"POST /api/v1/calculate-locate "))
    assert batches == round(0.05 * len(built))
    assert posts == round(0.65 * len(built))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"request": []}, "at least one"),
        ({"request": [{"kind": "teleport"}]}, "kind must be one of"),
        ({"request": [{"kind": "rate", "positions": 5}]}, "batch requests only"),
        ({"request": [{"kind": "batch", "format": "xml"}]}, "json or msgpack"),
        ({"request": [{"kind": "rate"}], "loan_days": [0, 400]}, "loan_days"),
        ({"request": [{"kind": "rate"}], "expect_status": [99]}, "status codes"),
        ({"request": [{"kind": "rate"}], "colour": "blue"}, "unknown keys"),
        ({"request": [{"kind": "rate", "weight": 0}]}, "weight"),
    ],
)
def test_bad_scenario_files_are_refused_with_the_rule(document: dict[str, Any], message: str) -> None:
    with pytest.raises(scenarios.ScenarioError, match=message):
        scenarios.parse_scenario("bad", document)


def test_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(scenarios.ScenarioError, match="single-post"):
        scenarios.load_scenario("no-such-scenario")


def test_keys_come_from_a_file_or_the_environment(tmp_path: Path) -> None:
    listing = tmp_path / "keys.txt"
    listing.write_text(
        "# comment\nclient_a bre_aaaa_" + "a" * 32 + "\n\nclient_b bre_bbbb_" + "b" * 32 + "\n"
    )
    assert [k.client_id for k in scenarios.load_keys(str(listing))] == ["client_a", "client_b"]
    demo = tmp_path / "demo.env"
    demo.write_text("DEMO_CLIENT_KEY=bre_dddd_x\nDEMO_ADMIN_KEY=bre_admin_y\nPRICER_URL=http://h\n")
    assert scenarios.load_keys(str(demo)) == [scenarios.ApiKey("demo_client", "bre_dddd_x")]
    env = {"PRICER_API_KEY": "bre_env_z", "PRICER_CLIENT_ID": "desk_7"}
    assert scenarios.load_keys(None, env) == [scenarios.ApiKey("desk_7", "bre_env_z")]
    with pytest.raises(scenarios.ScenarioError, match="no API key"):
        scenarios.load_keys(None, {})
    broken = tmp_path / "broken.txt"
    broken.write_text("just-one-field\n")
    with pytest.raises(scenarios.ScenarioError, match=r"broken.txt:1"):
        scenarios.load_keys(str(broken))


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_requests_file_round_trips(requests: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.bin"
        scenarios.write_requests_file(requests, path)
        assert scenarios.read_requests_file(path) == requests
        path.write_bytes(path.read_bytes()[:-1] if requests[-1] else path.read_bytes() + b"\x01")
        with pytest.raises(scenarios.ScenarioError, match="truncated"):
            scenarios.read_requests_file(path)


# ---- judging runs ----------------------------------------------------------------------------------------


def _result(**overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "mode": "open",
        "rate": 1000,
        "duration_s": 10.0,
        "wall_s": 12.0,
        "scheduled": 10_000,
        "sent": 10_000,
        "completed": 10_000,
        "max_backlog": 0,
        "status_counts": {"200": 10_000},
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0, "parse": 0},
        "latency_us": [[500, 9_900], [2048, 100]],
        "service_us": [[400, 10_000]],
        "max_latency_us": 2049,
        "max_service_us": 400,
        "cpu_user_s": 1.0,
        "cpu_sys_s": 1.0,
    }
    result.update(overrides)
    return result


def test_summary_reports_percentiles_and_the_served_rate() -> None:
    summary = loadtest.summarize(_result(), scenarios.load_scenario("single-post"))
    assert summary["valid"]
    assert summary["throughput_rps"] == 1000.0
    assert summary["latency_ms"]["p50"] == 0.5
    assert summary["latency_ms"]["p99"] == 0.5
    assert summary["latency_ms"]["p99.9"] == 2.049
    assert summary["generator_cpu_percent"] == pytest.approx(16.7)
    assert summary["bottleneck"].startswith("neither")


def test_unexpected_statuses_errors_and_missing_429s_invalidate_a_run() -> None:
    single = scenarios.load_scenario("single-post")
    bad = loadtest.summarize(_result(status_counts={"200": 9_990, "500": 10}), single)
    assert not bad["valid"]
    assert "unexpected statuses {500: 10}" in bad["problems"][0]
    dropped = loadtest.summarize(_result(errors={"read": 3}), single)
    assert not dropped["valid"]
    limited = scenarios.load_scenario("rate-limit")
    assert not loadtest.summarize(_result(), limited)["valid"]
    assert loadtest.summarize(_result(status_counts={"200": 60, "429": 9_940}), limited)["valid"]


def test_bottleneck_names_the_busy_side() -> None:
    single = scenarios.load_scenario("single-post")
    assert loadtest.summarize(_result(cpu_user_s=11.5), single)["bottleneck"].startswith("generator")
    assert loadtest.summarize(_result(server_cpu_percent=99.0), single)["bottleneck"].startswith("server")
    behind = loadtest.summarize(_result(completed=8_000), single)
    assert behind["bottleneck"].startswith("server (it completed less")


def test_plot_writes_a_png_for_an_ab_comparison(tmp_path: Path) -> None:
    documents = [
        {"label": "A", "result": _result()},
        {"label": "B", "result": _result(mode="closed", latency_us=[[300, 10_000]], max_latency_us=300)},
    ]
    out = tmp_path / "ab.png"
    loadtest.plot(documents, out, "A/B")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the C generator against a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_server() -> Any:
    port = free_port()
    key = "bre_loadtest0001_" + "k" * 40
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "BASELINE_API_KEY": key}
    process = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "baseline_raw_asgi.py")], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", key
    finally:
        process.terminate()
        process.wait(timeout=10)


def _run(url: str, key: str, tmp_path: Path, **config: Any) -> dict[str, Any]:
    scenario = scenarios.load_scenario("single-post")
    requests = scenarios.build_requests(scenario, [scenarios.ApiKey("demo_client", key)], url[7:])
    requests_file = tmp_path / "requests.bin"
    scenarios.write_requests_file(requests, requests_file)
    run = loadtest.RunConfig(url=url, scenario="single-post", realtime=False, **config)
    return loadtest.run_generator(run, requests_file, progress=False)


@pytest.mark.e2e
def test_open_loop_sends_exactly_its_schedule(raw_server: tuple[str, str], tmp_path: Path) -> None:
    url, key = raw_server
    result = _run(url, key, tmp_path, mode="open", rate=400.0, connections=4, duration=1.5, warmup=0.5)
    # Request k is due at k / rate: 1.5 s at 400/s schedules 600 (one either way at the edges).
    assert 599 <= result["scheduled"] <= 601
    assert result["completed"] == result["scheduled"]
    assert result["status_counts"] == {"200": result["completed"]}
    assert not any(result["errors"].values())
    assert sum(count for _, count in result["latency_us"]) == result["completed"]
    summary = loadtest.summarize(result, scenarios.load_scenario("single-post"))
    assert summary["valid"]


@pytest.mark.e2e
def test_closed_loop_and_wrong_key_statuses_are_counted(raw_server: tuple[str, str], tmp_path: Path) -> None:
    url, key = raw_server
    result = _run(url, key, tmp_path, mode="closed", rate=0.0, connections=2, duration=0.5, warmup=0.2)
    assert result["mode"] == "closed"
    assert result["completed"] > 0
    assert result["status_counts"] == {"200": result["completed"]}
    refused = _run(
        url,
        "bre_wrong_" + "w" * 32,
        tmp_path,
        mode="open",
        rate=200.0,
        connections=2,
        duration=0.5,
        warmup=0.0,
    )
    assert set(refused["status_counts"]) == {"401"}
    assert not loadtest.summarize(refused, scenarios.load_scenario("single-post"))["valid"]
