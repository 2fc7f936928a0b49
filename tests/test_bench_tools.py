"""The pure helpers of the benchmark scripts: wrk output parsing, ratios, medians, report rendering."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import re
import struct
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# The scripts import each other by module name (they run as `python benchmarks/<script>.py`).
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_tools_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(module)
    return module


bench_http = _load("bench_http")
run = _load("run")
bench_variants = _load("bench_variants")
bench_audit = _load("bench_audit")
bench_batch = _load("bench_batch")
bench_faults = _load("bench_faults")
bench_million = _load("bench_million")

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:40000/api/v1/calculate-locate
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.21ms  850.00us  1.20s    85.12%
    Req/Sec    10.01k   500.00    11.00k    70.00%
  Latency Distribution
     50%    1.23ms
     75%  850.00us
     90%    1.2s
     99%    2.00m
  100123 requests in 10.00s, 70.00MB read
Requests/sec:  10012.34
Transfer/sec:      7.00MB
wrk_quote: responses=100123 non2xx=0 connect=0 read=0 write=0 timeout=0 status_errors=0
"""

WRK_OUTPUT_WITH_ERRORS = """\
Running 2s test @ http://127.0.0.1:40000/api/v1/calculate-locate
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.00ms  504.36us  11.59ms   95.10%
    Req/Sec     4.04k   119.04     4.14k    90.48%
  Latency Distribution
     50%    1.97ms
     75%    2.04ms
     90%    2.15ms
     99%    3.33ms
  8433 requests in 2.10s, 4.18MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 4217
Requests/sec:   4016.23
Transfer/sec:      1.99MB
"""

WRK2_OUTPUT = """\
  Latency Distribution (HdrHistogram - Recorded Latency)
 50.000%    1.02ms
 75.000%    1.50ms
 90.000%    2.00ms
 99.000%    4.10ms
 99.900%    9.00ms
  Detailed Percentile spectrum:
       Value   Percentile   TotalCount 1/(1-Percentile)
       0.500     0.000000            1         1.00
  60000 requests in 10.00s, 40.00MB read
Requests/sec:   5999.50
"""


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("1.23ms", 1.23),
        ("850.00us", 0.85),
        ("1.2s", 1200.0),
        ("2.00m", 120_000.0),
        ("1.00h", 3_600_000.0),
        ("  42us ", 0.042),
    ],
)
def test_parse_time_units(text: str, expected_ms: float) -> None:
    assert bench_http.parse_time_ms(text) == pytest.approx(expected_ms)


@pytest.mark.parametrize("text", ["", "1.2", "ms", "1.2 parsecs", "-1ms"])
def test_parse_time_rejects_non_durations(text: str) -> None:
    with pytest.raises(ValueError):
        bench_http.parse_time_ms(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("10.01k", 10_010.0), ("500.00", 500.0), ("1.5M", 1_500_000.0), ("2G", 2e9)]
)
def test_parse_metric(text: str, expected: float) -> None:
    assert bench_http.parse_metric(text) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10.0), ("2m", 120.0), ("500ms", 0.5), ("7", 7.0)])
def test_parse_duration_arg(text: str, seconds: float) -> None:
    assert bench_http.parse_duration_arg(text) == pytest.approx(seconds)


def test_parse_wrk_output() -> None:
    result = bench_http.parse_wrk_output(WRK_OUTPUT)
    assert result.requests_per_sec == pytest.approx(10012.34)
    assert result.total_requests == 100123
    assert result.duration_s == pytest.approx(10.0)
    assert result.latency_ms == pytest.approx({50: 1.23, 75: 0.85, 90: 1200.0, 99: 120_000.0})
    assert result.latency_avg_ms == pytest.approx(3.21)
    assert result.latency_stdev_ms == pytest.approx(0.85)
    assert result.latency_max_ms == pytest.approx(1200.0)
    assert result.lua["responses"] == 100123
    assert result.non_2xx == 0
    assert result.errors == 0
    assert result.valid


def test_parse_wrk_output_errors_make_the_run_invalid() -> None:
    result = bench_http.parse_wrk_output(WRK_OUTPUT_WITH_ERRORS)
    assert result.requests_per_sec == pytest.approx(4016.23)
    assert result.duration_s == pytest.approx(2.1)
    assert result.non_2xx_3xx == 4217
    assert result.non_2xx == 4217  # no Lua line: wrk's own count
    assert result.socket_errors == {"connect": 1, "read": 2, "write": 3, "timeout": 4}
    assert result.errors == 4217 + 10
    assert not result.valid


def test_lua_count_takes_precedence_over_wrk_count() -> None:
    # wrk counts only status > 399; the script counts every non-2xx (a 302 included).
    text = WRK_OUTPUT.replace("non2xx=0", "non2xx=3")
    result = bench_http.parse_wrk_output(text)
    assert result.non_2xx_3xx == 0
    assert result.non_2xx == 3
    assert not result.valid


def test_parse_wrk2_percentiles_ignores_the_spectrum() -> None:
    result = bench_http.parse_wrk_output(WRK2_OUTPUT)
    assert result.latency_ms == pytest.approx({50: 1.02, 75: 1.5, 90: 2.0, 99: 4.1})
    assert result.requests_per_sec == pytest.approx(5999.5)


def test_parse_wrk_output_without_a_rate_is_an_error() -> None:
    with pytest.raises(ValueError, match="Requests/sec"):
        bench_http.parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_zero_requests_is_not_valid() -> None:
    text = WRK_OUTPUT.replace("100123 requests", "0 requests")
    assert not bench_http.parse_wrk_output(text).valid


def test_ratio() -> None:
    assert bench_http.ratio(30.0, 10.0) == pytest.approx(3.0)
    assert bench_http.ratio(1.0, 4.0) == pytest.approx(0.25)
    assert bench_http.ratio(None, 4.0) is None
    assert bench_http.ratio(4.0, None) is None
    assert bench_http.ratio(4.0, 0.0) is None


def test_median_or_none() -> None:
    assert bench_http.median_or_none([3.0, 1.0, 2.0]) == 2.0
    assert bench_http.median_or_none([1.0, None, 3.0]) == 2.0
    assert bench_http.median_or_none([None]) is None
    assert bench_http.median_or_none([]) is None


def test_cpu_percent() -> None:
    assert bench_http.cpu_percent(5.0, 10.0) == pytest.approx(50.0)
    assert bench_http.cpu_percent(1.0, 0.0) is None


def test_parse_proc_stat_cpu_handles_spaces_in_the_command() -> None:
    fields = ["S", *["0"] * 10, "250", "50", *["0"] * 20]
    stat = "1234 (python -m pricer) " + " ".join(fields)
    assert bench_http.parse_proc_stat_cpu(stat, 100) == pytest.approx(3.0)


def _run(rps: float, p50: float, p99: float, *, wrk_cpu: float = 20.0, errors: int = 0) -> dict[str, object]:
    return {
        "requests_per_sec": rps,
        "latency_ms": {"p50": p50, "p75": p50, "p90": p99, "p99": p99},
        "server_cpu_percent": 99.0,
        "wrk_cpu_percent": wrk_cpu,
        "errors": errors,
    }


def test_summarize_runs_takes_medians() -> None:
    summary = bench_http.summarize_runs(
        [_run(100.0, 1.0, 5.0, wrk_cpu=10.0), _run(300.0, 3.0, 7.0, wrk_cpu=30.0), _run(200.0, 2.0, 9.0)]
    )
    assert summary["rounds"] == 3
    assert summary["requests_per_sec"] == 200.0
    assert summary["latency_ms"]["p50"] == 2.0
    assert summary["latency_ms"]["p99"] == 7.0
    assert summary["wrk_cpu_percent"] == 20.0
    assert summary["max_wrk_cpu_percent"] == 30.0
    assert summary["errors"] == 0


def test_compare_and_per_round_ratios() -> None:
    engine_runs = [_run(400.0, 1.0, 4.0), _run(600.0, 1.0, 4.0)]
    baseline_runs = [_run(100.0, 2.0, 8.0), _run(300.0, 2.0, 8.0)]
    comparison = bench_http.compare(
        bench_http.summarize_runs(engine_runs), bench_http.summarize_runs(baseline_runs)
    )
    assert comparison["throughput_ratio"] == pytest.approx(2.5)  # medians 500 / 200
    assert comparison["latency_ratio"]["p50"] == pytest.approx(0.5)
    assert comparison["latency_ratio"]["p99"] == pytest.approx(0.5)
    assert bench_http.per_round_ratios(engine_runs, baseline_runs) == pytest.approx([4.0, 2.0])


def test_figures_mismatch() -> None:
    quote = {
        "status": "success",
        "ticker": "AAPL",
        "client_id": "demo_client",
        "position_value": 100000.0,
        "loan_days": 30,
        "fee_schedule": {"markup_percentage": 5.0},
        "total_fee": 456.51,
        "breakdown": {"borrow_cost": 410.96, "markup": 20.55, "transaction_fees": 25.0},
        "borrow_rate_used": 0.05,
        "quote_id": "a",
        "rate": {"base_rate": 0.05, "borrow_status": "EASY", "as_of": "x"},
    }
    other = {**quote, "quote_id": "b", "rate": {**quote["rate"], "as_of": "y"}}  # type: ignore[dict-item]
    assert bench_http.figures_mismatch(quote, other) == []
    wrong = {**other, "total_fee": 456.52, "rate": {**other["rate"], "borrow_status": "HARD"}}
    problems = bench_http.figures_mismatch(quote, wrong)
    assert len(problems) == 2
    assert problems[0].startswith("total_fee")
    assert problems[1].startswith("rate.borrow_status")


def test_format_helpers() -> None:
    assert bench_http.format_ratio(1.234) == "1.23x"
    assert bench_http.format_ratio(None) == "n/a"
    assert bench_http.format_number(None) == "n/a"
    assert bench_http.format_number(1234.56) == "1235"


def test_report_ratio_rows_from_pricing_results() -> None:
    rows = run.flatten_numbers({"a": {"speedup": 12.5, "n": 3, "label": "x"}, "b": [1.5, {"ratio": 2.0}]})
    assert ("a.speedup", 12.5) in rows
    assert ("a.n", 3) in rows
    assert ("b[0]", 1.5) in rows
    assert ("b[1].ratio", 2.0) in rows
    assert all(name != "a.label" for name, _ in rows)


def test_parse_cpu_list() -> None:
    assert bench_http.parse_cpu_list("0") == [0]
    assert bench_http.parse_cpu_list("0,2") == [0, 2]
    assert bench_http.parse_cpu_list("1-3,5") == [1, 2, 3, 5]
    assert bench_http.parse_cpu_list("") == []


def test_busy_percent_from_proc_stat() -> None:
    before = bench_http.parse_proc_stat_cpus(
        "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1 2\n"
    )
    after = bench_http.parse_proc_stat_cpus(
        "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 95 0 5 50 0 0 0 0 0 0\ncpu1 10 0 5 125 10 0 0 0 0 0\n"
    )
    assert before == {0: (10, 50), 1: (10, 50)}
    assert bench_http.busy_percent(before, after, [0]) == pytest.approx(90.0)  # 90 of 100 jiffies
    assert bench_http.busy_percent(before, after, [1]) == pytest.approx(5.0)  # iowait is not busy
    assert bench_http.busy_percent(before, after, [0, 1]) == pytest.approx(47.5)
    assert bench_http.busy_percent(before, after, [7]) is None


def test_display_command_hides_paths_and_ports() -> None:
    command = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        "-s",
        str(bench_http.LUA_SCRIPT),
        "http://127.0.0.1:40123/api/v1/calculate-locate",
    ]
    assert bench_http.display_command(command) == (
        "taskset -c 1 wrk -t1 -s benchmarks/wrk_quote.lua http://127.0.0.1:<port>/api/v1/calculate-locate"
    )


def test_markdown_table_skips_nested_values() -> None:
    lines = run.markdown_table([{"size": 1000, "ms": 0.5, "by": {"x": 1}}, {"size": 2000, "ms": 12.25}])
    assert lines[0] == "| size | ms |"
    assert lines[2] == "| 1,000 | 0.5 |"
    assert lines[3] == "| 2,000 | 12.2 |"


def test_http_section_renders_ratios() -> None:
    engine = bench_http.summarize_runs([_run(500.0, 1.0, 4.0)])
    baseline = bench_http.summarize_runs([_run(250.0, 2.0, 8.0)])
    document = {
        "valid": True,
        "settings": {
            "request_bodies": [{}],
            "server_cpu": "0",
            "wrk_cpu": "1",
            "duration": "10s",
            "warmup": "3s",
            "rounds": 1,
        },
        "summary": {
            "loads": {
                "throughput": {
                    "label": "throughput (c=32)",
                    "engine": engine,
                    "baseline": baseline,
                    "engine_vs_baseline": bench_http.compare(engine, baseline),
                    "per_round_ratio": [2.0],
                }
            }
        },
        "runs": [{"load": "throughput", "command": "taskset -c 1 wrk -c32"}],
        "notes": ["a note"],
    }
    text = "\n".join(run.http_section(document, [], None))
    assert "throughput engine/baseline **2.00×**" in text
    assert "p50 0.50×" in text
    assert "- a note" in text
    assert "taskset -c 1 wrk -c32" in text
    assert "INVALID" not in text


# ---- bench_http additions ------------------------------------------------------------------------------


def test_expected_status_counts_instead_of_non_2xx() -> None:
    text = WRK_OUTPUT.replace("non2xx=0", "non2xx=7 unexpected=0")
    result = bench_http.parse_wrk_output(text)
    assert result.non_2xx == 7
    assert result.unexpected == 0
    assert result.valid  # every response had the status the run expected (e.g. 404)
    broken = bench_http.parse_wrk_output(text.replace("unexpected=0", "unexpected=2"))
    assert broken.errors == 2
    assert not broken.valid


def test_cpu_us_per_request() -> None:
    assert bench_http.cpu_us_per_request(2.5, 10_000) == pytest.approx(250.0)
    assert bench_http.cpu_us_per_request(1.0, 0) is None
    assert bench_http.cpu_us_per_request(None, 10) is None


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.env"
    path.write_text("DEMO_CLIENT_KEY=bre_abc_def\nPRICER_URL = http://x:1\n\nnot a line\n")
    assert bench_http.read_env_file(path) == {"DEMO_CLIENT_KEY": "bre_abc_def", "PRICER_URL": "http://x:1"}


def test_run_as_dict_has_cpu_per_request_and_extras() -> None:
    result = bench_http.parse_wrk_output(WRK_OUTPUT)
    run_ = bench_http.Run(
        target="a",
        load="paced",
        round=1,
        connections=32,
        result=result,
        wall_s=10.0,
        wrk_cpu_s=1.0,
        server_cpu_s=25.0306,
        server_rss_mb=100.0,
        command="wrk",
        delay_ms=17.5,
        extra={"redis_cpu_us_per_request": 3.0},
    )
    record = run_.as_dict()
    assert record["cpu_us_per_request"] == pytest.approx(25.0306 / 100123 * 1e6)
    assert record["delay_ms"] == 17.5
    assert record["redis_cpu_us_per_request"] == 3.0


# ---- bench_variants ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "limit", "op", "valid", "expected"),
    [
        (50.0, 60, "<=", True, "PASS"),
        (60.0, 60, "<=", True, "PASS"),
        (60.1, 60, "<=", True, "MISS"),
        (250_000.0, 200_000, ">=", True, "PASS"),
        (150_000.0, 200_000, ">=", True, "MISS"),
        (None, 60, "<=", True, "n/a"),
        (10.0, 60, "<=", False, "INVALID"),
    ],
)
def test_verdict(value: float | None, limit: float, op: str, valid: bool, expected: str) -> None:
    assert bench_http.verdict(value, limit, op, valid=valid) == expected


def test_verdict_rejects_an_unknown_comparison() -> None:
    with pytest.raises(ValueError):
        bench_http.verdict(1.0, 2.0, "<")


def test_paced_delay_ms() -> None:
    # 32 connections each waiting 20 ms offer 1,600 requests per second.
    assert bench_variants.paced_delay_ms(32, 1600.0) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        bench_variants.paced_delay_ms(32, 0.0)


def test_round_order_alternates() -> None:
    assert bench_variants.round_order(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert bench_variants.round_order(["a", "b", "c"], 2) == ["c", "b", "a"]
    assert bench_variants.round_order(["a", "b", "c"], 3) == ["a", "b", "c"]


def _variant_run(round_: int, rps: float, cpu_us: float, **extra: Any) -> dict[str, Any]:
    return {
        **_run(rps, 1.0, 4.0),
        "round": round_,
        "cpu_us_per_request": cpu_us,
        "total_requests": int(rps * 10),
        **extra,
    }


def test_summarize_variant_medians_and_extras() -> None:
    runs = [
        _variant_run(1, 100.0, 300.0, local_decisions=5, delay_ms=None),
        _variant_run(2, 300.0, 250.0, local_decisions=0, delay_ms=None),
        _variant_run(3, 200.0, 280.0, local_decisions=1, delay_ms=None),
    ]
    summary = bench_variants.summarize_variant(runs)
    assert summary["requests_per_sec"] == 200.0
    assert summary["cpu_us_per_request"] == 280.0
    assert summary["per_round_cpu_us_per_request"] == [300.0, 250.0, 280.0]
    assert summary["local_decisions"] == 1
    assert summary["total_requests"] == 6000
    assert "delay_ms" not in summary  # never measured
    assert "redis_cpu_us_per_request" not in summary


def test_compare_variants_pairs_rounds() -> None:
    reference_runs = [_variant_run(1, 400.0, 250.0), _variant_run(2, 500.0, 240.0)]
    variant_runs = [_variant_run(2, 450.0, 280.0), _variant_run(1, 300.0, 300.0)]  # any order
    reference = bench_variants.summarize_variant(reference_runs)
    variant = bench_variants.summarize_variant(variant_runs)
    cmp = bench_variants.compare_variants(reference, variant, reference_runs, variant_runs)
    assert cmp["throughput_ratio"] == pytest.approx(375.0 / 450.0)
    assert cmp["throughput_change_percent"] == pytest.approx((375.0 / 450.0 - 1) * 100)
    assert cmp["per_round_ratio"] == pytest.approx([300.0 / 400.0, 450.0 / 500.0])
    assert cmp["cpu_us_per_request_diff"] == pytest.approx(290.0 - 245.0)
    assert cmp["per_round_cpu_us_diff"] == pytest.approx([50.0, 40.0])
    assert cmp["latency_ratio"]["p50"] == pytest.approx(1.0)


def test_section_targets_limiter_flags_local_decisions() -> None:
    section = bench_variants.limiter_section("redis://127.0.0.1:6379/11")
    on = {"latency_ms": {"p99": 1.5}, "requests_per_sec": 1700.0, "rate": 1800.0}
    summary = {
        "throughput": {"limiter_on": {**on, "local_decision_percent": 97.0}, "limiter_off": on},
        "paced": {"limiter_on": {**on, "local_decision_percent": 0.0}, "limiter_off": on},
    }
    pairs = {
        "limiter": {
            "throughput": {"cpu_us_per_request_diff": 30.0},
            "paced": {"cpu_us_per_request_diff": 70.0},
        }
    }
    targets = bench_variants.section_targets(section, summary, pairs, True)
    assert [t["verdict"] for t in targets] == ["PASS", "MISS", "PASS"]
    assert "97 %" in targets[0]["note"]
    assert targets[1]["note"] == "every limiter_on decision went through Redis"
    assert targets[2]["unit"] == "ms"


def test_section_targets_persistence_is_the_loss_in_percent() -> None:
    section = bench_variants.persistence_section(
        "postgresql://x/y", "bench_x", Path("/tmp/w"), "redis://127.0.0.1:6379/11"
    )
    pairs = {"postgres": {"throughput": {"throughput_change_percent": -12.5}}}
    (target,) = bench_variants.section_targets(section, {}, pairs, True)
    assert target["value"] == pytest.approx(12.5)
    assert target["verdict"] == "PASS"
    (invalid,) = bench_variants.section_targets(section, {}, pairs, False)
    assert invalid["verdict"] == "INVALID"


def test_observability_section_pairs() -> None:
    section = bench_variants.observability_section()
    names = [variant.name for variant in section.variants]
    assert names[0] == "default"  # the reference of the figure check
    tracing = section.variant("tracing")
    assert tracing.quiet_stdout
    assert tracing.env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert {(p.reference, p.variant) for p in section.pairs} == {
        ("metrics_off", "default"),
        ("default", "tracing"),
    }


def test_new_rate_cache_version_bumps_the_key_the_engine_reads() -> None:
    """Against the real Redis (database 10, which no test or benchmark uses otherwise)."""
    import redis

    from pricer.marketdata.shared_cache import VERSION_KEY

    assert bench_variants.RATE_CACHE_VERSION_KEY == VERSION_KEY
    client = redis.Redis.from_url("redis://127.0.0.1:6379/10")
    try:
        client.delete(VERSION_KEY)
        assert bench_variants.new_rate_cache_version("redis://127.0.0.1:6379/10") == 1
        assert bench_variants.new_rate_cache_version("redis://127.0.0.1:6379/10") == 2
        assert int(client.get(VERSION_KEY) or 0) == 2
        assert client.get(VERSION_KEY + "x") is None
    finally:
        client.delete(VERSION_KEY)
        client.close()


def test_parse_redis_info() -> None:
    info = bench_variants.parse_redis_info(
        "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9\r\n"
    )
    assert info["used_cpu_sys"] == "1.500000"
    assert bench_variants.redis_cpu_seconds(info) == pytest.approx(3.75)
    assert bench_variants.redis_cpu_seconds({}) is None


def test_parse_proc_net_tcp() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:D431 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 12345 1\n"
        "   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 678 1\n"
    )
    assert bench_variants.parse_proc_net_tcp(text) == {12345: (0xD431, 5432), 678: (8080, 0)}


def test_display_env_and_engine_command() -> None:
    workdir = Path("/tmp/bench-x")
    shown = bench_variants.display_env(
        {"A": "1", "B": f"{workdir}/spool", "C": "two words", "D": "<free>"}, workdir
    )
    assert shown == "A=1 B=<tmp>/spool C='two words' D=<free>"
    variant = bench_variants.Variant("tracing", "t", {"OTEL_TRACES_EXPORTER": "console"}, quiet_stdout=True)
    command = bench_variants.engine_command(variant, "0", {"DEMO_KEYS_FILE": "<tmp>/k.env"})
    assert command.startswith("HOST=127.0.0.1 PORT=<free> DEMO_KEYS_FILE=<tmp>/k.env ")
    assert "SHUTDOWN_DRAIN_SECONDS=0" in command
    assert command.endswith("OTEL_TRACES_EXPORTER=console taskset -c 0 python -m pricer serve >/dev/null")


# ---- bench_audit ---------------------------------------------------------------------------------------


def test_audit_decimals_are_exact() -> None:
    assert bench_audit.cents(123456) == Decimal("1234.56")
    assert bench_audit.cents(5) == Decimal("0.05")
    assert bench_audit.rate_decimal(36_461_880) == Decimal("0.36461880")
    assert bench_audit.rows_per_second(100_000, 0.5) == pytest.approx(200_000.0)
    assert bench_audit.rows_per_second(100_000, 0.0) is None


def test_plain_rows_match_the_batch() -> None:
    batch = bench_audit.make_batch(50, 7, seed=3)
    rows = bench_audit.plain_rows(batch)
    assert len(rows) == 50
    assert all(len(row) == len(bench_audit.PLAIN_COLUMNS) for row in rows)
    record = dict(zip(bench_audit.PLAIN_COLUMNS, rows[17], strict=True))
    rate = batch.rates[int(batch.rate_index[17])]
    assert record["quote_id"] == batch.quote_id(17)
    assert record["batch_id"] == batch.batch_id
    assert record["ticker"] == rate.ticker
    assert record["position_value"] == Decimal(int(batch.position_cents[17])) / 100
    assert record["total_fee"] == Decimal(int(batch.total_fee[17])) / 100
    assert record["borrow_rate"] == Decimal(rate.rate_units) / 10**8
    assert record["base_rate"] == Decimal(repr(rate.base_rate))
    assert record["calculated_at"] == batch.calculated_at
    assert record["transaction_fee_type"] == str(batch.fee_schedule.transaction_fee_type)
    assert bench_audit.PLAIN_INSERT.count("$") == len(bench_audit.PLAIN_COLUMNS)


def test_make_batch_and_fresh_ids() -> None:
    batch = bench_audit.make_batch(1000, 100)
    assert batch.size == 1000
    assert len(batch.rates) == 100
    assert int(batch.rate_index.max()) < 100
    assert (batch.total_fee == batch.borrow_cost + batch.markup + batch.transaction_fees).all()
    again = dataclasses.replace(batch, batch_id="0" * 24)
    assert again.quote_id(0) != batch.quote_id(0)
    assert again.position_cents is batch.position_cents  # the same rows, new quote ids


def test_audit_method_order_rotates() -> None:
    orders = [bench_audit.method_order(n) for n in (1, 2, 3, 4)]
    assert orders[0] == ["store", "audit", "executemany"]
    assert [order[0] for order in orders[:3]] == ["store", "audit", "executemany"]
    assert orders[3] == orders[0]


def test_summarize_method() -> None:
    runs = [
        {"seconds": 0.5, "client_cpu_s": 0.1, "db_cpu_s": 0.4},
        {"seconds": 0.25, "client_cpu_s": 0.1, "db_cpu_s": None},
        {"seconds": 1.0, "client_cpu_s": 0.2, "db_cpu_s": 0.6},
    ]
    summary = bench_audit.summarize_method(runs, 100_000)
    assert summary["seconds"] == 0.5
    assert summary["rows_per_s"] == pytest.approx(200_000.0)
    assert summary["per_run_rows_per_s"] == pytest.approx([200_000.0, 400_000.0, 100_000.0])
    assert summary["db_cpu_s"] == pytest.approx(0.5)
    assert "build_s" not in summary


# ---- bench_batch ---------------------------------------------------------------------------------------


def test_batch_body() -> None:
    body = bench_batch.batch_body(1000, seed=1)
    assert body["client_id"] == "demo_client"
    positions = body["positions"]
    assert len(positions) == 1000
    assert {p["ticker"] for p in positions} == set(bench_batch.DEMO_TICKERS)
    assert all(1 <= p["loan_days"] <= 365 for p in positions)
    assert all(
        0.01 <= p["position_value"] <= 1e9 and round(p["position_value"], 2) == p["position_value"]
        for p in positions
    )
    assert bench_batch.batch_body(1000, seed=1) == body


def test_client_ids_are_distinct_and_valid() -> None:
    ids = list(bench_batch.client_ids(1000, "rss1a2b3c_"))
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{3,50}", client_id) for client_id in ids)


def test_quote_request_bytes() -> None:
    raw = bench_batch.quote_request("client_0000001")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/v1/calculate-locate HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'"client_id":"client_0000001"' in body


def test_parse_response_head() -> None:
    assert bench_batch.parse_response_head(
        b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    ) == (404, None, True)
    assert bench_batch.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n") == (
        200,
        12,
        False,
    )


def test_read_body_chunked_and_plain() -> None:
    async def read(data: bytes, length: int | None, chunked: bool) -> tuple[bytes, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        body = await bench_batch.read_body(reader, length, chunked)
        return body, await reader.read()

    chunked = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\nNEXT"
    assert asyncio.run(read(chunked, None, True)) == (b"hello, world", b"NEXT")
    assert asyncio.run(read(b"abcdefNEXT", 6, False)) == (b"abcdef", b"NEXT")


def test_same_batch_figures() -> None:
    quote = {
        "index": 0,
        "ticker": "AAPL",
        "position_value": 1.0,
        "loan_days": 3,
        "total_fee": 0.5,
        "breakdown": {},
        "borrow_rate_used": 0.05,
        "quote_id": "x",
    }
    answer = {"client_id": "c", "count": 1, "priced": 1, "fee_schedule": {}, "errors": [], "quotes": [quote]}
    other = {**answer, "quotes": [{**quote, "quote_id": "y"}], "calculated_at": "later"}
    assert bench_batch.same_batch_figures(answer, other) == []
    wrong = {**answer, "quotes": [{**quote, "total_fee": 0.51}]}
    assert bench_batch.same_batch_figures(answer, wrong) == ["quote 0: total_fee differ"]


def test_rss_mb() -> None:
    status = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert bench_batch.rss_mb(status) == pytest.approx(100.0)
    assert bench_batch.rss_mb(status, "VmHWM") == pytest.approx(200.0)
    assert bench_batch.rss_mb("") is None


# ---- run.py --------------------------------------------------------------------------------------------


def test_selected_sections() -> None:
    assert run.selected_sections(None, []) == list(run.SECTIONS)
    assert run.selected_sections("audit, limiter", []) == ["limiter", "audit"]  # standard order
    assert run.selected_sections(None, ["pricing", "http"]) == [
        "latency",
        "profile",
        "limiter",
        "persistence",
        "observability",
        "audit",
        "batch",
        "million",
        "mixed",
        "faults",
        "sources",
        "roles",
    ]
    with pytest.raises(ValueError, match="unknown section"):
        run.selected_sections("limiter,nope", [])


def test_section_command_quick_args() -> None:
    path = Path("/tmp/x.json")
    assert run.section_command("limiter", path, False)[1:] == [
        str(run.VARIANTS_SCRIPT),
        "limiter",
        "--json",
        str(path),
    ]
    assert run.section_command("audit", path, True)[-2:] == ["--repeat", "3"]
    assert "--clients" in run.section_command("batch", path, True)
    assert run.section_command("persistence", path, False)[-2:] == ["--rounds", "5"]
    assert run.section_command("persistence", path, True)[-2:] == ["--rounds", "2"]


def test_format_duration_and_signed() -> None:
    assert run.format_duration(5.4) == "5s"
    assert run.format_duration(185) == "3m05s"
    assert run.format_duration(None) == "n/a"
    assert run.signed(12.345, "µs") == "+12.3 µs"
    assert run.signed(-3.0) == "-3.0"
    assert run.signed(None) == "n/a"


def test_targets_table_and_counts() -> None:
    pass_target = bench_variants.make_target("cpu", 12.0, 15, "<=", "µs")
    miss_target = bench_variants.make_target("rows", 99_000.0, 200_000, ">=", "rows/s", note="slow")
    quick = {**pass_target, "verdict": "n/a (PASS at 20,000)"}
    rows = [("observability", pass_target), ("audit", miss_target), ("batch", quick)]
    lines = run.targets_table(rows)
    assert lines[0].startswith("| section | target |")
    assert lines[2] == "| observability | cpu | 12.0 µs | <= 15 µs | **PASS** |  |"
    assert lines[3] == "| audit | rows | 99,000 rows/s | >= 200,000 rows/s | **MISS** | slow |"
    assert "| n/a (PASS at 20,000) |" in lines[4]
    assert run.verdict_counts(rows) == {"PASS": 1, "MISS": 1, "n/a": 1}


def _variants_document() -> dict[str, Any]:
    on = bench_variants.summarize_variant([_variant_run(1, 3000.0, 300.0, local_decision_percent=0.0)])
    off = bench_variants.summarize_variant([_variant_run(1, 3300.0, 270.0)])
    cmp = bench_variants.compare_variants(
        off, on, [_variant_run(1, 3300.0, 270.0)], [_variant_run(1, 3000.0, 300.0)]
    )
    return {
        "title": "Rate limiter",
        "description": "Both variants use Redis.",
        "valid": True,
        "settings": {
            "server_cpu": "0",
            "wrk_cpu": "1",
            "connections": 32,
            "rounds": 1,
            "duration": "8s",
            "warmup": "2s",
        },
        "variants": [{"name": "limiter_off", "label": "off"}, {"name": "limiter_on", "label": "on"}],
        "summary": {"throughput": {"limiter_off": off, "limiter_on": on}},
        "pairs": [
            {
                "name": "limiter",
                "label": "rate limiter",
                "reference": "limiter_off",
                "variant": "limiter_on",
                "loads": {"throughput": cmp},
            }
        ],
        "targets": [
            bench_variants.make_target("limiter CPU", cmp["cpu_us_per_request_diff"], 60, "<=", "µs")
        ],
        "extra": {},
        "notes": ["a note"],
        "commands": ["# limiter_on: REDIS_URL=redis://127.0.0.1:6379/11 python -m pricer serve"],
    }


def test_variants_section_renders_pairs_and_targets() -> None:
    text = "\n".join(run.variants_section(_variants_document(), [], None, "limiter"))
    assert "## Rate limiter (bench_variants.py limiter)" in text
    assert "limiter_on/limiter_off **0.91×**" in text
    assert "server CPU per request **+30.0 µs**" in text
    assert "| limiter | limiter CPU | 30.0 µs | <= 60 µs | **PASS** |" in text
    assert "limiter decided locally %" in text  # the column appears once a variant has the figure
    assert "- a note" in text
    assert "REDIS_URL=redis://127.0.0.1:6379/11" in text


def test_write_report_collects_every_target(tmp_path: Path) -> None:
    audit_doc = {
        "valid": True,
        "settings": {"size": 100_000, "tickers": 5000, "repeat": 5},
        "database": {"server_version": "15"},
        "summary": {
            name: {
                "seconds": 0.5,
                "rows_per_s": 200_000.0,
                "per_run_rows_per_s": [200_000.0],
                "client_cpu_s": 0.1,
                "db_cpu_s": 0.4,
                **({"add_s": 0.0001} if name == "audit" else {}),
                **({"build_s": 0.4} if name == "executemany" else {}),
            }
            for name in ("store", "audit", "executemany")
        },
        "ratios": {
            "store_over_executemany": 2.5,
            "store_over_executemany_insert_only": 2.0,
            "audit_over_executemany": 2.4,
            "audit_over_store": 0.98,
        },
        "digests_equal": True,
        "targets": [bench_variants.make_target("write", 210_000.0, 200_000, ">=", "rows/s")],
        "problems": [],
        "notes": [],
        "commands": ["python benchmarks/bench_audit.py", "# baseline: INSERT ..."],
    }
    results = {
        "limiter": {"data": _variants_document(), "command": [], "error": None, "seconds": 130.0},
        "audit": {"data": audit_doc, "command": [], "error": None, "seconds": 40.0},
        "batch": {
            "data": None,
            "command": [],
            "error": "bench_batch.py exited with status 2 and wrote no JSON",
        },
    }
    report = tmp_path / "REPORT.md"
    run.write_report(report, quick=True, results=results)
    text = report.read_text()
    assert "Quick smoke run" in text
    assert "Wall time per section: limiter 2m10s, audit 40s." in text
    assert "## Targets" in text
    assert "2 PASS." in text
    assert "| audit | write | 210,000 rows/s | >= 200,000 rows/s | **PASS** |" in text
    assert "**equal**" in text
    assert "**Problem:** bench_batch.py exited with status 2 and wrote no JSON." in text


def test_clean_environment_drops_every_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pricer.settings import _PARSERS

    assert set(_PARSERS) <= bench_http.ENGINE_SETTINGS  # a new setting must be scrubbed too
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("ENABLE_METRICS", "false")
    monkeypatch.setenv("DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("KEEP_ME", "1")
    environment = bench_http._clean_environment()
    assert "OTEL_TRACES_EXPORTER" not in environment
    assert "ENABLE_METRICS" not in environment
    assert "DATABASE_URL" not in environment
    assert environment["KEEP_ME"] == "1"


bench_latency = _load("bench_latency")


def test_http_targets_compare_with_the_baseline_and_the_raw_ceiling() -> None:
    summary = {
        "loads": {
            "throughput": {
                "engine_vs_baseline": {"throughput_ratio": 3.2},
                "engine_vs_raw": {"throughput_ratio": 0.41},
            }
        }
    }
    versus_baseline, versus_raw = bench_http.http_targets(summary, True)
    assert (versus_baseline["value"], versus_baseline["verdict"]) == (3.2, "PASS")
    assert (versus_raw["value"], versus_raw["verdict"]) == (41.0, "MISS")
    assert bench_http.http_targets({"loads": {}}, True) == []
    assert {t["verdict"] for t in bench_http.http_targets(summary, False)} == {"INVALID"}


def test_hot_functions_from_collapsed_stacks() -> None:
    raw = (
        "main (a.py:1);handle (b.py:10);price (c.py:5) 6\n"
        "main (a.py:1);handle (b.py:11);send (d.py:7) 3\n"
        "main (a.py:2) 1\n"
        "garbage line\n"
    )
    profile = bench_latency.hot_functions(raw)
    assert profile["self"][0] == ("price (c.py)", 60.0)
    inclusive = dict(profile["inclusive"])
    assert inclusive["main (a.py)"] == 100.0
    assert inclusive["handle (b.py)"] == 90.0  # two lines of one function count once per stack
    assert bench_latency.hot_functions("") == {"self": [], "inclusive": []}


def test_latency_reports_the_run_with_the_median_p99_whole() -> None:
    runs = [
        ({"latency_ms": {"p99": p99, "p50": p50}}, {"run": n})
        for n, (p99, p50) in enumerate([(12.9, 0.3), (1.5, 0.2), (2.3, 0.25)])
    ]
    chosen = bench_latency.median_round(runs)
    assert chosen == {"summary": {"latency_ms": {"p99": 2.3, "p50": 0.25}}, "result": {"run": 2}}
    assert bench_latency.median_round(runs[:2])["summary"]["latency_ms"]["p99"] == 1.5  # lower middle
    assert bench_latency.median_round(runs[1:2])["result"] == {"run": 1}


def _half_summary(p99: float) -> dict[str, Any]:
    lat = {"p50": 0.2, "p90": 0.3, "p99": p99, "p99.9": 3.0, "max": 5.0, "mean": 0.25}
    return {
        "throughput_rps": 4000.0,
        "latency_ms": lat,
        "service_ms": lat,
        "generator_cpu_percent": 20.0,
        "server_cpu_percent": 60.0,
        "bottleneck": "neither: the offered rate was served",
        "status_counts": {"200": 4000},
    }


def _latency_variant(**extra: Any) -> dict[str, Any]:
    return {
        "offered_rps": 4000.0,
        "capacity_rps": 8000.0,
        "capacity": {"summary": _half_summary(6.0)},
        "half": {"summary": _half_summary(1.5)},
        **extra,
    }


def test_latency_section_and_full_stack_lines_render() -> None:
    doc = {
        "variants": {
            "embedded": _latency_variant(
                profile={"self": [("price (c.py)", 12.5)], "inclusive": [("x (pricer/y.py)", 40.0)]}
            )
        },
        "targets": [{"name": "p99", "value": 1.5, "limit": 2, "op": "<=", "unit": "ms", "verdict": "PASS"}],
        "floor": {"offered_rps": 4000.0, "summary": _half_summary(0.9)},
    }
    text = "\n".join(run.latency_section(doc, ["python", "benchmarks/bench_latency.py"], None))
    assert "| raw-ASGI floor | open at 4000/s |" in text
    assert "| embedded | open at 4000/s | 4,000 |" in text or "| embedded | open at 4000/s |" in text
    assert "`price (c.py)`" in text
    assert "**PASS**" in text
    results = {
        "http": {
            "data": {
                "summary": {
                    "loads": {
                        "throughput": {
                            "engine_vs_baseline": {"throughput_ratio": 2.0},
                            "engine_vs_raw": {"throughput_ratio": 0.5},
                        }
                    }
                }
            }
        },
        "persistence": {
            "data": {
                "pairs": [
                    {"name": "postgres", "loads": {"throughput": {"throughput_ratio": 0.8}}},
                    {"name": "postgres_redis", "loads": {"throughput": {"throughput_ratio": 0.75}}},
                ]
            }
        },
    }
    lines = "\n".join(run.full_stack_lines(results))
    assert "**1.60× the FastAPI baseline**" in lines
    assert "**1.50× the FastAPI baseline**" in lines
    assert run.full_stack_lines({"http": results["http"]}) == []


def test_miss_analysis_explains_only_the_missed_targets() -> None:
    rows = [
        ("http", {"name": "single quote: req/s engine / FastAPI baseline", "verdict": "MISS"}),
        ("audit", {"name": "PgQuoteStore.write, 10^5-position batch", "verdict": "PASS"}),
        ("latency", {"name": "single quote (a): p99 at half capacity, open loop", "verdict": "MISS"}),
        ("latency", {"name": "single quote (b): p99 at half capacity, open loop", "verdict": "MISS"}),
    ]
    text = "\n".join(run.miss_analysis(rows))
    assert "req/s engine / FastAPI baseline" in text
    assert "10^5" not in text
    assert text.count("p99 at half capacity") == 1  # one explanation per kind of miss
    assert run.miss_analysis(rows[1:2]) == []


def test_pricing_target_reads_the_million_row_core_time() -> None:
    data = {
        "results": [
            {"size": 1000, "core_ms": 0.1},
            {"size": 1_000_000, "core_ms": 48.76, "decimal_over_core": 65.1},
        ]
    }
    (target,) = run.pricing_targets(data)
    assert (target["value"], target["verdict"]) == (48.8, "PASS")
    slow = {"results": [{"size": 1_000_000, "core_ms": 150.0}]}
    assert run.pricing_targets(slow)[0]["verdict"] == "MISS"
    assert run.pricing_targets({"results": []}) == []


# ---- bench_faults.py ------------------------------------------------------------------------------------


def test_exact_bucket_allowance_and_overshoot() -> None:
    # 120/min, burst 60, over 60 s: the burst and 120 more; 295 granted is 64 % over (the issue's figure).
    assert bench_faults.bucket_allowance(120, 60, 60.0) == pytest.approx(180.0)
    assert bench_faults.bucket_allowance(120, 60, -1.0) == pytest.approx(60.0)  # no negative span
    assert bench_faults.overshoot_percent(295, 180.0) == pytest.approx(63.888, abs=1e-3)
    assert bench_faults.overshoot_percent(171, 180.0) == pytest.approx(-5.0)
    assert bench_faults.overshoot_percent(3, 0.0) is None


def test_lost_is_answered_minus_found_by_quote_id() -> None:
    assert bench_faults.lost_positions(["a", "b", "c"], {"a", "c", "z"}) == 1
    assert bench_faults.lost_positions(["a", "a"], set()) == 1  # an id counts once
    assert bench_faults.lost_positions([], {"a"}) == 0


def outcome(at: float, stream: str = "main", status: int | None = 200, **extra: Any) -> Any:
    quote_id = extra.pop("quote_id", f"q{at}-{stream}" if status == 200 else None)
    return bench_faults.Outcome(at, stream, 0, status=status, quote_id=quote_id, done_at=at + 0.01, **extra)


def test_summarize_a_scenario() -> None:
    outcomes = [
        outcome(0.0),
        outcome(1.0),
        outcome(2.0, status=503),  # during the fault (it ends at 2.5)
        outcome(3.0, status=None, error="connection"),  # after it: recovery lasts 0.5 s past the end
        outcome(3.5, status=None, error="timeout"),
        outcome(4.0),
        outcome(0.0, "limited"),
        outcome(1.0, "limited"),
        outcome(2.0, "limited", status=429),
        outcome(10.0, "limited"),
        outcome(5.0, "flood", status=401),  # not part of the load's counts
    ]
    stored = {"q0.0-main", "q4.0-main", "q0.0-limited", "q1.0-limited", "q10.0-limited", "elsewhere"}
    row = bench_faults.summarize(outcomes, stored, fault_end=2.5, not_sent=3)
    assert row["requests"] == 10
    assert row["not_sent"] == 3
    assert row["errors"] == {"connection": 2, "timeout": 1, "5xx": 1, "429": 1}
    assert row["5xx_by_stream"] == {"main@0": 1}  # which client, which replica
    assert row["answered_positions"] == 6
    assert row["audit_rows"] == 5
    assert row["lost"] == 1  # q1.0-main
    limited = row["limited"]
    assert limited["granted"] == 3
    assert limited["span_s"] == pytest.approx(10.0)
    assert limited["allowance"] == pytest.approx(
        bench_faults.LIMITED_BURST + bench_faults.LIMITED_PER_MINUTE / 6
    )
    assert limited["overshoot_percent"] == pytest.approx((3 / limited["allowance"] - 1) * 100)
    assert row["recovery_s"] == pytest.approx(1.0)  # the timeout at 3.5
    assert row["latency_max_s"] == pytest.approx(0.01)  # answers only (main stream): each took 10 ms
    assert bench_faults.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.99) == 5.0
    assert bench_faults.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert bench_faults.percentile([], 0.99) is None
    assert bench_faults.recovery_seconds(outcomes[:2], 0.5) == 0.0
    assert bench_faults.recovery_seconds(outcomes, None) is None


def test_faults_table_and_report_section() -> None:
    rows = [
        {
            "name": "sigkill",
            "label": "SIGKILL (default audit mode)",
            "requests": 1986,
            "errors": {"connection": 11, "timeout": 0, "5xx": 0, "429": 27},
            "answered_positions": 1948,
            "audit_rows": 1946,
            "lost": 2,
            "limited": {"granted": 24, "allowance": 19.6, "overshoot_percent": 22.4},
            "recovery_s": 0.0,
            "audit_complete_s": None,
            "latency_p99_s": 0.0213,
            "latency_max_s": 0.306,
            "notes": ["replica 0 was killed"],
        },
        {
            "name": "pg_down_short",
            "label": "PostgreSQL down 3 s",
            "requests": 2000,
            "not_sent": 1034,
            "errors": {"connection": 0, "timeout": 0, "5xx": 0, "429": 30},
            "answered_positions": 1970,
            "audit_rows": 1970,
            "lost": 0,
            "limited": {"granted": 20, "allowance": 20.0, "overshoot_percent": 0.0},
            "recovery_s": 0.0,
            "audit_complete_s": 1.5,
        },
        {"name": "sigkill_disk", "label": "SIGKILL, AUDIT_DURABILITY=disk", "skipped": "no such mode"},
    ]
    table = bench_faults.table_lines(rows)
    assert len(table) == 5
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2] == (
        "| SIGKILL (default audit mode) | 1,986 | 11 | 0 | 27 | 1,948 | 1,946 | **2** | 24/20 (+22 %) "
        "| 0.02 / 0.31 | 0.0 / never |"
    )
    assert table[3].startswith("| PostgreSQL down 3 s | 2,000 (1,034) | 0 | 0 | 30 |")
    assert table[3].endswith("| 1,970 | 1,970 | 0 | 20/20 (+0 %) | – / – | 0.0 / 1.5 |")
    assert table[4].startswith("| SIGKILL, AUDIT_DURABILITY=disk | n/a: no such mode |")
    doc = {
        "settings": {"rate": 200, "replicas": 2, "before": 3, "after": 5, "quick": True},
        "scenarios": rows,
    }
    section = run.faults_section(doc, ["python", "benchmarks/bench_faults.py", "--quick"], None)
    assert section[0] == "## Faults (bench_faults.py)"
    assert table[2] in section
    assert "- SIGKILL (default audit mode): replica 0 was killed" in section
    assert "python benchmarks/bench_faults.py --quick" in section
    assert run.faults_section(None, [], "bench_faults.py wrote no JSON")[2].startswith("**Problem:**")


def test_a_regenerated_report_keeps_its_hand_written_sections(tmp_path: Path) -> None:
    report = tmp_path / "REPORT.md"
    hand = f"{run.KEPT_MARKER}\n\n## Python client (run by hand)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    report.write_text("# Benchmark report\n\nold figures\n\n" + hand)
    run.write_report(report, quick=True, results={})
    text = report.read_text()
    assert "old figures" not in text
    assert text.endswith(hand)
    assert text.count(run.KEPT_MARKER) == 1
    run.write_report(report, quick=True, results={})  # and again: the tail is not doubled
    again = report.read_text()
    assert again.endswith(hand)
    assert again.count(run.KEPT_MARKER) == 1
    fresh = tmp_path / "new.md"
    run.write_report(fresh, quick=True, results={})
    assert run.KEPT_MARKER not in fresh.read_text()


def test_million_section_renders_the_four_forms_and_targets() -> None:
    fmt = {
        "request_bytes": 62_000_000,
        "response_bytes": 248_000_000,
        "round_trip_s": 2.5,
        "server_cpu_s": 2.0,
        "peak_rss_mb": 512.0,
        "decode_s": 0.4,
        "encode_s": 0.9,
        "floor_s": 1.3,
        "server_cpu_over_floor": 2.0 / 1.3,
        "rounds": 2,
        "round_trips_s": [2.7, 2.3],
    }
    million = {
        "positions": 1_000_000,
        "tickers": 5000,
        "data_file": "ibkr_usa_2022-08-06.txt",
        "formats": {"row JSON": fmt, "columnar msgpack": {**fmt, "round_trip_s": 0.4}},
        "commands": ["# large-batch engine: python -m pricer serve"],
    }
    target = bench_http.make_target("row JSON: server / floor", 1.54, 2.0, "<=", "x")
    text = "\n".join(run.million_section({"million": million, "targets": [target]}, [], None))
    assert "| row JSON | 62 | 248 | 2.50 | 2.70, 2.30 | 2.00 | 1.30 (0.40 + 0.90) | 1.54 | 512 |" in text
    assert "| columnar msgpack | 62 | 248 | 0.40 | 2.70, 2.30 |" in text
    assert "PASS" in text
    assert "python -m pricer serve" in text
    assert run.million_section(None, [], "bench_batch.py exited with status 1")  # the failure is reported


def test_million_bodies_carry_the_same_positions_in_every_form() -> None:
    columns = bench_million.million_columns(50, ["AAA", "BBB"])
    sent = bench_million.bodies("demo_client", columns)
    import msgspec

    rows = msgspec.json.decode(sent["row JSON"])["positions"]
    assert msgspec.msgpack.decode(sent["row msgpack"])["positions"] == rows
    assert msgspec.json.decode(sent["columnar JSON"])["columns"] == columns
    assert msgspec.msgpack.decode(sent["columnar msgpack"])["columns"] == columns
    assert [row["ticker"] for row in rows] == columns["ticker"]
    assert all(0 < row["position_value"] <= 10**9 and 1 <= row["loan_days"] <= 365 for row in rows)


def test_million_top_lines_of_a_raw_profile() -> None:
    raw = "main (a.py:1);f (b.py:2) 30\nmain (a.py:1);g (c.py:3) 10\nmain (a.py:1);f (b.py:2) 20\nbad line\n"
    top = bench_million.top_lines(raw, 2)
    assert [entry["line"] for entry in top] == ["f (b.py:2)", "g (c.py:3)"]
    assert [round(entry["share"], 2) for entry in top] == [0.83, 0.17]


def test_generators_run_pinned_and_under_sched_fifo_only_where_asked_and_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert bench_http.generator("1", ["wrk", "-t1"], realtime=False) == ["taskset", "-c", "1", "wrk", "-t1"]
    assert bench_http.generator(None, ["wrk"], realtime=False) == ["wrk"]
    bench_http.realtime_allowed.cache_clear()
    monkeypatch.setenv("BENCH_GENERATOR_REALTIME", "0")
    try:
        assert bench_http.generator("1", ["wrk"]) == ["taskset", "-c", "1", "wrk"]
        bench_http.realtime_allowed.cache_clear()
        monkeypatch.delenv("BENCH_GENERATOR_REALTIME")
        fifo = ["chrt", "-f", str(bench_http.GENERATOR_PRIORITY)] if bench_http.realtime_allowed() else []
        assert bench_http.generator("1", ["wrk"]) == ["taskset", "-c", "1", *fifo, "wrk"]
    finally:
        bench_http.realtime_allowed.cache_clear()


def test_cpu_latency_qos_holds_zero_while_open_and_only_where_allowed(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"  # a plain file stands for the device: what is written, when
    device.write_bytes(b"")
    with bench_http.cpu_latency_qos(device=device) as held:
        assert held is True
        assert struct.unpack("=i", device.read_bytes()) == (0,)
    with bench_http.cpu_latency_qos(device=tmp_path / "absent") as held:
        assert held is False  # not allowed or not there: the benchmark runs as the machine is
    device.write_bytes(b"")
    with bench_http.cpu_latency_qos(False, device) as held:
        assert held is False  # not asked for: the device is not even opened
        assert device.read_bytes() == b""


def test_cpu_latency_qos_on_the_real_device_is_dropped_when_closed() -> None:
    device = bench_http.CPU_LATENCY_DEVICE
    if not os.access(device, os.W_OK):
        pytest.skip("/dev/cpu_dma_latency is not writable by this user (CI runs as root)")

    def current() -> int:
        with device.open("rb") as reader:
            return int(struct.unpack("=i", reader.read(4))[0])

    before = current()
    with bench_http.cpu_latency_qos() as held:
        assert held is True
        assert current() == 0
    assert current() == before
    assert "governor" in bench_http.cpu_idle_facts() or bench_http.cpu_idle_facts() == "unknown"


def test_latency_rows_and_notes_say_what_the_latency_qos_was() -> None:
    held = {"latency_qos": True, "untuned": {"summary": _half_summary(3.25)}}
    assert bench_latency.untuned_note(held) == (
        "; CPU latency QoS 0 µs held (one run without it: p99 3.25 ms, server CPU 60 %)"
    )
    assert bench_latency.untuned_note({"latency_qos": True, "untuned": None}) == "; CPU latency QoS 0 µs held"
    assert bench_latency.untuned_note({"latency_qos": False}) == ""
    doc = {
        "variants": {
            "embedded": _latency_variant(latency_qos=True, untuned={"summary": _half_summary(3.25)})
        },
        "floor": {
            "offered_rps": 4000.0,
            "summary": _half_summary(0.9),
            "untuned": {"summary": _half_summary(1.1)},
        },
    }
    text = "\n".join(run.latency_section(doc, ["python", "benchmarks/bench_latency.py"], None))
    assert "| embedded | open at 4000/s, no latency QoS | 4,000 |" in text
    assert "| raw-ASGI floor | open at 4000/s, no latency QoS |" in text
    assert "/dev/cpu_dma_latency" in text
    doc["variants"]["embedded"]["latency_qos"] = False
    assert "`--latency-qos`" in "\n".join(run.latency_section(doc, ["python"], None))
    table = bench_latency.render(doc["variants"], doc["floor"])
    assert "embedded half, no QoS" in table
    assert "raw floor, no QoS" in table
